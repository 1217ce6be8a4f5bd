"""fuglu as Postfix's after-queue content_filter, with a real private Postfix on 127.0.0.1:
Postfix -> fuglu (smtp connector) -> Postfix re-injection smtpd -> Maildir.

Covers delivery with X-Fuglu-Suspect, the downstream's outage and fuglu's own outage
(no mail lost), 8-bit and SMTPUTF8 mail passing byte-identical apart from the added
headers, the same with dist/fuglu.pyz, and linting a FuGlu-style fuglu.conf with the
zipapp alone in an empty directory on every installed CPython 3.8-3.13.
"""

import glob
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import threading
import uuid

import pytest

import peers

REPO = peers.REPO_DIR

SUSPECT_HEADER_RE = re.compile(rb'^X-Fuglu-Suspect: ([0-9a-f]{32})\r?$', re.MULTILINE)


def unique_address(label):
    return '%s-%s@example.com' % (label, uuid.uuid4().hex[:12])


def simple_message(recipient, subject, body=b'Hello through fuglu.\r\n'):
    return (b'From: sender@example.org\r\n'
            b'To: ' + recipient.encode('utf-8') + b'\r\n'
            b'Subject: ' + subject.encode('utf-8') + b'\r\n'
            b'Message-Id: <' + uuid.uuid4().hex.encode() + b'@example.org>\r\n'
            b'Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n'
            b'\r\n' + body)


def fuglu_config(postfix, outgoingport=None, extra_main=''):
    return ('[main]\n'
            'incomingport = smtp:127.0.0.1:%d\n'
            'outgoinghost = 127.0.0.1\n'
            'outgoingport = %d\n'
            'plugins =\n'
            'prependers =\n'
            'appenders =\n'
            'controlport =\n'
            '%s'
            '[performance]\n'
            'minthreads = 2\n'
            'maxthreads = 10\n'
            % (postfix.filter_port, outgoingport or postfix.reinject_port, extra_main))


def suspect_id(delivered):
    match = SUSPECT_HEADER_RE.search(delivered)
    assert match, 'no X-Fuglu-Suspect header in:\n%s' % delivered[:2000].decode('utf-8', 'replace')
    return match.group(1).decode()


def wait_queue_empty(postfix, timeout=20):
    peers.wait_until(lambda: postfix.queue_size() == 0, timeout, interval=0.2,
                     what='empty Postfix queue')


class TcpForwarder(object):
    """A plain TCP relay 127.0.0.1:port -> 127.0.0.1:target, started on demand: plays a
    downstream that is down (not started) and comes back (started)."""

    def __init__(self, target_port):
        self.port = peers.free_port()
        self.target_port = target_port
        self.sock = None
        self.connections = []

    def start(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(('127.0.0.1', self.port))
        self.sock.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(('127.0.0.1', self.target_port), timeout=30)
            self.connections += [client, upstream]
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    @staticmethod
    def _pump(source, target):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self):
        if self.sock is not None:
            self.sock.close()
        for sock in self.connections:
            sock.close()


def header_lines(block):
    """Unfolded header lines (bytes) of a header block with LF or CRLF line ends."""
    lines = []
    for line in block.replace(b'\r\n', b'\n').split(b'\n'):
        if line[:1] in (b' ', b'\t') and lines:
            lines[-1] += b'\n' + line
        elif line:
            lines.append(line)
    return lines


def split_message(raw):
    normalized = raw.replace(b'\r\n', b'\n')
    head, _, body = normalized.partition(b'\n\n')
    return header_lines(head), body


MTA_HEADERS = (b'return-path:', b'x-original-to:', b'delivered-to:', b'received:', b'x-fuglu-')


def assert_identical_apart_from_added_headers(original, delivered):
    """Body bytes equal; the original header lines appear unchanged and in order; the
    only other headers are those Postfix and fuglu add."""
    original_headers, original_body = split_message(original)
    delivered_headers, delivered_body = split_message(delivered)
    assert delivered_body == original_body
    kept = [line for line in delivered_headers if not line.lower().startswith(MTA_HEADERS)]
    assert kept == original_headers
    assert any(line.startswith(b'X-Fuglu-Suspect: ') for line in delivered_headers)


# -- (a) delivery ---------------------------------------------------------------------

