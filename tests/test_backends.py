"""The same tests on both backends: fuglu runs as a daemon of its own (a child process,
`fuglu.py -f`, dropping to nobody when the tests run as root), once per backend, with
every connector and the control socket. The process backend's own duties (workers
replaced, recycled, killed when stuck; reload; drain) are in test_process.py.

Each test sees only what a peer sees: replies, the sink, the control socket, the log.
"""

import os
import re
import smtplib
import socket
import sys

import pytest

from helpers import HERE, RawClient, Sink, fuglu, readable_tmp, run_fuglu_lint, wait_for
from test_milter import MilterClient, replycode

sys.path.insert(0, os.path.join(HERE, 'integration'))
import peers  # noqa: E402  (FugluProcess: fuglu as a child process)

assert readable_tmp   # a fixture of helpers.py, used here

BACKENDS = ['thread', 'process']

# A FuGlu-style plugin in a file of its own, as an admin's plugindir holds it: the
# workers of the process backend load it by name like the thread backend does.
PLUGIN_SOURCE = '''\
import os
import time

from fuglu.shared import DUNNO, ScannerPlugin, string_to_actioncode


def malloc_arenas():
    """glibc's malloc arenas in this process after 8 threads allocated at once (zlib
    lets go of the interpreter lock while it compresses, and mallocs its state)."""
    import ctypes
    import re
    import tempfile
    import threading
    import zlib

    def churn():
        for _ in range(30):
            zlib.compress(b'x' * 200000, 9)
    threads = [threading.Thread(target=churn) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    libc = ctypes.CDLL('libc.so.6')
    libc.fdopen.restype = ctypes.c_void_p
    libc.fdopen.argtypes = [ctypes.c_int, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    with tempfile.TemporaryFile() as report:
        stream = libc.fdopen(os.dup(report.fileno()), b'w')
        libc.malloc_info(0, stream)
        libc.fclose(stream)
        report.seek(0)
        return len(re.findall(rb'<heap nr=', report.read()))


class HeaderVerdict(ScannerPlugin):
    """Every message gets X-Test-Worker: <pid>. X-Test-Verdict: ACTION [text] is the
    verdict; CRASH raises; WAIT creates <gate>/entered.<pid> and waits (at most a
    minute) for <gate>/release; ARENAS adds X-Test-Arenas: malloc_arenas(). A new
    instance fails while <gate>/fail-init exists."""

    def __init__(self, config, section=None):
        super().__init__(config, section)
        self.requiredvars = {'gate': {'default': '', 'description': 'folder for WAIT'}}
        gate = config.get(self.section, 'gate') if config.has_option(self.section, 'gate') else ''
        if gate and os.path.exists(os.path.join(gate, 'fail-init')):
            raise RuntimeError('plugin initialisation failed on request')

    def examine(self, suspect):
        suspect.add_header('X-Test-Worker', str(os.getpid()))
        value = (suspect.get_header('X-Test-Verdict') or '').strip()
        if value == 'CRASH':
            raise RuntimeError('a crash the message asked for')
        if value == 'ARENAS':
            suspect.add_header('X-Test-Arenas', str(malloc_arenas()))
            return DUNNO
        if value == 'WAIT':
            gate = self.config.get(self.section, 'gate')
            open(os.path.join(gate, 'entered.%d' % os.getpid()), 'w').close()
            deadline = time.time() + 60
            while not os.path.exists(os.path.join(gate, 'release')):
                if time.time() > deadline:
                    break
                time.sleep(0.01)
            return DUNNO
        if not value:
            return DUNNO
        action, _, text = value.partition(' ')
        return string_to_actioncode(action), text or None
'''

