"""Attachment blocker (fuglu_plugins/attachment.py).

Every message and archive the tests use is built here: executables (a minimal PE and
ELF header), nested zips, archive bombs, an encrypted zip (ZipCrypto written by hand,
the stdlib only reads it), a 7z signature without its library, encoded file names.
Bounces go to a recording stand-in for fuglu.send_bounce; the real delivery is in
tests/integration/test_attachment_postfix.py.
"""

import bz2
import gzip
import io
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import tracemalloc
import zipfile
import zlib
from email.mime.application import MIMEApplication
from email.mime.base import MIMEBase
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)

import fuglu  # noqa: E402
from fuglu_plugins import attachment  # noqa: E402
from fuglu_plugins.attachment import FiletypePlugin, sniff_content_type  # noqa: E402
from helpers import (InProcessFuglu, RawClient, Sink, make_config,  # noqa: E402,F401
                     no_address_check, wait_for)

# --------------------------------------------------------------------------
# corpus
# --------------------------------------------------------------------------

PE_PROGRAM = b'MZ\x90\x00\x03\x00\x00\x00' + b'\x00' * 52 + struct.pack('<I', 64) + \
    b'PE\x00\x00' + b'\x4c\x01' + os.urandom(200)
ELF_PROGRAM = b'\x7fELF\x02\x01\x01\x00' + b'\x00' * 8 + b'\x02\x00\x3e\x00' + os.urandom(100)
PDF_DOCUMENT = b'%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF\n'
PNG_IMAGE = b'\x89PNG\r\n\x1a\n' + b'\x00\x00\x00\rIHDR' + os.urandom(40)


def mail(*attachments, subject='test', body='see attachment'):
    """A message with a text body and attachments given as (filename, data[, mime type])."""
    message = MIMEMultipart()
    message['From'] = 'sender@example.net'
    message['To'] = 'rcpt@example.org'
    message['Subject'] = subject
    message.attach(MIMEText(body))
    for item in attachments:
        if isinstance(item, MIMEBase):
            message.attach(item)
            continue
        name, data = item[0], item[1]
        maintype, subtype = (item[2] if len(item) > 2 else 'application/octet-stream').split('/')
        part = MIMEBase(maintype, subtype)
        part.set_payload(data)
        from email import encoders
        encoders.encode_base64(part)
        if name is not None:
            part.add_header('Content-Disposition', 'attachment', filename=name)
        else:
            part.add_header('Content-Disposition', 'attachment')
        message.attach(part)
    return message.as_bytes()


def zip_of(*members, compression=zipfile.ZIP_DEFLATED):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w', compression) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_of(*members, mode='w'):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# megabytes of zeros in a bomb: above archive_max_extracted (50 MB by default), so the size
# limit alone refuses it (the ratio check usually does sooner); building bigger ones only
# costs the test time
BOMB_MEGABYTES = 60


