"""SAPlugin against a fake spamd on 127.0.0.1 (protocol edge cases).

The fake reads a request the way spamd does (request line, headers, blank line, then the
body up to EOF, which only comes because the client half-closes) and lets the test decide
what to answer. Tests against the real spamd are in tests/integration/test_scanners.py.
"""

import os
import socket
import sys
import tempfile
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fuglu  # noqa: E402
from fuglu_plugins.spamassassin import SAPlugin, parse_spamd_reply, SpamdError, GTUBE  # noqa: E402
from helpers import FakeDaemon, stopped_at_teardown  # noqa: E402


class SpamdRequest(object):
    def __init__(self, line, headers, body):
        self.line = line          # e.g. b'PROCESS SPAMC/1.5'
        self.headers = headers    # lower-case name -> value (str)
        self.body = body


class FakeSpamd(FakeDaemon):
    """A spamd stand-in. ``answer(request)`` returns the reply bytes, or a list of byte
    strings sent one by one with a short pause (a reply split over packets), or None
    to say nothing. Attributes: connections, requests."""

    def __init__(self, answer, unix_path=None, hold=0.0):
        self.answer = answer
        self.hold = hold  # seconds to wait before answering
        self.requests = []
        FakeDaemon.__init__(self, unix_path)

    def _handle(self, connection):
        connection.settimeout(10)
        try:
            data = b''
            while True:  # up to EOF: spamd relies on the client's half-close
                more = connection.recv(65536)
                if not more:
                    break
                data += more
            head, _, body = data.partition(b'\r\n\r\n')
            lines = head.split(b'\r\n')
            headers = {}
            for line in lines[1:]:
                name, _, value = line.decode('utf-8', 'surrogateescape').partition(':')
                headers[name.strip().lower()] = value.strip()
            request = SpamdRequest(lines[0], headers, body)
            self.requests.append(request)
            if self.hold:
                time.sleep(self.hold)
            reply = self.answer(request)
            if reply is None:
                return
            parts = reply if isinstance(reply, list) else [reply]
            for index, part in enumerate(parts):
                if index:
                    time.sleep(0.03)   # a reply in pieces: each its own packet
                connection.sendall(part)
        except OSError:
            pass
        finally:
            connection.close()


def spamd_reply(body, spam_line=None, status=b'SPAMD/1.1 0 EX_OK', content_length=None):
    lines = [status]
    lines.append(b'Content-length: %d' % (len(body) if content_length is None else content_length))
    if spam_line is not None:
        lines.append(b'Spam: ' + spam_line)
    return b'\r\n'.join(lines) + b'\r\n\r\n' + body


def processing_spamd(score, required=5.0, extra_headers=b''):
    """Answers PROCESS like spamd: X-Spam-* headers on top of the message it got."""
    def answer(request):
        is_spam = score >= required
        status = b'X-Spam-Status: %s, score=%.1f required=%.1f tests=FAKE\r\n' % (
            b'Yes' if is_spam else b'No', score, required)
        body = b'X-Spam-Checker-Version: fake\r\n' + status + extra_headers + request.body
        spam_line = b'%s ; %.1f / %.1f' % (b'True' if is_spam else b'False', score, required)
        return spamd_reply(body, spam_line)
    return answer


def reporting_spamd(score, required=5.0):
    def answer(request):
        spam_line = b'%s ; %.1f / %.1f' % (b'True' if score >= required else b'False', score,
                                           required)
        return spamd_reply(b'Content analysis details: FAKE\n', spam_line)
    return answer


@pytest.fixture
def fake_spamd():
    yield from stopped_at_teardown(FakeSpamd, stop_method='close')


def make_plugin(port, main='', **options):
    config = fuglu.load_config(embedded=fuglu.EMBEDDED_CONFIG)
    lines = ['[SAPlugin]', 'port = %s' % port, 'retry_sleep = 0']
    lines += ['%s = %s' % item for item in options.items()]
    config.read_config_text('\n'.join(lines) + '\n' + main)
    return SAPlugin(config)


SOURCE = (b'From: <sender@example.org>\r\nTo: <Rcpt@Example.net>\r\nSubject: test\r\n'
          b'Message-ID: <1@example.org>\r\n\r\nhello world\r\n')


