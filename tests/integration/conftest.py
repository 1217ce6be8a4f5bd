"""Fixtures that start real peers (Postfix, clamd, spamd, PostgreSQL, MariaDB, fuglu)
on 127.0.0.1.

All the mechanics live in peers.py; this file only ties their lifetimes to pytest's.
A fixture whose peer cannot be installed fails the test, or skips it when
FUGLU_TEST_NO_PEERS=1.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peers  # noqa: E402  (needs the path above)


def _stop_all(instances, method='stop'):
    """Stop every instance, newest first, even when one of them fails to stop."""
    errors = []
    for instance in reversed(instances):
        try:
            getattr(instance, method)()
        except Exception as error:  # keep stopping the others, report at the end
            errors.append('%r: %s' % (instance, error))
    if errors:
        raise RuntimeError('could not stop every peer:\n' + '\n'.join(errors))


@pytest.fixture(scope='session')
def peer_packages():
    """Installs every peer package once per test session (apt-get, when missing)."""
    peers.ensure_debian_packages(*peers.ALL_PEER_PACKAGES)


@pytest.fixture
def tmp_world_dir():
    """A world-traversable temp folder under /tmp, removed afterwards."""
    path = peers.world_dir()
    yield path
    peers.remove_world_dir(path)


@pytest.fixture
def postfix_factory(peer_packages):
    """Call with (mode='plain', **PostfixInstance options) to get a started private Postfix.

    Ports not given are allocated with free_port(); every instance is stopped and its
    folder removed at teardown.
    """
    started = []
    folders = []

    def create(mode='plain', **options):
        basedir = peers.world_dir('fuglu-postfix-')
        folders.append(basedir)
        instance = peers.PostfixInstance(basedir, mode, **options)
        started.append(instance)
        return instance.start()

    yield create
    _stop_all(started)
    for basedir in folders:
        peers.remove_world_dir(basedir)


@pytest.fixture(scope='module')
def clamd(peer_packages):
    """A started ClamdInstance (EICAR signature only), shared by the tests of one module."""
    yield from peers.run_in_world_dir(peers.ClamdInstance, 'fuglu-clamd-')


@pytest.fixture(scope='module')
def spamd(peer_packages):
    """A started SpamdInstance (offline rules), shared by the tests of one module."""
    yield from peers.run_in_world_dir(peers.SpamdInstance, 'fuglu-spamd-')


@pytest.fixture(scope='module')
def postgres(peer_packages):
    """A started PostgresInstance (database fuglu, pg_stat_statements), shared by the
    tests of one module."""
    yield from peers.run_in_world_dir(peers.PostgresInstance, 'fuglu-postgres-')


@pytest.fixture(scope='module')
def mariadb(peer_packages):
    """A started MariadbInstance (database fuglu), shared by the tests of one module."""
    yield from peers.run_in_world_dir(peers.MariadbInstance, 'fuglu-mariadb-')


@pytest.fixture
def fuglu_factory():
    """Call with (config_text_or_path, **FugluProcess options) to get a started fuglu.

    Every process is stopped by pid (SIGTERM, then SIGKILL) at teardown.
    """
    started = []

    def create(config, **options):
        process = peers.FugluProcess(config, **options)
        started.append(process)
        return process.start()

    yield create
    _stop_all(started, method='cleanup')
