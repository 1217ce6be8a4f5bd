"""fuglu's esmtp connector as a real Postfix's smtpd_proxy_filter (before-queue).

Postfix smtpd on smtp_port proxies every client to fuglu on filter_port; fuglu proxies
to the after-filter smtpd on reinject_port, which queues. What fuglu rejects is
refused while the client is still connected, and nothing is queued for it.
"""

import os
import re
import smtplib
import subprocess
import sys
import time
import uuid

import pytest

import peers

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGIN_DIR = os.path.join(HERE, 'plugins')
MESSAGE_SIZE_LIMIT = 40 * 1024 * 1024


def unique_address(label):
    return '%s-%s@example.com' % (label, uuid.uuid4().hex[:12])


def message(recipient, subject, verdict=None, body=b'Hello through the before-queue proxy.\r\n'):
    headers = (b'From: sender@example.org\r\nTo: ' + recipient.encode() + b'\r\n'
               b'Subject: ' + subject.encode() + b'\r\n'
               b'Message-Id: <' + uuid.uuid4().hex.encode() + b'@example.org>\r\n')
    if verdict:
        headers += b'X-BQ-Verdict: ' + verdict.encode() + b'\r\n'
    return headers + b'\r\n' + body


def fuglu_config(postfix, outgoing_port=None):
    return ('[main]\n'
            'incomingport=esmtp:127.0.0.1:%d\n'
            'outgoinghost=127.0.0.1\n'
            'outgoingport=%d\n'
            'plugindir=%s\n'
            'plugins=bq_verdict.BeforeQueueVerdict\n'
            'prependers=\n'
            'appenders=\n'
            'controlport=\n'
            'trusted_xforward_peers=127.0.0.1\n'
            '[performance]\n'
            'minthreads=2\n'
            'maxthreads=10\n'
            '[spam]\n'
            'defaulthighspamaction=REJECT\n'
            '[BeforeQueueVerdict]\n'
            'message=bq says no to ${from_address} about "${subject}"\n'
            % (postfix.filter_port, outgoing_port or postfix.reinject_port, PLUGIN_DIR))


@pytest.fixture
def refused_recipients_map(tmp_world_dir):
    """A texthash map the after-filter smtpd uses to refuse one recipient."""
    path = os.path.join(tmp_world_dir, 'refused_recipients')
    with open(path, 'w') as handle:
        handle.write('refused@example.com REJECT no such user behind the filter\n')
    os.chmod(path, 0o644)
    return path


@pytest.fixture
def postfix(postfix_factory, refused_recipients_map):
    return postfix_factory(
        'beforequeue',
        main_cf={'message_size_limit': str(MESSAGE_SIZE_LIMIT),
                 # a user-defined parameter: master.cf -o values cannot contain spaces
                 'fuglu_test_after_filter_recipients':
                     'check_recipient_access texthash:%s, permit_mynetworks, reject'
                     % refused_recipients_map},
        reinject_options={'smtpd_recipient_restrictions': '$fuglu_test_after_filter_recipients'})


