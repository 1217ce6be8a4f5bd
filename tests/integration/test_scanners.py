"""ClamavPlugin and SAPlugin against a REAL clamd and spamd on 127.0.0.1.

The peers come from conftest.py (a private clamd with a one-signature EICAR database, a
private offline spamd); they are installed with apt-get when missing. Without them these
tests fail, unless FUGLU_TEST_NO_PEERS=1 (then they are skipped).
"""

import base64
import io
import os
import signal
import subprocess
import sys
import time
import zipfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import fuglu  # noqa: E402
import peers  # noqa: E402
from peers import EICAR, GTUBE, EICAR_SIGNATURE_NAME  # noqa: E402
from fuglu_plugins.clamav import ClamavPlugin  # noqa: E402
from fuglu_plugins.spamassassin import SAPlugin  # noqa: E402


def make_config(text=''):
    config = fuglu.load_config(embedded=fuglu.EMBEDDED_CONFIG)
    config.read_config_text(text)
    return config


def clamav_plugin(port, **options):
    lines = ['[ClamavPlugin]', 'port = %s' % port] + ['%s = %s' % item for item in options.items()]
    return ClamavPlugin(make_config('\n'.join(lines) + '\n'))


def sa_plugin(port, main='', **options):
    lines = ['[SAPlugin]', 'port = %s' % port, 'retry_sleep = 0']
    lines += ['%s = %s' % item for item in options.items()]
    return SAPlugin(make_config('\n'.join(lines) + '\n' + main))


def mail(body, subject='test', extra_headers=b''):
    return (b'From: <sender@example.org>\r\nTo: <rcpt@example.net>\r\nSubject: ' + subject.encode()
            + b'\r\nDate: Wed, 25 Nov 2026 06:00:00 +0000\r\nMessage-ID: <%d@example.org>\r\n'
            % time.time_ns() + extra_headers + b'\r\n' + body + b'\r\n')


def with_attachment(name, content, content_type='application/octet-stream'):
    encoded = base64.encodebytes(content).replace(b'\n', b'\r\n')
    body = (b'--BOUNDARY\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n'
            b'--BOUNDARY\r\nContent-Type: ' + content_type.encode() + b'; name="' + name.encode()
            + b'"\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; '
              b'filename="'
            + name.encode() + b'"\r\n\r\n' + encoded + b'--BOUNDARY--')
    return mail(body, extra_headers=b'MIME-Version: 1.0\r\n'
                b'Content-Type: multipart/mixed; boundary="BOUNDARY"\r\n')


def zipped(name, content):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w', zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, content)
    return buffer.getvalue()


def suspect_of(source):
    suspect = fuglu.Suspect('sender@example.org', ['rcpt@example.net'], inbuffer=source)
    suspect.tags['incomingport'] = 10025
    return suspect


def closed_port():
    port = peers.free_port()
    assert not peers.port_accepts(port)
    return port


CLEAN_TEXT = b'Hello,\r\n\r\nthe meeting moves to Thursday at ten.\r\n\r\nRegards, Sam'


# ---------------------------------------------------------------------------
# ClamAV
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('source', [
    mail(b'here it comes: ' + EICAR),
    with_attachment('eicar.com', EICAR),
    with_attachment('eicar.zip', zipped('eicar.com', EICAR), 'application/zip'),
], ids=['body', 'attachment', 'zip'])
@pytest.mark.parametrize('transport', ['tcp', 'unix'])
def test_eicar_is_found(clamd, source, transport):
    port = clamd.tcp_port if transport == 'tcp' else clamd.socket_path
    suspect = suspect_of(source)
    action, message = clamav_plugin(port).examine(suspect)
    assert action == fuglu.DELETE
    assert message == 'threat detected: %s' % EICAR_SIGNATURE_NAME
    assert suspect.tags['virus'] == {'ClamAV': True}
    assert suspect.tags['ClamAV.virus'] == {'stream': EICAR_SIGNATURE_NAME}


