"""Archive plugin (fuglu_plugins/archive.py): rules decide, the copy lands
where the templates say and never outside local_archivedir."""

import os
import stat
import sys

import pytest

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)

import fuglu  # noqa: E402
from fuglu_plugins.archive import ArchivePlugin, safe_component  # noqa: E402
from helpers import make_config, no_address_check  # noqa: E402,F401

MESSAGE = b'From: a@example.net\r\nTo: b@example.org\r\nSubject: hello\r\n\r\nbody\r\n'


def make_plugin(tmp_path, rules, **options):
    rules_path = tmp_path / 'archive.regex'
    rules_path.write_text(rules)
    archive_dir = tmp_path / 'archive'
    archive_dir.mkdir(exist_ok=True)
    settings = {'archiverules': str(rules_path), 'local_archivedir': str(archive_dir)}
    settings.update(options)
    text = '[ArchivePlugin]\n' + ''.join('%s = %s\n' % item for item in settings.items())
    config = make_config(text, confdir=str(tmp_path))
    return ArchivePlugin(config), archive_dir


def suspect(recipient='b@example.org', sender='a@example.net', source=MESSAGE):
    return fuglu.Suspect(sender, [recipient], source)


def files_under(root):
    found = []
    for folder, _dirs, names in os.walk(str(root)):
        found.extend(os.path.join(folder, name) for name in names)
    return found


def test_matching_rule_writes_the_message_where_the_templates_say(tmp_path):
    plugin, archive_dir = make_plugin(tmp_path, 'to_domain ^example\\.org$ yes\n',
                                      local_subdirtemplate='${to_domain}/${to_localpart}',
                                      local_filenametemplate='${archiveid}.eml')
    message = suspect()
    assert plugin.examine(message) == fuglu.DUNNO
    expected = archive_dir / 'example.org' / 'b' / ('%s.eml' % message.id)
    assert files_under(archive_dir) == [str(expected)]
    assert expected.read_bytes() == MESSAGE
    assert stat.S_IMODE(os.stat(str(expected)).st_mode) == 0o600
    assert message.tags['archived'] is True
    assert message.tags['archived.result'] == {'localdir': str(expected)}
    assert message.tags['archive.ham'] is True and message.tags['archive.spam'] is False


def test_default_subdir_contains_the_date(tmp_path):
    plugin, archive_dir = make_plugin(tmp_path, 'to_domain example yes\n')
    message = suspect()
    plugin.examine(message)
    import time
    day = time.strftime('%Y-%m-%d')
    assert files_under(archive_dir) == [str(archive_dir / 'example.org' / 'b' / day /
                                            ('%s.eml' % message.id))]


@pytest.mark.parametrize('recipient', [
    '../../etc@example.org', '..@example.org', 'x/../../../y@example.org', 'a@../../tmp',
    'x/../../y@example.org',
])
def test_hostile_addresses_stay_inside_archivedir(tmp_path, recipient, no_address_check):
    plugin, archive_dir = make_plugin(tmp_path, 'envelope_to . yes\n')
    message = suspect(recipient=recipient)
    assert plugin.examine(message) == fuglu.DUNNO
    written = files_under(archive_dir)
    assert len(written) == 1
    real_root = os.path.realpath(str(archive_dir))
    assert os.path.realpath(written[0]).startswith(real_root + os.sep)
    # nothing appeared next to the archive directory
    assert sorted(os.listdir(str(tmp_path))) == ['archive', 'archive.regex']


def test_hostile_filename_template_values_are_cleaned(tmp_path, no_address_check):
    plugin, archive_dir = make_plugin(tmp_path, 'envelope_to . yes\n',
                                      local_subdirtemplate='${subject}',
                                      local_filenametemplate='${from_localpart}.eml')
    source = MESSAGE.replace(b'Subject: hello', b'Subject: ../../escape')
    plugin.examine(suspect(sender='../../../evil@example.net', source=source))
    written = files_under(archive_dir)
    assert ([os.path.relpath(path, str(archive_dir)) for path in written]
            == ['.._.._escape/.._.._.._evil.eml'])


