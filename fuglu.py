#!/usr/bin/env python3
"""fuglu - a mail content filter between Postfix and your scanners, in one file.

fuglu re-implements the behaviour and the configuration of the FuGlu mail content
scanner (1.7.0) with the Python standard library alone. It is meant to be copied onto a
host as one ``fuglu.pyz`` and wired into Postfix as an after-queue ``content_filter``
(the ``smtp`` connector), a before-queue ``smtpd_proxy_filter`` (``esmtp``), a milter
(``milter``) or driven by scripts (``netcat``). Scanners (ClamAV, SpamAssassin, the
attachment blocker, the archiver ...) are plugins; a plugin written against FuGlu's
``fuglu.shared`` API loads unchanged.

How the parts fit
-----------------

A message travels like this::

    Postfix --SMTP/milter--> Listener (one accept thread per incomingport entry)
                                 |  hands the accepted socket to
                                 v
                             Backend (thread pool; a process pool slots in the same way)
                                 |  runs
                                 v
                             Connector session (smtp / esmtp / netcat / milter):
                             speaks the protocol, builds a Suspect from the bytes
                                 |
                                 v
                             ScanSession: prependers -> scanners -> appenders
                                 |  verdict (DUNNO, ACCEPT, DELETE, REJECT, DEFER)
                                 v
                             Connector: re-inject downstream (Reinjector) and only then
                             answer the MTA; every failure becomes a temporary failure

The sections of this file follow that path, in dependency order: constants and
actions, small helpers, configuration, templates, the Suspect, rule files
(SuspectFilter), plugin bases and loader, the scan session, the SMTP machinery shared by
the connectors (line reader, server session, re-injection client), the connectors, the
backends, the control server, the daemon (MainController), lint, and the command line.

Principles
----------

* Bytes stay bytes. The message source is kept exactly as received; headers fuglu adds
  are prepended as bytes. A parsed ``email`` message is only re-serialised when a plugin
  replaced it.
* No mail is lost. The feeding MTA gets a 2xx only after the downstream accepted the
  message; downstream down, scanner trouble, timeouts and crashes become 4xx replies.
* Errors are values at protocol boundaries: a connector turns every failure into the
  right reply plus a log line carrying the message id. Inside, exceptions carry meaning.
* Everything a peer controls is bounded: line and message sizes, every wait on a client
  or a downstream, a session's total time, connections per client address, the time
  rule regexes get. A bound that is hit is a protocol reply or a problem for the plugin
  (its problemaction), never a silent pass (README, Limits).
* Heavy modules (``email``, ``html.parser``, archive modules) are imported when first
  needed, so start-up stays fast and small.
"""

import configparser
import contextlib
import fnmatch
import importlib
import ipaddress
import logging
import os
import queue
import re
import signal
import socket
import struct
import sys
import threading
import time
import traceback

# `python3 fuglu.py` and `python3 -m fuglu` run this file as __main__; a plugin that does
# `import fuglu` (or the FuGlu way, `from fuglu.shared import ...`) must get this very
# module, not a second copy with its own classes.
if __name__ == '__main__':
    sys.modules.setdefault('fuglu', sys.modules[__name__])
sys.modules.setdefault('fuglu.shared', sys.modules[__name__])
sys.modules.setdefault('fuglu.stringencode', sys.modules[__name__])

__version__ = '1.7.0.post1'
__author__ = 'the fuglu developers'
__license__ = 'Apache-2.0'

__all__ = [
    'DUNNO', 'ACCEPT', 'DELETE', 'REJECT', 'DEFER', 'ALLCODES',
    'string_to_actioncode', 'actioncode_to_string', 'apply_template',
    'force_uString', 'force_bString', 'FuConfigParser', 'Suspect', 'SuspectFilter',
    'BasicPlugin', 'ScannerPlugin', 'PrependerPlugin', 'AppenderPlugin',
    'ScanSession', 'MainController', 'CONNECTORS', 'BACKENDS', 'main',
]


###############################################################################
# Constants and actions
###############################################################################

DUNNO = 0   # no decision, the next plugin runs
ACCEPT = 1  # deliver, skip the remaining scanners
DELETE = 2  # accept and drop (blackhole)
REJECT = 3  # permanent refusal
DEFER = 4   # temporary refusal, the MTA retries

ALLCODES = {'DUNNO': DUNNO, 'ACCEPT': ACCEPT, 'DELETE': DELETE, 'REJECT': REJECT,
            'DEFER': DEFER}
ACTION_NAMES = {code: name for name, code in ALLCODES.items()}

# pseudo action names that resolve through the [spam] / [virus] sections
PSEUDO_ACTIONS = {
    'DEFAULTLOWSPAMACTION': ('spam', 'defaultlowspamaction'),
    'DEFAULTHIGHSPAMACTION': ('spam', 'defaulthighspamaction'),
    'DEFAULTVIRUSACTION': ('virus', 'defaultvirusaction'),
}

DEFAULT_CONFIG_PATH = '/etc/fuglu/fuglu.conf'
DEFAULT_CONFDIR = '/etc/fuglu'

# exit codes (spec 1.3)
EXIT_PLUGIN_LOAD_FAILED = 66
EXIT_UNHANDLED = 254


def string_to_actioncode(actionstring, config=None):
    """Action name -> code. Case and surrounding blanks do not matter, DISCARD is DELETE,
    the DEFAULT*ACTION pseudo names resolve through ``config``. Unknown -> None."""
    if actionstring is None:
        return None
    name = str(actionstring).strip().upper()
    if name == 'DISCARD':
        name = 'DELETE'
    if name in PSEUDO_ACTIONS:
        if config is None:
            return None
        section, option = PSEUDO_ACTIONS[name]
        try:
            name = config.get(section, option).strip().upper()
        except (configparser.Error, ValueError):
            return None
        if name == 'DISCARD':
            name = 'DELETE'
    return ALLCODES.get(name)


def actioncode_to_string(code):
    if code is None:
        return 'NULL ACTION CODE'
    return ACTION_NAMES.get(code, 'INVALID ACTION CODE %s' % code)


###############################################################################
# Small helpers
###############################################################################

def force_uString(value, encoding='utf-8', errors='replace'):
    """Anything -> str (bytes are decoded, lists converted item by item)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode(encoding, errors)
    if isinstance(value, (list, tuple)):
        return type(value)(force_uString(v, encoding, errors) for v in value)
    return str(value)


def force_bString(value, encoding='utf-8', errors='strict'):
    """Anything -> bytes (str is encoded)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray):
        return bytes(value)
    if isinstance(value, (list, tuple)):
        return type(value)(force_bString(v, encoding, errors) for v in value)
    return str(value).encode(encoding, errors)


def split_address(address):
    """'local@domain' -> ('local', 'domain'), split at the last '@'."""
    if not address:
        return '', ''
    local, sep, domain = address.rpartition('@')
    if not sep:
        return address, ''
    return local, domain


def parse_list(value, lower=False):
    """'a, b,,c' -> ['a', 'b', 'c']"""
    items = [item.strip() for item in (value or '').split(',')]
    items = [item for item in items if item]
    return [item.lower() for item in items] if lower else items


def one_line(text, limit=512):
    """Reply texts: no CR/LF (they would start a new reply line), bounded length."""
    text = force_uString(text) or ''
    text = text.replace('\r', ' ').replace('\n', ' ')
    return text[:limit]


def encode_header(name, value):
    """One header as bytes with CRLF. Plain short ASCII is written as is; anything with
    non-ASCII characters, CR/LF (header injection) or very long values is RFC 2047
    encoded and folded by the email package."""
    value = force_uString(value)
    if value.isascii() if hasattr(value, 'isascii') else all(ord(c) < 128 for c in value):
        if '\r' not in value and '\n' not in value and len(name) + len(value) < 900:
            return ('%s: %s\r\n' % (name, value)).encode('ascii')
    from email.header import Header
    encoded = Header(value, header_name=name, charset='utf-8').encode(linesep='\r\n')
    return ('%s: %s\r\n' % (name, encoded)).encode('ascii')


def ip_in_networks(ip, networks):
    """True if ``ip`` (str) lies in one of ``networks`` (ip_network objects)."""
    try:
        address = ipaddress.ip_address(ip.split('%')[0])
    except ValueError:
        return False
    if getattr(address, 'ipv4_mapped', None):
        address = address.ipv4_mapped
    return any(address.version == net.version and address in net for net in networks)


def parse_networks(value):
    """Comma list of IPs/CIDRs -> list of ip_network. Raises ValueError on garbage."""
    return [ipaddress.ip_network(item, strict=False) for item in parse_list(value)]


###############################################################################
# Configuration
###############################################################################
# The semantics are FuGlu's (spec section 2): RawConfigParser, last value wins, no
# interpolation, option names case-insensitive. Every component declares its options
# once in a `requiredvars`-style table (option -> default + description); those tables
# are the fallback for lookups, the source of --dump-defaults / fuglu.conf.dist and of
# the lint checks.

def _opt(default, description, section=None, validator=None, confidential=False):
    spec = {'default': default, 'description': description}
    if section:
        spec['section'] = section
    if validator:
        spec['validator'] = validator
    if confidential:
        spec['confidential'] = True
    return spec


def _is_int(value):
    try:
        int(value)
        return True
    except (TypeError, ValueError):
        return False


def _is_bool(value):
    return str(value).strip().lower() in FuConfigParser.BOOLEAN_STATES


def _is_action(value):
    return string_to_actioncode(value) is not None or \
        str(value).strip().upper() in PSEUDO_ACTIONS


def _is_networks(value):
    try:
        parse_networks(value)
        return True
    except ValueError:
        return False


# section -> option -> spec. Order is the order of fuglu.conf.dist.
CORE_DEFAULTS = {
    'main': {
        'identifier': _opt('dist', 'free label, logged at start and on reload'),
        'daemonize': _opt('1', 'fork into the background (ignored with --foreground and --lint)',
                          validator=_is_bool),
        'scantimelogger': _opt('0', 'log per-plugin scan times to the logger fuglu.Timings',
                               validator=_is_bool),
        'user': _opt('nobody', 'user to drop privileges to after binding the ports (when started as root)'),
        'group': _opt('nobody, nogroup', 'groups to drop to: the first one that exists is used'),
        'plugindir': _opt('', 'comma separated directories searched for plugin modules, before the bundled ones'),
        'plugins': _opt('archive,attachment,clamav,spamassassin',
                        'scanner plugins, in the order they run: alias, dotted module.Class, each optionally with (configsection)'),
        'prependers': _opt('debug,skip', 'prepender plugins: run before the scanners and may change the plugin lists'),
        'appenders': _opt('', 'appender plugins: run after the message was delivered or refused'),
        'mplugins': _opt('', 'milter-stage plugins (milter connector only): act at connect, helo, mailfrom, '
                             'rcpt, header, eoh or eob time, before the scanners'),
        'bindaddress': _opt('127.0.0.1', 'address the incoming ports listen on, unless an entry names its own'),
        'incomingport': _opt('10025,10099,10888',
                             'listeners, comma separated: port (smtp), protocol:port or protocol:address:port; '
                             'protocols smtp (after-queue), esmtp (before-queue proxy), milter, netcat'),
        'smtp_command_line_limit': _opt('2048', 'longest SMTP command line accepted, in bytes', validator=_is_int),
        'smtp_data_line_limit': _opt('1048576', 'longest line accepted in a message, in bytes', validator=_is_int),
        'smtp_max_message_size': _opt('268435456', 'largest message accepted, in bytes (announced as SIZE); 0 = no limit',
                                      validator=_is_int),
        'netcat_max_message_size': _opt('', 'largest message the netcat connector accepts, in bytes; '
                                            'empty: smtp_max_message_size; 0 = no limit',
                                        validator=lambda value: not value.strip() or _is_int(value)),
        'smtptimeout': _opt(
            '300', 'seconds to wait for the next command, data or milter packet from a client',
            validator=_is_int),
        'max_session_time': _opt(
            '1200', 'seconds one client connection may last in all, whatever it sends (a client '
                    'trickling bytes keeps each read alive, not the session); then smtp/esmtp '
                    'answer 421 4.4.2, netcat DEFER, milter closes; 0 = no limit',
            validator=_is_int),
        'trusted_xforward_peers': _opt('', 'IPs/networks allowed to send client information (XFORWARD, '
                                           'milter connect data, netcat envelope). Empty: every peer is trusted',
                                       validator=_is_networks),
        'outgoinghost': _opt('127.0.0.1', 're-injection target host; ${injecthost} = the host that sent the message, '
                                          '$NAME = environment variable'),
        'outgoingport': _opt('10026', 're-injection target port', validator=_is_int),
        'outgoinghelo': _opt('', 'EHLO name used when re-injecting; empty: this host\'s FQDN'),
        'outgoingretry': _opt('1', 'extra attempts when the downstream connection fails', validator=_is_int),
        'downstream_connect_timeout': _opt(
            '10', 'seconds to wait for the TCP connection to the downstream (re-injection, '
                  'bounces, the esmtp after-filter server); Postfix: smtp_connect_timeout 30s',
            validator=_is_int),
        'downstream_reply_timeout': _opt(
            '30', 'seconds to wait for the downstream\'s greeting and each reply (smtp connector '
                  'and bounces); connect, greeting, EHLO, XFORWARD and MAIL together stay well '
                  'inside Postfix\'s smtp_mail_timeout (300s); too late: 451 4.4.2',
            validator=_is_int),
        'downstream_data_timeout': _opt(
            '120', 'seconds to wait for the downstream\'s reply after the message data; Postfix '
                   'waits smtp_data_done_timeout (600s) for fuglu\'s, scanning included; too late: '
                   '451 4.4.2', validator=_is_int),
        'bouncehost': _opt('', 'where bounces are sent; empty: outgoinghost'),
        'bounceport': _opt('', 'port for bounces; empty: outgoingport'),
        'tempdir': _opt('/tmp', 'directory for temporary files'),
        'prependaddedheaders': _opt('X-Fuglu-', 'prefix of the headers fuglu adds'),
        'trashdir': _opt('', 'if set, a copy of every message a scanner DELETEs is kept here'),
        'trashlog': _opt('0', 'also log each trashed message to 00-fuglutrash.log in trashdir', validator=_is_bool),
        'disablebounces': _opt('0', 'never send a bounce', validator=_is_bool),
        'nobouncefile': _opt('${confdir}/rules/nobounce.txt', 'domains (one per line) that never get bounces'),
        'debuginfoheader': _opt('0', 'add a <prefix>Debuginfo header', validator=_is_bool),
        'spamstatusheader': _opt('1', 'add a <prefix>Spamstatus: YES|NO header', validator=_is_bool),
        'suspectidheader': _opt('1', 'add a <prefix>Suspect: <id> header', validator=_is_bool),
        'suspectidreturn': _opt('1', 'append (<id>) to DELETE, REJECT and DEFER replies', validator=_is_bool),
        'mrtgdir': _opt('', 'directory for MRTG counter files; empty: none'),
        'controlport': _opt('/tmp/fuglu_control.sock', 'control socket: a path (unix socket, mode 0600) or a TCP port; '
                                                       'empty: no control socket'),
        'controladdress': _opt('127.0.0.1', 'bind address when controlport is a TCP port'),
        'controltoken': _opt('', 'shared secret required on a TCP control port', confidential=True),
        'logtemplate': _opt('Suspect ${id} from=${from_address} to=${to_address} size=${size} spam=${spam} '
                            'virus=${virus} modified=${modified} decision=${decision}',
                            'line logged for every message after scanning; empty: none'),
        'versioncheck': _opt('0', 'accepted for compatibility; fuglu never looks up versions on the network',
                             validator=_is_bool),
        'address_compliance_checker': _opt('Default', 'envelope address check: Default, LazyLocalPart, AsciiOnly, '
                                                      'PrintableAsciiOnly, NoCheck'),
        'address_compliance_checker_maxsize': _opt('64', 'longest local part accepted', validator=_is_int),
        'address_compliance_fail_action': _opt('defer', 'answer to invalid envelope addresses: defer, reject, discard'),
        'address_compliance_fail_message': _opt('invalid sender or recipient address', 'reply text for the above'),
        'remove_tmpfiles_on_error': _opt('1', 'remove temporary files when receiving fails', validator=_is_bool),
        'disabledarchivetypes': _opt('pdf', 'archive types never opened'),
    },
    'performance': {
        'backend': _opt('thread', 'worker backend: thread'),
        'minthreads': _opt('2', 'thread backend: workers kept running', validator=_is_int),
        'maxthreads': _opt('40', 'thread backend: most workers (connections handled at once)', validator=_is_int),
        'max_sessions_per_client': _opt(
            '', 'connections one client address may have open at once, any connector, queued '
                'ones included; more are refused at once (smtp/esmtp 421 4.7.0, netcat DEFER, '
                'milter: closed) and logged. Postfix feeding fuglu is one client: keep it above '
                'the process limit of the transport or smtpd that connects. Empty: half of '
                'maxthreads; 0 = no limit',
            validator=lambda value: not value.strip() or _is_int(value)),
        'minfreethreads': _opt('0', 'thread backend: idle workers kept ready', validator=_is_int),
        'initialprocs': _opt('0', 'process backend: worker processes (0: 2 x CPUs)'),
        'listen_backlog': _opt('0', 'listen() backlog; 0: the system maximum', validator=_is_int),
        'slow_enqueue_warn_ms': _opt('100', 'warn when handing a connection to the workers blocks this long',
                                     validator=_is_int),
    },
    'spam': {
        'defaultlowspamaction': _opt('DUNNO', 'what DEFAULTLOWSPAMACTION means', validator=_is_action),
        'defaulthighspamaction': _opt('DUNNO', 'what DEFAULTHIGHSPAMACTION means', validator=_is_action),
    },
    'virus': {
        'defaultvirusaction': _opt('DELETE', 'what DEFAULTVIRUSACTION means', validator=_is_action),
    },
    'smtpconnector': {
        'requeuetemplate': _opt('FUGLU REQUEUE(${id}): ${injectanswer}',
                                'text of the 250 reply after re-injection; ${injectanswer} = the downstream reply'),
    },
    'esmtpconnector': {
        'queuetemplate': _opt('${injectanswer}', 'text of the 250 reply after the downstream accepted the message'),
        'ignore_multiple_recipients': _opt('0', 'forward only the first recipient (spam traps)', validator=_is_bool),
        'downstream_timeout': _opt('50', 'seconds to wait for each reply of the after-filter server; keep it well '
                                         'below Postfix\'s smtpd_proxy_timeout (default 100s), so the client gets '
                                         'fuglu\'s 4xx and the scan still fits', validator=_is_int),
    },
    'milter': {
        'milter_mode': _opt('readonly', 'what the milter writes back: readonly, tags, manual, auto, autoheaders, '
                                        'replace_demo'),
        'milter_mode_options': _opt('', 'manual mode: all, body, headers, from, to; autoheaders: prepend'),
        'milter_max_packet_size': _opt('1048576', 'largest milter packet accepted, in bytes', validator=_is_int),
        'milter_progress_interval': _opt('10', 'seconds between SMFIR_PROGRESS keep-alives while a message is '
                                               'scanned (Postfix milter_content_timeout); 0: none',
                                         validator=_is_int),
        'milter_debug': _opt('0', 'log every milter packet', validator=_is_bool),
    },
    'PluginAlias': {},
    'environment': {},
    'databaseconfig': {
        'dbconnectstring': _opt('', 'SQLAlchemy URL for per-recipient settings (needs sqlalchemy)',
                                confidential=True),
    },
}


class ConfigProblem(Exception):
    """A config value fuglu cannot use. The message names file, section and option."""


class FuConfigParser(configparser.RawConfigParser):
    """FuGlu's configuration: RawConfigParser plus a table of defaults per
    (section, option) that lookups fall back to, and the ``${confdir}`` marker.

    Methods for callers: get/getint/getfloat/getboolean/getlist(section, option),
    set_defaults(section, table), has_default(section, option).
    Attributes: confdir (directory of the main config file), files (files read).
    """

    BOOLEAN_STATES = {'1': True, 'yes': True, 'true': True, 'on': True,
                      '0': False, 'no': False, 'false': False, 'off': False}

    def __init__(self, confdir=DEFAULT_CONFDIR):
        # lookups are memoised: connectors read the same options for every message
        self._lookup_cache = {}
        super().__init__(strict=False, interpolation=None)
        self.confdir = confdir
        self.files = []
        self.option_sources = {}  # (section, option) -> file it was read from
        self._defaults_table = {}  # (section, option) -> default string

    # -- reading --------------------------------------------------------------
    def read_config_file(self, path):
        with open(path, encoding='utf-8', errors='surrogateescape') as handle:
            text = handle.read()
        self.read_config_text(text, path)

    def read_config_text(self, text, source='<string>'):
        """Read one file's text on top of what was read before (last value wins) and
        remember where each option came from, for error messages."""
        layer = configparser.RawConfigParser(strict=False, interpolation=None)
        layer.read_string(text, source)
        for option, value in layer.defaults().items():
            self.defaults()[option] = value
        for section in layer.sections():
            if not self.has_section(section):
                self.add_section(section)
            for option in layer.options(section):
                self.set(section, option, layer.get(section, option, raw=True))
                self.option_sources[(section, option)] = source
        self.files.append(source)

    def set(self, section, option, value=None):
        self._lookup_cache.clear()
        super().set(section, option, value)

    def remove_option(self, section, option):
        self._lookup_cache.clear()
        return super().remove_option(section, option)

    def remove_section(self, section):
        self._lookup_cache.clear()
        return super().remove_section(section)

    # -- defaults -------------------------------------------------------------
    def set_defaults(self, section, table):
        """Register option defaults of one component (``requiredvars`` shape)."""
        self._lookup_cache.clear()
        for option, spec in table.items():
            target = spec.get('section', section)
            if 'default' in spec:
                self._defaults_table[(target, option.lower())] = spec['default']

    def has_default(self, section, option):
        return (section, option.lower()) in self._defaults_table

    def has_option(self, section, option):
        return super().has_option(section, option) or self.has_default(section, option)

    # -- lookups --------------------------------------------------------------
    def _raw(self, section, option):
        if super().has_option(section, option):
            return super().get(section, option, raw=True)
        key = (section, option.lower())
        if key in self._defaults_table:
            return self._defaults_table[key]
        if not self.has_section(section):
            raise configparser.NoSectionError(section)
        raise configparser.NoOptionError(option, section)

    def expand(self, value):
        if value is not None and '${confdir}' in value:
            value = value.replace('${confdir}', self.confdir)
        return value

    def _cached(self, kind, section, option, convert):
        key = (kind, section, option)
        try:
            return self._lookup_cache[key]
        except KeyError:
            value = convert()
            self._lookup_cache[key] = value
            return value

    def get(self, section, option, raw=False, vars=None, fallback=configparser._UNSET, **kwargs):
        if vars is None:
            try:
                return self._cached('raw' if raw else 'str', section, option,
                                    lambda: self._get(section, option, raw))
            except (configparser.NoSectionError, configparser.NoOptionError):
                if fallback is not configparser._UNSET:
                    return fallback
                raise
        return self._get(section, option, raw)

    def _get(self, section, option, raw=False):
        value = self._raw(section, option)
        return value if raw else self.expand(value)

    def _typed(self, kind, section, option, fallback, convert):
        try:
            return self._cached(kind, section, option, lambda: convert(self._raw(section, option).strip()))
        except (configparser.NoSectionError, configparser.NoOptionError):
            if fallback is not configparser._UNSET:
                return fallback
            raise

    def getint(self, section, option, fallback=configparser._UNSET, **kwargs):
        return self._typed('int', section, option, fallback, int)

    def getfloat(self, section, option, fallback=configparser._UNSET, **kwargs):
        return self._typed('float', section, option, fallback, float)

    def getboolean(self, section, option, fallback=configparser._UNSET, **kwargs):
        def convert(value):
            if value.lower() not in self.BOOLEAN_STATES:
                raise ValueError('Not a boolean: %s' % value)
            return self.BOOLEAN_STATES[value.lower()]
        return self._typed('bool', section, option, fallback, convert)

    def getlist(self, section, option, separators=',', strip=True, lower=False, fallback=None,
                resolve_env=False):
        try:
            value = self.get(section, option)
        except (configparser.NoSectionError, configparser.NoOptionError):
            return fallback if fallback is not None else []
        items = re.split('[%s]' % re.escape(separators), value)
        if strip:
            items = [item.strip() for item in items]
        items = [item for item in items if item]
        if lower:
            items = [item.lower() for item in items]
        return items

    def where(self, section, option):
        """'file [section] option' for error messages."""
        source = self.option_sources.get((section, option.lower()), 'defaults')
        return '%s [%s] %s' % (source, section, option)


def resolve_env_marker(value):
    """'$NAME' -> os.environ['NAME'] when that variable exists (FuGlu's marker)."""
    if value and value.startswith('$') and len(value) > 1 and not value.startswith('${'):
        return os.environ.get(value[1:], value)
    return value


# Options FuGlu knows that fuglu accepts without acting on them (features outside its
# scope: async backends, SQL/REST runtime config, Received-header heuristics ...), so an
# existing fuglu.conf lints clean. Each entry is a regular expression.
IGNORED_OPTIONS = {
    'main': ['mplugins', 'configdir', 'address_compliance_delay2rcpt'],
    'performance': ['queue_put_timeout', 'task_queue_multiplier', 'sync_plugin_offload_executor',
                    'loop_lag_interval', 'loop_lag_warn', 'loop_slow_callback_duration',
                    'worker_liveness_interval', 'worker_liveness_slow_read', 'async_coroutines',
                    'async_threadpool', r'async_\w+_timeout', 'join_timeout', r'att_mgr_\w+',
                    'disable_aiosmtp'],
    'milter': ['ignoreclient'],
    'databaseconfig': ['dbpriority', 'value_cache_ttl', 'sql', 'sqlsection', 'globalscope', 'option_field',
                       'scope_field', 'value_field', r'restapi_\w+', 'yaml_filepath'],
    'environment': ['boundarydistance', 'trustedhostsregex', 'trustedreceivedregex', 'skiponerror',
                    'skipsamedomain'],
}


def is_ignored_option(section, option, extra=()):
    patterns = list(IGNORED_OPTIONS.get(section, ())) + list(extra)
    return any(re.fullmatch(pattern, option, re.IGNORECASE) for pattern in patterns)


def check_options(config, section, table, ignored=()):
    """Lint one component's options: present (or defaulted), valid per validator, and
    no unknown options in its section (``ignored``: regexes of options accepted without
    effect). Returns a list of error strings naming file, section and option."""
    errors = []
    declared = {option.lower() for option, spec in table.items()
                if spec.get('section', section) == section}
    for option, spec in table.items():
        target = spec.get('section', section)
        try:
            value = config.get(target, option)
        except (configparser.NoSectionError, configparser.NoOptionError):
            errors.append('Missing configuration value without default %s' % config.where(target, option))
            continue
        validator = spec.get('validator')
        if validator is not None and not validator(value):
            errors.append('Invalid value %r for %s' % (value, config.where(target, option)))
    if config.has_section(section):
        for option, _value in configparser.RawConfigParser.items(config, section, raw=True):
            if option in declared or option in config.defaults():
                continue
            if not is_ignored_option(section, option, ignored):
                errors.append('Unknown option %s' % config.where(section, option))
    return errors


def load_config(path=None, configdir=None, embedded=None):
    """Read the main config file and conf.d/*.conf (sorted). ``embedded`` is config text
    used instead of a file (the built-in default)."""
    if path is not None:
        confdir = os.path.dirname(os.path.abspath(path))
    else:
        confdir = DEFAULT_CONFDIR
    config = FuConfigParser(confdir=confdir)
    if embedded is not None:
        config.read_config_text(embedded, '<embedded default>')
    else:
        config.read_config_file(path)
        if configdir is None and config.has_option('main', 'configdir'):
            configdir = config.get('main', 'configdir')
        if configdir and os.path.isdir(configdir):
            import glob
            for extra in sorted(glob.glob(os.path.join(configdir, '*.conf'))):
                config.read_config_file(extra)
    for section, table in CORE_DEFAULTS.items():
        config.set_defaults(section, table)
    return config


EMBEDDED_CONFIG = """\
# fuglu's embedded default: used when no config file exists.
# After-queue filter on 127.0.0.1:10025, re-injection to 127.0.0.1:10026,
# no plugin that needs a peer.
[main]
daemonize = 0
incomingport = smtp:127.0.0.1:10025
outgoinghost = 127.0.0.1
outgoingport = 10026
plugins =
prependers =
appenders =
controlport =
"""


