# Style: module-level imports from fuglu.shared, fuglu.stringencode and
# fuglu.extensions.sql; _logger() in __init__; requiredvars assigned in __init__;
# lint() via check_config(); sync examine() that tags and adds a header.
import fuglu.extensions.sql
from fuglu.extensions.sql import ENABLED as SQL_ENABLED
from fuglu.shared import ScannerPlugin, DUNNO, apply_template, yesno, strip_address
from fuglu.stringencode import force_uString, force_bString


class EnvelopeTagger(ScannerPlugin):
    """Tags the envelope and adds a header from a template."""

    def __init__(self, config, section=None):
        ScannerPlugin.__init__(self, config, section)
        self.logger = self._logger()
        self.requiredvars = {
            'headername': {'default': 'X-Envelope-Tagger', 'description': 'header to add'},
            'template': {'default': 'from=${from_address} rcpts=${rcptcount} sql=${sql}',
                         'description': 'header value'},
        }

    def examine(self, suspect):
        sender = force_uString(strip_address('<%s>' % suspect.from_address))
        suspect.set_tag('envelope_tagger.sender', sender)
        suspect.set_tag('envelope_tagger.bytes', len(force_bString(suspect.get_source())))
        value = apply_template(self.config.get(self.section, 'template'), suspect,
                               dict(rcptcount=len(suspect.recipients),
                                    sql=yesno(SQL_ENABLED or fuglu.extensions.sql.ENABLED)))
        suspect.add_header(self.config.get(self.section, 'headername'), value)
        self.logger.info('%s tagged sender %s', suspect.id, sender)
        return DUNNO

    def lint(self):
        if not self.check_config():
            return False
        print('EnvelopeTagger: sql extension enabled: %s' % yesno(SQL_ENABLED))
        return True
