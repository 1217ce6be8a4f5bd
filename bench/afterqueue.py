#!/usr/bin/env python3
"""After-queue pass-through benchmark: our fuglu against upstream FuGlu 1.7.0.

Both filters run as the after-queue content filter of the smtp connector, with
no plugins and the thread backend, between Postfix's own load tools:

    smtp-source --SMTP--> filter (smtp connector) --SMTP re-inject--> smtp-sink -c
       client              127.0.0.1:<free port>                      counts messages

For every cell of the matrix (concurrency x message size) each filter is started
afresh, so every cell also yields one start-up time, one idle RSS and its own
peak RSS.  After a warm-up the filters take turns (upstream, ours, ours,
upstream), so that other load on the machine hits both alike; the faster of a
filter's two runs is reported.  Per cell and filter we record:

* msgs/s      messages sent divided by the wall time of smtp-source
* CPU ms/msg  utime+stime of the filter's process tree (/proc/<pid>/stat of the
              process and of every live descendant, threads included, plus the
              times of reaped children), delta over the run, per message sent
* peak RSS    VmHWM summed over the processes of the tree at the end of the cell
* idle RSS    VmRSS summed over the tree one second after the port accepted
* start       time from exec to the first successful TCP connect to the port
* lost        messages sent minus messages counted by smtp-sink

stdlib only; everything listens on 127.0.0.1 and every process started here is
killed by its pid before the script exits.  See bench/README.md.
"""

import argparse
import datetime
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
RESULTS_FILE = os.path.join(BENCH_DIR, 'RESULTS.md')
SECTION_TITLE = '## after-queue pass-through'

UPSTREAM_VERSION = '1.7.0'
DEFAULT_UPSTREAM_VENV = '/tmp/fuglu-upstream-venv'
DEFAULT_OURS_VENV = '/tmp/fuglu-ours-venv'
SMTP_SOURCE = '/usr/sbin/smtp-source'
SMTP_SINK = '/usr/sbin/smtp-sink'

CONCURRENCY_LEVELS = (1, 10, 50)
MESSAGE_SIZES = (('5 KB', 5 * 1024), ('500 KB', 500 * 1024))

# Messages per measured run.  Chosen so that one upstream run takes 6-10 s on a
# 2-core machine (shorter runs were noisy); ours gets the same workload.
MESSAGE_COUNTS = {
    ('5 KB', 1): 3000, ('5 KB', 10): 4000, ('5 KB', 50): 4000,
    ('500 KB', 1): 500, ('500 KB', 10): 600, ('500 KB', 50): 600,
}
QUICK_MESSAGE_COUNTS = {
    ('5 KB', 1): 50, ('5 KB', 10): 100, ('5 KB', 50): 100,
    ('500 KB', 1): 10, ('500 KB', 10): 20, ('500 KB', 50): 50,
}

# Thread pool sized for c=50 from the first message on: upstream grows its pool
# by one worker per second only, which would otherwise dominate the c=50 cells.
MIN_THREADS = 50
MAX_THREADS = 60

SENDER = 'bench-sender@example.org'
RECIPIENT = 'bench-recipient@example.net'

START_TIMEOUT = 60.0          # seconds a filter may take to accept connections
IDLE_SETTLE = 1.0             # seconds between "accepting" and the idle RSS reading
SOURCE_TIMEOUT = 300.0        # seconds one smtp-source run may take
DELIVERY_SETTLE = 3.0         # seconds to wait for the sink counter to catch up
STOP_GRACE = 2.0              # seconds between SIGTERM and SIGKILL for a filter
MEASURED_RUNS = 2             # measured smtp-source runs per cell; the faster counts

CLOCK_TICKS = os.sysconf('SC_CLK_TCK')

# Target ratios and limits from the project's performance goals.
TARGET_RATE_5KB_C10 = 3.0
TARGET_RATE_500KB_C10 = 4.0
TARGET_CPU_RATIO = 1.0 / 3.0
TARGET_IDLE_RSS_MB = 25.0
TARGET_START_S = 0.2


class BenchError(Exception):
    """A filter or a tool could not be set up or did not behave."""


class SinkError(BenchError):
    """smtp-sink went away: the cell is void, the filter is not to blame."""


class StartError(BenchError):
    """The filter did not come up: no point in trying the next cells."""


# ---------------------------------------------------------------------------
# /proc readings
# ---------------------------------------------------------------------------

def _stat_fields(pid):
    """Fields of /proc/<pid>/stat after the command name, or None if gone."""
    try:
        with open('/proc/%d/stat' % pid) as stat_file:
            text = stat_file.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may contain spaces and parentheses; it ends at the last ')'.
    return text[text.rindex(')') + 2:].split()


