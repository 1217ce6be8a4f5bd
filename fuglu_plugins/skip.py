"""PluginSkipper (alias `skip`): leave out scanner plugins for messages that match a
rule file, e.g. no SpamAssassin for outbound mail arriving on port 10099."""

import os

import fuglu


class PluginSkipper(fuglu.PrependerPlugin):
    """Prepender: every rule of ``filterfile`` that matches contributes its argument, a
    comma list of plugin class names; those scanners do not run for the message and
    get the tag ``<Class>.skipreason``."""

    friendly_name = 'Plugin Skipper'
    requiredvars = {
        'filterfile': {'default': '${confdir}/skipplugins.regex',
                       'description': 'rule file: field regex PluginClass,PluginClass...',
                       'path': 'file', 'missing': 'no plugin is skipped'},
    }

    def __init__(self, config, section=None):
        super().__init__(config, section)
        self.filter = None

    def _filter(self):
        """The rule file's filter; None while the file does not exist (then no plugin
        is skipped; lint reports a missing file)."""
        path = self.config.get(self.section, 'filterfile')
        if self.filter is None or self.filter.filename != path:
            if not os.path.exists(path):
                return None
            self.filter = fuglu.SuspectFilter(path)
        return self.filter

    def pluginlist(self, suspect, pluginlist):
        rules = self._filter()
        rules = rules.get_args(suspect, extended=True) if rules is not None else None
        if not rules:
            return None
        skip = {}
        for rule in rules:
            for name in fuglu.parse_list(rule.arg or ''):
                skip[name] = rule.fieldname
        kept = []
        for plugin in pluginlist:
            name = plugin.__class__.__name__
            if name in skip:
                suspect.tags['%s.skipreason' % name] = skip[name]
                self.logger.info('%s: skipping %s (rule on %s)', suspect.id, name, skip[name])
            else:
                kept.append(plugin)
        return kept

    def lint(self):
        if not self.check_config():
            return False
        rules = self._filter()
        return rules is None or rules.lint()
