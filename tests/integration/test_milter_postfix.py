"""The milter connector with real peers: a private Postfix 3.x with
`smtpd_milters = inet:127.0.0.1:PORT`, `milter_protocol = 6`,
`milter_default_action = tempfail` in front of fuglu.py running as a process, opendkim's
miltertest driving a Lua script, and raw malformed packets.

The plugin milter_test_plugins.HeaderDriven (tests/integration/plugins) does what the
message's X-Test-* headers ask, so the verdict travels inside each test message.
"""

import os
import re
import smtplib
import socket
import subprocess
import uuid

import sys

import pytest

import peers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # helpers
from helpers import RawClient  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGIN_DIR = os.path.join(HERE, 'plugins')
LUA_SCRIPT = os.path.join(HERE, 'milter_whole_message.lua')


def fuglu_config(port, mode='auto', options=''):
    return ('[main]\nincomingport=milter:127.0.0.1:%d\nplugindir=%s\n'
            'plugins=milter_test_plugins.HeaderDriven\nprependers=\nappenders=\ncontrolport=\n'
            '[performance]\nminthreads=2\nmaxthreads=20\n'
            '[milter]\nmilter_mode=%s\nmilter_mode_options=%s\n'
            % (port, PLUGIN_DIR, mode, options))


@pytest.fixture
def milter_pair(postfix_factory, fuglu_factory):
    """Call with (mode, milter_mode_options, Postfix main.cf overrides) -> (postfix,
    fuglu) wired together."""
    def create(mode='auto', options='', main_cf=None):
        port = peers.free_port()
        fuglu = fuglu_factory(fuglu_config(port, mode, options))
        postfix = postfix_factory('milter', milter_port=port, milter_default_action='tempfail',
                                  main_cf=main_cf)
        return postfix, fuglu
    return create


def unique(name):
    return '%s-%s@example.net' % (name, uuid.uuid4().hex[:8])


def message(subject, extra_headers='', body='Hello from the milter test.\r\n'):
    return ('From: sender@example.org\r\nTo: someone@example.net\r\nSubject: %s\r\n%s\r\n%s'
            % (subject, extra_headers, body)).encode()


def headers_of(raw):
    return raw.split(b'\n\n', 1)[0].decode('utf-8', 'replace')


def body_of(raw):
    return raw.split(b'\n\n', 1)[1]


def test_clean_mail_is_delivered_with_fuglu_headers(milter_pair):
    postfix, fuglu = milter_pair('auto')
    recipient = unique('clean')
    reply = postfix.send('sender@example.org', recipient, message('clean one'))
    assert reply.code == 250, reply
    delivered = postfix.wait_delivered(recipient)
    headers = headers_of(delivered)
    assert 'X-Fuglu-Spamstatus: NO' in headers
    suspect_id = re.search(r'X-Fuglu-Suspect: ([0-9a-f]{32})', headers).group(1)
    assert body_of(delivered) == b'Hello from the milter test.\n'
    # fuglu logged the suspect id together with Postfix's queue id
    queue_id = re.search(r'with ESMTP id (\w+)', headers).group(1)
    fuglu.wait_log(r'%s queueid=%s' % (suspect_id, queue_id))


def test_reject_gives_550_with_our_text_and_nothing_is_queued(milter_pair):
    postfix, fuglu = milter_pair('auto')
    recipient = unique('reject')
    reply = postfix.send('sender@example.org', recipient,
                         message('bad', 'X-Test-Verdict: REJECT blocked by the test plugin\r\n'))
    assert reply.code == 550, reply
    assert re.match(r'5\.7\.1 blocked by the test plugin \([0-9a-f]{32}\)$', reply.text), reply
    postfix.wait_log(r'milter-reject: END-OF-MESSAGE')
    assert postfix.queue_size() == 0
    assert postfix.delivered(recipient) == []


def test_defer_gives_4xx(milter_pair):
    postfix, fuglu = milter_pair('auto')
    recipient = unique('defer')
    reply = postfix.send('sender@example.org', recipient,
                         message('later', 'X-Test-Verdict: DEFER try later\r\n'))
    assert reply.code == 450, reply
    assert reply.text.startswith('4.7.1 try later ('), reply
    assert postfix.queue_size() == 0


def test_delete_is_discarded(milter_pair):
    postfix, fuglu = milter_pair('auto')
    recipient = unique('delete')
    reply = postfix.send('sender@example.org', recipient,
                         message('drop', 'X-Test-Verdict: DELETE\r\n'))
    assert reply.code == 250, reply        # the client sees success ...
    postfix.wait_log(r'milter-discard: END-OF-MESSAGE .*DISCARD')
    canary = unique('canary')               # ... but nothing arrives; a later mail does
    assert postfix.send('sender@example.org', canary, message('canary')).code == 250
    postfix.wait_delivered(canary)
    assert postfix.delivered(recipient) == []


