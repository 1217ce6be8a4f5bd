"""Running fuglu as a service: files in shared directories, the pid file, systemd's
notify protocol (against a fake notify socket, through the real daemon), log reopening,
metrics, MRTG files, timing lines and the lint checks that need no root. The tests that
need root (privilege drop, lint as the daemon user) are in tests/integration."""

import logging
import os
import re
import socket
import stat
import subprocess
import sys
import time

import pytest

from helpers import FUGLU_SCRIPT, Sink, free_port, fuglu, make_config

MESSAGE = b'From: a@example.org\r\nTo: b@example.org\r\nSubject: service\r\n\r\nhello\r\n'


# -- files in shared directories ------------------------------------------------------

@pytest.fixture
def sticky_dir(tmp_path):
    """A directory like /tmp: anybody may create entries, only owners remove theirs."""
    path = tmp_path / 'shared'
    path.mkdir()
    os.chmod(str(path), 0o1777)
    return path


def test_a_path_in_a_world_writable_directory_is_moved(sticky_dir, monkeypatch):
    monkeypatch.setattr(fuglu, 'STARTED_AS_ROOT', True)
    assert fuglu.shared_file_path(str(sticky_dir / 'fuglu_control.sock'),
                                  'run') == '/run/fuglu/fuglu_control.sock'
    assert fuglu.shared_directory(str(sticky_dir), 'archive') == '/var/lib/fuglu/archive'
    monkeypatch.setattr(fuglu, 'STARTED_AS_ROOT', False)
    private = str(sticky_dir / ('fuglu-%s' % fuglu.current_user_name()))
    assert fuglu.shared_file_path(str(sticky_dir / 'debug.log'), 'log') == os.path.join(private,
                                                                                        'debug.log')
    assert fuglu.shared_directory(str(sticky_dir), 'archive') == os.path.join(private, 'archive')
    # a directory only its owner may write to is used as it is
    os.chmod(str(sticky_dir), 0o755)
    assert fuglu.shared_file_path(str(sticky_dir / 'debug.log'),
                                  'log') == str(sticky_dir / 'debug.log')


def test_a_squatted_private_directory_is_refused(sticky_dir):
    private = str(sticky_dir / 'fuglu-someone')
    os.mkdir(private, 0o700)   # ours, but not the uid we pretend to have: refused
    with pytest.raises(fuglu.UnsafeLocation, match='belongs to uid %d' % os.getuid()):
        fuglu.open_directory(private, owners={4242})
    os.rmdir(private)
    os.symlink(str(sticky_dir.parent), private)   # a link where the directory should be
    with pytest.raises(fuglu.UnsafeLocation, match='link'):
        fuglu.open_directory(private, create_mode=0o700)


def test_open_directory_refuses_group_writable_and_foreign_directories(tmp_path):
    loose = tmp_path / 'loose'
    loose.mkdir()
    os.chmod(str(loose), 0o775)
    with pytest.raises(fuglu.UnsafeLocation, match='writable by group or others'):
        fuglu.open_directory(str(loose))
    os.close(fuglu.open_directory(str(loose), check_mode=False))
    made = tmp_path / 'made'
    fd = fuglu.open_directory(str(made), create_mode=0o700)
    os.close(fd)
    assert stat.S_IMODE(os.stat(str(made)).st_mode) == 0o700
    with pytest.raises(fuglu.UnsafeLocation, match='belongs to uid'):
        fuglu.open_directory(str(made), owners={os.geteuid() + 1})


def test_create_file_at_replaces_a_planted_link_and_never_writes_through_it(tmp_path):
    victim = tmp_path / 'victim'
    victim.write_bytes(b'precious\n')
    directory = tmp_path / 'dir'
    directory.mkdir()
    os.symlink(str(victim), str(directory / 'debug.log'))
    os.link(str(victim), str(directory / 'hard.log'))
    dir_fd = fuglu.open_directory(str(directory))
    try:
        with fuglu.create_file_at(dir_fd, 'debug.log') as out:
            out.write(b'debug line\n')
        fuglu.write_file_at(dir_fd, 'hard.log', b'new content\n')
        os.symlink(str(victim), str(directory / 'other.log'))
        with pytest.raises(fuglu.UnsafeLocation, match='link'):
            fuglu.append_file_at(dir_fd, 'other.log')
    finally:
        os.close(dir_fd)
    assert victim.read_bytes() == b'precious\n'
    assert not os.path.islink(str(directory / 'debug.log'))
    assert (directory / 'debug.log').read_bytes() == b'debug line\n'
    assert (directory / 'hard.log').read_bytes() == b'new content\n'
    assert [name for name in os.listdir(str(directory)) if name.startswith('.')] == []


