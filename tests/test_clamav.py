"""ClamavPlugin against a fake clamd on 127.0.0.1 (protocol edge cases).

The fake speaks just enough of clamd's z-protocol: it reads the command and, for
INSTREAM, the length-prefixed chunks, then lets the test decide what to answer. Tests
against the real clamd are in tests/integration/test_scanners.py.
"""

import os
import socket
import sys
import tempfile
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fuglu  # noqa: E402
from fuglu_plugins.clamav import ClamavPlugin, parse_clamd_reply, ClamdError, EICAR  # noqa: E402
from helpers import FakeDaemon, stopped_at_teardown  # noqa: E402


class FakeClamd(FakeDaemon):
    """A clamd stand-in. ``answer(conn, command, payload, chunk_sizes)`` runs once per
    connection after the request was read; what it sends is the reply.

    ``read_limit``: stop reading INSTREAM data once this many bytes arrived (the way
    clamd behaves at StreamMaxLength) and hand over to ``answer`` at once.
    Attributes for the test: connections, commands, payloads, chunk_sizes.
    """

    def __init__(self, answer, unix_path=None, read_limit=None):
        self.answer = answer
        self.read_limit = read_limit
        self.commands = []
        self.payloads = []
        self.chunk_sizes = []
        FakeDaemon.__init__(self, unix_path)

    @staticmethod
    def _read_exactly(connection, count):
        data = b''
        while len(data) < count:
            more = connection.recv(count - len(data))
            if not more:
                raise EOFError('client closed')
            data += more
        return data

    def _handle(self, connection):
        connection.settimeout(10)
        try:
            command = b''
            while not command.endswith(b'\0'):
                more = connection.recv(1)
                if not more:
                    return
                command += more
            self.commands.append(command)
            payload, sizes = b'', []
            if command == b'zINSTREAM\0':
                while True:
                    size = int.from_bytes(self._read_exactly(connection, 4), 'big')
                    if size == 0:
                        break
                    sizes.append(size)
                    payload += self._read_exactly(connection, size)
                    if self.read_limit is not None and len(payload) > self.read_limit:
                        break
            self.payloads.append(payload)
            self.chunk_sizes.append(sizes)
            self.answer(connection, command, payload, sizes)
        except (OSError, EOFError):
            pass
        finally:
            connection.close()


def reply_with(*parts, pause=0.0):
    """An answer function sending ``parts`` one after the other, ``pause`` s apart."""
    def answer(connection, command, payload, sizes):
        for part in parts:
            connection.sendall(part)
            if pause:
                time.sleep(pause)
    return answer


def never_answer(connection, command, payload, sizes):
    connection.recv(1)   # until the plugin gives up and closes


@pytest.fixture
def fake_clamd():
    yield from stopped_at_teardown(FakeClamd, stop_method='close')


def make_plugin(port, **options):
    config = fuglu.load_config(embedded=fuglu.EMBEDDED_CONFIG)
    lines = ['[ClamavPlugin]', 'port = %s' % port]
    lines += ['%s = %s' % item for item in options.items()]
    config.read_config_text('\n'.join(lines) + '\n')
    return ClamavPlugin(config)


def make_suspect(body=b'hello world', sender='sender@example.org', recipient='rcpt@example.net'):
    source = (b'From: <%s>\r\nTo: <%s>\r\nSubject: test\r\n\r\n' % (sender.encode(),
                                                                    recipient.encode())
              + body + b'\r\n')
    return fuglu.Suspect(sender, [recipient], inbuffer=source)


# -- reply parsing --------------------------------------------------------------

@pytest.mark.parametrize('reply, expected', [
    (b'stream: OK\0', {}),
    (b'stream: Eicar-Test-Signature.UNOFFICIAL FOUND\0',
     {'stream': 'Eicar-Test-Signature.UNOFFICIAL'}),
    (b'stream: Win.Test.EICAR_HDB-1 FOUND\0', {'stream': 'Win.Test.EICAR_HDB-1'}),
])
def test_verdicts_are_parsed(reply, expected):
    assert parse_clamd_reply(reply) == expected


@pytest.mark.parametrize('reply', [
    b'stream: OK',                              # no terminator: cut off
    b'INSTREAM size limit exceeded. ERROR\0',
    b'stream: lstat() failed: No such file or directory. ERROR\0',
    b'UNKNOWN COMMAND\0',
    b'OK\0',
    b'stream: FOUND\0',
    b'stream: OKAY\0',
    b'\0',
    b'',
])
def test_everything_else_is_an_error(reply):
    with pytest.raises(ClamdError):
        parse_clamd_reply(reply)


