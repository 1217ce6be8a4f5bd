#!/usr/bin/env python3
"""Per-recipient settings from SQL: what the runtime-config lookups cost per message.

The targets (issue 13): with a warm cache the lookups add <= 0.05 ms per message; cold,
on PostgreSQL, <= 2 ms; under load the database sees at most one query per (recipient,
section, option) per value_cache_ttl -- counted at the database (pg_stat_statements).

The workload is what SAPlugin asks for every spam message: DBConfig(config, suspect),
then lowspamlevel, highspamlevel and highspamaction of [SAPlugin]. Each measurement runs
in a worker process of its own (this file with --worker), for ours and for upstream FuGlu
1.7.0 on the same private PostgreSQL with the same rows, config and query:

    file    the same three lookups on the plain config (no database): the baseline
    warm    DBConfig + lookups, 5 recipients in turn (after the first round: cached)
    cold    DBConfig + lookups, a new recipient every message (every lookup queries)
    load    8 threads x 250 messages over 20 recipients; queries counted at PostgreSQL

    python3 bench/runtimeconfig.py              # full counts, writes RESULTS.md section
    python3 bench/runtimeconfig.py --quick      # small counts, prints only

Both sides need SQLAlchemy and psycopg2 (pip), in venvs of their own so that the
after-queue benchmark's venvs stay as they are: ours /tmp/fuglu-ours-sql-venv (our
fuglu.py from this repository), upstream /tmp/fuglu-upstream-sql-venv (fuglu==1.7.0).
Both are created on first use. PostgreSQL is started and stopped by
tests/integration/peers.py (installed with apt-get when missing).
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
SECTION_TITLE = '## runtime config from SQL'
SQL_PACKAGES = ('SQLAlchemy>=2.0', 'psycopg2-binary')
OURS_VENV = '/tmp/fuglu-ours-sql-venv'
UPSTREAM_VENV = '/tmp/fuglu-upstream-sql-venv'
TARGET_WARM_MS, TARGET_COLD_MS = 0.05, 2.0
LOAD_THREADS, LOAD_MESSAGES, LOAD_RECIPIENTS = 8, 250, 20
OPTIONS = (('get', 'lowspamlevel'), ('getfloat', 'highspamlevel'), ('get', 'highspamaction'))

# The query of README.md for PostgreSQL; FuGlu's default (MySQL syntax) does not parse there.
POSTGRES_SQL = ('SELECT value FROM fugluconfig WHERE section=:section AND option=:option AND '
                "scope IN (:globalscope, CONCAT('%', :to_domain), :to_address) "
                'ORDER BY scope COLLATE "C" DESC LIMIT 1')
ROWS = [('%reject.example', 'SAPlugin', 'highspamaction', 'REJECT'),
        ('$GLOBAL', 'SAPlugin', 'highspamlevel', '12')]

CONFIG = """\
[SAPlugin]
lowspamlevel =
highspamlevel = 15
highspamaction = DUNNO
[databaseconfig]
dbpriority = sql
dbconnectstring = {url}
sql = {sql}
sqlsection =
globalscope = $GLOBAL
value_cache_ttl = 300
"""


# ---------------------------------------------------------------------------
# the worker: one measurement, in the venv of ours or of upstream
# ---------------------------------------------------------------------------

def worker(args):
    if args.worker == 'ours':
        sys.path.insert(0, REPO_ROOT)
        import fuglu
        config = fuglu.load_config(embedded=CONFIG.format(url=args.url, sql=POSTGRES_SQL))

        def make_suspect(recipient):
            return fuglu.Suspect('sender@example.org', [recipient], inbuffer=b'Subject: x\r\n\r\n')
        DBConfig = fuglu.DBConfig
    else:
        from fuglu.extensions.sql import DBConfig
        from fuglu.shared import FuConfigParser, Suspect
        config = FuConfigParser()
        config.read_string(CONFIG.format(url=args.url, sql=POSTGRES_SQL))

        def make_suspect(recipient):
            return Suspect('sender@example.org', recipient, '/dev/null')

    def lookups(source):
        for method, option in OPTIONS:
            getattr(source, method)('SAPlugin', option)

    def per_message(recipients, with_database):
        suspects = [make_suspect(recipient) for recipient in recipients]
        started = time.perf_counter()
        for suspect in suspects:
            lookups(DBConfig(config, suspect) if with_database else config)
        return (time.perf_counter() - started) * 1000 / len(suspects)

    if args.workload != 'load':   # (the load count is the database's own)
        # (upstream holds the suspect by a weak reference: keep ours alive meanwhile)
        suspect = make_suspect('a@reject.example')
        check = DBConfig(config, suspect)
        seen = (check.get('SAPlugin', 'highspamaction'),
                check.getfloat('SAPlugin', 'highspamlevel'))
        if seen != ('REJECT', 12):
            raise SystemExit('%s: the database rows do not come through: %r' % (args.worker, seen))
    result = {}
    if args.workload == 'file':
        result['ms'] = per_message(['a@reject.example'] * args.count, False)
    elif args.workload == 'warm':
        recipients = ['user%d@reject.example' % (number % 5) for number in range(args.count)]
        per_message(recipients[:5], True)   # the first round fills the cache
        result['ms'] = per_message(recipients, True)
    elif args.workload == 'cold':
        result['ms'] = per_message(['cold%d-%d@reject.example' % (os.getpid(), number)
                                    for number in range(args.count)], True)
    else:
        errors = []

        def run(number):
            try:
                for index in range(args.count):
                    recipient = 'load%d@reject.example' % ((number + index) % LOAD_RECIPIENTS)
                    lookups(DBConfig(config, make_suspect(recipient)))
            except Exception as error:  # reported
                errors.append(repr(error))
        threads = [threading.Thread(target=run, args=(number,)) for number in range(LOAD_THREADS)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        result['ms'] = (time.perf_counter() - started) * 1000 / (LOAD_THREADS * args.count)
        result['errors'] = errors
    print(json.dumps(result))


# ---------------------------------------------------------------------------
# the orchestra: venvs, PostgreSQL, the workers, the report
# ---------------------------------------------------------------------------

def sql_venv(venv, base_python, packages):
    python = os.path.join(venv, 'bin', 'python')
    probe = subprocess.run([python, '-c', 'import sqlalchemy, psycopg2'], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL) if os.path.exists(python) else None
    if probe is None or probe.returncode != 0:
        print('preparing %s (once) ...' % venv, flush=True)
        if not os.path.exists(python):
            subprocess.run([base_python, '-m', 'venv', venv], check=True)
        subprocess.run([python, '-m', 'pip', 'install', '--quiet', '--disable-pip-version-check']
                       + list(packages), check=True)
    return python


def run_worker(python, side, workload, url, count):
    command = [python, os.path.abspath(__file__), '--worker', side, '--workload', workload,
               '--url', url, '--count', str(count)]
    # started from /tmp: upstream must import its own package, not our fuglu.py
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd='/tmp',
                            timeout=600)
    if result.returncode != 0:
        raise RuntimeError('%s %s worker failed: %s'
                           % (side, workload, result.stderr.decode()[-2000:]))
    return json.loads(result.stdout.decode().strip().splitlines()[-1])


def version_of(python, module):
    result = subprocess.run([python, '-c', 'import %s; print(%s.__version__)' % (module, module)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd='/tmp')
    return result.stdout.decode().strip().split()[0] if result.returncode == 0 else '?'


# Upstream 1.7.0 leaves each lookup's pooled connection checked out (its get_session()
# sessions are never closed): after 15 lookups (SQLAlchemy's pool of 5 + 10 overflow)
# every lookup waits 30 s for a connection, logs the timeout and returns the file's
# value. So upstream is measured on its first 4 messages (12 lookups) per process, and
# not under load.
UPSTREAM_DATABASE_MESSAGES = 4


def measure_side(side, python, postgres, counts):
    url = postgres.url()
    row = {'counts': dict(counts)}
    if side == 'upstream':
        row['counts'].update(warm=UPSTREAM_DATABASE_MESSAGES, cold=UPSTREAM_DATABASE_MESSAGES)
    for workload in ('file', 'warm', 'cold'):
        row[workload] = run_worker(python, side, workload, url, row['counts'][workload])['ms']
    row['overhead'] = row['warm'] - row['file']
    if side == 'upstream':
        return row
    postgres.reset_statement_calls()
    load = run_worker(python, side, 'load', url, counts['load'])
    row['load_ms'] = load['ms']
    row['load_errors'] = load['errors']
    row['load_queries'] = postgres.statement_calls('FROM fugluconfig')
    return row


def build_report(args, results, versions):
    expected = LOAD_RECIPIENTS * len(OPTIONS)
    out = [SECTION_TITLE, '',
           'Produced by `python3 bench/runtimeconfig.py%s`. Per message: `DBConfig(config, '
           'suspect)` and SAPlugin\'s three lookups (lowspamlevel, highspamlevel, highspamaction), '
           'against a private PostgreSQL %s on 127.0.0.1 (fsync off) holding 2 rows, with the '
           'PostgreSQL query of README.md and value_cache_ttl = 300; each workload in a fresh '
           'worker process; wall time of the loop divided by the messages (suspects built '
           'beforehand). file = the same lookups on the plain config; warm = 5 recipients in turn '
           '(cached after the first round); cold = a new recipient every message; load = %d '
           'threads x %d messages over %d recipients, queries counted by pg_stat_statements.'
           % (' --quick' if args.quick else '', versions['postgres'], LOAD_THREADS,
              args.counts['load'], LOAD_RECIPIENTS), '',
           '- date: %s' % datetime.datetime.utcnow().strftime('%Y-%m-%d %H:%M UTC'),
           '- machine: nproc %d, %s' % (os.cpu_count(), platform.platform()),
           '- ours: Python %s, SQLAlchemy %s, psycopg2 %s; upstream: FuGlu 1.7.0, Python %s, '
           'SQLAlchemy %s, psycopg2 %s' % tuple(versions[key] for key in (
               'ours_python', 'ours_sqlalchemy', 'ours_psycopg2', 'upstream_python',
               'upstream_sqlalchemy', 'upstream_psycopg2')),
           '- messages per worker: %s' % '; '.join(
               '%s: file %d, warm %d, cold %d' % ((side,) + tuple(
                   row['counts'][name] for name in ('file', 'warm', 'cold')))
               for side, row in results.items()),
           '- load average at the end: %.1f (other jobs on the machine inflate the times)'
           % os.getloadavg()[0], '',
           '| filter | file ms/msg | warm ms/msg | warm overhead ms | cold ms/msg | load ms/msg | '
           'load queries (distinct keys %d) |' % expected,
           '|---|---|---|---|---|---|---|']
    for side, row in results.items():
        if 'load_ms' in row:
            errors = ' (%d errors)' % len(row['load_errors']) if row['load_errors'] else ''
            load = '%.3f | %d%s' % (row['load_ms'], row['load_queries'], errors)
        else:
            load = 'n/a | n/a'
        out.append('| %s | %.4f | %.4f | %.4f | %.3f | %s |' % (
            side, row['file'], row['warm'], row['overhead'], row['cold'], load))
    ours = results.get('ours')
    if ours:
        def met(good):
            return 'yes' if good else 'NO'
        out += ['', '| target (ours) | measured | met |', '|---|---|---|',
                '| warm overhead <= %.2f ms | %.4f ms | %s |' % (
                    TARGET_WARM_MS, ours['overhead'], met(ours['overhead'] <= TARGET_WARM_MS)),
                '| cold on PostgreSQL <= %.0f ms | %.3f ms | %s |' % (
                    TARGET_COLD_MS, ours['cold'], met(ours['cold'] <= TARGET_COLD_MS)),
                '| queries under load <= one per key and TTL (%d) | %d | %s |' % (
                    expected, ours['load_queries'], met(ours['load_queries'] <= expected))]
    out += ['', 'Upstream with its default dbpriority (sql) caches nothing: every lookup queries '
            'the database, and every DBConfig copies the whole configuration. It also never '
            'returns the pooled connection of a lookup: after 15 lookups in a process every '
            'further one waits 30 s for a connection and then silently answers with the file\'s '
            'value. Its figures are therefore from its first %d messages per worker process '
            '(cold: each opens a new connection), and it is not run under load.'
            % UPSTREAM_DATABASE_MESSAGES, '']
    return '\n'.join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--worker', choices=('ours', 'upstream'), help=argparse.SUPPRESS)
    parser.add_argument('--workload', choices=('file', 'warm', 'cold', 'load'),
                        help=argparse.SUPPRESS)
    parser.add_argument('--url', help=argparse.SUPPRESS)
    parser.add_argument('--count', type=int, help=argparse.SUPPRESS)
    parser.add_argument('--quick', action='store_true', help='small counts, print only')
    parser.add_argument('--only', choices=('ours', 'upstream'), help='measure one side')
    parser.add_argument('--write', dest='write', action='store_true', default=None)
    parser.add_argument('--no-write', dest='write', action='store_false')
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    sys.path.insert(0, BENCH_DIR)
    sys.path.insert(0, os.path.join(REPO_ROOT, 'tests', 'integration'))
    import afterqueue
    import peers
    args.counts = ({'file': 2000, 'warm': 2000, 'cold': 100, 'load': 25} if args.quick else
                   {'file': 20000, 'warm': 20000, 'cold': 1000, 'load': LOAD_MESSAGES})
    base_python = afterqueue.default_upstream_python()
    pythons = {}
    if args.only != 'upstream':
        pythons['ours'] = sql_venv(OURS_VENV, base_python, SQL_PACKAGES)
    if args.only != 'ours':
        afterqueue.upstream_filter(UPSTREAM_VENV, base_python)
        pythons['upstream'] = sql_venv(UPSTREAM_VENV, base_python, SQL_PACKAGES)
    versions = {'ours_python': '-', 'ours_sqlalchemy': '-', 'ours_psycopg2': '-',
                'upstream_python': '-', 'upstream_sqlalchemy': '-', 'upstream_psycopg2': '-'}
    for side, python in pythons.items():
        versions[side + '_python'] = subprocess.run(
            [python, '-c', 'import platform; print(platform.python_version())'],
            stdout=subprocess.PIPE).stdout.decode().strip()
        versions[side + '_sqlalchemy'] = version_of(python, 'sqlalchemy')
        versions[side + '_psycopg2'] = version_of(python, 'psycopg2')

    peers.ensure_debian_packages('postgresql')
    basedir = peers.world_dir('fuglu-bench-postgres-')
    postgres = peers.PostgresInstance(basedir)
    results = {}
    try:
        postgres.start()
        versions['postgres'] = postgres.psql('SHOW server_version').strip().split()[0]
        postgres.psql('CREATE TABLE fugluconfig (scope VARCHAR(255), section VARCHAR(255), '
                      'option VARCHAR(255), value VARCHAR(255)); '
                      'ALTER TABLE fugluconfig OWNER TO fuglu')
        for row in ROWS:
            postgres.psql("INSERT INTO fugluconfig VALUES ('%s', '%s', '%s', '%s')" % row)
        for side, python in pythons.items():
            results[side] = measure_side(side, python, postgres, args.counts)
            print('%-8s %s' % (side, json.dumps(results[side])), flush=True)
    finally:
        postgres.stop()
        peers.remove_world_dir(basedir)
    report = build_report(args, results, versions)
    print(report)
    if args.write if args.write is not None else not args.quick:
        afterqueue.write_section(report, SECTION_TITLE)   # only that section is replaced
        print('written to %s' % afterqueue.RESULTS_FILE)
    return 0


if __name__ == '__main__':
    sys.exit(main())
