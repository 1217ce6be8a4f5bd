"""Big messages in spool files (issue 14): the DATA reader against a reference, the spool
file's life (0600 in tempdir, removed when the message is done and on every error path,
stale ones removed at start-up while other processes' live ones stay), a spooled Suspect
answering like one in memory, re-injection, clamd, spamd, the attachment walker and the
milter working from the file, and the allocator settings."""

import os
import random
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from helpers import InProcessFuglu, RawClient, Sink, fuglu, stopped_at_teardown, wait_for
from test_smtp import split_added_headers, stuff, transaction

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from fuglu_plugins.attachment import walk_message  # noqa: E402


# -- helpers -----------------------------------------------------------------------------

def spool_files(directory):
    return sorted(name for name in os.listdir(str(directory)) if name.startswith('fuglu-spool-'))


def random_message(rng, lines=2000, controls=True):
    """A message as a client has it (CRLF lines): dot lines, lone dots, 8-bit bytes,
    empty lines, and (``controls``) bare CR and LF inside lines."""
    out = [b'Subject: spool test %d' % rng.randint(0, 10 ** 6), b'']
    alphabet = b'..ab \r\n\t\xff\x00x' if controls else b'..ab \t\xffx'
    for _ in range(lines):
        kind = rng.random()
        if kind < 0.1:
            out.append(b'.')
        elif kind < 0.2:
            out.append(b'..' + bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 20))))
        else:
            line = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 120)))
            out.append(line.replace(b'\r\n', b'\r_'))   # no CRLF inside a line
    return b'\r\n'.join(out) + b'\r\n'


def send_in_pieces(sock, data, rng):
    position = 0
    while position < len(data):
        size = rng.choice((1, 2, 3, 7, 100, 4096, 65536, 300000))
        sock.sendall(data[position:position + size])
        position += size


def read_over_socketpair(payload, rng, writer, max_size=0, line_limit=0):
    """read_data of ``payload`` sent in random pieces, then the next command line."""
    ours, theirs = socket.socketpair()
    try:
        sender = threading.Thread(target=send_in_pieces, args=(theirs, payload + b'NEXT\r\n', rng))
        sender.start()
        reader = fuglu.SocketReader(ours, idle=10)
        result = reader.read_data(max_size, line_limit, writer)
        next_line = reader.readline(100)
        sender.join()
        return result, next_line
    finally:
        ours.close()
        theirs.close()


def content_of(message):
    if isinstance(message, fuglu.MessageSpool):
        return message.read()
    return message


# -- the DATA reader ---------------------------------------------------------------------

@pytest.mark.parametrize('threshold', [0, 1, 5000, 10 ** 9])
def test_read_data_returns_the_message_the_client_stuffed(tmp_path, threshold):
    rng = random.Random(14 + threshold)
    for _ in range(6):
        message = random_message(rng, lines=rng.choice((0, 1, 50, 5000)))
        writer = fuglu.MessageWriter(threshold, str(tmp_path))
        (data, problem), next_line = read_over_socketpair(stuff(message), rng, writer)
        assert problem is None and next_line == b'NEXT\r\n'
        spooled = isinstance(data, fuglu.MessageSpool)
        assert spooled == bool(threshold and len(message) > threshold)
        assert content_of(data) == message
        if spooled:
            assert data.has_dot_lines == (message.startswith(b'.') or b'\n.' in message)
            data.remove()
    assert spool_files(tmp_path) == []


def test_empty_message_and_terminator_split_over_reads(tmp_path):
    rng = random.Random(1)
    (data, problem), next_line = read_over_socketpair(b'.\r\n', rng, fuglu.MessageWriter())
    assert (data, problem, next_line) == (b'', None, b'NEXT\r\n')
    # CRLF.CRLF arriving byte by byte after a block boundary
    message = b'x' * (fuglu.DATA_BLOCK_SIZE + 10) + b'\r\n'
    (data, problem), _ = read_over_socketpair(message + b'.\r\n', random.Random(2),
                                              fuglu.MessageWriter(1000, str(tmp_path)))
    assert problem is None and data.read() == message
    data.remove()


