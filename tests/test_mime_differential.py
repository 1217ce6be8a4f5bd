"""The attachment walker against the email package, on messages nobody wrote by hand.

A seeded generator builds hostile MIME messages — boundary games (reused, prefixes,
padding, case, quoting, RFC 2231, 8-bit, empty), nesting, digests, delivery-status
blocks, duplicated and missing fields, folded and 8-bit headers, RFC 2047 / 2231 names,
every transfer encoding done right and wrong, epilogues with parts in them, truncation
and flipped bytes. For each, what `email.message_from_bytes(...).walk()` yields must be
a subset of what fuglu_plugins.attachment.walk_message finds: every leaf's content type,
its file name (as matched: printable ASCII) and the first bytes of its decoded content.
Each message must also be walked in bounded time and memory.

The default run (FUGLU_MIME_FUZZ_COUNT, 2500 messages) takes a few seconds; set it to
e.g. 200000 for a long run, FUGLU_MIME_FUZZ_SEED to explore other messages. A failure
prints the seed and index of the message, which reproduces it alone.
"""

import base64
import binascii
import email
import os
import quopri
import random
import sys
import time
import tracemalloc

import pytest

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)

import fuglu  # noqa: E402
from fuglu_plugins import attachment  # noqa: E402
from fuglu_plugins.attachment import (HEAD_BYTES, MimeLimitExceeded, matchable_name,  # noqa: E402
                                      walk_message)
from helpers import make_config  # noqa: E402

COUNT = int(os.environ.get('FUGLU_MIME_FUZZ_COUNT', '2500'))
SEED = int(os.environ.get('FUGLU_MIME_FUZZ_SEED', '20240611'))
# per message: CPU seconds and traced bytes beyond the message size
MAX_SECONDS = 0.5
MAX_EXTRA_MEMORY = 4 * 1048576

LEAF_TYPES = ('text/plain', 'text/html', 'application/octet-stream', 'application/zip',
              'application/x-msdownload', 'image/png', 'application/pdf', 'TEXT/Plain',
              'application/x-dosexec', 'text', 'application/', '/x', 'a/b/c', 'video/mp4')
MULTIPART_TYPES = ('multipart/mixed', 'multipart/alternative', 'multipart/related',
                   'multipart/digest', 'Multipart/Mixed', 'multipart/signed')
NAMES = ('evil.exe', 'Rechnung M\u00e4rz.pdf', 'invoice.pdf.exe', 'a b.zip', 'x;y.scr',
         'quote"d.js', 'back\\slash.vbs', '\u202efdp.exe', '=?utf-8?B?UmVjaG51bmcuc2Ny?=',
         '=?iso-8859-1?Q?b=F6se=2Eexe?=', 'long' * 30 + '.exe', '', ' spaced.bat ', 'a=b.cmd')
def small_zip():
    import io
    import zipfile
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w', zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(zipfile.ZipInfo('inner.exe', (2024, 1, 1, 0, 0, 0)), b'MZ' + b'\x00' * 100)
        archive.writestr(zipfile.ZipInfo('\u00fcber.txt', (2024, 1, 1, 0, 0, 0)), b'text')
    return buffer.getvalue()


PAYLOADS = (small_zip(), b'MZ\x90\x00\x03\x00\x00\x00' + b'\x00' * 60 + b'PE\x00\x00',
            b'PK\x03\x04\x14\x00\x00\x00' + b'x' * 40, b'%PDF-1.4\n%%EOF\n',
            b'\x89PNG\r\n\x1a\n' + b'\x00' * 20, b'plain text\nsecond line\n', b'',
            b'--not a boundary\n', b'Content-Type: text/plain\n\nnested looking text\n',
            bytes(range(256)))
CTES = ('base64', 'quoted-printable', '7bit', '8bit', 'binary', 'x-uuencode', 'Base64',
        'base64 ', ' quoted-printable', 'bogus', '')


