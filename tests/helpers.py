"""Shared helpers for the unit tests: an in-process fuglu, a recording SMTP sink that
plays the downstream, a raw SMTP client that shows exactly what fuglu answers, the base
of the fake scanner daemons, and factory-fixture and lint plumbing."""

import os
import socket
import socketserver
import subprocess
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
FUGLU_SCRIPT = os.path.join(os.path.dirname(HERE), 'fuglu.py')

import fuglu  # noqa: E402


@pytest.fixture
def no_address_check():
    """Suspect() accepts any envelope address during the test, as with [main]
    address_compliance_checker = NoCheck (import the fixture into a test module)."""
    fuglu.Addrcheck().set('NoCheck')
    yield
    fuglu.Addrcheck().set('Default')


@pytest.fixture
def readable_tmp():
    """A temporary folder every user can read: lint started as root checks (and loads
    plugins) as [main] user, nobody, who cannot enter pytest's tmp_path (import the
    fixture into a test module)."""
    import pathlib
    import shutil
    import tempfile
    path = tempfile.mkdtemp(prefix='fuglu-unit-')
    os.chmod(path, 0o755)
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


def no_delay(sock):
    """TCP_NODELAY, as fuglu sets it: a test peer that writes a reply in pieces (or a
    client that sends a command in pieces) must not wait for a delayed ACK (up to 40 ms
    a time on Linux) between them."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


class SinkHandler(socketserver.StreamRequestHandler):
    def setup(self):
        super().setup()
        no_delay(self.connection)

    def send(self, line):
        self.wfile.write(line.encode() + b'\r\n')
        self.wfile.flush()

    def handle(self):
        sink = self.server.sink
        self.send('220 sink ready')
        transaction = None
        while True:
            line = self.rfile.readline()
            if not line:
                return
            command = line.decode('utf-8', 'replace').rstrip('\r\n')
            sink.commands.append(command)
            verb = command.split(' ', 1)[0].upper()
            if verb == 'EHLO':
                self.send('250-sink')
                for extension in sink.extensions[:-1]:
                    self.send('250-' + extension)
                self.send('250 ' + sink.extensions[-1])
            elif verb == 'MAIL':
                transaction = {'mail': command, 'rcpts': []}
                self.send(sink.replies.get('MAIL', '250 2.1.0 Ok'))
            elif verb == 'RCPT':
                address = command.split(':', 1)[1].split('>')[0].lstrip('<')
                reply = sink.rcpt_replies.get(address, '250 2.1.5 Ok')
                if reply.startswith('250'):
                    transaction['rcpts'].append(address)
                self.send(reply)
            elif verb == 'DATA':
                self.send('354 go ahead')
                data = bytearray()
                raw = bytearray()
                while True:
                    chunk = self.rfile.readline()
                    if not chunk:
                        return
                    raw += chunk
                    if chunk == b'.\r\n' or (sink.postfix_like and chunk == b'.\n'):
                        break
                    data += chunk
                transaction['raw'] = bytes(raw)
                if sink.postfix_like:
                    # like Postfix' smtpd: a line ends at LF, each line is unstuffed
                    transaction['data'] = b''.join(
                        line[1:] if line.startswith(b'..') else line
                        for line in bytes(data).splitlines(True))
                else:
                    transaction['data'] = bytes(data).replace(b'\r\n..', b'\r\n.')
                    if transaction['data'].startswith(b'..'):
                        transaction['data'] = transaction['data'][1:]
                reply = sink.replies.get('DATA', '250 2.0.0 Ok: queued as ABC123DEF')
                if reply.startswith('250'):
                    sink.messages.append(transaction)
                self.send(reply)
                transaction = None
                if sink.hang_up_after_message:
                    return
            elif verb == 'BDAT':
                # RFC 3030: "BDAT <size> [LAST]", then exactly <size> bytes, no stuffing
                words = command.split()
                chunk = self.rfile.read(int(words[1]))
                transaction.setdefault('chunks', []).append(chunk)
                if len(words) > 2 and words[2].upper() == 'LAST':
                    transaction['data'] = transaction['raw'] = b''.join(transaction['chunks'])
                    reply = sink.replies.get('DATA', '250 2.0.0 Ok: %d bytes queued as ABC123DEF'
                                             % len(transaction['data']))
                    if reply.startswith('250'):
                        sink.messages.append(transaction)
                    self.send(reply)
                    transaction = None
                else:
                    self.send('250 2.0.0 Ok: %d bytes' % len(chunk))
            elif verb == 'QUIT':
                self.send('221 bye')
                return
            else:
                self.send('250 2.0.0 Ok')


def stop_listening(listener):
    """Stop a listening socket the way fuglu's Listener.stop does: shutdown() wakes a
    thread blocked in accept() at once (closing alone would not), then close."""
    try:
        listener.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    listener.close()


class ThreadedServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """socketserver's TCP server, a thread per connection, driven by ``serve()``: its
    own accept loop (socketserver's process_request), which stop() ends at once
    instead of serve_forever's poll."""

    daemon_threads = True
    allow_reuse_address = True
    sink = None   # the Sink that counts this server's open connections

    def process_request(self, request, client_address):
        with self.sink.changed:
            self.sink.open_connections += 1
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        """After the handler: the connection is closed, then counted out."""
        try:
            super().shutdown_request(request)
        finally:
            with self.sink.changed:
                self.sink.open_connections -= 1
                self.sink.changed.notify_all()

    def serve(self):
        while True:
            try:
                request, address = self.get_request()
            except OSError:     # stop(): the listener was shut down
                return
            self.process_request(request, address)

    def stop(self):
        stop_listening(self.socket)


class Sink(object):
    """A downstream SMTP server that records what it receives."""

    def __init__(self, extensions=('PIPELINING', 'SIZE 10240000', '8BITMIME', 'SMTPUTF8', 'DSN',
                                   'XFORWARD NAME ADDR PROTO HELO SOURCE PORT IDENT'),
                 postfix_like=False):
        # postfix_like: lines end at LF and '.' LF also ends the data, as in Postfix'
        # smtpd; shows whether fuglu dot-stuffs lines that follow a bare LF.
        self.postfix_like = postfix_like
        self.extensions = list(extensions)
        self.messages = []
        self.commands = []
        self.replies = {}
        self.rcpt_replies = {}
        self.hang_up_after_message = False   # close the connection after each DATA reply
        self.open_connections = 0
        self.changed = threading.Condition()   # notified when a connection is over
        self.server = ThreadedServer(('127.0.0.1', 0), SinkHandler)
        self.server.sink = self
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve, daemon=True)
        self.thread.start()

    def idle(self, timeout=10):
        """Wait until no connection is open: everything sent to the sink was handled."""
        with self.changed:
            return self.changed.wait_for(lambda: self.open_connections == 0, timeout)

    def stop(self):
        self.server.stop()
        self.thread.join(5)


