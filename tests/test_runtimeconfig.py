"""Per-recipient settings and rules from SQL ([databaseconfig]): DBConfig, DBFile, the shared
database with its cache and outage handling, the plugins that honour overrides, lint.

The databases here are real SQLite files read through the standard library's sqlite3
(the unit test environments have no SQLAlchemy; tests/integration runs the same
scenarios through SQLAlchemy against SQLite, PostgreSQL and MariaDB). Where a test needs
a database that fails or hangs on cue, a small SQLDatabase subclass stands in.
"""

import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from helpers import FUGLU_SCRIPT, fuglu, make_config, readable_tmp, run_fuglu_lint  # noqa: F401

from fuglu_plugins.attachment import FiletypePlugin
from fuglu_plugins.spamassassin import SAPlugin

FUGLUCONFIG_SCHEMA = 'CREATE TABLE fugluconfig (scope TEXT, section TEXT, option TEXT, value TEXT)'
ROWS = [
    ('$GLOBAL', 'SAPlugin', 'highspamlevel', '12'),
    ('$GLOBAL', 'SAPlugin', 'lowspamaction', 'DUNNO'),
    ('%reject.example', 'SAPlugin', 'highspamaction', 'REJECT'),
    ('vip@reject.example', 'SAPlugin', 'highspamaction', 'DUNNO'),
    ('%numbers.example', 'SAPlugin', 'highspamlevel', 'twelve'),
]


def make_database(path, rows=ROWS, schema=FUGLUCONFIG_SCHEMA, table='fugluconfig'):
    connection = sqlite3.connect(str(path))
    connection.execute(schema)
    if rows:
        marks = ','.join('?' * len(rows[0]))
        connection.executemany('INSERT INTO %s VALUES (%s)' % (table, marks), rows)
    connection.commit()
    connection.close()
    return str(path)


def run_sql(path, statement, *arguments):
    connection = sqlite3.connect(str(path))
    connection.execute(statement, arguments)
    connection.commit()
    connection.close()


def runtime_config(db_path, extra='', plugin_section=''):
    """A config whose [databaseconfig] reads ``db_path``. Each test gets its own URL
    (its own tmp path), so shared databases and caches never leak between tests."""
    config = make_config('[databaseconfig]\ndbconnectstring = sqlite:///%s\n%s\n%s'
                         % (db_path, extra, plugin_section))
    config.set_defaults('SAPlugin', SAPlugin.requiredvars)
    return config


def suspect_for(*recipients, sender='sender@example.org'):
    return fuglu.Suspect(sender, list(recipients), inbuffer=b'Subject: settings\r\n\r\nbody\r\n')


def action_for(config, recipient):
    """highspamaction of SAPlugin for a message to ``recipient``, through DBConfig."""
    return fuglu.DBConfig(config, suspect_for(recipient)).get('SAPlugin', 'highspamaction')


def database_of(config):
    settings = fuglu.runtime_settings(config)
    return fuglu.sql_database(settings.url, settings.timeout)


class FakeClock(object):
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


# -- scopes and values -------------------------------------------------------------

def test_address_beats_domain_beats_global_beats_the_file(tmp_path):
    config = runtime_config(make_database(tmp_path / 'settings.db'))
    assert action_for(config, 'a@reject.example') == 'REJECT'
    assert action_for(config, 'vip@reject.example') == 'DUNNO'
    other = fuglu.DBConfig(config, suspect_for('x@other.example'))
    assert other.get('SAPlugin', 'highspamaction') == 'DEFAULTHIGHSPAMACTION'   # the file's default
    assert other.getfloat('SAPlugin', 'highspamlevel') == 12.0                  # the $GLOBAL row
    assert config.getfloat('SAPlugin', 'highspamlevel') == 15.0   # the file itself is unchanged


def test_the_first_recipient_decides_for_the_whole_message(tmp_path):
    config = runtime_config(make_database(tmp_path / 'settings.db'))
    first_other = fuglu.DBConfig(config, suspect_for('x@other.example', 'a@reject.example'))
    first_reject = fuglu.DBConfig(config, suspect_for('a@reject.example', 'x@other.example'))
    assert first_other.get('SAPlugin', 'highspamaction') == 'DEFAULTHIGHSPAMACTION'
    assert first_reject.get('SAPlugin', 'highspamaction') == 'REJECT'