def test_symlink_out_of_the_archive_is_refused(tmp_path):
    outside = tmp_path / 'outside'
    outside.mkdir()
    plugin, archive_dir = make_plugin(tmp_path, 'envelope_to . yes\n',
                                      local_subdirtemplate='${to_domain}')
    os.symlink(str(outside), str(archive_dir / 'example.org'))
    message = suspect()
    assert plugin.examine(message) == fuglu.DEFER  # problemaction
    assert os.listdir(str(outside)) == []
    assert 'outside' in message.tags['archived.errors']['localdir']


def test_rule_arguments(tmp_path):
    rules = 'envelope_to ^nope@ no\nenvelope_to ^bare@\nenvelope_to ^odd@ maybe\n'
    plugin, archive_dir = make_plugin(tmp_path, rules, local_subdirtemplate='${to_localpart}')
    for recipient in ('nope@example.org', 'bare@example.org', 'odd@example.org',
                      'nomatch@example.org'):
        plugin.examine(suspect(recipient=recipient))
    # "no" and no match: nothing; no argument and unknown argument: archived
    assert sorted(os.listdir(str(archive_dir))) == ['bare', 'odd']


def test_missing_rules_file_archives_nothing(tmp_path):
    plugin, archive_dir = make_plugin(tmp_path, '', archiverules=str(tmp_path / 'missing.regex'))
    message = suspect()
    assert plugin.examine(message) == fuglu.DUNNO
    assert files_under(archive_dir) == [] and message.tags['archived'] is False


def test_original_or_modified_source(tmp_path):
    plugin, archive_dir = make_plugin(tmp_path, 'envelope_to . yes\n', local_subdirtemplate='orig')
    message = suspect()
    message.set_source(b'Subject: changed\r\n\r\nnew body\r\n')
    plugin.examine(message)
    assert (archive_dir / 'orig' / ('%s.eml' % message.id)).read_bytes() == MESSAGE
    plugin, archive_dir = make_plugin(tmp_path, 'envelope_to . yes\n', local_subdirtemplate='mod',
                                      local_useoriginal='False')
    message = suspect()
    message.set_source(b'Subject: changed\r\n\r\nnew body\r\n')
    plugin.examine(message)
    assert b'new body' in (archive_dir / 'mod' / ('%s.eml' % message.id)).read_bytes()


def test_permissions_option(tmp_path):
    plugin, archive_dir = make_plugin(tmp_path, 'envelope_to . yes\n', local_subdirtemplate='p',
                                      local_chmod='0640', local_chown=str(os.getuid()),
                                      local_chgrp=str(os.getgid()))
    message = suspect()
    plugin.examine(message)
    path = archive_dir / 'p' / ('%s.eml' % message.id)
    assert stat.S_IMODE(os.stat(str(path)).st_mode) == 0o640
    assert not [name for name in os.listdir(str(archive_dir / 'p')) if name.startswith('.archive-')]


def test_failure_gives_problemaction_as_scanner_and_nothing_as_appender(tmp_path):
    plugin, archive_dir = make_plugin(tmp_path, 'envelope_to . yes\n', problemaction='REJECT')
    archive_dir.rmdir()
    message = suspect()
    assert plugin.examine(message) == fuglu.REJECT
    assert message.tags['archived'] is False and message.tags['archived.errors']
    assert plugin.process(suspect(), fuglu.DUNNO) is None


def test_works_as_appender(tmp_path):
    plugin, archive_dir = make_plugin(tmp_path, '@archive.blocked True yes\n',
                                      local_subdirtemplate='blocked')
    message = suspect()
    plugin.process(message, fuglu.DUNNO)
    assert files_under(archive_dir) == []
    message.tags['blocked']['FiletypePlugin'] = True
    plugin.process(message, fuglu.DELETE)
    assert files_under(archive_dir) == [str(archive_dir / 'blocked' / ('%s.eml' % message.id))]