def dump_defaults(plugin_classes=()):
    """The complete default configuration with descriptions: the text of
    fuglu.conf.dist."""
    out = ['# fuglu %s default configuration.' % __version__,
           '# Generated by `fuglu --dump-defaults`; every option with its default.',
           '# Options are described in the comment above them.', '']
    sections = {}
    for section, table in CORE_DEFAULTS.items():
        sections.setdefault(section, []).extend(table.items())
    for cls in plugin_classes:
        section = getattr(cls, 'default_section', None) or cls.__name__
        table = cls.requiredvars if isinstance(cls.requiredvars, dict) else {}
        for option, spec in table.items():
            sections.setdefault(spec.get('section', section), []).append((option, spec))
    sections['PluginAlias'] = [(alias, _opt(target, 'bundled plugin alias'))
                               for alias, target in sorted(PLUGIN_ALIASES.items())]
    for section, options in sections.items():
        out.append('[%s]' % section)
        seen = set()
        for option, spec in options:
            if option in seen or 'default' not in spec:
                continue
            seen.add(option)
            for line in spec.get('description', '').splitlines() or ['']:
                out.append(('# ' + line).rstrip())
            out.append(('%s = %s' % (option, spec['default'])).rstrip())
            out.append('')
        out.append('')
    return '\n'.join(out).rstrip('\n') + '\n'


###############################################################################
# Templates
###############################################################################
# FuGlu's template syntax (spec 5.7): $name or ${name}; names may start with @ (a tag)
# and contain . and : (${header:subject}); $$ is a literal $. Substitution is safe:
# malformed placeholders stay as they are, unknown names become ''.

TEMPLATE_RE = re.compile(r'\$(?:(\$)|\{(@?[a-z][_a-z0-9.:]*)\}|(@?[a-z][_a-z0-9.:]*))', re.IGNORECASE)


# name -> function(suspect): the variables every template knows about a message.
# Evaluated only when a template uses them (the subject needs the headers parsed).
TEMPLATE_DEFAULTS = {
    'id': lambda s: s.id,
    'timestamp': lambda s: s.timestamp,
    'from_address': lambda s: s.from_address,
    'from_domain': lambda s: s.from_domain,
    'from_localpart': lambda s: s.from_localpart,
    'to_address': lambda s: s.to_address or '',
    'to_domain': lambda s: s.to_domain,
    'to_localpart': lambda s: s.to_localpart,
    'subject': lambda s: s.get_header('subject', ''),
    'date': lambda s: time.strftime('%Y-%m-%d', time.localtime()),
    'time': lambda s: time.strftime('%X', time.localtime()),
}


def apply_template(template, suspect=None, values=None, valuesfunction=None):
    """Fill ``template`` with ``values``, then the message defaults, then any header or
    @tag of the message (the SuspectFilter fields)."""
    if template is None:
        return ''
    template = force_uString(template)
    if '$' not in template:
        return template
    values = dict(values or {})
    if valuesfunction is not None:
        values = valuesfunction(values)

    def lookup(match):
        if match.group(1):
            return '$'
        name = match.group(2) or match.group(3)
        for key in (name, name.lower()):
            if key in values:
                value = values[key]
                return '' if value is None else force_uString(value)
        if suspect is not None:
            compute = TEMPLATE_DEFAULTS.get(name.lower())
            if compute is not None:
                return force_uString(compute(suspect))
            found = SuspectFilter.field_values(suspect, name)
            if found:
                return force_uString(found[0])
        return ''
    return TEMPLATE_RE.sub(lookup, template)


###############################################################################
# Suspect: the message under scan
###############################################################################

HEADER_END_RE = re.compile(rb'\r?\n\r?\n')


class Suspect(object):
    """One message with its envelope, as the plugins see it (FuGlu's Suspect).

    The source is kept as the bytes received. Headers added with add_header() are
    prepended at delivery; set_source()/set_message_rep() replace the source.

    Instance attributes: id, from_address, recipients, to_address (first recipient),
    from_domain/from_localpart/to_domain/to_localpart, size, timestamp, tags (dict),
    addheaders (dict name -> value), queue_id, clientinfo ((helo, ip, rdns) or None),
    smtp_options (set of MAIL parameters like 'SMTPUTF8', 'BODY=8BITMIME'),
    milter_macros (dict).
    """

    def __init__(self, from_address, recipients, tempfile=None, inbuffer=None, id=None,
                 queue_id=None, smtp_options=None, clientinfo=None, milter_macros=None,
                 size=None, **kwargs):
        if isinstance(tempfile, (bytes, bytearray)) and inbuffer is None:
            inbuffer, tempfile = bytes(tempfile), None
        if inbuffer is None:
            if tempfile is None:
                raise ValueError('a Suspect needs a tempfile or an inbuffer')
            with open(tempfile, 'rb') as handle:
                inbuffer = handle.read()
        self.tempfile = tempfile
        self.id = id or os.urandom(16).hex()
        self.from_address = (force_uString(from_address) or '').strip()
        if isinstance(recipients, (str, bytes)):
            recipients = [recipients]
        self.recipients = [force_uString(r).strip() for r in (recipients or [])]
        self.original_from_address = self.from_address
        self.original_recipients = list(self.recipients)
        self._source = bytes(inbuffer)
        self._original_source = self._source
        self._modified = False
        self._message_rep = None
        self._header_cache = None
        self.timestamp = time.time()
        self.queue_id = queue_id
        self.smtp_options = set(smtp_options or ())
        self.clientinfo = clientinfo
        self.milter_macros = dict(milter_macros or {})
        self.announced_size = size
        self.addheaders = {}
        self.added_headers = {}
        self.modified_headers = {}
        self.removed_headers = {}
        self.tags = {
            'virus': {}, 'spam': {}, 'highspam': {}, 'blocked': {},
            'welcomelisted': {}, 'blocklisted': {},
            'decisions': [], 'scantimes': [], 'processingerrors': [],
        }
        self.tags.update(kwargs.get('tags') or {})

    # -- envelope -------------------------------------------------------------
    @property
    def to_address(self):
        return self.recipients[0] if self.recipients else None

    @to_address.setter
    def to_address(self, value):
        self.recipients = [value]

    from_localpart = property(lambda self: split_address(self.from_address)[0])
    from_domain = property(lambda self: split_address(self.from_address)[1].lower())
    to_localpart = property(lambda self: split_address(self.to_address)[0])
    to_domain = property(lambda self: split_address(self.to_address)[1].lower())

    def orig_from_address_changed(self):
        return self.from_address != self.original_from_address

    def orig_recipients_changed(self):
        return self.recipients != self.original_recipients

    # -- source ---------------------------------------------------------------
    @property
    def size(self):
        return len(self._source)

    def get_source(self, maxbytes=None):
        if maxbytes is not None:
            return self._source[:maxbytes]
        return self._source

    def get_original_source(self, maxbytes=None):
        if maxbytes is not None:
            return self._original_source[:maxbytes]
        return self._original_source

    def set_source(self, source, encoding='utf-8'):
        self._source = force_bString(source, encoding)
        self._modified = True
        self._message_rep = None
        self._header_cache = None

    def is_modified(self):
        return self._modified

    def get_message_rep(self):
        """The message parsed by the email package (compat32), cached."""
        if self._message_rep is None:
            import email
            from email import policy
            self._message_rep = email.message_from_bytes(self._source, policy=policy.compat32)
        return self._message_rep

    def set_message_rep(self, msgrep):
        from email import policy
        from email.generator import BytesGenerator
        import io
        buffer = io.BytesIO()
        BytesGenerator(buffer, mangle_from_=False,
                       policy=policy.compat32.clone(linesep='\r\n')).flatten(msgrep)
        self.set_source(buffer.getvalue())
        self._message_rep = msgrep

    # -- headers --------------------------------------------------------------
    def _header_block(self):
        """The raw header block (bytes, without the empty line), first 1 MiB at most."""
        head = self._source[:1048576]
        if head.startswith(b'\r\n'):
            return b'', 2
        if head.startswith(b'\n'):
            return b'', 1
        match = HEADER_END_RE.search(head)
        if match:
            # the block keeps the line end of its last header line
            end_of_last_line = match.start() + (2 if head[match.start():match.start() + 1] == b'\r' else 1)
            return head[:end_of_last_line], match.end()
        return head, len(head)

    def _parsed_headers(self):
        if self._header_cache is None:
            from email.parser import BytesHeaderParser
            from email import policy
            block, _ = self._header_block()
            self._header_cache = BytesHeaderParser(policy=policy.compat32).parsebytes(block)
        return self._header_cache

    def get_headers(self):
        return force_uString(self._header_block()[0])

    def get_header(self, headername, fallback=None):
        value = self._parsed_headers().get(headername)
        if value is None:
            return fallback
        value = force_uString(value) if not isinstance(value, str) else value
        return value.strip() if isinstance(value, str) else str(value)

    def get_all_headers(self, headername):
        return [force_uString(v) if isinstance(v, (str, bytes)) else str(v)
                for v in self._parsed_headers().get_all(headername, [])]

    def add_header(self, key, value, immediate=False, raw=False):
        """immediate=False: added at delivery (one value per name); True: prepended to
        the source now, so later plugins see it."""
        if immediate:
            header = ('%s: %s\r\n' % (key, value)).encode('utf-8') if raw else encode_header(key, value)
            self._source = header + self._source
            self._modified = True
            self._message_rep = None
            self._header_cache = None
            self.added_headers[key] = value
        else:
            self.addheaders[key] = value

    addheader = add_header  # FuGlu's deprecated spelling

    def _header_regex(self, name):
        return re.compile(rb'^' + re.escape(force_bString(name)) + rb'[ \t]*:.*(?:\r?\n[ \t].*)*\r?\n',
                          re.IGNORECASE | re.MULTILINE)

    def remove_headers(self, headername):
        """Delete every instance of a header from the source."""
        block, body_start = self._header_block()
        new_block, count = self._header_regex(headername).subn(b'', block)
        if count:
            self.removed_headers[headername] = count
            self.set_source(new_block + self._source[len(block):])
        return count

    remove_headers_from_source = remove_headers

    def set_header(self, key, value):
        """Replace all instances of a header by one new value, or add it immediately."""
        if self.remove_headers(key):
            self.modified_headers[key] = value
            self.removed_headers.pop(key, None)
            self._source = encode_header(key, value) + self._source
            self._header_cache = None
            self._message_rep = None
        else:
            self.add_header(key, value, immediate=True)

    def build_headers(self, prefix_only=False):
        """The addheaders as bytes, in insertion order, ready to prepend."""
        return b''.join(encode_header(name, value) for name, value in self.addheaders.items())

    def get_output_source(self):
        """What is delivered: added headers + the current source (or the original if
        the tag reinjectoriginal is set)."""
        return b''.join(self.get_output_parts())

    def get_output_parts(self):
        """get_output_source() as a list of parts, so large messages are not copied."""
        if self.tags.get('reinjectoriginal'):
            return [self._original_source]
        return [self.build_headers(), self._source]

    def update_subject(self, subject_cb, **cb_params):
        old = self.get_header('subject', '')
        new = subject_cb(old, **cb_params)
        if new != old:
            self.tags.setdefault('origsubj', old)
            self.set_header('Subject', new)
            return True
        return False

    # -- SpamAssassin temporary headers ---------------------------------------------
    def write_sa_temp_header(self, header, value):
        value = re.sub(r'[\x00-\x1f\x7f]', ' ', force_uString(value))
        self.tags.setdefault('SAPlugin.tempheader', {})
        if isinstance(self.tags['SAPlugin.tempheader'], dict):
            self.tags['SAPlugin.tempheader'][header] = value

    def get_sa_temp_headers(self):
        headers = self.tags.get('SAPlugin.tempheader') or {}
        if isinstance(headers, dict):
            return b''.join(encode_header(k, v) for k, v in headers.items())
        if isinstance(headers, (list, tuple)):
            headers = '\r\n'.join(headers)
        text = force_uString(headers).strip()
        return (text + '\r\n').encode('utf-8') if text else b''

    def source_stripped_attachments(self, content=None, maxsize=None, with_mime_headers=False):
        """The message with only its text parts (other parts become empty stubs),
        truncated to maxsize bytes."""
        import email
        from email import policy
        source = content if content is not None else self._source
        message = email.message_from_bytes(source, policy=policy.compat32)
        if message.is_multipart():
            for part in message.walk():
                if part.is_multipart():
                    continue
                if part.get_content_maintype() != 'text':
                    part.set_payload('')
        from email.generator import BytesGenerator
        import io
        buffer = io.BytesIO()
        BytesGenerator(buffer, mangle_from_=False,
                       policy=policy.compat32.clone(linesep='\r\n')).flatten(message)
        stripped = buffer.getvalue()
        return stripped[:maxsize] if maxsize else stripped

    # -- tags and status -------------------------------------------------------
    def get_tag(self, key, defaultvalue=None):
        return self.tags.get(key, defaultvalue)

    def set_tag(self, key, value):
        self.tags[key] = value

    def _any(self, tagname):
        return any(bool(v) for v in (self.tags.get(tagname) or {}).values())

    def is_spam(self):
        return self._any('spam')

    def is_highspam(self):
        return self._any('highspam')

    def is_virus(self):
        return self._any('virus')

    def is_blocked(self):
        return self._any('blocked')

    def is_welcomelisted(self):
        return self._any('welcomelisted')

    def is_blocklisted(self):
        return self._any('blocklisted')

    is_whitelisted = is_welcomelisted
    is_blacklisted = is_blocklisted

    def is_ham(self):
        return not (self.is_spam() or self.is_virus() or self.is_blocked() or
                    self.is_highspam() or self.is_blocklisted())

    def get_status(self):
        return {name: getattr(self, name)() for name in
                ('is_spam', 'is_highspam', 'is_virus', 'is_blocked', 'is_welcomelisted',
                 'is_blocklisted', 'is_ham')}

    def debug(self, message):
        if self.tags.get('debug'):
            handle = self.tags.get('debugfile')
            if handle is not None:
                handle.write('%s %s\n' % (time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()), message))
                handle.flush()

    # 'from HELO (RDNS [IP])' at the start of a Received header, as Postfix writes it
    # (FuGlu's pattern is anchored the same way). Anchored and with every repetition
    # bounded, a header shaped 'from a (from a (...' costs constant time per header;
    # searching anywhere with open repetitions was quadratic in its length.
    RECEIVED_CLIENT_RE = re.compile(r'\s{0,16}from\s{1,16}(\S{1,255})\s{1,16}'
                                    r'\(([^)\[]{0,255})\[(?:IPv6:)?([0-9a-fA-F.:]{2,45})\]',
                                    re.IGNORECASE)

    def get_client_info(self, config=None):
        """(helo, ip, rdns) from the connector, else from the first Received header."""
        if self.clientinfo:
            return self.clientinfo
        for received in self.get_all_headers('Received'):
            match = self.RECEIVED_CLIENT_RE.match(received)
            if match:
                helo, rdns, ip = match.group(1), match.group(2).strip() or 'unknown', match.group(3)
                return helo, ip, rdns
        return None

    def log_format(self, template):
        return apply_template(template, self, self.log_values(template))

    # the extra variables of logtemplate; each computed only when the template uses it
    LOG_VALUES = {
        'size': lambda s: s.size,
        'spam': lambda s: 'yes' if s.is_spam() else 'no',
        'highspam': lambda s: 'yes' if s.is_highspam() else 'no',
        'blocked': lambda s: 'yes' if s.is_blocked() else 'no',
        'virus': lambda s: 'yes' if s.is_virus() else 'no',
        'modified': lambda s: 'yes' if s.is_modified() else 'no',
        'decision': lambda s: actioncode_to_string(s.tags['decisions'][-1][1]) if s.tags.get('decisions')
        else 'DUNNO',
        'tags': lambda s: s.short_tags(),
        'fulltags': lambda s: str(s.tags),
    }

    def log_values(self, template=None):
        """The logtemplate variables (only those ``template`` names, if given)."""
        names = self.LOG_VALUES
        if template is not None:
            used = {(m.group(2) or m.group(3) or '').lower() for m in TEMPLATE_RE.finditer(template)}
            names = [name for name in self.LOG_VALUES if name in used]
        return {name: self.LOG_VALUES[name](self) for name in names}

    def short_tags(self):
        shown = {}
        for key, value in self.tags.items():
            if key in ('decisions', 'scantimes', 'debugfile'):
                continue
            if key.endswith('.spamscore') and isinstance(value, (int, float)):
                value = '%.2f' % value
            shown[key] = str(value)[:100]
        return shown

    def __str__(self):
        return 'Suspect %s: from=%s to=%s size=%s spam=%s blocked=%s virus=%s modified=%s ' \
               'decision=%s tags=%s' % (
                   self.id, self.from_address, self.to_address, self.size, self.is_spam(),
                   self.is_blocked(), self.is_virus(), self.is_modified(),
                   self.log_values()['decision'], self.short_tags())


###############################################################################
# SuspectFilter: FuGlu rule files
###############################################################################

class LimitExceeded(Exception):
    """A bound on the work done for sender-controlled input was hit. The message is a
    problem: a scanner that raises this gets its ``problemaction`` (default DEFER), it
    is never taken as a clean result."""


class RuleTimeLimitExceeded(LimitExceeded):
    """A SuspectFilter rule's regex did not finish in SuspectFilter.MATCH_TIME_LIMIT."""


def search_within(regex, text, deadline):
    """regex.search(text) is not None, given up at the time.monotonic() ``deadline``
    (RuleTimeLimitExceeded). Python's re cannot be interrupted and keeps the GIL, so a
    long text is searched in a forked child that is killed when time is up; short
    texts (SuspectFilter.INLINE_SIZE) are searched here, where even a quadratic
    pattern costs milliseconds, and the deadline is checked between them."""
    if time.monotonic() >= deadline:
        raise RuleTimeLimitExceeded('no time left')
    if len(text) <= SuspectFilter.INLINE_SIZE or not hasattr(os, 'fork'):
        return regex.search(text) is not None
    # 3.12+ warns about fork() in a threaded process; the child only runs the regex
    # (an identical filter replaces the earlier one: this does not pile up)
    import warnings
    warnings.filterwarnings('ignore', message=r'.*use of fork\(\) may lead to deadlocks',
                            category=DeprecationWarning)
    import select
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: search, answer one byte, leave without any cleanup
        try:
            # hold no client or listening socket open while searching (a closed
            # connection would otherwise only end when the child does)
            try:
                descriptors = [int(name) for name in os.listdir('/proc/self/fd')]
            except OSError:
                descriptors = []
            for descriptor in descriptors:
                if descriptor > 2 and descriptor != write_end:
                    try:
                        os.close(descriptor)
                    except OSError:
                        pass
            os.write(write_end, b'1' if regex.search(text) is not None else b'0')
        finally:
            os._exit(0)
    os.close(write_end)
    answer = b''
    try:
        poller = select.poll()   # not select(): descriptors may be above FD_SETSIZE
        poller.register(read_end, select.POLLIN)
        if poller.poll(max(deadline - time.monotonic(), 0) * 1000):
            answer = os.read(read_end, 1)
    finally:
        os.close(read_end)
        if not answer:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    if not answer:
        raise RuleTimeLimitExceeded('the regex did not finish in time')
    return answer == b'1'


class FilterRule(object):
    __slots__ = ('field', 'regex', 'compare', 'number', 'args', 'lineno', 'text')

    def __init__(self, field, regex=None, compare=None, number=None, args=None, lineno=0, text=''):
        self.field, self.regex, self.compare, self.number = field, regex, compare, number
        self.args, self.lineno, self.text = args, lineno, text

    def test(self, value, deadline=None):
        """True if the rule matches ``value``; with a ``deadline`` (time.monotonic())
        the regex search is bounded in time (RuleTimeLimitExceeded)."""
        if self.regex is not None:
            if deadline is None:
                return self.regex.search(force_uString(value)) is not None
            return search_within(self.regex, force_uString(value), deadline)
        try:
            number = float(value)
        except (TypeError, ValueError):
            return False
        return COMPARATORS[self.compare](number, self.number)


COMPARATORS = {
    '<': lambda a, b: a < b, '<=': lambda a, b: a <= b, '=': lambda a, b: a == b,
    '==': lambda a, b: a == b, '!=': lambda a, b: a != b, '<>': lambda a, b: a != b,
    '>': lambda a, b: a > b, '>=': lambda a, b: a >= b,
}
NUMERIC_RULE_RE = re.compile(r'^(<=|>=|==|!=|<>|<|>|=)(-?\d+(?:\.\d+)?)$')
SLASH_RULE_RE = re.compile(r'^(\S+?):?\s+/((?:[^/\\]|\\.)*)/([im]*)(?:\s+(.*))?$')


class SuspectFilter(object):
    """A rule file of lines `field regex [args]` (spec 6.1), matched against messages.
    One parser for every plugin that reads rules.

    Methods: matches(suspect) -> (True, args of the first matching rule) or (False,
    None); get_args(suspect) -> args of all matching rules; lint() -> bool.
    The file is re-read when it changes (checked at most every 5 seconds).

    Time bound: the rules' regexes get MATCH_TIME_LIMIT seconds together per call of
    matches()/get_args(), whatever the fields hold (a rule like ``body .*word`` is
    quadratic in the body's length). Values are never cut short, since a rule that
    stops matching past a size can let a message through. When time is up the call
    raises RuleTimeLimitExceeded (a LimitExceeded): logged with the rule, and a
    scanner gets its problemaction. FuGlu 1.7.0 has no such bound.
    """

    RELOAD_CHECK_INTERVAL = 5
    MATCH_TIME_LIMIT = 10     # seconds per matches()/get_args() call
    INLINE_SIZE = 4096        # characters a value may have to be searched in-process

    def __init__(self, filename):
        self.filename = filename
        self.logger = logging.getLogger('fuglu.SuspectFilter')
        self.rules = []
        self.errors = []
        self._stamp = None
        self._last_check = 0
        self._lock = threading.Lock()
        self._load()

    # -- parsing --------------------------------------------------------------
    @classmethod
    def parse_line(cls, line, lineno=0):
        """One rule line -> FilterRule; ValueError when it fits no format."""
        text = line.strip()
        if text.startswith('{'):
            import json
            data = json.loads(text)
            field = data['field']
            if 'regex' in data:
                flags = cls._flags(data.get('flags', ''))
                return FilterRule(field, regex=re.compile(data['regex'], flags),
                                  args=data.get('args'), lineno=lineno, text=text)
            return FilterRule(field, compare=data['cmp'], number=float(data['num']),
                              args=data.get('args'), lineno=lineno, text=text)
        match = SLASH_RULE_RE.match(text)
        if match:
            field, pattern, flags, args = match.groups()
            pattern = pattern.replace('\\/', '/')
            return FilterRule(field.rstrip(':'), regex=re.compile(pattern, cls._flags(flags)),
                              args=args.strip() if args else None, lineno=lineno, text=text)
        parts = text.split(None, 2)
        if len(parts) < 2:
            raise ValueError('not a rule: %r' % text)
        field = parts[0].rstrip(':')
        args = parts[2].strip() if len(parts) > 2 else None
        numeric = NUMERIC_RULE_RE.match(parts[1])
        if numeric:
            return FilterRule(field, compare=numeric.group(1), number=float(numeric.group(2)),
                              args=args, lineno=lineno, text=text)
        return FilterRule(field, regex=re.compile(parts[1], re.IGNORECASE | re.DOTALL),
                          args=args, lineno=lineno, text=text)

    @staticmethod
    def _flags(flagstring):
        flags = 0
        if 'i' in (flagstring or ''):
            flags |= re.IGNORECASE
        if 'm' in (flagstring or ''):
            flags |= re.MULTILINE
        return flags

    def _load(self):
        rules, errors = [], []
        try:
            stamp = os.stat(self.filename).st_ctime
            with open(self.filename, encoding='utf-8', errors='replace') as handle:
                lines = handle.read().splitlines()
        except OSError as error:
            self.logger.error('cannot read rule file %s: %s', self.filename, error)
            self.rules, self.errors, self._stamp = [], ['cannot read %s: %s' % (self.filename, error)], None
            return
        for lineno, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith('#'):
                continue
            try:
                rules.append(self.parse_line(line, lineno))
            except (ValueError, KeyError, re.error) as error:
                message = '%s line %d: %s' % (self.filename, lineno, error)
                self.logger.error('skipping rule: %s', message)
                errors.append(message)
        self.rules, self.errors, self._stamp = rules, errors, stamp

    def _reload_if_changed(self):
        now = time.time()
        if now - self._last_check < self.RELOAD_CHECK_INTERVAL:
            return
        with self._lock:
            self._last_check = now
            try:
                stamp = os.stat(self.filename).st_ctime
            except OSError:
                stamp = None
            if stamp != self._stamp:
                self._load()

    def file_changed(self):
        try:
            return os.stat(self.filename).st_ctime != self._stamp
        except OSError:
            return self._stamp is not None

    # -- fields ---------------------------------------------------------------
    @staticmethod
    def field_values(suspect, field):
        """All values of a rule field for a message (spec 6.1)."""
        name = field.lower()
        if name in ('envelope_from', 'from_address'):
            return [suspect.from_address]
        if name in ('envelope_to', 'to_address'):
            return list(suspect.recipients)
        if name == 'from_domain':
            return [suspect.from_domain]
        if name == 'to_domain':
            return [suspect.to_domain]
        if name in ('clientip', 'clienthostname', 'clienthelo'):
            info = suspect.get_client_info()
            if not info:
                return []
            helo, ip, rdns = info
            return [{'clientip': ip, 'clienthostname': rdns, 'clienthelo': helo}[name]]
        if name.startswith('@'):
            return SuspectFilter._tag_values(suspect, field[1:])
        if name == 'body:full':
            return [force_uString(suspect.get_original_source())]
        if name in ('body', 'body:stripped', 'body:raw'):
            return SuspectFilter._body_values(suspect, stripped=(name != 'body:raw'))
        if name.startswith('mime:'):
            header = field[5:]
            values = []
            for part in suspect.get_message_rep().walk():
                values.extend(str(v) for v in part.get_all(header, []))
            return values
        if name.startswith('header:'):
            field = field[7:]
        if '*' in field:
            return [str(value) for key, value in suspect._parsed_headers().items()
                    if fnmatch.fnmatch(key.lower(), field.lower())]
        return suspect.get_all_headers(field)

    @staticmethod
    def _tag_values(suspect, tagname):
        if tagname.startswith('is_'):
            status = suspect.get_status()
            if tagname in status:
                return [str(status[tagname])]
        if tagname in suspect.tags:
            value = suspect.tags[tagname]
        else:
            value = suspect.tags
            for part in tagname.split('.'):
                if isinstance(value, dict) and part in value:
                    value = value[part]
                else:
                    return []
        if isinstance(value, (list, tuple, set)):
            return [str(v) for v in value]
        if isinstance(value, dict):
            return [str(v) for v in value.values()]
        return [str(value)]

    @staticmethod
    def _body_values(suspect, stripped):
        values = []
        for part in suspect.get_message_rep().walk():
            if part.get_content_maintype() != 'text':
                continue
            payload = part.get_payload(decode=True) or b''
            text = payload.decode(part.get_content_charset() or 'utf-8', 'replace')
            if stripped:
                if part.get_content_subtype() == 'html':
                    text = strip_html(text)
                text = text.replace('\r', ' ').replace('\n', ' ')
            values.append(text)
        return values

    # -- matching -------------------------------------------------------------
    def _matching(self, suspect, first_only):
        self._reload_if_changed()
        found = []
        deadline = time.monotonic() + self.MATCH_TIME_LIMIT
        for rule in self.rules:
            try:
                values = self.field_values(suspect, rule.field)
            except Exception as error:
                self.logger.warning('%s: rule %s line %d: %s', suspect.id, rule.field, rule.lineno, error)
                continue
            for value in values:
                try:
                    matched = value is not None and rule.test(value, deadline)
                except RuleTimeLimitExceeded as error:
                    self.log_time_limit(suspect, rule, value, error)
                    raise
                if matched:
                    suspect.debug('rule %s line %d matched %r (%s)' % (self.filename, rule.lineno,
                                                                        str(value)[:100], rule.text))
                    found.append(rule)
                    break
            if found and first_only:
                break
        return found

    def log_time_limit(self, suspect, rule, value, error):
        self.logger.error('%s: %s line %d (%s): no answer within %ss on a %d character %s value '
                          '(%s); the message is a problem, not a non-match', suspect.id,
                          self.filename, rule.lineno, rule.text[:100], self.MATCH_TIME_LIMIT,
                          len(force_uString(value)), rule.field, error)

    def matches(self, suspect, extended=False):
        found = self._matching(suspect, first_only=True)
        if not found:
            return (False, None)
        if extended:
            return True, found[0]
        return True, found[0].args

    def get_args(self, suspect, extended=False):
        return [rule if extended else rule.args for rule in self._matching(suspect, first_only=False)]

    def lint(self):
        if not os.path.exists(self.filename):
            print('rule file not found: %s' % self.filename)
            return False
        self._load()
        for error in self.errors:
            print('unparsable rule: %s' % error)
        return not self.errors


def strip_html(text):
    """Text content of an HTML document (tags, scripts and styles removed)."""
    from html.parser import HTMLParser

    class TextCollector(HTMLParser):
        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.parts, self.skip = [], 0

        def handle_starttag(self, tag, attrs):
            if tag in ('script', 'style'):
                self.skip += 1

        def handle_endtag(self, tag):
            if tag in ('script', 'style') and self.skip:
                self.skip -= 1

        def handle_data(self, data):
            if not self.skip:
                self.parts.append(data)
    collector = TextCollector()
    collector.feed(text)
    collector.close()
    return ' '.join(collector.parts)


