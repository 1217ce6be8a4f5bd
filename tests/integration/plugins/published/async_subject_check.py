# Style: FuGlu 1.7's async examine (as its SA and ClamAV plugins), requiredvars as a
# class attribute, a verdict with a message template, _problemcode() on failure.
import asyncio

from fuglu.shared import AsyncScannerPlugin, DUNNO, REJECT, apply_template, string_to_actioncode


class AsyncSubjectCheck(AsyncScannerPlugin):
    requiredvars = {
        'badword': {'default': 'reject-me', 'description': 'subject word that gets rejected'},
        'action': {'default': 'REJECT', 'description': 'what to do then'},
        'rejectmessage': {'default': 'subject of ${from_address} not welcome',
                          'description': 'reply'},
        'problemaction': {'default': 'DEFER', 'description': 'on trouble'},
    }

    async def examine(self, suspect):
        try:
            await asyncio.sleep(0.001)   # stands for a network round trip
            subject = suspect.get_header('subject') or ''
        except Exception:
            return self._problemcode()
        suspect.set_tag('async_subject_check.seen', True)
        if self.config.get(self.section, 'badword') in subject:
            action = string_to_actioncode(self.config.get(self.section, 'action'), self.config)
            return action, apply_template(self.config.get(self.section, 'rejectmessage'), suspect)
        return DUNNO
