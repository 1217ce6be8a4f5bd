#!/usr/bin/env python3
"""Milter benchmark: a stdlib load generator that plays Postfix against fuglu's milter
connector (and upstream FuGlu 1.7.0's, when its venv can be made).

    load generator (threads, MTA side) --milter v6--> filter (milter:127.0.0.1:<port>)

Every simulated SMTP session opens a milter connection (as Postfix does), negotiates
with Postfix 3.x's offer (version 6, actions 0x1ff, protocol 0x1fffff), sends the
connect macros + CONNECT, HELO, MAIL/RCPT/DATA with their macros, the headers, the
body in chunks of 65535 bytes, end of body with the `i` macro, reads every packet up
to the verdict, and QUITs. Events the filter did not negotiate as no-reply wait for
their reply, the rest are pipelined, exactly like Postfix.

Per filter we report msgs/s (messages / wall time of the run), CPU ms per message
(utime+stime of the filter's process tree over the run, /proc), peak RSS (VmHWM) and
RSS at the end (VmRSS). Everything listens on 127.0.0.1; every process started here is
stopped by its pid.

    python3 bench/milter.py                       # 5 KB, c=10, ours and upstream, prints
    python3 bench/milter.py --write               # ... and updates bench/RESULTS.md "## milter"
    python3 bench/milter.py --size 512000 --concurrency 1 --messages 500 --only ours
    python3 bench/milter.py --per-connection 10   # 10 messages per milter connection
"""

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import socket

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
sys.path.insert(0, BENCH_DIR)

# the /proc readings and process handling are shared with the after-queue benchmark
from afterqueue import (BENCH_MAIN_SECTION, free_port, port_accepts, stop_process, tail,
                        # noqa: E402
                        tree_cpu_seconds, tree_memory_mb, write_logging_conf)
import afterqueue  # noqa: E402

SECTION_TITLE = '## milter'
UPSTREAM_VENV = '/tmp/fuglu-upstream-milter-venv'

# milter protocol constants the MTA side needs (mfdef.h)
OPTNEG, MACRO, CONNECT, HELO, MAIL, RCPT, DATA = b'O', b'D', b'C', b'H', b'M', b'R', b'T'
HEADER, EOH, BODY, EOB, QUIT = b'L', b'N', b'B', b'E', b'Q'
NO_REPLY_FLAGS = {CONNECT: 0x1000, HELO: 0x2000, MAIL: 0x4000, RCPT: 0x8000, DATA: 0x10000,
                  HEADER: 0x80, EOH: 0x40000, BODY: 0x80000}
FINAL_REPLIES = b'cadrty'     # continue, accept, discard, reject, tempfail, replycode
LEADING_SPACE = 0x100000

FUGLU_CONF = BENCH_MAIN_SECTION + """\
incomingport=milter:127.0.0.1:{port}
controlport={run_dir}/control.sock
versioncheck=0
tempdir={run_dir}

[performance]
backend={backend}
minthreads={threads}
maxthreads={max_threads}
# the load generator is one client address, like Postfix: no per-client cap
max_sessions_per_client=0

[milter]
milter_mode={mode}
"""


def packet(command, data=b''):
    return (len(data) + 1).to_bytes(4, 'big') + command + data


def strings(*values):
    return b''.join(value.encode() + b'\0' for value in values)