def test_mail_is_delivered_through_fuglu_with_its_suspect_header(postfix_factory, fuglu_factory):
    postfix = postfix_factory('afterqueue')
    fuglu = fuglu_factory(fuglu_config(postfix))
    recipient = unique_address('delivered')
    other = unique_address('second')

    reply = postfix.send('sender@example.org', [recipient, other],
                         simple_message(recipient, 'through fuglu'))
    assert reply.code == 250, reply
    delivered = postfix.wait_delivered(recipient, timeout=20)
    assert b'Subject: through fuglu' in delivered
    assert b'X-Fuglu-Spamstatus: NO' in delivered
    message_id = suspect_id(delivered)
    assert message_id in fuglu.log_text()
    # the second recipient got the same message (one scan, one re-injection)
    assert suspect_id(postfix.wait_delivered(other, timeout=20)) == message_id
    # Postfix got fuglu's requeue reply, and the re-injection got the original client and
    # queue id by XFORWARD (Postfix logs them as orig_queue_id / orig_client)
    postfix.wait_log(r'relay=127\.0\.0\.1\[127\.0\.0\.1\]:%d.*status=sent \(250 FUGLU REQUEUE\(%s\)'
                     % (postfix.filter_port, message_id))
    queue_id = reply.text.rsplit(' ', 1)[-1]
    postfix.wait_log(r'postfix/smtpd\[\d+\]: \w+: client=.*orig_queue_id=%s' % queue_id)
    wait_queue_empty(postfix)


# -- (b) the downstream is down --------------------------------------------------------

def test_downstream_down_postfix_defers_and_delivers_when_it_is_back(postfix_factory,
                                                                     fuglu_factory):
    postfix = postfix_factory('afterqueue')
    downstream = TcpForwarder(postfix.reinject_port)   # not started: nothing listens yet
    try:
        fuglu_factory(fuglu_config(postfix, outgoingport=downstream.port))
        recipients = [unique_address('downstream-down-%d' % n) for n in range(3)]
        for recipient in recipients:
            reply = postfix.send('sender@example.org', [recipient],
                                 simple_message(recipient, 'waits'))
            assert reply.code == 250, reply
        # fuglu answers 4xx, so Postfix keeps the mail and says why
        postfix.wait_log(r'status=deferred \(host 127\.0\.0\.1\[127\.0\.0\.1\] said: 451',
                         timeout=20)
        assert 'status=sent' not in postfix.log_text()
        assert postfix.delivered() == []
        assert postfix.queue_size() == 3

        downstream.start()
        postfix.flush()
        for recipient in recipients:
            delivered = postfix.wait_delivered(recipient, timeout=30)
            suspect_id(delivered)
        wait_queue_empty(postfix)
        for recipient in recipients:
            assert len(postfix.delivered(recipient)) == 1     # delivered once, nothing lost
    finally:
        downstream.stop()


def test_downstream_refuses_postfix_defers_and_delivers_after_restart(postfix_factory,
                                                                      fuglu_factory):
    # fuglu pointed at a port with nothing listening, then restarted with the right one
    postfix = postfix_factory('afterqueue')
    wrong = fuglu_factory(fuglu_config(postfix, outgoingport=peers.free_port()))
    recipient = unique_address('wrong-port')
    assert (postfix.send('sender@example.org', [recipient], simple_message(recipient, 'x')).code
            == 250)
    postfix.wait_log(r'status=deferred .*said: 451', timeout=20)
    assert postfix.queue_size() == 1
    wrong.stop()
    fuglu_factory(fuglu_config(postfix))
    postfix.flush()
    suspect_id(postfix.wait_delivered(recipient, timeout=30))
    wait_queue_empty(postfix)


def test_a_silent_downstream_gets_postfix_fuglus_451_not_its_own_timeout(postfix_factory,
                                                                          fuglu_factory):
    # the downstream accepts the connection and never speaks: fuglu gives up after
    # downstream_reply_timeout, long before Postfix's smtp_mail_timeout (300 s)
    postfix = postfix_factory('afterqueue')
    silent = socket.socket()
    silent.bind(('127.0.0.1', 0))
    silent.listen(8)
    try:
        fuglu_factory(fuglu_config(postfix, outgoingport=silent.getsockname()[1],
                                   extra_main='downstream_reply_timeout = 0.5\n'
                                              'outgoingretry = 0\n'))
        recipient = unique_address('silent-downstream')
        reply = postfix.send('sender@example.org', [recipient], simple_message(recipient, 'x'))
        assert reply.code == 250
        postfix.wait_log(r'status=deferred \(host 127\.0\.0\.1\[127\.0\.0\.1\] said: 451 4\.4\.2 '
                         r'downstream 127\.0\.0\.1:\d+ did not answer in time', timeout=60)
        assert postfix.queue_size() == 1
    finally:
        silent.close()


