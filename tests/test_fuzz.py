"""Seeded, bounded fuzzing of the four connectors through the real daemon: valid SMTP
dialogues, netcat pipes and milter packet streams, mutated (bytes flipped, nasty
tokens inserted, lines and packets dropped, repeated, swapped, cut short, sent in odd
pieces), each sent on a connection of its own to an in-process fuglu in front of a
sink that counts deliveries. After every case and at the end:

* fuglu closed the connection: no worker stuck on it, every worker idle again;
* nothing was delivered without its 250 (or milter continue, netcat DUNNO) and no
  such reply came without the delivery or scan behind it;
* every reply is well formed;
* no traceback in the log, none recorded by the controller;
* the daemon still serves a clean message.

The short run is part of the unit tests (a fixed seed, so CI is repeatable). A long
run: FUGLU_FUZZ_SEED=<any text> FUGLU_FUZZ_COUNT=<cases per connector>, e.g.

    FUGLU_FUZZ_SEED=$RANDOM FUGLU_FUZZ_COUNT=5000 python3 -m pytest -q tests/test_fuzz.py

A failure names the seed, connector and case number; the same three reproduce it.
"""

import logging
import os
import random
import re
import socket
import sys

import pytest

from helpers import InProcessFuglu, Sink, fuglu, no_delay

# by default each Python version runs cases of its own: more cases across a CI run,
# each one still repeatable
SEED = os.environ.get('FUGLU_FUZZ_SEED', 'ci-%d.%d' % sys.version_info[:2])
COUNT = int(os.environ.get('FUGLU_FUZZ_COUNT', '300'))   # about 2 s in all
CASE_TIMEOUT = 20   # seconds a case may take before fuglu counts as stuck

NASTY = [b'\r', b'\n', b'\0', b'\xff', b'\xc4\xb1', b'\xc2\xb2', b'\xef\xbc\x91', b'\x7f', b'\t',
         b'<', b'>',
         b':', b'=', b' ', b'+', b'%', b'$', b'${id}', b'SIZE=', b'SIZE=\xc2\xb2', b'9' * 30,
         b'\r\n.\r\n',
         b'.\r\n', b'\r\n', b'BDAT 0 LAST\r\n', b'XFORWARD ADDR=+0D+0A\r\n', b'A' * 3000,
         b'MA\xc4\xb1L',
         b'RCPT TO:<x\rz@example.org>\r\n', b'DATA\r\n', b'RSET\r\n', b'\r\n\r\n',
         b'=?utf-8?b?w6Q=?=']

MESSAGE_LINES = [b'Received: from client.example (client.example [192.0.2.7])', b'\tby mx.example',
                 b'From: Alice <alice@example.org>', b'To: bob@example.com',
                 b'Subject: fuzz \xc3\xa4',
                 b'MIME-Version: 1.0', b'Content-Type: text/plain; charset=utf-8', b'', b'Hello,',
                 b'.a dot line', b'..two dots', b'last line']


class CountingScanner(fuglu.ScannerPlugin):
    """Counts the messages scanned; always DUNNO."""

    scanned = 0

    def examine(self, suspect):
        CountingScanner.scanned += 1
        return fuglu.DUNNO


