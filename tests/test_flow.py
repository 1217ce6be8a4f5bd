"""The one scan-and-answer flow of every connector (ScanSession.handle driving a
ProtocolHandler): the no-loss rule, tested once against a protocol that records its
answers, and then how each connector's protocol puts the answers on its wire."""

import socket
import types

import pytest

from helpers import fuglu, make_config

MESSAGE = b'From: a@example.org\r\nTo: b@example.com\r\nSubject: flow\r\n\r\nbody\r\n'


class Verdict(fuglu.ScannerPlugin):
    """Answers ``verdict`` (an action, or an exception class to raise)."""

    verdict = fuglu.DUNNO
    seen = []

    def examine(self, suspect):
        Verdict.seen.append(suspect.id)
        if isinstance(Verdict.verdict, type):
            raise Verdict.verdict('plugin trouble')
        return Verdict.verdict, 'the plugin says so'


class Recorder(fuglu.AppenderPlugin):
    ran = []

    def process(self, suspect, decision):
        Recorder.ran.append((suspect.id, decision))


class RecordingProtocol(fuglu.ProtocolHandler):
    """Records every answer. ``delivered``: what commitback reports; ``broken``: the
    step that raises ('make_suspect', 'commitback' or 'before_scan')."""

    connector = types.SimpleNamespace(protocol='test')

    def __init__(self, delivered=True, broken=None, before=(fuglu.DUNNO, None)):
        self.delivered, self.broken, self.before = delivered, broken, before
        self.answers = []
        self.suspect = None

    def fail_at(self, step):
        if self.broken == step:
            raise RuntimeError('%s broke' % step)

    def make_suspect(self, recipient='b@example.com'):
        self.fail_at('make_suspect')
        self.suspect = fuglu.Suspect('a@example.org', [recipient], inbuffer=MESSAGE)
        return self.suspect

    def before_scan(self, suspect):
        self.fail_at('before_scan')
        return self.before

    def commitback(self, suspect):
        self.answers.append(('commitback', None, None))
        self.fail_at('commitback')
        return self.delivered

    def discard(self, text):
        self.answers.append(('discard', text, None))
        return True

    def reject(self, text, status='5.7.1'):
        self.answers.append(('reject', text, status))
        return True

    def defer(self, text, status='4.7.1'):
        self.answers.append(('defer', text, status))
        return True


@pytest.fixture
def controller(tmp_path):
    Verdict.verdict, Verdict.seen, Recorder.ran = fuglu.DUNNO, [], []
    config = make_config('[main]\nplugins=\nprependers=\nappenders=\ntempdir=%s\n' % tmp_path)
    controller = fuglu.MainController(config)
    controller.plugins = [Verdict(config)]
    controller.appenders = [Recorder(config)]
    yield controller
    fuglu.Addrcheck().set('Default')


def handle(controller, protocol, *args):
    return fuglu.ScanSession(controller).handle(protocol, *args)


def finished_as(controller, suspect_id):
    """(verdicts counted, messages counted as delivered, appender runs) after a message."""
    stats = controller.stats
    return ({name: count for name, count in stats.verdicts.items() if count},
            stats.outcount, [run for run in Recorder.ran if run[0] == suspect_id],
            len(stats.in_flight))


# -- the no-loss rule --------------------------------------------------------------------

def test_a_clean_message_is_committed_back_and_finished_as_delivered(controller):
    protocol = RecordingProtocol()
    suspect, action = handle(controller, protocol)
    assert action == fuglu.DUNNO and protocol.answers == [('commitback', None, None)]
    assert finished_as(controller, suspect.id) == ({'DUNNO': 1}, 1, [(suspect.id, 0)], 0)


