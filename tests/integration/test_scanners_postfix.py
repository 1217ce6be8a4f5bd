"""ClamAV and SpamAssassin through a real Postfix (after-queue content_filter) and fuglu.

Postfix -> fuglu (smtp connector, plugins clamav + spamassassin, real clamd and spamd)
-> Postfix re-injection port -> one Maildir. Messages are told apart by recipient.
"""

import os
import re
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))   # tests/: helpers

import peers  # noqa: E402
from helpers import RawClient  # noqa: E402
from peers import EICAR, GTUBE  # noqa: E402


def mail(recipient, body, subject):
    return ('From: <sender@example.org>\r\nTo: <%s>\r\nSubject: %s\r\n'
            'Date: Wed, 25 Nov 2026 06:00:00 +0000\r\nMessage-ID: <%d.%s>\r\n\r\n'
            % (recipient, subject, time.time_ns(), recipient)).encode() + body + b'\r\n'


def header_values(raw, name):
    head = raw.split(b'\r\n\r\n', 1)[0].split(b'\n\n', 1)[0]
    unfolded = re.sub(rb'\r?\n[ \t]+', b' ', head)
    return [match.group(1).decode('utf-8', 'replace').strip() for match in
            re.finditer(rb'(?im)^' + re.escape(name.encode()) + rb':[ \t]*(.*?)\r?$', unfolded)]


@pytest.fixture
def scanning_chain(chain_factory):
    """A started after-queue Postfix with fuglu (clamav, spamassassin) as its filter."""
    return chain_factory()


@pytest.fixture
def chain_factory(postfix_factory, fuglu_factory, clamd, spamd, tmp_world_dir):
    """Call with main.cf overrides for a scanning chain on such a Postfix."""
    return lambda **main_cf: start_chain(postfix_factory, fuglu_factory, clamd, spamd,
                                         tmp_world_dir, main_cf)


def start_chain(postfix_factory, fuglu_factory, clamd, spamd, tmp_world_dir, main_cf):
    postfix = postfix_factory('afterqueue', main_cf=main_cf)
    config = ('[main]\n'
              'incomingport = smtp:127.0.0.1:%d\n'
              'outgoinghost = 127.0.0.1\n'
              'outgoingport = %d\n'
              'plugins = clamav,spamassassin\n'
              'prependers =\n'
              'appenders =\n'
              'controlport = %s\n'
              '[performance]\nminthreads = 2\nmaxthreads = 10\n'
              '[ClamavPlugin]\nport = %s\n'
              '[SAPlugin]\nport = %d\n'
              % (postfix.filter_port, postfix.reinject_port,
                 os.path.join(tmp_world_dir, 'control.sock'), clamd.socket_path, spamd.port))
    fuglu_process = fuglu_factory(config, workdir=tmp_world_dir)
    return postfix, fuglu_process


def test_eicar_is_deleted_not_delivered(scanning_chain):
    postfix, fuglu_process = scanning_chain
    reply = postfix.send('sender@example.org', ['virus@example.net'],
                         mail('virus@example.net', b'attached: ' + EICAR, 'virus'))
    assert reply.code == 250, reply
    # Postfix handed it to fuglu and fuglu said 250 (DELETE = accept and drop) ...
    postfix.wait_log(r'to=<virus@example\.net>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:%d.*status=sent'
                     % postfix.filter_port, timeout=30)
    assert_virus_dropped(postfix, fuglu_process, 'virus@example.net')


def assert_virus_dropped(postfix, fuglu_process, recipient):
    """fuglu found the virus for ``recipient`` and dropped it: a later message
    arrives while the virus never does, and nothing waits in Postfix's queue."""
    fuglu_process.wait_log(r'Eicar-Test-Signature', timeout=30)
    postfix.send('sender@example.org', ['after-' + recipient],
                 mail('after-' + recipient, b'plain text', 'after'))
    postfix.wait_delivered('after-' + recipient, timeout=30)
    assert postfix.delivered(recipient) == []
    assert postfix.queue_size() == 0


def test_gtube_is_delivered_with_spam_headers(scanning_chain):
    postfix, fuglu_process = scanning_chain
    reply = postfix.send('sender@example.org', ['spam@example.net'],
                         mail('spam@example.net', GTUBE, 'spam'))
    assert reply.code == 250, reply
    delivered = postfix.wait_delivered('spam@example.net', timeout=30)
    assert header_values(delivered, 'X-Fuglu-Spamstatus') == ['YES']
    assert header_values(delivered, 'X-Spam-Flag') == ['YES']
    status = header_values(delivered, 'X-Spam-Status')
    assert status and status[0].startswith('Yes, score=') and 'GTUBE' in status[0]
    # spamd's pseudo headers stay inside fuglu
    assert b'X-Fuglu-Incomingport' not in delivered
    assert len(header_values(delivered, 'X-Fuglu-Suspect')) <= 1


def test_clean_mail_is_delivered_as_ham(scanning_chain):
    postfix, fuglu_process = scanning_chain
    body = b'Hello,\r\n\r\nthe meeting moves to Thursday at ten.\r\n\r\nRegards, Sam'
    reply = postfix.send('sender@example.org', ['clean@example.net'],
                         mail('clean@example.net', body, 'meeting'))
    assert reply.code == 250, reply
    delivered = postfix.wait_delivered('clean@example.net', timeout=30)
    assert header_values(delivered, 'X-Fuglu-Spamstatus') == ['NO']
    status = header_values(delivered, 'X-Spam-Status')
    assert status and status[0].startswith('No, score=')
    assert body.replace(b'\r\n', b'\n') in delivered  # the Maildir stores LF line ends
    assert b'X-Fuglu-Incomingport' not in delivered


def test_eicar_from_an_8bit_sender_is_deleted_not_delivered(chain_factory):
    # MAIL FROM:<\xff...> once crashed the clamav plugin, which fuglu skipped: a 250
    # and the virus delivered unscanned. Postfix takes such bytes from anyone when
    # SMTPUTF8 is off (compatibility_level < 1, or set so), and from local senders.
    postfix, fuglu_process = chain_factory(smtputf8_enable='no')
    client = RawClient(postfix.smtp_port, timeout=30)   # smtplib refuses such an address
    replies = [client.cmd('EHLO client.example')]
    client.send(b'MAIL FROM:<\xff\xfe@example.org>\r\n')
    replies += [client.reply(), client.cmd('RCPT TO:<virus8@example.net>'), client.cmd('DATA')]
    client.send(mail('virus8@example.net', b'attached: ' + EICAR, 'virus') + b'.\r\n')
    replies.append(client.reply())
    client.close()
    assert [reply[:1] for reply in replies] == [b'2', b'2', b'2', b'3', b'2'], replies
    assert_virus_dropped(postfix, fuglu_process, 'virus8@example.net')
