"""What only the process backend does: a worker that dies (kill -9), hangs on a message
(stuck_worker_timeout) or has served max_requests_per_worker connections is replaced;
SIGHUP brings new workers with the new configuration while the old ones finish;
SIGTERM drains; a daemonized start reports back; the workers run as the daemon user.
fuglu runs as a daemon of its own (test_backends.Daemon); every wait is on an event:
a reply, a file the test plugin makes, a log line, the control socket."""

import os
import re
import signal
import subprocess
import sys

import pytest

from helpers import FUGLU_SCRIPT, RawClient, fuglu, make_config, readable_tmp, run_fuglu_lint, \
    wait_for
from test_backends import Daemon, message, peers, smtp_send
from test_milter import MilterClient

assert readable_tmp   # a fixture of helpers.py, used here


@pytest.fixture
def start_daemon():
    """Call with (main='', performance='') for a started Daemon on the process backend."""
    started = []

    def start(**options):
        daemon = Daemon('process', **options)
        started.append(daemon)
        return daemon.start()
    yield start
    for daemon in started:
        daemon.stop()


def worker_pids(daemon, state='idle'):
    """pids of the workers in ``state`` (workerlist)."""
    return [int(pid) for pid in re.findall(r'pid (\d+), %s' % re.escape(state),
                                           daemon.control('workerlist'))]


def hold_a_message(daemon, client):
    """Send a WAIT message on the smtp connection ``client``; returns the pid of the
    worker that holds it (the test plugin tells, by a file in the gate folder)."""
    for line in ('EHLO client.example.org', 'MAIL FROM:<a@example.org>', 'RCPT TO:<b@example.org>',
                 'DATA'):
        assert client.cmd(line)[:1] in b'23'
    before = set(os.listdir(daemon.gate))
    client.send(message('WAIT') + b'.\r\n')
    assert wait_for(lambda: set(os.listdir(daemon.gate)) - before, timeout=20)
    name, = set(os.listdir(daemon.gate)) - before
    return int(name.split('.')[1])


def connection_dropped(read):
    """True when ``read()`` finds the connection closed (nothing more, or a reset)."""
    try:
        return read() == b''
    except (ConnectionResetError, EOFError):
        return True


def release(daemon):
    open(os.path.join(daemon.gate, 'release'), 'w').close()


# -- crash containment -------------------------------------------------------------------------

def test_a_worker_killed_mid_message_is_replaced_and_the_client_gets_no_2xx(start_daemon):
    daemon = start_daemon()
    client = RawClient(daemon.ports['smtp'], timeout=30)
    try:
        pid = hold_a_message(daemon, client)
        os.kill(pid, signal.SIGKILL)
        assert connection_dropped(client.reply)
    finally:
        client.close()
    daemon.wait_log(r'worker-\d+ \(pid %d\) died \(killed by signal 9 \(SIGKILL\)\) while serving '
                    r'1 connection\(s\): 127\.0\.0\.1:\d+ smtp message [0-9a-f]{32}; they were '
                    r'closed without an answer' % pid)
    assert wait_for(lambda: len(worker_pids(daemon)) == 2, timeout=10)
    assert pid not in worker_pids(daemon)
    assert 'fuglu_worker_restarts_total{reason="crashed"} 1' in daemon.control('metrics')
    assert smtp_send(daemon.ports['smtp'], message())[0] == 250
    assert len(daemon.sink.messages) == 1   # the killed message never went downstream


def test_a_killed_milter_worker_leaves_the_mta_without_a_verdict(start_daemon):
    daemon = start_daemon()
    client = MilterClient(daemon.ports['milter'], timeout=30).start()
    before = set(os.listdir(daemon.gate))
    try:
        client.macro(fuglu.SMFIC_MAIL, i='4QUEUE1', mail_addr='a@example.org')
        client.event(fuglu.SMFIC_MAIL, fuglu.milter_strings('<a@example.org>'))
        client.event(fuglu.SMFIC_RCPT, fuglu.milter_strings('<b@example.org>'))
        client.event(fuglu.SMFIC_HEADER, fuglu.milter_strings('X-Test-Verdict', 'WAIT'))
        client.event(fuglu.SMFIC_EOH)
        client.send(fuglu.SMFIC_BODYEOB)
        assert wait_for(lambda: set(os.listdir(daemon.gate)) - before, timeout=20)
        name, = set(os.listdir(daemon.gate)) - before
        os.kill(int(name.split('.')[1]), signal.SIGKILL)
        assert connection_dropped(client.read)    # no accept/continue: Postfix tempfails
    finally:
        client.close()
    daemon.wait_log(r'died \(killed by signal 9 \(SIGKILL\)\) while serving 1 connection\(s\): '
                    r'127\.0\.0\.1:\d+ milter message [0-9a-f]{32}')


