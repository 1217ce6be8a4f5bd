"""The esmtp connector (before-queue proxy): every client greeting, MAIL and RCPT is
answered by the downstream (a recording Sink), DATA is scanned here and sent on only
when the verdict allows it, and the client's 250 comes after the downstream's."""

import socket
import threading
import time

import pytest

from helpers import (InProcessFuglu, RawClient, Sink, VerdictFromHeaderPlugin, free_port,
                     stop_listening, stopped_at_teardown, wait_for)

PLUGIN = 'helpers.VerdictFromHeaderPlugin'

EXTENSIONS_WITH_UNPROXYABLE = ('PIPELINING', 'SIZE 10240000', 'STARTTLS', 'AUTH PLAIN LOGIN',
                               '8BITMIME',
                               'CHUNKING', 'BINARYMIME', 'DSN', 'ENHANCEDSTATUSCODES', 'SMTPUTF8',
                               'ETRN',
                               'XFORWARD NAME ADDR PROTO HELO SOURCE PORT IDENT')


@pytest.fixture
def sink():
    server = Sink(extensions=EXTENSIONS_WITH_UNPROXYABLE)
    yield server
    server.stop()


def start_proxy(sink_port, extra_main='', extra=''):
    return InProcessFuglu(sink_port, protocol='esmtp', plugins=PLUGIN, extra_main=extra_main,
                          extra=extra)


@pytest.fixture
def make_proxy():
    """start_proxy() for the test; every proxy it starts is stopped at teardown."""
    yield from stopped_at_teardown(start_proxy)


@pytest.fixture
def proxy(sink, make_proxy):
    return make_proxy(sink.port)


def message(subject='hello', verdict=None, body=b'just a test\r\n'):
    headers = b'From: a@example.org\r\nTo: b@example.org\r\nSubject: ' + subject.encode() + b'\r\n'
    if verdict:
        headers += b'X-Test-Verdict: ' + verdict.encode() + b'\r\n'
    return headers + b'\r\n' + body


def send_transaction(client, data, sender='a@example.org', recipients=('b@example.org',)):
    """MAIL, RCPT..., DATA, message; returns the final reply."""
    assert client.cmd('MAIL FROM:<%s>' % sender).startswith(b'250')
    for recipient in recipients:
        client.cmd('RCPT TO:<%s>' % recipient)
    assert client.cmd('DATA').startswith(b'354')
    client.send(data.replace(b'\r\n.', b'\r\n..') + b'.\r\n')
    return client.reply()


def test_ehlo_relays_the_downstream_greeting_with_only_proxyable_extensions(proxy, sink):
    client = RawClient(proxy.port)
    assert client.banner.startswith(b'220 ')
    reply = client.cmd('EHLO client.example.org')
    lines = reply.decode().splitlines()
    assert lines[0] == '250-sink'   # the downstream's own first line
    keywords = [line[4:].split(' ')[0] for line in lines[1:]]
    assert keywords == ['PIPELINING', 'SIZE', '8BITMIME', 'SMTPUTF8', 'DSN', 'ENHANCEDSTATUSCODES',
                        'XFORWARD']
    for hidden in ('STARTTLS', 'AUTH', 'CHUNKING', 'BINARYMIME', 'ETRN'):
        assert hidden not in reply.decode()
    # the smaller of the two size limits is announced
    assert '250-SIZE 10240000' in lines
    # the downstream was greeted with the client's own name
    assert sink.commands[0] == 'EHLO client.example.org'
    client.close()


def test_helo_is_forwarded_as_helo(proxy, sink):
    client = RawClient(proxy.port)
    assert client.cmd('HELO old.example.org') == b'250 2.0.0 Ok\r\n'   # the Sink's HELO reply
    assert sink.commands[0] == 'HELO old.example.org'
    assert send_transaction(client, message()).startswith(b'250 ')
    client.close()