def make_suspect(source=SOURCE, recipient='Rcpt@Example.net'):
    suspect = fuglu.Suspect('sender@example.org', [recipient], inbuffer=source)
    suspect.tags['incomingport'] = 10025
    return suspect


# -- reply parsing --------------------------------------------------------------

def test_reply_with_spam_line_and_body():
    reply = parse_spamd_reply(spamd_reply(b'GTUBE,NO_RELAYS', b'True ; 1000.0 / 5.0'))
    assert reply.spam_verdict() == (True, 1000.0)
    assert reply.body == b'GTUBE,NO_RELAYS'


def test_reply_negative_float_score():
    reply = parse_spamd_reply(b'SPAMD/1.1 0 EX_OK\r\nSpam: False ; -0.5 / 5.0\r\n\r\n')
    assert reply.spam_verdict() == (False, -0.5)


@pytest.mark.parametrize('data', [
    b'',
    b'garbage\r\n\r\n',
    b'SPAMD/1.0 76 Bad header line: (EOF)\r\n',
    b'SPAMD/1.1 0\r\n\r\n',
    b'SPAMD/1.1 0 EX_OK\r\nContent-length: 100\r\n\r\nshort',
    b'SPAMD/1.1 0 EX_OK\r\nContent-length: 5\r\nSpam: True',  # headers never end
])
def test_bad_replies_are_errors(data):
    with pytest.raises(SpamdError):
        parse_spamd_reply(data)


# -- requests ---------------------------------------------------------------------

def test_process_request_format_and_source_replaced_without_pseudo_headers(fake_spamd):
    server = fake_spamd(processing_spamd(2.0))
    plugin = make_plugin(server.address)
    suspect = make_suspect()
    assert plugin.examine(suspect) == fuglu.DUNNO
    request = server.requests[0]
    assert request.line == b'PROCESS SPAMC/1.5'
    assert int(request.headers['content-length']) == len(request.body)
    assert request.headers['user'] == 'rcpt@example.net'
    # spamd saw the pseudo headers in front of the message ...
    assert request.body.startswith(b'X-Fuglu-Suspect: %s\r\n' % suspect.id.encode())
    assert b'X-Fuglu-Incomingport: 10025\r\n' in request.body
    assert b'Return-Path: <sender@example.org>\r\n' in request.body
    assert request.body.endswith(SOURCE)
    # ... and none of them comes back into the delivered message
    delivered = suspect.get_output_source()
    assert b'X-Fuglu-Incomingport' not in delivered and b'Return-Path' not in delivered
    assert suspect.id.encode() not in delivered
    assert delivered.startswith(b'X-Spam-Checker-Version: fake\r\nX-Spam-Status: No, score=2.0')
    assert delivered.endswith(SOURCE)
    assert suspect.tags['spam'] == {'SpamAssassin': False}
    assert suspect.tags['SpamAssassin.score'] == 2.0
    assert suspect.tags['SpamAssassin.report'].startswith('No, score=2.0')


def test_existing_return_path_is_not_duplicated(fake_spamd):
    server = fake_spamd(processing_spamd(0.0))
    source = b'Return-Path: <bounce@example.org>\r\n' + SOURCE
    make_plugin(server.address).examine(make_suspect(source))
    assert server.requests[0].body.count(b'Return-Path') == 1


def test_temp_headers_go_to_spamd_only(fake_spamd):
    server = fake_spamd(processing_spamd(0.0))
    suspect = make_suspect()
    suspect.write_sa_temp_header('X-Fuglu-Test', 'for rules only')
    make_plugin(server.address).examine(suspect)
    assert b'X-Fuglu-Test: for rules only\r\n' in server.requests[0].body
    assert b'X-Fuglu-Test' not in suspect.get_output_source()


def test_lf_only_message_gets_lf_pseudo_headers(fake_spamd):
    server = fake_spamd(processing_spamd(0.0))
    source = SOURCE.replace(b'\r\n', b'\n')
    suspect = make_suspect(source)
    make_plugin(server.address).examine(suspect)
    assert b'\r' not in server.requests[0].body
    assert b'X-Fuglu' not in suspect.get_source()


