"""The smtp (after-queue) connector, spoken to byte by byte: an in-process fuglu between
a raw client and a recording downstream (helpers.Sink)."""

import re
import socket
import time

import pytest

from helpers import (InProcessFuglu, RawClient, Sink, fuglu, free_port, settle, stopped_at_teardown,
                     wait_for)

MESSAGE = (b'From: Alice <alice@example.org>\r\n'
           b'To: Bob <bob@example.com>\r\n'
           b'Subject: test message\r\n'
           b'Message-ID: <1234@example.org>\r\n'
           b'\r\n'
           b'Hello Bob,\r\n'
           b'this is the body.\r\n')

ADDED_HEADER_RE = re.compile(rb'^X-Fuglu-[A-Za-z]+: [^\r\n]*\r\n')


def split_added_headers(data):
    """(the headers fuglu prepended, the rest of the delivered message)."""
    added = b''
    while True:
        match = ADDED_HEADER_RE.match(data)
        if not match:
            return added, data
        added += match.group(0)
        data = data[match.end():]


def stuff(message):
    """Dot-stuffed DATA payload with terminator, as a client sends it."""
    lines = message.split(b'\r\n')
    payload = b'\r\n'.join(b'.' + line if line.startswith(b'.') else line for line in lines)
    if not payload.endswith(b'\r\n'):
        payload += b'\r\n'
    return payload + b'.\r\n'


class Recording(fuglu.ScannerPlugin):
    """Remembers every suspect it saw; answers what the test sets in `result`."""

    def __init__(self, config, section=None):
        super().__init__(config, section)
        self.seen = []
        self.result = fuglu.DUNNO
        self.tags = {}

    def examine(self, suspect):
        self.seen.append(suspect)
        suspect.tags.update(self.tags)
        return self.result


@pytest.fixture
def sink():
    downstream = Sink()
    yield downstream
    downstream.stop()


@pytest.fixture
def make_fuglu():
    def create(downstream_port, extra_main='', extra=''):
        instance = InProcessFuglu(downstream_port, extra_main=extra_main, extra=extra)
        instance.plugin = Recording(instance.config)
        instance.controller.plugins = [instance.plugin]
        return instance
    yield from stopped_at_teardown(create)


@pytest.fixture
def server(sink, make_fuglu):
    return make_fuglu(sink.port)


@pytest.fixture
def clients():
    opened = []

    def connect(port):
        client = RawClient(port)
        opened.append(client)
        return client
    yield connect
    for client in opened:
        client.close()


def code(reply):
    return int(reply[:3])


def transaction(client, message=MESSAGE, sender='alice@example.org',
                recipients=('bob@example.com',),
                payload=None):
    """MAIL, RCPT..., DATA, message; returns the final reply (asserts the steps before)."""
    reply = client.cmd('MAIL FROM:<%s>' % sender)
    assert reply.startswith(b'250 '), reply
    for recipient in recipients:
        reply = client.cmd('RCPT TO:<%s>' % recipient)
        assert reply.startswith(b'250 '), reply
    reply = client.cmd('DATA')
    assert reply.startswith(b'354 '), reply
    client.send(payload if payload is not None else stuff(message))
    return client.reply()


def delivered_body(sink, index=0):
    assert wait_for(lambda: len(sink.messages) > index), 'nothing delivered'
    return split_added_headers(sink.messages[index]['data'])[1]


def ehlo(client, name='client.example'):
    reply = client.cmd('EHLO ' + name)
    assert reply.startswith(b'250'), reply
    return reply


# -- greeting and EHLO ----------------------------------------------------------------

def test_banner(server, clients):
    client = clients(server.port)
    assert re.match(rb'^220 [^\r\n]*\r\n$', client.banner), client.banner


def test_ehlo_is_multiline_crlf_with_the_extensions(server, clients):
    client = clients(server.port)
    reply = client.cmd('EHLO postfix.example')
    assert reply.count(b'\n') == reply.count(b'\r\n'), 'bare LF in %r' % reply
    lines = reply.split(b'\r\n')[:-1]
    assert all(line.startswith(b'250-') for line in lines[:-1]), reply
    assert lines[-1].startswith(b'250 ')
    keywords = [line[4:] for line in lines[1:]]
    for extension in (b'PIPELINING', b'8BITMIME', b'SMTPUTF8', b'SIZE 268435456'):
        assert extension in keywords, reply
    assert any(k.startswith(b'XFORWARD ') and b'ADDR' in k.split() for k in keywords), reply


def test_size_announces_the_configured_limit(sink, make_fuglu, clients):
    instance = make_fuglu(sink.port, extra_main='smtp_max_message_size = 12345\n')
    reply = clients(instance.port).cmd('EHLO x')
    assert b'250-SIZE 12345\r\n' in reply or b'250 SIZE 12345\r\n' in reply, reply


