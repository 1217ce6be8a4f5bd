"""The milter connector: the protocol 6 codec (framing, payloads, reply codes), option
negotiation against different MTA offers, and whole messages driven over a real socket
against an in-process fuglu, MTA side played by MilterClient below."""

import socket
import threading
import time

import pytest

from helpers import InProcessFuglu, fuglu, no_delay, stopped_at_teardown

PORTFIX_ACTIONS = 0x1ff          # what Postfix 3.x offers
POSTFIX_PROTOCOL = 0x1fffff


# -- test plugins (loaded by dotted name: test_milter.<Class>) ---------------------------

class ChangingPlugin(fuglu.ScannerPlugin):
    """Does what its section says: action (DUNNO...), message, sender, add_rcpt,
    remove_rcpt, subject, body, sleep (seconds), replace (milter_replace tag),
    wait_for_progress (finish only after fuglu sent the MTA a progress packet).
    Records (suspect id, queue id, source, macros) of every message in `seen`."""

    seen = []
    progress_sent = threading.Event()
    requiredvars = {name: {'default': '', 'description': ''} for name in (
        'action', 'message', 'sender', 'add_rcpt', 'remove_rcpt', 'subject', 'body', 'sleep',
        'replace',
        'wait_for_progress')}

    def examine(self, suspect):
        option = lambda name: self.config.get(self.section, name)
        ChangingPlugin.seen.append({'id': suspect.id, 'queue_id': suspect.queue_id,
                                    'source': suspect.get_source(),
                                    'macros': dict(suspect.milter_macros),
                                    'from': suspect.from_address, 'to': list(suspect.recipients),
                                    'clientinfo': suspect.clientinfo,
                                    'port': suspect.tags.get('incomingport')})
        if option('sleep'):
            time.sleep(float(option('sleep')))
        if option('wait_for_progress'):
            assert ChangingPlugin.progress_sent.wait(10), 'no progress packet'
        if option('sender'):
            suspect.from_address = option('sender')
        if option('remove_rcpt'):
            suspect.recipients = [r for r in suspect.recipients if r != option('remove_rcpt')]
        if option('add_rcpt'):
            suspect.recipients = suspect.recipients + [option('add_rcpt')]
        if option('subject'):
            suspect.set_header('Subject', option('subject'))
        if option('body'):
            head, _body = fuglu.split_message_source(suspect.get_source())
            suspect.set_source(head + b'\r\n\r\n' + option('body').encode() + b'\r\n')
        if option('replace'):
            suspect.tags['milter_replace'] = option('replace')
        action = fuglu.string_to_actioncode(option('action') or 'DUNNO')
        return action, option('message') or None


class RcptGate(fuglu.MilterPlugin):
    """Milter-stage plugin: rejects the recipient named in [RcptGate] refuse, and
    records every header name it sees."""

    state = ['rcpt', 'header']
    requiredvars = {'refuse': {'default': 'nobody@example.net', 'description': ''}}
    headers_seen = []

    def examine_rcpt(self, session, recipient):
        if recipient == self.config.get(self.section, 'refuse'):
            return fuglu.REJECT, 'no such user here'
        return fuglu.DUNNO

    def examine_header(self, session, name, value):
        RcptGate.headers_seen.append((name, value))


# -- an MTA for the tests --------------------------------------------------------------

