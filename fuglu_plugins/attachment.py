"""Attachment Blocker: FuGlu's FiletypePlugin (alias ``attachment``, section
``[FiletypePlugin]``), spec section 6.3.

Every attachment of a message is checked against rule files in ``rulesdir``:

    <scope>-filenames.conf           the attachment's file name
    <scope>-filetypes.conf           its declared MIME type, then its content type
    <scope>-archivenames.conf        names of the files inside an archive
    <scope>-archivenames-crypto.conf the same, additionally, for encrypted archives
    <scope>-archivefiletypes.conf    content types of the files inside an archive

``scope`` is the full recipient address, the recipient domain, or ``default``; the
first of these rule sets with a matching rule decides. A line is
``<action> <regex> <description>``, action one of allow / deny / delete.

The parts of the plugin, top to bottom:

* content types: python-magic when installed, else a table of file signatures
  (``sniff_content_type``), so a renamed executable is still an executable;
* a MIME walker over the raw bytes (``iter_attachments``): the email package's parser
  costs ~20 ms per MB, this one reads only the headers of each part and decodes only
  what a check needs (the first 64 KB for typing, whole archives when they are opened);
* bounded archive readers (zip, tar, gz, bz2, xz with the stdlib; rar and 7z through
  the optional rarfile / py7zr): every decompressed byte is charged to a per-message
  budget (``ExtractionBudget``), members are read in chunks with a cap, declared sizes
  and compression ratios are checked before anything is inflated. An archive bomb ends
  as ``ArchiveLimitExceeded`` in milliseconds, never as a full memory or a busy core;
* rule files (``parse_attachment_rules``, ``RuleFileCache``);
* the plugin (``FiletypePlugin``) and its bounce.

The default rule files live in ``conf/rules/default-*.conf``; when ``rulesdir`` has
none of them, the copies shipped with fuglu (source tree or zipapp) are used.
"""

import binascii
import io
import logging
import os
import re
import struct
import threading
import zlib
from collections import namedtuple

import fuglu
from fuglu import DUNNO, DELETE, ScannerPlugin, apply_template, string_to_actioncode

try:  # optional: libmagic bindings (python-magic or file-magic)
    import magic as _magic_module
except Exception:  # ImportError, or a binding that fails to find libmagic
    _magic_module = None

try:  # optional: rar archives
    import rarfile as _rarfile_module
except Exception:
    _rarfile_module = None

try:  # optional: 7z archives
    import py7zr as _py7zr_module
except Exception:
    _py7zr_module = None


###############################################################################
# Content types
###############################################################################

# Bytes of a part or archive member looked at to tell its type. 64 KB reaches the ISO
# 9660 volume descriptor at 32 KB and the first entries of an office document.
HEAD_BYTES = 65536

# (offset, signature, MIME type) in the spelling libmagic uses, most specific first.
SIGNATURES = (
    (0, b'MZ', 'application/x-dosexec'),
    (0, b'\x7fELF', 'application/x-executable'),
    (0, b'\xfe\xed\xfa\xce', 'application/x-mach-binary'),
    (0, b'\xfe\xed\xfa\xcf', 'application/x-mach-binary'),
    (0, b'\xce\xfa\xed\xfe', 'application/x-mach-binary'),
    (0, b'\xcf\xfa\xed\xfe', 'application/x-mach-binary'),
    (0, b'\xca\xfe\xba\xbe', 'application/x-java-applet'),
    (0, b'#!', 'text/x-shellscript'),
    (0, b'PK\x03\x04', 'application/zip'),
    (0, b'PK\x05\x06', 'application/zip'),
    (0, b'PK\x07\x08', 'application/zip'),
    (0, b'Rar!\x1a\x07', 'application/x-rar'),
    (0, b'7z\xbc\xaf\x27\x1c', 'application/x-7z-compressed'),
    (0, b'\x1f\x8b', 'application/gzip'),
    (0, b'BZh', 'application/x-bzip2'),
    (0, b'\xfd7zXZ\x00', 'application/x-xz'),
    (257, b'ustar', 'application/x-tar'),
    (0, b'MSCF', 'application/vnd.ms-cab-compressed'),
    (0, b'%PDF-', 'application/pdf'),
    (0, b'%!PS', 'application/postscript'),
    (0, b'\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1', 'application/x-ole-storage'),
    (0, b'{\\rtf', 'text/rtf'),
    (0, b'\x89PNG\r\n\x1a\n', 'image/png'),
    (0, b'\xff\xd8\xff', 'image/jpeg'),
    (0, b'GIF87a', 'image/gif'),
    (0, b'GIF89a', 'image/gif'),
    (0, b'II*\x00', 'image/tiff'),
    (0, b'MM\x00*', 'image/tiff'),
    (0, b'\x00\x00\x01\x00', 'image/vnd.microsoft.icon'),
    (0, b'L\x00\x00\x00\x01\x14\x02\x00', 'application/x-ms-shortcut'),
    (0, b'regf', 'application/x-ms-registry'),
    (0, b'Windows Registry Editor', 'application/x-ms-registry'),
    (0, b'REGEDIT4', 'application/x-ms-registry'),
    (32769, b'CD001', 'application/x-iso9660-image'),
)

# Names of OLE2 streams (UTF-16LE) that tell which office program wrote the file.
OLE_STREAM_TYPES = (
    ('WordDocument'.encode('utf-16-le'), 'application/msword'),
    ('Workbook'.encode('utf-16-le'), 'application/vnd.ms-excel'),
    ('PowerPoint Document'.encode('utf-16-le'), 'application/vnd.ms-powerpoint'),
    ('__substg1.0_'.encode('utf-16-le'), 'application/vnd.ms-outlook'),
)
# Class id of Windows Installer databases, as stored in the OLE2 root entry.
MSI_CLSID = bytes.fromhex('84100c0000000000c000000000000046')

OOXML_TYPES = (
    (b'word/', 'application/vnd.openxmlformats-officedocument.wordprocessingml.document'),
    (b'xl/', 'application/vnd.openxmlformats-officedocument.spreadsheetml.sheet'),
    (b'ppt/', 'application/vnd.openxmlformats-officedocument.presentationml.presentation'),
)

SHEBANG_TYPES = (
    (b'python', 'text/x-script.python'),
    (b'perl', 'text/x-perl'),
    (b'ruby', 'text/x-ruby'),
    (b'node', 'application/javascript'),
    (b'php', 'text/x-php'),
)

TEXT_CONTROL_BYTES = bytes(b for b in range(32) if b not in (9, 10, 12, 13, 27))


def _refine_zip(head):
    """Office documents and Java archives are zip files with telling first entries."""
    window = head[:HEAD_BYTES]
    if b'[Content_Types].xml' in window or b'_rels/.rels' in window:
        for marker, mime in OOXML_TYPES:
            if marker in window:
                return mime
    if head[30:38] == b'mimetype' and head[38:76].startswith(b'application/vnd.oasis.opendocument'):
        end = head.find(b'PK', 38)
        return head[38:end if end > 0 else 120].decode('ascii', 'replace')
    if head[30:39] == b'META-INF/':
        return 'application/java-archive'
    return 'application/zip'