class Generator(object):
    """One random message: a tree of parts written out with quirks."""

    def __init__(self, rng):
        self.rng = rng
        self.eol = rng.choice((b'\r\n', b'\n', b'\r\n', b'\r', None))  # None: mixed
        self.boundaries = []

    def line_end(self):
        if self.eol is None:
            return self.rng.choice((b'\r\n', b'\n', b'\r'))
        return self.eol

    def lines(self, *lines):
        return b''.join(line + self.line_end() for line in lines)

    def maybe(self, probability):
        return self.rng.random() < probability

    # -- headers -----------------------------------------------------------------
    def boundary(self):
        rng = self.rng
        choice = rng.random()
        if self.boundaries and choice < 0.15:
            return rng.choice(self.boundaries)  # reused from an enclosing part
        if self.boundaries and choice < 0.25:
            return rng.choice(self.boundaries) + rng.choice(('x', '-', '--', ' '))  # a longer one
        if self.boundaries and choice < 0.3:
            return rng.choice(self.boundaries)[:-1] or 'b'  # a prefix
        if choice < 0.33:
            return ''
        if choice < 0.36:
            return 'b\u00e4r'
        if choice < 0.4:
            return 'Bound ' + str(rng.randint(0, 9))
        return rng.choice(('b', 'B', '=_part', '----=_NextPart_%d' % rng.randint(0, 99), 'a.b:c',
                           "it's"))

    def param(self, name, value):
        rng = self.rng
        choice = rng.random()
        if choice < 0.5:
            return '%s="%s"' % (name, value.replace('\\', '\\\\').replace('"', '\\"'))
        if choice < 0.65:
            return '%s=%s' % (name, value)
        if choice < 0.75:
            encoded = ''.join(c if c.isalnum() else '%%%02X' % b
                              for c in value for b in c.encode('utf-8'))
            return "%s*=utf-8''%s" % (name, encoded)
        if choice < 0.85 and len(value) > 1:
            cut = rng.randint(1, len(value) - 1)
            star = rng.choice(('', '*'))
            numbers = rng.choice(((0, 1), (1, 0), (0, 0), (0, 2)))
            first = value[:cut] if not star else "utf-8''" + value[:cut]
            return '%s*%d%s="%s"; %s*%d="%s"' % (name, numbers[0], star, first,
                                                 name, numbers[1], value[cut:])
        if choice < 0.9:
            return '%s = "%s" ' % (name.upper(), value)
        return '%s="%s"; %s="%s"' % (name, value, name, rng.choice(NAMES))

    def header(self, name, value):
        rng = self.rng
        text = '%s: %s' % (name, value)
        if self.maybe(0.08):
            text = '%s : %s' % (name, value)  # not a field to the email package: the body starts
        if self.maybe(0.1) and ';' in text:
            text = text.replace(';', ';' + self.line_end().decode() + rng.choice((' ', '\t')), 1)
        data = text.encode('utf-8', 'surrogateescape')
        if self.maybe(0.05):
            data = data.replace(b'a', b'\xe4', 1)
        return data

    def fields(self, content_type, params, name=None, cte=None, disposition=None):
        rng = self.rng
        fields = []
        if self.maybe(0.05):
            fields.append(b'From someone@example.org Mon Jan  1 00:00:00 2024')
        if content_type is not None:
            value = '; '.join([content_type] + params)
            spelling = rng.choice(('Content-Type', 'content-type', 'CONTENT-TYPE'))
            fields.append(self.header(spelling, value))
            if self.maybe(0.08):
                other = rng.choice(LEAF_TYPES + MULTIPART_TYPES)
                fields.append(self.header('Content-Type', other + '; ' +
                                          self.param('boundary', self.boundary())))
        if disposition is not None or name is not None:
            value = disposition or 'attachment'
            if name is not None:
                value += '; ' + self.param('filename', name)
            fields.append(self.header('Content-Disposition', value))
            if self.maybe(0.05):
                value = 'inline; filename="%s"' % rng.choice(NAMES)
                fields.append(self.header('Content-Disposition', value))
        if cte is not None:
            fields.append(self.header('Content-Transfer-Encoding', cte))
            if self.maybe(0.05):
                fields.append(self.header('Content-Transfer-Encoding', rng.choice(CTES)))
        if self.maybe(0.05):
            fields.append(b':no name')
        if self.maybe(0.05):
            fields.append(b' continuation without a field')
        if self.maybe(0.05):
            fields.append(b'From misplaced')
        if self.maybe(0.03):
            fields.append(b' \t ')  # a blank continuation line
        if self.maybe(0.03):
            fields.append(b'X-Long: ' + b'x' * rng.randint(100, 3000))
        if self.maybe(0.1):
            rng.shuffle(fields)
        if self.maybe(0.03):
            fields.append(b'From last-line')  # pushed back into the body
        separator = b'' if self.maybe(0.05) else self.line_end()  # a missing empty line
        return b''.join(field + self.line_end() for field in fields) + separator

    # -- bodies --------------------------------------------------------------------
    def encode(self, cte, payload):
        rng = self.rng
        kind = cte.strip().lower()
        if kind == 'base64':
            text = base64.encodebytes(payload)
            if self.maybe(0.2):
                text = text.replace(b'\n', self.line_end())
            if self.maybe(0.1):
                text = text.rstrip(b'=\n') + b'\n'  # padding missing
            if self.maybe(0.1):
                position = rng.randint(0, len(text))
                stray = rng.choice((b'!', b'=', b'==', b' ', b'*', b'A'))
                text = text[:position] + stray + text[position:]
            return text
        if kind == 'quoted-printable':
            text = quopri.encodestring(payload)
            if self.maybe(0.1):
                text += b'=4'
            return text
        if kind == 'x-uuencode':
            lines = [b'begin 644 file.bin']
            for index in range(0, len(payload), 45):
                lines.append(binascii.b2a_uu(payload[index:index + 45]).rstrip(b'\n'))
            lines += [b'`', b'end'] if not self.maybe(0.2) else []
            return self.lines(*lines)
        return payload

    def leaf(self, depth):
        rng = self.rng
        content_type = rng.choice(LEAF_TYPES) if not self.maybe(0.05) else None
        name = rng.choice(NAMES) if self.maybe(0.6) else None
        params = []
        if name is not None and self.maybe(0.3):
            params.append(self.param('name', rng.choice(NAMES) if self.maybe(0.3) else name))
            if self.maybe(0.7):
                name = None
        if self.maybe(0.1):
            params.append('charset=%s' % rng.choice(('utf-8', 'latin-1', 'nonsense', 'punycode')))
        cte = rng.choice(CTES) if self.maybe(0.8) else None
        disposition = None
        if self.maybe(0.5):
            disposition = rng.choice(('attachment', 'inline', 'Attachment', 'weird'))
        payload = rng.choice(PAYLOADS)
        body = self.encode(cte or '', payload)
        return self.fields(content_type, params, name, cte, disposition) + body

    def message(self, depth):
        rng = self.rng
        kind = rng.random()
        fields = b''
        if depth == 0 or self.maybe(0.5):
            fields = self.lines(b'From: sender@example.org',
                                b'Subject: test ' + bytes([rng.randint(33, 255)]))
        if depth < 6 and (kind < 0.45 or depth == 0 and kind < 0.85):
            return fields + self.multipart(depth)
        if depth < 6 and kind < 0.55:
            cte = rng.choice(('7bit', 'base64', 'quoted-printable', None))
            inner = self.message(depth + 1)
            body = self.encode(cte, inner) if cte else inner
            name = rng.choice(NAMES) if self.maybe(0.2) else None
            return fields + self.fields('message/rfc822', [], name, cte) + body
        if kind < 0.58:
            blocks = [self.lines(b'Reporting-MTA: dns; example.org')]
            for _ in range(rng.randint(0, 3)):
                blocks.append(self.leaf(depth + 1))
            body = self.line_end().join(blocks)
            return fields + self.fields('message/delivery-status', []) + body
        return fields + self.leaf(depth)

    def multipart(self, depth):
        rng = self.rng
        boundary = self.boundary()
        params = [self.param('boundary', boundary)] if not self.maybe(0.03) else []
        content_type = rng.choice(MULTIPART_TYPES)
        fields = self.fields(content_type, params, rng.choice(NAMES) if self.maybe(0.05) else None)
        self.boundaries.append(boundary)
        separator = b'--' + boundary.encode('utf-8')
        chunks = []
        if self.maybe(0.3):
            chunks.append(self.lines(b'This is a preamble.', separator + b'garbage'))
        parts = rng.randint(0, 5)
        for index in range(parts):
            padding = rng.choice((b'', b'', b' ', b'\t ', b'  x'))
            line = separator + padding
            if self.maybe(0.05):
                line = separator.upper() if separator.upper() != separator else separator + b'X'
            chunks.append(line + self.line_end())
            if self.maybe(0.05):
                chunks.append(separator + self.line_end())  # two boundary lines in a row
            if self.maybe(0.05):
                chunks.append(separator + b'--' + self.line_end())  # closed and then not
            child = self.message(depth + 1) if self.maybe(0.3) else self.leaf(depth + 1)
            chunks.append(child + self.line_end())
        close = separator + b'--' + rng.choice((b'', b'', b' ', b'garbage', b'--'))
        if not self.maybe(0.1):
            chunks.append(close + self.line_end())
        if self.maybe(0.2):  # an epilogue, perhaps with a part in it
            chunks.append(self.lines(b'epilogue', separator) + self.leaf(depth + 1) +
                          self.lines(b'', close))
        self.boundaries.pop()
        return fields + b''.join(chunks)

    def build(self):
        data = self.message(0)
        rng = self.rng
        if self.maybe(0.1):  # lines dropped, doubled or swapped
            lines = data.splitlines(True)
            for _ in range(rng.randint(1, 3)):
                if len(lines) > 2:
                    first, second = rng.randrange(len(lines)), rng.randrange(len(lines))
                    action = rng.random()
                    if action < 0.4:
                        del lines[first]
                    elif action < 0.7:
                        lines.insert(first, lines[second])
                    else:
                        lines[first], lines[second] = lines[second], lines[first]
            data = b''.join(lines)
        if self.maybe(0.1):
            data = data[:rng.randint(0, len(data))]  # truncated
        if self.maybe(0.1):
            data = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                if data:
                    data[rng.randrange(len(data))] = rng.choice(b'\r\n-:;"= \xff\x00')
            data = bytes(data)
        return data