def test_xforward_only_for_trusted_peers(sink, make_fuglu, clients):
    instance = make_fuglu(sink.port, extra_main='trusted_xforward_peers = 192.0.2.0/24\n')
    client = clients(instance.port)
    reply = client.cmd('EHLO x')
    assert b'XFORWARD' not in reply
    reply = client.cmd('XFORWARD ADDR=198.51.100.1 NAME=evil.example')
    assert reply[:1] == b'5', reply
    assert transaction(client).startswith(b'250 ')
    assert not any(c.upper().startswith('XFORWARD') for c in sink.commands)
    assert instance.plugin.seen[0].clientinfo is None


def test_helo(server, sink, clients):
    client = clients(server.port)
    assert client.cmd('HELO client.example').startswith(b'250 ')
    assert transaction(client).startswith(b'250 ')
    assert delivered_body(sink) == MESSAGE


def test_commands_in_the_wrong_order(server, clients):
    client = clients(server.port)
    assert code(client.cmd('MAIL FROM:<a@example.org>')) == 503
    ehlo(client)
    assert code(client.cmd('RCPT TO:<b@example.com>')) == 503
    assert code(client.cmd('DATA')) == 503
    assert code(client.cmd('MAIL FROM:<a@example.org>')) == 250
    assert code(client.cmd('MAIL FROM:<a@example.org>')) == 503
    assert code(client.cmd('DATA')) == 503
    assert code(client.cmd('EHLO')) == 501
    assert code(client.cmd('MAIL TO:<a@example.org>')) in (501, 503)


# -- pipelining and the DATA phase ----------------------------------------------------

def test_pipelined_commands_in_one_send(server, sink, clients):
    client = clients(server.port)
    client.send(b'EHLO client.example\r\nMAIL FROM:<alice@example.org>\r\n'
                b'RCPT TO:<bob@example.com>\r\nRCPT TO:<carol@example.com>\r\nDATA\r\n')
    replies = [client.reply() for _ in range(5)]
    assert replies[0].startswith(b'250-')
    assert [code(r) for r in replies[1:]] == [250, 250, 250, 354], replies
    client.send(stuff(MESSAGE) + b'QUIT\r\n')
    assert code(client.reply()) == 250
    assert code(client.reply()) == 221
    assert delivered_body(sink) == MESSAGE
    assert sink.messages[0]['rcpts'] == ['bob@example.com', 'carol@example.com']


def test_whole_transaction_after_ehlo_in_one_send(server, sink, clients):
    client = clients(server.port)
    ehlo(client)
    client.send(b'RSET\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n')
    assert [code(client.reply()) for _ in range(4)] == [250, 250, 250, 354]
    client.send(stuff(MESSAGE) + b'MAIL FROM:<second@example.org>\r\nRCPT '
                                 b'TO:<bob@example.com>\r\nDATA\r\n')
    assert [code(client.reply()) for _ in range(4)] == [250, 250, 250, 354]
    client.send(stuff(MESSAGE.replace(b'test message', b'second')))
    assert code(client.reply()) == 250
    assert wait_for(lambda: len(sink.messages) == 2)
    assert delivered_body(sink, 1) == MESSAGE.replace(b'test message', b'second')


def test_dot_lines_are_unstuffed_and_stuffed_again(server, sink, clients):
    message = (b'Subject: dots\r\n\r\n'
               b'.\r\n'
               b'..\r\n'
               b'...\r\n'
               b'.leading dot\r\n'
               b'middle . dot\r\n'
               b' .space first\r\n'
               b'.\r\n'
               b'end\r\n')
    client = clients(server.port)
    ehlo(client)
    payload = (b'Subject: dots\r\n\r\n'
               b'..\r\n'
               b'...\r\n'
               b'....\r\n'
               b'..leading dot\r\n'
               b'middle . dot\r\n'
               b' .space first\r\n'
               b'..\r\n'
               b'end\r\n'
               b'.\r\n')
    assert code(transaction(client, payload=payload)) == 250
    assert delivered_body(sink) == message
    # what went over the wire downstream was stuffed again
    assert b'\r\n..\r\n...\r\n....\r\n..leading dot\r\n' in sink.messages[0]['raw']


def test_message_starting_with_a_dot_line(server, sink, clients):
    client = clients(server.port)
    ehlo(client)
    payload = b'..starts with a dot\r\nSubject: x\r\n\r\nbody\r\n.\r\n'
    assert code(transaction(client, payload=payload)) == 250
    assert delivered_body(sink) == b'.starts with a dot\r\nSubject: x\r\n\r\nbody\r\n'


def test_empty_message_is_only_the_terminator(server, sink, clients):
    client = clients(server.port)
    ehlo(client)
    assert code(transaction(client, payload=b'.\r\n')) == 250
    added, rest = split_added_headers(delivered_body_raw(sink))
    assert rest == b''
    assert b'X-Fuglu-Suspect: ' in added


def delivered_body_raw(sink, index=0):
    assert wait_for(lambda: len(sink.messages) > index), 'nothing delivered'
    return sink.messages[index]['data']


