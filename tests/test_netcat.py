"""The netcat connector: a script pipes a message (optionally after an envelope
block), half-closes, and reads one `STATUS:...` reply."""

import re
import socket

import pytest

from helpers import InProcessFuglu, VerdictFromHeaderPlugin

PLUGIN = 'helpers.VerdictFromHeaderPlugin'

BANNER = (b'fuglu scanner ready - please pipe your message, (optional) include env '
          b'sender/recipient in the beginning, see documentation\r\n')

UNIX_EML = (b'From: Alice <alice@example.org>\n'
            b'To: bob@example.com\n'
            b'Subject: a Unix .eml\n'
            b'Message-ID: <netcat-1@example.org>\n'
            b'\n'
            b'Line one.\n'
            b'.a line starting with a dot\n'
            b'\n'
            b'last line without a line end')


def start_netcat(extra_main=''):
    # the downstream is never used by netcat; any port will do
    return InProcessFuglu(9, protocol='netcat', plugins=PLUGIN, extra_main=extra_main)


@pytest.fixture
def netcat():
    instance = start_netcat()
    VerdictFromHeaderPlugin.seen[:] = []
    yield instance
    instance.stop()


def pipe(port, data):
    """Banner, data, half-close, the whole reply: what `nc -N` does."""
    with socket.create_connection(('127.0.0.1', port), timeout=10) as sock:
        banner = b''
        while not banner.endswith(b'\n'):
            banner += sock.recv(1)
        assert banner == BANNER
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        reply = b''
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return reply
            reply += chunk


def block(*fields, token='tok-123', end_token=None):
    lines = [b'X-DATA-PREPEND-START: ' + token.encode()]
    lines += [('%s: %s' % field).encode() for field in fields]
    lines.append(b'X-DATA-PREPEND-END: ' + (end_token or token).encode())
    return b'\r\n'.join(lines) + b'\r\n'


def test_unix_eml_comes_back_byte_for_byte_after_the_added_headers(netcat):
    reply = pipe(netcat.port, UNIX_EML)
    match = re.match(rb'^DUNNO:X-Fuglu-Spamstatus: NO\nX-Fuglu-Suspect: ([0-9a-f]{32})\n', reply)
    assert match, reply[:200]
    assert reply[match.end():] == UNIX_EML


def test_crlf_message_comes_back_with_crlf_headers(netcat):
    crlf = UNIX_EML.replace(b'\n', b'\r\n')
    reply = pipe(netcat.port, crlf)
    match = re.match(rb'^DUNNO:X-Fuglu-Spamstatus: NO\r\nX-Fuglu-Suspect: ([0-9a-f]{32})\r\n',
                     reply)
    assert match, reply[:200]
    assert reply[match.end():] == crlf


def test_without_envelope_the_addresses_are_unknown_at_example_org(netcat):
    pipe(netcat.port, UNIX_EML)
    sender, recipients, tags, source = VerdictFromHeaderPlugin.seen[-1]
    assert sender == 'unknown@example.org'
    assert recipients == ['unknown@example.org']
    assert tags['incomingport'] == netcat.port
    assert source == UNIX_EML


def test_envelope_block_sets_sender_recipients_and_tags_and_is_removed(netcat):
    envelope = block(('X-ENV-SENDER', 'alice@example.org'), ('X-ENV-RECIPIENT', 'bob@example.com'),
                     ('X-ENV-RECIPIENT', '<carol@example.com>'), ('X-Customer', 'acme'))
    reply = pipe(netcat.port, envelope + UNIX_EML)
    assert reply.startswith(b'DUNNO:')
    assert reply.endswith(UNIX_EML)
    assert b'X-DATA-PREPEND' not in reply
    sender, recipients, tags, source = VerdictFromHeaderPlugin.seen[-1]
    assert sender == 'alice@example.org'
    assert recipients == ['bob@example.com', 'carol@example.com']
    assert tags['X-Customer'] == 'acme'
    assert tags['prepend_identifier'] == 'tok-123'
    assert source == UNIX_EML


def test_null_sender_in_the_envelope_block(netcat):
    pipe(netcat.port,
         block(('X-ENV-SENDER', '<>'), ('X-ENV-RECIPIENT', 'bob@example.com')) + UNIX_EML)
    sender, recipients, tags, source = VerdictFromHeaderPlugin.seen[-1]
    assert sender == ''
    assert recipients == ['bob@example.com']


def test_a_tag_in_the_block_cannot_replace_the_cores_tags(netcat):
    pipe(netcat.port, block(('spam', 'yes please'), ('decisions', 'none')) + UNIX_EML)
    sender, recipients, tags, source = VerdictFromHeaderPlugin.seen[-1]
    assert isinstance(tags['spam'], dict)
    assert isinstance(tags['decisions'], list)