class LogRecords(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def tracebacks(self):
        return [record.getMessage()[:2000] for record in self.records
                if record.exc_info or 'Traceback (most recent call last)' in record.getMessage()]


# -- mutation ----------------------------------------------------------------------------

WORD_RE = re.compile(rb'([ =:<>@.\0]+)')


# what a word (a verb, a keyword, an address part, a value) is replaced with
WORDS = [b'\xc2\xb2', b'\xef\xbc\x91', b'9' * 25, b'9' * 3000, b'', b'\xc4\xb1', b'MA\xc4\xb1L',
         b'a\rb',
         b'a\nb', b'\0', b'\xff', b'${id}', b'<', b'x' * 300, b'+0D+0A', b'\x1b[31m']


def mutate_items(rng, items, nasty, focus=()):
    """Mutate a list of byte strings (lines or packets) in place, up to 4 times (a
    quarter of the cases stay valid, so deliveries happen too); most mutations hit the
    ``focus`` indexes (the envelope) when given."""
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3, 4])):
        kind = rng.randrange(12)
        focus = [index for index in focus if index < len(items)]
        if focus and rng.random() < 0.7:
            index = rng.choice(focus)
        else:
            index = rng.randrange(len(items)) if items else 0
        if not items:
            items.append(rng.choice(nasty))
        elif kind >= 6:                                   # replace a word
            pieces = WORD_RE.split(items[index])
            words = [i for i, piece in enumerate(pieces) if piece and not WORD_RE.match(piece)]
            if words:
                pieces[rng.choice(words)] = rng.choice(WORDS)
            items[index] = b''.join(pieces)
        elif kind == 0:                                   # flip a byte
            item = bytearray(items[index])
            if item:
                item[rng.randrange(len(item))] = rng.randrange(256)
            items[index] = bytes(item)
        elif kind == 1:                                   # insert a nasty token
            item = items[index]
            at = rng.randint(0, len(item))
            items[index] = item[:at] + rng.choice(nasty) + item[at:]
        elif kind == 2:                                   # drop
            del items[index]
        elif kind == 3:                                   # repeat
            items.insert(index, items[index])
        elif kind == 4:                                   # swap
            other = rng.randrange(len(items))
            items[index], items[other] = items[other], items[index]
        elif kind == 5:                                   # cut the rest
            del items[index + 1:]
        elif kind == 6:                                   # cut inside an item
            items[index] = items[index][:rng.randint(0, len(items[index]))]
        else:                                             # a nasty item of its own
            items.insert(index, rng.choice(nasty))
    return items


def send_in_pieces(rng, sock, data):
    position = 0
    while position < len(data):
        size = rng.choice([1, 2, 7, 64, 1000, len(data)])
        try:
            sock.sendall(data[position:position + size])
        except OSError:
            return False   # fuglu closed (too many errors, a limit): fine
        position += size
    return True


def exchange(rng, port, data, first=b''):
    """Connect, (send ``first`` and read nothing yet,) send ``data`` in pieces,
    half-close, read to EOF; returns everything fuglu said. Fails if fuglu does not
    close the connection within CASE_TIMEOUT."""
    sock = no_delay(socket.create_connection(('127.0.0.1', port), timeout=CASE_TIMEOUT))
    received = bytearray()
    try:
        send_in_pieces(rng, sock, first + data)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            except socket.timeout:
                raise AssertionError('fuglu did not close the connection within %ds' % CASE_TIMEOUT)
            if not chunk:
                break
            received += chunk
    finally:
        sock.close()
    return bytes(received)


def settled(instance):
    """No session left and every worker idle (bounded wait): nothing stuck."""
    return instance.idle(CASE_TIMEOUT)


# -- fixtures ----------------------------------------------------------------------------

@pytest.fixture
def log_records():
    handler = LogRecords()
    logger = logging.getLogger('fuglu')
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


@pytest.fixture
def daemon():
    made = []

    def start(protocol, sink=None, extra_main=''):
        instance = InProcessFuglu(sink.port if sink else 9, protocol=protocol,
                                  plugins='test_fuzz.CountingScanner',
                                  extra_main='smtp_max_message_size=200000\n'
                                             'max_session_time=60\n' + extra_main,
                                  extra='max_sessions_per_client=0\n'
                                        '[milter]\nmilter_max_packet_size=70000')
        made.append(instance)
        return instance
    CountingScanner.scanned = 0
    yield start
    for instance in made:
        instance.stop()


def case_label(connector, index, data):
    return 'seed=%r connector=%s case=%d input=%r' % (SEED, connector, index, data[:300])


# -- smtp and esmtp ----------------------------------------------------------------------

REPLY_LINE_RE = re.compile(rb'[2-5][0-9][0-9][ -][^\r\n]*\r\n')