def test_clean_mail_is_clean(clamd):
    suspect = suspect_of(with_attachment('notes.zip', zipped('notes.txt', CLEAN_TEXT),
                                         'application/zip'))
    assert clamav_plugin(clamd.tcp_port).examine(suspect) == fuglu.DUNNO
    assert suspect.tags['virus'] == {'ClamAV': False}


def test_virusaction_and_rejectmessage(clamd):
    plugin = clamav_plugin(clamd.tcp_port, virusaction='REJECT',
                           rejectmessage='${virusname} found in mail to ${to_address}')
    action, message = plugin.examine(suspect_of(mail(EICAR)))
    assert action == fuglu.REJECT
    assert message == '%s found in mail to rcpt@example.net' % EICAR_SIGNATURE_NAME


def test_unofficial_action_applies_to_our_unsigned_database(clamd):
    plugin = clamav_plugin(clamd.tcp_port, virusaction='REJECT', virusaction_unofficial='DEFER')
    assert plugin.examine(suspect_of(mail(EICAR)))[0] == fuglu.DEFER


@pytest.mark.parametrize('port', ['closed-tcp', '/nonexistent/clamd.sock'])
def test_clamd_down_gives_problemaction(port):
    if port == 'closed-tcp':
        port = closed_port()
    suspect = suspect_of(mail(EICAR))
    assert clamav_plugin(port, retries=2).examine(suspect)[0] == fuglu.DEFER
    assert (clamav_plugin(port, retries=1, problemaction='REJECT').examine(suspect)[0]
            == fuglu.REJECT)
    assert 'ClamAV' not in suspect.tags['virus']


def test_message_over_maxsize_is_not_scanned(clamd):
    suspect = suspect_of(mail(EICAR + b'\r\n' + b'padding line\r\n' * 200))
    assert clamav_plugin(clamd.tcp_port, maxsize=1000).examine(suspect) == fuglu.DUNNO
    assert suspect.get_tag('ClamavPlugin.skipreason') == 'size skip'
    assert 'ClamAV' not in suspect.tags['virus']


class SmallStreamClamd(peers.ClamdInstance):
    """The private clamd with a 1 MB StreamMaxLength."""

    def write_config(self):
        super().write_config()
        with open(self.conf_path, 'a') as conf:
            conf.write('StreamMaxLength 1M\n')


@pytest.fixture(scope='module')
def small_stream_clamd(peer_packages):
    yield from peers.run_in_world_dir(SmallStreamClamd, 'fuglu-clamd-small-')


@pytest.mark.parametrize('transport', ['tcp', 'unix'])
def test_message_over_clamds_stream_limit_is_not_clean(small_stream_clamd, caplog, transport):
    port = small_stream_clamd.tcp_port if transport == 'tcp' else small_stream_clamd.socket_path
    # EICAR at the very end, beyond the limit: a "clean" verdict would be a lie.
    suspect = suspect_of(mail(b'filler line\r\n' * 200000 + EICAR))
    assert suspect.size > 2 * 1024 * 1024
    with caplog.at_level('DEBUG', logger='fuglu.plugin.ClamavPlugin'):
        action, _ = clamav_plugin(port).examine(suspect)
    assert action == fuglu.DEFER
    assert 'ClamAV' not in suspect.tags['virus']
    assert 'size limit exceeded' in caplog.text


def test_clamav_lint_against_real_clamd(clamd, capsys):
    assert clamav_plugin(clamd.socket_path).lint() is True
    output = capsys.readouterr().out
    assert 'Got Pong: PONG' in output
    assert "Clamav found virus {'stream': '%s'}" % EICAR_SIGNATURE_NAME in output


# ---------------------------------------------------------------------------
# SpamAssassin
# ---------------------------------------------------------------------------

def test_gtube_is_high_spam_with_the_right_score(spamd):
    plugin = sa_plugin(spamd.port, main='[spam]\ndefaulthighspamaction = REJECT\n',
                       rejectmessage='message from ${from_address} to ${to_domain} '
                                     'identified as spam (score=${spamscore})')
    suspect = suspect_of(mail(GTUBE))
    expected_spam, expected_score, _ = spamd.check(mail(GTUBE))
    action, message = plugin.examine(suspect)
    assert expected_spam and expected_score >= 999
    assert action == fuglu.REJECT
    score = suspect.tags['SpamAssassin.score']
    assert abs(score - expected_score) < 0.01
    assert message == 'message from sender@example.org to example.net identified as spam ' \
                      '(score=%s)' % score
    assert suspect.is_spam() and suspect.is_highspam()
    assert 'GTUBE' in suspect.tags['SpamAssassin.report']