def test_a_worker_stuck_on_a_message_is_killed_and_replaced(start_daemon):
    daemon = start_daemon(performance='stuck_worker_timeout = 1')
    client = RawClient(daemon.ports['smtp'], timeout=30)
    try:
        pid = hold_a_message(daemon, client)     # never released
        assert connection_dropped(client.reply)
    finally:
        client.close()
    daemon.wait_log(r'worker-\d+ \(pid %d\) stuck on message [0-9a-f]{32} for \d+ s '
                    r'\(stuck_worker_timeout\): killing it' % pid)
    assert wait_for(lambda: len(worker_pids(daemon)) == 2, timeout=10)
    assert 'fuglu_worker_restarts_total{reason="stuck"} 1' in daemon.control('metrics')
    assert smtp_send(daemon.ports['smtp'], message())[0] == 250


def test_max_requests_per_worker_recycles_workers(start_daemon):
    daemon = start_daemon(performance='initialprocs = 1\nmax_requests_per_worker = 2')
    for _ in range(5):
        assert smtp_send(daemon.ports['smtp'], message())[0] == 250
    workers = [fuglu_header(delivery, 'X-Test-Worker') for delivery in daemon.sink.messages]
    assert len(workers) == 5
    assert workers[0] == workers[1] != workers[2] == workers[3] != workers[4], workers
    daemon.wait_log(r'worker-1 \(pid %s\) ended \(recycled\) after 2 connections' % workers[0])
    daemon.wait_log(r'worker-2 \(pid %s\) ended \(recycled\) after 2 connections' % workers[2])
    assert 'fuglu_worker_restarts_total{reason="recycled"} 2' in daemon.control('metrics')


def test_a_worker_that_cannot_start_is_retried_while_the_others_serve(start_daemon):
    daemon = start_daemon()
    open(os.path.join(daemon.gate, 'fail-init'), 'w').close()   # new plugin objects fail
    victim = worker_pids(daemon)[0]
    os.kill(victim, signal.SIGKILL)
    daemon.wait_log(r'worker-\d+ could not start: .*plugin initialisation failed on request')
    daemon.wait_log(r'worker-\d+ could not start: (.|\n)*worker-\d+ could not start: ')
    assert smtp_send(daemon.ports['smtp'], message())[0] == 250    # the other worker
    os.unlink(os.path.join(daemon.gate, 'fail-init'))
    assert wait_for(lambda: len(worker_pids(daemon)) == 2, timeout=30)


def fuglu_header(delivery, name):
    match = re.search(rb'^' + name.encode() + rb': ([^\r\n]*)', delivery['data'], re.M)
    return match.group(1).decode() if match else None


# -- reload and stop -----------------------------------------------------------------------------

def test_hup_brings_workers_with_the_new_config_while_the_old_ones_finish(start_daemon):
    daemon = start_daemon(main='spamstatusheader = 1')
    old = worker_pids(daemon)
    client = RawClient(daemon.ports['smtp'], timeout=30)
    try:
        holder = hold_a_message(daemon, client)
        with open(daemon.process.config_path, 'w') as conf:
            conf.write(daemon.config_text.replace('spamstatusheader = 1',
                                                  'spamstatusheader = 1\n'
                                                  'prependaddedheaders = X-Reloaded-'))
        os.kill(daemon.process.pid, signal.SIGHUP)
        daemon.wait_log('Reload config complete')
        assert wait_for(lambda: len(set(worker_pids(daemon)) - set(old)) == 2, timeout=20)
        assert holder in worker_pids(daemon, 'retiring (reload)')
        assert smtp_send(daemon.ports['smtp'], message(subject='after'))[0] == 250
        after = daemon.sink.messages[-1]
        assert fuglu_header(after, 'X-Reloaded-Spamstatus') == 'NO'
        assert int(fuglu_header(after, 'X-Test-Worker')) not in old
        release(daemon)
        assert client.reply().startswith(b'250 ')   # the held message, on its old worker
    finally:
        client.close()
    held = daemon.sink.messages[-1]
    assert fuglu_header(held, 'X-Fuglu-Spamstatus') == 'NO'
    assert int(fuglu_header(held, 'X-Test-Worker')) == holder
    daemon.wait_log(r'\(pid %d\) ended \(reload\) after 1 connections' % holder)
    for pid in old:
        assert wait_for(lambda: not peers.pid_is_alive(pid), timeout=10)