@pytest.mark.parametrize('threshold', [0, 100])
def test_limits_discard_what_was_written_and_read_on_to_the_end(tmp_path, threshold):
    rng = random.Random(3)
    big = b'y' * 70 + b'\r\n'
    for payload, max_size, line_limit, expected in (
            (big * 5000, 100000, 0, 'size'),                          # found while reading
            (big * 1400, 100000, 0, 'size'),                          # found at the end
            (big * 5000 + b'z' * 2000 + b'\r\n', 0, 1000, 'line'),    # an open line
            (big * 10 + b'z' * 2000 + b'\r\n' + big, 0, 1000, 'line')):
        writer = fuglu.MessageWriter(threshold, str(tmp_path))
        (data, problem), next_line = read_over_socketpair(payload + b'.\r\n', rng, writer,
                                                          max_size, line_limit)
        assert (data, problem, next_line) == (None, expected, b'NEXT\r\n')
        assert spool_files(tmp_path) == []


def test_peer_leaving_mid_data_leaves_no_spool_file(tmp_path):
    ours, theirs = socket.socketpair()
    theirs.sendall(b'z' * 50000 + b'\r\n' * 10)
    theirs.close()
    reader = fuglu.SocketReader(ours, idle=10)
    with pytest.raises(fuglu.ConnectionClosed):
        reader.read_data(0, 0, fuglu.MessageWriter(1000, str(tmp_path)))
    ours.close()
    assert spool_files(tmp_path) == []


def test_writer_keeps_a_message_of_exactly_the_threshold_in_memory(tmp_path):
    writer = fuglu.MessageWriter(10, str(tmp_path))
    writer.write(b'12345')
    writer.write(b'67890')
    assert writer.finish() == b'1234567890'
    writer = fuglu.MessageWriter(10, str(tmp_path))
    writer.write(b'12345')
    writer.write(b'678901')
    spool = writer.finish()
    assert isinstance(spool, fuglu.MessageSpool) and spool.read() == b'12345678901'
    info = os.stat(spool.path)
    assert stat.S_IMODE(info.st_mode) == 0o600 and os.path.dirname(spool.path) == str(tmp_path)
    spool.remove()
    assert spool_files(tmp_path) == []


def test_forgotten_spool_is_removed_by_the_garbage_collector(tmp_path):
    writer = fuglu.MessageWriter(1, str(tmp_path))
    writer.write(b'a forgotten message')
    assert len(spool_files(tmp_path)) == 1
    del writer
    assert spool_files(tmp_path) == []


def test_world_writable_tempdir_gets_a_private_spool_directory(tmp_path):
    shared = tmp_path / 'shared'
    shared.mkdir()
    os.chmod(str(shared), 0o1777)
    spool = fuglu.MessageSpool(str(shared))
    try:
        directory = os.path.dirname(spool.path)
        assert directory == os.path.join(str(shared), 'fuglu-%s' % fuglu.current_user_name(),
                                         'spool')
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    finally:
        spool.remove()


# -- sending from a spool ---------------------------------------------------------------

def wire_bytes(parts):
    ours, theirs = socket.socketpair()
    received = []
    reader = threading.Thread(target=lambda: received.append(fuglu.read_until_eof(theirs)[0]))
    reader.start()
    fuglu.send_parts(ours, parts)
    ours.shutdown(socket.SHUT_WR)
    reader.join()
    ours.close()
    theirs.close()
    return received[0]


def test_stuffing_from_a_spool_file_equals_stuffing_the_joined_bytes(tmp_path):
    rng = random.Random(5)
    for _ in range(8):
        message = random_message(rng, lines=rng.choice((3, 3000, 20000)))
        head = rng.choice((b'', b'X-Added: 1\r\n', b'X-Open: no line end'))
        cut = rng.randint(0, len(message))
        writer = fuglu.MessageWriter(1, str(tmp_path))
        writer.write(message[cut:])
        spool = writer.finish()
        parts = [head, message[:cut], spool.section()]
        joined = head + message
        expected = (b'\r\n' + joined).replace(b'\n.', b'\n..')[2:]
        if not expected.endswith(b'\r\n'):
            expected += b'\r\n'
        assert wire_bytes(fuglu.dot_stuff_parts(parts)) == expected + b'.\r\n'
        assert wire_bytes(fuglu.dot_stuff_parts([joined])) == expected + b'.\r\n'
        spool.remove()


# -- the Suspect of a spooled message ----------------------------------------------------

