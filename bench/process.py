#!/usr/bin/env python3
"""Process backend benchmark: our thread and process backends against upstream FuGlu
1.7.0's thread and process backends, in one run.

Every filter is an after-queue smtp filter between Postfix's load tools, as in
bench/afterqueue.py (whose helpers start the filters, the sink and smtp-source):

    smtp-source -c 10, 5 KB --> filter --SMTP re-inject--> smtp-sink (counts)

Workloads, c=10, 5 KB messages:

* cpu-bound     the FuGlu-style plugin bench/plugins/cpuburn.py, which spends about
                5 ms of pure-Python CPU per message (its ``iterations`` calibrated on
                this machine, the same number for every filter)
* pass-through  no plugins

The four filters run side by side per workload, with alternating measured runs (ABBA,
the faster one counts). The process backends run [performance] initialprocs = 2
workers. Idle memory is read once per filter, started afresh without plugins, one
second after its port accepts, over the whole process tree: summed VmRSS (which counts
a page shared by n processes n times: the workers share the code and start-up heap of
the process they were forked from) and PSS (which counts it once).

Then the kill test: our process backend under the cpu-bound load (smtplib clients,
one message per connection), one worker killed with SIGKILL every second. Every
message a client got 250 for must be at the sink (lost = accepted - arrived, must be
0); a message the sink has although its client saw the connection drop is a
duplicate (the worker died between the downstream's 250 and its own): an MTA would
deliver it twice. Clients that saw no 250 would be retried by an MTA. smtp-sink counts
totals only (a lost message and a duplicate would cancel out); per message, through a
real Postfix, tests/integration/test_process_backend.py counts each one.

stdlib only; 127.0.0.1 only; every process started here is stopped by its pid.
"""

import argparse
import os
import random
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import afterqueue as aq  # noqa: E402

SECTION_TITLE = '## process backend'
PLUGIN_DIR = os.path.join(aq.BENCH_DIR, 'plugins')
CONCURRENCY = 10
SIZE_LABEL, SIZE = '5 KB', 5 * 1024
WORKERS = 2
THREADS = (10, 20)            # minthreads, maxthreads (per worker on the process backend)
BURN_MS = 5.0
MESSAGE_COUNTS = {'cpu-bound': 2000, 'pass-through': 4000}
QUICK_MESSAGE_COUNTS = {'cpu-bound': 300, 'pass-through': 600}
KILLS, QUICK_KILLS = 20, 5
KILL_INTERVAL = 1.0

# the targets (2-core machine, c=10, 5 KB)
TARGET_CPU_VS_THREAD = 1.7
TARGET_CPU_VS_UPSTREAM_PROCESS = 2.0
TARGET_PASS_VS_THREAD = 1.3
TARGET_IDLE_RSS_MB = 45.0


CALIBRATION = """
import sys, time
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import fuglu                       # provides fuglu.shared, which the plugin imports
from cpuburn import burn
rounds = 20000
best = None
for _ in range(5):
    started = time.process_time()
    burn(rounds, 1)
    spent = time.process_time() - started
    best = spent if best is None else min(best, spent)
print(int(rounds * float(sys.argv[3]) / 1000.0 / best))
"""


def calibrate_iterations(python, milliseconds=BURN_MS):
    """cpuburn rounds that take ``milliseconds`` of CPU with ``python`` here."""
    output = subprocess.run([python, '-c', CALIBRATION, aq.REPO_ROOT, PLUGIN_DIR,
                             str(milliseconds)], stdout=subprocess.PIPE, check=True,
                            cwd=tempfile.gettempdir())
    return max(1000, int(output.stdout.decode().split()[-1]))


class BackendFilter(aq.Filter):
    """An afterqueue.py filter on a given backend, with the cpuburn plugin when
    ``iterations`` is set. Ours logs to its output file (``--baseloglevel``), as in
    bench/memory.py: as root it would prepare /var/log/fuglu for a logging.conf."""

    def __init__(self, base, backend, iterations=None):
        super().__init__('%s-%s' % (base.name, backend), base.command_prefix, base.python)
        self.upstream = base.name == 'upstream'
        self.backend = backend
        self.iterations = iterations

    def with_iterations(self, iterations):
        filter_copy = BackendFilter.__new__(BackendFilter)
        filter_copy.__dict__.update(self.__dict__, iterations=iterations)
        return filter_copy

    def supports(self, flag):
        if flag == '--logconfig' and not self.upstream:
            return False
        return super().supports(flag)

    def write_config(self, run_dir, listen_port, sink_port):
        conf_path, logging_path = super().write_config(run_dir, listen_port, sink_port)
        with open(conf_path) as conf:
            text = conf.read()
        text = text.replace('backend=thread\n', 'backend=%s\ninitialprocs=%d\n'
                            % (self.backend, WORKERS))
        text = text.replace('minthreads=%d\n' % aq.MIN_THREADS, 'minthreads=%d\n' % THREADS[0])
        text = text.replace('maxthreads=%d\n' % aq.MAX_THREADS, 'maxthreads=%d\n' % THREADS[1])
        if self.iterations:
            text = text.replace('plugins=\n', 'plugins=cpuburn.CPUBurn\nplugindir=%s\n'
                                % PLUGIN_DIR, 1)
            text += '\n[CPUBurn]\niterations=%d\n' % self.iterations
        with open(conf_path, 'w') as conf:
            conf.write(text)
        return conf_path, logging_path