def _refine_ole(head):
    if MSI_CLSID in head:
        return 'application/x-msi'
    for marker, mime in OLE_STREAM_TYPES:
        if marker in head:
            return mime
    return 'application/x-ole-storage'


def _refine_shebang(head):
    first_line = head[:128].split(b'\n', 1)[0].lower()
    for marker, mime in SHEBANG_TYPES:
        if marker in first_line:
            return mime
    return 'text/x-shellscript'


def _text_type(sample):
    """text/... for something that reads as text, else application/octet-stream."""
    if b'\x00' in sample:
        return 'application/octet-stream'
    if sample.translate(None, TEXT_CONTROL_BYTES) != sample:
        controls = len(sample) - len(sample.translate(None, TEXT_CONTROL_BYTES))
        if controls * 20 > len(sample):
            return 'application/octet-stream'
    start = sample[:512].lstrip().lower()
    if start.startswith(b'<?xml'):
        return 'image/svg+xml' if b'<svg' in sample[:4096].lower() else 'text/xml'
    if start.startswith((b'<!doctype html', b'<html', b'<head', b'<body')):
        return 'text/html'
    if start.startswith(b'<svg'):
        return 'image/svg+xml'
    return 'text/plain'


def sniff_content_type(head):
    """MIME type of data from its first bytes, with the built-in signature table."""
    if not head:
        return 'application/x-empty'
    for offset, signature, mime in SIGNATURES:
        if head.startswith(signature, offset):
            if mime == 'application/zip':
                return _refine_zip(head)
            if mime == 'application/x-ole-storage':
                return _refine_ole(head)
            if mime == 'text/x-shellscript':
                return _refine_shebang(head)
            return mime
    if head.startswith(b'RIFF') and head[8:12] == b'WEBP':
        return 'image/webp'
    if head.startswith(b'BM') and len(head) > 14 and head[6:10] == b'\x00\x00\x00\x00':
        return 'image/bmp'
    return _text_type(head[:8192])


def _magic_from_buffer(data):
    if hasattr(_magic_module, 'from_buffer'):  # python-magic
        return _magic_module.from_buffer(data, mime=True)
    return _magic_module.detect_from_content(data).mime_type  # file-magic


def content_type_of(head):
    """Content type by libmagic when available, else by the signature table."""
    if _magic_module is not None:
        try:
            detected = _magic_from_buffer(head)
            if detected:
                return detected
        except Exception as error:
            logging.getLogger('fuglu.plugin.FiletypePlugin').debug('libmagic failed: %s', error)
    return sniff_content_type(head)


def type_detection_name():
    if _magic_module is not None:
        return 'python-magic (libmagic)' if hasattr(_magic_module, 'from_buffer') else 'file-magic (libmagic)'
    return 'built-in signature table (python-magic not installed)'


###############################################################################
# MIME walking on bytes
###############################################################################

MIME_MAX_DEPTH = 25        # nested multiparts / attached messages
MIME_MAX_PARTS = 2000      # leaves looked at per message
LINE_END_RE = re.compile(rb'\r?\n\r?\n')


def _split_headers(data):
    """Raw part -> (header bytes, body bytes)."""
    if data.startswith(b'\n'):
        return b'', data[1:]
    if data.startswith(b'\r\n'):
        return b'', data[2:]
    match = LINE_END_RE.search(data)
    if not match:
        return data, b''
    return data[:match.start() + 1], data[match.end():]


def _parse_headers(header_bytes):
    from email.parser import BytesHeaderParser
    from email import policy
    return BytesHeaderParser(policy=policy.compat32).parsebytes(header_bytes)


def _split_multipart(body, boundary):
    """Body of a multipart -> list of raw subparts (RFC 2046 5.1.1: a delimiter is
    CRLF--boundary at the start of a line; the CRLF before it belongs to it)."""
    delimiter = b'--' + boundary
    starts = []
    position = 0
    while True:
        found = body.find(delimiter, position)
        if found < 0:
            break
        position = found + len(delimiter)
        if found == 0 or body[found - 1:found] == b'\n':
            closing = body.startswith(b'--', position)
            starts.append((found, position + (2 if closing else 0), closing))
            if closing:
                break
    parts = []
    for index, (found, after, closing) in enumerate(starts):
        if closing:
            break
        line_end = body.find(b'\n', after)
        content_start = len(body) if line_end < 0 else line_end + 1
        if index + 1 < len(starts):
            content_end = starts[index + 1][0]
            if body[content_end - 2:content_end] == b'\r\n':
                content_end -= 2
            elif body[content_end - 1:content_end] == b'\n':
                content_end -= 1
        else:
            content_end = len(body)  # no closing delimiter: the rest belongs to the last part
        parts.append(body[content_start:max(content_start, content_end)])
    return parts


def decode_rfc2047(text):
    """'=?utf-8?b?...?=' forms -> text; anything undecodable is kept as it is."""
    if '=?' not in text:
        return text
    from email.header import decode_header, make_header
    try:
        return str(make_header(decode_header(text)))
    except Exception:
        return text