def test_last_line_without_crlf_gets_the_crlf_of_the_terminator(server, sink, clients):
    client = clients(server.port)
    ehlo(client)
    # the CRLF before "." belongs to the last line (RFC 5321 4.1.1.4)
    assert code(transaction(client, payload=b'Subject: x\r\n\r\nno newline at the '
                                            b'end\r\n.\r\n')) == 250
    assert delivered_body(sink) == b'Subject: x\r\n\r\nno newline at the end\r\n'


@pytest.mark.parametrize('pieces', [
    [b'Subject: split\r\n\r\nbody\r\n', b'.\r\n'],
    [b'Subject: split\r\n\r\nbody\r\n.', b'\r\n'],
    [b'Subject: split\r\n\r\nbody\r', b'\n.\r\n'],
    [b'Subject: split\r\n\r\nbody', b'\r\n.', b'\r', b'\n'],
])
def test_terminator_split_over_several_sends(server, sink, clients, pieces):
    client = clients(server.port)
    ehlo(client)
    for line in ('MAIL FROM:<a@example.org>', 'RCPT TO:<b@example.com>', 'DATA'):
        assert code(client.cmd(line)) in (250, 354)
    for piece in pieces:
        client.send(piece)
        time.sleep(0.01)   # pacing, not waiting: each piece its own packet (TCP_NODELAY)
    assert code(client.reply()) == 250
    assert delivered_body(sink) == b'Subject: split\r\n\r\nbody\r\n'


def test_long_lines_are_kept_intact(server, sink, clients):
    long_header = b'X-Long: ' + b'h' * 3000 + b'\r\n'
    long_body = b'b' * 20000 + b'\r\n'
    message = (b'Subject: long\r\n' + long_header + b'\r\n' + long_body + b'short\r\n' + b'.' + b'x'
               * 5000 + b'\r\n')
    client = clients(server.port)
    ehlo(client)
    assert code(transaction(client, message)) == 250
    assert delivered_body(sink) == message


@pytest.mark.parametrize('limit,length', [
    (4096, 10000),        # the whole message arrives in one read
    (100000, 400000),     # the line spans many reads
])
def test_line_over_the_data_line_limit_is_refused(sink, make_fuglu, clients, limit, length):
    instance = make_fuglu(sink.port, extra_main='smtp_data_line_limit = %d\n' % limit)
    client = clients(instance.port)
    ehlo(client)
    reply = transaction(client, b'Subject: too long\r\n\r\n' + b'x' * length + b'\r\n')
    assert code(reply) == 552, reply
    assert b'smtp_data_line_limit' in reply
    # the session goes on: the next message is fine
    assert code(transaction(client, MESSAGE)) == 250
    assert client.cmd('QUIT').startswith(b'221')
    settle(instance, sink)
    assert len(sink.messages) == 1
    assert delivered_body(sink) == MESSAGE


@pytest.mark.parametrize('message', [
    b'Subject: nul\r\n\r\nbefore\x00after\r\n\x00\x00\r\n',
    b'Subject: bare lf\r\n\r\nline one\nline two\r\nline three\n\r\nend\r\n',
], ids=['nul-bytes', 'bare-lf'])
def test_unusual_body_bytes_are_passed_through_unchanged(server, sink, clients, message):
    client = clients(server.port)
    ehlo(client)
    assert code(transaction(client, message)) == 250
    assert delivered_body(sink) == message


def test_nul_in_a_command_is_refused(server, clients):
    client = clients(server.port)
    ehlo(client)
    assert code(client.cmd('NOOP\x00')) == 500
    assert code(client.cmd('MAIL FROM:<a\x00b@example.org>')) == 500
    assert code(client.cmd('NOOP')) == 250


def test_only_crlf_dot_crlf_ends_the_data_no_smuggling(make_fuglu, clients):
    # a downstream that, like Postfix, ends lines at LF and accepts "." LF as end of data
    downstream = Sink(postfix_like=True)
    try:
        instance = make_fuglu(downstream.port)
        message = (b'Subject: smuggling\r\n\r\nbody\n.\nMAIL FROM:<lf@evil.example>\r\n'
                   b'RCPT TO:<victim@example.com>\r\nDATA\r\nfake 1\r\nx\n.\r\n'
                   b'MAIL FROM:<lfcrlf@evil.example>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n'
                   b'fake 2\r\ny\r\n.\nMAIL FROM:<crlflf@evil.example>\r\n'
                   b'RCPT TO:<victim@example.com>\r\nDATA\r\nfake 3\r\nz\r.\r\nend\r\n')
        client = clients(instance.port)
        ehlo(client)
        reply = transaction(client, message)
        assert code(reply) == 250, reply
        # one reply for one message: nothing after the fake terminators was a command
        client.send(b'NOOP\r\n')
        assert code(client.reply()) == 250
        assert client.cmd('QUIT').startswith(b'221')
        settle(instance, downstream)
        assert len(downstream.messages) == 1, [m['mail'] for m in downstream.messages]
        assert split_added_headers(downstream.messages[0]['data'])[1] == message
        assert len(instance.plugin.seen) == 1
        assert instance.plugin.seen[0].get_source() == message
        assert not any('evil' in command for command in downstream.commands)
    finally:
        downstream.stop()