# -- (c) fuglu itself is down ------------------------------------------------------------

def test_fuglu_stopped_mail_waits_in_the_queue_and_nothing_is_lost(postfix_factory, fuglu_factory):
    postfix = postfix_factory('afterqueue')
    first = fuglu_factory(fuglu_config(postfix))
    before = unique_address('before-outage')
    assert (postfix.send('sender@example.org', [before], simple_message(before, 'before')).code
            == 250)
    suspect_id(postfix.wait_delivered(before, timeout=20))

    assert first.stop() is not None
    during = [unique_address('during-outage-%d' % n) for n in range(3)]
    for recipient in during:
        reply = postfix.send('sender@example.org', [recipient], simple_message(recipient, 'during'))
        assert reply.code == 250
    postfix.wait_log(r'status=deferred .*Connection refused', timeout=20)
    peers.wait_until(lambda: postfix.queue_size() == 3, 20, interval=0.2, what='3 queued messages')
    assert all(postfix.delivered(recipient) == [] for recipient in during)

    fuglu_factory(fuglu_config(postfix))
    postfix.flush()
    ids = set()
    for recipient in during:
        ids.add(suspect_id(postfix.wait_delivered(recipient, timeout=30)))
    assert len(ids) == 3
    wait_queue_empty(postfix)
    for recipient in during + [before]:
        assert len(postfix.delivered(recipient)) == 1


# -- (d) 8-bit and SMTPUTF8 ---------------------------------------------------------------

def test_8bit_mail_arrives_byte_identical(postfix_factory, fuglu_factory):
    postfix = postfix_factory('afterqueue')
    fuglu_factory(fuglu_config(postfix))
    recipient = unique_address('eightbit')
    message = (b'From: =?utf-8?q?J=C3=B6rg?= <joerg@example.org>\r\n'
               b'To: ' + recipient.encode() + b'\r\n'
               b'Subject: caf\xc3\xa9 au lait\r\n'
               b'X-Latin1: caf\xe9 cr\xe8me\r\n'
               b'Message-Id: <' + uuid.uuid4().hex.encode() + b'@example.org>\r\n'
               b'Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n'
               b'MIME-Version: 1.0\r\n'
               b'Content-Type: text/plain; charset=iso-8859-1\r\n'
               b'Content-Transfer-Encoding: 8bit\r\n'
               b'\r\n'
               b'Gr\xfc\xdfe aus Z\xfcrich \xa4 \x80\xff\r\n'
               b'.a line with a leading dot\r\n'
               b'a long line ' + b'\xe9' * 900 + b'\r\n')
    reply = postfix.send('sender@example.org', [recipient], message)
    assert reply.code == 250, reply
    delivered = postfix.wait_delivered(recipient, timeout=20)
    assert_identical_apart_from_added_headers(message, delivered)


def test_smtputf8_mail_arrives_byte_identical(postfix_factory, fuglu_factory):
    postfix = postfix_factory('afterqueue')
    fuglu_factory(fuglu_config(postfix))
    recipient = 'zoë-%s@exämple.com' % uuid.uuid4().hex[:8]
    sender = 'jörg@exämple.org'
    message = ('From: Jörg <%s>\r\n'
               'To: Zoë <%s>\r\n'
               'Subject: Grüße ✓ 日本語のテキスト\r\n'
               'Message-Id: <%s@exämple.org>\r\n'
               'Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n'
               'MIME-Version: 1.0\r\n'
               'Content-Type: text/plain; charset=utf-8\r\n'
               'Content-Transfer-Encoding: 8bit\r\n'
               '\r\n'
               'Schöne Grüße 🙂\r\n'
               '..two dots\r\n' % (sender, recipient, uuid.uuid4().hex)).encode('utf-8')
    reply = postfix.send(sender, [recipient], message, smtputf8=True)
    assert reply.code == 250, reply
    delivered = postfix.wait_delivered(recipient, timeout=20)
    # the re-injection smtpd takes a UTF-8 envelope only with SMTPUTF8: fuglu passed it on
    assert_identical_apart_from_added_headers(message, delivered)
    assert ('to=<%s>' % recipient) in postfix.log_text()


