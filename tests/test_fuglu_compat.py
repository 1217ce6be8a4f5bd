"""What FuGlu plugins rely on beyond names: suspect.tempfile, the plugin
helpers, FuConfigParser's FuGlu signatures, SuspectFilter(None) and its helpers,
Suspect's header helpers and address checks, apply_template's valuesfunction, the AV
base class, async plugins, and the refusal of FuGlu modules this build lacks."""

import configparser
import logging
import os
import threading

import pytest

from helpers import fuglu, make_config, run_fuglu_lint
from test_plugins import MESSAGE, controller_with, make_suspect, run_session, write_module

HTML = (b'From: Alice <alice@example.org>\r\nTo: bob@example.com\r\n'
        b'Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n'
        b'Received: from helo.example (rdns.example [192.0.2.1]) by mx.example.org\r\n'
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="B"\r\n\r\n'
        b'--B\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Hello <b>there</b></p>'
        b'<script>x()</script>\r\n'
        b'--B\r\nContent-Type: text/plain; charset=iso-8859-1\r\n'
        b'Content-Disposition: attachment\r\n\r\n'
        b'caf\xe9\r\n--B--\r\n')


# -- suspect.tempfile ---------------------------------------------------------------

def test_tempfile_is_written_on_first_access_and_removed_at_session_end(tmp_path):
    seen = {}

    class UsesTempfile(fuglu.ScannerPlugin):
        def examine(self, suspect):
            seen['path'] = suspect.tempfile
            seen['same'] = suspect.tempfile == seen['path']
            with open(suspect.tempfile, 'rb') as handle:
                seen['content'] = handle.read()
            return fuglu.DUNNO

    controller = controller_with('tempdir = %s\n' % tmp_path, plugins=[(UsesTempfile, None)])
    suspect, action, _, _ = run_session(controller)
    assert action == fuglu.DUNNO
    assert os.path.dirname(seen['path']) == str(tmp_path) and seen['same']
    assert seen['content'] == MESSAGE
    assert not os.path.exists(seen['path'])          # removed when the session ended
    assert os.listdir(str(tmp_path)) == []


def test_a_given_tempfile_is_used_and_kept(tmp_path):
    path = tmp_path / 'message.eml'
    path.write_bytes(MESSAGE)
    suspect = fuglu.Suspect('a@example.org', 'b@example.com', str(path))
    assert suspect.tempfile == str(path) and suspect.get_source() == MESSAGE
    suspect.cleanup()
    assert path.exists()


def test_no_tempfile_is_written_when_no_plugin_asks(tmp_path):
    controller = controller_with('tempdir = %s\n' % tmp_path)
    run_session(controller)
    assert os.listdir(str(tmp_path)) == []


# -- plugin helpers -------------------------------------------------------------------

PUBLISHED_STYLE = '''
from fuglu.shared import ScannerPlugin, DUNNO, REJECT, string_to_actioncode


class Publish(ScannerPlugin):
    def __init__(self, config, section=None):
        ScannerPlugin.__init__(self, config, section)
        self.logger = self._logger()
        self.requiredvars = {'action': {'default': 'REJECT', 'description': 'what to do'}}
        self.requiredvars.update({'limit': {'default': '5', 'description': 'how many'}})

    def examine(self, suspect):
        if self.config.getint(self.section, 'limit') < 3:
            return string_to_actioncode(self.config.get(self.section, 'action')), 'limited'
        return DUNNO
'''


def test_requiredvars_assigned_and_updated_in_init_give_defaults(tmp_path):
    module = write_module(tmp_path, PUBLISHED_STYLE)
    config = make_config('[main]\nplugindir = %s\nplugins = %s.Publish\n[Publish]\nlimit = 2\n'
                         % (tmp_path, module))
    plugin = fuglu.MainController(config).load_plugins()[0][0]
    assert plugin._logger().name == 'fuglu.plugin.Publish'
    assert config.get('Publish', 'action') == 'REJECT'
    assert plugin.examine(make_suspect()) == (fuglu.REJECT, 'limited')
    assert plugin.lint() is True


def test_old_style_requiredvars_list_and_checkConfig(capsys):
    class OldStyle(fuglu.ScannerPlugin):
        def __init__(self, config, section=None):
            fuglu.ScannerPlugin.__init__(self, config, section)
            self.requiredvars = ['needed']

    config = make_config('[main]\n[OldStyle]\n')
    plugin = OldStyle(config)
    assert plugin.checkConfig() is False
    assert 'needed' in capsys.readouterr().out
    config.set('OldStyle', 'needed', 'yes')
    assert plugin.check_config() is True


