"""Attachment Blocker: FuGlu's FiletypePlugin (alias ``attachment``, section
``[FiletypePlugin]``).

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
* a MIME walker over the raw bytes (``walk_message``): it finds every part the email
  package finds, by the same rules, and what other readers may show besides; it works
  on offsets into the source (the email package's parser costs ~20 ms per MB and a
  copy per level), decodes only what a check needs (the first 64 KB for typing, whole
  archives when they are opened), and every quantity a sender controls is bounded
  (``MimeLimitExceeded``: a verdict by ``mime_limit_action``, never a skipped part);
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
from fuglu import (DUNNO, DELETE, DBConfig, DBFile, RuntimeConfigError, ScannerPlugin,
                   apply_template, iter_mime_parameters, lint_sql, string_to_actioncode)

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
        return ('python-magic (libmagic)' if hasattr(_magic_module, 'from_buffer')
                else 'file-magic (libmagic)')
    return 'built-in signature table (python-magic not installed)'


###############################################################################
# MIME walking on bytes
###############################################################################
# What a mail client sees decides what is checked. The walker reads a message the way
# the email package's parser (email.feedparser with policy compat32) does: a line ends
# at CRLF, CR or LF; a header block ends at the first line that is neither a field nor
# a continuation (an empty one is consumed); a boundary line is "--" boundary, an
# optional "--", optional blanks and the end of the line (RFC 2046 5.1.1), and the
# boundary of every enclosing multipart ends an inner part too (5.1.2); parameters are
# split, unquoted and RFC 2231 decoded by the same rules. So every part, name and type
# that `email.message_from_bytes(...).walk()` yields is found here as well
# (tests/test_mime_differential.py holds the two side by side on generated messages).
#
# Where other readers may see more, the walker looks too: every Content-Type and
# Content-Disposition field names and types a part, not only the first; a boundary
# declared anywhere in a part's fields (a second Content-Type, the raw 8-bit form) is
# tried on its body; the text after a closing boundary is searched for more parts; an
# attached message sent as base64 or quoted-printable is walked decoded as well as raw;
# 8-bit names are also read as UTF-8 and RFC 2047 names decoded; base64 is also decoded
# past stray padding.
#
# Walking copies nothing: a part is a pair of offsets into the source (or into the
# decoded copy of an encoded attached message, charged to a budget). Every quantity the
# sender controls is bounded — parts, nesting, header lines, parameters per field,
# name length, decoded bytes — and reaching a bound raises MimeLimitExceeded, which the
# plugin turns into a verdict (mime_limit_action), never into a part left unchecked.

class MimeLimitExceeded(Exception):
    """A message's MIME structure goes beyond the walker's limits."""


MimeLimits = namedtuple('MimeLimits', 'max_parts max_depth')
DEFAULT_MIME_LIMITS = MimeLimits(max_parts=2000, max_depth=25)
# lines read one by one in all parts of a message: header lines, and boundary lines
# that follow each other (they open no parts)
MIME_MAX_HEADER_LINES = 50000
MIME_MAX_FIELD_CHARS = 65536    # one Content-Type, -Disposition or -Transfer-Encoding field
MIME_MAX_PARAMETERS = 100       # parameters of one Content-Type / -Disposition field
MIME_MAX_NAME_CHARS = 1024      # one file name or boundary (or archive member name)
MIME_MAX_TYPE_CHARS = 255       # one content type
MIME_MAX_BOUNDARIES = 8         # different boundaries declared by one part
# Encoded attached messages are decoded to be walked: in all at most twice the size
# of the message plus this many bytes.
MIME_DECODE_ALLOWANCE = 1048576
# Text the email package reads as one (epilogues, bodies under another declared
# boundary) is searched for more parts: at most this many times the message size.
MIME_SEARCH_FACTOR = 8

LINE_BREAK_RE = re.compile(rb'\r\n|\r|\n')
# email.feedparser's headerRE: a field, a continuation, or a Unix "From " line
HEADER_LINE_RE = re.compile(rb'From |[\x21-\x39\x3b-\x7e]*:|[\t ]')
# what may follow "--boundary" on a boundary line; group 1: the closing "--"
BOUNDARY_TAIL_RE = re.compile(rb'(--)?[ \t]*(?:\r\n|\r|\n|\Z)')
# In a region's stack of line matchers (the separators of the enclosing multiparts)
# this one stands for "an empty line" (the blocks of message/delivery-status).
BLANK_LINE = 'blank line'
# After this many lines starting with "--" that end nothing, a region is searched with
# one compiled expression instead of line by line.
CANDIDATES_BEFORE_REGEX = 64
UU_ENCODINGS = ('x-uuencode', 'uuencode', 'uue', 'x-uue')
MIME_FIELDS = ('content-type', 'content-disposition', 'content-transfer-encoding')
# codecs whose decoder needs quadratic time: only short texts are decoded with them
SLOW_CODECS = ('punycode', 'idna')
SLOW_CODEC_MAX_CHARS = 64
_MISSING = object()


def _has_8bit(data):
    return not data.isascii()


def _email_text(raw):
    """A field value as str the way compat32 hands it to parsing code: 8-bit bytes
    become U+FFFD (what str() of its unknown-8bit Header gives)."""
    return raw.decode('ascii', 'replace')


def _text_forms(raw, exact_bytes=False):
    """The readings of a field value: the email package's, then (for 8-bit values) as
    UTF-8, or byte for byte (surrogate escapes) when ``exact_bytes``."""
    forms = [_email_text(raw)]
    if _has_8bit(raw):
        if exact_bytes:
            forms.append(raw.decode('ascii', 'surrogateescape'))
        else:
            forms.append(raw.decode('utf-8', 'replace'))
    return forms


def _split_parameters(text):
    """The pieces of email.message._parseparam (in linear time), at most
    MIME_MAX_PARAMETERS parameters after the type."""
    params = []
    for param in iter_mime_parameters(text):
        params.append(param)
        if len(params) > MIME_MAX_PARAMETERS + 1:
            raise MimeLimitExceeded('more than %d parameters in one header field'
                                    % MIME_MAX_PARAMETERS)
    return params


def parameters(text):
    """(name, value) pairs of a field value as email.message.Message.get_params()
    gives them: RFC 2231 continuations joined, values unquoted, an RFC 2231 value as
    a (charset, language, text) tuple."""
    from email.utils import decode_params, unquote
    params = _split_parameters(text)
    try:
        decoded = decode_params(params)
    except (TypeError, ValueError):
        # The email package raises here (continuations numbered and not, mixed): read
        # each parameter on its own, so that no name goes unseen.
        return [(name.split('*', 1)[0], _plain_rfc2231(name, unquote(value)))
                for name, value in params]
    return [(name, (value[0], value[1], unquote(value[2])) if isinstance(value, tuple)
             else unquote(value)) for name, value in decoded]


def _plain_rfc2231(name, value):
    if not name.endswith('*'):
        return value
    from urllib.parse import unquote_to_bytes
    charset, _language, text = value.split("'", 2) if value.count("'") >= 2 else ('', '', value)
    return unquote_to_bytes(text).decode(safe_codec(charset), 'replace')


def safe_codec(charset, length=0):
    """A codec to decode sender text declared as ``charset``: that one when Python has
    it as a text codec (and it is fast enough for ``length`` characters), else utf-8."""
    import codecs
    try:
        name = codecs.lookup(charset).name
        str(b'', name)  # a text codec (not base64, rot13 ...)
    except (LookupError, ValueError, TypeError):
        return 'utf-8'
    if name in SLOW_CODECS and length > SLOW_CODEC_MAX_CHARS:
        return 'utf-8'
    return name


def collapse_value(value):
    """email.utils.collapse_rfc2231_value, with the charset's decoder bounded in time."""
    from email.utils import collapse_rfc2231_value, unquote
    if isinstance(value, tuple) and len(value) == 3 and value[0]:
        if safe_codec(value[0], len(value[2])) == 'utf-8' and safe_codec(value[0]) != 'utf-8':
            return unquote(value[2])  # a slow codec and a long text: kept as it is
    try:
        return collapse_rfc2231_value(value)
    except (ValueError, TypeError):  # the email package raises too (a NUL in the charset)
        return unquote(value[2]) if isinstance(value, tuple) else value