# -- (e) and (f) the zipapp -----------------------------------------------------------------

@pytest.fixture(scope='module')
def zipapp(tmp_path_factory):
    """dist/fuglu.pyz built from this checkout (into a temporary folder), alone in an
    otherwise empty folder."""
    builder = os.path.join(REPO, 'build_zipapp.py')
    if not os.path.exists(builder):
        pytest.skip('build_zipapp.py does not exist yet')
    build_dir = str(tmp_path_factory.mktemp('build'))
    target = os.path.join(build_dir, 'fuglu.pyz')
    result = subprocess.run([sys.executable, builder, '-o', target], cwd=REPO,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=120)
    assert result.returncode == 0, result.stdout.decode()
    alone = peers.world_dir('fuglu-pyz-')
    shutil.copy(target, os.path.join(alone, 'fuglu.pyz'))
    yield os.path.join(alone, 'fuglu.pyz')
    peers.remove_world_dir(alone)


# the two longest values of FuGlu's own fuglu.conf, as its dist file has them
FUGLU_STYLE_LOGTEMPLATE = (
    'Suspect ${id} from=${from_address} to=${to_address} size=${size} spam=${spam} '
    'virus=${virus} modified=${modified} decision=${decision}')
FUGLU_STYLE_SQL = (
    "SELECT value FROM fugluconfig WHERE `section`=:section AND `scope` IN "
    "(:globalscope,CONCAT('%',:to_domain),:to_address) AND `option`=:option "
    "ORDER BY `scope` DESC LIMIT 1")

FUGLU_STYLE_CONF = """\
# A fuglu.conf as FuGlu 1.x users have it
[main]
identifier=dist
daemonize=1
scantimelogger=0
user=nobody
group=nobody
plugindir=
plugins=
prependers=debug,skip
appenders=
bindaddress=127.0.0.1
incomingport={incoming}
outgoinghelo=
outgoinghost=127.0.0.1
outgoingport={outgoing}
outgoingretry=1
tempdir=/tmp
prependaddedheaders=X-Fuglu-
trashdir=
trashlog=0
disablebounces=0
nobouncefile=${{confdir}}/rules/nobounce.txt
debuginfoheader=0
spamstatusheader=1
suspectidheader=1
suspectidreturn=1
mrtgdir=
controlport={controlport}
logtemplate={logtemplate}
versioncheck=1
address_compliance_checker=Default
address_compliance_fail_action=defer
address_compliance_fail_message=invalid sender or recipient address

[PluginAlias]
debug=fuglu.plugins.p_debug.MessageDebugger
skip=fuglu.plugins.p_skipper.PluginSkipper
fraction=fuglu.plugins.p_fraction.PluginFraction
archive=fuglu.plugins.archive.ArchivePlugin
attachment=fuglu.plugins.attachment.FiletypePlugin
clamav=fuglu.plugins.clamav.ClamavPlugin
spamassassin=fuglu.plugins.sa.SAPlugin
vacation=fuglu.plugins.vacation.VacationPlugin

[performance]
backend=thread
minthreads=2
maxthreads=40
initialprocs=0

[spam]
defaultlowspamaction=DUNNO
defaulthighspamaction=DUNNO

[virus]
defaultvirusaction=DELETE

[smtpconnector]
requeuetemplate=FUGLU REQUEUE(${{id}}): ${{injectanswer}}

[esmtpconnector]
queuetemplate=${{injectanswer}}

[environment]
boundarydistance=0
trustedhostsregex=

[databaseconfig]
dbconnectstring=
sql={sql}

[debug]
debugport={debugport}
debugfile=${{confdir}}/fuglu_debug.log
nobounce=True
noreinject=True
noappender=True

[PluginSkipper]
filterfile=${{confdir}}/skipplugins.regex
"""


def write_fuglu_style_conf(folder, incoming, outgoing, debugport, controlport):
    with open(os.path.join(folder, 'skipplugins.regex'), 'w') as rules:
        rules.write('@incomingport ^10099$ SAPlugin\n')
    path = os.path.join(folder, 'fuglu.conf')
    with open(path, 'w') as conf:
        conf.write(FUGLU_STYLE_CONF.format(incoming=incoming, outgoing=outgoing,
                                           debugport=debugport,
                                           controlport=controlport,
                                           logtemplate=FUGLU_STYLE_LOGTEMPLATE,
                                           sql=FUGLU_STYLE_SQL))
    return path