def test_8bit_and_utf8_headers_are_byte_identical(server, sink, clients):
    message = ('From: Jörg Müller <joerg@example.org>\r\n'
               'To: Zoë <zoe@example.com>\r\n'
               'Subject: Grüße – ünïcödé ✓ 日本語\r\n'
               'MIME-Version: 1.0\r\n'
               'Content-Type: text/plain; charset=utf-8\r\n'
               'Content-Transfer-Encoding: 8bit\r\n'
               '\r\n'
               'Schöne Grüße aus Zürich 🙂\r\n').encode('utf-8') + \
        b'X-Latin1-In-Body: caf\xe9 \xff\xfe\x80\r\n'
    message = message.replace(b'MIME-Version', b'X-Raw-8bit: \xe9t\xe9 \xa4\r\nMIME-Version')
    client = clients(server.port)
    ehlo(client)
    reply = client.cmd('MAIL FROM:<joerg@example.org> BODY=8BITMIME')
    assert code(reply) == 250
    assert code(client.cmd('RCPT TO:<zoe@example.com>')) == 250
    assert code(client.cmd('DATA')) == 354
    client.send(stuff(message))
    assert code(client.reply()) == 250
    added, rest = split_added_headers(delivered_body_raw(sink))
    assert rest == message
    assert added.startswith(b'X-Fuglu-Spamstatus: NO\r\nX-Fuglu-Suspect: ')
    assert 'BODY=8BITMIME' in sink.messages[0]['mail']


def test_smtputf8_sender_and_recipient(server, sink, clients):
    sender = 'jörg@exämple.org'
    recipient = '用户@例子.example'
    message = ('From: %s\r\nTo: %s\r\nSubject: ✓\r\n\r\nbody\r\n'
               % (sender, recipient)).encode('utf-8')
    client = clients(server.port)
    ehlo(client)
    assert code(client.cmd('MAIL FROM:<%s> SMTPUTF8 BODY=8BITMIME' % sender)) == 250
    assert code(client.cmd('RCPT TO:<%s>' % recipient)) == 250
    assert code(client.cmd('DATA')) == 354
    client.send(stuff(message))
    assert code(client.reply()) == 250
    assert delivered_body(sink) == message
    mail = sink.messages[0]['mail']
    assert mail.startswith('MAIL FROM:<%s>' % sender) and 'SMTPUTF8' in mail.split(), mail
    assert sink.messages[0]['rcpts'] == [recipient]
    suspect = server.plugin.seen[0]
    assert (suspect.from_address, suspect.recipients) == (sender, [recipient])
    assert 'SMTPUTF8' in suspect.smtp_options


# -- limits and garbage ---------------------------------------------------------------

def test_size_parameter_over_the_limit_is_refused_at_mail(sink, make_fuglu, clients):
    instance = make_fuglu(sink.port, extra_main='smtp_max_message_size = 10000\n')
    client = clients(instance.port)
    ehlo(client)
    reply = client.cmd('MAIL FROM:<a@example.org> SIZE=10001')
    assert code(reply) == 552, reply
    assert b'5.3.4' in reply
    assert code(client.cmd('MAIL FROM:<a@example.org> SIZE=abc')) == 501
    assert code(client.cmd('MAIL FROM:<a@example.org> SIZE=10000')) == 250


def test_message_over_the_size_limit_is_refused_after_data(sink, make_fuglu, clients):
    instance = make_fuglu(sink.port, extra_main='smtp_max_message_size = 10000\n')
    client = clients(instance.port)
    ehlo(client)
    big = b'Subject: big\r\n\r\n' + (b'y' * 98 + b'\r\n') * 200
    reply = transaction(client, big)
    assert code(reply) == 552, reply
    bigger = b'Subject: bigger\r\n\r\n' + (b'z' * 998 + b'\r\n') * 1000
    assert code(transaction(client, bigger)) == 552
    just_fits = b'Subject: fits\r\n\r\n' + b'f' * (10000 - 19) + b'\r\n'
    assert len(just_fits) == 10000
    assert code(transaction(client, just_fits)) == 250
    assert wait_for(lambda: len(sink.messages) == 1)
    assert delivered_body(sink) == just_fits
    assert len(instance.plugin.seen) == 1


def test_command_line_too_long(server, clients):
    client = clients(server.port)
    ehlo(client)
    reply = client.cmd('NOOP ' + 'x' * 3000)
    assert code(reply) == 500, reply
    assert b'smtp_command_line_limit' in reply
    assert client.reply() == b''     # closed