def test_gtube_delivered_with_spam_headers_and_no_pseudo_headers(spamd):
    suspect = suspect_of(mail(GTUBE))
    assert sa_plugin(spamd.port).examine(suspect) == fuglu.DUNNO  # default high action DUNNO
    delivered = suspect.get_output_source()
    assert b'X-Spam-Flag: YES' in delivered and b'X-Spam-Status: Yes' in delivered
    # Neither the top headers nor the original that report_safe attaches carry them.
    assert b'X-Fuglu-Suspect' not in delivered and b'X-Fuglu-Incomingport' not in delivered
    assert b'Return-Path' not in delivered


def test_gtube_to_an_8bit_recipient_is_spam(spamd):
    # RCPT TO:<\xfe...> (kept as a surrogate) once crashed the plugin on its User header
    suspect = fuglu.Suspect('sender@example.org', ['\udcfe\u00e4@example.net'],
                            inbuffer=mail(GTUBE))
    assert sa_plugin(spamd.port).examine(suspect) == fuglu.DUNNO
    assert suspect.is_spam() and suspect.tags['SpamAssassin.score'] >= 999


def test_eicar_from_an_8bit_sender_is_found(clamd):
    suspect = fuglu.Suspect('\udcff@example.org', ['rcpt@example.net'], inbuffer=mail(EICAR))
    assert clamav_plugin(clamd.tcp_port).examine(suspect)[0] == fuglu.DELETE


def test_clean_mail_is_ham(spamd):
    suspect = suspect_of(mail(CLEAN_TEXT))
    assert sa_plugin(spamd.port).examine(suspect) == fuglu.DUNNO
    assert suspect.tags['spam'] == {'SpamAssassin': False}
    assert suspect.tags['SpamAssassin.score'] < 5
    delivered = suspect.get_output_source()
    assert b'X-Spam-Status: No' in delivered
    assert b'X-Fuglu' not in delivered and b'Return-Path' not in delivered
    assert delivered.endswith(mail(CLEAN_TEXT).split(b'\r\n\r\n', 1)[1])


@pytest.mark.parametrize('highspamlevel, expected', [('5000', fuglu.DEFER), ('500', fuglu.REJECT)])
def test_levels_map_to_configured_actions(spamd, highspamlevel, expected):
    plugin = sa_plugin(spamd.port, lowspamlevel='5', highspamlevel=highspamlevel,
                       lowspamaction='DEFER', highspamaction='REJECT')
    suspect = suspect_of(mail(GTUBE))
    assert plugin.examine(suspect)[0] == expected
    assert suspect.is_spam()
    assert suspect.is_highspam() == (expected == fuglu.REJECT)


def test_forwardoriginal_keeps_the_message(spamd):
    source = mail(GTUBE)
    suspect = suspect_of(source)
    plugin = sa_plugin(spamd.port, forwardoriginal='True', highspamaction='DELETE')
    assert plugin.examine(suspect)[0] == fuglu.DELETE
    assert not suspect.is_modified() and suspect.get_source() == source
    assert 'GTUBE' in suspect.tags['SpamAssassin.report']


def test_oversize_stripped_still_finds_gtube_and_keeps_original(spamd):
    source = with_attachment('big.bin', os.urandom(400000))
    source = source.replace(b'see attachment', b'see attachment ' + GTUBE)
    suspect = suspect_of(source)
    assert sa_plugin(spamd.port, highspamaction='REJECT').examine(suspect)[0] == fuglu.REJECT
    assert suspect.get_tag('SpamAssassin.stripped') is True
    assert suspect.get_source() == source
    assert suspect.addheaders['X-Spam-Flag'] == 'YES'


