#!/usr/bin/env python3
"""Scanner plugin overhead: what ClamavPlugin + SAPlugin cost fuglu itself.

The target (issue 4): a clean 5 KB message through both plugins costs fuglu no more
than 1 ms CPU beyond the scanners' own work. clamd and spamd run in their own
processes, so the CPU time of THIS process while it runs ``examine()`` is exactly
fuglu's share: building the request, socket I/O, parsing the reply, tags, the
template, replacing the source with what spamd returned. We measure it per message
with the process CPU clock, next to the wall time per message and the CPU the
scanners themselves spent (utime+stime of clamd and of the spamd process tree).

    python3 bench/scanners.py              # 300 messages, writes the section in RESULTS.md
    python3 bench/scanners.py -n 50 --no-write

A private clamd (EICAR-only database) and spamd (offline rules) are started on
127.0.0.1 with tests/integration/peers.py and stopped by pid at the end.
"""

import argparse
import datetime
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
RESULTS_FILE = os.path.join(BENCH_DIR, 'RESULTS.md')
SECTION_TITLE = '## scanner plugins'
TARGET_CPU_MS = 1.0

sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, 'tests', 'integration'))
sys.path.insert(0, BENCH_DIR)

import afterqueue  # noqa: E402  (bench/: write_section)
import fuglu  # noqa: E402
import peers  # noqa: E402
from fuglu_plugins.clamav import ClamavPlugin  # noqa: E402
from fuglu_plugins.spamassassin import SAPlugin  # noqa: E402

CLOCK_TICKS = os.sysconf('SC_CLK_TCK')


def clean_message(size=5 * 1024):
    """A plain, clean text mail of about ``size`` bytes."""
    head = (b'From: Sam Sender <sender@example.org>\r\nTo: <rcpt@example.net>\r\n'
            b'Subject: minutes of the weekly meeting\r\nDate: Wed, 25 Nov 2026 06:00:00 +0000\r\n'
            b'Message-ID: <bench@example.org>\r\nMIME-Version: 1.0\r\n'
            b'Content-Type: text/plain; charset=us-ascii\r\n\r\n')
    line = b'We agreed to move the release review to Thursday and to keep the notes short.\r\n'
    body = line * ((size - len(head)) // len(line) + 1)
    return head + body[:size - len(head)]


def tree_cpu_seconds(pid):
    """CPU seconds of ``pid`` and its children, live and reaped."""
    total = 0.0
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % entry) as stat_file:
                fields = stat_file.read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid:
            # own time plus that of children already reaped (spamd recycles its children)
            total += sum(int(value) for value in fields[11:15]) / CLOCK_TICKS
        elif int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def make_plugins(clamd, spamd):
    config = fuglu.load_config(embedded=fuglu.EMBEDDED_CONFIG)
    config.read_config_text('[ClamavPlugin]\nport = %s\n[SAPlugin]\nport = %d\n'
                            % (clamd.socket_path, spamd.port))
    return ClamavPlugin(config), SAPlugin(config)


def measure(plugins, source, count):
    """Per message: fuglu CPU ms per plugin and in total, wall ms in total."""
    cpu = {str(plugin): [] for plugin in plugins}
    total_cpu, wall = [], []
    for _ in range(count):
        suspect = fuglu.Suspect('sender@example.org', ['rcpt@example.net'], inbuffer=source)
        suspect.tags['incomingport'] = 10025
        wall_start = time.perf_counter()
        message_cpu = 0.0
        for plugin in plugins:
            cpu_start = time.process_time()
            result = plugin.examine(suspect)
            used = time.process_time() - cpu_start
            if result not in (fuglu.DUNNO, None):
                raise RuntimeError('%s said %r about the clean message' % (plugin, result))
            cpu[str(plugin)].append(used * 1000)
            message_cpu += used
        wall.append((time.perf_counter() - wall_start) * 1000)
        total_cpu.append(message_cpu * 1000)
        if (suspect.tags['spam'].get('SpamAssassin') is not False
            or suspect.tags['virus'].get('ClamAV') is not False):
            raise RuntimeError('a scanner gave no verdict: %s' % suspect.tags)
    return cpu, total_cpu, wall


def describe(values):
    ordered = sorted(values)
    return {'median': statistics.median(ordered), 'mean': statistics.mean(ordered),
            'p95': ordered[int(len(ordered) * 0.95) - 1], 'max': ordered[-1]}