###############################################################################
# Plugins: base classes and loader
###############################################################################

class BasicPlugin(object):
    """Base of every plugin.

    Contract for the daemon: ``__init__(config, section=None)``; ``lint()`` -> bool,
    printing human-readable diagnostics; ``shutdown()`` when the daemon stops.
    May be overridden: ``requiredvars`` (class attribute, option -> {'default':
    str, 'description': str, optional 'section', 'validator'}); ``lint()``;
    ``__str__`` (the friendly name used in lint and logs).
    Instance attributes: ``config`` (FuConfigParser), ``section`` (config section,
    default: the class name), ``logger`` (``fuglu.plugin.<Class>``).
    Plugin instances are shared by all worker threads: keep per-message state in the
    Suspect (tags), not in the plugin.
    """

    friendly_name = None
    ignored_options = ()   # regexes: FuGlu options of this plugin accepted without effect

    # Plugins declare `requiredvars` as a class attribute (ours) or assign it in their
    # __init__ after calling the base (FuGlu's habit): the property registers the
    # defaults with the config either way.
    def _get_requiredvars(self):
        return self.__dict__.get('_requiredvars', {})

    def _set_requiredvars(self, table):
        self.__dict__['_requiredvars'] = table
        if getattr(self, 'config', None) is not None and hasattr(self.config, 'set_defaults'):
            self.config.set_defaults(self.section, table)

    requiredvars = property(_get_requiredvars, _set_requiredvars)

    def __init__(self, config, section=None):
        self.config = config
        self.section = section or getattr(self, 'default_section', None) or self.__class__.__name__
        self.logger = logging.getLogger('fuglu.plugin.%s' % self.__class__.__name__)
        self._custom_section = section is not None
        if config is not None and hasattr(config, 'set_defaults'):
            config.set_defaults(self.section, self.requiredvars)

    def __str__(self):
        name = self.friendly_name or self.__class__.__name__
        if self._custom_section and self.section != self.__class__.__name__:
            return '%s(%s)' % (name, self.section)
        return name

    def _problemaction(self):
        if not self.config.has_option(self.section, 'problemaction'):
            return DEFER
        code = string_to_actioncode(self.config.get(self.section, 'problemaction'), self.config)
        return DEFER if code is None else code

    def check_config(self):
        """Every declared option readable and valid; unknown options are errors."""
        table = dict(self.requiredvars)
        table.setdefault('overrideaction', {'description': ''})
        table.setdefault('overridemessage', {'description': ''})
        errors = [e for e in check_options(self.config, self.section, table, self.ignored_options)
                  if not (e.startswith('Missing') and ('overrideaction' in e or 'overridemessage' in e))]
        for error in errors:
            print(error)
        return not errors

    def lint(self):
        return self.check_config()

    def shutdown(self):
        pass


class ScannerPlugin(BasicPlugin):
    """A scanner looks at a message and may decide about it.

    Override ``examine(suspect)``: return DUNNO/ACCEPT/DELETE/REJECT/DEFER, a tuple
    (action, message), or None (= DUNNO). Options ``overrideaction`` and
    ``overridemessage`` in the plugin's section replace its decision (dry runs).
    """

    def examine(self, suspect):
        return DUNNO

    def _blockreport(self, suspect, blockinfo, enginename=None):
        engine = enginename or str(self)
        suspect.tags['blocked'][engine] = True
        suspect.tags['%s.blocked' % engine] = blockinfo

    def _spamreport(self, suspect, is_spam, is_highspam, report, score, enginename=None):
        engine = enginename or str(self)
        suspect.tags['spam'][engine] = is_spam
        suspect.tags['highspam'][engine] = is_highspam
        suspect.tags['%s.report' % engine] = report
        suspect.tags['%s.score' % engine] = score


class PrependerPlugin(BasicPlugin):
    """Runs before the scanners. Override ``pluginlist(suspect, pluginlist)`` and/or
    ``appenderlist(suspect, appenderlist)``: return a new list to replace the scanners
    or appenders for this message, or None to keep them."""

    def pluginlist(self, suspect, pluginlist):
        return None

    def appenderlist(self, suspect, appenderlist):
        return None


class AppenderPlugin(BasicPlugin):
    """Runs after the message was delivered or refused (not when it was deferred).
    Override ``process(suspect, decision)``; the return value is ignored."""

    def process(self, suspect, decision):
        pass


# alias -> module.Class of the bundled plugins ([PluginAlias] in the config adds more)
PLUGIN_ALIASES = {
    'archive': 'fuglu_plugins.archive.ArchivePlugin',
    'attachment': 'fuglu_plugins.attachment.FiletypePlugin',
    'clamav': 'fuglu_plugins.clamav.ClamavPlugin',
    'spamassassin': 'fuglu_plugins.spamassassin.SAPlugin',
    'debug': 'fuglu_plugins.debug.MessageDebugger',
    'skip': 'fuglu_plugins.skip.PluginSkipper',
}

# FuGlu's own dotted names of the plugins we bundle, so an existing fuglu.conf that
# names them loads unchanged.
UPSTREAM_PLUGIN_NAMES = {
    'fuglu.plugins.archive.ArchivePlugin': PLUGIN_ALIASES['archive'],
    'fuglu.plugins.attachment.FiletypePlugin': PLUGIN_ALIASES['attachment'],
    'fuglu.plugins.clamav.ClamavPlugin': PLUGIN_ALIASES['clamav'],
    'fuglu.plugins.sa.SAPlugin': PLUGIN_ALIASES['spamassassin'],
    'fuglu.plugins.p_debug.MessageDebugger': PLUGIN_ALIASES['debug'],
    'fuglu.plugins.p_skipper.PluginSkipper': PLUGIN_ALIASES['skip'],
}

PLUGIN_ENTRY_RE = re.compile(r'^([A-Za-z0-9._-]+)(?:\(([A-Za-z0-9._-]+)\))?$')


class PluginLoadError(Exception):
    pass


def split_plugin_list(value):
    """'a, b(sec), c' -> [('a', None), ('b', 'sec'), ('c', None)]"""
    entries = []
    for item in parse_list(value):
        match = PLUGIN_ENTRY_RE.match(item)
        if not match:
            raise PluginLoadError('Invalid Plugin Syntax: %r' % item)
        entries.append((match.group(1), match.group(2)))
    return entries


def ensure_bundled_plugins_importable():
    """fuglu_plugins lives beside fuglu.py (or inside the pyz). `python3 -I` leaves the
    script's directory off sys.path, so add it, after everything else."""
    home = os.path.dirname(os.path.abspath(__file__))   # the .pyz itself when zipped
    if home not in sys.path:
        sys.path.append(home)


def add_plugin_dirs(config):
    """Put the configured plugindir entries in front of the module search path."""
    ensure_bundled_plugins_importable()
    for directory in config.getlist('main', 'plugindir'):
        if os.path.isdir(directory):
            if directory not in sys.path:
                sys.path.insert(0, directory)
        else:
            logging.getLogger('fuglu.main').warning('plugindir %s does not exist', directory)


def resolve_plugin_class(name, config):
    """Alias or dotted name -> class."""
    target = None
    if config.has_section('PluginAlias'):
        for alias, value in configparser.RawConfigParser.items(config, 'PluginAlias', raw=True):
            if alias.lower() == name.lower():
                target = value.strip()
    if target is None:
        target = PLUGIN_ALIASES.get(name.lower(), name)
    target = UPSTREAM_PLUGIN_NAMES.get(target, target)
    module_name, _, class_name = target.rpartition('.')
    if not module_name:
        raise PluginLoadError('%s is neither an alias nor a dotted module.Class name' % name)
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise PluginLoadError('cannot import %s for plugin %s: %s: %s'
                              % (module_name, name, error.__class__.__name__, error))
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise PluginLoadError('module %s has no class %s' % (module_name, class_name))


def load_plugins(config, option):
    """Instantiate the plugins listed in [main] ``option``; raises PluginLoadError."""
    plugins = []
    for name, section in split_plugin_list(config.get('main', option)):
        cls = resolve_plugin_class(name, config)
        try:
            plugin = cls(config, section=section) if section else cls(config)
        except TypeError as error:
            raise PluginLoadError('cannot create plugin %s: %s' % (name, error))
        except Exception as error:
            raise PluginLoadError('plugin %s failed to start: %s: %s'
                                  % (name, error.__class__.__name__, error))
        plugins.append(plugin)
    return plugins


def bundled_plugin_classes():
    """Classes of the bundled plugins that import (for --dump-defaults)."""
    ensure_bundled_plugins_importable()
    classes = []
    for alias in ('debug', 'skip', 'archive', 'attachment', 'clamav', 'spamassassin'):
        module_name, _, class_name = PLUGIN_ALIASES[alias].rpartition('.')
        try:
            classes.append(getattr(importlib.import_module(module_name), class_name))
        except Exception:
            continue
    return classes


###############################################################################
# Scan session
###############################################################################