MESSAGE = (b'Received: from a (a [192.0.2.1]) by b\r\nSubject: original\r\nX-Drop: 1\r\n'
           b'From: <sender@example.org>\r\n\r\n' + b'.body line\r\nplain line\r\n' * 5000)


def spooled_suspect(tmp_path, message=MESSAGE):
    writer = fuglu.MessageWriter(1, str(tmp_path))
    writer.write(message)
    return fuglu.Suspect('sender@example.org', ['rcpt@example.net'], inbuffer=writer.finish())


def test_spooled_suspect_answers_like_one_in_memory(tmp_path):
    spooled = spooled_suspect(tmp_path)
    memory = fuglu.Suspect('sender@example.org', ['rcpt@example.net'], inbuffer=MESSAGE)
    assert spooled.is_spooled() and not memory.is_spooled()
    assert spooled.tempfile == os.path.join(str(tmp_path), spool_files(tmp_path)[0])
    for suspect in (spooled, memory):
        suspect.add_header('X-Immediate', 'yes', immediate=True)
        suspect.set_header('Subject', 'changed')
        suspect.remove_headers('X-Drop')
        suspect.add_header('X-Later', 'at delivery')
    assert spooled.is_spooled()                      # the body stayed in the file
    for method in ('get_source', 'get_original_source', 'get_output_source', 'get_headers'):
        assert getattr(spooled, method)() == getattr(memory, method)(), method
    assert spooled.get_source(100) == memory.get_source(100)
    assert spooled.size == memory.size
    assert spooled.get_header('subject') == 'changed'
    assert spooled.get_client_info() == memory.get_client_info()
    assert spooled.get_message_rep()['subject'] == 'changed'
    with open(spooled.tempfile, 'rb') as handle:
        assert handle.read() == MESSAGE              # suspect.tempfile: the original
    path = spooled.tempfile
    spooled.cleanup()
    assert not os.path.exists(path) and spool_files(tmp_path) == []


def test_set_source_takes_the_message_out_of_the_file(tmp_path):
    suspect = spooled_suspect(tmp_path)
    suspect.set_source(b'Subject: new\r\n\r\nnew\r\n')
    assert not suspect.is_spooled() and suspect.get_source() == b'Subject: new\r\n\r\nnew\r\n'
    assert suspect.get_original_source() == MESSAGE
    suspect.tags['reinjectoriginal'] = True
    assert suspect.get_output_source() == MESSAGE
    suspect.cleanup()
    assert spool_files(tmp_path) == []


def test_tempfile_of_a_message_in_memory_is_a_spool_file(tmp_path):
    suspect = fuglu.Suspect('sender@example.org', ['rcpt@example.net'], inbuffer=MESSAGE)
    suspect.tempdir = str(tmp_path)
    path = suspect.tempfile
    assert spool_files(tmp_path) == [os.path.basename(path)]
    with open(path, 'rb') as handle:
        assert handle.read() == MESSAGE
    suspect.cleanup()
    assert spool_files(tmp_path) == []


def test_attachment_walk_of_the_map_equals_the_walk_of_the_bytes(tmp_path):
    import test_attachment
    source = test_attachment.big_mail()
    suspect = spooled_suspect(tmp_path, source)
    from_map = walk_message(suspect.source_buffer())
    from_bytes = walk_message(source)
    assert [(p.start, p.end, p.names, p.content_type) for p in from_map] == \
        [(p.start, p.end, p.names, p.content_type) for p in from_bytes]
    assert all(bytes(a.raw()) == bytes(b.raw()) for a, b in zip(from_map, from_bytes))
    del from_map
    suspect.cleanup()
    assert spool_files(tmp_path) == []


def test_attachment_plugin_blocks_in_a_spooled_message_too(tmp_path):
    import test_attachment
    plugin = test_attachment.make_plugin(os.path.join(test_attachment.REPO_DIR, 'conf'),
                                         sendbounce='False')
    source = test_attachment.mail(('setup.exe', b'MZ' + b'\0' * 5000, 'application/octet-stream'))
    memory_result = plugin.examine(fuglu.Suspect('sender@example.org', ['rcpt@example.net'],
                                                  source))
    suspect = spooled_suspect(tmp_path, source)
    assert plugin.examine(suspect) == memory_result
    assert fuglu.actioncode_to_string(memory_result[0] if isinstance(memory_result, tuple)
                                      else memory_result) != 'DUNNO'
    suspect.cleanup()