CONFIG = '''\
[main]
incomingport = smtp:127.0.0.1:{smtp}, esmtp:127.0.0.1:{esmtp}, netcat:127.0.0.1:{netcat},
    milter:127.0.0.1:{milter}
outgoinghost = 127.0.0.1
outgoingport = {sink}
plugindir = {workdir}/plugins
plugins = backendtest.HeaderVerdict
prependers =
appenders =
controlport = {workdir}/control.sock
tempdir = {workdir}/gate
trashdir =
versioncheck = 0
{main}

[performance]
backend = {backend}
initialprocs = 2
minthreads = 2
maxthreads = 10
{performance}

[HeaderVerdict]
gate = {workdir}/gate

[milter]
milter_mode = tags
'''


class Daemon(object):
    """fuglu on ``backend`` in a world-readable folder of its own: ports for every
    connector, a Sink downstream, the control socket, the gate folder of the test
    plugin (writable by the daemon user)."""

    def __init__(self, backend, main='', performance=''):
        self.backend = backend
        self.sink = Sink()
        self.workdir = peers.world_dir('fuglu-backend-')
        os.makedirs(os.path.join(self.workdir, 'plugins'))
        with open(os.path.join(self.workdir, 'plugins', 'backendtest.py'), 'w') as plugin:
            plugin.write(PLUGIN_SOURCE)
        self.gate = os.path.join(self.workdir, 'gate')
        os.makedirs(self.gate)
        os.chmod(self.gate, 0o777)
        self.main, self.performance = main, performance
        self.process = None

    def start(self):
        for attempt in range(3):
            self.ports = {name: peers.free_port() for name in ('smtp', 'esmtp', 'netcat',
                                                                'milter')}
            self.config_text = CONFIG.format(sink=self.sink.port, workdir=self.workdir,
                                             backend=self.backend, main=self.main,
                                             performance=self.performance, **self.ports)
            # backend='thread': FugluProcess adds nothing; wait_port=0: no probe
            # connection, which would count as a request a worker served
            self.process = peers.FugluProcess(self.config_text, workdir=self.workdir,
                                              backend='thread', wait_port=0)
            try:
                self.process.start()
                return self
            except (RuntimeError, TimeoutError):
                # a free port was taken meanwhile (tests run in parallel): other ports
                self.process.stop()
                if 'in use' not in self.log() or attempt == 2:
                    raise

    @property
    def control_path(self):
        return os.path.join(self.workdir, 'control.sock')

    def control(self, command):
        return peers.control_command(self.control_path, command)

    def log(self):
        return self.process.log_text() if self.process else ''

    def wait_log(self, pattern, timeout=20):
        return self.process.wait_log(pattern, timeout)

    def stop(self):
        try:
            if self.process is not None:
                self.process.stop()
        finally:
            self.sink.stop()
            peers.remove_world_dir(self.workdir)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def start_daemon():
    """Call with (backend, main='', performance='') for a started Daemon."""
    started = []

    def start(backend, **options):
        daemon = Daemon(backend, **options)
        started.append(daemon)
        return daemon.start()
    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def daemon(start_daemon, backend):
    return start_daemon(backend)


def message(verdict=None, subject='test', body=b'hello\r\n'):
    headers = [b'From: a@example.org', b'To: b@example.org', b'Subject: ' + subject.encode()]
    if verdict:
        headers.append(b'X-Test-Verdict: ' + verdict.encode())
    return b'\r\n'.join(headers) + b'\r\n\r\n' + body


def smtp_send(port, data, sender='a@example.org', recipients=('b@example.org',)):
    """(code, text) of the final reply."""
    with smtplib.SMTP('127.0.0.1', port, timeout=30) as client:
        client.ehlo('client.example.org')
        code, text = client.mail(sender)
        assert code == 250, text
        for recipient in recipients:
            client.rcpt(recipient)
        return client.data(data)


def delivered_header(delivery, name):
    match = re.search(rb'^' + name.encode() + rb': ([^\r\n]*)', delivery['data'], re.M)
    return match.group(1).decode() if match else None


# -- every connector ---------------------------------------------------------------------