def strip_eol(data):
    for end in (b'\r\n', b'\n', b'\r'):
        if data.endswith(end):
            return data[:-len(end)]
    return data


def email_view(data):
    """{(content type, matchable name or None, content head)} of the email package's
    leaves, or None when it cannot read the message at all."""
    try:
        message = email.message_from_bytes(data)
        parts = list(message.walk())
    except (RecursionError, TypeError, ValueError, LookupError, AttributeError):
        return None
    seen = set()
    for part in parts:
        if part.is_multipart():
            continue
        try:
            name = part.get_filename()
        except (TypeError, ValueError, LookupError):
            name = None  # the email package cannot tell: no name to compare
        try:
            payload = part.get_payload(decode=True)
        except ValueError:  # binascii.Error from a broken uuencoded line
            continue
        if isinstance(payload, str):
            payload = payload.encode('ascii', 'surrogateescape')
        payload = payload or b''
        name = matchable_name(name) if name else None
        seen.add((part.get_content_type(), name or None, strip_eol(payload[:HEAD_BYTES])))
    return seen


def walker_view(parts):
    found = set()
    for part in parts:
        if part.container:
            continue
        readings = [strip_eol(reading) for reading in part.decodings(HEAD_BYTES)]
        names = [None] + [matchable_name(name) or None for name in part.names]
        for reading in readings:
            for name in names:
                found.add((part.content_type, name, reading))
    return found


