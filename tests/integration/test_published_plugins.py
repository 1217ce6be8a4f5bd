"""Plugins in the styles published for FuGlu (tests/integration/plugins/published/) in
a plugindir, run by fuglu.pyz under CPython 3.8 and 3.13 behind every connector: the
smtp (after-queue), esmtp (before-queue) and milter connectors with a real private
Postfix, and netcat driven directly.

What each message shows: headers added by sync scanners (templates, tags; one using
FuGlu's redis mixin and DNS extension, which this build lacks), the size
an external command read from suspect.tempfile (and that file gone afterwards), a body
rewritten with set_message_rep(), an async scanner's rejection with its template, a
prepender skipping that scanner, and an appender logging the tags the scanners left."""

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

import peers
from test_afterqueue import installed_pythons

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_netcat import pipe  # noqa: E402  (the netcat client of the unit tests)

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGIN_DIR = os.path.join(HERE, 'plugins', 'published')
PYTHONS = installed_pythons()
VERSIONS = ['3.8', '3.13']
CONNECTORS = ['smtp', 'esmtp', 'milter', 'netcat']


@pytest.fixture(scope='module')
def pyz(tmp_path_factory):
    target = str(tmp_path_factory.mktemp('pyz') / 'fuglu.pyz')
    subprocess.run([sys.executable, os.path.join(peers.REPO_DIR, 'build_zipapp.py'), '-o', target],
                   check=True, stdout=subprocess.DEVNULL, timeout=120)
    alone = peers.world_dir('fuglu-pyz-')
    shutil.copy(target, os.path.join(alone, 'fuglu.pyz'))
    yield os.path.join(alone, 'fuglu.pyz')
    peers.remove_world_dir(alone)


def fuglu_config(connector, port, outgoing_port, workdir):
    return ('[main]\n'
            'incomingport = %s:127.0.0.1:%d\n'
            'outgoinghost = 127.0.0.1\n'
            'outgoingport = %d\n'
            'plugindir = %s\n'
            'plugins = envelope_tagger.EnvelopeTagger, async_subject_check.AsyncSubjectCheck, '
            'external_command.ExternalCommand, body_rewriter.BodyRewriter, '
            'reputation_check.ReputationCheck\n'
            'prependers = skip_prepender.SkipPrepender\n'
            'appenders = tag_logger.TagLogger\n'
            'controlport =\n'
            'tempdir = %s\n'
            'trusted_xforward_peers = 127.0.0.1\n'
            '[performance]\nminthreads = 2\nmaxthreads = 10\n'
            '[milter]\nmilter_mode = auto\n'
            '[TagLogger]\nlogfile = %s\n'
            '[ReputationCheck]\nscorefile = %s\n'
            % (connector, port, outgoing_port, PLUGIN_DIR, os.path.join(workdir, 'tmp'),
               os.path.join(workdir, 'tags.log'),
               os.path.join(PLUGIN_DIR, 'reputation_scores.txt')))


def message(recipient, subject, extra=b''):
    return (b'From: sender@example.org\r\nTo: ' + recipient.encode() + b'\r\n'
            b'Subject: ' + subject.encode() + b'\r\n'
            b'Message-Id: <' + uuid.uuid4().hex.encode() + b'@example.org>\r\n' + extra +
            b'\r\nHello from a published-style plugin test.\r\n')


def unique(label):
    return '%s-%s@example.com' % (label, uuid.uuid4().hex[:10])


def netcat_pipe(port, data):
    block = (b'X-DATA-PREPEND-START: t1\r\nX-ENV-SENDER: sender@example.org\r\n'
             b'X-ENV-RECIPIENT: netcat@example.com\r\nX-DATA-PREPEND-END: t1\r\n')
    return pipe(port, block + data)