def test_typed_getters_and_what_the_database_cannot_mean(tmp_path):
    rows = [('$GLOBAL', 'X', 'number', ' 42 '), ('$GLOBAL', 'X', 'flag', 'yes'),
            ('$GLOBAL', 'X', 'items', 'zip, RAR,,7z'), ('$GLOBAL', 'X', 'broken', 'maybe')]
    config = runtime_config(make_database(tmp_path / 'settings.db', rows))
    runtime = fuglu.DBConfig(config, suspect_for('a@example.org'))
    assert runtime.getint('X', 'number') == 42
    assert runtime.getfloat('X', 'number') == 42.0
    assert runtime.getboolean('X', 'flag') is True
    assert runtime.getlist('X', 'items', lower=True) == ['zip', 'rar', '7z']
    assert runtime.get('X', 'missing', fallback='from fallback') == 'from fallback'
    assert runtime.get('X', 'missing', override='given') == 'given'
    with pytest.raises(fuglu.RuntimeConfigError, match="'maybe'.*not a boolean"):
        runtime.getboolean('X', 'broken')
    # everything else is the config's own
    assert runtime.has_section('databaseconfig') and runtime.confdir == config.confdir


def test_fuglu_default_query_runs_unchanged_on_sqlite(tmp_path):
    # backticks and CONCAT (which SQLite learnt only in 3.44) are MySQL style
    config = runtime_config(make_database(tmp_path / 'settings.db'))
    assert '`scope`' in fuglu.runtime_settings(config).sql
    assert 'CONCAT' in fuglu.runtime_settings(config).sql
    assert action_for(config, 'a@reject.example') == 'REJECT'


def test_own_query_with_other_placeholders_and_unknown_ones(tmp_path):
    rows = [('%example.org', 'SAPlugin', 'highspamaction', 'DELETE')]
    path = make_database(tmp_path / 'settings.db', rows)
    by_sender = ("SELECT value FROM fugluconfig WHERE section=:section AND option=:option "
                 "AND scope = '%' || :from_domain")
    config = runtime_config(path, 'sql = %s\n' % by_sender)
    assert action_for(config, 'x@other.example') == 'DELETE'
    config = runtime_config(path, 'sql = SELECT value FROM fugluconfig WHERE scope=:tenant\n')
    with pytest.raises(fuglu.RuntimeConfigError, match=':tenant'):
        action_for(config, 'x@other.example')


def test_message_text_is_a_value_never_sql(tmp_path):
    config = runtime_config(make_database(tmp_path / 'settings.db'))
    hostile = "x'); DROP TABLE fugluconfig; --@reject.example"
    assert action_for(config, hostile) == 'REJECT'
    runtime = fuglu.DBConfig(config, suspect_for('a@reject.example'))
    assert runtime.getfloat('SAPlugin', 'highspamlevel') == 12


def test_whole_section_query(tmp_path):
    rows = ROWS + [('%reject.example', 'rules', r'\.exe$', 'deny no programs'),
                   ('$GLOBAL', 'rules', r'\.exe$', 'allow global'),
                   ('$GLOBAL', 'rules', r'\.js$', 'deny no scripts'),
                   ('%elsewhere.example', 'rules', r'\.doc$', 'deny not here')]
    config = runtime_config(make_database(tmp_path / 'settings.db', rows))
    runtime = fuglu.DBConfig(config, suspect_for('a@reject.example'))
    assert runtime.load_section('rules') is True
    assert sorted(runtime.get_cached_options('rules')) == [r'\.exe$', r'\.js$']
    assert runtime.get('rules', r'\.exe$') == 'deny no programs'   # the domain row beats $GLOBAL
    assert runtime.get('rules', r'\.js$') == 'deny no scripts'


