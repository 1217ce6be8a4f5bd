"""The zipapp build: reproducible, complete, and runnable every documented way."""

import hashlib
import os
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(target):
    subprocess.run([sys.executable, os.path.join(REPO, 'build_zipapp.py'), '-o', str(target)],
                   check=True, stdout=subprocess.DEVNULL)
    return target


@pytest.fixture(scope='module')
def pyz(tmp_path_factory):
    return build(tmp_path_factory.mktemp('pyz') / 'fuglu.pyz')


def digest(path):
    with open(str(path), 'rb') as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def test_the_same_sources_give_the_same_bytes(pyz, tmp_path):
    again = build(tmp_path / 'again.pyz')
    assert digest(again) == digest(pyz)


def test_archive_has_shebang_core_plugins_rules_and_dist_config(pyz):
    with open(str(pyz), 'rb') as handle:
        assert handle.readline() == b'#!/usr/bin/env python3\n'
    names = set(zipfile.ZipFile(str(pyz)).namelist())
    for name in ('__main__.py', 'fuglu.py', 'fuglu.conf.dist', 'fuglu_plugins/__init__.py',
                 'fuglu_plugins/clamav.py', 'fuglu_plugins/spamassassin.py',
                 'fuglu_plugins/attachment.py',
                 'fuglu_plugins/archive.py', 'fuglu_plugins/debug.py', 'fuglu_plugins/skip.py',
                 'conf/rules/default-filenames.conf', 'conf/templates/blockedfile.tmpl'):
        assert name in names
    assert [name for name in names if name.endswith('.pyc')] == ['fuglu.pyc']
    with zipfile.ZipFile(str(pyz)) as archive, open(os.path.join(REPO, 'fuglu.py'), 'rb') as source:
        assert archive.read('fuglu.py') == source.read()


def loaded_from(pyz, tmp_path, python=sys.executable):
    """What the fuglu module of ``pyz`` was loaded from under ``python``: 'bytecode'
    when zipimport took fuglu.pyc, 'source' when it compiled fuglu.py."""
    probe = ('import sys; sys.path.insert(0, sys.argv[1]); import fuglu; '
             'print("bytecode" if fuglu.__file__.endswith(".pyc") else "source")')
    result = subprocess.run([python, '-I', '-c', probe, str(pyz)], cwd=str(tmp_path),
                            stdout=subprocess.PIPE, check=True, timeout=60)
    return result.stdout.decode().strip()


def test_the_core_starts_from_byte_code_compiled_at_build_time(pyz, tmp_path):
    assert loaded_from(pyz, tmp_path) == 'bytecode'


def test_a_core_changed_inside_the_archive_is_compiled_not_the_stale_byte_code(pyz, tmp_path):
    changed = tmp_path / 'changed.pyz'
    with zipfile.ZipFile(str(pyz)) as original, zipfile.ZipFile(str(changed), 'w') as copy:
        for info in original.infolist():
            data = original.read(info)
            if info.filename == 'fuglu.py':
                data = data.replace(b"__version__ = '", b"__version__ = 'changed-", 1)
            copy.writestr(info, data)
    assert loaded_from(changed, tmp_path) == 'source'
    result = subprocess.run([sys.executable, '-I', str(changed), '--version'], cwd=str(tmp_path),
                            stdout=subprocess.PIPE, check=True, timeout=60)
    assert result.stdout.decode().startswith('changed-')


@pytest.mark.parametrize('how', ['pyz', 'script', 'module', 'module-from-pyz'])
def test_runs_every_documented_way(pyz, tmp_path, how):
    env = dict(os.environ)
    env.pop('PYTHONPATH', None)
    command = {
        'pyz': [sys.executable, '-I', str(pyz), '--version'],
        'script': [sys.executable, os.path.join(REPO, 'fuglu.py'), '--version'],
        'module': [sys.executable, '-m', 'fuglu', '--version'],
        'module-from-pyz': [sys.executable, '-m', 'fuglu', '--version'],
    }[how]
    if how == 'module':
        env['PYTHONPATH'] = REPO
    if how == 'module-from-pyz':
        env['PYTHONPATH'] = str(pyz)
    result = subprocess.run(command, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, timeout=60)
    assert result.returncode == 0, result.stderr
    from helpers import fuglu
    assert result.stdout.decode().strip() == fuglu.__version__


def test_dump_defaults_from_the_pyz_is_fuglu_conf_dist(pyz, tmp_path):
    result = subprocess.run([sys.executable, '-I', str(pyz), '--dump-defaults'], cwd=str(tmp_path),
                            stdout=subprocess.PIPE, timeout=60, check=True)
    with open(os.path.join(REPO, 'fuglu.conf.dist'), 'rb') as handle:
        assert result.stdout == handle.read()
