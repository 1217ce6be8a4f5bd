"""Client text fuglu did not write, through the real daemon: non-ASCII digits and verbs,
undecodable bytes, control characters in envelope text, on the smtp and esmtp
connectors (netcat and milter below). Each case must get a clear protocol reply, a
readable log line and no traceback; nothing malformed may reach the downstream."""

import io
import logging

import pytest

from helpers import InProcessFuglu, VerdictFromHeaderPlugin, fuglu, stopped_at_teardown, wait_for
from test_milter import POSTFIX_PROTOCOL, ChangingPlugin, MilterClient, replycode
from test_milter import start_fuglu  # noqa: F401 (a fixture)
from test_netcat import UNIX_EML, pipe
from test_netcat import netcat  # noqa: F401 (a fixture)
from test_smtp import MESSAGE, stuff
from test_smtp import clients, sink  # noqa: F401 (fixtures)


@pytest.fixture
def make_fuglu():
    def create(downstream_port, protocol='smtp', extra_main=''):
        return InProcessFuglu(downstream_port, protocol=protocol, extra_main=extra_main)
    yield from stopped_at_teardown(create)


class StrictLog(object):
    """A log handler writing to a strict UTF-8 stream, as a log file is: a record it
    cannot encode is lost (and reported by logging.handleError)."""

    def __init__(self):
        self.stream = io.TextIOWrapper(io.BytesIO(), encoding='utf-8', errors='strict',
                                       write_through=True)
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(logging.Formatter('%(levelname)s %(message)s'))
        self.failures = []
        self.handler.handleError = self.failures.append
        self.records = []
        self.logger = logging.getLogger('fuglu')
        self.old_level = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self.handler)

    def text(self):
        return self.stream.buffer.getvalue().decode('utf-8')

    def close(self):
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.old_level)


@pytest.fixture
def strict_log():
    log = StrictLog()
    yield log
    log.close()


def code_of(reply):
    return reply[:3].decode('ascii', 'replace')


@pytest.fixture(params=['smtp', 'esmtp'])
def session(request, sink, make_fuglu, clients):
    """An EHLO'd client of the smtp or esmtp connector."""
    server = make_fuglu(sink.port, protocol=request.param)
    client = clients(server.port)
    assert client.cmd('EHLO client.example').startswith(b'250')
    client.server = server
    return client


# -- SIZE and other parameters ------------------------------------------------------

@pytest.mark.parametrize('value',
                         ['\u00b2', '1\u00b2', '\uff11\uff12', '\u0663', '-1', '', '1e3', '0x10',
                          ' '])
def test_size_that_is_not_ascii_digits_is_a_syntax_error(session, value):
    reply = session.cmd('MAIL FROM:<a@example.org> SIZE=%s' % value)
    assert reply.startswith(b'501 5.5.4 '), reply
    assert session.cmd('NOOP').startswith(b'250'), 'the session goes on'


@pytest.mark.parametrize('value', ['9' * 25, '9' * 2000, '268435457'],
                         ids=['25 digits', '2000 digits', 'limit+1'])
def test_huge_size_is_refused_as_too_big(session, value):
    reply = session.cmd('MAIL FROM:<a@example.org> SIZE=%s' % value)
    assert reply.startswith(b'552 5.3.4 '), reply
    assert len(reply) < 300, 'the value is not echoed'


@pytest.mark.parametrize('parameter',
                         ['B\u0131DY=8BITMIME', 'BODY=8BIT\u0131', 'BODY=', '=x', 'NOTIFY=\x01',
                                       'ENVID=a\rb', 'X\xffY=1', 'BODY=\u0131',
                                       'BODY=8BITMIME\x00'])
def test_malformed_mail_parameters_are_syntax_errors(session, sink, parameter):
    reply = session.cmd('MAIL FROM:<a@example.org> %s' % parameter)
    assert reply[:3] in (b'500', b'501'), reply
    assert session.cmd('MAIL FROM:<a@example.org>').startswith(b'250')
    assert not any(parameter in command for command in sink.commands)


@pytest.mark.parametrize('parameter',
                         ['N\u0131TIFY=NEVER', 'NOTIFY=', '=x', 'NOTIFY=\x01', 'ORCPT=a\rb',
                          'X\xffY=1'])
def test_malformed_rcpt_parameters_are_syntax_errors(session, sink, parameter):
    assert session.cmd('MAIL FROM:<a@example.org>').startswith(b'250')
    reply = session.cmd('RCPT TO:<b@example.org> %s' % parameter)
    assert reply.startswith(b'501 5.5.4 '), reply
    assert session.cmd('RCPT TO:<b@example.org>').startswith(b'250')
    assert not any(parameter in command for command in sink.commands)