def test_problemcode_and_lint_actioncode(capsys):
    config = make_config('[main]\n[P]\nproblemaction = reject\nbad = nonsense\n')
    plugin = fuglu.ScannerPlugin(config, 'P')
    assert plugin._problemcode() == fuglu.REJECT
    assert plugin._problemcode('unset') == fuglu.DEFER
    assert plugin.lint_actioncode('problemaction') is True
    assert plugin.lint_actioncode('bad') is False
    assert plugin.lint_actioncode('bad', allow_extras=('NONSENSE',)) is True
    assert 'not a valid action' in capsys.readouterr().out


def test_run_examine_applies_overrideaction():
    class Rejects(fuglu.ScannerPlugin):
        def examine(self, suspect):
            return fuglu.REJECT, 'no'

    config = make_config('[main]\n[Rejects]\noverrideaction = DUNNO\n')
    assert Rejects(config).run_examine(make_suspect()) == fuglu.DUNNO


def test_camelcase_names_still_work_and_log_that_they_are_old(caplog):
    suspect = make_suspect()
    with caplog.at_level(logging.ERROR, logger='fuglu.deprecated'):
        assert suspect.getSource() == MESSAGE
        assert suspect.getOriginalSource() == MESSAGE
        assert suspect.getMessageRep()['Subject'] == 'plugin test'
        message = suspect.getMessageRep()
        message.replace_header('Subject', 'changed')
        suspect.setMessageRep(message)
        suspect.addheader('X-Old', 'name')
        suspect.setSource(suspect.getSource().replace(b'body', b'BODY'))
    assert b'Subject: changed' in suspect.get_source() and b'BODY' in suspect.get_source()
    assert suspect.addheaders == {'X-Old': 'name'}
    for old in ('getSource', 'getOriginalSource', 'getMessageRep', 'setMessageRep', 'addheader',
                'setSource'):
        assert 'called deprecated function Suspect.%s' % old in caplog.text


# -- FuConfigParser -------------------------------------------------------------------

def test_config_get_with_positional_fallback_and_override():
    config = fuglu.FuConfigParser()
    config.add_section('s')
    config.set('s', 'there', 'value')
    assert config.get('s', 'missing', 'fallback') == 'fallback'
    assert config.get('s', 'missing', None) is None
    assert config.get('s', 'there', 'fallback') == 'value'
    assert config.get('s', 'there', override='other') == 'other'
    with pytest.raises(configparser.NoOptionError):
        config.get('s', 'missing')
    assert config.getint('s', 'missing', 7) == 7
    assert config.getboolean('s', 'missing', False) is False


def test_numbers_set_as_numbers_and_update_defaults(monkeypatch):
    config = fuglu.FuConfigParser()
    config.add_section('s')
    config.set('s', 'count', 5)
    config.set('s', 'ratio', 0.5)
    config.set('s', 'flag', 1)
    assert config.getint('s', 'count') == 5
    assert config.getfloat('s', 'ratio') == 0.5
    assert config.getboolean('s', 'flag') is True
    config.update_defaults('s', {'timeout': {'default': 30},
                                 'name': {'default': 'x', 'section': 'o'}})
    assert config.getint('s', 'timeout') == 30
    assert config.get('o', 'name') == 'x'
    monkeypatch.setenv('FUGLU_TEST_VALUE', 'from-env')
    config.set('s', 'env', '$FUGLU_TEST_VALUE')
    assert config.get('s', 'env', resolve_env=True) == 'from-env'
    assert config.get('s', 'env') == '$FUGLU_TEST_VALUE'


def test_read_string_after_a_lookup_is_seen():
    config = fuglu.FuConfigParser()
    assert config.get('s', 'o', 'none') == 'none'
    config.read_string('[s]\no = read\n')
    assert config.get('s', 'o', 'none') == 'read'


# -- SuspectFilter --------------------------------------------------------------------

def test_an_empty_suspectfilter():
    empty = fuglu.SuspectFilter(None)
    suspect = make_suspect(HTML)
    assert empty.matches(suspect) == (False, None)
    assert empty.get_args(suspect) == [] and empty.get_list() == []
    assert empty.get_field(suspect, 'Subject') == ['=?utf-8?q?Gr=C3=BC=C3=9Fe?=']
    assert empty.get_field(suspect, b'clientip') == ['192.0.2.1']
    assert empty.get_field(suspect, 'body') == ['Hello there', 'café']