def process_tree(root_pid):
    """The root pid and every live descendant (processes, not threads)."""
    children = {}
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    tree, pending = [], [root_pid]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, ()))
    return tree


def tree_cpu_seconds(root_pid):
    """utime+stime of the whole tree, including children already reaped.

    Field numbers from proc(5): 14 utime, 15 stime, 16 cutime, 17 cstime;
    the list here starts at field 3 (state).  Per-process times already add
    up all threads of that process.
    """
    ticks = 0
    for pid in process_tree(root_pid):
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += sum(int(value) for value in fields[11:15])
    return ticks / CLOCK_TICKS


def _status_kb(pid, key):
    try:
        with open('/proc/%d/status' % pid) as status_file:
            for line in status_file:
                if line.startswith(key + ':'):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def tree_memory_mb(root_pid, key):
    """VmRSS or VmHWM summed over the processes of the tree, in MiB."""
    return sum(_status_kb(pid, key) for pid in process_tree(root_pid)) / 1024.0


def tree_threads(root_pid):
    return sum(_status_kb(pid, 'Threads') for pid in process_tree(root_pid))


# ---------------------------------------------------------------------------
# processes started by the benchmark
# ---------------------------------------------------------------------------

def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def port_accepts(port):
    try:
        with socket.create_connection(('127.0.0.1', port), timeout=0.5):
            return True
    except OSError:
        return False