class Statistics(object):
    """Process-wide counters (control command `stats`)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.starttime = time.time()
        self.incount = self.outcount = 0
        self.spamcount = self.viruscount = self.blockedcount = self.hamcount = 0
        self.scantimes = []

    def received(self):
        with self.lock:
            self.incount += 1

    def finished(self, suspect, delivered, scantime):
        with self.lock:
            if delivered:
                self.outcount += 1
            if suspect.is_spam():
                self.spamcount += 1
            if suspect.is_virus():
                self.viruscount += 1
            if suspect.is_blocked():
                self.blockedcount += 1
            if not suspect.is_spam() and not suspect.is_virus():
                self.hamcount += 1
            self.scantimes = (self.scantimes + [(time.time(), scantime)])[-100:]

    def report(self):
        with self.lock:
            recent = [t for stamp, t in self.scantimes if stamp > time.time() - 300]
            average = sum(recent) / len(recent) if recent else 0
            return '\n'.join([
                'Fuglu statistics', '---------------',
                'Uptime:\t\t%s' % format_duration(time.time() - self.starttime),
                'Avg scan time:\t%.4f' % average,
                'Total msgs:\t%d in:%d out:%d' % (self.incount, self.incount, self.outcount),
                'Ham:\t\t%d' % self.hamcount, 'Spam:\t\t%d' % self.spamcount,
                'Virus:\t\t%d' % self.viruscount, 'Block:\t\t%d' % self.blockedcount, ''])


def format_duration(seconds):
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    return '%d days, %d hours, %d minutes, %d seconds' % (days, hours, minutes, seconds)


class ScanSession(object):
    """Runs one message through the plugins (spec 5.1) and finishes it afterwards.

    For connectors: ``scan(suspect)`` -> (action, message) runs prependers, scanners,
    adds fuglu's headers and logs; ``reply_text(suspect, action, message)`` the text
    for a refusal; ``finish(suspect, action, delivered)`` updates counters, writes the
    trash copy and runs the appenders once the MTA has its answer.
    """

    def __init__(self, controller):
        self.controller = controller
        self.config = controller.config
        self.logger = logging.getLogger('fuglu.SessionHandler')

    def scan(self, suspect):
        controller = self.controller
        config = self.config
        controller.stats.received()
        if len(suspect.recipients) != 1:
            self.logger.debug('%s has %d recipients', suspect.id, len(suspect.recipients))
        scanners = list(controller.plugins)
        appenders = list(controller.appenders)
        suspect.tags['appenders'] = appenders
        for prepender in controller.prependers:
            if suspect.tags.get('skip_prependers'):
                break
            try:
                result = prepender.pluginlist(suspect, scanners)
                if result is not None:
                    self._log_list_change(suspect, prepender, 'scanners', scanners, result)
                    scanners = list(result)
                result = prepender.appenderlist(suspect, appenders)
                if result is not None:
                    self._log_list_change(suspect, prepender, 'appenders', appenders, result)
                    appenders = list(result)
                    suspect.tags['appenders'] = appenders
            except Exception as error:
                self._plugin_error(suspect, prepender, error)

        action, message = DUNNO, None
        scan_start = time.time()
        for plugin in scanners:
            started = time.time()
            try:
                result = plugin.examine(suspect)
            except LimitExceeded as error:   # a bound was hit: a problem, never a clean result
                self._plugin_error(suspect, plugin, error)
                result = (getattr(plugin, '_problemaction', lambda: DEFER)(),
                          'message too complex to check (%s)' % error.__class__.__name__)
            except Exception as error:
                self._plugin_error(suspect, plugin, error)
                continue
            code, text = result if isinstance(result, tuple) else (result, None)
            if code is None:
                code = DUNNO
            code, text = self._override(plugin, code, text, suspect)
            elapsed = time.time() - started
            suspect.tags['scantimes'].append((plugin.section, elapsed))
            suspect.tags['decisions'].append((plugin.section, code))
            suspect.debug('plugin %s: %s %s' % (plugin, actioncode_to_string(code), text or ''))
            if code == DUNNO:
                continue
            if code in (ACCEPT, DELETE, REJECT, DEFER):
                action, message = code, text
                if code == DELETE:
                    self.trash(suspect, plugin)
                break
            self.logger.error('%s: plugin %s returned an invalid action %r, treated as DUNNO',
                              suspect.id, plugin, code)
        suspect.tags['fuglu.scantime'] = '%.4f' % (time.time() - scan_start)
        self.add_headers(suspect)
        template = config.get('main', 'logtemplate')
        if template:
            self.logger.info(suspect.log_format(template))
        return action, message

    def _log_list_change(self, suspect, prepender, what, before, after):
        removed = [str(p) for p in before if p not in after]
        added = [str(p) for p in after if p not in before]
        if removed or added:
            self.logger.debug('%s: %s changed %s: removed %s added %s',
                              suspect.id, prepender, what, removed, added)

    def _override(self, plugin, code, text, suspect):
        section = plugin.section
        config = self.config
        if not (config.has_section(section) and
                configparser.RawConfigParser.has_option(config, section, 'overrideaction')):
            return code, text
        override = string_to_actioncode(config.get(section, 'overrideaction'), config)
        if override is None or override == code:
            return code, text
        new_text = config.get(section, 'overridemessage', fallback='').strip()
        new_text = apply_template(new_text, suspect) if new_text else text
        self.logger.warning('%s: plugin %s said %s, overridden to %s', suspect.id, plugin,
                            actioncode_to_string(code), actioncode_to_string(override))
        return override, new_text

    def _plugin_error(self, suspect, plugin, error):
        trace = traceback.format_exc()
        self.logger.error('%s: plugin %s failed: %s: %s', suspect.id, plugin,
                          error.__class__.__name__, error)
        self.logger.debug(trace)
        suspect.tags['processingerrors'].append('plugin %s: %s: %s' % (plugin, error.__class__.__name__, error))
        self.controller.record_exception(trace)

    def add_headers(self, suspect):
        config = self.config
        prefix = config.get('main', 'prependaddedheaders')
        if config.getboolean('main', 'spamstatusheader'):
            suspect.add_header(prefix + 'Spamstatus', 'YES' if suspect.is_spam() else 'NO')
        if config.getboolean('main', 'debuginfoheader'):
            suspect.add_header(prefix + 'Debuginfo', str(suspect))
        if config.getboolean('main', 'suspectidheader'):
            suspect.add_header(prefix + 'Suspect', suspect.id)

    def trash(self, suspect, plugin):
        trashdir = self.config.get('main', 'trashdir').strip()
        if not trashdir:
            return
        try:
            os.makedirs(trashdir, exist_ok=True)
            import tempfile
            handle, path = tempfile.mkstemp(prefix=suspect.id, dir=trashdir)
            with os.fdopen(handle, 'wb') as out:
                out.write(suspect.get_source())
            if self.config.getboolean('main', 'trashlog'):
                with open(os.path.join(trashdir, '00-fuglutrash.log'), 'a') as log:
                    log.write('%s %s %s %s %s\n' % (
                        time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()), suspect.from_address or '<>',
                        suspect.to_address, plugin, path))
        except OSError as error:
            self.logger.error('%s: could not write trash copy: %s', suspect.id, error)

    def reply_text(self, suspect, action, message):
        """Text of a DELETE/REJECT/DEFER reply: the plugin's message (a template) or
        the default, with the id appended when suspectidreturn is on."""
        defaults = {DELETE: 'OK', REJECT: 'Rejected by content scanner', DEFER: 'Try again later'}
        # a plugin may return a template: its ${...} are filled here
        text = apply_template(message, suspect) if message else defaults.get(action, '')
        if self.config.getboolean('main', 'suspectidreturn') and suspect.id not in text:
            text = '%s (%s)' % (text, suspect.id)
        return one_line(text)

    def finish(self, suspect, action, delivered):
        """After the MTA has its answer: counters, appenders (not for deferred mail)."""
        if action == DEFER or (action in (DUNNO, ACCEPT) and not delivered):
            self.logger.info('DEFERRED %s', suspect.id)
            return
        if action == DELETE:
            self.logger.info('MESSAGE DELETED: %s', suspect.id)
        scantime = float(suspect.tags.get('fuglu.scantime', 0))
        self.controller.stats.finished(suspect, delivered, scantime)
        if suspect.tags.get('noappenders'):
            return
        for appender in suspect.tags.get('appenders', self.controller.appenders):
            try:
                appender.process(suspect, action)
            except Exception as error:
                self._plugin_error(suspect, appender, error)


###############################################################################
# SMTP machinery shared by the connectors
###############################################################################
# One buffered reader (command lines and DATA), one server session base that the smtp
# and esmtp connectors specialise, and one SMTP client (re-injection, proxying,
# bounces).

CRLF = b'\r\n'
DATA_END = b'\r\n.\r\n'
READ_SIZE = 65536
DATA_READ_SIZE = 262144


class ConnectionClosed(Exception):
    """The peer went away (EOF, reset, timeout)."""


def set_socket_timeout(sock, seconds):
    """Blocking socket with kernel receive/send timeouts. Python's own socket timeouts
    poll() before every recv and send; these cost nothing until they fire (then the
    call fails with EAGAIN, an OSError). On Linux the send timeout bounds connect() too."""
    if sock.gettimeout() is not None:
        sock.settimeout(None)
    seconds = max(float(seconds), 0.001)
    timeval = struct.pack('ll', int(seconds), int((seconds % 1) * 1000000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


class DeadlineExpired(ConnectionClosed):
    """A read did not finish before its deadline (a session's max_session_time, or the
    time allowed for one downstream reply)."""


class ReadDeadline(object):
    """Bounds the reads of one socket by an absolute time.monotonic() ``deadline`` on
    top of the socket's own per-read timeout (``idle``, seconds; None: the deadline
    alone). A peer trickling a byte now and then keeps each read alive, never the
    whole. The kernel timeout is only touched when it must change by more than a
    second, so reads cost no extra system calls until the deadline comes near."""

    def __init__(self, sock, deadline=None, idle=None):
        self.sock = sock
        self.deadline = deadline
        self.idle = idle
        self.armed = idle   # the kernel timeout set on the socket now, if known

    def check(self, grace=0):
        """Before each read: DeadlineExpired when the time is up (or up within
        ``grace`` seconds: after a kernel timeout, which may fire a little early), else
        the socket timeout cut to what is left."""
        if self.deadline is None:
            return
        left = self.deadline - time.monotonic()
        if left <= grace:
            raise DeadlineExpired('deadline')
        wanted = min(self.idle, left) if self.idle else left
        if self.armed is None or abs(wanted - self.armed) > 1:
            set_socket_timeout(self.sock, wanted)
            self.armed = wanted


def is_timeout(error):
    """A read or send that failed because a kernel or Python socket timeout fired."""
    return isinstance(error, (socket.timeout, BlockingIOError))


def connect_service(host, port, timeout, keepalive=False):
    """A socket to a scanner daemon, as FuGlu's host/port options describe it: ``port``
    is a TCP port number on ``host`` (which may be a $ENV marker) or else the path of a
    unix socket. Python socket timeouts apply. Raises OSError."""
    port = str(port).strip()
    if port.isdigit():
        connection = socket.create_connection((resolve_env_marker(host.strip()), int(port)), timeout)
        if keepalive:
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return connection
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.settimeout(timeout)
        connection.connect(port)
    except OSError:
        connection.close()
        raise
    return connection


def recv_until(connection, deadline, terminator=None, timeout_message='no complete reply in time'):
    """A scanner daemon's reply: bytes until EOF or, with ``terminator``, until the data
    ends with it; gives up at the time.monotonic() ``deadline`` (the socket timeout is
    set to the time left before every recv). Raises socket.timeout(timeout_message)."""
    data = bytearray()
    while terminator is None or not data.endswith(terminator):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout(timeout_message)
        connection.settimeout(remaining)
        chunk = connection.recv(READ_SIZE)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def read_until_eof(sock, limit=None, drain=False, deadline=None, idle=None):
    """Bytes until the peer half-closes: (data, over_limit). Past ``limit`` bytes it
    stops and returns what came, or with ``drain`` reads on to EOF, dropping it all
    (so a reply can still be sent), and returns (b'', True). Socket errors propagate;
    past the time.monotonic() ``deadline`` it raises DeadlineExpired (``idle``: the
    socket's per-read timeout)."""
    chunks, total = [], 0
    clock = ReadDeadline(sock, deadline, idle)
    while True:
        clock.check()
        try:
            chunk = sock.recv(READ_SIZE)
        except OSError as error:
            if is_timeout(error):
                clock.check(grace=1.5)   # a timeout cut to the deadline: DeadlineExpired
            raise
        if not chunk:
            break
        total += len(chunk)
        if chunks is not None:
            chunks.append(chunk)
        if limit and total > limit:
            if not drain:
                break
            chunks = None
    if chunks is None:
        return b'', True
    return b''.join(chunks), bool(limit and total > limit)


def service_address(host, port):
    """'host:port', or the unix socket path, for messages about a scanner daemon."""
    port = str(port).strip()
    return '%s:%s' % (resolve_env_marker(host.strip()), port) if port.isdigit() else port


def connect_tcp(host, port, timeout):
    """A connected TCP socket with kernel timeouts. IP literals skip getaddrinfo."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        candidates = [(family, (host, port))]
    except ValueError:
        candidates = [(info[0], info[4]) for info in
                      socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)]
    error = None
    for family, address in candidates:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            set_socket_timeout(sock, timeout)
            sock.connect(address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as exc:
            error = exc
            sock.close()
    raise error or OSError('no address for %s' % host)


class LineTooLong(Exception):
    pass


class SocketReader(object):
    """Buffered reading from a socket: lines (CRLF or LF), and SMTP DATA up to
    CRLF.CRLF with dot-unstuffing per line (RFC 5321 4.5.2). ``clock`` (a
    ReadDeadline) bounds the reads in time."""

    def __init__(self, sock, deadline=None, idle=None):
        self.sock = sock
        self.buffer = bytearray()
        self.clock = ReadDeadline(sock, deadline, idle)

    def has_line(self):
        return b'\n' in self.buffer

    def _fill(self, size=READ_SIZE):
        self.clock.check()
        try:
            chunk = self.sock.recv(size)
        except OSError as error:
            if not is_timeout(error):
                raise ConnectionClosed(str(error))
            self.clock.check(grace=1.5)   # a timeout cut to the deadline: DeadlineExpired
            raise ConnectionClosed('timeout')
        if not chunk:
            raise ConnectionClosed('EOF')
        self.buffer += chunk

    def readline(self, limit):
        """The next line including its line end. A line longer than ``limit`` is read
        to its end and raises LineTooLong."""
        start = 0
        while True:
            end = self.buffer.find(b'\n', start)
            if end >= 0:
                line = bytes(self.buffer[:end + 1])
                del self.buffer[:end + 1]
                if len(line) > limit:
                    raise LineTooLong(len(line))
                return line
            start = len(self.buffer)
            if start > limit:
                self._discard_line()
                raise LineTooLong(start)
            self._fill()

    def _discard_line(self):
        while True:
            end = self.buffer.find(b'\n')
            if end >= 0:
                del self.buffer[:end + 1]
                return
            self.buffer.clear()
            self._fill()

    def read_data(self, max_size, line_limit):
        """Message bytes after DATA, unstuffed, terminator removed.
        Returns (data, None) or (None, problem) where problem is 'size' or 'line' after
        the rest of the data was read and thrown away. Raises ConnectionClosed when
        the peer leaves before CRLF.CRLF. Only CRLF.CRLF ends the data: LF.LF,
        CR.CR and friends are message content (no SMTP smuggling)."""
        buffer = self.buffer
        problem = None
        # The terminator is CRLF.CRLF where the CRLF ends the previous line, or
        # ".\r\n" right at the start (empty message).
        search_from = 0
        line_start = 0
        discarded = 0
        at_data_start = True
        while True:
            if at_data_start:
                if buffer.startswith(b'.\r\n'):
                    del buffer[:3]
                    return b'', None
                if len(buffer) < 3 and b'.\r\n'.startswith(bytes(buffer)):
                    self._fill(DATA_READ_SIZE)   # it may still become the terminator
                    continue
                at_data_start = False
            end = buffer.find(DATA_END, search_from)
            if end >= 0:
                with memoryview(buffer) as view:   # one copy, not two
                    raw = bytes(view[:end + 2])
                del buffer[:end + 5]
                break
            if problem is None:
                last = buffer.rfind(CRLF, max(search_from - 1, 0))
                if last >= 0:
                    line_start = last + 2
                if line_limit and len(buffer) - line_start > line_limit:
                    problem = 'line'
                elif max_size and len(buffer) > max_size + max_size // 100 + 1024:
                    problem = 'size'
            if problem is not None and len(buffer) > 8:
                # keep reading to the terminator, but not storing
                discarded += len(buffer) - 4
                del buffer[:-4]
                line_start = 0
            search_from = max(len(buffer) - 4, 0)
            self._fill(DATA_READ_SIZE)
        if problem is None and line_limit and len(raw) > line_limit and \
                max(map(len, raw.split(CRLF))) > line_limit:
            problem = 'line'   # the reads above only check the line still open after each
        if problem is not None:
            return None, problem
        if raw.startswith(b'.') or b'\r\n.' in raw:
            raw = (CRLF + raw).replace(b'\r\n.', CRLF)[2:]
        if max_size and len(raw) > max_size:
            return None, 'size'
        return raw, None


def dot_stuff_parts(parts):
    """Message parts (joined, they are the message) -> the parts to send after DATA,
    terminator included. Without lines to stuff (the usual case) the parts are sent
    as they are, without copying the message."""
    parts = [part for part in parts if part]
    if any(part.startswith(b'.') or b'\n.' in part for part in parts):
        message = (CRLF + b''.join(parts)).replace(b'\n.', b'\n..')[2:]
        parts = [message]
    if not parts or not parts[-1].endswith(CRLF):
        parts.append(CRLF)
    parts.append(b'.\r\n')
    return parts


class SMTPError(Exception):
    """A negative SMTP reply (from downstream) or a connection problem, carried as the
    reply fuglu should give its own client."""

    def __init__(self, code, text, temporary_connection_problem=False):
        super().__init__('%s %s' % (code, text))
        self.code = code
        self.text = text
        self.connection_problem = temporary_connection_problem


MAX_REPLY_LINES = 1000


def read_reply(reader):
    """(code, [text lines]) of one possibly multi-line SMTP reply. Control characters
    in the text become spaces (it may be passed on to fuglu's own client)."""
    lines = []
    while True:
        line = reader.readline(65536).rstrip(b'\r\n')
        if len(line) < 3 or not line[:3].isdigit() or len(lines) >= MAX_REPLY_LINES:
            raise SMTPError(451, '4.3.0 unparsable reply from downstream: %r' % line[:80], True)
        lines.append(CONTROL_CHARACTER_RE.sub(' ', line[4:].decode('utf-8', 'replace')))
        if len(line) == 3 or line[3:4] != b'-':
            return int(line[:3]), lines


class SMTPClient(object):
    """One SMTP connection to a downstream server: re-injection, the esmtp proxy and
    bounces use it. Every failure is raised as SMTPError with the reply fuglu should
    pass on (connection trouble -> 451).

    Time limits (seconds): ``connect_timeout`` for the TCP connection, ``timeout`` for
    the greeting and each reply (and each send), ``data_timeout`` for the reply after
    the message data. ``deadline`` (time.monotonic(), set by the caller for a task
    such as one delivery) cuts all of them short. A reply that does not come in time
    is a 451 connection problem."""

    def __init__(self, host, port, helo, timeout=300, retries=0, connect_timeout=None,
                 data_timeout=None):
        self.host, self.port, self.helo = host, int(port), helo
        self.timeout = timeout
        self.connect_timeout = connect_timeout or timeout
        self.data_timeout = data_timeout or timeout
        self.deadline = None
        self.retries = retries
        self.sock = None
        self.reader = None
        self.extensions = {}   # EHLO keyword (upper) -> parameter string

    @classmethod
    def from_config(cls, config, host, port, helo, retries=0):
        """A client with the [main] downstream_* time limits."""
        return cls(host, port, helo, retries=retries,
                   timeout=config.getint('main', 'downstream_reply_timeout'),
                   connect_timeout=config.getint('main', 'downstream_connect_timeout'),
                   data_timeout=config.getint('main', 'downstream_data_timeout'))

    def connect(self):
        last_error = None
        for attempt in range(max(self.retries, 0) + 1):
            if attempt:
                time.sleep(0.1)
            connect_timeout = self.connect_timeout
            if self.deadline is not None:
                connect_timeout = min(connect_timeout, self.deadline - time.monotonic())
                if connect_timeout <= 0:
                    last_error = 'timeout'
                    break
            try:
                self.sock = connect_tcp(self.host, self.port, connect_timeout)
                break
            except OSError as error:
                last_error = 'timeout' if is_timeout(error) else error
        if self.sock is None:
            raise SMTPError(451, '4.4.1 downstream %s:%s unavailable: %s' % (self.host, self.port, last_error),
                            True)
        self.reader = SocketReader(self.sock, idle=connect_timeout)
        self.outgoing = []
        code, lines = self._reply()
        if code != 220:
            self.close()
            raise SMTPError(code if code >= 400 else 451, ' '.join(lines))
        return code, lines

    def queue(self, line):
        """Send a command later, together with the next ones (RFC 2920); its reply is
        read with read()."""
        self.outgoing.append(force_bString(line, errors="surrogateescape") + CRLF)

    def read(self):
        """Send what is queued, then read one reply."""
        if self.outgoing:
            data, self.outgoing = b''.join(self.outgoing), []
            self._send(data)
        return self._reply()

    def _reply(self, timeout=None):
        if self.sock is None:
            raise SMTPError(451, '4.4.2 downstream %s:%s connection lost' % (self.host, self.port), True)
        timeout = timeout or self.timeout
        clock = self.reader.clock
        clock.idle = timeout
        clock.deadline = time.monotonic() + timeout
        if self.deadline is not None:
            clock.deadline = min(clock.deadline, self.deadline)
        try:
            return read_reply(self.reader)
        except DeadlineExpired:
            self.close()
            raise SMTPError(451, '4.4.2 downstream %s:%s did not answer in time'
                            % (self.host, self.port), True)
        except ConnectionClosed as error:
            self.close()
            raise SMTPError(451, '4.4.2 downstream %s:%s connection lost: %s' % (self.host, self.port, error),
                            True)
        except LineTooLong:
            self.close()
            raise SMTPError(451, '4.4.2 downstream reply line too long', True)

    def _send(self, data):
        if self.sock is None:   # closed after an earlier failure
            raise SMTPError(451, '4.4.2 downstream %s:%s connection lost' % (self.host, self.port), True)
        try:
            self.sock.sendall(data)
        except OSError as error:
            self.close()
            raise SMTPError(451, '4.4.2 downstream %s:%s connection lost: %s' % (self.host, self.port, error),
                            True)

    def command(self, line):
        """Send one command line (str or bytes, without CRLF) and read its reply."""
        self._send(force_bString(line, errors="surrogateescape") + CRLF)
        return self._reply()

    def commands(self, lines):
        """Pipelined (RFC 2920) when the server offers it: all lines, then all replies."""
        if 'PIPELINING' not in self.extensions:
            return [self.command(line) for line in lines]
        self._send(b''.join(force_bString(line, errors="surrogateescape") + CRLF for line in lines))
        return [self._reply() for _ in lines]

    def ehlo(self):
        """EHLO (HELO when EHLO is refused); returns the accepted (code, lines)."""
        code, lines = self.command('EHLO ' + self.helo)
        if code != 250:
            code, lines = self.command('HELO ' + self.helo)
            if code != 250:
                raise SMTPError(code, ' '.join(lines))
            self.extensions = {}
            return code, lines
        self.extensions = {}
        for line in lines[1:]:
            keyword, _, params = line.partition(' ')
            if ESMTP_KEYWORD_RE.match(keyword):   # 'CHUNK\u0131NG'.upper() is not CHUNKING
                self.extensions[keyword.upper()] = params
        return code, lines

    def xforward(self, attributes):
        """Send the attributes the server accepts (XFORWARD_README), in lines < 512."""
        for line in self.xforward_lines(attributes):
            code, text = self.command(line)
            if code != 250:
                raise SMTPError(code, ' '.join(text))

    def xforward_lines(self, attributes):
        offered = {name.upper() for name in self.extensions.get('XFORWARD', '').split()
                   if name.isascii()}
        items = ['%s=%s' % (name, value) for name, value in attributes.items() if name in offered]
        line = 'XFORWARD'
        lines = []
        for item in items:
            if len(line) + len(item) + 1 > 500:
                lines.append(line)
                line = 'XFORWARD'
            line += ' ' + item
        if line != 'XFORWARD':
            lines.append(line)
        return lines

    def data(self, message, chunking=False):
        """Send the message (bytes, or a list of parts); returns (code, text) of the
        final reply. With ``chunking`` and a server offering CHUNKING (RFC 3030) it
        goes as one BDAT LAST chunk: no waiting for 354, no dot-stuffing; else DATA."""
        parts = message if isinstance(message, list) else [message]
        if chunking and 'CHUNKING' in self.extensions:
            size = sum(len(part) for part in parts)
            self._send_parts([('BDAT %d LAST\r\n' % size).encode('ascii')] + parts)
            code, lines = self._reply(self.data_timeout)
            return code, ' '.join(lines)
        code, lines = self.command('DATA')
        if code != 354:
            return code, ' '.join(lines)
        self._send_parts(dot_stuff_parts(message if isinstance(message, list) else [message]))
        code, lines = self._reply(self.data_timeout)
        return code, ' '.join(lines)

    def _send_parts(self, parts):
        """sendall for a list of buffers, gathered by sendmsg (no joining copy). Empty
        parts are left out: sendmsg() of nothing but them sends 0 bytes for ever."""
        views = [memoryview(part) for part in parts if len(part)]
        try:
            while views:
                if self.deadline is not None and time.monotonic() > self.deadline:
                    raise socket.timeout('deadline')
                sent = self.sock.sendmsg(views[:64])
                while sent:
                    if sent >= len(views[0]):
                        sent -= len(views.pop(0))
                    else:
                        views[0] = views[0][sent:]
                        sent = 0
        except OSError as error:
            self.close()
            raise SMTPError(451, '4.4.2 downstream %s:%s connection lost: %s' % (self.host, self.port, error),
                            True)

    def rset(self):
        try:
            self.command('RSET')
        except SMTPError:
            self.close()

    def quit(self):
        if self.sock is None:
            return
        try:
            self._send(b'QUIT\r\n')
            self._reply()
        except SMTPError:
            pass
        self.close()

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None

    @property
    def connected(self):
        return self.sock is not None


class DownstreamPool(object):
    """Idle, greeted downstream connections kept for the next session (what Postfix's
    own SMTP connection cache does): a message then costs no connect, greeting, EHLO
    or QUIT. A connection is used again only while it is fresh (``max_idle`` seconds)
    and still quiet: a server that closed it, or said anything, makes it unusable."""

    def __init__(self, limit=50, max_idle=5.0):
        self.limit = limit
        self.max_idle = max_idle
        self.lock = threading.Lock()
        self.idle = []   # (time parked, client), newest last

    def take(self, host, port):
        while True:
            with self.lock:
                for index in range(len(self.idle) - 1, -1, -1):
                    parked, client = self.idle[index]
                    if (client.host, client.port) == (host, port):
                        del self.idle[index]
                        break
                else:
                    return None
            if time.time() - parked <= self.max_idle and self.quiet(client):
                return client
            client.close()

    @staticmethod
    def quiet(client):
        """Still open, and nothing unread (a server that closed or spoke is not used)."""
        if not client.connected:
            return False
        try:
            client.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    def park(self, client):
        with self.lock:
            if len(self.idle) < self.limit and client.connected:
                self.idle.append((time.time(), client))
                return
        client.quit()

    def purge(self, everything=False):
        """QUIT connections idle too long (all of them when shutting down)."""
        now = time.time()
        with self.lock:
            stale = [client for parked, client in self.idle if everything or now - parked > self.max_idle]
            self.idle = [(parked, client) for parked, client in self.idle if client not in stale]
        for client in stale:
            client.quit()


_helo_name = None


def outgoing_helo(config):
    """EHLO name for re-injection and bounces: outgoinghelo, else this host's name
    (no DNS lookup)."""
    configured = resolve_env_marker(config.get('main', 'outgoinghelo').strip())
    if configured:
        return configured.lower()
    global _helo_name
    if _helo_name is None:
        _helo_name = socket.gethostname().lower() or 'localhost'
    return _helo_name


def outgoing_target(config, peer_ip=None, bounce=False):
    host = config.get('main', 'bouncehost').strip() if bounce else ''
    host = host or config.get('main', 'outgoinghost').strip()
    if host == '${injecthost}':
        host = peer_ip or '127.0.0.1'
    else:
        host = resolve_env_marker(host)
    port = config.get('main', 'bounceport').strip() if bounce else ''
    port = int(port) if port and port != '0' else config.getint('main', 'outgoingport')
    return host, port


QUEUE_ID_RE = re.compile(r'(?:queued as|ok, queued as)\s+([A-Za-z0-9]{6,20})', re.IGNORECASE)


def record_inject_result(suspect, code, text):
    suspect.tags['injectcode'] = code
    suspect.tags['injectanswer'] = text
    suspect.tags['injectmessage'] = text
    match = QUEUE_ID_RE.search(text or '')
    if match:
        suspect.tags['injectqueueid'] = match.group(1)


def send_bounce(config, suspect, recipient, message_bytes):
    """Deliver a generated message (a bounce) with the null sender to
    bouncehost:bounceport. Returns the downstream queue id, or None when bounces are
    off for this message or recipient. Raises SMTPError on delivery failure."""
    logger = logging.getLogger('fuglu.bouncer')
    if suspect is not None and suspect.tags.get('nobounce'):
        logger.info('%s: no bounce (tag nobounce)', suspect.id)
        return None
    if config.getboolean('main', 'disablebounces'):
        logger.info('%s: no bounce (disablebounces)', suspect.id if suspect else '-')
        return None
    domain = split_address(recipient)[1].lower()
    nobouncefile = config.get('main', 'nobouncefile')
    try:
        with open(nobouncefile) as handle:
            if domain in {line.strip().lower() for line in handle if line.strip() and not line.startswith('#')}:
                logger.info('no bounce to %s (listed in %s)', recipient, nobouncefile)
                return None
    except OSError:
        pass
    host, port = outgoing_target(config, bounce=True)
    client = SMTPClient.from_config(config, host, port, outgoing_helo(config))
    client.connect()
    try:
        client.ehlo()
        for line, expected in (('MAIL FROM:<>', 250), ('RCPT TO:<%s>' % recipient, 250)):
            code, text = client.command(line)
            if code != expected:
                raise SMTPError(code, ' '.join(text))
        code, text = client.data(message_bytes)
        if code != 250:
            raise SMTPError(code, text)
    finally:
        client.quit()
    match = QUEUE_ID_RE.search(text)
    logger.info('%s: bounce sent to %s: %s', suspect.id if suspect else '-', recipient, text)
    return match.group(1) if match else None


# Envelope address checks (spec 5.4)
def address_is_valid(address, checker='Default', maxsize=64):
    if checker == 'NoCheck':
        return True
    if address.lower() == 'postmaster':
        return True
    local, sep, domain = address.rpartition('@')
    if checker in ('AsciiOnly', 'PrintableAsciiOnly'):
        allowed = (lambda c: 32 < ord(c) < 127) if checker == 'PrintableAsciiOnly' else (lambda c: ord(c) < 128)
        if not all(allowed(c) for c in address):
            return False
        if '@' in local and not (local.startswith('"') and local.endswith('"')):
            return False
        return bool(sep and local and domain) and len(local) <= maxsize
    if not sep or not domain or not local or len(local) > 64:
        return False
    if '@' in local:
        return checker == 'LazyLocalPart' and local.startswith('"') and local.endswith('"')
    bare = local.strip('"')
    return not (bare.startswith('.') or bare.endswith('.'))


MAIL_PATH_RE = re.compile(r'^[ \t]*<([^<>]*)>[ \t]*(.*)$')

# Client text is matched with ASCII-only patterns: str.isdigit(), isalpha() and upper()
# know Unicode ('\u00b2'.isdigit() is True, int() of it fails; '\u0131'.upper() == 'I',
# so 'MA\u0131L' would pass for MAIL).
SMTP_VERB_RE = re.compile(r'[A-Za-z]{1,16}\Z')
ESMTP_KEYWORD_RE = re.compile(r'[A-Za-z0-9][A-Za-z0-9-]{0,63}\Z')   # RFC 5321 4.1.2
ASCII_NUMBER_RE = re.compile(r'[0-9]+\Z')
# C0 controls and DEL: bare CR, LF, NUL, TAB... never belong in an address, a parameter
# or an attribute value (RFC 5321 2.3.8: CR and LF only as the CRLF line end)
CONTROL_CHARACTER_RE = re.compile(r'[\x00-\x1f\x7f]')
BODY_TYPES = ('7BIT', '8BITMIME', 'BINARYMIME')   # RFC 6152, RFC 3030


def ascii_number(text, max_digits=20):
    """Non-negative integer from ASCII digits, else None; more than ``max_digits``
    digits (RFC 1870's SIZE limit) give float('inf') rather than a huge int()."""
    if not ASCII_NUMBER_RE.match(text):
        return None
    if len(text.lstrip('0')) > max_digits:
        return float('inf')
    return int(text)


def ascii_words(text):
    """Split at spaces and tabs only (str.split() also splits at Unicode spaces)."""
    return [word for word in re.split(r'[ \t]+', text) if word]


class EnvelopeSyntaxError(ValueError):
    """Bad MAIL/RCPT syntax; ``part`` is 'address', 'parameter' or 'syntax', so the
    reply can carry the right enhanced status code."""

    def __init__(self, message, part='syntax'):
        super().__init__(message)
        self.part = part


def envelope_address_problem(address):
    """Why an envelope address (without its brackets) cannot be used, or None. Any
    connector checks the addresses it receives with this before they are stored,
    forwarded or written into a header."""
    if CONTROL_CHARACTER_RE.search(address):
        return 'control character in address'
    if '<' in address or '>' in address:
        return 'angle bracket inside address'
    return None


def esmtp_parameter_problem(parameter):
    """Why a MAIL/RCPT parameter ('KEYWORD' or 'KEYWORD=value') is malformed, or None.
    Values may be UTF-8 (RFC 6531) but carry no control characters."""
    keyword, sep, value = parameter.partition('=')
    if not ESMTP_KEYWORD_RE.match(keyword):
        return 'bad parameter keyword'
    if sep and not value:
        return 'empty %s value' % keyword.upper()
    if CONTROL_CHARACTER_RE.search(value):
        return 'control character in %s value' % keyword.upper()
    return None


def parse_path_argument(argument, keyword):
    """'FROM:<a@b> SIZE=1' -> ('a@b', ['SIZE=1']); EnvelopeSyntaxError on bad syntax,
    a bad address or a malformed parameter."""
    head, sep, rest = argument.partition(':')
    if not sep or not head.strip(' \t').isascii() or head.strip(' \t').upper() != keyword:
        raise EnvelopeSyntaxError('syntax: %s:<address>' % keyword)
    match = MAIL_PATH_RE.match(rest)
    if match:
        address, params = match.group(1), ascii_words(match.group(2))
    else:
        # be liberal with clients that forget the brackets
        parts = ascii_words(rest)
        if not parts:
            raise EnvelopeSyntaxError('missing address')
        address, params = parts[0], parts[1:]
    if ':' in address and address.startswith('@'):
        address = address.split(':', 1)[1]   # source route (RFC 5321 C.)
    address = address.strip(' \t')
    problem = envelope_address_problem(address)
    if problem:
        raise EnvelopeSyntaxError(problem, 'address')
    for param in params:
        problem = esmtp_parameter_problem(param)
        if problem:
            raise EnvelopeSyntaxError(problem, 'parameter')
    return address, params


def xtext_decode(value):
    """RFC 3461 xtext: '+' and two hex digits stand for one byte; the bytes are UTF-8."""
    raw = value.encode('utf-8', 'surrogateescape')
    raw = re.sub(rb'\+([0-9A-Fa-f]{2})', lambda match: bytes([int(match.group(1), 16)]), raw)
    return raw.decode('utf-8', 'surrogateescape')


def session_deadline(config):
    """The time.monotonic() by which a client session starting now must be over
    ([main] max_session_time), or None."""
    seconds = config.getint('main', 'max_session_time')
    return time.monotonic() + seconds if seconds > 0 else None


class SMTPServerSession(object):
    """The server side of one SMTP connection, shared by the smtp and esmtp
    connectors.

    Commands dispatch by name to ``smtp_<VERB>(argument)``; a subclass adds or
    replaces verbs. Replies are collected while more pipelined input is waiting and
    written in one go (RFC 2920).

    Attributes for subclasses: connector, config, sock, peer (ip, port), reader,
    helo, xforward (dict of raw attributes), sender, recipients, mail_params,
    rcpt_params (list per recipient), in_transaction.
    """

    MAX_ERRORS = 20
    ENVELOPE_VERBS = ('MAIL', 'RCPT')   # their parsers refuse control characters with 5.1.x codes
    UNIMPLEMENTED = ('EXPN', 'TURN', 'ETRN', 'STARTTLS', 'AUTH', 'BDAT', 'HELP', 'SEND', 'SOML', 'SAML')

    def __init__(self, connector, sock, peer):
        self.connector = connector
        self.controller = connector.controller
        self.config = connector.controller.config
        self.logger = connector.logger
        self.sock = sock
        self.peer = peer
        self.reader = SocketReader(sock, session_deadline(self.config),
                                   self.config.getint('main', 'smtptimeout'))
        self.pending = []
        self.closing = False
        self.errors = 0
        self.helo = None
        self.esmtp = False
        self.xforward = {}
        self.command_limit = self.config.getint('main', 'smtp_command_line_limit')
        self.max_size = self.config.getint('main', 'smtp_max_message_size')
        self.data_line_limit = self.config.getint('main', 'smtp_data_line_limit')
        self.trusted = connector.peer_is_trusted(peer[0])
        self.waiting_for_client = False
        self.controller.smtp_sessions.add(self)
        self.reset()

    def reset(self):
        self.sender = None
        self.recipients = []
        self.rcpt_params = []
        self.mail_params = []
        self.rcpt_attempts = 0
        self.in_transaction = False

    # -- output ---------------------------------------------------------------
    def reply(self, code, text):
        """Queue a reply; multi-line if text is a list."""
        lines = text if isinstance(text, list) else [text]
        out = []
        for index, line in enumerate(lines):
            sep = ' ' if index == len(lines) - 1 else '-'
            out.append(('%d%s%s\r\n' % (code, sep, line)).encode('utf-8', 'replace'))
        self.pending.append(b''.join(out))

    def flush(self):
        if self.pending:
            data = b''.join(self.pending)
            self.pending = []
            try:
                self.sock.sendall(data)
            except OSError as error:
                raise ConnectionClosed(str(error))

    # -- main loop ------------------------------------------------------------
    def run(self):
        try:
            self.reply(220, self.banner())
            while not self.closing:
                if not self.reader.has_line():
                    self.before_wait()
                    self.flush()
                    if not self.controller.stayalive:
                        return   # shutting down: between commands is the moment to leave
                try:
                    self.waiting_for_client = True
                    line = self.reader.readline(self.command_limit)
                    self.waiting_for_client = False
                except LineTooLong:
                    self.reply(500, '5.5.2 Command line exceeds %d octets (configured limit '
                                    'smtp_command_line_limit)' % self.command_limit)
                    self.logger.warning('%s: command line too long, closing', self.peer_label())
                    self.flush()
                    return
                self.dispatch(line)
            self.flush()
        except DeadlineExpired:
            # a reply due to the client was sent before its next read; only waiting ends
            self.logger.warning('%s: session longer than max_session_time (%ss), closing',
                                self.peer_label(), self.config.get('main', 'max_session_time'))
            self.reply(421, '4.4.2 Error: timeout exceeded (session time limit)')
            try:
                self.flush()
            except ConnectionClosed:
                pass
        except ConnectionClosed as why:
            self.logger.debug('%s: connection closed: %s', self.peer_label(), why)
        finally:
            self.controller.smtp_sessions.discard(self)
            self.cleanup()

    def dispatch(self, line):
        text = line.rstrip(b'\r\n')
        if b'\0' in text:
            return self.error(500, '5.5.2 Error: NUL character in command')
        command = text.decode('utf-8', 'surrogateescape')
        verb, _, argument = command.partition(' ')
        verb = verb.upper() if SMTP_VERB_RE.match(verb) else ''   # ASCII verbs only
        handler = getattr(self, 'smtp_' + verb, None) if verb else None
        if handler is not None:
            if verb not in self.ENVELOPE_VERBS and \
                    CONTROL_CHARACTER_RE.search(argument.replace('\t', ' ')):
                return self.error(501, '5.5.2 Syntax error: control character in %s' % verb)
            return handler(argument.strip(' \t'))
        if verb in self.UNIMPLEMENTED:
            return self.error(502, '5.5.1 Error: command not implemented')
        self.logger.info('%s: unknown command %r', self.peer_label(), command[:60])
        return self.error(500, '5.5.2 Error: command not recognized')

    def error(self, code, text):
        self.errors += 1
        if self.errors >= self.MAX_ERRORS:
            self.reply(421, '4.7.0 Error: too many errors')
            self.closing = True
            self.logger.warning('%s: too many errors, closing', self.peer_label())
            return
        self.reply(code, text)

    def peer_label(self):
        return '%s:%s' % self.peer[:2] if self.peer else 'unknown'

    def banner(self):
        return 'fuglu scanner ready '

    def before_wait(self):
        """Called before waiting for more client input (and flushing the replies)."""

    def cleanup(self):
        pass

    # -- commands every SMTP server has ---------------------------------------
    def extensions(self):
        items = ['PIPELINING']
        if self.max_size:
            items.append('SIZE %d' % self.max_size)
        else:
            items.append('SIZE')
        items += ['8BITMIME', 'SMTPUTF8', 'DSN']
        if self.trusted:
            items.append('XFORWARD NAME ADDR PROTO HELO SOURCE PORT IDENT')
        return items

    def smtp_EHLO(self, argument):
        if not argument:
            return self.error(501, '5.5.4 Syntax: EHLO hostname')
        self.helo, self.esmtp = argument, True
        self.reset()
        self.reply(250, [outgoing_helo(self.config)] + self.extensions())

    def smtp_HELO(self, argument):
        if not argument:
            return self.error(501, '5.5.4 Syntax: HELO hostname')
        self.helo, self.esmtp = argument, False
        self.reset()
        self.reply(250, outgoing_helo(self.config))

    def smtp_NOOP(self, argument):
        self.reply(250, '2.0.0 Ok')

    def smtp_RSET(self, argument):
        self.reset()
        self.reply(250, '2.0.0 Ok')

    def smtp_QUIT(self, argument):
        self.reply(221, '2.0.0 Bye')
        self.closing = True

    def smtp_VRFY(self, argument):
        self.reply(252, '2.5.2 Cannot VRFY user')

    def smtp_XFORWARD(self, argument):
        # XFORWARD_README: only from authorised clients, never inside a transaction
        if not self.trusted:
            return self.error(550, '5.7.0 Error: insufficient authorization')
        if self.in_transaction:
            return self.error(503, '5.5.1 Error: MAIL transaction in progress')
        attributes = {}
        for item in ascii_words(argument):
            name, sep, value = item.partition('=')
            name = name.upper() if name.isascii() else ''
            if not sep or name not in ('NAME', 'ADDR', 'PROTO', 'HELO', 'SOURCE', 'PORT', 'IDENT'):
                return self.error(501, '5.5.4 Syntax: XFORWARD attribute=value...')
            decoded = xtext_decode(value)
            if len(decoded) > 255:
                return self.error(501, '5.5.4 Error: %s value too long' % name)
            if not value or CONTROL_CHARACTER_RE.search(decoded):
                # the raw value goes downstream, the decoded one into client information
                return self.error(501, '5.5.4 Error: bad %s value' % name)
            attributes[name] = value
        if not attributes:
            return self.error(501, '5.5.4 Syntax: XFORWARD attribute=value...')
        self.xforward.update(attributes)
        self.reply(250, '2.0.0 Ok')

    def smtp_HCHK(self, argument):
        self.logger.info('HEALTHCHECK %s from %s', self.connector.protocol, self.peer_label())
        self.reply(250, 'healthcheck')
        self.closing = True

    # -- envelope parsing shared by smtp and esmtp -----------------------------
    def parse_mail(self, argument):
        """Checks and parses MAIL; queues an error reply and returns None on failure."""
        if self.helo is None:
            return self.error(503, '5.5.1 Error: send HELO/EHLO first')
        if self.in_transaction:
            return self.error(503, '5.5.1 Error: nested MAIL command')
        try:
            address, params = parse_path_argument(argument, 'FROM')
        except EnvelopeSyntaxError as error:
            return self.envelope_error('MAIL', '5.1.7 Bad sender address syntax', error)
        for param in params:
            name, _, value = param.partition('=')
            name = name.upper()
            if name == 'SIZE':
                size = ascii_number(value)
                if size is None:
                    return self.envelope_error('MAIL', None,
                                               EnvelopeSyntaxError('Bad SIZE parameter'))
                if self.max_size and size > self.max_size:
                    self.logger.info('%s: MAIL SIZE=%s over smtp_max_message_size refused',
                                     self.peer_label(), value[:30])
                    return self.error(552, '5.3.4 Message size exceeds fixed maximum message '
                                           'size %d (configured limit smtp_max_message_size)'
                                      % self.max_size)
            elif name == 'BODY' and value.upper() not in BODY_TYPES:
                return self.envelope_error('MAIL', None, EnvelopeSyntaxError('Bad BODY parameter'))
        return address, params

    def envelope_error(self, verb, address_reply, error):
        """501 for a MAIL/RCPT that cannot be parsed: ``address_reply`` when the address
        is bad, 5.5.4 for syntax and parameters."""
        self.logger.info('%s: %s refused: %s', self.peer_label(), verb, error)
        if address_reply and getattr(error, 'part', None) == 'address':
            return self.error(501, address_reply)
        return self.error(501, '5.5.4 Syntax error in %s: %s' % (verb, error))

    def parse_rcpt(self, argument):
        if not self.in_transaction:
            return self.error(503, '5.5.1 Error: need MAIL command')
        try:
            address, params = parse_path_argument(argument, 'TO')
        except EnvelopeSyntaxError as error:
            return self.envelope_error('RCPT', '5.1.3 Bad recipient address syntax', error)
        if not address:
            return self.error(501, '5.1.3 Bad recipient address syntax')
        return address, params

    def receive_data(self):
        """After DATA was accepted: read the message. Returns bytes, or None when a
        limit was exceeded (the reply is queued)."""
        self.reply(354, 'End data with <CR><LF>.<CR><LF>')
        self.flush()
        data, problem = self.reader.read_data(self.max_size, self.data_line_limit)
        if problem == 'size':
            self.logger.warning('%s: message over smtp_max_message_size refused', self.peer_label())
            self.reply(552, '5.3.4 Message size exceeds fixed maximum message size %d (configured limit '
                            'smtp_max_message_size)' % self.max_size)
        elif problem == 'line':
            self.logger.warning('%s: message with a line over smtp_data_line_limit refused', self.peer_label())
            self.reply(552, '5.3.4 Line in message exceeds %d octets (configured limit smtp_data_line_limit) '
                            '- fold long headers or reduce message size' % self.data_line_limit)
        return data

    def clientinfo(self):
        """(helo, ip, rdns) of the original client from XFORWARD, else None."""
        if not self.xforward:
            return None
        name = xtext_decode(self.xforward.get('NAME', ''))
        addr = xtext_decode(self.xforward.get('ADDR', ''))
        helo = xtext_decode(self.xforward.get('HELO', ''))
        if addr.upper().startswith('IPV6:'):
            addr = addr[5:]
        if addr.upper() == '[UNAVAILABLE]':
            return None
        if name.upper() == '[UNAVAILABLE]' or not name:
            name = 'unknown'
        if helo.upper() == '[UNAVAILABLE]':
            helo = ''
        return helo, addr, name

    def smtp_options(self):
        return {p.upper() for p in self.mail_params
                if p.isascii() and p.upper() in ('SMTPUTF8', 'BODY=8BITMIME')}

    def build_suspect(self, data):
        """A Suspect from the finished transaction, or None (reply queued) when the
        envelope fails the address checks."""
        config = self.config
        checker = config.get('main', 'address_compliance_checker')
        maxsize = config.getint('main', 'address_compliance_checker_maxsize')
        addresses = ([self.sender] if self.sender else []) + list(self.recipients)
        if not all(address_is_valid(a, checker, maxsize) for a in addresses):
            action = config.get('main', 'address_compliance_fail_action').strip().lower()
            text = one_line(config.get('main', 'address_compliance_fail_message'))
            self.logger.warning('%s: invalid envelope address in %s, action %s', self.peer_label(),
                                addresses, action)
            code = {'reject': 550, 'discard': 250}.get(action, 451)
            self.reply(code, text)
            return None
        suspect = Suspect(self.sender, list(self.recipients), inbuffer=data,
                          queue_id=xtext_decode(self.xforward.get('IDENT', '')) or None,
                          smtp_options=self.smtp_options(), clientinfo=self.clientinfo())
        suspect.tags['incomingport'] = self.connector.port
        self.logger.info('%s from=%s, nrec=%d, size=%d, client=%s, queueid=%s', suspect.id,
                         suspect.from_address or '<>', len(suspect.recipients), suspect.size,
                         suspect.clientinfo[1] if suspect.clientinfo else self.peer[0], suspect.queue_id)
        return suspect


###############################################################################
# Connectors
###############################################################################

class Connector(object):
    """Base of the protocol adapters registered in CONNECTORS.

    Contract: the daemon creates one connector per incomingport entry and calls
    ``handle(sock, peer)`` in a worker for every accepted connection. ``handle`` runs
    the whole connection, closes the socket and never raises. A connection over
    max_sessions_per_client gets ``refuse_busy(sock)`` in the accept thread instead.
    Class attributes to override: ``protocol`` (the incomingport name), ``busy_reply``
    (bytes sent by refuse_busy).
    Instance attributes: controller, address, port, logger
    (``fuglu.incoming.<port>``).
    """

    protocol = None
    # what a client over max_sessions_per_client gets before the connection is closed
    busy_reply = b'421 4.7.0 Error: too many connections from your address, try again later\r\n'

    def __init__(self, controller, address, port):
        self.controller = controller
        self.address = address
        self.port = port
        self.logger = logging.getLogger('fuglu.incoming.%s' % port)

    @property
    def config(self):
        return self.controller.config

    def peer_is_trusted(self, ip):
        networks = self.controller.trusted_networks
        return networks is None or ip_in_networks(ip, networks)

    def handle(self, sock, peer):
        try:
            set_socket_timeout(sock, self.config.getint('main', 'smtptimeout'))
            self.serve(sock, peer)
        except Exception:
            self.logger.error('connection from %s:%s failed: %s', peer[0], peer[1], traceback.format_exc())
            self.controller.record_exception(traceback.format_exc())
        finally:
            try:
                sock.close()
            except OSError:
                pass

    def serve(self, sock, peer):
        raise NotImplementedError

    def refuse_busy(self, sock):
        """Turn away a connection at once (called in the accept thread): send
        ``busy_reply`` without waiting for the client, close."""
        try:
            set_socket_timeout(sock, 1)
            if self.busy_reply:
                sock.sendall(self.busy_reply)
        except OSError:
            pass
        finally:
            sock.close()


class AfterQueueSession(SMTPServerSession):
    """The `smtp` connector: Postfix's content_filter talks to us, we scan and
    re-inject to outgoinghost:outgoingport, and answer Postfix only after the
    downstream's final reply.

    Recipients are checked downstream at RCPT time: each RCPT is forwarded right
    away and the downstream's verdict is what Postfix sees for that recipient, so a
    refused recipient is deferred or bounced by Postfix itself and never silently
    dropped. (If a plugin changes the envelope, it is sent again at delivery; a
    refusal then defers the whole message.)
    """

    # (section, option) of the template for the 250 after the downstream accepted
    accepted_template_option = ('smtpconnector', 'requeuetemplate')

    def __init__(self, connector, sock, peer):
        super().__init__(connector, sock, peer)
        self.downstream = None
        self.downstream_clean = True
        self.awaiting = []   # callbacks for downstream replies still to be read

    # a finished session's downstream connection may serve the next session, and the
    # message goes downstream as BDAT when offered (the esmtp proxy keeps DATA, as its
    # client used it)
    reuse_downstream = True

    def cleanup(self):
        if self.downstream is not None:
            if self.reuse_downstream and self.downstream_clean and not self.in_transaction and not self.awaiting:
                self.controller.downstream_pool.park(self.downstream)
            else:
                self.downstream.quit()
            self.downstream = None

    def open_downstream(self):
        """A connected, greeted downstream client (reused across transactions, and
        across sessions through the controller's pool)."""
        if self.downstream is not None and self.downstream.connected:
            return self.downstream
        config = self.config
        host, port = outgoing_target(config, self.peer[0])
        pooled = self.controller.downstream_pool.take(host, port)
        if pooled is not None:
            self.downstream = pooled
            return pooled
        client = SMTPClient.from_config(config, host, port, outgoing_helo(config),
                                        retries=config.getint('main', 'outgoingretry'))
        client.connect()
        client.ehlo()
        self.downstream = client
        return client

    def downstream_params(self, params, size=None):
        """MAIL/RCPT parameters the downstream understands (SIZE rewritten)."""
        offered = self.downstream.extensions
        kept = []
        for param in params:
            name = param.partition('=')[0].upper()
            if name == 'SIZE':
                if 'SIZE' in offered:
                    kept.append('SIZE=%d' % size if size is not None else param)
            elif name == 'BODY' and '8BITMIME' in offered:
                kept.append(param)
            elif name == 'SMTPUTF8' and 'SMTPUTF8' in offered:
                kept.append(param)
            elif name in ('RET', 'ENVID', 'NOTIFY', 'ORCPT') and 'DSN' in offered:
                kept.append(param)
        return kept

    def envelope_command(self, command, address, params, size=None):
        """'MAIL FROM' or 'RCPT TO' with the parameters the downstream understands."""
        return ' '.join(['%s:<%s>' % (command, address)] + self.downstream_params(params, size))

    # -- pipelining towards the downstream -----------------------------------------
    # MAIL and RCPT are forwarded as they come and their replies read only when fuglu
    # must answer (before waiting for the client, or before any other command), so a
    # pipelined MAIL/RCPT/DATA group costs one round trip downstream, not one each.

    def send_downstream(self, line, on_reply):
        self.downstream.queue(line)
        self.awaiting.append(on_reply)
        if 'PIPELINING' not in self.downstream.extensions:
            self.settle()

    def settle(self):
        """Read the downstream replies still outstanding, in order, and act on each."""
        while self.awaiting:
            on_reply = self.awaiting.pop(0)
            try:
                code, lines = self.downstream.read()
            except SMTPError as error:
                code, lines = error.code, [error.text]
            on_reply(code, lines)

    def before_wait(self):
        self.settle()

    def dispatch(self, line):
        if self.awaiting and line[:4].upper() not in (b'MAIL', b'RCPT'):
            self.settle()
        return super().dispatch(line)

    def smtp_MAIL(self, argument):
        parsed = self.parse_mail(argument)
        if parsed is None:
            return
        sender, params = parsed
        try:
            client = self.open_downstream()
        except SMTPError as error:
            self.logger.warning('%s: MAIL FROM:<%s> deferred, downstream: %s', self.peer_label(), sender, error)
            return self.reply(error.code, error.text)
        self.sender, self.mail_params, self.in_transaction = sender, params, True
        if self.xforward and 'XFORWARD' in client.extensions:
            for line in client.xforward_lines(self.xforward):
                self.send_downstream(line, self.on_xforward_reply)
        self.send_downstream(self.envelope_command('MAIL FROM', sender, params),
                             lambda code, lines: self.on_mail_reply(sender, code, lines))

    def on_xforward_reply(self, code, lines):
        if code != 250:
            self.logger.warning('%s: downstream refused XFORWARD: %s %s', self.peer_label(), code, ' '.join(lines))

    def accepted_reply(self, code, lines, local_text):
        """The reply for a MAIL/RCPT the downstream accepted. After-queue: our own
        text; the esmtp proxy relays the downstream's reply instead."""
        return 250, local_text

    def on_mail_reply(self, sender, code, lines):
        if code == 250:
            return self.reply(*self.accepted_reply(code, lines, '2.1.0 Ok'))
        self.logger.warning('%s: MAIL FROM:<%s> refused downstream: %s %s', self.peer_label(), sender, code,
                            ' '.join(lines))
        # RCPTs already forwarded get the downstream's "need MAIL" in turn
        self.sender, self.in_transaction = None, False
        self.downstream_clean = False   # it may still hold this session's XFORWARD
        self.reply(code, lines)

    def smtp_RCPT(self, argument):
        parsed = self.parse_rcpt(argument)
        if parsed is None:
            return
        address, params = parsed
        self.rcpt_attempts += 1
        if self.downstream is None or not self.downstream.connected:
            return self.reply(451, '4.4.2 downstream connection lost')
        self.send_downstream(self.envelope_command('RCPT TO', address, params),
                             lambda code, lines: self.on_rcpt_reply(address, params, code, lines))

    def on_rcpt_reply(self, address, params, code, lines):
        if code not in (250, 251):
            self.logger.info('%s: recipient <%s> refused downstream: %s %s', self.peer_label(), address, code,
                             ' '.join(lines))
            return self.reply(code, lines)
        self.recipients.append(address)
        self.rcpt_params.append(params)
        self.reply(*self.accepted_reply(code, lines, '2.1.5 Ok'))

    def smtp_RSET(self, argument):
        if self.in_transaction and self.downstream is not None:
            self.downstream.rset()
        super().smtp_RSET(argument)

    def smtp_DATA(self, argument):
        if not self.in_transaction:
            return self.error(503, '5.5.1 Error: need MAIL command')
        if not self.recipients:
            if self.rcpt_attempts:
                return self.error(554, '5.5.1 Error: no valid recipients')
            return self.error(503, '5.5.1 Error: need RCPT command')
        data = self.receive_data()
        if data is not None:
            self.process_message(data)
        if self.in_transaction and self.downstream is not None and self.downstream.connected:
            self.downstream.rset()   # no-op after a completed delivery; aborts otherwise
        self.reset()

    def process_message(self, data):
        suspect = self.build_suspect(data)
        if suspect is None:
            return
        session = ScanSession(self.controller)
        action, delivered = DEFER, False
        try:
            action, message = session.scan(suspect)
            if action in (DUNNO, ACCEPT):
                code, text, delivered = self.deliver(suspect)
                self.reply(code, text)
            else:
                self.reply(*self.refusal_reply(session, suspect, action, message))
        except Exception:
            trace = traceback.format_exc()
            self.logger.error('%s: processing failed, deferring: %s', suspect.id, trace)
            self.controller.record_exception(trace)
            action, delivered = DEFER, False
            self.reply(451, '4.3.0 internal problem - message deferred (%s)' % suspect.id)
        self.flush_quietly()
        session.finish(suspect, action, delivered)

    def flush_quietly(self):
        try:
            self.flush()
        except ConnectionClosed:
            self.closing = True

    def refusal_reply(self, session, suspect, action, message):
        text = session.reply_text(suspect, action, message)
        if action == DELETE:
            self.in_transaction = bool(self.downstream)   # abort the downstream side
            return 250, text
        if action == REJECT:
            return 550, ensure_enhanced(text, '5.7.1')
        return 451, ensure_enhanced(text, '4.7.1')

    def deliver(self, suspect):
        """Re-inject; returns (code, text, delivered) for Postfix."""
        template = self.config.get(*self.accepted_template_option)
        if suspect.tags.get('noreinject'):
            record_inject_result(suspect, 250, 'message not re-injected by plugin request')
            return 250, one_line(apply_template(template, suspect, {'injectanswer': suspect.tags['injectanswer']})), True
        message = suspect.get_output_parts()
        try:
            with self.downstream_deadline():
                if suspect.from_address != self.sender or suspect.recipients != self.recipients:
                    self.redo_envelope(suspect, sum(len(part) for part in message))
                code, text = self.downstream.data(message, chunking=self.reuse_downstream)
        except SMTPError as error:
            self.logger.warning('%s: re-injection failed: %s', suspect.id, error)
            if self.downstream is not None:
                self.downstream.close()
            code, text = (451 if error.connection_problem else error.code), error.text
        record_inject_result(suspect, code, text)
        if code == 250:
            self.in_transaction = False
            self.logger.info('%s: re-injected: %s', suspect.id, text)
            return 250, one_line(apply_template(template, suspect, {'injectanswer': text})), True
        self.logger.warning('%s: downstream refused the message: %s %s', suspect.id, code, text)
        if code < 400:
            code = 451
        return code, one_line('%s (%s)' % (text, suspect.id) if suspect.id not in text else text), False

    def downstream_deadline(self):
        """A time limit for the whole delivery on top of the per-reply ones (none
        here: Postfix's smtp_data_done_timeout is long; the esmtp proxy has one)."""
        return contextlib.nullcontext(self.downstream)

    def redo_envelope(self, suspect, size):
        """A plugin changed sender or recipients: send the envelope again."""
        self.downstream.rset()
        if not self.downstream.connected:
            raise SMTPError(451, '4.4.2 downstream connection lost', True)
        client = self.downstream
        if self.xforward and 'XFORWARD' in client.extensions:
            client.xforward(self.xforward)
        code, text = client.command(self.envelope_command('MAIL FROM', suspect.from_address, self.mail_params, size))
        if code != 250:
            raise SMTPError(code, ' '.join(text))
        for recipient in suspect.recipients:
            code, text = client.command('RCPT TO:<%s>' % recipient)
            if code not in (250, 251):
                raise SMTPError(451, '4.7.1 changed recipient <%s> refused downstream: %s %s'
                                % (recipient, code, ' '.join(text)))


# an RFC 3463 enhanced status code, e.g. 5.7.1 (a whole word)
ENHANCED_CODE_RE = re.compile(r'^([245])\.[0-9]{1,3}\.[0-9]{1,3}$')


def ensure_enhanced(text, enhanced):
    """Prefix an enhanced status code unless the text already starts with one of
    the same class."""
    first_word = text.split(' ', 1)[0]
    if ENHANCED_CODE_RE.match(first_word) and first_word[0] == enhanced[0]:
        return text
    return '%s %s' % (enhanced, text)


class SMTPConnector(Connector):
    """After-queue content filter (Postfix content_filter)."""
    protocol = 'smtp'
    session_class = AfterQueueSession

    def serve(self, sock, peer):
        self.session_class(self, sock, peer).run()


###############################################################################
# Connector: esmtp (before-queue proxy)
###############################################################################
# Postfix's smtpd_proxy_filter (SMTPD_PROXY_README): the client's greeting, MAIL and
# RCPT go to the after-filter server one by one and its answers come back, so the
# client learns at RCPT time which recipients are refused. DATA is received here,
# scanned, and only then sent on; the client gets 250 only after the after-filter
# server accepted, and a refusal aborts the downstream transaction (RSET, never the
# final dot). Everything else (DATA handling, verdict replies, re-injection) is the
# after-queue session's.

class EsmtpSession(AfterQueueSession):
    """One before-queue proxy connection. Differences from the smtp connector: the
    downstream is greeted with the client's own HELO/EHLO name and its answers
    (greeting, extensions, MAIL, RCPT) are relayed; MAIL/RCPT parameters pass
    unchanged; only extensions fuglu can proxy are offered."""

    # Extensions whose commands and parameters pass through a proxy that buffers the
    # message. STARTTLS, AUTH, CHUNKING/BINARYMIME, ETRN, XCLIENT... are not among them.
    PROXIED_EXTENSIONS = ('PIPELINING', 'SIZE', '8BITMIME', 'SMTPUTF8', 'DSN', 'ENHANCEDSTATUSCODES')

    accepted_template_option = ('esmtpconnector', 'queuetemplate')
    reuse_downstream = False   # greeted with this client's own name

    def __init__(self, connector, sock, peer):
        super().__init__(connector, sock, peer)
        self.ignore_multiple_recipients = self.config.getboolean('esmtpconnector', 'ignore_multiple_recipients')
        self.ignored_recipients = []

    def reset(self):
        super().reset()
        self.ignored_recipients = []

    # -- the downstream connection ------------------------------------------------
    def greet_downstream(self, verb, name):
        """Send the client's HELO/EHLO to the downstream (connecting first when
        needed); returns the downstream's (code, lines). Raises SMTPError."""
        client = self.downstream
        if client is None or not client.connected:
            host, port = outgoing_target(self.config, self.peer[0])
            budget = self.config.getint('esmtpconnector', 'downstream_timeout')
            connect_timeout = min(budget, self.config.getint('main', 'downstream_connect_timeout'))
            client = SMTPClient(host, port, name, timeout=budget, connect_timeout=connect_timeout,
                                retries=self.config.getint('main', 'outgoingretry'))
            self.downstream = client
        with self.downstream_deadline():   # connect, greeting and EHLO together
            if not client.connected:
                client.connect()
            client.helo = name
            if verb == 'EHLO':
                return client.ehlo()
            client.extensions = {}
            return client.command('HELO ' + name)

    @contextlib.contextmanager
    def downstream_deadline(self):
        """Everything the downstream does for one client command together within
        downstream_timeout, so the client hears fuglu's 4xx before Postfix's
        smtpd_proxy_timeout gives up."""
        client = self.downstream
        budget = self.config.getint('esmtpconnector', 'downstream_timeout')
        client.deadline = time.monotonic() + budget
        try:
            yield client
        finally:
            client.deadline = None

    def open_downstream(self):
        """The greeted downstream; a connection lost since the client's greeting is
        opened again with that greeting."""
        if self.downstream is None or not self.downstream.connected:
            code, lines = self.greet_downstream('EHLO' if self.esmtp else 'HELO', self.helo)
            if code != 250:
                raise SMTPError(code, ' '.join(lines))
        return self.downstream

    def downstream_params(self, params, size=None):
        # SMTPD_PROXY_README: the filter passes MAIL/RCPT parameters unchanged; the
        # client only saw extensions the downstream offered.
        return list(params)

    def accepted_reply(self, code, lines, local_text):
        return code, lines

    def downstream_unavailable(self, error):
        self.logger.warning('%s: after-filter server unavailable: %s', self.peer_label(), error)
        self.reply(421, ensure_enhanced(one_line(error.text), '4.4.1'))
        self.closing = True

    # -- commands -------------------------------------------------------------------
    def extensions(self):
        offered = self.downstream.extensions
        items = []
        for keyword in self.PROXIED_EXTENSIONS:
            if keyword not in offered:
                continue
            if keyword == 'SIZE':
                # announce the smaller of the two limits (0 or none = unlimited)
                downstream_limit = ascii_number(offered['SIZE'].strip(), max_digits=18) or 0
                limits = [n for n in (downstream_limit, self.max_size) if 0 < n < float('inf')]
                items.append('SIZE %d' % min(limits) if limits else 'SIZE')
            else:
                items.append(('%s %s' % (keyword, offered[keyword])).strip())
        # XFORWARD is ours to offer (trusted peers only); it is passed on at MAIL
        items += [item for item in super().extensions() if item.startswith('XFORWARD')]
        return items

    def smtp_EHLO(self, argument):
        self.greet('EHLO', argument)

    def smtp_HELO(self, argument):
        self.greet('HELO', argument)

    def greet(self, verb, argument):
        if not argument:
            return self.error(501, '5.5.4 Syntax: %s hostname' % verb)
        self.reset()
        try:
            code, lines = self.greet_downstream(verb, argument)
        except SMTPError as error:
            if error.connection_problem:
                return self.downstream_unavailable(error)
            code, lines = error.code, [error.text]
        if code != 250:
            self.logger.info('%s: %s %s refused downstream: %s %s', self.peer_label(), verb, argument, code,
                             ' '.join(lines))
            return self.reply(code, lines)
        self.helo, self.esmtp = argument, verb == 'EHLO'
        if verb == 'EHLO':
            return self.reply(250, [lines[0]] + self.extensions())
        self.reply(250, lines)

    def smtp_RCPT(self, argument):
        if self.ignore_multiple_recipients and self.in_transaction:
            self.settle()   # is the first recipient accepted yet?
            if self.recipients:
                parsed = self.parse_rcpt(argument)
                if parsed is None:
                    return
                self.rcpt_attempts += 1
                self.ignored_recipients.append(parsed[0])
                # spam trap mode: later recipients are acknowledged, never forwarded
                return self.reply(250, '2.1.5 OK #%d' % self.rcpt_attempts)
        super().smtp_RCPT(argument)

    def build_suspect(self, data):
        suspect = super().build_suspect(data)
        if suspect is not None and self.ignored_recipients:
            # plugins of a spam trap still see every address the message was sent to
            suspect.tags['ignored_recipients'] = list(self.ignored_recipients)
        return suspect


class EsmtpConnector(SMTPConnector):
    """Before-queue proxy (Postfix smtpd_proxy_filter)."""
    protocol = 'esmtp'
    session_class = EsmtpSession


###############################################################################
# Connector: netcat
###############################################################################
# For scripts (`fuglu client`): banner line, the raw message until the client
# half-closes, one reply `STATUS:...`, close. The message may start with an envelope
# block, honoured from trusted peers only:
#
#     X-DATA-PREPEND-START: <token>
#     X-ENV-SENDER: <address or <>>
#     X-ENV-RECIPIENT: <address>        (repeatable)
#     X-HEALTHCHECK: true               (a health probe, nothing is scanned)
#     <any other name>: <value>         (becomes a message tag)
#     X-DATA-PREPEND-END: <token>

NETCAT_BANNER = (b'fuglu scanner ready - please pipe your message, (optional) include env sender/recipient '
                 b'in the beginning, see documentation\r\n')
NETCAT_DEFAULT_ADDRESS = 'unknown@example.org'
NETCAT_BLOCK_START = b'X-DATA-PREPEND-START:'
NETCAT_BLOCK_END = 'X-DATA-PREPEND-END'
NETCAT_STATUS = {DUNNO: b'DUNNO', ACCEPT: b'DUNNO', DELETE: b'DISCARD', REJECT: b'REJECT', DEFER: b'DEFER'}
NETCAT_HEALTHY = b'DUNNO: healthcheck'


class EnvelopeBlockError(ValueError):
    """A netcat envelope block that cannot be read."""


def split_envelope_block(data):
    """(token, [(name, value), ...], message) when ``data`` starts with an envelope
    block, else None. Raises EnvelopeBlockError for a broken block."""
    if data[:len(NETCAT_BLOCK_START)].upper() != NETCAT_BLOCK_START.upper():
        return None
    fields = []
    token = None
    position = 0
    while True:
        end = data.find(b'\n', position)
        if end < 0:
            raise EnvelopeBlockError('envelope block without its %s line' % NETCAT_BLOCK_END)
        line = data[position:end].rstrip(b'\r')
        position = end + 1
        if not line:   # the message's header/body separator: the block never ended
            raise EnvelopeBlockError('envelope block without its %s line' % NETCAT_BLOCK_END)
        name, sep, value = line.partition(b':')
        try:
            name = name.strip().decode('ascii')
        except UnicodeDecodeError:
            name = ''
        if not sep or not name or re.search(r'[^\x21-\x7e]', name):
            raise EnvelopeBlockError('envelope block line %r is not "name: value"' % line[:60])
        value = value.strip().decode('utf-8', 'replace')
        if CONTROL_CHARACTER_RE.search(value):
            raise EnvelopeBlockError('control character in the value of %s' % name)
        problem = envelope_address_problem(value.strip('<>').strip()) \
            if name.upper() in ('X-ENV-SENDER', 'X-ENV-RECIPIENT') else None
        if problem:
            raise EnvelopeBlockError('%s %r: %s' % (name, value[:60], problem))
        if token is None:
            token = value
        elif name.upper() == NETCAT_BLOCK_END:
            if value != token:
                raise EnvelopeBlockError('envelope block end token %r does not match the start token %r'
                                         % (value[:40], token[:40]))
            return token, fields, data[position:]
        else:
            fields.append((name, value))


def uses_bare_lf(message):
    """True when the message's first line ends in LF alone (a Unix .eml)."""
    end = message.find(b'\n')
    return end >= 0 and message[end - 1:end] != b'\r'


class NetcatConnector(Connector):
    """Raw message pipe for scripts; see the section comment for the exchange.

    Replies: ``DUNNO:`` + the full message with fuglu's headers, ``DISCARD:text``,
    ``REJECT:text``, ``DEFER:text``; ``DUNNO: healthcheck`` to a health probe."""

    protocol = 'netcat'
    busy_reply = NETCAT_BANNER + b'DEFER:too many connections from your address, try again later'

    def size_limit(self):
        value = self.config.get('main', 'netcat_max_message_size').strip()
        return int(value) if value else self.config.getint('main', 'smtp_max_message_size')

    def serve(self, sock, peer):
        label = '%s:%s' % peer[:2]
        sock.sendall(NETCAT_BANNER)
        limit = self.size_limit()
        try:
            data, oversized = self.read_message(sock, limit, session_deadline(self.config))
        except DeadlineExpired:
            self.logger.warning('%s: netcat client still sending after max_session_time (%ss), '
                                'closing', label, self.config.get('main', 'max_session_time'))
            return self.answer(sock, b'DEFER:timeout exceeded (session time limit)')
        except ConnectionClosed as why:
            self.logger.info('%s: netcat client left before sending a whole message: %s', label, why)
            return
        if oversized:
            self.logger.warning('%s: netcat message over %d bytes refused', label, limit)
            return self.answer(sock, b'REJECT:message exceeds %d octets (configured limit netcat_max_message_size)'
                               % limit)
        sender, recipients, tags = NETCAT_DEFAULT_ADDRESS, [NETCAT_DEFAULT_ADDRESS], {}
        try:
            block = split_envelope_block(data)
        except EnvelopeBlockError as error:
            block = error
        if block is not None and not self.peer_is_trusted(peer[0]):
            self.logger.info('%s: envelope block from an untrusted peer kept as message content', label)
        elif isinstance(block, EnvelopeBlockError):
            self.logger.warning('%s: broken envelope block: %s', label, block)
            return self.answer(sock, b'REJECT:' + one_line('broken envelope block: %s' % block).encode('utf-8'))
        elif block is not None:
            token, fields, data = block
            found_sender, found_recipients = None, []
            for name, value in fields:
                key = name.upper()
                if key == 'X-HEALTHCHECK':
                    self.logger.info('HEALTHCHECK netcat from %s', label)
                    return self.answer(sock, NETCAT_HEALTHY)
                if key == 'X-ENV-SENDER':
                    found_sender = value.strip().strip('<>').strip()
                elif key == 'X-ENV-RECIPIENT':
                    found_recipients.append(value.strip().strip('<>').strip())
                else:
                    tags[name] = value
            tags['prepend_identifier'] = token
            if found_sender is not None:
                sender = found_sender
            if found_recipients:
                recipients = [address for address in found_recipients if address] or recipients
        if not data:
            return self.answer(sock, b'REJECT:empty message')
        self.scan(sock, label, Suspect(sender, recipients, inbuffer=data), tags)

    def read_message(self, sock, limit, deadline=None):
        """Everything up to the client's half-close: (bytes, False), or (b'', True)
        when over ``limit`` (the rest is read and dropped, so the reply is not lost
        to a connection reset). DeadlineExpired after ``deadline``."""
        try:
            return read_until_eof(sock, limit, drain=True, deadline=deadline,
                                  idle=self.config.getint('main', 'smtptimeout'))
        except OSError as error:
            raise ConnectionClosed('timeout' if is_timeout(error) else str(error))

    def scan(self, sock, label, suspect, tags):
        for name, value in tags.items():
            suspect.tags.setdefault(name, value)   # never replace the core's own tags
        suspect.tags['incomingport'] = self.port
        self.logger.info('%s from=%s, nrec=%d, size=%d, client=%s (netcat)', suspect.id,
                         suspect.from_address or '<>', len(suspect.recipients), suspect.size, label)
        session = ScanSession(self.controller)
        action, delivered = DEFER, False
        try:
            action, message = session.scan(suspect)
            if action in (DUNNO, ACCEPT):
                reply = b'DUNNO:' + self.output_message(suspect)
            else:
                reply = NETCAT_STATUS[action] + b':' + session.reply_text(suspect, action, message).encode('utf-8')
            delivered = self.answer(sock, reply)
        except Exception:
            trace = traceback.format_exc()
            self.logger.error('%s: processing failed, deferring: %s', suspect.id, trace)
            self.controller.record_exception(trace)
            action = DEFER
            self.answer(sock, b'DEFER:internal problem - message deferred (%s)' % suspect.id.encode())
        session.finish(suspect, action, delivered and action in (DUNNO, ACCEPT))

    @staticmethod
    def output_message(suspect):
        """The message with fuglu's headers, in the line-end style of the input: a
        Unix .eml comes back with LF-only lines, byte for byte after the new headers."""
        output = suspect.get_output_source()
        source = suspect.get_source()
        if uses_bare_lf(source) and output.endswith(source):
            added = output[:len(output) - len(source)]
            output = added.replace(b'\r\n', b'\n') + source
        return output

    def answer(self, sock, reply):
        try:
            sock.sendall(reply)
            sock.shutdown(socket.SHUT_WR)
            return True
        except OSError as error:
            self.logger.warning('netcat reply not delivered: %s', error)
            return False


###############################################################################
# Connector: milter
###############################################################################
# The Sendmail/Postfix milter protocol, version 6, written from the protocol notes
# (shared/spec/protocols.md section 1: Vierling's description, mfdef.h, Postfix's
# milter8.c). The MTA is the socket client; one milter connection carries any number
# of messages. Every packet, in both directions, is
#
#     uint32 length (network byte order, counts the command byte) | command | data
#
# Strings are NUL terminated, integers big-endian. The MTA pipelines every packet
# that needs no reply, so the reader splits a byte stream, never assumes one recv()
# per packet, and a reply is sent exactly where the negotiated flags ask for one
# (an unexpected reply silently desynchronises Postfix).

MILTER_VERSION = 6
MILTER_CHUNK_SIZE = 65535   # largest body chunk either side sends (libmilter MILTER_CHUNK_SIZE)

# -- commands, MTA -> milter --------------------------------------------------
SMFIC_ABORT = b'A'      # end of this message; the connection's data stays
SMFIC_BODY = b'B'       # a body chunk (CRLF line ends)
SMFIC_CONNECT = b'C'    # hostname, family, port, address
SMFIC_MACRO = b'D'      # macros belonging to the next command
SMFIC_BODYEOB = b'E'    # end of message: modifications, then the verdict
SMFIC_HELO = b'H'
SMFIC_QUIT_NC = b'K'    # quit, a new connection follows on this socket
SMFIC_HEADER = b'L'     # name, value
SMFIC_MAIL = b'M'       # <sender>, ESMTP arguments
SMFIC_EOH = b'N'
SMFIC_OPTNEG = b'O'     # version, actions, protocol flags
SMFIC_QUIT = b'Q'
SMFIC_RCPT = b'R'       # <recipient>, ESMTP arguments
SMFIC_DATA = b'T'
SMFIC_UNKNOWN = b'U'    # an SMTP command the MTA does not know

# -- replies, milter -> MTA ----------------------------------------------------
SMFIR_ADDRCPT = b'+'
SMFIR_DELRCPT = b'-'
SMFIR_ADDRCPT_PAR = b'2'
SMFIR_SHUTDOWN = b'4'
SMFIR_ACCEPT = b'a'
SMFIR_REPLBODY = b'b'
SMFIR_CONTINUE = b'c'
SMFIR_DISCARD = b'd'
SMFIR_CHGFROM = b'e'
SMFIR_CONN_FAIL = b'f'
SMFIR_ADDHEADER = b'h'
SMFIR_INSHEADER = b'i'
SMFIR_SETSYMLIST = b'l'   # defined, never on the wire: symbol lists ride in the OPTNEG reply
SMFIR_CHGHEADER = b'm'
SMFIR_PROGRESS = b'p'
SMFIR_QUARANTINE = b'q'
SMFIR_REJECT = b'r'
SMFIR_SKIP = b's'
SMFIR_TEMPFAIL = b't'
SMFIR_REPLYCODE = b'y'
SMFIR_OPTNEG = b'O'

# -- actions the milter may take (negotiated) ------------------------------------
SMFIF_ADDHDRS = 0x001       # add and insert headers
SMFIF_CHGBODY = 0x002
SMFIF_ADDRCPT = 0x004
SMFIF_DELRCPT = 0x008
SMFIF_CHGHDRS = 0x010       # change and delete headers
SMFIF_QUARANTINE = 0x020
SMFIF_CHGFROM = 0x040
SMFIF_ADDRCPT_PAR = 0x080
SMFIF_SETSYMLIST = 0x100

# -- protocol flags: NO* = "do not send me this", NR_* = "I will not reply to this" --
SMFIP_NOCONNECT = 0x000001
SMFIP_NOHELO = 0x000002
SMFIP_NOMAIL = 0x000004
SMFIP_NORCPT = 0x000008
SMFIP_NOBODY = 0x000010
SMFIP_NOHDRS = 0x000020
SMFIP_NOEOH = 0x000040
SMFIP_NR_HDR = 0x000080     # also known as SMFIP_NOHREPL
SMFIP_NOUNKNOWN = 0x000100
SMFIP_NODATA = 0x000200
SMFIP_SKIP = 0x000400       # the MTA understands SMFIR_SKIP
SMFIP_RCPT_REJ = 0x000800
SMFIP_NR_CONN = 0x001000
SMFIP_NR_HELO = 0x002000
SMFIP_NR_MAIL = 0x004000
SMFIP_NR_RCPT = 0x008000
SMFIP_NR_DATA = 0x010000
SMFIP_NR_UNKN = 0x020000
SMFIP_NR_EOH = 0x040000
SMFIP_NR_BODY = 0x080000
SMFIP_HDR_LEADSPC = 0x100000  # header values keep their leading space, both ways

# -- macro stages (uint32 in the OPTNEG symbol lists; EOM < EOH is historical) ----
SMFIM_CONNECT = 0
SMFIM_HELO = 1
SMFIM_ENVFROM = 2
SMFIM_ENVRCPT = 3
SMFIM_DATA = 4
SMFIM_EOM = 5
SMFIM_EOH = 6


def _milter_names(prefix):
    """value -> name (without the prefix) of every constant of one family, for logs."""
    return {value: name[len(prefix):] for name, value in globals().items()
            if name.startswith(prefix) and not name.endswith('_NAMES')}


SMFIC_NAMES = _milter_names('SMFIC_')
SMFIR_NAMES = _milter_names('SMFIR_')
SMFIF_NAMES = _milter_names('SMFIF_')
SMFIP_NAMES = _milter_names('SMFIP_')
SMFIM_NAMES = _milter_names('SMFIM_')


def describe_milter_flags(value, names):
    """0x41, SMFIF_NAMES -> 'ADDHDRS|CHGFROM' (unknown bits in hex)."""
    parts = [names[bit] for bit in sorted(names) if value & bit]
    unknown = value & ~sum(names)
    if unknown:
        parts.append('0x%x' % unknown)
    return '|'.join(parts) or '0'


# The reply we give to each event unless the MTA agreed that we stay silent.
MILTER_NO_REPLY_FLAGS = {
    SMFIC_CONNECT: SMFIP_NR_CONN, SMFIC_HELO: SMFIP_NR_HELO, SMFIC_MAIL: SMFIP_NR_MAIL,
    SMFIC_RCPT: SMFIP_NR_RCPT, SMFIC_DATA: SMFIP_NR_DATA, SMFIC_HEADER: SMFIP_NR_HDR,
    SMFIC_EOH: SMFIP_NR_EOH, SMFIC_BODY: SMFIP_NR_BODY, SMFIC_UNKNOWN: SMFIP_NR_UNKN,
}

# The modification actions each part of the message needs.
MILTER_PART_ACTIONS = {
    'headers': SMFIF_ADDHDRS | SMFIF_CHGHDRS,
    'body': SMFIF_CHGBODY,
    'from': SMFIF_CHGFROM,
    'to': SMFIF_ADDRCPT | SMFIF_DELRCPT,
}


class MilterProtocolError(Exception):
    """The MTA broke the framing or sent nonsense; the connection is closed."""


def milter_packet(command, data=b''):
    """One packet: length, command byte, data."""
    return (len(data) + 1).to_bytes(4, 'big') + command + data


def milter_strings(*values):
    """NUL-terminated strings back to back (str is UTF-8 encoded, bytes kept)."""
    return b''.join(force_bString(value, errors='surrogateescape') + b'\0' for value in values)


def split_milter_strings(data):
    """b'a\\0b\\0' -> [b'a', b'b']. A missing final NUL is tolerated."""
    if data.endswith(b'\0'):
        data = data[:-1]
    return data.split(b'\0') if data else []


def encode_optneg(version, actions, protocol, symbol_lists=None):
    """OPTNEG packet; symbol_lists ({SMFIM stage: 'i {auth_type}'}) is appended as the
    symbol-list extension (stage uint32 + space separated names)."""
    data = version.to_bytes(4, 'big') + actions.to_bytes(4, 'big') + protocol.to_bytes(4, 'big')
    for stage, names in sorted((symbol_lists or {}).items()):
        data += stage.to_bytes(4, 'big') + milter_strings(names)
    return milter_packet(SMFIR_OPTNEG, data)


def parse_optneg(data):
    """OPTNEG data -> (version, actions, protocol)."""
    if len(data) < 12:
        raise MilterProtocolError('OPTNEG with %d data bytes, 12 needed' % len(data))
    return (int.from_bytes(data[0:4], 'big'), int.from_bytes(data[4:8], 'big'),
            int.from_bytes(data[8:12], 'big'))


def parse_milter_macros(data):
    """MACRO data -> (command the macros belong to, {name: value}). Long names come
    in braces ({client_addr}), one-letter names without; both are stored bare."""
    if not data:
        raise MilterProtocolError('MACRO packet without a command code')
    items = split_milter_strings(data[1:])
    macros = {}
    for index in range(0, len(items) - 1, 2):
        name = items[index].decode('utf-8', 'replace')
        if name.startswith('{') and name.endswith('}'):
            name = name[1:-1]
        macros[name] = items[index + 1].decode('utf-8', 'replace')
    return data[:1], macros


def parse_milter_connect(data):
    """CONNECT data -> (hostname, family, port, address). Family b'4', b'6', b'L'
    (unix socket) carry port and address; b'U' (unknown) carries neither."""
    hostname, separator, rest = data.partition(b'\0')
    if not separator or not rest:
        raise MilterProtocolError('CONNECT without a protocol family')
    family, port, address = rest[:1], 0, ''
    if family != b'U' and len(rest) >= 3:
        port = int.from_bytes(rest[1:3], 'big')
        strings = split_milter_strings(rest[3:])
        address = strings[0].decode('utf-8', 'replace') if strings else ''
    return hostname.decode('utf-8', 'replace'), family, port, address


def encode_header_packet(command, name, value, index=None):
    """ADDHEADER (index None), INSHEADER or CHGHEADER; name and value are bytes."""
    data = name + b'\0' + value + b'\0'
    if index is not None:
        data = index.to_bytes(4, 'big') + data
    return milter_packet(command, data)




def milter_reply_code(code, text, enhanced=None):
    """SMFIR_REPLYCODE packet Postfix accepts (milter8.c): every line is
    'ddd x.y.z text' ('ddd-' on all but the last, lines joined by CRLF), the first
    digit 4 or 5, the enhanced code of the same class, '%' doubled (the MTA runs the
    text through a printf-style formatter), no NUL inside."""
    code = int(code)
    if code // 100 not in (4, 5):
        raise ValueError('milter reply codes must be 4xx or 5xx, not %d' % code)
    klass = str(code)[0]
    lines = re.split(r'\r\n|\r|\n', force_uString(text or '').replace('\0', ' '))
    lines = [line.strip() for line in lines if line.strip()][:20] or ['']
    if enhanced is None or not enhanced.startswith(klass + '.'):
        enhanced = '%s.7.1' % klass
    first_word = lines[0].split(' ', 1)[0]
    if ENHANCED_CODE_RE.match(first_word) and first_word[0] == klass:
        enhanced = first_word
    out = []
    for number, line in enumerate(lines):
        word, _, rest = line.partition(' ')
        if ENHANCED_CODE_RE.match(word) and word[0] == klass:
            line = rest
        separator = ' ' if number == len(lines) - 1 else '-'
        out.append(('%d%s%s %s' % (code, separator, enhanced, line[:400])).rstrip().replace('%', '%%'))
    return milter_packet(SMFIR_REPLYCODE, milter_strings('\r\n'.join(out)))


class MilterPacketDecoder(object):
    """Splits a byte stream into (command, data) packets: several packets may come in
    one read and one packet over several reads. ``feed(bytes)`` adds input,
    ``next_packet()`` returns the next complete packet or None, ``pending()`` the
    number of bytes of an incomplete packet. A length of 0 or above
    ``max_packet_size`` raises MilterProtocolError before anything is buffered for it."""

    def __init__(self, max_packet_size):
        self.max_packet_size = max_packet_size
        self.buffer = bytearray()
        self.position = 0

    def feed(self, data):
        if self.position and self.position == len(self.buffer):
            self.buffer = bytearray(data)
            self.position = 0
        else:
            self.buffer += data

    def pending(self):
        return len(self.buffer) - self.position

    def next_packet(self):
        buffer, start = self.buffer, self.position
        available = len(buffer) - start
        if available < 4:
            self._compact()
            return None
        length = int.from_bytes(buffer[start:start + 4], 'big')
        if length == 0:
            raise MilterProtocolError('packet of length 0 (the command byte is missing)')
        if length > self.max_packet_size:
            raise MilterProtocolError('packet of %d bytes exceeds milter_max_packet_size %d'
                                      % (length, self.max_packet_size))
        if available < 4 + length:
            self._compact()
            return None
        command = bytes(buffer[start + 4:start + 5])
        data = bytes(buffer[start + 5:start + 4 + length])
        self.position = start + 4 + length
        return command, data

    def _compact(self):
        if self.position:
            del self.buffer[:self.position]
            self.position = 0


class MilterReader(object):
    """Packets from a socket. ``read_packet()`` -> (command, data); raises
    ConnectionClosed at EOF between packets (the MTA may leave at any time) and
    MilterProtocolError for broken framing, including EOF inside a packet."""

    def __init__(self, sock, max_packet_size, deadline=None, idle=None):
        self.sock = sock
        self.decoder = MilterPacketDecoder(max_packet_size)
        self.clock = ReadDeadline(sock, deadline, idle)

    def read_packet(self):
        decoder = self.decoder
        while True:
            packet = decoder.next_packet()
            if packet is not None:
                return packet
            self.clock.check()
            try:
                chunk = self.sock.recv(READ_SIZE)
            except OSError as error:
                if not is_timeout(error):
                    raise ConnectionClosed(str(error))
                self.clock.check(grace=1.5)   # a timeout cut to the deadline: DeadlineExpired
                raise ConnectionClosed('timeout')
            if not chunk:
                if decoder.pending():
                    raise MilterProtocolError('connection closed inside a packet (%d bytes of it read)'
                                              % decoder.pending())
                raise ConnectionClosed('EOF')
            decoder.feed(chunk)



MILTER_CONTINUE = milter_packet(SMFIR_CONTINUE)
MILTER_PROGRESS = milter_packet(SMFIR_PROGRESS)
MILTER_SKIP = milter_packet(SMFIR_SKIP)
MILTER_HEADER_NAME_RE = re.compile(rb'[\x21-\x39\x3b-\x7e]+\Z')   # RFC 5322 2.2: no colon
MILTER_HEADER_FIELD_RE = re.compile(rb'^([^:\s][^:\r\n]*):(.*(?:\r?\n[ \t].*)*)', re.MULTILINE)


def split_message_source(source):
    """Message bytes -> (header block, body); the blank line belongs to neither."""
    if source.startswith(b'\r\n') or source.startswith(b'\n'):
        return b'', source[2 if source.startswith(b'\r\n') else 1:]
    match = HEADER_END_RE.search(source)
    if match is None:
        return source, b''
    return source[:match.start()], source[match.end():]


def parse_header_block(block):
    """b'A: 1\\r\\nB: 2\\r\\n\\t3' -> [(b'A', b' 1'), (b'B', b' 2\\r\\n\\t3')]: each value is
    everything after the colon, continuation lines included, without the line end."""
    headers = []
    for match in MILTER_HEADER_FIELD_RE.finditer(block):
        value = match.group(2)
        if value.endswith(b'\r'):
            value = value[:-1]
        headers.append((match.group(1), value))
    return headers


def clean_milter_address(argument):
    """'<a@b>' (as MAIL/RCPT arguments arrive) -> 'a@b'."""
    address = argument.strip()
    if address.startswith('<') and address.endswith('>'):
        address = address[1:-1].strip()
    return address


class MilterMode(object):
    """[milter] milter_mode and milter_mode_options, resolved once per configuration.

    readonly: change nothing, ask for no modification rights.
    tags: add fuglu's headers; replace what the tag milter_replace names (all, body,
    headers, from, to). manual: add fuglu's headers; replace the parts listed in
    milter_mode_options. auto, autoheaders, autofrom, autoto (combinable): add fuglu's
    headers and write back what the plugins changed (auto = headers, body, sender
    and recipients). replace_demo: replace the whole message by a notice (tests).
    Option prepend: added headers go on top (INSHEADER 0) instead of the bottom.

    Attributes: name, readonly, tags, demo, auto_parts, forced_parts (sets of
    'headers', 'body', 'from', 'to'), prepend, actions (SMFIF_* rights to ask for).
    """

    AUTO_WORDS = {'auto': ('headers', 'body', 'from', 'to'), 'autoheaders': ('headers',),
                  'autofrom': ('from',), 'autoto': ('to',)}
    SINGLE_WORDS = ('readonly', 'tags', 'manual', 'replace_demo')

    def __init__(self, config, logger=None):
        logger = logger or logging.getLogger('fuglu.milter')
        words = parse_list(config.get('milter', 'milter_mode'), lower=True)
        known = [word for word in words if word in self.AUTO_WORDS or word in self.SINGLE_WORDS]
        if len(known) != len(words):
            logger.error('milter_mode: ignoring unknown words %s', [w for w in words if w not in known])
        options = set(parse_list(config.get('milter', 'milter_mode_options'), lower=True))
        self.prepend = 'prepend' in options
        parts = set(MILTER_PART_ACTIONS) if 'all' in options else options & set(MILTER_PART_ACTIONS)
        self.auto_parts, self.forced_parts = set(), set()
        if len(known) == 1 and known[0] in self.SINGLE_WORDS:
            self.name = known[0]
        elif known and all(word in self.AUTO_WORDS for word in known):
            self.name = ','.join(known)
            for word in known:
                self.auto_parts.update(self.AUTO_WORDS[word])
        else:
            logger.error('milter_mode %r is not a valid mode or combination, using tags', ','.join(words))
            self.name = 'tags'
        self.readonly = self.name == 'readonly'
        self.tags = self.name == 'tags'
        self.demo = self.name == 'replace_demo'
        if self.name == 'manual':
            self.forced_parts = parts
        every_part = set(MILTER_PART_ACTIONS)
        wanted = every_part if (self.tags or self.demo) else self.auto_parts | self.forced_parts
        self.actions = 0
        if not self.readonly:
            self.actions = SMFIF_ADDHDRS   # fuglu's own X-Fuglu-* headers, in every writing mode
            for part in wanted:
                self.actions |= MILTER_PART_ACTIONS[part]


class MilterPlugin(BasicPlugin):
    """A plugin that acts while the MTA is still talking, before the message is
    complete ([main] mplugins; milter connector only; FuGlu's mplugins idea, small).

    Override ``state`` (class attribute): the stages to run at, from 'connect',
    'helo', 'mailfrom', 'rcpt', 'header', 'eoh', 'eob'; and one method per stage:

        examine_connect(session, hostname, address)
        examine_helo(session, helo)
        examine_mailfrom(session, sender)
        examine_rcpt(session, recipient)
        examine_header(session, name, value)     str, value without the leading space
        examine_eoh(session)
        examine_eob(session, suspect)            the whole message, before the scanners

    Return DUNNO or None to go on, or ACCEPT / DELETE / REJECT / DEFER, optionally as
    (action, message). The first plugin with a decision ends the stage: REJECT
    answers ``550 5.7.1 <message>``, DEFER ``450 4.7.1 <message>``, DELETE discards
    (not allowed at connect/helo: answered with a temporary failure), ACCEPT accepts.
    A decision at eob replaces the scanners' verdict. A rejected recipient is not
    recorded. ``session`` is the MilterSession: helo, hostname, client_address,
    sender, recipients, headers, get_macro(name), queue_id(), tags (per connection;
    'skipmplugins' = comma separated class names to skip), logger.
    A stage without plugins is negotiated as no-reply, so the MTA never waits for it.
    """

    state = []
    STAGES = ('connect', 'helo', 'mailfrom', 'rcpt', 'header', 'eoh', 'eob')


class MilterProgressWatch(object):
    """One thread per milter connector that keeps the MTA patient: a session whose
    message has been scanning for ``interval`` seconds gets an SMFIR_PROGRESS packet,
    and another one every interval after that (Postfix restarts its
    milter_content_timeout on each). The thread starts with the first watched session."""

    def __init__(self, interval):
        self.interval = interval
        self.lock = threading.Lock()
        self.sessions = {}    # session -> time the next keep-alive is due
        self.thread = None

    def watch(self, session):
        if self.interval <= 0:
            return
        with self.lock:
            self.sessions[session] = time.time() + self.interval
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name='milter-progress')
                self.thread.daemon = True
                self.thread.start()

    def unwatch(self, session):
        with self.lock:
            self.sessions.pop(session, None)

    def _run(self):
        tick = min(self.interval / 2.0, 1.0)
        while True:
            time.sleep(tick)
            now = time.time()
            with self.lock:
                due = [session for session, when in self.sessions.items() if when <= now]
                for session in due:
                    self.sessions[session] = now + self.interval
            for session in due:
                session.send_progress()


class MilterSession(object):
    """One milter connection from the MTA: option negotiation, then any number of
    messages (Postfix opens one milter connection per SMTP connection).

    Events dispatch by command name to ``on_<name>(data)`` (on_connect, on_mail,
    on_bodyeob ...). A handler returns None (= continue) or a reply packet; the
    reply is sent only if the event was not negotiated as no-reply. OPTNEG and
    BODYEOB answer themselves. Any internal error becomes a temporary failure (at
    once where a reply is due, else at the end of the message); EOF at any point ends
    the session quietly; broken framing closes it with a log line.

    Per connection: version, actions, protocol (negotiated), hostname,
    client_address, client_port, helo, connection-stage macros, tags.
    Per message (reset at the end of the message, ABORT and QUIT_NC): sender,
    recipients, headers (list of (name, value) bytes as received), body, the
    message-stage macros.
    """

    CONNECTION_MACRO_STAGES = (SMFIC_CONNECT, SMFIC_HELO)
    # where get_macro() looks first: the latest stage of the message
    MACRO_LOOKUP_ORDER = (SMFIC_BODYEOB, SMFIC_EOH, SMFIC_HEADER, SMFIC_DATA, SMFIC_RCPT,
                          SMFIC_MAIL, SMFIC_HELO, SMFIC_CONNECT, SMFIC_UNKNOWN)
    STAGE_COMMANDS = {'connect': SMFIC_CONNECT, 'helo': SMFIC_HELO, 'mailfrom': SMFIC_MAIL,
                      'rcpt': SMFIC_RCPT, 'header': SMFIC_HEADER, 'eoh': SMFIC_EOH}
    HANDLERS = {}   # command -> method, filled in below the class

    def __init__(self, connector, sock, peer):
        self.connector = connector
        self.controller = connector.controller
        self.config = config = connector.controller.config
        self.logger = connector.logger
        self.sock = sock
        self.peer = peer
        max_packet = max(config.getint('milter', 'milter_max_packet_size'), MILTER_CHUNK_SIZE + 1)
        self.reader = MilterReader(sock, max_packet, session_deadline(config),
                                   config.getint('main', 'smtptimeout'))
        self.debug = config.getboolean('milter', 'milter_debug')
        self.max_size = config.getint('main', 'smtp_max_message_size')
        self.trusted = connector.peer_is_trusted(peer[0])
        self.mplugins = connector.milter_plugins()
        self.mode = connector.milter_mode()
        self.stage_plugins = {}
        for stage in MilterPlugin.STAGES:
            self.stage_plugins[stage] = [p for p in self.mplugins if stage in (getattr(p, 'state', None) or ())]
        self.send_lock = threading.Lock()
        self.scanning = False
        self.closing = False
        self.version = MILTER_VERSION
        self.actions = 0
        self.protocol = 0
        self.leading_space = False
        self.macros = {}
        self.reset_connection()

    # -- state ------------------------------------------------------------------
    def reset_connection(self):
        self.macros.clear()
        self.hostname = None
        self.family = None
        self.client_address = None
        self.client_port = None
        self.helo = None
        self.connection_failure = None
        self.connection_refusal = None   # (code, text) for every message: an unusable greeting
        self.tags = {}
        self.reset_message()

    def reset_message(self, keep_macros=False):
        if not keep_macros:
            for command in list(self.macros):
                if command not in self.CONNECTION_MACRO_STAGES:
                    del self.macros[command]
        self.in_message = False
        self.sender = None
        self.mail_arguments = []
        self.recipients = []
        self.rcpt_arguments = {}    # recipient -> RCPT argument as received (for DELRCPT)
        self.headers = []
        self.body = bytearray()
        self.size = 0
        self.oversize = False
        self.message_failure = None
        self.envelope_refusal = None     # (code, text) at end of message: a bad sender/recipient
        self.missing_rights = set()

    def get_macro(self, name, default=None):
        """A macro of the current message or connection, by bare name ('i',
        'client_addr'); the latest stage wins."""
        name = name.strip('{}')
        for command in self.MACRO_LOOKUP_ORDER:
            stage = self.macros.get(command)
            if stage and name in stage:
                return stage[name]
        return default

    def all_macros(self):
        merged = {}
        for command in reversed(self.MACRO_LOOKUP_ORDER):
            merged.update(self.macros.get(command) or {})
        return merged

    def queue_id(self):
        return self.get_macro('i')

    def label(self):
        """Log prefix: the MTA peer and Postfix's queue id once it is known."""
        queue_id = self.get_macro('i')
        label = 'milter %s:%s' % tuple(self.peer[:2])
        return '%s queueid=%s' % (label, queue_id) if queue_id else label

    # -- output -----------------------------------------------------------------
    def send(self, *packets):
        data = b''.join(packets)
        if self.debug:
            self.log_packets('>', data)
        with self.send_lock:
            try:
                self.sock.sendall(data)
            except OSError as error:
                raise ConnectionClosed(str(error))

    def send_progress(self):
        """Called by the progress watch thread while a message is scanned."""
        with self.send_lock:
            if not self.scanning:
                return
            try:
                self.sock.sendall(MILTER_PROGRESS)
            except OSError:
                return
        if self.debug:
            self.logger.debug('%s: > PROGRESS', self.label())

    def log_packets(self, direction, data):
        decoder = MilterPacketDecoder(len(data) + 1)
        decoder.feed(data)
        while True:
            packet = decoder.next_packet()
            if packet is None:
                break
            command, payload = packet
            names = SMFIC_NAMES if direction == '<' else SMFIR_NAMES
            self.logger.debug('%s: %s %s %r', self.label(), direction, names.get(command, command), payload[:200])

    # -- main loop --------------------------------------------------------------
    def run(self):
        try:
            while not self.closing:
                command, data = self.reader.read_packet()
                if self.debug:
                    self.logger.debug('%s: < %s %r', self.label(), SMFIC_NAMES.get(command, command), data[:200])
                self.dispatch(command, data)
        except DeadlineExpired:
            # the MTA applies its milter_default_action (Postfix: tempfail)
            self.logger.warning('%s: milter connection longer than max_session_time (%ss), closing',
                                self.label(), self.config.get('main', 'max_session_time'))
        except ConnectionClosed as why:
            self.logger.debug('%s: milter connection closed: %s', self.label(), why)
        except MilterProtocolError as error:
            self.logger.warning('%s: milter protocol error, closing the connection: %s', self.label(), error)
        finally:
            self.scanning = False
            self.connector.progress.unwatch(self)

    def dispatch(self, command, data):
        handler = self.HANDLERS.get(command)
        if handler is None:
            raise MilterProtocolError('unknown command %r with %d data bytes' % (command, len(data)))
        try:
            reply = handler(self, data)
        except (ConnectionClosed, MilterProtocolError):
            raise
        except Exception:
            trace = traceback.format_exc()
            name = SMFIC_NAMES[command]
            self.logger.error('%s: handling %s failed: %s', self.label(), name, trace)
            self.controller.record_exception(trace)
            if self.in_message or command in (SMFIC_MAIL, SMFIC_BODYEOB):
                self.message_failure = 'internal problem at %s' % name
            else:
                self.connection_failure = 'internal problem at %s' % name
            reply = milter_reply_code(451, '4.3.0 internal problem - try again later')
            if command == SMFIC_BODYEOB:    # the verdict is due right now
                self.reset_message()
                return self.send(reply)
        no_reply_flag = MILTER_NO_REPLY_FLAGS.get(command)
        if no_reply_flag is None:
            return      # OPTNEG and BODYEOB answered already; MACRO, ABORT, QUIT get no reply
        if self.protocol & no_reply_flag:
            if reply is not None:
                # negotiated as no-reply: answering now would desynchronise the MTA
                self.logger.warning('%s: cannot answer %s (negotiated as no-reply); dropping the answer',
                                    self.label(), SMFIC_NAMES[command])
            return
        self.send(reply or MILTER_CONTINUE)

    # -- events -----------------------------------------------------------------
    def on_optneg(self, data):
        version, actions, protocol = parse_optneg(data)
        if version < 2:
            raise MilterProtocolError('the MTA offers milter protocol version %d; 2 or later needed' % version)
        self.version = min(version, MILTER_VERSION)
        self.actions = self.mode.actions & actions
        if self.mode.actions & ~actions:
            self.logger.warning('%s: the MTA does not offer %s, needed by milter_mode %s', self.label(),
                                describe_milter_flags(self.mode.actions & ~actions, SMFIF_NAMES), self.mode.name)
        # Ask only for what we use: no reply to stages without milter plugins, no
        # unknown SMTP commands, header values with their leading space (so the
        # message is rebuilt byte for byte), SKIP for oversize bodies.
        wanted = SMFIP_HDR_LEADSPC | SMFIP_NOUNKNOWN | SMFIP_NR_UNKN | SMFIP_NR_DATA | SMFIP_NR_BODY | SMFIP_SKIP
        for stage, command in self.STAGE_COMMANDS.items():
            if not self.stage_plugins[stage]:
                wanted |= MILTER_NO_REPLY_FLAGS[command]
        self.protocol = wanted & protocol
        self.leading_space = bool(self.protocol & SMFIP_HDR_LEADSPC)
        self.logger.debug('%s: negotiated version %d, actions %s, protocol %s (offered %d, %s, %s)', self.label(),
                          self.version, describe_milter_flags(self.actions, SMFIF_NAMES),
                          describe_milter_flags(self.protocol, SMFIP_NAMES), version,
                          describe_milter_flags(actions, SMFIF_NAMES), describe_milter_flags(protocol, SMFIP_NAMES))
        self.send(encode_optneg(self.version, self.actions, self.protocol))

    def on_macro(self, data):
        command, macros = parse_milter_macros(data)
        self.macros[command] = macros

    def on_connect(self, data):
        hostname, family, port, address = parse_milter_connect(data)
        if CONTROL_CHARACTER_RE.search(hostname):
            hostname = 'unknown'   # reverse DNS is the client's to choose; Postfix sends LDH names
        if address.lower().startswith('ipv6:'):
            address = address[5:]
        self.hostname, self.family, self.client_port = hostname, family, port
        self.client_address = address if family in (b'4', b'6') else ''
        return self.run_stage('connect', hostname, self.client_address)

    def on_helo(self, data):
        strings = split_milter_strings(data)
        helo = strings[0].decode('utf-8', 'replace') if strings else ''
        if CONTROL_CHARACTER_RE.search(helo):
            self.helo = None
            return self.refuse_envelope(SMFIC_HELO, 501, '5.5.4 Syntax error in HELO: control '
                                                         'character', True)
        self.helo = helo
        return self.run_stage('helo', self.helo)

    def on_mail(self, data):
        arguments = [item.decode('utf-8', 'replace') for item in split_milter_strings(data)]
        if not arguments:
            raise MilterProtocolError('MAIL without a sender')
        if self.in_message:     # MAIL without ABORT: a new transaction all the same
            self.reset_message(keep_macros=True)
        sender = clean_milter_address(arguments[0])
        self.in_message = True
        if envelope_address_problem(sender):
            self.sender = ''   # never stored, forwarded or written into a header
            return self.refuse_envelope(SMFIC_MAIL, 501, '5.1.7 Bad sender address syntax')
        problems = [esmtp_parameter_problem(argument) for argument in arguments[1:]]
        if any(problems):
            return self.refuse_envelope(SMFIC_MAIL, 501, '5.5.4 Syntax error in MAIL: %s'
                                        % [problem for problem in problems if problem][0])
        self.sender = sender
        self.mail_arguments = arguments[1:]
        return self.run_stage('mailfrom', self.sender)

    def on_rcpt(self, data):
        arguments = [item.decode('utf-8', 'replace') for item in split_milter_strings(data)]
        if not arguments:
            raise MilterProtocolError('RCPT without a recipient')
        recipient = clean_milter_address(arguments[0])
        if envelope_address_problem(recipient) or any(map(esmtp_parameter_problem, arguments[1:])):
            return self.refuse_envelope(SMFIC_RCPT, 501, '5.1.3 Bad recipient address syntax')
        reply = self.run_stage('rcpt', recipient)
        if reply is None or reply[4:5] == SMFIR_ACCEPT:
            self.recipients.append(recipient)
            self.rcpt_arguments.setdefault(recipient, arguments[0])
        return reply

    def refuse_envelope(self, command, code, text, whole_connection=False):
        """Envelope text fuglu will not take (control characters, unbalanced
        brackets): refused at once when the MTA waits for an answer to ``command``;
        else (negotiated as no-reply) the message is refused with 550 at its end, or
        with ``whole_connection`` every message of the connection."""
        self.logger.warning('%s: %s refused: %s', self.label(), SMFIC_NAMES[command], text)
        if command == SMFIC_MAIL:
            self.in_message = False
        if not self.protocol & MILTER_NO_REPLY_FLAGS[command]:
            return milter_reply_code(code, text)
        refusal = (550, text)
        if whole_connection:
            self.connection_refusal = self.connection_refusal or refusal
        else:
            self.in_message = True
            self.envelope_refusal = self.envelope_refusal or refusal
        return None

    def on_data(self, data):
        return None

    def on_header(self, data):
        items = split_milter_strings(data)
        if not items or not items[0]:
            raise MilterProtocolError('HEADER without a name')
        name, value = items[0], (items[1] if len(items) > 1 else b'')
        if not MILTER_HEADER_NAME_RE.match(name):
            # Postfix only sends RFC 5322 field names; anything else would change the
            # structure of fuglu's copy of the message
            raise MilterProtocolError('HEADER with a malformed name %r' % name[:60])
        self.size += len(name) + len(value) + 4
        if self.max_size and self.size > self.max_size:
            self.drop_oversize()   # headers count towards smtp_max_message_size like the body
            return None
        self.headers.append((name, value))
        if self.stage_plugins['header']:
            return self.run_stage('header', name.decode('utf-8', 'replace'),
                                  value.decode('utf-8', 'replace').lstrip(' '))
        return None

    def on_eoh(self, data):
        return self.run_stage('eoh')

    def on_body(self, data):
        self.size += len(data)
        if self.max_size and self.size > self.max_size:
            self.drop_oversize()
            # SKIP only where the MTA waits for an answer to BODY (else it cannot be sent)
            can_answer = self.protocol & SMFIP_SKIP and not self.protocol & SMFIP_NR_BODY
            return MILTER_SKIP if can_answer else None
        self.body += data
        return None

    def drop_oversize(self):
        """The message passed smtp_max_message_size: keep nothing more of it; it is
        refused (452 4.3.4, as FuGlu does) at its end."""
        if not self.oversize:
            self.logger.warning('%s: message over smtp_max_message_size %d (headers and body), '
                                'will be refused', self.label(), self.max_size)
            self.oversize = True
            self.headers = []
            self.body = bytearray()

    def on_bodyeob(self, data):
        if data:    # Sendmail may attach the last body chunk; Postfix never does
            self.on_body(data)
        try:
            self.end_of_message()
        finally:
            self.reset_message()

    def on_abort(self, data):
        self.reset_message()

    def on_quit(self, data):
        self.closing = True

    def on_quit_nc(self, data):
        self.reset_connection()

    def on_unknown(self, data):
        return None

    # -- milter-stage plugins ------------------------------------------------------
    def run_stage(self, stage, *args):
        """Run the milter plugins of one stage; None to go on, else the reply packet."""
        plugins = self.stage_plugins.get(stage)
        if not plugins:
            return None
        action, message = self.stage_verdict(stage, plugins, args)
        if action == DUNNO:
            return None
        if action == ACCEPT:
            return milter_packet(SMFIR_ACCEPT)
        if action == DELETE:
            if stage in ('connect', 'helo'):
                self.logger.error('%s: DELETE (discard) is not allowed at %s; answering with a temporary failure',
                                  self.label(), stage)
                return milter_reply_code(451, '4.7.1 Try again later')
            return milter_packet(SMFIR_DISCARD)
        if action == REJECT:
            return milter_reply_code(550, message or 'Rejected by content scanner')
        return milter_reply_code(450, message or 'Try again later')

    def stage_verdict(self, stage, plugins, args):
        """(action, message) of the first plugin with a decision, else (DUNNO, None).
        A plugin that raises is logged and skipped (fail-open, like the scanners)."""
        skipped = set(parse_list(force_uString(self.tags.get('skipmplugins', ''))))
        for plugin in plugins:
            if plugin.__class__.__name__ in skipped:
                continue
            try:
                result = getattr(plugin, 'examine_' + stage)(self, *args)
            except Exception as error:
                trace = traceback.format_exc()
                self.logger.error('%s: milter plugin %s failed at %s: %s: %s', self.label(), plugin, stage,
                                  error.__class__.__name__, error)
                self.logger.debug(trace)
                self.controller.record_exception(trace)
                continue
            code, text = result if isinstance(result, tuple) else (result, None)
            if code is None or code == DUNNO:
                continue
            if code not in (ACCEPT, DELETE, REJECT, DEFER):
                self.logger.error('%s: milter plugin %s returned an invalid action %r at %s, ignored',
                                  self.label(), plugin, code, stage)
                continue
            self.logger.info('%s: milter plugin %s at %s: %s %s', self.label(), plugin, stage,
                             actioncode_to_string(code), text or '')
            return code, text
        return DUNNO, None

    # -- end of message -----------------------------------------------------------
    def end_of_message(self):
        failure = self.connection_failure or self.message_failure
        if failure:
            self.logger.error('%s: %s earlier in this message; deferring it', self.label(), failure)
            return self.send(milter_reply_code(451, '4.3.0 internal problem - message deferred'))
        refusal = self.connection_refusal or self.envelope_refusal
        if refusal:
            self.logger.warning('%s: message refused for its envelope: %s %s', self.label(),
                                *refusal)
            return self.send(milter_reply_code(*refusal))
        if self.oversize:
            return self.send(milter_reply_code(452, '4.3.4 message size exceeds fixed maximum message size %d'
                                                    % self.max_size))
        suspect = self.build_suspect()
        if suspect is None:
            return
        session = ScanSession(self.controller)
        action = DEFER
        self.scanning = True
        self.connector.progress.watch(self)
        try:
            action, message = self.stage_verdict('eob', self.stage_plugins['eob'], (suspect,))
            if action == DUNNO:
                action, message = session.scan(suspect)
            packets = self.verdict_packets(session, suspect, action, message)
        except Exception:
            trace = traceback.format_exc()
            self.logger.error('%s: processing failed, deferring: %s', suspect.id, trace)
            self.controller.record_exception(trace)
            action = DEFER
            packets = [milter_reply_code(451, '4.3.0 internal problem - message deferred (%s)' % suspect.id)]
        answered = self.send_verdict(packets)
        self.logger.info('%s queueid=%s: milter verdict %s%s', suspect.id, suspect.queue_id,
                         actioncode_to_string(action), '' if answered else ' (the MTA was gone)')
        session.finish(suspect, action, answered and action in (DUNNO, ACCEPT))
        if not answered:
            raise ConnectionClosed('the MTA left before the verdict')

    def send_verdict(self, packets):
        """Stop the keep-alives and send modifications + verdict in one write.
        Returns False when the MTA is gone."""
        data = b''.join(packets)
        with self.send_lock:
            self.scanning = False
            try:
                self.sock.sendall(data)
                answered = True
            except OSError:
                answered = False
        self.connector.progress.unwatch(self)
        if self.debug:
            self.log_packets('>', data)
        return answered

    def build_suspect(self):
        """The Suspect of the finished message, or None after refusing an envelope
        that fails the address checks."""
        config = self.config
        sender = self.sender or ''
        checker = config.get('main', 'address_compliance_checker')
        maxsize = config.getint('main', 'address_compliance_checker_maxsize')
        addresses = ([sender] if sender else []) + self.recipients
        if not all(address_is_valid(address, checker, maxsize) for address in addresses):
            action = config.get('main', 'address_compliance_fail_action').strip().lower()
            text = config.get('main', 'address_compliance_fail_message')
            self.logger.warning('%s: invalid envelope address in %s, action %s', self.label(), addresses, action)
            if action == 'discard':
                self.send(milter_packet(SMFIR_DISCARD))
            else:
                self.send(milter_reply_code(550 if action == 'reject' else 451, text))
            return None
        suspect = Suspect(sender, list(self.recipients), inbuffer=self.rebuild_message(),
                          queue_id=self.queue_id(), clientinfo=self.clientinfo(), milter_macros=self.all_macros())
        suspect.tags['incomingport'] = self.connector.port
        self.logger.info('%s queueid=%s from=%s, nrec=%d, size=%d, client=%s', suspect.id, suspect.queue_id,
                         sender or '<>', len(suspect.recipients), suspect.size, self.client_address or self.peer[0])
        return suspect

    def rebuild_message(self):
        """The message as the MTA has it: 'name:' + value per header (the value's
        leading space as received with HDR_LEADSPC, else the one space Postfix
        strips), CRLF line ends, a blank line, the body bytes as received."""
        lines = [name + b':' + self.source_value(value) + CRLF for name, value in self.headers]
        lines.append(CRLF)
        lines.append(bytes(self.body))
        return b''.join(lines)

    def source_value(self, value):
        """Header value as received -> as it stands in the message source."""
        if b'\n' in value:      # folded: the MTA separates the lines with LF
            # (an LF not followed by a blank would start a header of its own in
            # fuglu's copy only: it is folded)
            value = re.sub(rb'\r?\n([ \t]?)', lambda match: b'\r\n' + (match.group(1) or b' '),
                           value)
        return value if self.leading_space else b' ' + value

    def mta_value(self, value):
        """Header value as in the message source -> as the MTA wants it."""
        value = value.replace(b'\r\n', b'\n')
        if self.leading_space:
            return value if value[:1] in (b' ', b'\t') else b' ' + value
        return value[1:] if value.startswith(b' ') else value

    def clientinfo(self):
        """(helo, ip, rdns) from CONNECT/HELO when the MTA is trusted to tell."""
        if not self.trusted or not self.client_address:
            return None
        name = self.hostname or ''
        if not name or name.startswith('['):    # Postfix sends [ip] without a reverse name
            name = 'unknown'
        return self.helo or '', self.client_address, name

    # -- verdict and modifications --------------------------------------------------
    def verdict_packets(self, session, suspect, action, message):
        if action in (DUNNO, ACCEPT):
            return self.modification_packets(suspect) + [MILTER_CONTINUE]
        text = session.reply_text(suspect, action, message)
        if action == DELETE:
            return [milter_packet(SMFIR_DISCARD)]
        if action == REJECT:
            return [milter_reply_code(550, text)]
        return [milter_reply_code(450, text)]

    def modification_packets(self, suspect):
        """What to change in the MTA's copy, per milter_mode (spec 4.4.5), in the
        order sender, recipients, headers, fuglu's headers, body (body replacement
        must not be interleaved with other changes)."""
        mode = self.mode
        if mode.readonly:
            return []
        if mode.demo:
            return self.demo_packets(suspect)
        forced = set(mode.forced_parts)
        if mode.tags:
            wanted = force_uString(suspect.tags.get('milter_replace') or '').lower()
            forced = set(MILTER_PART_ACTIONS) if 'all' in wanted else {p for p in MILTER_PART_ACTIONS if p in wanted}
        auto = mode.auto_parts
        packets = []
        if 'from' in forced or ('from' in auto and suspect.orig_from_address_changed()):
            self.modify(packets, SMFIF_CHGFROM, milter_packet(SMFIR_CHGFROM, milter_strings(
                '<%s>' % suspect.from_address)), 'change the sender')
        if 'to' in forced or ('to' in auto and suspect.orig_recipients_changed()):
            self.recipient_packets(suspect, packets)
        body_packets = []
        if suspect.is_modified() or 'headers' in forced or 'body' in forced:
            original_headers = [(name, self.source_value(value)) for name, value in self.headers]
            header_block, body = split_message_source(suspect.get_source())
            current_headers = parse_header_block(header_block)
            if 'headers' in forced:
                self.delete_headers(packets, original_headers)
                self.add_headers(packets, current_headers)
            elif 'headers' in auto and current_headers != original_headers:
                self.header_diff_packets(packets, original_headers, current_headers)
            if 'body' in forced or ('body' in auto and body != bytes(self.body)):
                body_packets = self.body_packets(body)
        added = []
        for name, value in suspect.addheaders.items():
            encoded = encode_header(name, value)
            colon = encoded.index(b':')
            added.append((encoded[:colon], encoded[colon + 1:-2]))
        self.add_headers(packets, added)
        for packet in body_packets:
            self.modify(packets, SMFIF_CHGBODY, packet, 'replace the body')
        return packets

    def modify(self, packets, right, packet, what):
        """Queue a change if its right was negotiated; else log (once per kind)."""
        if self.actions & right:
            packets.append(packet)
        elif right not in self.missing_rights:
            self.missing_rights.add(right)
            self.logger.error('%s: cannot %s: %s was not negotiated with the MTA', self.label(), what,
                              describe_milter_flags(right, SMFIF_NAMES))

    def recipient_packets(self, suspect, packets):
        """Delete the recipients that are gone, add the new ones (the same end result
        as FuGlu's delete-all-then-add, without touching kept recipients)."""
        original, current = suspect.original_recipients, suspect.recipients
        for recipient in original:
            if recipient not in current:
                argument = self.rcpt_arguments.get(recipient, '<%s>' % recipient)
                self.modify(packets, SMFIF_DELRCPT, milter_packet(SMFIR_DELRCPT, milter_strings(argument)),
                            'delete a recipient')
        for recipient in current:
            if recipient not in original:
                self.modify(packets, SMFIF_ADDRCPT, milter_packet(SMFIR_ADDRCPT, milter_strings(
                    '<%s>' % recipient)), 'add a recipient')

    def delete_headers(self, packets, headers):
        """Delete every header listed, highest index first per name, so the indexes
        of the ones still to delete never shift."""
        counts, names = {}, {}
        for name, _value in headers:
            key = name.lower()
            counts[key] = counts.get(key, 0) + 1
            names.setdefault(key, name)
        for key, count in counts.items():
            for index in range(count, 0, -1):
                self.modify(packets, SMFIF_CHGHDRS, encode_header_packet(SMFIR_CHGHEADER, names[key], b'', index),
                            'delete a header')

    def add_headers(self, packets, headers):
        """ADDHEADER (bottom of the header block), or with the mode option prepend
        INSHEADER at index 0 (on top, in the given order)."""
        if self.mode.prepend:
            for name, value in reversed(headers):
                self.modify(packets, SMFIF_ADDHDRS, encode_header_packet(
                    SMFIR_INSHEADER, name, self.mta_value(value), 0), 'insert a header')
        else:
            for name, value in headers:
                self.modify(packets, SMFIF_ADDHDRS, encode_header_packet(
                    SMFIR_ADDHEADER, name, self.mta_value(value)), 'add a header')

    def header_diff_packets(self, packets, original, current):
        """Per header name: change the values that differ (CHGHEADER index n), delete
        the surplus originals (from the highest index down), add the new ones."""
        def by_name(headers):
            table = {}
            for name, value in headers:
                table.setdefault(name.lower(), (name, []))[1].append(value)
            return table
        before, after = by_name(original), by_name(current)
        added = []
        for key, (name, old_values) in before.items():
            new_values = after.get(key, (name, []))[1]
            for index in range(len(old_values), len(new_values), -1):
                self.modify(packets, SMFIF_CHGHDRS, encode_header_packet(SMFIR_CHGHEADER, name, b'', index),
                            'delete a header')
            for index in range(min(len(old_values), len(new_values))):
                if old_values[index] != new_values[index]:
                    self.modify(packets, SMFIF_CHGHDRS, encode_header_packet(
                        SMFIR_CHGHEADER, name, self.mta_value(new_values[index]), index + 1), 'change a header')
            added.extend((name, value) for value in new_values[len(old_values):])
        for key, (name, new_values) in after.items():
            if key not in before:
                added.extend((name, value) for value in new_values)
        self.add_headers(packets, added)

    def body_packets(self, body):
        """REPLBODY chunks of at most 65535 bytes, CRLF line ends."""
        body = re.sub(rb'(?<!\r)\n', b'\r\n', body)
        chunks = [body[start:start + MILTER_CHUNK_SIZE] for start in range(0, len(body), MILTER_CHUNK_SIZE)]
        return [milter_packet(SMFIR_REPLBODY, chunk) for chunk in chunks or [b'']]

    def demo_packets(self, suspect):
        """replace_demo: the whole message becomes a short notice."""
        packets = []
        original = [(name, self.source_value(value)) for name, value in self.headers]
        self.delete_headers(packets, original)
        notice = [(b'From', b' <%s>' % force_bString(suspect.from_address or 'MAILER-DAEMON')),
                  (b'To', b' <%s>' % force_bString(suspect.to_address or 'undisclosed-recipients')),
                  (b'Subject', b' fuglu milter replace_demo')]
        self.add_headers(packets, notice)
        body = ('This message was replaced by fuglu (milter_mode replace_demo).\r\nSuspect: %s\r\n'
                % suspect.id).encode('ascii')
        for packet in self.body_packets(body):
            self.modify(packets, SMFIF_CHGBODY, packet, 'replace the body')
        return packets


MilterSession.HANDLERS = {command: getattr(MilterSession, 'on_' + name.lower())
                          for command, name in SMFIC_NAMES.items()}


class MilterConnector(Connector):
    """Sendmail/Postfix milter (protocol 6): ``smtpd_milters = inet:HOST:PORT`` in
    Postfix, ``milter:PORT`` in incomingport. One MilterSession per connection."""

    protocol = 'milter'
    # no milter packet fits before the MTA's OPTNEG: closing makes the MTA apply its
    # milter_default_action (Postfix: tempfail, "451 4.7.1 Service unavailable")
    busy_reply = b''

    def __init__(self, controller, address, port):
        super().__init__(controller, address, port)
        self.progress = MilterProgressWatch(controller.config.getint('milter', 'milter_progress_interval'))
        self._loaded_for = None
        self._mplugins = []
        self._mode = None
        self.milter_plugins(strict=True)   # a broken mplugins entry stops the start like any plugin

    def _refresh(self, strict=False):
        config = self.controller.config
        if config is self._loaded_for:
            return
        try:
            self._mplugins = load_plugins(config, 'mplugins')
        except PluginLoadError as error:
            if strict:
                raise
            self.logger.error('mplugins failed to load, keeping the previous ones: %s', error)
        self._mode = MilterMode(config, self.logger)
        self._loaded_for = config

    def milter_plugins(self, strict=False):
        """The milter-stage plugins of the current configuration (reloaded with it)."""
        self._refresh(strict)
        return self._mplugins

    def milter_mode(self):
        self._refresh()
        return self._mode

    def serve(self, sock, peer):
        MilterSession(self, sock, peer).run()


CONNECTORS = {
    'smtp': SMTPConnector,
    'esmtp': EsmtpConnector,
    'netcat': NetcatConnector,
    'milter': MilterConnector,
}


###############################################################################
# Backends
###############################################################################

class Backend(object):
    """Runs connection handlers. Contract: ``start()``, ``submit(function, *args)``
    (may block when saturated: that is the back-pressure on the accept loop),
    ``stop()``, ``reconfigure(config)``, ``describe()`` -> str for the control socket.
    """

    name = None

    def __init__(self, config):
        self.config = config

    def start(self):
        pass

    def submit(self, function, *args):
        raise NotImplementedError

    def stop(self):
        pass

    def reconfigure(self, config):
        self.config = config

    def describe(self):
        return ''


class ThreadBackend(Backend):
    """A pool of worker threads between [performance] minthreads and maxthreads
    (FuGlu's semantics). A worker is started when a task arrives and nobody is idle;
    idle workers above minthreads (and minfreethreads) end after a second without
    work. The task queue holds 10 x maxthreads entries."""

    name = 'thread'

    def __init__(self, config):
        super().__init__(config)
        self.lock = threading.Lock()
        self.workers = {}          # thread -> state string
        self.idle = 0
        self.running = False
        self._read_limits(config)
        self.tasks = queue.Queue(maxsize=10 * self.maxthreads)
        self.logger = logging.getLogger('fuglu.threadpool')

    def _read_limits(self, config):
        self.minthreads = max(1, config.getint('performance', 'minthreads'))
        self.maxthreads = max(self.minthreads, config.getint('performance', 'maxthreads'))
        self.minfreethreads = max(0, config.getint('performance', 'minfreethreads'))

    def reconfigure(self, config):
        super().reconfigure(config)
        with self.lock:
            self._read_limits(config)

    def start(self):
        self.running = True
        for _ in range(max(self.minthreads, self.minfreethreads)):
            self._spawn()

    def _spawn(self):
        # called with self.lock held or before start-up finishes
        worker = threading.Thread(target=self._work, name='worker-%d' % (len(self.workers) + 1))
        worker.daemon = True
        self.workers[worker] = 'created'
        self.idle += 1
        worker.start()

    def submit(self, function, *args):
        with self.lock:
            if self.idle <= self.tasks.qsize() and len(self.workers) < self.maxthreads:
                self._spawn()
        self.tasks.put((function, args))

    def _work(self):
        me = threading.current_thread()
        while self.running:
            self.workers[me] = 'waiting for task'
            try:
                task = self.tasks.get(timeout=1)
            except queue.Empty:
                with self.lock:
                    busy = len(self.workers) - self.idle
                    if len(self.workers) > self.minthreads and self.idle - 1 >= self.minfreethreads \
                            and busy < len(self.workers):
                        self.idle -= 1
                        del self.workers[me]
                        return
                continue
            if task is None:
                break
            function, args = task
            with self.lock:
                self.idle -= 1
            self.workers[me] = 'processing'
            try:
                function(*args)
            except Exception:
                self.logger.error('task failed: %s', traceback.format_exc())
            finally:
                with self.lock:
                    self.idle += 1
                self.workers[me] = 'task completed'
        with self.lock:
            self.idle -= 1
            self.workers.pop(me, None)

    def stop(self):
        self.running = False
        # tasks never started: their connections get a temporary failure
        while True:
            try:
                task = self.tasks.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                refuse_queued_connection(*task[1][:1])
        for _ in list(self.workers):
            try:
                self.tasks.put_nowait(None)
            except queue.Full:
                break
        # let messages in flight finish (bounded): a session cut off after the
        # downstream accepted but before Postfix heard 250 would be delivered twice
        deadline = time.time() + self.SHUTDOWN_GRACE
        while time.time() < deadline and any(state == 'processing' for state in list(self.workers.values())):
            time.sleep(0.05)

    SHUTDOWN_GRACE = 10

    def describe(self):
        states = list(self.workers.items())
        lines = ['Total %d worker threads' % len(states)]
        for thread, state in states:
            lines.append('*******')
            lines.append('<[%s]>: %s' % (thread.name, state))
        return '\n'.join(lines)


def refuse_queued_connection(sock):
    try:
        sock.sendall(b'421 4.3.2 Temporarily unavailable... Please try again later.\r\n')
        sock.close()
    except (OSError, AttributeError):
        pass


BACKENDS = {
    'thread': ThreadBackend,
}


###############################################################################
# Listeners
###############################################################################

def parse_incomingport(entry, bindaddress):
    """'10025' | 'proto:port' | 'proto:addr:port' -> (proto, addr, port)."""
    parts = entry.strip().split(':')
    if len(parts) == 1:
        protocol, address, port = 'smtp', bindaddress, parts[0]
    elif len(parts) == 2:
        protocol, address, port = parts[0], bindaddress, parts[1]
    elif len(parts) == 3:
        protocol, address, port = parts
    else:
        raise ValueError('too many ":" in incomingport entry %r' % entry)
    protocol = protocol.strip().lower()
    if not port.strip().isdigit() or not 0 < int(port) < 65536:
        raise ValueError('invalid port in incomingport entry %r' % entry)
    return protocol, address.strip() or bindaddress, int(port)


class ClientSessions(object):
    """Connections open per client address, across all listeners ([performance]
    max_sessions_per_client), so that one client - say 40 connections trickling a byte
    now and then - cannot occupy every worker. ``admit(address, protocol)`` counts a
    new connection in or says no (logged, at most every 10 seconds per address, with
    the number refused meanwhile); ``release(address)`` when it is over."""

    LOG_INTERVAL = 10

    def __init__(self, controller):
        self.controller = controller
        self.lock = threading.Lock()
        self.open = {}       # address -> connections open
        self.refused = {}    # address -> (time of the last log line, refused since)
        self.logger = logging.getLogger('fuglu.ClientSessions')

    def limit(self):
        config = self.controller.config
        value = config.get('performance', 'max_sessions_per_client').strip()
        if value:
            return int(value)
        return max(1, config.getint('performance', 'maxthreads') // 2)

    def admit(self, address, protocol):
        limit = self.limit()
        with self.lock:
            count = self.open.get(address, 0)
            if limit <= 0 or count < limit:
                self.open[address] = count + 1
                return True
            logged, refused = self.refused.get(address, (0, 0))
            now = time.monotonic()
            if now - logged < self.LOG_INTERVAL:
                self.refused[address] = (logged, refused + 1)
                return False
            self.refused[address] = (now, 0)
        self.logger.warning('%s connection from %s refused: %d open, max_sessions_per_client is '
                            '%d (%d more refused since the last message)', protocol, address, count,
                            limit, refused)
        return False

    def release(self, address):
        with self.lock:
            count = self.open.get(address, 0) - 1
            if count > 0:
                self.open[address] = count
            else:
                self.open.pop(address, None)
                self.refused.pop(address, None)


class Listener(object):
    """One listening socket with its accept thread; accepted connections go to the
    backend, which runs ``connector.handle``."""

    def __init__(self, controller, connector, backlog):
        self.controller = controller
        self.connector = connector
        self.logger = logging.getLogger('fuglu.incoming.%s' % connector.port)
        family = socket.AF_INET6 if ':' in connector.address else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((connector.address, connector.port))
        self.sock.listen(backlog if backlog > 0 else socket.SOMAXCONN)
        self.stay_alive = True
        self.thread = threading.Thread(target=self.serve, name='listener-%s' % connector.port)
        self.thread.daemon = True

    def start(self):
        self.thread.start()

    def serve(self):
        warn_ms = self.controller.config.getint('performance', 'slow_enqueue_warn_ms')
        while self.stay_alive:
            try:
                sock, peer = self.sock.accept()
            except OSError:
                if self.stay_alive:
                    self.logger.error('accept failed: %s', traceback.format_exc())
                    time.sleep(0.1)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if not self.controller.client_sessions.admit(peer[0], self.connector.protocol):
                self.connector.refuse_busy(sock)
                continue
            started = time.time()
            self.controller.backend.submit(self.run_session, sock, peer)
            waited = (time.time() - started) * 1000
            if warn_ms and waited > warn_ms:
                self.logger.warning('handing a connection to the workers took %d ms: all busy?', waited)

    def run_session(self, sock, peer):
        try:
            self.connector.handle(sock, peer)
        finally:
            self.controller.client_sessions.release(peer[0])

    def stop(self):
        self.stay_alive = False
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


###############################################################################
# Control server
###############################################################################

class ControlServer(object):
    """The control socket (spec 7.1): one command per connection, a text reply.
    Commands: stats, uptime, workerlist, threadlist, exceptionlist. A unix socket is
    created with mode 0600 from the start; a TCP port needs controltoken unless it is
    bound to loopback. There is no remote Python console."""

    def __init__(self, controller):
        self.controller = controller
        config = controller.config
        self.logger = logging.getLogger('fuglu.control')
        self.spec = config.get('main', 'controlport').strip()
        self.token = config.get('main', 'controltoken').strip()
        self.unix_path = None
        if self.spec.isdigit():
            address = config.get('main', 'controladdress').strip() or '127.0.0.1'
            is_loopback = address in ('localhost',) or ipaddress.ip_address(address).is_loopback
            if not is_loopback and not self.token:
                raise ConfigProblem('controlport %s on %s needs controltoken' % (self.spec, address))
            family = socket.AF_INET6 if ':' in address else socket.AF_INET
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((address, int(self.spec)))
        else:
            self.unix_path = self.spec
            if os.path.exists(self.unix_path):
                os.unlink(self.unix_path)
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old_umask = os.umask(0o177)
            try:
                self.sock.bind(self.unix_path)
            finally:
                os.umask(old_umask)
        self.sock.listen(16)
        self.thread = threading.Thread(target=self.serve, name='control')
        self.thread.daemon = True
        self.running = True

    def start(self):
        self.thread.start()

    def serve(self):
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                if not self.running:
                    return
                continue
            try:
                conn.settimeout(5)
                request = conn.recv(4096).decode('utf-8', 'replace').strip()
                conn.sendall(self.answer(request).encode('utf-8'))
            except Exception as error:
                self.logger.warning('control request failed: %s', error)
            finally:
                conn.close()

    def answer(self, request):
        if self.token and not self.unix_path:
            prefix = 'auth %s ' % self.token
            import hmac
            if not hmac.compare_digest(request[:len(prefix)].encode(), prefix.encode()):
                return 'ERR authentication required\n'
            request = request[len(prefix):]
        command, _, args = request.lower().partition(' ')
        controller = self.controller
        if command == 'stats':
            return controller.stats.report()
        if command == 'uptime':
            start = controller.stats.starttime
            return 'Fuglu was started on %s\nuptime: %s\n' % (
                time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(start)), format_duration(time.time() - start))
        if command == 'workerlist':
            return controller.backend.describe() + '\n'
        if command == 'threadlist':
            threads = threading.enumerate()
            return '\n'.join(['Total %d Threads' % len(threads)] + [
                'name=%s alive=%s daemon=%s' % (t.name, t.is_alive(), t.daemon) for t in threads]) + '\n'
        if command == 'exceptionlist':
            return '\n\n'.join('%s %s\n%s' % (time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(stamp)), thread, trace)
                               for stamp, thread, trace in controller.exceptions) + '\n'
        return 'ERR no such command: %s\n' % command

    def stop(self):
        self.running = False
        try:
            self.sock.close()
        finally:
            if self.unix_path and os.path.exists(self.unix_path):
                os.unlink(self.unix_path)