def test_no_user_without_peruserconfig(fake_spamd):
    server = fake_spamd(processing_spamd(0.0))
    make_plugin(server.address, peruserconfig='False').examine(make_suspect())
    assert 'user' not in server.requests[0].headers


def test_user_keeps_case_without_lowercase_user(fake_spamd):
    server = fake_spamd(processing_spamd(0.0))
    make_plugin(server.address, lowercase_user='False').examine(make_suspect())
    assert server.requests[0].headers['user'] == 'Rcpt@Example.net'


def test_8bit_recipient_goes_to_spamd_as_it_came(fake_spamd):
    # RCPT TO:<\xfe@example.net> (kept as a surrogate) once crashed the plugin
    server = fake_spamd(processing_spamd(9.0))
    suspect = make_suspect(recipient='\udcfe@example.net')
    assert make_plugin(server.address).examine(suspect) == fuglu.DUNNO
    assert server.requests[0].headers['user'] == '\udcfe@example.net'   # the byte 0xfe
    assert suspect.is_spam()


def test_forwardoriginal_uses_report_and_keeps_the_message(fake_spamd):
    server = fake_spamd(reporting_spamd(7.5))
    plugin = make_plugin(server.address, forwardoriginal='True')
    suspect = make_suspect()
    assert plugin.examine(suspect) == fuglu.DUNNO  # DEFAULTLOWSPAMACTION -> DUNNO
    assert server.requests[0].line == b'REPORT SPAMC/1.5'
    assert not suspect.is_modified() and suspect.get_source() == SOURCE
    assert suspect.is_spam() and not suspect.is_highspam()
    assert suspect.tags['SpamAssassin.report'] == 'Content analysis details: FAKE\n'


def test_scanoriginal_false_scans_the_current_source(fake_spamd):
    server = fake_spamd(reporting_spamd(0.0))
    suspect = make_suspect()
    suspect.set_source(SOURCE.replace(b'hello world', b'changed by a plugin'))
    make_plugin(server.address, forwardoriginal='True').examine(suspect)
    assert server.requests[0].body.endswith(SOURCE)
    make_plugin(server.address, forwardoriginal='True', scanoriginal='False').examine(suspect)
    assert b'changed by a plugin' in server.requests[1].body


SEED_MESSAGE = ('message from ${from_address} to ${to_domain} identified as spam '
                '(score=${spamscore})')


@pytest.mark.parametrize('score, expected_action, spam, highspam', [
    (1.0, fuglu.DUNNO, False, False),
    (4.0, fuglu.DEFER, True, False),     # >= lowspamlevel 3
    (20.5, fuglu.REJECT, True, True),    # >= highspamlevel 15
])
def test_levels_map_to_actions(fake_spamd, score, expected_action, spam, highspam):
    server = fake_spamd(processing_spamd(score))
    plugin = make_plugin(server.address, lowspamlevel='3', lowspamaction='DEFER',
                         highspamaction='REJECT', rejectmessage=SEED_MESSAGE)
    suspect = make_suspect()
    result = plugin.examine(suspect)
    action = result[0] if isinstance(result, tuple) else result
    assert action == expected_action
    assert suspect.is_spam() == spam and suspect.is_highspam() == highspam
    if action != fuglu.DUNNO:
        assert result[1] == 'message from sender@example.org to example.net identified as spam ' \
                            '(score=%s)' % score


def test_default_actions_resolve_through_the_spam_section(fake_spamd):
    server = fake_spamd(processing_spamd(1000.0))
    plugin = make_plugin(server.address, main='[spam]\ndefaulthighspamaction = REJECT\n')
    assert plugin.examine(make_suspect())[0] == fuglu.REJECT


def test_without_lowspamlevel_spamds_verdict_counts(fake_spamd):
    server = fake_spamd(processing_spamd(4.0, required=3.0))
    suspect = make_suspect()
    make_plugin(server.address).examine(suspect)
    assert suspect.is_spam()


