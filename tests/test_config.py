"""The configuration system: FuGlu's parser semantics, the lint checks of
options, the incomingport and plugin list syntax, and fuglu.conf.dist."""

import configparser
import io
import os
import subprocess
import sys

import pytest

from helpers import fuglu, make_config, run_fuglu_lint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parser(*texts, confdir='/etc/fuglu'):
    config = fuglu.FuConfigParser(confdir=confdir)
    for number, text in enumerate(texts):
        config.read_config_text(text, 'file%d.conf' % number)
    return config


# -- parser semantics ---------------------------------------------------------------

def test_last_value_wins_within_one_file_and_across_files():
    config = parser('[main]\nidentifier = first\nidentifier = second\n[main]\nplugins = a\n')
    assert config.get('main', 'identifier') == 'second'
    assert config.get('main', 'plugins') == 'a'
    config.read_config_text('[main]\nidentifier = third\n', 'later.conf')
    assert config.get('main', 'identifier') == 'third'
    assert config.get('main', 'plugins') == 'a'   # untouched options stay


def test_option_names_are_case_insensitive_section_names_are_not():
    config = parser('[main]\nOutGoingPort = 2525\n[Other]\nx = 1\n')
    assert config.get('main', 'outgoingport') == '2525'
    assert config.get('main', 'OUTGOINGPORT') == '2525'
    assert config.getint('main', 'OutgoingPort') == 2525
    assert config.has_section('Other')
    assert not config.has_section('other')


def test_inline_comments_are_not_stripped_but_full_line_comments_are():
    config = parser('[main]\n# a comment\n; another\nidentifier = dist # not a comment\n'
                    'prependers = a ; b\n')
    assert config.get('main', 'identifier') == 'dist # not a comment'
    assert config.get('main', 'prependers') == 'a ; b'
    assert config.options('main') == ['identifier', 'prependers']


def test_no_percent_interpolation_and_continuation_lines():
    config = parser('[main]\nlogtemplate = 100%% ${id} %(x)s\nplugins = a,\n  b,\n  c\n')
    assert config.get('main', 'logtemplate') == '100%% ${id} %(x)s'
    assert config.getlist('main', 'plugins') == ['a', 'b', 'c']


@pytest.mark.parametrize('text,expected', [
    ('1', True), ('yes', True), ('TRUE', True), ('On', True),
    ('0', False), ('no', False), ('False', False), ('OFF', False), (' yes ', True),
])
def test_booleans(text, expected):
    config = parser('[s]\nflag = %s\n' % text)
    assert config.getboolean('s', 'flag') is expected


def test_a_boolean_that_is_none_of_the_words_raises():
    config = parser('[s]\nflag = maybe\n')
    with pytest.raises(ValueError):
        config.getboolean('s', 'flag')


def test_getlist_splits_strips_and_drops_empty_items():
    config = parser('[s]\nitems = a, B ,,c , \nempty =\n')
    assert config.getlist('s', 'items') == ['a', 'B', 'c']
    assert config.getlist('s', 'items', lower=True) == ['a', 'b', 'c']
    assert config.getlist('s', 'empty') == []
    # as in FuGlu: a missing option without default raises, unless a fallback is given
    with pytest.raises(configparser.NoOptionError):
        config.getlist('s', 'missing')
    assert config.getlist('s', 'missing', fallback=[]) == []


def test_confdir_marker_is_expanded_in_string_lookups():
    config = parser('[skip]\nfilterfile = ${confdir}/skipplugins.regex\n'
                    'files = ${confdir}/a, ${confdir}/b\n', confdir='/srv/fuglu')
    assert config.get('skip', 'filterfile') == '/srv/fuglu/skipplugins.regex'
    assert config.getlist('skip', 'files') == ['/srv/fuglu/a', '/srv/fuglu/b']
    assert config.get('skip', 'filterfile', raw=True) == '${confdir}/skipplugins.regex'


