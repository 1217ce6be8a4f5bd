#!/usr/bin/env python3
"""Memory benchmark: our fuglu against upstream FuGlu 1.7.0 (issue 14).

Two workloads, each filter started afresh for each, on the machinery of
bench/afterqueue.py (smtp-source / smtp-sink, /proc readings, ABBA turns):

* pass-through cells, no plugins: 5 KB c=10 (speed check), 2 MB c=50, 20 MB c=10,
  20 MB c=50. Per filter: msgs/s of the faster of 2 runs, peak RSS (VmHWM summed
  over the process tree at the end of the cell) and RSS at the end.
* corpus replay, attachment + archive plugins, c=10: a seeded corpus of messages
  with attachments (pdf, jpeg, zip, nested zip, tar.gz, docx; 3 KB to 8 MB) sent
  10 times in a row, one filter at a time; the RSS after each round (once the sink
  has every message and the filter has been idle for a second) and the peak.

A third filter, ``before``, is the build the change started from (``--before DIR``,
a directory holding fuglu.py and fuglu_plugins): the targets compare ours with it
for speed ("msgs/s not lower than today").

    python3 bench/memory.py                  # everything, writes RESULTS.md (~10 min)
    python3 bench/memory.py --quick          # small counts, 3 rounds, prints only
    python3 bench/memory.py --only ours --workload corpus

stdlib only; everything listens on 127.0.0.1 and every process started here is
stopped by its pid. See bench/README.md.
"""

import argparse
import email.policy
import io
import os
import random
import shutil
import signal
import smtplib
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from email.mime.application import MIMEApplication
from email.mime.image import MIMEImage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import afterqueue as aq  # noqa: E402

SECTION_TITLE = '## memory'

# (label, size, c, warm-up messages, measured runs per filter); None: afterqueue's
# defaults (max(20, c), 2 runs). Upstream takes ~5 s of CPU per 20 MB message: those cells
# get one run after 2 warm-up messages (the peak at c=50 needs 50 in flight at once).
PASS_CELLS = (('5 KB', 5 * 1024, 10, None, None), ('2 MB', 2 * 1048576, 50, None, None),
              ('20 MB', 20 * 1048576, 10, 2, 1), ('20 MB', 20 * 1048576, 50, 2, 1))
PASS_COUNTS = {('5 KB', 10): 4000, ('2 MB', 50): 300, ('20 MB', 10): 20, ('20 MB', 50): 50}
QUICK_PASS_COUNTS = {('5 KB', 10): 300, ('2 MB', 50): 60, ('20 MB', 10): 10,
                     ('20 MB', 50): 50}
# 50 such messages through upstream (one core, ~5 s each) take 250-400 s: more than
# afterqueue's 300 s for one smtp-source run
SOURCE_TIMEOUT = 900.0

CORPUS_SEED = 14
CORPUS_MESSAGES = 60
CORPUS_ROUNDS = 10
QUICK_CORPUS_ROUNDS = 3
CORPUS_CONCURRENCY = 10
CORPUS_IDLE = 1.0      # seconds idle after a round before its RSS is read

TARGET_RSS_RATIO = 0.5          # peak RSS ours / upstream, 2 MB and 20 MB cells
TARGET_TREE_20MB_C50 = 200.0    # MB, peak RSS of the tree at 20 MB c=50
TARGET_CORPUS_RSS = 60.0        # MB after the last corpus round
TARGET_5KB_RATE = 0.95          # ours / before at 5 KB c=10

PLUGIN_SECTIONS = """\
[FiletypePlugin]
rulesdir={rules_dir}
template_blockedfile={rules_dir}/blockedfile.tmpl
sendbounce=False
checkarchivenames=True
checkarchivecontent=True
archiveextractlevel=3

[ArchivePlugin]
archiverules={run_dir}/archive.regex
local_archivedir={run_dir}/archive
local_subdirtemplate=${{to_domain}}
"""

PLUGINS = 'fuglu.plugins.attachment.FiletypePlugin,fuglu.plugins.archive.ArchivePlugin'