def test_archive_id_from_header(tmp_path):
    upstream_id = 'ab' * 16
    plugin, archive_dir = make_plugin(tmp_path, 'envelope_to . yes\n', local_subdirtemplate='h',
                                      fugluid_headername='X-Fuglu-Suspect')
    plugin.examine(suspect(source=b'X-Fuglu-Suspect: %s\r\n' % upstream_id.encode() + MESSAGE))
    assert os.listdir(str(archive_dir / 'h')) == ['%s.eml' % upstream_id]
    # missing or forged ids are skipped (fugluid_headername_skipmissing = True)
    plugin.examine(suspect())
    plugin.examine(suspect(source=b'X-Fuglu-Suspect: ../../x\r\n' + MESSAGE))
    assert os.listdir(str(archive_dir / 'h')) == ['%s.eml' % upstream_id]


def test_debug_mode_writes_nothing(tmp_path):
    plugin, archive_dir = make_plugin(tmp_path, 'envelope_to . yes\n')
    message = suspect()
    message.tags['debug'] = True
    plugin.examine(message)
    assert files_under(archive_dir) == []


@pytest.mark.parametrize('text, expected', [
    ('..', '_'), ('.', '_'), ('', '_'), ('a/b', 'a_b'), ('a\\b', 'a_b'), ('x\x00y\nz', 'x_y_z'),
    ('normal.eml', 'normal.eml'),
])
def test_safe_component(text, expected):
    assert safe_component(text) == expected


def test_lint(tmp_path, capsys):
    plugin, archive_dir = make_plugin(tmp_path, 'envelope_to . yes\n')
    assert plugin.lint() is True
    plugin, archive_dir = make_plugin(tmp_path, 'envelope_to . yes\n',
                                      archivebackends='localdir, s3',
                                      local_archivedir=str(tmp_path / 'nowhere'))
    assert plugin.lint() is False
    out = capsys.readouterr().out
    assert 's3' in out and 'nowhere' in out


def test_loads_by_alias(tmp_path):
    config = make_config('[main]\nappenders = archive\n', confdir=str(tmp_path))
    plugin = fuglu.load_plugins(config, 'appenders')[0]
    assert isinstance(plugin, ArchivePlugin) and str(plugin) == 'Archive'
    assert plugin.section == 'ArchivePlugin'


def test_shipped_rules_file_archives_nothing(tmp_path):
    plugin, archive_dir = make_plugin(tmp_path, '',
                                      archiverules=os.path.join(REPO_DIR, 'conf', 'archive.regex'))
    assert fuglu.SuspectFilter(os.path.join(REPO_DIR, 'conf', 'archive.regex')).lint()
    plugin.examine(suspect())
    assert files_under(archive_dir) == []


def test_sender_text_in_paths_is_data_and_fits_the_file_system(tmp_path):
    """Subjects and addresses are senders' text: never expanded as a template, never a
    component longer than the file system allows (which would defer the message on
    every retry), 8-bit or not."""
    plugin, archive_dir = make_plugin(tmp_path, 'envelope_to . yes\n',
                                      local_subdirtemplate='${subject}/${to_localpart}',
                                      problemaction='DEFER')
    subjects = [b'${local_archivedir} ${id} $$', '\u00e4'.encode('utf-8') * 300, b'\xff\xfe' * 300,
                b'=?utf-8?b?' + b'w6Q=' * 100 + b'?=', b'a' * 5000]
    for subject in subjects:
        source = b'From: a@example.net\r\nSubject: ' + subject + b'\r\n\r\nbody\r\n'
        message = suspect(recipient='\u00fc' * 60 + '@example.org', source=source)
        assert plugin.examine(message) == fuglu.DUNNO, subject[:40]
        path = message.tags['archived.result']['localdir']
        for component in os.path.relpath(path, str(archive_dir)).split(os.sep):
            assert 0 < len(os.fsencode(component)) <= 200
    assert os.path.isdir(str(archive_dir / '${local_archivedir} ${id} $$'))


@pytest.mark.parametrize('text', ['\u00e4' * 150, 'a\udcff' * 150, '\U0001f600' * 80],
                         ids=['umlauts', 'escaped-8-bit', 'emoji'])
def test_safe_component_cuts_bytes_not_characters(text):
    component = safe_component(text)
    assert 0 < len(component.encode('utf-8')) <= 200
    assert component.encode('utf-8').decode('utf-8') == component
