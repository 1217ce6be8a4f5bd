"""SpamAssassin: ask spamd about each message (alias ``spamassassin``, section ``[SAPlugin]``).

One fresh connection per request, TCP (``port`` is a number) or unix socket (``port`` is
a path). The request is ``<VERB> SPAMC/1.5``, ``Content-length``, optionally ``User``
(the first recipient, when ``peruserconfig``), a blank line and the message; then we
half-close so spamd sees the end (spamd's PROTOCOL document). spamd answers::

    SPAMD/1.1 0 EX_OK
    Content-length: 2161
    Spam: True ; 1000.0 / 5.0

    <body: the rewritten message (PROCESS) or the report (REPORT)>

Which verb (FuGlu's semantics): ``forwardoriginal=False`` sends PROCESS and the message
spamd returns (with its X-Spam-* headers, maybe wrapped by report_safe) replaces the
one fuglu delivers; ``forwardoriginal=True`` sends REPORT and the message stays as it is.

spamd gets a few pseudo headers in front of the message (X-Fuglu-Suspect, the
SAPlugin.tempheader tag, X-Fuglu-Incomingport, and Return-Path when the message has
none) so that local rules can use them. FuGlu lets them leak into the delivered mail;
we cut them out of what PROCESS returns.

Per recipient (FuGlu's runtime config, [databaseconfig]): lowspamlevel, highspamlevel,
lowspamaction and highspamaction are read through DBConfig, so a database row for the
first recipient's address, its %domain or $GLOBAL beats this section. Messages too big
for spamd (strip_oversize off) are checked against SpamAssassin's SQL sender blocklist
(sql_blocklist_dbconnectstring); spamd applies the blocklist to the others itself.
"""

import re
import socket
import time

from fuglu import (DEFER, DUNNO, DBConfig, DBFile, FileSection, RuntimeConfigError, ScannerPlugin,
                   actioncode_to_string, apply_template, connect_service, lint_sql, recv_until,
                   send_parts, service_address, string_to_actioncode)

# The GTUBE anti-spam test string, in two halves so that this file is no test spam.
GTUBE = b'XJS*C4JDBQADN1.NSBN3*2IDNEN*' + b'GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X'

PROTOCOL = b'SPAMC/1.5'

# "Spam: True ; 1000.0 / 5.0" (spamd reply header)
SPAM_REPLY_RE = re.compile(r'^\s*(true|false|yes|no)\s*;'
                           r'\s*(-?\d+(?:\.\d+)?)\s*/\s*(-?\d+(?:\.\d+)?)', re.IGNORECASE)
# "Yes, score=1000.0 required=5.0 tests=..." (X-Spam-Status in the message)
SCORE_RE = re.compile(r'score=(-?\d+(?:\.\d+)?)', re.IGNORECASE)

# SpamAssassin's SQL user preferences (its userpref table): the blocklist globs of the
# recipient's address, domain (%domain, and *@domain as Roundcube's sauserprefs writes
# it) and the global scope (FuGlu's $GLOBAL and SpamAssassin's own @GLOBAL).
SQL_BLOCKLIST_QUERY = ("SELECT value FROM userpref WHERE preference IN ('blacklist_from', "
                       "'blocklist_from') AND username IN (:global_fuglu, :global_spamassassin, "
                       ":domain_scope, :domain_glob, :to_address)")


class SpamdError(Exception):
    """spamd did not give a usable answer."""


class SpamdReply(object):
    """A parsed spamd reply: status (e.g. 'SPAMD/1.1 0 EX_OK'), headers (lower-case
    names), body (bytes)."""

    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def spam_verdict(self):
        """(flag, score) from the Spam: header, or (None, None) without one."""
        match = SPAM_REPLY_RE.match(self.headers.get('spam', ''))
        if not match:
            return None, None
        return match.group(1).lower() in ('true', 'yes'), float(match.group(2))