class FakeDaemon(object):
    """Base of the fake scanner daemons (clamd, spamd) the plugin unit tests talk to.

    Listens on a Unix socket at ``unix_path`` or else on a free 127.0.0.1 port
    (``address`` is the path or the port number), accepts in a background thread and
    hands every connection to ``_handle(connection)`` in a thread of its own.
    ``connections`` counts the accepted connections. Subclasses set up their own
    attributes before calling this __init__, which starts accepting."""

    def __init__(self, unix_path=None):
        self.connections = 0
        if unix_path:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(unix_path)
            self.address = unix_path
        else:
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.listener.bind(('127.0.0.1', 0))
            self.address = self.listener.getsockname()[1]
        self.listener.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:     # close(): the listener was shut down
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(connection,), daemon=True).start()

    def _handle(self, connection):
        raise NotImplementedError

    def close(self):
        """Stop accepting as fuglu stops its own listener: shutdown() wakes accept()."""
        stop_listening(self.listener)
        self.thread.join(2)


def stopped_at_teardown(create, stop_method='stop'):
    """Generator body for a factory fixture (``yield from stopped_at_teardown(...)``):
    yields a function that calls ``create(*args, **options)`` and returns what it made;
    when the test is over, the ``stop_method`` of everything made is called, in order."""
    made = []

    def make(*args, **options):
        thing = create(*args, **options)
        made.append(thing)
        return thing
    yield make
    for thing in made:
        getattr(thing, stop_method)()