def edgy(rng, normal, chance=0.08):
    """Mostly ``normal``, now and then a word from WORDS (grammar-level fuzzing: the
    mutations alone rarely hit one value of one parameter)."""
    return rng.choice(WORDS) if rng.random() < chance else normal


def smtp_dialogue(rng):
    lines = [b'EHLO ' + edgy(rng, b'client.example')]
    if rng.random() < 0.5:
        lines.append(b'XFORWARD NAME=%s ADDR=%s HELO=client.example PROTO=ESMTP'
                     % (edgy(rng, b'client.example'), edgy(rng, b'192.0.2.7')))
    for transaction in range(rng.choice([1, 1, 2])):
        sender = rng.choice([b'alice@example.org', b'', b'al\xc3\xafce@example.org'])
        params = [b'SIZE=' + edgy(rng, b'300', 0.3), b'BODY=' + edgy(rng, b'8BITMIME'), b'SMTPUTF8',
                  b'ENVID=' + edgy(rng, b'x1')]
        lines.append(b' '.join([edgy(rng, b'MAIL') + b' FROM:<' + edgy(rng, sender) + b'>'] +
                               rng.sample(params, rng.randint(0, len(params)))))
        lines += [b'RCPT TO:<' + edgy(rng, b'bob@example.com') + b'>',
                  b'RCPT TO:<carol@example.net> NOTIFY=%s ORCPT=rfc822;c@x' % edgy(rng, b'NEVER')]
        lines.append(b'DATA')
        message = MESSAGE_LINES if rng.random() > 0.05 else []   # now and then an empty message
        lines += [(b'.' + line) if line.startswith(b'.') else line for line in message]
        lines.append(b'.')
    lines.append(rng.choice([b'QUIT', b'RSET', b'NOOP']))
    return lines


def fuzz_smtp(protocol, daemon, log_records):
    sink = Sink(extensions=('PIPELINING', 'SIZE 10240000', '8BITMIME', 'SMTPUTF8', 'DSN',
                            'CHUNKING',
                            'XFORWARD NAME ADDR PROTO HELO SOURCE PORT IDENT'))
    try:
        instance = daemon(protocol, sink)
        for index in range(COUNT):
            rng = random.Random('%s-%s-%d' % (SEED, protocol, index))
            lines = smtp_dialogue(rng)
            envelope = [i for i, line in enumerate(lines)
                        if line[:4] in (b'EHLO', b'XFOR', b'MAIL', b'RCPT')]
            lines = mutate_items(rng, lines, NASTY, envelope)
            data = b''.join(line + rng.choice([b'\r\n'] * 8 + [b'\n', b'\r']) for line in lines)
            before_deliveries, before_scans = len(sink.messages), CountingScanner.scanned
            said = exchange(rng, instance.port, data)
            label = case_label(protocol, index, data)
            assert settled(instance), 'stuck: ' + label
            assert said.startswith(b'220 ') or said.startswith(b'421 '), label
            assert (REPLY_LINE_RE.sub(b'', said)
                    == b''), 'malformed reply %r: %s' % (said[-300:], label)
            delivered = len(sink.messages) - before_deliveries
            accepted = said.count(b'queued as ABC123DEF')
            assert delivered == accepted, '%d delivered, %d final 250 replies: %s' % (
                delivered, accepted, label)
            assert CountingScanner.scanned - before_scans >= delivered, label
            assert log_records.tracebacks() == [], label
        assert instance.controller.exceptions == []
        # still serving
        rng = random.Random('clean')
        dialogue = smtp_dialogue(random.Random(1))[:1] + [
            b'MAIL FROM:<a@example.org>', b'RCPT TO:<b@example.org>', b'DATA']
        dialogue += MESSAGE_LINES[2:5] + [b'.', b'QUIT', b'']
        said = exchange(rng, instance.port, b'\r\n'.join(dialogue))
        assert b'queued as ABC123DEF' in said, said
    finally:
        sink.stop()