def test_verdict_from_spamheader_when_no_spam_line(fake_spamd):
    def answer(request):
        body = b'X-Spam-Status: Yes, score=16.0 required=5.0 tests=FAKE\r\n' + request.body
        return spamd_reply(body)
    server = fake_spamd(answer)
    suspect = make_suspect()
    make_plugin(server.address, highspamaction='REJECT').examine(suspect)
    assert suspect.tags['SpamAssassin.score'] == 16.0 and suspect.is_highspam()


def test_reply_split_over_packets(fake_spamd):
    def answer(request):
        whole = processing_spamd(20.0)(request)
        return [whole[:5], whole[5:30], whole[30:31], whole[31:]]
    server = fake_spamd(answer)
    suspect = make_suspect()
    assert make_plugin(server.address, highspamaction='REJECT').examine(suspect)[0] == fuglu.REJECT


@pytest.mark.parametrize('answer', [
    lambda request: b'SPAMD/1.0 76 Bad header line: (EOF)\r\n',
    lambda request: b'this is not spamd\r\n\r\n',
    lambda request: spamd_reply(b'cut', b'True ; 1.0 / 5.0', content_length=5000),
    lambda request: None,  # closes without a word
    lambda request: spamd_reply(b'', b'False ; 1.0 / 5.0'),  # PROCESS without the message
])
def test_failures_are_problems_with_skip_header(fake_spamd, answer):
    server = fake_spamd(answer)
    plugin = make_plugin(server.address, retries='2')
    suspect = make_suspect()
    action, _ = plugin.examine(suspect)
    assert action == fuglu.DEFER
    assert server.connections == 2
    assert suspect.addheaders['X-Fuglu-SA-SKIP'] == 'SA scan failed'
    assert 'SpamAssassin' not in suspect.tags['spam']
    assert not suspect.is_modified()


def test_problemaction_is_configurable(fake_spamd):
    server = fake_spamd(lambda request: b'garbage')
    plugin = make_plugin(server.address, retries='1', problemaction='DUNNO')
    assert plugin.examine(make_suspect())[0] == fuglu.DUNNO


def test_timeout_is_a_problem(fake_spamd):
    server = fake_spamd(processing_spamd(0.0), hold=3.0)
    plugin = make_plugin(server.address, timeout='0.1', retries='2')
    started = time.monotonic()
    assert plugin.examine(make_suspect())[0] == fuglu.DEFER
    assert time.monotonic() - started < 2.0
    assert server.connections == 2


def test_trickling_server_cannot_hold_us_beyond_the_timeout(fake_spamd):
    def answer(request):
        return [b'S'] * 40  # 40 bytes, 30 ms apart: every recv succeeds, the total is slow
    server = fake_spamd(answer)
    plugin = make_plugin(server.address, timeout='0.1', retries='1')
    started = time.monotonic()
    assert plugin.examine(make_suspect())[0] == fuglu.DEFER
    assert time.monotonic() - started < 1.0


def test_spamd_down_is_a_problem():
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    assert make_plugin(port, retries='2').examine(make_suspect())[0] == fuglu.DEFER


def test_oversize_message_too_complex_to_strip_is_a_problem(fake_spamd):
    # 10 MB of empty parts took 640 MB and 12 s to strip; a hit bound is a problem
    server = fake_spamd(processing_spamd(20.0))
    source = (b'Subject: parts\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n'
              + b'--b\r\n\r\n' * 20000)
    with pytest.raises(fuglu.LimitExceeded):   # the scan session's problemaction
        make_plugin(server.address, maxsize='100000').examine(make_suspect(source))
    assert server.connections == 0


def test_oversize_without_stripping_is_skipped(fake_spamd):
    server = fake_spamd(processing_spamd(20.0))
    plugin = make_plugin(server.address, maxsize='100', strip_oversize='0')
    suspect = make_suspect()
    assert plugin.examine(suspect) == fuglu.DUNNO
    assert server.connections == 0
    assert suspect.addheaders['X-Fuglu-SA-SKIP'] == 'Too big for spamchecks. %d > 100' % len(SOURCE)
    assert suspect.get_tag('SpamAssassin.skipreason') == 'size skip'


MULTIPART = (b'From: <sender@example.org>\r\nTo: <rcpt@example.net>\r\nSubject: big\r\n'
             b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="B"\r\n\r\n'
             b'--B\r\nContent-Type: text/plain\r\n\r\nbuy now\r\n--B\r\n'
             b'Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n'
             + b'QUFBQUFBQUFBQUFB\r\n' * 2000 + b'--B--\r\n')