###############################################################################
# Daemon
###############################################################################

class SafeLogRecord(logging.LogRecord):
    """Client text is kept as sent: undecodable bytes become lone surrogates
    (surrogateescape), which no log handler can encode, so the whole line would be
    lost. The formatted message shows them as \\xNN escapes instead."""

    def getMessage(self):
        message = super().getMessage()
        if message.isascii():
            return message
        try:
            message.encode('utf-8')
            return message
        except UnicodeEncodeError:
            return message.encode('utf-8', 'surrogateescape').decode('utf-8', 'backslashreplace')


def use_safe_log_records():
    """Make every log record a SafeLogRecord (unless something else already replaced
    the record factory, which is then left alone)."""
    if logging.getLogRecordFactory() is logging.LogRecord:
        logging.setLogRecordFactory(SafeLogRecord)


class MainController(object):
    """Owns the configuration, the plugins, the backend, the listeners and the
    control server. ``startup()`` brings them up, ``run()`` idles until stopped,
    ``reload()`` applies a changed configuration (SIGHUP), ``shutdown()`` ends it."""

    def __init__(self, config, config_path=None, configdir=None):
        self.config = config
        self.config_path = config_path
        self.configdir = configdir
        self.logger = logging.getLogger('fuglu.MainController')
        self.stats = Statistics()
        self.exceptions = []
        self.plugins, self.prependers, self.appenders = [], [], []
        self.backend = None
        self.listeners = {}
        self.control = None
        self.stayalive = True
        self.trusted_networks = None
        self.smtp_sessions = set()   # SMTP sessions, so shutdown can wake those waiting for a command
        self.downstream_pool = DownstreamPool()
        self.client_sessions = ClientSessions(self)
        self._apply_trusted(config)
        use_safe_log_records()

    def _apply_trusted(self, config):
        value = config.get('main', 'trusted_xforward_peers').strip()
        self.trusted_networks = parse_networks(value) if value else None

    def record_exception(self, trace):
        self.exceptions = (self.exceptions + [(time.time(), threading.current_thread().name, trace)])[-10:]

    # -- plugins ----------------------------------------------------------------
    def load_plugins(self, config=None):
        """Instantiate all plugin lists; raises PluginLoadError."""
        config = config or self.config
        add_plugin_dirs(config)
        plugins = load_plugins(config, 'plugins')
        prependers = load_plugins(config, 'prependers')
        appenders = load_plugins(config, 'appenders')
        return plugins, prependers, appenders

    def listen_specs(self, config=None):
        config = config or self.config
        bindaddress = config.get('main', 'bindaddress').strip()
        specs = []
        for entry in parse_list(config.get('main', 'incomingport')):
            specs.append(parse_incomingport(entry, bindaddress))
        return specs

    # -- life cycle -------------------------------------------------------------
    def startup(self):
        config = self.config
        self.plugins, self.prependers, self.appenders = self.load_plugins()
        self.logger.info('plugins: scanners=%s prependers=%s appenders=%s',
                         [str(p) for p in self.plugins], [str(p) for p in self.prependers],
                         [str(p) for p in self.appenders])
        backend_name = config.get('performance', 'backend').strip().lower()
        if backend_name not in BACKENDS:
            raise ConfigProblem('unknown backend %r (available: %s)' % (backend_name, ', '.join(BACKENDS)))
        self.backend = BACKENDS[backend_name](config)
        self.backend.start()
        if backend_name == 'thread':
            self.logger.info('thread backend: %d to %d worker threads', self.backend.minthreads,
                             self.backend.maxthreads)
        if self.trusted_networks is None and any(
                not is_loopback_address(address) for _, address, _ in self.listen_specs()):
            self.logger.warning('trusted_xforward_peers is empty: every client may supply client information')
        for spec in self.listen_specs():
            self.start_listener(*spec)
        if config.get('main', 'controlport').strip():
            self.control = ControlServer(self)
            self.control.start()
            self.logger.info('control socket listening on %s', self.control.spec)
        self.logger.info('Startup complete')

    def start_listener(self, protocol, address, port):
        if protocol not in CONNECTORS:
            self.logger.error('incomingport %s:%s:%s: unknown protocol %r (available: %s)', protocol, address,
                              port, protocol, ', '.join(sorted(CONNECTORS)))
            return
        connector = CONNECTORS[protocol](self, address, port)
        listener = Listener(self, connector, self.config.getint('performance', 'listen_backlog'))
        listener.start()
        self.listeners[(protocol, address, port)] = listener
        self.logger.info('%s connector listening on %s:%d', protocol, address, port)

    def run(self):
        while self.stayalive:
            time.sleep(1)

    def reload(self):
        """Re-read the configuration: new plugins, pool limits and listeners."""
        self.logger.info('reloading configuration')
        try:
            config = load_config(self.config_path, self.configdir,
                                 embedded=EMBEDDED_CONFIG if self.config_path is None else None)
            plugins, prependers, appenders = self.load_plugins(config)
        except Exception as error:
            self.logger.error('reload failed, keeping the running configuration: %s', error)
            return False
        self.config = config
        self._apply_trusted(config)
        self.plugins, self.prependers, self.appenders = plugins, prependers, appenders
        self.backend.reconfigure(config)
        wanted = set(self.listen_specs(config))
        for spec in list(self.listeners):
            if spec not in wanted:
                self.listeners.pop(spec).stop()
                self.logger.info('closed listener %s:%s:%s', *spec)
        for spec in wanted - set(self.listeners):
            try:
                self.start_listener(*spec)
            except OSError as error:
                self.logger.error('cannot listen on %s:%s:%s: %s', spec[0], spec[1], spec[2], error)
        self.logger.info('Reload config complete. Current configuration: %s', config.get('main', 'identifier'))
        return True

    def shutdown(self):
        self.stayalive = False
        for listener in self.listeners.values():
            listener.stop()
        for session in list(self.smtp_sessions):
            if session.waiting_for_client:
                try:
                    session.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if self.control is not None:
            self.control.stop()
        if self.backend is not None:
            self.backend.stop()
        self.downstream_pool.purge(everything=True)
        for plugin in self.plugins + self.prependers + self.appenders:
            try:
                plugin.shutdown()
            except Exception:
                self.logger.error('plugin %s shutdown failed: %s', plugin, traceback.format_exc())
        self.logger.info('shutdown complete')