class BenchFilter(aq.Filter):
    """A filter of afterqueue.py, optionally with the attachment and archive plugins.
    Ours logs to its output file at INFO (``--baseloglevel``) rather than through
    ``--logconfig``: as root, fuglu prepares /var/log/fuglu for a logging.conf and
    refuses one that an earlier run as the daemon user left behind."""

    def __init__(self, name, command_prefix, python, plugins=False):
        super().__init__(name, command_prefix, python)
        self.plugins = plugins

    def with_plugins(self):
        return BenchFilter(self.name, self.command_prefix, self.python, plugins=True)

    def supports(self, flag):
        if flag == '--logconfig' and self.name != 'upstream':
            return False
        return super().supports(flag)

    def write_config(self, run_dir, listen_port, sink_port):
        conf_path, logging_path = super().write_config(run_dir, listen_port, sink_port)
        if not self.plugins:
            return conf_path, logging_path
        rules_dir = os.path.join(run_dir, 'rules')
        shutil.copytree(os.path.join(aq.REPO_ROOT, 'conf', 'rules'), rules_dir)
        shutil.copy(os.path.join(aq.REPO_ROOT, 'conf', 'templates', 'blockedfile.tmpl'),
                    rules_dir)
        os.makedirs(os.path.join(run_dir, 'archive'))
        with open(os.path.join(run_dir, 'archive.regex'), 'w') as rules:
            rules.write('envelope_to .* yes\n')
        with open(conf_path) as conf:
            text = conf.read().replace('plugins=\n', 'plugins=%s\n' % PLUGINS, 1)
        with open(conf_path, 'w') as conf:
            conf.write(text + '\n' + PLUGIN_SECTIONS.format(rules_dir=rules_dir,
                                                            run_dir=run_dir))
        return conf_path, logging_path


# ---------------------------------------------------------------------------
# the corpus
# ---------------------------------------------------------------------------

def _text(rng, size):
    words = ('mail', 'filter', 'report', 'invoice', 'meeting', 'budget', 'the', 'a',
             'quarter', 'attached', 'please', 'find', 'regards', 'data', 'Postfix')
    out, length = [], 0
    while length < size:
        line = ' '.join(rng.choice(words) for _ in range(12))
        out.append(line)
        length += len(line) + 1
    return '\n'.join(out)


def _binary(rng, size, head=b''):
    return head + rng.randbytes(max(size - len(head), 0))


