"""The plugin loader (aliases, dotted names, FuGlu's own names, [PluginAlias],
plugin(section), plugindir), FuGlu-style plugins, the scan session and the
bundled debug and skip prependers."""

import os
import re
import textwrap
import uuid

import pytest

from helpers import fuglu, make_config, readable_tmp, run_fuglu_lint  # noqa: F401

MESSAGE = b'From: a@example.org\r\nTo: b@example.com\r\nSubject: plugin test\r\n\r\nbody\r\n'


def make_suspect(source=MESSAGE, port=10025):
    suspect = fuglu.Suspect('a@example.org', ['b@example.com'], inbuffer=source)
    suspect.tags['incomingport'] = port
    return suspect


def write_module(directory, source):
    """A plugin module with a unique name in `directory`; returns the module name."""
    name = 'plugin_%s' % uuid.uuid4().hex[:12]
    with open(os.path.join(str(directory), name + '.py'), 'w') as handle:
        handle.write(textwrap.dedent(source))
    return name


# Plugins used by the session tests; each appends what happened to the tag 'trace'.
class Recorder(fuglu.ScannerPlugin):
    result = fuglu.DUNNO

    def examine(self, suspect):
        suspect.tags.setdefault('trace', []).append('scanner:%s' % self.section)
        return self.result


class Rejecter(Recorder):
    result = (fuglu.REJECT, 'rejected for ${from_address}')


class Accepter(Recorder):
    result = fuglu.ACCEPT


class Deleter(Recorder):
    result = (fuglu.DELETE, 'gone')


class Deferrer(Recorder):
    result = fuglu.DEFER


class Crasher(fuglu.ScannerPlugin):
    def examine(self, suspect):
        suspect.tags.setdefault('trace', []).append('scanner:crasher')
        raise RuntimeError('plugin bug')


class SpamMarker(Recorder):
    def examine(self, suspect):
        suspect.tags['spam']['SpamMarker'] = True
        return super().examine(suspect)


class Invalid(Recorder):
    result = 42


class ListPrepender(fuglu.PrependerPlugin):
    """Removes the scanners whose section is in [<section>] remove."""

    def pluginlist(self, suspect, pluginlist):
        suspect.tags.setdefault('trace', []).append('prepender:%s' % self.section)
        remove = (self.config.getlist(self.section, 'remove')
                  if self.config.has_section(self.section) else [])
        return [plugin for plugin in pluginlist if plugin.section not in remove]


class RecordingAppender(fuglu.AppenderPlugin):
    def process(self, suspect, decision):
        suspect.tags.setdefault('trace', []).append(
            'appender:%s:%s' % (self.section, fuglu.actioncode_to_string(decision)))


def controller_with(config_text='', plugins=(), prependers=(), appenders=()):
    config = make_config('[main]\nplugins=\nprependers=\nappenders=\n' + config_text)
    controller = fuglu.MainController(config)
    def made(classes):
        return [cls(config, section) if section else cls(config) for cls, section in classes]
    controller.plugins = made(plugins)
    controller.prependers = made(prependers)
    controller.appenders = made(appenders)
    return controller


def run_session(controller, suspect=None, delivered=True):
    suspect = suspect or make_suspect()
    session = fuglu.ScanSession(controller)
    action, message = session.scan(suspect)
    session.finish(suspect, action, delivered)
    return suspect, action, message, session


# -- loader -------------------------------------------------------------------------

@pytest.mark.parametrize('name,expected', [
    ('debug', 'fuglu_plugins.debug.MessageDebugger'),
    ('DEBUG', 'fuglu_plugins.debug.MessageDebugger'),
    ('skip', 'fuglu_plugins.skip.PluginSkipper'),
    ('fuglu_plugins.skip.PluginSkipper', 'fuglu_plugins.skip.PluginSkipper'),
    ('fuglu.plugins.p_debug.MessageDebugger', 'fuglu_plugins.debug.MessageDebugger'),
    ('fuglu.plugins.p_skipper.PluginSkipper', 'fuglu_plugins.skip.PluginSkipper'),
])
def test_resolve_aliases_and_dotted_names(name, expected):
    cls = fuglu.resolve_plugin_class(name, make_config('[main]\n'))
    assert '%s.%s' % (cls.__module__, cls.__name__) == expected