def test_smtp_verdicts_and_delivery(daemon):
    code, text = smtp_send(daemon.ports['smtp'], message())
    assert code == 250, text
    assert wait_for(lambda: len(daemon.sink.messages) == 1)
    worker = delivered_header(daemon.sink.messages[0], 'X-Test-Worker')
    assert worker and worker.isdigit()
    assert (int(worker) == daemon.process.pid) == (daemon.backend == 'thread')
    code, text = smtp_send(daemon.ports['smtp'], message('REJECT no thanks'))
    assert code == 550 and b'no thanks' in text
    code, text = smtp_send(daemon.ports['smtp'], message('DEFER later'))
    assert code == 451 and b'later' in text
    code, text = smtp_send(daemon.ports['smtp'], message('DELETE'))
    assert code == 250
    assert daemon.sink.idle()
    assert len(daemon.sink.messages) == 1


def test_esmtp_proxy(daemon):
    code, text = smtp_send(daemon.ports['esmtp'], message(subject='proxied'))
    assert code == 250 and b'ABC123DEF' in text, text
    assert len(daemon.sink.messages) == 1
    assert b'Subject: proxied' in daemon.sink.messages[0]['data']
    code, text = smtp_send(daemon.ports['esmtp'], message('REJECT not here'))
    assert code == 550 and b'not here' in text


def test_netcat(daemon):
    with socket.create_connection(('127.0.0.1', daemon.ports['netcat']), timeout=30) as sock:
        banner = sock.recv(1024)
        assert banner.startswith(b'fuglu')
        sock.sendall(message(subject='piped'))
        sock.shutdown(socket.SHUT_WR)
        reply = peers.read_until_closed(sock)
    assert reply.startswith(b'DUNNO:') and b'Subject: piped' in reply, reply[:200]
    assert b'X-Test-Worker: ' in reply


def test_milter(daemon):
    client = MilterClient(daemon.ports['milter']).start()
    try:
        packets = client.message(headers=(('From', 'a@example.org'), ('Subject', 'milted')))
        assert packets[-1][0] in (b'a', b'c'), packets
        packets = client.message(headers=(('From', 'a@example.org'),
                                          ('X-Test-Verdict', 'REJECT go away')))
        assert replycode(packets).startswith('550') and 'go away' in replycode(packets)
    finally:
        client.quit()


# -- the control socket covers every worker ------------------------------------------------

def test_control_stats_workerlist_exceptionlist_and_metrics(daemon):
    for verdict in (None, None, 'REJECT no', 'CRASH'):
        smtp_send(daemon.ports['smtp'], message(verdict))
    # the crash defers its message (the scanner's problemaction): 2 of 4 go out. Its
    # counters reach the parent after 'in:4 out:2' already holds: wait for them too
    assert wait_for(lambda: 'in:4 out:2' in daemon.control('stats')
                    and 'verdict="defer"} 1' in daemon.control('metrics')
                    and 'RuntimeError' in daemon.control('exceptionlist'))
    stats = daemon.control('stats')
    assert re.search(r'Total msgs:\t4 in:4 out:2', stats), stats
    assert re.search(r'Ham:\t\t3', stats), stats
    workers = daemon.control('workerlist')
    if daemon.backend == 'thread':
        assert re.match(r'Total \d+ worker threads', workers), workers
    else:
        assert workers.startswith('Total 2 worker processes'), workers
        pids = [int(pid) for pid in re.findall(r'pid (\d+), idle', workers)]
        assert len(pids) == 2 and daemon.process.pid not in pids, workers
    exceptions = daemon.control('exceptionlist')
    assert 'RuntimeError: a crash the message asked for' in exceptions, exceptions
    metrics = daemon.control('metrics')
    assert 'fuglu_messages_total{verdict="reject"} 1' in metrics
    assert 'fuglu_messages_total{verdict="dunno"} 2' in metrics
    assert 'fuglu_messages_total{verdict="defer"} 1' in metrics
    assert 'fuglu_plugin_errors_total{plugin="HeaderVerdict"} 1' in metrics
    assert re.search(r'fuglu_plugin_runs_total\{stage="scanner",plugin="HeaderVerdict"\} 4',
                     metrics), metrics


