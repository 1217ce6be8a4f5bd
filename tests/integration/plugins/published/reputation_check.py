# Style: FuGlu 1.7's own plugins and plugins derived from them: FuGlu's redis mixin
# and DNS extension, used without checking that they work (fuglu has neither); a
# read-only `logger` property; a FileList subclass with a content type; the header
# text filled with _SuspectTemplate.
from fuglu.extensions.aioredisext import AIORedisMixin, ENABLED as REDIS_AVAILABLE
from fuglu.extensions.dnsquery import QTYPE_A, lookup
from fuglu.shared import DUNNO, FileList, ScannerPlugin, _SuspectTemplate


class DomainScores(FileList[dict]):
    """'domain score' lines as {domain: score}."""

    def _parse_lines(self, lines):
        scores = {}
        for line in self._filter_lines(lines):
            domain, _, score = line.partition(' ')
            scores[domain.lower()] = int(score or 0)
        return scores


class ReputationCheck(AIORedisMixin, ScannerPlugin):
    """Adds a header with the sender domain's score and its DNS listing."""

    def __init__(self, config, section=None):
        super().__init__(config, section)
        self.requiredvars.update({
            'scorefile': {'default': '', 'description': 'domain score list'},
            'headertemplate': {
                'default': 'domain=${from_domain} score=${score} dns=${dns} redis=${redis}',
                'description': 'X-Reputation header value'},
        })
        self.scores = None

    @property
    def logger(self):
        return self._logger

    def examine(self, suspect):
        if self.scores is None:
            self.scores = DomainScores(self.config.get(self.section, 'scorefile') or None)
        score = self.scores.get_list().get(suspect.from_domain, 0)
        answers = lookup('%s.dbl.example.net' % suspect.from_domain, QTYPE_A)
        dns = 'unknown' if answers is None else ('listed' if answers else 'clean')
        template = _SuspectTemplate(self.config.get(self.section, 'headertemplate'))
        text = template.safe_substitute(from_domain=suspect.from_domain, score=score, dns=dns,
                                        redis='on' if REDIS_AVAILABLE else 'off')
        suspect.add_header('X-Reputation', text)
        self.logger().info('%s reputation %s', suspect.id, text)
        return DUNNO