def parse_spamd_reply(data, expect_body=True):
    """Raw reply bytes -> SpamdReply. Raises SpamdError unless the status is 0 (EX_OK)
    and, when a body is expected, the headers end and the body is complete."""
    status_line, _, rest = data.partition(b'\r\n')
    status = status_line.decode('utf-8', 'replace').strip()
    fields = status.split(None, 2)
    if len(fields) != 3 or not fields[0].startswith('SPAMD/') or fields[1] != '0':
        raise SpamdError('spamd answered %r' % status[:200] if status else 'spamd sent no reply')
    headers = {}
    if not expect_body:
        return SpamdReply(status, headers, b'')
    if rest.startswith(b'\r\n'):
        head, body = b'', rest[2:]
    else:
        head, separator, body = rest.partition(b'\r\n\r\n')
        if not separator:
            raise SpamdError('spamd reply ends inside its headers')
    for line in head.split(b'\r\n'):
        name, separator, value = line.decode('utf-8', 'replace').partition(':')
        if separator:
            headers[name.strip().lower()] = value.strip()
    length = headers.get('content-length')
    if length is not None:
        if not length.isdigit():
            raise SpamdError('bad Content-length %r from spamd' % length)
        if len(body) < int(length):
            raise SpamdError('spamd reply cut off: %d of %s bytes' % (len(body), length))
        body = body[:int(length)]
    return SpamdReply(status, headers, body)


# bytes of a spooled message read for the header checks (its header block)
HEAD_BYTES = 1048576


def line_ending(source):
    """The line ending the message uses (CRLF when in doubt)."""
    first = source.find(b'\n')
    return b'\n' if first > 0 and source[first - 1:first] != b'\r' else b'\r\n'


# one header field: name, colon, value with its folded continuation lines
HEADER_FIELD_RE = re.compile(rb'^([!-9;-~]+)[ \t]*:[ \t]*(.*(?:\r?\n[ \t].*)*)', re.MULTILINE)


def header_fields(source):
    """[(name, unfolded value)] of the header block of ``source``, as str. (The email
    package does the same at several times the cost; this runs for every message.)"""
    end = re.search(rb'\r?\n\r?\n', source)
    block = source[:end.start() + 1] if end else source
    return [(name.decode('ascii', 'replace'), ' '.join(value.decode('utf-8', 'replace').split()))
            for name, value in HEADER_FIELD_RE.findall(block)]


def has_header(source, name):
    """True if the header block of ``source`` has header ``name``."""
    end = re.search(rb'\r?\n\r?\n', source)
    block = source[:end.start() + 1] if end else source
    return re.search(rb'(?im)^' + re.escape(name) + rb'[ \t]*:', block) is not None


def gtube_message():
    return (b'From: fuglu-lint@localhost\r\n'
            b'To: fuglu-lint@localhost\r\n'
            b'Subject: fuglu lint: GTUBE test spam\r\n'
            b'\r\n' + GTUBE + b'\r\n')