def test_utf8_parameter_values_pass(session, sink):
    assert session.cmd('MAIL FROM:<a@example.org> SMTPUTF8 ENVID=\u00e4').startswith(b'250')


# -- verbs --------------------------------------------------------------------------

@pytest.mark.parametrize('line',
                         ['MA\u0131L FROM:<a@example.org>', 'MA\u0130L FROM:<a@example.org>',
                                  '\uff2d\uff21\uff29\uff2c FROM:<a@example.org>', 'EHLO\u00a0x',
                                  'N\u00d6OP',
                                  'MAIL FR\u00d6M:<a@example.org>', 'RSET\xff', '\xffQUIT'])
def test_only_ascii_verbs_dispatch(session, sink, line):
    reply = session.cmd(line)
    assert reply[:1] == b'5', reply
    assert not any(command.startswith('MAIL') for command in sink.commands)
    assert session.cmd('NOOP').startswith(b'250')


def test_kelvin_and_dotless_letters_do_not_make_a_rcpt(session, sink):
    assert session.cmd('MAIL FROM:<a@example.org>').startswith(b'250')
    reply = session.cmd('RCPT \u0131O:<b@example.org>')
    assert reply.startswith(b'501'), reply


# -- control characters in envelope text ------------------------------------------------

@pytest.mark.parametrize('address', ['a\rb@example.org', 'a@exa\rmple.org', 'a\x0bb@example.org',
                                     'a\tb@example.org', 'a\x7fb@example.org',
                                     'a\x1bb@example.org'])
def test_control_characters_in_addresses_are_refused(session, sink, address):
    reply = session.cmd('MAIL FROM:<%s>' % address)
    assert reply.startswith(b'501 5.1.7 '), reply
    assert session.cmd('MAIL FROM:<a@example.org>').startswith(b'250')
    reply = session.cmd('RCPT TO:<%s>' % address)
    assert reply.startswith(b'501 5.1.3 '), reply
    reply = session.cmd('RCPT TO:%s' % address)
    assert reply[:3] == b'501', reply
    assert session.cmd('RSET').startswith(b'250')
    assert not any(address in command for command in sink.commands), sink.commands


def test_unbalanced_brackets_are_refused(session):
    assert session.cmd('MAIL FROM:<a@example.org').startswith(b'501 5.1.7 ')
    assert session.cmd('MAIL FROM:a@example.org>').startswith(b'501 5.1.7 ')
    assert session.cmd('MAIL FROM:a@example.org').startswith(b'250'), 'brackets may be missing'


def test_bare_lf_splits_a_command_into_two_refused_lines(session, sink):
    session.send(b'MAIL FROM:<a\nb@example.org>\r\n')
    assert session.reply().startswith(b'501 5.1.7 ')
    assert session.reply().startswith(b'500 ')
    assert not any(command.startswith('MAIL') for command in sink.commands)


@pytest.mark.parametrize('line', ['EHLO a\rb', 'HELO a\x01b', 'EHLO a\x00b'])
def test_control_characters_in_greetings_are_refused(session, sink, line):
    reply = session.cmd(line)
    assert reply[:3] in (b'500', b'501'), reply
    assert not any('a\r' in command for command in sink.commands)


@pytest.mark.parametrize('item',
                         ['ADDR=1.2.3.4+0D+0Ax', 'NAME=a\rb', 'HELO=+00', 'IDENT=\x01', 'ADDR=',
                                  '\u0131DENT=x', 'N\u00c4ME=x'])
def test_xforward_with_control_characters_or_bad_names_is_refused(session, item):
    reply = session.cmd('XFORWARD %s' % item)
    assert reply.startswith(b'501 5.5'), reply


def test_xforward_values_are_utf8_xtext(session, sink):
    assert session.cmd('XFORWARD HELO=h+C3+A4llo.example ADDR=192.0.2.1').startswith(b'250')
    assert session.cmd('MAIL FROM:<a@example.org>').startswith(b'250')
    assert session.cmd('RCPT TO:<b@example.org>').startswith(b'250')
    assert session.cmd('DATA').startswith(b'354')
    session.send(stuff(MESSAGE))
    assert session.reply().startswith(b'250')
    assert wait_for(lambda: sink.messages)


# -- undecodable bytes in the log ------------------------------------------------------