def test_auto_mode_body_sender_and_recipient_changes_arrive(milter_pair):
    postfix, fuglu = milter_pair('auto')
    removed, kept, added = unique('removed'), unique('kept'), unique('added')
    extra = ('X-Test-Sender: changed-sender@example.org\r\nX-Test-Remove-Rcpt: %s\r\n'
             'X-Test-Add-Rcpt: %s\r\nX-Test-Body: the body fuglu wrote\r\n' % (removed, added))
    reply = postfix.send('sender@example.org', [removed, kept], message('change me', extra))
    assert reply.code == 250, reply
    for recipient in (kept, added):
        delivered = postfix.wait_delivered(recipient)
        assert headers_of(delivered).startswith('Return-Path: <changed-sender@example.org>')
        assert body_of(delivered) == b'the body fuglu wrote\n'
        assert 'X-Fuglu-Suspect:' in headers_of(delivered)
    postfix.wait_log(r'to=<%s>.*status=sent' % re.escape(added))
    assert postfix.delivered(removed) == []


def test_manual_mode_writes_an_8bit_sender_back_as_it_came(milter_pair):
    # Postfix passes 8-bit addresses as bytes when SMTPUTF8 is off; decoded with
    # 'replace', fuglu wrote the sender back as U+FFFD (CHGFROM in manual and tags modes)
    postfix, fuglu = milter_pair('manual', 'from', {'smtputf8_enable': 'no'})
    recipient = unique('eightbit')
    client = RawClient(postfix.smtp_port, timeout=30)   # smtplib refuses such an address
    assert client.cmd('EHLO client.example').startswith(b'250')
    client.send(b'MAIL FROM:<\xff\xc3\xa4@example.org>\r\n')
    assert client.reply().startswith(b'250')
    assert client.cmd('RCPT TO:<%s>' % recipient).startswith(b'250')
    assert client.cmd('DATA').startswith(b'354')
    client.send(message('eight bit sender') + b'.\r\n')
    assert client.reply().startswith(b'250')
    client.close()
    delivered = postfix.wait_delivered(recipient)
    assert delivered.startswith(b'Return-Path: <\xff\xc3\xa4@example.org>\n'), delivered[:100]


def test_two_messages_on_one_smtp_connection_keep_their_own_ids(milter_pair):
    postfix, fuglu = milter_pair('auto')
    first, second = unique('first'), unique('second')
    with smtplib.SMTP('127.0.0.1', postfix.smtp_port, local_hostname='client.fuglu-peers.test',
                      timeout=30) as smtp:
        smtp.sendmail('one@example.org', [first], message('first of two'))
        smtp.sendmail('two@example.org', [second], message('second of two'))
    results = []
    for recipient, sender in ((first, 'one@example.org'), (second, 'two@example.org')):
        headers = headers_of(postfix.wait_delivered(recipient))
        assert headers.startswith('Return-Path: <%s>' % sender)
        queue_id = re.search(r'with ESMTP id (\w+)', headers).group(1)
        suspect_id = re.search(r'X-Fuglu-Suspect: ([0-9a-f]{32})', headers).group(1)
        fuglu.wait_log(r'%s queueid=%s from=%s' % (suspect_id, queue_id, re.escape(sender)))
        results.append((queue_id, suspect_id))
    assert results[0][0] != results[1][0] and results[0][1] != results[1][1]


def test_readonly_changes_nothing(milter_pair):
    postfix, fuglu = milter_pair('readonly')
    recipient = unique('readonly')
    extra = 'X-Test-Body: must not arrive\r\nX-Test-Sender: nope@example.org\r\n'
    reply = postfix.send('sender@example.org', recipient, message('readonly', extra))
    assert reply.code == 250, reply
    delivered = postfix.wait_delivered(recipient)
    assert 'X-Fuglu' not in headers_of(delivered)
    assert headers_of(delivered).startswith('Return-Path: <sender@example.org>')
    assert body_of(delivered) == b'Hello from the milter test.\n'
    fuglu.wait_log(r'milter verdict DUNNO')


def test_miltertest_lua_script_passes(peer_packages, fuglu_factory):
    port = peers.free_port()
    fuglu_factory(fuglu_config(port, 'auto'))
    result = subprocess.run(['miltertest', '-D', 'port=%d' % port, '-s', LUA_SCRIPT],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    output = result.stdout.decode('utf-8', 'replace')
    assert result.returncode == 0, output
    assert 'miltertest: all checks passed' in output


def test_malformed_packets_close_the_connection_and_the_daemon_keeps_serving(milter_pair):
    postfix, fuglu = milter_pair('auto')
    garbage = [
        b'\x00\x00\x00\x06Zjunk!',                     # unknown command
        (64 * 1024 * 1024).to_bytes(4, 'big') + b'B',   # length above milter_max_packet_size
        b'\x00\x00\x00\x00',                            # length 0
        b'\x00\x00\x00\x40Bonly part of the packet',    # truncated, then EOF
    ]
    for data in garbage:
        with socket.create_connection(('127.0.0.1', postfix.milter_port), timeout=10) as raw:
            raw.sendall(data)
            raw.shutdown(socket.SHUT_WR)
            assert raw.recv(100) == b''          # fuglu closes (no reply, no hang)
    fuglu.wait_log(r'unknown command')
    fuglu.wait_log(r'exceeds milter_max_packet_size')
    fuglu.wait_log(r'length 0')
    fuglu.wait_log(r'connection closed inside a packet')
    assert fuglu.is_running()
    recipient = unique('after-garbage')
    assert postfix.send('sender@example.org', recipient, message('still serving')).code == 250
    postfix.wait_delivered(recipient)