def test_unknown_and_unimplemented_commands(server, clients):
    client = clients(server.port)
    assert code(client.cmd('FOO bar')) == 500
    assert code(client.cmd('12345')) == 500
    assert code(client.cmd('\xe9\xe9')) == 500
    assert code(client.cmd('STARTTLS')) == 502
    assert code(client.cmd('AUTH PLAIN AGFsaWNlAHNlY3JldA==')) == 502
    assert code(client.cmd('EXPN staff')) == 502
    assert code(client.cmd('NOOP')) == 250
    assert code(client.cmd('VRFY bob')) in (252, 502)


def test_too_many_errors_close_the_connection(server, clients):
    client = clients(server.port)
    client.send(b'GARBAGE\r\n' * 40)
    replies = []
    while True:
        reply = client.reply()
        if not reply:
            break
        replies.append(code(reply))
    assert replies[-1] == 421, replies
    assert set(replies[:-1]) == {500}
    assert 5 <= len(replies) < 40


def test_rset_and_several_transactions_without_a_new_ehlo(server, sink, clients):
    client = clients(server.port)
    ehlo(client)
    assert code(transaction(client, MESSAGE, sender='one@example.org')) == 250
    assert code(transaction(client, MESSAGE, sender='two@example.org')) == 250
    assert code(client.cmd('MAIL FROM:<aborted@example.org>')) == 250
    assert code(client.cmd('RCPT TO:<bob@example.com>')) == 250
    assert code(client.cmd('RSET')) == 250
    assert code(transaction(client, MESSAGE, sender='three@example.org')) == 250
    assert code(client.cmd('NOOP')) == 250
    quit_reply = client.cmd('QUIT')
    assert code(quit_reply) == 221
    assert client.reply() == b''
    assert wait_for(lambda: len(sink.messages) == 3)
    senders = [m['mail'] for m in sink.messages]
    assert senders == ['MAIL FROM:<one@example.org>', 'MAIL FROM:<two@example.org>',
                       'MAIL FROM:<three@example.org>'], senders
    assert all(split_added_headers(m['data'])[1] == MESSAGE for m in sink.messages)
    ids = {s.id for s in server.plugin.seen}
    assert len(ids) == 3


# -- what goes downstream -------------------------------------------------------------

def test_xforward_goes_downstream_with_the_original_client(server, sink, clients):
    client = clients(server.port)
    ehlo(client)
    assert code(client.cmd('XFORWARD NAME=client.example ADDR=192.0.2.1 PORT=4711 '
                           'PROTO=ESMTP')) == 250
    assert code(client.cmd('XFORWARD HELO=client.helo IDENT=4XyZ123 SOURCE=REMOTE')) == 250
    assert code(transaction(client)) == 250
    assert wait_for(lambda: sink.messages)
    mail_index = next(i for i, c in enumerate(sink.commands) if c.startswith('MAIL'))
    forwarded = ' '.join(c for c in sink.commands[:mail_index] if c.startswith('XFORWARD'))
    for attribute in ('NAME=client.example', 'ADDR=192.0.2.1', 'PORT=4711', 'PROTO=ESMTP',
                      'HELO=client.helo',
                      'IDENT=4XyZ123', 'SOURCE=REMOTE'):
        assert attribute in forwarded.split(), forwarded
    suspect = server.plugin.seen[0]
    assert suspect.clientinfo == ('client.helo', '192.0.2.1', 'client.example')
    assert suspect.queue_id == '4XyZ123'


def test_xforward_inside_a_transaction_is_refused(server, clients):
    client = clients(server.port)
    ehlo(client)
    assert code(client.cmd('MAIL FROM:<a@example.org>')) == 250
    assert code(client.cmd('XFORWARD ADDR=192.0.2.1')) == 503
    assert code(client.cmd('RSET')) == 250
    assert code(client.cmd('XFORWARD BOGUS=1')) == 501


def test_mail_and_rcpt_parameters_are_carried_over(server, sink, clients):
    client = clients(server.port)
    ehlo(client)
    assert code(client.cmd('MAIL FROM:<alice@example.org> BODY=8BITMIME SIZE=%d RET=HDRS '
                           'ENVID=QQ314159'
                           % len(MESSAGE))) == 250
    assert code(client.cmd('RCPT TO:<bob@example.com> NOTIFY=SUCCESS,FAILURE '
                           'ORCPT=rfc822;bob@example.com')) == 250
    assert code(client.cmd('DATA')) == 354
    client.send(stuff(MESSAGE))
    assert code(client.reply()) == 250
    assert wait_for(lambda: sink.messages)
    mail = sink.messages[0]['mail'].split()
    for parameter in ('BODY=8BITMIME', 'RET=HDRS', 'ENVID=QQ314159'):
        assert parameter in mail, mail
    assert any(p.startswith('SIZE=') for p in mail)
    rcpt = next(c for c in sink.commands if c.startswith('RCPT'))
    assert ('NOTIFY=SUCCESS,FAILURE' in rcpt.split() and 'ORCPT=rfc822;bob@example.com'
            in rcpt.split())