def zip_bomb(megabytes=BOMB_MEGABYTES):
    """A small zip announcing ``megabytes`` MB of zeros, written in chunks."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w', zipfile.ZIP_DEFLATED) as archive:
        with archive.open('zeros.txt', 'w', force_zip64=True) as member:
            chunk = b'\x00' * 1048576
            for _ in range(megabytes):
                member.write(chunk)
    return buffer.getvalue()


def stream_compress(compressor, megabytes):
    out = []
    chunk = b'\x00' * 1048576
    for _ in range(megabytes):
        out.append(compressor.compress(chunk))
    out.append(compressor.flush())
    return b''.join(out)


def gzip_bomb(megabytes=BOMB_MEGABYTES):
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip wrapper
    return stream_compress(compressor, megabytes)


def _crc_update(crc, byte):
    return zlib.crc32(bytes([byte]), crc ^ 0xffffffff) ^ 0xffffffff


class ZipCryptoKeys(object):
    """PKWARE traditional encryption (APPNOTE 6.1), enough to write a test file."""

    def __init__(self, password):
        self.keys = [0x12345678, 0x23456789, 0x34567890]
        for byte in password:
            self.update(byte)

    def update(self, byte):
        keys = self.keys
        keys[0] = _crc_update(keys[0], byte)
        keys[1] = ((keys[1] + (keys[0] & 0xff)) * 134775813 + 1) & 0xffffffff
        keys[2] = _crc_update(keys[2], keys[1] >> 24)

    def encrypt(self, data):
        out = bytearray()
        for byte in data:
            temp = (self.keys[2] | 2) & 0xffff
            out.append(byte ^ (((temp * (temp ^ 1)) >> 8) & 0xff))
            self.update(byte)
        return bytes(out)


def encrypted_zip(name, data, password):
    """A one-member zip, stored, encrypted with ZipCrypto."""
    crc = zlib.crc32(data) & 0xffffffff
    keys = ZipCryptoKeys(password)
    header = os.urandom(11) + bytes([crc >> 24])
    payload = keys.encrypt(header + data)
    filename = name.encode()
    local = struct.pack('<IHHHHHIIIHH', 0x04034b50, 20, 1, 0, 0, 0, crc, len(payload), len(data),
                        len(filename), 0) + filename
    central = struct.pack('<IHHHHHHIIIHHHHHII', 0x02014b50, 20, 20, 1, 0, 0, 0, crc, len(payload),
                          len(data), len(filename), 0, 0, 0, 0, 0, 0) + filename
    offset = len(local) + len(payload)
    end = struct.pack('<IHHHHIIH', 0x06054b50, 0, 0, 1, 1, len(central), offset, 0)
    return local + payload + central + end


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------

@pytest.fixture
def confdir(tmp_path):
    """A config folder with the shipped rules and template."""
    shutil.copytree(os.path.join(REPO_DIR, 'conf', 'rules'), str(tmp_path / 'rules'))
    shutil.copytree(os.path.join(REPO_DIR, 'conf', 'templates'), str(tmp_path / 'templates'))
    return tmp_path


def make_plugin(confdir, **options):
    text = '[FiletypePlugin]\n' + ''.join('%s = %s\n' % item for item in options.items())
    return FiletypePlugin(make_config(text, confdir=str(confdir)))


def suspect_for(source, recipient='rcpt@example.org', sender='sender@example.net'):
    return fuglu.Suspect(sender, [recipient], source)


@pytest.fixture
def bounces(monkeypatch):
    """Records fuglu.send_bounce calls instead of delivering."""
    sent = []

    def record(config, suspect, recipient, message_bytes):
        sent.append((recipient, message_bytes))
        return 'QUEUE%d' % len(sent)
    monkeypatch.setattr(fuglu, 'send_bounce', record, raising=False)
    return sent


def examine(plugin, source, **kwargs):
    suspect = suspect_for(source, **kwargs)
    result = plugin.examine(suspect)
    code, message = result if isinstance(result, tuple) else (result, None)
    return code, message, suspect


# --------------------------------------------------------------------------
# content types
# --------------------------------------------------------------------------

@pytest.mark.parametrize('data, expected', [
    (PE_PROGRAM, 'application/x-dosexec'),
    (ELF_PROGRAM, 'application/x-executable'),
    (b'#!/bin/sh\nrm -rf /\n', 'text/x-shellscript'),
    (b'#!/usr/bin/env python3\nprint(1)\n', 'text/x-script.python'),
    (zip_of(('a.txt', b'hello')), 'application/zip'),
    (zip_of(('[Content_Types].xml', b'<Types/>'), ('word/document.xml', b'<w/>')),
     'application/vnd.openxmlformats-officedocument.wordprocessingml.document'),
    (zip_of(('[Content_Types].xml', b'<Types/>'), ('xl/workbook.xml', b'<w/>')),
     'application/vnd.openxmlformats-officedocument.spreadsheetml.sheet'),
    (b'Rar!\x1a\x07\x01\x00' + os.urandom(30), 'application/x-rar'),
    (b'7z\xbc\xaf\x27\x1c\x00\x04' + os.urandom(30), 'application/x-7z-compressed'),
    (gzip.compress(b'hello'), 'application/gzip'),
    (bz2.compress(b'hello'), 'application/x-bzip2'),
    (lzma.compress(b'hello'), 'application/x-xz'),
    (tar_of(('a.txt', b'hello')), 'application/x-tar'),
    (PDF_DOCUMENT, 'application/pdf'),
    (b'\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1' + b'\x00' * 500 + 'WordDocument'.encode('utf-16-le'),
     'application/msword'),
    (b'\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1' + b'\x00' * 500, 'application/x-ole-storage'),
    (PNG_IMAGE, 'image/png'),
    (b'\xff\xd8\xff\xe0\x00\x10JFIF', 'image/jpeg'),
    (b'GIF89a\x01\x00\x01\x00', 'image/gif'),
    (b'Hello,\r\nplain text here.\r\n', 'text/plain'),
    (os.urandom(16) + b'\x00\x01\x02', 'application/octet-stream'),
    (b'', 'application/x-empty'),
], ids=lambda value: value if isinstance(value, str) else 'data')   # the same in every run
def test_signature_table_names_the_type(data, expected):
    assert sniff_content_type(data) == expected


# --------------------------------------------------------------------------
# names and types of attachments
# --------------------------------------------------------------------------

def test_exe_attachment_is_blocked_with_blockaction(confdir, bounces):
    plugin = make_plugin(confdir, sendbounce='False')
    code, message, suspect = examine(plugin, mail(('evil.exe', PE_PROGRAM)))
    assert code == fuglu.DELETE
    assert message == 'evil.exe: Dangerous attachment type (exe)'
    assert suspect.is_blocked()
    assert suspect.tags['FiletypePlugin.blocked'] == {'evil.exe': 'Dangerous attachment type (exe)'}
    assert suspect.tags['FiletypePlugin.errormessage'] == message
    assert suspect.addheaders['X-Fuglu-Attachment-Blocked'] == message
    assert bounces == []


def test_harmless_attachments_pass(confdir):
    plugin = make_plugin(confdir)
    source = mail(('report.pdf', PDF_DOCUMENT, 'application/pdf'),
                  ('photo.png', PNG_IMAGE, 'image/png'),
                  ('notes.txt', b'just text\n', 'text/plain'))
    code, message, suspect = examine(plugin, source)
    assert code == fuglu.DUNNO
    assert not suspect.is_blocked()


def test_executable_renamed_to_txt_is_found_by_content(confdir):
    plugin = make_plugin(confdir, sendbounce='False')
    code, message, _ = examine(plugin, mail(('invoice.txt', PE_PROGRAM, 'text/plain')))
    assert code == fuglu.DELETE
    assert message == 'invoice.txt application/x-dosexec: No programs allowed'


def test_elf_renamed_is_found_by_content(confdir):
    plugin = make_plugin(confdir, sendbounce='False')
    code, message, _ = examine(plugin, mail(('photo.jpg', ELF_PROGRAM, 'image/jpeg')))
    assert code == fuglu.DELETE
    assert 'application/x-executable' in message


def test_declared_type_is_checked(confdir):
    plugin = make_plugin(confdir, sendbounce='False')
    code, message, _ = examine(plugin,
                               mail(('setup.bin', b'harmless bytes \x00\x01',
                                     'application/x-msdownload')))
    assert code == fuglu.DELETE
    assert message == 'setup.bin application/x-msdownload: No programs allowed'


def test_unnamed_part_gets_a_generated_name(confdir):
    plugin = make_plugin(confdir, sendbounce='False')
    code, message, _ = examine(plugin, mail((None, b'text', 'application/x-msdownload')))
    assert code == fuglu.DELETE
    assert message.startswith('unnamed.')


def test_rfc2231_encoded_filename(confdir):
    plugin = make_plugin(confdir, sendbounce='False')
    part = MIMEApplication(b'data', 'octet-stream')
    part.add_header('Content-Disposition', 'attachment', filename=('utf-8', '', 'b\u00f6se.exe'))
    code, message, _ = examine(plugin, mail(part))
    assert code == fuglu.DELETE
    assert message == 'bse.exe: Dangerous attachment type (exe)'  # non-ASCII removed for matching


def test_rfc2231_continuations(confdir):
    plugin = make_plugin(confdir, sendbounce='False')
    source = mail(('placeholder.dat', b'data')).replace(
        b'filename="placeholder.dat"',
        b"filename*0*=utf-8''rech%C3%BCnung; filename*1*=%2Epdf%2Eexe")
    code, message, _ = examine(plugin, source)
    assert code == fuglu.DELETE
    assert 'rechnung.pdf.exe' in message


def test_rfc2047_encoded_filename(confdir):
    plugin = make_plugin(confdir, sendbounce='False')
    source = mail(('placeholder.dat', b'data')).replace(
        b'filename="placeholder.dat"', b'filename="=?utf-8?B?UmVjaG51bmcuc2Ny?="')
    code, message, _ = examine(plugin, source)
    assert code == fuglu.DELETE
    assert message == 'Rechnung.scr: Dangerous attachment type (scr)'


def test_right_to_left_override_does_not_hide_the_extension(confdir):
    plugin = make_plugin(confdir, sendbounce='False')
    part = MIMEApplication(b'data', 'octet-stream')
    part.add_header('Content-Disposition', 'attachment',
                    filename=('utf-8', '', 'invoice\u202efdp.exe'))
    code, _, _ = examine(plugin, mail(part))
    assert code == fuglu.DELETE


def test_attached_message_is_searched(confdir):
    plugin = make_plugin(confdir, sendbounce='False')
    inner = MIMEMessage(fuglu_email(mail(('evil.vbs', b'MsgBox 1', 'text/plain'))))
    code, message, _ = examine(plugin, mail(inner))
    assert code == fuglu.DELETE
    assert message.startswith('evil.vbs')


def fuglu_email(source):
    import email
    return email.message_from_bytes(source)


# --------------------------------------------------------------------------
# rule scopes
# --------------------------------------------------------------------------

def test_domain_rule_overrides_the_default(confdir):
    (confdir / 'rules' / 'example.org-filenames.conf').write_text('deny \\.txt$ No text '
                                                                  'files for us\n')
    plugin = make_plugin(confdir, sendbounce='False')
    source = mail(('notes.txt', b'hello\n', 'text/plain'))
    code, message, _ = examine(plugin, source, recipient='rcpt@example.org')
    assert (code, message) == (fuglu.DELETE, 'notes.txt: No text files for us')
    code, _, _ = examine(plugin, source, recipient='rcpt@other.org')
    assert code == fuglu.DUNNO


def test_user_rules_come_before_domain_and_default(confdir):
    rules = confdir / 'rules'
    (rules / 'vip@example.org-filenames.conf').write_text('allow \\.exe$ -\n')
    (rules / 'vip@example.org-filetypes.conf').write_text('allow dosexec -\n')
    (rules / 'example.org-filenames.conf').write_text('deny \\.exe$ Domain says no\n')
    plugin = make_plugin(confdir, sendbounce='False')
    source = mail(('tool.exe', PE_PROGRAM))
    assert examine(plugin, source, recipient='vip@example.org')[0] == fuglu.DUNNO
    code, message, _ = examine(plugin, source, recipient='other@example.org')
    assert message == 'tool.exe: Domain says no'


def test_rule_file_edit_takes_effect_on_the_next_message(confdir):
    path = confdir / 'rules' / 'example.org-filenames.conf'
    path.write_text('deny \\.txt$ first\n')
    plugin = make_plugin(confdir, sendbounce='False')
    source = mail(('notes.txt', b'hello\n', 'text/plain'))
    assert examine(plugin, source)[1] == 'notes.txt: first'
    path.write_text('deny \\.txt$ second version\n')
    assert examine(plugin, source)[1] == 'notes.txt: second version'


def test_recipient_with_path_characters_reads_no_foreign_file(confdir, tmp_path, no_address_check):
    (tmp_path / 'x-filenames.conf').write_text('deny \\.txt$ should never be read\n')
    plugin = make_plugin(confdir, sendbounce='False')
    code, _, _ = examine(plugin, mail(('a.txt', b'hello\n', 'text/plain')),
                         recipient='../x@example.org')
    assert code == fuglu.DUNNO


def test_delete_action_drops_silently(confdir, bounces):
    (confdir / 'rules' / 'example.org-filenames.conf').write_text('delete \\.iso$ -\n')
    plugin = make_plugin(confdir)
    code, message, suspect = examine(plugin, mail(('disk.iso', b'data')))
    assert (code, message) == (fuglu.DELETE, None)
    assert bounces == []


def test_rule_parser_drops_bad_lines():
    text = ('allow \\.txt$ -\nfrobnicate \\.exe$ x\ndeny ([a-z+ broken\ndeny (a+)+$ evil regex\n'
            'deny \\.exe$\n# comment\n\ndeny \\.scr$ Screensaver\n')
    rules, errors = attachment.parse_attachment_rules(text, 'test.conf')
    assert [(rule.action, rule.regex.pattern, rule.description) for rule in rules] == [
        ('allow', '\\.txt$', ''), ('deny', '\\.scr$', 'Screensaver')]
    assert len(errors) == 4
    assert 'line 2' in errors[0] and 'nested quantifier' in errors[2]


def test_bundled_defaults_when_rulesdir_has_none(tmp_path):
    plugin = make_plugin(tmp_path, rulesdir=str(tmp_path / 'missing'), sendbounce='False')
    code, message, _ = examine(plugin, mail(('evil.exe', PE_PROGRAM)))
    assert (code, message) == (fuglu.DELETE, 'evil.exe: Dangerous attachment type (exe)')


def test_bundled_defaults_are_read_from_a_zipapp(tmp_path):
    """The build puts conf/ at the root of the pyz; the plugin must find it there."""
    pyz = tmp_path / 'fuglu.pyz'
    with zipfile.ZipFile(str(pyz), 'w') as archive:
        archive.write(os.path.join(REPO_DIR, 'fuglu.py'), 'fuglu.py')
        for name in ('__init__.py', 'attachment.py'):
            archive.write(os.path.join(REPO_DIR, 'fuglu_plugins', name), 'fuglu_plugins/' + name)
        for name in os.listdir(os.path.join(REPO_DIR, 'conf', 'rules')):
            archive.write(os.path.join(REPO_DIR, 'conf', 'rules', name), 'conf/rules/' + name)
    code = ('import sys; sys.path.insert(0, sys.argv[1]); import fuglu_plugins.attachment as a; '
            'assert a.__file__.startswith(sys.argv[1]), a.__file__; '
            'rules = a.RuleFileCache(None).bundled("filenames"); print(len(rules))')
    result = subprocess.run([sys.executable, '-c', code, str(pyz)], cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    assert int(result.stdout) > 100


# --------------------------------------------------------------------------
# archives
# --------------------------------------------------------------------------

def nested_exe_zip():
    return zip_of(('inner.zip', zip_of(('payload/evil.exe', PE_PROGRAM))), ('readme.txt', b'hi'))


def test_exe_in_a_zip_in_a_zip(confdir):
    source = mail(('outer.zip', nested_exe_zip(), 'application/zip'))
    deep = make_plugin(confdir, sendbounce='False', checkarchivenames='True',
                       archiveextractlevel='2')
    code, message, _ = examine(deep, source)
    assert code == fuglu.DELETE
    assert message == 'outer.zip inner.zip/payload/evil.exe: Dangerous file in archive'
    shallow = make_plugin(confdir, sendbounce='False', checkarchivenames='True',
                          archiveextractlevel='1')
    assert examine(shallow, source)[0] == fuglu.DUNNO
    unlimited = make_plugin(confdir, sendbounce='False', checkarchivenames='True',
                            archiveextractlevel='-1')
    assert examine(unlimited, source)[0] == fuglu.DELETE
    off = make_plugin(confdir, sendbounce='False', archiveextractlevel='5')
    assert examine(off, source)[0] == fuglu.DUNNO


def test_zip_disguised_as_text_is_still_opened(confdir):
    plugin = make_plugin(confdir, sendbounce='False', checkarchivenames='True')
    code, message, _ = examine(plugin,
                               mail(('notes.txt', zip_of(('run.bat', b'echo')), 'text/plain')))
    assert code == fuglu.DELETE
    assert message == 'notes.txt run.bat: Dangerous file in archive'


def test_archive_content_types(confdir):
    (confdir / 'rules' / 'default-archivefiletypes.conf').write_text('deny x-dosexec No programs '
                                                                     'in archives\n')
    source = mail(('docs.zip', zip_of(('manual.pdf', PE_PROGRAM)), 'application/zip'))
    plugin = make_plugin(confdir, sendbounce='False', checkarchivecontent='True')
    code, message, _ = examine(plugin, source)
    assert message == 'docs.zip manual.pdf application/x-dosexec: No programs in archives'
    names_only = make_plugin(confdir, sendbounce='False', checkarchivenames='True')
    assert examine(names_only, source)[0] == fuglu.DUNNO


@pytest.mark.parametrize('name, data', [
    ('bundle.tar', tar_of(('bin/evil.exe', PE_PROGRAM))),
    ('bundle.tar.gz', tar_of(('bin/evil.exe', PE_PROGRAM), mode='w:gz')),
    ('bundle.tar.bz2', tar_of(('bin/evil.exe', PE_PROGRAM), mode='w:bz2')),
    ('bundle.tar.xz', tar_of(('bin/evil.exe', PE_PROGRAM), mode='w:xz')),
])
def test_tar_archives(confdir, name, data):
    plugin = make_plugin(confdir, sendbounce='False', checkarchivenames='True')
    code, message, _ = examine(plugin, mail((name, data)))
    assert (code, message) == (fuglu.DELETE, '%s bin/evil.exe: Dangerous file in archive' % name)


@pytest.mark.parametrize('name, data', [
    ('evil.exe.gz', gzip.compress(PE_PROGRAM)),
    ('evil.exe.bz2', bz2.compress(PE_PROGRAM)),
    ('evil.exe.xz', lzma.compress(PE_PROGRAM)),
])
def test_single_compressed_files(confdir, name, data):
    plugin = make_plugin(confdir, sendbounce='False', checkarchivenames='True')
    code, message, _ = examine(plugin, mail((name, data)))
    assert message == '%s evil.exe: Dangerous file in archive' % name


def test_disabled_archive_types_are_not_opened(confdir):
    source = mail(('outer.zip', nested_exe_zip(), 'application/zip'))
    plugin = make_plugin(confdir, sendbounce='False', checkarchivenames='True',
                         archiveextractlevel='2',
                         disabledarchivetypes='zip')
    assert examine(plugin, source)[0] == fuglu.DUNNO
    plugin = make_plugin(confdir, sendbounce='False', checkarchivenames='True',
                         archiveextractlevel='2',
                         enabledarchivetypes='tar, gz')
    assert examine(plugin, source)[0] == fuglu.DUNNO
    # the plugin's own settings are untouched by the above: a default plugin still opens zips
    plugin = make_plugin(confdir, sendbounce='False', checkarchivenames='True',
                         archiveextractlevel='2')
    assert examine(plugin, source)[0] == fuglu.DELETE


def test_corrupt_archive_is_no_error(confdir):
    plugin = make_plugin(confdir, sendbounce='False', checkarchivenames='True')
    broken = zip_of(('a.txt', b'hello'))[:20] + b'garbage' * 10
    code, _, suspect = examine(plugin, mail(('broken.zip', broken)))
    assert code == fuglu.DUNNO


def test_7z_without_its_library_is_reported_not_a_crash(confdir):
    if attachment._py7zr_module is not None:
        pytest.skip('py7zr is installed here; this test is about its absence')
    seven = b'7z\xbc\xaf\x27\x1c\x00\x04' + os.urandom(200)
    plugin = make_plugin(confdir, sendbounce='False', checkarchivenames='True')
    code, _, suspect = examine(plugin, mail(('files.7z', seven)))
    assert code == fuglu.DUNNO
    assert any('7z' in note and 'not installed' in note
               for note in suspect.tags['FiletypePlugin.unchecked'])
    # and the name of the 7z itself is still checked
    code, message, _ = examine(plugin, mail(('files.7z.exe', seven)))
    assert code == fuglu.DELETE


# --------------------------------------------------------------------------
# archive bombs
# --------------------------------------------------------------------------

BOMBS = {}


def bomb(kind):
    """Bombs are built once per test run (BOMB_MEGABYTES of zeros each, streamed)."""
    if kind not in BOMBS:
        if kind == 'zip':
            BOMBS[kind] = ('bomb.zip', zip_bomb())
        elif kind == 'gz':
            BOMBS[kind] = ('zeros.bin.gz', gzip_bomb())
        elif kind == 'bz2':
            BOMBS[kind] = ('zeros.bin.bz2', stream_compress(bz2.BZ2Compressor(9), BOMB_MEGABYTES))
        elif kind == 'xz':
            BOMBS[kind] = ('zeros.bin.xz', stream_compress(lzma.LZMACompressor(), BOMB_MEGABYTES))
        elif kind == 'nested':
            layer = zip_bomb(20)
            BOMBS[kind] = ('nested.zip', zip_of(*[('part%d.zip' % i, layer) for i in range(10)],
                                                compression=zipfile.ZIP_STORED))
        elif kind == 'members':
            BOMBS[kind] = ('many.zip', zip_of(*[('f%05d.txt' % i, b'') for i in range(5000)]))
    return BOMBS[kind]


@pytest.mark.parametrize('kind', ['zip', 'gz', 'bz2', 'xz', 'nested', 'members'])
def test_archive_bomb_is_refused_quickly_and_in_little_memory(confdir, kind):
    name, data = bomb(kind)
    assert len(data) < 2000000
    source = mail((name, data))
    plugin = make_plugin(confdir, sendbounce='False', checkarchivecontent='True',
                         checkarchivenames='True',
                         archiveextractlevel='3')
    tracemalloc.start()
    started = time.process_time()
    try:
        code, message, suspect = examine(plugin, source)
        elapsed = time.process_time() - started
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code == fuglu.DELETE
    assert 'exceeds the extraction limits' in message
    assert elapsed < 1.0  # bench/attachments.py records the real figure (target 0.1 s)
    assert peak < 40 * 1024 * 1024


def test_archive_limit_can_take_problemaction(confdir):
    name, data = bomb('zip')
    plugin = make_plugin(confdir, sendbounce='False', checkarchivecontent='True',
                         archive_limit_action='problem')
    code, message, suspect = examine(plugin, mail((name, data)))
    assert code == fuglu.DEFER
    assert not suspect.is_blocked()


def test_highly_compressible_but_small_archive_passes(confdir):
    """The ratio limit only applies beyond 1 MB inflated: a small log zip is fine."""
    log = b'2024-01-01 00:00:00 INFO all good\n' * 20000  # 700 KB, compresses ~300:1
    plugin = make_plugin(confdir, sendbounce='False', checkarchivecontent='True',
                         checkarchivenames='True')
    assert examine(plugin, mail(('logs.zip', zip_of(('app.log', log)))))[0] == fuglu.DUNNO


# --------------------------------------------------------------------------
# encrypted archives
# --------------------------------------------------------------------------

def test_encrypted_zip_is_readable_by_zipfile():
    data = encrypted_zip('secret.txt', b'top secret', b'asdf')
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.infolist()[0].flag_bits & 1
        assert archive.read('secret.txt', pwd=b'asdf') == b'top secret'


def test_block_encrypted(confdir):
    source = mail(('secret.zip', encrypted_zip('report.pdf', PDF_DOCUMENT, b'x9!kq')))
    plugin = make_plugin(confdir, sendbounce='False', checkarchivenames='True',
                         block_encrypted='True')
    code, message, _ = examine(plugin, source)
    assert (code, message) == (fuglu.DELETE, 'Encrypted archive secret.zip not permitted')
    plugin = make_plugin(confdir, sendbounce='False', checkarchivenames='True')
    assert examine(plugin, source)[0] == fuglu.DUNNO


def test_encrypted_zip_names_and_crypto_rules(confdir):
    rules = confdir / 'rules' / 'default-archivenames-crypto.conf'
    rules.write_text('deny \\.pdf$ No encrypted documents\n')
    plugin = make_plugin(confdir, sendbounce='False', checkarchivenames='True')
    code, message, _ = examine(plugin,
                               mail(('secret.zip',
                                     encrypted_zip('report.pdf', PDF_DOCUMENT, b'x9!kq'))))
    assert message == 'secret.zip report.pdf: No encrypted documents'
    code, message, _ = examine(plugin, mail(('plain.zip', zip_of(('report.pdf', PDF_DOCUMENT)))))
    assert code == fuglu.DUNNO  # crypto rules are for encrypted archives only
    code, message, _ = examine(plugin,
                               mail(('secret.zip', encrypted_zip('x.exe', PE_PROGRAM, b'x9!kq'))))
    assert message == 'secret.zip x.exe: Dangerous file in archive'


def test_password_from_the_subject_opens_the_archive(confdir):
    (confdir / 'rules' / 'default-archivefiletypes.conf').write_text('deny x-dosexec No programs '
                                                                     'in archives\n')
    data = encrypted_zip('invoice.dat', PE_PROGRAM, b'Kx7Pq2')
    plugin = make_plugin(confdir, sendbounce='False', checkarchivecontent='True')
    code, message, _ = examine(plugin,
                               mail(('invoice.zip', data), subject='Invoice, password: Kx7Pq2'))
    assert message == 'invoice.zip invoice.dat application/x-dosexec: No programs in archives'
    code, _, _ = examine(plugin, mail(('invoice.zip', data), subject='Invoice'))
    assert code == fuglu.DUNNO
    plugin = make_plugin(confdir, sendbounce='False', checkarchivecontent='True',
                         archive_passwords='Kx7Pq2')
    assert examine(plugin, mail(('invoice.zip', data), subject='Invoice'))[0] == fuglu.DELETE


# --------------------------------------------------------------------------
# actions and bounces
# --------------------------------------------------------------------------

def test_blockaction_reject_and_pseudo_actions(confdir):
    source = mail(('evil.exe', PE_PROGRAM))
    assert examine(make_plugin(confdir, sendbounce='False',
                               blockaction='REJECT'), source)[0] == fuglu.REJECT
    # resolved through [virus] (upstream would turn this into DUNNO)
    assert examine(make_plugin(confdir, sendbounce='False', blockaction='DEFAULTVIRUSACTION'),
                   source)[0] == fuglu.DELETE


def test_bounce_goes_to_the_sender(confdir, bounces):
    plugin = make_plugin(confdir)
    code, message, suspect = examine(plugin,
                                     mail(('evil.exe', PE_PROGRAM), subject='Quarterly numbers'))
    assert code == fuglu.DELETE
    assert len(bounces) == 1
    recipient, data = bounces[0]
    assert recipient == 'sender@example.net'
    import email
    bounce_message = email.message_from_bytes(data)
    assert bounce_message['To'] == 'sender@example.net'
    assert bounce_message['From'].startswith('MAILER-DAEMON@')
    assert bounce_message['Auto-Submitted'] == 'auto-generated'
    assert bounce_message['Message-ID'] and bounce_message['Date']
    body = bounce_message.get_payload(decode=True).decode('utf-8')
    assert 'evil.exe: Dangerous attachment type (exe)' in body
    assert 'Quarterly numbers' in body
    assert suspect.tags['Attachment.bounce.queueid'] == 'QUEUE1'


def test_no_bounce_for_spam_null_sender_or_nobouncerules(confdir, bounces):
    plugin = make_plugin(confdir)
    source = mail(('evil.exe', PE_PROGRAM))
    suspect = suspect_for(source)
    suspect.tags['spam']['SAPlugin'] = True
    plugin.examine(suspect)
    assert examine(plugin, source, sender='')[0] == fuglu.DELETE
    (confdir / 'nobounce.regex').write_text('envelope_from ^sender@example\\.net$ no\n')
    plugin = make_plugin(confdir, nobouncerules=str(confdir / 'nobounce.regex'))
    assert examine(plugin, source)[0] == fuglu.DELETE
    assert bounces == []
    assert examine(plugin, source, sender='other@example.net')[0] == fuglu.DELETE
    assert [recipient for recipient, _ in bounces] == ['other@example.net']


def test_failing_check_takes_problemaction(confdir, monkeypatch):
    plugin = make_plugin(confdir, problemaction='REJECT')

    def explode(*args):
        raise RuntimeError('boom')
    monkeypatch.setattr(attachment, 'walk_message', explode)
    code, message, _ = examine(plugin, mail(('a.txt', b'x')))
    assert code == fuglu.REJECT


def test_lint_reports_type_detection_and_archive_support(confdir, capsys):
    plugin = make_plugin(confdir)
    assert plugin.lint() is True
    out = capsys.readouterr().out
    assert 'file type detection: ' + attachment.type_detection_name() in out
    assert 'archive types: zip, tar, gz, bz2, xz' in out
    assert 'MIME limits: 2000 parts, 25 levels; beyond them: deny' in out
    (confdir / 'rules' / 'example.org-filenames.conf').write_text('nonsense\n')
    assert plugin.lint() is False


def test_plugin_loads_by_alias(confdir):
    config = make_config('[main]\nplugins = attachment\n', confdir=str(confdir))
    plugin = fuglu.load_plugins(config, 'plugins')[0]
    assert isinstance(plugin, FiletypePlugin)
    assert str(plugin) == 'Attachment Blocker'
    assert plugin.section == 'FiletypePlugin'


# --------------------------------------------------------------------------
# cost
# --------------------------------------------------------------------------

def big_mail():
    """~10 MB, 20 attachments of mixed kinds (the bench uses the same message)."""
    parts = []
    for index in range(20):
        kind = index % 4
        if kind == 0:
            parts.append(('scan%d.pdf' % index, PDF_DOCUMENT + os.urandom(500000),
                          'application/pdf'))
        elif kind == 1:
            parts.append(('photo%d.jpg' % index, b'\xff\xd8\xff\xe0' + os.urandom(500000),
                          'image/jpeg'))
        elif kind == 2:
            parts.append(('data%d.zip' % index,
                          zip_of(('d.bin', os.urandom(500000)), ('r.txt', b'x')),
                          'application/zip'))
        else:
            parts.append(('sheet%d.xlsx' % index, zip_of(('[Content_Types].xml', b'<T/>'),
                                                         ('xl/workbook.xml', os.urandom(500000))),
                          'application/vnd.openxmlformats-officedocument.spreadsheetml.sheet'))
    return mail(*parts)


def test_ten_megabytes_twenty_attachments_is_cheap(confdir):
    source = big_mail()
    assert len(source) > 10000000
    plugin = make_plugin(confdir, checkarchivenames='True', checkarchivecontent='True')
    examine(plugin, source)  # warm up caches (rule files, mimetypes)
    started = time.process_time()
    code, _, _ = examine(plugin, source)
    elapsed = time.process_time() - started
    assert code == fuglu.DUNNO
    assert elapsed < 0.25  # generous for slow CI; the target (50 ms) is measured by the bench


# --------------------------------------------------------------------------
# hostile and unusual mail: each example found by a review
# --------------------------------------------------------------------------

def raw_mail(*parts, boundary=b'b', preamble=b'', epilogue=b'', close=True):
    """A multipart/mixed message from raw parts (header bytes + body bytes each)."""
    chunks = [b'From: sender@example.net\r\nTo: rcpt@example.org\r\nSubject: raw\r\n'
              b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; '
              b'boundary="' + boundary + b'"\r\n\r\n' + preamble]
    for part in parts:
        chunks.append(b'--' + boundary + b'\r\n' + part + b'\r\n')
    if close:
        chunks.append(b'--' + boundary + b'--\r\n')
    return b''.join(chunks) + epilogue


def exe_part(name=b'evil.exe', headers=b''):
    return (b'Content-Type: application/octet-stream; name="' + name + b'"\r\n' + headers +
            b'Content-Transfer-Encoding: base64\r\n\r\n' + base64_lines(PE_PROGRAM))


def base64_lines(data):
    import base64
    return base64.encodebytes(data).replace(b'\n', b'\r\n')


TEXT_PART = b'Content-Type: text/plain\r\n\r\nhello\r\n'


def test_raw_utf8_file_names_are_ordinary_mail(confdir):
    """Current mail clients write 8-bit names unencoded; they used to raise (451 on
    every retry). Now they are read as UTF-8 and judged like any name."""
    plugin = make_plugin(confdir, sendbounce='False')
    pdf = ('Content-Type: application/pdf; name="Rechnung M\u00e4rz.pdf"\r\n'
           'Content-Disposition: attachment; filename="Rechnung M\u00e4rz.pdf"\r\n'
           'Content-Transfer-Encoding: base64\r\n\r\n').encode('utf-8') + base64_lines(PDF_DOCUMENT)
    code, message, suspect = examine(plugin, raw_mail(TEXT_PART, pdf))
    assert (code, message) == (fuglu.DUNNO, None)
    part = [p for p in attachment.iter_attachments(raw_mail(pdf)) if p.names][0]
    assert part.display_name() == 'Rechnung M\u00e4rz.pdf'
    exe = exe_part('b\u00f6se.exe'.encode('utf-8'), 'Content-Disposition: attachment; '
                                                    'filename="b\u00f6se.exe"\r\n'
                   .encode('utf-8'))
    code, message, _ = examine(plugin, raw_mail(TEXT_PART, exe))
    assert (code, message) == (fuglu.DELETE, 'bse.exe: Dangerous attachment type (exe)')


@pytest.mark.parametrize('header', [
    b'Content-Type: multipart/mixed; boundary="\xff\xfe"',
    b'Content-Type: text/pl\xe4in; charset="\xe4"',
    b'Content-Type: application/octet-stream; name*=\xff\'\'x%E4.exe',
    b'Content-Disposition: \xe4ttachment; filename="\xc3"',
    b'Content-Transfer-Encoding: b\xe4se64',
    b'Content-Type: text/plain; charset=punycode; name*=punycode\'\'' + b'a' * 900,
    b'Content-Disposition: attachment; filename*0*=utf-8\'\'a; filename*=b; filename*1=c',
    b'Content-Type: text/plain; name="=?unknown-charset?q?x?=" ; name="=?utf-16?b?AA?="',
])
def test_odd_and_8bit_header_fields_never_raise(confdir, header):
    plugin = make_plugin(confdir, sendbounce='False', checkarchivenames='True',
                         archive_passwords_maxbodywords='5')
    for source in (raw_mail(header + b'\r\n\r\nbody \xff\r\n'), header + b'\r\n\r\nbody\r\n'):
        plugin.check_message(suspect_for(source))  # examine() would turn an exception into DEFER
        code, _, _ = examine(plugin, source)
        assert code in (fuglu.DUNNO, fuglu.DELETE)


def test_an_attachment_named_like_a_template_stays_text(confdir):
    """The name reaches the reply as it is: nothing server-side leaks into it, and
    ${body:full} in a name does not multiply the message."""
    plugin = make_plugin(confdir, sendbounce='False', blockaction='REJECT')
    name = b'${id}${@decisions}' + b'${body:full}' * 40 + b'.exe'
    code, message, suspect = examine(plugin, raw_mail(exe_part(name)))
    assert code == fuglu.REJECT
    assert message == name.decode() + ': Dangerous attachment type (exe)'
    session = fuglu.ScanSession(type('Controller', (), {'config': plugin.config})())
    text = session.reply_text(suspect, code, message)
    assert text.startswith(name.decode()[:100]) and len(text) <= 500
    assert suspect.id in text


def test_a_line_starting_with_the_closing_boundary_does_not_close(confdir):
    plugin = make_plugin(confdir, sendbounce='False')
    source = raw_mail(TEXT_PART + b'--b--not really the end\r\n', exe_part())
    assert examine(plugin, source)[:2] == (fuglu.DELETE, 'evil.exe: Dangerous attachment '
                                                         'type (exe)')


def test_a_boundary_that_merely_starts_like_the_boundary_does_not_split(confdir):
    plugin = make_plugin(confdir, sendbounce='False')
    # "--bx" is not a boundary line of "b": the exe is part of the text part for every reader,
    # and the real parts after it are found
    source = raw_mail(TEXT_PART + b'--bx\r\n' + exe_part(b'inner.txt'), exe_part(b'real.exe'))
    assert examine(plugin, source)[:2] == (fuglu.DELETE, 'real.exe: Dangerous attachment '
                                                         'type (exe)')


def test_transport_padding_after_a_boundary(confdir):
    plugin = make_plugin(confdir, sendbounce='False')
    source = raw_mail(TEXT_PART, exe_part()).replace(b'--b\r\nContent-Type: application',
                                                     b'--b \t \r\nContent-Type: application')
    assert examine(plugin, source)[0] == fuglu.DELETE


def test_a_nested_multipart_reusing_its_parents_boundary_hides_no_zip(confdir):
    """To the email package the inner multipart ends at once and the zip lies after the
    outer closing boundary; a reader that nests sees it. Both readings are checked."""
    plugin = make_plugin(confdir, sendbounce='False', checkarchivenames='True')
    archive = (b'Content-Type: application/zip; name="invoice.zip"\r\n'
               b'Content-Transfer-Encoding: base64\r\n\r\n' +
               base64_lines(zip_of(('invoice.exe', PE_PROGRAM))))
    source = raw_mail(b'Content-Type: multipart/mixed; '
                      b'boundary="b"\r\n\r\n--b\r\n' + TEXT_PART + b'--b--',
                      archive)
    code, message, _ = examine(plugin, source)
    assert code == fuglu.DELETE
    assert 'invoice.exe' in message


def test_parts_in_the_epilogue_are_checked(confdir):
    plugin = make_plugin(confdir, sendbounce='False')
    source = raw_mail(TEXT_PART, epilogue=b'--b\r\n' + exe_part() + b'\r\n--b--\r\n')
    assert examine(plugin, source)[0] == fuglu.DELETE


@pytest.mark.parametrize('fields', [
    # every Content-Type / Content-Disposition field names the part
    b'Content-Type: application/pdf; name="a.pdf"\r\nContent-Type: application/x-msdownload; '
    b'name="a.exe"\r\n',
    b'Content-Disposition: attachment; filename="a.pdf"\r\nContent-Disposition: attachment; '
    b'filename="a.exe"\r\n',
    # the email package takes the first filename, RFC 2231 readers the extended one
    b'Content-Disposition: attachment; filename="a.pdf"; filename*=utf-8\'\'a.exe\r\n',
    b'Content-Disposition: attachment; filename="a.pdf"\r\nContent-Type: application/pdf; '
    b'name="a.exe"\r\n',
    # RFC 2231 continuations, RFC 2047 in a quoted name
    b'Content-Disposition: attachment; filename*0="a."; filename*1="exe"\r\n',
    b'Content-Disposition: attachment; filename="=?utf-8?q?a=2Eexe?="\r\n',
    # folded, upper-case parameter names, odd spacing
    b'Content-Disposition: attachment;\r\n\tFILENAME = "a.exe"\r\n',
])
def test_every_name_a_reader_may_show_is_checked(confdir, fields):
    plugin = make_plugin(confdir, sendbounce='False')
    part = fields + b'Content-Transfer-Encoding: base64\r\n\r\n' + base64_lines(PDF_DOCUMENT)
    code, message, _ = examine(plugin, raw_mail(TEXT_PART, part))
    assert code == fuglu.DELETE, fields
    assert message.startswith('a.exe') or 'a.exe' in message


def test_a_second_boundary_declaration_is_tried_too(confdir):
    """The email package uses the first Content-Type; a reader using the last one sees
    an exe in what the first calls text."""
    plugin = make_plugin(confdir, sendbounce='False')
    inner = (b'Content-Type: text/plain\r\nContent-Type: multipart/mixed; boundary="in"\r\n\r\n'
             b'--in\r\n' + exe_part() + b'\r\n--in--\r\n')
    assert examine(plugin, raw_mail(TEXT_PART, inner))[0] == fuglu.DELETE


def test_an_attached_message_in_base64_is_walked_decoded(confdir):
    plugin = make_plugin(confdir, sendbounce='False')
    inner = raw_mail(exe_part())
    part = (b'Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n'
            + base64_lines(inner))
    assert examine(plugin, raw_mail(TEXT_PART, part))[:2] == (fuglu.DELETE,
                                                              'evil.exe: Dangerous attachment '
                                                              'type (exe)')


def test_base64_with_stray_padding_is_read_both_ways():
    """The email package stops decoding at the first padding; forgiving decoders read
    on. Both readings are typed (and opened, when archives)."""
    body = base64_lines(b'hi') + base64_lines(zip_of(('a.exe', PE_PROGRAM)))
    part = (b'Content-Type: application/zip; name="a.zip"\r\n'
            b'Content-Transfer-Encoding: base64\r\n\r\n' + body)
    found = attachment.iter_attachments(raw_mail(part))[0]
    readings = found.decodings()
    assert readings[0] == b'hi'
    assert len(readings) == 2 and readings[1].startswith(b'hiPK\x03\x04')


def nested(levels, leaf):
    source = leaf
    for level in range(levels):
        boundary = b'level%d' % level
        source = (b'Content-Type: multipart/mixed; '
                  b'boundary="' + boundary + b'"\r\n\r\n--' + boundary + b'\r\n' +
                  source + b'\r\n--' + boundary + b'--\r\n')
    return b'From: a@example.net\r\nSubject: deep\r\n' + source


def test_parts_beyond_the_limits_block_the_message(confdir):
    """Parts past a limit were skipped silently (an exe as part 2001 passed)."""
    plugin = make_plugin(confdir, sendbounce='False', mime_max_parts='50', mime_max_depth='10')
    many = raw_mail(*([TEXT_PART] * 60 + [exe_part()]))
    code, message, suspect = examine(plugin, many)
    assert code == fuglu.DELETE and message.startswith('message: MIME structure exceeds the limits')
    assert suspect.tags['blocked']['FiletypePlugin'] is True
    deep = nested(12, exe_part(b'deep.pdf'))
    code, message, _ = examine(plugin, deep)
    assert code == fuglu.DELETE and 'nested deeper than 10 levels' in message
    deeper_allowed = make_plugin(confdir, sendbounce='False', mime_max_depth='20')
    assert examine(deeper_allowed, deep)[:2] == (fuglu.DELETE, 'deep.pdf application/x-dosexec: No '
                                                               'programs allowed')
    problem = make_plugin(confdir, sendbounce='False', mime_max_parts='50',
                          mime_limit_action='problem',
                          problemaction='DEFER')
    code, message, _ = examine(problem, many)
    assert code == fuglu.DEFER and 'more than 50 MIME parts' in message


def test_many_parameters_and_long_names_are_limits_not_cpu(confdir):
    plugin = make_plugin(confdir, sendbounce='False')
    quoted = b'Content-Type: text/plain; x="' + b'a;' * 30000 + b'"\r\n\r\nbody\r\n'
    started = time.process_time()
    # read through (in linear time) to the exe behind it
    assert examine(plugin, raw_mail(quoted, exe_part()))[:2] == \
        (fuglu.DELETE, 'evil.exe: Dangerous attachment type (exe)')
    huge = b'Content-Type: text/plain; x="' + b'a;' * 5000000 + b'"\r\n\r\nbody\r\n'
    code, message, _ = examine(plugin, raw_mail(huge, exe_part()))
    assert code == fuglu.DELETE and 'content-type field longer than 65536' in message
    assert time.process_time() - started < 1.0
    unquoted = b'Content-Type: text/plain; ' + b'a;' * 5000 + b'\r\n\r\nbody\r\n'
    code, message, _ = examine(plugin, raw_mail(unquoted))
    assert code == fuglu.DELETE and 'more than 100 parameters' in message
    long_name = (b'Content-Disposition: attachment; filename="' + b'a;' * 20000
                 + b'.exe"\r\n\r\nx\r\n')
    started = time.process_time()
    code, message, _ = examine(plugin, raw_mail(long_name))
    assert code == fuglu.DELETE and 'longer than 1024' in message
    assert time.process_time() - started < 1.0


def test_long_types_member_names_and_subjects_are_bounded(confdir):
    """Admins' rules may search these in quadratic time, passwords are tried on every
    encrypted member: each is bounded."""
    plugin = make_plugin(confdir, sendbounce='False', checkarchivenames='True')
    long_type = b'Content-Type: application/' + b'x' * 300 + b'\r\n\r\nbody\r\n'
    code, message, _ = examine(plugin, raw_mail(long_type))
    assert code == fuglu.DELETE and 'content type longer than 255' in message
    archive = zip_of(('a' * 2000 + '.txt', b'x'))
    code, message, _ = examine(plugin, mail(('long.zip', archive, 'application/zip')))
    assert code == fuglu.DELETE and 'member name longer than 1024' in message
    subject = ' '.join('word%d' % index for index in range(100000))
    started = time.process_time()
    passwords = plugin.candidate_passwords(suspect_for(mail(('a.txt', b'x'), subject=subject)))
    assert len(passwords) <= attachment.MAX_PASSWORDS and 'word0' in passwords
    assert time.process_time() - started < 1.0


def test_nesting_does_not_copy_the_message(confdir):
    """25 levels around 20 MB used to peak near 1 GB (a copy per level)."""
    plugin = make_plugin(confdir, sendbounce='False')
    payload = (b'Content-Type: application/pdf; name="big.pdf"\r\n'
               b'Content-Transfer-Encoding: base64\r\n\r\n' +
               base64_lines(PDF_DOCUMENT + b'\x00' * 15000000))
    source = nested(24, payload)
    assert len(source) > 20000000
    suspect = suspect_for(source)
    tracemalloc.start()
    try:
        code = plugin.examine(suspect)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == fuglu.DUNNO
    assert peak < 8 * 1048576, peak


def test_a_bare_cr_in_the_recipient_adds_no_header_to_the_bounce(confdir, bounces,
                                                                 no_address_check):
    plugin = make_plugin(confdir)
    code, _, _ = examine(plugin, mail(('evil.exe', PE_PROGRAM), subject='S\u00fcbject'),
                         recipient='rcpt@example.org\rBcc: victim@example.com')
    assert code == fuglu.DELETE
    recipient, data = bounces[0]
    head = data.split(b'\r\n\r\n', 1)[0]
    lines = head.replace(b'\r\n', b'\n').replace(b'\r', b'\n').split(b'\n')
    assert not any(line.lower().startswith(b'bcc') for line in lines)
    assert b'\r' not in head.replace(b'\r\n', b'')
    import email
    parsed = email.message_from_bytes(data)
    assert parsed['Bcc'] is None
    assert 'Bcc: victim@example.com' in str(parsed['Subject']).replace('\r\n', '')


def test_bounce_headers_are_encoded_whatever_the_values(confdir, monkeypatch):
    from email.header import decode_header, make_header
    config = make_plugin(confdir).config
    template = ('Subject: ${subject} / ${to_address}\nX-Name: ${blockinfo}\nTo: ${from_address}\n\n'
                'Body ${blockinfo}\r\nsecond line\n')
    suspect = fuglu.Suspect('sender@example.net\nX-Evil: 1', ['r\r\n@example.org'],
                            b'Subject: =?utf-8?q?caf=C3=A9?= \xff\r\n\r\nbody\r\n')
    data = attachment.build_bounce_message(config, suspect, template,
                                           {'blockinfo': 'b\u00f6se.exe\r\nX-Injected: yes'})
    head, body = data.split(b'\r\n\r\n', 1)
    names = [line.split(b':', 1)[0].lower() for line in head.split(b'\r\n')
             if line[:1] not in (b' ', b'\t')]
    assert b'x-evil' not in names and b'x-injected' not in names
    assert names.count(b'to') == 1 and names.count(b'subject') == 1
    assert head.isascii() if hasattr(head, 'isascii') else True
    import email
    parsed = email.message_from_bytes(data)
    assert str(make_header(decode_header(parsed['X-Name']))) == 'b\u00f6se.exe X-Injected: yes'
    assert 'b\u00f6se.exe\r\nX-Injected: yes' in parsed.get_payload(decode=True).decode('utf-8')


def test_a_sender_with_a_line_break_gets_no_bounce(confdir, bounces, no_address_check):
    plugin = make_plugin(confdir)
    assert examine(plugin, mail(('evil.exe', PE_PROGRAM)), sender='a@example.net\r\nRCPT '
                                                                  'TO:<x@y>')[0] == \
        fuglu.DELETE
    assert bounces == []


def test_a_bounce_that_cannot_be_built_does_not_defer_the_message(confdir, bounces, monkeypatch):
    plugin = make_plugin(confdir)

    def broken(*args):
        raise UnicodeError('odd')
    monkeypatch.setattr(attachment, 'build_bounce_message', broken)
    assert examine(plugin, mail(('evil.exe', PE_PROGRAM)))[0] == fuglu.DELETE


# --------------------------------------------------------------------------
# the same examples through a running fuglu (smtp connector, recording sink)
# --------------------------------------------------------------------------

@pytest.fixture
def daemon(tmp_path):
    """fuglu with the attachment plugin (blockaction REJECT, no bounces) before a sink."""
    sink = Sink()
    instance = InProcessFuglu(sink.port, plugins='attachment',
                              extra='[FiletypePlugin]\nrulesdir = %s\nblockaction = '
                                    'REJECT\nsendbounce = False\n'
                                    % (tmp_path / 'bundled-rules-only'))
    yield instance, sink
    instance.stop()
    sink.stop()


def send_through(port, source):
    """One SMTP transaction; the reply to the end of data."""
    client = RawClient(port)
    try:
        assert client.cmd('EHLO client.example').startswith(b'250')
        assert client.cmd('MAIL FROM:<sender@example.net>').startswith(b'250')
        assert client.cmd('RCPT TO:<rcpt@example.org>').startswith(b'250')
        assert client.cmd('DATA').startswith(b'354')
        source = source if source.endswith(b'\r\n') else source + b'\r\n'
        client.send(source.replace(b'\r\n.', b'\r\n..') + b'.\r\n')
        reply = client.reply()
        client.cmd('QUIT')
        return reply
    finally:
        client.close()


def test_daemon_delivers_a_raw_utf8_file_name(daemon):
    instance, sink = daemon
    pdf = ('Content-Type: application/pdf; name="Rechnung M\u00e4rz.pdf"\r\n'
           'Content-Disposition: attachment; filename="Rechnung M\u00e4rz.pdf"\r\n'
           'Content-Transfer-Encoding: base64\r\n\r\n').encode('utf-8') + base64_lines(PDF_DOCUMENT)
    reply = send_through(instance.port, raw_mail(TEXT_PART, pdf))
    assert reply.startswith(b'250 '), reply  # was 451, on every retry
    assert wait_for(lambda: len(sink.messages) == 1)
    assert 'Rechnung M\u00e4rz.pdf'.encode('utf-8') in sink.messages[0]['data']


def test_daemon_replies_with_a_template_like_name_as_it_is(daemon):
    instance, sink = daemon
    name = b'${id}${@archived.result}' + b'${body:full}' * 50 + b'.exe'
    reply = send_through(instance.port, raw_mail(exe_part(name)))
    assert reply.startswith(b'550 5.7.1 ${id}${@archived.result}${body:full}${body:full}'), reply
    assert len(reply) <= 512 and reply.count(b'\r\n') == 1  # RFC 5321 4.5.3.1.5
    assert sink.messages == []


@pytest.mark.parametrize('source', [
    raw_mail(TEXT_PART + b'--b--not the end\r\n', exe_part()),
    raw_mail(TEXT_PART, epilogue=b'--b\r\n' + exe_part() + b'\r\n--b--\r\n'),
    raw_mail(b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n' + TEXT_PART + b'--b--',
             exe_part()),
    raw_mail(*([TEXT_PART] * 2001 + [exe_part()])),
], ids=['closing-prefix', 'epilogue', 'reused-boundary', 'beyond-part-limit'])
def test_daemon_blocks_what_used_to_pass(daemon, source):
    instance, sink = daemon
    reply = send_through(instance.port, source)
    assert reply.startswith(b'550 5.7.1 '), reply
    assert sink.messages == []