def test_section_query_with_other_column_names(tmp_path):
    schema = 'CREATE TABLE fugluconfig (who TEXT, section TEXT, name TEXT, setting TEXT)'
    path = make_database(tmp_path / 'settings.db', [('%reject.example', 'S', 'opt', 'v')], schema)
    section_sql = ("SELECT setting, name, who FROM fugluconfig WHERE section=:section AND "
                   "who IN (:globalscope, '%' || :to_domain, :to_address)")
    config = runtime_config(path, 'sqlsection = %s\nscope_field = who\noption_field = name\n'
                                  'value_field = setting\n' % section_sql)
    runtime = fuglu.DBConfig(config, suspect_for('a@reject.example'))
    assert runtime.load_section('S') and runtime.get('S', 'opt') == 'v'
    config = runtime_config(path, 'sqlsection = %s\n' % section_sql)
    with pytest.raises(fuglu.RuntimeConfigError, match='scope_field'):
        fuglu.DBConfig(config, suspect_for('a@reject.example')).load_section('S')


def test_no_dbconnectstring_means_the_file(tmp_path):
    config = make_config('[SAPlugin]\nhighspamaction = DELETE\n')
    runtime = fuglu.DBConfig(config, suspect_for('a@reject.example'))
    assert runtime.get('SAPlugin', 'highspamaction') == 'DELETE'
    assert runtime.load_section('SAPlugin') is False


# -- cache, single flight, outages ------------------------------------------------------

def test_answers_are_cached_for_value_cache_ttl(tmp_path):
    path = make_database(tmp_path / 'settings.db')
    config = runtime_config(path, 'value_cache_ttl = 30\n')
    database = database_of(config)
    database.clock = clock = FakeClock()

    def action():
        return action_for(config, 'a@reject.example')
    assert action() == 'REJECT'
    queries = database.queries
    run_sql(path, "UPDATE fugluconfig SET value='DELETE' WHERE scope='%reject.example'")
    for _ in range(50):
        assert action() == 'REJECT'
    assert database.queries == queries
    clock.now += 31
    assert action() == 'DELETE'
    assert database.queries == queries + 1


def test_misses_are_cached_too(tmp_path):
    config = runtime_config(make_database(tmp_path / 'settings.db'))
    database = database_of(config)
    runtime = fuglu.DBConfig(config, suspect_for('x@other.example'))
    assert runtime.get('SAPlugin', 'highspamaction') == 'DEFAULTHIGHSPAMACTION'
    queries = database.queries
    for _ in range(20):
        assert action_for(config, 'x@other.example') == 'DEFAULTHIGHSPAMACTION'
    assert database.queries == queries


class ScriptedDatabase(fuglu.SQLDatabase):
    """Answers every query with ``answer``; fails while ``failure`` is set; a query
    waits for ``gate`` (an Event) when it is given."""

    backend, driver = 'scripted', 'test'

    def __init__(self, timeout=1.0):
        super().__init__('scripted://user:secret@db/', timeout)
        self.answer = (('value',), [('REJECT',)])
        self.failure = None
        self.gate = None
        self.started = threading.Event()
        self.executed = 0

    def _execute(self, sql, values):
        self.executed += 1
        self.started.set()
        if self.gate is not None:
            self.gate.wait(10)
        if self.failure is not None:
            raise self.failure
        return self.answer


def test_one_query_per_key_while_many_threads_ask_at_once():
    database = ScriptedDatabase()
    database.gate = threading.Event()
    answers = []

    def ask():
        answers.append(database.rows('SELECT 1', {'to_address': 'a@x.example'}, 30)[1])
    threads = [threading.Thread(target=ask) for _ in range(20)]
    threads[0].start()
    assert database.started.wait(5)
    for thread in threads[1:]:
        thread.start()
    database.gate.set()
    for thread in threads:
        thread.join(10)
    assert answers == [[('REJECT',)]] * 20
    assert database.executed == 1


