"""Test plugin for the before-queue integration tests (plugindir module `bq_verdict`).

A message carrying the header `X-BQ-Verdict: <action>` gets that action; the action
is resolved like any configured action, so DEFAULTHIGHSPAMACTION follows [spam]. The
reply text is the template in option `message`, filled by the plugin (as FuGlu's plugins
do: fuglu sends a plugin's reply text as it is).
"""

from fuglu.shared import DUNNO, ScannerPlugin, apply_template, string_to_actioncode


class BeforeQueueVerdict(ScannerPlugin):
    requiredvars = {
        'message': {'default': 'bq test verdict for ${from_address}: ${subject}',
                    'description': 'reply text template for the verdict'},
    }

    def examine(self, suspect):
        value = suspect.get_header('X-BQ-Verdict')
        if not value:
            return DUNNO
        action = string_to_actioncode(value.strip(), self.config)
        if action is None:
            self.logger.error('%s: unknown action %r', suspect.id, value)
            return DUNNO
        return action, apply_template(self.config.get(self.section, 'message'), suspect)