# -- scanning ---------------------------------------------------------------------

def test_clean_message_is_streamed_in_chunks_with_return_path(fake_clamd):
    server = fake_clamd(reply_with(b'stream: OK\0'))
    plugin = make_plugin(server.address)
    suspect = make_suspect(body=b'x' * 50000)
    assert plugin.examine(suspect) == fuglu.DUNNO
    assert suspect.tags['virus'] == {'ClamAV': False}
    assert server.commands == [b'zINSTREAM\0']
    assert server.payloads[0] == b'Return-Path: <sender@example.org>\r\n' + suspect.get_source()
    sizes = server.chunk_sizes[0]
    assert len(sizes) > 1 and max(sizes) <= 20480 and sum(sizes) == len(server.payloads[0])


def test_8bit_sender_goes_to_clamd_as_it_came_and_the_virus_is_found(fake_clamd):
    # MAIL FROM:<\xff@example.org> (kept as a surrogate) once crashed the plugin: unscanned
    server = fake_clamd(reply_with(b'stream: Eicar-Test-Signature FOUND\0'))
    source = b'Subject: test\r\n\r\n' + EICAR + b'\r\n'
    suspect = fuglu.Suspect('\udcff\u00e4@example.org', ['rcpt@example.net'], inbuffer=source)
    assert make_plugin(server.address).examine(suspect)[0] == fuglu.DELETE
    assert server.payloads == [b'Return-Path: <\xff\xc3\xa4@example.org>\r\n' + source]


def test_virus_gets_virusaction_template_and_tags(fake_clamd):
    server = fake_clamd(reply_with(b'stream: Eicar-Test-Signature FOUND\0'))
    plugin = make_plugin(server.address, rejectmessage='${virusname} for ${to_domain} in '
                                                       '${infectedfile}')
    suspect = make_suspect()
    action, message = plugin.examine(suspect)
    assert action == fuglu.DELETE  # DEFAULTVIRUSACTION -> [virus] defaultvirusaction = DELETE
    assert message == 'Eicar-Test-Signature for example.net in stream'
    assert suspect.is_virus()
    assert suspect.tags['ClamAV.virus'] == {'stream': 'Eicar-Test-Signature'}
    assert suspect.tags['ClamavPlugin.virus'] == {'stream': 'Eicar-Test-Signature'}


def test_virusaction_follows_the_virus_section(fake_clamd):
    server = fake_clamd(reply_with(b'stream: Eicar-Test-Signature FOUND\0'))
    plugin = make_plugin(server.address)
    plugin.config.read_config_text('[virus]\ndefaultvirusaction = REJECT\n')
    assert plugin.examine(make_suspect())[0] == fuglu.REJECT


def test_unofficial_signatures_get_their_own_action(fake_clamd):
    server = fake_clamd(reply_with(b'stream: Eicar-Test-Signature.UNOFFICIAL FOUND\0'))
    plugin = make_plugin(server.address, virusaction='REJECT', virusaction_unofficial='DUNNO')
    assert plugin.examine(make_suspect())[0] == fuglu.DUNNO
    plugin = make_plugin(server.address, virusaction='REJECT')
    assert plugin.examine(make_suspect())[0] == fuglu.REJECT


@pytest.mark.parametrize('parts', [
    (b'stream: Eicar-Te', b'st-Signature FO', b'UND\0'),
    (b's', b'tream: Eicar-Test-Signature FOUND', b'\0'),
])
def test_reply_split_over_several_packets(fake_clamd, parts):
    server = fake_clamd(reply_with(*parts, pause=0.05))
    action, _ = make_plugin(server.address).examine(make_suspect())
    assert action == fuglu.DELETE


def test_clean_reply_split_over_packets(fake_clamd):
    server = fake_clamd(reply_with(b'stream: O', b'K', b'\0', pause=0.05))
    assert make_plugin(server.address).examine(make_suspect()) == fuglu.DUNNO


@pytest.mark.parametrize('reply', [
    b'hello there\0',
    b'stream: OK',                        # connection closed before the terminator
    b'stream: Can\'t allocate memory ERROR\0',
    b'UNKNOWN COMMAND\0',
    b'\xff\xfe\x00',
])
def test_garbage_or_error_is_a_problem_never_clean(fake_clamd, reply):
    server = fake_clamd(reply_with(reply))
    plugin = make_plugin(server.address)
    suspect = make_suspect()
    action, _ = plugin.examine(suspect)
    assert action == fuglu.DEFER
    assert 'ClamAV' not in suspect.tags['virus']  # neither clean nor infected


