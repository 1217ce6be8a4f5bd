"""Per-recipient settings from real databases: PostgreSQL and MariaDB (private instances
on 127.0.0.1) and SQLite, through SQLAlchemy and its drivers (pip deps of the tox
integration env), then through a real Postfix (after-queue) with real spamd.

The fugluconfig rows every database gets:

    %reject.example      SAPlugin highspamaction REJECT    GTUBE to that domain bounces
    vip@reject.example   SAPlugin highspamaction DUNNO     ... except for this address
    $GLOBAL              SAPlugin highspamlevel  12        (the file says 15)

Other domains keep the file's policy: GTUBE is delivered, tagged as spam.
"""

import logging
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import peers  # noqa: E402
from peers import GTUBE  # noqa: E402

import fuglu  # noqa: E402

FUGLU_SCRIPT = os.path.join(peers.REPO_DIR, 'fuglu.py')

ROWS = [
    ('%reject.example', 'SAPlugin', 'highspamaction', 'REJECT'),
    ('vip@reject.example', 'SAPlugin', 'highspamaction', 'DUNNO'),
    ('$GLOBAL', 'SAPlugin', 'highspamlevel', '12'),
]

# FuGlu's default `sql` is MySQL/MariaDB/SQLite syntax; on PostgreSQL the README's query
# (no backticks; "C" collation, so that address > %domain > $GLOBAL whatever the locale).
POSTGRES_SQL = ('SELECT value FROM fugluconfig WHERE section=:section AND option=:option AND '
                "scope IN (:globalscope, CONCAT('%', :to_domain), :to_address) "
                'ORDER BY scope COLLATE "C" DESC LIMIT 1')
POSTGRES_SQLSECTION = ('SELECT value, option, scope FROM fugluconfig WHERE section=:section AND '
                       "scope IN (:globalscope, CONCAT('%', :to_domain), :to_address)")


@pytest.fixture(scope='module')
def drivers():
    """SQLAlchemy and the drivers, installed by tox (deps of the integration env)."""
    missing = [name for name in ('sqlalchemy', 'psycopg2', 'pymysql')
               if not fuglu.module_available(name)]
    if missing:
        pytest.fail('the integration env needs the pip packages SQLAlchemy psycopg2-binary '
                    'PyMySQL; missing: %s' % ', '.join(missing))


def fill_postgres(postgres):
    postgres.psql('DROP TABLE IF EXISTS fugluconfig; CREATE TABLE fugluconfig (scope VARCHAR(255), '
                  'section VARCHAR(255), option VARCHAR(255), value VARCHAR(255)); '
                  'ALTER TABLE fugluconfig OWNER TO fuglu')
    for row in ROWS:
        postgres.psql("INSERT INTO fugluconfig VALUES ('%s', '%s', '%s', '%s')" % row)


def fill_mariadb(mariadb):
    mariadb.sql('DROP TABLE IF EXISTS fugluconfig; CREATE TABLE fugluconfig (scope VARCHAR(255), '
                'section VARCHAR(255), `option` VARCHAR(255), value VARCHAR(255))')
    for row in ROWS:
        mariadb.sql("INSERT INTO fugluconfig VALUES ('%s', '%s', '%s', '%s')" % row)


def fill_sqlite(path):
    connection = sqlite3.connect(path)
    connection.execute('CREATE TABLE fugluconfig (scope TEXT, section TEXT, option TEXT, '
                       'value TEXT)')
    connection.executemany('INSERT INTO fugluconfig VALUES (?, ?, ?, ?)', ROWS)
    connection.commit()
    connection.close()


class Backend(object):
    """One database under test: its URL, the [databaseconfig] lines it needs, the
    dialect and driver SQLAlchemy picks for the URL, the server (None for SQLite)."""

    def __init__(self, name, url, queries='', server=None):
        self.name, self.url, self.queries, self.server = name, url, queries, server
        self.dialect, self.driver = {'postgresql': ('postgresql', 'psycopg2'),
                                     'mariadb': ('mysql', 'pymysql'),
                                     'sqlite': ('sqlite', 'pysqlite')}[name]

    def databaseconfig(self, extra=''):
        return '[databaseconfig]\ndbconnectstring = %s\n%s%s' % (self.url, self.queries, extra)