def test_append_file_at_refuses_a_file_with_a_second_name(tmp_path):
    victim = tmp_path / 'victim'
    victim.write_bytes(b'precious\n')
    os.link(str(victim), str(tmp_path / 'trash.log'))
    dir_fd = fuglu.open_directory(str(tmp_path))
    try:
        with pytest.raises(fuglu.UnsafeLocation, match='plain file'):
            fuglu.append_file_at(dir_fd, 'trash.log')
        with fuglu.append_file_at(dir_fd, 'fresh.log') as log:
            log.write(b'one\n')
        with fuglu.append_file_at(dir_fd, 'fresh.log') as log:
            log.write(b'two\n')
    finally:
        os.close(dir_fd)
    assert victim.read_bytes() == b'precious\n'
    assert (tmp_path / 'fresh.log').read_bytes() == b'one\ntwo\n'


# -- pid file ---------------------------------------------------------------------------

def test_a_live_pid_file_is_never_overwritten(tmp_path):
    path = str(tmp_path / 'fuglu.pid')
    holder = subprocess.Popen([sys.executable, '-c', '''
import sys; sys.path.insert(0, %r)
import fuglu
pid = fuglu.PidFile(%r).acquire()
print('locked', flush=True)
sys.stdin.read()
pid.release()
''' % (os.path.dirname(FUGLU_SCRIPT), path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b'locked\n'
        with open(path) as handle:
            assert handle.read() == '%d\n' % holder.pid
        with pytest.raises(fuglu.AlreadyRunning, match='pid %d' % holder.pid):
            fuglu.PidFile(path).acquire()
        with open(path) as handle:
            assert handle.read() == '%d\n' % holder.pid     # untouched
    finally:
        holder.stdin.close()
        holder.wait(10)
    assert not os.path.exists(path)     # removed by its owner at exit
    # a stale pid file (no process holds its lock) is taken over
    with open(path, 'w') as handle:
        handle.write('99999\n')
    pid = fuglu.PidFile(path).acquire()
    with open(path) as handle:
        assert handle.read() == '%d\n' % os.getpid()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    pid.release()
    assert not os.path.exists(path)


def test_a_pid_file_that_is_a_link_is_refused(tmp_path):
    victim = tmp_path / 'victim'
    victim.write_text('precious\n')
    os.symlink(str(victim), str(tmp_path / 'fuglu.pid'))
    with pytest.raises(fuglu.UnsafeLocation):
        fuglu.PidFile(str(tmp_path / 'fuglu.pid')).acquire()
    assert victim.read_text() == 'precious\n'


# -- sd_notify ----------------------------------------------------------------------------

class FakeNotifySocket(object):
    """systemd's end of the notify protocol: a unix datagram socket, path or abstract."""

    def __init__(self, path=None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if path is None:
            name = 'fuglu-test-%s' % os.urandom(6).hex()
            self.sock.bind('\0' + name)
            self.address = '@' + name
        else:
            self.sock.bind(path)
            os.chmod(path, 0o777)   # the daemon sends after dropping privileges
            self.address = path
        self.sock.settimeout(30)

    def receive(self):
        """The fields of the next datagram as a dict."""
        data = self.sock.recv(4096).decode()
        return dict(line.split('=', 1) for line in data.split('\n') if line)

    def receive_until(self, key):
        while True:
            fields = self.receive()
            if key in fields:
                return fields

    def close(self):
        self.sock.close()


def test_notify_sends_one_datagram_to_a_path_or_an_abstract_socket(tmp_path, monkeypatch):
    for fake in (FakeNotifySocket(), FakeNotifySocket(str(tmp_path / 'notify'))):
        monkeypatch.setenv('NOTIFY_SOCKET', fake.address)
        assert fuglu.notify_service_manager('READY=1', 'STATUS=fine') is True
        assert fake.receive() == {'READY': '1', 'STATUS': 'fine'}
        fake.close()
    monkeypatch.delenv('NOTIFY_SOCKET')
    assert fuglu.notify_service_manager('READY=1') is False


def test_the_daemon_speaks_the_notify_protocol(tmp_path):
    """READY once listening, RELOADING (with MONOTONIC_USEC) and READY on SIGHUP,
    STOPPING on SIGTERM, each from the daemon's main pid."""
    notify = FakeNotifySocket()   # abstract: reachable after the daemon dropped privileges
    port = free_port()
    conf = tmp_path / 'fuglu.conf'
    conf.write_text('[main]\nincomingport = smtp:127.0.0.1:%d\noutgoingport = %d\nplugins '
                    '=\nprependers =\nappenders =\ncontrolport =\nidentifier = '
                    'notifytest\n' % (port, free_port()))
    env = dict(os.environ, NOTIFY_SOCKET=notify.address)
    with open(str(tmp_path / 'fuglu.log'), 'wb') as log:
        daemon = subprocess.Popen([sys.executable, FUGLU_SCRIPT, '-f', '-c', str(conf)], env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        ready = notify.receive_until('READY')
        assert ready['READY'] == '1' and ready['MAINPID'] == str(daemon.pid)
        assert 'notifytest' in ready['STATUS']
        with socket.create_connection(('127.0.0.1', port), timeout=10) as client:   # it listens
            assert client.recv(100).startswith(b'220 ')
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        daemon.send_signal(1)   # SIGHUP
        reloading = notify.receive_until('RELOADING')
        assert reloading['RELOADING'] == '1'
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert before <= int(reloading['MONOTONIC_USEC']) <= after
        assert notify.receive_until('READY')['READY'] == '1'
        daemon.terminate()
        assert notify.receive_until('STOPPING')['STOPPING'] == '1'
        assert daemon.wait(30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        notify.close()


def test_a_failed_start_tells_systemd_and_exits_nonzero(tmp_path):
    notify = FakeNotifySocket()
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen(1)
        conf = tmp_path / 'fuglu.conf'
        conf.write_text('[main]\nincomingport = smtp:127.0.0.1:%d\nplugins =\nprependers '
                        '=\nappenders =\ncontrolport =\n' % taken.getsockname()[1])
        result = subprocess.run([sys.executable, FUGLU_SCRIPT, '-f', '-c', str(conf)], timeout=60,
                                env=dict(os.environ, NOTIFY_SOCKET=notify.address),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert result.returncode == 1
    assert b'Address already in use' in result.stdout
    fields = notify.receive()
    assert 'start-up failed' in fields['STATUS'] and 'READY' not in fields
    notify.close()


# -- logging --------------------------------------------------------------------------------

def test_reopen_log_files_follows_a_rotated_file(tmp_path):
    path = tmp_path / 'fuglu.log'
    handler = logging.FileHandler(str(path))
    logger = logging.getLogger('fuglu.test.reopen')
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning('before')
        os.rename(str(path), str(tmp_path / 'fuglu.log.1'))   # what logrotate does
        logger.warning('still to the moved file')
        assert str(path) in fuglu.reopen_log_files()
        logger.warning('after')
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert (tmp_path / 'fuglu.log.1').read_text() == 'before\nstill to the moved file\n'
    assert path.read_text() == 'after\n'


def test_the_log_folder_is_laid_out_only_for_a_logging_config_that_writes_there(tmp_path):
    home = os.path.dirname(fuglu.DAEMON_LOG_FILE)
    bundled = tmp_path / 'bundled.conf'
    bundled.write_text('[handler_file]\nargs=(%r, "a")\n' % fuglu.DAEMON_LOG_FILE)
    elsewhere = tmp_path / 'elsewhere.conf'
    elsewhere.write_text('[handler_file]\nargs=(%r, "a")\n' % str(tmp_path / 'fuglu.log'))
    assert fuglu.names_log_home(str(bundled), home)
    assert not fuglu.names_log_home(str(elsewhere), home)
    assert not fuglu.names_log_home(None, home)
    assert fuglu.names_log_home(str(tmp_path / 'missing.conf'), home)


def test_syslog_lines_carry_facility_mail_and_the_pid(tmp_path):
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / 'log'))
    receiver.settimeout(10)
    config = make_config('[main]\nsyslog = 1\nsyslog_address = %s\n' % (tmp_path / 'log'))
    handler = fuglu.syslog_handler(config)
    logger = logging.getLogger('fuglu.test.syslog')
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning('a line for syslog')
    finally:
        logger.removeHandler(handler)
        handler.close()
    line = receiver.recv(4096).decode()
    receiver.close()
    # <PRI> = facility mail (2) * 8 + warning (4)
    expected = (r'^<20>fuglu\[%d\]: fuglu\.test\.syslog: WARNING a line for syslog\x00?$'
                % os.getpid())
    assert re.match(expected, line), line
    with pytest.raises(fuglu.ConfigProblem, match='facility'):
        fuglu.syslog_handler(make_config('[main]\nsyslog_facility = nosuch\n'))


# -- counters: metrics, MRTG, timings -------------------------------------------------------

@pytest.fixture
def running(request):
    sink = Sink()
    port = free_port()
    config = make_config('[main]\nincomingport = smtp:127.0.0.1:%d\noutgoingport = %d\nplugins = '
                         'helpers.VerdictFromHeaderPlugin\nprependers =\nappenders =\ncontrolport '
                         '=\nscantimelogger = 1\n[performance]\nminthreads = 2\nmaxthreads = 4\n'
                         % (port, sink.port))
    controller = fuglu.MainController(config)
    controller.startup()
    yield controller, port, sink
    controller.shutdown()
    sink.stop()


def send(port, message):
    import smtplib
    with smtplib.SMTP('127.0.0.1', port, timeout=30) as client:
        try:
            client.sendmail('a@example.org', ['b@example.org'], message)
            return 250
        except smtplib.SMTPResponseException as error:
            return error.smtp_code


def test_metrics_in_the_prometheus_text_format(running):
    parser = pytest.importorskip('prometheus_client.parser')
    controller, port, _sink = running
    assert send(port, MESSAGE) == 250
    assert send(port,
                MESSAGE.replace(b'Subject: service',
                                b'X-Test-Verdict: REJECT\r\nSubject: x')) == 550
    text = fuglu.metrics_text(controller)
    families = {family.name: family for family in parser.text_string_to_metric_families(text)}
    verdicts = {sample.labels['verdict']: sample.value
                for sample in families['fuglu_messages'].samples
                if sample.name == 'fuglu_messages_total'}
    assert verdicts == {'dunno': 1, 'accept': 0, 'delete': 0, 'reject': 1, 'defer': 0}
    runs = [sample for sample in families['fuglu_plugin_runs'].samples]
    assert [(s.labels['stage'], s.value) for s in runs] == [('scanner', 2)]
    assert families['fuglu_messages_in_flight'].samples[0].value == 0
    workers = {sample.labels['state']: sample.value for sample in families['fuglu_workers'].samples}
    assert workers['limit'] == 4 and workers['busy'] + workers['idle'] >= 2
    assert families['fuglu_info'].samples[0].labels['identifier'] == 'dist'


def test_metrics_listener_serves_loopback_only(running):
    with pytest.raises(ValueError, match='loopback'):
        fuglu.parse_loopback_listen('192.0.2.1:9100')
    assert fuglu.parse_loopback_listen('9100') == ('127.0.0.1', 9100)
    assert fuglu.parse_loopback_listen('[::1]:9100') == ('::1', 9100)
    controller, port, _sink = running
    controller.config.read_config_text('[main]\nmetrics_listen = %d\n' % free_port(), 'x')
    server = fuglu.MetricsServer(controller)
    server.start()
    try:
        import urllib.request
        with urllib.request.urlopen('http://%s/metrics' % server.address, timeout=10) as answer:
            assert answer.headers['Content-Type'].startswith('text/plain; version=0.0.4')
            assert b'fuglu_messages_total{verdict="dunno"} 0' in answer.read()
    finally:
        server.stop()


def test_mrtg_files_have_fuglus_four_lines(running, tmp_path):
    controller, port, _sink = running
    assert send(port, MESSAGE) == 250
    writer = fuglu.MrtgWriter(controller, str(tmp_path))
    writer.write()
    assert sorted(os.listdir(str(tmp_path))) == ['hamspam', 'inout', 'scantime', 'threads', 'virus']
    inout = (tmp_path / 'inout').read_text().split('\n')
    assert inout[:2] == ['1.0', '1.0'] and inout[3] == 'FuGLU' and inout[2].endswith('seconds')
    assert (tmp_path / 'virus').read_text().split('\n')[:2] == ['0.0', '0']
    assert float((tmp_path / 'scantime').read_text().split('\n')[0]) >= 0
    assert fuglu.mrtg_uptime(3600 * 25 + 61) == '1 day, 1 hour, 1 minute, 1 second'
    assert fuglu.mrtg_uptime(5) == '5 seconds'


def test_scantimelogger_writes_fuglus_timing_lines(running, caplog):
    controller, port, _sink = running
    with caplog.at_level(logging.INFO, logger='fuglu.Timings'):
        assert send(port, MESSAGE) == 250
        assert controller.stats.outcount == 1
    lines = [record.getMessage() for record in caplog.records if record.name == 'fuglu.Timings']
    assert re.match(r'^port: %d, id: [0-9a-f]{32}, total: \d+\.\d{6}$' % port, lines[0]), lines
    assert re.match(r'^port: %d, id: [0-9a-f]{32}, overhead: \d+\.\d{3}$' % port, lines[1])
    plugin_line = r'^port: %d, id: [0-9a-f]{32}, \(PLG\) VerdictFromHeaderPlugin: \d+\.\d{3}$'
    assert re.match(plugin_line % port, lines[2]), lines


# -- lint checks ----------------------------------------------------------------------------

def test_check_ports_names_every_bad_port_value():
    config = make_config('[main]\nincomingport = 10025,smtp:99999\noutgoingport = '
                         '340260\nbounceport = x\ncontrolport = 70000\nmetrics_listen = '
                         '10.0.0.1:9100\n')
    findings = fuglu.check_ports(config) + fuglu.check_listeners(config)
    text = '\n'.join(message for level, message in findings if level == 'error')
    assert "invalid port in incomingport entry 'smtp:99999'" in text
    assert "[main] outgoingport = '340260' is not a port number" in text
    assert "[main] bounceport = 'x' is not a port number" in text
    assert "[main] controlport = '70000' is not a port number" in text
    assert 'only a loopback address' in text
    assert fuglu.check_ports(make_config('[main]\nincomingport = 10025\n')) == []


def test_listener_and_backend_checks_are_what_start_up_refuses_on():
    good = make_config('[main]\nincomingport = 10025, milter:127.0.0.1:10030\n')
    assert [level for level, _text in fuglu.check_listeners(good)] == ['note'] * 3
    assert fuglu.check_backend(good) == []
    bad = make_config('[main]\nincomingport = smtp:10025, lmtp:10026\n'
                      '[performance]\nbackend = nosuch\n')
    findings = fuglu.check_listeners(bad) + fuglu.check_backend(bad)
    errors = [text for level, text in findings if level == 'error']
    assert len(errors) == 2
    assert "unknown protocol 'lmtp'" in errors[0] and "unknown backend 'nosuch'" in errors[1]
    with pytest.raises(fuglu.ConfigProblem, match='lmtp'):
        fuglu.MainController(bad).bind()
    with pytest.raises(fuglu.ConfigProblem, match='nosuch'):
        fuglu.raise_errors(fuglu.check_backend(bad))


def test_check_listen_free_reports_an_address_in_use():
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        findings = fuglu.check_listen_free(make_config('[main]\nincomingport = %d\n' % port))
    assert findings and findings[0][0] == 'error' and 'Address already in use' in findings[0][1]
    assert fuglu.check_listen_free(make_config('[main]\nincomingport = %d\n' % port)) == []


def test_check_downstream_is_a_warning_when_down_and_fine_when_up():
    sink = Sink()
    try:
        config = make_config('[main]\noutgoingport = %d\n' % sink.port)
        assert fuglu.check_downstream(config)[0][0] == 'note'
    finally:
        sink.stop()
    config = make_config('[main]\noutgoingport = %d\n' % free_port())
    level, text = fuglu.check_downstream(config)[0]
    assert level == 'warning' and 'does not answer' in text


def test_a_default_path_may_be_missing_a_configured_one_may_not(tmp_path):
    table = {'rules': {'default': '${confdir}/rules.regex', 'path': 'file',
                       'missing': 'nothing happens'}}
    config = make_config('[x]\n', confdir=str(tmp_path))
    assert fuglu.check_paths(config, 'x', table) == [
        ('note',
         'defaults [x] rules: %s does not exist: nothing happens' % (tmp_path / 'rules.regex'))]
    config = make_config('[x]\nrules = ${confdir}/rule.regex\n', confdir=str(tmp_path))
    assert fuglu.check_paths(config, 'x', table) == [
        ('error', '<test> [x] rules: %s does not exist' % (tmp_path / 'rule.regex'))]
    (tmp_path / 'rule.regex').write_text('')
    assert fuglu.check_paths(config, 'x', table) == []


def test_options_without_effect_are_warnings_when_set():
    config = make_config('[main]\nversioncheck = 1\nconfigdir = '
                         '/etc/fuglu/conf.d\n[environment]\ntrustedhostsregex = x\n')
    findings = fuglu.check_inert_options(config, 'main', fuglu.CORE_DEFAULTS['main'])
    findings += fuglu.check_inert_options(config, 'environment', fuglu.CORE_DEFAULTS['environment'])
    assert [level for level, _text in findings] == ['warning'] * 3
    assert 'versioncheck has no effect in fuglu: fuglu never looks up versions' in findings[0][1]
    assert 'configdir has no effect' in findings[1][1]
    assert 'trustedhostsregex has no effect' in findings[2][1]
    assert fuglu.check_inert_options(make_config('[main]\nidentifier = x\n'), 'main',
                                     fuglu.CORE_DEFAULTS['main']) == []