def describe(entry):
    content_type, name, head = entry
    return '%s %r %r' % (content_type, name, head[:60])


def test_walker_sees_everything_the_email_package_sees():
    rng = random.Random(SEED)
    limited = unreadable = 0
    slowest = 0.0
    for index in range(COUNT):
        seed = rng.randrange(2 ** 32)
        data = Generator(random.Random(seed)).build()
        started = time.process_time()
        try:
            parts = walk_message(data)
        except MimeLimitExceeded:
            limited += 1  # the plugin blocks such a message: nothing to compare
            continue
        elapsed = time.process_time() - started
        slowest = max(slowest, elapsed)
        assert elapsed < MAX_SECONDS, 'message %d (seed %d) took %.2f s' % (index, seed, elapsed)
        expected = email_view(data)
        if expected is None:
            unreadable += 1
            continue
        missing = expected - walker_view(parts)
        assert not missing, 'message %d (seed %d): the walker misses %s\n%r' % (
            index, seed, '; '.join(describe(entry) for entry in sorted(missing, key=str)),
            data[:3000])
    # the generator must exercise the comparison, not the limits
    assert limited < COUNT // 20, limited
    assert unreadable < COUNT // 20, unreadable


def test_walking_memory_is_bounded():
    """No message costs much more memory than itself (every 25th generated one)."""
    rng = random.Random(SEED + 1)
    for index in range(max(COUNT // 25, 20)):
        seed = rng.randrange(2 ** 32)
        data = Generator(random.Random(seed)).build()
        tracemalloc.start()
        try:
            try:
                for part in walk_message(data):
                    part.decodings(HEAD_BYTES)
            except MimeLimitExceeded:
                pass
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < len(data) * 3 + MAX_EXTRA_MEMORY, \
            'message %d (seed %d): %d bytes' % (index, seed, peak)


def test_the_plugin_never_fails_on_generated_messages(tmp_path):
    """An exception in the plugin is a 451 on every retry: ordinary mail deferred
    forever. Neither the check nor building a bounce may raise, whatever the mail."""
    config = make_config('[FiletypePlugin]\ncheckarchivenames = True\ncheckarchivecontent = True\n'
                         'archiveextractlevel = 3\narchive_passwords_maxbodywords = 5\n',
                         confdir=str(tmp_path))
    plugin = attachment.FiletypePlugin(config)
    template = plugin.bounce_template()
    rng = random.Random(SEED + 2)
    verdicts = set()
    for index in range(max(COUNT // 10, 50)):
        seed = rng.randrange(2 ** 32)
        data = Generator(random.Random(seed)).build()
        suspect = fuglu.Suspect('sender@example.net', ['rcpt\r@example.org'], data)
        try:
            verdict = plugin.check_message(suspect)
            attachment.build_bounce_message(config, suspect, template, {'blockinfo': 'x\r\ny'})
        except Exception:
            raise AssertionError('message %d (seed %d) raised\n%r' % (index, seed, data[:3000]))
        verdicts.add(verdict.action if verdict else None)
    assert {None, 'deny'} <= verdicts


@pytest.mark.parametrize('seed', [1, 2, 3])
def test_generator_is_deterministic_and_hostile(seed):
    """The same seed gives the same message; the corpus has what it claims to have."""
    first = Generator(random.Random(seed)).build()
    assert first == Generator(random.Random(seed)).build()
    corpus = b''.join(Generator(random.Random(seed * 1000 + index)).build() for index in range(300))
    for feature in (b'boundary*', b'filename*0', b'=?utf-8?', b'message/rfc822',
                    b'message/delivery-status', b'x-uuencode', b'\r', b'Content-Type : ',
                    b'multipart/digest', b'\xe4', b'From last-line'):
        assert feature in corpus, feature
