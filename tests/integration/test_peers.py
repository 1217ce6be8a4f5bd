"""Self-tests of the real-peer fixtures: each daemon starts, answers and is wired right.

The filter in the Postfix wiring tests is standin_filter.py, a small relay that takes
fuglu's command line, so these tests check the fixtures and not fuglu.
"""

import base64
import os
import subprocess
import time
import uuid

import peers

STANDIN_FILTER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'standin_filter.py')


def unique_address(label):
    return '%s-%s@example.com' % (label, uuid.uuid4().hex[:12])


def simple_message(recipient, subject, body=b'Hello from the peer self-tests.\r\n'):
    return (b'From: sender@example.org\r\n'
            b'To: ' + recipient.encode() + b'\r\n'
            b'Subject: ' + subject.encode() + b'\r\n'
            b'Message-Id: <' + uuid.uuid4().hex.encode() + b'@example.org>\r\n'
            b'\r\n' + body)


def filter_config(postfix):
    """fuglu-style config for a filter between `postfix`'s filter and re-injection ports."""
    return ('[main]\n'
            'incomingport=%d\n'
            'outgoinghost=127.0.0.1\n'
            'outgoingport=%d\n'
            'plugins=\n'
            'prependers=\n'
            'appenders=\n' % (postfix.filter_port, postfix.reinject_port))


def test_plain_postfix_delivers_smtplib_and_swaks_messages(postfix_factory):
    postfix = postfix_factory('plain')
    by_smtplib = unique_address('smtplib')
    by_swaks = unique_address('swaks')

    reply = postfix.send('sender@example.org', [by_smtplib],
                         simple_message(by_smtplib, 'via smtplib'))
    assert reply.code == 250, reply
    swaks = subprocess.run(['swaks', '--server', '127.0.0.1', '--port', str(postfix.smtp_port),
                            '--from', 'sender@example.org', '--to', by_swaks,
                            '--header', 'Subject: via swaks', '--body', 'swaks body marker'],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    assert swaks.returncode == 0, swaks.stdout.decode('utf-8', 'replace')

    delivered = postfix.wait_delivered(by_smtplib, timeout=10)
    assert b'Subject: via smtplib' in delivered
    assert b'Hello from the peer self-tests.' in delivered
    delivered = postfix.wait_delivered(by_swaks, timeout=10)
    assert b'Subject: via swaks' in delivered
    assert b'swaks body marker' in delivered
    assert postfix.queue_size() == 0
    assert 'status=sent (delivered to maildir)' in postfix.log_text()


def test_clamd_finds_eicar_via_zinstream_on_tcp_and_unix_socket(clamd):
    assert clamd.ping()
    assert clamd.scan(b'nothing to see here\n') == 'stream: OK'
    found = 'stream: %s FOUND' % peers.EICAR_SIGNATURE_NAME
    assert clamd.scan(peers.EICAR) == found
    assert clamd.scan(peers.EICAR, use_socket=True) == found

    attachment = base64.encodebytes(peers.EICAR)
    mime_mail = (b'From: a@example.org\r\nTo: b@example.com\r\nSubject: eicar\r\n'
                 b'MIME-Version: 1.0\r\n'
                 b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
                 b'--b1\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n'
                 b'--b1\r\nContent-Type: application/octet-stream\r\n'
                 b'Content-Disposition: attachment; filename="eicar.com"\r\n'
                 b'Content-Transfer-Encoding: base64\r\n\r\n' + attachment +
                 b'--b1--\r\n')
    assert clamd.scan(mime_mail) == found


def test_spamd_marks_gtube_as_spam_and_a_plain_note_as_ham(spamd):
    is_spam, score, _ = spamd.check(simple_message('b@example.com', 'test', peers.GTUBE + b'\r\n'))
    assert is_spam and score >= 1000
    is_spam, score, symbols = spamd.check(simple_message('b@example.com', 'test',
                                                         peers.GTUBE + b'\r\n'), b'SYMBOLS')
    assert is_spam and b'GTUBE' in symbols.split(b',')
    is_spam, score, _ = spamd.check(simple_message('b@example.com', 'lunch',
                                                   b'Shall we meet for lunch at noon?\r\n'))
    assert not is_spam and score < 5


def test_afterqueue_wiring_passes_mail_through_the_filter(postfix_factory, fuglu_factory):
    postfix = postfix_factory('afterqueue')
    standin = fuglu_factory(filter_config(postfix), program=STANDIN_FILTER)
    recipient = unique_address('afterqueue')

    reply = postfix.send('sender@example.org', [recipient], simple_message(recipient, 'aq'))
    assert reply.code == 250, reply
    delivered = postfix.wait_delivered(recipient, timeout=10)
    assert b'X-Standin-Filter: passed' in delivered

    pid = standin.pid
    assert standin.stop() is not None
    assert not peers.pid_is_alive(pid)


def test_afterqueue_defers_while_the_filter_is_down_and_delivers_after_flush(
        postfix_factory, fuglu_factory):
    postfix = postfix_factory('afterqueue')
    recipient = unique_address('deferred')

    reply = postfix.send('sender@example.org', [recipient], simple_message(recipient, 'later'))
    assert reply.code == 250, reply
    postfix.wait_log(r'status=deferred .*Connection refused', timeout=10)
    assert postfix.queue_size() == 1
    queue_id = reply.text.rsplit(' ', 1)[-1]
    assert postfix.queue_ids() == [queue_id]

    fuglu_factory(filter_config(postfix), program=STANDIN_FILTER)
    postfix.flush()
    delivered = postfix.wait_delivered(recipient, timeout=10)
    assert b'X-Standin-Filter: passed' in delivered
    peers.wait_until(lambda: postfix.queue_size() == 0, 10, what='empty queue')


def test_beforequeue_client_sees_the_filters_own_reply(postfix_factory, fuglu_factory):
    postfix = postfix_factory('beforequeue')
    fuglu_factory(filter_config(postfix), program=STANDIN_FILTER)
    recipient = unique_address('beforequeue')

    started = time.monotonic()
    reply = postfix.send('sender@example.org', [recipient], simple_message(recipient, 'bq'))
    assert reply == peers.SmtpReply(250, '2.0.0 Ok: relayed by stand-in')
    delivered = postfix.wait_delivered(recipient, timeout=10)
    assert b'X-Standin-Filter: passed' in delivered
    assert time.monotonic() - started < 5


def test_milter_mode_follows_milter_default_action_when_nothing_listens(postfix_factory):
    tempfail = postfix_factory('milter')
    recipient = unique_address('milter-tempfail')
    reply = tempfail.send('sender@example.org', [recipient], simple_message(recipient, 'm'))
    assert reply.code == 451, reply

    accepting = postfix_factory('milter', milter_default_action='accept')
    recipient = unique_address('milter-accept')
    reply = accepting.send('sender@example.org', [recipient], simple_message(recipient, 'm'))
    assert reply.code == 250, reply
    assert b'Subject: m' in accepting.wait_delivered(recipient, timeout=10)