def is_loopback_address(address):
    if address in ('localhost',):
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


###############################################################################
# Lint
###############################################################################

OPTIONAL_DEPENDENCIES = (
    ('magic', 'python-magic: file type detection by content (attachment plugin)'),
    ('sqlalchemy', 'sqlalchemy: per-recipient settings and rules from SQL'),
    ('rarfile', 'rarfile: rar archive contents (attachment plugin)'),
    ('py7zr', 'py7zr: 7z archive contents (attachment plugin)'),
)


def module_available(name):
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


class Lint(object):
    """`fuglu --lint`: checks dependencies, listeners, plugins and every option, and
    prints what it finds. ``run()`` returns the number of errors."""

    def __init__(self, config, out=None):
        self.config = config
        self.out = out or sys.stdout
        self.color = getattr(self.out, 'isatty', lambda: False)()

    def say(self, text, color=None):
        codes = {'red': '\033[91m', 'green': '\033[92m', 'yellow': '\033[93m'}
        if self.color and color:
            text = '%s%s\033[0m' % (codes[color], text)
        print(text, file=self.out)

    def run(self):
        errors = 0
        config = self.config
        self.say('Fuglu %s' % __version__)
        self.say('---------- LINT MODE ----------')
        self.say('Checking dependencies...')
        for module, description in OPTIONAL_DEPENDENCIES:
            if module_available(module):
                self.say('%s: installed' % description, 'green')
            else:
                self.say('%s: not installed (optional)' % description, 'yellow')

        backend = config.get('performance', 'backend').strip().lower()
        if backend not in BACKENDS:
            self.say('unknown backend %r (available: %s)' % (backend, ', '.join(BACKENDS)), 'red')
            errors += 1
        bindaddress = config.get('main', 'bindaddress').strip()
        for entry in parse_list(config.get('main', 'incomingport')):
            try:
                protocol, address, port = parse_incomingport(entry, bindaddress)
            except ValueError as error:
                self.say('%s: %s' % (config.where('main', 'incomingport'), error), 'red')
                errors += 1
                continue
            if protocol not in CONNECTORS:
                self.say('%s: unknown protocol %r in %r (available: %s)' % (
                    config.where('main', 'incomingport'), protocol, entry, ', '.join(sorted(CONNECTORS))), 'red')
                errors += 1
            else:
                self.say('listener %s on %s:%d' % (protocol, address, port))

        self.say('Loading extensions...')
        self.say('file type detection: %s' % ('python-magic' if module_available('magic')
                                               else 'built-in signature table'))
        self.say('archives: zip, tar, gz, bz2, xz%s%s' % (', rar' if module_available('rarfile') else '',
                                                         ', 7z' if module_available('py7zr') else ''))
        self.say('Loading plugins...')
        plugins = {}
        try:
            add_plugin_dirs(config)
            for option in ('plugins', 'prependers', 'appenders', 'mplugins'):
                plugins[option] = load_plugins(config, option)
            self.say('Plugin loading complete')
        except PluginLoadError as error:
            self.say('At least one plugin failed to load: %s' % error, 'red')
            errors += 1

        self.say('Linting main configuration')
        main_errors = []
        for section, table in CORE_DEFAULTS.items():
            if section != 'PluginAlias':   # any alias name is fine
                main_errors += check_options(config, section, table)
        if config.get('main', 'trashdir').strip() and not os.path.isdir(config.get('main', 'trashdir')):
            main_errors.append('trashdir %s is not a directory' % config.get('main', 'trashdir'))
        try:
            if config.get('main', 'controlport').strip().isdigit():
                address = config.get('main', 'controladdress').strip()
                if not is_loopback_address(address) and not config.get('main', 'controltoken').strip():
                    main_errors.append('%s: a TCP control port on %s needs controltoken'
                                       % (config.where('main', 'controlport'), address))
        except ValueError as error:
            main_errors.append(str(error))
        for section in CORE_DEFAULTS:
            if section not in ('PluginAlias', 'databaseconfig', 'environment') and not config.has_section(section):
                self.say('section [%s] not in the config file: all values default' % section, 'yellow')
        for error in main_errors:
            self.say(error, 'red')
        self.say('ERROR' if main_errors else 'OK', 'red' if main_errors else 'green')
        errors += 1 if main_errors else 0

        failed = 0
        for option in ('plugins', 'prependers', 'appenders', 'mplugins'):
            for plugin in plugins.get(option, []):
                self.say('Linting Plugin %s Config section: %s' % (plugin, plugin.section))
                try:
                    ok = plugin.lint()
                except Exception as error:
                    self.say('ERROR: %s: %s' % (error.__class__.__name__, error), 'red')
                    ok = False
                self.say('OK' if ok else 'ERROR', 'green' if ok else 'red')
                failed += 0 if ok else 1
        self.say('%d plugins reported errors.' % failed, 'red' if failed else None)
        errors += failed

        if any(entry.strip().lower().startswith('milter:') for entry in parse_list(config.get('main', 'incomingport'))):
            self.say('advice: a milter connection holds a worker thread for its whole SMTP session; keep '
                     '[performance] maxthreads (now %s) at least at Postfix\'s smtpd process limit'
                     % config.get('performance', 'maxthreads'), 'yellow')

        self.say('Lint status: %s' % ('OK' if errors == 0 else 'FAIL'), 'green' if errors == 0 else 'red')
        return errors