@pytest.fixture(scope='module')
def pyz(tmp_path_factory):
    target = str(tmp_path_factory.mktemp('pyz') / 'fuglu.pyz')
    subprocess.run([sys.executable, os.path.join(peers.REPO_DIR, 'build_zipapp.py'), '-o', target],
                   check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    return target


@pytest.mark.parametrize('program', ['fuglu.py', 'fuglu.pyz'])
def test_clean_mail_is_delivered_through_fuglu(postfix, fuglu_factory, request, program):
    program_path = request.getfixturevalue('pyz') if program == 'fuglu.pyz' else None
    fuglu = fuglu_factory(fuglu_config(postfix), program=program_path)
    recipient = unique_address('clean')

    reply = postfix.send('sender@example.org', [recipient], message(recipient, 'clean mail'))

    assert reply.code == 250, reply
    # the client sees the after-filter server's own queue reply, relayed by fuglu
    assert '2.0.0 Ok: queued as' in reply.text
    delivered = postfix.wait_delivered(recipient)
    assert b'X-Fuglu-Spamstatus: NO' in delivered
    assert b'X-Fuglu-Suspect: ' in delivered
    assert b'Hello through the before-queue proxy.' in delivered
    # XFORWARD went through fuglu: the after-filter smtpd logs the original client
    queue_id = reply.text.rsplit(' ', 1)[-1]
    postfix.wait_log(r'%s: client=unknown\[127\.0\.0\.1\], '
                     r'orig_client=unknown\[127\.0\.0\.1\]' % queue_id)
    postfix.wait_log(r'disconnect from .* xforward=1 mail=1 rcpt=1 data=1')
    # and the running proxy answers its health probe, from the same program
    health = subprocess.run([sys.executable,
                             program_path or os.path.join(peers.REPO_DIR, 'fuglu.py'),
                             'healthcheck', 'esmtp', '127.0.0.1:%d' % postfix.filter_port],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    assert health.returncode == 0, health.stdout
    assert fuglu.is_running()


def test_plugin_reject_is_a_5xx_with_our_text_and_nothing_is_queued(postfix, fuglu_factory):
    fuglu_factory(fuglu_config(postfix))
    recipient = unique_address('reject')

    reply = postfix.send('spammer@example.org', [recipient],
                         message(recipient, 'buy now', verdict='DEFAULTHIGHSPAMACTION'))

    assert reply.code == 550, reply
    assert 'bq says no to spammer@example.org about "buy now"' in reply.text
    # Postfix has logged the refusal: no queue file was made, so nothing can come later
    postfix.wait_log(r'proxy-reject: END-OF-MESSAGE: 550 .*%s' % re.escape(recipient))
    assert postfix.queue_size() == 0
    assert postfix.delivered(recipient) == []


def test_plugin_defer_is_a_4xx_with_our_text(postfix, fuglu_factory):
    fuglu_factory(fuglu_config(postfix))
    recipient = unique_address('defer')

    reply = postfix.send('sender@example.org', [recipient],
                         message(recipient, 'later', verdict='DEFER'))

    assert reply.code == 451, reply
    assert 'bq says no to sender@example.org about "later"' in reply.text
    assert postfix.queue_size() == 0
    assert postfix.delivered(recipient) == []


def test_a_recipient_the_after_filter_server_refuses_is_refused_at_rcpt_time(postfix,
                                                                             fuglu_factory):
    fuglu_factory(fuglu_config(postfix))
    accepted = unique_address('accepted')

    with smtplib.SMTP('127.0.0.1', postfix.smtp_port, local_hostname='client.fuglu-peers.test',
                      timeout=30) as client:
        client.ehlo()
        assert client.mail('sender@example.org')[0] == 250
        code, text = client.rcpt('refused@example.com')
        assert code == 554 or 500 <= code < 600, (code, text)
        assert b'no such user behind the filter' in text
        assert client.rcpt(accepted)[0] == 250
        code, text = client.data(message(accepted, 'one of two recipients'))
        assert code == 250, text

    delivered = postfix.wait_delivered(accepted)
    assert b'one of two recipients' in delivered
    assert postfix.delivered('refused@example.com') == []


def test_downstream_down_gives_the_client_a_4xx(postfix, fuglu_factory):
    nothing_listens_here = peers.free_port()
    fuglu_factory(fuglu_config(postfix, outgoing_port=nothing_listens_here))
    recipient = unique_address('down')

    reply = postfix.send('sender@example.org', [recipient], message(recipient, 'nobody home'))

    assert 400 <= reply.code < 500, reply
    assert postfix.queue_size() == 0


def test_a_20_mb_message_passes(postfix, fuglu_factory):
    fuglu_factory(fuglu_config(postfix))
    recipient = unique_address('big')
    line = b'0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcd\r\n'
    body = line * (20 * 1024 * 1024 // len(line) + 1)
    big = message(recipient, 'twenty megabytes', body=body)
    assert len(big) > 20 * 1024 * 1024

    started = time.time()
    reply = postfix.send('sender@example.org', [recipient], big, timeout=120)
    elapsed = time.time() - started

    assert reply.code == 250, reply
    delivered = postfix.wait_delivered(recipient, timeout=60)
    assert len(delivered) > len(body.replace(b'\r\n', b'\n'))   # the Maildir stores LF line ends
    assert delivered.count(line.rstrip(b'\r\n')) == body.count(line)
    assert elapsed < 60   # inside the fixture's smtpd_proxy_timeout