def test_every_bundled_alias_and_upstream_name_points_at_a_module_file():
    for target in list(fuglu.PLUGIN_ALIASES.values()) + list(fuglu.UPSTREAM_PLUGIN_NAMES.values()):
        module = target.rsplit('.', 1)[0]
        assert module.startswith('fuglu_plugins.')
    for alias in ('archive', 'attachment', 'clamav', 'spamassassin', 'debug', 'skip'):
        assert alias in fuglu.PLUGIN_ALIASES


def test_plugin_alias_section_and_plugindir(tmp_path):
    module = write_module(tmp_path, '''
        import fuglu
        class Local(fuglu.ScannerPlugin):
            def examine(self, suspect):
                return fuglu.REJECT, 'local'
    ''')
    config = make_config('[main]\nplugindir = %s\nplugins = mine, %s.Local(second)\nprependers=\n'
                         'appenders=\n[PluginAlias]\n'
                         'Mine = %s.Local\n' % (tmp_path, module, module))
    plugins, prependers, appenders = fuglu.MainController(config).load_plugins()
    assert [p.__class__.__name__ for p in plugins] == ['Local', 'Local']
    assert [p.section for p in plugins] == ['Local', 'second']
    assert (prependers, appenders) == ([], [])


def test_plugin_alias_can_point_at_an_upstream_name():
    config = make_config('[PluginAlias]\ndbg = fuglu.plugins.p_debug.MessageDebugger\n')
    assert fuglu.resolve_plugin_class('dbg', config).__name__ == 'MessageDebugger'


@pytest.mark.parametrize('name,fragment', [
    ('nosuchalias', 'neither an alias'),
    ('no_such_module_xyz.Class', 'no_such_module_xyz'),
    ('fuglu_plugins.debug.NoSuchClass', 'NoSuchClass'),
])
def test_load_failures(name, fragment):
    config = make_config('[main]\nplugins = %s\n' % name)
    with pytest.raises(fuglu.PluginLoadError) as error:
        fuglu.load_plugins(config, 'plugins')
    assert fragment in str(error.value)


def test_a_plugin_whose_constructor_fails_makes_the_load_fail(tmp_path):
    module = write_module(tmp_path, '''
        import fuglu
        class Broken(fuglu.ScannerPlugin):
            def __init__(self, config, section=None):
                raise IOError('cannot open my database')
        class NoSection(fuglu.ScannerPlugin):
            def __init__(self, config):
                super().__init__(config)
    ''')
    config = make_config('[main]\nplugindir = %s\nplugins = %s.Broken\n' % (tmp_path, module))
    with pytest.raises(fuglu.PluginLoadError) as error:
        fuglu.MainController(config).load_plugins()
    assert 'cannot open my database' in str(error.value)
    config = make_config('[main]\nplugindir = %s\nplugins = %s.NoSection(other)\n'
                         % (tmp_path, module))
    with pytest.raises(fuglu.PluginLoadError):
        fuglu.MainController(config).load_plugins()


def test_one_class_twice_with_two_sections(tmp_path):
    module = write_module(tmp_path, '''
        import fuglu
        class Tagger(fuglu.ScannerPlugin):
            requiredvars = {'label': {'default': 'unset', 'description': 'what to tag'}}
            def examine(self, suspect):
                suspect.tags.setdefault('labels', []).append(self.config.get(self.section, 'label'))
                return fuglu.DUNNO
    ''')
    config = make_config('[main]\nplugindir = %s\n'
                         'plugins = %s.Tagger(first), %s.Tagger(second), %s.Tagger\nprependers=\n'
                         'appenders=\n[first]\nlabel = one\n[second]\nlabel = two\n'
                         % (tmp_path, module, module, module))
    controller = fuglu.MainController(config)
    controller.plugins, controller.prependers, controller.appenders = controller.load_plugins()
    assert [str(p) for p in controller.plugins] == ['Tagger(first)', 'Tagger(second)', 'Tagger']
    suspect, action, _, _ = run_session(controller)
    assert suspect.tags['labels'] == ['one', 'two', 'unset']
    assert [section for section, _ in suspect.tags['decisions']] == ['first', 'second', 'Tagger']
    assert action == fuglu.DUNNO