def test_outage_serves_cached_answers_defers_the_rest_and_is_logged_once(caplog):
    database = ScriptedDatabase()
    database.clock = clock = FakeClock()
    cached = {'to_address': 'cached@x.example'}
    assert database.rows('Q', cached, 30)[1] == [('REJECT',)]
    clock.now += 60                                      # the cached answer has expired
    database.failure = OSError('connection refused')
    caplog.set_level(logging.INFO, logger='fuglu.sql')
    assert database.rows('Q', cached, 30)[1] == [('REJECT',)]   # served while the database is away
    for number in range(5):
        with pytest.raises(fuglu.RuntimeConfigError, match='connection refused'):
            database.rows('Q', {'to_address': 'new%d@x.example' % number}, 30)
        clock.now += 2                                    # past the fail-fast interval
    answer = database.rows('Q', {'to_address': 'new@x.example'}, 30, fallback=True)
    assert answer == fuglu.EMPTY_SQL_ANSWER
    outage_lines = [record for record in caplog.records if 'cannot answer' in record.getMessage()]
    assert len(outage_lines) == 1
    assert 'scripted://user:*****@db/' in outage_lines[0].getMessage()
    assert 'secret' not in caplog.text
    database.failure = None
    clock.now += fuglu.SQL_RETRY_INTERVAL
    assert database.rows('Q', {'to_address': 'new0@x.example'}, 30)[1] == [('REJECT',)]
    back = [line for line in caplog.messages if 'answers again' in line]
    assert len(back) == 1 and 'failed lookups' in back[0]


def test_after_a_failure_lookups_fail_fast_for_a_moment():
    database = ScriptedDatabase()
    database.clock = clock = FakeClock()
    database.failure = OSError('down')
    with pytest.raises(fuglu.RuntimeConfigError):
        database.query('Q', {})
    database.failure = None
    with pytest.raises(fuglu.RuntimeConfigError, match='down'):
        database.query('Q', {})
    assert database.executed == 1
    clock.now += fuglu.SQL_RETRY_INTERVAL
    assert database.query('Q', {})[1] == [('REJECT',)]


def test_a_hanging_database_holds_the_caller_only_for_its_timeout():
    database = ScriptedDatabase(timeout=0.3)
    database.gate = threading.Event()
    started = time.monotonic()
    with pytest.raises(fuglu.RuntimeConfigError, match='no answer within 0.3 s'):
        database.query('Q', {})
    assert time.monotonic() - started < 2
    database.gate.set()


def test_the_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(fuglu, 'SQL_CACHE_MAX_ENTRIES', 10)
    database = ScriptedDatabase()
    for number in range(25):
        database.rows('Q', {'to_address': 'r%d@x.example' % number}, 30)
    assert len(database._cache) == 10


# -- failure policy in the session and the plugins ------------------------------------

class RuntimeConfigReader(fuglu.ScannerPlugin):
    """A third-party style plugin: asks the runtime config for its action."""

    def examine(self, suspect):
        runtimeconfig = fuglu.DBConfig(self.config, suspect)
        action = runtimeconfig.get('SAPlugin', 'highspamaction')
        return fuglu.string_to_actioncode(action, self.config)


def session_result(config, recipient):
    controller = fuglu.MainController(config)
    controller.plugins = [RuntimeConfigReader(config)]
    session = fuglu.ScanSession(controller)
    suspect = suspect_for(recipient)
    return session.scan(suspect), suspect


def test_a_lookup_that_cannot_be_answered_defers_the_message(tmp_path):
    config = runtime_config(tmp_path / 'no-such.db')
    (action, message), suspect = session_result(config, 'a@reject.example')
    assert action == fuglu.DEFER
    assert 'try again later' in message
    assert any('does not exist' in error for error in suspect.tags['processingerrors'])


def test_fallback_to_file_values_is_the_admins_choice(tmp_path):
    config = runtime_config(tmp_path / 'no-such.db', 'fallback_to_file_values = 1\n',
                            '[SAPlugin]\nhighspamaction = REJECT\n')
    (action, _message), _suspect = session_result(config, 'a@reject.example')
    assert action == fuglu.REJECT


