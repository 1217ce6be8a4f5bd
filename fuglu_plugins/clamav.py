"""ClamAV: scan each message with clamd (alias ``clamav``, section ``[ClamavPlugin]``).

One fresh connection per message, over TCP (``port`` is a number) or a unix socket
(``port`` is a path). The message goes to clamd with ``zINSTREAM``: chunks of at most
20480 bytes, each behind a 4-byte big-endian length, ended by a zero length. clamd
answers with one NUL-terminated line (clamd(8), INSTREAM)::

    stream: OK                                    clean
    stream: Eicar-Test-Signature.UNOFFICIAL FOUND a virus
    INSTREAM size limit exceeded. ERROR           over clamd's StreamMaxLength

Only an explicit ``OK`` is clean. Errors, garbage, cut-off replies, timeouts and refused
connections are problems: after ``retries`` attempts (and the optional clamscan fallback)
the message gets ``problemaction``, never a clean verdict.
"""

import select
import subprocess
import time

from fuglu import (DEFER, DUNNO, ScannerPlugin, actioncode_to_string, apply_template,
                   connect_service, part_chunks, recv_until, send_parts, service_address,
                   string_to_actioncode)

# clamd reads INSTREAM data in chunks; 20 KiB stays well below its default buffers.
CHUNK_SIZE = 20480

# The EICAR anti-virus test string, in two halves so that this file is no test virus.
EICAR = b'X5O!P%@AP[4\\PZX54(P^)7CC)7}$' + b'EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*'


class ClamdError(Exception):
    """clamd answered, but not with a verdict (an error, garbage or a cut-off reply).
    Retrying does not help, unlike a socket error."""


def parse_clamd_reply(reply):
    """NUL-terminated clamd reply (bytes) -> {name: virusname}, empty when clean.

    Raises ClamdError for anything but an explicit OK or FOUND."""
    if not reply.endswith(b'\0'):
        raise ClamdError('incomplete clamd reply %r' % reply[:200])
    text = reply.rstrip(b'\0').decode('utf-8', 'replace').strip()
    if text.startswith('INSTREAM size limit exceeded'):
        raise ClamdError('clamd refused the message: %s - set maxsize below clamd\'s '
                         'StreamMaxLength' % text)
    name, separator, info = text.partition(': ')
    if not separator or not name:
        raise ClamdError('unexpected clamd reply %r' % text[:200])
    if info == 'OK':
        return {}
    if info.endswith(' FOUND') and len(info) > len(' FOUND'):
        return {name: info[:-len(' FOUND')].strip()}
    raise ClamdError('clamd could not scan: %r' % text[:200])


def build_eicar_message():
    """A MIME mail carrying EICAR zipped as an attachment, built now (for lint)."""
    import base64
    import io
    import zipfile
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, 'w', zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr('eicar.com', EICAR)
    attachment = base64.encodebytes(archive.getvalue()).replace(b'\n', b'\r\n')
    return (b'From: fuglu-lint@localhost\r\n'
            b'To: fuglu-lint@localhost\r\n'
            b'Subject: fuglu lint: EICAR test virus\r\n'
            b'MIME-Version: 1.0\r\n'
            b'Content-Type: multipart/mixed; boundary="fuglu-lint-boundary"\r\n'
            b'\r\n'
            b'--fuglu-lint-boundary\r\n'
            b'Content-Type: text/plain; charset=us-ascii\r\n'
            b'\r\n'
            b'The attachment is the EICAR anti-virus test file, zipped.\r\n'
            b'--fuglu-lint-boundary\r\n'
            b'Content-Type: application/zip; name="eicar.zip"\r\n'
            b'Content-Transfer-Encoding: base64\r\n'
            b'Content-Disposition: attachment; filename="eicar.zip"\r\n'
            b'\r\n' + attachment +
            b'--fuglu-lint-boundary--\r\n')