def test_mail_and_rcpt_parameters_pass_unchanged_and_replies_are_the_downstreams(proxy, sink):
    sink.replies['MAIL'] = '250 2.1.0 sender fine, says the sink'
    sink.rcpt_replies['nobody@example.org'] = ('550 5.1.1 <nobody@example.org>: Recipient address '
                                               'rejected')
    client = RawClient(proxy.port)
    client.cmd('EHLO client.example.org')
    mail = 'MAIL FROM:<a@example.org> SIZE=1234 BODY=8BITMIME AUTH=<> ENVID=abc RET=HDRS'
    assert client.cmd(mail) == b'250 2.1.0 sender fine, says the sink\r\n'
    rcpt = 'RCPT TO:<b@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.org'
    assert client.cmd(rcpt) == b'250 2.1.5 Ok\r\n'
    refused = client.cmd('RCPT TO:<nobody@example.org>')
    assert refused == b'550 5.1.1 <nobody@example.org>: Recipient address rejected\r\n'
    assert mail in sink.commands
    assert rcpt in sink.commands
    assert client.cmd('DATA').startswith(b'354')
    client.send(message() + b'.\r\n')
    assert client.reply() == b'250 2.0.0 Ok: queued as ABC123DEF\r\n'
    assert wait_for(lambda: len(sink.messages) == 1)
    # the refused recipient is not part of the delivered envelope
    assert sink.messages[0]['rcpts'] == ['b@example.org']
    client.close()


def test_clean_message_is_delivered_with_fuglus_headers_before_the_clients_250(proxy, sink):
    client = RawClient(proxy.port)
    client.cmd('EHLO client.example.org')
    reply = send_transaction(client, message('clean one'))
    assert reply == b'250 2.0.0 Ok: queued as ABC123DEF\r\n'
    # the 250 came after the downstream accepted: the message is already recorded
    assert len(sink.messages) == 1
    data = sink.messages[0]['data']
    assert data.startswith(b'X-Fuglu-Spamstatus: NO\r\nX-Fuglu-Suspect: ')
    assert data.endswith(message('clean one'))
    client.close()


@pytest.mark.parametrize('verdict, expected', [
    # text from the message is never a template
    ('REJECT rejected for ${from_address}', b'550 5.7.1 rejected for ${from_address} ('),
    ('DEFER come back later', b'451 4.7.1 come back later ('),
    ('DELETE', b'250 OK ('),
])
def test_refusals_reach_the_client_and_nothing_goes_downstream(proxy, sink, verdict, expected):
    client = RawClient(proxy.port)
    client.cmd('EHLO client.example.org')
    reply = send_transaction(client, message('bad', verdict))
    assert reply.startswith(expected), reply
    assert client.cmd('NOOP') == b'250 2.0.0 Ok\r\n'
    client.cmd('QUIT')
    client.close()
    # the downstream transaction was aborted, never completed with DATA
    assert wait_for(lambda: 'QUIT' in sink.commands)
    assert sink.messages == []
    assert 'DATA' not in sink.commands
    assert 'RSET' in sink.commands


def test_downstream_refusing_the_message_is_relayed(proxy, sink):
    sink.replies['DATA'] = '554 5.7.1 not wanted downstream'
    client = RawClient(proxy.port)
    client.cmd('EHLO client.example.org')
    reply = send_transaction(client, message())
    assert reply.startswith(b'554 5.7.1 not wanted downstream (')
    client.close()


def test_several_transactions_on_one_connection(proxy, sink):
    client = RawClient(proxy.port)
    client.cmd('EHLO client.example.org')
    assert send_transaction(client, message('first')).startswith(b'250')
    assert send_transaction(client, message('second', 'REJECT no')).startswith(b'550')
    assert client.cmd('RSET') == b'250 2.0.0 Ok\r\n'
    reply = send_transaction(client, message('third'), recipients=['c@example.org'])
    assert reply.startswith(b'250')
    client.close()
    subjects = [m['data'].split(b'Subject: ')[1].split(b'\r\n')[0] for m in sink.messages]
    assert subjects == [b'first', b'third']
    assert sink.messages[1]['rcpts'] == ['c@example.org']