class SAPlugin(ScannerPlugin):
    """Asks spamd whether a message is spam; low spam gets ``lowspamaction``, high spam
    ``highspamaction``, spamd trouble ``problemaction``."""

    friendly_name = 'SpamAssassin'
    enginename = 'SpamAssassin'

    # FuGlu options for features outside fuglu's scope: accepted, no effect
    ignored_options = ('attach_suspect_tags', 'oversize_attach_suspect_tags',
                       'block_on_repeated_error')

    requiredvars = {
        'host': {'default': 'localhost',
                 'description': 'spamd host (TCP); $NAME reads it from the environment '
                                'variable NAME'},
        'port': {'default': '783', 'description': 'spamd TCP port, or the path of spamd\'s '
                                                  'unix socket'},
        'timeout': {'default': '30', 'description': 'seconds one spamd request may take'},
        'maxsize': {'default': '256000',
                    'description': 'larger messages are stripped (strip_oversize) or not scanned'},
        'strip_oversize': {'default': '1',
                           'description': 'scan a too large message with its attachments removed, '
                                          'cut to maxsize, instead of skipping it'},
        'retries': {'default': '3', 'description': 'attempts before problemaction'},
        'retry_sleep': {'default': '1', 'description': 'seconds between attempts'},
        'scanoriginal': {'default': 'True',
                         'description': 'scan the message as received, not as changed by '
                                        'earlier plugins'},
        'forwardoriginal': {'default': 'False',
                            'description': 'False: deliver the message as spamd rewrote it '
                                           '(PROCESS); True: deliver it unchanged (REPORT)'},
        'spamheader': {'default': 'X-Spam-Status',
                       'description': 'header of the rewritten message with the verdict '
                                      '(used when spamd sends no Spam: line)'},
        'spamheader_prepend': {'default': 'X-Spam-',
                               'description': 'prefix of the spamd headers copied onto a '
                                              'stripped message'},
        'peruserconfig': {'default': 'True',
                          'description': 'send the first recipient as User, for per-user settings'},
        'lowercase_user': {'default': 'True', 'description': 'lower-case that User value'},
        'lowspamlevel': {'default': '',
                         'description': 'score from which a message is spam; empty = '
                                        'spamd\'s verdict'},
        'highspamlevel': {'default': '15', 'description': 'score from which a message is '
                                                          'high spam'},
        'highspamaction': {'default': 'DEFAULTHIGHSPAMACTION',
                           'description': 'action for high spam ([spam] defaulthighspamaction)'},
        'lowspamaction': {'default': 'DEFAULTLOWSPAMACTION',
                          'description': 'action for spam below highspamlevel ([spam] '
                                         'defaultlowspamaction)'},
        'problemaction': {'default': 'DEFER',
                          'description': 'action when spamd fails or does not answer in time'},
        'rejectmessage': {'default': 'message identified as spam',
                          'description': 'reply text for spam; ${spamscore} and the usual template '
                                         'variables'},
        'original_sender_header': {'default': '',
                                   'description': 'header holding the original sender, for the '
                                                  'Return-Path given to spamd'},
        'sql_blocklist_dbconnectstring': {
            'default': '', 'confidential': True,
            'description': 'SQLAlchemy URL of SpamAssassin\'s SQL user preferences (table '
                           'userpref): blacklist_from/blocklist_from\nglobs of the recipient, its '
                           'domain and $GLOBAL/@GLOBAL make a message too big for spamd high '
                           'spam. Empty: none'},
    }

    # -- options --------------------------------------------------------------
    def _option(self, name):
        return self.config.get(self.section, name)

    def _action(self, option, config=None):
        return string_to_actioncode((config or self.config).get(self.section, option), self.config)

    def _level(self, suspect, name, config=None):
        """lowspamlevel / highspamlevel as float, None when empty. A per-message value
        in the tag filtersettings wins, then ``config`` (the runtime config)."""
        value = (suspect.get_tag('filtersettings') or {}).get(name) if suspect is not None else None
        if value is None:
            value = (config or self.config).get(self.section, name)
        value = str(value).strip()
        try:
            return float(value) if value else None
        except ValueError:
            raise RuntimeConfigError('%s %r is not a number' % (name, value))

    # -- examine --------------------------------------------------------------
    def examine(self, suspect):
        if suspect.get_tag('SAPlugin.skip') or suspect.get_tag('SpamAssassin.skip'):
            self.logger.info('%s not scanned by spamd: skip tag set', suspect.id)
            return DUNNO
        prefix = self.config.get('main', 'prependaddedheaders')
        maxsize = self.config.getint(self.section, 'maxsize')
        original = self.config.getboolean(self.section, 'scanoriginal')
        # the message as parts: a spooled one is read from its file only when sent
        parts = suspect.source_parts(original=original)
        size = sum(len(part) for part in parts)

        stripped = False
        if size > maxsize:
            if not self.config.getboolean(self.section, 'strip_oversize'):
                self.logger.info('%s not scanned by spamd: size %d > maxsize %d',
                                 suspect.id, size, maxsize)
                suspect.add_header(prefix + 'SA-SKIP', 'Too big for spamchecks. %d > %d'
                                   % (size, maxsize))
                suspect.set_tag('SpamAssassin.skipreason', 'size skip')
                return self.check_sql_blocklist(suspect)
            source = suspect.source_stripped_attachments(
                suspect.get_original_source() if original else None, maxsize - 1)
            parts = [source]
            stripped = True
            suspect.set_tag('SpamAssassin.stripped', True)
            self.logger.info('%s size %d > maxsize %d: spamd sees it without attachments '
                             '(%d bytes)', suspect.id, size, maxsize, len(source))
        if isinstance(parts[-1], FileSection):   # its start, for the header checks
            head = (suspect.get_original_source(HEAD_BYTES) if original
                    else suspect.get_source(HEAD_BYTES))
        else:
            head = parts[0]

        pseudo_headers = self._pseudo_headers(suspect, head, size if stripped else None)
        verb = b'REPORT' if self.config.getboolean(self.section, 'forwardoriginal') else b'PROCESS'
        try:
            reply = self.ask_with_retries(verb, [pseudo_headers] + parts, suspect)
        except (SpamdError, OSError) as error:
            self.logger.error('%s spam scan failed: %s: %s', suspect.id, error.__class__.__name__,
                              error)
            suspect.add_header(prefix + 'SA-SKIP', 'SA scan failed')
            return self._problemaction(), 'spam scan failed, try again later'

        is_spam, score = reply.spam_verdict()
        if verb == b'PROCESS':
            report = self._take_processed(suspect, reply.body, pseudo_headers, stripped)
            if score is None:
                is_spam, score = self._verdict_from_header(report)
        else:
            report = reply.body.decode('utf-8', 'replace')
        return self._classify(suspect, is_spam, score, report)

    def _pseudo_headers(self, suspect, source, original_size):
        """Header lines for spamd only, in the message's own line ending."""
        lines = [b'X-Fuglu-Suspect: %s\r\n' % suspect.id.encode('ascii')]
        if original_size is not None:
            lines.append(b'X-Fuglu-OrigSize: %d\r\n' % original_size)
        lines.append(suspect.get_sa_temp_headers())
        port = str(suspect.get_tag('incomingport', 0)).encode('ascii')
        lines.append(b'X-Fuglu-Incomingport: %s\r\n' % port)
        if not has_header(source, b'Return-Path'):
            sender = suspect.from_address
            header = self._option('original_sender_header').strip()
            if header:
                sender = suspect.get_header(header, sender)
            sender = sender.strip().strip('<>').encode('utf-8', 'replace')
            lines.append(b'Return-Path: <%s>\r\n' % sender)
        block = b''.join(lines)
        return block.replace(b'\r\n', line_ending(source))

    def _take_processed(self, suspect, processed, pseudo_headers, stripped):
        """Apply what PROCESS returned to the suspect; return the spamheader value."""
        headers = header_fields(processed)
        spamheader = self._option('spamheader').lower()
        report = next((value for name, value in headers if name.lower() == spamheader), '')
        if stripped:
            # spamd saw a cut-down copy: keep the original, add only spamd's headers.
            prepend = self._option('spamheader_prepend').lower()
            for name, value in headers:
                if name.lower().startswith(prepend):
                    suspect.add_header(name, value)
            return report
        cleaned = processed.replace(pseudo_headers, b'')
        if cleaned == processed and pseudo_headers:
            # spamd reordered or refolded them: drop the lines one by one.
            for line in pseudo_headers.splitlines(True):
                cleaned = cleaned.replace(line, b'', 1)
        suspect.set_source(cleaned)
        return report

    @staticmethod
    def _verdict_from_header(report):
        if not report:
            return None, None
        match = SCORE_RE.search(report)
        return report.lower().startswith('yes'), float(match.group(1)) if match else None

    def _classify(self, suspect, is_spam, score, report):
        runtimeconfig = DBConfig(self.config, suspect)
        if score is None:
            self.logger.warning('%s spamd gave no score, treating the message as ham', suspect.id)
            is_spam = is_highspam = False
        else:
            lowspamlevel = self._level(suspect, 'lowspamlevel', runtimeconfig)
            if lowspamlevel is not None:
                is_spam = score >= lowspamlevel
            highspamlevel = self._level(suspect, 'highspamlevel', runtimeconfig)
            is_highspam = highspamlevel is not None and score >= highspamlevel
            is_spam = bool(is_spam or is_highspam)
        self._spamreport(suspect, is_spam, is_highspam, report, score, enginename=self.enginename)
        suspect.tags['SAPlugin.spamscore'] = score

        action = DUNNO
        if is_highspam:
            action = self._action('highspamaction', runtimeconfig)
        elif is_spam:
            action = self._action('lowspamaction', runtimeconfig)
        if action is None:
            self.logger.error('%s invalid spam action configured, deferring', suspect.id)
            action = DEFER
        self.logger.info('%s spamd: spam=%s highspam=%s score=%s -> %s', suspect.id, is_spam,
                         is_highspam, score, actioncode_to_string(action))
        if action == DUNNO:
            return DUNNO
        message = apply_template(self._option('rejectmessage'), suspect, {'spamscore': score})
        return action, message

    # -- SQL blocklist ------------------------------------------------------------
    @staticmethod
    def blocklist_values(address):
        domain = address.rpartition('@')[2].lower()
        return {'global_fuglu': '$GLOBAL', 'global_spamassassin': '@GLOBAL',
                'domain_scope': '%' + domain, 'domain_glob': '*@' + domain, 'to_address': address}

    @staticmethod
    def glob_matches(glob, address):
        """SpamAssassin's blocklist globs: * and ?, the whole address, any case."""
        pattern = re.escape(glob.strip()).replace(r'\*', '.*').replace(r'\?', '.')
        return re.fullmatch(pattern, address, re.IGNORECASE | re.DOTALL) is not None

    def check_sql_blocklist(self, suspect):
        """highspamaction when the sender matches a blocklist glob of the recipient,
        else DUNNO. A database that cannot answer raises RuntimeConfigError."""
        url = self._option('sql_blocklist_dbconnectstring').strip()
        if not url or not suspect.from_address:
            return DUNNO
        values = self.blocklist_values(suspect.to_address or '')
        rows = DBFile(url, SQL_BLOCKLIST_QUERY, self.config).get_rows(values)
        glob = next((row[0] for row in rows
                     if row[0] and self.glob_matches(row[0], suspect.from_address)), None)
        if glob is None:
            return DUNNO
        self.logger.info('%s sender %s is blocklisted (%s)', suspect.id, suspect.from_address, glob)
        runtimeconfig = DBConfig(self.config, suspect)
        highspamlevel = self._level(suspect, 'highspamlevel', runtimeconfig)
        self._spamreport(suspect, True, True, glob, highspamlevel, enginename=self.enginename)
        prefix = self.config.get('main', 'prependaddedheaders')
        suspect.add_header(prefix + 'Blocklisted', glob)
        suspect.add_header(prefix + 'Blacklisted', glob)   # FuGlu's deprecated name
        action = self._action('highspamaction', runtimeconfig)
        if action is None:
            self.logger.error('%s invalid spam action configured, deferring', suspect.id)
            return DEFER, 'invalid spam action configured'
        if action == DUNNO:
            return DUNNO
        return action, apply_template(self._option('rejectmessage'), suspect, {'spamscore': 'n/a'})

    # -- talking to spamd -------------------------------------------------------
    def _connect(self):
        return connect_service(self._option('host'), self._option('port'),
                               self.config.getfloat(self.section, 'timeout'))

    def _user(self, suspect):
        if suspect is None or not self.config.getboolean(self.section, 'peruserconfig'):
            return None
        user = suspect.to_address or ''
        if self.config.getboolean(self.section, 'lowercase_user'):
            user = user.lower()
        # a header value: no whitespace or control characters
        user = re.sub(r'[\x00-\x20\x7f]', '', user)
        return user or None

    def request(self, verb, content=b'', suspect=None):
        """One spamd request -> SpamdReply. ``content``: bytes, or a list of message
        parts (bytes and spool file sections, see fuglu.send_parts). Raises OSError or
        SpamdError."""
        parts = content if isinstance(content, list) else [content]
        lines = [verb + b' ' + PROTOCOL]
        if verb != b'PING':
            lines.append(b'Content-length: %d' % sum(len(part) for part in parts))
        user = self._user(suspect)
        if user:
            lines.append(b'User: ' + user.encode('utf-8', 'surrogateescape'))
        deadline = time.monotonic() + self.config.getfloat(self.section, 'timeout')
        with self._connect() as connection:
            send_parts(connection, [b'\r\n'.join(lines) + b'\r\n\r\n'] + parts)
            connection.shutdown(socket.SHUT_WR)
            raw = recv_until(connection, deadline, None, 'spamd did not answer in time')
        reply = parse_spamd_reply(raw, expect_body=verb != b'PING')
        if verb == b'PROCESS' and not reply.body.strip():
            # it would replace the message: never deliver an empty one
            raise SpamdError('spamd returned an empty message')
        return reply

    def ask_with_retries(self, verb, content, suspect):
        attempts = max(self.config.getint(self.section, 'retries'), 1)
        pause = self.config.getfloat(self.section, 'retry_sleep')
        for attempt in range(1, attempts + 1):
            try:
                return self.request(verb, content, suspect)
            except (SpamdError, OSError) as error:
                self.logger.warning('%s spamd attempt %d/%d failed: %s: %s', suspect.id, attempt,
                                    attempts, error.__class__.__name__, error)
                if attempt == attempts:
                    raise
                time.sleep(pause)

    def check_peers(self):
        """spamd answers PING with PONG (fuglu healthcheck --deep)."""
        peer = 'spamd %s' % self._address()
        try:
            status = self.request(b'PING').status
        except (SpamdError, OSError) as error:
            return [(peer, False, '%s: %s' % (error.__class__.__name__, error))]
        return [(peer, status.endswith('PONG'), 'answered %r' % status)]

    # -- lint -----------------------------------------------------------------
    def lint(self):
        if not self.check_config():
            return False
        ok = True
        for option in self.ignored_options:
            if self.config.get(self.section, option, fallback='').strip():
                print('WARNING: %s is accepted for compatibility but not implemented: ignored'
                      % option)
        for option in ('highspamaction', 'lowspamaction', 'problemaction'):
            if self._action(option) is None:
                print('ERROR: %s=%s is not a valid action' % (option, self._option(option)))
                ok = False
        try:
            for name in ('lowspamlevel', 'highspamlevel'):
                self._level(None, name)
        except RuntimeConfigError as error:
            print('ERROR: spam level: %s' % error)
            ok = False
        url = self._option('sql_blocklist_dbconnectstring').strip()
        values = self.blocklist_values('recipient@example.com')
        timeout = self.config.getfloat('databaseconfig', 'timeout', fallback=5.0)
        if url and not lint_sql(url, SQL_BLOCKLIST_QUERY, values, 'sql_blocklist', timeout):
            ok = False
        try:
            pong = self.request(b'PING')
            print('Got: %s' % pong.status)
            if not pong.status.endswith('PONG'):
                print('ERROR: spamd should answer PONG')
                return False
            symbols = self.request(b'SYMBOLS', gtube_message()).body.decode('utf-8', 'replace')
        except (SpamdError, OSError) as error:
            print('ERROR: spamd at %s: %s: %s' % (self._address(), error.__class__.__name__, error))
            return False
        if 'GTUBE' not in [symbol.strip() for symbol in symbols.split(',')]:
            print('ERROR: spamd did not detect GTUBE, symbols: %s' % symbols.strip())
            return False
        print('GTUBE has been detected correctly')
        return ok

    def _address(self):
        return service_address(self._option('host'), self._option('port'))