def stop_process(process, grace=5.0):
    """SIGTERM the process and its descendants by pid, SIGKILL what remains.

    Returns True when the process exited within grace seconds of SIGTERM.
    """
    if process is None or process.poll() is not None:
        return True
    pids = process_tree(process.pid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    exited = process.poll() is not None
    # Whatever is still alive: the root if it ignored SIGTERM, and children
    # that outlived it (those are reparented, so they are known by pid only).
    leftovers = set(pids[1:])
    if not exited:
        leftovers.update(process_tree(process.pid))
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if process.poll() is None:
        process.wait(timeout=grace)
    return exited


def tail(path, lines=15):
    try:
        with open(path, errors='replace') as log_file:
            return ''.join(log_file.readlines()[-lines:])
    except OSError:
        return '(no log at %s)' % path


class CountingSink:
    """smtp-sink with running counters; its stdout file is read for 'mesg=N'."""

    COUNTER = re.compile(rb'mesg=(\d+)')

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.starts = 0
        self.port = None
        self.counter_path = None
        self.process = None

    def alive(self):
        return self.process is not None and self.process.poll() is None

    def start(self):
        """Start smtp-sink on a new free port (also to replace one that died)."""
        self.starts += 1
        self.port = free_port()
        self.counter_path = os.path.join(
            self.run_dir, 'smtp-sink-%d.counters' % self.starts)
        command = [SMTP_SINK, '-c']
        if os.geteuid() == 0:
            # smtp-sink refuses to run as root without -u.
            command += ['-u', 'root']
        command += ['127.0.0.1:%d' % self.port, '1024']
        with open(self.counter_path, 'wb') as counter_file:
            self.process = subprocess.Popen(command, stdout=counter_file,
                                            stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        deadline = time.monotonic() + 10
        while not port_accepts(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise BenchError('smtp-sink did not start: %s'
                                 % tail(self.counter_path))
            time.sleep(0.01)

    def delivered(self):
        """Messages received so far (the counter line is rewritten with \\r)."""
        with open(self.counter_path, 'rb') as counter_file:
            counter_file.seek(0, os.SEEK_END)
            counter_file.seek(max(0, counter_file.tell() - 200))
            found = self.COUNTER.findall(counter_file.read())
        return int(found[-1]) if found else 0

    def wait_for(self, expected):
        """Count after delivery settles: stop early once expected is reached."""
        deadline = time.monotonic() + DELIVERY_SETTLE
        count = self.delivered()
        while count < expected and time.monotonic() < deadline:
            time.sleep(0.05)
            count = self.delivered()
        return count

    def check_alive(self):
        if not self.alive():
            raise SinkError('smtp-sink (pid %d) exited with %s during the cell:\n%s'
                            % (self.process.pid, self.process.returncode,
                               tail(self.counter_path).replace('\r', '\n')[-500:]))

    def stop(self):
        stop_process(self.process)


def end_run(sink, run_root, keep):
    """Stop the sink; remove the run's configs and logs unless ``keep``."""
    sink.stop()
    if keep:
        print('configs and logs kept in %s' % run_root)
    else:
        shutil.rmtree(run_root, ignore_errors=True)


def run_smtp_source(port, sessions, count, size):
    """Send count messages of size bytes, one per connection; returns (seconds, errors)."""
    command = [SMTP_SOURCE, '-s', str(sessions), '-m', str(count), '-l', str(size),
               '-M', 'bench.example.org', '-f', SENDER, '-t', RECIPIENT,
               '127.0.0.1:%d' % port]
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        _, errors = process.communicate(timeout=SOURCE_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise BenchError('smtp-source did not finish within %d s' % SOURCE_TIMEOUT)
    finally:
        stop_process(process)
    elapsed = time.monotonic() - started
    error_text = errors.decode('utf-8', 'replace').strip()
    if process.returncode != 0:
        error_text = ('exit %d; ' % process.returncode) + error_text
    return elapsed, error_text


# ---------------------------------------------------------------------------
# the two filters
# ---------------------------------------------------------------------------

# The [main] settings every benchmarked filter shares (bench/milter.py too): in the
# foreground, no plugins, listening on 127.0.0.1 only, both as the user running the
# benchmark (fuglu drops privileges to `user` with -f too, FuGlu does not; the run
# folders are private to that user).
BENCH_MAIN_SECTION = """\
[main]
daemonize=0
user=root
identifier=bench
plugins=
prependers=
appenders=
bindaddress=127.0.0.1
"""

FUGLU_CONF = """\
# Generated by bench/afterqueue.py: after-queue pass-through, no plugins.
""" + BENCH_MAIN_SECTION + """\
incomingport=smtp:127.0.0.1:{listen_port}
outgoinghost=127.0.0.1
outgoingport={sink_port}
controlport={run_dir}/control.sock
versioncheck=0
tempdir={run_dir}/spool

[performance]
backend=thread
minthreads={min_threads}
maxthreads={max_threads}
# ours: no per-client cap (smtp-source is one client address with c connections)
max_sessions_per_client=0
"""

LOGGING_CONF = """\
# Generated by bench/afterqueue.py: everything at INFO into one file.
[loggers]
keys=root

[handlers]
keys=logfile

[formatters]
keys=plain

[logger_root]
level=INFO
handlers=logfile

[handler_logfile]
class=FileHandler
level=INFO
args=({log_path!r}, 'a')
formatter=plain

[formatter_plain]
format=%(asctime)s %(name)s: %(levelname)s %(message)s
"""


def write_logging_conf(run_dir):
    """Write run_dir/logging.conf (INFO into run_dir/fuglu.log); return its path."""
    logging_path = os.path.join(run_dir, 'logging.conf')
    with open(logging_path, 'w') as logging_file:
        logging_file.write(LOGGING_CONF.format(log_path=os.path.join(run_dir, 'fuglu.log')))
    return logging_path


class Filter:
    """One filter under test: how to start it with a generated config."""

    def __init__(self, name, command_prefix, python):
        self.name = name
        self.command_prefix = command_prefix
        self.python = python
        self.python_version = python_version(python)
        self.help_text = None

    def supports(self, flag):
        """Whether the filter's --help mentions flag (asked once)."""
        if self.help_text is None:
            # Not from the repository root: there `python -m fuglu` would
            # import our fuglu.py instead of upstream's package.
            try:
                self.help_text = subprocess.run(
                    self.command_prefix + ['--help'], stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    cwd=tempfile.gettempdir(),
                    timeout=60).stdout.decode('utf-8', 'replace')
            except (OSError, subprocess.TimeoutExpired):
                self.help_text = ''
        return flag in self.help_text

    def write_config(self, run_dir, listen_port, sink_port):
        os.makedirs(os.path.join(run_dir, 'spool'), exist_ok=True)
        conf_path = os.path.join(run_dir, 'fuglu.conf')
        with open(conf_path, 'w') as conf_file:
            conf_file.write(FUGLU_CONF.format(
                listen_port=listen_port, sink_port=sink_port, run_dir=run_dir,
                min_threads=MIN_THREADS, max_threads=MAX_THREADS))
        return conf_path, write_logging_conf(run_dir)

    def command(self, conf_path, logging_path):
        command = self.command_prefix + ['-f', '-c', conf_path]
        # Both filters log at INFO into a file when they can; without
        # --logconfig the foreground log on stdout/stderr goes to a file too.
        if self.supports('--logconfig'):
            command += ['--logconfig', logging_path]
        elif self.supports('--baseloglevel'):
            command += ['--baseloglevel', 'INFO']
        return command


def python_version(python):
    try:
        output = subprocess.run(
            [python, '-c', 'import platform; print(platform.python_version())'],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=30)
        return output.stdout.decode().strip() or '?'
    except (OSError, subprocess.TimeoutExpired):
        return '?'


def upstream_filter(venv, upstream_python):
    """Upstream FuGlu 1.7.0 from PyPI in a throwaway venv (created once, reused)."""
    venv_python = os.path.join(venv, 'bin', 'python')
    probe = [venv_python, '-c',
             'import importlib.metadata as m; print(m.version("fuglu"))']

    def installed_version():
        if not os.path.exists(venv_python):
            return None
        result = subprocess.run(probe, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        return result.stdout.decode().strip() if result.returncode == 0 else None

    if installed_version() != UPSTREAM_VERSION:
        print('creating %s with fuglu==%s (once) ...' % (venv, UPSTREAM_VERSION),
              flush=True)
        subprocess.run([upstream_python, '-m', 'venv', venv], check=True)
        subprocess.run([venv_python, '-m', 'pip', 'install', '--quiet',
                        '--disable-pip-version-check',
                        'fuglu==%s' % UPSTREAM_VERSION], check=True)
        if installed_version() != UPSTREAM_VERSION:
            raise BenchError('fuglu %s not importable in %s'
                             % (UPSTREAM_VERSION, venv))
    # Upstream has no console script; the daemon is started as a module.
    return Filter('upstream', [venv_python, '-m', 'fuglu'], venv_python)


def ours_filter(script, python):
    return Filter('ours', [python, script], python)


def bare_venv_python(venv, base_python):
    """A venv with nothing installed, made from base_python (once, then reused).

    Ours runs from such a venv by default so that both filters get the same
    interpreter set-up: a venv does not read the base interpreter's
    site-packages, where a .pth file (on this machine: one importing certifi
    at every start) would cost ours start time and memory that upstream,
    in its own venv, does not pay.
    """
    venv_python = os.path.join(venv, 'bin', 'python')
    if not os.path.exists(venv_python):
        subprocess.run([base_python, '-m', 'venv', '--without-pip', venv], check=True)
    return venv_python


def default_upstream_python():
    """FuGlu 1.7.0 needs Python >= 3.11."""
    if sys.version_info >= (3, 11):
        return sys.executable
    for name in ('python3.11', 'python3.12', 'python3.13', 'python3'):
        found = shutil.which(name)
        if found:
            return found
    return 'python3'


# ---------------------------------------------------------------------------
# one cell
# ---------------------------------------------------------------------------

class Cell:
    """One cell of the matrix. ``warmup`` and ``runs`` (warm-up messages, measured runs
    per filter) default to max(20, concurrency) and MEASURED_RUNS; bench/memory.py
    lowers them for 20 MB messages, which upstream takes seconds each for."""

    def __init__(self, size_label, size, concurrency, count, warmup=None, runs=None):
        self.size_label = size_label
        self.size = size
        self.concurrency = concurrency
        self.count = count
        self.warmup = max(20, concurrency) if warmup is None else warmup
        self.runs = MEASURED_RUNS if runs is None else runs

    @property
    def key(self):
        return (self.size_label, self.concurrency)

    def __str__(self):
        return '%s c=%d' % (self.size_label, self.concurrency)


class RunningFilter:
    """One started filter process for one cell, and what was measured on it."""

    def __init__(self, filter_under_test, cell, sink, run_root):
        self.filter = filter_under_test
        self.name = filter_under_test.name
        self.cell = cell
        self.sink = sink
        self.run_dir = tempfile.mkdtemp(prefix='%s-%s-c%d-' % (
            self.name, cell.size_label.replace(' ', ''), cell.concurrency),
            dir=run_root)
        self.listen_port = free_port()
        self.output_path = os.path.join(self.run_dir, 'output.log')
        self.process = None
        self.runs = []
        self.result = {}

    def start(self):
        """Exec the filter, time it until the port accepts, read the idle RSS."""
        conf_path, logging_path = self.filter.write_config(
            self.run_dir, self.listen_port, self.sink.port)
        command = self.filter.command(conf_path, logging_path)
        with open(self.output_path, 'wb') as output_file:
            started = time.monotonic()
            self.process = subprocess.Popen(
                command, stdout=output_file, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.run_dir,  # not the repository: see Filter.supports()
                start_new_session=True)
        while not port_accepts(self.listen_port):
            if self.process.poll() is not None:
                raise StartError('%s exited with %s before listening:\n%s%s' % (
                    self.name, self.process.returncode, tail(self.output_path),
                    tail(os.path.join(self.run_dir, 'fuglu.log'))))
            if time.monotonic() - started > START_TIMEOUT:
                raise StartError('%s not listening after %d s'
                                 % (self.name, START_TIMEOUT))
            time.sleep(0.002)
        self.result['start_s'] = time.monotonic() - started
        time.sleep(IDLE_SETTLE)
        self.result['idle_rss_mb'] = tree_memory_mb(self.process.pid, 'VmRSS')
        self.result['idle_threads'] = tree_threads(self.process.pid)

    def warm_up(self):
        """First messages pay for lazy imports and first connections."""
        warmup = self.cell.warmup
        before = self.sink.delivered()
        _, errors = run_smtp_source(self.listen_port, self.cell.concurrency,
                                    warmup, self.cell.size)
        delivered = self.sink.wait_for(before + warmup) - before
        self.sink.check_alive()
        self.check_alive()
        if delivered != warmup:
            raise BenchError('%s: %d of %d warm-up messages delivered; '
                             'smtp-source: %s' % (self.name, delivered, warmup, errors))

    def measured_run(self):
        count = self.cell.count
        before = self.sink.delivered()
        cpu_before = tree_cpu_seconds(self.process.pid)
        elapsed, errors = run_smtp_source(self.listen_port, self.cell.concurrency,
                                          count, self.cell.size)
        delivered = self.sink.wait_for(before + count) - before
        cpu_used = tree_cpu_seconds(self.process.pid) - cpu_before
        self.sink.check_alive()
        self.check_alive()
        self.runs.append({'seconds': elapsed, 'rate': count / elapsed,
                          'cpu_ms_per_msg': 1000.0 * cpu_used / count,
                          'lost': count - delivered, 'source_errors': errors})

    def check_alive(self):
        if self.process.poll() is not None:
            raise BenchError('%s exited with %s during the cell:\n%s' % (
                self.name, self.process.returncode, tail(self.output_path)))

    def finish(self):
        """The cell's result: the faster measured run, every lost message."""
        # Other load on the machine can only slow a run down: keep the faster
        # run's figures.
        best = max(self.runs, key=lambda run: run['rate'])
        self.result.update({
            'seconds': best['seconds'],
            'rate': best['rate'],
            'rates': [run['rate'] for run in self.runs],
            'cpu_ms_per_msg': best['cpu_ms_per_msg'],
            'peak_rss_mb': tree_memory_mb(self.process.pid, 'VmHWM'),
            'end_rss_mb': tree_memory_mb(self.process.pid, 'VmRSS'),
            'lost': sum(run['lost'] for run in self.runs),
            'source_errors': '; '.join(run['source_errors'] for run in self.runs
                                       if run['source_errors']),
        })
        return self.result

    def stop(self):
        # Shutdown is not measured; a filter that ignores SIGTERM is noted.
        self.result['stops_on_sigterm'] = stop_process(self.process,
                                                       grace=STOP_GRACE)


def run_order(names, runs_each):
    """ABBA...: every filter's runs are spread evenly over the cell's time, so a
    load change on the machine during the cell hits all filters alike."""
    order = []
    for round_number in range(runs_each):
        order.extend(names if round_number % 2 == 0 else reversed(names))
    return order


def measure_cell(filters, cell, sink, run_root):
    """Start every filter for the cell, warm each up, alternate measured runs.

    Returns {filter name: result}.  Raises StartError (with .filter_name) when
    a filter does not come up, BenchError when the cell went wrong otherwise.
    """
    if not sink.alive():
        sink.start()
    running = []
    try:
        # Started one after the other, so that start-up times do not compete.
        for filter_under_test in filters:
            running_filter = RunningFilter(filter_under_test, cell, sink, run_root)
            running.append(running_filter)
            try:
                running_filter.start()
            except StartError as error:
                error.filter_name = filter_under_test.name
                raise
        for running_filter in running:
            running_filter.warm_up()
        by_name = {running_filter.name: running_filter for running_filter in running}
        for name in run_order([f.name for f in filters], cell.runs):
            by_name[name].measured_run()
        return {running_filter.name: running_filter.finish()
                for running_filter in running}
    finally:
        for running_filter in running:
            running_filter.stop()


CELL_ATTEMPTS = 3


def measure_with_retries(filters, cell, sink, run_root, notes):
    """measure_cell, again when the cell went wrong for a reason that may pass.

    On a shared machine smtp-sink may be killed from outside (someone's
    `pkill smtp-sink`); such a cell is void, not a result.  A filter that does
    not start is not retried (StartError goes to the caller).
    """
    for attempt in range(1, CELL_ATTEMPTS + 1):
        try:
            return measure_cell(filters, cell, sink, run_root)
        except StartError:
            raise
        except BenchError as error:
            if attempt == CELL_ATTEMPTS:
                raise
            first_line = str(error).splitlines()[0]
            notes.append('%s attempt %d void, repeated: %s'
                         % (cell, attempt, first_line))
            print('(attempt %d void: %s)' % (attempt, first_line), flush=True)


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------

def fmt(value, pattern='%.1f'):
    return '–' if value is None else pattern % value


def ratio(ours, upstream):
    if ours is None or upstream in (None, 0):
        return None
    return ours / upstream


def machine_info(filters, load_before):
    model = '?'
    try:
        with open('/proc/cpuinfo') as cpuinfo:
            for line in cpuinfo:
                if line.startswith('model name'):
                    model = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    postfix = subprocess.run(['sh', '-c', 'postconf -d mail_version 2>/dev/null'],
                             stdout=subprocess.PIPE).stdout.decode().strip()
    lines = [
        '- date: %s' % datetime.datetime.now(datetime.timezone.utc).strftime(
            '%Y-%m-%d %H:%M UTC'),
        '- machine: nproc %d, %s, Linux %s' % (os.cpu_count(), model,
                                               platform.release()),
        '- load tools: Postfix smtp-source / smtp-sink (%s)' % (postfix or '?'),
        '- load average (1 min) before / after the run: %.2f / %.2f '
        '(other work on the machine makes the figures noisier)'
        % (load_before, os.getloadavg()[0]),
    ]
    for filter_under_test in filters:
        lines.append('- %s: Python %s, `%s`' % (
            filter_under_test.name, filter_under_test.python_version,
            ' '.join(filter_under_test.command_prefix)))
    return lines


def build_report(cells, filters, results, failures, notes, argv, quick,
                 load_before):
    names = [f.name for f in filters]
    out = [SECTION_TITLE, '']
    out.append('Produced by `python3 bench/afterqueue.py%s`%s. smtp connector, no '
               'plugins, thread backend (minthreads=%d, maxthreads=%d), INFO log '
               'to a file; one message per SMTP connection; each filter started '
               'afresh per cell (side by side, started one after the other), '
               'warmed up with max(20, c) messages, then %d measured runs each, '
               'alternating between the filters (ABBA); the faster run of a '
               'filter is shown, lost counts all runs.' % (
                   (' ' + ' '.join(argv)) if argv else '',
                   ' (quick counts: smoke test, not figures)' if quick else '',
                   MIN_THREADS, MAX_THREADS, MEASURED_RUNS))
    out.append('')
    out.extend(machine_info(filters, load_before))
    out.append('')

    out.append('| size | c | msgs per run | filter | msgs/s | CPU ms/msg | peak RSS MB | lost | '
               'smtp-source errors |')
    out.append('|---|---|---|---|---|---|---|---|---|')
    for cell in cells:
        for name in names:
            result = results.get((name, cell.key))
            if result is None:
                out.append('| %s | %d | %d | %s | failed | | | | |' % (
                    cell.size_label, cell.concurrency, cell.count, name))
                continue
            errors = result['source_errors'].replace('\n', ' ').replace('|', '/')
            out.append('| %s | %d | %d | %s | %s | %s | %s | %d | %s |' % (
                cell.size_label, cell.concurrency, cell.count, name,
                fmt(result['rate'], '%.0f'), fmt(result['cpu_ms_per_msg'], '%.2f'),
                fmt(result['peak_rss_mb']), result['lost'],
                (errors[:120] + '…') if len(errors) > 120 else (errors or 'none')))
    out.append('')

    out.append('| filter | start → accepting, ms (median, min–max) | idle RSS MB (median) '
               '| idle threads | exits on SIGTERM within %g s |' % STOP_GRACE)
    out.append('|---|---|---|---|---|')
    startup = {}
    for name in names:
        runs = [results[(name, cell.key)] for cell in cells
                if (name, cell.key) in results]
        if not runs:
            out.append('| %s | failed | | | |' % name)
            continue
        starts = [1000.0 * run['start_s'] for run in runs]
        idle = statistics.median(run['idle_rss_mb'] for run in runs)
        threads = statistics.median(run['idle_threads'] for run in runs)
        startup[name] = (statistics.median(starts) / 1000.0, idle)
        clean_stops = sum(1 for run in runs if run['stops_on_sigterm'])
        out.append('| %s | %.0f (%.0f–%.0f, %d starts) | %.1f | %d | %d of %d |' % (
            name, statistics.median(starts), min(starts), max(starts), len(starts),
            idle, threads, clean_stops, len(runs)))
    out.append('')

    if 'ours' in names and 'upstream' in names:
        out.append('Ratios ours / upstream:')
        out.append('')
        out.append('| size | c | msgs/s ratio | CPU/msg ratio | peak RSS ratio |')
        out.append('|---|---|---|---|---|')
        for cell in cells:
            ours = results.get(('ours', cell.key))
            upstream = results.get(('upstream', cell.key))
            values = [ratio(ours and ours[key], upstream and upstream[key])
                      for key in ('rate', 'cpu_ms_per_msg', 'peak_rss_mb')]
            out.append('| %s | %d | %s | %s | %s |' % (
                cell.size_label, cell.concurrency,
                *(fmt(value, '%.2f') for value in values)))
        out.append('')
        out.extend(target_lines(cells, results, startup))
        out.append('')

    for note in notes:
        out.append('- note: %s' % note)
    if notes:
        out.append('')
    for name, message in failures:
        out.append('**%s failed:**' % name)
        out.append('')
        out.append('```')
        out.extend(message.rstrip().splitlines()[-25:])
        out.append('```')
        out.append('')
    return '\n'.join(out)


def target_lines(cells, results, startup):
    def rate_ratio(size_label, concurrency):
        ours = results.get(('ours', (size_label, concurrency)))
        upstream = results.get(('upstream', (size_label, concurrency)))
        return ratio(ours and ours['rate'], upstream and upstream['rate'])

    cpu_ratios = [ratio(results[('ours', c.key)]['cpu_ms_per_msg'],
                        results[('upstream', c.key)]['cpu_ms_per_msg'])
                  for c in cells
                  if ('ours', c.key) in results and ('upstream', c.key) in results]
    worst_cpu = max(cpu_ratios) if cpu_ratios else None
    idle_rss = startup.get('ours', (None, None))[1]
    start_s = startup.get('ours', (None, None))[0]
    checks = [
        ('msgs/s at 5 KB c=10 ≥ %gx upstream' % TARGET_RATE_5KB_C10,
         rate_ratio('5 KB', 10), lambda v: v >= TARGET_RATE_5KB_C10, '%.2fx'),
        ('msgs/s at 500 KB c=10 ≥ %gx upstream' % TARGET_RATE_500KB_C10,
         rate_ratio('500 KB', 10), lambda v: v >= TARGET_RATE_500KB_C10, '%.2fx'),
        ('CPU per message ≤ 1/3 of upstream (worst cell)',
         worst_cpu, lambda v: v <= TARGET_CPU_RATIO, '%.2fx'),
        ('idle RSS ≤ %g MB' % TARGET_IDLE_RSS_MB,
         idle_rss, lambda v: v <= TARGET_IDLE_RSS_MB, '%.1f MB'),
        ('start to accepting ≤ %g s' % TARGET_START_S,
         start_s, lambda v: v <= TARGET_START_S, '%.3f s'),
    ]
    return target_table(checks)


def target_table(checks):
    """Markdown rows for (label, measured value or None, test, format) checks."""
    lines = ['| target (ours) | measured | met |', '|---|---|---|']
    for label, value, test, pattern in checks:
        if value is None:
            lines.append('| %s | – | – |' % label)
        else:
            lines.append('| %s | %s | %s |' % (label, pattern % value,
                                                'yes' if test(value) else 'NO'))
    return lines


def write_section(report, title=SECTION_TITLE):
    """Replace (or append) the section ``title`` of RESULTS.md; other sections stay."""
    try:
        with open(RESULTS_FILE) as results_file:
            existing = results_file.read()
    except FileNotFoundError:
        existing = '# Benchmark results\n'
    lines = existing.splitlines()
    start = next((i for i, line in enumerate(lines)
                  if line.strip() == title), None)
    if start is None:
        new_lines = lines + [''] + report.splitlines()
    else:
        end = next((i for i in range(start + 1, len(lines))
                    if lines[i].startswith('## ')), len(lines))
        new_lines = lines[:start] + report.splitlines() + [''] + lines[end:]
    text = '\n'.join(new_lines).rstrip('\n') + '\n'
    text = re.sub(r'\n{3,}', '\n\n', text)
    with open(RESULTS_FILE, 'w') as results_file:
        results_file.write(text)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--only', choices=('ours', 'upstream'),
                        help='measure one filter only')
    parser.add_argument('--quick', action='store_true',
                        help='small message counts (smoke test, ~1 minute)')
    parser.add_argument('--python',
                        help='interpreter that runs our fuglu.py (default: the '
                             'python of a bare venv %s made from --upstream-python)'
                             % DEFAULT_OURS_VENV)
    parser.add_argument('--ours', default=None,
                        help='our fuglu.py or fuglu.pyz (default: dist/fuglu.pyz, built '
                             'first with build_zipapp.py: what admins run)')
    parser.add_argument('--upstream-venv', default=DEFAULT_UPSTREAM_VENV,
                        help='venv holding fuglu==%s, created if needed '
                             '(default: %%(default)s)' % UPSTREAM_VERSION)
    parser.add_argument('--upstream-python', default=default_upstream_python(),
                        help='interpreter for creating the venv (FuGlu 1.7.0 '
                             'needs >= 3.11; default: %(default)s)')
    parser.add_argument('--write', dest='write', action='store_true', default=None,
                        help='write bench/RESULTS.md (default for a full run)')
    parser.add_argument('--no-write', dest='write', action='store_false',
                        help='only print the report')
    parser.add_argument('--keep', action='store_true',
                        help='keep configs and logs of every run')
    args = parser.parse_args(argv)
    if args.write is None:
        args.write = not args.quick and args.only is None
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    for tool in (SMTP_SOURCE, SMTP_SINK):
        if not os.access(tool, os.X_OK):
            sys.exit('%s missing: install Debian package postfix (see bench/README.md)'
                     % tool)

    # A SIGTERM to the benchmark still runs the finally blocks below.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))

    filters, failures = [], []
    if args.only in (None, 'upstream'):
        filters.append(upstream_filter(args.upstream_venv, args.upstream_python))
    if args.only in (None, 'ours'):
        if args.ours is None:
            args.ours = os.path.join(REPO_ROOT, 'dist', 'fuglu.pyz')
            subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'build_zipapp.py'), '-o',
                            args.ours],
                           check=True, stdout=subprocess.DEVNULL)
        if os.path.exists(args.ours):
            python = args.python or bare_venv_python(DEFAULT_OURS_VENV,
                                                     args.upstream_python)
            filters.append(ours_filter(os.path.abspath(args.ours), python))
        elif args.only == 'ours':
            sys.exit('%s does not exist' % args.ours)
        else:
            print('note: %s does not exist yet, measuring upstream only' % args.ours)

    counts = QUICK_MESSAGE_COUNTS if args.quick else MESSAGE_COUNTS
    cells = [Cell(label, size, concurrency, counts[(label, concurrency)])
             for label, size in MESSAGE_SIZES for concurrency in CONCURRENCY_LEVELS]

    run_root = tempfile.mkdtemp(prefix='fuglu-bench-')
    sink = CountingSink(run_root)
    results, notes = {}, []
    bench_started = time.monotonic()
    load_before = os.getloadavg()[0]
    try:
        # One cell after the other; within a cell the filters run side by side
        # with alternating measured runs (see run_order).
        active = list(filters)
        for cell in cells:
            while active:
                print('%-6s c=%-2d n=%-4d ...' % (cell.size_label, cell.concurrency,
                                                 cell.count), flush=True)
                try:
                    cell_results = measure_with_retries(active, cell, sink,
                                                        run_root, notes)
                except StartError as error:
                    print('  %s FAILED to start' % error.filter_name)
                    failures.append((error.filter_name, str(error)))
                    # It will not start for the next cells either; go on without it.
                    active = [f for f in active if f.name != error.filter_name]
                    continue
                except BenchError as error:
                    print('  FAILED')
                    failures.append((str(cell), str(error)))
                    break
                for name, result in cell_results.items():
                    results[(name, cell.key)] = result
                    print('  %-8s %7.0f msgs/s (runs %s) %6.2f CPU ms/msg  '
                          'peak %6.1f MB  idle %5.1f MB  start %4.0f ms  lost %d%s' % (
                              name, result['rate'],
                              '/'.join('%.0f' % rate for rate in result['rates']),
                              result['cpu_ms_per_msg'],
                              result['peak_rss_mb'], result['idle_rss_mb'],
                              1000 * result['start_s'], result['lost'],
                              ('  (smtp-source: %s)' % result['source_errors'][:80])
                              if result['source_errors'] else ''), flush=True)
                break
    finally:
        end_run(sink, run_root, args.keep)

    report = build_report(cells, filters, results, failures, notes, argv,
                          args.quick, load_before)
    print()
    print(report)
    print('(benchmark took %.0f s)' % (time.monotonic() - bench_started))
    if args.write:
        write_section(report)
        print('written to %s' % RESULTS_FILE)
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