class MilterClient(object):
    """The MTA side of a milter connection: sends packets, reads replies, and knows
    which events get a reply from what was negotiated."""

    def __init__(self, port, timeout=10):
        self.sock = no_delay(socket.create_connection(('127.0.0.1', port), timeout=timeout))
        self.decoder = fuglu.MilterPacketDecoder(1 << 24)
        self.protocol = 0
        self.actions = 0
        self.version = None

    def send(self, command, data=b''):
        self.sock.sendall(fuglu.milter_packet(command, data))

    def read(self):
        while True:
            packet = self.decoder.next_packet()
            if packet is not None:
                return packet
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError('fuglu closed the connection')
            self.decoder.feed(chunk)

    def closed_by_peer(self, timeout=5):
        """True if fuglu closes the connection (EOF) within timeout."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b''
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def negotiate(self, version=6, actions=PORTFIX_ACTIONS, protocol=POSTFIX_PROTOCOL):
        self.send(fuglu.SMFIC_OPTNEG, fuglu.encode_optneg(version, actions, protocol)[5:])
        command, data = self.read()
        assert command == fuglu.SMFIR_OPTNEG
        self.version, self.actions, self.protocol = fuglu.parse_optneg(data)
        return self.version, self.actions, self.protocol

    def event(self, command, data=b''):
        """Send an event; return its reply, or None if negotiated as no-reply."""
        self.send(command, data)
        flag = fuglu.MILTER_NO_REPLY_FLAGS.get(command)
        if flag is not None and self.protocol & flag:
            return None
        return self.read()

    def macro(self, command, **macros):
        data = command + b''.join(fuglu.milter_strings('{%s}' % k if len(k) > 1 else k, v)
                                  for k, v in macros.items())
        self.send(fuglu.SMFIC_MACRO, data)

    def connect_info(self, hostname='client.example.org', address='192.0.2.10', port=42424):
        data = (fuglu.milter_strings(hostname) + b'4' + port.to_bytes(2, 'big')
                + fuglu.milter_strings(address))
        return self.event(fuglu.SMFIC_CONNECT, data)

    def header_value(self, value):
        """Values as the MTA sends them: with HDR_LEADSPC the leading space stays."""
        return (' ' + value) if self.protocol & fuglu.SMFIP_HDR_LEADSPC else value

    def message(self, sender='sender@example.org', recipients=('rcpt@example.net',),
                headers=(('From', 'sender@example.org'), ('Subject', 'test')), body=b'hello\r\n',
                queue_id='4QUEUE1', raw_headers=None):
        """Drive one message; return the packets fuglu sends after end of body (the
        last one is the verdict). Replies to earlier events must be CONTINUE."""
        self.macro(fuglu.SMFIC_MAIL, i=queue_id, mail_addr=sender)
        assert (self.event(fuglu.SMFIC_MAIL, fuglu.milter_strings('<%s>' % sender))
                in (None, (b'c', b'')))
        for recipient in recipients:
            self.macro(fuglu.SMFIC_RCPT, i=queue_id, rcpt_addr=recipient)
            self.event(fuglu.SMFIC_RCPT, fuglu.milter_strings('<%s>' % recipient))
        self.macro(fuglu.SMFIC_DATA, i=queue_id)
        self.event(fuglu.SMFIC_DATA)
        if raw_headers is None:
            raw_headers = [(name, self.header_value(value)) for name, value in headers]
        for name, value in raw_headers:
            self.event(fuglu.SMFIC_HEADER, fuglu.milter_strings(name, value))
        self.event(fuglu.SMFIC_EOH)
        for start in range(0, len(body), 65535):
            self.event(fuglu.SMFIC_BODY, body[start:start + 65535])
        self.macro(fuglu.SMFIC_BODYEOB, i=queue_id)
        self.send(fuglu.SMFIC_BODYEOB)
        packets = []
        while True:
            packet = self.read()
            packets.append(packet)
            if packet[0] in b'cadrty':
                return packets

    def start(self, **negotiate):
        self.negotiate(**negotiate)
        self.connect_info()
        self.event(fuglu.SMFIC_HELO, fuglu.milter_strings('client.example.org'))
        return self

    def quit(self):
        self.send(fuglu.SMFIC_QUIT)
        self.sock.close()

    def close(self):
        self.sock.close()


def replycode(packets):
    command, data = packets[-1]
    assert command == fuglu.SMFIR_REPLYCODE, packets
    return data.rstrip(b'\0').decode()


# -- fixtures ---------------------------------------------------------------------------

@pytest.fixture
def start_fuglu():
    """Call with (milter=..., plugins=..., extra_main=..., sections=...) -> running fuglu."""
    ChangingPlugin.seen = []
    RcptGate.headers_seen = []

    def create(mode='auto', options='', plugins='test_milter.ChangingPlugin', extra_main='',
               sections='',
               milter_extra=''):
        return InProcessFuglu(1, extra_main=extra_main, protocol='milter', plugins=plugins,
                              extra='[milter]\nmilter_mode=%s\nmilter_mode_options=%s\n%s\n%s'
                                    % (mode, options, milter_extra, sections))
    yield from stopped_at_teardown(create)


# -- codec -------------------------------------------------------------------------------

def test_packet_round_trip_and_name_tables():
    packet = fuglu.milter_packet(fuglu.SMFIC_HEADER, fuglu.milter_strings('Subject', ' hi'))
    assert packet[:4] == (1 + len(b'Subject\0 hi\0')).to_bytes(4, 'big')
    decoder = fuglu.MilterPacketDecoder(1000)
    decoder.feed(packet)
    assert decoder.next_packet() == (b'L', b'Subject\0 hi\0')
    assert decoder.next_packet() is None and decoder.pending() == 0
    assert fuglu.SMFIC_NAMES[b'L'] == 'HEADER' and fuglu.SMFIR_NAMES[b'y'] == 'REPLYCODE'
    assert fuglu.SMFIP_NAMES[0x80] == 'NR_HDR' and fuglu.SMFIM_NAMES[5] == 'EOM'
    assert fuglu.describe_milter_flags(0x41 | 0x8000, fuglu.SMFIF_NAMES) == 'ADDHDRS|CHGFROM|0x8000'


def test_payload_codecs_round_trip():
    optneg = fuglu.encode_optneg(6, 0x1ff, 0x1fffff, {fuglu.SMFIM_EOM: 'i {auth_type}'})
    assert optneg[4:5] == b'O'
    assert fuglu.parse_optneg(optneg[5:]) == (6, 0x1ff, 0x1fffff)
    assert optneg[5 + 12:] == (5).to_bytes(4, 'big') + b'i {auth_type}\0'
    with pytest.raises(fuglu.MilterProtocolError):
        fuglu.parse_optneg(b'\0' * 11)
    assert fuglu.parse_milter_macros(b'Mi\x004ABC\x00{mail_addr}\x00a@b\x00') == \
        (b'M', {'i': '4ABC', 'mail_addr': 'a@b'})
    assert fuglu.parse_milter_macros(b'C') == (b'C', {})
    assert fuglu.split_milter_strings(b'<a@b>\0SIZE=10\0') == [b'<a@b>', b'SIZE=10']
    assert fuglu.split_milter_strings(b'no-final-nul') == [b'no-final-nul']
    assert fuglu.parse_milter_connect(b'mx.example\x004\x01\xbb192.0.2.1\x00') == \
        ('mx.example', b'4', 443, '192.0.2.1')
    assert (fuglu.parse_milter_connect(b'mx\x006\x00\x19IPv6:2001:db8::1\x00')[3]
            == 'IPv6:2001:db8::1')
    assert fuglu.parse_milter_connect(b'localhost\x00U') == ('localhost', b'U', 0, '')
    with pytest.raises(fuglu.MilterProtocolError):
        fuglu.parse_milter_connect(b'no-family')
    inserted = fuglu.encode_header_packet(fuglu.SMFIR_INSHEADER, b'X-A', b' 1', 0)
    assert inserted[4:] == b'i' + b'\0\0\0\0' + b'X-A\0 1\0'


def test_reply_codes_are_well_formed_for_postfix():
    def text(packet):
        assert packet[4:5] == b'y'
        return packet[5:].rstrip(b'\0').decode()
    assert text(fuglu.milter_reply_code(550, 'virus found (abc)')) == '550 5.7.1 virus found (abc)'
    assert text(fuglu.milter_reply_code(450, 'later')) == '450 4.7.1 later'
    # an enhanced code of the right class is kept, one of the wrong class is not used
    assert text(fuglu.milter_reply_code(554, '5.7.0 spam')) == '554 5.7.0 spam'
    assert text(fuglu.milter_reply_code(451, '5.7.0 odd')) == '451 4.7.1 5.7.0 odd'
    assert text(fuglu.milter_reply_code(550, '100% spam')) == '550 5.7.1 100%% spam'
    assert text(fuglu.milter_reply_code(550, 'one\ntwo\r\nthree')) == \
        '550-5.7.1 one\r\n550-5.7.1 two\r\n550 5.7.1 three'
    assert b'\0' not in fuglu.milter_reply_code(550, 'a\0b')[5:-1]
    with pytest.raises(ValueError):
        fuglu.milter_reply_code(250, 'not a refusal')


def test_decoder_splits_merged_packets_and_joins_split_ones():
    packets = [fuglu.milter_packet(b'D', b'Mi\x00Q1\x00'), fuglu.milter_packet(b'M', b'<a@b>\0'),
               fuglu.milter_packet(b'B', b'x' * 70000)]
    stream = b''.join(packets)
    merged = fuglu.MilterPacketDecoder(1 << 20)
    merged.feed(stream)
    assert [merged.next_packet() for _ in range(3)] == \
        [(b'D', b'Mi\x00Q1\x00'), (b'M', b'<a@b>\0'), (b'B', b'x' * 70000)]
    assert merged.next_packet() is None
    trickle = fuglu.MilterPacketDecoder(1 << 20)
    seen = []
    for index in range(len(stream)):      # one byte per read
        trickle.feed(stream[index:index + 1])
        packet = trickle.next_packet()
        if packet:
            seen.append(packet)
    assert [p[0] for p in seen] == [b'D', b'M', b'B'] and len(seen[2][1]) == 70000


def test_decoder_refuses_oversize_and_empty_packets():
    decoder = fuglu.MilterPacketDecoder(1000)
    decoder.feed((1001).to_bytes(4, 'big') + b'B')
    with pytest.raises(fuglu.MilterProtocolError, match='milter_max_packet_size'):
        decoder.next_packet()
    decoder = fuglu.MilterPacketDecoder(1000)
    decoder.feed(b'\0\0\0\0')
    with pytest.raises(fuglu.MilterProtocolError, match='length 0'):
        decoder.next_packet()


def test_reader_tells_eof_between_packets_from_a_truncated_packet():
    left, right = socket.socketpair()
    reader = fuglu.MilterReader(left, 1000)
    right.sendall(fuglu.milter_packet(b'Q'))
    right.sendall(fuglu.milter_packet(b'B', b'abcdef')[:7])
    right.shutdown(socket.SHUT_WR)
    assert reader.read_packet() == (b'Q', b'')
    with pytest.raises(fuglu.MilterProtocolError, match='inside a packet'):
        reader.read_packet()
    left.close(), right.close()
    left, right = socket.socketpair()
    right.close()
    with pytest.raises(fuglu.ConnectionClosed):
        fuglu.MilterReader(left, 1000).read_packet()
    left.close()


def test_modes_ask_only_for_the_rights_they_use():
    def mode(name, options=''):
        from helpers import make_config
        return fuglu.MilterMode(make_config('[milter]\nmilter_mode=%s\nmilter_mode_options=%s\n'
                                            % (name, options)))
    assert mode('readonly').actions == 0
    assert mode('auto').actions == (fuglu.SMFIF_ADDHDRS | fuglu.SMFIF_CHGHDRS |
                                    fuglu.SMFIF_CHGBODY | fuglu.SMFIF_CHGFROM |
                                    fuglu.SMFIF_ADDRCPT | fuglu.SMFIF_DELRCPT)
    assert mode('autoheaders').actions == fuglu.SMFIF_ADDHDRS | fuglu.SMFIF_CHGHDRS
    assert mode('autofrom, autoto').auto_parts == {'from', 'to'}
    manual = mode('manual', 'body, from')
    assert manual.forced_parts == {'body', 'from'}
    assert manual.actions == fuglu.SMFIF_ADDHDRS | fuglu.SMFIF_CHGBODY | fuglu.SMFIF_CHGFROM
    assert mode('manual', 'all').forced_parts == {'headers', 'body', 'from', 'to'}
    assert mode('autoheaders', 'prepend').prepend


@pytest.mark.parametrize('words,options,name,forced,auto,warned', [
    ('nonsense', '', 'tags', set(), set(), True),
    ('readonly, auto', '', 'readonly', set(), set(), True),          # readonly wins
    ('tags, readonly, manual', 'all', 'readonly', set(), set(), True),
    ('manual, tags', 'body', 'manual,tags', {'body'}, set(), False),
    ('manual autoheaders', 'from', 'manual,autoheaders', {'from'}, {'headers'}, False),
    ('auto, bogus', '', 'auto', set(), {'headers', 'body', 'from', 'to'}, True),
    ('manual', 'body, sideways', 'manual', {'body'}, set(), True),
])
def test_mode_words_combine_as_fuglu_documents(words, options, name, forced, auto, warned):
    from helpers import make_config
    config = make_config('[milter]\nmilter_mode=%s\nmilter_mode_options=%s\n' % (words, options))
    mode = fuglu.MilterMode(config)
    assert mode.name == name
    assert mode.readonly == (name == 'readonly') and mode.tags == ('tags' in name.split(','))
    assert (mode.forced_parts, mode.auto_parts) == (forced, auto)
    assert (mode.actions == 0) == mode.readonly
    findings = fuglu.check_milter_mode(config)
    assert bool(findings) == warned and all(level == 'warning' for level, _ in findings)


# -- what to change in the MTA's copy (no socket) ----------------------------------------

ALL_RIGHTS = 0x1ff
HEADERS = [(b'From', b' a@example.org'), (b'Subject', b' hello'), (b'X-Two', b' one'),
           (b'X-Two', b' two')]
BODY = b'the body\r\n'


def modifications(words, options='', actions=ALL_RIGHTS, leading_space=True,
                  rcpt_arguments=None):
    from helpers import make_config
    mode = fuglu.MilterMode(make_config('[milter]\nmilter_mode=%s\nmilter_mode_options=%s\n'
                                        % (words, options)))
    return fuglu.MilterModifications(mode, actions, leading_space, HEADERS, bytearray(BODY),
                                     rcpt_arguments or {'b@example.net': '<b@example.net>'})


def received_suspect():
    source = b''.join(name + b':' + value + b'\r\n' for name, value in HEADERS) + b'\r\n' + BODY
    suspect = fuglu.Suspect('a@example.org', ['b@example.net'], inbuffer=source)
    suspect.add_header('X-Fuglu-Spamstatus', 'NO')
    return suspect


def packet(command, *strings):
    return fuglu.milter_packet(command, fuglu.milter_strings(*strings))


FUGLU_HEADER = fuglu.encode_header_packet(fuglu.SMFIR_ADDHEADER, b'X-Fuglu-Spamstatus', b' NO')


def test_readonly_changes_nothing_and_other_modes_add_fuglus_headers():
    suspect = received_suspect()
    assert modifications('readonly').packets(suspect) == []
    for words in ('tags', 'manual', 'auto', 'autofrom'):
        assert modifications(words).packets(suspect) == [FUGLU_HEADER], words


def test_auto_writes_back_sender_recipients_and_headers_in_that_order():
    suspect = received_suspect()
    suspect.from_address = 'new@example.org'
    suspect.recipients = ['c@example.net']
    suspect.set_header('Subject', 'changed')
    packets = modifications('auto', rcpt_arguments={'b@example.net': '<b@example.net> X=1'}) \
        .packets(suspect)
    assert packets == [
        packet(fuglu.SMFIR_CHGFROM, '<new@example.org>'),
        packet(fuglu.SMFIR_DELRCPT, '<b@example.net> X=1'),     # the argument as received
        packet(fuglu.SMFIR_ADDRCPT, '<c@example.net>'),
        fuglu.encode_header_packet(fuglu.SMFIR_CHGHEADER, b'Subject', b' changed', 1),
        FUGLU_HEADER,
    ]


def test_autoheaders_leaves_the_envelope_and_body_alone():
    suspect = received_suspect()
    suspect.from_address = 'new@example.org'
    head, _ = fuglu.split_message_source(suspect.get_source())
    suspect.set_source(head.replace(b'\r\nX-Two: two', b'') + b'\r\n\r\nnew body\r\n')
    assert modifications('autoheaders').packets(suspect) == [
        fuglu.encode_header_packet(fuglu.SMFIR_CHGHEADER, b'X-Two', b'', 2), FUGLU_HEADER]


def test_manual_and_tags_add_up_and_the_body_comes_last():
    suspect = received_suspect()
    suspect.tags['milter_replace'] = 'from'
    packets = modifications('manual, tags', 'body').packets(suspect)
    assert packets == [packet(fuglu.SMFIR_CHGFROM, '<a@example.org>'), FUGLU_HEADER,
                       fuglu.milter_packet(fuglu.SMFIR_REPLBODY, BODY)]


def test_manual_headers_replaces_the_whole_header_block():
    suspect = received_suspect()
    packets = modifications('manual', 'headers').packets(suspect)
    deleted = [fuglu.encode_header_packet(fuglu.SMFIR_CHGHEADER, name, b'', index)
               for name, index in ((b'From', 1), (b'Subject', 1), (b'X-Two', 2), (b'X-Two', 1))]
    added = [fuglu.encode_header_packet(fuglu.SMFIR_ADDHEADER, name, value)
             for name, value in HEADERS]
    assert packets == deleted + added + [FUGLU_HEADER]


def test_prepend_inserts_on_top_and_values_follow_the_negotiated_leading_space():
    suspect = received_suspect()
    suspect.add_header('X-Fuglu-Suspect', suspect.id)
    packets = modifications('tags', 'prepend', leading_space=False).packets(suspect)
    assert packets == [
        fuglu.encode_header_packet(fuglu.SMFIR_INSHEADER, b'X-Fuglu-Suspect',
                                   suspect.id.encode(), 0),
        fuglu.encode_header_packet(fuglu.SMFIR_INSHEADER, b'X-Fuglu-Spamstatus', b'NO', 0)]


def test_changes_without_the_right_are_left_out_and_named_once():
    suspect = received_suspect()
    suspect.recipients = ['c@example.net', 'd@example.net']
    changes = modifications('auto', actions=fuglu.SMFIF_ADDHDRS)
    assert changes.packets(suspect) == [FUGLU_HEADER]
    assert changes.problems == ['cannot delete a recipient: DELRCPT was not negotiated with '
                                'the MTA', 'cannot add a recipient: ADDRCPT was not negotiated '
                                'with the MTA']


def test_a_long_body_is_replaced_in_chunks_of_at_most_65535_bytes():
    body = b'x' * 70000 + b'\n'
    chunks = fuglu.MilterModifications.body_packets(body)
    assert [len(chunk) - 5 for chunk in chunks] == [65535, 70002 - 65535]
    assert b''.join(chunk[5:] for chunk in chunks) == b'x' * 70000 + b'\r\n'


# -- negotiation with different MTA offers --------------------------------------------------

def test_negotiation_with_postfix_offer(start_fuglu):
    instance = start_fuglu(mode='readonly')
    client = MilterClient(instance.port)
    version, actions, protocol = client.negotiate()
    assert version == 6
    assert actions == 0                      # readonly asks for no rights
    no_reply = (fuglu.SMFIP_NR_CONN | fuglu.SMFIP_NR_HELO | fuglu.SMFIP_NR_MAIL |
                fuglu.SMFIP_NR_RCPT | fuglu.SMFIP_NR_DATA | fuglu.SMFIP_NR_HDR |
                fuglu.SMFIP_NR_EOH | fuglu.SMFIP_NR_BODY)
    assert protocol & no_reply == no_reply
    assert protocol & fuglu.SMFIP_HDR_LEADSPC
    assert not protocol & (fuglu.SMFIP_NOCONNECT | fuglu.SMFIP_NOHELO | fuglu.SMFIP_NOMAIL |
                           fuglu.SMFIP_NORCPT | fuglu.SMFIP_NOHDRS | fuglu.SMFIP_NOBODY)
    client.close()


def test_negotiation_never_claims_what_the_mta_did_not_offer(start_fuglu):
    instance = start_fuglu(mode='auto')
    client = MilterClient(instance.port)
    version, actions, protocol = client.negotiate(
        version=6, actions=fuglu.SMFIF_ADDHDRS | fuglu.SMFIF_QUARANTINE,
        protocol=fuglu.SMFIP_NR_HDR | fuglu.SMFIP_NOHELO)
    assert actions == fuglu.SMFIF_ADDHDRS          # subset of the offer, no QUARANTINE
    assert protocol == fuglu.SMFIP_NR_HDR          # no NOHELO: we want HELO
    client.close()


def test_old_mta_without_no_reply_flags_gets_a_reply_to_every_event(start_fuglu):
    instance = start_fuglu(mode='auto')
    client = MilterClient(instance.port)
    version, actions, protocol = client.negotiate(version=2, actions=0x1f, protocol=0x7f)
    assert version == 2 and protocol == 0 and actions == 0x1f
    assert client.connect_info() == (b'c', b'')
    assert client.event(fuglu.SMFIC_HELO, fuglu.milter_strings('client.example.org')) == (b'c', b'')
    packets = client.message()
    assert packets[-1] == (b'c', b'')
    # CHGFROM (0x40) was not offered: the header additions still come
    assert [p[0] for p in packets] == [b'h', b'h', b'c']
    client.quit()


def test_version_1_mta_is_refused(start_fuglu):
    instance = start_fuglu()
    client = MilterClient(instance.port)
    client.send(fuglu.SMFIC_OPTNEG, fuglu.encode_optneg(1, 0, 0)[5:])
    assert client.closed_by_peer()


# -- whole messages over a socket ----------------------------------------------------------

def test_clean_message_gets_fuglu_headers_and_continue(start_fuglu):
    instance = start_fuglu(mode='auto')
    client = MilterClient(instance.port).start()
    packets = client.message(queue_id='4AAAA1')
    assert packets[-1] == (b'c', b'')
    added = dict((data.split(b'\0')[0], data.split(b'\0')[1])
                 for command, data in packets if command == b'h')
    assert added[b'X-Fuglu-Spamstatus'] == b' NO'         # leading space: HDR_LEADSPC
    suspect_id = added[b'X-Fuglu-Suspect'].strip().decode()
    seen = ChangingPlugin.seen[-1]
    assert seen['id'] == suspect_id and seen['queue_id'] == '4AAAA1'
    assert seen['from'] == 'sender@example.org' and seen['to'] == ['rcpt@example.net']
    assert seen['source'] == b'From: sender@example.org\r\nSubject: test\r\n\r\nhello\r\n'
    assert seen['clientinfo'] == ('client.example.org', '192.0.2.10', 'client.example.org')
    assert seen['port'] == instance.port
    client.quit()


def test_message_is_rebuilt_byte_for_byte_with_leading_space(start_fuglu):
    instance = start_fuglu(mode='readonly')
    client = MilterClient(instance.port).start()
    raw_headers = [('Subject', 'no-space'), ('X-Tab', '\tvalue'), ('X-Folded', ' first\n\tsecond'),
                   ('X-Empty', '')]
    body = b'line one\r\n\r\n.dot line\r\n\xff\xfe8bit\r\n'
    packets = client.message(raw_headers=raw_headers, body=body)
    assert packets == [(b'c', b'')]              # readonly: not even X-Fuglu headers
    assert ChangingPlugin.seen[-1]['source'] == (b'Subject:no-space\r\nX-Tab:\tvalue\r\n'
                                                 b'X-Folded: first\r\n\tsecond\r\n'
                                                 b'X-Empty:\r\n\r\n' + body)
    client.quit()


def test_without_leading_space_flag_one_space_is_restored_and_stripped(start_fuglu):
    instance = start_fuglu(mode='auto', sections='[ChangingPlugin]\nsubject=changed\n')
    client = MilterClient(instance.port).start(protocol=POSTFIX_PROTOCOL & ~fuglu.SMFIP_HDR_LEADSPC)
    assert not client.protocol & fuglu.SMFIP_HDR_LEADSPC
    packets = client.message(headers=(('Subject', 'orig'), ('From', 'a@example.org')))
    assert ChangingPlugin.seen[-1]['source'].startswith(b'Subject: orig\r\nFrom: '
                                                        b'a@example.org\r\n\r\n')
    assert (b'm', b'\0\0\0\x01Subject\0changed\0') in packets
    assert (b'h', b'X-Fuglu-Spamstatus\0NO\0') in packets
    client.quit()


def test_auto_mode_writes_back_sender_recipients_headers_and_body(start_fuglu):
    instance = start_fuglu(mode='auto', sections='[ChangingPlugin]\nsender=new@example.org\n'
                                                 'remove_rcpt=old@example.net\n'
                                                 'add_rcpt=added@example.net\n'
                                                 'subject=[scanned] test\nbody=new body\n')
    client = MilterClient(instance.port).start()
    big_body = b'x' * 100 + b'\r\n'
    packets = client.message(recipients=('old@example.net', 'kept@example.net'), body=big_body)
    commands = [command for command, _ in packets]
    assert commands == [b'e', b'-', b'+', b'm', b'h', b'h', b'b',
                        b'c']   # body last, never interleaved
    assert packets[0][1] == b'<new@example.org>\0'
    assert packets[1][1] == b'<old@example.net>\0'
    assert packets[2][1] == b'<added@example.net>\0'
    assert packets[3][1] == b'\0\0\0\x01Subject\0 [scanned] test\0'
    assert packets[6][1] == b'new body\r\n'
    client.quit()


def test_8bit_envelope_is_written_back_as_it_came(start_fuglu):
    # Postfix passes 8-bit addresses as bytes (smtputf8_enable = no): decoded with
    # 'replace', the sender came back as U+FFFD and a removed recipient was not found
    instance = start_fuglu(mode='manual', options='from,to',
                           sections='[ChangingPlugin]\nremove_rcpt=\udcfe@example.net\n')
    client = MilterClient(instance.port).start()
    packets = client.message(sender='\udcff@example.org',
                             recipients=('\udcfe@example.net', 'kept@example.net'))
    assert packets[:2] == [(b'e', b'<\xff@example.org>\0'), (b'-', b'<\xfe@example.net>\0')]
    client.quit()


def test_replaced_body_comes_in_chunks_of_at_most_65535_bytes(start_fuglu):
    long_body = 'y' * 150000
    instance = start_fuglu(mode='manual', options='body',
                           sections='[ChangingPlugin]\nbody=%s\n' % long_body)
    client = MilterClient(instance.port).start()
    packets = client.message()
    chunks = [data for command, data in packets if command == b'b']
    assert [len(c) for c in chunks] == [65535, 65535, 150002 - 2 * 65535]
    assert b''.join(chunks) == long_body.encode() + b'\r\n'
    client.quit()


def test_tags_mode_replaces_what_the_milter_replace_tag_names(start_fuglu):
    instance = start_fuglu(mode='tags', sections='[ChangingPlugin]\nreplace=to\n'
                                                 'add_rcpt=extra@example.net\n'
                                                 'sender=ignored@example.org\n')
    client = MilterClient(instance.port).start()
    packets = client.message()
    commands = [command for command, _ in packets]
    assert (b'+'
            in commands)  # 'to' replaces the recipients (upstream swapped it with from)
    assert b'e' not in commands        # the sender was not asked for
    client.quit()


def test_prepend_option_inserts_headers_on_top_in_order(start_fuglu):
    instance = start_fuglu(mode='autoheaders', options='prepend')
    client = MilterClient(instance.port).start()
    packets = client.message()
    inserted = [data for command, data in packets if command == b'i']
    assert [d[4:].split(b'\0')[0] for d in inserted] == [b'X-Fuglu-Suspect', b'X-Fuglu-Spamstatus']
    assert all(d[:4] == b'\0\0\0\0' for d in inserted)
    client.quit()


@pytest.mark.parametrize('action, expected', [
    ('REJECT', '550 5.7.1 100%% bad (ID)'),
    ('DEFER', '450 4.7.1 100%% bad (ID)'),
])
def test_refusals_are_reply_codes_with_our_text(start_fuglu, action, expected):
    instance = start_fuglu(sections='[ChangingPlugin]\naction=%s\nmessage=100%% bad\n' % action)
    client = MilterClient(instance.port).start()
    packets = client.message()
    assert len(packets) == 1
    assert replycode(packets) == expected.replace('ID', ChangingPlugin.seen[-1]['id'])
    client.quit()


def test_delete_discards(start_fuglu):
    instance = start_fuglu(sections='[ChangingPlugin]\naction=DELETE\n')
    client = MilterClient(instance.port).start()
    assert client.message() == [(b'd', b'')]
    client.quit()


def test_internal_error_becomes_tempfail(start_fuglu, monkeypatch):
    instance = start_fuglu()

    def broken(self, suspect):
        raise RuntimeError('scanner core exploded')
    monkeypatch.setattr(fuglu.ScanSession, 'scan', broken)
    client = MilterClient(instance.port).start()
    text = replycode(client.message())
    assert text.startswith('450 4.3.0 internal problem - message deferred (')   # FuGlu: 450
    monkeypatch.undo()
    assert client.message()[-1] == (b'c', b'')      # the connection is still good
    client.quit()


def test_two_messages_on_one_connection_keep_their_own_ids_and_macros(start_fuglu):
    instance = start_fuglu()
    client = MilterClient(instance.port).start()
    first = client.message(queue_id='4FIRST', sender='one@example.org')
    client.send(fuglu.SMFIC_ABORT)           # Postfix may abort after the verdict
    second = client.message(queue_id='4SECOND', sender='two@example.org',
                            recipients=('b@example.net',))
    assert first[-1] == second[-1] == (b'c', b'')
    one, two = ChangingPlugin.seen[-2:]
    assert (one['queue_id'], two['queue_id']) == ('4FIRST', '4SECOND')
    assert one['id'] != two['id']
    assert two['from'] == 'two@example.org' and two['to'] == ['b@example.net']
    assert two['macros']['mail_addr'] == 'two@example.org'
    assert 'rcpt_addr' in two['macros'] and two['macros']['rcpt_addr'] == 'b@example.net'
    client.quit()


def test_message_without_rcpt_macros_does_not_inherit_the_previous_ones(start_fuglu):
    instance = start_fuglu()
    client = MilterClient(instance.port).start()
    client.message(queue_id='4FIRST')
    # second message: no macros at all
    client.event(fuglu.SMFIC_MAIL, fuglu.milter_strings('<x@example.org>'))
    client.event(fuglu.SMFIC_RCPT, fuglu.milter_strings('<y@example.net>'))
    client.event(fuglu.SMFIC_EOH)
    client.send(fuglu.SMFIC_BODYEOB)
    while client.read()[0] not in b'cadrty':
        pass
    assert ChangingPlugin.seen[-1]['queue_id'] is None
    assert 'rcpt_addr' not in ChangingPlugin.seen[-1]['macros']
    assert ChangingPlugin.seen[-1]['macros'].get('j') is None
    client.quit()


def test_long_scan_sends_progress_before_the_verdict(start_fuglu, monkeypatch):
    # the scan lasts until fuglu sent a progress packet (every 0.1 s of scanning)
    ChangingPlugin.progress_sent.clear()
    send_progress = fuglu.MilterSession.send_progress

    def sent_and_told(session):
        send_progress(session)
        ChangingPlugin.progress_sent.set()
    monkeypatch.setattr(fuglu.MilterSession, 'send_progress', sent_and_told)
    instance = start_fuglu(sections='[ChangingPlugin]\nwait_for_progress=1\n',
                           milter_extra='milter_progress_interval=0.1\n')
    client = MilterClient(instance.port).start()
    packets = client.message()
    progress = [p for p in packets if p == (b'p', b'')]
    assert len(progress) >= 1
    assert packets[-1] == (b'c', b'') and packets[0] == (b'p', b'')
    client.quit()


def test_oversize_message_is_refused_and_body_skipped_for_mtas_that_reply(start_fuglu):
    instance = start_fuglu(extra_main='smtp_max_message_size=1000')
    client = MilterClient(instance.port).start(protocol=POSTFIX_PROTOCOL & ~fuglu.SMFIP_NR_BODY)
    assert client.protocol & fuglu.SMFIP_SKIP
    client.macro(fuglu.SMFIC_MAIL, i='4BIG')
    client.event(fuglu.SMFIC_MAIL, fuglu.milter_strings('<a@example.org>'))
    client.event(fuglu.SMFIC_RCPT, fuglu.milter_strings('<b@example.net>'))
    client.event(fuglu.SMFIC_EOH)
    assert client.event(fuglu.SMFIC_BODY, b'z' * 600) == (b'c', b'')
    assert client.event(fuglu.SMFIC_BODY, b'z' * 600) == (b's', b'')
    client.send(fuglu.SMFIC_BODYEOB)
    assert replycode([client.read()]).startswith('452 4.3.4 message size exceeds')
    client.quit()


def test_milter_stage_plugin_rejects_one_recipient(start_fuglu):
    instance = start_fuglu(extra_main='mplugins=test_milter.RcptGate')
    client = MilterClient(instance.port)
    version, actions, protocol = client.negotiate()
    assert (not protocol & fuglu.SMFIP_NR_RCPT
            and not protocol & fuglu.SMFIP_NR_HDR)  # we answer these
    assert protocol & fuglu.SMFIP_NR_MAIL
    client.connect_info()
    client.event(fuglu.SMFIC_HELO, fuglu.milter_strings('h'))
    client.event(fuglu.SMFIC_MAIL, fuglu.milter_strings('<s@example.org>'))
    assert client.event(fuglu.SMFIC_RCPT, fuglu.milter_strings('<ok@example.net>')) == (b'c', b'')
    refused = client.event(fuglu.SMFIC_RCPT, fuglu.milter_strings('<nobody@example.net>'))
    assert replycode([refused]) == '550 5.7.1 no such user here'
    assert client.event(fuglu.SMFIC_HEADER, fuglu.milter_strings('Subject', ' hi')) == (b'c', b'')
    client.event(fuglu.SMFIC_EOH)
    client.send(fuglu.SMFIC_BODYEOB)
    while client.read()[0] not in b'cadrty':
        pass
    assert ChangingPlugin.seen[-1]['to'] == ['ok@example.net']
    assert RcptGate.headers_seen == [('Subject', 'hi')]
    client.quit()


# -- malformed input: the connection closes, the daemon keeps serving ------------------------

@pytest.mark.parametrize('garbage', [
    fuglu.milter_packet(b'Z', b'unknown command'),
    (50 * 1024 * 1024).to_bytes(4, 'big') + b'B',           # oversize length
    b'\0\0\0\0',                                            # length 0
    fuglu.milter_packet(b'O', b'short'),                    # OPTNEG too short
])
def test_malformed_packets_close_the_connection_and_the_daemon_serves_on(start_fuglu, garbage):
    instance = start_fuglu()
    client = MilterClient(instance.port)
    client.negotiate()
    client.sock.sendall(garbage)
    assert client.closed_by_peer()
    client.close()
    again = MilterClient(instance.port).start()
    assert again.message()[-1] == (b'c', b'')
    again.quit()


def test_eof_at_any_point_ends_the_session_without_a_hang(start_fuglu):
    instance = start_fuglu()
    for cut in ('after-optneg', 'inside-message', 'inside-packet'):
        client = MilterClient(instance.port).start()
        if cut == 'inside-message':
            client.event(fuglu.SMFIC_MAIL, fuglu.milter_strings('<a@example.org>'))
            client.event(fuglu.SMFIC_BODY, b'partial')
        elif cut == 'inside-packet':
            client.sock.sendall(fuglu.milter_packet(b'B', b'x' * 100)[:50])
        client.close()
    assert instance.idle(), 'a worker is still busy with a connection the MTA closed'
    again = MilterClient(instance.port).start()
    assert again.message()[-1] == (b'c', b'')
    again.quit()


def test_quit_new_connection_resets_to_connect_state(start_fuglu):
    instance = start_fuglu()
    client = MilterClient(instance.port).start()
    client.message(queue_id='4ONE')
    client.send(fuglu.SMFIC_QUIT_NC)
    client.connect_info(hostname='[198.51.100.5]', address='198.51.100.5')
    client.message(queue_id='4TWO')
    assert ChangingPlugin.seen[-1]['clientinfo'] == ('', '198.51.100.5', 'unknown')
    client.quit()


def test_concurrent_connections(start_fuglu):
    # one MTA with more connections than half the workers: above the default
    # max_sessions_per_client, as a busy Postfix needs
    instance = start_fuglu(sections='[performance]\nmax_sessions_per_client=8\n')
    results = []

    def one(n):
        client = MilterClient(instance.port).start()
        for index in range(5):
            results.append(client.message(queue_id='4C%dM%d' % (n, index))[-1])
        client.quit()
    threads = [threading.Thread(target=one, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [(b'c', b'')] * 30
    assert len({seen['id'] for seen in ChangingPlugin.seen}) == 30