def test_problemaction_is_configurable(fake_clamd):
    server = fake_clamd(reply_with(b'garbage\0'))
    assert (make_plugin(server.address, problemaction='REJECT').examine(make_suspect())[0]
            == fuglu.REJECT)


def test_close_without_reply_is_retried_then_a_problem(fake_clamd):
    server = fake_clamd(reply_with())
    plugin = make_plugin(server.address, retries=3)
    assert plugin.examine(make_suspect())[0] == fuglu.DEFER
    assert server.connections == 3


def test_size_limit_reply_is_read_after_the_server_stops_reading(fake_clamd, caplog):
    # Like clamd at StreamMaxLength: answer, then close with our data still unread.
    server = fake_clamd(reply_with(b'INSTREAM size limit exceeded. ERROR\0'), read_limit=100000)
    plugin = make_plugin(server.address)
    suspect = make_suspect(body=b'y' * 3000000)
    with caplog.at_level('DEBUG', logger='fuglu.plugin.ClamavPlugin'):
        action, _ = plugin.examine(suspect)
    assert action == fuglu.DEFER
    assert 'ClamAV' not in suspect.tags['virus']
    assert 'size limit exceeded' in caplog.text
    assert server.connections == 1  # clamd's answer is final: no retries
    assert all(record.getMessage().startswith(suspect.id) for record in caplog.records)


def test_timeout_is_a_problem_after_retries(fake_clamd):
    server = fake_clamd(never_answer)
    plugin = make_plugin(server.address, timeout='0.1', retries='2')
    started = time.monotonic()
    assert plugin.examine(make_suspect())[0] == fuglu.DEFER
    elapsed = time.monotonic() - started
    # each attempt waits min(3 x timeout, timeout + 30) = 0.3 s for the reply
    assert 0.5 < elapsed < 3
    assert server.connections == 2


def test_clamd_down_is_a_problem():
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    plugin = make_plugin(port, retries='2')
    assert plugin.examine(make_suspect())[0] == fuglu.DEFER


def test_missing_unix_socket_is_a_problem():
    plugin = make_plugin('/nonexistent/clamd.sock', retries='1')
    assert plugin.examine(make_suspect())[0] == fuglu.DEFER


def test_unix_socket(fake_clamd):
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, 'clamd.sock')
    try:
        server = fake_clamd(reply_with(b'stream: Eicar-Test-Signature FOUND\0'), unix_path=path)
        assert make_plugin(path).examine(make_suspect())[0] == fuglu.DELETE
        assert server.connections == 1
    finally:
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(folder)


def test_host_from_environment(fake_clamd, monkeypatch):
    server = fake_clamd(reply_with(b'stream: OK\0'))
    monkeypatch.setenv('FUGLU_TEST_CLAMD_HOST', '127.0.0.1')
    plugin = make_plugin(server.address, host='$FUGLU_TEST_CLAMD_HOST')
    assert plugin.examine(make_suspect()) == fuglu.DUNNO
    assert server.connections == 1


def test_message_over_maxsize_is_skipped_with_a_tag(fake_clamd, caplog):
    server = fake_clamd(reply_with(b'stream: Eicar-Test-Signature FOUND\0'))
    plugin = make_plugin(server.address, maxsize='1000')
    suspect = make_suspect(body=b'z' * 2000)
    with caplog.at_level('INFO', logger='fuglu.plugin.ClamavPlugin'):
        assert plugin.examine(suspect) == fuglu.DUNNO
    assert server.connections == 0
    assert suspect.get_tag('ClamavPlugin.skipreason') == 'size skip'
    assert suspect.id in caplog.text and 'maxsize' in caplog.text


@pytest.mark.parametrize('setting, skipped', [
    ('none', False), ('all', True), ('OtherAV', True), ('Sophos, F-Prot', False)])
def test_skip_on_previous_virus(fake_clamd, setting, skipped):
    server = fake_clamd(reply_with(b'stream: OK\0'))
    plugin = make_plugin(server.address, skip_on_previous_virus=setting)
    suspect = make_suspect()
    suspect.tags['virus']['OtherAV'] = True
    plugin.examine(suspect)
    assert server.connections == (0 if skipped else 1)