###############################################################################
# Command line
###############################################################################

FOREGROUND_LOG_FORMAT = '[%(process)d] %(asctime)s : %(name)s: %(levelname)s, %(message)s'
FILE_LOG_FORMAT = '%(asctime)s %(name)-12s: %(levelname)s %(message)s'


def setup_logging(logconfig, foreground, baseloglevel):
    """--logconfig or confdir/logging.conf via fileConfig; else stderr in the
    foreground, /var/log/fuglu/fuglu.log when daemonized."""
    level = getattr(logging, baseloglevel.upper(), logging.INFO)
    if logconfig:
        from logging import config as logging_config
        logging_config.fileConfig(logconfig, disable_existing_loggers=False)
        return 'logging configured from %s' % logconfig
    root = logging.getLogger()
    root.setLevel(level)
    # our formats name no source file, line or function: skip finding the caller's
    # frame for every record (the costliest part of a log call)
    logging._srcfile = None
    logging.logMultiprocessing = False
    if foreground:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FOREGROUND_LOG_FORMAT))
        root.addHandler(handler)
        return 'logging to stderr'
    path = '/var/log/fuglu/fuglu.log'
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(FILE_LOG_FORMAT))
    root.addHandler(handler)
    return 'logging to %s' % path


def release_freed_memory():
    """Return the memory freed after start-up (compiling this file, loading plugins)
    to the system; glibc would keep it, and it would count as resident size."""
    try:
        import ctypes
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError, ImportError):
        pass


