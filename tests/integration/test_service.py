"""fuglu as a service, through the real daemon started as root with user=nobody (what
systemd and an init script do): the life cycle with mail in flight through a real
Postfix, start-up failures reported by the exit code, the privilege drop, files that a
local user pre-planted in shared directories, lint as the daemon user, first run,
logging, the admin commands of the pyz and monitoring."""

import os
import pathlib
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import peers  # noqa: E402  (the fixtures come from conftest.py)

FUGLU = os.path.join(peers.REPO_DIR, 'fuglu.py')
PLUGIN_DIR = os.path.join(HERE, 'plugins')
NOBODY = pwd.getpwnam('nobody')



@pytest.fixture(autouse=True)
def started_as_root():
    if os.geteuid() != 0:
        peers._peer_unavailable('these tests start fuglu as root (it drops to nobody)')


def nobody_dir(prefix='fuglu-svc-'):
    """A world-traversable folder that belongs to nobody (the daemon writes there)."""
    path = peers.world_dir(prefix)
    os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    return path


@pytest.fixture
def workdir():
    path = nobody_dir()
    yield path
    peers.remove_world_dir(path)


def message(recipient, subject='service test', body=b'hello\r\n'):
    return (b'From: <sender@example.org>\r\nTo: <' + recipient.encode() + b'>\r\nSubject: ' +
            subject.encode() + b'\r\nMessage-ID: <' + uuid.uuid4().hex.encode() +
            b'@example.org>\r\n\r\n' + body)


def unique(name):
    return '%s-%s@example.net' % (name, uuid.uuid4().hex[:8])


def process_ids(pid):
    """(uids, gids, groups) of a running process, from /proc."""
    with open('/proc/%d/status' % pid) as status:
        text = status.read()
    field = lambda name: re.search(r'^%s:[ \t]*(.*)$' % name, text,
                                   re.M).group(1).split()  # noqa: E731
    return set(map(int, field('Uid'))), set(map(int, field('Gid'))), set(map(int, field('Groups')))