def test_fuzz_smtp_connector(daemon, log_records):
    fuzz_smtp('smtp', daemon, log_records)


def test_fuzz_esmtp_connector(daemon, log_records):
    fuzz_smtp('esmtp', daemon, log_records)


# -- netcat -------------------------------------------------------------------------------

NETCAT_REPLY_RE = re.compile(rb'^(DUNNO|DISCARD|REJECT|DEFER):')


def netcat_input(rng):
    lines = []
    if rng.random() < 0.7:
        lines += [b'X-DATA-PREPEND-START: tok',
                  b'X-ENV-SENDER: <%s>' % edgy(rng, b'alice@example.org'),
                  b'X-ENV-RECIPIENT: ' + edgy(rng, b'bob@example.com'),
                  b'X-ENV-RECIPIENT: <carol@example.net>',
                  b'X-Some-Tag: ' + edgy(rng, b'value'), b'X-DATA-PREPEND-END: '
                                                         b'' + edgy(rng, b'tok', 0.05)]
        if rng.random() < 0.05:
            lines.insert(1, b'X-HEALTHCHECK: true')
    return lines + list(MESSAGE_LINES)


def test_fuzz_netcat_connector(daemon, log_records):
    instance = daemon('netcat')
    for index in range(COUNT):
        rng = random.Random('%s-netcat-%d' % (SEED, index))
        lines = netcat_input(rng)
        lines = mutate_items(rng, lines, NASTY,
                             [i for i, line in enumerate(lines) if line.startswith(b'X-')])
        data = b''.join(line + rng.choice([b'\r\n', b'\n']) for line in lines)
        before = CountingScanner.scanned
        said = exchange(rng, instance.port, data)
        label = case_label('netcat', index, data)
        assert settled(instance), 'stuck: ' + label
        assert said.startswith(fuglu.NETCAT_BANNER), label
        reply = said[len(fuglu.NETCAT_BANNER):]
        assert NETCAT_REPLY_RE.match(reply), 'reply %r: %s' % (reply[:200], label)
        scanned = CountingScanner.scanned - before
        passed = reply.startswith(b'DUNNO:') and reply != fuglu.NETCAT_HEALTHY
        assert scanned == int(passed), 'scanned %d, reply %r: %s' % (scanned, reply[:100], label)
        assert log_records.tracebacks() == [], label
    assert instance.controller.exceptions == []
    said = exchange(random.Random(0), instance.port, b'\r\n'.join(MESSAGE_LINES))
    assert said[len(fuglu.NETCAT_BANNER):].startswith(b'DUNNO:')


# -- milter ------------------------------------------------------------------------------

POSTFIX_ACTIONS = 0x1ff
POSTFIX_PROTOCOL = 0x1fffff
REPLY_COMMANDS = set(b'+-24abcdefhilmpqrsty') | {ord('O')}


def milter_stream(rng):
    """The packets of one Postfix milter connection: (command, data) pairs."""
    strings = fuglu.milter_strings
    protocol = POSTFIX_PROTOCOL if rng.random() < 0.8 else rng.randrange(1 << 21)
    packets = [(fuglu.SMFIC_OPTNEG, fuglu.encode_optneg(6, POSTFIX_ACTIONS, protocol)[5:]),
               (fuglu.SMFIC_MACRO,
                fuglu.SMFIC_CONNECT + strings('j', 'mx.example', '{daemon_name}', 'smtpd')),
               (fuglu.SMFIC_CONNECT, strings('client.example') + b'4' + (4242).to_bytes(2, 'big') +
                strings('192.0.2.7')),
               (fuglu.SMFIC_HELO, strings(edgy(rng, b'client.example')))]
    for message in range(rng.choice([1, 1, 2])):
        packets += [(fuglu.SMFIC_MACRO,
                     fuglu.SMFIC_MAIL + strings('i', 'Q%d' % message, '{mail_addr}', 'a@x')),
                    (fuglu.SMFIC_MAIL, strings(b'<%s>' % edgy(rng, b'alice@example.org'),
                                               b'SIZE=' + edgy(rng, b'300'))),
                    (fuglu.SMFIC_RCPT, strings(b'<%s>' % edgy(rng, b'bob@example.com'))),
                    (fuglu.SMFIC_RCPT, strings('<carol@example.net>', 'NOTIFY=NEVER')),
                    (fuglu.SMFIC_DATA, b'')]
        for line in MESSAGE_LINES[2:7]:
            name, _, value = line.partition(b':')
            packets.append((fuglu.SMFIC_HEADER, name + b'\0' + value + b'\0'))
        packets += [(fuglu.SMFIC_EOH, b''),
                    (fuglu.SMFIC_BODY, b'\r\n'.join(MESSAGE_LINES[8:]) + b'\r\n'),
                    (fuglu.SMFIC_BODYEOB, b'')]
        if rng.random() < 0.2:
            packets.append((fuglu.SMFIC_ABORT, b''))
    packets.append((fuglu.SMFIC_QUIT, b''))
    return packets, protocol