FUGLU_STYLE_PLUGIN = '''
    # A plugin written for FuGlu 1.x, unchanged.
    import sys
    from fuglu.shared import ScannerPlugin, DUNNO, DELETE, apply_template


    class SubjectTrap(ScannerPlugin):
        """Deletes messages whose subject contains a word."""

        def __init__(self, config, section=None):
            ScannerPlugin.__init__(self, config, section)
            self.requiredvars = {
                'word': {'default': 'TRAPWORD',
                         'description': 'subject word that deletes the message'},
                'message': {'default': 'trapped ${from_address}', 'description': 'reply text'},
            }

        def __str__(self):
            return 'Subject Trap'

        def examine(self, suspect):
            word = self.config.get(self.section, 'word')
            if word in (suspect.get_header('Subject') or ''):
                suspect.tags['SubjectTrap.hit'] = True
                return DELETE, apply_template(self.config.get(self.section, 'message'), suspect)
            return DUNNO

        def lint(self):
            import fuglu
            running = sys.modules['__main__']
            if getattr(running, 'ScannerPlugin', ScannerPlugin) is ScannerPlugin and \\
                    fuglu.ScannerPlugin is ScannerPlugin:
                print('SubjectTrap: one fuglu module')
            else:
                print('SubjectTrap: TWO DIFFERENT fuglu modules')
                return False
            print('SubjectTrap: word is %s' % self.config.get(self.section, 'word'))
            return self.check_config()
'''


def test_fuglu_style_plugin_loads_unchanged_and_runs(tmp_path):
    module = write_module(tmp_path, FUGLU_STYLE_PLUGIN)
    config = make_config('[main]\nplugindir = %s\nplugins = %s.SubjectTrap\nprependers=\n'
                         'appenders=\n[SubjectTrap]\nword = SECRET\n' % (tmp_path, module))
    controller = fuglu.MainController(config)
    controller.plugins, controller.prependers, controller.appenders = controller.load_plugins()
    plugin = controller.plugins[0]
    assert isinstance(plugin, fuglu.ScannerPlugin)
    assert str(plugin) == 'Subject Trap'
    secret = make_suspect(MESSAGE.replace(b'plugin test', b'a SECRET'))
    suspect, action, message, _ = run_session(controller, secret)
    assert (action, message) == (fuglu.DELETE, 'trapped a@example.org')
    suspect, action, message, _ = run_session(controller)
    assert (action, message) == (fuglu.DUNNO, None)


def test_fuglu_style_plugin_defaults_from_requiredvars_set_in_init(tmp_path):
    # FuGlu registers requiredvars defaults whenever a plugin assigns them
    module = write_module(tmp_path, FUGLU_STYLE_PLUGIN)
    config = make_config('[main]\nplugindir = %s\nplugins = %s.SubjectTrap\n' % (tmp_path, module))
    plugin = fuglu.MainController(config).load_plugins()[0][0]
    assert config.get('SubjectTrap', 'word') == 'TRAPWORD'
    source = MESSAGE.replace(b'plugin test', b'TRAPWORD inside')
    assert plugin.examine(make_suspect(source)) == (fuglu.DELETE, 'trapped a@example.org')


def lint_config(tmp_path, module, extra=''):
    path = tmp_path / 'fuglu.conf'
    path.write_text('[main]\nplugindir = %s\nplugins = %s.SubjectTrap\nprependers =\nappenders =\n'
                    'incomingport = 10025\ncontrolport =\n[SubjectTrap]\nword = LINTWORD\n%s'
                    % (tmp_path, module, extra))
    return str(path)