def test_sqlite_file_that_does_not_exist_is_an_error_not_an_empty_database(tmp_path):
    config = runtime_config(tmp_path / 'typo.db')
    with pytest.raises(fuglu.RuntimeConfigError, match='does not exist'):
        action_for(config, 'a@reject.example')
    assert not os.path.exists(str(tmp_path / 'typo.db'))


@pytest.mark.parametrize('url,expected', [
    ('sqlite:///relative/settings.db', 'relative/settings.db'),
    ('sqlite:////var/lib/fuglu/settings.db', '/var/lib/fuglu/settings.db'),
    ('sqlite+pysqlite:////x.db', '/x.db'),
])
def test_sqlite_urls(url, expected):
    assert fuglu.sqlite_path_of(url) == expected


@pytest.mark.parametrize('url,fragment', [
    ('sqlite://', 'names no database file'),
    ('sqlite:///:memory:', 'names no database file'),
    ('sqlite:////x.db?mode=ro', 'need SQLAlchemy'),
])
def test_sqlite_urls_the_standard_library_cannot_take(url, fragment):
    with pytest.raises(fuglu.RuntimeConfigError, match=fragment):
        fuglu.sqlite_path_of(url)


def test_redacted_urls():
    redact = fuglu.redact_uri
    assert redact('postgresql://fuglu:s3cr3t@db:5432/x') == 'postgresql://fuglu:*****@db:5432/x'
    assert redact('mysql+pymysql://u:p@h/d?ssl=1') == 'mysql+pymysql://u:*****@h/d?ssl=1'
    assert fuglu.redact_uri('sqlite:////var/x.db') == 'sqlite:////var/x.db'


def sa_plugin(config):
    return SAPlugin(config)


def test_saplugin_actions_and_levels_per_recipient(tmp_path):
    config = runtime_config(make_database(tmp_path / 'settings.db'), '',
                            '[SAPlugin]\nhighspamaction = DUNNO\n')
    plugin = sa_plugin(config)
    verdict = plugin._classify(suspect_for('a@reject.example'), True, 13.0, 'report')
    assert verdict == (fuglu.REJECT, 'message identified as spam')     # level 12 from $GLOBAL
    assert plugin._classify(suspect_for('vip@reject.example'), True, 13.0, 'report') == fuglu.DUNNO
    assert plugin._classify(suspect_for('a@other.example'), True, 13.0, 'report') == fuglu.DUNNO
    suspect = suspect_for('a@reject.example')
    assert plugin._classify(suspect, True, 11.0, 'report') == fuglu.DUNNO   # low spam ($GLOBAL)
    assert suspect.tags['spam']['SpamAssassin'] and not suspect.tags['highspam']['SpamAssassin']


def test_saplugin_unusable_level_or_database_defers(tmp_path):
    config = runtime_config(make_database(tmp_path / 'settings.db'))
    with pytest.raises(fuglu.RuntimeConfigError, match='twelve'):
        sa_plugin(config)._classify(suspect_for('a@numbers.example'), True, 13.0, 'report')
    config = runtime_config(tmp_path / 'gone.db')
    with pytest.raises(fuglu.RuntimeConfigError):
        sa_plugin(config)._classify(suspect_for('a@reject.example'), True, 13.0, 'report')


USERPREF_SCHEMA = 'CREATE TABLE userpref (username TEXT, preference TEXT, value TEXT)'