def make_backend(request, name, tmp_world_dir):
    """The database `name`, filled with ROWS (servers: the module's shared instance)."""
    request.getfixturevalue('drivers')
    if name == 'postgresql':
        postgres = request.getfixturevalue('postgres')
        fill_postgres(postgres)
        return Backend('postgresql', postgres.url(), 'sql = %s\nsqlsection = %s\n'
                       % (POSTGRES_SQL, POSTGRES_SQLSECTION), postgres)
    if name == 'mariadb':
        mariadb = request.getfixturevalue('mariadb')
        fill_mariadb(mariadb)
        return Backend('mariadb', mariadb.url(), '', mariadb)   # FuGlu's default queries unchanged
    path = os.path.join(tmp_world_dir, 'settings.db')
    fill_sqlite(path)
    return Backend('sqlite', 'sqlite:///%s' % path)


@pytest.fixture(params=['postgresql', 'mariadb', 'sqlite'])
def backend(request, tmp_world_dir):
    return make_backend(request, request.param, tmp_world_dir)


@pytest.fixture(params=['postgresql', 'mariadb'])
def server_backend(request, tmp_world_dir):
    """The databases that run as a server, which a test can stop and start again."""
    return make_backend(request, request.param, tmp_world_dir)


def config_for(backend, extra=''):
    config = fuglu.load_config(embedded='[main]\n' + backend.databaseconfig(extra))
    config.set_defaults('SAPlugin', {'highspamaction': {'default': 'DEFAULTHIGHSPAMACTION'},
                                     'highspamlevel': {'default': '15'}})
    return config


def suspect_for(recipient):
    return fuglu.Suspect('sender@example.org', [recipient], inbuffer=b'Subject: x\r\n\r\nbody\r\n')


def forget_databases():
    """Each test opens its databases afresh (pool and cache of its own)."""
    fuglu._sql_databases.clear()


# -- DBConfig through SQLAlchemy ------------------------------------------------------

def test_scopes_through_sqlalchemy(backend):
    forget_databases()
    config = config_for(backend)
    database = fuglu.sql_database(backend.url, 5.0)
    assert isinstance(database, fuglu.SQLAlchemyDatabase)
    assert (database.backend, database.driver) == (backend.dialect, backend.driver)

    def runtime(recipient):
        return fuglu.DBConfig(config, suspect_for(recipient))
    assert runtime('a@reject.example').get('SAPlugin', 'highspamaction') == 'REJECT'
    assert runtime('vip@reject.example').get('SAPlugin', 'highspamaction') == 'DUNNO'
    assert runtime('a@tag.example').get('SAPlugin', 'highspamaction') == 'DEFAULTHIGHSPAMACTION'
    assert runtime('a@tag.example').getfloat('SAPlugin', 'highspamlevel') == 12.0
    whole = runtime('vip@reject.example')
    assert whole.load_section('SAPlugin')
    assert sorted(whole.get_cached_options('SAPlugin')) == ['highspamaction', 'highspamlevel']
    assert whole.get('SAPlugin', 'highspamaction') == 'DUNNO'


def test_get_session_gives_plugins_a_session_on_the_shared_engine(backend):
    forget_databases()
    from sqlalchemy import text
    session = fuglu.get_session(backend.url)
    try:
        count = session.execute(text('SELECT COUNT(*) FROM fugluconfig')).scalar()
    finally:
        session.close()
    assert count == len(ROWS)
    assert session.get_bind() is fuglu.sql_database(backend.url).engine


def test_a_slow_query_holds_the_caller_only_for_the_timeout(postgres, drivers):
    forget_databases()
    fill_postgres(postgres)
    slow = ('SELECT value FROM fugluconfig, pg_sleep(5) WHERE section=:section AND option=:option '
            'LIMIT 1')
    config = config_for(Backend('postgresql', postgres.url(), 'sql = %s\n' % slow), 'timeout = 1\n')
    started = time.monotonic()
    with pytest.raises(fuglu.RuntimeConfigError):
        fuglu.DBConfig(config, suspect_for('a@reject.example')).get('SAPlugin', 'highspamaction')
    assert time.monotonic() - started < 3


def test_outage_and_recovery(server_backend, caplog):
    backend = server_backend
    forget_databases()
    caplog.set_level(logging.INFO, logger='fuglu.sql')
    config = config_for(backend, 'value_cache_ttl = 30\n')
    database = fuglu.sql_database(backend.url, 5.0)
    database.clock = clock = FakeClock()

    def action(recipient):
        return fuglu.DBConfig(config, suspect_for(recipient)).get('SAPlugin', 'highspamaction')
    assert action('a@reject.example') == 'REJECT'
    backend.server.stop()
    try:
        clock.now += 60                                      # the cached answer has expired
        assert action('a@reject.example') == 'REJECT'       # ... served while the database is away
        clock.now += 2
        with pytest.raises(fuglu.RuntimeConfigError):
            action('new@reject.example')                     # never cached: the message would wait
    finally:
        backend.server.start()

    def works_again():
        clock.now += 2                                       # past the fail-fast interval
        return _answers(action, 'new@reject.example')
    # the pool's connections died with the server; the next lookup gets a fresh one
    peers.wait_until(works_again, 30, interval=0.1, what='lookups to work again')
    assert action('vip@reject.example') == 'DUNNO'
    assert len([line for line in caplog.messages if 'cannot answer' in line]) == 1
    assert len([line for line in caplog.messages if 'answers again' in line]) == 1