def test_a_recipient_refused_downstream_is_refused_to_the_client(server, sink, clients):
    sink.rcpt_replies['nobody@example.com'] = ('550 5.1.1 <nobody@example.com>: Recipient address '
                                               'rejected')
    sink.rcpt_replies['full@example.com'] = '452 4.2.2 <full@example.com>: Mailbox full'
    client = clients(server.port)
    ehlo(client)
    assert code(client.cmd('MAIL FROM:<alice@example.org>')) == 250
    assert code(client.cmd('RCPT TO:<bob@example.com>')) == 250
    reply = client.cmd('RCPT TO:<nobody@example.com>')
    assert reply == b'550 5.1.1 <nobody@example.com>: Recipient address rejected\r\n'
    reply = client.cmd('RCPT TO:<full@example.com>')
    assert reply == b'452 4.2.2 <full@example.com>: Mailbox full\r\n'
    assert code(client.cmd('RCPT TO:<carol@example.com>')) == 250
    assert code(client.cmd('DATA')) == 354
    client.send(stuff(MESSAGE))
    assert code(client.reply()) == 250
    assert wait_for(lambda: sink.messages)
    assert sink.messages[0]['rcpts'] == ['bob@example.com', 'carol@example.com']
    assert server.plugin.seen[0].recipients == ['bob@example.com', 'carol@example.com']


def test_all_recipients_refused_then_data_is_refused(server, sink, clients):
    sink.rcpt_replies['nobody@example.com'] = '550 5.1.1 no such user'
    client = clients(server.port)
    ehlo(client)
    assert code(client.cmd('MAIL FROM:<alice@example.org>')) == 250
    assert code(client.cmd('RCPT TO:<nobody@example.com>')) == 550
    reply = client.cmd('DATA')
    assert reply[:1] == b'5' and code(reply) != 354, reply


@pytest.mark.parametrize('downstream_reply,expected_class', [
    ('452 4.3.1 Insufficient system storage', b'4'),
    ('554 5.7.1 Message refused by downstream policy', b'5'),
])
def test_downstream_refusal_at_data_comes_back_in_the_same_class(server, sink, clients,
                                                                 downstream_reply,
                                                                   expected_class):
    sink.replies['DATA'] = downstream_reply
    client = clients(server.port)
    ehlo(client)
    reply = transaction(client)
    assert reply[:1] == expected_class, reply
    assert downstream_reply.split(' ', 2)[2].encode() in reply
    assert server.plugin.seen[0].id.encode() in reply


def test_downstream_refusal_at_mail(server, sink, clients):
    sink.replies['MAIL'] = '451 4.3.0 Temporary lookup failure'
    client = clients(server.port)
    ehlo(client)
    reply = client.cmd('MAIL FROM:<alice@example.org>')
    assert reply == b'451 4.3.0 Temporary lookup failure\r\n'


def test_downstream_down_gives_451_never_250(make_fuglu, clients):
    instance = make_fuglu(free_port())      # nothing listens there
    client = clients(instance.port)
    ehlo(client)
    replies = [client.cmd('MAIL FROM:<alice@example.org>')]
    if code(replies[-1]) == 250:
        replies.append(client.cmd('RCPT TO:<bob@example.com>'))
        replies.append(client.cmd('DATA'))
        if code(replies[-1]) == 354:
            client.send(stuff(MESSAGE))
            replies.append(client.reply())
    assert code(replies[-1]) == 451, replies
    # the connection is still usable and keeps saying 451
    assert code(client.cmd('NOOP')) == 250


def test_downstream_closes_during_data_gives_4xx(make_fuglu, clients):
    # a downstream that accepts the envelope and then hangs up instead of answering DATA
    listener = socket.socket()
    listener.bind(('127.0.0.1', 0))
    listener.listen(5)
    listener.settimeout(10)
    import threading

    def fake_server():
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        reader = conn.makefile('rb')
        conn.sendall(b'220 fake\r\n')
        while True:
            line = reader.readline()
            if not line:
                break
            verb = line[:4].upper()
            if verb == b'EHLO':
                conn.sendall(b'250-fake\r\n250 PIPELINING\r\n')
            elif verb == b'DATA':
                conn.sendall(b'354 go\r\n')
                reader.readline()
                break
            else:
                conn.sendall(b'250 ok\r\n')
        conn.close()
    thread = threading.Thread(target=fake_server, daemon=True)
    thread.start()
    try:
        instance = make_fuglu(listener.getsockname()[1])
        client = clients(instance.port)
        ehlo(client)
        reply = transaction(client)
        assert reply[:1] == b'4', reply
    finally:
        listener.close()


# -- plugin decisions -----------------------------------------------------------------

