"""`fuglu client` and `fuglu healthcheck`, run as a user would: as subprocesses of
fuglu.py and of the built fuglu.pyz, against connectors running in this process."""

import os
import socket
import struct
import subprocess
import sys
import threading

import pytest

from helpers import InProcessFuglu, VerdictFromHeaderPlugin, free_port, stop_listening

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGE = b'From: a@example.org\nTo: b@example.org\nSubject: client test\n\nhello\n'


@pytest.fixture(scope='module')
def pyz(tmp_path_factory):
    target = str(tmp_path_factory.mktemp('pyz') / 'fuglu.pyz')
    subprocess.run([sys.executable, os.path.join(REPO, 'build_zipapp.py'), '-o', target],
                   check=True,
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    return target


@pytest.fixture(params=['fuglu.py', 'fuglu.pyz'])
def program(request):
    if request.param == 'fuglu.pyz':
        return request.getfixturevalue('pyz')
    return os.path.join(REPO, 'fuglu.py')


def run(program, *args, stdin=b''):
    return subprocess.run([sys.executable, program] + [str(a) for a in args], input=stdin,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)


@pytest.fixture(scope='module')
def netcat():
    instance = InProcessFuglu(9, protocol='netcat', plugins='helpers.VerdictFromHeaderPlugin')
    yield instance
    instance.stop()


@pytest.fixture(scope='module')
def smtp():
    instance = InProcessFuglu(free_port(), protocol='smtp')
    yield instance
    instance.stop()


@pytest.fixture(scope='module')
def esmtp():
    instance = InProcessFuglu(free_port(), protocol='esmtp')
    yield instance
    instance.stop()


# -- fuglu client -------------------------------------------------------------------

def test_client_clean_message_exits_0_and_prints_dunno(program, netcat):
    result = run(program, 'client', '--port', netcat.port, stdin=MESSAGE)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b'DUNNO\n'


def test_client_output_option_writes_the_scanned_message(program, netcat):
    result = run(program, 'client', '--port', netcat.port, '-o', stdin=MESSAGE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b'X-Fuglu-Spamstatus: NO\nX-Fuglu-Suspect: ')
    assert result.stdout.endswith(MESSAGE)
    assert result.stderr == b'DUNNO\n'


@pytest.mark.parametrize('verdict, code, text', [
    ('REJECT not today', 3, b'REJECT: not today ('),
    ('DEFER later please', 4, b'DEFER: later please ('),
    ('DELETE', 2, b'DISCARD: OK ('),
])
def test_client_exit_code_per_verdict(program, netcat, verdict, code, text):
    result = run(program, 'client', '--port', netcat.port,
                 stdin=b'X-Test-Verdict: %s\n' % verdict.encode() + MESSAGE)
    assert result.returncode == code, result.stderr
    assert result.stdout.startswith(text)


def test_client_sends_the_envelope(netcat, tmp_path):
    VerdictFromHeaderPlugin.seen[:] = []
    eml = tmp_path / 'message.eml'
    eml.write_bytes(MESSAGE)
    result = run(os.path.join(REPO, 'fuglu.py'), 'client', '--port', netcat.port, '-i', str(eml),
                 '--sender', 'alice@example.org', '-r', 'bob@example.com', '-r',
                 'carol@example.com')
    assert result.returncode == 0, result.stderr
    sender, recipients, tags, source = VerdictFromHeaderPlugin.seen[-1]
    assert (sender, recipients, source) == ('alice@example.org',
                                            ['bob@example.com', 'carol@example.com'], MESSAGE)


def test_client_without_a_connector_exits_1(program):
    result = run(program, 'client', '--port', free_port(), stdin=MESSAGE)
    assert result.returncode == 1
    assert b'netcat connector 127.0.0.1:' in result.stderr


def test_client_talking_to_something_else_exits_1(smtp):
    result = run(os.path.join(REPO, 'fuglu.py'), 'client', '--port', smtp.port, '-t', '5',
                 stdin=MESSAGE)
    assert result.returncode == 1
    assert b'unexpected reply' in result.stderr


# -- fuglu healthcheck ----------------------------------------------------------------

def test_healthcheck_of_running_connectors_exits_0(program, smtp, esmtp, netcat):
    for connector, port in (('smtp', smtp.port), ('esmtp', esmtp.port), ('netcat', netcat.port)):
        result = run(program, 'healthcheck', connector, '127.0.0.1:%d' % port)
        assert result.returncode == 0, (connector, result.stdout, result.stderr)
        assert b' OK ' in result.stdout


def test_healthcheck_of_the_wrong_kind_of_connector_exits_1(program, smtp, netcat):
    assert (run(program, 'healthcheck', 'netcat', '127.0.0.1:%d' % smtp.port, '-t', '3').returncode
            == 1)
    assert (run(program, 'healthcheck', 'smtp', '127.0.0.1:%d' % netcat.port, '-t', '3').returncode
            == 1)


def test_healthcheck_of_nothing_listening_exits_1(program):
    for connector in ('smtp', 'esmtp', 'netcat', 'milter'):
        result = run(program, 'healthcheck', connector, '127.0.0.1:%d' % free_port())
        assert result.returncode == 1
        assert b' FAIL ' in result.stdout


def test_healthcheck_usage_errors(program):
    assert run(program, 'healthcheck', 'smtp', 'no-port-here').returncode == 2
    assert run(program, 'healthcheck', 'pop3', '127.0.0.1:110').returncode == 2


class FakeMilter(object):
    """Answers one OPTNEG packet with the given reply bytes and records the request."""

    def __init__(self, reply):
        self.reply = reply
        self.requests = []
        self.listener = socket.socket()
        self.listener.bind(('127.0.0.1', 0))
        self.listener.listen(5)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with connection:
                request = b''
                while len(request) < 4 or len(request) < 4 + struct.unpack('>I', request[:4])[0]:
                    chunk = connection.recv(4096)
                    if not chunk:
                        break
                    request += chunk
                self.requests.append(request)
                connection.sendall(self.reply)

    def stop(self):
        stop_listening(self.listener)


def test_healthcheck_milter_sends_optneg_and_wants_an_optneg_back(program):
    optneg = b'O' + struct.pack('>III', 6, 0x1FF, 0x1FFFFF)
    healthy = FakeMilter(struct.pack('>I', len(optneg)) + optneg)
    confused = FakeMilter(struct.pack('>I', 1) + b't')   # SMFIR_TEMPFAIL
    try:
        assert run(program, 'healthcheck', 'milter', '127.0.0.1:%d' % healthy.port).returncode == 0
        assert healthy.requests == [struct.pack('>I', 13) + optneg]
        assert run(program, 'healthcheck', 'milter', '127.0.0.1:%d' % confused.port).returncode == 1
    finally:
        healthy.stop()
        confused.stop()