class Daemonized(object):
    """`fuglu.py -c CONF --pidfile PID --logconfig LOG` started daemonized, as root.
    The log goes to workdir/fuglu.log through a logging.conf (workdir belongs to nobody)."""

    def __init__(self, workdir, config_text, program=FUGLU, python=None):
        self.workdir = workdir
        self.config_path = os.path.join(workdir, 'fuglu.conf')
        self.pidfile = os.path.join(workdir, 'fuglu.pid')
        self.log_path = os.path.join(workdir, 'fuglu.log')
        self.logconfig = os.path.join(workdir, 'logging.conf')
        self.program, self.python = program, python or sys.executable
        with open(self.config_path, 'w') as conf:
            conf.write(config_text)
        with open(self.logconfig, 'w') as conf:
            conf.write('[loggers]\nkeys=root\n[handlers]\nkeys=file\n[formatters]\nkeys=plain\n'
                       '[logger_root]\nlevel=INFO\nhandlers=file\n'
                       '[handler_file]\nclass=FileHandler\nformatter=plain\nargs=(%r,)\n'
                       '[formatter_plain]\n'
                       'format=%%(asctime)s %%(name)s: %%(levelname)s %%(message)s\n'
                       % self.log_path)
        self.pid = None

    def start(self, *extra):
        result = subprocess.run([self.python, self.program, '-c', self.config_path, '--pidfile',
                                 self.pidfile,
                                 '--logconfig', self.logconfig] + list(extra),
                                stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        if result.returncode == 0:
            with open(self.pidfile) as handle:
                self.pid = int(handle.read())
        return result

    def log_text(self):
        return peers.read_text(self.log_path)

    def wait_log(self, pattern, timeout=30):
        return peers.wait_log_match(self.log_text, pattern, timeout, 'fuglu log')

    def stop(self):
        if self.pid is not None:
            peers.stop_pid(self.pid, timeout=30)
            self.pid = None


@pytest.fixture
def daemons():
    started = []

    def create(*args, **options):
        daemon = Daemonized(*args, **options)
        started.append(daemon)
        return daemon
    yield create
    for daemon in started:
        daemon.stop()


def gate_config(incoming, outgoing, gatedir, controlport, extra=''):
    return ('[main]\nuser = nobody\ngroup = nogroup\nincomingport = %s\noutgoinghost = '
            '127.0.0.1\noutgoingport = %d\nplugindir = %s\nplugins = gate.Gate\nprependers '
            '=\nappenders =\ncontrolport = %s\n[performance]\nminthreads = 2\nmaxthreads = '
            '10\n[Gate]\ngatedir = %s\n%s'
            % (incoming, outgoing, PLUGIN_DIR, controlport, gatedir, extra))


# -- life cycle: TERM with mail in flight ----------------------------------------------------

@pytest.mark.parametrize('mode', ['daemonized', 'foreground', 'milter'])
def test_term_finishes_the_mail_in_flight_and_cleans_up(mode, postfix_factory, fuglu_factory,
                                                        daemons, workdir):
    """Three messages held inside fuglu (after-queue smtp daemonized and with -f, and
    milter) when SIGTERM arrives: each is delivered exactly once, fuglu exits 0 and
    removes its pid file and control socket."""
    gatedir = nobody_dir('fuglu-gate-')
    rundir = nobody_dir('fuglu-run-')   # like /run/fuglu: the daemon user removes its files
    control = os.path.join(rundir, 'control.sock')
    pidfile = os.path.join(rundir, 'fuglu.pid')
    if mode == 'milter':
        milter_port = peers.free_port()
        postfix = postfix_factory('milter', milter_port=milter_port,
                                  milter_default_action='tempfail')
        config = gate_config('milter:127.0.0.1:%d' % milter_port, peers.free_port(), gatedir,
                             control)
        listen_port = milter_port
    else:
        postfix = postfix_factory('afterqueue')
        config = gate_config('smtp:127.0.0.1:%d' % postfix.filter_port, postfix.reinject_port,
                             gatedir, control)
        listen_port = postfix.filter_port
    senders = []
    try:
        if mode == 'daemonized':
            daemon = daemons(workdir, config)
            daemon.pidfile = pidfile
            result = daemon.start()
            assert result.returncode == 0, result.stdout.decode()
            pid, wait_log = daemon.pid, daemon.wait_log
        else:
            process = fuglu_factory(config, workdir=workdir, extra_args=['--pidfile', pidfile])
            pid, wait_log = process.pid, process.wait_log
        wait_log(r'Startup complete')   # the port accepts (into its backlog) before that
        assert process_ids(pid)[0] == {NOBODY.pw_uid}
        recipients = [unique('inflight%d' % n) for n in range(3)]
        replies = {}
        for recipient in recipients:
            # with a milter Postfix answers the client only after fuglu's verdict
            sender = threading.Thread(target=lambda r=recipient: replies.__setitem__(
                r, postfix.send('sender@example.org', [r], message(r), timeout=120)))
            sender.start()
            senders.append(sender)
            if mode != 'milter':
                sender.join()
        held = lambda: len([n for n in os.listdir(gatedir) if n.startswith('waiting')])  # noqa
        peers.wait_until(lambda: held() == 3, 60,
                         what='three messages held in fuglu')
        os.kill(pid, signal.SIGTERM)
        wait_log(r'stopping: finishing the messages in flight')
        peers.wait_until(lambda: not peers.port_accepts(listen_port), 10,
                         what='the listener to close')   # no new mail once stopping
        open(os.path.join(gatedir, 'open'), 'w').close()
        for sender in senders:
            sender.join(120)
        assert [replies[r].code for r in recipients] == [250] * 3, replies
        for recipient in recipients:
            postfix.wait_delivered(recipient, timeout=60)
        peers.wait_until(lambda: not peers.pid_is_alive(pid), 30, what='fuglu to exit')
        if mode != 'daemonized':
            assert process.process.wait(10) == 0
        assert os.listdir(rundir) == []       # pid file and control socket removed
        wait_log(r'shutdown complete')
        # each message exactly once, nothing left, no "may be sent more than once"
        peers.wait_until(lambda: postfix.queue_size() == 0, 60, what='an empty Postfix queue')
        for recipient in recipients:
            assert len(postfix.delivered(recipient)) == 1
        assert 'more than once' not in postfix.log_text()
    finally:
        open(os.path.join(gatedir, 'open'), 'w').close()
        for sender in senders:
            sender.join(120)
        peers.remove_world_dir(gatedir)
        peers.remove_world_dir(rundir)


# -- a daemonized start reports through its exit code ----------------------------------------

def plain_config(port, extra_main=''):
    return ('[main]\nuser = nobody\ngroup = nogroup\nincomingport = '
            'smtp:127.0.0.1:%d\noutgoingport = %d\nplugins =\nprependers =\nappenders '
            '=\ncontrolport =\n%s' % (port, peers.free_port(),
                                                                         extra_main))


def test_a_daemonized_start_reports_success_and_failure_by_exit_code(daemons, workdir):
    port = peers.free_port()
    first = daemons(workdir, plain_config(port))
    result = first.start()
    assert result.returncode == 0, result.stdout.decode()
    assert peers.port_accepts(port)
    assert process_ids(first.pid)[0] == {NOBODY.pw_uid}
    with open(first.pidfile) as handle:
        pid_text = handle.read()

    # a second start with the same pid file: refused, the running instance untouched
    second_dir = nobody_dir()
    try:
        second = daemons(second_dir, plain_config(peers.free_port()))
        second.pidfile = first.pidfile
        result = second.start()
        assert result.returncode == 1
        assert b'fuglu did not start: fuglu is already running (pid %d' % first.pid in result.stdout
        with open(first.pidfile) as handle:
            assert handle.read() == pid_text
        assert peers.pid_is_alive(first.pid) and peers.port_accepts(port)

        # the port taken
        result = daemons(second_dir, plain_config(port)).start()
        assert result.returncode == 1 and b'Address already in use' in result.stdout, result.stdout
        # an unknown backend
        result = daemons(second_dir,
                         plain_config(peers.free_port(),
                                      '[performance]\nbackend = nosuch\n')).start()
        assert result.returncode == 1, result.stdout
        assert b"unknown backend 'nosuch'" in result.stdout, result.stdout
        # a plugin that cannot load
        broken = plain_config(peers.free_port()).replace('plugins =\n',
                                                         'plugins = nosuchmodule.Plugin\n')
        result = daemons(second_dir, broken).start()
        assert result.returncode == 66 and b'nosuchmodule' in result.stdout, result.stdout
        # a user that does not exist: no start as root
        result = daemons(second_dir,
                         plain_config(peers.free_port()).replace('user = nobody',
                                                                 'user = nosuchuser')
                         ).start()
        assert result.returncode == 1, result.stdout
        assert b'user nosuchuser does not exist' in result.stdout, result.stdout
    finally:
        peers.remove_world_dir(second_dir)


def test_foreground_as_root_drops_privileges(fuglu_factory, workdir):
    port = peers.free_port()
    process = fuglu_factory(plain_config(port), workdir=workdir)
    process.wait_log(r'Startup complete')
    uids, gids, groups = process_ids(process.pid)
    assert uids == {NOBODY.pw_uid} and gids == {NOBODY.pw_gid}
    assert groups <= set(os.getgrouplist('nobody', NOBODY.pw_gid))
    process.wait_log(r'running as user nobody \(uid %d' % NOBODY.pw_uid)
    assert re.search(r'running as user nobody.*\n(.*\n)*.*Startup complete', process.log_text())


# -- pre-planted files in shared directories ----------------------------------------------

@pytest.fixture
def sticky_dir():
    """A folder like /tmp (mode 1777) that a local user could plant things in."""
    path = peers.world_dir('fuglu-sticky-')
    os.chmod(path, 0o1777)
    yield path
    peers.remove_world_dir(path)


def as_user(user, function, *args):
    """Run ``function(*args)`` in a child process as ``user`` (the local attacker)."""
    child = os.fork()
    if child == 0:
        status = 1
        try:
            account = pwd.getpwnam(user)
            os.setgroups([])
            os.setgid(account.pw_gid)
            os.setuid(account.pw_uid)
            function(*args)
            status = 0
        finally:
            os._exit(status)
    assert os.waitpid(child, 0)[1] == 0


def test_planted_links_and_squatters_in_a_shared_directory_do_not_work(postfix_factory,
                                                                       fuglu_factory, workdir,
                                                                       sticky_dir, tmp_world_dir):
    postfix = postfix_factory('afterqueue')
    tag = uuid.uuid4().hex[:8]
    victim = os.path.join(tmp_world_dir, 'victim')
    with open(victim, 'w') as handle:
        handle.write('precious\n')
    victim_dir = os.path.join(tmp_world_dir, 'victim-dir')
    os.mkdir(victim_dir)
    os.chmod(victim_dir, 0o777)
    debugfile = os.path.join(sticky_dir, 'debug-%s.log' % tag)
    control = os.path.join(sticky_dir, 'control-%s.sock' % tag)

    def plant():
        os.symlink(victim,
                   debugfile)                      # the debug log would be written through it
        os.mkdir(control)                                  # a directory squatting the socket path
        os.symlink(victim_dir,
                   os.path.join(sticky_dir, 'example.net'))   # the archive would go there
    as_user('daemon', plant)

    rules = os.path.join(tmp_world_dir, 'archive.regex')
    with open(rules, 'w') as handle:
        handle.write('envelope_to . yes\n')
    debugport = peers.free_port()
    config = ('[main]\nuser = nobody\ngroup = nogroup\nincomingport = '
              'smtp:127.0.0.1:%d,smtp:127.0.0.1:%d\noutgoinghost = 127.0.0.1\noutgoingport = '
              '%d\nplugins = archive\nprependers = debug\nappenders =\ncontrolport = '
              '%s\n[debug]\ndebugport = %d\ndebugfile = %s\n[ArchivePlugin]\narchiverules = '
              '%s\nlocal_archivedir = %s\nlocal_subdirtemplate = ${to_domain}\n'
              % (postfix.filter_port, debugport, postfix.reinject_port, control, debugport,
                 debugfile, rules,
                 sticky_dir))
    moved_debug = '/var/log/fuglu/debug-%s.log' % tag
    moved_control = '/run/fuglu/control-%s.sock' % tag
    try:
        process = fuglu_factory(config,
                                workdir=workdir)   # starts although the socket path is squatted
        process.wait_log(r'control socket listening on %s' % re.escape(moved_control))
        assert stat_owner(moved_control) == NOBODY.pw_uid

        recipient = unique('archived')
        assert postfix.send('sender@example.org', [recipient], message(recipient)).code == 250
        postfix.wait_delivered(recipient, timeout=30)
        process.wait_log(r'archived to /var/lib/fuglu/archive/example\.net/')
        with socket.create_connection(('127.0.0.1', debugport), timeout=30) as client:
            smtp_dialogue(client, unique('debugged'))
        peers.wait_until(lambda: 'debugging' in peers.read_text(moved_debug), 30,
                         what='the debug file in /var/log/fuglu')

        with open(victim) as handle:
            assert handle.read() == 'precious\n'
        assert os.listdir(victim_dir) == []
        assert os.path.islink(debugfile) and os.path.isdir(control)   # planted, untouched

        result = subprocess.run([sys.executable, FUGLU, 'control', '-c', process.config_path,
                                 'stats'],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
        assert result.returncode == 0 and b'Total msgs' in result.stdout, result.stdout
    finally:
        for path in (moved_debug, moved_control):
            if os.path.lexists(path):
                os.unlink(path)
        shutil.rmtree('/var/lib/fuglu/archive/example.net', ignore_errors=True)


def stat_owner(path):
    return os.stat(path).st_uid


def smtp_dialogue(client, recipient):
    reader = client.makefile('rb')
    assert reader.readline().startswith(b'220')
    for line in (b'EHLO test', b'MAIL FROM:<sender@example.org>',
                 b'RCPT TO:<%s>' % recipient.encode(), b'DATA'):
        client.sendall(line + b'\r\n')
        reply = reader.readline()
        while reply[3:4] == b'-':
            reply = reader.readline()
    client.sendall(message(recipient) + b'\r\n.\r\nQUIT\r\n')
    while reader.readline():
        pass


def test_an_unprivileged_fuglu_uses_a_private_directory_and_refuses_a_squatted_one(sticky_dir,
                                                                                   tmp_world_dir):
    """Started as an ordinary user (nobody here), a path in /tmp goes into the private
    folder fuglu-nobody (mode 0700); another user's folder of that name is refused."""
    python = '/usr/bin/python3'   # readable by nobody, unlike a Python below /root
    program_dir = nobody_dir('fuglu-prog-')
    try:
        shutil.copy(FUGLU, program_dir)
        shutil.copytree(os.path.join(peers.REPO_DIR, 'fuglu_plugins'),
                        os.path.join(program_dir, 'fuglu_plugins'))
        script = ('import sys; sys.path.insert(0, %r)\nimport fuglu, os\npath = '
                  'fuglu.shared_file_path(%r, '
                  '"log")\nfuglu.prepare_shared_home(os.path.dirname(path), "log")\nfd = '
                  'fuglu.open_directory(os.path.dirname(path))\nfuglu.create_file_at(fd, '
                  'os.path.basename(path)).write(b"x")\nprint(path)\n'
                  % (program_dir, os.path.join(sticky_dir, 'debug.log')))
        run = lambda: subprocess.run(['runuser', '-u', 'nobody', '--', python, '-c',
                                      script],  # noqa: E731
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        # a squatter was first: refused, nothing written into its folder
        squatted = os.path.join(sticky_dir, 'fuglu-nobody')
        as_user('daemon', os.mkdir, squatted, 0o777)
        result = run()
        assert result.returncode != 0
        assert b'belongs to uid %d' % pwd.getpwnam('daemon').pw_uid in result.stdout
        assert os.listdir(squatted) == []
        shutil.rmtree(squatted)
        result = run()
        assert result.returncode == 0, result.stdout
        assert result.stdout.decode().strip() == os.path.join(squatted, 'debug.log')
        info = os.stat(squatted)
        assert info.st_uid == NOBODY.pw_uid and (info.st_mode & 0o777) == 0o700
    finally:
        peers.remove_world_dir(program_dir)


# -- lint as the daemon user -----------------------------------------------------------------

def run_lint(config_path, program=FUGLU, python=None, cwd=None):
    result = subprocess.run([python or sys.executable, program, '--lint', '-c', config_path],
                            cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    return result.returncode, result.stdout.decode('utf-8', 'replace')


def lint_config(workdir, extra_main='', extra=''):
    path = os.path.join(workdir, 'lint.conf')
    with open(path, 'w') as conf:
        conf.write('[main]\nuser = nobody\ngroup = nogroup\nincomingport = '
                   'smtp:127.0.0.1:%d\noutgoingport = %d\nplugins =\nprependers =\nappenders '
                   '=\ncontrolport =\n%s\n%s'
                   % (peers.free_port(), peers.free_port(), extra_main, extra))
    return path


def test_lint_checks_as_the_daemon_user(workdir, tmp_world_dir):
    rootonly = os.path.join(tmp_world_dir, 'archive')   # root's, 0755: nobody cannot write
    os.mkdir(rootonly)
    os.chmod(rootonly, 0o755)
    code, out = run_lint(lint_config(workdir, 'appenders = archive',
                                     '[ArchivePlugin]\nlocal_archivedir = %s\n'
                                     % rootonly))
    assert 'Checking as user nobody' in out
    assert 'local_archivedir: directory %s is not writable by user nobody' % rootonly in out, out
    assert code == 1, out
    os.chown(rootonly, NOBODY.pw_uid, -1)
    code, out = run_lint(lint_config(workdir, 'appenders = archive',
                                     '[ArchivePlugin]\nlocal_archivedir = %s\n'
                                     % rootonly))
    assert code == 0, out


@pytest.mark.parametrize('extra_main, expected', [
    ('user = nosuchuser', 'user nosuchuser does not exist'),
    ('outgoingport = 340260', "outgoingport = '340260' is not a port number"),
    ('syslog = 1\nsyslog_address = /nonexistent/log', 'syslog: [Errno 2]'),
])
def test_lint_errors(workdir, extra_main, expected):
    code, out = run_lint(lint_config(workdir, extra_main))   # the last value of an option wins
    assert code >= 1 and expected in out, out
    assert 'Lint status: FAIL' in out


def test_lint_finds_a_listen_address_in_use_and_warns_about_the_downstream(workdir):
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen(1)
        path = lint_config(workdir)
        with open(path) as conf:
            text = re.sub(r'incomingport = .*',
                          'incomingport = smtp:127.0.0.1:%d' % taken.getsockname()[1],
                          conf.read())
        with open(path, 'w') as conf:
            conf.write(text)
        code, out = run_lint(path)
    assert code == 1 and 'Address already in use' in out, out
    # the downstream is down in every lint of this module: a warning, never an error
    assert re.search(r'WARNING: downstream 127\.0\.0\.1:\d+ does not answer', out)
    code, out = run_lint(lint_config(workdir))
    assert code == 0 and 'WARNING: downstream' in out, out


# -- first run with the pyz ------------------------------------------------------------------

@pytest.fixture(scope='module')
def pyz():
    folder = peers.world_dir('fuglu-pyz-')
    target = os.path.join(folder, 'fuglu.pyz')
    subprocess.run([sys.executable, os.path.join(peers.REPO_DIR, 'build_zipapp.py'), '-o', target],
                   check=True,
                   stdout=subprocess.PIPE, timeout=120)
    os.chmod(target, 0o755)
    yield target
    peers.remove_world_dir(folder)


def test_first_run_only_the_missing_peers_are_errors(pyz, workdir):
    conf = os.path.join(workdir, 'fuglu.conf')
    with open(conf, 'wb') as out:
        out.write(subprocess.run([sys.executable, '-I', pyz, '--dump-defaults'], check=True,
                                 stdout=subprocess.PIPE, timeout=60).stdout)
    code, out = run_lint(conf, program=pyz, cwd=workdir)
    errors = [line for line in out.splitlines() if line.startswith('ERROR:')]
    assert len(errors) == 2, out
    assert errors[0].startswith('ERROR: clamd at localhost:3310')
    assert errors[1].startswith('ERROR: spamd at localhost:783')
    assert '2 plugins reported errors' in out and code == 2
    assert 'skipplugins.regex does not exist: no plugin is skipped' in out   # a note, not an error

    # the bundled samples, written without overwriting
    with open(os.path.join(workdir, 'archive.regex'), 'w') as mine:
        mine.write('# my own rules\n')
    result = subprocess.run([sys.executable, '-I', pyz, 'samples', workdir], stdout=subprocess.PIPE,
                            timeout=60)
    assert result.returncode == 0
    text = result.stdout.decode()
    assert 'kept      %s/archive.regex (exists)' % workdir in text
    for name in ('rules/default-filenames.conf', 'templates/blockedfile.tmpl', 'skipplugins.regex',
                 'logging.conf', 'fuglu.service', 'fuglu.conf.dist'):
        assert os.path.isfile(os.path.join(workdir, name)), name
    with open(os.path.join(workdir, 'archive.regex')) as mine:
        assert mine.read() == '# my own rules\n'
    with open(os.path.join(workdir, 'fuglu.service')) as unit:
        service = unit.read()
    assert 'Type=notify' in service and 'ExecReload=/bin/kill -HUP $MAINPID' in service
    for hardening in ('NoNewPrivileges=yes', 'PrivateTmp=yes', 'ProtectSystem='):
        assert hardening in service
    result = subprocess.run([sys.executable, '-I', pyz, 'samples', workdir], stdout=subprocess.PIPE,
                            timeout=60)
    assert result.stdout.decode().rstrip().endswith('0 files written, %d existing files kept' % (
        text.count('wrote') + 1))

    # the samples in place: nothing is missing any more; a mistyped rulesdir is an error
    os.chmod(os.path.join(workdir, 'logging.conf'), 0o644)
    os.rename(os.path.join(workdir, 'logging.conf'), os.path.join(workdir, 'logging.conf.sample'))
    code, out = run_lint(conf, program=pyz, cwd=workdir)
    assert 'does not exist' not in out.replace('rules/nobounce.txt does not exist', ''), out
    with open(conf, 'a') as extra:
        extra.write('\n[FiletypePlugin]\nrulesdir = ${confdir}/rulez\n')
    code, out = run_lint(conf, program=pyz, cwd=workdir)
    assert 'ERROR: %s [FiletypePlugin] rulesdir: %s/rulez does not exist' % (conf,
                                                                             workdir) in out, out


# -- logging ---------------------------------------------------------------------------------

def test_hup_reopens_the_log_file_after_rotation(daemons, workdir):
    daemon = daemons(workdir, plain_config(peers.free_port()))
    assert daemon.start().returncode == 0
    daemon.wait_log('Startup complete')
    os.rename(daemon.log_path, daemon.log_path + '.1')   # logrotate's move
    os.kill(daemon.pid, signal.SIGHUP)
    daemon.wait_log('Reload config complete')
    assert 'Reload config complete' not in peers.read_text(daemon.log_path + '.1')
    assert stat_owner(daemon.log_path) == NOBODY.pw_uid


def test_syslog_lines_through_the_daemon(fuglu_factory, workdir):
    log_socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = os.path.join(workdir, 'dev-log')
    log_socket.bind(path)
    os.chmod(path, 0o666)
    log_socket.settimeout(30)
    try:
        process = fuglu_factory(plain_config(peers.free_port(),
                                             'syslog = 1\nsyslog_address = %s\n' % path),
                                workdir=workdir)
        lines = []
        while not any('Startup complete' in line for line in lines):
            lines.append(log_socket.recv(65536).decode())
        assert all(re.match(r'^<2[0-7]>fuglu\[%d\]: ' % process.pid, line) for line in lines), lines
    finally:
        log_socket.close()


# -- admin commands of the pyz and monitoring -------------------------------------------------

def test_admin_commands_and_monitoring(pyz, postfix_factory, clamd, workdir, tmp_world_dir):
    postfix = postfix_factory('afterqueue')
    metrics_port = peers.free_port()
    mrtgdir = nobody_dir('fuglu-mrtg-')
    control = os.path.join(workdir, 'control.sock')
    config = ('[main]\nuser = nobody\ngroup = nogroup\nidentifier = monitored\nincomingport = '
              'smtp:127.0.0.1:%d\noutgoinghost = 127.0.0.1\noutgoingport = %d\nplugins = '
              'clamav\nprependers =\nappenders =\ncontrolport = %s\nmetrics_listen = %d\nmrtgdir = '
              '%s\nmrtg_interval = 0.2\nscantimelogger = 1\ntrashdir = %s\n[ClamavPlugin]\nport = '
              '%s\n[virus]\ndefaultvirusaction = DELETE\n'
              % (postfix.filter_port, postfix.reinject_port, control, metrics_port, mrtgdir,
                 workdir,
                 clamd.socket_path))
    try:
        process = peers.FugluProcess(config, program=pyz, workdir=workdir).start()
        try:
            clean, infected = unique('clean'), unique('infected')
            assert postfix.send('sender@example.org', [clean], message(clean)).code == 250
            assert postfix.send('sender@example.org', [infected],
                                message(infected, body=peers.EICAR)).code == 250
            postfix.wait_delivered(clean, timeout=30)
            process.wait_log(r'MESSAGE DELETED')
            process.wait_log(r'fuglu\.Timings: INFO, port: %d, id: [0-9a-f]{32}, \(PLG\) Clam AV: '
                             % postfix.filter_port)

            run = lambda *args: subprocess.run([sys.executable, '-I',
                                                pyz] + list(args),  # noqa: E731
                                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                               timeout=60)
            result = run('control', '-c', process.config_path, 'help')
            assert result.returncode == 0
            assert b'exceptionlist' in result.stdout and b'workerlist' in result.stdout
            result = run('control', '-p', control, 'stats')
            assert b'Total msgs:\t2 in:2 out:1' in result.stdout, result.stdout
            assert b'Virus:\t\t1' in result.stdout, result.stdout
            assert run('control', '-p', control, 'nosuchcommand').returncode == 1

            with urllib.request.urlopen('http://127.0.0.1:%d/metrics' % metrics_port,
                                        timeout=30) as answer:
                metrics = answer.read().decode()
            assert 'fuglu_messages_total{verdict="dunno"} 1' in metrics
            assert 'fuglu_messages_total{verdict="delete"} 1' in metrics
            assert 'fuglu_plugin_runs_total{stage="scanner",plugin="Clam AV"} 2' in metrics
            assert 'fuglu_info{version=' in metrics and 'identifier="monitored"' in metrics

            peers.wait_until(lambda: peers.read_text(os.path.join(mrtgdir,
                                                                  'virus')).startswith('1.0\n'), 30,
                             what='the MRTG virus file')
            assert peers.read_text(os.path.join(mrtgdir, 'inout')).split('\n')[:2] == ['2.0', '1.0']

            result = run('healthcheck', '--deep', '-c', process.config_path)
            assert result.returncode == 0, result.stdout
            assert re.search(rb'OK +plugin Clam AV: clamd .*PONG', result.stdout)
            assert re.search(rb'OK +connector smtp 127\.0\.0\.1:%d' % postfix.filter_port,
                             result.stdout)
            assert re.search(rb'OK +downstream', result.stdout)

            result = run('conf', '-n', '-c', process.config_path)
            assert b'identifier=monitored (def: dist)' in result.stdout, result.stdout
            expected = b'[ClamavPlugin]\nport=%s (def: 3310)' % clamd.socket_path.encode()
            assert expected in result.stdout

            eml = os.path.join(tmp_world_dir, 'virus.eml')
            with open(eml, 'wb') as out:
                out.write(message('rcpt@example.org', body=peers.EICAR))
            result = run('scan', '-c', process.config_path, eml)
            assert result.returncode == 2, result.stdout        # DELETE -> DISCARD's exit code
            assert b'verdict: DELETE' in result.stdout and b'X-Fuglu-Suspect' in result.stdout
            assert peers.EICAR_SIGNATURE_NAME.encode() in result.stdout

            rules = os.path.join(tmp_world_dir, 'rules.regex')
            with open(rules, 'w') as out:
                out.write('to_domain example\\.com first\nSubject service second\n')
            result = run('suspectfilter', rules, eml)
            assert result.returncode == 0
            assert b'line 2: Subject service second' in result.stdout
            assert b'line 1:' not in result.stdout
        finally:
            process.cleanup()
        # clamd down: the deep health check says CRITICAL
        clamd.stop()
        result = subprocess.run([sys.executable, '-I', pyz, 'healthcheck', '--deep', '-c',
                                 process.config_path],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        assert result.returncode == 2, result.stdout
        assert re.search(rb'CRITICAL plugin Clam AV: clamd', result.stdout)
        assert re.search(rb'CRITICAL connector smtp', result.stdout)   # fuglu is stopped too
    finally:
        peers.remove_world_dir(mrtgdir)