def send_from_an_undecodable_sender(client, sink):
    client.send(b'MAIL FROM:<a\xffb@example.org>\r\n')
    assert client.reply().startswith(b'250')
    assert client.cmd('RCPT TO:<b@example.org>').startswith(b'250')
    assert client.cmd('DATA').startswith(b'354')
    client.send(stuff(MESSAGE))
    assert client.reply().startswith(b'250')
    assert wait_for(lambda: sink.messages)


def test_an_undecodable_sender_still_gets_its_log_lines(session, sink, strict_log):
    send_from_an_undecodable_sender(session, sink)
    assert sink.messages[0]['mail'] == 'MAIL FROM:<a\ufffdb@example.org>'   # the sink shows U+FFFD
    assert wait_for(lambda: 'from=a\\xffb@example.org' in strict_log.text()), strict_log.text()
    assert strict_log.failures == []


@pytest.mark.parametrize('protocol', ['smtp', 'esmtp'])
def test_an_undecodable_sender_in_a_header_is_delivered(sink, make_fuglu, clients, protocol):
    # debuginfoheader writes the envelope into a header: its 0xff byte made every
    # delivery a 451 (the header encoder refused the surrogate that stands for it)
    server = make_fuglu(sink.port, protocol=protocol, extra_main='debuginfoheader = True\n')
    client = clients(server.port)
    assert client.cmd('EHLO client.example').startswith(b'250')
    send_from_an_undecodable_sender(client, sink)
    assert b'X-Fuglu-Debuginfo: =?utf-8?' in sink.messages[0]['data']
    assert server.controller.exceptions == []


# -- netcat envelope block -------------------------------------------------------------



@pytest.mark.parametrize('field',
                         [b'X-ENV-SENDER: a\rb@example.org',
                          b'X-ENV-RECIPIENT: <a@exa\x00mple.org>',
                                   b'X-ENV-RECIPIENT: a>b@example.org',
                                   b'X-ENV-SENDER: a\x0bb@example.org',
                                   b'X-Some-Tag: a\rX-Injected: 1', b'X-Some-Tag: \x1b[31m'])
def test_control_characters_in_the_envelope_block_are_rejected_unscanned(netcat, field):
    data = b'X-DATA-PREPEND-START: tok\r\n' + field + b'\r\nX-DATA-PREPEND-END: tok\r\n' + UNIX_EML
    reply = pipe(netcat.port, data)
    assert reply.startswith(b'REJECT:broken envelope block: '), reply
    assert b'\r' not in reply and b'\x00' not in reply and b'\x1b' not in reply
    assert VerdictFromHeaderPlugin.seen == []


# -- milter MAIL / RCPT / HELO / header size ---------------------------------------------

ANSWERED = POSTFIX_PROTOCOL & ~(fuglu.SMFIP_NR_HELO | fuglu.SMFIP_NR_MAIL | fuglu.SMFIP_NR_RCPT)


def eob(client):
    """End the message; the verdict packet (modifications before it are skipped)."""
    client.event(fuglu.SMFIC_EOH)
    client.send(fuglu.SMFIC_BODYEOB)
    while True:
        packet = client.read()
        if packet[0] in b'cadrty':
            return packet


@pytest.mark.parametrize('sender',
                         ['a\rb@example.org', 'a\nb@example.org', 'a>b@example.org', '\x7f@x.org'])
def test_milter_bad_sender_is_refused_at_mail_when_the_mta_waits(start_fuglu, sender):
    client = MilterClient(start_fuglu().port).start(protocol=ANSWERED)
    reply = client.event(fuglu.SMFIC_MAIL, fuglu.milter_strings('<%s>' % sender))
    assert replycode([reply]) == '501 5.1.7 Bad sender address syntax'
    packets = client.message()   # the next transaction is fine
    assert packets[-1] == (b'c', b'')
    assert [seen['from'] for seen in ChangingPlugin.seen] == ['sender@example.org']


@pytest.mark.parametrize('recipient', ['a\rb@example.org', 'a@ex\nample.org', '<a@example.org'])
def test_milter_bad_recipient_is_refused_at_rcpt_when_the_mta_waits(start_fuglu, recipient):
    client = MilterClient(start_fuglu().port).start(protocol=ANSWERED)
    assert client.event(fuglu.SMFIC_MAIL, fuglu.milter_strings('<a@example.org>')) == (b'c', b'')
    reply = client.event(fuglu.SMFIC_RCPT, fuglu.milter_strings('<%s>' % recipient))
    assert replycode([reply]) == '501 5.1.3 Bad recipient address syntax'
    assert client.event(fuglu.SMFIC_RCPT, fuglu.milter_strings('<ok@example.org>')) == (b'c', b'')
    assert eob(client) == (b'c', b'')
    assert ChangingPlugin.seen[-1]['to'] == ['ok@example.org']