ENCODED_WORD_RE = re.compile(r'=\?([^?\s]*)\?([bBqQ])\?([^?\s]*)\?=')


def decode_rfc2047(text):
    """'=?utf-8?b?...?=' encoded words -> text, in linear time; whitespace between two
    encoded words goes (RFC 2047 6.2); an undecodable word stays as it is."""
    if '=?' not in text:
        return text
    out, last, after_word = [], 0, False
    for match in ENCODED_WORD_RE.finditer(text):
        between = text[last:match.start()]
        if not (after_word and not between.strip()):
            out.append(between)
        charset, kind, payload = match.groups()
        data = payload.encode('ascii', 'replace')
        try:
            if kind in 'bB':
                data = _base64_readings(data)[-1]
            else:
                data = binascii.a2b_qp(data.replace(b'_', b' '))
        except (binascii.Error, ValueError):
            out.append(match.group())
            after_word = False
            last = match.end()
            continue
        charset = charset.split('*', 1)[0]  # RFC 2231 section 5: charset*language
        out.append(data.decode(safe_codec(charset, len(data)), 'replace'))
        last, after_word = match.end(), True
    out.append(text[last:])
    return ''.join(out)


def _base64_email(encoded):
    """A base64 body decoded as email.message.Message.get_payload(decode=True) does."""
    import base64
    joined = b''.join(bytes(encoded).splitlines())
    missing = len(joined) % 4
    try:
        return base64.b64decode(joined + b'==='[:4 - missing] if missing else joined, validate=True)
    except binascii.Error:
        pass
    for padding in (b'', b'=='):
        try:
            return base64.b64decode(joined + padding, validate=False)
        except binascii.Error:
            pass
    return joined  # one character too many: the email package keeps the text


BASE64_NOISE_RE = re.compile(rb'[^A-Za-z0-9+/=]+')
BASE64_PADDING_RE = re.compile(rb'=+')
BASE64_LETTER_RE = re.compile(rb'[A-Za-z0-9+/]')
# padding runs inside one base64 body at most (a real one has one, at its end)
BASE64_MAX_PADDINGS = 10000


def _base64_readings(encoded):
    """The email package's decoding (which stops at the first padding), then, when it
    differs, one that decodes on after each padding as forgiving decoders do."""
    encoded = bytes(encoded)
    try:
        # binascii skips line breaks and stray characters and stops at the padding, as
        # the email package does; it refuses a last incomplete group, the package pads it
        exact = binascii.a2b_base64(encoded)
    except binascii.Error:
        exact = None
    if exact is not None:
        padding = encoded.find(b'=')
        if padding < 0 or not BASE64_LETTER_RE.search(encoded, padding):
            return [exact]  # nothing after the padding: every decoder reads the same
    else:
        exact = _base64_email(encoded)
    chunks = BASE64_PADDING_RE.split(BASE64_NOISE_RE.sub(b'', encoded))
    if len(chunks) > BASE64_MAX_PADDINGS:
        raise MimeLimitExceeded('base64 with more than %d paddings' % BASE64_MAX_PADDINGS)
    decoded = []
    for chunk in chunks:
        whole = len(chunk) // 4 * 4
        if whole:
            decoded.append(binascii.a2b_base64(chunk[:whole]))
        if len(chunk) - whole >= 2:  # a last group of 2 or 3 characters: 1 or 2 bytes
            decoded.append(binascii.a2b_base64(chunk[whole:] + b'==='[:4 - len(chunk) + whole]))
    forgiving = b''.join(decoded)
    return [exact] if forgiving == exact else [exact, forgiving]