def test_confdir_is_the_directory_of_the_main_config_file(tmp_path):
    path = tmp_path / 'fuglu.conf'
    path.write_text('[main]\nplugins =\n')
    config = fuglu.load_config(str(path))
    assert config.confdir == str(tmp_path)
    # the default of nobouncefile uses the marker
    assert config.get('main', 'nobouncefile') == str(tmp_path / 'rules' / 'nobounce.txt')


def test_env_marker(monkeypatch):
    monkeypatch.setenv('FUGLU_TEST_CLAMD_HOST', 'clamd.example')
    monkeypatch.delenv('FUGLU_TEST_UNSET_VARIABLE', raising=False)
    assert fuglu.resolve_env_marker('$FUGLU_TEST_CLAMD_HOST') == 'clamd.example'
    assert fuglu.resolve_env_marker('$FUGLU_TEST_UNSET_VARIABLE') == '$FUGLU_TEST_UNSET_VARIABLE'
    assert fuglu.resolve_env_marker('$') == '$'
    assert fuglu.resolve_env_marker('${confdir}/x') == '${confdir}/x'
    assert fuglu.resolve_env_marker('localhost') == 'localhost'
    assert fuglu.resolve_env_marker('') == ''


def test_env_marker_in_outgoinghost(monkeypatch):
    monkeypatch.setenv('FUGLU_TEST_DOWNSTREAM', '192.0.2.7')
    config = make_config('[main]\noutgoinghost = $FUGLU_TEST_DOWNSTREAM\noutgoingport = 2526\n')
    assert fuglu.outgoing_target(config) == ('192.0.2.7', 2526)
    config = make_config('[main]\noutgoinghost = ${injecthost}\n')
    assert fuglu.outgoing_target(config, peer_ip='198.51.100.9') == ('198.51.100.9', 10026)


def test_lookups_fall_back_to_registered_defaults():
    config = make_config('[main]\noutgoingport = 2600\n')
    assert config.getint('main', 'outgoingport') == 2600
    assert config.get('main', 'outgoinghost') == '127.0.0.1'      # core default
    assert config.getint('performance', 'maxthreads') == 40
    assert config.has_option('main', 'suspectidheader')
    config.set_defaults('MyPlugin', {'threshold': {'default': '7', 'description': 'x'},
                                     'where': {'default': 'a', 'description': 'y',
                                               'section': 'other'}})
    assert config.getint('MyPlugin', 'threshold') == 7
    assert config.get('other', 'where') == 'a'
    assert config.has_option('MyPlugin', 'THRESHOLD')
    config.read_config_text('[MyPlugin]\nthreshold = 9\n', 'override.conf')
    assert config.getint('MyPlugin', 'threshold') == 9
    with pytest.raises(configparser.NoOptionError):
        config.get('main', 'no_such_option')
    assert config.get('main', 'no_such_option', fallback='fb') == 'fb'
    with pytest.raises(configparser.NoSectionError):
        config.get('nosection', 'x')


def test_conf_d_files_are_read_sorted_after_the_main_file(tmp_path):
    main = tmp_path / 'fuglu.conf'
    main.write_text('[main]\nidentifier = main\noutgoingport = 1111\nplugins = main\n')
    confd = tmp_path / 'conf.d'
    confd.mkdir()
    # written in the reverse order so that directory order and name order differ
    (confd / '20-late.conf').write_text('[main]\nidentifier = late\n')
    (confd / '10-early.conf').write_text('[main]\nidentifier = early\noutgoingport = 2222\n')
    (confd / '15-ignored.txt').write_text('[main]\nidentifier = not a conf file\n')
    config = fuglu.load_config(str(main), str(confd))
    assert config.get('main', 'identifier') == 'late'
    assert config.get('main', 'outgoingport') == '2222'
    assert config.get('main', 'plugins') == 'main'
    assert config.files == [str(main), str(confd / '10-early.conf'), str(confd / '20-late.conf')]