def test_term_lets_the_message_in_flight_finish_then_ends_every_process(start_daemon):
    daemon = start_daemon()
    workers = worker_pids(daemon)
    client = RawClient(daemon.ports['smtp'], timeout=30)
    try:
        hold_a_message(daemon, client)
        os.kill(daemon.process.pid, signal.SIGTERM)
        daemon.wait_log('stopping: finishing the messages in flight')
        release(daemon)
        assert client.reply().startswith(b'250 ')
    finally:
        client.close()
    assert daemon.process.process.wait(timeout=30) == 0
    assert len(daemon.sink.messages) == 1
    for pid in workers:
        assert wait_for(lambda: not peers.pid_is_alive(pid), timeout=10)


# -- start-up ------------------------------------------------------------------------------------

def test_a_daemonized_start_returns_once_the_workers_serve():
    daemon = Daemon('process', main='daemonize = 1')
    workdir = daemon.workdir
    pidfile = os.path.join(workdir, 'fuglu.pid')
    logconfig = os.path.join(workdir, 'logging.conf')
    log_path = os.path.join(workdir, 'fuglu.log')
    if os.geteuid() == 0:
        peers.chown_tree(workdir, 'nobody')    # the daemon user writes its log there
    with open(logconfig, 'w') as conf:
        conf.write('[loggers]\nkeys=root\n[handlers]\nkeys=file\n[formatters]\nkeys=plain\n'
                   '[logger_root]\nlevel=INFO\nhandlers=file\n[handler_file]\nclass=FileHandler\n'
                   'formatter=plain\nargs=(%r,)\n[formatter_plain]\nformat=%%(message)s\n'
                   % log_path)
    daemon.ports = {'smtp': peers.free_port(), 'esmtp': peers.free_port(),
                    'netcat': peers.free_port(), 'milter': peers.free_port()}
    from test_backends import CONFIG
    config_path = os.path.join(workdir, 'fuglu.conf')
    with open(config_path, 'w') as conf:
        conf.write(CONFIG.format(sink=daemon.sink.port, workdir=workdir, backend='process',
                                 main='daemonize = 1', performance='', **daemon.ports))
    pid = None
    try:
        # the starter waits until the daemon serves: a copy of its pipe in a forked
        # process would keep it waiting (timeout)
        result = subprocess.run([sys.executable, FUGLU_SCRIPT, '-c', config_path, '--pidfile',
                                 pidfile, '--logconfig', logconfig], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        assert result.returncode == 0, result.stdout
        with open(pidfile) as handle:
            pid = int(handle.read())
        assert smtp_send(daemon.ports['smtp'], message())[0] == 250
        assert 'worker processes' in daemon.control('workerlist')
    finally:
        if pid is not None:
            peers.stop_pid(pid, timeout=30)
        daemon.sink.stop()
        peers.remove_world_dir(workdir)
    assert not os.path.exists(pidfile)


def uids(pid):
    with open('/proc/%d/status' % pid) as status:
        return re.search(r'^Uid:\s+(.*)$', status.read(), re.M).group(1).split()


def test_the_fork_server_and_the_workers_run_as_the_daemon_user(start_daemon):
    daemon = start_daemon()
    parent = daemon.process.pid
    fork_server, = peers.child_pids(parent)
    workers = peers.child_pids(fork_server)
    assert sorted(workers) == sorted(worker_pids(daemon))
    expected = [str(os.getuid())] * 4
    if os.geteuid() == 0:
        import pwd
        expected = [str(pwd.getpwnam('nobody').pw_uid)] * 4
    for pid in [parent, fork_server] + workers:
        assert uids(pid) == expected, pid


def test_asyncprocess_is_served_by_the_process_backend(readable_tmp, start_daemon):
    daemon = start_daemon(performance='backend = asyncprocess')
    assert daemon.control('workerlist').startswith('Total 2 worker processes')
    conf = readable_tmp / 'fuglu.conf'
    conf.write_text('[main]\nincomingport = milter:127.0.0.1:%d\nplugins =\nprependers =\n'
                    'appenders =\ncontrolport =\n[performance]\nbackend = asyncprocess\n'
                    'initialprocs = 2\n' % peers.free_port())
    status, output = run_fuglu_lint(conf)
    assert status == 0, output
    assert '(backend asyncprocess is served by the process backend)' in output, output


@pytest.mark.parametrize('value, cpus, expected', [
    ('0', 4, 8), ('3', 4, 3), ('1', 4, 1), ('0.5', 4, 2), ('-1.5', 4, 6), ('0.1', 4, 1),
    ('-0.25', 2, 1)])
def test_initialprocs_as_fuglu_reads_it(monkeypatch, value, cpus, expected):
    monkeypatch.setattr(fuglu, 'usable_cpus', lambda: cpus)
    config = make_config('[performance]\ninitialprocs = %s\n' % value)
    assert fuglu.worker_process_count(config) == expected