# -- through the smtp connector ----------------------------------------------------------

class Recorder(fuglu.ScannerPlugin):
    def __init__(self, config, section=None):
        super().__init__(config, section)
        self.seen = []
        self.action = fuglu.DUNNO
        self.fail = False

    def examine(self, suspect):
        info = os.stat(suspect.tempfile)
        self.seen.append({'spooled': suspect.is_spooled(), 'tempfile': suspect.tempfile,
                          'mode': stat.S_IMODE(info.st_mode), 'source': suspect.get_source()})
        suspect.add_header('X-Scanned', 'spooled' if suspect.is_spooled() else 'memory',
                           immediate=True)
        if self.fail:
            raise RuntimeError('plugin failure')
        return self.action


@pytest.fixture
def spooling_fuglu(tmp_path):
    sinks = []

    def create(threshold=4096, extra_main='', chunking=False):
        sink = Sink(extensions=('PIPELINING', 'SIZE 10240000', '8BITMIME', 'SMTPUTF8') +
                    (('CHUNKING',) if chunking else ()))
        sinks.append(sink)
        instance = InProcessFuglu(sink.port, extra_main='tempdir=%s\nspool_threshold=%d\n%s'
                                  % (tmp_path, threshold, extra_main))
        instance.sink = sink
        instance.plugin = Recorder(instance.config)
        instance.controller.plugins = [instance.plugin]
        return instance
    yield from stopped_at_teardown(create)
    for sink in sinks:
        sink.stop()


@pytest.mark.parametrize('chunking', [False, True])
def test_big_message_is_delivered_byte_exact_from_its_spool_file(spooling_fuglu, tmp_path,
                                                                 chunking):
    instance = spooling_fuglu(chunking=chunking)
    message = random_message(random.Random(7), lines=6000, controls=False)
    client = RawClient(instance.port)
    client.cmd('EHLO client.example')
    assert transaction(client, message).startswith(b'250 ')
    assert wait_for(lambda: instance.sink.messages)
    added, delivered = split_added_headers(instance.sink.messages[0]['data'])
    assert delivered == b'X-Scanned: spooled\r\n' + message
    assert ('chunks' in instance.sink.messages[0]) == chunking   # BDAT, else DATA
    seen = instance.plugin.seen[0]
    assert seen['spooled'] and seen['mode'] == 0o600 and seen['source'] == message
    assert os.path.dirname(seen['tempfile']) == str(tmp_path)
    assert wait_for(lambda: spool_files(tmp_path) == [])
    # a small one stays in memory
    assert transaction(client, b'Subject: small\r\n\r\nsmall\r\n').startswith(b'250 ')
    assert wait_for(lambda: len(instance.plugin.seen) == 2)
    assert not instance.plugin.seen[1]['spooled']
    client.close()


def test_before_queue_proxy_sends_a_spooled_message_on(tmp_path):
    sink = Sink()
    proxy = InProcessFuglu(sink.port, protocol='esmtp',
                           extra_main='tempdir=%s\nspool_threshold=4096\n' % tmp_path)
    try:
        message = random_message(random.Random(8), lines=3000, controls=False)
        client = RawClient(proxy.port)
        client.cmd('EHLO client.example')
        assert transaction(client, message).startswith(b'250 ')
        assert wait_for(lambda: sink.messages)
        assert split_added_headers(sink.messages[0]['data'])[1] == message
        assert wait_for(lambda: spool_files(tmp_path) == [])
        client.close()
    finally:
        proxy.stop()
        sink.stop()


@pytest.mark.parametrize('case', ['reject', 'plugin error', 'internal error',
                                  'downstream refuses', 'too big', 'client leaves'])