def test_configdir_option_in_the_main_file(tmp_path):
    confd = tmp_path / 'extra'
    confd.mkdir()
    (confd / 'a.conf').write_text('[main]\nidentifier = from-configdir\n')
    main = tmp_path / 'fuglu.conf'
    main.write_text('[main]\nconfigdir = %s\nidentifier = main\n' % confd)
    assert fuglu.load_config(str(main)).get('main', 'identifier') == 'from-configdir'


# -- option checks ------------------------------------------------------------------

def test_unknown_option_error_names_file_section_and_option(tmp_path):
    path = tmp_path / 'fuglu.conf'
    path.write_text('[main]\nplugins =\nincommingport = 10025\n')
    config = fuglu.load_config(str(path))
    errors = fuglu.check_options(config, 'main', fuglu.CORE_DEFAULTS['main'])
    assert len(errors) == 1, errors
    assert str(path) in errors[0]
    assert '[main]' in errors[0]
    assert 'incommingport' in errors[0]
    assert 'Unknown' in errors[0]


def test_invalid_value_error_names_file_section_option_and_value(tmp_path):
    path = tmp_path / 'fuglu.conf'
    path.write_text('[main]\noutgoingport = twentyfive\nspamstatusheader = perhaps\n'
                    'trusted_xforward_peers = 127.0.0.1, not-a-network\n'
                    '[performance]\nmaxthreads = many\n[virus]\ndefaultvirusaction = explode\n')
    config = fuglu.load_config(str(path))
    errors = []
    for section, table in fuglu.CORE_DEFAULTS.items():
        errors += fuglu.check_options(config, section, table)
    for section, option, value in (('main', 'outgoingport', 'twentyfive'),
                                   ('main', 'spamstatusheader', 'perhaps'),
                                   ('main', 'trusted_xforward_peers', 'not-a-network'),
                                   ('performance', 'maxthreads', 'many'),
                                   ('virus', 'defaultvirusaction', 'explode')):
        matching = [e for e in errors if '[%s] %s' % (section, option) in e]
        assert len(matching) == 1, (option, errors)
        assert str(path) in matching[0] and value in matching[0]
    assert len(errors) == 5, errors


def test_valid_core_options_give_no_errors():
    config = make_config('[main]\noutgoingport = 10026\n'
                         'trusted_xforward_peers = 127.0.0.1, 10.0.0.0/8\n[spam]\n'
                         'defaultlowspamaction = discard\ndefaulthighspamaction = REJECT\n')
    for section, table in fuglu.CORE_DEFAULTS.items():
        assert fuglu.check_options(config, section, table) == []


def test_plugin_check_config_reports_unknown_and_invalid_options(capsys):
    class Checked(fuglu.ScannerPlugin):
        requiredvars = {'port': {'default': '783', 'description': 'p',
                                 'validator': lambda value: value.isdigit()},
                        'host': {'description': 'mandatory, no default'}}

    config = make_config('[Checked]\nport = http\ntypo_option = 1\n')
    plugin = Checked(config)
    assert plugin.check_config() is False
    out = capsys.readouterr().out
    assert "[Checked] port" in out and 'http' in out
    assert '[Checked] typo_option' in out
    assert 'Missing' in out and '[Checked] host' in out
    # overrideaction/overridemessage are allowed in every plugin section
    config = make_config('[Checked]\nport = 1\nhost = h\noverrideaction = '
                         'DUNNO\noverridemessage = x\n')
    assert Checked(config).check_config() is True


def test_lint_reports_config_errors_and_exits_nonzero(tmp_path):
    path = tmp_path / 'fuglu.conf'
    path.write_text('[main]\nplugins =\nprependers =\nappenders =\nincomingport = 10025\n'
                    'controlport =\noutgoingport = abc\n')
    returncode, out = run_fuglu_lint(path)
    assert returncode != 0, out
    assert '%s [main] outgoingport' % path in out
    assert 'abc' in out


# -- incomingport and plugin lists ---------------------------------------------------