def test_saplugin_sql_blocklist_for_messages_too_big_for_spamd(tmp_path):
    path = make_database(tmp_path / 'userprefs.db', [
        ('%reject.example', 'blocklist_from', '*@spammer.example'),
        ('a@reject.example', 'blacklist_from', 'boss?@corp.example'),
        ('@GLOBAL', 'blocklist_from', 'everyone-hates@this.example'),
        ('b@reject.example', 'whitelist_from', '*@spammer.example'),
    ], USERPREF_SCHEMA, 'userpref')
    config = runtime_config(make_database(tmp_path / 'settings.db'), '',
                            '[SAPlugin]\nsql_blocklist_dbconnectstring = sqlite:///%s\n'
                            'maxsize = 10\nstrip_oversize = 0\n' % path)
    plugin = sa_plugin(config)

    def verdict(sender, recipient):
        suspect = suspect_for(recipient, sender=sender)
        return plugin.examine(suspect), suspect
    (action, message), suspect = verdict('x@spammer.example', 'a@reject.example')
    assert action == fuglu.REJECT and suspect.is_highspam()
    assert suspect.addheaders['X-Fuglu-Blocklisted'] == '*@spammer.example'
    assert verdict('boss1@corp.example', 'a@reject.example')[0][0] == fuglu.REJECT
    assert verdict('boss12@corp.example', 'a@reject.example')[0] == fuglu.DUNNO   # ?: one character
    assert verdict('x@spammer.example.evil', 'a@reject.example')[0] == fuglu.DUNNO  # whole address
    # @GLOBAL matches, and that recipient's highspamaction is the file's DUNNO
    assert verdict('EVERYONE-hates@this.example', 'c@other.example')[0] == fuglu.DUNNO
    assert verdict('x@spammer.example', 'c@other.example')[0] == fuglu.DUNNO


def filetype_config(tmp_path, db_path, options=''):
    rulesdir = tmp_path / 'rules'
    rulesdir.mkdir(exist_ok=True)
    (rulesdir / 'default-filenames.conf').write_text('deny \\.exe$ no programs\n')
    (rulesdir / 'default-archivenames.conf').write_text('deny \\.exe$ no programs in archives\n')
    config = runtime_config(db_path, '', '[FiletypePlugin]\nrulesdir = %s\nsendbounce = 0\n%s'
                            % (rulesdir, options))
    config.set_defaults('FiletypePlugin', FiletypePlugin.requiredvars)
    return config


def mail_with_attachment(name, payload):
    import base64
    return ('From: s@example.org\r\nTo: r@example.org\r\nSubject: file\r\nMIME-Version: 1.0\r\n'
            'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
            '--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n'
            '--b\r\nContent-Type: application/octet-stream\r\n'
            'Content-Disposition: attachment; filename="%s"\r\n'
            'Content-Transfer-Encoding: base64\r\n\r\n'
            '%s\r\n--b--\r\n' % (name, base64.b64encode(payload).decode())).encode()


def zipped(name):
    import io
    import zipfile
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w') as archive:
        archive.writestr(name, b'MZ' + b'\0' * 100)
    return buffer.getvalue()


def examine_attachment(config, recipient, name, payload):
    source = mail_with_attachment(name, payload)
    suspect = fuglu.Suspect('s@example.org', [recipient], inbuffer=source)
    return FiletypePlugin(config).examine(suspect)


def test_filetype_overrides_from_dbconfig(tmp_path):
    path = make_database(tmp_path / 'settings.db', [
        ('%checked.example', 'FiletypePlugin', 'checkarchivenames', 'True'),
        ('nozip@checked.example', 'FiletypePlugin', 'enabledarchivetypes', 'tar'),
    ])
    config = filetype_config(tmp_path, path, 'overrides_source = dbconfig\n')
    archive = zipped('inner.exe')
    assert examine_attachment(config, 'a@checked.example', 'docs.zip', archive)[0] == fuglu.DELETE
    assert examine_attachment(config, 'a@unchecked.example', 'docs.zip', archive) == fuglu.DUNNO
    assert examine_attachment(config, 'nozip@checked.example', 'docs.zip', archive) == fuglu.DUNNO
    # without overrides_source = dbconfig the rows mean nothing (FuGlu's semantics)
    config = filetype_config(tmp_path, path)
    assert examine_attachment(config, 'a@checked.example', 'docs.zip', archive) == fuglu.DUNNO


RULES_SCHEMA = ('CREATE TABLE attachmentrules (scope TEXT, checktype TEXT, regex TEXT, '
                'action TEXT, description TEXT, prio INT)')