def test_delivery_through_the_zipapp_on_a_fuglu_style_config(postfix_factory, fuglu_factory,
                                                             zipapp):
    postfix = postfix_factory('afterqueue')
    confdir = peers.world_dir('fuglu-conf-')
    try:
        debugport = peers.free_port()
        conf = write_fuglu_style_conf(confdir, '%d,%d' % (postfix.filter_port, debugport),
                                      postfix.reinject_port, debugport,
                                      os.path.join(confdir, 'control.sock'))
        process = fuglu_factory(conf, program=zipapp)
        recipient = unique_address('zipapp')
        message = simple_message(recipient, 'through the pyz', b'8-bit: \xc3\xa9\r\n.dot\r\n')
        reply = postfix.send('sender@example.org', [recipient], message)
        assert reply.code == 250, reply
        delivered = postfix.wait_delivered(recipient, timeout=20)
        assert suspect_id(delivered) in process.log_text()
        assert_identical_apart_from_added_headers(message, delivered)
        wait_queue_empty(postfix)
    finally:
        peers.remove_world_dir(confdir)


def installed_pythons():
    """python3.8 ... python3.13 executables under pyenv or on PATH (pyenv shims do not
    count: they only run the globally selected versions)."""
    found = {}
    root = os.environ.get('PYENV_ROOT', os.path.expanduser('~/.pyenv'))
    for minor in range(8, 14):
        name = 'python3.%d' % minor
        candidates = sorted(glob.glob(os.path.join(root, 'versions', '3.%d.*' % minor, 'bin',
                                                   name)))
        on_path = shutil.which(name)
        if on_path and '/shims/' not in on_path:
            candidates.append(on_path)
        for candidate in candidates:
            if os.access(candidate, os.X_OK):
                found['3.%d' % minor] = candidate
                break
    return found


PYTHONS = installed_pythons()


@pytest.mark.parametrize('version', sorted(PYTHONS) or ['none'])
def test_zipapp_alone_lints_a_fuglu_style_config(zipapp, version, tmp_world_dir):
    if version == 'none':
        pytest.fail('no CPython 3.8-3.13 found')
    python = PYTHONS[version]
    # lint checks as [main] user (nobody) would: everything in folders it can read
    tmp_path = pathlib.Path(tmp_world_dir)
    confdir = tmp_path / 'etc'
    confdir.mkdir()
    os.chmod(str(confdir), 0o755)
    os.chown(str(confdir), peers.pwd.getpwnam('nobody').pw_uid, -1)   # debugfile=${confdir}/...
    ports = [peers.free_port() for _ in range(3)]   # lint checks that they are free
    conf = write_fuglu_style_conf(str(confdir), ','.join(map(str, ports)), 10026, ports[2],
                                  '/tmp/fuglu_control.sock')
    empty = tmp_path / 'empty'
    empty.mkdir()
    os.chmod(str(empty), 0o755)
    shutil.copy(zipapp, str(empty / 'fuglu.pyz'))
    result = subprocess.run([python, '-I', 'fuglu.pyz', '--lint', '-c', conf], cwd=str(empty),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120,
                            env={'PATH': os.environ.get('PATH', '/usr/bin:/bin')})
    out = result.stdout.decode('utf-8', 'replace')
    assert result.returncode == 0, out
    assert 'Linting Plugin Debugger' in out and 'Linting Plugin Plugin Skipper' in out, out
    assert '0 plugins reported errors' in out
    assert sorted(os.listdir(str(empty))) == ['fuglu.pyz']   # lint wrote nothing beside it


def test_zipapp_lint_fails_on_a_broken_config(zipapp, tmp_path):
    conf = tmp_path / 'fuglu.conf'
    conf.write_text('[main]\nplugins = nosuchplugin\nprependers =\nappenders =\n'
                    'incomingport = 10025\noutgoingport = notaport\n')
    result = subprocess.run([sys.executable, '-I', zipapp, '--lint', '-c', str(conf)],
                            cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    out = result.stdout.decode('utf-8', 'replace')
    assert result.returncode != 0, out
    assert '[main] outgoingport' in out and 'nosuchplugin' in out