def test_fuglu_style_plugin_under_lint_when_fuglu_runs_as_main(readable_tmp):
    tmp_path = readable_tmp
    plugindir = tmp_path / 'plugins'
    plugindir.mkdir()
    module = write_module(plugindir, FUGLU_STYLE_PLUGIN)
    conf = lint_config(plugindir, module)
    returncode, out = run_fuglu_lint(conf, cwd=str(tmp_path))
    assert 'SubjectTrap: one fuglu module' in out, out
    assert 'SubjectTrap: word is LINTWORD' in out
    assert '0 plugins reported errors' in out
    assert returncode == 0, out


def test_lint_fails_on_an_unknown_option_in_a_plugin_section(readable_tmp):
    tmp_path = readable_tmp
    module = write_module(tmp_path, FUGLU_STYLE_PLUGIN)
    conf = lint_config(tmp_path, module, 'wrod = typo\n')
    returncode, out = run_fuglu_lint(conf, cwd=str(tmp_path))
    assert returncode != 0, out
    assert '[SubjectTrap] wrod' in out
    assert '1 plugins reported errors' in out


def test_lint_fails_when_a_plugin_cannot_load(tmp_path):
    path = tmp_path / 'fuglu.conf'
    path.write_text('[main]\nplugins = no_such_module_abc.Plugin\nprependers =\nappenders =\n'
                    'incomingport = 10025\ncontrolport =\n')
    returncode, out = run_fuglu_lint(path)
    assert returncode != 0, out
    assert 'no_such_module_abc' in out


# -- scan session -------------------------------------------------------------------

def test_order_prependers_scanners_appenders():
    controller = controller_with(plugins=[(Recorder, 'one'), (Recorder, 'two')],
                                 prependers=[(ListPrepender, 'pre1'), (ListPrepender, 'pre2')],
                                 appenders=[(RecordingAppender, 'app1'),
                                            (RecordingAppender, 'app2')])
    suspect, action, _, _ = run_session(controller)
    assert suspect.tags['trace'] == ['prepender:pre1', 'prepender:pre2', 'scanner:one',
                                     'scanner:two',
                                     'appender:app1:DUNNO', 'appender:app2:DUNNO']
    assert action == fuglu.DUNNO
    assert [d for d in suspect.tags['decisions']] == [('one', fuglu.DUNNO), ('two', fuglu.DUNNO)]
    assert [section for section, _ in suspect.tags['scantimes']] == ['one', 'two']


def test_prepender_changes_the_scanner_list_for_one_message():
    controller = controller_with('[pre]\nremove = two\n',
                                 plugins=[(Recorder, 'one'), (Recorder, 'two'),
                                                                   (Recorder, 'three')],
                                 prependers=[(ListPrepender, 'pre')])
    suspect, _, _, _ = run_session(controller)
    assert suspect.tags['trace'] == ['prepender:pre', 'scanner:one', 'scanner:three']
    assert [p.section for p in controller.plugins] == ['one', 'two', 'three']


@pytest.mark.parametrize('cls,action,message,ran', [
    (Accepter, fuglu.ACCEPT, None, ['scanner:first', 'scanner:decider']),
    (Rejecter, fuglu.REJECT, 'rejected for ${from_address}', ['scanner:first', 'scanner:decider']),
    (Deleter, fuglu.DELETE, 'gone', ['scanner:first', 'scanner:decider']),
    (Deferrer, fuglu.DEFER, None, ['scanner:first', 'scanner:decider']),
    (Invalid, fuglu.DUNNO, None, ['scanner:first', 'scanner:decider', 'scanner:last']),
])
def test_a_decision_stops_the_scanners(cls, action, message, ran):
    controller = controller_with(plugins=[(Recorder, 'first'), (cls, 'decider'),
                                          (Recorder, 'last')])
    suspect, got_action, got_message, _ = run_session(controller)
    assert (got_action, got_message) == (action, message)
    assert suspect.tags['trace'] == ran