class MilterMTA(object):
    """The MTA side of one milter connection."""

    def __init__(self, port):
        self.sock = socket.create_connection(('127.0.0.1', port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()
        self.protocol = 0
        self.outgoing = []

    def read_packet(self):
        while True:
            if len(self.buffer) >= 4:
                length = int.from_bytes(self.buffer[:4], 'big')
                if len(self.buffer) >= 4 + length:
                    command = bytes(self.buffer[4:5])
                    data = bytes(self.buffer[5:4 + length])
                    del self.buffer[:4 + length]
                    return command, data
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError('filter closed the connection')
            self.buffer += chunk

    def flush(self):
        if self.outgoing:
            self.sock.sendall(b''.join(self.outgoing))
            self.outgoing = []

    def event(self, command, data=b''):
        """Queue an event; if a reply is due, send what is queued and read it."""
        self.outgoing.append(packet(command, data))
        flag = NO_REPLY_FLAGS.get(command)
        if flag is not None and not self.protocol & flag:
            self.flush()
            reply = self.read_packet()
            if reply[0] != b'c':
                raise RuntimeError('unexpected reply %r to %r' % (reply, command))

    def negotiate(self):
        self.sock.sendall(packet(OPTNEG, (6).to_bytes(4, 'big') + (0x1ff).to_bytes(4, 'big') +
                                 (0x1fffff).to_bytes(4, 'big')))
        command, data = self.read_packet()
        if command != OPTNEG:
            raise RuntimeError('no OPTNEG reply: %r' % command)
        self.protocol = int.from_bytes(data[8:12], 'big')

    def session_start(self, number):
        self.negotiate()
        self.outgoing.append(packet(MACRO,
                                    b'C' + strings('j', 'mx.bench.test', '{daemon_name}', 'smtpd',
                                                         'v', 'Postfix 3.7.11', '_',
                                                         'unknown [192.0.2.1]')))
        self.event(CONNECT,
                   strings('unknown') + b'4' + (40000 + number % 20000).to_bytes(2, 'big') +
                   strings('192.0.2.1'))
        self.event(HELO, strings('client.bench.test'))

    def message(self, queue_id, headers, body_chunks):
        """One whole message; returns the verdict packet."""
        self.outgoing.append(packet(MACRO,
                                    b'M' + strings('i', queue_id, '{mail_addr}',
                                                   'sender@bench.test')))
        self.event(MAIL, strings('<sender@bench.test>', 'SIZE=5120'))
        self.outgoing.append(packet(MACRO,
                                    b'R' + strings('i', queue_id, '{rcpt_addr}',
                                                   'rcpt@bench.test')))
        self.event(RCPT, strings('<rcpt@bench.test>'))
        self.outgoing.append(packet(MACRO, b'T' + strings('i', queue_id)))
        self.event(DATA)
        space = ' ' if self.protocol & LEADING_SPACE else ''
        for name, value in headers:
            self.event(HEADER, strings(name, space + value))
        self.event(EOH)
        for chunk in body_chunks:
            self.event(BODY, chunk)
        self.outgoing.append(packet(MACRO, b'E' + strings('i', queue_id)))
        self.outgoing.append(packet(EOB))
        self.flush()
        while True:
            reply = self.read_packet()
            if reply[0] in FINAL_REPLIES:
                return reply

    def quit(self):
        try:
            self.sock.sendall(packet(QUIT))
        finally:
            self.sock.close()


def make_message(size):
    """Headers and body chunks for a message of about `size` bytes."""
    headers = [('Received', 'from client.bench.test (unknown [192.0.2.1]) by mx.bench.test '
                            '(Postfix)'),
               ('From', 'Bench Sender <sender@bench.test>'), ('To', 'rcpt@bench.test'),
               ('Subject', 'milter benchmark message'), ('Date', 'Tue, 25 Nov 2026 06:00:00 +0000'),
               ('Message-ID', '<bench@bench.test>'), ('MIME-Version', '1.0'),
               ('Content-Type', 'text/plain; charset=us-ascii')]
    header_bytes = sum(len(n) + len(v) + 4 for n, v in headers) + 2
    line = b'The quick brown fox jumps over the lazy dog, benchmark line of text 0123456789.\r\n'
    body = (line * (max(size - header_bytes, 0) // len(line) + 1))[:max(size - header_bytes, 0)]
    chunks = [body[i:i + 65535] for i in range(0, len(body), 65535)]
    return headers, chunks


def generate_load(port, messages, concurrency, size, per_connection):
    """Run the load; returns (seconds, verdict counts, errors)."""
    headers, chunks = make_message(size)
    counter = iter(range(messages))
    lock = threading.Lock()
    verdicts, errors = {}, []

    def worker(number):
        mta, sent_on_connection = None, 0
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                break
            try:
                if mta is None:
                    mta = MilterMTA(port)
                    mta.session_start(number)
                reply = mta.message('4B%06dQ%d' % (index, number), headers, chunks)
                with lock:
                    verdicts[reply[0]] = verdicts.get(reply[0], 0) + 1
                sent_on_connection += 1
                if sent_on_connection >= per_connection:
                    mta.quit()
                    mta, sent_on_connection = None, 0
            except Exception as error:
                with lock:
                    errors.append('%s: %s' % (error.__class__.__name__, error))
                if mta is not None:
                    mta.sock.close()
                mta, sent_on_connection = None, 0
        if mta is not None:
            mta.quit()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(concurrency)]
    started = time.time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    return time.time() - started, verdicts, errors


def start_filter(name, command, run_dir, port, mode, threads, backend='thread'):
    os.makedirs(run_dir, exist_ok=True)
    conf = os.path.join(run_dir, 'fuglu.conf')
    with open(conf, 'w') as conf_file:
        conf_file.write(FUGLU_CONF.format(port=port, run_dir=run_dir, threads=threads,
                                          max_threads=threads + 10,
                                          mode=mode, backend=backend))
    log_path = os.path.join(run_dir, 'fuglu.log')
    logging_conf = write_logging_conf(run_dir)
    output = open(os.path.join(run_dir, 'stdout.log'), 'wb')
    process = subprocess.Popen(command + ['-f', '-c', conf, '--logconfig', logging_conf],
                               cwd=run_dir,
                               stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
    output.close()
    deadline = time.time() + 60
    while not port_accepts(port):
        if process.poll() is not None or time.time() > deadline:
            stop_process(process)
            raise RuntimeError('%s did not start:\n%s%s'
                               % (name, tail(os.path.join(run_dir, 'stdout.log')), tail(log_path)))
        time.sleep(0.02)
    return process


def measure(name, command, args, run_root):
    run_dir = os.path.join(run_root, name)
    port = free_port()
    backend = name.partition('/')[2] or 'thread'
    process = start_filter(name, command, run_dir, port, args.mode, max(args.concurrency, 2),
                           backend)
    try:
        time.sleep(1)
        generate_load(port, max(20, args.concurrency * 2), args.concurrency, args.size,
                      args.per_connection)
        cpu_before = tree_cpu_seconds(process.pid)
        seconds, verdicts, errors = generate_load(port, args.messages, args.concurrency, args.size,
                                                  args.per_connection)
        cpu = tree_cpu_seconds(process.pid) - cpu_before
        result = {
            'filter': name, 'messages': args.messages, 'seconds': seconds,
            'rate': args.messages / seconds, 'cpu_ms': cpu * 1000.0 / args.messages,
            'peak_rss': tree_memory_mb(process.pid, 'VmHWM'),
            'rss': tree_memory_mb(process.pid, 'VmRSS'),
            'verdicts': {k.decode(): v for k, v in verdicts.items()}, 'errors': errors,
            'log_error': first_log_error(os.path.join(run_dir, 'fuglu.log')),
        }
    finally:
        stop_process(process, grace=3)
    return result


def first_log_error(path):
    """The first 'SomethingError: text' line of a filter's log, to explain failures."""
    try:
        with open(path, errors='replace') as log_file:
            for line in log_file:
                match = re.search(r'\b(\w+(?:Error|Exception): .*)', line)
                if match:
                    return match.group(1).strip()[:200]
    except OSError:
        pass
    return None


def upstream_command():
    """Upstream FuGlu 1.7.0 with the `libmilter` module its milter connector imports.
    The PyPI project `libmilter` does not exist; the module comes from
    `python-libmilter` (crustymonkey). Returns the command, or None with a reason."""
    python = os.path.join(UPSTREAM_VENV, 'bin', 'python')
    probe = [python, '-c', 'import fuglu.connectors.milterconnector, libmilter, '
                           'importlib.metadata as m; '
                           'print(m.version("fuglu"))']

    def ready():
        return os.path.exists(python) and subprocess.run(
            probe, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=tempfile.gettempdir()
        ).stdout.decode().strip() == '1.7.0'
    if not ready():
        base = afterqueue.default_upstream_python()
        print('creating %s with fuglu==1.7.0 python-libmilter (once) ...' % UPSTREAM_VENV,
              flush=True)
        try:
            subprocess.run([base, '-m', 'venv', UPSTREAM_VENV], check=True)
            subprocess.run([python, '-m', 'pip', 'install', '--quiet',
                            '--disable-pip-version-check', '--no-warn-script-location',
                            'fuglu==1.7.0', 'python-libmilter', 'aioprocessing'], check=True)
        except (OSError, subprocess.CalledProcessError) as error:
            return None, 'could not install upstream: %s' % error
        if not ready():
            return None, 'fuglu 1.7.0 or libmilter not importable in %s' % UPSTREAM_VENV
    return [python, '-m', 'fuglu'], None


def report(results, args, notes):
    lines = [SECTION_TITLE, '',
             'Produced by `python3 bench/milter.py %s`. The stdlib load generator plays Postfix '
             '3.x (version 6, actions 0x1ff, protocol 0x1fffff; macros, one header per packet, '
             'body in 65535-byte chunks, `i` at end of body); %s; no plugins, INFO log to a file, '
             'milter_mode=%s (ours: thread backend; upstream: the backend named in the filter '
             'column). Load generator and filter share the 2 CPUs.'
             % (' '.join(sys.argv[1:]) or '(defaults)',
                'a new milter connection per message (Postfix opens one per SMTP session)'
                if args.per_connection == 1
                else '%d messages per milter connection' % args.per_connection,
                args.mode), '',
             '- date: %s UTC' % datetime.datetime.utcnow().strftime('%Y-%m-%d %H:%M'),
             '- machine: nproc %d, %s, Python %s' % (os.cpu_count(), platform.machine(),
                                                     platform.python_version()),
             '',
             '| size | c | msgs | filter | msgs/s | CPU ms/msg | peak RSS MB | RSS at end MB | '
             'verdicts | errors |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for result in results:
        lines.append('| %d B | %d | %d | %s | %.0f | %.2f | %.1f | %.1f | %s | %s |' % (
            args.size, args.concurrency, result['messages'], result['filter'], result['rate'],
            result['cpu_ms'],
            result['peak_rss'], result['rss'],
            ' '.join('%s=%d' % kv for kv in sorted(result['verdicts'].items())),
            len(result['errors']) or 'none'))
    ours = [r for r in results if r['filter'] == 'ours']
    if ours and args.size == 5120 and args.concurrency == 10:
        lines += ['', 'Target >= 1,500 msgs/s at 5 KB, c=10: %s (%.0f).'
                  % ('met' if ours[0]['rate'] >= 1500 else 'NOT met', ours[0]['rate'])]
    lines += [''] + ['- ' + note for note in notes]
    return '\n'.join(lines) + '\n'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--messages', type=int, default=6000)
    parser.add_argument('--concurrency', '-c', type=int, default=10)
    parser.add_argument('--size', type=int, default=5120, help='message size in bytes '
                                                               '(default 5120)')
    parser.add_argument('--per-connection', type=int, default=1, help='messages per milter '
                                                                      'connection')
    parser.add_argument('--mode', default='tags', help='milter_mode of both filters (default tags: '
                                                       'X-Fuglu headers are added)')
    parser.add_argument('--only', choices=('ours', 'upstream'))
    parser.add_argument('--upstream-backends', default='thread,asyncprocess',
                        help='upstream [performance] backends to measure, comma separated: thread '
                             '(sync milter connector), asyncprocess (its async milter connector; '
                             'needs aioprocessing)')
    parser.add_argument('--ours', default=os.path.join(REPO_ROOT, 'fuglu.py'))
    parser.add_argument('--python', default=sys.executable)
    parser.add_argument('--write', action='store_true', help='update the "## milter" section of '
                                                             'RESULTS.md')
    args = parser.parse_args(argv)
    notes, results = [], []
    run_root = tempfile.mkdtemp(prefix='fuglu-milter-bench-')
    filters = []
    if args.only != 'upstream':
        filters.append(('ours', [args.python, args.ours]))
    if args.only != 'ours':
        command, problem = upstream_command()
        if command is None:
            notes.append('upstream FuGlu 1.7.0 milter not measured: %s' % problem)
        else:
            for backend in args.upstream_backends.split(','):
                filters.append(('upstream/%s' % backend.strip(), command))
            notes.append('upstream: FuGlu 1.7.0 from PyPI with `python-libmilter` (the module '
                         '`libmilter` its milter connector imports; a PyPI project named '
                         '`libmilter` does not exist), `%s -m fuglu`, same config' % command[0])
    status = 0
    for name, command in filters:
        try:
            result = measure(name, command, args, run_root)
        except Exception as error:
            notes.append('%s failed: %s' % (name, str(error).replace('\n', ' ')[:300]))
            status = 1
            continue
        results.append(result)
        if result['errors']:
            notes.append('%s: %d of %d messages failed on the MTA side (first: %s); first error in '
                         'its log: %s. A timed-out message holds one of the c load threads for the '
                         '60 s socket timeout.'
                         % (name, len(result['errors']), args.messages, result['errors'][0],
                            result['log_error'] or 'none'))
        print('%-8s %6.0f msgs/s  %.2f CPU ms/msg  peak RSS %.1f MB  verdicts %s  errors %d' % (
            name, result['rate'], result['cpu_ms'], result['peak_rss'], result['verdicts'],
            len(result['errors'])),
            flush=True)
    text = report(results, args, notes)
    print(text)
    if args.write:
        afterqueue.write_section(text, SECTION_TITLE)   # only that section is replaced
    return status


if __name__ == '__main__':
    sys.exit(main())