def test_fuzz_milter_connector(daemon, log_records):
    instance = daemon('milter')
    nasty_packets = [fuglu.milter_packet(command) for command in (b'O', b'C', b'M', b'R', b'L',
                                                                  b'E', b'Z', b'\0')]
    nasty_packets += [b'\0\0\0\0', b'\xff\xff\xff\xff', b'\0\0\0\x05',
                      fuglu.milter_packet(fuglu.SMFIC_HEADER,
                      b'X-Big\0' + b'x' * 60000 + b'\0')]
    for index in range(COUNT):
        rng = random.Random('%s-milter-%d' % (SEED, index))
        packets, protocol = milter_stream(rng)
        raw = [fuglu.milter_packet(command, data) for command, data in packets]
        if rng.random() < 0.5:   # mutate inside packets (their framing kept) ...
            items = [data for _, data in packets]
            commands = [command for command, _ in packets]
            mutate_items(rng, items, NASTY,
                         [i for i, command in enumerate(commands) if command in b'CHMRL'])
            raw = [fuglu.milter_packet(commands[i % len(commands)], item)
                   for i, item in enumerate(items)]
        else:                    # ... or the byte stream itself
            mutate_items(rng, raw, NASTY + nasty_packets)
        data = b''.join(raw)
        before = CountingScanner.scanned
        said = exchange(rng, instance.port, data)
        label = case_label('milter', index, data)
        assert settled(instance), 'stuck: ' + label
        decoder = fuglu.MilterPacketDecoder(1 << 24)
        decoder.feed(said)
        replies = []
        while True:
            packet = decoder.next_packet()
            if packet is None:
                break
            replies.append(packet)
        assert decoder.pending() == 0, 'a cut reply packet: ' + label
        assert all(command[0] in REPLY_COMMANDS for command, _ in replies), '%r: %s' % (
            replies[:5], label)
        scanned = CountingScanner.scanned - before
        verdicts = [command for command, _ in replies if command in (b'c', b'a')]
        if replies and replies[0][0] == b'O':
            negotiated = fuglu.parse_optneg(replies[0][1])[2]
            every_event_quiet = all(negotiated & flag
                                    for flag in fuglu.MILTER_NO_REPLY_FLAGS.values())
            if every_event_quiet:
                # only end-of-message gets continue/accept, and only after its scan
                assert (len(verdicts)
                        == scanned), '%d scans, %d verdicts: %s' % (scanned, len(verdicts), label)
        assert len(verdicts) >= scanned or scanned == 0, label
        assert log_records.tracebacks() == [], label
    assert instance.controller.exceptions == []
    packets, _ = milter_stream(random.Random(3))
    said = exchange(random.Random(0), instance.port,
                    b''.join(fuglu.milter_packet(c, d) for c, d in packets))
    assert fuglu.milter_packet(fuglu.SMFIR_CONTINUE) in said