def test_pipelined_client_gets_the_replies_in_order(proxy, sink):
    sink.rcpt_replies['x@example.org'] = '550 5.1.1 no such user'
    client = RawClient(proxy.port)
    client.cmd('EHLO client.example.org')
    client.send('MAIL FROM:<a@example.org>\r\nRCPT TO:<x@example.org>\r\nRCPT '
                'TO:<b@example.org>\r\nDATA\r\n')
    replies = [client.reply() for _ in range(4)]
    assert [r[:3] for r in replies] == [b'250', b'550', b'250', b'354']
    client.send(message() + b'.\r\n')
    assert client.reply().startswith(b'250 ')
    client.close()


def test_ignore_multiple_recipients_forwards_only_the_first(sink, make_proxy):
    proxy = make_proxy(sink.port, extra='[esmtpconnector]\nignore_multiple_recipients=1\n')
    client = RawClient(proxy.port)
    client.cmd('EHLO client.example.org')
    assert client.cmd('MAIL FROM:<a@example.org>').startswith(b'250')
    assert client.cmd('RCPT TO:<trap1@example.org>').startswith(b'250')
    assert client.cmd('RCPT TO:<trap2@example.org>') == b'250 2.1.5 OK #2\r\n'
    assert client.cmd('RCPT TO:<trap3@example.org>') == b'250 2.1.5 OK #3\r\n'
    assert client.cmd('DATA').startswith(b'354')
    client.send(message() + b'.\r\n')
    assert client.reply().startswith(b'250 ')
    client.close()
    assert [c for c in sink.commands if c.startswith('RCPT')] == ['RCPT TO:<trap1@example.org>']
    assert sink.messages[0]['rcpts'] == ['trap1@example.org']
    sender, recipients, tags, source = VerdictFromHeaderPlugin.seen[-1]
    assert recipients == ['trap1@example.org']
    assert tags['ignored_recipients'] == ['trap2@example.org', 'trap3@example.org']


def test_queuetemplate_shapes_the_final_reply(sink, make_proxy):
    proxy = make_proxy(sink.port, extra='[esmtpconnector]\nqueuetemplate=accepted ${id}: '
                                        '${injectanswer}\n')
    client = RawClient(proxy.port)
    client.cmd('EHLO client.example.org')
    reply = send_transaction(client, message())
    assert reply.startswith(b'250 accepted ')
    assert reply.endswith(b': 2.0.0 Ok: queued as ABC123DEF\r\n')
    client.close()


def test_xforward_from_a_trusted_peer_is_used_and_passed_on(proxy, sink):
    VerdictFromHeaderPlugin.seen[:] = []
    client = RawClient(proxy.port)
    client.cmd('EHLO client.example.org')
    assert client.cmd('XFORWARD NAME=mx.example.net ADDR=192.0.2.7 '
                      'HELO=mx.example.net') == b'250 2.0.0 Ok\r\n'
    assert send_transaction(client, message()).startswith(b'250')
    client.close()
    forwarded = 'XFORWARD NAME=mx.example.net ADDR=192.0.2.7 HELO=mx.example.net'
    assert sink.commands.index(forwarded) < sink.commands.index('MAIL FROM:<a@example.org>')
    sender, recipients, tags, source = VerdictFromHeaderPlugin.seen[-1]
    assert tags['incomingport'] == proxy.port


def test_xforward_from_an_untrusted_peer_is_neither_offered_nor_accepted(sink, make_proxy):
    proxy = make_proxy(sink.port, extra_main='trusted_xforward_peers=192.0.2.0/24\n')
    client = RawClient(proxy.port)
    assert b'XFORWARD' not in client.cmd('EHLO client.example.org')
    assert client.cmd('XFORWARD ADDR=10.9.9.9').startswith(b'550')
    client.close()
    assert not [c for c in sink.commands if c.startswith('XFORWARD')]