class FakeClock(object):
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _answers(action, recipient):
    try:
        return action(recipient) == 'REJECT'
    except fuglu.RuntimeConfigError:
        return False


def test_one_query_per_key_and_ttl_under_load(postgres, drivers):
    forget_databases()
    fill_postgres(postgres)
    config = config_for(Backend('postgresql', postgres.url(), 'sql = %s\n' % POSTGRES_SQL),
                        'value_cache_ttl = 300\n')
    recipients = ['user%d@reject.example' % number for number in range(5)]
    postgres.reset_statement_calls()
    errors = []

    def worker(number):
        try:
            for index in range(200):
                runtime = fuglu.DBConfig(config, suspect_for(recipients[(number + index) % 5]))
                runtime.get('SAPlugin', 'highspamaction')
                runtime.getfloat('SAPlugin', 'highspamlevel')
        except Exception as error:  # reported below
            errors.append(error)
    threads = [threading.Thread(target=worker, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    # 8 threads x 200 messages x 2 lookups, 5 recipients x 2 options: 10 distinct keys
    assert postgres.statement_calls('FROM fugluconfig') == 10


# -- lint, each driver --------------------------------------------------------------

def lint(tmp_world_dir, databaseconfig, python_options=()):
    path = os.path.join(tmp_world_dir, 'lint.conf')
    with open(path, 'w') as conf:
        conf.write('[main]\nplugins =\nprependers =\nappenders =\nincomingport = 10025\n'
                   'controlport =\n' + databaseconfig)
    command = [sys.executable] + list(python_options) + [FUGLU_SCRIPT, '--lint', '-c', path]
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    return result.returncode, result.stdout.decode()


def test_lint_reports_backend_driver_and_rows(backend, tmp_world_dir):
    returncode, out = lint(tmp_world_dir, backend.databaseconfig())
    pattern = (r'runtime config sql: \S+: %s via %s [\d.]+ and SQLAlchemy 2'
               % (backend.dialect, backend.driver))
    assert re.search(pattern, out), out
    assert 'runtime config sql: query OK, 0 rows for section=testsection' in out
    assert 'runtime config sqlsection: query OK, 0 rows' in out
    assert 'fuglu-secret' not in out
    assert returncode == 0, out


def test_lint_sqlite_without_sqlalchemy(tmp_world_dir):
    path = os.path.join(tmp_world_dir, 'settings.db')
    fill_sqlite(path)
    returncode, out = lint(tmp_world_dir, '[databaseconfig]\ndbconnectstring = sqlite:///%s\n'
                           % path, python_options=('-I', '-S'))
    assert 'via the standard library sqlite3 (SQLAlchemy not installed)' in out, out
    assert returncode == 0, out


def test_lint_database_down(postgres, drivers, tmp_world_dir):
    url = postgres.url().replace(':%d/' % postgres.port, ':%d/' % peers.free_port())
    returncode, out = lint(tmp_world_dir, '[databaseconfig]\ndbconnectstring = %s\nsql = %s\n'
                           % (url, POSTGRES_SQL))
    assert returncode != 0
    assert 'query failed' in out and 'OperationalError' in out, out


# -- through Postfix and spamd ------------------------------------------------------

def send_gtube(postfix, recipient):
    reply = postfix.send('sender@example.org', [recipient], gtube_mail(recipient))
    assert reply.code == 250, reply


def gtube_mail(recipient):
    return ('From: <sender@example.org>\r\nTo: <%s>\r\nSubject: policy test\r\n'
            'Date: Wed, 25 Nov 2026 06:00:00 +0000\r\nMessage-ID: <%d.%s>\r\n\r\n'
            % (recipient, time.time_ns(), recipient)).encode() + GTUBE + b'\r\n'


def fuglu_config(postfix, spamd, backend, port, workdir):
    return ('[main]\nincomingport = smtp:127.0.0.1:%d\noutgoinghost = 127.0.0.1\n'
            'outgoingport = %d\nplugins = spamassassin\nprependers =\nappenders =\ncontrolport =\n'
            'tempdir = %s\n'
            '[performance]\nminthreads = 2\nmaxthreads = 10\n[SAPlugin]\nport = %d\n'
            % (port, postfix.reinject_port, workdir, spamd.port)) + backend.databaseconfig()


@pytest.fixture
def policy_chain(postfix_factory, fuglu_factory, spamd, tmp_world_dir):
    """Call with a Backend: an after-queue Postfix with fuglu (spamassassin) reading it."""
    def start(backend):
        postfix = postfix_factory('afterqueue')
        config = fuglu_config(postfix, spamd, backend, postfix.filter_port, tmp_world_dir)
        return postfix, fuglu_factory(config, workdir=tmp_world_dir)
    return start


def test_domain_policy_from_the_database(policy_chain, backend):
    postfix, _fuglu_process = policy_chain(backend)
    for recipient in ('a@reject.example', 'vip@reject.example', 'a@tag.example'):
        send_gtube(postfix, recipient)
    # %reject.example: REJECT -> Postfix bounces the message with fuglu's 5xx
    postfix.wait_log(r'to=<a@reject\.example>.*status=bounced .*message identified as spam',
                     timeout=60)
    # the address row beats its domain, and another domain keeps the file's policy: tagged
    for recipient in ('vip@reject.example', 'a@tag.example'):
        delivered = postfix.wait_delivered(recipient, timeout=60)
        assert b'X-Fuglu-Spamstatus: YES' in delivered
    assert postfix.delivered('a@reject.example') == []


def test_database_stopped_mid_run_defers_then_the_right_policy(policy_chain, server_backend):
    backend = server_backend
    postfix, fuglu_process = policy_chain(backend)
    send_gtube(postfix, 'warm@tag.example')
    postfix.wait_delivered('warm@tag.example', timeout=60)
    backend.server.stop()
    try:
        for recipient in ('late@reject.example', 'vip@reject.example'):
            send_gtube(postfix, recipient)
        for recipient in ('late@reject\\.example', 'vip@reject\\.example'):
            postfix.wait_log(r'to=<%s>.*status=deferred .*said: 451 4\.7\.1 per-recipient '
                             r'settings unavailable, try again later' % recipient, timeout=60)
    finally:
        backend.server.start()
    postfix.flush()
    postfix.wait_log(r'to=<late@reject\.example>.*status=bounced .*message identified as spam',
                     timeout=90)
    delivered = postfix.wait_delivered('vip@reject.example', timeout=90)
    assert b'X-Fuglu-Spamstatus: YES' in delivered
    log = fuglu_process.log_text()
    # once per process that holds the database: the thread backend's only one, or each
    # worker of the process backend that queried it during the outage
    outages, recoveries = log.count('cannot answer'), log.count('answers again')
    assert 1 <= recoveries <= outages <= peers.serving_processes(), log


def test_two_filter_hosts_share_one_database(postfix_factory, fuglu_factory, spamd, postgres,
                                             drivers, tmp_world_dir):
    """Postfix tries the filters in the order listed; both read the same PostgreSQL."""
    fill_postgres(postgres)
    backend = Backend('postgresql', postgres.url(), 'sql = %s\nsqlsection = %s\n'
                      % (POSTGRES_SQL, POSTGRES_SQLSECTION))
    first_port, second_port = peers.free_port(), peers.free_port()
    postfix = postfix_factory('afterqueue', main_cf={
        'content_filter': 'fuglu_default:[127.0.0.1]:%d, [127.0.0.1]:%d'
                          % (first_port, second_port)})
    hosts = []
    for name, port in (('first', first_port), ('second', second_port)):
        workdir = os.path.join(tmp_world_dir, name)
        os.makedirs(workdir)
        os.chmod(workdir, 0o755)
        config = fuglu_config(postfix, spamd, backend, port, workdir)
        hosts.append(fuglu_factory(config, workdir=workdir))
    first, second = hosts
    send_gtube(postfix, 'one@reject.example')
    relayed = r'to=<%s>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:%d.*status=bounced'
    postfix.wait_log(relayed % (r'one@reject\.example', first_port), timeout=60)
    first.stop()
    send_gtube(postfix, 'two@reject.example')
    postfix.wait_log(relayed % (r'two@reject\.example', second_port), timeout=60)
    send_gtube(postfix, 'vip@reject.example')
    assert b'X-Fuglu-Spamstatus: YES' in postfix.wait_delivered('vip@reject.example', timeout=60)
    assert 'two@reject.example' in second.log_text()