def test_reply_text_is_not_a_template_and_appends_the_id():
    # plugins fill their configured texts themselves (as in FuGlu); what they return
    # may hold sender text, so it is never expanded again
    controller = controller_with(plugins=[(Rejecter, None)])
    suspect, action, message, session = run_session(controller)
    assert (session.reply_text(suspect, action, message) == 'rejected for ${from_address} (%s)'
            % suspect.id)
    assert (session.reply_text(suspect, fuglu.REJECT, None) == 'Rejected by content scanner (%s)'
            % suspect.id)
    assert (session.reply_text(suspect, fuglu.DEFER, 'line1\r\nline2') == 'line1 line2 (%s)'
            % suspect.id)
    controller = controller_with('suspectidreturn = 0\n', plugins=[(Rejecter, None)])
    suspect, action, message, session = run_session(controller)
    assert session.reply_text(suspect, action, message) == 'rejected for ${from_address}'


def test_overrideaction_and_overridemessage():
    controller = controller_with('[dry]\noverrideaction = DUNNO\n[soft]\noverrideaction = defer\n'
                                 'overridemessage = later, ${to_address}\n',
                                 plugins=[(Rejecter, 'dry'), (Rejecter, 'soft'),
                                          (Recorder, 'never')])
    suspect, action, message, session = run_session(controller)
    assert suspect.tags['trace'] == ['scanner:dry', 'scanner:soft']
    assert suspect.tags['decisions'] == [('dry', fuglu.DUNNO), ('soft', fuglu.DEFER)]
    assert action == fuglu.DEFER
    assert session.reply_text(suspect, action, message) == 'later, b@example.com (%s)' % suspect.id


def test_override_without_message_keeps_the_plugin_message():
    controller = controller_with('[Rejecter]\noverrideaction = DEFER\n', plugins=[(Rejecter, None)])
    _, action, message, _ = run_session(controller)
    assert (action, message) == (fuglu.DEFER, 'rejected for ${from_address}')


def test_an_exception_is_recorded_and_gives_the_plugins_problemaction():
    # never a clean result (FuGlu goes on to the next plugin: its bug 23, a scanner bypass)
    controller = controller_with('[crasher]\nproblemaction = REJECT\n',
                                 plugins=[(Crasher, 'crasher'), (Rejecter, 'after')],
                                 prependers=[(ListPrepender, 'pre')],
                                 appenders=[(RecordingAppender, 'app')])
    suspect, action, message, _ = run_session(controller)
    assert suspect.tags['trace'] == ['prepender:pre', 'scanner:crasher', 'appender:app:REJECT']
    assert (action, message) == (fuglu.REJECT, 'message could not be checked (RuntimeError)')
    errors = suspect.tags['processingerrors']
    assert len(errors) == 1 and 'RuntimeError' in errors[0] and 'plugin bug' in errors[0]
    assert suspect.tags['decisions'] == [('crasher', fuglu.REJECT)]
    assert len(controller.exceptions) == 1 and 'plugin bug' in controller.exceptions[0][2]
    controller = controller_with(plugins=[(Crasher, None), (Rejecter, 'after')])
    assert run_session(controller)[1] == fuglu.DEFER   # problemaction's default


def test_prepender_and_appender_exceptions_are_recorded_too():
    class BadPrepender(fuglu.PrependerPlugin):
        def pluginlist(self, suspect, pluginlist):
            raise ValueError('prepender bug')

    class BadAppender(fuglu.AppenderPlugin):
        def process(self, suspect, decision):
            raise KeyError('appender bug')

    controller = controller_with(plugins=[(Recorder, 'scan')], prependers=[(BadPrepender, None)],
                                 appenders=[(BadAppender, None), (RecordingAppender, 'after')])
    suspect, _, _, _ = run_session(controller)
    assert suspect.tags['trace'] == ['scanner:scan', 'appender:after:DUNNO']
    assert len(suspect.tags['processingerrors']) == 2