def run_fuglu_lint(conf_path, cwd=None):
    """``fuglu.py --lint -c conf_path`` in a child process -> (exit code, its output
    with stderr merged in, as text)."""
    result = subprocess.run([sys.executable, FUGLU_SCRIPT, '--lint', '-c', str(conf_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60, cwd=cwd)
    return result.returncode, result.stdout.decode()


def make_config(text, confdir='/tmp'):
    config = fuglu.FuConfigParser(confdir=confdir)
    config.read_config_text(text, '<test>')
    for section, table in fuglu.CORE_DEFAULTS.items():
        config.set_defaults(section, table)
    return config


class InProcessFuglu(object):
    """A MainController running in this process on a free port."""

    def __init__(self, downstream_port, extra_main='', extra='', protocol='smtp', plugins=''):
        for attempt in range(5):
            self.port = free_port()
            text = ('[main]\nincomingport=%s:127.0.0.1:%d\noutgoinghost=127.0.0.1\n'
                    'outgoingport=%d\nplugins=%s\nprependers=\nappenders=\ncontrolport=\n%s\n'
                    '[performance]\nminthreads=2\nmaxthreads=10\n%s\n'
                    % (protocol, self.port, downstream_port, plugins, extra_main, extra))
            self.config = make_config(text)
            self.controller = fuglu.MainController(self.config)
            try:
                self.controller.startup()
                return
            except OSError as error:
                # the free port was taken meanwhile (tests run in parallel): another one
                self.controller.shutdown()
                if 'in use' not in str(error) or attempt == 4:
                    raise

    def idle(self, timeout=20):
        """Wait until no connection is being served (every worker idle, no SMTP session
        open): on the backend's condition, notified whenever a task ends. True when
        so within ``timeout``."""
        backend = self.controller.backend
        with backend.lock:
            return backend.all_idle.wait_for(
                lambda: 'processing' not in backend.workers.values() and
                not self.controller.smtp_sessions, timeout)

    def stop(self):
        self.controller.shutdown()


def settle(instance, sink, timeout=10):
    """The sync point after which nothing more can reach ``sink``: fuglu serves no
    connection (close or QUIT the clients first), its parked downstream connections are
    closed, and the sink has handled everything it was sent. A delivery, late or not,
    is in sink.messages then."""
    assert instance.idle(timeout), 'fuglu is still serving a connection'
    instance.controller.downstream_pool.purge(everything=True)
    assert sink.idle(timeout), 'the sink still has a connection open'


class RawClient(object):
    """Speaks SMTP byte by byte so tests see fuglu's exact replies."""

    def __init__(self, port, timeout=10):
        self.sock = no_delay(socket.create_connection(('127.0.0.1', port), timeout=timeout))
        self.buffer = b''
        self.banner = self.reply()

    def send(self, data):
        self.sock.sendall(data if isinstance(data, bytes) else data.encode())

    def reply(self):
        """One whole (possibly multi-line) reply as bytes."""
        lines = []
        while True:
            while b'\r\n' not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return b''.join(lines) + self.buffer
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b'\r\n', 1)
            lines.append(line + b'\r\n')
            if len(line) < 4 or line[3:4] != b'-':
                return b''.join(lines)

    def cmd(self, line):
        self.send(line + '\r\n')
        return self.reply()

    def close(self):
        self.sock.close()


def wait_for(predicate, timeout=5.0):
    """Wait until ``predicate()`` (a counter, a log line, a state of the daemon) is true,
    looking every few milliseconds; False when it is not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


class VerdictFromHeaderPlugin(fuglu.ScannerPlugin):
    """Test scanner (load it as `helpers.VerdictFromHeaderPlugin`): a message with the
    header `X-Test-Verdict: ACTION [message template]` gets that verdict. Every
    message it sees is recorded in `seen` as (sender, recipients, tags, source)."""

    seen = []

    def examine(self, suspect):
        VerdictFromHeaderPlugin.seen.append((suspect.from_address, list(suspect.recipients),
                                             dict(suspect.tags),
                                             suspect.get_source()))
        value = suspect.get_header('X-Test-Verdict')
        if not value:
            return fuglu.DUNNO
        action, _, message = value.partition(' ')
        return fuglu.string_to_actioncode(action), message or None