def test_oversize_is_stripped_and_only_spam_headers_are_added(fake_spamd):
    server = fake_spamd(processing_spamd(20.0, extra_headers=b'X-Other: not copied\r\n'))
    plugin = make_plugin(server.address, maxsize='5000', highspamaction='REJECT')
    suspect = make_suspect(MULTIPART)
    assert plugin.examine(suspect)[0] == fuglu.REJECT
    request = server.requests[0]
    assert b'X-Fuglu-OrigSize: %d' % len(MULTIPART) in request.body
    assert b'buy now' in request.body and b'QUFBQUFB' not in request.body
    assert len(request.body) < 5000 + 500  # stripped source + pseudo headers
    assert suspect.get_tag('SpamAssassin.stripped') is True
    assert suspect.get_source() == MULTIPART  # the original is kept ...
    # ... with spamd's verdict
    assert suspect.addheaders['X-Spam-Status'].startswith('Yes, score=20.0')
    assert 'X-Other' not in suspect.addheaders


@pytest.mark.parametrize('tag', ['SAPlugin.skip', 'SpamAssassin.skip'])
def test_skip_tags(fake_spamd, tag):
    server = fake_spamd(processing_spamd(20.0))
    suspect = make_suspect()
    suspect.set_tag(tag, True)
    assert make_plugin(server.address).examine(suspect) == fuglu.DUNNO
    assert server.connections == 0


def test_unix_socket(fake_spamd):
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, 'spamd.sock')
    try:
        server = fake_spamd(processing_spamd(20.0), unix_path=path)
        plugin = make_plugin(path, highspamaction='REJECT')
        assert plugin.examine(make_suspect())[0] == fuglu.REJECT
    finally:
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(folder)


def test_log_lines_start_with_the_suspect_id(fake_spamd, caplog):
    server = fake_spamd(lambda request: b'garbage')
    suspect = make_suspect()
    with caplog.at_level('DEBUG', logger='fuglu.plugin.SAPlugin'):
        make_plugin(server.address, retries='2').examine(suspect)
    assert caplog.records
    assert all(record.getMessage().startswith(suspect.id) for record in caplog.records)


# -- lint ---------------------------------------------------------------------------

def lint_spamd(pong=b'SPAMD/1.5 0 PONG\r\n', symbols=b'GTUBE,NO_RECEIVED,NO_RELAYS'):
    def answer(request):
        if request.line == b'PING SPAMC/1.5':
            return pong
        if request.line == b'SYMBOLS SPAMC/1.5' and GTUBE in request.body:
            return spamd_reply(symbols, b'True ; 1000.0 / 5.0')
        return spamd_reply(b'', b'False ; 0.0 / 5.0')
    return answer


def test_lint_prints_pong_and_gtube(fake_spamd, capsys):
    server = fake_spamd(lint_spamd())
    plugin = make_plugin(server.address)
    assert plugin.lint() is True
    output = capsys.readouterr().out
    assert 'Got: SPAMD/1.5 0 PONG' in output
    assert 'GTUBE has been detected correctly' in output
    assert str(plugin) == 'SpamAssassin'


def test_lint_fails_without_gtube(fake_spamd, capsys):
    server = fake_spamd(lint_spamd(symbols=b'NO_RECEIVED'))
    assert make_plugin(server.address).lint() is False
    assert 'GTUBE' in capsys.readouterr().out


def test_lint_fails_without_pong(fake_spamd, capsys):
    server = fake_spamd(lint_spamd(pong=b'SPAMD/1.5 0 PANG\r\n'))
    assert make_plugin(server.address).lint() is False


def test_lint_fails_when_spamd_is_down(capsys):
    assert make_plugin('/nonexistent/spamd.sock').lint() is False
    assert 'ERROR' in capsys.readouterr().out


def test_lint_fails_on_invalid_action(fake_spamd, capsys):
    server = fake_spamd(lint_spamd())
    assert make_plugin(server.address, highspamaction='MAYBE').lint() is False
    assert 'highspamaction' in capsys.readouterr().out