def test_appenders_do_not_run_for_deferred_or_undelivered_mail():
    controller = controller_with(plugins=[(Deferrer, None)], appenders=[(RecordingAppender, 'app')])
    suspect, _, _, _ = run_session(controller)
    assert suspect.tags['trace'] == ['scanner:Deferrer']
    controller = controller_with(plugins=[(Recorder, 'scan')],
                                 appenders=[(RecordingAppender, 'app')])
    suspect, _, _, _ = run_session(controller, delivered=False)
    assert suspect.tags['trace'] == ['scanner:scan']


def test_fuglu_headers_with_a_custom_prefix():
    controller = controller_with('prependaddedheaders = X-Scan-\n', plugins=[(SpamMarker, None)])
    suspect, _, _, _ = run_session(controller)
    assert suspect.addheaders == {'X-Scan-Spamstatus': 'YES', 'X-Scan-Suspect': suspect.id}
    output = suspect.get_output_source()
    assert (output == ('X-Scan-Spamstatus: YES\r\nX-Scan-Suspect: %s\r\n' % suspect.id).encode()
            + MESSAGE)
    controller = controller_with(plugins=[(Recorder, None)])
    suspect, _, _, _ = run_session(controller)
    assert suspect.addheaders == {'X-Fuglu-Spamstatus': 'NO', 'X-Fuglu-Suspect': suspect.id}


def test_plugin_headers_come_first_and_headers_can_be_switched_off():
    class HeaderPlugin(fuglu.ScannerPlugin):
        def examine(self, suspect):
            suspect.add_header('X-Plugin', 'first')

    controller = controller_with(plugins=[(HeaderPlugin, None)])
    suspect, _, _, _ = run_session(controller)
    assert list(suspect.addheaders) == ['X-Plugin', 'X-Fuglu-Spamstatus', 'X-Fuglu-Suspect']
    controller = controller_with('spamstatusheader = 0\nsuspectidheader = no\n',
                                 plugins=[(HeaderPlugin, None)])
    suspect, _, _, _ = run_session(controller)
    assert list(suspect.addheaders) == ['X-Plugin']
    controller = controller_with('debuginfoheader = 1\n', plugins=[(HeaderPlugin, None)])
    suspect, _, _, _ = run_session(controller)
    assert suspect.addheaders['X-Fuglu-Debuginfo'].startswith('Suspect %s' % suspect.id)


def test_trashdir_and_trashlog_on_delete(tmp_path):
    trash = tmp_path / 'trash'
    controller = controller_with('trashdir = %s\ntrashlog = 1\n' % trash,
                                 plugins=[(Deleter, 'killer')])
    suspect, action, _, _ = run_session(controller)
    assert action == fuglu.DELETE
    copies = [name for name in os.listdir(str(trash)) if name != '00-fuglutrash.log']
    assert len(copies) == 1 and copies[0].startswith(suspect.id)
    assert (trash / copies[0]).read_bytes() == MESSAGE
    log = (trash / '00-fuglutrash.log').read_text()
    assert re.match(r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ a@example\.org b@example\.com '
                    r'Deleter\(killer\) %s\n$' % re.escape(str(trash / copies[0])), log), log


def test_no_trash_without_delete_or_without_trashlog(tmp_path):
    trash = tmp_path / 'trash'
    controller = controller_with('trashdir = %s\n' % trash, plugins=[(Rejecter, None)])
    run_session(controller)
    assert not trash.exists() or os.listdir(str(trash)) == []
    controller = controller_with('trashdir = %s\n' % trash, plugins=[(Deleter, None)])
    run_session(controller)
    assert len(os.listdir(str(trash))) == 1   # the copy, no log


# -- debug and skip -----------------------------------------------------------------

