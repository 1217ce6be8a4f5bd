# Style: an appender reading the tags the scanners left, writing one line per message.
import json

from fuglu.shared import AppenderPlugin, actioncode_to_string


class TagLogger(AppenderPlugin):
    def __init__(self, config, section=None):
        AppenderPlugin.__init__(self, config, section)
        self.requiredvars = {'logfile': {'default': '/tmp/fuglu-tag-logger.log',
                                         'description': 'where to'}}

    def process(self, suspect, decision):
        record = {
            'id': suspect.id,
            'decision': actioncode_to_string(decision),
            'sender': suspect.get_tag('envelope_tagger.sender'),
            'async_seen': suspect.get_tag('async_subject_check.seen'),
            'skipped': suspect.get_tag('skip_prepender.skipped'),
            'tempfile': suspect.get_tag('external_command.tempfile'),
            'subject': suspect.get_header('subject'),
        }
        with open(self.config.get(self.section, 'logfile'), 'a') as handle:
            handle.write(json.dumps(record) + '\n')