def test_strip_text_and_decoded_textparts():
    helper = fuglu.SuspectFilter(None)
    assert helper.strip_text('a<b>b</b><script>c</script>&nbsp;d<style>e</style>') == 'ab d'
    assert helper.strip_text(b'x<i>y</i>', remove_tags=[b'i']) == 'x'
    suspect = make_suspect(HTML)
    html = '<p>Hello <b>there</b></p><script>x()</script>'
    assert helper.get_decoded_textparts(suspect) == [html, 'café']
    assert helper.get_decoded_textparts(suspect, attachment=True) == ['café']
    assert helper.get_decoded_textparts(suspect, attachment=False) == [
        '<p>Hello <b>there</b></p><script>x()</script>']


def test_decoded_textparts_are_decoded_once_per_parsed_message():
    suspect = make_suspect(HTML)
    rules = fuglu.SuspectFilter(None)
    first, second = rules.get_decoded_textparts(suspect), rules.get_decoded_textparts(suspect)
    assert first == second and first[0] is second[0]   # FuGlu caches them as well
    assert rules.get_decoded_textparts(suspect, attachment=True) == ['caf\xe9']
    suspect.set_source(HTML.replace(b'caf\xe9', b'tea'))   # a new message: decoded anew
    assert rules.get_decoded_textparts(suspect, attachment=True) == ['tea']


def test_extended_results_carry_field_value_argument_and_pattern(tmp_path):
    path = tmp_path / 'rules'
    path.write_text('to_domain example\\.com to-example\n@score >5 high\n')
    rules = fuglu.SuspectFilter(str(path))
    suspect = make_suspect()
    suspect.tags['score'] = 7
    results = rules.get_args(suspect, extended=True)
    assert [(r.fieldname, r.value, r.arg, r.pattern) for r in results] == [
        ('to_domain', 'example.com', 'to-example', r'example\.com'), ('@score', '7', 'high', '>5')]
    matched, first = rules.matches(suspect, extended=True)
    assert matched and first == results[0]


def test_filelist_subclassed_with_a_content_type(tmp_path):
    # FuGlu 1.7's FileList is generic; its plugins write class X(FileList[list[str]])
    path = tmp_path / 'list.txt'
    path.write_text('a b\n# comment\nc d\n')

    class PairList(fuglu.FileList[list]):
        def _parse_lines(self, lines):
            return [line.split() for line in self._filter_lines(lines)]

    assert issubclass(PairList, fuglu.FileList)
    assert PairList(str(path)).get_list() == [['a', 'b'], ['c', 'd']]


def test_filelist_follows_the_file(tmp_path):
    path = tmp_path / 'list'
    path.write_text('# comment\nOne # inline\n\nTwo\n')
    listed = fuglu.FileList(str(path), lowercase=True,
                            additional_filters=[fuglu.FileList.inline_comments_filter])
    assert listed.get_list() == ['one', 'two']
    path.write_text('three\n')
    listed._last_check = 0
    assert listed.get_list() == ['three']
    assert fuglu.FileList().get_list() == []


# -- Suspect --------------------------------------------------------------------------

@pytest.mark.parametrize('sender,recipients', [
    ('sender@example.com', None), ('sender@example.com', 'recipient'),
    ('sender', 'rcpt@example.com'),
    ('a@example.net', 'r@example.com@example.org'), ('.dot@example.org', 'r@example.com'),
])
def test_suspect_refuses_invalid_envelope_addresses(sender, recipients):
    with pytest.raises(ValueError):
        fuglu.Suspect(sender, recipients, '/dev/null')


def test_suspect_accepts_what_fuglu_accepts():
    for sender in (None, ''):
        assert fuglu.Suspect(sender, 'root@localhost', '/dev/null').from_address == ''
    assert fuglu.Suspect('a@b', 'postmaster', '/dev/null').to_domain == ''
    assert fuglu.Suspect('a@b', [], '/dev/null').recipients == []
    assert fuglu.Suspect('a@b', 'c@d', '/dev/null').get_source() == b''
    assert len(fuglu.Suspect.generate_id()) == 32 and make_suspect().check_id()