def test_oversize_without_stripping_is_skipped(spamd):
    suspect = suspect_of(mail(GTUBE + b'\r\n' + b'padding\r\n' * 100))
    plugin = sa_plugin(spamd.port, maxsize='500', strip_oversize='0', highspamaction='REJECT')
    assert plugin.examine(suspect) == fuglu.DUNNO
    assert suspect.addheaders['X-Fuglu-SA-SKIP'].startswith('Too big for spamchecks.')
    assert not suspect.is_spam()


def test_spamd_down_gives_problemaction():
    suspect = suspect_of(mail(GTUBE))
    assert sa_plugin(closed_port(), retries=2).examine(suspect)[0] == fuglu.DEFER
    assert suspect.addheaders['X-Fuglu-SA-SKIP'] == 'SA scan failed'


def test_spamd_not_answering_in_time_gives_problemaction(peer_packages):
    # A real spamd, frozen (SIGSTOP) after start: it accepts in the kernel, never answers.
    basedir = peers.world_dir('fuglu-spamd-frozen-')
    instance = peers.SpamdInstance(basedir, max_children=1)
    frozen = []
    try:
        instance.start()
        frozen = [instance.pid] + peers.child_pids(instance.pid)
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        plugin = sa_plugin(instance.port, timeout='0.3', retries='2', problemaction='DEFER')
        suspect = suspect_of(mail(GTUBE))
        started = time.monotonic()
        assert plugin.examine(suspect)[0] == fuglu.DEFER
        assert 0.55 < time.monotonic() - started < 4
        assert suspect.addheaders['X-Fuglu-SA-SKIP'] == 'SA scan failed'
    finally:
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        instance.stop()
        peers.remove_world_dir(basedir)


def test_spamassassin_lint_against_real_spamd(spamd, capsys):
    assert sa_plugin(spamd.port).lint() is True
    output = capsys.readouterr().out
    assert 'Got: SPAMD/1.5 0 PONG' in output
    assert 'GTUBE has been detected correctly' in output


# ---------------------------------------------------------------------------
# fuglu --lint with both plugins
# ---------------------------------------------------------------------------

def run_lint(tmp_world_dir, clamd_port, spamd_port):
    config_path = os.path.join(tmp_world_dir, 'fuglu.conf')
    with open(config_path, 'w') as conf:
        conf.write('[main]\nincomingport = smtp:127.0.0.1:%d\noutgoinghost = 127.0.0.1\n'
                   'outgoingport = %d\nplugins = clamav,spamassassin\nprependers =\nappenders =\n'
                   'controlport = %s\n[ClamavPlugin]\nport = %s\n[SAPlugin]\nport = %s\n'
                   % (peers.free_port(), peers.free_port(),
                      os.path.join(tmp_world_dir, 'control.sock'),
                      clamd_port, spamd_port))
    return subprocess.run([sys.executable, os.path.join(peers.REPO_DIR, 'fuglu.py'), '--lint',
                           '-c', config_path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=120)


def test_fuglu_lint_prints_pong_eicar_and_gtube(clamd, spamd, tmp_world_dir):
    result = run_lint(tmp_world_dir, clamd.socket_path, spamd.port)
    output = result.stdout.decode('utf-8', 'replace')
    assert result.returncode == 0, output
    assert 'Linting Plugin Clam AV Config section: ClamavPlugin' in output
    assert 'Got Pong: PONG' in output
    assert "Clamav found virus {'stream': '%s'}" % EICAR_SIGNATURE_NAME in output
    assert 'Linting Plugin SpamAssassin Config section: SAPlugin' in output
    assert 'Got: SPAMD/1.5 0 PONG' in output
    assert 'GTUBE has been detected correctly' in output
    assert 'Lint status: OK' in output


def test_fuglu_lint_fails_when_clamd_is_down(spamd, tmp_world_dir):
    result = run_lint(tmp_world_dir, closed_port(), spamd.port)
    output = result.stdout.decode('utf-8', 'replace')
    assert result.returncode != 0, output
    assert 'Lint status: FAIL' in output