def test_filetype_rules_from_sql_and_dbconfig_sections(tmp_path):
    rules_db = make_database(tmp_path / 'rules.db', [
        ('vip@corp.example', 'filename', r'\.exe$', 'allow', 'programs welcome', 1),
        ('corp.example', 'filename', r'\.scr$', 'deny', 'no screensavers', 1),
        ('corp.example', 'filename', r'bad name\.txt$', 'deny', '', 2),
        ('corp.example', 'contenttype', r'.', 'allow', '', 1),
    ], RULES_SCHEMA, 'attachmentrules')
    settings_db = make_database(tmp_path / 'settings.db', [
        ('%corp.example', 'config_section_filename', r'\.pdf$', 'deny no pdf for corp'),
    ])
    config = filetype_config(tmp_path, settings_db, 'dbconnectstring = sqlite:///%s\n'
                                                   'overrides_source = dbconfig\n' % rules_db)
    def verdict(recipient, name, payload=b'x'):
        return examine_attachment(config, recipient, name, payload)
    assert verdict('vip@corp.example', 'tool.exe') == fuglu.DUNNO          # the address's SQL row
    assert verdict('a@corp.example', 'tool.exe')[0] == fuglu.DELETE        # the default file
    assert verdict('a@corp.example', 'x.scr') == (fuglu.DELETE, 'x.scr: no screensavers')  # domain
    assert verdict('a@corp.example', 'a bad name.txt')[0] == fuglu.DELETE  # a regex with a space
    action, message = verdict('a@corp.example', 'report.pdf', b'%PDF-1.4')
    assert action == fuglu.DELETE and 'no pdf for corp' in message         # dbconfig section
    assert verdict('a@other.example', 'report.pdf', b'%PDF-1.4') == fuglu.DUNNO


def test_filetype_bad_rule_rows_are_dropped_and_logged_once(tmp_path, caplog):
    rules_db = make_database(tmp_path / 'rules.db', [('corp.example', 'filename', '(a+)+$', 'deny',
                                                      None, 1)], RULES_SCHEMA, 'attachmentrules')
    config = filetype_config(tmp_path, tmp_path / 'settings.db',
                             'dbconnectstring = sqlite:///%s\n' % rules_db)
    plugin = FiletypePlugin(config)
    for _ in range(3):
        source = mail_with_attachment('aaaa', b'x')
        suspect = fuglu.Suspect('s@example.org', ['a@corp.example'], inbuffer=source)
        assert plugin.examine(suspect) == fuglu.DUNNO
    assert caplog.text.count('nested quantifier') == 1


def test_filetype_database_failure_reaches_the_session(tmp_path):
    config = filetype_config(tmp_path, tmp_path / 'gone.db', 'overrides_source = dbconfig\n')
    with pytest.raises(fuglu.RuntimeConfigError):
        examine_attachment(config, 'a@corp.example', 'docs.zip', zipped('inner.exe'))


# -- the FuGlu API surface and lint -------------------------------------------------

THIRD_PARTY_PLUGIN = '''
from fuglu.shared import ScannerPlugin, DUNNO, REJECT, string_to_actioncode
from fuglu.extensions.sql import DBConfig, SQL_EXTENSION_ENABLED, RESTAPIError, DBFile, get_session
import fuglu.extensions.sql


class PerDomainPolicy(ScannerPlugin):
    def examine(self, suspect):
        assert fuglu.extensions.sql.DBConfig is DBConfig
        try:
            runtimeconfig = DBConfig(self.config, suspect)
            action = runtimeconfig.get('SAPlugin', 'highspamaction')
        except RESTAPIError:
            return self._problemaction()
        return string_to_actioncode(action, self.config), 'policy %s' % SQL_EXTENSION_ENABLED
'''


def test_a_fuglu_plugin_gets_runtime_values_the_fuglu_way(tmp_path):
    (tmp_path / 'thirdparty_policy.py').write_text(THIRD_PARTY_PLUGIN)
    main = '[main]\nplugindir = %s\nplugins = thirdparty_policy.PerDomainPolicy\n' % tmp_path
    config = runtime_config(make_database(tmp_path / 'settings.db'), '', main)
    fuglu.add_plugin_dirs(config)
    plugin = fuglu.load_plugins(config, 'plugins')[0]
    assert plugin.examine(suspect_for('a@reject.example')) == (fuglu.REJECT, 'policy False')
    config = runtime_config(tmp_path / 'gone.db', '', main)
    plugin = fuglu.load_plugins(config, 'plugins')[0]
    assert plugin.examine(suspect_for('a@reject.example')) == fuglu.DEFER