def test_debug_prepender_on_the_debug_port(tmp_path):
    from fuglu_plugins.debug import MessageDebugger
    debugfile = tmp_path / 'debug.log'
    controller = controller_with('[debug]\ndebugport = 10888\ndebugfile = %s\n' % debugfile,
                                 plugins=[(Rejecter, 'scan')], prependers=[(MessageDebugger, None)])
    suspect, action, _, _ = run_session(controller, make_suspect(port=10888))
    assert suspect.tags['noreinject'] is True
    assert suspect.tags['nobounce'] is True
    assert suspect.tags['noappenders'] is True
    text = debugfile.read_text()
    assert 'debugging %s' % suspect.id in text
    assert 'REJECT' in text
    suspect, _, _, _ = run_session(controller, make_suspect(port=10025))
    assert 'noreinject' not in suspect.tags and not suspect.tags.get('debug')


def test_debug_noappender_option_stops_appenders(tmp_path):
    from fuglu_plugins.debug import MessageDebugger
    controller = controller_with('[debug]\ndebugfile = %s\n' % (tmp_path / 'd.log'),
                                 plugins=[(Recorder, 'scan')], prependers=[(MessageDebugger, None)],
                                 appenders=[(RecordingAppender, 'app')])
    suspect, _, _, _ = run_session(controller, make_suspect(port=10888))
    assert suspect.tags['trace'] == ['scanner:scan']
    controller.config.read_config_text('[debug]\nnoappender = False\nnoreinject = no\n', 'more')
    suspect, _, _, _ = run_session(controller, make_suspect(port=10888))
    assert suspect.tags['trace'] == ['scanner:scan', 'appender:app:DUNNO']
    assert suspect.tags['noreinject'] is False


def test_debug_lint_needs_the_debugport_among_the_incoming_ports(capsys):
    from fuglu_plugins.debug import MessageDebugger
    config = make_config('[main]\nincomingport = 10025, 10099\n')
    assert MessageDebugger(config).lint() is False
    assert '10888' in capsys.readouterr().out
    config = make_config('[main]\nincomingport = 10025, smtp:127.0.0.1:10888\n')
    assert MessageDebugger(config).lint() is True


def test_skip_prepender_leaves_out_listed_plugins(tmp_path):
    from fuglu_plugins.skip import PluginSkipper
    rules = tmp_path / 'skipplugins.regex'
    rules.write_text('@incomingport ^10099$ Rejecter,Deleter\nSubject ^skipall Recorder\n')

    class Other(Recorder):
        pass

    controller = controller_with('[PluginSkipper]\nfilterfile = %s\n' % rules,
                                 plugins=[(Rejecter, 'rej'), (Other, 'other')],
                                 prependers=[(PluginSkipper, None)])
    suspect, action, _, _ = run_session(controller, make_suspect(port=10099))
    assert suspect.tags['trace'] == ['scanner:other']
    assert suspect.tags['Rejecter.skipreason'] == '@incomingport'
    assert action == fuglu.DUNNO
    suspect, action, _, _ = run_session(controller, make_suspect(port=10025))
    assert suspect.tags['trace'] == ['scanner:rej']
    assert action == fuglu.REJECT
    assert 'Rejecter.skipreason' not in suspect.tags


def test_skip_uses_confdir_and_lints_its_rule_file(tmp_path, capsys):
    from fuglu_plugins.skip import PluginSkipper
    config = fuglu.FuConfigParser(confdir=str(tmp_path))
    config.read_config_text('[main]\n', 'x')
    plugin = PluginSkipper(config)
    assert plugin.lint() is True      # the default ${confdir}/skipplugins.regex may be missing ...
    missing = '%s does not exist: no plugin is skipped' % (tmp_path / 'skipplugins.regex')
    assert missing in capsys.readouterr().out
    config.read_config_text('[PluginSkipper]\nfilterfile = %s\n' % (tmp_path / 'skipplugin.regex'),
                            'y')
    assert PluginSkipper(config).lint() is False     # ... a configured one may not
    assert 'skipplugin.regex does not exist' in capsys.readouterr().out
    config.remove_option('PluginSkipper', 'filterfile')
    (tmp_path / 'skipplugins.regex').write_text('@incomingport ^10099$ SAPlugin\n')
    assert PluginSkipper(config).lint() is True
    (tmp_path / 'skipplugins.regex').write_text('brokenline\n')
    assert PluginSkipper(config).lint() is False