def test_downstream_down_gives_a_temporary_failure(make_proxy):
    closed_port = free_port()
    proxy = make_proxy(closed_port)
    client = RawClient(proxy.port)
    reply = client.cmd('EHLO client.example.org')
    assert reply.startswith(b'421 4.4.1 ')
    assert b'unavailable' in reply
    assert client.reply() == b''   # and the connection is closed
    client.close()


def test_downstream_lost_before_data_gives_a_temporary_failure():
    downstream = ScriptedDownstream(['220 scripted', '250 scripted', '250 2.1.0 Ok', '250 2.1.5 Ok',
                                     None])
    proxy = start_proxy(downstream.port)
    try:
        client = RawClient(proxy.port)
        client.cmd('EHLO client.example.org')
        assert client.cmd('MAIL FROM:<a@example.org>').startswith(b'250')
        assert client.cmd('RCPT TO:<b@example.org>').startswith(b'250')
        assert client.cmd('DATA').startswith(b'354')
        client.send(message() + b'.\r\n')
        reply = client.reply()
        assert reply.startswith(b'451 4.4.2 '), reply
        client.close()
    finally:
        proxy.stop()
        downstream.stop()


class ScriptedDownstream(object):
    """One downstream connection that answers with the given reply lines in turn
    (the first is the banner) and hangs up where the script says None."""

    def __init__(self, script):
        self.listener = socket.socket()
        self.listener.bind(('127.0.0.1', 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.script = list(script)
        self.received = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        try:
            connection, _ = self.listener.accept()
        except OSError:     # stopped before fuglu connected
            return
        reader = connection.makefile('rb')
        for index, reply in enumerate(self.script):
            if reply is None:
                break
            if index:
                self.received.append(reader.readline())
            connection.sendall(reply.encode() + b'\r\n')
        connection.close()

    def stop(self):
        stop_listening(self.listener)


def test_a_silent_downstream_times_out_within_downstream_timeout():
    listener = socket.socket()
    listener.bind(('127.0.0.1', 0))
    listener.listen(5)
    held = []

    def accept_and_say_nothing_after_the_banner():
        connection, _ = listener.accept()
        held.append(connection)
        connection.sendall(b'220 slow server\r\n')

    thread = threading.Thread(target=accept_and_say_nothing_after_the_banner, daemon=True)
    thread.start()
    proxy = start_proxy(listener.getsockname()[1],
                        extra='[esmtpconnector]\ndownstream_timeout=0.2\n')
    try:
        client = RawClient(proxy.port, timeout=20)
        started = time.time()
        reply = client.cmd('EHLO client.example.org')
        elapsed = time.time() - started
        assert reply.startswith(b'421 4.4'), reply
        assert 0.15 < elapsed < 5
        client.close()
    finally:
        proxy.stop()
        for connection in held:
            connection.close()
        listener.close()


def test_message_size_limit_and_a_large_message(sink, make_proxy):
    proxy = make_proxy(sink.port, extra_main='smtp_max_message_size=3000000\n')
    client = RawClient(proxy.port)
    assert b'250-SIZE 3000000' in client.cmd('EHLO client.example.org')
    assert client.cmd('MAIL FROM:<a@example.org> SIZE=4000000').startswith(b'552 5.3.4')
    big = message(body=(b'x' * 998 + b'\r\n') * 2500)   # 2.5 MB
    assert send_transaction(client, big).startswith(b'250 ')
    assert sink.messages[0]['data'].endswith(big)
    client.close()


def test_mail_before_greeting_is_refused_locally(proxy, sink):
    client = RawClient(proxy.port)
    assert client.cmd('MAIL FROM:<a@example.org>').startswith(b'503')
    assert client.cmd('HCHK') == b'250 healthcheck\r\n'
    client.close()
    assert sink.commands == []