def test_skiplist_for_welcomelisted_mail(fake_clamd, tmp_path):
    listing = tmp_path / 'skiplist'
    listing.write_text('# harmless for our partners\nEicar-Test-Signature\n')
    server = fake_clamd(reply_with(b'stream: Eicar-Test-Signature FOUND\0'))
    plugin = make_plugin(server.address, skiplist_file=str(listing))
    welcomed = make_suspect()
    welcomed.tags['welcomelisted']['test'] = True
    assert plugin.examine(welcomed) == fuglu.DUNNO
    assert plugin.examine(make_suspect())[0] == fuglu.DELETE


# -- lint ---------------------------------------------------------------------------

def clamd_answers(pong=b'PONG\0', scan=b'stream: Eicar-Test-Signature.UNOFFICIAL FOUND\0'):
    def answer(connection, command, payload, sizes):
        if command == b'zPING\0':
            connection.sendall(pong)
        elif command == b'zVERSION\0':
            connection.sendall(b'ClamAV 1.4.6\0')
        elif EICAR in payload or b'UEsDB' in payload:  # plain or a base64 zip
            connection.sendall(scan)
        else:
            connection.sendall(b'stream: OK\0')
    return answer


def test_lint_prints_pong_and_eicar(fake_clamd, capsys):
    server = fake_clamd(clamd_answers())
    plugin = make_plugin(server.address)
    assert plugin.lint() is True
    output = capsys.readouterr().out
    assert 'Got Pong: PONG' in output
    assert "Clamav found virus {'stream': 'Eicar-Test-Signature.UNOFFICIAL'}" in output
    assert str(plugin) == 'Clam AV'


def test_lint_fails_on_a_wrong_pong(fake_clamd, capsys):
    server = fake_clamd(clamd_answers(pong=b'PANG\0'))
    assert make_plugin(server.address).lint() is False
    assert 'Got Pong: PANG' in capsys.readouterr().out


def test_lint_fails_when_eicar_is_not_found(fake_clamd, capsys):
    server = fake_clamd(clamd_answers(scan=b'stream: OK\0'))
    assert make_plugin(server.address).lint() is False
    assert 'EICAR' in capsys.readouterr().out


def test_lint_fails_when_clamd_is_down(capsys):
    plugin = make_plugin('/nonexistent/clamd.sock')
    assert plugin.lint() is False
    assert 'ERROR' in capsys.readouterr().out


def test_lint_fails_on_an_invalid_action(fake_clamd, capsys):
    server = fake_clamd(clamd_answers())
    assert make_plugin(server.address, virusaction='EXPLODE').lint() is False
    assert 'virusaction' in capsys.readouterr().out


def test_loader_alias_and_custom_section():
    config = fuglu.load_config(embedded=fuglu.EMBEDDED_CONFIG)
    config.read_config_text('[main]\nplugins = clamav, clamav(ClamSecondary)\n')
    first, second = fuglu.load_plugins(config, 'plugins')
    assert isinstance(first, ClamavPlugin) and first.section == 'ClamavPlugin'
    assert str(first) == 'Clam AV'
    assert second.section == 'ClamSecondary' and str(second) == 'Clam AV(ClamSecondary)'


# -- clamscan fallback ------------------------------------------------------------------

def fake_clamscan(tmp_path, output, status):
    """A stand-in clamscan program: reads the message, prints ``output``, exits ``status``."""
    program = tmp_path / 'clamscan'
    program.write_text('#!/bin/sh\ncat > "%s"\nprintf "%%s\\n" "%s"\nexit %d\n'
                       % (tmp_path / 'scanned', output, status))
    program.chmod(0o755)
    return str(program)


@pytest.mark.parametrize('output, status, expected', [
    ('stdin: Eicar-Test-Signature FOUND', 1, fuglu.DELETE),
    ('stdin: OK', 0, fuglu.DUNNO),
    ('LibClamAV Error: no database', 2, fuglu.DEFER),
])
def test_clamscan_fallback_when_clamd_is_down(tmp_path, output, status, expected):
    program = fake_clamscan(tmp_path, output, status)
    plugin = make_plugin('/nonexistent/clamd.sock', retries='1', clamscanfallback='True',
                         clamscan=program)
    suspect = make_suspect()
    result = plugin.examine(suspect)
    assert (result[0] if isinstance(result, tuple) else result) == expected
    assert (tmp_path / 'scanned').read_bytes().endswith(suspect.get_source())