@pytest.mark.parametrize('action,expected', [
    (fuglu.DELETE, b'250 deleted for ${from_address}'),
    (fuglu.REJECT, b'550 5.7.1 deleted for ${from_address}'),
    (fuglu.DEFER, b'451 4.7.1 deleted for ${from_address}'),
])
def test_plugin_decisions_are_sent_as_they_are_with_the_id(server, sink, clients, action, expected):
    server.plugin.result = (action, 'deleted for ${from_address}')
    client = clients(server.port)
    ehlo(client)
    reply = transaction(client)
    suspect_id = server.plugin.seen[0].id
    assert reply == expected + b' (' + suspect_id.encode() + b')\r\n'
    # the next message in the same session is delivered again, and alone
    server.plugin.result = fuglu.DUNNO
    assert code(transaction(client)) == 250
    assert client.cmd('QUIT').startswith(b'221')
    settle(server, sink)
    assert len(sink.messages) == 1
    assert delivered_body(sink) == MESSAGE


def test_plugin_refusal_defaults_and_enhanced_codes(sink, make_fuglu, clients):
    instance = make_fuglu(sink.port, extra_main='suspectidreturn = 0\n')
    client = clients(instance.port)
    ehlo(client)
    instance.plugin.result = fuglu.REJECT
    assert transaction(client) == b'550 5.7.1 Rejected by content scanner\r\n'
    instance.plugin.result = (fuglu.REJECT, '5.7.0 virus found')
    assert transaction(client) == b'550 5.7.0 virus found\r\n'
    instance.plugin.result = fuglu.DEFER
    assert transaction(client) == b'451 4.7.1 Try again later\r\n'


def test_noreinject(server, sink, clients):
    server.plugin.tags = {'noreinject': True}
    client = clients(server.port)
    ehlo(client)
    reply = transaction(client)
    suspect_id = server.plugin.seen[0].id
    assert reply == ('250 FUGLU REQUEUE(%s): message not re-injected by plugin request\r\n'
                     % suspect_id).encode()
    assert client.cmd('QUIT').startswith(b'221')
    settle(server, sink)
    assert sink.messages == []


def test_default_requeue_reply(server, sink, clients):
    client = clients(server.port)
    ehlo(client)
    reply = transaction(client)
    suspect = server.plugin.seen[0]
    assert (reply
            == ('250 FUGLU REQUEUE(%s): 2.0.0 Ok: queued as ABC123DEF\r\n' % suspect.id).encode())
    assert suspect.tags['injectqueueid'] == 'ABC123DEF'
    assert (b'X-Fuglu-Suspect: %s\r\n' % suspect.id.encode()) in sink.messages[0]['data']


def test_requeuetemplate(sink, make_fuglu, clients):
    instance = make_fuglu(sink.port, extra='[smtpconnector]\n'
                                           'requeuetemplate = QUEUED ${id} to ${to_address}: '
                                           '${injectanswer}\n')
    client = clients(instance.port)
    ehlo(client)
    reply = transaction(client)
    suspect_id = instance.plugin.seen[0].id
    assert reply == ('250 QUEUED %s to bob@example.com: 2.0.0 Ok: queued as ABC123DEF\r\n'
                     % suspect_id).encode()


def test_incomingport_tag_is_visible_to_plugins(server, clients):
    client = clients(server.port)
    ehlo(client)
    assert code(transaction(client)) == 250
    assert server.plugin.seen[0].tags['incomingport'] == server.port


def test_plugin_header_changes_reach_downstream(server, sink, clients):
    class Changer(fuglu.ScannerPlugin):
        def examine(self, suspect):
            suspect.add_header('X-Checked', 'yes')
            suspect.set_header('Subject', '[checked] test message')
            return fuglu.DUNNO

    server.controller.plugins = [Changer(server.config)]
    client = clients(server.port)
    ehlo(client)
    assert code(transaction(client)) == 250
    data = delivered_body_raw(sink)
    assert data.startswith(b'X-Checked: yes\r\nX-Fuglu-Spamstatus: NO\r\nX-Fuglu-Suspect: ')
    assert b'Subject: [checked] test message\r\n' in data
    assert b'Subject: test message' not in data
    assert data.endswith(b'\r\n\r\nHello Bob,\r\nthis is the body.\r\n')


# -- connection trouble ---------------------------------------------------------------

def test_eof_during_data_delivers_nothing_and_the_daemon_keeps_serving(server, sink, clients):
    client = clients(server.port)
    ehlo(client)
    assert code(client.cmd('MAIL FROM:<lost@example.org>')) == 250
    assert code(client.cmd('RCPT TO:<bob@example.com>')) == 250
    assert code(client.cmd('DATA')) == 354
    client.send(b'Subject: half\r\n\r\nonly half of the mess')
    client.sock.shutdown(socket.SHUT_RDWR)
    client.close()
    settle(server, sink)
    assert sink.messages == []
    assert server.plugin.seen == []
    other = clients(server.port)
    ehlo(other)
    assert code(transaction(other)) == 250
    assert other.cmd('QUIT').startswith(b'221')
    settle(server, sink)
    assert len(sink.messages) == 1
    assert sink.messages[0]['mail'] == 'MAIL FROM:<alice@example.org>'