@pytest.mark.parametrize('command, argument, expected', [
    (fuglu.SMFIC_MAIL, '<a\rb@example.org>', '550 5.1.7 Bad sender address syntax'),
    (fuglu.SMFIC_MAIL, '<a@example.org>\0NOTIFY=\r',
     '550 5.5.4 Syntax error in MAIL: control character in NOTIFY value'),
    (fuglu.SMFIC_RCPT, '<a\nb@example.org>', '550 5.1.3 Bad recipient address syntax'),
    (fuglu.SMFIC_HELO, 'a\rb', '550 5.5.4 Syntax error in HELO: control character'),
])
def test_milter_bad_envelope_is_refused_at_the_end_when_negotiated_no_reply(start_fuglu, command,
                                                                             argument, expected):
    client = MilterClient(start_fuglu().port).start()
    assert client.protocol & fuglu.MILTER_NO_REPLY_FLAGS[command]
    if command == fuglu.SMFIC_HELO:
        client.event(fuglu.SMFIC_HELO, fuglu.milter_strings(argument))
    if command != fuglu.SMFIC_MAIL:
        client.event(fuglu.SMFIC_MAIL, fuglu.milter_strings('<a@example.org>'))
    if command == fuglu.SMFIC_MAIL:
        client.event(fuglu.SMFIC_MAIL,
                     b''.join(fuglu.milter_strings(item) for item in argument.split('\0')))
    client.event(fuglu.SMFIC_RCPT, fuglu.milter_strings('<ok@example.org>'))
    if command == fuglu.SMFIC_RCPT:
        client.event(fuglu.SMFIC_RCPT, fuglu.milter_strings(argument))
    assert replycode([eob(client)]) == expected
    assert ChangingPlugin.seen == [], 'never scanned, never in a header'


def test_milter_headers_count_towards_the_size_limit(start_fuglu, strict_log):
    instance = start_fuglu(extra_main='smtp_max_message_size=1000')
    client = MilterClient(instance.port).start()
    client.event(fuglu.SMFIC_MAIL, fuglu.milter_strings('<a@example.org>'))
    client.event(fuglu.SMFIC_RCPT, fuglu.milter_strings('<b@example.org>'))
    for index in range(30):
        client.event(fuglu.SMFIC_HEADER,
                     fuglu.milter_strings('X-Filler-%d' % index, ' ' + 'x' * 60))
    client.event(fuglu.SMFIC_EOH)
    client.event(fuglu.SMFIC_BODY, b'short body\r\n')
    client.send(fuglu.SMFIC_BODYEOB)
    assert replycode([client.read()]).startswith('452 4.3.4 message size exceeds fixed maximum '
                                                 'message size 1000')
    assert ChangingPlugin.seen == []
    assert 'over smtp_max_message_size 1000 (headers and body)' in strict_log.text()
    assert instance.controller.exceptions == []
    packets = client.message()   # the next message is fine again
    assert packets[-1] == (b'c', b'')


def test_milter_header_with_a_malformed_name_closes_the_connection(start_fuglu, strict_log):
    instance = start_fuglu()
    client = MilterClient(instance.port).start()
    client.event(fuglu.SMFIC_MAIL, fuglu.milter_strings('<a@example.org>'))
    client.event(fuglu.SMFIC_RCPT, fuglu.milter_strings('<b@example.org>'))
    client.event(fuglu.SMFIC_HEADER,
                 fuglu.milter_strings('X-A\r\nContent-Type', ' multipart/mixed'))
    assert client.closed_by_peer()
    assert 'HEADER with a malformed name' in strict_log.text()
    assert instance.controller.exceptions == []


def test_milter_header_value_with_a_bare_lf_stays_one_header(start_fuglu):
    client = MilterClient(start_fuglu().port).start()
    packets = client.message(raw_headers=[('Subject', ' hi\nX-Smuggled: yes'),
                                          ('From', ' a@example.org')])
    assert packets[-1] == (b'c', b'')
    source = ChangingPlugin.seen[-1]['source']
    assert b'Subject: hi\r\n X-Smuggled: yes\r\n' in source
    assert b'\r\nX-Smuggled' not in source