def test_header_helpers():
    suspect = make_suspect(HTML)
    assert suspect.parse_from_type_header() == [('Alice', 'alice@example.org')]
    assert suspect.parse_from_type_header('To') == [('', 'bob@example.com')]
    assert fuglu.Suspect.decode_msg_header(suspect.get_header('subject')) == 'Grüße'
    assert suspect.client_info_from_rcvd() == ('helo.example', '192.0.2.1', 'rdns.example')
    assert suspect.client_info_from_rcvd(ignoreregex=r'192\.0\.2\.') is None
    prepended = fuglu.Suspect.prepend_header_to_source('X-A', 'Ä\r\nInjected: yes', b'body')
    assert prepended.endswith(b'\r\nbody') and b'\r\nInjected' not in prepended
    assert fuglu.Suspect.getlist_space_comma_separated('a b,c\\ d') == ['a', 'b', 'c d']
    assert suspect.get_current_decision_code() == fuglu.DUNNO


def test_add_header_with_bytes_and_subject_update():
    suspect = make_suspect()
    suspect.add_header(b'X-Bytes', b'value', immediate=True)
    assert suspect.get_message_rep()['X-Bytes'] == 'value'
    suspect.add_header(b'X-Later', b'v')
    assert suspect.addheaders == {'X-Later': 'v'}
    assert suspect.update_subject(lambda subject, prefix: prefix + subject,
                                  prefix='[SPAM] ') is True
    assert suspect.get_header('subject') == '[SPAM] plugin test'
    assert suspect.get_tag('origsubj') == 'plugin test'
    assert suspect.remove_headers_from_source(['X-Bytes', 'Subject']) is True
    assert suspect.get_header('subject') is None and 'X-Bytes' in suspect.removed_headers


def test_wrap_and_as_attachment():
    suspect = make_suspect()
    wrapped = suspect.wrap('me@example.org', 'you@example.org', 'quarantined', body='see attached')
    parts = wrapped.get_payload()
    assert wrapped['Auto-Submitted'] == 'auto-generated'
    assert parts[1].get_content_type() == 'message/rfc822'
    assert suspect.id + '.eml' in parts[1]['Content-Disposition']


# -- apply_template -------------------------------------------------------------------

def test_valuesfunction_sees_every_value_headers_and_tags_included():
    suspect = make_suspect(MESSAGE.replace(b'plugin test', b"x'; DROP TABLE mail; --"))
    suspect.tags['note'] = "it's"
    seen = []

    def escape(values):
        seen.extend(values)
        return {name: str(value).replace("'", "''") for name, value in values.items()}
    query = fuglu.apply_template("INSERT '${subject}', '${@note}', '${from_address}', '${given}'",
                                 suspect,
                                 {'given': "o'k"}, valuesfunction=escape)
    assert query == "INSERT 'x''; DROP TABLE mail; --', 'it''s', 'a@example.org', 'o''k'"
    assert sorted(seen) == ['@note', 'from_address', 'given', 'subject']


def test_suspect_template_of_fuglus_plugins():
    # FuGlu's plugins fill their configured texts with _SuspectTemplate.safe_substitute
    from fuglu.shared import _SuspectTemplate
    template = _SuspectTemplate('${@tag.x} $from_address ${header:Subject} $$ $unknown')
    values = {'@tag.x': 1, 'from_address': 'a@example.org', 'header:Subject': '$x'}
    assert template.safe_substitute(values) == '1 a@example.org $x $ $unknown'


def test_valuesfunction_may_drop_a_value():
    assert fuglu.apply_template('[${subject}]', make_suspect(),
                                valuesfunction=lambda values: {}) == '[]'


# -- AV base class --------------------------------------------------------------------

class FakeAV(fuglu.AVScannerPlugin):
    enginename = 'fakeav'
    requiredvars = {
        'maxsize': {'default': '1000'}, 'retries': {'default': '2'},
        'virusaction': {'default': 'REJECT'}, 'problemaction': {'default': 'DEFER'},
        'rejectmessage': {'default': 'found ${virusname} in ${infectedfile}'},
    }
    calls = 0

    def scan_stream(self, content, suspectid='(N/A)'):
        FakeAV.calls += 1
        if b'EICAR' in content or b'Eicar test' in content:
            return {'file.com': 'Eicar-Test'}
        if b'FAIL' in content:
            raise OSError('daemon down')
        return None