def _b64decode(data):
    try:
        return binascii.a2b_base64(data)
    except binascii.Error:
        cleaned = re.sub(rb'[^A-Za-z0-9+/]', b'', data)
        cleaned = cleaned[:len(cleaned) // 4 * 4]
        try:
            return binascii.a2b_base64(cleaned)
        except binascii.Error:
            return b''


class MimePart(object):
    """One leaf of a message: its headers (an email Message without payload), its raw
    body, and helpers to decode it."""

    __slots__ = ('headers', 'body', 'content_type', 'disposition', 'filename', 'generated_name')

    def __init__(self, headers, body):
        self.headers = headers
        self.body = body
        self.content_type = headers.get_content_type()
        self.disposition = (headers.get('content-disposition') or '').split(';')[0].strip().lower()
        name = None
        try:
            name = headers.get_filename()
        except Exception:
            name = None
        if name is not None:
            name = decode_rfc2047(str(name)).replace('\r', '').replace('\n', '')
        self.filename = name or None
        self.generated_name = None

    @property
    def transfer_encoding(self):
        return (self.headers.get('content-transfer-encoding') or '').strip().lower()

    def decoded(self, maxbytes=None):
        """The decoded body, or only its first ``maxbytes`` bytes (cheap for big parts)."""
        body = self.body
        encoding = self.transfer_encoding
        if encoding == 'base64':
            if maxbytes is not None:
                # 4 characters per 3 bytes plus line breaks (at least 1 per 76 characters)
                needed = maxbytes * 4 // 3 + maxbytes // 19 + 64
                chunk = body[:needed].translate(None, b' \t\r\n')
                return _b64decode(chunk[:len(chunk) // 4 * 4])[:maxbytes]
            return _b64decode(body)
        if encoding == 'quoted-printable':
            data = body[:maxbytes * 3 + 3] if maxbytes is not None else body
            decoded = binascii.a2b_qp(data)
            return decoded[:maxbytes] if maxbytes is not None else decoded
        return body[:maxbytes] if maxbytes is not None else body

    def display_name(self):
        return self.filename or self.generated_name


def _walk(data, depth, leaves):
    if depth > MIME_MAX_DEPTH or len(leaves) >= MIME_MAX_PARTS:
        return
    header_bytes, body = _split_headers(data)
    headers = _parse_headers(header_bytes)
    maintype = headers.get_content_maintype()
    if maintype == 'multipart':
        boundary = headers.get_param('boundary')
        if boundary:
            if isinstance(boundary, tuple):  # RFC 2231 encoded parameter
                from email.utils import collapse_rfc2231_value
                boundary = collapse_rfc2231_value(boundary)
            boundary = str(boundary).encode('utf-8', 'surrogateescape')
            for subpart in _split_multipart(body, boundary):
                _walk(subpart, depth + 1, leaves)
            return
    if headers.get_content_type() == 'message/rfc822':
        part = MimePart(headers, body)
        if part.transfer_encoding in ('base64', 'quoted-printable'):
            body = part.decoded()
        _walk(body, depth + 1, leaves)
        return
    leaves.append(MimePart(headers, body))


def iter_leaf_parts(source):
    """Every leaf part of a message (bytes), attached messages included."""
    leaves = []
    _walk(source, 0, leaves)
    return leaves


_mimetypes_lock = threading.Lock()


def extension_for(content_type):
    """'application/pdf' -> 'pdf', for names of parts that have none."""
    import mimetypes
    with _mimetypes_lock:  # the first call initialises the module's shared tables
        extension = mimetypes.guess_extension(content_type)
    return (extension or '.bin').lstrip('.')


def iter_attachments(source):
    """The parts the blocker examines: leaves with a disposition inline/attachment or
    with a file name. Parts without a name get 'unnamed.<ext>'."""
    attachments = []
    for part in iter_leaf_parts(source):
        if part.filename is None and part.disposition not in ('inline', 'attachment'):
            continue
        if part.filename is None:
            part.generated_name = 'unnamed.%s' % extension_for(part.content_type)
        attachments.append(part)
    return attachments


NAME_NOISE_RE = re.compile(r'[^\x20-\x7e]')


def matchable_name(name):
    """Names are matched without non-ASCII and control characters (so neither a
    right-to-left override nor a zero-width space hides an extension)."""
    return NAME_NOISE_RE.sub('', name or '')


###############################################################################
# Archives
###############################################################################

ARCHIVE_KIND_BY_TYPE = {
    'application/zip': 'zip', 'application/x-zip-compressed': 'zip', 'application/x-zip': 'zip',
    'application/x-tar': 'tar', 'application/x-gtar': 'tar',
    'application/gzip': 'gz', 'application/x-gzip': 'gz',
    'application/x-bzip2': 'bz2', 'application/x-bzip': 'bz2',
    'application/x-xz': 'xz',
    'application/x-rar': 'rar', 'application/x-rar-compressed': 'rar', 'application/vnd.rar': 'rar',
    'application/x-7z-compressed': '7z',
}
STDLIB_ARCHIVE_KINDS = ('zip', 'tar', 'gz', 'bz2', 'xz')
ARCHIVE_KIND_ALIASES = {'tgz': 'gz', 'tbz': 'bz2', 'tbz2': 'bz2', 'txz': 'xz', 'gzip': 'gz',
                        'bzip2': 'bz2', 'z': 'gz', 'sevenzip': '7z'}
COMPRESSED_SUFFIXES = {'gz': ('.gz', '.tgz', '.z'), 'bz2': ('.bz2', '.tbz', '.tbz2'), 'xz': ('.xz', '.txz')}

# Hard ceiling of archive nesting when archiveextractlevel is negative ("unlimited").
UNLIMITED_NESTING = 16
# A ratio is only judged once this much has been inflated (small files compress oddly).
RATIO_MIN_BYTES = 1048576
READ_CHUNK = 65536
# Bytes of each archive member read to tell its type.
MEMBER_HEAD_BYTES = 16384


def available_archive_kinds():
    kinds = list(STDLIB_ARCHIVE_KINDS)
    if _rarfile_module is not None:
        kinds.append('rar')
    if _py7zr_module is not None:
        kinds.append('7z')
    return kinds


class ArchiveLimitExceeded(Exception):
    """An archive would expand beyond the configured limits (an archive bomb)."""


class ArchiveUnreadable(Exception):
    """Corrupt, unsupported or missing library: the archive's contents stay unknown."""


class ExtractionBudget(object):
    """Per-message limits of archive extraction. Every inflated byte and every member
    is charged here; exceeding a limit raises ArchiveLimitExceeded."""

    def __init__(self, max_bytes, max_members, max_ratio, member_cap):
        self.max_bytes = max_bytes
        self.max_members = max_members
        self.max_ratio = max_ratio
        self.member_cap = member_cap
        self.extracted = 0
        self.members = 0

    def charge(self, nbytes):
        self.extracted += nbytes
        if self.max_bytes and self.extracted > self.max_bytes:
            raise ArchiveLimitExceeded('more than %d bytes extracted' % self.max_bytes)

    def count_members(self, count=1):
        self.members += count
        if self.max_members and self.members > self.max_members:
            raise ArchiveLimitExceeded('more than %d archive members' % self.max_members)

    def check_ratio(self, inflated, compressed):
        if self.max_ratio and inflated > RATIO_MIN_BYTES and inflated > self.max_ratio * max(compressed, 1):
            raise ArchiveLimitExceeded('compression ratio above %d:1' % self.max_ratio)


class BudgetedStream(object):
    """A decompressing stream whose output is charged to the budget and whose ratio
    of output to consumed input is watched while it flows (gz/bz2/xz announce no
    trustworthy size)."""

    def __init__(self, inner, raw, budget):
        self.inner, self.raw, self.budget = inner, raw, budget
        self.produced = 0

    def read(self, size=-1):
        if size is None or size < 0 or size > READ_CHUNK * 4:
            size = READ_CHUNK * 4   # never one unbounded read
        data = self.inner.read(size)
        self.produced += len(data)
        self.budget.charge(len(data))
        self.budget.check_ratio(self.produced, self.raw.tell())
        return data


def read_capped(stream, cap, budget=None):
    """The rest of a stream in chunks; None when it is longer than ``cap``. Bytes are
    charged to ``budget`` unless the stream charges them itself (None)."""
    chunks, total = [], 0
    while True:
        chunk = stream.read(min(READ_CHUNK, cap - total + 1))
        if not chunk:
            return b''.join(chunks)
        total += len(chunk)
        if budget is not None:
            budget.charge(len(chunk))
        if total > cap:
            return None
        chunks.append(chunk)


def read_head(stream, size, budget=None):
    chunks, total = [], 0
    while total < size:
        chunk = stream.read(min(READ_CHUNK, size - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    if budget is not None:
        budget.charge(total)
    return b''.join(chunks)


class Member(object):
    """One file inside an archive. ``head`` (first bytes) and ``content`` (all of it)
    are None when not read, too big, or encrypted with an unknown password."""

    __slots__ = ('name', 'size', 'encrypted', 'head', 'content', 'content_type')

    def __init__(self, name, size=None, encrypted=False):
        self.name, self.size, self.encrypted = name, size, encrypted
        self.head = self.content = self.content_type = None


def read_member(stream, member, want_content, budget, charge=True):
    """Head of a member, then the whole member if ``want_content(member)`` says so
    (decided on the head: nested archives) and it fits archivecontentmaxsize."""
    charged = budget if charge else None
    member.head = read_head(stream, MEMBER_HEAD_BYTES, charged)
    if not want_content(member):
        return
    if len(member.head) < MEMBER_HEAD_BYTES:
        member.content = member.head
    elif member.size is None or member.size <= budget.member_cap:
        rest = read_capped(stream, budget.member_cap - len(member.head), charged)
        member.content = member.head + rest if rest is not None else None


def _zip_entry_count(data):
    """Entries announced by the end-of-central-directory record (None: not found)."""
    position = data.rfind(b'PK\x05\x06', max(0, len(data) - 65557))
    if position < 0 or position + 12 > len(data):
        return None
    count = struct.unpack('<H', data[position + 10:position + 12])[0]
    return None if count == 0xFFFF else count


def read_zip(data, want_head, want_content, budget, passwords):
    import zipfile
    announced = _zip_entry_count(data)
    if announced is not None and budget.max_members and budget.members + announced > budget.max_members:
        raise ArchiveLimitExceeded('%d members announced' % announced)
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, NotImplementedError) as error:
        raise ArchiveUnreadable('zip: %s' % error)
    with archive:
        infos = [info for info in archive.infolist() if not info.is_dir()]
        budget.count_members(len(infos))
        # the central directory announces every size: judge the ratio before inflating
        budget.check_ratio(sum(info.file_size for info in infos), len(data))
        members = []
        for info in infos:
            budget.check_ratio(info.file_size, info.compress_size)
            member = Member(info.filename, info.file_size, bool(info.flag_bits & 0x1))
            members.append(member)
            if not want_head:
                continue
            for password in (passwords() if member.encrypted else [None]):
                try:
                    # ZipExtFile never yields more than the announced file_size
                    with archive.open(info, pwd=password) as stream:
                        read_member(stream, member, want_content, budget)
                    break
                except ArchiveLimitExceeded:
                    raise
                except Exception as error:  # wrong password, AES, unknown method, corrupt
                    member.head = member.content = None
                    logging.getLogger('fuglu.plugin.FiletypePlugin').debug(
                        'zip member %s unreadable: %s', info.filename, error)
        return members


def _open_decompressor(kind, raw):
    if kind == 'gz':
        import gzip
        return gzip.GzipFile(fileobj=raw, mode='rb')
    if kind == 'bz2':
        import bz2
        return bz2.BZ2File(raw, mode='rb')
    import lzma
    return lzma.LZMAFile(raw, mode='rb')


def _read_tar(stream, want_head, want_content, budget):
    """Members of a tar read as a stream (``stream`` charges every byte it yields)."""
    import tarfile
    members = []
    try:
        with tarfile.open(fileobj=stream, mode='r|') as archive:
            for entry in archive:
                budget.count_members()
                if not entry.isfile():
                    continue
                member = Member(entry.name, entry.size)
                members.append(member)
                if want_head:
                    read_member(archive.extractfile(entry), member, want_content, budget, charge=False)
    except ArchiveLimitExceeded:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as error:
        if not members:
            raise ArchiveUnreadable('tar: %s' % error)
    return members


def read_tar(data, want_head, want_content, budget, passwords):
    raw = io.BytesIO(data)
    return _read_tar(BudgetedStream(raw, raw, budget), want_head, want_content, budget)


def _gzip_announced_size(data):
    """ISIZE of a gzip stream (size mod 2**32): a cheap early warning only."""
    return struct.unpack('<I', data[-4:])[0] if len(data) >= 18 else 0


def read_compressed(kind, data, name, want_head, want_content, budget, passwords):
    """gz / bz2 / xz: a compressed tar, or one compressed file."""
    if kind == 'gz':
        budget.check_ratio(_gzip_announced_size(data), len(data))
    elif kind == 'xz':
        budget.check_ratio(_xz_announced_size(data), len(data))
    raw = io.BytesIO(data)
    stream = BudgetedStream(_open_decompressor(kind, raw), raw, budget)
    try:
        first = read_head(stream, 512)
        if first[257:262] == b'ustar':
            raw = io.BytesIO(data)
            stream = BudgetedStream(_open_decompressor(kind, raw), raw, budget)
            return _read_tar(stream, want_head, want_content, budget)
        inner_name = name or 'unnamed'
        for suffix in COMPRESSED_SUFFIXES[kind]:
            if inner_name.lower().endswith(suffix):
                inner_name = inner_name[:-len(suffix)] + ('.tar' if suffix.startswith('.t') else '')
                break
        budget.count_members()
        member = Member(inner_name)
        if want_head:
            read_member(PrefixedStream(first, stream), member, want_content, budget, charge=False)
        _read_on_while_suspicious(stream, raw, budget)
        return [member]
    except ArchiveLimitExceeded:
        raise
    except (OSError, EOFError, ValueError, zlib.error) as error:  # not really compressed, or corrupt
        raise ArchiveUnreadable('%s: %s' % (kind, error))


# Read on while a stream inflates more than this (well below the limit: early ratio
# estimates are low, decompressors swallow whole input chunks at once).
SUSPICIOUS_RATIO = 20


def _read_on_while_suspicious(stream, raw, budget):
    """bz2 announces no size. A stream that has inflated suspiciously well so far is
    read on until the ratio check decides (after 1 MB) or its ratio looks normal; an
    ordinary file stops here at once, and no file is read past 2 MB for this."""
    if not budget.max_ratio:
        return
    while stream.produced <= 2 * RATIO_MIN_BYTES and stream.produced > SUSPICIOUS_RATIO * max(raw.tell(), 1):
        if not stream.read(READ_CHUNK):
            break


def _read_varint(data, position):
    value, shift = 0, 0
    while position < len(data) and shift < 63:
        byte = data[position]
        value |= (byte & 0x7f) << shift
        position += 1
        if not byte & 0x80:
            return value, position
        shift += 7
    raise ValueError('bad varint')


def _xz_announced_size(data):
    """Sum of the uncompressed sizes in the index of the last xz stream (0: unknown)."""
    try:
        if len(data) < 24 or data[-2:] != b'YZ':
            return 0
        index_size = (struct.unpack('<I', data[-8:-4])[0] + 1) * 4
        index = data[-12 - index_size:-12]
        if not index or index[0] != 0:
            return 0
        count, position = _read_varint(index, 1)
        total = 0
        for _ in range(min(count, 100000)):
            _unpadded, position = _read_varint(index, position)
            uncompressed, position = _read_varint(index, position)
            total += uncompressed
        return total
    except (ValueError, struct.error, IndexError):
        return 0


class PrefixedStream(object):
    """Bytes already read, then the rest of a stream."""

    def __init__(self, prefix, stream):
        self.prefix, self.stream = prefix, stream

    def read(self, size):
        if self.prefix:
            data, self.prefix = self.prefix[:size], self.prefix[size:]
            return data
        return self.stream.read(size)


def read_rar(data, want_head, want_content, budget, passwords):
    if _rarfile_module is None:
        raise ArchiveUnreadable('rar: the rarfile module is not installed')
    try:
        archive = _rarfile_module.RarFile(io.BytesIO(data))
        infos = [info for info in archive.infolist() if not info.is_dir()]
    except Exception as error:
        raise ArchiveUnreadable('rar: %s' % error)
    budget.count_members(len(infos))
    budget.check_ratio(sum(info.file_size or 0 for info in infos), len(data))
    members = []
    for info in infos:
        member = Member(info.filename, info.file_size, bool(info.needs_password()))
        members.append(member)
        if member.encrypted or not want_head:
            continue
        try:  # extraction needs the unrar tool; without it the names are all we get
            with archive.open(info) as stream:
                read_member(stream, member, want_content, budget)
        except ArchiveLimitExceeded:
            raise
        except Exception as error:
            logging.getLogger('fuglu.plugin.FiletypePlugin').debug('rar member %s: %s', info.filename, error)
    return members


def read_7z(data, want_head, want_content, budget, passwords):
    """Names only: py7zr extracts whole archives into memory, which no budget bounds."""
    if _py7zr_module is None:
        raise ArchiveUnreadable('7z: the py7zr module is not installed')
    try:
        with _py7zr_module.SevenZipFile(io.BytesIO(data), mode='r') as archive:
            encrypted = bool(archive.needs_password())
            entries = [entry for entry in archive.list() if not entry.is_directory]
    except Exception as error:
        raise ArchiveUnreadable('7z: %s' % error)
    budget.count_members(len(entries))
    budget.check_ratio(sum(entry.uncompressed or 0 for entry in entries), len(data))
    return [Member(entry.filename, entry.uncompressed, encrypted) for entry in entries]


ARCHIVE_READERS = {'zip': read_zip, 'tar': read_tar, 'rar': read_rar, '7z': read_7z}


def read_archive(kind, data, name, want_head, want_content, budget, passwords):
    """Members of an archive. ``want_head``: read the first bytes of every member;
    ``want_content(member)``, asked once the head is known, says which members are
    needed whole (nested archives)."""
    try:
        if kind in COMPRESSED_SUFFIXES:
            return read_compressed(kind, data, name, want_head, want_content, budget, passwords)
        return ARCHIVE_READERS[kind](data, want_head, want_content, budget, passwords)
    except RecursionError as error:
        raise ArchiveUnreadable('%s: %s' % (kind, error))


###############################################################################
# Rule files
###############################################################################

RULE_KINDS = ('filenames', 'filetypes', 'archivenames', 'archivenames-crypto', 'archivefiletypes')
RULE_ACTIONS = ('allow', 'deny', 'delete')
# A group holding a quantifier that is itself quantified, like (a+)+ or (\w*)*: such
# patterns backtrack exponentially on a crafted file name.
NESTED_QUANTIFIER_RE = re.compile(r'\((?:[^()\\]|\\.)*[+*}](?:[^()\\]|\\.)*\)[+*{]')

AttachmentRule = namedtuple('AttachmentRule', 'action regex description lineno')


def parse_attachment_rules(text, source='<rules>', logger=None):
    """Rule file text -> list of AttachmentRule. Unusable lines are logged and dropped."""
    logger = logger or logging.getLogger('fuglu.plugin.FiletypePlugin')
    rules, errors = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith('#'):
            continue
        fields = line.split(None, 2)
        problem = None
        if len(fields) < 3:
            problem = 'expected "<action> <regex> <description>"'
        elif fields[0].lower() not in RULE_ACTIONS:
            problem = 'unknown action %r' % fields[0]
        elif NESTED_QUANTIFIER_RE.search(fields[1]):
            problem = 'nested quantifier in %r (catastrophic backtracking)' % fields[1]
        else:
            try:
                regex = re.compile(fields[1], re.IGNORECASE)
            except re.error as error:
                problem = 'invalid regex %r: %s' % (fields[1], error)
        if problem:
            message = '%s line %d: %s' % (source, lineno, problem)
            logger.error('attachment rule dropped: %s', message)
            errors.append(message)
            continue
        description = fields[2].strip()
        rules.append(AttachmentRule(fields[0].lower(), regex, '' if description == '-' else description, lineno))
    return rules, errors


def read_bundled_conf(relative_path):
    """A file of fuglu's own ``conf/`` folder as bytes, from the zipapp (conf/ at the
    root of the .pyz) or from the source tree; None when neither has it."""
    return fuglu.read_bundled_conf(relative_path)


class RuleFileCache(object):
    """Parsed rule files by path; a file is parsed again when it changed (checked
    with one stat per file and message, so an edit takes effect on the next mail)."""

    def __init__(self, logger):
        self.logger = logger
        self._cache = {}
        self._bundled = {}

    def get(self, path):
        try:
            info = os.stat(path)
        except OSError:
            self._cache.pop(path, None)
            return None
        stamp = (info.st_mtime_ns, info.st_ctime_ns, info.st_size, info.st_ino)
        cached = self._cache.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            with open(path, encoding='utf-8', errors='replace') as handle:
                rules, _errors = parse_attachment_rules(handle.read(), path, self.logger)
        except OSError as error:
            self.logger.error('cannot read attachment rules %s: %s', path, error)
            return None
        self._cache[path] = (stamp, rules)
        return rules

    def bundled(self, kind):
        """The default rules shipped with fuglu (conf/rules/default-<kind>.conf)."""
        if kind not in self._bundled:
            data = read_bundled_conf('rules/default-%s.conf' % kind)
            text = data.decode('utf-8', 'replace') if data else ''
            self._bundled[kind] = parse_attachment_rules(text, 'bundled default-%s.conf' % kind, self.logger)[0]
        return self._bundled[kind]


def safe_scope(scope):
    """A recipient address or domain usable as a file name prefix, else None."""
    if not scope or '/' in scope or '\\' in scope or '\x00' in scope or scope.startswith('.'):
        return None
    return scope.lower()


###############################################################################
# The plugin
###############################################################################

# subject: what was judged ('evil.exe', 'x.txt application/x-dosexec'); message: the
# reply text when it is not '<subject>: <description>'.
Verdict = namedtuple('Verdict', 'action subject description message')
Verdict.__new__.__defaults__ = (None,)

DEFAULT_PASSWORDS = ('123456', '1234', 'asdf', 'abcd', 'password')
SIGNATURE_TYPES = ('application/pkcs7-signature', 'application/x-pkcs7-signature',
                   'application/pgp-signature')


class ScanContext(object):
    """What one examine() call needs besides the plugin: rule sets, limits, the
    extraction budget and the candidate archive passwords (collected lazily)."""

    def __init__(self, plugin, suspect, rulesets, budget, kinds, levels):
        self.plugin, self.suspect, self.rulesets = plugin, suspect, rulesets
        self.budget, self.kinds, self.levels = budget, kinds, levels
        self._passwords = None
        self.unreadable = []

    def passwords(self):
        if self._passwords is None:
            self._passwords = [p.encode('utf-8') for p in self.plugin.candidate_passwords(self.suspect)]
        return self._passwords


class FiletypePlugin(ScannerPlugin):
    """Blocks attachments by name, MIME type, content type and archive contents,
    following per-recipient, per-domain and default rule files (spec 6.3)."""

    friendly_name = 'Attachment Blocker'

    requiredvars = {
        'template_blockedfile': {'default': '${confdir}/templates/blockedfile.tmpl',
                                 'description': 'bounce sent to the sender of a blocked attachment: headers, '
                                                'empty line, body; ${blockinfo} is the reason',
                                 'path': 'file', 'missing': 'the bundled template is used'},
        'sendbounce': {'default': 'True', 'description': 'send the bounce above when an attachment is denied'},
        'nobouncerules': {'default': '${confdir}/archive.regex',
                          'description': 'rule file (SuspectFilter): a match with argument "no" suppresses the bounce',
                          'path': 'file', 'missing': 'every bounce is sent'},
        'rulesdir': {'default': '${confdir}/rules',
                     'description': 'directory of <scope>-filenames.conf, -filetypes.conf, -archivenames.conf, '
                                    '-archivenames-crypto.conf, -archivefiletypes.conf (scope: address, domain or '
                                    'default). Without default-* files the bundled defaults apply',
                     'path': 'dir', 'missing': 'the bundled default rules apply'},
        'blockaction': {'default': 'DELETE', 'description': 'action for a denied attachment (REJECT makes sense '
                                                            'before the queue only)'},
        'block_encrypted': {'default': 'False', 'description': 'block every password protected archive'},
        'rejectmessage_encrypted': {'default': 'Encrypted archive ${attname} not permitted',
                                    'description': 'reason given for a blocked encrypted archive'},
        'overrides_source': {'default': '', 'description': 'accepted for compatibility; not supported',
                            'inert': 'not supported by this build'},
        'dbconnectstring': {'default': '', 'description': 'SQL rules: not supported by this stdlib build'},
        'query': {'default': 'SELECT action,regex,description FROM attachmentrules WHERE scope=:scope AND '
                             'checktype=:checktype ORDER BY prio',
                  'description': 'SQL rules query (not supported)'},
        'config_section_filename': {'default': '', 'description': 'accepted for compatibility; not supported',
                                   'inert': 'not supported by this build'},
        'config_section_filetype': {'default': '', 'description': 'accepted for compatibility; not supported',
                                   'inert': 'not supported by this build'},
        'config_section_archivename': {'default': '', 'description': 'accepted for compatibility; not supported',
                                      'inert': 'not supported by this build'},
        'config_section_archivecryptoname': {'default': '', 'description': 'accepted for compatibility; not supported',
                                            'inert': 'not supported by this build'},
        'config_section_archivetype': {'default': '', 'description': 'accepted for compatibility; not supported',
                                      'inert': 'not supported by this build'},
        'rulestag': {'default': '', 'description': 'accepted for compatibility; not supported',
                     'inert': 'not supported by this build'},
        'checkarchivenames': {'default': 'False', 'description': 'check the names of files inside archives'},
        'checkarchivecontent': {'default': 'False', 'description': 'check the content types of files inside archives'},
        'archivecontentmaxsize': {'default': '5000000',
                                  'description': 'archive members up to this many bytes (uncompressed) are '
                                                 'extracted whole (nested archives); larger ones are typed by their '
                                                 'first bytes only'},
        'archiveextractlevel': {'default': '1', 'description': 'archive nesting levels opened (1: only archives '
                                                               'attached to the mail); negative: up to %d'
                                                               % UNLIMITED_NESTING},
        'archive_passwords': {'default': '', 'description': 'comma separated passwords tried on encrypted zips'},
        'archive_passwords_maxbodywords': {'default': '0', 'description': 'also try this many words of the '
                                                                          'first text part as passwords'},
        'archive_passwords_minwordlength': {'default': '4', 'description': 'shortest word tried as a password'},
        'archive_passwords_maxtextpartlength': {'default': '2048', 'description': 'characters of the text part '
                                                                                  'searched for password words'},
        'enabledarchivetypes': {'default': '', 'description': 'archive types opened (zip, tar, gz, bz2, xz, rar, '
                                                              '7z); empty: all available'},
        'disabledarchivetypes': {'default': '', 'description': 'archive types never opened (also [main] '
                                                               'disabledarchivetypes)'},
        'archive_max_extracted': {'default': '50000000',
                                  'description': 'bytes extracted from all archives of one message at most'},
        'archive_max_members': {'default': '2000', 'description': 'files in all archives of one message at most'},
        'archive_max_ratio': {'default': '200', 'description': 'highest compression ratio accepted once more than '
                                                               '1 MB is inflated; 0: no limit'},
        'archive_limit_action': {'default': 'deny', 'description': 'when an archive exceeds the limits above '
                                                                   '(archive bomb): deny (block like a denied '
                                                                   'attachment), problem (problemaction) or allow'},
        'problemaction': {'default': 'DEFER', 'description': 'action when the check itself fails'},
        'verbose': {'default': 'False', 'description': 'log every attachment checked'},
        'ignore_signature': {'default': 'False', 'description': 'skip the content type check of S/MIME and PGP '
                                                                'signature parts'},
    }

    def __init__(self, config, section=None):
        super().__init__(config, section)
        self.rule_cache = RuleFileCache(self.logger)
        self._nobounce_filters = {}

    # -- configuration -----------------------------------------------------------
    def _get(self, option):
        return self.config.get(self.section, option)

    def _getbool(self, option):
        return self.config.getboolean(self.section, option)

    def _getint(self, option):
        return self.config.getint(self.section, option)

    def block_action(self):
        """blockaction, resolved with the config so DEFAULTVIRUSACTION etc. work
        (upstream resolves it without and silently turns those into DUNNO)."""
        code = string_to_actioncode(self._get('blockaction'), self.config)
        return DELETE if code is None else code

    def enabled_archive_kinds(self):
        """Archive kinds opened for this message: computed afresh each time, never by
        editing shared state (upstream's per-message overrides leaked that way)."""
        def kinds_of(value):
            kinds = set()
            for item in fuglu.parse_list(value, lower=True):
                item = item.lstrip('.')
                if item.startswith('tar.'):
                    item = item[4:]
                kinds.add(ARCHIVE_KIND_ALIASES.get(item, item))
            return kinds
        available = available_archive_kinds()
        enabled = kinds_of(self._get('enabledarchivetypes'))
        disabled = kinds_of(self._get('disabledarchivetypes'))
        disabled |= kinds_of(self.config.get('main', 'disabledarchivetypes', fallback=''))
        return [kind for kind in available if (not enabled or kind in enabled) and kind not in disabled]

    def candidate_passwords(self, suspect):
        passwords = list(DEFAULT_PASSWORDS)
        passwords.extend(fuglu.parse_list(self._get('archive_passwords')))
        tagged = suspect.get_tag('archive_passwords') or []
        passwords.extend([tagged] if isinstance(tagged, str) else list(tagged))
        minimum = self._getint('archive_passwords_minwordlength')
        words = (suspect.get_header('subject', '') or '').split()
        maxbodywords = self._getint('archive_passwords_maxbodywords')
        if maxbodywords > 0:
            for part in iter_leaf_parts(suspect.get_source()):
                if part.content_type == 'text/plain':
                    limit = self._getint('archive_passwords_maxtextpartlength')
                    text = part.decoded(limit * 4).decode(part.headers.get_content_charset() or 'utf-8', 'replace')
                    words.extend(text[:limit].split()[:maxbodywords])
                    break
        passwords.extend(word.strip('.,;:!?"\'()') for word in words if len(word) >= minimum)
        unique = []
        for password in passwords:
            if password and password not in unique:
                unique.append(password)
        return unique

    # -- rules -------------------------------------------------------------------
    def rulesets(self, suspect):
        """kind -> [user rules, domain rules, default rules] (missing files skipped)."""
        rulesdir = self._get('rulesdir')
        scopes = [safe_scope(suspect.to_address), safe_scope(suspect.to_domain)]
        default_files = {kind: os.path.join(rulesdir, 'default-%s.conf' % kind) for kind in RULE_KINDS}
        defaults = {kind: self.rule_cache.get(path) for kind, path in default_files.items()}
        use_bundled = all(rules is None for rules in defaults.values())
        result = {}
        for kind in RULE_KINDS:
            sets = []
            for scope in scopes:
                if scope:
                    rules = self.rule_cache.get(os.path.join(rulesdir, '%s-%s.conf' % (scope, kind)))
                    if rules:
                        sets.append(rules)
            default = self.rule_cache.bundled(kind) if use_bundled else defaults[kind]
            if default:
                sets.append(default)
            result[kind] = sets
        return result

    @staticmethod
    def first_match(rulesets, value):
        """The rule that decides about ``value``: the first matching rule of the first
        rule set (user, domain, default) that has one."""
        for rules in rulesets:
            for rule in rules:
                if rule.regex.search(value):
                    return rule
        return None

    def _judge(self, rulesets, value, subject):
        rule = self.first_match(rulesets, value)
        if rule is None or rule.action == 'allow':
            return None
        return Verdict(rule.action, subject, rule.description)

    # -- checking ------------------------------------------------------------------
    def examine(self, suspect):
        try:
            verdict = self.check_message(suspect)
        except Exception as error:
            self.logger.exception('%s: attachment check failed: %s', suspect.id, error)
            return self._problemaction(), 'attachment check failed'
        if verdict is None:
            return DUNNO
        return self.act_on(suspect, verdict)

    def check_message(self, suspect):
        """The first deny/delete Verdict for the message, or None."""
        rulesets = self.rulesets(suspect)
        levels = self._getint('archiveextractlevel')
        levels = UNLIMITED_NESTING if levels < 0 else levels
        budget = ExtractionBudget(self._getint('archive_max_extracted'), self._getint('archive_max_members'),
                                  self._getint('archive_max_ratio'), self._getint('archivecontentmaxsize'))
        context = ScanContext(self, suspect, rulesets, budget, self.enabled_archive_kinds(), levels)
        verbose = self._getbool('verbose')
        for part in iter_attachments(suspect.get_source()):
            verdict = self.check_part(context, part)
            if verbose:
                self.logger.info('%s: attachment %r (%s): %s', suspect.id, part.display_name(),
                                 part.content_type, verdict.action if verdict else 'ok')
            if verdict is not None:
                return verdict
        return None

    def check_part(self, context, part):
        name = part.display_name()
        match_name = matchable_name(name)
        rulesets = context.rulesets
        verdict = self._judge(rulesets['filenames'], match_name, match_name)
        if verdict:
            return verdict
        verdict = self._judge(rulesets['filetypes'], part.content_type, '%s %s' % (match_name, part.content_type))
        if verdict:
            return verdict
        if self._getbool('ignore_signature') and part.content_type in SIGNATURE_TYPES:
            return None
        head = part.decoded(HEAD_BYTES)
        detected = content_type_of(head)
        if detected != part.content_type:
            verdict = self._judge(rulesets['filetypes'], detected, '%s %s' % (match_name, detected))
            if verdict:
                return verdict
        kind = ARCHIVE_KIND_BY_TYPE.get(detected)
        check_names = self._getbool('checkarchivenames')
        check_content = self._getbool('checkarchivecontent')
        if kind is None or not (check_names or check_content) or context.levels < 1:
            return None
        if kind not in context.kinds:
            if kind not in available_archive_kinds():
                self._unreadable(context, match_name, '%s archives need an optional module that is not '
                                                      'installed' % kind)
            return None
        try:
            return self.check_archive(context, part.decoded(), kind, match_name, '', 1)
        except ArchiveLimitExceeded as error:
            return self._limit_verdict(context, match_name, error)

    def _unreadable(self, context, name, reason):
        self.logger.info('%s: contents of %s not checked: %s', context.suspect.id, name, reason)
        context.unreadable.append('%s: %s' % (name, reason))
        context.suspect.tags.setdefault('FiletypePlugin.unchecked', []).append('%s: %s' % (name, reason))

    def _limit_verdict(self, context, name, error):
        choice = self._get('archive_limit_action').strip().lower()
        self.logger.warning('%s: archive %s exceeds the extraction limits: %s', context.suspect.id, name, error)
        if choice == 'allow':
            return None
        action = 'problem' if choice == 'problem' else 'deny'
        return Verdict(action, name, 'Archive exceeds the extraction limits (%s)' % error)

    def member_type(self, member):
        if member.content_type is None and member.head is not None:
            member.content_type = content_type_of(member.head)
        return member.content_type

    def check_archive(self, context, data, kind, attachment_name, inner_path, depth):
        """Names and types of the members of one archive, then its nested archives.
        ``inner_path``: where this archive sits inside the attachment ('' at the top,
        'inner.zip/' one level down)."""
        check_names = self._getbool('checkarchivenames')
        check_content = self._getbool('checkarchivecontent')
        deeper = depth < context.levels
        rulesets = context.rulesets

        def want_content(member):
            # whole members are only needed to open nested archives
            return deeper and ARCHIVE_KIND_BY_TYPE.get(self.member_type(member)) in context.kinds

        where = attachment_name + ('/' + inner_path.rstrip('/') if inner_path else '')
        inner_file_name = inner_path.rstrip('/').rsplit('/', 1)[-1] if inner_path else attachment_name
        try:
            members = read_archive(kind, data, inner_file_name, check_content or deeper,
                                   want_content, context.budget, context.passwords)
        except ArchiveUnreadable as error:
            self._unreadable(context, where, str(error))
            return None
        if any(member.encrypted for member in members) and (
                self._getbool('block_encrypted') or context.suspect.get_tag('filetype_blockarchiveencrypted')):
            message = apply_template(self._get('rejectmessage_encrypted'), context.suspect, {'attname': where})
            return Verdict('deny', where, 'encrypted archive', message)
        for member in members:
            member_name = matchable_name(member.name)
            subject = '%s %s%s' % (attachment_name, inner_path, member_name)
            if check_names:
                verdict = self._judge(rulesets['archivenames'], member_name, subject)
                if verdict is None and member.encrypted:
                    verdict = self._judge(rulesets['archivenames-crypto'], member_name, subject)
                if verdict:
                    return verdict
            member_type = self.member_type(member)
            if check_content and member_type is not None:
                verdict = self._judge(rulesets['archivefiletypes'], member_type, '%s %s' % (subject, member_type))
                if verdict:
                    return verdict
            nested_kind = ARCHIVE_KIND_BY_TYPE.get(member_type)
            if deeper and nested_kind in context.kinds:
                if member.content is None:
                    self._unreadable(context, '%s/%s%s' % (attachment_name, inner_path, member_name),
                                     'nested archive larger than archivecontentmaxsize or unreadable')
                    continue
                verdict = self.check_archive(context, member.content, nested_kind, attachment_name,
                                             '%s%s/' % (inner_path, member_name), depth + 1)
                if verdict:
                    return verdict
        return None

    # -- the verdict -------------------------------------------------------------
    def act_on(self, suspect, verdict):
        message = verdict.message or ('%s: %s' % (verdict.subject, verdict.description)).strip().rstrip(':')
        if verdict.action == 'problem':
            return self._problemaction(), message
        suspect.tags['blocked']['FiletypePlugin'] = True
        suspect.tags['FiletypePlugin.blocked'] = {verdict.subject: verdict.description}
        suspect.tags['FiletypePlugin.errormessage'] = message
        prefix = self.config.get('main', 'prependaddedheaders', fallback='X-Fuglu-')
        suspect.add_header('%sAttachment-Blocked' % prefix, message)
        self.logger.info('%s: attachment blocked (%s): %s', suspect.id, verdict.action, message)
        if verdict.action == 'delete':
            return DELETE, None
        if self._getbool('sendbounce'):
            self.bounce(suspect, message)
        return self.block_action(), message

    def nobounce_filter(self):
        path = self._get('nobouncerules')
        if not path or not os.path.exists(path):
            return None
        if path not in self._nobounce_filters:
            self._nobounce_filters[path] = fuglu.SuspectFilter(path)
        return self._nobounce_filters[path]

    def bounce(self, suspect, blockinfo):
        """Tell the sender (spec 5.8): once per message, never for spam, virus or the
        null sender, not when nobouncerules says 'no'."""
        if suspect.get_tag('Attachment.bounce.queueid') or suspect.get_tag('Attachment.bounce.sent'):
            return None
        if not suspect.from_address or suspect.is_spam() or suspect.is_virus():
            return None
        rules = self.nobounce_filter()
        if rules is not None:
            matched, argument = rules.matches(suspect)
            if matched and (argument or '').strip().lower() == 'no':
                self.logger.info('%s: no bounce (nobouncerules)', suspect.id)
                return None
        send_bounce = getattr(fuglu, 'send_bounce', None)
        if send_bounce is None:
            self.logger.error('%s: cannot bounce, this fuglu has no send_bounce()', suspect.id)
            return None
        template = self.bounce_template()
        if template is None:
            self.logger.error('%s: no bounce: template %s not found', suspect.id, self._get('template_blockedfile'))
            return None
        message = build_bounce_message(self.config, suspect, template, {'blockinfo': blockinfo})
        suspect.tags['Attachment.bounce.sent'] = True
        try:
            queue_id = send_bounce(self.config, suspect, suspect.from_address, message)
        except Exception as error:
            self.logger.error('%s: bounce to %s failed: %s', suspect.id, suspect.from_address, error)
            return None
        if queue_id:
            suspect.tags['Attachment.bounce.queueid'] = queue_id
        return queue_id

    def bounce_template(self):
        path = self._get('template_blockedfile')
        try:
            with open(path, encoding='utf-8', errors='replace') as handle:
                return handle.read()
        except OSError:
            data = read_bundled_conf('templates/blockedfile.tmpl')
            return data.decode('utf-8', 'replace') if data else None

    # -- lint --------------------------------------------------------------------
    def lint(self):
        ok = self.check_config()
        print('file type detection: %s' % type_detection_name())
        kinds = available_archive_kinds()
        missing = [name for name, module in (('rar (rarfile)', _rarfile_module), ('7z (py7zr)', _py7zr_module))
                   if module is None]
        print('archive types: %s%s' % (', '.join(kinds),
                                       ('; not available: %s' % ', '.join(missing)) if missing else ''))
        print('archive types enabled: %s' % ', '.join(self.enabled_archive_kinds()))
        if string_to_actioncode(self._get('blockaction'), self.config) is None:
            print('blockaction %r is not an action' % self._get('blockaction'))
            ok = False
        if self._get('archive_limit_action').strip().lower() not in ('deny', 'problem', 'allow'):
            print('archive_limit_action must be deny, problem or allow')
            ok = False
        if self._get('dbconnectstring').strip():
            print('dbconnectstring: SQL rules are not supported by this build (ignored)')
        rulesdir = self._get('rulesdir')
        if os.path.isdir(rulesdir):   # a missing one is reported by check_config
            names = sorted(name for name in os.listdir(rulesdir) if name.endswith('.conf'))
            for name in names:
                with open(os.path.join(rulesdir, name), encoding='utf-8', errors='replace') as handle:
                    _rules, errors = parse_attachment_rules(handle.read(), name)
                for error in errors:
                    print('attachment rule error: %s' % error)
                    ok = False
            if not any(name.startswith('default-') for name in names):
                print('no default-*.conf in %s: the bundled default rules apply' % rulesdir)
        for kind in RULE_KINDS:
            if kind != 'archivenames-crypto' and read_bundled_conf('rules/default-%s.conf' % kind) is None:
                print('bundled default-%s.conf missing from this installation' % kind)
        if self._getbool('sendbounce') and self.bounce_template() is None:
            print('bounce template %s not found' % self._get('template_blockedfile'))
            ok = False
        path = self._get('nobouncerules')
        if path and os.path.exists(path) and not fuglu.SuspectFilter(path).lint():
            ok = False
        return ok


def build_bounce_message(config, suspect, template, values):
    """Template -> the bounce as bytes (spec 5.8 step 2): headers the template lacks
    are added (To, From MAILER-DAEMON@<helo>, Auto-Submitted, Date, Message-ID), the
    body is sent as UTF-8."""
    from email import policy
    from email.parser import Parser
    from email.utils import formatdate, make_msgid
    text = apply_template(template, suspect, values).replace('\r\n', '\n')
    header_text, _sep, body = text.partition('\n\n')
    if not re.match(r'^[!-9;-~]+:', header_text):  # a template without headers
        header_text, body = '', text
    message = Parser(policy=policy.compat32).parsestr(header_text + '\n\n', headersonly=True)
    helo_function = getattr(fuglu, 'outgoing_helo', None)
    helo = helo_function(config) if helo_function else 'localhost'
    defaults = (('To', suspect.from_address), ('From', 'MAILER-DAEMON@%s' % helo),
                ('Auto-Submitted', 'auto-generated'), ('Date', formatdate(localtime=True)),
                ('Message-ID', make_msgid(domain=helo)))
    for name, value in defaults:
        if name not in message:
            message[name] = value
    if 'MIME-Version' not in message:
        message['MIME-Version'] = '1.0'
    for name in ('Content-Type', 'Content-Transfer-Encoding'):
        del message[name]
    message.set_payload(body, charset='utf-8')
    from email.generator import BytesGenerator
    buffer = io.BytesIO()
    BytesGenerator(buffer, mangle_from_=False, policy=policy.compat32.clone(linesep='\r\n')).flatten(message)
    return buffer.getvalue()