# ---------------------------------------------------------------------------
# the kill test
# ---------------------------------------------------------------------------

def worker_pids(parent):
    """Our process backend's workers: the parent's grandchildren (the fork server's
    children)."""
    tree = aq.process_tree(parent)
    children = [pid for pid in tree if (aq._stat_fields(pid) or [0, 0])[1] == str(parent)]
    return [pid for pid in tree if pid != parent and pid not in children]


def tree_pss_mb(root_pid):
    """Proportional set size of the process tree, in MiB: each page shared by n processes
    counts 1/n in each (a forked worker shares the parent's code and start-up heap;
    summed VmRSS counts those pages once per process)."""
    total = 0
    for pid in aq.process_tree(root_pid):
        try:
            with open('/proc/%d/smaps_rollup' % pid) as rollup:
                total += sum(int(line.split()[1]) for line in rollup if line.startswith('Pss:'))
        except OSError:
            pass
    return total / 1024.0


def idle_memory(filter_under_test, sink, run_root):
    """(summed VmRSS MiB, PSS MiB, processes) of a freshly started filter's tree."""
    running = aq.RunningFilter(filter_under_test, aq.Cell(SIZE_LABEL, SIZE, 1, 0), sink,
                               run_root)
    try:
        running.start()
        return (running.result['idle_rss_mb'], tree_pss_mb(running.process.pid),
                len(aq.process_tree(running.process.pid)))
    finally:
        running.stop()


class CountedLoad(object):
    """smtplib clients, ``concurrency`` of them, each sending one message per
    connection to a recipient of its own until stop(); ``accepted`` lists the
    recipients a client got 250 for, ``failures`` what the others saw."""

    def __init__(self, port, concurrency):
        self.port = port
        self.body = (('Subject: kill test\r\n\r\n' + 'x' * 76 + '\r\n') * (SIZE // 78)).encode()
        self.lock = threading.Lock()
        self.sent = 0
        self.accepted, self.failures = [], []
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self._client) for _ in range(concurrency)]

    def _client(self):
        while not self.stopped.is_set():
            with self.lock:
                self.sent += 1
                recipient = 'kill-%d@example.net' % self.sent
            try:
                with smtplib.SMTP('127.0.0.1', self.port, timeout=60) as session:
                    session.sendmail(aq.SENDER, [recipient], self.body)
                with self.lock:
                    self.accepted.append(recipient)
            except (smtplib.SMTPException, OSError) as error:
                with self.lock:
                    self.failures.append('%s: %s' % (error.__class__.__name__, error))

    def start(self):
        for thread in self.threads:
            thread.start()

    def stop(self):
        self.stopped.set()
        for thread in self.threads:
            thread.join()


def deaths_logged(running, killed):
    log = aq.tail(running.output_path, lines=1000000)
    return sum(1 for pid in killed if '(pid %d) died (killed by signal 9' % pid in log)


def kill_test(ours_process, kills, sink, run_root):
    """Our process backend under load, a worker SIGKILLed every KILL_INTERVAL,
    ``kills`` times."""
    running = aq.RunningFilter(ours_process, aq.Cell(SIZE_LABEL, SIZE, CONCURRENCY, 0), sink,
                               run_root)
    rng = random.Random(12)
    killed = []
    try:
        running.start()
        before = sink.delivered()
        load = CountedLoad(running.listen_port, CONCURRENCY)
        started = time.monotonic()
        load.start()
        try:
            while len(killed) < kills:
                time.sleep(KILL_INTERVAL)
                victims = worker_pids(running.process.pid)
                if victims:
                    victim = rng.choice(victims)
                    os.kill(victim, signal.SIGKILL)
                    killed.append(victim)
        finally:
            load.stop()
        seconds = time.monotonic() - started
        arrived = sink.wait_for(before + len(load.accepted)) - before
        running.check_alive()
        # the parent logs a death once the fork server reported the exit
        deadline = time.monotonic() + 5
        while deaths_logged(running, killed) < len(killed) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        running.stop()
    return {'sent': load.sent, 'seconds': seconds, 'killed': len(killed),
            'accepted': len(load.accepted), 'failed': len(load.failures), 'arrived': arrived,
            'lost': max(0, len(load.accepted) - arrived),
            'duplicates': max(0, arrived - len(load.accepted)),
            'deaths_logged': deaths_logged(running, killed),
            'first_failure': load.failures[0] if load.failures else ''}


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------