def test_av_scanner_plugin_examine_tags_and_reports(capsys):
    plugin = FakeAV(make_config('[main]\n'))
    clean = make_suspect()
    assert plugin.examine(clean) == (fuglu.DUNNO, None) and clean.tags['virus']['fakeav'] is False
    infected = make_suspect(MESSAGE + b'EICAR\r\n')
    assert plugin.examine(infected) == (fuglu.REJECT, 'found Eicar-Test in file.com')
    assert infected.is_virus() and infected.tags['fakeav.virus'] == {'file.com': 'Eicar-Test'}
    FakeAV.calls = 0
    assert plugin.examine(make_suspect(MESSAGE + b'FAIL\r\n')) == fuglu.DEFER
    assert FakeAV.calls == 2                      # retries
    assert plugin.lint_eicar() is True
    assert 'found virus' in capsys.readouterr().out
    assert plugin.examine(make_suspect(MESSAGE + b'x' * 1000)) == fuglu.DUNNO   # too big


# -- async plugins ---------------------------------------------------------------------

class AsyncScanner(fuglu.AsyncScannerPlugin):
    async def examine(self, suspect):
        import asyncio
        await asyncio.sleep(0)
        suspect.tags.setdefault('trace', []).append('async')
        return fuglu.REJECT if suspect.get_header('X-Reject') else fuglu.DUNNO


class SyncScanner(fuglu.ScannerPlugin):
    def examine(self, suspect):
        suspect.tags.setdefault('trace', []).append('sync')
        return fuglu.DUNNO


class AsyncAppender(fuglu.AsyncAppenderPlugin):
    async def process(self, suspect, decision):
        suspect.tags.setdefault('trace', []).append('appender:%s' % decision)


class AsyncPrepender(fuglu.AsyncPrependerPlugin):
    async def pluginlist(self, suspect, pluginlist):
        suspect.tags.setdefault('trace', []).append('prepender')
        return None


def test_sync_and_async_plugins_run_mixed():
    scanners = [(SyncScanner, None), (AsyncScanner, None), (SyncScanner, 'second')]
    controller = controller_with(plugins=scanners, prependers=[(AsyncPrepender, None)],
                                 appenders=[(AsyncAppender, None)])
    suspect, action, _, _ = run_session(controller)
    assert action == fuglu.DUNNO
    assert suspect.tags['trace'] == ['prepender', 'sync', 'async', 'sync', 'appender:0']
    rejected, action, _, _ = run_session(controller, make_suspect(b'X-Reject: yes\r\n' + MESSAGE))
    assert action == fuglu.REJECT and rejected.tags['trace'][-1] == 'appender:3'


def test_async_plugins_from_many_worker_threads_at_once():
    controller = controller_with(plugins=[(AsyncScanner, None)])
    results, barrier = [], threading.Barrier(8)

    def worker():
        barrier.wait()
        for _ in range(5):
            results.append(run_session(controller)[1])
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [fuglu.DUNNO] * 40


def test_call_plugin_inside_a_running_event_loop():
    import asyncio

    async def outer():
        return fuglu.call_plugin(AsyncScanner(make_config('[main]\n')).examine, make_suspect())
    assert asyncio.run(outer()) == fuglu.DUNNO


# -- FuGlu modules and plugins this build does not have ------------------------------------

def test_fuglu_module_names_import():
    import fuglu.extensions.sql
    from fuglu.extensions.sql import DBConfig, ENABLED, get_session
    from fuglu.bounce import Bounce
    from fuglu.mshared import BasicMilterPlugin, CONTINUE
    from fuglu.plugins.sa import SAPlugin
    import fuglu_plugins.spamassassin
    assert SAPlugin is fuglu_plugins.spamassassin.SAPlugin
    assert fuglu_plugins.spamassassin.__spec__.name == 'fuglu_plugins.spamassassin'
    assert isinstance(ENABLED, bool) and issubclass(BasicMilterPlugin, fuglu.MilterPlugin)
    assert CONTINUE == fuglu.MILTER_RETCODES[fuglu.DUNNO] and Bounce and DBConfig
    if not ENABLED:
        with pytest.raises(Exception, match='SQLAlchemy'):
            get_session('sqlite://')
    config = make_config('[main]\n[x]\no = 1\n')
    assert DBConfig(config, make_suspect()).getint('x', 'o') == 1