@pytest.mark.parametrize('verdict,answer,status', [
    (fuglu.DELETE, 'discard', None),
    (fuglu.REJECT, 'reject', '5.7.1'),
    (fuglu.DEFER, 'defer', '4.7.1'),
])
def test_a_refusal_is_answered_and_never_committed_back(controller, verdict, answer, status):
    Verdict.verdict = verdict
    protocol = RecordingProtocol()
    suspect, action = handle(controller, protocol)
    # the plugin's text, with the message id ([main] suspectidreturn)
    assert protocol.answers == [(answer, 'the plugin says so (%s)' % suspect.id, status)]
    counted, delivered, appenders, in_flight = finished_as(controller, suspect.id)
    assert counted == {fuglu.actioncode_to_string(verdict): 1} and delivered == 0
    # appenders run for a decided message, never for a deferred one (it comes back)
    assert appenders == ([] if verdict == fuglu.DEFER else [(suspect.id, verdict)])


@pytest.mark.parametrize('broken', ['make_suspect', 'before_scan', 'scan', 'commitback'])
def test_every_failure_becomes_one_temporary_answer(controller, monkeypatch, broken):
    if broken == 'scan':
        def explode(self, suspect):
            raise RuntimeError('scan broke')
        monkeypatch.setattr(fuglu.ScanSession, 'scan', explode)
    protocol = RecordingProtocol(broken=broken)
    suspect, action = handle(controller, protocol)
    assert action == fuglu.DEFER
    refusals = [answer for answer in protocol.answers if answer[0] != 'commitback']
    assert len(refusals) == 1
    name, text, status = refusals[0]
    assert (name, status) == ('defer', '4.3.0')
    assert text.startswith('internal problem - message deferred')
    if broken == 'make_suspect':
        assert suspect is None and Recorder.ran == []
        return
    assert text.endswith('(%s)' % suspect.id)
    assert finished_as(controller, suspect.id) == ({'DEFER': 1}, 0, [], 0)
    assert controller.stats.errors == 1 and controller.exceptions


def test_a_commitback_that_did_not_deliver_is_finished_as_deferred(controller):
    # the downstream refused, or the peer left before it had the message
    protocol = RecordingProtocol(delivered=False)
    suspect, action = handle(controller, protocol)
    assert protocol.answers == [('commitback', None, None)]
    assert finished_as(controller, suspect.id) == ({'DEFER': 1}, 0, [], 0)


def test_a_plugin_that_fails_defers_the_message_never_passes_it_unscanned(controller):
    # FuGlu fails open here (its bug 23): a scanner that crashes lets the message through
    Verdict.verdict = ValueError
    protocol = RecordingProtocol()
    suspect, action = handle(controller, protocol)
    assert action == fuglu.DEFER
    assert protocol.answers == [('defer', 'message could not be checked (ValueError) (%s)'
                                 % suspect.id, '4.7.1')]
    assert any('plugin trouble' in error for error in suspect.tags['processingerrors'])
    assert finished_as(controller, suspect.id)[:2] == ({'DEFER': 1}, 0)


def test_an_answer_that_raises_still_finishes_the_message(controller):
    class Broken(RecordingProtocol):
        def defer(self, text, status='4.7.1'):
            raise OSError('cannot even defer')
    Verdict.verdict = fuglu.DEFER
    protocol = Broken()
    with pytest.raises(OSError):
        handle(controller, protocol)
    assert finished_as(controller, protocol.suspect.id) == ({'DEFER': 1}, 0, [], 0)


def test_a_verdict_before_the_scan_replaces_the_scan(controller):
    protocol = RecordingProtocol(before=(fuglu.REJECT, 'refused by an eob plugin'))
    suspect, action = handle(controller, protocol)
    assert action == fuglu.REJECT and Verdict.seen == []
    assert protocol.answers == [('reject', 'refused by an eob plugin (%s)' % suspect.id,
                                 '5.7.1')]


@pytest.mark.parametrize('configured,answer', [
    ('defer', 'defer'), ('reject', 'reject'), ('discard', 'discard'), ('dunno', 'defer'),
])
def test_a_refused_envelope_is_answered_as_address_compliance_fail_action_says(
        controller, configured, answer):
    controller.config.set('main', 'address_compliance_fail_action', configured)
    controller.config.set('main', 'address_compliance_fail_message', 'bad address\nreally')
    protocol = RecordingProtocol()
    suspect, action = handle(controller, protocol, 'no-at-sign')
    assert suspect is None and Verdict.seen == [] and Recorder.ran == []
    assert [(name, text) for name, text, _status in protocol.answers] == \
        [(answer, 'bad address really')]
    assert action == {'reject': fuglu.REJECT, 'discard': fuglu.DELETE}.get(configured,
                                                                          fuglu.DEFER)