def test_spool_file_is_removed_on_every_error_path(spooling_fuglu, tmp_path, case, monkeypatch):
    instance = spooling_fuglu(extra_main='smtp_max_message_size=1000000\n')
    message = b'Subject: big\r\n\r\n' + b'line of the message\r\n' * 5000   # 105 KB
    if case == 'reject':
        instance.plugin.action = fuglu.REJECT
    elif case == 'plugin error':        # logged, the message is deferred
        instance.plugin.fail = True
    elif case == 'internal error':      # the session defers
        def broken(session, suspect):
            raise RuntimeError('internal error')
        monkeypatch.setattr(fuglu.ScanSession, 'add_headers', broken)
    elif case == 'downstream refuses':
        instance.sink.replies['DATA'] = '554 5.7.1 no thanks'
    client = RawClient(instance.port)
    client.cmd('EHLO client.example')
    if case == 'too big':
        reply = transaction(client, message * 12)
        assert reply.startswith(b'552 '), reply
    elif case == 'client leaves':
        client.cmd('MAIL FROM:<a@example.org>')
        client.cmd('RCPT TO:<b@example.com>')
        assert client.cmd('DATA').startswith(b'354')
        client.send(message * 6)   # over a block: part of it is in the file
        assert wait_for(lambda: len(spool_files(tmp_path)) == 1)
        client.close()
    else:
        reply = transaction(client, message)
        assert reply[:1] == (b'4' if case in ('plugin error', 'internal error') else b'5'), reply
    assert wait_for(lambda: spool_files(tmp_path) == [])
    if case != 'client leaves':
        assert client.cmd('NOOP').startswith(b'250')
        client.close()


def test_spool_that_cannot_be_written_is_a_temporary_failure(spooling_fuglu, tmp_path):
    instance = spooling_fuglu(extra_main='')
    instance.config.set('main', 'tempdir', str(tmp_path / 'missing'))
    client = RawClient(instance.port)
    client.cmd('EHLO client.example')
    reply = transaction(client, b'Subject: big\r\n\r\n' + b'x' * 70 + b'\r\n' * 100 +
                        b'y' * 8000 + b'\r\n')
    assert reply.startswith(b'451 4.3.0'), reply
    instance.controller.plugins = []   # (its plugin asks for a temp file)
    reply = transaction(client, b'Subject: small\r\n\r\nsmall\r\n')   # the session goes on
    assert reply.startswith(b'250 '), reply
    client.close()


# -- stale files at start-up -------------------------------------------------------------

HOLDER = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    import fuglu
    spool = fuglu.MessageSpool(sys.argv[2])
    spool.write(b'message of pid %d' % os.getpid())
    print(spool.path, flush=True)
    if sys.argv[3] == 'die':
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.read()      # holds the file (and its lock) until the test closes stdin
    spool.remove()
