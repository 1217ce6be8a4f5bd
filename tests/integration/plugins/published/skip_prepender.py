# Style: a prepender that removes plugins from the list for one message (as
# FuGlu's PluginSkipper), using FileList-free plain logic and checkConfig().
from fuglu.shared import PrependerPlugin


class SkipPrepender(PrependerPlugin):
    requiredvars = {'header': {'default': 'X-Skip-Plugin',
                               'description': 'header naming a plugin to skip'}}

    def pluginlist(self, suspect, pluginlist):
        skip = suspect.get_header(self.config.get(self.section, 'header'))
        if not skip:
            return None
        suspect.set_tag('skip_prepender.skipped', skip)
        return [plugin for plugin in pluginlist if plugin.__class__.__name__ != skip.strip()]

    def lint(self):
        return self.checkConfig()