def build_report(args, size, results, scanner_cpu):
    cpu, total_cpu, wall = results
    total = describe(total_cpu)
    out = [SECTION_TITLE, '',
           'Produced by `python3 bench/scanners.py -n %d`. One clean %d-byte text mail, %d times '
           'through ClamavPlugin (clamd on its unix socket) then SAPlugin (spamd over TCP, '
           'default PROCESS mode), called in-process one after the other after %d warm-up '
           'messages. fuglu CPU = CPU clock of the calling process during `examine()`; the '
           'scanners run in their own processes.' % (args.count, size, args.count, args.warmup),
           '',
           '- date: %s' % datetime.datetime.utcnow().strftime('%Y-%m-%d %H:%M UTC'),
           '- machine: nproc %d, %s, Python %s' % (os.cpu_count(), platform.platform(),
                                                   platform.python_version()),
           '- peers: %s; %s' % (args.clamd_version, args.spamd_version),
           '- load average at the end: %.1f (other jobs on the machine inflate CPU times)'
           % os.getloadavg()[0],
           '',
           '| per message | median | mean | p95 | max |',
           '|---|---|---|---|---|']
    for name, values in sorted(cpu.items()):
        row = describe(values)
        out.append('| fuglu CPU ms, %s | %.3f | %.3f | %.3f | %.3f |'
                   % (name, row['median'], row['mean'], row['p95'], row['max']))
    out.append('| fuglu CPU ms, both plugins | %.3f | %.3f | %.3f | %.3f |'
               % (total['median'], total['mean'], total['p95'], total['max']))
    row = describe(wall)
    out.append('| wall ms, both plugins | %.1f | %.1f | %.1f | %.1f |'
               % (row['median'], row['mean'], row['p95'], row['max']))
    out += ['',
            'Of fuglu\'s CPU, per message over the whole run (getrusage, includes building the '
            'Suspect): user %.3f ms (Python), system %.3f ms (the kernel\'s loopback TCP / unix '
            'socket work for the two round trips).' % (args.user_ms, args.system_ms),
            '',
            'Scanners\' own CPU per message (utime+stime delta / messages): clamd %.2f ms, '
            'spamd %.2f ms.' % (scanner_cpu['clamd'] * 1000 / args.count,
                                scanner_cpu['spamd'] * 1000 / args.count),
            '',
            '| target | measured (mean) | met |',
            '|---|---|---|',
            '| fuglu CPU for both plugins, clean 5 KB message, <= %.1f ms | %.3f ms | %s |'
            % (TARGET_CPU_MS, total['mean'], 'yes' if total['mean'] <= TARGET_CPU_MS else 'NO'),
            '']
    return '\n'.join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('-n', '--count', type=int, default=300, help='measured messages')
    parser.add_argument('--warmup', type=int, default=20)
    parser.add_argument('--write', dest='write', action='store_true', default=True)
    parser.add_argument('--no-write', dest='write', action='store_false')
    args = parser.parse_args()

    peers.ensure_debian_packages('clamav-daemon', 'spamd', 'spamassassin')
    clamd_dir = peers.world_dir('fuglu-bench-clamd-')
    spamd_dir = peers.world_dir('fuglu-bench-spamd-')
    clamd = peers.ClamdInstance(clamd_dir)
    spamd = peers.SpamdInstance(spamd_dir)
    try:
        clamd.start()
        spamd.start()
        args.clamd_version = peers.clamd_command(b'VERSION', port=clamd.tcp_port)
        version = subprocess.run(['spamd', '--version'], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, timeout=30)
        version = version.stdout.decode('utf-8', 'replace')
        args.spamd_version = (version.splitlines() or ['spamd'])[0].strip()
        plugins = make_plugins(clamd, spamd)
        source = clean_message()
        measure(plugins, source, args.warmup)
        before = {'clamd': tree_cpu_seconds(clamd.pid), 'spamd': tree_cpu_seconds(spamd.pid)}
        usage_before = resource.getrusage(resource.RUSAGE_SELF)
        results = measure(plugins, source, args.count)
        usage_after = resource.getrusage(resource.RUSAGE_SELF)
        args.user_ms = (usage_after.ru_utime - usage_before.ru_utime) * 1000 / args.count
        args.system_ms = (usage_after.ru_stime - usage_before.ru_stime) * 1000 / args.count
        scanner_cpu = {name: tree_cpu_seconds(process.pid) - before[name]
                       for name, process in (('clamd', clamd), ('spamd', spamd))}
    finally:
        spamd.stop()
        clamd.stop()
        peers.remove_world_dir(clamd_dir)
        peers.remove_world_dir(spamd_dir)
    report = build_report(args, len(source), results, scanner_cpu)
    print(report)
    if args.write:
        afterqueue.write_section(report, SECTION_TITLE)
        print('written to %s' % RESULTS_FILE)


if __name__ == '__main__':
    main()