def test_many_parallel_connections(sink, make_fuglu, clients):
    # one MTA with more connections than half the workers: above the default
    # max_sessions_per_client, as a busy Postfix needs
    server = make_fuglu(sink.port, extra='max_sessions_per_client=8')
    connections = [clients(server.port) for _ in range(8)]
    for index, client in enumerate(connections):
        ehlo(client)
        assert code(client.cmd('MAIL FROM:<p%d@example.org>' % index)) == 250
    for client in connections:
        assert code(client.cmd('RCPT TO:<bob@example.com>')) == 250
        assert code(client.cmd('DATA')) == 354
    for index, client in enumerate(connections):
        client.send(stuff(MESSAGE.replace(b'test message', b'parallel %d' % index)))
    for client in connections:
        assert code(client.reply()) == 250
    assert wait_for(lambda: len(sink.messages) == 8)
    assert (sorted(m['mail'] for m in sink.messages)
            == sorted('MAIL FROM:<p%d@example.org>' % i for i in range(8)))


# -- re-injection with CHUNKING ------------------------------------------------------

def test_downstream_with_chunking_gets_one_bdat_last_with_the_exact_bytes(make_fuglu, clients):
    downstream = Sink(extensions=('PIPELINING', 'SIZE 10240000', '8BITMIME', 'CHUNKING'))
    try:
        instance = make_fuglu(downstream.port)
        client = clients(instance.port)
        ehlo(client)
        message = b'Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\nlast\r\n'
        # on the wire the client stuffs the dots; downstream BDAT carries them unstuffed
        stuffed = message.replace(b'\r\n.', b'\r\n..')
        assert code(transaction(client, payload=stuffed + b'.\r\n')) == 250
        assert wait_for(lambda: len(downstream.messages) == 1)
        added, rest = split_added_headers(downstream.messages[0]['data'])
        assert rest == message
        assert b'X-Fuglu-Suspect: ' in added
        verbs = [command.split()[0].upper() for command in downstream.commands]
        assert 'DATA' not in verbs
        assert [c for c in downstream.commands if c.upper().startswith('BDAT')] == \
            ['BDAT %d LAST' % len(downstream.messages[0]['data'])]
    finally:
        downstream.stop()


# -- downstream connections are reused between sessions --------------------------------

def test_the_next_session_reuses_the_downstream_connection(server, sink, clients):
    for number in range(3):
        client = clients(server.port)
        ehlo(client)
        assert code(transaction(client)) == 250
        assert client.cmd('QUIT').startswith(b'221')
        # the session parks its downstream connection after answering QUIT
        assert wait_for(lambda: server.controller.downstream_pool.idle)
    assert wait_for(lambda: len(sink.messages) == 3)
    assert sum(1 for command in sink.commands if command.upper().startswith('EHLO')) == 1


def test_a_downstream_connection_closed_while_parked_is_not_used(server, sink, clients):
    sink.hang_up_after_message = True
    for number in range(2):
        client = clients(server.port)
        ehlo(client)
        assert code(transaction(client)) == 250
        assert client.cmd('QUIT').startswith(b'221')
        # the sink hung up: once it handled that, the parked connection is dead
        assert sink.idle()
    assert len(sink.messages) == 2
    assert sum(1 for command in sink.commands if command.upper().startswith('EHLO')) == 2


# -- a plugin changes the envelope ------------------------------------------------------

def test_envelope_changed_by_a_plugin_is_sent_again(server, sink, clients):
    class Redirect(fuglu.ScannerPlugin):
        def examine(self, suspect):
            suspect.from_address = 'bounces@example.org'
            suspect.recipients = ['archive@example.com']
            return fuglu.DUNNO

    server.controller.plugins = [Redirect(server.config)]
    client = clients(server.port)
    ehlo(client)
    assert code(transaction(client)) == 250
    assert wait_for(lambda: len(sink.messages) == 1)
    delivered = sink.messages[0]
    assert delivered['mail'].startswith('MAIL FROM:<bounces@example.org>')
    assert delivered['rcpts'] == ['archive@example.com']


def test_a_changed_recipient_refused_downstream_defers_the_message(server, sink, clients):
    class Redirect(fuglu.ScannerPlugin):
        def examine(self, suspect):
            suspect.recipients = ['nobody@example.com']
            return fuglu.DUNNO

    sink.rcpt_replies['nobody@example.com'] = '550 5.1.1 no such user'
    server.controller.plugins = [Redirect(server.config)]
    client = clients(server.port)
    ehlo(client)
    reply = transaction(client)
    assert code(reply) == 451, reply
    assert b'nobody@example.com' in reply
    assert client.cmd('QUIT').startswith(b'221')
    settle(server, sink)
    assert sink.messages == []