@pytest.mark.parametrize('name,expected', [
    ('fuglu.plugins.domainauth.DKIMVerifyPlugin',
     'fuglu.plugins.domainauth is a plugin of FuGlu 1.7 that is not part of this build'),
    ('fuglu.plugins.attachment.AttHashAction',
     'fuglu.plugins.attachment.AttHashAction is a plugin of FuGlu 1.7 that is not part of this '
     'build'),
])
def test_lint_names_an_upstream_plugin_that_is_not_bundled(tmp_path, name, expected):
    conf = tmp_path / 'fuglu.conf'
    conf.write_text('[main]\nplugins = %s\nprependers =\nappenders =\nincomingport = 10025\n'
                    'controlport =\n'
                    % name)
    returncode, out = run_fuglu_lint(str(conf), cwd=str(tmp_path))
    assert returncode != 0
    assert expected in out, out
    assert 'is not a package' not in out


def test_importing_a_missing_fuglu_module_says_so():
    with pytest.raises(ImportError, match='fuglu.extensions.elastic is a module of FuGlu that'):
        import fuglu.extensions.elastic  # noqa: F401
    with pytest.raises(ImportError, match='fuglu.mailattach is a module of FuGlu that is not'):
        from fuglu.mailattach import MailattachmentMgr  # noqa: F401


def test_a_missing_name_is_reported_as_a_name_not_as_a_module():
    with pytest.raises(ImportError, match="cannot import name 'NoSuchHelper' from fuglu.shared"):
        from fuglu.shared import NoSuchHelper  # noqa: F401
    with pytest.raises(ImportError, match="cannot import name 'nothing' from fuglu.bounce"):
        from fuglu.bounce import nothing  # noqa: F401


def test_dns_extensions_without_a_dns_library_answer_none():
    # FuGlu's dnsquery without dnspython/pydns: the names are there, lookups give None
    import asyncio
    from fuglu.extensions.dnsquery import (DNSQUERY_EXTENSION_ENABLED, FuNXDOMAIN, QTYPE_TXT,
                                           lookup, mxlookup, revlookup)
    from fuglu.extensions import aiodnsquery
    assert DNSQUERY_EXTENSION_ENABLED is False and aiodnsquery.ENABLED is False
    assert QTYPE_TXT == 'TXT' and issubclass(FuNXDOMAIN, Exception)
    assert lookup('example.org', QTYPE_TXT) is None and mxlookup('example.org') is None
    assert revlookup('192.0.2.1', reraise=True) is None
    assert asyncio.run(aiodnsquery.lookup('example.org', aiodnsquery.QTYPE_A)) is None


def test_a_plugin_with_fuglus_redis_mixin_loads_and_does_nothing_without_redis():
    # FuGlu's own plugins (knownsubject, fuzor, btc) mix AIORedisMixin in and check ENABLED
    import asyncio
    from fuglu.extensions.aioredisext import AIORedisMixin, ENABLED as REDIS_AVAILABLE
    shut = []

    class KnownThing(AIORedisMixin, fuglu.ScannerPlugin):
        def __init__(self, config, section=None):
            super().__init__(config, section)
            self.requiredvars.update({'ttl': {'default': '3'}})

        def examine(self, suspect):
            return fuglu.DUNNO if not REDIS_AVAILABLE else self.aioredisbackend

        async def ashutdown(self):
            shut.append(1)
            await super().ashutdown()

    plugin = KnownThing(make_config('[main]\n'))
    assert plugin.config.get('KnownThing', 'redis_conn') == ''
    assert plugin.config.getint('KnownThing', 'ttl') == 3
    assert plugin.examine(make_suspect()) == fuglu.DUNNO
    with pytest.raises(ImportError, match='not in this build'):
        plugin.aioredisbackend
    asyncio.run(plugin.ashutdown())
    assert shut == [1]


def test_extensions_this_build_lacks_import_with_their_flags_off():
    from fuglu.extensions.redisext import ENABLED as REDIS_AVAILABLE, RedisPooledConn
    from fuglu.extensions.dnsquery import DNSQUERY_EXTENSION_ENABLED
    from fuglu.extensions.sql import DeclarativeBase, SQL_EXTENSION_ENABLED
    assert REDIS_AVAILABLE is False and DNSQUERY_EXTENSION_ENABLED is False
    with pytest.raises(ImportError, match='not in this build'):
        RedisPooledConn('redis://127.0.0.1')
    if not SQL_EXTENSION_ENABLED:
        class Model(DeclarativeBase):   # FuGlu plugins define their tables at import time
            pass
        assert Model.metadata is None