@pytest.mark.parametrize('entry,expected', [
    ('10025', ('smtp', '127.0.0.2', 10025)),
    (' 10099 ', ('smtp', '127.0.0.2', 10099)),
    ('milter:10028', ('milter', '127.0.0.2', 10028)),
    ('ESMTP:10030', ('esmtp', '127.0.0.2', 10030)),
    ('netcat:0.0.0.0:10040', ('netcat', '0.0.0.0', 10040)),
    ('smtp:192.0.2.1:25', ('smtp', '192.0.2.1', 25)),
])
def test_parse_incomingport(entry, expected):
    assert fuglu.parse_incomingport(entry, '127.0.0.2') == expected


@pytest.mark.parametrize('entry', ['smtp:::1:25', 'a:b:c:d', 'smtp:port', '', 'smtp:0', '70000',
                                   'esmtp:127.0.0.1:-5'])
def test_parse_incomingport_errors(entry):
    with pytest.raises(ValueError):
        fuglu.parse_incomingport(entry, '127.0.0.1')


def test_listen_specs_from_a_list():
    config = make_config('[main]\nbindaddress = 127.0.0.3\nincomingport = 10025, milter:10028,'
                         'esmtp:127.0.0.4:10030\n')
    controller = fuglu.MainController(config)
    assert controller.listen_specs() == [('smtp', '127.0.0.3', 10025),
                                         ('milter', '127.0.0.3', 10028),
                                         ('esmtp', '127.0.0.4', 10030)]


def test_plugin_list_syntax():
    assert fuglu.split_plugin_list('clamav, clamav(ClamSecondary),my.mod.Class , x-y_z(sec.1)') == [
        ('clamav', None), ('clamav', 'ClamSecondary'), ('my.mod.Class', None), ('x-y_z', 'sec.1')]
    assert fuglu.split_plugin_list('') == []
    assert fuglu.split_plugin_list(' , ') == []


@pytest.mark.parametrize('value',
                         ['clamav(', 'clamav(a b)', 'cl amav', 'a()', 'a(b)(c)', 'mod/Class'])
def test_invalid_plugin_syntax(value):
    with pytest.raises(fuglu.PluginLoadError) as error:
        fuglu.split_plugin_list(value)
    assert 'Invalid Plugin Syntax' in str(error.value)


# -- defaults dump ------------------------------------------------------------------

def test_dump_defaults_is_the_committed_fuglu_conf_dist():
    result = subprocess.run([sys.executable, os.path.join(REPO, 'fuglu.py'), '--dump-defaults'],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr.decode()
    with open(os.path.join(REPO, 'fuglu.conf.dist'), 'rb') as dist:
        committed = dist.read()
    assert result.stdout == committed, 'fuglu.conf.dist is stale: regenerate with ' \
                                       '`python3 fuglu.py --dump-defaults > fuglu.conf.dist`'


def test_fuglu_conf_dist_declares_every_core_option_with_its_default_and_a_description():
    config = fuglu.FuConfigParser()
    with open(os.path.join(REPO, 'fuglu.conf.dist'), encoding='utf-8') as dist:
        text = dist.read()
    config.read_config_text(text, 'fuglu.conf.dist')
    for section, table in fuglu.CORE_DEFAULTS.items():
        for option, spec in table.items():
            assert config.get(section, option, raw=True) == spec['default'], (section, option)
            if spec['description']:
                assert '# ' + spec['description'].splitlines()[0] in text
    # the bundled aliases are in [PluginAlias]
    for alias, target in fuglu.PLUGIN_ALIASES.items():
        assert config.get('PluginAlias', alias) == target
    # and the file is a clean config: no unknown or invalid core option
    for section, table in fuglu.CORE_DEFAULTS.items():
        if section != 'PluginAlias':
            assert fuglu.check_options(config, section, table) == [], section


def test_dump_defaults_includes_bundled_plugin_options():
    text = fuglu.dump_defaults(fuglu.bundled_plugin_classes())
    config = fuglu.FuConfigParser()
    config.read_config_text(text, '<dump>')
    assert config.get('debug', 'debugport') == '10888'
    assert config.get('PluginSkipper', 'filterfile', raw=True) == '${confdir}/skipplugins.regex'