def _uu_line(line):
    try:
        return binascii.a2b_uu(line)
    except binascii.Error:  # broken encoders: decode what the length byte announces
        return binascii.a2b_uu(line[:(((line[0] - 32) & 63) * 4 + 5) // 3])


def decode_uu(data, uu_module=False):
    """uuencoded data -> bytes as email.message decodes it, or None where it gives up
    (and keeps the text): since Python 3.13 (and 3.12.3, 3.11.9) lines end at CR or LF,
    'begin <octal mode>' opens, an empty line gives up, a missing 'end' does not.
    ``uu_module``: as the uu module did before: lines end at LF only, the begin line
    needs a name too, a missing 'end' gives up."""
    if uu_module:
        pieces = data.split(b'\n')
        lines = iter([piece + b'\n' for piece in pieces[:-1]] + [pieces[-1]])
    else:
        lines = iter(data.splitlines())
    for line in lines:
        fields = line.split(b' ', 2)
        if fields[0] == b'begin' and len(fields) >= (3 if uu_module else 2):
            try:
                int(fields[1], 8)
                break
            except ValueError:
                continue
    else:
        return None
    decoded = []
    for line in lines:
        if line.strip(b' \t\r\n\f') == b'end':
            return b''.join(decoded)
        if not line:  # an empty line, or (uu_module) the end of the data
            return None
        try:
            decoded.append(_uu_line(line))
        except binascii.Error:
            return None
    return None if uu_module else b''.join(decoded)


def decode_body(method, raw):
    """Readings of a body encoded with ``method`` (base64, quoted-printable, uu, or
    anything else: as it is), the email package's first."""
    if method == 'base64':
        return _base64_readings(raw)
    if method == 'quoted-printable':
        return [binascii.a2b_qp(bytes(raw))]
    if method in UU_ENCODINGS:
        raw = bytes(raw)
        readings = [decode_uu(raw), decode_uu(raw, uu_module=True), raw]
        return [reading for index, reading in enumerate(readings)
                if reading is not None and reading not in readings[:index]]
    return [bytes(raw)]


class PartHeaders(object):
    """A part's header fields as the email package holds them (compat32): a list of
    (lower-case name, value bytes), folded lines kept, and its readings of them."""

    __slots__ = ('fields', 'default_type', 'content_type')

    def __init__(self, fields, default_type='text/plain'):
        for name, value in fields:
            if name in MIME_FIELDS and len(value) > MIME_MAX_FIELD_CHARS:
                raise MimeLimitExceeded('a %s field longer than %d characters'
                                        % (name, MIME_MAX_FIELD_CHARS))
        self.fields = fields
        self.default_type = default_type
        self.content_type = _bounded_type(self._content_type())

    def values(self, name):
        return [value for field, value in self.fields if field == name]

    def first(self, name):
        for field, value in self.fields:
            if field == name:
                return value
        return None

    def _content_type(self):
        """Message.get_content_type()"""
        value = self.first('content-type')
        if value is None:
            return self.default_type
        content_type = _email_text(value).partition(';')[0].strip().lower()
        return content_type if content_type.count('/') == 1 else 'text/plain'

    @property
    def maintype(self):
        return self.content_type.split('/')[0]

    def param(self, header, name):
        """Message.get_param(name, header=header): from the first such field."""
        value = self.first(header)
        if value is None:
            return _MISSING
        for key, found in parameters(_email_text(value)):
            if key.lower() == name:
                return found
        return _MISSING

    def all_params(self, header, name, exact_bytes=False):
        """The values of parameter ``name`` in every ``header`` field, each reading."""
        found = []
        for value in self.values(header):
            for text in _text_forms(value, exact_bytes):
                found.extend(collapse_value(param) for key, param in parameters(text)
                             if key.lower() == name)
        return found

    def filename(self):
        """Message.get_filename()"""
        name = self.param('content-disposition', 'filename')
        if name is _MISSING:
            name = self.param('content-type', 'name')
        return None if name is _MISSING else collapse_value(name).strip()

    def boundary(self):
        """Message.get_boundary()"""
        boundary = self.param('content-type', 'boundary')
        return None if boundary is _MISSING else collapse_value(boundary).rstrip()

    def charset(self):
        charset = self.param('content-type', 'charset')
        return None if charset is _MISSING else collapse_value(charset).lower()

    def types(self):
        """The email package's content type, then those of further Content-Type fields."""
        types = [self.content_type]
        for value in self.values('content-type')[1:]:
            declared = _bounded_type(_email_text(value).partition(';')[0].strip().lower())
            if declared.count('/') == 1 and declared not in types:
                types.append(declared)
        return types

    def dispositions(self):
        return [_email_text(value).partition(';')[0].strip().lower()
                for value in self.values('content-disposition')]

    def transfer_methods(self):
        """Content-Transfer-Encoding as the email package reads it (the first field, not
        stripped), then as trimmed by other readers, from every such field."""
        values = self.values('content-transfer-encoding')
        methods = [_email_text(values[0]).lower() if values else '']
        for value in values:
            text = _email_text(value).strip().lower()
            for method in (text, re.split(r'[\s;(]', text, maxsplit=1)[0]):
                if method not in methods:
                    methods.append(method)
        return methods

    def names(self):
        """Every file name the fields give, each as read and RFC 2047 decoded; the
        email package's get_filename() first."""
        found = []
        exact = self.filename()
        declared = self.all_params('content-disposition', 'filename') + \
            self.all_params('content-type', 'name')
        candidates = ([exact] if exact else []) + [value.strip() for value in declared]
        for name in candidates:
            if len(name) > MIME_MAX_NAME_CHARS:
                raise MimeLimitExceeded('a file name longer than %d characters'
                                        % MIME_MAX_NAME_CHARS)
            for reading in (decode_rfc2047(name), name):
                reading = reading.replace('\r', '').replace('\n', '')
                if reading and reading not in found:
                    found.append(reading)
        return found

    def boundaries(self):
        """Separator lines (bytes) of every boundary the Content-Type fields declare,
        the email package's first (None when it has none or one no line can match)."""
        exact = self.boundary() if self.maintype == 'multipart' else None
        separators = [_separator(exact)] if exact is not None else [None]
        for boundary in self.all_params('content-type', 'boundary', exact_bytes=True):
            boundary = boundary.rstrip()
            if len(boundary) > MIME_MAX_NAME_CHARS:
                raise MimeLimitExceeded('a boundary longer than %d characters'
                                        % MIME_MAX_NAME_CHARS)
            separator = b'--' + boundary.encode('utf-8', 'surrogateescape')
            if b'\r' not in separator and b'\n' not in separator and separator not in separators:
                separators.append(separator)
        if len(separators) > MIME_MAX_BOUNDARIES + 1:
            raise MimeLimitExceeded('more than %d boundaries declared by one part'
                                    % MIME_MAX_BOUNDARIES)
        return separators


def _bounded_type(content_type):
    # RFC 6838 4.2: type and subtype names have at most 127 characters each
    if len(content_type) > MIME_MAX_TYPE_CHARS:
        raise MimeLimitExceeded('a content type longer than %d characters' % MIME_MAX_TYPE_CHARS)
    return content_type


def _separator(boundary):
    """The line prefix of a boundary, or None when no line can start with it (the
    email package reads lines as ASCII, 8-bit bytes as surrogates; a line never holds
    a line break)."""
    if any(ord(character) > 127 for character in boundary):
        return None
    if '\r' in boundary or '\n' in boundary:
        return None
    return b'--' + boundary.encode('ascii')


class MimePart(object):
    """A part the blocker judges: its fields, where its body lies (``data[start:end]``
    after ``prefix``, a line the parser pushed back), its names and types.
    ``container``: a named multipart or attached message (checked by name and type)."""

    __slots__ = ('headers', 'data', 'start', 'end', 'prefix', 'strip_eol', 'container',
                 'names', 'generated_name')

    def __init__(self, headers, data, start, end, prefix=b'', strip_eol=False, container=False):
        self.headers = headers
        self.data, self.start, self.end = data, start, end
        self.prefix, self.strip_eol, self.container = prefix, strip_eol, container
        self.names = headers.names()
        self.generated_name = None

    @property
    def content_type(self):
        return self.headers.content_type

    @property
    def filename(self):
        """The name to show: the first one read without undecodable bytes."""
        for name in self.names:
            if '\ufffd' not in name:
                return name
        return self.names[0] if self.names else None

    def display_name(self):
        return self.filename or self.generated_name

    def has_attachment_disposition(self):
        return any(kind in ('inline', 'attachment') for kind in self.headers.dispositions())

    def raw(self, maxbytes=None):
        """The body as the email package keeps it (the line break before the next
        boundary belongs to the boundary), or its first ``maxbytes`` bytes."""
        end = self.end
        if maxbytes is not None and self.start + maxbytes < end:
            return self.prefix + self.data[self.start:self.start + maxbytes]
        if self.strip_eol:
            if self.data.endswith(b'\r\n', self.start, end):
                end -= 2
            elif end > self.start and self.data[end - 1] in (10, 13):
                end -= 1
        if self.prefix:
            return self.prefix + self.data[self.start:end]
        return memoryview(self.data)[self.start:end]

    def decodings(self, maxbytes=None):
        """The body decoded, the email package's reading first, then every other one
        that differs (another Content-Transfer-Encoding field, forgiving base64).
        ``maxbytes``: only the first bytes of each (cheap for big parts)."""
        needed = None if maxbytes is None else maxbytes * 2 + 4096
        raw = self.raw(needed)
        if needed is not None and self.start + needed < self.end:
            # whole lines only: no encoded line is cut in two
            raw = raw[:raw.rfind(b'\n') + 1 or len(raw)]
        readings, kinds = [], []
        for method in self.headers.transfer_methods():
            kind = method if method in ('base64', 'quoted-printable') + UU_ENCODINGS else ''
            if kind in kinds:
                continue
            kinds.append(kind)
            for decoded in decode_body(kind, raw):
                decoded = decoded if maxbytes is None else decoded[:maxbytes]
                if decoded not in readings:
                    readings.append(decoded)
        return readings


class _WalkState(object):
    """What all walkers over one message share: limits, counters, the result."""

    def __init__(self, limits, size):
        self.limits = limits
        self.parts = []
        self.entities = 0
        self.header_lines = 0
        self.decode_budget = 2 * size + MIME_DECODE_ALLOWANCE
        self.search_budget = MIME_SEARCH_FACTOR * size + MIME_DECODE_ALLOWANCE
        self.patterns = {}

    def count_entity(self, depth):
        self.entities += 1
        if self.entities > self.limits.max_parts:
            raise MimeLimitExceeded('more than %d MIME parts' % self.limits.max_parts)
        if depth > self.limits.max_depth:
            raise MimeLimitExceeded('MIME parts nested deeper than %d levels'
                                    % self.limits.max_depth)

    def count_lines(self):
        self.header_lines += 1
        if self.header_lines > MIME_MAX_HEADER_LINES:
            raise MimeLimitExceeded('more than %d header or boundary lines' % MIME_MAX_HEADER_LINES)

    def charge_search(self, size):
        self.search_budget -= size
        if self.search_budget < 0:
            raise MimeLimitExceeded('too many other boundaries to search for')

    def charge_decoded(self, size):
        self.decode_budget -= size
        if self.decode_budget < 0:
            raise MimeLimitExceeded('encoded attached messages decode to too many bytes')


class MimeWalker(object):
    """One pass over ``data[start:end]`` in the order and by the rules of
    email.feedparser.FeedParser._parsegen (see the section comment). The cursor ``pos``
    is always at the start of a line; ``stack`` holds the separators that end the
    current region, as the parser's stack of end-of-file matchers does."""

    def __init__(self, data, state, start=0, end=None):
        self.data, self.state = data, state
        self.pos = start
        self.end = len(data) if end is None else end
        self.stack = []
        self.found = {}  # needle -> (searched from, first position found or -1)

    # -- lines -------------------------------------------------------------------
    def _line_end(self, pos):
        match = LINE_BREAK_RE.search(self.data, pos, self.end)
        return match.end() if match else self.end

    def _boundary_line(self, pos, separator):
        """None, or whether the line at ``pos`` closes (True) or separates (False)."""
        if separator is None or not self.data.startswith(separator, pos):
            return None
        match = BOUNDARY_TAIL_RE.match(self.data, pos + len(separator), self.end)
        return None if match is None else bool(match.group(1))

    def _stack_matches(self, pos):
        for matcher in self.stack:
            if matcher is BLANK_LINE:
                if self.data[pos:pos + 1] in (b'\r', b'\n'):
                    return True
            elif self._boundary_line(pos, matcher) is not None:
                return True
        return False

    def _ends_region(self, pos):
        return pos >= self.end or self._stack_matches(pos)

    def _scan(self, pos, own=None):
        """The first line at or after ``pos`` that ends the region, or is a boundary
        line of ``own``; ``end`` when there is none."""
        end = self.end
        if pos >= end:
            return end
        if not self.stack and own is None:
            return end

        def hit(line):
            return self._stack_matches(line) or self._boundary_line(line, own) is not None
        if hit(pos):
            return pos
        data = self.data
        if BLANK_LINE not in self.stack:
            # every line that ends the region starts with what all separators start with
            separators = self.stack + ([own] if own is not None else [])
            prefix = os.path.commonprefix(separators)
            for _ in range(CANDIDATES_BEFORE_REGEX):
                next_lf = self._find(b'\n' + prefix, pos)
                next_cr = self._find(b'\r' + prefix, pos)
                if next_lf < 0 and next_cr < 0:
                    return end
                pos = (next_lf if next_cr < 0 or 0 <= next_lf < next_cr else next_cr) + 1
                if hit(pos):
                    return pos
        match = self._pattern(own).search(data, pos, end)
        return match.start('line') if match else end

    def _find(self, needle, pos):
        """data.find(needle, pos, end), remembered: every part of a region asks again
        from a later position, and in a CRLF message "\\r--" is never there."""
        searched_from, found = self.found.get(needle, (self.end + 1, -1))
        if not searched_from <= pos <= (found if found >= 0 else self.end):
            found = self.data.find(needle, pos, self.end)
            self.found[needle] = (pos, found)
        return found

    def _pattern(self, own):
        """One expression for the lines that end the region (many near misses)."""
        key = (tuple(self.stack), own)
        pattern = self.state.patterns.get(key)
        if pattern is None:
            separators = [matcher for matcher in self.stack if matcher is not BLANK_LINE]
            if own is not None:
                separators.append(own)
            choices = []
            if separators:
                choices.append(b'(?:' + b'|'.join(re.escape(s) for s in separators) +
                               rb')(?:--)?[ \t]*(?:\r\n|\r|\n|\Z)')
            if BLANK_LINE in self.stack:
                choices.append(rb'[\r\n]')
            pattern = re.compile(rb'(?:\r\n|\r(?!\n)|\n)(?P<line>' + b'|'.join(choices) + b')')
            self.state.patterns[key] = pattern
        return pattern

    # -- header blocks -----------------------------------------------------------
    def _read_headers(self, pending=None):
        """The header block at the cursor -> (PartHeaders fields, pushed back line).
        ``pending``: a line an outer header parser pushed back (it comes first)."""
        data, state = self.data, self.state
        lines = [pending] if pending else []
        pos = self.pos
        while not self._ends_region(pos):
            line_end = self._line_end(pos)
            if not HEADER_LINE_RE.match(data, pos, line_end):
                if data[pos] in (10, 13):
                    pos = line_end  # the empty line between header and body
                break
            lines.append((pos, line_end))
            pos = line_end
            state.count_lines()
        self.pos = pos
        fields, current, pushed_back = [], None, None
        last = len(lines) - 1
        for index, (start, end) in enumerate(lines):
            if data[start] in (9, 32):  # continuation: ignored when no field is open
                if current is not None:
                    current[2] = end
                continue
            if current is not None:
                fields.append(self._field(*current))
                current = None
            if data.startswith(b'From ', start):
                if index == last and index > 0:
                    pushed_back = (start, end)  # probably the first line of the body
                continue  # a Unix From_ line, or one out of place
            colon = data.find(b':', start, end)
            if colon > start:
                current = [data[start:colon].decode('ascii').lower(), colon + 1, end]
        if current is not None:
            fields.append(self._field(*current))
        return fields, pushed_back

    def _field(self, name, start, end):
        # compat32: leading blanks of the first line off, the final line break off
        return name, self.data[start:end].lstrip(b' \t').rstrip(b'\r\n')

    # -- entities ------------------------------------------------------------------
    def parse_entity(self, depth, default_type='text/plain', in_multipart=False, pending=None):
        """Headers and body of one entity at the cursor, to the end of the region."""
        state = self.state
        state.count_entity(depth)
        fields, pushed_back = self._read_headers(pending)
        headers = PartHeaders(fields, default_type)
        body_start = self.pos
        content_type, maintype = headers.content_type, headers.maintype
        separators = headers.boundaries()
        container = True
        if content_type == 'message/delivery-status':
            self._delivery_status(depth, pushed_back)
        elif maintype == 'message':
            self.parse_entity(depth + 1, 'text/plain', in_multipart, pushed_back)
            self._walk_decoded_message(headers, body_start, depth, in_multipart)
        elif maintype == 'multipart' and headers.boundary() is not None:
            started, after_close = self._multipart_body(separators[0], depth, content_type)
            if not started:  # no part opened: a leaf, the text before the end its payload
                container = False
                state.parts.append(MimePart(headers, self.data, body_start, self.pos,
                                            self._pushed(pushed_back)))
            self.pos = self._scan(self.pos)  # the epilogue, text to the email package
            if after_close is not None and after_close < self.pos:
                self._hidden_parts(separators[0], after_close, self.pos, depth)
        else:
            container = False
            self.pos = self._scan(self.pos)
            state.parts.append(MimePart(headers, self.data, body_start, self.pos,
                                        self._pushed(pushed_back),
                                        strip_eol=in_multipart and maintype != 'multipart'))
        if container:
            part = MimePart(headers, self.data, body_start, self.pos, container=True)
            if part.names:
                state.parts.append(part)
        for separator in separators[1:]:
            self._hidden_parts(separator, body_start, self.pos, depth)

    def _pushed(self, line):
        return b'' if line is None else self.data[line[0]:line[1]]

    def _multipart_body(self, separator, depth, content_type):
        """The multipart loop of the email package's parser, from the cursor.
        -> (whether a boundary line opened a part, where the text after the closing
        boundary starts or None). The cursor ends at the end of the region, or (no
        part opened) at the closing line or the end."""
        default_type = 'message/rfc822' if content_type == 'multipart/digest' else 'text/plain'
        started = False
        pos = self.pos
        while True:
            pos = self._scan(pos, separator)
            if self._ends_region(pos):
                break
            line_end = self._line_end(pos)
            if self._boundary_line(pos, separator):  # the closing boundary
                self.pos = pos if not started else line_end
                return started, line_end
            started = True
            pos = line_end
            # more boundary lines in a row open no parts
            while not self._ends_region(pos) and self._boundary_line(pos, separator) is not None:
                pos = self._line_end(pos)
                self.state.count_lines()
            self.stack.append(separator)
            self.pos = pos
            self.parse_entity(depth + 1, default_type, True)
            self.stack.pop()
            pos = self.pos
        self.pos = pos
        return started, None

    def _hidden_parts(self, separator, start, end, depth):
        """Parts that a boundary opens in ``data[start:end]``, a region the email package
        reads as one text (an epilogue, or a body under another boundary)."""
        self.state.charge_search(end - start)
        if self.data.find(separator, start, end) < 0:
            return
        walker = MimeWalker(self.data, self.state, start, end)
        _started, epilogue_start = walker._multipart_body(separator, depth + 1, 'multipart/mixed')
        if epilogue_start is not None and epilogue_start < end:
            walker._hidden_parts(separator, epilogue_start, end, depth + 1)

    def _delivery_status(self, depth, pending):
        """message/delivery-status: blocks of fields separated by empty lines, each
        read as an entity of its own (as the email package does)."""
        while True:
            self.stack.append(BLANK_LINE)
            self.parse_entity(depth + 1, 'text/plain', False, pending)
            self.stack.pop()
            pending = None
            if self._ends_region(self.pos):
                return
            self.pos = self._line_end(self.pos)  # the empty line
            if self._ends_region(self.pos):
                return

    def _walk_decoded_message(self, headers, start, depth, in_multipart):
        """An attached message in base64, quoted-printable or uuencode: also walk what a
        reader that decodes it sees."""
        methods = [method for method in headers.transfer_methods()
                   if method in ('base64', 'quoted-printable') + UU_ENCODINGS]
        if not methods or start >= self.pos:
            return
        raw = memoryview(self.data)[start:self.pos]
        for method in methods:
            for decoded in decode_body(method, raw)[:1]:
                self.state.charge_decoded(len(decoded))
                MimeWalker(decoded, self.state).parse_entity(depth + 1, 'text/plain', in_multipart)


def walk_message(source, limits=DEFAULT_MIME_LIMITS):
    """Every leaf part of a message (bytes), attached messages included, and every named
    container, in the order they are found; raises MimeLimitExceeded."""
    state = _WalkState(limits, len(source))
    MimeWalker(source, state).parse_entity(0)
    return state.parts


_mimetypes_lock = threading.Lock()


def extension_for(content_type):
    """'application/pdf' -> 'pdf', for names of parts that have none."""
    import mimetypes
    with _mimetypes_lock:  # the first call initialises the module's shared tables
        extension = mimetypes.guess_extension(content_type)
    return (extension or '.bin').lstrip('.')


def iter_attachments(source, limits=DEFAULT_MIME_LIMITS):
    """The parts the blocker examines: parts with a file name or with a disposition
    inline/attachment. Parts without a name get 'unnamed.<ext>'."""
    return attachments_of(walk_message(source, limits))


def attachments_of(parts):
    attachments = []
    for part in parts:
        if not part.names and (part.container or not part.has_attachment_disposition()):
            continue
        if not part.names:
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
COMPRESSED_SUFFIXES = {'gz': ('.gz', '.tgz', '.z'), 'bz2': ('.bz2', '.tbz', '.tbz2'),
                       'xz': ('.xz', '.txz')}

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
        if (self.max_ratio and inflated > RATIO_MIN_BYTES and inflated > self.max_ratio
            * max(compressed, 1)):
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
    if (announced is not None and budget.max_members and budget.members
        + announced > budget.max_members):
        raise ArchiveLimitExceeded('%d members announced' % announced)
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError,
            NotImplementedError) as error:
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
                    read_member(archive.extractfile(entry), member, want_content, budget,
                                charge=False)
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
    # not really compressed, or corrupt
    except (OSError, EOFError, ValueError, zlib.error) as error:
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
    while (stream.produced <= 2 * RATIO_MIN_BYTES and stream.produced > SUSPICIOUS_RATIO
           * max(raw.tell(), 1)):
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
            logging.getLogger('fuglu.plugin.FiletypePlugin').debug('rar member %s: %s',
                                                                   info.filename, error)
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
# FuGlu's names of the kinds: :checktype of the SQL rules, option naming the dbconfig section
SQL_CHECKTYPES = {'filenames': 'filename', 'filetypes': 'contenttype',
                  'archivenames': 'archive-filename',
                  'archivenames-crypto': 'archive-crypto-filename',
                  'archivefiletypes': 'archive-contenttype'}
CONFIG_SECTION_OPTIONS = {'filenames': 'config_section_filename',
                          'filetypes': 'config_section_filetype',
                          'archivenames': 'config_section_archivename',
                          'archivenames-crypto': 'config_section_archivecryptoname',
                          'archivefiletypes': 'config_section_archivetype'}
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
        if len(fields) < 3:
            rule, problem = None, 'expected "<action> <regex> <description>"'
        else:
            rule, problem = attachment_rule(fields[0], fields[1], fields[2], lineno)
        if problem:
            message = '%s line %d: %s' % (source, lineno, problem)
            logger.error('attachment rule dropped: %s', message)
            errors.append(message)
            continue
        rules.append(rule)
    return rules, errors


def attachment_rule(action, pattern, description, lineno=0):
    """(AttachmentRule, None), or (None, what is wrong with it)."""
    if (action or '').lower() not in RULE_ACTIONS:
        return None, 'unknown action %r' % action
    if NESTED_QUANTIFIER_RE.search(pattern):
        return None, 'nested quantifier in %r (catastrophic backtracking)' % pattern
    try:
        regex = re.compile(pattern, re.IGNORECASE)
    except re.error as error:
        return None, 'invalid regex %r: %s' % (pattern, error)
    description = (description or '').strip()
    description = '' if description == '-' else description
    return AttachmentRule(action.lower(), regex, description, lineno), None


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
            self._bundled[kind] = parse_attachment_rules(text, 'bundled default-%s.conf' % kind,
                                                         self.logger)[0]
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
# passwords tried on encrypted archives at most, and where the subject's words come from
MAX_PASSWORDS = 50
PASSWORD_SUBJECT_CHARS = 1000
PASSWORD_SUBJECT_WORDS = 20
SIGNATURE_TYPES = ('application/pkcs7-signature', 'application/x-pkcs7-signature',
                   'application/pgp-signature')


class ScanContext(object):
    """What one examine() call needs besides the plugin: rule sets, limits, the
    extraction budget and the candidate archive passwords (collected lazily)."""

    def __init__(self, plugin, suspect, rulesets, budget, kinds, levels, parts=None):
        self.plugin, self.suspect, self.rulesets = plugin, suspect, rulesets
        self.budget, self.kinds, self.levels = budget, kinds, levels
        self.parts = parts
        self._passwords = None
        self.unreadable = []

    def passwords(self):
        if self._passwords is None:
            candidates = self.plugin.candidate_passwords(self.suspect, self.parts)
            self._passwords = [p.encode('utf-8') for p in candidates]
        return self._passwords


class FiletypePlugin(ScannerPlugin):
    """Blocks attachments by name, MIME type, content type and archive contents,
    following per-recipient, per-domain and default rule files."""

    friendly_name = 'Attachment Blocker'

    requiredvars = {
        'template_blockedfile': {'default': '${confdir}/templates/blockedfile.tmpl',
                                 'description': 'bounce sent to the sender of a blocked '
                                                'attachment: headers, empty line, body; '
                                                '${blockinfo} is the reason',
                                 'path': 'file', 'missing': 'the bundled template is used'},
        'sendbounce': {'default': 'True', 'description': 'send the bounce above when an attachment '
                                                         'is denied'},
        'nobouncerules': {'default': '${confdir}/archive.regex',
                          'description': 'rule file (SuspectFilter): a match with argument "no" '
                                         'suppresses the bounce',
                          'path': 'file', 'missing': 'every bounce is sent'},
        'rulesdir': {'default': '${confdir}/rules',
                     'description': 'directory of <scope>-filenames.conf, -filetypes.conf, '
                                    '-archivenames.conf, -archivenames-crypto.conf, '
                                    '-archivefiletypes.conf (scope: address, domain or default). '
                                    'Without default-* files the bundled defaults apply',
                     'path': 'dir', 'missing': 'the bundled default rules apply'},
        'blockaction': {'default': 'DELETE', 'description': 'action for a denied attachment '
                                                            '(REJECT makes sense before the queue '
                                                            'only)'},
        'block_encrypted': {'default': 'False', 'description': 'block every password '
                                                               'protected archive'},
        'rejectmessage_encrypted': {'default': 'Encrypted archive ${attname} not permitted',
                                    'description': 'reason given for a blocked encrypted archive'},
        'overrides_source': {'default': '', 'description': (
            'dbconfig: read sendbounce, checkarchivenames, checkarchivecontent,\n'
            'enabledarchivetypes, disabledarchivetypes and template_blockedfile per recipient\n'
            'from [databaseconfig], and rules from its sections named by config_section_*\n'
            '(FuGlu\'s tag:... source is not supported)')},
        'dbconnectstring': {'default': '', 'confidential': True, 'description': (
            'SQLAlchemy URL of per-recipient and per-domain rules (query); sqlite:///path works\n'
            'without SQLAlchemy. Cached, timed out and failing like [databaseconfig].\n'
            'Empty: rule files only')},
        'query': {'default': 'SELECT action,regex,description FROM attachmentrules WHERE '
                             'scope=:scope AND checktype=:checktype ORDER BY prio',
                  'description': (
                      'the rules of one scope (:scope = recipient address, then its domain) and\n'
                      'kind (:checktype = filename, contenttype, archive-filename,\n'
                      'archive-crypto-filename, archive-contenttype); columns action, regex,\n'
                      'description')},
        'config_section_filename': {'default': '', 'description': (
            'overrides_source=dbconfig: section of file name rules (option = regex,\n'
            'value = "<action> <description>"); empty: config_section_filename')},
        'config_section_filetype': {'default': '',
                                    'description': 'the same for content type rules'},
        'config_section_archivename': {'default': '',
                                       'description': 'the same for archive member names'},
        'config_section_archivecryptoname': {
            'default': '', 'description': 'the same for member names in encrypted archives'},
        'config_section_archivetype': {'default': '',
                                       'description': 'the same for archive member types'},
        'rulestag': {'default': '', 'description': 'accepted for compatibility; not supported',
                     'inert': 'not supported by this build'},
        'checkarchivenames': {'default': 'False', 'description': 'check the names of files inside '
                                                                 'archives'},
        'checkarchivecontent': {'default': 'False', 'description': 'check the content types of '
                                                                   'files inside archives'},
        'archivecontentmaxsize': {'default': '5000000',
                                  'description': 'archive members up to this many bytes '
                                                 '(uncompressed) are extracted whole (nested '
                                                 'archives); larger ones are typed by their first '
                                                 'bytes only'},
        'archiveextractlevel': {'default': '1', 'description': 'archive nesting levels opened (1: '
                                                               'only archives attached to the '
                                                               'mail); negative: up to %d'
                                                               % UNLIMITED_NESTING},
        'archive_passwords': {'default': '', 'description': 'comma separated passwords tried on '
                                                            'encrypted zips'},
        'archive_passwords_maxbodywords': {'default': '0', 'description': 'also try this many '
                                                                          'words of the first text '
                                                                          'part as passwords'},
        'archive_passwords_minwordlength': {'default': '4',
                                            'description': 'shortest word tried as a password'},
        'archive_passwords_maxtextpartlength': {'default': '2048',
                                                'description': 'characters of the text part '
                                                               'searched for password words'},
        'enabledarchivetypes': {'default': '', 'description': 'archive types opened (zip, tar, gz, '
                                                              'bz2, xz, rar, 7z); empty: all '
                                                              'available'},
        'disabledarchivetypes': {'default': '', 'description': 'archive types never opened (also '
                                                               '[main] disabledarchivetypes)'},
        'archive_max_extracted': {'default': '50000000',
                                  'description': 'bytes extracted from all archives of one '
                                                 'message at most'},
        'archive_max_members': {'default': '2000', 'description': 'files in all archives of one '
                                                                  'message at most'},
        'archive_max_ratio': {'default': '200', 'description': 'highest compression ratio accepted '
                                                               'once more than 1 MB is inflated; '
                                                               '0: no limit'},
        'archive_limit_action': {'default': 'deny', 'description': 'when an archive exceeds the '
                                                                   'limits above (archive bomb): '
                                                                   'deny (block like a denied '
                                                                   'attachment), problem '
                                                                   '(problemaction) or allow'},
        'mime_max_parts': {'default': str(DEFAULT_MIME_LIMITS.max_parts),
                           'description': 'MIME parts of one message at most (attached messages '
                                          'included)'},
        'mime_max_depth': {'default': str(DEFAULT_MIME_LIMITS.max_depth),
                           'description': 'nesting of multiparts and attached messages at most'},
        'mime_limit_action': {'default': 'deny',
                              'description': 'when a message exceeds the MIME limits (parts, '
                                             'depth, header lines, parameters, name length): deny '
                                             '(block like a denied attachment) or problem '
                                             '(problemaction)'},
        'problemaction': {'default': 'DEFER', 'description': 'action when the check itself fails'},
        'verbose': {'default': 'False', 'description': 'log every attachment checked'},
        'ignore_signature': {'default': 'False', 'description': 'skip the content type check of '
                                                                'S/MIME and PGP signature parts'},
    }

    def __init__(self, config, section=None):
        super().__init__(config, section)
        self.rule_cache = RuleFileCache(self.logger)
        self._nobounce_filters = {}
        self._reported_bad_rules = set()

    # -- configuration -----------------------------------------------------------
    def runtime_config(self, suspect):
        """The config for the options a recipient may override: with overrides_source =
        dbconfig and a message, its DBConfig ([databaseconfig]), else the file."""
        source = self.config.get(self.section, 'overrides_source').strip()
        if suspect is not None and source == 'dbconfig':
            return DBConfig(self.config, suspect)
        return self.config

    def _get(self, option, suspect=None):
        return self.runtime_config(suspect).get(self.section, option)

    def _getbool(self, option, suspect=None):
        return self.runtime_config(suspect).getboolean(self.section, option)

    def _getint(self, option):
        return self.config.getint(self.section, option)

    def block_action(self):
        """blockaction, resolved with the config so DEFAULTVIRUSACTION etc. work
        (upstream resolves it without and silently turns those into DUNNO)."""
        code = string_to_actioncode(self._get('blockaction'), self.config)
        return DELETE if code is None else code

    def mime_limits(self):
        return MimeLimits(self._getint('mime_max_parts'), self._getint('mime_max_depth'))

    def enabled_archive_kinds(self, suspect=None):
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
        enabled = kinds_of(self._get('enabledarchivetypes', suspect))
        disabled = kinds_of(self._get('disabledarchivetypes', suspect))
        disabled |= kinds_of(self.config.get('main', 'disabledarchivetypes', fallback=''))
        return [kind for kind in available
                if (not enabled or kind in enabled) and kind not in disabled]

    def candidate_passwords(self, suspect, parts=None):
        """Passwords to try on encrypted archives. ``parts``: the message's parts when
        already walked."""
        passwords = list(DEFAULT_PASSWORDS)
        passwords.extend(fuglu.parse_list(self._get('archive_passwords')))
        tagged = suspect.get_tag('archive_passwords') or []
        passwords.extend([tagged] if isinstance(tagged, str) else list(tagged))
        minimum = self._getint('archive_passwords_minwordlength')
        subject = suspect.get_header('subject', '') or ''
        words = subject[:PASSWORD_SUBJECT_CHARS].split()[:PASSWORD_SUBJECT_WORDS]
        maxbodywords = self._getint('archive_passwords_maxbodywords')
        if maxbodywords > 0:
            if parts is None:
                parts = walk_message(suspect.source_buffer(), self.mime_limits())
            for part in parts:
                if part.content_type == 'text/plain' and not part.container:
                    limit = self._getint('archive_passwords_maxtextpartlength')
                    data = part.decodings(limit * 4)[0]
                    charset = safe_codec(part.headers.charset() or 'utf-8', len(data))
                    text = data.decode(charset, 'replace')
                    words.extend(text[:limit].split()[:maxbodywords])
                    break
        passwords.extend(word.strip('.,;:!?"\'()') for word in words if len(word) >= minimum)
        # each one is tried on every encrypted member: a bounded list
        return list(dict.fromkeys(password for password in passwords if password))[:MAX_PASSWORDS]

    # -- rules -------------------------------------------------------------------
    def rulesets(self, suspect):
        """kind -> [user rules, domain rules, default rules] (missing files skipped); the
        user and domain rules from the database come before their files."""
        rulesdir = self._get('rulesdir')
        scopes = [safe_scope(suspect.to_address), safe_scope(suspect.to_domain)]
        default_files = {kind: os.path.join(rulesdir, 'default-%s.conf' % kind)
                         for kind in RULE_KINDS}
        defaults = {kind: self.rule_cache.get(path) for kind, path in default_files.items()}
        use_bundled = all(rules is None for rules in defaults.values())
        from_database = self.database_rules(suspect)
        result = {}
        for kind in RULE_KINDS:
            sets = []
            for position, scope in enumerate(scopes):
                sets.extend(rules for rules in from_database[kind][position] if rules)
                if scope:
                    rules = self.rule_cache.get(os.path.join(rulesdir,
                                                             '%s-%s.conf' % (scope, kind)))
                    if rules:
                        sets.append(rules)
            default = self.rule_cache.bundled(kind) if use_bundled else defaults[kind]
            if default:
                sets.append(default)
            result[kind] = sets
        return result

    def database_rules(self, suspect):
        """kind -> (rule sets of the address, rule sets of the domain) from SQL
        (dbconnectstring + query) and, with overrides_source = dbconfig, the address's
        sections of the runtime config. Raises RuntimeConfigError (the message waits)."""
        result = {kind: ([], []) for kind in RULE_KINDS}
        url = self._get('dbconnectstring').strip()
        if url:
            rows_of = DBFile(url, self._get('query'), self.config).get_rows
            for position, scope in enumerate((suspect.to_address, suspect.to_domain)):
                for kind in RULE_KINDS:
                    if scope:
                        rows = rows_of({'scope': scope, 'checktype': SQL_CHECKTYPES[kind]})
                        result[kind][position].append(self.rules_from_rows(rows, 'SQL rules'))
        if self._get('overrides_source').strip() == 'dbconfig':
            runtimeconfig = DBConfig(self.config, suspect)
            for kind in RULE_KINDS:
                option = CONFIG_SECTION_OPTIONS[kind]
                section = self._get(option).strip() or option
                if runtimeconfig.load_section(section):
                    rows = []
                    for regex in runtimeconfig.get_cached_options(section):
                        fields = runtimeconfig.get(section, regex).split(None, 1) + ['', '']
                        rows.append((fields[0], regex, fields[1]))
                    rules = self.rules_from_rows(rows, 'dbconfig section ' + section)
                    result[kind][0].append(rules)
        return result

    def rules_from_rows(self, rows, source):
        """(action, regex, description) rows -> AttachmentRules; bad rows are logged once
        and dropped, as bad lines of a rule file are."""
        rules = []
        for row in rows:
            action, pattern, description = (tuple(row) + (None, None, None))[:3]
            rule, problem = attachment_rule(action or '', pattern or '', description)
            if rule is not None:
                rules.append(rule)
                continue
            reported = self._reported_bad_rules
            if (source, problem) not in reported and len(reported) < 1000:
                reported.add((source, problem))
                self.logger.error('attachment rule dropped: %s: %s', source, problem)
        return rules

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
        except RuntimeConfigError:
            raise   # the session defers: no rules is no policy
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
        budget = ExtractionBudget(self._getint('archive_max_extracted'),
                                  self._getint('archive_max_members'),
                                  self._getint('archive_max_ratio'),
                                  self._getint('archivecontentmaxsize'))
        try:
            parts = walk_message(suspect.source_buffer(), self.mime_limits())
        except MimeLimitExceeded as error:
            return self._mime_limit_verdict(suspect, error)
        context = ScanContext(self, suspect, rulesets, budget, self.enabled_archive_kinds(suspect),
                              levels, parts)
        verbose = self._getbool('verbose')
        for part in attachments_of(parts):
            try:
                verdict = self.check_part(context, part)
            except MimeLimitExceeded as error:
                return self._mime_limit_verdict(suspect, error)
            if verbose:
                self.logger.info('%s: attachment %r (%s): %s', suspect.id, part.display_name(),
                                 part.content_type, verdict.action if verdict else 'ok')
            if verdict is not None:
                return verdict
        return None

    def check_part(self, context, part):
        """Every name of the part, every declared type, then the type of every reading
        of its content (and the archive it may be): the first deny/delete decides."""
        rulesets = context.rulesets
        names = []
        for name in part.names or [part.generated_name]:
            name = matchable_name(name)
            if name not in names:
                names.append(name)
        for name in names:
            verdict = self._judge(rulesets['filenames'], name, name)
            if verdict:
                return verdict
        match_name = matchable_name(part.display_name())
        declared = part.headers.types()
        for content_type in declared:
            verdict = self._judge(rulesets['filetypes'], content_type,
                                  '%s %s' % (match_name, content_type))
            if verdict:
                return verdict
        if part.container:
            return None
        if self._getbool('ignore_signature') and part.content_type in SIGNATURE_TYPES:
            return None
        archive_kinds = []
        for head in part.decodings(HEAD_BYTES):
            detected = content_type_of(head)
            if detected not in declared:
                verdict = self._judge(rulesets['filetypes'], detected,
                                      '%s %s' % (match_name, detected))
                if verdict:
                    return verdict
            kind = ARCHIVE_KIND_BY_TYPE.get(detected)
            if kind is not None and kind not in archive_kinds:
                archive_kinds.append(kind)
        wanted = (self._getbool('checkarchivenames', context.suspect)
                  or self._getbool('checkarchivecontent', context.suspect))
        if not archive_kinds or not wanted or context.levels < 1:
            return None
        for kind in archive_kinds:
            if kind not in context.kinds and kind not in available_archive_kinds():
                self._unreadable(context, match_name, '%s archives need an optional module that is '
                                                      'not installed' % kind)
        try:
            for data in part.decodings():
                kind = ARCHIVE_KIND_BY_TYPE.get(content_type_of(data[:HEAD_BYTES]))
                if kind in context.kinds:
                    verdict = self.check_archive(context, data, kind, match_name, '', 1)
                    if verdict:
                        return verdict
        except ArchiveLimitExceeded as error:
            return self._limit_verdict(context, match_name, error)
        return None

    def _unreadable(self, context, name, reason):
        self.logger.info('%s: contents of %s not checked: %s', context.suspect.id, name, reason)
        context.unreadable.append('%s: %s' % (name, reason))
        unchecked = context.suspect.tags.setdefault('FiletypePlugin.unchecked', [])
        unchecked.append('%s: %s' % (name, reason))

    def _mime_limit_verdict(self, suspect, error):
        self.logger.warning('%s: the MIME structure exceeds the limits: %s', suspect.id, error)
        problem = self._get('mime_limit_action').strip().lower() == 'problem'
        action = 'problem' if problem else 'deny'
        return Verdict(action, 'message', 'MIME structure exceeds the limits (%s)' % error)

    def _limit_verdict(self, context, name, error):
        choice = self._get('archive_limit_action').strip().lower()
        self.logger.warning('%s: archive %s exceeds the extraction limits: %s', context.suspect.id,
                            name, error)
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
        check_names = self._getbool('checkarchivenames', context.suspect)
        check_content = self._getbool('checkarchivecontent', context.suspect)
        deeper = depth < context.levels
        rulesets = context.rulesets

        def want_content(member):
            # whole members are only needed to open nested archives
            return deeper and ARCHIVE_KIND_BY_TYPE.get(self.member_type(member)) in context.kinds

        where = attachment_name + ('/' + inner_path.rstrip('/') if inner_path else '')
        inner_file_name = (inner_path.rstrip('/').rsplit('/', 1)[-1] if inner_path
                           else attachment_name)
        try:
            members = read_archive(kind, data, inner_file_name, check_content or deeper,
                                   want_content, context.budget, context.passwords)
        except ArchiveUnreadable as error:
            self._unreadable(context, where, str(error))
            return None
        if any(member.encrypted for member in members) and (
                self._getbool('block_encrypted') or
                context.suspect.get_tag('filetype_blockarchiveencrypted')):
            message = apply_template(self._get('rejectmessage_encrypted'), context.suspect,
                                     {'attname': where})
            return Verdict('deny', where, 'encrypted archive', message)
        for member in members:
            if len(member.name) > MIME_MAX_NAME_CHARS:  # rules would search it in quadratic time
                raise ArchiveLimitExceeded('a member name longer than %d characters'
                                           % MIME_MAX_NAME_CHARS)
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
                verdict = self._judge(rulesets['archivefiletypes'], member_type,
                                      '%s %s' % (subject, member_type))
                if verdict:
                    return verdict
            nested_kind = ARCHIVE_KIND_BY_TYPE.get(member_type)
            if deeper and nested_kind in context.kinds:
                if member.content is None:
                    self._unreadable(context,
                                     '%s/%s%s' % (attachment_name, inner_path, member_name),
                                     'nested archive larger than archivecontentmaxsize or '
                                     'unreadable')
                    continue
                verdict = self.check_archive(context, member.content, nested_kind, attachment_name,
                                             '%s%s/' % (inner_path, member_name), depth + 1)
                if verdict:
                    return verdict
        return None

    # -- the verdict -------------------------------------------------------------
    def act_on(self, suspect, verdict):
        message = (verdict.message
                   or ('%s: %s' % (verdict.subject, verdict.description)).strip().rstrip(':'))
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
        if self._getbool('sendbounce', suspect):
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
        """Tell the sender (FuGlu's sendbounce): once per message, never for spam, virus or the
        null sender, not when nobouncerules says 'no'."""
        if (suspect.get_tag('Attachment.bounce.queueid')
            or suspect.get_tag('Attachment.bounce.sent')):
            return None
        if not suspect.from_address or suspect.is_spam() or suspect.is_virus():
            return None
        if not BOUNCE_ADDRESS_RE.match(suspect.from_address):
            # a line break or blank would end the RCPT command (wherever the address came from)
            self.logger.warning('%s: no bounce to %r: not a usable address', suspect.id,
                                suspect.from_address)
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
        template = self.bounce_template(suspect)
        if template is None:
            self.logger.error('%s: no bounce: template %s not found', suspect.id,
                              self._get('template_blockedfile', suspect))
            return None
        suspect.tags['Attachment.bounce.sent'] = True
        try:  # the message is blocked either way: a failed bounce never defers it
            message = build_bounce_message(self.config, suspect, template, {'blockinfo': blockinfo})
            queue_id = send_bounce(self.config, suspect, suspect.from_address, message)
        except Exception as error:
            self.logger.error('%s: bounce to %s failed: %s', suspect.id, suspect.from_address,
                              error)
            return None
        if queue_id:
            suspect.tags['Attachment.bounce.queueid'] = queue_id
        return queue_id

    def bounce_template(self, suspect=None):
        path = self._get('template_blockedfile', suspect)
        try:
            with open(path, encoding='utf-8', errors='replace') as handle:
                return handle.read()
        except OSError:
            data = read_bundled_conf('templates/blockedfile.tmpl')
            return data.decode('utf-8', 'replace') if data else None

    # -- lint --------------------------------------------------------------------
    def lint_database(self):
        """The SQL rules query, once, and the options we accept without acting on them."""
        ok = True
        source = self._get('overrides_source').strip()
        if source and source != 'dbconfig':
            print('WARNING: overrides_source %s is not supported (only dbconfig): ignored' % source)
        if self._get('rulestag').strip():
            print('WARNING: rulestag is not supported: ignored')
        for option in () if source == 'dbconfig' else CONFIG_SECTION_OPTIONS.values():
            if self._get(option).strip():
                print('WARNING: %s is only used with overrides_source = dbconfig: ignored' % option)
        url = self._get('dbconnectstring').strip()
        if url:
            timeout = self.config.getfloat('databaseconfig', 'timeout', fallback=5.0)
            ok = lint_sql(url, self._get('query'), {'scope': 'lint', 'checktype': 'filename'},
                          'SQL rules', timeout)
        return ok

    def lint(self):
        ok = self.check_config()
        print('file type detection: %s' % type_detection_name())
        kinds = available_archive_kinds()
        missing = [name for name, module in (('rar (rarfile)', _rarfile_module),
                                             ('7z (py7zr)', _py7zr_module))
                   if module is None]
        unavailable = ('; not available: %s' % ', '.join(missing)) if missing else ''
        print('archive types: %s%s' % (', '.join(kinds), unavailable))
        print('archive types enabled: %s' % ', '.join(self.enabled_archive_kinds()))
        if string_to_actioncode(self._get('blockaction'), self.config) is None:
            print('blockaction %r is not an action' % self._get('blockaction'))
            ok = False
        if self._get('archive_limit_action').strip().lower() not in ('deny', 'problem', 'allow'):
            print('archive_limit_action must be deny, problem or allow')
            ok = False
        if self._get('mime_limit_action').strip().lower() not in ('deny', 'problem'):
            print('mime_limit_action must be deny or problem')
            ok = False
        limits = self.mime_limits()
        if min(limits) < 1:
            print('mime_max_parts and mime_max_depth must be at least 1')
            ok = False
        print('MIME limits: %d parts, %d levels; beyond them: %s' % (
            limits.max_parts, limits.max_depth, self._get('mime_limit_action').strip().lower()))
        ok = self.lint_database() and ok
        rulesdir = self._get('rulesdir')
        if os.path.isdir(rulesdir):   # a missing one is reported by check_config
            names = sorted(name for name in os.listdir(rulesdir) if name.endswith('.conf'))
            for name in names:
                with open(os.path.join(rulesdir,
                                       name), encoding='utf-8', errors='replace') as handle:
                    _rules, errors = parse_attachment_rules(handle.read(), name)
                for error in errors:
                    print('attachment rule error: %s' % error)
                    ok = False
            if not any(name.startswith('default-') for name in names):
                print('no default-*.conf in %s: the bundled default rules apply' % rulesdir)
        for kind in RULE_KINDS:
            if (kind != 'archivenames-crypto' and read_bundled_conf('rules/default-%s.conf' % kind)
                is None):
                print('bundled default-%s.conf missing from this installation' % kind)
        if self._getbool('sendbounce') and self.bounce_template() is None:
            print('bounce template %s not found' % self._get('template_blockedfile'))
            ok = False
        path = self._get('nobouncerules')
        if path and os.path.exists(path) and not fuglu.SuspectFilter(path).lint():
            ok = False
        return ok


# An envelope address a bounce can go to: no controls, blanks or angle brackets.
BOUNCE_ADDRESS_RE = re.compile(r'^[^\x00-\x20\x7f<>]+\Z')
# a header field name (RFC 5322 2.2: printable ASCII but ':')
FIELD_NAME_RE = re.compile(r'^[!-9;-~]+$')
HEADER_VALUE_NOISE_RE = re.compile(r'[\x00-\x1f\x7f]+')
BOUNCE_HEADER_MAX_CHARS = 900


def header_safe(value):
    """A value for one header field: line breaks and other controls become a blank,
    text that is not UTF-8 (surrogate escapes) is replaced."""
    text = fuglu.force_uString(value) if value is not None else ''
    text = text.encode('utf-8', 'replace').decode('utf-8', 'replace')
    return HEADER_VALUE_NOISE_RE.sub(' ', text)


def build_bounce_message(config, suspect, template, values):
    """Template -> the bounce as bytes: headers the template lacks
    are added (To, From MAILER-DAEMON@<helo>, Auto-Submitted, Date, Message-ID), the
    body is sent as UTF-8 (base64).

    The header block is filled field by field, and every value that goes into a header
    — a template variable (a recipient, a subject, a file name: sender text) or the
    sender's address — loses line breaks and controls and is RFC 2047 encoded when it
    is not ASCII: nothing a value holds can start another header line."""
    from email import policy
    from email.message import Message
    from email.utils import formatdate, make_msgid
    template = template.replace('\r\n', '\n')
    header_text, _sep, body = template.partition('\n\n')
    if not re.match(r'^[!-9;-~]+:', header_text):  # a template without headers
        header_text, body = '', template
    fields = []
    for line in header_text.split('\n'):
        if line[:1] in (' ', '\t') and fields:
            fields[-1][1] += ' ' + line.strip()  # a folded template line
        elif ':' in line and FIELD_NAME_RE.match(line.partition(':')[0]):
            name, _colon, value = line.partition(':')
            fields.append([name, value.strip()])

    def cleaned(found):
        return {name: header_safe(value) for name, value in found.items()}
    message = Message(policy=policy.compat32)
    for name, value in fields:
        text = apply_template(value, suspect, values, valuesfunction=cleaned,
                              limit=BOUNCE_HEADER_MAX_CHARS)
        message[name] = _header_value(name, header_safe(text))
    helo_function = getattr(fuglu, 'outgoing_helo', None)
    helo = header_safe(helo_function(config) if helo_function else 'localhost')
    defaults = (('To', header_safe(suspect.from_address)), ('From', 'MAILER-DAEMON@%s' % helo),
                ('Auto-Submitted', 'auto-generated'), ('Date', formatdate(localtime=True)),
                ('Message-ID', make_msgid(domain=helo)))
    for name, value in defaults:
        if name not in message:
            message[name] = _header_value(name, value)
    if 'MIME-Version' not in message:
        message['MIME-Version'] = '1.0'
    for name in ('Content-Type', 'Content-Transfer-Encoding'):
        del message[name]
    body = apply_template(body, suspect, values).encode('utf-8', 'replace').decode('utf-8')
    message.set_payload(body, charset='utf-8')
    from email.generator import BytesGenerator
    buffer = io.BytesIO()
    generator = BytesGenerator(buffer, mangle_from_=False,
                               policy=policy.compat32.clone(linesep='\r\n'))
    generator.flatten(message)
    return buffer.getvalue()


def _header_value(name, text):
    """ASCII as it is (the generator folds it); anything else RFC 2047 encoded."""
    try:
        text.encode('ascii')
        return text
    except UnicodeEncodeError:
        from email.header import Header
        return Header(text, 'utf-8', header_name=name)
