"""Real mail peers on 127.0.0.1 for fuglu's integration tests.

Everything an integration test needs to talk to real daemons lives here, so that no
test carries its own copy of the traps described in shared/peers.md:

    ensure_debian_packages(*names)   install Postfix, ClamAV, SpamAssassin... with apt-get
    free_port()                      an unused TCP port on 127.0.0.1
    world_dir() / remove_world_dir() a temp folder every daemon user can traverse
    PostfixInstance                  a private Postfix (plain, afterqueue, beforequeue, milter)
    ClamdInstance                    a private clamd with a one-signature EICAR database
    SpamdInstance                    a private spamd, offline rules only
    PostgresInstance                 a private PostgreSQL (initdb, pg_ctl), run as postgres
    MariadbInstance                  a private MariaDB (mariadb-install-db, mariadbd)
    FugluProcess                     fuglu.py (or a .pyz) as a subprocess

Every daemon runs from its own folder under a world-traversable base folder (spamd drops
to debian-spamd and Postfix's virtual(8) delivers as nobody; both must reach their files),
listens on 127.0.0.1 only, and is stopped by pid.

A test that needs a peer fails when the peer cannot be installed, unless the environment
variable FUGLU_TEST_NO_PEERS=1 is set: then it is skipped.

Python 3.8 compatible, stdlib only (pytest is imported just to skip a test).
"""

import atexit
import fcntl
import json
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections import namedtuple

REPO_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The standard anti-virus and anti-spam test strings, split so that this file is not
# itself a test virus or a test spam to a scanner that reads the repository.
EICAR = b'X5O!P%@AP[4\\PZX54(P^)7CC)7}$' + b'EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*'
GTUBE = b'XJS*C4JDBQADN1.NSBN3*2IDNEN*' + b'GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X'

# Name clamd reports for EICAR from our unsigned database (ClamAV always adds .UNOFFICIAL).
EICAR_SIGNATURE_NAME = 'Eicar-Test-Signature.UNOFFICIAL'

ALL_PEER_PACKAGES = ('postfix', 'postfix-pcre', 'swaks', 'clamav-daemon', 'clamdscan',
                     'spamd', 'spamassassin', 'spamc', 'miltertest',
                     'postgresql', 'mariadb-server', 'mariadb-client')

NO_PEERS_ENV = 'FUGLU_TEST_NO_PEERS'


# ---------------------------------------------------------------------------
# Installing the peers
# ---------------------------------------------------------------------------

_APT_LOCK_PATH = '/tmp/fuglu-test-apt.lock'
_apt_updated = False
_known_installed = set()


def peers_opted_out():
    return os.environ.get(NO_PEERS_ENV, '') == '1'