def test_the_malloc_arena_limit_holds_where_messages_are_scanned(daemon):
    # fuglu limits glibc's arenas at start-up; the process backend's workers are forked
    # from it afterwards and keep the limit
    if fuglu.glibc() is None:
        pytest.skip('no glibc: fuglu leaves malloc alone')
    assert smtp_send(daemon.ports['smtp'], message('ARENAS'))[0] == 250
    assert wait_for(lambda: len(daemon.sink.messages) == 1)
    arenas = int(delivered_header(daemon.sink.messages[0], 'X-Test-Arenas'))
    assert 1 <= arenas <= fuglu.MALLOC_ARENAS


def test_a_message_in_flight_shows_in_the_workerlist(daemon):
    client = RawClient(daemon.ports['smtp'])
    try:
        client.cmd('EHLO client.example.org')
        client.cmd('MAIL FROM:<a@example.org>')
        client.cmd('RCPT TO:<b@example.org>')
        client.cmd('DATA')
        client.send(message('WAIT') + b'.\r\n')
        assert wait_for(lambda: os.listdir(daemon.gate), timeout=20)
        assert re.search(r'fuglu_messages_in_flight 1', daemon.control('metrics'))
        workers = daemon.control('workerlist')
        if daemon.backend == 'process':
            entered = int(os.listdir(daemon.gate)[0].split('.')[1])
            assert re.search(r'pid %d, scanning, 1 connections' % entered, workers), workers
            assert re.search(r'127\.0\.0\.1:\d+ smtp, connected [\d.]+ s, message [0-9a-f]{32} '
                             r'for [\d.]+ s', workers), workers
        open(os.path.join(daemon.gate, 'release'), 'w').close()
        assert client.reply().startswith(b'250 ')
    finally:
        client.close()


# -- limits across the whole daemon -----------------------------------------------------------

def test_max_sessions_per_client_counts_connections_on_every_worker(start_daemon, backend):
    daemon = start_daemon(backend, performance='max_sessions_per_client = 2')
    first, second = RawClient(daemon.ports['smtp']), RawClient(daemon.ports['esmtp'])
    try:
        assert first.banner.startswith(b'220') and second.banner.startswith(b'220')
        third = RawClient(daemon.ports['smtp'])
        assert third.banner.startswith(b'421 4.7.0'), third.banner
        third.close()
        first.cmd('QUIT')
        assert wait_for(lambda: RawClient(daemon.ports['smtp']).banner.startswith(b'220'))
    finally:
        first.close()
        second.close()


def test_max_session_time_ends_a_session_on_every_backend(start_daemon, backend):
    daemon = start_daemon(backend, main='max_session_time = 1')
    client = RawClient(daemon.ports['smtp'], timeout=30)
    try:
        assert client.reply().startswith(b'421 4.4.2'), 'no session time limit'
    finally:
        client.close()


def test_lint_names_the_backend_and_its_workers(readable_tmp, backend):
    conf = readable_tmp / 'fuglu.conf'
    conf.write_text('[main]\nincomingport = smtp:127.0.0.1:%d\nplugins =\nprependers =\n'
                    'appenders =\ncontrolport =\n[performance]\nbackend = %s\ninitialprocs = 3\n'
                    'maxthreads = 7\n' % (peers.free_port(), backend))
    status, output = run_fuglu_lint(conf)
    assert status == 0, output
    if backend == 'thread':
        assert 'thread backend: 2 to 7 worker threads' in output, output
    else:
        assert ('process backend: 3 worker processes (initialprocs 3, %d CPUs), each with 2 to '
                '7 threads: up to 21 connections at once' % fuglu.usable_cpus()) in output, output