def _zip(rng, members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w', zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


def _targz(rng, members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w:gz') as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _attachment(rng, kind, size):
    if kind == 'pdf':
        return MIMEApplication(_binary(rng, size, b'%PDF-1.4\n'), 'pdf'), 'report.pdf'
    if kind == 'jpeg':
        jpeg = _binary(rng, size, b'\xff\xd8\xff\xe0\x00\x10JFIF\x00')
        return MIMEImage(jpeg, 'jpeg'), 'photo.jpg'
    if kind == 'zip':
        members = [('notes%d.txt' % i, _text(rng, size // 4).encode()) for i in range(3)]
        members.append(('image.bin', _binary(rng, size // 4)))
        return MIMEApplication(_zip(rng, members), 'zip'), 'files.zip'
    if kind == 'nested':
        inner = _zip(rng, [('inner.txt', _text(rng, size // 2).encode()),
                           ('inner.pdf', _binary(rng, size // 2, b'%PDF-1.4\n'))])
        return MIMEApplication(_zip(rng, [('inner.zip', inner)]), 'zip'), 'nested.zip'
    if kind == 'targz':
        members = [('data/%d.csv' % i, _text(rng, size // 3).encode()) for i in range(3)]
        return MIMEApplication(_targz(rng, members), 'gzip'), 'backup.tar.gz'
    members = [('[Content_Types].xml', b'<?xml version="1.0"?><Types/>'),
               ('word/document.xml', _text(rng, size).encode())]
    return (MIMEApplication(_zip(rng, members),
                            'vnd.openxmlformats-officedocument.wordprocessingml.document'),
            'letter.docx')


def build_corpus(seed=CORPUS_SEED, count=CORPUS_MESSAGES):
    """Messages (bytes) with attachments, the same for every filter and run."""
    rng = random.Random(seed)
    kinds = ('pdf', 'jpeg', 'zip', 'nested', 'targz', 'docx')
    corpus = []
    for number in range(count):
        message = MIMEMultipart()
        message['From'] = aq.SENDER
        message['To'] = aq.RECIPIENT
        message['Subject'] = 'corpus message %d' % number
        message.attach(MIMEText(_text(rng, rng.randint(500, 20000)), 'plain', 'utf-8'))
        if number % 20 == 19:   # one big message with many parts now and then
            sizes = [(rng.choice(kinds), 1048576) for _ in range(6)]
        elif number % 3 == 0:   # text only
            sizes = []
        else:
            sizes = [(rng.choice(kinds), rng.randint(20000, 800000))
                     for _ in range(rng.randint(1, 3))]
        for kind, size in sizes:
            part, name = _attachment(rng, kind, size)
            part.add_header('Content-Disposition', 'attachment', filename=name)
            message.attach(part)
        corpus.append(message.as_bytes(policy=email.policy.SMTP))   # CRLF, as on the wire
    return corpus


def send_corpus(port, corpus, concurrency):
    """Every message once, one SMTP connection each, ``concurrency`` at a time;
    returns (seconds, failures)."""
    pending = list(corpus)
    lock = threading.Lock()
    failures = []

    def worker():
        while True:
            with lock:
                if not pending:
                    return
                message = pending.pop()
            try:
                client = smtplib.SMTP('127.0.0.1', port, timeout=120)
                try:
                    client.sendmail(aq.SENDER, [aq.RECIPIENT], message)
                    client.docmd('QUIT')   # FuGlu 1.7.0 answers QUIT with 220, not 221
                finally:
                    client.close()
            except (smtplib.SMTPException, OSError) as error:
                with lock:
                    failures.append('%s: %s' % (error.__class__.__name__, error))

    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.monotonic() - started, failures


def replay_corpus(filter_under_test, corpus, rounds, sink, run_root):
    """One filter, ``rounds`` replays; {'rss': [MB after each round], 'peak': MB, ...}."""
    cell = aq.Cell('corpus', 0, CORPUS_CONCURRENCY, len(corpus))
    running = aq.RunningFilter(filter_under_test, cell, sink, run_root)
    result = {'rss': [], 'rates': [], 'failures': 0, 'lost': 0}
    try:
        running.start()
        result['idle_rss_mb'] = running.result['idle_rss_mb']
        for _ in range(rounds):
            before = sink.delivered()
            seconds, failures = send_corpus(running.listen_port, corpus, CORPUS_CONCURRENCY)
            delivered = sink.wait_for(before + len(corpus)) - before
            running.check_alive()
            result['failures'] += len(failures)
            result['lost'] += len(corpus) - len(failures) - delivered
            result.setdefault('first_failure', failures[0] if failures else None)
            result['rates'].append(len(corpus) / seconds)
            time.sleep(CORPUS_IDLE)
            result['rss'].append(aq.tree_memory_mb(running.process.pid, 'VmRSS'))
            print('    round %d: %.1f msgs/s, RSS %.1f MB%s' % (
                len(result['rss']), result['rates'][-1], result['rss'][-1],
                ', %d failed' % len(failures) if failures else ''), flush=True)
        result['peak'] = aq.tree_memory_mb(running.process.pid, 'VmHWM')
    finally:
        running.stop()
    return result


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------

def build_report(filters, passes, corpus_results, corpus, rounds, argv, quick, load_before,
                 notes):
    names = [f.name for f in filters]
    out = [SECTION_TITLE, '']
    out.append('Produced by `python3 bench/memory.py%s`%s. Pass-through: smtp connector, no '
               'plugins, thread backend (minthreads=%d, maxthreads=%d), each filter started '
               'afresh per cell, warmed up with max(20, c) messages (20 MB: 2), then %d '
               'measured runs each in turns (20 MB: 1); msgs/s of the faster run, peak RSS '
               '= VmHWM summed over the '
               'process tree at the end of the cell (start-up, warm-up and both runs), end '
               'RSS = VmRSS then. Corpus: %d messages with attachments (%.1f MB, seed %d) '
               'sent %d times at c=%d through FiletypePlugin (archive names and content, 3 '
               'levels) and ArchivePlugin (every message archived); RSS read %g s after '
               'each round.' % (
                   (' ' + ' '.join(argv)) if argv else '',
                   ' (quick counts: smoke test, not figures)' if quick else '',
                   aq.MIN_THREADS, aq.MAX_THREADS, aq.MEASURED_RUNS, len(corpus),
                   sum(map(len, corpus)) / 1048576.0, CORPUS_SEED, rounds,
                   CORPUS_CONCURRENCY, CORPUS_IDLE))
    out.append('')
    out.extend(aq.machine_info(filters, load_before))
    out.append('')
    if passes:
        out.append('| size | c | msgs per run | filter | msgs/s | peak RSS MB | end RSS MB '
                   '| lost |')
        out.append('|---|---|---|---|---|---|---|---|')
        for cell in passes['cells']:
            for name in names:
                result = passes['results'].get((name, cell.key))
                if result is None:
                    out.append('| %s | %d | %d | %s | failed | | | |' % (
                        cell.size_label, cell.concurrency, cell.count, name))
                    continue
                out.append('| %s | %d | %d | %s | %.1f | %.1f | %.1f | %d |' % (
                    cell.size_label, cell.concurrency, cell.count, name, result['rate'],
                    result['peak_rss_mb'], result['end_rss_mb'], result['lost']))
        out.append('')
    if corpus_results:
        out.append('| filter | msgs/s (median round) | RSS after round 1..%d, MB | peak RSS MB '
                   '| failed / lost |' % rounds)
        out.append('|---|---|---|---|---|')
        for name in names:
            result = corpus_results.get(name)
            if result is None:
                out.append('| %s | failed | | | |' % name)
                continue
            rates = sorted(result['rates'])
            out.append('| %s | %.1f | %s | %.1f | %d / %d |' % (
                name, rates[len(rates) // 2], ' '.join('%.0f' % v for v in result['rss']),
                result['peak'], result['failures'], result['lost']))
        out.append('')
    out.extend(target_lines(passes, corpus_results))
    out.append('')
    for note in notes:
        out.append('- note: %s' % note)
    return '\n'.join(out).rstrip() + '\n'


def target_lines(passes, corpus_results):
    results = passes['results'] if passes else {}

    def value(name, key, field):
        result = results.get((name, key))
        return result and result[field]

    checks = []
    for key in (('2 MB', 50), ('20 MB', 10), ('20 MB', 50)):
        ours, upstream = value('ours', key, 'peak_rss_mb'), value('upstream', key, 'peak_rss_mb')
        checks.append(('%s c=%d: peak RSS ≤ %.1fx upstream' % (key[0], key[1], TARGET_RSS_RATIO),
                       aq.ratio(ours, upstream), lambda v: v <= TARGET_RSS_RATIO, '%.2fx'))
        checks.append(('%s c=%d: msgs/s not lower than before' % key,
                       aq.ratio(value('ours', key, 'rate'), value('before', key, 'rate')),
                       lambda v: v >= 1.0, '%.2fx'))
    checks.append(('20 MB c=50: peak RSS of the tree ≤ %g MB' % TARGET_TREE_20MB_C50,
                   value('ours', ('20 MB', 50), 'peak_rss_mb'),
                   lambda v: v <= TARGET_TREE_20MB_C50, '%.1f MB'))
    checks.append(('5 KB c=10: msgs/s ≥ %d %% of before' % (100 * TARGET_5KB_RATE),
                   aq.ratio(value('ours', ('5 KB', 10), 'rate'),
                            value('before', ('5 KB', 10), 'rate')),
                   lambda v: v >= TARGET_5KB_RATE, '%.2fx'))
    corpus = (corpus_results or {}).get('ours')
    checks.append(('corpus: RSS after the last round ≤ %g MB' % TARGET_CORPUS_RSS,
                   corpus and corpus['rss'][-1], lambda v: v <= TARGET_CORPUS_RSS, '%.1f MB'))
    rising = None
    if corpus and len(corpus['rss']) >= 4:
        half = len(corpus['rss']) // 2
        # not rising: the second half of the rounds ends no higher than it starts (+2 MB)
        rising = corpus['rss'][-1] - min(corpus['rss'][half:])
    checks.append(('corpus: RSS not rising (last round - lowest of the second half ≤ 2 MB)',
                   rising, lambda v: v <= 2.0, '%+.1f MB'))
    return aq.target_table(checks)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--only', choices=('ours', 'upstream', 'before'), action='append',
                        help='measure these filters only (repeatable)')
    parser.add_argument('--workload', choices=('pass', 'corpus'), action='append',
                        help='run these workloads only (repeatable)')
    parser.add_argument('--quick', action='store_true', help='small counts, 3 corpus rounds')
    parser.add_argument('--cell', action='append', metavar='SIZE/C',
                        help='pass-through cells to run, e.g. 5KB/10 (repeatable; default all)')
    parser.add_argument('--ours', default=None,
                        help='our fuglu.py or fuglu.pyz (default: dist/fuglu.pyz, built first)')
    parser.add_argument('--before', default=None,
                        help='the fuglu.pyz the change started from, or a directory with its '
                             'fuglu.py and fuglu_plugins; without it there is no "before" '
                             'filter')
    parser.add_argument('--python', help='interpreter for ours and before (default: the bare '
                                         'venv %s)' % aq.DEFAULT_OURS_VENV)
    parser.add_argument('--upstream-venv', default=aq.DEFAULT_UPSTREAM_VENV)
    parser.add_argument('--upstream-python', default=aq.default_upstream_python())
    parser.add_argument('--write', dest='write', action='store_true', default=None)
    parser.add_argument('--no-write', dest='write', action='store_false')
    parser.add_argument('--keep', action='store_true', help='keep configs and logs')
    args = parser.parse_args(argv)
    if args.write is None:
        args.write = not (args.quick or args.only or args.workload or args.cell)
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    aq.SOURCE_TIMEOUT = max(aq.SOURCE_TIMEOUT, SOURCE_TIMEOUT)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    only = args.only or ['upstream', 'before', 'ours']
    workloads = args.workload or ['pass', 'corpus']
    python = args.python or aq.bare_venv_python(aq.DEFAULT_OURS_VENV, args.upstream_python)
    filters = []
    if 'upstream' in only:
        upstream = aq.upstream_filter(args.upstream_venv, args.upstream_python)
        filters.append(BenchFilter('upstream', upstream.command_prefix, upstream.python))
    if 'before' in only and args.before:
        before = os.path.abspath(args.before)
        if os.path.isdir(before):
            before = os.path.join(before, 'fuglu.py')
        filters.append(BenchFilter('before', [python, before], python))
    if 'ours' in only:
        if args.ours is None:
            args.ours = os.path.join(aq.REPO_ROOT, 'dist', 'fuglu.pyz')
            subprocess.run([sys.executable, os.path.join(aq.REPO_ROOT, 'build_zipapp.py'),
                            '-o', args.ours], check=True, stdout=subprocess.DEVNULL)
        filters.append(BenchFilter('ours', [python, os.path.abspath(args.ours)], python))

    run_root = tempfile.mkdtemp(prefix='fuglu-membench-')
    sink = aq.CountingSink(run_root)
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    notes, failures = [], []
    passes, corpus_results = None, {}
    corpus = build_corpus() if 'corpus' in workloads else []
    rounds = QUICK_CORPUS_ROUNDS if args.quick else CORPUS_ROUNDS
    try:
        sink.start()
        if 'pass' in workloads:
            counts = QUICK_PASS_COUNTS if args.quick else PASS_COUNTS
            passes = {'cells': [aq.Cell(label, size, c, counts[(label, c)], warmup, runs)
                                for label, size, c, warmup, runs in PASS_CELLS
                                if not args.cell or
                                '%s/%d' % (label.replace(' ', ''), c) in args.cell],
                      'results': {}}
            for cell in passes['cells']:
                print('%s c=%d n=%d ...' % (cell.size_label, cell.concurrency, cell.count),
                      flush=True)
                try:
                    cell_results = aq.measure_with_retries(filters, cell, sink, run_root,
                                                           notes)
                except aq.BenchError as error:
                    print('  FAILED: %s' % str(error).splitlines()[0])
                    failures.append((str(cell), str(error)))
                    continue
                for name, result in cell_results.items():
                    passes['results'][(name, cell.key)] = result
                    print('  %-8s %7.1f msgs/s  peak %6.1f MB  end %6.1f MB  lost %d' % (
                        name, result['rate'], result['peak_rss_mb'], result['end_rss_mb'],
                        result['lost']), flush=True)
        if 'corpus' in workloads:
            for filter_under_test in filters:
                print('corpus x%d, %s ...' % (rounds, filter_under_test.name), flush=True)
                try:
                    corpus_results[filter_under_test.name] = replay_corpus(
                        filter_under_test.with_plugins(), corpus, rounds, sink, run_root)
                except aq.BenchError as error:
                    print('  FAILED: %s' % str(error).splitlines()[0])
                    failures.append(('corpus ' + filter_under_test.name, str(error)))
    finally:
        aq.end_run(sink, run_root, args.keep)
    for result in corpus_results.values():
        if result.get('first_failure'):
            notes.append('first corpus send failure: %s' % result['first_failure'])
    for name, message in failures:
        notes.append('%s failed: %s' % (name, message.strip().splitlines()[0][:300]))
    report = build_report(filters, passes, corpus_results, corpus, rounds, argv, args.quick,
                          load_before, notes)
    print()
    print(report)
    print('(benchmark took %.0f s)' % (time.monotonic() - started))
    if args.write:
        aq.write_section(report, SECTION_TITLE)
        print('written to %s' % aq.RESULTS_FILE)
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