''')


def holder(tmp_path, how):
    process = subprocess.Popen([sys.executable, '-c', HOLDER, os.path.dirname(fuglu.__file__),
                                str(tmp_path), how], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE)
    path = process.stdout.readline().decode().strip()
    return process, path


def test_stale_spool_files_are_removed_at_start_and_live_ones_stay(tmp_path):
    dead, dead_path = holder(tmp_path, 'die')
    dead.wait()
    live, live_path = holder(tmp_path, 'hold')
    try:
        young_empty = tmp_path / 'fuglu-spool-young'
        young_empty.write_bytes(b'')          # maybe being created right now: stays
        old_empty = tmp_path / 'fuglu-spool-old'
        old_empty.write_bytes(b'')
        long_ago = time.time() - 2 * fuglu.SPOOL_STALE_EMPTY_SECONDS
        os.utime(str(old_empty), (long_ago, long_ago))
        other = tmp_path / 'not-ours.eml'
        other.write_bytes(b'x')
        assert os.path.exists(dead_path)      # kill -9 left it
        instance = InProcessFuglu(1, extra_main='tempdir=%s\n' % tmp_path)
        instance.stop()
        assert spool_files(tmp_path) == sorted([os.path.basename(live_path), 'fuglu-spool-young'])
        assert other.exists()
    finally:
        live.communicate(b'')
    assert not os.path.exists(live_path)


# -- scanners from the file --------------------------------------------------------------

def test_clamd_gets_the_same_stream_from_a_spool_file(tmp_path):
    import test_clamav
    server = test_clamav.FakeClamd(test_clamav.reply_with(b'stream: OK\0'))
    try:
        plugin = test_clamav.make_plugin(server.address)
        memory = fuglu.Suspect('sender@example.org', ['rcpt@example.net'], inbuffer=MESSAGE)
        spooled = spooled_suspect(tmp_path)
        spooled.add_header('X-Immediate', 'yes', immediate=True)
        memory.add_header('X-Immediate', 'yes', immediate=True)
        assert plugin.examine(memory) == plugin.examine(spooled) == fuglu.DUNNO
        assert server.payloads[0] == server.payloads[1]
        assert server.payloads[1] == b'Return-Path: <sender@example.org>\r\n' + memory.get_source()
        assert max(server.chunk_sizes[1]) <= 20480
        spooled.cleanup()
    finally:
        server.close()


def test_spamd_gets_the_same_request_from_a_spool_file(tmp_path):
    import test_spamassassin
    server = test_spamassassin.FakeSpamd(test_spamassassin.processing_spamd(1.0))
    try:
        plugin = test_spamassassin.make_plugin(server.address, maxsize='1000000')
        memory = fuglu.Suspect('sender@example.org', ['rcpt@example.net'], inbuffer=MESSAGE)
        spooled = spooled_suspect(tmp_path)
        for suspect in (memory, spooled):
            suspect.tags['incomingport'] = 10025
            plugin.examine(suspect)
        first, second = server.requests
        assert first.body.replace(memory.id.encode(), b'ID') == \
            second.body.replace(spooled.id.encode(), b'ID')
        assert first.headers['content-length'] == second.headers['content-length']
        assert spooled.get_source() == memory.get_source()
        spooled.cleanup()
    finally:
        server.close()


# -- the milter --------------------------------------------------------------------------

def test_milter_spools_a_big_body_and_removes_the_file(tmp_path):
    import test_milter
    test_milter.ChangingPlugin.seen = []
    instance = InProcessFuglu(1, protocol='milter', plugins='test_milter.ChangingPlugin',
                              extra_main='tempdir=%s\nspool_threshold=10000\n' % tmp_path,
                              extra='[milter]\nmilter_mode=auto\n')
    try:
        client = test_milter.MilterClient(instance.port).start()
        body = b'.milter body line\r\n' * 20000
        packets = client.message(body=body)
        assert packets[-1] == (b'c', b'')
        assert test_milter.ChangingPlugin.seen[-1]['source'] == \
            b'From: sender@example.org\r\nSubject: test\r\n\r\n' + body
        assert wait_for(lambda: spool_files(tmp_path) == [])
        # aborted in the middle of the body: the file goes with the message
        client.macro(fuglu.SMFIC_MAIL, i='4ABORT')
        client.event(fuglu.SMFIC_MAIL, fuglu.milter_strings('<a@example.org>'))
        client.event(fuglu.SMFIC_RCPT, fuglu.milter_strings('<b@example.net>'))
        client.event(fuglu.SMFIC_EOH)
        client.event(fuglu.SMFIC_BODY, b'x' * 60000)
        assert wait_for(lambda: len(spool_files(tmp_path)) == 1)
        client.send(fuglu.SMFIC_ABORT)
        assert wait_for(lambda: spool_files(tmp_path) == [])
        client.quit()
    finally:
        instance.stop()


def test_milter_defers_a_message_it_cannot_spool(tmp_path):
    import test_milter
    instance = InProcessFuglu(1, protocol='milter', plugins='test_milter.ChangingPlugin',
                              extra_main='tempdir=%s\nspool_threshold=10000\n'
                              % (tmp_path / 'missing'),
                              extra='[milter]\nmilter_mode=auto\n')
    try:
        client = test_milter.MilterClient(instance.port).start()
        packets = client.message(body=b'a body line\r\n' * 5000)
        # every temporary failure of the milter is a 450 (as FuGlu's milter answers)
        assert test_milter.replycode(packets).startswith('450 4.3.0'), packets
        packets = client.message(body=b'a small one\r\n')      # the connection goes on
        assert packets[-1] == (b'c', b'')
        client.quit()
    finally:
        instance.stop()


# -- the allocator -----------------------------------------------------------------------

def allocator_settings(env):
    code = 'import fuglu; print(sorted(fuglu.tune_allocator().items()))'
    result = subprocess.run([sys.executable, '-c', code], env=env, stdout=subprocess.PIPE,
                            cwd=os.path.dirname(fuglu.__file__), check=True)
    return result.stdout.decode().strip()


@pytest.mark.skipif(fuglu.glibc() is None, reason='not a glibc system')
def test_allocator_is_limited_unless_the_admin_set_it():
    env = {key: value for key, value in os.environ.items() if not key.startswith('MALLOC_')}
    assert allocator_settings(env) == "[('MALLOC_ARENA_MAX', 2)]"
    env['MALLOC_ARENA_MAX'] = '4'
    assert allocator_settings(env) == '[]'