def test_a_plugin_may_define_its_own_logger_property_or_assign_one():
    # FuGlu's BasicPlugin sets no self.logger: published plugins define a read-only
    # `logger` property (returning _logger) or assign their own logger in __init__
    class PropertyLogger(fuglu.ScannerPlugin):
        @property
        def logger(self):
            return self._logger

    class AssignsLogger(fuglu.ScannerPlugin):
        def __init__(self, config, section=None):
            fuglu.ScannerPlugin.__init__(self, config, section)
            self.logger = logging.getLogger('fuglu.plugin.DomainAction')

    config = make_config('[main]\n')
    assert PropertyLogger(config).logger().name == 'fuglu.plugin.PropertyLogger'
    assert AssignsLogger(config).logger.name == 'fuglu.plugin.DomainAction'
    assert fuglu.ScannerPlugin(config, 'X').logger.name == 'fuglu.plugin.ScannerPlugin'


def test_suspect_source_is_none_until_a_plugin_sets_it():
    suspect = make_suspect()
    assert suspect.source is None                     # as received (FuGlu: source=None)
    suspect.source = b'Subject: new\r\n\r\nbody\r\n'
    assert suspect.get_source() == suspect.source == b'Subject: new\r\n\r\nbody\r\n'
    assert suspect.get_message_rep()['Subject'] == 'new' and suspect.is_modified()
    suspect.source = None
    assert suspect.source is None and suspect.get_source() == MESSAGE
    assert suspect.get_message_rep()['Subject'] != 'new'


def test_optional_library_flags_say_what_fuglu_uses():
    # FuGlu 1.7 sets these in try/except ImportError; plugins import them to pick a path
    import importlib.util
    from fuglu.stringencode import CHARDET_AVAILABLE
    from fuglu.shared import HAVE_AIOFILES, HAVE_BEAUTIFULSOUP, HAVE_LXML
    from fuglu.bounce import HAVE_AIOSMTP
    from fuglu.extensions.sql import YAML_AVAILABLE
    assert CHARDET_AVAILABLE is (importlib.util.find_spec('chardet') is not None)
    # fuglu strips HTML with the standard library and sends bounces with smtplib
    assert (HAVE_BEAUTIFULSOUP, HAVE_LXML, HAVE_AIOFILES, HAVE_AIOSMTP) == (False,) * 4
    assert YAML_AVAILABLE is False   # the YAML runtime-config source is not built in


def test_funkyconsole_and_class_level_requiredvars_updated_in_init():
    from fuglu.funkyconsole import FunkyConsole
    assert FunkyConsole().strcolor('ERROR', 'red') == '\x1b[31mERROR\x1b[0m'

    class ClassLevel(fuglu.ScannerPlugin):
        requiredvars = {'a': {'default': '1'}}

        def __init__(self, config, section=None):
            super().__init__(config, section)
            self.requiredvars.update({'b': {'default': '2'}})

    config = make_config('[main]\n')
    ClassLevel(config)
    assert config.get('ClassLevel', 'a') == '1' and config.get('ClassLevel', 'b') == '2'
    assert ClassLevel.requiredvars == {'a': {'default': '1'}}   # the class keeps its table


# -- exceptions ------------------------------------------------------------------------

def test_every_core_exception_has_one_root_and_keeps_the_bases_fuglu_code_catches():
    import inspect
    exceptions = [cls for cls in vars(fuglu).values()
                  if inspect.isclass(cls) and issubclass(cls, BaseException) and
                  cls.__module__ == fuglu.__name__]
    assert len(exceptions) >= 18
    assert [cls.__name__ for cls in exceptions if not issubclass(cls, fuglu.FugluError)] == []
    for name, base in [('ForceUStringError', TypeError), ('UnsafeLocation', OSError),
                       ('InvalidAddress', ValueError), ('EnvelopeSyntaxError', ValueError),
                       ('EnvelopeBlockError', ValueError), ('NotInThisBuild', ImportError)]:
        assert issubclass(getattr(fuglu, name), base), name
    # Suspect() refuses an address with a ValueError, as FuGlu's does
    with pytest.raises(ValueError):
        fuglu.Suspect('sender@example.org', ['not an address'], inbuffer=b'x')
    with pytest.raises(fuglu.FugluError):
        fuglu.Suspect('sender@example.org', [None], inbuffer=b'x')