class Deployment(object):
    """fuglu.pyz under one Python behind one connector, and how to send it mail."""

    def __init__(self, connector, python, pyz, postfix_factory, fuglu_factory):
        self.connector = connector
        self.workdir = peers.world_dir('fuglu-published-')
        os.mkdir(os.path.join(self.workdir, 'tmp'))
        peers.chown_tree(self.workdir, 'nobody')   # fuglu runs as [main] user, nobody
        self.postfix = None
        if connector == 'smtp':
            self.postfix = postfix_factory('afterqueue')
            port, outgoing = self.postfix.filter_port, self.postfix.reinject_port
        elif connector == 'esmtp':
            self.postfix = postfix_factory('beforequeue')
            port, outgoing = self.postfix.filter_port, self.postfix.reinject_port
        elif connector == 'milter':
            port, outgoing = peers.free_port(), 9
        else:
            port, outgoing = peers.free_port(), 9
        self.port = port
        self.fuglu = fuglu_factory(fuglu_config(connector, port, outgoing, self.workdir),
                                   program=pyz, python=python, workdir=self.workdir)
        if connector == 'milter':
            self.postfix = postfix_factory('milter', milter_port=port,
                                           milter_default_action='tempfail')

    def send(self, recipient, data):
        """-> (reply code, reply text, the delivered message or the netcat reply)."""
        if self.connector == 'netcat':
            reply = netcat_pipe(self.port, data)
            status, _, rest = reply.partition(b':')
            return status.decode(), rest.decode('utf-8',
                                                'replace'), rest if status == b'DUNNO' else None
        reply = self.postfix.send('sender@example.org', [recipient], data)
        if reply.code != 250:
            return reply.code, reply.text, None
        if self.connector == 'smtp':   # queued first, then scanned: delivered or bounced
            def outcome():
                delivered = self.postfix.delivered(recipient)
                if delivered:
                    return 250, reply.text, delivered[0]
                for line in self.postfix.log_text().splitlines():
                    if 'to=<%s>' % recipient in line and 'status=bounced' in line:
                        return 550, line, None
                return None
            return peers.wait_until(outcome, 30, what='delivery or bounce to %s' % recipient)
        return 250, reply.text, self.postfix.wait_delivered(recipient, timeout=30)

    def tag_records(self, count):
        path = os.path.join(self.workdir, 'tags.log')

        def written():
            return os.path.exists(path) and len(open(path).read().splitlines()) >= count
        peers.wait_until(written, 30, what='%d appender records' % count)
        with open(path) as handle:
            return [json.loads(line) for line in handle]

    def cleanup(self):
        peers.remove_world_dir(self.workdir)


@pytest.mark.parametrize('connector', CONNECTORS)
@pytest.mark.parametrize('version', VERSIONS)
def test_published_style_plugins_behind_every_connector(version, connector, pyz, postfix_factory,
                                                        fuglu_factory):
    if version not in PYTHONS:
        pytest.fail('CPython %s not installed (found %s)' % (version, sorted(PYTHONS)))
    deployment = Deployment(connector, PYTHONS[version], pyz, postfix_factory, fuglu_factory)
    try:
        accepted = unique('accepted')
        code, text, delivered = deployment.send(
            accepted, message(accepted, 'plain', b'X-Add-Footer: yes\r\n'))
        assert code in (250, 'DUNNO'), (code, text, deployment.fuglu.log_text()[-3000:])
        assert delivered is not None
        assert b'X-Envelope-Tagger: from=sender@example.org rcpts=1 sql=no' in delivered
        size = int(delivered.split(b'X-External-Size: ', 1)[1].split(b'\r\n', 1)[0].split(b'\n',
                                                                                          1)[0])
        assert size > 100
        assert b'X-Footer-Added: yes' in delivered and b'scanned by fuglu' in delivered
        # FuGlu's redis mixin and DNS extension without redis / a DNS library
        assert b'X-Reputation: domain=example.org score=5 dns=unknown redis=off' in delivered

        rejected = unique('rejected')
        code, text, delivered = deployment.send(rejected, message(rejected, 'please reject-me now'))
        assert delivered is None
        if connector in ('smtp', 'esmtp', 'milter'):
            assert code == 550 and 'subject of sender@example.org not welcome' in text, (code, text)
        if connector == 'netcat':
            assert code == 'REJECT' and 'subject of sender@example.org not welcome' in text

        skipped = unique('skipped')
        code, text, delivered = deployment.send(
            skipped, message(skipped, 'please reject-me now',
                             b'X-Skip-Plugin: AsyncSubjectCheck\r\n'))
        assert code in (250, 'DUNNO') and delivered is not None, (code, text)

        records = deployment.tag_records(3)
        by_subject = {record['subject']: record for record in records}
        plain = by_subject['plain']
        assert plain['decision'] == 'DUNNO' and plain['async_seen'] is True
        assert by_subject['plain']['sender'] == 'sender@example.org'
        assert by_subject['please reject-me now']['decision'] in ('REJECT', 'DUNNO')
        decisions = sorted(record['decision'] for record in records)
        assert decisions == ['DUNNO', 'DUNNO', 'REJECT'], records
        skipped_record = [r for r in records if r['skipped']][0]
        assert skipped_record['skipped'] == 'AsyncSubjectCheck'
        assert skipped_record['async_seen'] is None
        for record in records:   # suspect.tempfile was written (scanners after a REJECT do
            if record['decision'] == 'REJECT':   # not run), and removed at the end
                assert record['tempfile'] is None
                continue
            assert record['tempfile'].startswith(os.path.join(deployment.workdir, 'tmp'))
            # removed once the appenders are done, a moment after they wrote the record
            peers.wait_until(lambda: not os.path.exists(record['tempfile']), 10,
                             what='%s to be removed' % record['tempfile'])
        assert os.listdir(os.path.join(deployment.workdir, 'tmp')) == []
        assert 'Traceback' not in deployment.fuglu.log_text()
    finally:
        deployment.cleanup()