def build_report(workloads, filters, results, memory, kill, iterations, argv, quick,
                 load_before):
    out = [SECTION_TITLE, '']
    if quick:
        out += ['**Short run (`--quick`) on a shared 2-core machine: figures to check that '
                'the benchmark works, not results. To be re-measured on a quiet machine.**',
                '']
    out.append('Produced by `python3 bench/process.py%s`. smtp connector after-queue, c=%d, '
               '%s messages, one per connection, smtp-source to smtp-sink; minthreads=%d, '
               'maxthreads=%d; process backends with initialprocs=%d; cpu-bound: the '
               'FuGlu-style plugin bench/plugins/cpuburn.py at %d iterations (%.1f ms of '
               'CPU here); filters side by side, warmed up, then %d measured runs each '
               '(ABBA), the faster one shown.' % (
                   (' ' + ' '.join(argv)) if argv else '', CONCURRENCY, SIZE_LABEL,
                   THREADS[0], THREADS[1], WORKERS, iterations, BURN_MS, aq.MEASURED_RUNS))
    out.append('')
    out.extend(aq.machine_info(filters, load_before))
    out.append('')
    out.append('| workload | filter | msgs/s | CPU ms/msg | peak RSS MB (summed) | lost |')
    out.append('|---|---|---|---|---|---|')
    for workload, _cell in workloads:
        for filter_under_test in filters:
            result = results.get((filter_under_test.name, workload))
            if result is None:
                out.append('| %s | %s | failed | | | |' % (workload, filter_under_test.name))
                continue
            out.append('| %s | %s | %.0f | %.2f | %.1f | %d |' % (
                workload, filter_under_test.name, result['rate'], result['cpu_ms_per_msg'],
                result['peak_rss_mb'], result['lost']))
    out.append('')
    out.append('Idle memory of the whole process tree, no plugins, 1 s after the port '
               'accepts (process backends: parent, and for ours the fork server, and %d '
               'workers). Summed VmRSS counts a page shared by n processes n times; PSS '
               'counts it once in all.' % WORKERS)
    out.append('')
    out.append('| filter | processes | summed VmRSS MB | PSS MB |')
    out.append('|---|---|---|---|')
    for filter_under_test in filters:
        rss, pss, processes = memory.get(filter_under_test.name, (None, None, None))
        out.append('| %s | %s | %s | %s |' % (filter_under_test.name, aq.fmt(processes, '%d'),
                                              aq.fmt(rss), aq.fmt(pss)))
    out.append('')
    if kill:
        out.append('Kill test (ours-process, cpu-bound, c=%d): %d messages in %.1f s, %d '
                   'workers killed with SIGKILL, one every %g s (%d of the deaths logged '
                   'by the parent); %d accepted (250), %d failed at the client (no 250: an '
                   'MTA retries them), %d arrived at the sink: %d lost, %d duplicates (the '
                   'downstream had the message, the client never got 250).%s' % (
                       CONCURRENCY, kill['sent'], kill['seconds'], kill['killed'],
                       KILL_INTERVAL, kill['deaths_logged'], kill['accepted'],
                       kill['failed'], kill['arrived'], kill['lost'], kill['duplicates'],
                       (' First client failure: %s.' % kill['first_failure'][:100])
                       if kill['first_failure'] else ''))
        out.append('')

    def rate(name, workload):
        result = results.get((name, workload))
        return result and result['rate']

    rss, pss, _ = memory.get('ours-process', (None, None, None))
    checks = [
        ('cpu-bound: process ≥ %gx our thread backend' % TARGET_CPU_VS_THREAD,
         aq.ratio(rate('ours-process', 'cpu-bound'), rate('ours-thread', 'cpu-bound')),
         lambda value: value >= TARGET_CPU_VS_THREAD, '%.2fx'),
        ('cpu-bound: process ≥ %gx upstream\'s process backend'
         % TARGET_CPU_VS_UPSTREAM_PROCESS,
         aq.ratio(rate('ours-process', 'cpu-bound'), rate('upstream-process', 'cpu-bound')),
         lambda value: value >= TARGET_CPU_VS_UPSTREAM_PROCESS, '%.2fx'),
        ('pass-through: process ≥ %gx our thread backend' % TARGET_PASS_VS_THREAD,
         aq.ratio(rate('ours-process', 'pass-through'), rate('ours-thread', 'pass-through')),
         lambda value: value >= TARGET_PASS_VS_THREAD, '%.2fx'),
        ('idle memory of the tree, %d workers, ≤ %g MB: PSS' % (WORKERS, TARGET_IDLE_RSS_MB),
         pss, lambda value: value <= TARGET_IDLE_RSS_MB, '%.1f MB'),
        ('idle memory of the tree, %d workers, ≤ %g MB: summed VmRSS'
         % (WORKERS, TARGET_IDLE_RSS_MB),
         rss, lambda value: value <= TARGET_IDLE_RSS_MB, '%.1f MB'),
        ('kill -9 every %g s under load: no message lost' % KILL_INTERVAL,
         kill and kill['lost'], lambda value: value == 0, '%d lost'),
    ]
    out.extend(aq.target_table(checks))
    out.append('')
    out.append('With %.1f ms of plugin CPU per message, two cores bound any filter to %.0f '
               'msgs/s on the cpu-bound workload (less the load tools\' share).'
               % (BURN_MS, 2000.0 / BURN_MS))
    return '\n'.join(out)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true',
                        help='small counts: checks that it works (~1 minute)')
    parser.add_argument('--ours', default=None,
                        help='our fuglu.py or fuglu.pyz (default: dist/fuglu.pyz, built '
                             'first with build_zipapp.py: what admins run)')
    parser.add_argument('--upstream-venv', default=aq.DEFAULT_UPSTREAM_VENV,
                        help='venv holding fuglu==%s, created if needed (default: '
                             '%%(default)s)' % aq.UPSTREAM_VERSION)
    parser.add_argument('--upstream-python', default=aq.default_upstream_python(),
                        help='interpreter for the venvs (FuGlu 1.7.0 needs >= 3.11)')
    parser.add_argument('--no-upstream', action='store_true', help='measure ours only')
    parser.add_argument('--write', action='store_true',
                        help='write the section of bench/RESULTS.md')
    parser.add_argument('--keep', action='store_true', help='keep configs and logs')
    return parser.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    if args.ours is None:
        args.ours = os.path.join(aq.REPO_ROOT, 'dist', 'fuglu.pyz')
        subprocess.run([sys.executable, os.path.join(aq.REPO_ROOT, 'build_zipapp.py'), '-o',
                        args.ours], check=True, stdout=subprocess.DEVNULL)
    python = aq.bare_venv_python(aq.DEFAULT_OURS_VENV, args.upstream_python)
    bases = [aq.ours_filter(os.path.abspath(args.ours), python)]
    if not args.no_upstream:
        bases.append(aq.upstream_filter(args.upstream_venv, args.upstream_python))
    filters = [BackendFilter(base, backend) for base in bases
               for backend in ('thread', 'process')]
    iterations = calibrate_iterations(python)
    counts = QUICK_MESSAGE_COUNTS if args.quick else MESSAGE_COUNTS
    workloads = [(name, aq.Cell(SIZE_LABEL, SIZE, CONCURRENCY, counts[name]))
                 for name in ('cpu-bound', 'pass-through')]
    run_root = tempfile.mkdtemp(prefix='fuglu-bench-process-')
    sink = aq.CountingSink(run_root)
    results, memory, notes, kill = {}, {}, [], None
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    try:
        sink.start()
        print('idle memory ...', flush=True)
        for filter_under_test in filters:
            memory[filter_under_test.name] = idle_memory(filter_under_test, sink, run_root)
            print('  %-16s %5.1f MB summed RSS, %5.1f MB PSS, %d processes'
                  % ((filter_under_test.name,) + memory[filter_under_test.name]), flush=True)
        for workload, cell in workloads:
            print('%s, c=%d, %d messages per run ...' % (workload, CONCURRENCY, cell.count),
                  flush=True)
            these = [f.with_iterations(iterations if workload == 'cpu-bound' else None)
                     for f in filters]
            for name, result in aq.measure_with_retries(these, cell, sink, run_root,
                                                        notes).items():
                results[(name, workload)] = result
                print('  %-16s %6.0f msgs/s  %5.2f CPU ms/msg  lost %d'
                      % (name, result['rate'], result['cpu_ms_per_msg'], result['lost']),
                      flush=True)
        print('kill test ...', flush=True)
        ours_process = [f for f in filters if f.name == 'ours-process'][0]
        kill = kill_test(ours_process.with_iterations(iterations),
                         QUICK_KILLS if args.quick else KILLS, sink, run_root)
        print('  %r' % kill, flush=True)
    finally:
        aq.end_run(sink, run_root, args.keep)
    report = build_report(workloads, filters, results, memory, kill, iterations, argv,
                          args.quick, load_before)
    report += ''.join('\n- note: %s' % note for note in notes)
    print()
    print(report)
    print('(benchmark took %.0f s)' % (time.monotonic() - started))
    if args.write:
        aq.write_section(report, SECTION_TITLE)
    return 0 if kill and not kill['lost'] else 1


if __name__ == '__main__':
    sys.exit(main())
