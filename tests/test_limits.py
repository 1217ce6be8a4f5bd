"""Time and concurrency limits through the real daemon: a downstream that goes quiet,
a message that once made a worker spin, sessions past max_session_time and clients
over max_sessions_per_client. Every wait is on a reply, EOF or a counter, bounded."""

import select
import socket
import threading
import time

import pytest

from helpers import (InProcessFuglu, RawClient, Sink, fuglu, no_delay, stop_listening,
                     stopped_at_teardown, wait_for)
from test_hostile_input import strict_log  # noqa: F401 (a fixture)
from test_milter import MilterClient
from test_smtp import MESSAGE, stuff
from test_smtp import sink  # noqa: F401 (a fixture)


class QuietServer(object):
    """A downstream that accepts and then says only ``script`` (lines sent after each
    line it reads, the first one at once) and nothing more, holding the connection."""

    def __init__(self, script=()):
        self.script = list(script)
        self.listener = socket.socket()
        self.listener.bind(('127.0.0.1', 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.connections = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(sock)
            threading.Thread(target=self.talk, args=(sock,), daemon=True).start()

    def talk(self, sock):
        try:
            reader = sock.makefile('rb')
            for index, line in enumerate(self.script):
                if index:
                    reader.readline()
                sock.sendall(line.encode() + b'\r\n')
            while reader.readline():
                pass
        except OSError:
            pass

    def stop(self):
        stop_listening(self.listener)
        for sock in self.connections:
            sock.close()


@pytest.fixture
def quiet_server():
    yield from stopped_at_teardown(QuietServer)


@pytest.fixture
def make_fuglu():
    def create(downstream_port, protocol='smtp', extra_main='', performance='', extra=''):
        return InProcessFuglu(downstream_port, protocol=protocol, extra_main=extra_main,
                              extra=performance + '\n' + extra)
    yield from stopped_at_teardown(create)


@pytest.fixture
def clients():
    opened = []

    def connect(port, source='127.0.0.1', timeout=10):
        sock = no_delay(socket.socket())
        sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.connect(('127.0.0.1', port))
        client = RawClient.__new__(RawClient)
        client.sock, client.buffer = sock, b''
        client.banner = client.reply()
        opened.append(client)
        return client
    yield connect
    for client in opened:
        client.close()


def start_data(client):
    """EHLO, MAIL, RCPT, DATA: ready for the message."""
    assert client.cmd('EHLO client.example').startswith(b'250')
    assert client.cmd('MAIL FROM:<a@example.org>').startswith(b'250')
    assert client.cmd('RCPT TO:<b@example.org>').startswith(b'250')
    assert client.cmd('DATA').startswith(b'354')


def send_message(client, message=MESSAGE):
    start_data(client)
    client.send(stuff(message))
    return client.reply()


# -- the CHUNKING spin ------------------------------------------------------------------

@pytest.mark.parametrize('headers', ['1', '0'], ids=['with fuglu headers', 'nothing at all'])
def test_empty_message_to_a_chunking_downstream_is_delivered(make_fuglu, clients, headers):
    downstream = Sink(extensions=('PIPELINING', 'SIZE 10240000', '8BITMIME', 'CHUNKING'))
    try:
        instance = make_fuglu(downstream.port, extra_main='suspectidheader=%s\nspamstatusheader=%s'
                              % (headers, headers))
        client = clients(instance.port)
        start_data(client)
        client.send(b'.\r\n')
        assert client.reply().startswith(b'250'), 'answered, not spinning'
        assert wait_for(lambda: downstream.messages)
        assert any(command.startswith('BDAT') for command in downstream.commands)
        if headers == '0':
            assert downstream.messages[0]['data'] == b''
        client.close()
        assert instance.idle(), 'the worker is free again, no session left'

    finally:
        downstream.stop()


# -- a downstream that goes quiet -----------------------------------------------------------

def test_downstream_that_never_greets_gets_the_client_a_451_in_time(quiet_server, make_fuglu,
                                                                    clients):
    quiet = quiet_server()
    instance = make_fuglu(quiet.port, extra_main='downstream_reply_timeout=0.2\n'
                                                    'outgoingretry=0')
    client = clients(instance.port)
    assert client.cmd('EHLO client.example').startswith(b'250')
    started = time.monotonic()
    reply = client.cmd('MAIL FROM:<a@example.org>')
    assert reply.startswith(b'451 4.4.2 '), reply
    assert time.monotonic() - started < 5, 'bounded by downstream_reply_timeout, not smtptimeout'
    assert quiet.connections


def test_downstream_quiet_after_the_data_gets_a_451(make_fuglu, clients):
    quiet = QuietServer(['220 quiet', '250 quiet', '250 ok', '250 ok', '354 go'])
    try:
        instance = make_fuglu(quiet.port, extra_main='downstream_data_timeout=0.2')
        client = clients(instance.port)
        start_data(client)
        client.send(stuff(MESSAGE))
        assert client.reply().startswith(b'451 4.4.2 ')
    finally:
        quiet.stop()


def test_downstream_that_never_accepts_the_connection_gets_a_451(make_fuglu, clients):
    # a listener whose accept queue is full: Linux drops further SYNs, connect() hangs
    listener = socket.socket()
    listener.bind(('127.0.0.1', 0))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
            fillers.append(filler)
        instance = make_fuglu(listener.getsockname()[1],
                              extra_main='downstream_connect_timeout=0.2\noutgoingretry=0')
        client = clients(instance.port)
        assert client.cmd('EHLO client.example').startswith(b'250')
        started = time.monotonic()
        reply = client.cmd('MAIL FROM:<a@example.org>')
        assert reply.startswith(b'451 4.4.'), reply
        assert time.monotonic() - started < 8
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_esmtp_greeting_and_ehlo_together_fit_downstream_timeout(make_fuglu, clients):
    quiet = QuietServer(['220 quiet'])   # greets, never answers EHLO
    try:
        instance = make_fuglu(quiet.port, protocol='esmtp',
                              extra='[esmtpconnector]\ndownstream_timeout=0.3')
        client = clients(instance.port)
        started = time.monotonic()
        reply = client.cmd('EHLO client.example')
        assert reply.startswith(b'421 4.4.2 '), reply
        assert time.monotonic() - started < 8
    finally:
        quiet.stop()


# -- max_session_time -----------------------------------------------------------------------

def trickle_until_closed(sock, data, limit=500):
    """Send ``data`` a byte at a time, each after waiting up to 0.02 s for fuglu to say
    something; returns what fuglu said before closing (or b'' after ``limit`` bytes, 10 s
    and more: fuglu never closed)."""
    received = b''
    for index in range(limit):
        readable, _, _ = select.select([sock], [], [], 0.02)
        if readable:
            chunk = sock.recv(65536)
            if not chunk:
                return received
            received += chunk
            continue
        try:
            sock.send(data[index % len(data):index % len(data) + 1])
        except OSError:
            return received
    return b''


@pytest.mark.parametrize('protocol', ['smtp', 'esmtp'])
def test_a_trickling_smtp_client_gets_421_at_max_session_time(sink, make_fuglu, clients, strict_log,
                                                              protocol):
    instance = make_fuglu(sink.port, protocol=protocol, extra_main='max_session_time=0.5')
    client = clients(instance.port)
    said = trickle_until_closed(client.sock, b'NOOP\r\n')
    assert said.endswith(b'421 4.4.2 Error: timeout exceeded (session time limit)\r\n'), said
    assert b'250 2.0.0 Ok' in said, 'commands were answered until then'
    assert wait_for(lambda: 'longer than max_session_time' in strict_log.text())


def test_a_session_past_its_time_in_data_is_not_delivered(sink, make_fuglu, clients):
    instance = make_fuglu(sink.port, extra_main='max_session_time=0.5')
    client = clients(instance.port)
    start_data(client)
    said = trickle_until_closed(client.sock, b'Subject: slow\r\n')
    assert said.startswith(b'421 4.4.2 '), said
    assert sink.messages == []


def test_a_trickling_netcat_client_gets_defer(make_fuglu):
    instance = make_fuglu(1, protocol='netcat', extra_main='max_session_time=0.3')
    sock = socket.create_connection(('127.0.0.1', instance.port), timeout=10)
    try:
        said = trickle_until_closed(sock, b'Subject: x\r\n')
        assert said.startswith(fuglu.NETCAT_BANNER)
        assert said.endswith(b'DEFER:timeout exceeded (session time limit)'), said
    finally:
        sock.close()


def test_a_milter_connection_past_its_time_is_closed(make_fuglu, strict_log):
    instance = make_fuglu(1, protocol='milter', extra_main='max_session_time=0.3')
    client = MilterClient(instance.port).start()
    try:
        macro = fuglu.milter_packet(fuglu.SMFIC_MACRO,
                                    fuglu.SMFIC_MAIL + fuglu.milter_strings('i', 'Q1'))
        assert trickle_until_closed(client.sock, macro) == b''
        assert wait_for(lambda: 'longer than max_session_time' in strict_log.text())
    finally:
        client.close()


# -- max_sessions_per_client ---------------------------------------------------------------

def test_forty_trickling_connections_do_not_block_other_clients(sink, make_fuglu, clients,
                                                                strict_log):
    # maxthreads 10, so by default one address may hold 5 connections
    instance = make_fuglu(sink.port)
    trickling, refused = [], 0
    for _ in range(40):
        client = clients(instance.port)
        if client.banner.startswith(b'220'):
            trickling.append(client)
            client.send(b'NO')   # a command that never ends
        else:
            assert (client.banner
                    == b'421 4.7.0 Error: too many connections from your address, try again '
                       b'later\r\n')
            refused += 1
    assert (len(trickling), refused) == (5, 35)
    other = clients(instance.port, source='127.0.0.2')
    assert other.banner.startswith(b'220')
    assert send_message(other).startswith(b'250')
    assert wait_for(lambda: len(sink.messages) == 1)
    assert wait_for(lambda: 'connection from 127.0.0.1 refused: 5 open, '
                            'max_sessions_per_client is 5'
                    in strict_log.text())
    for client in trickling:
        client.send(b'OP\r\n')
        assert client.reply().startswith(b'250')
        client.close()
    assert wait_for(lambda: instance.controller.client_sessions.open.get('127.0.0.1', 0) == 0)
    again = clients(instance.port)
    assert again.banner.startswith(b'220'), 'the slots are free again'


def test_over_the_cap_netcat_gets_defer_and_milter_is_closed(make_fuglu):
    for protocol, expected in (('netcat', fuglu.NETCAT_BANNER + b'DEFER:too many connections'),
                               ('milter', b'')):
        instance = make_fuglu(1, protocol=protocol, performance='max_sessions_per_client=1')
        holder = socket.create_connection(('127.0.0.1', instance.port), timeout=10)
        try:
            if protocol == 'netcat':
                assert holder.recv(len(fuglu.NETCAT_BANNER)) == fuglu.NETCAT_BANNER
            else:
                sessions = instance.controller.client_sessions
                assert wait_for(lambda: sessions.open.get('127.0.0.1') == 1)
            with socket.create_connection(('127.0.0.1', instance.port), timeout=10) as second:
                said = fuglu.read_until_eof(second)[0]
            assert said.startswith(expected), said
        finally:
            holder.close()


def test_cap_zero_means_no_limit(sink, make_fuglu, clients):
    instance = make_fuglu(sink.port, performance='max_sessions_per_client=0')
    opened = [clients(instance.port) for _ in range(10)]
    assert all(client.banner.startswith(b'220') for client in opened)


# -- rule files ------------------------------------------------------------------------------

class RuleBlocker(fuglu.ScannerPlugin):
    """Test scanner: REJECT when its rule file ([RuleBlocker] filterfile) matches."""

    requiredvars = {'filterfile': {'default': '', 'description': 'rule file'}}

    def examine(self, suspect):
        rules = fuglu.SuspectFilter(self.config.get(self.section, 'filterfile'))
        matched, argument = rules.matches(suspect)
        return (fuglu.REJECT, argument) if matched else fuglu.DUNNO


def test_a_rule_out_of_time_defers_the_message(sink, make_fuglu, clients, tmp_path, monkeypatch,
                                               strict_log):
    monkeypatch.setattr(fuglu.SuspectFilter, 'MATCH_TIME_LIMIT', 0.2)
    rules = tmp_path / 'block.regex'
    rules.write_text('body .*forbidden-word blocked\n')
    instance = make_fuglu(sink.port, extra='[RuleBlocker]\nfilterfile=%s' % rules)
    instance.controller.plugins = [RuleBlocker(instance.config)]
    client = clients(instance.port)
    reply = send_message(client, b'Subject: long\r\n\r\n' + b'a ' * 200000 + b'\r\n')
    assert reply.startswith(b'451 4.7.1 '), reply
    assert sink.messages == []
    assert 'the message is a problem, not a non-match' in strict_log.text()
    reply = send_message(client, b'Subject: short\r\n\r\nforbidden-word\r\n')
    assert reply.startswith(b'550 5.7.1 blocked')
    assert send_message(client, b'Subject: short\r\n\r\nfine\r\n').startswith(b'250')


def test_a_silent_netcat_client_gets_defer_at_max_session_time(make_fuglu):
    instance = make_fuglu(1, protocol='netcat', extra_main='max_session_time=0.3')
    with socket.create_connection(('127.0.0.1', instance.port), timeout=10) as sock:
        sock.sendall(b'Subject: half a message\r\n')
        said = fuglu.read_until_eof(sock)[0]
    assert said == fuglu.NETCAT_BANNER + b'DEFER:timeout exceeded (session time limit)'


def test_a_silent_smtp_client_gets_421_at_max_session_time(sink, make_fuglu, clients):
    instance = make_fuglu(sink.port, extra_main='max_session_time=0.3')
    client = clients(instance.port)
    assert client.reply() == b'421 4.4.2 Error: timeout exceeded (session time limit)\r\n'