def _missing_packages(names):
    """Packages among `names` that dpkg does not list as installed."""
    if shutil.which('dpkg-query') is None:
        return list(names)
    missing = []
    for name in names:
        if name in _known_installed:
            continue
        result = subprocess.run(['dpkg-query', '-W', '-f=${Status}', name],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        if result.returncode == 0 and result.stdout.decode().endswith('install ok installed'):
            _known_installed.add(name)
        else:
            missing.append(name)
    return missing


def _skip(reason):
    import pytest  # only here, so that benchmarks can use this module without pytest
    pytest.skip(reason)


def _peer_unavailable(reason):
    """Fail the test, or skip it when the developer opted out of real peers."""
    if peers_opted_out():
        _skip('%s (%s=1)' % (reason, NO_PEERS_ENV))
    raise RuntimeError('%s; set %s=1 to skip tests that need real peers'
                       % (reason, NO_PEERS_ENV))


def _run_apt(args, env):
    result = subprocess.run(args, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = result.stdout.decode('utf-8', 'replace')[-3000:]
        raise RuntimeError('%s failed (exit %d):\n%s' % (' '.join(args), result.returncode, tail))


def _install_packages(names):
    """apt-get install `names` without letting their system services start."""
    global _apt_updated
    env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
    # Preseed so that postfix's postinst neither asks nor writes a system configuration.
    preseed = subprocess.run(['debconf-set-selections'], env=env,
                             input=b'postfix postfix/main_mailer_type select No configuration\n',
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if preseed.returncode != 0:
        raise RuntimeError('debconf-set-selections failed: %s' % preseed.stdout.decode())

    # A policy-rc.d that exits 101 tells invoke-rc.d not to start any service, so the
    # install neither starts a system spamd on port 783 nor a freshclam that downloads.
    policy_path = '/usr/sbin/policy-rc.d'
    saved_policy = policy_path + '.fuglu-tests-saved'
    had_policy = os.path.exists(policy_path)
    if had_policy:
        os.rename(policy_path, saved_policy)
    try:
        with open(policy_path, 'w') as policy:
            policy.write('#!/bin/sh\n# written by fuglu tests during apt-get install\nexit 101\n')
        os.chmod(policy_path, 0o755)
        if not _apt_updated:
            _run_apt(['apt-get', 'update'], env)
            _apt_updated = True
        _run_apt(['apt-get', 'install', '-y', '--no-install-recommends'] + list(names), env)
    finally:
        os.unlink(policy_path)
        if had_policy:
            os.rename(saved_policy, policy_path)


def ensure_debian_packages(*names):
    """Make sure the Debian packages `names` are installed (all peers when none given).

    Installs missing ones with apt-get. When that is impossible the calling test fails,
    or is skipped if FUGLU_TEST_NO_PEERS=1 (then nothing is installed at all).
    """
    names = names or ALL_PEER_PACKAGES
    missing = _missing_packages(names)
    if not missing:
        return
    if peers_opted_out():
        _skip('peer packages not installed: %s (%s=1)' % (' '.join(missing), NO_PEERS_ENV))
    if shutil.which('apt-get') is None:
        _peer_unavailable('peer packages %s missing and there is no apt-get' % ' '.join(missing))
    if os.geteuid() != 0:
        _peer_unavailable('peer packages %s missing and installing them needs root'
                          % ' '.join(missing))
    # Several pytest processes (xdist) may get here at once; dpkg allows one at a time.
    with open(_APT_LOCK_PATH, 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        missing = _missing_packages(names)
        if missing:
            try:
                _install_packages(missing)
            except (OSError, RuntimeError) as error:
                _peer_unavailable('could not install %s: %s' % (' '.join(missing), error))
    still_missing = _missing_packages(names)
    if still_missing:
        _peer_unavailable('packages still missing after apt-get: %s' % ' '.join(still_missing))


# ---------------------------------------------------------------------------
# Small helpers: ports, folders, waiting, processes
# ---------------------------------------------------------------------------

def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def port_accepts(port, host='127.0.0.1', timeout=0.5):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def world_dir(prefix='fuglu-it-'):
    """A new folder under /tmp that every user can traverse.

    spamd runs as debian-spamd and Postfix's virtual(8) as nobody; both must reach their
    files through every parent folder, which pytest's tmp_path (mode 700) does not allow.
    """
    path = tempfile.mkdtemp(prefix=prefix, dir='/tmp')
    os.chmod(path, 0o755)
    return path


def remove_world_dir(path):
    shutil.rmtree(path, ignore_errors=True)


def wait_until(condition, timeout, interval=0.02, what='condition'):
    """Poll `condition()` until it returns something true; return that or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError('timed out after %.1f s waiting for %s' % (timeout, what))
        time.sleep(interval)


def pid_is_alive(pid):
    """True while `pid` runs. A zombie counts as dead: PID 1 here reaps orphans slowly."""
    try:
        with open('/proc/%d/stat' % pid) as stat_file:
            stat = stat_file.read()
    except OSError:
        return False
    # Field 3 is the state; field 2 (the command) may contain spaces, so split after ')'.
    state = stat.rsplit(')', 1)[1].split()[0]
    return state not in ('Z', 'X')


def _process_stats():
    """(pid, [state, ppid, pgrp, ...]) of every process: /proc/PID/stat after the command
    (which may contain spaces, so the split is after the last ')')."""
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % entry) as stat_file:
                yield int(entry), stat_file.read().rsplit(')', 1)[1].split()
        except (OSError, IndexError):
            continue


def child_pids(pid):
    """pids of the processes whose parent is `pid`."""
    return [child for child, fields in _process_stats() if fields[1] == str(pid)]


def group_members(group):
    """pids of the live processes (zombies count as dead) of process group `group`."""
    return [pid for pid, fields in _process_stats()
            if fields[2] == str(group) and fields[0] not in ('Z', 'X')]


def read_until_closed(sock):
    """Everything `sock` receives until the other end closes."""
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b''.join(chunks)
        chunks.append(chunk)


def control_command(socket_path, command, timeout=10.0):
    """fuglu's answer to one control command on its unix control socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(command.encode())
        return read_until_closed(sock).decode()


def stop_pid(pid, timeout=10.0, child=None, first_signal=signal.SIGTERM):
    """SIGTERM (or `first_signal`) `pid`, SIGKILL it if it still runs after `timeout`; reap
    it if it is our child."""
    if pid is None:
        return
    try:
        os.kill(pid, first_signal)
    except ProcessLookupError:
        pass
    try:
        wait_until(lambda: not pid_is_alive(pid), timeout, what='pid %d to exit' % pid)
    except TimeoutError:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        wait_until(lambda: not pid_is_alive(pid), 5.0, what='pid %d to die' % pid)
    if child is not None:
        child.wait()


# Every peer started and not yet stopped, so that a script or test run that dies between
# start() and stop() does not leave daemons behind when the interpreter exits.
_running_peers = []


def _started(peer):
    _running_peers.append(peer)


def _stopped(peer):
    if peer in _running_peers:
        _running_peers.remove(peer)


@atexit.register
def _stop_leftover_peers():
    for peer in reversed(list(_running_peers)):
        try:
            peer.stop()
        except Exception:  # the interpreter is exiting; stop what can be stopped
            pass


def read_text(path):
    try:
        with open(path, 'rb') as text_file:
            return text_file.read().decode('utf-8', 'replace')
    except FileNotFoundError:
        return ''


def _tail(text, lines=40):
    return '\n'.join(text.splitlines()[-lines:])


def wait_log_match(log_text, pattern, timeout, log_name):
    """Wait until `log_text()` matches the regular expression `pattern`; return the match.

    On time-out the TimeoutError carries the log's tail, headed `--- <log_name> ---`.
    """
    regex = re.compile(pattern)
    try:
        return wait_until(lambda: regex.search(log_text()), timeout, interval=0.05,
                          what='%s to match %r' % (log_name, pattern))
    except TimeoutError as error:
        raise TimeoutError('%s\n--- %s ---\n%s' % (error, log_name, _tail(log_text())))


class ChildPeer(object):
    """Base of the peers that run in the foreground as our child process (clamd, spamd,
    fuglu): start-up into an output file, the exit check while waiting, stop by pid.
    Subclasses provide log_text()."""

    process = None

    @property
    def pid(self):
        return self.process.pid if self.process else None

    def _spawn(self, command, output_path, **popen_options):
        """Start `command` with stdout and stderr going to `output_path`."""
        output = open(output_path, 'wb')
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output,
                                        stderr=subprocess.STDOUT, **popen_options)
        output.close()
        _started(self)

    def _fail_if_exited(self, name, when=''):
        """Raise RuntimeError with the log's tail when the child has already exited."""
        if self.process.poll() is not None:
            raise RuntimeError('%s exited with %s%s:\n%s'
                               % (name, self.process.returncode, when, _tail(self.log_text())))

    def stop(self, timeout=10.0):
        """SIGTERM, SIGKILL after `timeout`; return the exit code (None if never started)."""
        returncode = None
        _stopped(self)
        if self.process is not None:
            stop_pid(self.process.pid, timeout, child=self.process)
            returncode = self.process.returncode
            self.process = None
        return returncode


def run_in_world_dir(peer_class, folder_prefix):
    """Generator body of a peer fixture: start `peer_class(basedir)` in a new world dir,
    yield it, then stop it and remove the folder (also when the start fails)."""
    basedir = world_dir(folder_prefix)
    instance = peer_class(basedir)
    try:
        yield instance.start()
    finally:
        instance.stop()
        remove_world_dir(basedir)


def chown_tree(path, user):
    """Give ``path`` and everything below it to ``user`` (a folder a daemon writes)."""
    account = pwd.getpwnam(user)
    for folder, subfolders, files in os.walk(path):
        os.chown(folder, account.pw_uid, account.pw_gid)
        for name in files:
            os.chown(os.path.join(folder, name), account.pw_uid, account.pw_gid)


# ---------------------------------------------------------------------------
# Postfix
# ---------------------------------------------------------------------------

SmtpReply = namedtuple('SmtpReply', 'code text')

POSTFIX_MODES = ('plain', 'afterqueue', 'beforequeue', 'milter')

# Our own master.cf: chroot 'n' everywhere (a private queue has no chroot jail) and the
# postlog service, without which maillog_file stays empty.
#  service    type       private unpriv chroot wakeup maxproc command
_MASTER_CF_SERVICES = """\
pickup     unix       n       -      n      60     1       pickup
cleanup    unix       n       -      n      -      0       cleanup
qmgr       unix       n       -      n      300    1       qmgr
tlsmgr     unix       -       -      n      1000?  1       tlsmgr
rewrite    unix       -       -      n      -      -       trivial-rewrite
bounce     unix       -       -      n      -      0       bounce
defer      unix       -       -      n      -      0       bounce
trace      unix       -       -      n      -      0       bounce
verify     unix       -       -      n      -      1       verify
flush      unix       n       -      n      1000?  0       flush
proxymap   unix       -       -      n      -      -       proxymap
proxywrite unix       -       -      n      -      1       proxymap
smtp       unix       -       -      n      -      -       smtp
relay      unix       -       -      n      -      -       smtp
showq      unix       n       -      n      -      -       showq
error      unix       -       -      n      -      -       error
retry      unix       -       -      n      -      -       error
discard    unix       -       -      n      -      -       discard
local      unix       -       n      n      -      -       local
virtual    unix       -       n      n      -      -       virtual
lmtp       unix       -       -      n      -      -       lmtp
anvil      unix       -       -      n      -      1       anvil
scache     unix       -       -      n      -      1       scache
postlog    unix-dgram n       -      n      -      1       postlogd
"""


def _master_service(listen, maxproc, command, options):
    """One master.cf inet service line with its -o options on continuation lines."""
    lines = ['%s inet n - n - %s %s' % (listen, maxproc, command)]
    for name, value in options:
        lines.append('  -o %s=%s' % (name, value))
    return '\n'.join(lines) + '\n'


class PostfixInstance(object):
    """A private Postfix on 127.0.0.1 with its own config, queue and data folders.

    mode:
      'plain'        smtpd on smtp_port straight into the queue.
      'afterqueue'   content_filter to 127.0.0.1:filter_port (transport fuglu_default,
                     with XFORWARD), re-injection smtpd on reinject_port.
      'beforequeue'  smtpd_proxy_filter to 127.0.0.1:filter_port, after-filter smtpd on
                     reinject_port.
      'milter'       smtpd_milters = inet:127.0.0.1:milter_port, milter_protocol 6.

    Every domain is a virtual mailbox domain delivered into one Maildir (self.maildir);
    tell messages apart by recipient (Delivered-To). Nothing leaves the machine.

    main_cf: dict of main.cf settings that override the generated ones.
    smtpd_options / reinject_options: dicts of extra -o options for the receiving smtpd
    and for the re-injection (after-filter) smtpd.
    master_cf_extra: text appended to master.cf.
    """

    def __init__(self, basedir, mode='plain', smtp_port=None, filter_port=None,
                 reinject_port=None, milter_port=None, milter_default_action='tempfail',
                 proxy_timeout='60s', main_cf=None, smtpd_options=None,
                 reinject_options=None, master_cf_extra=''):
        if mode not in POSTFIX_MODES:
            raise ValueError('unknown Postfix mode %r, expected one of %s'
                             % (mode, ', '.join(POSTFIX_MODES)))
        self.mode = mode
        self.basedir = os.path.join(basedir, 'postfix')
        self.config_dir = os.path.join(self.basedir, 'etc')
        self.queue_dir = os.path.join(self.basedir, 'queue')
        self.data_dir = os.path.join(self.basedir, 'data')
        self.maildir = os.path.join(self.basedir, 'Maildir')
        self.log_path = os.path.join(self.basedir, 'maillog')
        self.smtp_port = smtp_port or free_port()
        uses_filter = mode in ('afterqueue', 'beforequeue')
        self.filter_port = filter_port or (free_port() if uses_filter else None)
        self.reinject_port = reinject_port or (free_port() if uses_filter else None)
        self.milter_port = milter_port or (free_port() if mode == 'milter' else None)
        self.milter_default_action = milter_default_action
        self.proxy_timeout = proxy_timeout
        self.main_cf_overrides = dict(main_cf or {})
        self.smtpd_options = dict(smtpd_options or {})
        self.reinject_options = dict(reinject_options or {})
        self.master_cf_extra = master_cf_extra
        self.master_pid = None
        self._collected = set()

    # -- configuration -----------------------------------------------------

    def main_cf_settings(self):
        """The generated main.cf settings, overrides applied, as an ordered dict."""
        nobody = pwd.getpwnam('nobody')
        settings = {
            'compatibility_level': '3.6',
            'myhostname': 'postfix.fuglu-peers.test',
            'mydestination': '',
            'inet_interfaces': '127.0.0.1',
            'inet_protocols': 'ipv4',
            'mynetworks': '127.0.0.0/8',
            'queue_directory': self.queue_dir,
            'data_directory': self.data_dir,
            'maillog_file': self.log_path,
            'maillog_file_prefixes': self.basedir,
            'smtpd_peername_lookup': 'no',
            'smtp_dns_support_level': 'disabled',
            'smtpd_banner': '$myhostname ESMTP fuglu-test-postfix',
            'biff': 'no',
            'alias_maps': '',
            'alias_database': '',
            'append_dot_mydomain': 'no',
            # Nothing may leave the box: every domain is ours, anything else errors out.
            'virtual_mailbox_domains': 'static:all',
            'virtual_mailbox_base': self.basedir,
            'virtual_mailbox_maps': 'static:Maildir/',
            'virtual_uid_maps': 'static:%d' % nobody.pw_uid,
            'virtual_gid_maps': 'static:%d' % nobody.pw_gid,
            'virtual_minimum_uid': '1',
            'default_transport': 'error:fuglu test postfix delivers nothing off-box',
            'relay_transport': '$default_transport',
            # Deferred mail is retried within seconds, not minutes.
            'queue_run_delay': '2s',
            'minimal_backoff_time': '2s',
            'maximal_backoff_time': '10s',
        }
        if self.mode == 'afterqueue':
            settings['content_filter'] = 'fuglu_default:[127.0.0.1]:%d' % self.filter_port
        elif self.mode == 'milter':
            settings.update({
                'smtpd_milters': 'inet:127.0.0.1:%d' % self.milter_port,
                'milter_protocol': '6',
                'milter_default_action': self.milter_default_action,
                'milter_connect_timeout': '5s',
                'milter_command_timeout': '30s',
                'milter_content_timeout': '60s',
            })
        settings.update(self.main_cf_overrides)
        return settings

    def master_cf_text(self):
        listen = '127.0.0.1:%d' % self.smtp_port
        smtpd_options = []
        smtpd_maxproc = '-'
        if self.mode == 'beforequeue':
            smtpd_maxproc = '20'
            smtpd_options = [
                ('smtpd_proxy_filter', '127.0.0.1:%d' % self.filter_port),
                ('smtpd_proxy_timeout', self.proxy_timeout),
                ('smtpd_client_connection_count_limit', '10'),
            ]
        smtpd_options.extend(self.smtpd_options.items())
        text = _MASTER_CF_SERVICES + _master_service(listen, smtpd_maxproc, 'smtpd',
                                                     smtpd_options)
        reinject_listen = '127.0.0.1:%d' % (self.reinject_port or 0)
        if self.mode == 'afterqueue':
            text += ('fuglu_default unix - - n - 10 smtp\n'
                     '  -o smtp_send_xforward_command=yes\n'
                     '  -o disable_mime_output_conversion=yes\n')
            reinject = [
                ('content_filter', ''),
                ('receive_override_options', 'no_unknown_recipient_checks,'
                 'no_header_body_checks,no_milters,no_address_mappings'),
                ('smtpd_helo_restrictions', ''),
                ('smtpd_client_restrictions', ''),
                ('smtpd_sender_restrictions', ''),
                ('smtpd_recipient_restrictions', 'permit_mynetworks,reject'),
                ('mynetworks', '127.0.0.0/8'),
                ('smtpd_authorized_xforward_hosts', '127.0.0.0/8'),
            ]
            reinject.extend(self.reinject_options.items())
            text += _master_service(reinject_listen, '10', 'smtpd', reinject)
        elif self.mode == 'beforequeue':
            reinject = [
                ('smtpd_authorized_xforward_hosts', '127.0.0.0/8'),
                ('smtpd_client_restrictions', ''),
                ('smtpd_helo_restrictions', ''),
                ('smtpd_sender_restrictions', ''),
                ('smtpd_relay_restrictions', ''),
                ('smtpd_recipient_restrictions', 'permit_mynetworks,reject'),
                ('smtpd_data_restrictions', ''),
                ('mynetworks', '127.0.0.0/8'),
                ('receive_override_options', 'no_unknown_recipient_checks'),
            ]
            reinject.extend(self.reinject_options.items())
            text += _master_service(reinject_listen, '-', 'smtpd', reinject)
        if self.master_cf_extra:
            text += self.master_cf_extra.rstrip('\n') + '\n'
        return text

    def write_config(self):
        for folder in (self.config_dir, self.queue_dir, self.data_dir):
            os.makedirs(folder, exist_ok=True)
        os.chmod(self.basedir, 0o755)
        # master refuses a data_directory it does not own (master.lock: Permission denied).
        postfix_account = pwd.getpwnam('postfix')
        os.chown(self.data_dir, postfix_account.pw_uid, postfix_account.pw_gid)
        # virtual(8) delivers as nobody into a Maildir we create for it.
        for sub in ('tmp', 'new', 'cur'):
            os.makedirs(os.path.join(self.maildir, sub), exist_ok=True)
        chown_tree(self.maildir, 'nobody')

        main_cf_path = os.path.join(self.config_dir, 'main.cf')
        with open(main_cf_path, 'w') as main_cf:
            for name, value in self.main_cf_settings().items():
                main_cf.write('%s = %s\n' % (name, value))
        with open(os.path.join(self.config_dir, 'master.cf'), 'w') as master_cf:
            master_cf.write(self.master_cf_text())
        # Every Postfix command stalls ~2 s when main.cf is younger than ~2 s.
        backdated = time.time() - 10
        os.utime(main_cf_path, (backdated, backdated))

    # -- running -----------------------------------------------------------

    def _postfix(self, *args, check=True, timeout=30):
        result = subprocess.run(['postfix', '-c', self.config_dir] + list(args),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError('postfix %s failed (exit %d): %s\n--- maillog ---\n%s'
                               % (' '.join(args), result.returncode,
                                  result.stdout.decode('utf-8', 'replace'),
                                  _tail(self.log_text())))
        return result

    def _read_master_pid(self):
        text = read_text(os.path.join(self.queue_dir, 'pid', 'master.pid')).strip()
        return int(text) if text.isdigit() else None

    def start(self, timeout=15.0):
        self.write_config()
        self._postfix('start')
        # postfix-script runs `master -w`, which returns only once master has bound its
        # listening sockets: no need to probe the port (a probe would also reach a milter).
        self.master_pid = wait_until(self._read_master_pid, timeout, what='Postfix master.pid')
        _started(self)
        return self

    def stop(self, timeout=10.0):
        """Stop master and with it every Postfix process of this instance.

        `postfix stop` only sends SIGTERM to master and then polls with `sleep 1`, which
        costs a whole second whenever master needs a few milliseconds to exit. So we send
        the same signal ourselves and poll finely (SIGKILL after `timeout`).
        """
        pid = self.master_pid or self._read_master_pid()
        self.master_pid = None
        _stopped(self)
        if pid is not None and pid_is_alive(pid):
            stop_pid(pid, timeout)

    def reload(self):
        """Rewrite main.cf/master.cf (after changing settings) and tell master to re-read them."""
        self.write_config()
        self._postfix('reload')

    def is_running(self):
        return self.master_pid is not None and pid_is_alive(self.master_pid)

    # -- talking to it -----------------------------------------------------

    def send(self, sender, recipients, message_bytes, smtputf8=False, port=None,
             helo='client.fuglu-peers.test', timeout=30):
        """Send one message over SMTP; return the SmtpReply that decided its fate.

        That is the DATA reply on success, otherwise the first refusal (EHLO, MAIL, DATA)
        or the last RCPT refusal when no recipient was accepted.
        """
        if isinstance(recipients, str):
            recipients = [recipients]
        try:
            with smtplib.SMTP('127.0.0.1', port or self.smtp_port, local_hostname=helo,
                              timeout=timeout) as client:
                code, text = client.ehlo()
                if code != 250:
                    return SmtpReply(code, text.decode('utf-8', 'replace'))
                options = ['SMTPUTF8', 'BODY=8BITMIME'] if smtputf8 else []
                code, text = client.mail(sender, options)
                if code != 250:
                    return SmtpReply(code, text.decode('utf-8', 'replace'))
                refusal = None
                accepted = 0
                for recipient in recipients:
                    code, text = client.rcpt(recipient)
                    if code in (250, 251):
                        accepted += 1
                    else:
                        refusal = SmtpReply(code, text.decode('utf-8', 'replace'))
                if not accepted:
                    return refusal
                code, text = client.data(message_bytes)
                return SmtpReply(code, text.decode('utf-8', 'replace'))
        except smtplib.SMTPResponseException as error:
            text = error.smtp_error
            if isinstance(text, bytes):
                text = text.decode('utf-8', 'replace')
            return SmtpReply(error.smtp_code, text)

    def _maildir_files(self):
        paths = []
        for sub in ('new', 'cur'):
            folder = os.path.join(self.maildir, sub)
            for name in os.listdir(folder):
                paths.append(os.path.join(folder, name))
        paths.sort(key=lambda path: (os.stat(path).st_mtime, path))
        return paths

    @staticmethod
    def _delivered_to(raw):
        header_end = raw.find(b'\n\n')
        headers = raw if header_end < 0 else raw[:header_end]
        match = re.search(br'^Delivered-To:[ \t]*(\S+)', headers, re.MULTILINE | re.IGNORECASE)
        return match.group(1).decode('utf-8', 'replace').lower() if match else None

    def delivered(self, recipient=None):
        """Raw bytes of every delivered message (for `recipient` only, when given)."""
        messages = []
        for path in self._maildir_files():
            with open(path, 'rb') as message_file:
                raw = message_file.read()
            if recipient is None or self._delivered_to(raw) == recipient.lower():
                messages.append(raw)
        return messages

    def wait_delivered(self, recipient, timeout=15.0):
        """Wait for a new delivery to `recipient`; return its raw bytes.

        Each delivered file is returned once per instance, oldest first, so two messages
        to the same recipient are collected by two calls.
        """
        wanted = recipient.lower()

        def next_delivery():
            for path in self._maildir_files():
                if path in self._collected:
                    continue
                with open(path, 'rb') as message_file:
                    raw = message_file.read()
                if self._delivered_to(raw) == wanted:
                    self._collected.add(path)
                    return raw
            return None

        try:
            return wait_until(next_delivery, timeout, interval=0.05,
                              what='delivery to %s' % recipient)
        except TimeoutError as error:
            raise TimeoutError('%s\nqueue: %s\n--- maillog ---\n%s'
                               % (error, self.queue_ids(), _tail(self.log_text())))

    def queue_entries(self):
        """One dict per queued message, as `postqueue -j` prints them."""
        result = subprocess.run(['postqueue', '-c', self.config_dir, '-j'],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, timeout=30)
        if result.returncode != 0:
            raise RuntimeError('postqueue -j failed: %s' % result.stderr.decode())
        return [json.loads(line) for line in result.stdout.decode().splitlines() if line.strip()]

    def queue_ids(self):
        return [entry['queue_id'] for entry in self.queue_entries()]

    def queue_size(self):
        return len(self.queue_entries())

    def flush(self):
        """Ask Postfix to retry all deferred mail now (postqueue -f)."""
        subprocess.run(['postqueue', '-c', self.config_dir, '-f'], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=30)

    def log_text(self):
        return read_text(self.log_path)

    def wait_log(self, pattern, timeout=10.0):
        """Wait until the maillog matches the regular expression `pattern`; return the match."""
        return wait_log_match(self.log_text, pattern, timeout, 'maillog')


# ---------------------------------------------------------------------------
# clamd
# ---------------------------------------------------------------------------

def clamd_command(command, payload=b'', port=None, socket_path=None, timeout=10.0):
    """Send one z-command (b'PING', b'INSTREAM', ...) to clamd; return the reply text.

    For INSTREAM, `payload` is streamed in chunks as the protocol asks.
    """
    if socket_path:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = socket_path
    else:
        connection = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        address = ('127.0.0.1', port)
    with connection:
        connection.settimeout(timeout)
        connection.connect(address)
        connection.sendall(b'z' + command + b'\0')
        if command == b'INSTREAM':
            for start in range(0, len(payload), 8192):
                chunk = payload[start:start + 8192]
                connection.sendall(len(chunk).to_bytes(4, 'big') + chunk)
            connection.sendall(b'\0\0\0\0')
        reply = b''
        while not reply.endswith(b'\0'):
            data = connection.recv(4096)
            if not data:
                break
            reply += data
    return reply.rstrip(b'\0').decode('utf-8', 'replace')


class ClamdInstance(ChildPeer):
    """A private clamd with one signature (EICAR), on a unix socket and 127.0.0.1:tcp_port.

    clamd runs in the foreground as our child, so stop() reaps it at once.
    """

    def __init__(self, basedir, tcp_port=None):
        self.basedir = os.path.join(basedir, 'clamd')
        self.database_dir = os.path.join(self.basedir, 'db')
        self.temp_dir = os.path.join(self.basedir, 'tmp')
        self.conf_path = os.path.join(self.basedir, 'clamd.conf')
        self.socket_path = os.path.join(self.basedir, 'clamd.sock')
        self.log_path = os.path.join(self.basedir, 'clamd.log')
        self.tcp_port = tcp_port or free_port()

    def write_config(self):
        for folder in (self.database_dir, self.temp_dir):
            os.makedirs(folder, exist_ok=True)
        os.chmod(self.basedir, 0o755)
        # clamd will not start without signatures and cannot download any here.
        with open(os.path.join(self.database_dir, 'fuglu-tests.ndb'), 'w') as database:
            database.write('Eicar-Test-Signature:0:*:%s\n' % EICAR.hex())
        settings = [
            ('DatabaseDirectory', self.database_dir),
            ('LocalSocket', self.socket_path),
            ('LocalSocketMode', '666'),
            ('TCPSocket', str(self.tcp_port)),
            ('TCPAddr', '127.0.0.1'),
            ('TemporaryDirectory', self.temp_dir),
            ('LogFile', self.log_path),
            ('LogTime', 'yes'),
            ('Foreground', 'yes'),
            ('Bytecode', 'no'),
            ('SelfCheck', '0'),
        ]
        with open(self.conf_path, 'w') as conf:
            for name, value in settings:
                conf.write('%s %s\n' % (name, value))

    def ping(self):
        try:
            return clamd_command(b'PING', port=self.tcp_port, timeout=2.0) == 'PONG'
        except OSError:
            return False

    def start(self, timeout=30.0):
        self.write_config()
        self._spawn(['clamd', '-c', self.conf_path], os.path.join(self.basedir, 'clamd.out'))

        def ready():
            self._fail_if_exited('clamd')
            return self.ping()

        try:
            wait_until(ready, timeout, what='clamd PONG')
        except TimeoutError:
            self.stop()
            raise
        return self

    def scan(self, data, use_socket=False):
        """zINSTREAM `data`; return clamd's reply, e.g. 'stream: OK'."""
        if use_socket:
            return clamd_command(b'INSTREAM', data, socket_path=self.socket_path)
        return clamd_command(b'INSTREAM', data, port=self.tcp_port)

    def log_text(self):
        return (read_text(self.log_path) + read_text(os.path.join(self.basedir, 'clamd.out')))


# ---------------------------------------------------------------------------
# spamd
# ---------------------------------------------------------------------------

SPAMD_USER = 'debian-spamd'

# Offline: no DNS, no network checks, no learning.
_SPAMD_LOCAL_CF = """\
dns_available no
skip_rbl_checks 1
use_bayes 0
bayes_auto_learn 0
"""


def spamd_request(port, command, message=b'', headers=None, timeout=30.0):
    """One spamc-protocol request (command b'CHECK', b'SYMBOLS', b'PING', ...).

    Returns (status_line, headers_dict, body_bytes) of spamd's reply.
    """
    lines = [command + b' SPAMC/1.5']
    if command != b'PING':
        lines.append(b'Content-length: %d' % len(message))
    for name, value in (headers or {}).items():
        lines.append(('%s: %s' % (name, value)).encode())
    request = b'\r\n'.join(lines) + b'\r\n\r\n' + message
    with socket.create_connection(('127.0.0.1', port), timeout=timeout) as connection:
        connection.sendall(request)
        connection.shutdown(socket.SHUT_WR)
        reply = b''
        while True:
            data = connection.recv(65536)
            if not data:
                break
            reply += data
    head, _, body = reply.partition(b'\r\n\r\n')
    head_lines = head.decode('utf-8', 'replace').split('\r\n')
    reply_headers = {}
    for line in head_lines[1:]:
        name, _, value = line.partition(':')
        reply_headers[name.strip().lower()] = value.strip()
    return head_lines[0], reply_headers, body


class SpamdInstance(ChildPeer):
    """A private spamd on 127.0.0.1:port with an offline site configuration.

    As root spamd must drop to a user (debian-spamd), who must reach the site config and
    home folders: `basedir` must be world-traversable (see world_dir()).
    """

    def __init__(self, basedir, port=None, max_children=3, local_cf=''):
        self.basedir = os.path.join(basedir, 'spamd')
        self.siteconfig_dir = os.path.join(self.basedir, 'siteconfig')
        self.home_dir = os.path.join(self.basedir, 'home')
        self.log_path = os.path.join(self.basedir, 'spamd.log')
        self.port = port or free_port()
        self.max_children = max_children
        self.extra_local_cf = local_cf

    def write_config(self):
        for folder in (self.siteconfig_dir, self.home_dir):
            os.makedirs(folder, exist_ok=True)
        # The .pre files load the plugins (Check among them: without it spamd's child
        # dies with "cannot scan!"), so the private site config starts from Debian's.
        for name in os.listdir('/etc/spamassassin'):
            if name.endswith('.pre'):
                shutil.copy(os.path.join('/etc/spamassassin', name), self.siteconfig_dir)
        with open(os.path.join(self.siteconfig_dir, 'local.cf'), 'w') as local_cf:
            local_cf.write(_SPAMD_LOCAL_CF + self.extra_local_cf)
        chown_tree(self.basedir, SPAMD_USER)
        os.chmod(self.basedir, 0o755)

    def command(self):
        command = ['spamd', '-L', '-x',
                   '--listen=127.0.0.1:%d' % self.port,
                   '--siteconfigpath=%s' % self.siteconfig_dir,
                   '--helper-home-dir=%s' % self.home_dir,
                   '--syslog=%s' % self.log_path,
                   '--min-children=1', '--max-children=%d' % self.max_children]
        if os.geteuid() == 0:
            command += ['-u', SPAMD_USER, '-g', SPAMD_USER]
        return command

    def ping(self):
        try:
            status, _, _ = spamd_request(self.port, b'PING', timeout=2.0)
        except OSError:
            return False
        return status.endswith('PONG')

    def start(self, timeout=60.0):
        self.write_config()
        self._spawn(self.command(), os.path.join(self.basedir, 'spamd.out'))

        def ready():
            self._fail_if_exited('spamd')
            # A bare connect only makes spamd log "bad protocol"; ask for a real PONG.
            return self.ping()

        try:
            wait_until(ready, timeout, interval=0.05, what='spamd PONG')
        except TimeoutError:
            self.stop()
            raise
        return self

    def check(self, message, command=b'CHECK'):
        """Ask spamd about `message`; return (is_spam, score, body) from its reply."""
        status, headers, body = spamd_request(self.port, command, message)
        match = re.match(r'(True|False)\s*;\s*(-?[\d.]+)', headers.get('spam', ''))
        if not match:
            raise RuntimeError('unexpected spamd reply %r %r' % (status, headers))
        return match.group(1) == 'True', float(match.group(2)), body

    def log_text(self):
        return read_text(self.log_path) + read_text(os.path.join(self.basedir, 'spamd.out'))


# ---------------------------------------------------------------------------
# SQL databases: PostgreSQL and MariaDB
# ---------------------------------------------------------------------------

def _run_checked(command, what, timeout=120, **options):
    """Run `command`; return its output, raise RuntimeError with it when it fails."""
    result = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=timeout, **options)
    output = result.stdout.decode('utf-8', 'replace')
    if result.returncode != 0:
        raise RuntimeError('%s failed (exit %d): %s\n%s'
                           % (what, result.returncode, ' '.join(command), _tail(output)))
    return output


def postgres_bin_dir():
    """/usr/lib/postgresql/<newest version>/bin, where Debian keeps initdb and pg_ctl."""
    found = []
    root = '/usr/lib/postgresql'
    for version in os.listdir(root) if os.path.isdir(root) else ():
        bin_dir = os.path.join(root, version, 'bin')
        if version.isdigit() and os.path.exists(os.path.join(bin_dir, 'initdb')):
            found.append((int(version), bin_dir))
    if not found:
        _peer_unavailable('PostgreSQL (initdb) is not installed')
    return max(found)[1]


class PostgresInstance(object):
    """A private PostgreSQL on 127.0.0.1:port with its own cluster under `basedir`.

    As root, initdb and pg_ctl run as the `postgres` user (PostgreSQL refuses root), so
    `basedir` must be reachable by it (see world_dir()). Started with pg_ctl (which waits
    until it accepts connections), stopped by the postmaster's pid with SIGINT (fast
    shutdown: open connections do not hold it up). No system service is involved.

    The database `fuglu` belongs to the role `fuglu` (password `fuglu-secret`, checked on
    TCP); pg_stat_statements is loaded, so tests can count the queries the database ran
    (statement_calls()).
    """

    USER, PASSWORD, DATABASE = 'fuglu', 'fuglu-secret', 'fuglu'

    def __init__(self, basedir, port=None):
        self.basedir = os.path.join(basedir, 'postgres')
        self.data_dir = os.path.join(self.basedir, 'data')
        self.log_path = os.path.join(self.basedir, 'postgres.log')
        self.port = port or free_port()
        self.pid = None

    def _as_postgres(self, command, what, timeout=120):
        prefix = ['runuser', '-u', 'postgres', '--'] if os.geteuid() == 0 else []
        return _run_checked(prefix + command, what, timeout, cwd=self.basedir)

    def _initialise(self):
        os.makedirs(self.basedir, exist_ok=True)
        os.chmod(self.basedir, 0o755)
        if os.geteuid() == 0:
            chown_tree(self.basedir, 'postgres')
        self._as_postgres([os.path.join(postgres_bin_dir(), 'initdb'), '-D', self.data_dir,
                           '-U', 'postgres', '--auth-local=trust', '--auth-host=scram-sha-256',
                           '-E', 'UTF8', '--locale=C.UTF-8'], 'initdb')

    def start(self, timeout=60.0):
        first_start = not os.path.exists(os.path.join(self.data_dir, 'PG_VERSION'))
        if first_start:
            self._initialise()
        options = ('-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off '
                   '-c shared_preload_libraries=pg_stat_statements' % (self.port, self.basedir))
        try:
            self._as_postgres([os.path.join(postgres_bin_dir(), 'pg_ctl'), '-D', self.data_dir,
                               '-l', self.log_path, '-w', '-t', str(int(timeout)), '-o', options,
                               'start'], 'pg_ctl start', timeout=timeout + 10)
        except RuntimeError as error:
            raise RuntimeError('%s\n--- postgres log ---\n%s' % (error, _tail(self.log_text())))
        self.pid = int(read_text(os.path.join(self.data_dir, 'postmaster.pid')).split()[0])
        _started(self)
        if first_start:
            self.psql("CREATE ROLE %s LOGIN PASSWORD '%s'" % (self.USER, self.PASSWORD), 'postgres')
            self.psql('CREATE DATABASE %s OWNER %s' % (self.DATABASE, self.USER), 'postgres')
            self.psql('CREATE EXTENSION pg_stat_statements')
        return self

    def stop(self, timeout=20.0):
        _stopped(self)
        if self.pid is not None:
            stop_pid(self.pid, timeout, first_signal=signal.SIGINT)
            self.pid = None

    def is_running(self):
        return self.pid is not None and pid_is_alive(self.pid)

    def psql(self, statement, database=None):
        """Run SQL as the superuser over the unix socket; return psql's unaligned output."""
        return self._as_postgres([os.path.join(postgres_bin_dir(), 'psql'), '-h', self.basedir,
                                  '-p', str(self.port), '-U', 'postgres',
                                  '-d', database or self.DATABASE, '-v', 'ON_ERROR_STOP=1',
                                  '-At', '-c', statement], 'psql')

    def url(self, driver='psycopg2'):
        return 'postgresql+%s://%s:%s@127.0.0.1:%d/%s' % (
            driver, self.USER, self.PASSWORD, self.port, self.DATABASE)

    def statement_calls(self, fragment):
        """How often the database ran statements containing `fragment` since the last
        reset_statement_calls() (pg_stat_statements)."""
        output = self.psql("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
                           "WHERE query LIKE '%%%s%%'" % fragment.replace("'", "''"))
        return int(output.strip() or 0)

    def reset_statement_calls(self):
        self.psql('SELECT pg_stat_statements_reset()')

    def log_text(self):
        return read_text(self.log_path)


class MariadbInstance(ChildPeer):
    """A private MariaDB on 127.0.0.1:port with its own data directory under `basedir`:
    mariadb-install-db once, then mariadbd in the foreground as our child (as the
    `mysql` user when we are root), stopped by pid. No system service is involved.

    The database `fuglu` is reachable over TCP as `fuglu` / `fuglu-secret`; sql() runs
    statements as root over the instance's own unix socket.
    """

    USER, PASSWORD, DATABASE = 'fuglu', 'fuglu-secret', 'fuglu'

    def __init__(self, basedir, port=None):
        self.basedir = os.path.join(basedir, 'mariadb')
        self.data_dir = os.path.join(self.basedir, 'data')
        self.socket_path = os.path.join(self.basedir, 'mariadbd.sock')
        self.log_path = os.path.join(self.basedir, 'mariadbd.log')
        self.port = port or free_port()

    def _user_options(self):
        return ['--user=mysql'] if os.geteuid() == 0 else []

    def _initialise(self):
        os.makedirs(self.data_dir, exist_ok=True)
        os.chmod(self.basedir, 0o755)
        if os.geteuid() == 0:
            chown_tree(self.basedir, 'mysql')
        _run_checked(['mariadb-install-db', '--no-defaults', '--datadir=' + self.data_dir,
                      '--auth-root-authentication-method=socket', '--skip-test-db']
                     + self._user_options(), 'mariadb-install-db')

    def command(self):
        return (['mariadbd', '--no-defaults', '--datadir=' + self.data_dir,
                 '--socket=' + self.socket_path, '--port=%d' % self.port,
                 '--bind-address=127.0.0.1', '--skip-name-resolve', '--log-error=' + self.log_path,
                 '--pid-file=' + os.path.join(self.basedir, 'mariadbd.pid'),
                 '--innodb-flush-log-at-trx-commit=0', '--skip-log-bin']
                + self._user_options())

    def start(self, timeout=60.0):
        first_start = not os.path.isdir(os.path.join(self.data_dir, 'mysql'))
        if first_start:
            self._initialise()
        mariadbd = shutil.which('mariadbd') or '/usr/sbin/mariadbd'
        self._spawn([mariadbd] + self.command()[1:], os.path.join(self.basedir, 'mariadbd.out'))

        def ready():
            self._fail_if_exited('mariadbd')
            if not (os.path.exists(self.socket_path) and port_accepts(self.port, timeout=0.2)):
                return False
            try:
                self.sql('SELECT 1', database='mysql')
            except RuntimeError:
                return False
            return True

        try:
            wait_until(ready, timeout, interval=0.1, what='mariadbd accepting queries')
        except (TimeoutError, RuntimeError):
            self.stop()
            raise
        if first_start:
            setup = ("CREATE DATABASE {db}; CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY "
                     "'{password}'; GRANT ALL ON {db}.* TO '{user}'@'127.0.0.1'")
            self.sql(setup.format(db=self.DATABASE, user=self.USER, password=self.PASSWORD),
                     database='mysql')
        return self

    def is_running(self):
        return self.process is not None and self.process.poll() is None

    def sql(self, statement, database=None):
        """Run SQL as root over the unix socket; return the tab separated output."""
        return _run_checked(['mariadb', '--no-defaults', '-S', self.socket_path, '-u', 'root',
                             '-N', '-B', '-D', database or self.DATABASE, '-e', statement],
                            'mariadb client', timeout=60)

    def url(self, driver='pymysql'):
        return 'mysql+%s://%s:%s@127.0.0.1:%d/%s' % (driver, self.USER, self.PASSWORD, self.port,
                                                     self.DATABASE)

    def log_text(self):
        return read_text(self.log_path) + read_text(os.path.join(self.basedir, 'mariadbd.out'))


# ---------------------------------------------------------------------------
# fuglu itself
# ---------------------------------------------------------------------------

def _first_incoming_port(config_text):
    """The TCP port of the first [main] incomingport entry (port | proto:port | proto:addr:port)."""
    in_main = False
    for line in config_text.splitlines():
        stripped = line.strip()
        if stripped.startswith('['):
            in_main = stripped.lower() == '[main]'
            continue
        if in_main and re.match(r'incomingport\s*[=:]', stripped):
            first_entry = re.split(r'[=:]', stripped, 1)[1].split(',')[0].strip()
            port = first_entry.rsplit(':', 1)[-1].strip()
            return int(port) if port.isdigit() else None
    return None


# The backend the integration tests run fuglu on: the tox env `integration` runs them on
# the thread backend, `integration-process` on the process backend (FUGLU_TEST_BACKEND=
# process); a config's own [performance] backend is overridden through a conf.d file.
BACKEND_ENV = 'FUGLU_TEST_BACKEND'
TEST_WORKER_PROCESSES = 2


def test_backend():
    return os.environ.get(BACKEND_ENV, '').strip() or 'thread'


def serving_processes():
    """How many processes of a FugluProcess on test_backend() serve mail."""
    return 1 if test_backend() == 'thread' else TEST_WORKER_PROCESSES


class FugluProcess(ChildPeer):
    """fuglu (python3 <repo>/fuglu.py, or a .pyz, or another script) run as `-f -c CONF`,
    on the backend test_backend() names (and --configdir WORKDIR/conf.d holding the
    override when that is not the thread backend).

    config: the config text, or the path of a config file.
    program: fuglu.py (default: the repository's) or a .pyz path.
    workdir: where the config file (when given as text), conf.d and the log go; a new
    world dir when not given (removed by cleanup()).
    backend: the backend to run on instead of test_backend().
    wait_port: the port whose accepting counts as started (default: the first of
    incomingport); 0: only the log line "Startup complete" does.
    """

    def __init__(self, config, program=None, python=None, workdir=None, extra_args=(),
                 env=None, wait_port=None, backend=None):
        self._own_workdir = workdir is None
        self.workdir = workdir or world_dir('fuglu-proc-')
        if '\n' not in config and os.path.isfile(config):
            self.config_path = os.path.abspath(config)
            with open(self.config_path) as conf:
                config_text = conf.read()
        else:
            self.config_path = os.path.join(self.workdir, 'fuglu.conf')
            config_text = config
            with open(self.config_path, 'w') as conf:
                conf.write(config)
        self.program = program or os.path.join(REPO_DIR, 'fuglu.py')
        self.python = python or sys.executable
        self.extra_args = list(extra_args)
        self.env = env
        self.wait_port = _first_incoming_port(config_text) if wait_port is None else wait_port
        self.log_path = os.path.join(self.workdir, 'fuglu.log')
        self.backend = backend or test_backend()
        is_fuglu = os.path.basename(self.program) == 'fuglu.py' or self.program.endswith('.pyz')
        if self.backend != 'thread' and is_fuglu:
            confd = os.path.join(self.workdir, 'conf.d')
            os.makedirs(confd, exist_ok=True)
            os.chmod(confd, 0o755)
            with open(os.path.join(confd, 'backend.conf'), 'w') as conf:
                conf.write('[performance]\nbackend = %s\ninitialprocs = %d\n'
                           % (self.backend, TEST_WORKER_PROCESSES))
            self.extra_args = ['--configdir', confd] + self.extra_args

    def command(self):
        return [self.python, self.program, '-f', '-c', self.config_path] + self.extra_args

    def start(self, timeout=30.0):
        if not os.path.exists(self.program):
            raise RuntimeError('fuglu program not found: %s' % self.program)
        # a session of its own: kill_all() reaches the workers of the process backend
        self._spawn(self.command(), self.log_path, cwd=self.workdir, env=self.env,
                    start_new_session=True)

        def ready():
            self._fail_if_exited('fuglu', when=' during start-up')
            if 'Startup complete' in self.log_text():
                return True
            return bool(self.wait_port) and port_accepts(self.wait_port, timeout=0.2)

        try:
            wait_until(ready, timeout, interval=0.05, what='fuglu start-up')
        except TimeoutError as error:
            log_tail = _tail(self.log_text())
            self.stop()
            raise TimeoutError('%s\n--- fuglu log ---\n%s' % (error, log_tail))
        return self

    def kill_all(self):
        """SIGKILL fuglu and every process of its session at once (the process backend's
        fork server and workers too), as power loss or the OOM killer of its cgroup
        would: nothing runs on fuglu's side, no finally, no atexit. Reaps fuglu."""
        group = self.pid
        os.killpg(group, signal.SIGKILL)
        self.process.wait()
        _stopped(self)
        self.process = None
        wait_until(lambda: not group_members(group), 10, what='process group %d to die' % group)

    def cleanup(self):
        self.stop()
        if self._own_workdir:
            remove_world_dir(self.workdir)

    def is_running(self):
        return self.process is not None and self.process.poll() is None

    def log_text(self):
        return read_text(self.log_path)

    def wait_log(self, pattern, timeout=10.0):
        return wait_log_match(self.log_text, pattern, timeout, 'fuglu log')