def daemonize(pidfile):
    """Double fork, new session, stdio on /dev/null, pid file written."""
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir('/')
    os.umask(0o077)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if pidfile:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, 'O_NOFOLLOW', 0)
        fd = os.open(pidfile, flags, 0o644)
        os.write(fd, ('%d\n' % os.getpid()).encode())
        os.close(fd)
        import atexit
        atexit.register(lambda: os.path.exists(pidfile) and os.unlink(pidfile))


def drop_privileges(config):
    """When root: become main.user / the first existing group of main.group."""
    if os.getuid() != 0:
        return None
    import grp
    import pwd
    user = config.get('main', 'user').strip() or 'nobody'
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return 'user %s does not exist, still running as root' % user
    for group in parse_list(config.get('main', 'group')):
        try:
            gid = grp.getgrnam(group).gr_gid
            break
        except KeyError:
            continue
    else:
        gid = entry.pw_gid
    os.setgroups(os.getgrouplist(user, gid))
    os.setgid(gid)
    os.setuid(entry.pw_uid)
    return 'running as %s' % user


def parse_args(argv):
    import argparse
    parser = argparse.ArgumentParser(prog='fuglu', description='fuglu mail content filter %s' % __version__)
    parser.add_argument('--version', action='version', version=__version__)
    parser.add_argument('--lint', action='store_true', help='check configuration and plugins, then exit')
    parser.add_argument('-c', '--config', help='main config file (default %s)' % DEFAULT_CONFIG_PATH)
    parser.add_argument('--configdir', help='conf.d directory (default: conf.d beside the config file, '
                                            'only for the default config)')
    parser.add_argument('-f', '--foreground', action='store_true', help='do not daemonize, log to stderr')
    parser.add_argument('--pidfile', default='/var/run/fuglu.pid', help='pid file when daemonized')
    parser.add_argument('--logconfig', help='logging configuration file (logging.fileConfig format)')
    parser.add_argument('--baseloglevel', default='INFO', choices=['DEBUG', 'INFO', 'WARNING', 'ERROR'],
                        help='log level of the foreground log')
    parser.add_argument('--dump-defaults', action='store_true',
                        help='print the complete default configuration with descriptions')
    return parser.parse_args(argv)


# Extra commands: `fuglu <command> [args]` runs COMMANDS[command](args) -> exit code.
COMMANDS = {}

# `fuglu client` exit codes per verdict (FuGlu's fuglu_client -e); anything else is 1
CLIENT_EXIT_CODES = {'DUNNO': 0, 'DISCARD': 2, 'REJECT': 3, 'DEFER': 4}


def parse_host_port(text):
    """'host:port' or '[v6addr]:port' -> (host, port); ValueError on garbage."""
    host, sep, port = text.rpartition(':')
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError('expected HOST:PORT, got %r' % text)
    return host.strip('[]') or '127.0.0.1', int(port)


def read_banner_line(sock):
    line = b''
    while not line.endswith(b'\n'):
        chunk = sock.recv(1)
        if not chunk:
            break
        line += chunk
    return line


def envelope_block(fields):
    """The netcat envelope block for [(name, value), ...] with a random token."""
    token = os.urandom(8).hex()
    lines = ['X-DATA-PREPEND-START: %s' % token] + ['%s: %s' % field for field in fields] + \
            ['%s: %s' % (NETCAT_BLOCK_END, token)]
    return ('\r\n'.join(lines) + '\r\n').encode('utf-8')


def netcat_exchange(host, port, message, timeout):
    """Send ``message`` (bytes, envelope block included) to a netcat connector and
    return its whole reply."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        read_banner_line(sock)
        sock.sendall(message)
        sock.shutdown(socket.SHUT_WR)
        return read_until_eof(sock)[0]


def command_client(argv):
    """`fuglu client`: scan a message through a running netcat connector."""
    import argparse
    parser = argparse.ArgumentParser(
        prog='fuglu client', description='Send a message to a netcat connector, print the verdict. Exit code: '
                                         'DUNNO 0, DISCARD 2, REJECT 3, DEFER 4, any problem 1.')
    parser.add_argument('--host', default='127.0.0.1', help='connector host (default %(default)s)')
    parser.add_argument('-p', '--port', type=int, default=20099, help='connector port (default %(default)s)')
    parser.add_argument('-s', '--sender', help='envelope sender ("<>" for the null sender)')
    parser.add_argument('-r', '--recipient', action='append', default=[], help='envelope recipient (repeatable)')
    parser.add_argument('-i', '--input', default='-', help='message file (default: standard input)')
    parser.add_argument('-o', '--output', action='store_true',
                        help='write the scanned message to standard output (the verdict goes to standard error)')
    parser.add_argument('-t', '--timeout', type=float, default=300, help='seconds to wait (default %(default)s)')
    args = parser.parse_args(argv)
    try:
        if args.input == '-':
            message = sys.stdin.buffer.read()
        else:
            with open(args.input, 'rb') as handle:
                message = handle.read()
    except OSError as error:
        print('cannot read the message: %s' % error, file=sys.stderr)
        return 1
    fields = []
    if args.sender is not None:
        fields.append(('X-ENV-SENDER', args.sender or '<>'))
    fields += [('X-ENV-RECIPIENT', recipient) for recipient in args.recipient]
    if fields:
        message = envelope_block(fields) + message
    try:
        reply = netcat_exchange(args.host, args.port, message, args.timeout)
    except OSError as error:
        print('netcat connector %s:%s: %s' % (args.host, args.port, error), file=sys.stderr)
        return 1
    status, sep, rest = reply.partition(b':')
    status = status.decode('ascii', 'replace').strip().upper()
    if not sep or status not in CLIENT_EXIT_CODES:
        print('unexpected reply: %r' % reply[:200], file=sys.stderr)
        return 1
    if status == 'DUNNO':
        if args.output:
            print(status, file=sys.stderr)
            sys.stdout.buffer.write(rest)
            sys.stdout.buffer.flush()
        else:
            print(status)
    else:
        print('%s: %s' % (status, rest.decode('utf-8', 'replace')), file=sys.stderr if args.output else sys.stdout)
    return CLIENT_EXIT_CODES[status]


# Health probes (spec 4.5): each returns (healthy, what was seen)

def probe_smtp(host, port, timeout):
    with socket.create_connection((host, port), timeout=timeout) as sock:
        banner = read_banner_line(sock)
        if not banner.startswith(b'220'):
            return False, 'banner %r' % banner[:80]
        sock.sendall(b'HCHK\r\n')
        sock.shutdown(socket.SHUT_WR)
        answer = read_until_eof(sock, 4096)[0].strip()
    return answer == b'250 healthcheck', 'answer %r' % answer[:80]


def probe_netcat(host, port, timeout):
    answer = netcat_exchange(host, port, envelope_block([('X-HEALTHCHECK', 'true')]), timeout).strip()
    return answer == NETCAT_HEALTHY, 'answer %r' % answer[:80]


def probe_milter(host, port, timeout):
    import struct
    # SMFIC_OPTNEG: version 6, all actions (0x1FF), all protocol steps (0x1FFFFF)
    payload = b'O' + struct.pack('>III', 6, 0x1FF, 0x1FFFFF)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(struct.pack('>I', len(payload)) + payload)
        sock.shutdown(socket.SHUT_WR)
        answer = read_until_eof(sock, 65536)[0]
    return answer[4:5] == b'O', 'answer %r' % answer[:40]


HEALTH_PROBES = {'smtp': probe_smtp, 'esmtp': probe_smtp, 'netcat': probe_netcat, 'milter': probe_milter}


def command_healthcheck(argv):
    """`fuglu healthcheck CONNECTOR HOST:PORT`: exit 0 only when the connector answers
    its health probe correctly (for systemd, monitoring)."""
    import argparse
    parser = argparse.ArgumentParser(prog='fuglu healthcheck',
                                     description='Probe a running connector; exit 0 when healthy, 1 when not.')
    parser.add_argument('connector', choices=sorted(HEALTH_PROBES))
    parser.add_argument('target', metavar='HOST:PORT')
    parser.add_argument('-t', '--timeout', type=float, default=5, help='seconds (default %(default)s)')
    args = parser.parse_args(argv)
    try:
        host, port = parse_host_port(args.target)
    except ValueError as error:
        parser.error(str(error))
    try:
        healthy, seen = HEALTH_PROBES[args.connector](host, port, args.timeout)
    except OSError as error:
        healthy, seen = False, str(error) or error.__class__.__name__
    print('%s %s:%d %s (%s)' % (args.connector, host, port, 'OK' if healthy else 'FAIL', seen))
    return 0 if healthy else 1


COMMANDS['client'] = command_client
COMMANDS['healthcheck'] = command_healthcheck


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    args = parse_args(argv)
    if args.dump_defaults:
        sys.stdout.write(dump_defaults(bundled_plugin_classes()))
        return 0

    config_path = args.config
    embedded = False
    if config_path is None:
        if os.path.exists(DEFAULT_CONFIG_PATH):
            config_path = DEFAULT_CONFIG_PATH
        else:
            embedded = True
    elif not os.path.exists(config_path):
        print('config file %s not found; start from fuglu.conf.dist (fuglu --dump-defaults)' % config_path,
              file=sys.stderr)
        return 1
    configdir = args.configdir
    if configdir is None and config_path == DEFAULT_CONFIG_PATH:
        configdir = os.path.join(DEFAULT_CONFDIR, 'conf.d')
    try:
        config = load_config(None if embedded else config_path, configdir,
                             embedded=EMBEDDED_CONFIG if embedded else None)
    except (configparser.Error, OSError, UnicodeError) as error:
        print('cannot read the configuration: %s' % error, file=sys.stderr)
        return 1

    if args.lint:
        logging.basicConfig(level=logging.ERROR, format='%(levelname)s %(name)s: %(message)s')
        if embedded:
            print('no config file at %s: checking the embedded default' % DEFAULT_CONFIG_PATH)
        errors = Lint(config).run()
        return min(errors, 255)

    foreground = args.foreground or embedded or not config.getboolean('main', 'daemonize')
    logconfig = args.logconfig
    if logconfig is None and not embedded:
        candidate = os.path.join(config.confdir, 'logging.conf')
        if not foreground and os.path.exists(candidate):
            logconfig = candidate
    log_target = setup_logging(logconfig, foreground, args.baseloglevel)
    logger = logging.getLogger('fuglu.main')
    if embedded:
        logger.info('no config file at %s: running on the embedded default (after-queue smtp on '
                    '127.0.0.1:10025, re-injection to 127.0.0.1:10026, no plugins)', DEFAULT_CONFIG_PATH)
    logger.info('fuglu %s (python %s) starting, config %s, %s', __version__, sys.version.split()[0],
                '<embedded default>' if embedded else config_path, log_target)

    if not foreground:
        daemonize(args.pidfile)
    controller = MainController(config, None if embedded else config_path, configdir)
    try:
        controller.startup()
    except PluginLoadError as error:
        logger.error('Some plugins failed to load: %s', error)
        print('Some plugins failed to load, please check the logs. Aborting.', file=sys.stderr)
        controller.shutdown()
        return EXIT_PLUGIN_LOAD_FAILED
    except (ConfigProblem, OSError, ValueError) as error:
        logger.error('start-up failed: %s', error)
        controller.shutdown()
        return 1
    if not foreground:
        message = drop_privileges(config)
        if message:
            logger.info(message)
    release_freed_memory()

    def on_term(signum, frame):
        controller.stayalive = False
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    if hasattr(signal, 'SIGHUP'):
        reload_requested = threading.Event()
        signal.signal(signal.SIGHUP, lambda signum, frame: reload_requested.set())
    try:
        while controller.stayalive:
            time.sleep(0.2)
            controller.downstream_pool.purge()
            if reload_requested.is_set():
                reload_requested.clear()
                controller.reload()
    except Exception:
        logger.error('unhandled error: %s', traceback.format_exc())
        controller.shutdown()
        return EXIT_UNHANDLED
    controller.shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