class ClamavPlugin(ScannerPlugin):
    """Scans the message with clamd; viruses get ``virusaction``, clamd trouble
    ``problemaction``."""

    friendly_name = 'Clam AV'

    requiredvars = {
        'host': {'default': 'localhost',
                 'description': 'clamd host (TCP); $NAME reads it from the environment '
                                'variable NAME'},
        'port': {'default': '3310',
                 'description': 'clamd TCP port, or the path of clamd\'s unix socket'},
        'timeout': {'default': '30',
                    'description': 'seconds to connect and send; the reply may take '
                                   'min(3 x timeout, timeout + 30)'},
        'pipelining': {'default': 'False',
                       'description': 'ignored (FuGlu 1.7 uses one connection per message)'},
        'maxsize': {'default': '22000000',
                    'description': 'larger messages are not scanned (keep below clamd\'s '
                                   'StreamMaxLength)'},
        'retries': {'default': '3',
                    'description': 'attempts when clamd cannot be reached or the '
                                   'connection breaks'},
        'virusaction': {'default': 'DEFAULTVIRUSACTION',
                        'description': 'action for infected messages (DEFAULTVIRUSACTION = [virus] '
                                       'defaultvirusaction)'},
        'virusaction_unofficial': {'default': '',
                                   'description': 'action when a signature name ends in '
                                                  '.UNOFFICIAL (third-party databases); empty = '
                                                  'virusaction'},
        'problemaction': {'default': 'DEFER',
                          'description': 'action when the message could not be scanned'},
        'rejectmessage': {'default': 'threat detected: ${virusname}',
                          'description': 'reply text for infected messages; ${virusname}, '
                                         '${infectedfile} and the usual template variables'},
        'clamscanfallback': {'default': 'False',
                             'description': 'scan with the clamscan program when clamd fails'},
        'clamscan': {'default': '/usr/bin/clamscan', 'description': 'path of clamscan'},
        'clamscantimeout': {'default': '30', 'description': 'seconds clamscan may take'},
        'skip_on_previous_virus': {'default': 'none',
                                   'description': 'do not scan when an engine already found a '
                                                  'virus: none, all, or a comma separated list of '
                                                  'engine names'},
        'skiplist_file': {'default': '',
                          'description': 'file of signature names (one a line) to ignore in '
                                         'welcomelisted messages when they are the only hit'},
        'enginename': {'default': '', 'description': 'engine name in the virus tags (empty '
                                                     '= ClamAV)'},
    }

    # -- options --------------------------------------------------------------
    def _option(self, name):
        return self.config.get(self.section, name)

    @property
    def enginename(self):
        return self._option('enginename').strip() or 'ClamAV'

    def _action(self, option):
        """The action code an option names, or None when it names no action."""
        return string_to_actioncode(self._option(option), self.config)

    # -- examine --------------------------------------------------------------
    def examine(self, suspect):
        if self._virus_already_found(suspect):
            self.logger.info('%s not scanned by clamd: a previous engine found a virus', suspect.id)
            return DUNNO
        maxsize = self.config.getint(self.section, 'maxsize')
        if suspect.size > maxsize:
            self.logger.info('%s not scanned by clamd: size %d > maxsize %d',
                             suspect.id, suspect.size, maxsize)
            suspect.set_tag('%s.skipreason' % self.__class__.__name__, 'size skip')
            return DUNNO

        # A Return-Path line makes clamd recognise the stream as a mail. The message
        # goes as parts: a spooled one is streamed from its file. The sender goes as the
        # bytes it came as (8-bit ones included).
        sender = suspect.from_address.encode('utf-8', 'surrogateescape')
        content = [b'Return-Path: <%s>\r\n' % sender] + suspect.source_parts()
        try:
            viruses = self.scan_with_retries(content, suspect.id)
        except (ClamdError, OSError) as error:
            viruses = self._clamscan_fallback(content, suspect.id, error)
            if viruses is None:
                return self._problemaction(), 'virus scan failed, try again later'

        engine = self.enginename
        if not viruses:
            suspect.tags['virus'][engine] = False
            self.logger.debug('%s clean according to clamd', suspect.id)
            return DUNNO
        if suspect.is_welcomelisted() and len(viruses) == 1 and \
                list(viruses.values())[0] in self._skiplist():
            self.logger.info('%s welcomelisted, ignoring %s', suspect.id, viruses)
            return DUNNO

        suspect.tags['virus'][engine] = True
        suspect.tags['%s.virus' % engine] = viruses
        suspect.tags['%s.virus' % self.__class__.__name__] = viruses
        action = self._virus_action(viruses)
        infectedfile, virusname = next(iter(viruses.items()))
        message = apply_template(self._option('rejectmessage'), suspect,
                                 {'virusname': virusname, 'infectedfile': infectedfile})
        self.logger.info('%s virus found in message from %s: %s -> %s', suspect.id,
                         suspect.from_address, viruses, actioncode_to_string(action))
        return action, message

    def _virus_action(self, viruses):
        action = self._action('virusaction')
        if self._option('virusaction_unofficial').strip() and \
                any(name.endswith('.UNOFFICIAL') for name in viruses.values()):
            action = self._action('virusaction_unofficial')
        return DEFER if action is None else action

    def _virus_already_found(self, suspect):
        setting = self._option('skip_on_previous_virus').strip().lower()
        if setting in ('', 'none'):
            return False
        flagged = [engine for engine, found in suspect.tags['virus'].items() if found]
        if setting == 'all':
            return bool(flagged)
        wanted = set(name.strip() for name in setting.split(',') if name.strip())
        return any(engine.lower() in wanted for engine in flagged)

    def _skiplist(self):
        path = self._option('skiplist_file').strip()
        if not path:
            return set()
        try:
            with open(path, encoding='utf-8', errors='replace') as listing:
                return set(line.strip() for line in listing
                           if line.strip() and not line.startswith('#'))
        except OSError as error:
            self.logger.warning('cannot read skiplist_file %s: %s', path, error)
            return set()

    # -- talking to clamd -------------------------------------------------------
    def _timeout(self):
        return self.config.getfloat(self.section, 'timeout')

    def _connect(self):
        """A connected socket to clamd; raises OSError."""
        return connect_service(self._option('host'), self._option('port'), self._timeout(),
                               keepalive=True)

    def _reply_deadline(self):
        timeout = self._timeout()
        return time.monotonic() + min(3 * timeout, timeout + 30)

    @staticmethod
    def _read_reply(connection, deadline):
        """Bytes up to and including clamd's NUL terminator, or up to EOF."""
        return recv_until(connection, deadline, b'\0', 'no complete reply from clamd in time')

    def command(self, name):
        """One z-command without data (b'PING', b'VERSION') -> reply text."""
        with self._connect() as connection:
            connection.sendall(b'z' + name + b'\0')
            reply = self._read_reply(connection, self._reply_deadline())
        if not reply.endswith(b'\0'):
            raise ClamdError('incomplete clamd reply %r' % reply[:200])
        return reply.rstrip(b'\0').decode('utf-8', 'replace').strip()

    def scan_stream(self, content, suspect_id='-'):
        """One zINSTREAM scan of ``content`` (bytes, or a list of message parts: bytes
        and spool file sections, see fuglu.send_parts) -> {name: virusname}, {} when
        clean.

        Raises OSError when the connection fails, ClamdError when clamd answers
        anything but a verdict."""
        parts = content if isinstance(content, list) else [content]
        with self._connect() as connection:
            try:
                connection.sendall(b'zINSTREAM\0')
                for chunk in part_chunks(parts, CHUNK_SIZE):
                    send_parts(connection, [len(chunk).to_bytes(4, 'big'), chunk])
                    # clamd answers early (and closes) when the stream grows over its
                    # StreamMaxLength; stop sending so the reply is read, not reset.
                    if select.select([connection], [], [], 0)[0]:
                        break
                else:
                    connection.sendall(b'\0\0\0\0')
            except (BrokenPipeError, ConnectionResetError) as error:
                # The reply may still be waiting in our receive buffer.
                self.logger.debug('%s clamd closed the connection while we sent: %s', suspect_id,
                                  error)
                try:
                    reply = self._read_reply(connection, time.monotonic() + 1.0)
                except OSError:
                    reply = b''
                if not reply:
                    raise
                return parse_clamd_reply(reply)
            reply = self._read_reply(connection, self._reply_deadline())
        if not reply:
            raise ConnectionResetError('clamd closed the connection without a reply')
        return parse_clamd_reply(reply)

    def scan_with_retries(self, content, suspect_id):
        """scan_stream, retried on connection trouble; raises the last error."""
        attempts = max(self.config.getint(self.section, 'retries'), 1)
        for attempt in range(1, attempts + 1):
            try:
                return self.scan_stream(content, suspect_id)
            except ClamdError as error:
                self.logger.error('%s %s', suspect_id, error)
                raise
            except OSError as error:
                self.logger.warning('%s clamd attempt %d/%d failed: %s: %s', suspect_id, attempt,
                                    attempts, error.__class__.__name__, error)
                if attempt == attempts:
                    raise

    def _clamscan_fallback(self, content, suspect_id, clamd_error):
        """When enabled, scan with the clamscan program -> viruses dict, or None (problem)."""
        if not self.config.getboolean(self.section, 'clamscanfallback'):
            self.logger.error('%s could not scan with clamd: %s', suspect_id, clamd_error)
            return None
        program = self._option('clamscan').strip()
        self.logger.warning('%s clamd failed (%s), trying %s', suspect_id, clamd_error, program)
        if isinstance(content, list):
            content = b''.join(bytes(chunk) for chunk in part_chunks(content, 1 << 20))
        try:
            result = subprocess.run([program, '--no-summary', '-'], input=content,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    timeout=self.config.getfloat(self.section, 'clamscantimeout'))
        except (OSError, subprocess.SubprocessError) as error:
            self.logger.error('%s clamscan failed too: %s', suspect_id, error)
            return None
        if result.returncode == 0:
            return {}
        if result.returncode == 1:
            viruses = {}
            for line in result.stdout.decode('utf-8', 'replace').splitlines():
                name, _, info = line.strip().rpartition(': ')
                if info.endswith(' FOUND'):
                    viruses[name] = info[:-len(' FOUND')].strip()
            if viruses:
                return viruses
        self.logger.error('%s clamscan exited with %d: %s', suspect_id, result.returncode,
                          result.stderr.decode('utf-8', 'replace').strip()[:200])
        return None

    def check_peers(self):
        """clamd answers PING with PONG (fuglu healthcheck --deep)."""
        peer = 'clamd %s' % self._address()
        try:
            pong = self.command(b'PING')
        except (ClamdError, OSError) as error:
            return [(peer, False, '%s: %s' % (error.__class__.__name__, error))]
        return [(peer, pong == 'PONG', 'answered %r' % pong)]

    # -- lint -----------------------------------------------------------------
    def lint(self):
        if not self.check_config():
            return False
        ok = True
        for option in ('virusaction', 'problemaction'):
            if self._action(option) is None:
                print('ERROR: %s=%s is not a valid action' % (option, self._option(option)))
                ok = False
        if (self._option('virusaction_unofficial').strip()
            and self._action('virusaction_unofficial') is None):
            print('ERROR: virusaction_unofficial=%s is not a valid action'
                  % self._option('virusaction_unofficial'))
            ok = False
        try:
            pong = self.command(b'PING')
            print('Got Pong: %s' % pong)
            if pong != 'PONG':
                print('ERROR: clamd should answer PONG')
                return False
            print('clamd version: %s' % self.command(b'VERSION'))
            viruses = self.scan_stream(build_eicar_message(), 'lint')
        except (ClamdError, OSError) as error:
            print('ERROR: clamd at %s: %s: %s' % (self._address(), error.__class__.__name__, error))
            return False
        if not viruses:
            print('ERROR: clamd did not find the EICAR test virus')
            return False
        print('Clamav found virus %s' % viruses)
        return ok

    def _address(self):
        return service_address(self._option('host'), self._option('port'))