# -- each protocol's answers on its wire ---------------------------------------------------

def smtp_session(controller, sock):
    connector = fuglu.SMTPConnector(controller, '127.0.0.1', 10025)
    return fuglu.AfterQueueSession(connector, sock, ('127.0.0.1', 4242))


def milter_session(controller, sock):
    connector = fuglu.MilterConnector(controller, '127.0.0.1', 10030)
    return fuglu.MilterSession(connector, sock, ('127.0.0.1', 4242))


def netcat_session(controller, sock):
    connector = fuglu.NetcatConnector(controller, '127.0.0.1', 10040)
    return fuglu.NetcatSession(connector, sock, ('127.0.0.1', 4242))


def milter_reply(code, text):
    return fuglu.milter_reply_code(code, text)


WIRE = [
    # protocol, answer, arguments, what the peer receives
    (smtp_session, 'discard', ('gone',), b'250 gone\r\n'),
    (smtp_session, 'reject', ('no thanks',), b'550 5.7.1 no thanks\r\n'),
    (smtp_session, 'reject', ('5.7.0 spam',), b'550 5.7.0 spam\r\n'),
    (smtp_session, 'defer', ('later',), b'451 4.7.1 later\r\n'),
    (smtp_session, 'defer', ('broken (id)', '4.3.0'), b'451 4.3.0 broken (id)\r\n'),
    (milter_session, 'discard', ('gone',), fuglu.milter_packet(fuglu.SMFIR_DISCARD)),
    (milter_session, 'reject', ('no thanks',), milter_reply(550, '5.7.1 no thanks')),
    (milter_session, 'defer', ('later',), milter_reply(450, '4.7.1 later')),   # FuGlu's 450
    (milter_session, 'defer', ('broken', '4.3.0'), milter_reply(450, '4.3.0 broken')),
    (netcat_session, 'discard', ('gone',), b'DISCARD:gone'),
    (netcat_session, 'reject', ('no thanks',), b'REJECT:no thanks'),
    (netcat_session, 'defer', ('later\r\nmore',), b'DEFER:later  more'),
    (netcat_session, 'defer', ('broken', '4.3.0'), b'DEFER:broken'),
]


@pytest.mark.parametrize('make,answer,arguments,expected', WIRE)
def test_each_protocol_puts_the_answers_on_its_wire(controller, make, answer, arguments,
                                                    expected):
    ours, peer = socket.socketpair()
    with ours, peer:
        session = make(controller, ours)
        assert getattr(session, answer)(*arguments) is True
        ours.shutdown(socket.SHUT_WR)
        assert fuglu.read_until_eof(peer) == (expected, False)


@pytest.mark.parametrize('make,expected', [
    (milter_session, fuglu.milter_packet(fuglu.SMFIR_CONTINUE)),
    (netcat_session, b'DUNNO:X-Fuglu-Spamstatus: NO\r\n' + MESSAGE),
])
def test_commitback_hands_the_message_back(controller, make, expected):
    ours, peer = socket.socketpair()
    with ours, peer:
        session = make(controller, ours)
        suspect = fuglu.Suspect('a@example.org', ['b@example.com'], inbuffer=MESSAGE)
        suspect.add_header('X-Fuglu-Spamstatus', 'NO')
        if make is milter_session:
            session.mode = fuglu.MilterMode(make_config('[milter]\nmilter_mode=readonly\n'))
        assert session.commitback(suspect) is True
        ours.shutdown(socket.SHUT_WR)
        assert fuglu.read_until_eof(peer) == (expected, False)


@pytest.mark.parametrize('make', [smtp_session, milter_session, netcat_session])
def test_an_answer_to_a_peer_that_is_gone_says_so_and_does_not_raise(controller, make):
    ours, peer = socket.socketpair()
    peer.close()
    with ours:
        session = make(controller, ours)
        assert session.defer('later') is False