def test_get_session_without_sqlalchemy_says_what_to_install(tmp_path):
    if fuglu.import_sqlalchemy() is not None:
        pytest.fail('the unit test environments have no SQLAlchemy; this test covers its absence')
    with pytest.raises(fuglu.RuntimeConfigError, match='pip install SQLAlchemy'):
        fuglu.get_session('sqlite:///%s' % make_database(tmp_path / 'x.db'))


def lint_conf(tmp_path, databaseconfig):
    path = tmp_path / 'fuglu.conf'
    path.write_text('[main]\nplugins =\nprependers =\nappenders =\nincomingport = 10025\n'
                    'controlport =\n[databaseconfig]\n' + databaseconfig)
    return str(path)


def test_lint_stdlib_sqlite_names_backend_driver_and_rows(readable_tmp):
    tmp_path = readable_tmp
    path = make_database(tmp_path / 'settings.db')
    conf = lint_conf(tmp_path, 'dbconnectstring = sqlite:///%s\n' % path)
    returncode, out = run_fuglu_lint(conf)
    assert 'SQLite 3.' in out and 'standard library sqlite3' in out, out
    assert 'runtime config sql: query OK, 0 rows for section=testsection' in out
    assert 'runtime config sqlsection: query OK, 0 rows' in out
    assert returncode == 0, out


@pytest.mark.parametrize('url,fragment', [
    ('postgresql://fuglu:pw@127.0.0.1/fuglu', 'pip install SQLAlchemy and psycopg2-binary, '
                                              'and write'),
    ('mysql://fuglu:pw@127.0.0.1/fuglu', 'pip install SQLAlchemy and PyMySQL'),
])
def test_lint_other_urls_without_sqlalchemy_names_what_to_install(tmp_path, url, fragment):
    # -I -S: no site-packages, as on the minimal host the zipapp is made for
    conf = lint_conf(tmp_path, 'dbconnectstring = %s\n' % url)
    result = subprocess.run([sys.executable, '-I', '-S', FUGLU_SCRIPT, '--lint', '-c', conf],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    out = result.stdout.decode()
    assert result.returncode != 0, out
    assert fragment in out, out
    assert 'pw@' not in out


def test_lint_bad_sql_and_unimplemented_sources(readable_tmp):
    tmp_path = readable_tmp
    conf = lint_conf(tmp_path, 'dbconnectstring = sqlite:///%s\nsql = SELECT value FROM nowhere\n'
                               'dbpriority = rest, sql\nrestapi_uri = https://config.example/\n'
                     % make_database(tmp_path / 'settings.db'))
    returncode, out = run_fuglu_lint(conf)
    assert returncode != 0, out
    assert 'query failed' in out and 'no such table: nowhere' in out
    assert 'restapi_uri: accepted for compatibility but not implemented' in out
    assert 'dbpriority rest: not implemented' in out


def test_lint_without_a_database(readable_tmp):
    tmp_path = readable_tmp
    returncode, out = run_fuglu_lint(lint_conf(tmp_path, ''))
    assert 'no per-recipient overrides' in out
    assert returncode == 0, out


def test_databaseconfig_options_are_known_to_lint():
    config = make_config('[databaseconfig]\ndbpriority = sql\nvalue_cache_ttl = 60\n'
                         'sql = SELECT 1\nsqlsection = SELECT 1\nglobalscope = $ALL\n'
                         'option_field = o\nscope_field = s\nvalue_field = v\ntimeout = 2.5\n'
                         'fallback_to_file_values = 1\nrestapi_uri = https://x.example/\n'
                         'yaml_filepath = /x.yml\n')
    table = fuglu.CORE_DEFAULTS['databaseconfig']
    assert fuglu.check_options(config, 'databaseconfig', table) == []
    config.set('databaseconfig', 'value_cache_ttl', 'soon')
    assert fuglu.check_options(config, 'databaseconfig', table)