@pytest.mark.parametrize('broken, why', [
    (b'X-DATA-PREPEND-START: tok\r\nX-ENV-SENDER: a@example.org\r\n',
     b'without its X-DATA-PREPEND-END'),
    (block(('X-ENV-SENDER', 'a@example.org'), end_token='other'), b'does not match'),
    (b'X-DATA-PREPEND-START: tok\r\nthis is no header\r\nX-DATA-PREPEND-END: tok\r\n',
     b'is not "name: value"'),
])
def test_a_broken_envelope_block_is_rejected_unscanned(netcat, broken, why):
    reply = pipe(netcat.port, broken + UNIX_EML)
    assert reply.startswith(b'REJECT:broken envelope block: ')
    assert why in reply
    assert VerdictFromHeaderPlugin.seen == []


def test_an_untrusted_peers_envelope_block_is_message_content():
    instance = start_netcat('trusted_xforward_peers=192.0.2.0/24\n')
    VerdictFromHeaderPlugin.seen[:] = []
    try:
        envelope = block(('X-ENV-SENDER', 'alice@example.org'),
                         ('X-ENV-RECIPIENT', 'bob@example.com'))
        reply = pipe(instance.port, envelope + UNIX_EML)
        assert reply.startswith(b'DUNNO:')
        sender, recipients, tags, source = VerdictFromHeaderPlugin.seen[-1]
        assert sender == 'unknown@example.org'
        assert recipients == ['unknown@example.org']
        assert 'prepend_identifier' not in tags
        assert source == envelope + UNIX_EML
        # nor is its health probe answered as one
        probe = pipe(instance.port, block(('X-HEALTHCHECK', 'true')))
        assert probe != b'DUNNO: healthcheck'
        # and a broken block from it is just content too
        assert pipe(instance.port, b'X-DATA-PREPEND-START: x\r\n' + UNIX_EML).startswith(b'DUNNO:')
    finally:
        instance.stop()


@pytest.mark.parametrize('verdict, expected', [
    ('REJECT no thanks, ${from_address}', b'REJECT:no thanks, ${from_address} ('),  # not a template
    ('DEFER busy', b'DEFER:busy ('),
    ('DELETE', b'DISCARD:OK ('),
    ('ACCEPT', b'DUNNO:X-Fuglu-Spamstatus: NO\n'),
])
def test_verdicts(netcat, verdict, expected):
    eml = b'X-Test-Verdict: ' + verdict.encode() + b'\n' + UNIX_EML
    reply = pipe(netcat.port, eml)
    assert reply.startswith(expected), reply[:200]
    if not expected.startswith(b'DUNNO'):
        assert re.search(rb'\([0-9a-f]{32}\)$', reply)


def test_health_probe_is_answered_without_scanning(netcat):
    assert pipe(netcat.port, block(('X-HEALTHCHECK', 'true'))) == b'DUNNO: healthcheck'
    assert VerdictFromHeaderPlugin.seen == []


def test_empty_input_is_rejected(netcat):
    assert pipe(netcat.port, b'') == b'REJECT:empty message'


def test_size_cap_is_its_own_option():
    instance = start_netcat('netcat_max_message_size=1000\nsmtp_max_message_size=100000\n')
    try:
        exactly_at_the_cap = UNIX_EML + b'x' * (1000 - len(UNIX_EML))
        assert pipe(instance.port, exactly_at_the_cap).startswith(b'DUNNO:')
        reply = pipe(instance.port, exactly_at_the_cap + b'x')
        assert (reply
                == b'REJECT:message exceeds 1000 octets (configured limit netcat_max_message_size)')
    finally:
        instance.stop()


def test_size_cap_defaults_to_smtp_max_message_size():
    instance = start_netcat('smtp_max_message_size=5000\n')
    try:
        exactly_at_the_cap = UNIX_EML + b'y' * (5000 - len(UNIX_EML))
        assert pipe(instance.port, exactly_at_the_cap).startswith(b'DUNNO:')
        # far over the cap: the rest is read and dropped, the reply still arrives
        assert pipe(instance.port, exactly_at_the_cap + b'\n' * 2000000).startswith(
            b'REJECT:message exceeds 5000 octets')
    finally:
        instance.stop()


def test_a_message_of_several_megabytes_round_trips(netcat):
    big = UNIX_EML + b'\n' + (b'z' * 76 + b'\n') * 60000   # ~4.6 MB
    reply = pipe(netcat.port, big)
    assert reply.startswith(b'DUNNO:')
    assert reply.endswith(big)
