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
                             Backend: a thread pool, or (backend=process) worker
                             processes forked by a fork server, each with its own
                             thread pool; the parent passes them the socket
                                 |  runs
                                 v
                             Connector session (smtp / esmtp / netcat / milter):
                             speaks the protocol, receives the message, then hands
                             itself (a ProtocolHandler) to the scan session
                                 |
                                 v
                             ScanSession.handle: make_suspect, prependers -> scanners,
                             the answer, appenders; every failure a temporary failure
                                 |  verdict (DUNNO, ACCEPT, DELETE, REJECT, DEFER)
                                 v
                             ProtocolHandler answers: commitback (re-inject downstream,
                             and only then tell the MTA), discard, reject, defer

The sections of this file follow that path, in dependency order: constants and
actions, small helpers, files in shared directories, configuration, templates, the
message spool (big messages in files), the Suspect, the runtime configuration
(per-recipient values from SQL), rule files (SuspectFilter), plugin bases and loader,
the scan session, the SMTP machinery shared by the connectors (line reader, server
session, re-injection client), the connectors, the backends, the control server,
monitoring (metrics, MRTG), the daemon (process identity, pid file, start-up report,
systemd notification, logs, MainController), lint, FuGlu's module names, and the
command line.

Started as root, the daemon binds every socket and prepares its directories, then
becomes ``[main] user`` (in every mode) before it creates plugins or reads mail; see the
Daemon section for the order.

FuGlu's plugins import from its package (``fuglu.shared``, ``fuglu.stringencode``,
``fuglu.extensions.sql``, ``fuglu.mshared``, ``fuglu.bounce``, ``fuglu.plugins.sa`` ...).
This one module is registered under those names in ``sys.modules``, or small module
objects holding the names from here that FuGlu has there; an import hook answers
FuGlu modules this build lacks with an ImportError that says so. A plugin method may
be ``async def`` (FuGlu 1.7): ``call_plugin`` runs the coroutine on the worker
thread's own event loop.

Principles
----------

* Bytes stay bytes. The message source is kept exactly as received; headers fuglu adds
  are prepended as bytes. A parsed ``email`` message is only re-serialised when a plugin
  replaced it. A message over ``spool_threshold`` stays in a spool file and is streamed
  from there: memory per message is bounded by the threshold.
* No mail is lost. The feeding MTA gets a 2xx only after the downstream accepted the
  message; downstream down, scanner trouble, timeouts and crashes become 4xx replies.
* Errors are values at protocol boundaries: a connector turns every failure into the
  right reply plus a log line carrying the message id. Inside, exceptions carry meaning.
* Everything a peer controls is bounded: line and message sizes, every wait on a client
  or a downstream, a session's total time, connections per client address, the time
  rule regexes get. A bound that is hit is a protocol reply or a problem for the plugin
  (its problemaction), never a silent pass (README, Limits).
* Heavy modules (``email``, archive modules) are imported when first
  needed, so start-up stays fast and small.
"""

import collections
import configparser
import contextlib
import fnmatch
import importlib
import ipaddress
import itertools
import logging
import operator
import os
import queue
import re
import signal
import socket
import stat
import string
import struct
import sys
import threading
import time
import traceback
from collections import namedtuple
from html.parser import HTMLParser   # small; FuGlu's HTMLStripper subclasses it

# `python3 fuglu.py` and `python3 -m fuglu` run this file as __main__; a plugin that does
# `import fuglu` (or the FuGlu way, `from fuglu.shared import ...`) must get this very
# module, not a second copy with its own classes.
# The other FuGlu module names are registered at the end (register_compat_modules).
if __name__ == '__main__':
    sys.modules.setdefault('fuglu', sys.modules[__name__])
sys.modules.setdefault('fuglu.shared', sys.modules[__name__])
sys.modules.setdefault('fuglu.stringencode', sys.modules[__name__])

__version__ = '1.7.0.post1'
__author__ = 'the fuglu developers'
__license__ = 'Apache-2.0'

__all__ = [
    # FuGlu's plugin API (fuglu.shared, fuglu.stringencode)
    'DUNNO', 'ACCEPT', 'DELETE', 'REJECT', 'DEFER', 'ALLCODES', 'SUSPECT_TAG_MAXLENGTH',
    'string_to_actioncode', 'actioncode_to_string', 'apply_template', 'default_template_values',
    'force_uString', 'force_bString', 'force_bfromc', 'force_cfromb', 'try_encoding',
    'try_decoding', 'ForceUStringError', 'EncodingTrialError', 'str2bool', 'yesno',
    'strip_address', 'extract_domain', 'utcnow', 'redact_uri', 'deprecated', 'make_header',
    'fold_header', 'code_is_2xx', 'code_is_3xx', 'code_is_4xx', 'code_is_5xx',
    'get_outgoing_helo', 'HeloSingleton', 'Cache', 'CacheSingleton', 'get_default_cache',
    'hash_bytestr_iter', 'file_as_blockiter', 'create_filehash', 'FuConfigParser', 'Suspect',
    'FileList', 'SuspectFilter', 'SuspectFilterRule', 'SuspectFilterResult', 'HTMLStripper',
    'BasicPlugin', 'ScannerPlugin', 'AsyncScannerPlugin', 'AVScannerPlugin',
    'AsyncAVScannerPlugin', 'PrependerPlugin', 'AsyncPrependerPlugin', 'AppenderPlugin',
    'AsyncAppenderPlugin', 'MilterPlugin', 'BasicMilterPlugin', 'Bounce', 'Addrcheck',
    'FunkyConsole', 'DBConfig', 'DBFile', 'RuntimeConfigError',
    # helpers for plugins: services, rule rows, bundled files, files in shared directories
    'connect_service', 'recv_until', 'service_address', 'read_until_eof', 'parse_list',
    'parse_incomingport', 'lint_sql', 'read_bundled_conf', 'shared_directory',
    'shared_file_path', 'prepare_shared_home', 'open_directory', 'create_file_at',
    'write_file_at', 'append_file_at', 'STARTED_AS_ROOT', 'FugluError', 'InvalidAddress',
    'SUSPECT_TAGS',
    # a message as parts (a big one streamed from its spool file); MIME in linear time
    'FileSection', 'part_chunks', 'send_parts', 'parse_message', 'iter_mime_parameters',
    # the daemon
    'call_plugin', 'ScanSession', 'ProtocolHandler', 'MainController', 'CONNECTORS',
    'BACKENDS', 'main',
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

# exit codes (FuGlu's)
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


def actioncode_to_string(actioncode):
    if actioncode is None:
        return 'NULL ACTION CODE'
    return ACTION_NAMES.get(actioncode, 'INVALID ACTION CODE %s' % actioncode)


###############################################################################
# Small helpers
###############################################################################

class FugluError(Exception):
    """The root of the exceptions fuglu's core raises, so a caller can catch them all.
    Where FuGlu's API or the standard library has a kind for the same trouble, the
    class is that kind too (ForceUStringError is a TypeError, UnsafeLocation an
    OSError, InvalidAddress and EnvelopeSyntaxError ValueErrors, NotInThisBuild an
    ImportError), so code written against those keeps catching them."""


class ForceUStringError(FugluError, TypeError):
    """force_uString() got an object it cannot turn into text."""


def _encodings_to_try():
    """Every codec suitable for mail text, UTF-8 and ISO-8859-15 first (FuGlu's order):
    the candidates when a byte string is not in the encoding it claims."""
    from encodings.aliases import aliases
    first = ['utf_8', 'iso8859_15']
    binary = {'rot_13', 'base64_codec', 'hex_codec', 'quopri_codec', 'bz2_codec', 'zlib_codec',
              'uu_codec'}
    return first + sorted(set(aliases.values()) - set(first) - binary)


ALL_ENCODINGS = _encodings_to_try()


class EncodingTrialError(object):
    """Find the codecs that decode a byte string and encode it back unchanged."""

    @staticmethod
    def get_encodings_list():
        return ALL_ENCODINGS

    @staticmethod
    def test_all(bytestring, returnimmediately=False):
        working = []
        for encoding in ALL_ENCODINGS:
            try:
                if bytestring.decode(encoding).encode(encoding) == bytestring:
                    working.append(encoding)
                    if returnimmediately:
                        break
            except Exception:  # codecs fail in many ways: each one only disqualifies it
                continue
        return working


def try_encoding(u_inputstring, encoding='utf-8'):
    """str -> bytes in ``encoding`` (default UTF-8); raises UnicodeEncodeError."""
    if u_inputstring is None:
        return None
    return u_inputstring.encode(encoding or 'utf-8', 'strict')


def _module_available(name):
    """True when ``name`` can be imported (found without importing it: start-up stays
    small)."""
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


CHARDET_AVAILABLE = _module_available('chardet')   # FuGlu's flag: try_decoding asks chardet


def try_decoding(b_inputstring, encoding_guess='utf-8', errors='strict'):
    """bytes -> str. ``errors`` as for bytes.decode, or 'strict+replace' /
    'strict+ignore' (strict first, the second mode on a broken UTF-8 sequence). When the
    guess is wrong, chardet (if installed) and then the first codec of
    EncodingTrialError that round-trips decide; UnicodeDecodeError if none does."""
    if b_inputstring is None:
        return None
    encoding_guess = encoding_guess or 'utf-8'
    first, _, second = errors.partition('+')
    try:
        return b_inputstring.decode(encoding_guess, first)
    except (UnicodeDecodeError, LookupError) as error:
        if second and str(error).endswith('invalid continuation byte'):
            try:
                return b_inputstring.decode(encoding_guess, second)
            except (UnicodeDecodeError, LookupError):
                pass
    if CHARDET_AVAILABLE:   # optional, as in FuGlu
        try:
            import chardet
            detected = chardet.detect(b_inputstring[:10000])['encoding']
            if detected:
                return b_inputstring.decode(detected, first)
        except Exception:  # its guess does not decode either
            pass
    for encoding in EncodingTrialError.test_all(b_inputstring, returnimmediately=True):
        return b_inputstring.decode(encoding, first)
    raise UnicodeDecodeError(encoding_guess, b_inputstring, 0, len(b_inputstring),
                             'no codec decodes this')


def force_uString(inputstring, encoding_guess='utf-8', errors='strict', convert_none=False):
    """Anything -> str: bytes are decoded (see try_decoding), numbers and other objects
    converted with str(), lists item by item. None stays None unless convert_none."""
    if inputstring is None:
        return '' if convert_none else None
    if isinstance(inputstring, str):
        return inputstring
    if isinstance(encoding_guess, str) and 'unknown' in encoding_guess.lower():
        encoding_guess = 'utf-8'
    if isinstance(inputstring, list):
        return [force_uString(item, encoding_guess, errors) for item in inputstring]
    if isinstance(inputstring, (bytes, bytearray)):
        return try_decoding(bytes(inputstring), encoding_guess, errors)
    try:
        return str(inputstring)
    except Exception as error:
        raise ForceUStringError('cannot turn a %s into text: %s' % (type(inputstring), error))


def force_bString(inputstring, encoding='utf-8', check_encoding=False, errors='strict'):
    """Anything -> bytes: str is encoded, other objects go through force_uString, lists
    item by item; None stays None. ``errors`` (fuglu's addition) as for str.encode."""
    if inputstring is None:
        return None
    if isinstance(inputstring, list):
        return [force_bString(item) for item in inputstring]
    if isinstance(inputstring, bytes):
        result = inputstring
    elif isinstance(inputstring, bytearray):
        result = bytes(inputstring)
    else:
        result = force_uString(inputstring).encode(encoding or 'utf-8', errors)
    if check_encoding:
        return try_decoding(result, encoding).encode(encoding)
    return result


def force_bfromc(chars_iteratable):
    """str -> bytes one character per byte (Python 2's idea of a str)."""
    if isinstance(chars_iteratable, bytes):
        return chars_iteratable
    if isinstance(chars_iteratable, str):
        return bytes(ord(char) for char in chars_iteratable)
    raise AttributeError('not str or bytes: %s' % type(chars_iteratable))


def force_cfromb(bytes_iteratable):
    """bytes -> str one byte per character; an int is one character, lists item by item."""
    if isinstance(bytes_iteratable, str):
        return bytes_iteratable
    if isinstance(bytes_iteratable, int):
        return chr(bytes_iteratable)
    if isinstance(bytes_iteratable, bytes):
        return ''.join(chr(byte) for byte in bytes_iteratable)
    if isinstance(bytes_iteratable, list):
        return [force_cfromb(item) for item in bytes_iteratable]
    raise AttributeError('Type: %s is not str and not bytes' % type(bytes_iteratable))


def str2bool(val):
    """'1', 'yes', 'true', 'on' (any case) and True -> True; anything else -> False."""
    if isinstance(val, bool):
        return val
    if hasattr(val, 'lower'):
        val = val.lower()
    return configparser.RawConfigParser.BOOLEAN_STATES.get(val, False)


def yesno(val):
    return 'yes' if val else 'no'


def code_is_2xx(code):
    return 200 <= code <= 299


def code_is_3xx(code):
    return 300 <= code <= 399


def code_is_4xx(code):
    return 400 <= code <= 499


def code_is_5xx(code):
    return 500 <= code <= 599


def utcnow():
    """The current time as a timezone-aware UTC datetime."""
    import datetime
    return datetime.datetime.now(datetime.timezone.utc)


def strip_address(address):
    """'Name <a@b>' or 'FROM:<a@b>' -> 'a@b' (what is between < and >, else after ':')."""
    start = address.find('<') + 1
    if start < 1:
        start = address.find(':') + 1
    if start < 1:
        return address
    end = address.find('>')
    if end < 0:
        end = len(address)
    return address[start:end].strip()


def extract_domain(address, lowercase=True):
    """'a@Example.org' -> 'example.org'; None for an empty address, ValueError without @."""
    if address is None or address == '':
        return None
    if '@' not in address:
        raise ValueError("invalid email address: '%s'" % address)
    domain = address.rsplit('@', 1)[1]
    return domain.lower() if lowercase else domain


def redact_uri(uri, mask='*****'):
    """A URI with its password replaced by ``mask`` (for logs)."""
    import urllib.parse
    parts = urllib.parse.urlparse(uri)
    if parts.hostname is None:
        return uri
    netloc = parts.hostname + (':%d' % parts.port if parts.port else '')
    userinfo = (parts.username or '') + (':' + mask if parts.password else '')
    if userinfo:
        netloc = userinfo + '@' + netloc
    return parts._replace(netloc=netloc).geturl()


def deprecated(func):
    """Decorator for FuGlu's old names: logs an error on logger fuglu.deprecated at
    every call, then calls ``func``."""
    import functools

    @functools.wraps(func)
    def deprecated_wrapper(*args, **kwargs):
        logging.getLogger('fuglu.deprecated').error('called deprecated function %s',
                                                    func.__qualname__)
        return func(*args, **kwargs)
    return deprecated_wrapper


def make_header(header, value):
    """An email.headerregistry header object of the class that fits ``header``."""
    from email.headerregistry import HeaderRegistry
    return HeaderRegistry()(header, value)


def fold_header(header, value, policy=None, value_only=False):
    """One header as text folded and RFC 2047 encoded by ``policy`` (default
    email.policy.SMTP), ending in its linesep; CR and LF inside the value are encoded,
    never passed on (they would start a new header). value_only: just the value."""
    if policy is None:
        from email.policy import SMTP as policy
    folded = make_header(header, value).fold(policy=policy).strip()
    folded = re.sub(r'\r\n(?![ \t])', '=?utf-8?q?=0D=0A?=', folded)
    folded = re.sub(r'(?<!\r)\n', '=?utf-8?q?=0A?=', folded)
    folded = re.sub(r'\r(?!\n)', '=?utf-8?q?=0D?=', folded)
    if value_only:
        return folded.split(':', 1)[-1].strip()
    return folded + policy.linesep


class Cache(object):
    """A small in-memory cache with expiry (FuGlu's Cache): put_cache(key, obj,
    ttl=None), get_cache(key) -> obj or None once expired. A daemon thread drops
    expired entries every ``cleanupinterval`` seconds until stop()."""

    def __init__(self, cachetime=30, cleanupinterval=300):
        self.cache = {}
        self.cachetime = cachetime
        self.cleanupinterval = cleanupinterval
        self.lock = threading.Lock()
        self.logger = logging.getLogger('fuglu.settingscache')
        self._stop_event = threading.Event()
        self._cleanup_thread = threading.Thread(target=self.clear_cache_thread,
                                                name='Cache cleanup',
                                                daemon=True)
        self._cleanup_thread.start()

    def stop(self):
        self._stop_event.set()

    def put_cache(self, key, obj, ttl=None):
        now = time.time()
        with self.lock:
            self.cache[key] = (obj, now, now + (self.cachetime if ttl is None else ttl))

    def get_cache(self, key):
        with self.lock:
            entry = self.cache.get(key)
            if entry is None:
                return None
            if time.time() > entry[2]:
                del self.cache[key]
                return None
            return entry[0]

    def clear_cache_thread(self):
        while not self._stop_event.wait(self.cleanupinterval):
            now = time.time()
            with self.lock:
                for key in [k for k, entry in self.cache.items() if now > entry[2]]:
                    del self.cache[key]


class CacheSingleton(object):
    """One Cache per process (FuGlu's CacheSingleton): attribute access goes to it."""

    instance = None
    procpid = None

    def __init__(self, *args, **kwargs):
        if CacheSingleton.instance is None or CacheSingleton.procpid != os.getpid():
            CacheSingleton.instance = Cache(*args, **kwargs)
            CacheSingleton.procpid = os.getpid()

    def __getattr__(self, name):
        return getattr(CacheSingleton.instance, name)


def get_default_cache():
    return CacheSingleton()


def hash_bytestr_iter(bytesiter, hasher, ashexstr=False):
    """Feed the blocks of ``bytesiter`` to ``hasher``; its (hex) digest."""
    for block in bytesiter:
        hasher.update(block)
    return hasher.hexdigest() if ashexstr else hasher.digest()


def file_as_blockiter(afile, blocksize=65536):
    """The contents of an open binary file in blocks; closes it at the end."""
    with afile:
        block = afile.read(blocksize)
        while block:
            yield block
            block = afile.read(blocksize)


def create_filehash(fnamelst, hashtype, ashexstr=False):
    """[(file name, its md5 or sha1 digest), ...]; KeyError for another hashtype."""
    import hashlib
    hasher = {'md5': hashlib.md5, 'sha1': hashlib.sha1}[hashtype]
    return [(name, hash_bytestr_iter(file_as_blockiter(open(name, 'rb')), hasher(), ashexstr))
            for name in fnamelst]


async def _in_thread(function, *args):
    import asyncio
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


async def async_path_exists(path):
    return await _in_thread(os.path.exists, path)


async def async_path_isfile(path):
    return await _in_thread(os.path.isfile, path)


async def async_path_isdir(path):
    return await _in_thread(os.path.isdir, path)


async def async_path_getsize(path):
    return await _in_thread(os.path.getsize, path)


def __getattr__(name):
    # FuGlu's HOSTNAME is this host's FQDN. Resolving it may wait on DNS, so it is only
    # looked up when a plugin asks for it, never at start-up.
    if name == 'HOSTNAME':
        globals()['HOSTNAME'] = socket.getfqdn()
        return globals()['HOSTNAME']
    if name == 'headerregistry':   # email.headerregistry is big: loaded when asked for
        from email.headerregistry import HeaderRegistry
        globals()['headerregistry'] = HeaderRegistry()
        return globals()['headerregistry']
    raise AttributeError("module 'fuglu' has no attribute %r" % name)


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


def split_list_value(value, separators=',', strip=True, lower=False):
    """A config list value -> items: split at any of ``separators``, empty items dropped."""
    items = re.split('[%s]' % re.escape(separators), value)
    if strip:
        items = [item.strip() for item in items]
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
    # 8-bit envelope text comes as surrogate escapes: its bytes, read as UTF-8
    value = force_uString(value).encode('utf-8', 'surrogateescape').decode('utf-8', 'replace')
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
# Files in shared directories
###############################################################################
# Anybody may create entries in a world-writable directory such as /tmp: a symbolic
# link where fuglu is about to write, a file or a directory where fuglu wants to create
# one. So fuglu never creates anything directly in such a directory. A path configured
# there is moved:
#   - started as root: into the directory FuGlu's packages use for that kind of file
#     (SHARED_HOMES: /run/fuglu, /var/log/fuglu, /var/lib/fuglu/...), created by root
#     before privileges are dropped and owned by the daemon user;
#   - otherwise: into the private directory `fuglu-<user>` (mode 0700) beside it.
# Every directory fuglu writes to is opened without following a link in its last
# component and refused when someone other than its owner may write to it; files are
# created relative to that open directory with O_EXCL and O_NOFOLLOW under a fresh
# name and renamed into place, so a planted link is replaced, never followed.

# home -> where a path in a world-writable directory goes when fuglu starts as root
SHARED_HOMES = {
    'run': '/run/fuglu',                  # control socket, pid file
    'log': '/var/log/fuglu',              # log files, the debug plugin's file
    'archive': '/var/lib/fuglu/archive',  # archive plugin
    'trash': '/var/lib/fuglu/trash',      # trashdir
    'mrtg': '/var/lib/fuglu/mrtg',        # MRTG counter files
}
# Homes without such a directory (the 'spool' of tempdir) are always the private
# fuglu-<user>/<home> of the user fuglu runs as, made by that user on first use.
SHARED_HOME_MODES = {'run': 0o755}        # the others hold mail or mail data: 0750

# Set once by the daemon (and lint) before privileges are dropped; a process that
# never changed its identity decides by its own user id.
STARTED_AS_ROOT = os.geteuid() == 0 if hasattr(os, 'geteuid') else False

O_NOFOLLOW = getattr(os, 'O_NOFOLLOW', 0)
O_CLOEXEC = getattr(os, 'O_CLOEXEC', 0)
O_DIRECTORY = getattr(os, 'O_DIRECTORY', 0)


class UnsafeLocation(FugluError, OSError):
    """A directory or file fuglu refuses to use: a link, someone else's, writable by others."""


def is_world_writable(path):
    try:
        return bool(os.stat(path).st_mode & stat.S_IWOTH)
    except OSError:
        return False


def current_user_name():
    import pwd
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def shared_directory(directory, home):
    """The directory fuglu uses for ``directory`` (see above): itself, unless anybody
    may write to it."""
    if not is_world_writable(directory):
        return directory
    if STARTED_AS_ROOT and home in SHARED_HOMES:
        return SHARED_HOMES[home]
    private = os.path.join(directory, 'fuglu-%s' % current_user_name())
    return private if home in ('run', 'log') else os.path.join(private, home)


def shared_file_path(path, home):
    """The path fuglu uses for a file configured as ``path`` (see above)."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(shared_directory(directory, home), name)


def open_directory(path, create_mode=None, owners=None, check_mode=True):
    """An O_DIRECTORY descriptor of ``path``, refused (UnsafeLocation) when its last
    component is a link, when it belongs to none of ``owners`` (uids; default: this
    process and root) or (``check_mode``) when group or others may write to it. A
    missing directory is created (parents too) when ``create_mode`` is given."""
    flags = os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if create_mode is None:
            raise
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            os.makedirs(parent, 0o755)
        try:
            os.mkdir(path, create_mode)
        except FileExistsError:
            pass
        fd = os.open(path, flags)
    except OSError as error:
        import errno
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeLocation('%s is a link or not a directory' % path)
        raise
    info = os.fstat(fd)
    allowed = set(owners) if owners is not None else {os.geteuid(), 0}
    problem = None
    if info.st_uid not in allowed:
        problem = '%s belongs to uid %d, not to fuglu\'s user' % (path, info.st_uid)
    elif check_mode and info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = '%s is writable by group or others (mode %o)' % (path, stat.S_IMODE(info.st_mode))
    if problem:
        os.close(fd)
        raise UnsafeLocation(problem)
    return fd


def prepare_shared_home(path, home, owner=None):
    """Create (when missing) and check the directory that shared_directory() chose.
    As root: a SHARED_HOMES directory, its parents root's, itself given to ``owner``
    ((uid, gid) of the daemon user). Otherwise, and for a home without such a directory,
    a private directory (mode 0700) of ours."""
    if os.geteuid() == 0 and home in SHARED_HOMES:
        os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
        owners = {0} if owner is None else {0, owner[0]}
        fd = open_directory(path, create_mode=SHARED_HOME_MODES.get(home, 0o750), owners=owners,
                            check_mode=False)
        try:
            if owner is not None:
                os.fchown(fd, owner[0], owner[1])
            os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) & ~0o022)
        finally:
            os.close(fd)
        return
    private = path if os.path.basename(path).startswith('fuglu-') else os.path.dirname(path)
    for directory in (private, path):
        os.close(open_directory(directory, create_mode=0o700))


def _temporary_file_at(dir_fd, name, mode):
    """(fd, temporary name) of a new file beside ``name`` in ``dir_fd``."""
    if '/' in name or name in ('', '.', '..'):
        raise UnsafeLocation('not a file name: %r' % name)
    temporary = '.%s.%s' % (name[:100], os.urandom(6).hex())
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC
    return os.open(temporary, flags, mode, dir_fd=dir_fd), temporary


def _rename_or_remove(dir_fd, temporary, name, fd=None):
    try:
        os.rename(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(temporary, dir_fd=dir_fd)
        except OSError:
            pass
        raise


def create_file_at(dir_fd, name, mode=0o600):
    """A new, empty file ``name`` in the open directory ``dir_fd``, open for writing
    (binary): made under a fresh name with O_EXCL|O_NOFOLLOW and renamed over
    ``name``, so whatever was planted there (a link, a hard link to another file) is
    replaced, never written through."""
    fd, temporary = _temporary_file_at(dir_fd, name, mode)
    _rename_or_remove(dir_fd, temporary, name, fd)
    return os.fdopen(fd, 'wb')


def write_file_at(dir_fd, name, data, mode=0o600, owner=None):
    """Replace ``name`` in the open directory ``dir_fd`` with ``data`` (bytes, or a list
    of message parts: bytes and spool file sections, see send_parts), written
    completely under a fresh name first (see create_file_at): readers see the old or
    the new content, never half of it. ``owner``: (uid, gid) to give it."""
    fd, temporary = _temporary_file_at(dir_fd, name, mode)
    try:
        with os.fdopen(fd, 'wb', closefd=False) as out:
            for chunk in part_chunks(data if isinstance(data, list) else [data],
                                     SPOOL_CHUNK_SIZE):
                out.write(chunk)
            out.flush()
            os.fsync(fd)
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, owner[0], owner[1])
    except BaseException:
        os.close(fd)
        os.unlink(temporary, dir_fd=dir_fd)
        raise
    _rename_or_remove(dir_fd, temporary, name, fd)
    os.close(fd)


def append_file_at(dir_fd, name, mode=0o600):
    """``name`` in the open directory ``dir_fd`` opened for appending (binary), created
    when missing; refused when it is a link, not a regular file, not ours or has
    other names (a hard link planted to make us write elsewhere)."""
    import errno
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | O_NOFOLLOW | O_CLOEXEC
    try:
        fd = os.open(name, flags, mode, dir_fd=dir_fd)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UnsafeLocation('%s is a link' % name)
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_uid != os.geteuid():
        os.close(fd)
        raise UnsafeLocation('%s is not a plain file of fuglu\'s own' % name)
    return os.fdopen(fd, 'ab')


###############################################################################
# Configuration
###############################################################################
# The semantics are FuGlu's: RawConfigParser, last value wins, no
# interpolation, option names case-insensitive. Every component declares its options
# once in a `requiredvars`-style table (option -> default + description); those tables
# are the fallback for lookups, the source of --dump-defaults / fuglu.conf.dist and of
# the lint checks.

def _opt(default, description, section=None, validator=None, confidential=False, **more):
    """An option spec. ``more``: 'path' ('file' or 'dir' fuglu reads, 'dirs' a comma
    list of those, 'writefile' or 'writedir' it writes) with 'home' (see SHARED_HOMES),
    'missing' (what happens when a default path does not exist) and 'made_as_root'
    (created before the privilege drop), checked by check_paths(); 'inert' (why the
    option has no effect: a lint warning when it is set)."""
    spec = {'default': default, 'description': description}
    if section:
        spec['section'] = section
    if validator:
        spec['validator'] = validator
    if confidential:
        spec['confidential'] = True
    spec.update(more)
    return spec


def _is_int(value):
    try:
        int(value)
        return True
    except (TypeError, ValueError):
        return False


def _is_number(value):
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def _is_seconds(value):
    """A time in seconds: a non-negative number, fractions allowed."""
    return _is_number(value) and float(value) >= 0


def _is_bool(value):
    return str(value).strip().lower() in FuConfigParser.BOOLEAN_STATES


def _is_action(value):
    return string_to_actioncode(value) is not None or \
        str(value).strip().upper() in PSEUDO_ACTIONS


def _is_port(value, allow_empty=False):
    value = str(value).strip()
    if allow_empty and value in ('', '0'):
        return True
    return value.isdigit() and 0 < int(value) < 65536


def _is_networks(value):
    try:
        parse_networks(value)
        return True
    except ValueError:
        return False


# section -> option -> spec. Order is the order of fuglu.conf.dist.
CORE_DEFAULTS = {
    'main': {
        'identifier': _opt('dist',
                           'free label, logged at start and on reload, shown in the metrics'),
        'daemonize': _opt('1', 'fork into the background (ignored with --foreground and --lint)',
                          validator=_is_bool),
        'scantimelogger': _opt('0', 'log per-plugin times of every message to the logger '
                                    'fuglu.Timings (INFO); a plugin step of a second or more also '
                                    'as a WARNING', validator=_is_bool),
        'user': _opt('nobody', 'started as root (daemonized or with -f), fuglu binds its ports, '
                               'then becomes this user before it reads any mail; the user must '
                               'exist'),
        'group': _opt('nobody, nogroup', 'groups to drop to: the first one that exists is used'),
        'plugindir': _opt('', 'comma separated directories searched for plugin modules, before the '
                              'bundled ones', path='dirs'),
        'plugins': _opt('archive,attachment,clamav,spamassassin',
                        'scanner plugins, in the order they run: alias, dotted module.Class, each '
                        'optionally with (configsection)'),
        'prependers': _opt('debug,skip', 'prepender plugins: run before the scanners and may '
                                         'change the plugin lists'),
        'appenders': _opt('', 'appender plugins: run after the message was delivered or refused'),
        'mplugins': _opt('', 'milter-stage plugins (milter connector only): act at connect, helo, '
                             'mailfrom, rcpt, header, eoh or eob time, before the scanners'),
        'bindaddress': _opt('127.0.0.1', 'address the incoming ports listen on, unless an entry '
                                         'names its own'),
        'incomingport': _opt('10025,10099,10888',
                             'listeners, comma separated: port (smtp), protocol:port or '
                             'protocol:address:port; protocols smtp (after-queue), esmtp '
                             '(before-queue proxy), milter, netcat'),
        'smtp_command_line_limit': _opt('2048', 'longest SMTP command line accepted, in bytes',
                                        validator=_is_int),
        'smtp_data_line_limit': _opt('1048576', 'longest line accepted in a message, in bytes',
                                     validator=_is_int),
        'smtp_max_message_size': _opt('268435456', 'largest message accepted, in bytes (announced '
                                                   'as SIZE); 0 = no limit',
                                      validator=_is_int),
        'netcat_max_message_size': _opt('', 'largest message the netcat connector accepts, in '
                                            'bytes; empty: smtp_max_message_size; 0 = no limit',
                                        validator=lambda value: (not value.strip() or
                                                                 _is_int(value))),
        'smtptimeout': _opt(
            '300', 'seconds to wait for the next command, data or milter packet from a client',
            validator=_is_seconds),
        'max_session_time': _opt(
            '1200', 'seconds one client connection may last in all, whatever it sends (a client '
                    'trickling bytes keeps each read alive, not the session); then smtp/esmtp '
                    'answer 421 4.4.2, netcat DEFER, milter closes; 0 = no limit',
            validator=_is_seconds),
        'trusted_xforward_peers': _opt('', 'IPs/networks allowed to send client information '
                                           '(XFORWARD, milter connect data, netcat envelope). '
                                           'Empty: every peer is trusted',
                                       validator=_is_networks),
        'outgoinghost': _opt('127.0.0.1', 're-injection target host; ${injecthost} = the host that '
                                          'sent the message, $NAME = environment variable'),
        'outgoingport': _opt('10026', 're-injection target port', validator=_is_port),
        'outgoinghelo': _opt('', 'EHLO name used when re-injecting; empty: this host\'s FQDN'),
        'outgoingretry': _opt('1', 'extra attempts when the downstream connection fails',
                              validator=_is_int),
        'downstream_connect_timeout': _opt(
            '10', 'seconds to wait for the TCP connection to the downstream (re-injection, '
                  'bounces, the esmtp after-filter server); Postfix: smtp_connect_timeout 30s',
            validator=_is_seconds),
        'downstream_reply_timeout': _opt(
            '30', 'seconds to wait for the downstream\'s greeting and each reply (smtp connector '
                  'and bounces); connect, greeting, EHLO, XFORWARD and MAIL together stay well '
                  'inside Postfix\'s smtp_mail_timeout (300s); too late: 451 4.4.2',
            validator=_is_seconds),
        'downstream_data_timeout': _opt(
            '120', 'seconds to wait for the downstream\'s reply after the message data; Postfix '
                   'waits smtp_data_done_timeout (600s) for fuglu\'s, scanning included; too late: '
                   '451 4.4.2', validator=_is_seconds),
        'bouncehost': _opt('', 'where bounces are sent; empty: outgoinghost'),
        'bounceport': _opt('', 'port for bounces; empty: outgoingport',
                           validator=lambda value: _is_port(value, allow_empty=True)),
        'tempdir': _opt('/tmp', 'directory of the spool files: messages over spool_threshold, and '
                                'suspect.tempfile (the message as a file for plugins that ask '
                                'for one); each is created 0600 and removed when its message is '
                                'done, and files left by a crash are removed at start-up. In a '
                                'directory anybody may write to (/tmp) fuglu uses its private '
                                'fuglu-USER/spool there (USER: the user fuglu runs as)',
                        path='writedir', home='spool'),
        'spool_threshold': _opt('524288', 'messages larger than this many bytes are kept in a '
                                           'spool file in tempdir while fuglu handles them, not '
                                           'in memory (and are sent on, to clamd and spamd from '
                                           'there); 0 = every message in memory',
                                validator=_is_int),
        'prependaddedheaders': _opt('X-Fuglu-', 'prefix of the headers fuglu adds'),
        'trashdir': _opt('', 'if set, a copy of every message a scanner DELETEs is kept here (a '
                             'directory anybody may write to is moved like controlport, to '
                             '/var/lib/fuglu/trash as root)',
                         path='writedir', home='trash'),
        'trashlog': _opt('0', 'also log each trashed message to 00-fuglutrash.log in trashdir',
                         validator=_is_bool),
        'disablebounces': _opt('0', 'never send a bounce', validator=_is_bool),
        'nobouncefile': _opt('${confdir}/rules/nobounce.txt',
                             'domains (one per line) that never get bounces',
                             path='file', missing='bounces may go to every domain'),
        'debuginfoheader': _opt('0', 'add a <prefix>Debuginfo header', validator=_is_bool),
        'spamstatusheader': _opt('1', 'add a <prefix>Spamstatus: YES|NO header',
                                 validator=_is_bool),
        'suspectidheader': _opt('1', 'add a <prefix>Suspect: <id> header', validator=_is_bool),
        'suspectidreturn': _opt('1', 'append (<id>) to DELETE, REJECT and DEFER replies',
                                validator=_is_bool),
        'mrtgdir': _opt('', 'directory for MRTG counter files (inout, hamspam, threads, virus, '
                            'scantime; FuGlu\'s format), rewritten every mrtg_interval seconds; '
                            'empty: none (a directory anybody may write to is moved like '
                            'controlport, to /var/lib/fuglu/mrtg as root)',
                        path='writedir', home='mrtg'),
        'mrtg_interval': _opt('30', 'seconds between two writes of the MRTG files',
                              validator=_is_int),
        'metrics_listen': _opt('', 'serve the counters in Prometheus text format at '
                                   'http://ADDRESS:PORT/metrics; PORT or ADDRESS:PORT, loopback '
                                   'addresses only; empty: off'),
        'syslog': _opt('0', 'also log to the local syslog as fuglu[pid], in every mode',
                       validator=_is_bool),
        'syslog_facility': _opt('mail', 'syslog facility of those lines'),
        'syslog_address': _opt('/dev/log', 'unix socket of the local syslog'),
        'controlport': _opt('/tmp/fuglu_control.sock',
                            'control socket: a path (unix socket, mode 0600) or a TCP port; empty: '
                            'no control socket. A path in a directory anybody may write to (/tmp) '
                            'is moved to /run/fuglu when fuglu starts as root, else to a private '
                            'fuglu-USER directory there',
                            path='writefile', home='run', made_as_root=True),
        'controladdress': _opt('127.0.0.1', 'bind address when controlport is a TCP port'),
        'controltoken': _opt('', 'shared secret required on a TCP control port', confidential=True),
        'logtemplate': _opt('Suspect ${id} from=${from_address} to=${to_address} size=${size} '
                            'spam=${spam} virus=${virus} modified=${modified} decision=${decision}',
                            'line logged for every message after scanning; empty: none'),
        'versioncheck': _opt('0', 'no effect in fuglu (accepted for FuGlu configurations): fuglu '
                                  'never looks up versions on the network',
                             validator=_is_bool,
                             inert='fuglu never looks up versions on the network'),
        'address_compliance_checker': _opt('Default', 'envelope address check: Default, '
                                                      'LazyLocalPart, AsciiOnly, '
                                                      'PrintableAsciiOnly, NoCheck'),
        'address_compliance_checker_maxsize': _opt('64', 'longest local part accepted',
                                                   validator=_is_int),
        'address_compliance_fail_action': _opt('defer', 'answer to invalid envelope addresses: '
                                                        'defer, reject, discard'),
        'address_compliance_fail_message': _opt('invalid sender or recipient address',
                                                'reply text for the above'),
        'remove_tmpfiles_on_error': _opt('1', 'no effect in fuglu (accepted for FuGlu '
                                              'configurations): a message\'s temporary file '
                                              'is always removed when the message is done',
                                         validator=_is_bool,
                                         inert='temporary files are always removed'),
        'disabledarchivetypes': _opt('pdf', 'archive types never opened'),
    },
    'performance': {
        'backend': _opt('thread', 'worker backend: thread (one process, a pool of threads) or '
                                  'process (pre-forked worker processes, each with its own '
                                  'threads; FuGlu\'s asyncprocess is served by it too)'),
        'minthreads': _opt('2', 'threads kept running (process backend: in each worker process)',
                           validator=_is_int),
        'maxthreads': _opt('40', 'most threads, i.e. connections handled at once (process backend: '
                                 'by each worker process)',
                           validator=_is_int),
        'max_sessions_per_client': _opt(
            '', 'connections one client address may have open at once, any connector, queued '
                'ones included; more are refused at once (smtp/esmtp 421 4.7.0, netcat DEFER, '
                'milter: closed) and logged. Postfix feeding fuglu is one client: keep it above '
                'the process limit of the transport or smtpd that connects. Empty: half of '
                'maxthreads; 0 = no limit',
            validator=lambda value: not value.strip() or _is_int(value)),
        'minfreethreads': _opt('0', 'idle threads kept ready (process backend: in each worker '
                                    'process)', validator=_is_int),
        'initialprocs': _opt('0', 'process backend: worker processes; 0 = 2 x CPUs, n >= 1: n, '
                                  'a fraction or negative x: CPUs x |x| (at least 1)',
                             validator=_is_number),
        'max_requests_per_worker': _opt(
            '0', 'process backend: connections a worker process serves before a fresh one '
                 'replaces it (for plugins that leak memory); 0 = never', validator=_is_int),
        'stuck_worker_timeout': _opt(
            '600', 'process backend: a worker process busy with one message longer than this is '
                   'killed and replaced; its connections close without an answer, so the MTA '
                   'retries; 0 = never', validator=_is_seconds),
        'listen_backlog': _opt('0', 'listen() backlog; 0: the system maximum', validator=_is_int),
        'slow_enqueue_warn_ms': _opt('100', 'warn when handing a connection to the workers blocks '
                                            'this long',
                                     validator=_is_int),
    },
    'spam': {
        'defaultlowspamaction': _opt('DUNNO', 'what DEFAULTLOWSPAMACTION means',
                                     validator=_is_action),
        'defaulthighspamaction': _opt('DUNNO', 'what DEFAULTHIGHSPAMACTION means',
                                      validator=_is_action),
    },
    'virus': {
        'defaultvirusaction': _opt('DELETE', 'what DEFAULTVIRUSACTION means', validator=_is_action),
    },
    'smtpconnector': {
        'requeuetemplate': _opt('FUGLU REQUEUE(${id}): ${injectanswer}',
                                'text of the 250 reply after re-injection; ${injectanswer} = the '
                                'downstream reply'),
    },
    'esmtpconnector': {
        'queuetemplate': _opt('${injectanswer}', 'text of the 250 reply after the downstream '
                                                 'accepted the message'),
        'ignore_multiple_recipients': _opt('0', 'forward only the first recipient (spam traps)',
                                           validator=_is_bool),
        'downstream_timeout': _opt('50', 'seconds to wait for each reply of the after-filter '
                                         'server; keep it well below Postfix\'s '
                                         'smtpd_proxy_timeout (default 100s), so the client gets '
                                         'fuglu\'s 4xx and the scan still fits',
                                         validator=_is_seconds),
    },
    'milter': {
        'milter_mode': _opt('readonly', 'what the milter writes back, words that add up: tags, '
                                        'manual, auto, autoheaders, autofrom, autoto, '
                                        'replace_demo; readonly wins over all'),
        'milter_mode_options': _opt('', 'manual mode: all, body, headers, from, to; '
                                        'autoheaders: prepend'),
        'milter_max_packet_size': _opt('1048576', 'largest milter packet accepted, in bytes',
                                       validator=_is_int),
        'milter_progress_interval': _opt('10', 'seconds between SMFIR_PROGRESS keep-alives while a '
                                               'message is scanned (Postfix '
                                               'milter_content_timeout); 0: none',
                                         validator=_is_seconds),
        'milter_debug': _opt('0', 'log every milter packet', validator=_is_bool),
    },
    'PluginAlias': {},
    'environment': {},
    'databaseconfig': {
        'dbpriority': _opt(
            'sql', 'where per-recipient values come from, in order: sql\n(FuGlu\'s rest and yaml '
                   'sources are not implemented: ignored, lint warns)'),
        'value_cache_ttl': _opt(
            '30', 'seconds an answer of the database (a value, or that there is none) is used '
                  'before asking again;\nwhile the database is away an older answer is used '
                  'instead. 0: ask every time, keep nothing', validator=_is_number),
        'dbconnectstring': _opt(
            '', 'SQLAlchemy URL of the per-recipient settings, e.g.\n'
                'postgresql+psycopg2://fuglu:secret@dbhost/fuglu (pip install SQLAlchemy '
                'psycopg2-binary),\n'
                'mysql+pymysql://fuglu:secret@dbhost/fuglu (pip install SQLAlchemy PyMySQL),\n'
                'sqlite:////var/lib/fuglu/settings.db (works without SQLAlchemy).\n'
                'Empty: no per-recipient settings, the plugins use this file', confidential=True),
        'sql': _opt(
            "SELECT value FROM fugluconfig WHERE `section`=:section AND `scope` IN "
            "(:globalscope,CONCAT('%',:to_domain),:to_address) AND `option`=:option "
            "ORDER BY `scope` DESC LIMIT 1",
            'query for one value, keyed on the FIRST recipient: the first column of the first row '
            'is the value.\nPlaceholders: :section, :option, :globalscope and the message\'s '
            ':to_address, :to_domain, :to_localpart,\n:from_address, :from_domain, '
            ':from_localpart, :subject, :id, :timestamp, :date, :time.\n'
            'The default is MySQL/MariaDB/SQLite syntax; for PostgreSQL drop the backticks and '
            'ORDER BY scope COLLATE "C" DESC'),
        'sqlsection': _opt(
            "SELECT `value`, `option`, `scope` FROM fugluconfig WHERE `section`=:section AND "
            "`scope` IN (:globalscope,CONCAT('%',:to_domain),:to_address) ORDER BY `scope` DESC",
            'query for every row of one section for the recipient (for plugins that read option '
            'names as data,\nlike the attachment rules of config_section_*); the columns are named '
            'by scope_field, option_field,\nvalue_field; placeholders as for sql, without :option'),
        'globalscope': _opt('$GLOBAL', 'scope of the rows that apply to every recipient'),
        'option_field': _opt('option', 'name of the option column in the results of sqlsection'),
        'scope_field': _opt('scope', 'name of the scope column in the results of sqlsection'),
        'value_field': _opt('value', 'name of the value column in the results of sqlsection'),
        'timeout': _opt('5', 'seconds a lookup waits for the database (connecting and querying); '
                             'then it has failed', validator=_is_number),
        'fallback_to_file_values': _opt(
            '0', 'when a lookup fails (database down, timeout, bad query or value) and no earlier '
                 'answer is cached:\n0 = defer the message (4xx, the MTA retries later), '
                 '1 = use the value of this file', validator=_is_bool),
    },
}


class ConfigProblem(FugluError):
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

    def __init__(self, *args, **kwargs):
        confdir = kwargs.pop('confdir', DEFAULT_CONFDIR)
        # lookups are memoised: connectors read the same options for every message
        self._lookup_cache = {}
        kwargs.setdefault('strict', False)
        kwargs.setdefault('interpolation', None)
        super().__init__(*args, **kwargs)
        self.confdir = confdir
        self.files = []
        self.option_sources = {}  # (section, option) -> file it was read from
        self._defaults_table = {}  # (section, option) -> default string

    # FuGlu's names for the ${confdir} marker and the config file's directory
    markers = property(lambda self: {'${confdir}': self.confdir})

    def set_configpath_from_configfile(self, configfile):
        self._lookup_cache.clear()
        self.confdir = os.path.dirname(os.path.abspath(configfile))

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

    def _read(self, fp, fpname):
        # read()/read_string()/read_file() of RawConfigParser fill the sections directly
        self._lookup_cache.clear()
        return super()._read(fp, fpname)

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

    def update_defaults(self, section, defaults):
        """FuGlu's name for set_defaults()."""
        self.set_defaults(section, defaults)

    def has_default(self, section, option):
        return (section, option.lower()) in self._defaults_table

    def has_option(self, section, option):
        return super().has_option(section, option) or self.has_default(section, option)

    # -- lookups --------------------------------------------------------------
    # FuGlu's signatures: get(section, option, fallback, override, resolve_env). The
    # fallback is used when neither the files nor a plugin's defaults have the option;
    # override replaces the configured value (still converted, markers applied).
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
        if isinstance(value, str) and '${confdir}' in value:
            value = value.replace('${confdir}', self.confdir)
        return value

    def apply_markers(self, inputstring):
        """FuGlu's name for expand(): ${confdir} replaced."""
        return self.expand(inputstring)

    def resolve_env(self, inputstring):
        """'$NAME' -> the value of environment variable NAME, when it is set."""
        return resolve_env_marker(inputstring)

    def _cached(self, kind, section, option, convert):
        key = (kind, section, option)
        try:
            return self._lookup_cache[key]
        except KeyError:
            value = convert()
            self._lookup_cache[key] = value
            return value

    def get(self, section, option, fallback=configparser._UNSET, override=None,
            resolve_env=False, raw=False, vars=None, **kwargs):
        if override is not None:
            value = override
        elif vars is not None:
            value = self._get(section, option, raw)
        else:
            try:
                value = self._cached('raw' if raw else 'str', section, option,
                                     lambda: self._get(section, option, raw))
            except (configparser.NoSectionError, configparser.NoOptionError):
                if fallback is not configparser._UNSET:
                    return fallback
                raise
        if resolve_env:
            value = resolve_env_marker(value)
        return value if raw else self.expand(value)

    def _get(self, section, option, raw=False):
        value = self._raw(section, option)
        return value if raw else self.expand(value)

    def _typed(self, kind, section, option, fallback, override, convert):
        if override is not None:
            return convert(override)
        try:
            return self._cached(kind, section, option,
                                lambda: convert(self._raw(section, option)))
        except (configparser.NoSectionError, configparser.NoOptionError):
            if fallback is not configparser._UNSET:
                return fallback
            raise

    @staticmethod
    def _number(kind, value):
        # values a plugin set() or declared as numbers are taken as they are
        return kind(value.strip() if isinstance(value, str) else value)

    def getint(self, section, option, fallback=configparser._UNSET, override=None, **kwargs):
        return self._typed('int', section, option, fallback, override,
                           lambda value: self._number(int, value))

    def getfloat(self, section, option, fallback=configparser._UNSET, override=None, **kwargs):
        return self._typed('float', section, option, fallback, override,
                           lambda value: self._number(float, value))

    def getboolean(self, section, option, fallback=configparser._UNSET, override=None,
                   **kwargs):
        def convert(value):
            if isinstance(value, (bool, int, float)):
                return bool(value)
            key = value.strip().lower()
            if key not in self.BOOLEAN_STATES:
                raise ValueError('Not a boolean: %s' % value)
            return self.BOOLEAN_STATES[key]
        return self._typed('bool', section, option, fallback, override, convert)

    def getlist(self, section, option, separators=',', strip=True, lower=False,
                fallback=configparser._UNSET, override=None, resolve_env=False):
        value = self.get(section, option, fallback=fallback, override=override)
        if isinstance(value, list):
            return value
        if resolve_env:
            value = resolve_env_marker(value)
        items = re.split('[%s]' % re.escape(separators), value) if value else []
        if strip:
            items = [item.strip() for item in items]
        if lower:
            items = [item.lower() for item in items]
        items = [item for item in items if item]
        if resolve_env:
            items = [resolve_env_marker(item) for item in items]
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
# scope: async backends, REST/YAML runtime config, Received-header heuristics ...), so an
# existing fuglu.conf lints clean. Each entry is a regular expression.
IGNORED_OPTIONS = {
    'main': ['mplugins', 'configdir', 'address_compliance_delay2rcpt'],
    'performance': ['queue_put_timeout', 'task_queue_multiplier', 'sync_plugin_offload_executor',
                    'loop_lag_interval', 'loop_lag_warn', 'loop_slow_callback_duration',
                    'worker_liveness_interval', 'worker_liveness_slow_read', 'async_coroutines',
                    'async_threadpool', r'async_\w+_timeout', 'join_timeout', r'att_mgr_\w+',
                    'disable_aiosmtp'],
    'milter': ['ignoreclient'],
    'databaseconfig': [r'restapi_\w+', 'yaml_filepath'],
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
            errors.append('Missing configuration value without default %s'
                          % config.where(target, option))
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


# A check of the configuration returns findings, (level, text): 'error', 'warning',
# 'info' or 'note' (the last for lint only). `--lint` prints them, the daemon logs them.
FINDING_LOG_LEVELS = {'error': logging.ERROR, 'warning': logging.WARNING}


def log_findings(logger, findings):
    for level, text in findings:
        logger.log(FINDING_LOG_LEVELS.get(level, logging.INFO), '%s', text)


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
# FuGlu's template syntax: $name or ${name}; names may start with @ (a tag)
# and contain . and : (${header:subject}); $$ is a literal $. Substitution is safe:
# malformed placeholders stay as they are, unknown names become ''.
#
# Only configured texts are templates. What a variable brings in — a subject, an
# address, a header, a tag set from the message, an attachment or virus name — is
# inserted as it is and never expanded again, and a text a plugin hands back as its
# reply is not a template at all (FuGlu's plugins fill their own configured texts, its
# connectors send the result as it is). Each variable is looked up once per template
# and the result is cut at ``limit`` characters, so a template naming ${body:full} many
# times costs one copy of the body, not many.

TEMPLATE_NAME = r'@?[a-z][_a-z0-9.:]*'   # name, @tag, header:Name (as in FuGlu)
TEMPLATE_RE = re.compile(r'\$(?:(\$)|\{(%s)\}|(%s))' % (TEMPLATE_NAME, TEMPLATE_NAME),
                         re.IGNORECASE)
# characters of a filled template at most (log lines, bounce texts, paths, replies)
TEMPLATE_MAX_CHARS = 1000000


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


def apply_template(templatecontent, suspect=None, values=None, valuesfunction=None,
                   limit=TEMPLATE_MAX_CHARS):
    """Fill ``template`` with ``values``, then the message defaults, then any header or
    @tag of the message (the SuspectFilter fields). ``valuesfunction``, as in FuGlu, is
    called with {name: value} for each variable and returns the dict to use (escaping).
    Inserted values are never expanded; the result has at most ``limit`` characters."""
    if templatecontent is None:
        return ''
    template = force_uString(templatecontent)
    if '$' not in template:
        return template[:limit]
    values = dict(values or {})
    resolved = {}

    def lookup(name):
        value = None
        for key in (name, name.lower()):
            if key in values:
                value = values[key]
                break
        else:
            if suspect is not None:
                compute = TEMPLATE_DEFAULTS.get(name.lower())
                if compute is not None:
                    value = compute(suspect)
                else:
                    found = SuspectFilter.field_values(suspect, name)
                    value = found[0] if found else None
        if valuesfunction is not None:
            value = valuesfunction({name: value}).get(name)
        return '' if value is None else force_uString(value)

    pieces, room, last = [], limit, 0
    for match in TEMPLATE_RE.finditer(template):
        if match.group(1):
            value = '$'
        else:
            name = match.group(2) or match.group(3)
            if name not in resolved:
                resolved[name] = lookup(name)
            value = resolved[name]
        for piece in (template[last:match.start()], value):
            pieces.append(piece[:room])
            room -= len(pieces[-1])
        last = match.end()
        if room <= 0:
            return ''.join(pieces)
    pieces.append(template[last:last + room])
    return ''.join(pieces)


class _SuspectTemplate(string.Template):
    """FuGlu's template class: private there, but its plugins (and plugins copied from
    them) fill templates with ``_SuspectTemplate(text).safe_substitute(values)``. The
    variable names of apply_template (``${@tag}``, ``${header:name}``); values are
    inserted as given, so apply_template remains the way for text from a message."""
    delimiter = '$'
    idpattern = TEMPLATE_NAME


def default_template_values(suspect, values=None):
    """The built-in template variables of a message as a dict (filled into
    ``values`` when given)."""
    values = {} if values is None else values
    for name, compute in TEMPLATE_DEFAULTS.items():
        values[name] = compute(suspect)
    return values


###############################################################################
# Message spool: big messages in files
###############################################################################
# A message over [main] spool_threshold bytes is not held in memory. The connector
# writes it into a spool file as it arrives (MessageWriter); the Suspect keeps the
# file, and re-injection (sendfile), clamd (INSTREAM chunks), spamd and the attachment
# walker (a read-only map) work from it. Memory per message in flight is then bounded
# by the threshold, not by smtp_max_message_size. suspect.tempfile of such a message is
# its spool file; for a message in memory, suspect.tempfile writes one on first use.
#
# Where: tempdir itself, or, when anybody may write to tempdir (/tmp), the directory
# shared_directory() gives for it ('spool' home). A spool file is named
# fuglu-spool-<random>, created 0600 with O_EXCL|O_NOFOLLOW relative to the opened
# directory, and locked (flock) by its process until that process removes it at the end
# of the message: on every path, the session's end, a refused or broken transfer, or
# the garbage collector as the last resort (weakref.finalize).
#
# A process that dies mid-message (kill -9, a crash, power loss) cannot remove its
# files; its locks go with it. At start-up fuglu removes the fuglu-spool-* files it
# finds unlocked, and leaves alone those of other fuglu instances sharing the
# directory: their locks are held; on the process backend the parent does the same
# when a worker died. A file is written only after it is locked, so a
# file that is unlocked and empty may be one being created right now: it is left until
# it is SPOOL_STALE_EMPTY_SECONDS old.

SPOOL_PREFIX = 'fuglu-spool-'
SPOOL_STALE_EMPTY_SECONDS = 60
SPOOL_CHUNK_SIZE = 262144          # bytes read from a spool file at a time
# Messages from this size on count as big: when they are done, the daemon gives freed
# memory back to the system (release_memory_after_big_messages).
BIG_MESSAGE_SIZE = 262144
big_messages_done = 0


def count_finished_message(size):
    """A message of ``size`` bytes is done (Suspect.cleanup): count it when it is big."""
    global big_messages_done
    if size >= BIG_MESSAGE_SIZE:
        big_messages_done += 1

_spool_directories = {}            # tempdir -> its spool directory, once prepared


def spool_directory(tempdir):
    """The directory of the spool files for ``tempdir`` (see above); a private one is
    created on first use (the daemon, as root, creates its SHARED_HOMES one)."""
    directory = _spool_directories.get(tempdir)
    if directory is None:
        directory = shared_directory(tempdir, 'spool')
        if directory != tempdir and not os.path.isdir(directory):
            prepare_shared_home(directory, 'spool')
        _spool_directories[tempdir] = directory
    return directory


def _remove_spool_file(fd, path):
    """Unlink first, then close: the file is never unlocked while it still has its name."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        logging.getLogger('fuglu.spool').warning('cannot remove %s: %s', path, error)
    try:
        os.close(fd)
    except OSError:
        pass


class MessageSpool(object):
    """One message in a spool file of ``tempdir``: written once (write()), then read
    (read(), chunks(), send(), view()). ``path`` is what suspect.tempfile gives,
    ``size`` its length; ``has_dot_lines`` is True when a line of it starts with '.'
    (SMTP must stuff those when it sends the message on). remove() deletes it; so does
    the garbage collector when it was forgotten on an error path."""

    def __init__(self, tempdir):
        import fcntl
        directory = spool_directory(tempdir)
        dir_fd = open_directory(directory, check_mode=False)
        try:
            name = SPOOL_PREFIX + os.urandom(12).hex()
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC
            self.fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        self.path = os.path.join(directory, name)
        import weakref
        self._finalizer = weakref.finalize(self, _remove_spool_file, self.fd, self.path)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.size = 0
        self.has_dot_lines = False
        self._at_line_start = True
        self._map = None

    def write(self, data):
        """Append ``data`` (bytes)."""
        if self._at_line_start and data[:1] == b'.' or b'\n.' in data:
            self.has_dot_lines = True
        if data:
            self._at_line_start = data[-1:] == b'\n'
        with memoryview(data) as view:
            written = 0
            while written < len(view):
                written += os.pwrite(self.fd, view[written:], self.size + written)
        self.size += len(data)

    def read(self, start=0, end=None):
        """The bytes from ``start`` to ``end`` (default: the end), read in one go."""
        end = self.size if end is None else min(end, self.size)
        if start >= end:
            return b''
        data = os.pread(self.fd, end - start, start)
        if len(data) < end - start:   # a short read (rare on a regular file): the rest
            data += b''.join(self.chunks(start + len(data), end))
        return data

    def chunks(self, start=0, end=None, size=SPOOL_CHUNK_SIZE):
        """The bytes from ``start`` to ``end`` as pieces of at most ``size`` bytes."""
        end = self.size if end is None else min(end, self.size)
        while start < end:
            chunk = os.pread(self.fd, min(size, end - start), start)
            if not chunk:
                raise OSError('spool file %s is shorter than %d bytes' % (self.path, end))
            start += len(chunk)
            yield chunk

    def send(self, sock, start=0, end=None):
        """Send the bytes from ``start`` to ``end`` on ``sock`` without copying them
        through Python (sendfile); the socket's timeout applies to each wait."""
        end = self.size if end is None else min(end, self.size)
        if end > start:
            with open(self.fd, 'rb', buffering=0, closefd=False) as handle:
                sock.sendfile(handle, start, end - start)

    def view(self):
        """The whole file as a read-only memory map (bytes-like: find, slices, re), made
        on first use and kept until remove(). Pages read count as resident memory while
        mapped: for a walk over the structure, not for streaming."""
        if not self.size:
            return b''
        if self._map is None:
            self._map = spool_map(self.fd, self.size)
        return self._map

    def section(self, start=0, end=None):
        """A FileSection of this file, a part for SMTPClient.data and send_parts()."""
        return FileSection(self, start, self.size if end is None else end)

    def remove(self):
        """Delete the file (idempotent). A map still in use by a plugin is left to the
        garbage collector; the file's name and lock are gone either way."""
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:   # views of it still exist
                pass
            self._map = None
        self._finalizer()
        self.fd = -1   # closed: a later read fails instead of reading a reused number


_spool_map_class = []   # the mmap subclass, made on first use (mmap is imported then)


def spool_map(fd, size):
    """A read-only map of ``size`` bytes of ``fd``, with the bytes methods the MIME
    walker uses that mmap lacks (startswith, endswith)."""
    if not _spool_map_class:
        import mmap

        class SpoolMap(mmap.mmap):
            def startswith(self, prefix, start=0, end=None):
                end = len(self) if end is None else end
                return end - start >= len(prefix) and self[start:start + len(prefix)] == prefix

            def endswith(self, suffix, start=0, end=None):
                end = len(self) if end is None else end
                return end - start >= len(suffix) and self[end - len(suffix):end] == suffix
        _spool_map_class.append(SpoolMap)
    import mmap
    return _spool_map_class[0](fd, size, access=mmap.ACCESS_READ)


class FileSection(namedtuple('FileSection', 'spool start end')):
    """Bytes ``start`` to ``end`` of a MessageSpool, as a part of a message to send."""

    def __len__(self):
        return self.end - self.start


def remove_stale_spool_files(tempdir):
    """Remove the spool files of fuglu processes that are gone (see above); returns how
    many. Files locked by a live process, and others' files, stay."""
    import fcntl
    directory = shared_directory(tempdir, 'spool')
    try:
        dir_fd = open_directory(directory, check_mode=False)
    except FileNotFoundError:
        return 0
    removed = 0
    try:
        for name in os.listdir(dir_fd):
            if not name.startswith(SPOOL_PREFIX):
                continue
            try:
                fd = os.open(name, os.O_RDONLY | O_NOFOLLOW | O_CLOEXEC | os.O_NONBLOCK,
                             dir_fd=dir_fd)
            except OSError:
                continue
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue   # its process is alive
                if not info.st_size and time.time() - info.st_mtime < SPOOL_STALE_EMPTY_SECONDS:
                    continue   # maybe being created right now
                os.unlink(name, dir_fd=dir_fd)
                removed += 1
            except OSError as error:
                logging.getLogger('fuglu.spool').warning('cannot remove stale %s: %s',
                                                          os.path.join(directory, name), error)
            finally:
                os.close(fd)
    finally:
        os.close(dir_fd)
    return removed


class MessageWriter(object):
    """Where a message goes while it is received: memory while it is at most
    ``threshold`` bytes (0: no limit), then a MessageSpool in ``tempdir``. finish()
    returns the message, bytes or the MessageSpool; discard() drops it and its file.
    In memory the message is written into one growing buffer that finish() hands over
    without a copy."""

    def __init__(self, threshold=0, tempdir='/tmp'):
        self.threshold = threshold
        self.tempdir = tempdir
        import io
        self.size = 0
        self.memory = io.BytesIO()
        self.spool = None

    def write(self, data):
        """Append ``data`` (bytes); raises OSError when the spool file cannot be written."""
        self.size += len(data)
        if self.spool is None:
            if not self.threshold or self.size <= self.threshold:
                self.memory.write(data)
                return
            self.spool = MessageSpool(self.tempdir)
            # in chunks: getvalue() would copy the whole buffer, at its biggest
            with self.memory.getbuffer() as held:
                for start in range(0, len(held), SPOOL_CHUNK_SIZE):
                    self.spool.write(bytes(held[start:start + SPOOL_CHUNK_SIZE]))
            self.memory = None
        self.spool.write(data)

    def finish(self):
        if self.spool is not None:
            return self.spool
        data, self.memory = self.memory.getvalue(), None
        return data

    def discard(self):
        self.memory = None
        if self.spool is not None:
            self.spool.remove()
            self.spool = None


def message_writer(config):
    """A MessageWriter with the [main] spool_threshold and tempdir of ``config``."""
    return MessageWriter(config.getint('main', 'spool_threshold'),
                         config.get('main', 'tempdir'))


###############################################################################
# Suspect: the message under scan
###############################################################################

HEADER_END_RE = re.compile(rb'\r?\n\r?\n')


SUSPECT_TAG_MAXLENGTH = 256   # tag values are shortened to this in debug logs


class SimpleTimeoutMixin(object):
    """Named deadlines an object can check against (FuGlu's mix-in of Suspect):
    stimeout_set_timer(name, seconds), then stimeout_continue(name) is False once the
    time is up; stimeout_string/runtime/remaining(name) for logs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._stimedict = {}   # name -> (end, start, duration)
        self._stimehit = {}    # name -> True once the deadline was found passed

    def stimeout_set_timer(self, name, timeout):
        if timeout:
            now = time.time()
            self._stimedict[name] = (now + timeout, now, timeout)

    def stimeout_continue(self, name):
        end = self._stimedict.get(name, (0, 0, 0))[0]
        if end and time.time() > end:
            self._stimehit[name] = True
            return False
        return True

    def stimeout_string(self, name):
        end, start, duration = self._stimedict.get(name, (0, 0, 0))
        if duration:
            return 'timeout(real/limit) = %.1f/%.1f [s]' % (time.time() - start, duration)
        return 'no timeout'

    def stimeout_runtime(self, name):
        if name in self._stimedict:
            return time.time() - self._stimedict[name][1]
        return -1

    def stimeout_remaining(self, name):
        if name in self._stimedict:
            return max(0, self._stimedict[name][0] - time.time())
        return 0


RECEIVED_HEADER_MAX_CHARS = 8192   # of a Received header read for the client's identity


# The tags plugins and the core exchange through Suspect.tags; any other name is the
# plugins' own (FuGlu's convention, which the plugin bases' helpers follow too:
# '<PluginName>.<what>'). name -> (who sets it, what it means). tests/test_suspect.py
# checks that the core uses no tag missing here.
SUSPECT_TAGS = {
    # the verdicts of the scanners: engine name -> True/False; is_spam() and the others,
    # the X-Fuglu-Spamstatus header, the counters and the templates read them
    'virus': ('plugins', 'engine -> virus found'),
    'spam': ('plugins', 'engine -> spam'),
    'highspam': ('plugins', 'engine -> high-scoring spam'),
    'blocked': ('plugins', 'engine -> blocked (attachment rules)'),
    'welcomelisted': ('plugins', 'engine -> sender welcome-listed'),
    'blocklisted': ('plugins', 'engine -> sender block-listed'),
    # what a plugin asks of the core
    'noreinject': ('plugins', 'smtp/esmtp: answer 250 without delivering downstream'),
    'reinjectoriginal': ('plugins', 'deliver the source as received, without changes or '
                                    'added headers'),
    'noappenders': ('plugins', 'run no appenders for this message'),
    'skip_prependers': ('plugins', 'run no further prependers'),
    'nobounce': ('plugins', 'send no bounce about this message'),
    'milter_replace': ('plugins', 'milter_mode tags: the parts to write back (all, body, '
                                  'headers, from, to)'),
    'debug': ('plugins', 'Suspect.debug() writes to the file object in debugfile'),
    'debugfile': ('plugins', 'the open file of the tag debug (closed by the core)'),
    # what the core tells the plugins
    'incomingport': ('core', 'the port the message came in on'),
    'appenders': ('core', 'the appenders that will run (a prepender may change them)'),
    'decisions': ('core', '[(plugin section, action)] of the scanners so far'),
    'scantimes': ('core', '[(plugin section, seconds)] of the scanners so far'),
    'processingerrors': ('core', 'texts of the plugin failures so far'),
    'fuglu.scantime': ('core', 'seconds the scanners took, as text'),
    'origsubj': ('core', 'the raw Subject before update_subject() changed it'),
    'injectcode': ('core', 'the downstream\'s reply code to the delivery'),
    'injectanswer': ('core', 'the downstream\'s reply text to the delivery'),
    'injectmessage': ('core', 'the same (FuGlu has both names)'),
    'injectqueueid': ('core', 'the downstream\'s queue id, when its reply names one'),
    'ignored_recipients': ('core', 'esmtp ignore_multiple_recipients: the recipients '
                                   'acknowledged but not forwarded'),
    'prepend_identifier': ('core', 'netcat: the token of the envelope block'),
}
# (per milter connection, MilterSession.tags: 'skipmplugins', the class names of the
# milter plugins to skip)


class InvalidAddress(FugluError, ValueError):
    """An envelope address the address check refuses (Suspect() raises it). The scan
    session answers it as [main] address_compliance_fail_action says."""


# the tokens email.message._parseparam counts: unescaped quotes and semicolons
MIME_PARAMETER_TOKEN_RE = re.compile(r'(?<!\\)"|;')


def iter_mime_parameters(text):
    """(name, value) of each piece of a Content-Type or -Disposition value (the first
    is the type) as email.message.Message splits them (_parseparam, then
    _get_params_preserve), in linear time: a ';' ends a piece unless an odd number of
    unescaped quotes precedes it in the piece."""
    start, odd = 0, False
    for match in MIME_PARAMETER_TOKEN_RE.finditer(text):
        if match.group() == '"':
            odd = not odd
            continue
        position = match.start()
        if position == start or not odd:
            yield _mime_parameter(text[start:position])
            start, odd = position + 1, False
    yield _mime_parameter(text[start:])


def _mime_parameter(piece):
    name, separator, value = piece.partition('=')
    return (name.strip().lower(), value.strip()) if separator else (piece.strip(), '')


# What the email package may build for one message (FuGlu has no bound): 10 MB of
# empty parts made 2 million objects, 640 MB and 12 s of CPU.
EMAIL_MAX_PARTS = 10000
EMAIL_MAX_HEADER_FIELDS = 100000   # of all its parts together
_bounded_message_class = None       # made on first use: importing email.message costs start-up
_email_budget = threading.local()   # what the parse running on this thread may still build


def parse_message(source, text=False):
    """``source`` (bytes, or str when ``text``) parsed by the email package (compat32),
    bounded: more than EMAIL_MAX_PARTS parts or EMAIL_MAX_HEADER_FIELDS header fields
    raise LimitExceeded (the scanner's problemaction), and parameters are split by
    iter_mime_parameters: the package's own splitter is quadratic in the semicolons
    inside quotes, a crafted header of a few hundred KB kept a worker busy for minutes
    (Suspect.get_message_rep, the stripped copy spamd sees, rule fields)."""
    global _bounded_message_class
    import email
    import email.message
    import email.utils
    from email import policy
    if _bounded_message_class is None:
        class BoundedMessage(email.message.Message):
            def __init__(self, *args, **kwargs):
                _spend_email_budget('parts')
                email.message.Message.__init__(self, *args, **kwargs)

            def set_raw(self, name, value):
                _spend_email_budget('header fields')
                email.message.Message.set_raw(self, name, value)

            def _get_params_preserve(self, failobj, header):
                value = self.get(header)
                if value is None:
                    return failobj
                return email.utils.decode_params(list(iter_mime_parameters(str(value))))
        _bounded_message_class = BoundedMessage
    parse = email.message_from_string if text else email.message_from_bytes
    _email_budget.left = {'parts': EMAIL_MAX_PARTS, 'header fields': EMAIL_MAX_HEADER_FIELDS}
    try:
        return parse(source, _bounded_message_class, policy=policy.compat32)
    finally:
        _email_budget.left = None


def _spend_email_budget(what):
    left = getattr(_email_budget, 'left', None)
    if left is None:   # not parsing (a plugin building a message)
        return
    if left[what] <= 0:
        raise LimitExceeded('the message has too many %s to be read' % what)
    left[what] -= 1


class SpooledSource(object):
    """The source of a spooled message: ``head`` (bytes), then the spool file from
    ``offset`` on. A change to the header block replaces the head, the body stays in
    the file (replace_start); read() gives bytes, parts() the pieces to send."""

    __slots__ = ('spool', 'head', 'offset')

    def __init__(self, spool, head=b'', offset=0):
        self.spool, self.head, self.offset = spool, head, offset

    def __len__(self):
        return len(self.head) + self.spool.size - self.offset

    def read(self, maxbytes=None):
        """The source as bytes, or its first ``maxbytes``."""
        end = len(self) if maxbytes is None else max(min(maxbytes, len(self)), 0)
        if end <= len(self.head):
            return self.head[:end]
        rest = self.spool.read(self.offset, self.offset + end - len(self.head))
        return self.head + rest if self.head else rest

    def replace_start(self, length, new_start):
        """This source with its first ``length`` bytes replaced by ``new_start``."""
        if length <= len(self.head):
            return SpooledSource(self.spool, new_start + self.head[length:], self.offset)
        return SpooledSource(self.spool, new_start, self.offset + length - len(self.head))

    def parts(self):
        section = self.spool.section(self.offset)
        return [self.head, section] if self.head else [section]

    def is_whole_file(self):
        return not self.head and not self.offset


class Suspect(SimpleTimeoutMixin):
    """One message with its envelope, as the plugins see it (FuGlu's Suspect).

    The source is kept as the bytes received. Headers added with add_header() are
    prepended at delivery; set_source()/set_message_rep() replace the source.

    Construction (FuGlu's signature): ``Suspect(from_address, recipients, tempfile,
    inbuffer=None, smtp_options=None, milter_macros=None, queue_id=None, ...,
    id=None, clientinfo=None, size=None, tags=None)``: the message comes from the file
    ``tempfile`` or from the bytes ``inbuffer``; a connector may pass a MessageSpool as
    ``inbuffer`` (a big message, see "Message spool"): the source then stays in that
    file, which becomes suspect.tempfile and is removed by cleanup(). get_source() and
    friends still answer bytes (read from the file when asked); fuglu's own paths use
    get_output_parts() and source_buffer(). Invalid envelope addresses raise
    InvalidAddress (a ValueError, as in FuGlu), checked by the process-wide Addrcheck
    ([main] address_compliance_checker).

    Instance attributes: id, from_address, recipients, to_address (first recipient),
    from_domain/from_localpart/to_domain/to_localpart, size, timestamp, tags (dict),
    addheaders (dict name -> value), queue_id, clientinfo ((helo, ip, rdns) or None),
    smtp_options (set of MAIL parameters like 'SMTPUTF8', 'BODY=8BITMIME'),
    milter_macros (dict), tempfile (a file with the original message: the one given,
    or one written to ``tempdir`` on first access and removed by cleanup()). The tags
    the core reads or writes are listed in SUSPECT_TAGS.
    """

    def __init__(self, from_address, recipients, tempfile=None, inbuffer=None,
                 smtp_options=None, milter_macros=None, queue_id=None, att_fmaxlimit=None,
                 att_fdefaultlimit=None, att_cachelimit=None, att_defaultlimit=None,
                 att_maxlimit=None, **kwargs):
        super().__init__()
        if isinstance(tempfile, (bytes, bytearray)) and inbuffer is None:
            inbuffer, tempfile = bytes(tempfile), None
        self._spool = inbuffer if isinstance(inbuffer, MessageSpool) else None
        if self._spool is not None:
            tempfile = self._spool.path
        elif inbuffer is None:
            if not tempfile:
                raise ValueError('a Suspect needs a tempfile or an inbuffer')
            with open(tempfile, 'rb') as handle:
                inbuffer = handle.read()
        self._tempfile = tempfile or None
        self._own_tempfile = False   # a MessageSpool is removed through self._spool
        self.tempdir = '/tmp'
        self.id = str(kwargs.get('id') or self.generate_id())
        self.kwargs = kwargs
        self.logger = logging.getLogger('fuglu.Suspect')
        self.from_address = (force_uString(from_address) or '').strip()
        if self.from_address and not Addrcheck().valid(self.from_address):
            raise InvalidAddress('Invalid sender address: %s' % self.from_address)
        if recipients is None or isinstance(recipients, (str, bytes)):
            recipients = [recipients]
        self.recipients = []
        for recipient in recipients:
            if recipient is None:
                raise InvalidAddress('Recipient address can not be None')
            recipient = force_uString(recipient).strip()
            if not Addrcheck().valid(recipient, allow_postmaster=True):
                raise InvalidAddress('Invalid recipient address: %s' % recipient)
            self.recipients.append(recipient)
        self.original_from_address = self.from_address
        self.original_recipients = list(self.recipients)
        self._source = SpooledSource(self._spool) if self._spool else bytes(inbuffer)
        self._original_source = self._source
        self._modified = False
        self._message_rep = None
        self._header_cache = None
        self._from_header_cache = {}
        self.timestamp = kwargs.get('timestamp', time.time())
        self.timestamp_utc = kwargs.get('timestamp_utc', self.timestamp)
        self.queue_id = queue_id
        self.smtp_options = set(smtp_options or ())
        self.clientinfo = kwargs.get('clientinfo')
        self.milter_macros = dict(milter_macros or {})
        self.announced_size = kwargs.get('size', kwargs.get('mfsize'))
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

    @staticmethod
    def generate_id():
        """A new message id: 32 hex characters."""
        return os.urandom(16).hex()

    def check_id(self, id=None):
        """True if ``id`` (default: this message's) looks like a fuglu id."""
        id = self.id if id is None else id
        return bool(id) and re.match(r'^[a-f0-9]{32}$', id, re.IGNORECASE) is not None

    # -- the message as a file --------------------------------------------------
    @property
    def tempfile(self):
        """Path of a file holding the original message, for plugins that hand it to an
        external program: the spool file of a spooled message, else a spool file of
        ``tempdir`` written on first access. Either is removed by cleanup() when the
        session ends."""
        if self._tempfile is None:
            spool = MessageSpool(self.tempdir)
            try:
                spool.write(self.get_original_source())
            except OSError:
                spool.remove()
                raise
            self._spool = spool
            self._tempfile = spool.path
        return self._tempfile

    @tempfile.setter
    def tempfile(self, path):
        self._tempfile = path

    def tempfilename(self):
        return self._tempfile or '(buffer-only)'

    @property
    def tmpdir(self):
        return self.tempdir

    def cleanup(self):
        """Release what the message holds: the temporary file written for it and file
        objects kept in tags. The scan session calls this when it is done."""
        if self._spool is not None:
            self._spool.remove()
            self._spool, self._tempfile = None, None
        count_finished_message(self.size)
        if self._own_tempfile and self._tempfile:
            try:
                os.unlink(self._tempfile)
            except OSError as error:
                self.logger.warning('%s: cannot remove %s: %s', self.id, self._tempfile, error)
            self._tempfile, self._own_tempfile = None, False
        import io
        for key in [k for k, v in self.tags.items() if isinstance(v, io.IOBase)]:
            try:
                self.tags.pop(key).close()
            except Exception as error:  # a plugin's object: whatever it raises, go on
                self.logger.warning('%s: could not close tag %r: %s', self.id, key, error)
        self.tags.pop('debug', None)

    # -- FuGlu's SASL shortcuts (milter macros) ----------------------------------
    sasl_login = property(lambda self: force_uString(self.milter_macros.get('auth_authen')))
    sasl_user = sasl_login
    sasl_sender = property(lambda self: force_uString(self.milter_macros.get('auth_author')))
    sasl_method = property(lambda self: force_uString(self.milter_macros.get('auth_type')))

    @property
    def timetracker(self):
        ref = getattr(self, '_timetracker', None)
        return ref() if ref is not None else None

    @timetracker.setter
    def timetracker(self, tracker):
        import weakref
        self._timetracker = weakref.ref(tracker) if tracker is not None else None

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

    def get_source(self, maxbytes=None, newline=None):
        source = self._source
        if isinstance(source, SpooledSource):
            source = source.read(maxbytes)
        elif maxbytes is not None:
            source = source[:maxbytes]
        if newline is not None:
            source = source.replace(b'\r', b'').replace(b'\n', newline)
        return source

    def get_original_source(self, maxbytes=None):
        if isinstance(self._original_source, SpooledSource):
            return self._original_source.read(maxbytes)
        if maxbytes is not None:
            return self._original_source[:maxbytes]
        return self._original_source

    def is_spooled(self):
        """True while the current source lives in a spool file (see "Message spool")."""
        return isinstance(self._source, SpooledSource)

    def source_buffer(self, original=False):
        """The current (or ``original``) source as a bytes-like object without a copy:
        the bytes, or a read-only map of the spool file (valid until cleanup()). For
        fuglu's own walkers; plugins that want bytes call get_source()."""
        source = self._original_source if original else self._source
        if not isinstance(source, SpooledSource):
            return source
        if source.is_whole_file():
            return source.spool.view()
        return source.read()

    def source_parts(self, original=False):
        """The current (or ``original``) source as parts to send (bytes and spool file
        sections), see send_parts()."""
        source = self._original_source if original else self._source
        return source.parts() if isinstance(source, SpooledSource) else [source]

    def _replace_source_start(self, length, new_start):
        """The first ``length`` bytes of the source become ``new_start`` (a header edit);
        a spooled body stays in its file."""
        if isinstance(self._source, SpooledSource):
            self._source = self._source.replace_start(length, new_start)
        else:
            self._source = new_start + self._source[length:]
        self._modified = True
        self._message_rep = None
        self._header_cache = None
        self._from_header_cache = {}

    @property
    def source(self):
        """FuGlu's attribute: the source a plugin set (bytes), None while the message is
        as received. Assigning it is set_source(); assigning None restores the original."""
        return self.get_source() if self._modified else None

    @source.setter
    def source(self, source):
        if source is None:
            self.set_source(b'')   # drops what was parsed from the replaced source
            self._source, self._modified = self._original_source, False
        else:
            self.set_source(source)

    def set_source(self, source, encoding='utf-8', att_mgr_reset=True):
        self._source = force_bString(source, encoding)
        self._modified = True
        self._message_rep = None
        self._header_cache = None
        self._from_header_cache = {}

    def is_modified(self):
        return self._modified

    def has_message_rep(self):
        return self._message_rep is not None

    def get_message_rep(self):
        """The message parsed by the email package (compat32), cached."""
        if self._message_rep is None:
            self._message_rep = parse_message(self.get_source())
        return self._message_rep

    def build_headeronly_message_rep(self):
        """The header block parsed as a message without body (cheap for big mail)."""
        return parse_message(self.get_headers(), text=True)

    def set_message_rep(self, msgrep, att_mgr_reset=True):
        from email import policy
        from email.generator import BytesGenerator
        import io
        buffer = io.BytesIO()
        BytesGenerator(buffer, mangle_from_=False,
                       policy=policy.compat32.clone(linesep='\r\n')).flatten(msgrep)
        self.set_source(buffer.getvalue())
        self._message_rep = msgrep

    # FuGlu 1.7 still answers to its old camelCase names (and logs that they are old)
    @deprecated
    def getMessageRep(self):
        return self.get_message_rep()

    @deprecated
    def setMessageRep(self, msgrep):
        return self.set_message_rep(msgrep)

    @deprecated
    def getSource(self, maxbytes=None):
        return self.get_source(maxbytes)

    @deprecated
    def setSource(self, source):
        return self.set_source(source)

    @deprecated
    def getOriginalSource(self, maxbytes=None):
        return self.get_original_source(maxbytes)

    def get_as_attachment(self, filename=None):
        """The original message as a message/rfc822 MIME part named ``filename``
        (default <id>.eml)."""
        from email.mime.base import MIMEBase
        part = MIMEBase('message', 'rfc822')
        part.set_payload(self.get_original_source())
        try:
            part.as_bytes()
        except UnicodeEncodeError:
            from email.mime.message import MIMEMessage
            part = MIMEMessage(self.get_message_rep())
        part.add_header('Content-Disposition',
                        'attachment; filename=%s' % (filename or '%s.eml' % self.id))
        return part

    def wrap(self, sender, recipient, subject, body=None, filename=None, config=None,
             hdr_autosub='auto-generated', hdr_arsupp='DR, RN, NRN, OOF, AutoReply'):
        """A new multipart message from ``sender`` to ``recipient`` with the original
        message attached (for quarantine notices and forwards)."""
        import email.utils
        from email.mime.multipart import MIMEMultipart
        from email.mime.text import MIMEText
        message = MIMEMultipart()
        message['From'] = sender
        message['To'] = recipient
        message['Subject'] = subject
        message['Date'] = email.utils.formatdate(localtime=True)
        message['Message-ID'] = email.utils.make_msgid(domain=get_outgoing_helo(config))
        if hdr_autosub:
            message['Auto-Submitted'] = hdr_autosub
        if hdr_arsupp:
            message['X-Auto-Response-Suppress'] = hdr_arsupp
        if body:
            message.attach(MIMEText(body, 'plain', 'utf-8'))
        message.attach(self.get_as_attachment(filename))
        return message

    # -- headers --------------------------------------------------------------
    def _header_block(self):
        """The raw header block (bytes, without the empty line), first 1 MiB at most."""
        head = self.get_source(1048576)
        if head.startswith(b'\r\n'):
            return b'', 2
        if head.startswith(b'\n'):
            return b'', 1
        match = HEADER_END_RE.search(head)
        if match:
            # the block keeps the line end of its last header line
            end_of_last_line = (match.start()
                                + (2 if head[match.start():match.start() + 1] == b'\r' else 1))
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

    def get_header(self, headername, fallback=None, use_cache=True):
        if not use_cache:
            self._header_cache = None
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
        the source now, so later plugins see it. Names and values may be bytes."""
        key, value = force_uString(key), force_uString(value)
        if immediate:
            header = (('%s: %s\r\n' % (key, value)).encode('utf-8', 'surrogateescape') if raw
                      else encode_header(key, value))
            self._replace_source_start(0, header)
            self.added_headers[key] = value
        else:
            self.addheaders[key] = value

    @deprecated
    def addheader(self, key, value, immediate=False):
        return self.add_header(key, value, immediate)

    @staticmethod
    def prepend_header_to_source(key, value, source, raw=False):
        """``source`` (bytes) with the header in front: folded and encoded as FuGlu
        does (fold_header), or as 'key: value' CRLF when raw."""
        key, value = force_uString(key).strip(), force_uString(value).strip()
        header = '%s: %s\r\n' % (key, value) if raw else fold_header(key, value)
        return force_bString(header) + force_bString(source)

    @staticmethod
    def decode_msg_header(header, decode_errors='replace', logid='n/a'):
        """A header value (str, bytes or email.header.Header) with its RFC 2047 encoded
        words decoded, as one str."""
        from email.header import Header
        if isinstance(header, Header):
            header = str(header)
        text = force_uString(header) or ''
        if '=?' not in text:   # no encoded word: unfolding is all there is to do
            return re.sub(r'\r?\n(?=[ \t])', '', text)
        try:
            from email.parser import HeaderParser
            from email.policy import SMTP
            return str(HeaderParser(policy=SMTP).parsestr('header: %s' % text)['header'])
        except Exception as error:
            logging.getLogger('fuglu.Suspect').warning(
                '%s error parsing header value, using legacy fallback: %s', logid, error)
        from email.header import decode_header
        try:
            return ''.join(force_uString(part, charset or 'utf-8', decode_errors)
                           for part, charset in decode_header(text))
        except Exception:   # undecodable: the text as it is
            return text

    @staticmethod
    def getlist_space_comma_separated(inputstring):
        """'a b, c' -> ['a', 'b', 'c']; '\\ ' and '\\,' keep a space or comma, '\\\\' a
        backslash."""
        if not inputstring or not inputstring.strip():
            return []
        marks = {'\\\\': '\x00b', '\\ ': '\x00s', '\\,': '\x00c'}
        text = inputstring.strip()
        for escaped, mark in marks.items():
            text = text.replace(escaped, mark)
        items = [word for part in text.split(',') for word in part.strip().split(' ')
                 if word.strip()]
        result = []
        for item in items:
            item = item.strip()
            item = item.replace('\x00s', ' ').replace('\x00c', ',').replace('\x00b', '\\')
            result.append(item)
        return result

    def parse_from_type_header(self, header='From', validate_mail=True, recombine=True,
                               use_cache=True):
        """[(display name, address), ...] of an address header (all its instances).
        Display names are decoded; an address the checker refuses becomes part of
        the display name (and the pair is dropped when validate_mail). recombine
        joins a display-name-only entry with the address-only entry after it."""
        key = (header, validate_mail, recombine)
        if use_cache and key in self._from_header_cache:
            return self._from_header_cache[key]
        import email.utils
        values = [force_uString(v) for v in self.get_message_rep().get_all(header, [])]
        if not values:
            return []
        # CR/LF would end getaddresses' parsing early: hide them while splitting
        hidden = [v.replace('\r', '{{CR}}').replace('\n', '{{LF}}') for v in values]
        try:
            pairs = email.utils.getaddresses(hidden, strict=False)
        except TypeError:   # before 3.11.10 / 3.12.5 / 3.13
            pairs = email.utils.getaddresses(hidden)
        entries = []
        for display, address in pairs:
            display = self.decode_msg_header((display or '').replace('{{CR}}',
                                                                     '\r').replace('{{LF}}', '\n'),
                                             logid=self.id)
            address = (address or '').replace('{{CR}}', '\r').replace('{{LF}}', '\n')
            if not (display or address):
                continue
            if address and not Addrcheck().valid(address):
                display = (display + ' ' + address) if display else address
                address = ''
            entries.append((display, address))
        if recombine:
            joined, pending = [], None
            for display, address in entries:
                if pending is not None:
                    display = ('%s %s' % (pending, display)).strip() if pending else display
                    pending = None
                if address:
                    joined.append((display, address))
                else:
                    pending = display
            if pending is not None:
                joined.append((pending, ''))
            entries = joined
        entries = [(self.decode_msg_header(display, logid=self.id), address.strip())
                   for display, address in entries]
        if validate_mail:
            entries = [(display, address) for display, address in entries
                       if address and Addrcheck().valid(address)]
        self._from_header_cache[key] = entries
        return entries

    def _header_regex(self, name):
        return re.compile(rb'^' + re.escape(force_bString(name)) +
                          rb'[ \t]*:.*(?:\r?\n[ \t].*)*\r?\n', re.IGNORECASE | re.MULTILINE)

    def remove_headers_from_source(self, headernames, track_change=True):
        """Delete every instance of the named headers (a name or a list of names) from
        the source, body untouched. True if anything was removed."""
        if isinstance(headernames, (str, bytes)):
            headernames = [headernames]
        block, _ = self._header_block()
        new_block, removed = block, 0
        for name in headernames:
            pattern = self._header_regex(name)
            found = [force_uString(h.split(b':', 1)[1]) for h in pattern.findall(new_block)]
            if found:
                new_block = pattern.sub(b'', new_block)
                removed += len(found)
                if track_change:
                    self.removed_headers.setdefault(force_uString(name), []).extend(found)
        if removed:
            self._replace_source_start(len(block), new_block)
        return bool(removed)

    def remove_headers(self, key):
        """Delete every instance of header ``key``; True if there was one."""
        return self.remove_headers_from_source([key])

    def set_header(self, key, value):
        """Replace all instances of a header by one new value, or add it immediately."""
        key, value = force_uString(key), force_uString(value)
        if self.remove_headers_from_source([key], track_change=False):
            self.modified_headers[key] = value
            self._replace_source_start(0, encode_header(key, value))
        else:
            self.add_header(key, value, immediate=True)

    def build_headers(self, prefix_only=False):
        """The addheaders as bytes, in insertion order, ready to prepend."""
        return b''.join(encode_header(name, value) for name, value in self.addheaders.items())

    def get_output_source(self):
        """What is delivered: added headers + the current source (or the original if
        the tag reinjectoriginal is set)."""
        return b''.join(part.spool.read(part.start, part.end) if isinstance(part, FileSection)
                        else part for part in self.get_output_parts())

    def get_output_parts(self):
        """get_output_source() as a list of parts, so large messages are not copied:
        bytes, and sections of the spool file of a spooled message (send_parts())."""
        if self.tags.get('reinjectoriginal'):
            return self.source_parts(original=True)
        return [self.build_headers()] + self.source_parts()

    def update_subject(self, subject_cb, **cb_params):
        """Subject := subject_cb(decoded subject, **cb_params); True if it changed. The
        old subject is kept in tag origsubj."""
        raw = self.get_header('subject')
        old = self.decode_msg_header(raw or '', logid=self.id)
        new = subject_cb(old, **cb_params)
        if new != old:
            if self.get_tag('origsubj') is None:
                self.set_tag('origsubj', raw or '')
            self.set_header('Subject', new)
            if raw is None:
                self.added_headers['Subject'] = self.modified_headers.pop('Subject', new)
            return True
        return False

    # -- SpamAssassin temporary headers ---------------------------------------------
    def write_sa_temp_header(self, header, value, plugin='SAPlugin'):
        """A pseudo header passed to ``plugin`` only (SpamAssassin sees it, the
        delivered message does not). Control characters are removed."""
        header = re.sub(r'[\x00-\x1f\x7f]', '', force_uString(header, convert_none=True))
        value = re.sub(r'[\x00-\x1f\x7f]', '', force_uString(value, convert_none=True))
        line = '%s: %s' % (header, value)
        tag = self.get_tag('%s.tempheader' % plugin)
        if isinstance(tag, list):
            tag.append(line)
        elif tag is None:
            tag = [line]
        else:
            tag = '%s\r\n%s' % (tag, line)
        self.set_tag('%s.tempheader' % plugin, tag)

    def get_sa_temp_headers(self, plugin='SAPlugin'):
        headers = self.get_tag('%s.tempheader' % plugin)
        if headers is None:
            return b''
        if isinstance(headers, dict):
            headers = ['%s: %s' % item for item in headers.items()]
        if isinstance(headers, (list, tuple)):
            headers = '\r\n'.join(headers)
        text = force_uString(headers).strip()
        return (text + '\r\n').encode('utf-8') if text else b''

    def source_stripped_attachments(self, content=None, maxsize=None, with_mime_headers=False):
        """The message with only its text parts (other parts become empty stubs),
        truncated to maxsize bytes."""
        from email import policy
        source = content if content is not None else self.get_source()
        message = parse_message(source)
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
                handle.write('%s %s\n' % (time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
                                          message))
                handle.flush()

    def get_current_decision_code(self):
        """The action of the last scanner that decided so far (DUNNO if none)."""
        try:
            return self.tags['decisions'][-1][1]
        except (KeyError, IndexError, TypeError, ValueError):
            return DUNNO

    def get_client_info(self, config=None):
        """(helo, ip, rdns) of the client that sent the message: from the connector
        (XFORWARD, milter), else from the Received headers; with a config, the
        [environment] options say which Received header is the boundary."""
        if self.clientinfo:
            return self.clientinfo
        if config is None:
            info = self.client_info_from_rcvd()
        else:
            info = self.client_info_from_rcvd(
                ignoreregex=config.get('environment', 'trustedhostsregex', fallback=''),
                skip=config.getint('environment', 'boundarydistance', fallback=0),
                skiponerror=config.getboolean('environment', 'skiponerror', fallback=False),
                ignorelineregex=config.get('environment', 'trustedreceivedregex', fallback=''),
                skipsamedomain=config.getboolean('environment', 'skipsamedomain', fallback=False))
        self.clientinfo = info
        return info

    RECEIVED_FROM_RE = re.compile(
        r'^from\s(?P<helo>\S{3,256})\s{1,8}\((?P<revdns>\S{3,256})?\s?\[(?:IPv6:)?'
        r'(?P<ip>(?:\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3})|(?:[0-9a-f:]{3,40}))\]\)', re.MULTILINE)
    RECEIVED_BY_RE = re.compile(r'\s{1,8}(by\s{1,8}(?P<by>\S{3,64}))')

    def _parse_rcvd_header(self, rcvdline):
        """'from HELO (RDNS [IP]) ... by HOST' -> (helo, rdns, ip, 'by HOST'), or None."""
        match = self.RECEIVED_FROM_RE.search(rcvdline)
        if match is None:
            return None
        by = self.RECEIVED_BY_RE.search(rcvdline)
        return (match.group('helo'), match.group('revdns'), match.group('ip'),
                by.group(1) if by else '')

    def client_info_from_rcvd(self, ignoreregex=None, skip=0, skiponerror=False,
                              ignorelineregex=None, skipsamedomain=False):
        """(helo, ip, rdns) from the first Received header after ``skip`` ones that
        parses and is not excluded by ``ignoreregex`` (helo, ip or rdns matches) or
        ``ignorelineregex`` (the line matches); None if there is none. An unparsable
        header ends the search unless ``skiponerror``. ``skipsamedomain`` (skip
        headers whose from and by hosts share a domain) compares the last two labels."""
        ignore = re.compile(ignoreregex) if ignoreregex else None
        ignoreline = re.compile(ignorelineregex) if ignorelineregex else None
        # a Received header's client part is its first few hundred characters; a longer
        # value is cut before decoding (the email package's parser is slow on huge ones)
        headers = [self.decode_msg_header(header[:RECEIVED_HEADER_MAX_CHARS], logid=self.id)
                   for header in self.get_all_headers('Received')]
        for line in headers[skip:]:
            parsed = self._parse_rcvd_header(line)
            if parsed is None:
                if skiponerror:
                    continue
                return None
            helo, rdns, ip, by = parsed
            if ignore is not None and any(v and ignore.search(v) for v in (ip, rdns, helo)):
                continue
            if ignoreline is not None and ignoreline.search(line):
                continue
            if skipsamedomain:
                def domain(name):
                    return '.'.join((name or '').lower().split('.')[-2:])
                by_domain = domain(by.split()[-1] if by else '')
                if by_domain and by_domain in (domain(rdns), domain(helo)):
                    continue
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
        'decision': lambda s: (actioncode_to_string(s.tags['decisions'][-1][1])
                               if s.tags.get('decisions') else 'DUNNO'),
        'tags': lambda s: s.short_tags(),
        'fulltags': lambda s: str(s.tags),
    }

    def log_values(self, template=None):
        """The logtemplate variables (only those ``template`` names, if given)."""
        names = self.LOG_VALUES
        if template is not None:
            used = {(m.group(2) or m.group(3) or '').lower()
                    for m in TEMPLATE_RE.finditer(template)}
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

    def _short_tag_rep(self):
        return str(self.short_tags())

    def __str__(self):
        return 'Suspect %s: from=%s to=%s size=%s spam=%s blocked=%s virus=%s modified=%s ' \
               'decision=%s tags=%s' % (
                   self.id, self.from_address, self.to_address, self.size, self.is_spam(),
                   self.is_blocked(), self.is_virus(), self.is_modified(),
                   self.log_values()['decision'], self.short_tags())


###############################################################################
# Runtime configuration: per-recipient values and rules from SQL
###############################################################################
# FuGlu's [databaseconfig]. A plugin asks ``DBConfig(config, suspect)``
# instead of its config for the options an admin may set per recipient; DBConfig answers
# from rows (scope, section, option, value) of a database table, for the message's FIRST
# recipient: the address row beats the '%domain' row beats the globalscope ('$GLOBAL')
# row beats the config file. The database is named by an SQLAlchemy URL: with
# SQLAlchemy installed any database it has a driver for, without it only
# sqlite:///path, through the standard library's sqlite3.
#
#   DBConfig(config, suspect).get(...)       FuGlu's runtime config, one per message
#   DBFile(url, query).get_rows(values)      FuGlu's rule rows (attachment SQL rules)
#     -> sql_database(url, timeout)          one SQLDatabase per URL, shared by all:
#          .rows(sql, values, ttl, fallback)   answers cached for value_cache_ttl, one
#                                              query per key at a time, outage state
#          -> QueryRunner                     a few daemon threads run the queries, so
#                                              a caller waits at most `timeout` seconds
#               -> SQLAlchemy engine (pool) or one sqlite3 connection per thread
#
# No wrong policy, no lost mail: a lookup the database cannot answer (down, timeout, bad
# SQL, a value the option cannot take) raises RuntimeConfigError and the scan session
# defers the message (4xx, the MTA retries), unless [databaseconfig]
# fallback_to_file_values is on: then the config file's value is used. While the
# database is away, an expired cached answer is served instead of failing. An outage
# is logged when it starts and when it ends, not once per message.
#
# Databases are opened on the first lookup, not at start-up: a host whose database is
# down starts, lints and defers; SQLAlchemy is imported only when a URL needs it.

class RuntimeConfigError(FugluError):
    """A per-recipient value or rule could not be looked up: the database is unreachable
    or too slow, rejected the query, or returned a value the option cannot take. The scan
    session defers the message. (FuGlu's own plugins catch RESTAPIError for the same
    situation; ``fuglu.extensions.sql.RESTAPIError`` is this class.)"""


SQL_QUERY_THREADS = 4          # queries running at once per database (= its pool size)
SQL_RETRY_INTERVAL = 1.0       # after a failed query, further ones fail fast this long
SQL_CACHE_MAX_ENTRIES = 100000  # cached answers per database; the oldest go first
EMPTY_SQL_ANSWER = ((), [])    # (columns, rows) of "nothing found"

# SQLAlchemy's rule for the ':name' bind parameters of text(); the stdlib sqlite3
# module reads the same ':name' style natively.
SQL_PLACEHOLDER_RE = re.compile(r'(?<![:\w\\]):(\w+)(?!:)')

# What to pip install: for a backend (the URL's dialect) when SQLAlchemy is missing, and
# for a driver SQLAlchemy cannot import (which driver a bare postgresql:// or mysql:// URL
# means depends on the SQLAlchemy version, so the README writes the driver out).
SQL_BACKEND_HINTS = {
    'postgresql': 'psycopg2-binary, and write the URL postgresql+psycopg2://...',
    'mysql': 'PyMySQL, and write the URL mysql+pymysql://...',
    'mariadb': 'PyMySQL, and write the URL mysql+pymysql://...',
}
SQL_DRIVER_PACKAGES = {'psycopg2': 'psycopg2-binary', 'psycopg': 'psycopg[binary]',
                       'pymysql': 'PyMySQL',
                       'mysqldb': 'mysqlclient', 'mariadbconnector': 'mariadb'}


def _whole_seconds(seconds, minimum=1):
    return max(int(-(-seconds // 1)), minimum)


# Driver name -> function(timeout seconds) -> connect arguments that bound connecting
# and each query on the server or socket side. They free a runner thread; the caller is
# freed by the runner's own timeout in any case.
SQL_DRIVER_TIMEOUTS = {
    # libpq treats connect_timeout below 2 as 2
    'psycopg2': lambda s: {'connect_timeout': _whole_seconds(s, 2),
                           'options': '-c statement_timeout=%d' % int(s * 1000)},
    'psycopg': lambda s: {'connect_timeout': _whole_seconds(s, 2),
                          'options': '-c statement_timeout=%d' % int(s * 1000)},
    'pymysql': lambda s: {'connect_timeout': _whole_seconds(s), 'read_timeout': _whole_seconds(s),
                          'write_timeout': _whole_seconds(s)},
    'mysqldb': lambda s: {'connect_timeout': _whole_seconds(s), 'read_timeout': _whole_seconds(s),
                          'write_timeout': _whole_seconds(s)},
    'pysqlite': lambda s: {'timeout': s},
}


_sqlalchemy_module = None   # the module once imported; False when it is not installed


def import_sqlalchemy():
    """SQLAlchemy (1.4 or newer) or None. Imported on first use only."""
    global _sqlalchemy_module
    if _sqlalchemy_module is None:
        try:
            import sqlalchemy
            version = tuple(int(part) for part in re.findall(r'\d+', sqlalchemy.__version__)[:2])
            _sqlalchemy_module = sqlalchemy if version >= (1, 4) else False
        except ImportError:
            _sqlalchemy_module = False
    return _sqlalchemy_module or None


def _sql_concat(*parts):
    return ''.join('' if part is None else str(part) for part in parts)


def add_sqlite_functions(connection):
    """SQLite learnt CONCAT() in 3.44; FuGlu's default queries use it (MySQL style)."""
    import sqlite3
    if sqlite3.sqlite_version_info < (3, 44, 0):
        connection.create_function('CONCAT', -1, _sql_concat)


def _require_sqlite_file(path):
    # Connecting would create an empty database, and "no rows" means "use the file values":
    # a typo in the path must be an error instead.
    if path and path != ':memory:' and not path.startswith('file:') and not os.path.exists(path):
        raise RuntimeConfigError('database file %s does not exist' % path)


def sql_error_text(error):
    """One line for a driver exception (SQLAlchemy appends the statement and a URL)."""
    text = str(error).strip().splitlines()
    return '%s: %s' % (error.__class__.__name__, text[0] if text else '')


class _QueryJob(object):
    __slots__ = ('function', 'done', 'result', 'error', 'abandoned')

    def __init__(self, function):
        self.function = function
        self.done = threading.Event()
        self.result = self.error = None
        self.abandoned = False


class QueryRunner(object):
    """A few daemon threads that run one database's queries. ``run(function, timeout)``
    returns ``function()`` or raises its exception, and waits at most ``timeout``
    seconds: a driver stuck on a dead connection keeps a runner thread, never the
    caller (a mail worker). Daemon threads, so a stuck one cannot hold up exit."""

    def __init__(self, name, threads=SQL_QUERY_THREADS):
        self.name = name
        self.threads = threads
        self._jobs = queue.Queue()
        self._started = False
        self._lock = threading.Lock()

    def _start(self):
        with self._lock:
            if self._started:
                return
            for number in range(self.threads):
                thread = threading.Thread(target=self._work, name='%s-%d' % (self.name, number + 1))
                thread.daemon = True
                thread.start()
            self._started = True

    def _work(self):
        while True:
            job = self._jobs.get()
            if job.abandoned:
                continue
            try:
                job.result = job.function()
            except Exception as error:  # handed to the caller
                job.error = error
            job.done.set()

    def run(self, function, timeout):
        if not self._started:
            self._start()
        job = _QueryJob(function)
        self._jobs.put(job)
        if not job.done.wait(timeout):
            job.abandoned = True
            raise RuntimeConfigError('no answer within %g s' % timeout)
        if job.error is not None:
            raise job.error
        return job.result


class SQLDatabase(object):
    """One database, shared by every lookup that names its URL (see sql_database()).

    For callers: ``rows(sql, values, ttl, fallback)`` -> (columns, rows), cached;
    ``query(sql, values)`` -> the same, uncached; ``describe()`` one line for lint.
    Both raise RuntimeConfigError when the database does not answer.
    Subclasses implement ``_execute(sql, values)`` -> (column names, list of row tuples),
    which runs on a runner thread, and set ``backend`` and ``driver``.
    Attributes: url, display_url (password hidden), timeout, queries (count run),
    down_since (clock time of the first failure of an outage, or None), clock.
    """

    backend = driver = '?'

    def __init__(self, url, timeout):
        self.url = url
        self.display_url = redact_uri(url)
        self.timeout = timeout
        self.queries = 0
        self.failed_queries = 0
        self.down_since = None
        self.logger = logging.getLogger('fuglu.sql')
        self.runner = QueryRunner('fuglu-sql')
        self._cache = {}
        self._flights = {}
        self._lock = threading.Lock()
        self._fail_fast_until = 0.0
        self._last_error = None
        self.clock = time.monotonic   # (tests set their own)

    def describe(self):
        return '%s: %s via %s, timeout %g s' % (self.display_url, self.backend, self.driver,
                                                 self.timeout)

    def _execute(self, sql, values):
        raise NotImplementedError

    # -- queries ----------------------------------------------------------------
    def query(self, sql, values, fallback=False):
        if self.clock() < self._fail_fast_until:
            self.failed_queries += 1
            raise RuntimeConfigError('%s: %s' % (self.display_url, self._last_error))
        try:
            answer = self.runner.run(lambda: self._execute(sql, values), self.timeout)
        except Exception as error:
            self._failed(error, fallback)
            raise RuntimeConfigError('%s: %s' % (self.display_url, self._last_error))
        self.queries += 1
        if self.down_since is not None:
            self._answered()
        return answer

    def rows(self, sql, values, ttl, fallback=False):
        """The answer to ``sql`` with ``values``, from the cache when it is younger than
        ``ttl`` seconds. One caller queries a key at a time; the others wait for its
        answer. When the database fails, an expired answer is served, else ``fallback``
        decides: True -> EMPTY_SQL_ANSWER (the caller uses its file values), False ->
        RuntimeConfigError."""
        if ttl <= 0:
            return self._answer_or_fallback(sql, values, None, fallback)
        key = (sql, tuple(sorted(values.items())))
        entry = self._cache.get(key)   # (expires, answer)
        if entry is not None and entry[0] > self.clock():
            return entry[1]
        with self._lock:
            flight = self._flights.get(key)
            leading = flight is None
            if leading:
                flight = self._flights[key] = threading.Event()
        if not leading:
            flight.wait(self.timeout)
            entry = self._cache.get(key) or entry
            if entry is not None:
                return entry[1]
            if fallback:
                return EMPTY_SQL_ANSWER
            raise RuntimeConfigError('%s: %s' % (self.display_url, self._last_error or 'no answer'))
        try:
            answer = self._answer_or_fallback(sql, values, entry, fallback, key=key, ttl=ttl)
        finally:
            with self._lock:
                del self._flights[key]
            flight.set()
        return answer

    def _answer_or_fallback(self, sql, values, stale, fallback, key=None, ttl=0):
        try:
            answer = self.query(sql, values, fallback)
        except RuntimeConfigError:
            if stale is not None:
                return stale[1]
            if fallback:
                return EMPTY_SQL_ANSWER
            raise
        if key is not None:
            with self._lock:
                self._cache.pop(key, None)
                if len(self._cache) >= SQL_CACHE_MAX_ENTRIES:
                    del self._cache[next(iter(self._cache))]
                self._cache[key] = (self.clock() + ttl, answer)
        return answer

    def clear_cache(self):
        with self._lock:
            self._cache.clear()

    # -- outage state -----------------------------------------------------------
    def _failed(self, error, fallback):
        text = error.args[0] if isinstance(error, RuntimeConfigError) else sql_error_text(error)
        with self._lock:
            self.failed_queries += 1
            self._last_error = text
            self._fail_fast_until = self.clock() + SQL_RETRY_INTERVAL
            starting = self.down_since is None
            if starting:
                self.down_since = self.clock()
        if starting:
            self.logger.error('database %s cannot answer: %s. Until it does, cached values are '
                              'served and other lookups %s', self.display_url, text,
                              'use the config file values' if fallback else 'defer their messages')

    def _answered(self):
        with self._lock:
            if self.down_since is None:
                return
            seconds = self.clock() - self.down_since
            failed, self.failed_queries = self.failed_queries, 0
            self.down_since = None
        self.logger.info('database %s answers again, after %.1f s and %d failed lookups',
                            self.display_url, seconds, failed)


class SQLiteDatabase(SQLDatabase):
    """sqlite:///path without SQLAlchemy: the standard library's sqlite3, read-only, one
    connection per runner thread."""

    def __init__(self, url, timeout):
        super().__init__(url, timeout)
        import sqlite3
        self._sqlite3 = sqlite3
        self.path = sqlite_path_of(url)
        self.backend = 'SQLite %s' % sqlite3.sqlite_version
        self.driver = 'the standard library sqlite3 (SQLAlchemy not installed), read-only'
        self._local = threading.local()

    def _connection(self):
        connection = getattr(self._local, 'connection', None)
        if connection is None:
            _require_sqlite_file(self.path)
            from urllib.parse import quote
            uri = 'file:%s?mode=ro' % quote(os.path.abspath(self.path))
            connection = self._sqlite3.connect(uri, uri=True, timeout=self.timeout)
            add_sqlite_functions(connection)
            self._local.connection = connection
        return connection

    def _execute(self, sql, values):
        connection = self._connection()
        try:
            cursor = connection.execute(sql, values)
            return tuple(column[0] for column in cursor.description or ()), cursor.fetchall()
        except self._sqlite3.Error:
            # the file may have been replaced: the next query opens it afresh
            self._local.connection = None
            connection.close()
            raise


def sqlite_path_of(url):
    """'sqlite:///relative.db' -> 'relative.db', 'sqlite:////var/x.db' -> '/var/x.db'."""
    match = re.match(r'^sqlite(?:\+pysqlite)?://(/?)(.*)$', url.strip())
    if not match:
        raise RuntimeConfigError('%s is not a sqlite:///path URL' % redact_uri(url))
    if '?' in match.group(2):
        raise RuntimeConfigError('options in a sqlite URL (?...) need SQLAlchemy '
                                 '(pip install SQLAlchemy)')
    if not match.group(1) or not match.group(2) or match.group(2) == ':memory:':
        raise RuntimeConfigError('%s names no database file (sqlite:///relative/path or '
                                 'sqlite:////absolute/path)' % url)
    return match.group(2)


class SQLAlchemyDatabase(SQLDatabase):
    """Any URL SQLAlchemy has a driver for: an engine with a pool of SQL_QUERY_THREADS
    connections, checked before use (a restarted database costs no failed lookup), and
    the driver's connect/query timeouts where we know them (SQL_DRIVER_TIMEOUTS)."""

    def __init__(self, url, timeout, sqlalchemy):
        super().__init__(url, timeout)
        self._sqlalchemy = sqlalchemy
        parsed = sqlalchemy.engine.make_url(url)
        self.backend = parsed.get_backend_name()
        self.driver = parsed.get_driver_name()
        self.sqlite_path = parsed.database if self.backend == 'sqlite' else None
        timeouts = SQL_DRIVER_TIMEOUTS.get(self.driver)
        connect_args = {}
        if timeouts is not None:
            connect_args = {name: value for name, value in timeouts(timeout).items()
                            if name not in parsed.query}
        self.driver_timeouts = timeouts is not None
        options = {'pool_pre_ping': True, 'connect_args': connect_args}
        if self.backend != 'sqlite':   # (SQLite's pools take none of these)
            options.update(pool_size=SQL_QUERY_THREADS, max_overflow=0, pool_timeout=timeout,
                           pool_recycle=3600)
        try:
            self.engine = sqlalchemy.create_engine(parsed, **options)
        except ImportError as error:
            package = SQL_DRIVER_PACKAGES.get(self.driver, 'the module %s' % error.name)
            raise RuntimeConfigError('the driver %s for %s is not installed: pip install %s, or '
                                     'name an installed driver in the URL (%s+DRIVER://...)'
                                     % (self.driver, self.backend, package, self.backend))
        except Exception as error:
            raise RuntimeConfigError('%s: %s' % (self.display_url, sql_error_text(error)))
        if self.backend == 'sqlite':
            sqlalchemy.event.listen(self.engine, 'connect',
                                    lambda connection, record: add_sqlite_functions(connection))
        self._statements = {}

    def describe(self):
        dbapi = getattr(self.engine.dialect, 'dbapi', None)
        version = getattr(dbapi, '__version__', None) or getattr(dbapi, 'sqlite_version', '')
        pool = 'a pool of %d connections' % SQL_QUERY_THREADS
        if self.backend == 'sqlite':
            pool = 'one connection per runner thread'
        return '%s: %s via %s %s and SQLAlchemy %s, %s, timeout %g s%s' % (
            self.display_url, self.backend, self.driver, str(version).split()[0] if version else '',
            self._sqlalchemy.__version__, pool, self.timeout,
            '' if self.driver_timeouts else
            ' (no driver timeouts known: a stuck query keeps a runner thread)')

    def _execute(self, sql, values):
        if self.sqlite_path:
            _require_sqlite_file(self.sqlite_path)
        statement = self._statements.get(sql)
        if statement is None:
            statement = self._statements[sql] = self._sqlalchemy.text(sql)
        with self.engine.connect() as connection:
            result = connection.execute(statement, values)
            return tuple(result.keys()), [tuple(row) for row in result.fetchall()]


class UnusableDatabase(SQLDatabase):
    """A URL that cannot work here (SQLAlchemy or a driver missing): every query fails
    with the reason, which says what to install; logged once like an outage."""

    def __init__(self, url, timeout, reason):
        super().__init__(url, timeout)
        self.reason = reason
        self.backend = self.driver = 'unusable'

    def describe(self):
        return '%s: cannot be used: %s' % (self.display_url, self.reason)

    def _execute(self, sql, values):
        raise RuntimeConfigError(self.reason)


def open_sql_database(url, timeout):
    """A new SQLDatabase for ``url`` (see sql_database(), which shares them)."""
    sqlalchemy = import_sqlalchemy()
    try:
        if sqlalchemy is not None:
            return SQLAlchemyDatabase(url, timeout, sqlalchemy)
        if re.match(r'^sqlite(\+pysqlite)?:', url.strip()):
            return SQLiteDatabase(url, timeout)
        backend = re.split(r'[+:]', url.strip(), 1)[0].lower()
        hint = SQL_BACKEND_HINTS.get(backend, 'the Python driver for %s' % backend)
        raise RuntimeConfigError('%s needs SQLAlchemy, which is not installed: pip install '
                                 'SQLAlchemy and %s (without them only sqlite:///path works)'
                                 % (backend or 'this URL', hint))
    except RuntimeConfigError as error:
        return UnusableDatabase(url, timeout, error.args[0])


_sql_databases = {}
_sql_databases_lock = threading.Lock()


def sql_database(url, timeout=5.0):
    """The shared SQLDatabase for ``url`` (opened on first use)."""
    key = (url, timeout)
    database = _sql_databases.get(key)
    if database is None:
        with _sql_databases_lock:
            database = _sql_databases.get(key)
            if database is None:
                database = _sql_databases[key] = open_sql_database(url, timeout)
    return database


def sql_placeholders(sql):
    """The ':name' placeholders of a query, in order, each once."""
    names = []
    for name in SQL_PLACEHOLDER_RE.findall(sql or ''):
        if name not in names:
            names.append(name)
    return tuple(names)


# [databaseconfig] read once per config object (and again after config.set()).
RuntimeSettings = namedtuple('RuntimeSettings',
                             'url sql sql_names sqlsection sqlsection_names globalscope ttl '
                             'priorities timeout fallback fields')


def runtime_settings(config):
    compute = getattr(config, '_cached', None)
    if compute is None:
        return _read_runtime_settings(config)
    return compute('runtime', 'databaseconfig', '', lambda: _read_runtime_settings(config))


def _read_runtime_settings(config):
    table = CORE_DEFAULTS['databaseconfig']

    def value(option):
        return config.get('databaseconfig', option, fallback=table[option]['default']).strip()
    try:
        ttl, timeout = float(value('value_cache_ttl')), float(value('timeout'))
        fallback = FuConfigParser.BOOLEAN_STATES[value('fallback_to_file_values').lower()]
    except (KeyError, ValueError) as error:
        raise RuntimeConfigError('invalid [databaseconfig] setting: %s' % error)
    sql, sqlsection = value('sql'), value('sqlsection')
    return RuntimeSettings(
        url=value('dbconnectstring'), sql=sql, sql_names=sql_placeholders(sql),
        sqlsection=sqlsection, sqlsection_names=sql_placeholders(sqlsection),
        globalscope=value('globalscope'), ttl=ttl,
        priorities=tuple(parse_list(value('dbpriority'), lower=True)), timeout=timeout,
        fallback=fallback,
        fields=tuple(value(name).lower() for name in ('scope_field', 'option_field',
                                                      'value_field')))


def sql_values(names, suspect, known):
    """The values of a query's placeholders: ``known`` ones (section, option, ...) and
    the template variables of the message (to_address, to_domain, from_address, ...)."""
    values = {}
    for name in names:
        if name in known:
            values[name] = known[name]
            continue
        compute = TEMPLATE_DEFAULTS.get(name)
        if compute is None:
            choices = ', '.join(':' + choice for choice in list(known) + list(TEMPLATE_DEFAULTS))
            raise RuntimeConfigError('the query uses :%s, which is none of %s' % (name, choices))
        values[name] = compute(suspect) if suspect is not None else None
    return values


_UNSET = configparser._UNSET


class DBConfig(object):
    """FuGlu's runtime configuration for one message (``fuglu.extensions.sql.DBConfig``).

    ``DBConfig(config, suspect)`` reads like ``config``, but ``get``, ``getint``,
    ``getfloat``, ``getboolean`` and ``getlist`` (FuGlu's signatures, with ``fallback``
    and ``override``) first ask the sources of [databaseconfig] dbpriority (``sql``)
    for a value for the suspect's FIRST recipient: a row for the address beats one for
    '%domain', which beats one for globalscope ('$GLOBAL'), which beats the config file.
    Everything else (has_option, sections, ...) is the config's own.

    Methods for plugins: the getters; ``get_override(section, option)`` -> the database's
    value or None; ``load_section(section)`` runs the whole-section query ``sqlsection``
    once, after which the getters answer that section from its rows and
    ``get_cached_options(section)`` lists its options (option names that are data, like
    the attachment plugin's rule regexes); ``set_suspect(suspect)``,
    ``set_rcpt(address)``; ``parentget``... -> the config file's value.
    Raises RuntimeConfigError when the database cannot answer or gives a value the
    option cannot take (the message is deferred). Cheap to create: make one per message;
    the answers are cached per database for value_cache_ttl seconds.
    """

    def __init__(self, config, suspect):
        self.config = config
        self.sectioncache = {}   # section -> [(rank, scope, option, value)]
        self.logger = logging.getLogger('fuglu.extensions.sql.dbconfig')
        self.suspect = None
        self.set_suspect(suspect)

    def __getattr__(self, name):
        # only reached for names DBConfig does not have: the config's own methods
        config = self.__dict__.get('config')
        if config is None:
            raise AttributeError(name)
        return getattr(config, name)

    def set_suspect(self, suspect):
        # (FuGlu holds a weak reference: a suspect that went away silently meant "no
        # override", the wrong policy. A plain reference costs nothing here.)
        self.suspect = suspect if suspect is not None else Suspect('', 'postmaster', inbuffer=b'')

    def set_rcpt(self, recipient):
        self.set_suspect(Suspect('', recipient, inbuffer=b''))

    def _the_suspect(self):
        return self.suspect

    # -- sources ----------------------------------------------------------------
    def get_override(self, section, option, **kwargs):
        settings = runtime_settings(self.config)
        if not settings.url:
            return None
        for source in settings.priorities:
            if source == 'sql':
                value = self._get_sql(section, option, settings)
                if value is not None:
                    return value
        return None

    def _rows(self, settings, sql, values):
        database = sql_database(settings.url, settings.timeout)
        return database.rows(sql, values, settings.ttl, settings.fallback)

    def _get_sql(self, section, option, settings):
        if section in self.sectioncache:
            return self._get_cached(section, option)
        suspect = self._the_suspect()
        if not settings.sql or suspect is None:
            return None
        known = {'section': section, 'option': option, 'globalscope': settings.globalscope}
        values = sql_values(settings.sql_names, suspect, known)
        rows = self._rows(settings, settings.sql, values)[1]
        if not rows or not rows[0] or rows[0][0] is None:
            return None
        return force_uString(rows[0][0])

    def _scope_rank(self, scope, settings):
        """2 for the recipient's address, 1 for '%domain', 0 for the global scope, -1 else."""
        suspect = self._the_suspect()
        scope = force_uString(scope) or ''
        address = (suspect.to_address or '') if suspect is not None else ''
        if address and scope.lower() == address.lower():
            return 2
        if suspect is not None and suspect.to_domain and scope.lower() == '%' + suspect.to_domain:
            return 1
        return 0 if scope == settings.globalscope else -1

    def load_section(self, section):
        """Fetch every row of ``section`` for this recipient (query ``sqlsection``).
        Returns True when the section was loaded (SQL configured)."""
        settings = runtime_settings(self.config)
        suspect = self._the_suspect()
        if suspect is None or not (settings.url and settings.sqlsection and
                                   'sql' in settings.priorities):
            return False
        values = sql_values(settings.sqlsection_names, suspect,
                            {'section': section, 'globalscope': settings.globalscope})
        columns, rows = self._rows(settings, settings.sqlsection, values)
        loaded = []
        if rows:
            names = [force_uString(column).lower() for column in columns]
            missing = [field for field in settings.fields if field not in names]
            if missing:
                raise RuntimeConfigError('sqlsection returns the columns %s; [databaseconfig] '
                                         'scope_field, option_field, value_field name %s'
                                         % (', '.join(names), ', '.join(missing)))
            positions = [names.index(field) for field in settings.fields]
            for row in rows:
                scope, option, value = (row[position] for position in positions)
                rank = self._scope_rank(scope, settings)
                if rank >= 0 and option is not None and value is not None:
                    loaded.append((rank, scope, force_uString(option), force_uString(value)))
        loaded.sort(key=lambda item: -item[0])   # most specific first (a stable sort)
        self.sectioncache[section] = loaded
        return True

    def _get_cached(self, section, option):
        for _rank, _scope, row_option, value in self.sectioncache.get(section, ()):
            if row_option == option:
                return value
        return None

    def get_cached_options(self, section):
        options = []
        for _rank, _scope, option, _value in self.sectioncache.get(section, ()):
            if option not in options:
                options.append(option)
        return options

    # -- getters ----------------------------------------------------------------
    def _value(self, section, option, override):
        value = self.get_override(section, option)
        return override if value is None else value

    def _convert(self, section, option, value, convert, kind):
        try:
            return convert(value)
        except (TypeError, ValueError, KeyError):
            raise RuntimeConfigError('the database value %r of [%s] %s is not %s'
                                     % (value, section, option, kind))

    def get(self, section, option, fallback=_UNSET, override=None, resolve_env=False):
        value = self._value(section, option, override)
        if value is None:
            return self.parentget(section, option, fallback=fallback, resolve_env=resolve_env)
        return resolve_env_marker(value) if resolve_env else value

    def getint(self, section, option, fallback=_UNSET, override=None):
        value = self._value(section, option, override)
        if value is None:
            return self.parentgetint(section, option, fallback=fallback)
        return self._convert(section, option, value, lambda v: int(str(v).strip()), 'an integer')

    def getfloat(self, section, option, fallback=_UNSET, override=None):
        value = self._value(section, option, override)
        if value is None:
            return self.parentgetfloat(section, option, fallback=fallback)
        return self._convert(section, option, value, lambda v: float(str(v).strip()), 'a number')

    def getboolean(self, section, option, fallback=_UNSET, override=None):
        value = self._value(section, option, override)
        if value is None:
            return self.parentgetboolean(section, option, fallback=fallback)
        if isinstance(value, bool):
            return value
        states = FuConfigParser.BOOLEAN_STATES
        return self._convert(section, option, value, lambda v: states[str(v).strip().lower()],
                             'a boolean')

    def getlist(self, section, option, separators=',', strip=True, lower=False, fallback=_UNSET,
                override=None, resolve_env=False):
        value = self._value(section, option, override)
        if value is None:
            return self.parentgetlist(section, option, separators, strip, lower, fallback,
                                      resolve_env=resolve_env)
        if isinstance(value, (list, tuple)):
            return list(value)
        return split_list_value(value, separators, strip, lower)

    # -- the config file's values ---------------------------------------------------
    def parentget(self, section, option, fallback=_UNSET, override=None, resolve_env=False):
        if override is not None:
            return override
        value = self.config.get(section, option, fallback=fallback)
        return resolve_env_marker(value) if resolve_env and isinstance(value, str) else value

    def parentgetint(self, section, option, fallback=_UNSET, override=None):
        if override is not None:
            return int(override)
        return self.config.getint(section, option, fallback=fallback)

    def parentgetfloat(self, section, option, fallback=_UNSET, override=None):
        if override is not None:
            return float(override)
        return self.config.getfloat(section, option, fallback=fallback)

    def parentgetboolean(self, section, option, fallback=_UNSET, override=None):
        if override is not None:
            return FuConfigParser.BOOLEAN_STATES[str(override).strip().lower()]
        return self.config.getboolean(section, option, fallback=fallback)

    def parentgetlist(self, section, option, separators=',', strip=True, lower=False,
                      fallback=_UNSET, override=None, resolve_env=False):
        if override is not None:
            return split_list_value(override, separators, strip, lower)
        return self.config.getlist(section, option, separators, strip, lower,
                                   fallback=None if fallback is _UNSET else fallback)


class DBFile(object):
    """FuGlu's rule rows from SQL (``fuglu.extensions.sql.DBFile``): ``query`` with
    ``:name`` placeholders, e.g. the attachment plugin's
    ``SELECT action,regex,description FROM attachmentrules WHERE scope=:scope ...``.

    ``get_rows(values)`` -> list of row tuples; ``get_content(values)`` -> FuGlu's lines,
    each row's non-empty columns joined by a space. With ``config``, the [databaseconfig]
    timeout, cache (value_cache_ttl) and fallback_to_file_values apply; without, every
    call queries (FuGlu's behaviour). Raises RuntimeConfigError when the database cannot
    answer.
    """

    def __init__(self, connectstring, query, config=None):
        self.connectstring = connectstring
        self.query = query
        self.config = config

    def get_rows(self, templatevars=None):
        values = dict(templatevars or {})
        if self.config is not None:
            settings = runtime_settings(self.config)
            database = sql_database(self.connectstring, settings.timeout)
            return database.rows(self.query, values, settings.ttl, settings.fallback)[1]
        return sql_database(self.connectstring).query(self.query, values)[1]

    def get_content(self, templatevars=None):
        return [' '.join(force_uString(column) for column in row if column)
                for row in self.get_rows(templatevars)]


def get_session(connectstring, **kwargs):
    """FuGlu's ``get_session``: an SQLAlchemy Session on the shared engine of
    ``connectstring`` (pool and timeouts as for our own lookups). Needs SQLAlchemy."""
    database = sql_database(connectstring)
    if not isinstance(database, SQLAlchemyDatabase):
        raise RuntimeConfigError('sql extension not enabled: get_session() needs SQLAlchemy '
                                 '(pip install SQLAlchemy); %s' % database.describe())
    import sqlalchemy.orm
    return sqlalchemy.orm.sessionmaker(bind=database.engine, **kwargs)()


def _print_line(text, color=None):
    print(text)


def lint_sql(url, sql, values, label, timeout=5.0, out=_print_line, describe=True):
    """Lint one query: say which database, backend and driver it reaches (``describe``),
    run it once with ``values`` and say how many rows came back. ``out(text, color)``
    prints. Returns True when it worked."""
    database = sql_database(url, timeout)
    if isinstance(database, UnusableDatabase):
        out('%s: %s' % (label, database.describe()), 'red')
        return False
    if describe:
        out('%s: %s' % (label, database.describe()))
    try:
        rows = database.query(sql, values)[1]
    except RuntimeConfigError as error:
        out('%s: query failed: %s' % (label, error), 'red')
        return False
    shown = ', '.join('%s=%s' % (name, value) for name, value in values.items()
                      if name in ('section', 'option', 'to_address', 'scope', 'checktype'))
    out('%s: query OK, %d row%s for %s' % (label, len(rows), '' if len(rows) == 1 else 's', shown))
    return True


def lint_session(connectstring):
    """FuGlu's ``lint_session``: can we connect and run SELECT 1?"""
    if not connectstring:
        print('INFO: no SQL connection string found, not using SQL database')
        return True
    return lint_sql(connectstring, 'SELECT 1', {}, 'SQL')


def lint_runtime_config(config, out):
    """--lint of [databaseconfig]: ``out(text, color)`` for each line; returns the
    number of errors."""
    settings = runtime_settings(config)
    if config.has_section('databaseconfig'):
        for option in configparser.RawConfigParser.options(config, 'databaseconfig'):
            if is_ignored_option('databaseconfig', option) and option not in config.defaults():
                out('[databaseconfig] %s: accepted for compatibility but not implemented by fuglu '
                    '(REST and YAML sources): ignored' % option, 'yellow')
    for source in settings.priorities:
        if source not in ('sql', 'cache'):
            out('[databaseconfig] dbpriority %s: not implemented by fuglu, ignored (only sql)'
                % source, 'yellow')
    if not settings.url:
        out('runtime config: no [databaseconfig] dbconnectstring: no per-recipient overrides, '
            'plugins use the config file values')
        return 0
    if 'sql' not in settings.priorities:
        out('runtime config: dbpriority does not list sql: dbconnectstring is not used', 'yellow')
        return 0
    sample = Suspect('sender@example.com', 'recipient@example.com',
                     inbuffer=b'Subject: fuglu lint\r\n\r\n')
    errors = 0
    for label, sql, names, known in (
            ('runtime config sql', settings.sql, settings.sql_names,
             {'section': 'testsection', 'option': 'testoption',
              'globalscope': settings.globalscope}),
            ('runtime config sqlsection', settings.sqlsection, settings.sqlsection_names,
             {'section': 'testsection', 'globalscope': settings.globalscope})):
        if not sql:
            continue
        try:
            values = sql_values(names, sample, known)
        except RuntimeConfigError as error:
            out('%s: %s' % (label, error), 'red')
            errors += 1
            continue
        if not lint_sql(settings.url, sql, values, label, settings.timeout, out,
                        describe=label.endswith(' sql')):
            errors += 1
            if '`' in sql and sql_database(settings.url, settings.timeout).backend == 'postgresql':
                out('%s: PostgreSQL does not take MySQL\'s `backticks`; see the PostgreSQL '
                    'queries in '
                    'README.md' % label, 'yellow')
            break
    if settings.ttl <= 0:
        out('runtime config: value_cache_ttl is 0: every lookup queries the database and '
            'nothing is served while it is away', 'yellow')
    return errors


def runtime_config_summary(config):
    """One line for the start-up log: where per-recipient values come from."""
    settings = runtime_settings(config)
    if not settings.url or 'sql' not in settings.priorities:
        return 'runtime config: none (no [databaseconfig] dbconnectstring)'
    return ('runtime config: per-recipient values from %s, cached %g s, timeout %g s, '
            'failed lookups %s' % (redact_uri(settings.url), settings.ttl, settings.timeout,
               'use the file values' if settings.fallback else 'defer the message'))


def _sql_extension_attribute(name):
    """The names of fuglu.extensions.sql that depend on SQLAlchemy, resolved on first use."""
    sqlalchemy = import_sqlalchemy()
    module = sys.modules['fuglu.extensions.sql']
    if name in ('SQL_EXTENSION_ENABLED', 'ENABLED'):
        return sqlalchemy is not None
    if name == 'STATUS':
        return 'available' if sqlalchemy is not None else 'sqlalchemy not installed'
    if name == 'YAML_AVAILABLE':   # FuGlu's YAML source of runtime config is not built in
        return False
    if name == 'text':
        return sqlalchemy.text if sqlalchemy is not None else (lambda string: string)
    if name == 'DeclarativeBase':
        if sqlalchemy is not None:
            import sqlalchemy.orm
            base = getattr(sqlalchemy.orm, 'DeclarativeBase', None)
            if base is not None:
                declarative = type('DeclarativeBase', (base,), {})
            else:
                declarative = sqlalchemy.orm.declarative_base()
        else:
            declarative = type('DeclarativeBase', (object,), {'metadata': None})
        module.DeclarativeBase = declarative   # one class for every importer
        return declarative
    raise AttributeError("module 'fuglu.extensions.sql' has no attribute %r" % name)


RESTAPIError = RuntimeConfigError   # FuGlu's name for a failed runtime-config source


class RESTAPIConfig(object):
    """FuGlu's REST API configuration source; not part of this build: every call
    raises RESTAPIError saying so."""

    def __init__(self, config, suspectid='<unknown>'):
        self.config, self.suspectid = config, suspectid

    def _unavailable(self, *args, **kwargs):
        raise RESTAPIError('the REST API configuration source is not part of this build')

    def call(self, reqtype, jsondata, restapi_uri, headers, restapi_verify, timeout):
        self._unavailable()

    def get_headers(self):
        self._unavailable()

    def get(self, endpoint, timeout=0):
        self._unavailable()

    def put(self, endpoint, jsondata, timeout=0):
        self._unavailable()


class SectionCacheRow(object):
    def __init__(self, config, scope, option, value):
        self.config, self.scope, self.option, self.value = config, scope, option, value


def get_domain_setting(domain, dbconnection, sqlquery, cache, cachename, default_value=None,
                       logger=None):
    """One value for ``domain`` from SQL (``:domain`` in the query), cached in
    ``cache`` (a fuglu.shared.Cache) under cachename-domain; default_value when the
    query finds nothing or fails."""
    key = '%s-%s' % (cachename, domain)
    cached = cache.get_cache(key) if cache is not None else None
    if cached is not None:
        return cached
    try:
        from sqlalchemy import text
        session = get_session(dbconnection)
        try:
            row = session.execute(text(sqlquery), {'domain': domain}).fetchone()
        finally:
            session.close()
    except Exception as error:
        (logger or logging.getLogger('fuglu.extensions.sql')).error(
            'get_domain_setting %s failed: %s', domain, error)
        return default_value
    value = row[0] if row else default_value
    if cache is not None:
        cache.put_cache(key, value)
    return value


def register_sql_extension():
    """Make ``from fuglu.extensions.sql import DBConfig, get_session, ...`` work for
    plugins written against FuGlu (a module of its own, so its names do not clutter
    ours)."""
    import types
    if 'fuglu.extensions.sql' in sys.modules:
        return
    package = sys.modules.get('fuglu.extensions')
    if package is None:
        package = types.ModuleType('fuglu.extensions', 'FuGlu\'s extension modules, from fuglu.py')
        package.__path__ = []
        sys.modules['fuglu.extensions'] = package
    module = types.ModuleType('fuglu.extensions.sql', 'FuGlu\'s SQL extension, from fuglu.py')
    module.__dict__.update(
        DBConfig=DBConfig, DBFile=DBFile, get_session=get_session, lint_session=lint_session,
        RESTAPIError=RuntimeConfigError, RuntimeConfigError=RuntimeConfigError,
        RESTAPIConfig=RESTAPIConfig, SectionCacheRow=SectionCacheRow,
        get_domain_setting=get_domain_setting, modlogger=logging.getLogger('fuglu.extensions.sql'),
        __getattr__=_sql_extension_attribute)
    package.sql = module
    sys.modules['fuglu.extensions.sql'] = module
    sys.modules[__name__].extensions = package   # for `import fuglu.extensions.sql`


register_sql_extension()


###############################################################################
# SuspectFilter: FuGlu rule files
###############################################################################

class LimitExceeded(FugluError):
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


class FileList(object):
    """The lines of a text file as a list (FuGlu's FileList), re-read when the file
    changes (checked at most every ``minimum_time_between_reloads`` seconds). Each line
    passes the filters: newline removed, then as asked strip, skip empty lines, skip
    # comments, lowercase, then ``additional_filters`` (functions line -> line or None
    to drop it). ``filename`` None (or a missing file) gives an empty list.

    Methods: get_list(); file_changed(). Subclasses override _parse_lines(lines)."""

    RELOAD_CHECK_INTERVAL = 5

    def __class_getitem__(cls, content_type):
        # FuGlu's FileList is typing.Generic: its plugins subclass FileList[list[str]]
        return cls

    def __init__(self, filename=None, strip=True, skip_empty=True, skip_comments=True,
                 lowercase=False, additional_filters=None,
                 minimum_time_between_reloads=RELOAD_CHECK_INTERVAL):
        self.minimum_time_between_reloads = minimum_time_between_reloads
        self.linefilters = [lambda line: line.rstrip('\r\n')]
        if strip:
            self.linefilters.append(lambda line: line.strip())
        if skip_empty:
            self.linefilters.append(lambda line: line if line != '' else None)
        if skip_comments:
            self.linefilters.append(lambda line: None if line.strip().startswith('#') else line)
        if lowercase:
            self.linefilters.append(lambda line: line.lower())
        if additional_filters is not None:
            if isinstance(additional_filters, list):
                self.linefilters.extend(additional_filters)
            else:
                self.linefilters.append(additional_filters)
        if not hasattr(self, 'logger'):
            self.logger = logging.getLogger('fuglu.filelist')
        self.lock = threading.Lock()
        self.content = []
        self._stamp = None       # identity of the file last read, None: not read
        self._last_check = 0
        self._filename = filename
        if filename is not None:
            self._reload_if_necessary()

    @property
    def filename(self):
        return self._filename

    @filename.setter
    def filename(self, value):
        if value != self._filename:
            self._filename, self._stamp, self._last_check = value, None, 0
            self.content = self._parse_lines([])
            self._reload_if_necessary()

    def _file_stamp(self):
        try:
            info = os.stat(self._filename)
        except (OSError, TypeError):
            return None
        return info.st_mtime_ns, info.st_ctime_ns, info.st_size, info.st_ino

    def file_changed(self):
        return self._filename is not None and self._file_stamp() != self._stamp

    def _reload_if_necessary(self):
        if self._filename is None:
            return False
        now = time.time()
        if now - self._last_check < self.minimum_time_between_reloads:
            return False
        with self.lock:
            self._last_check = now
            stamp = self._file_stamp()
            if stamp == self._stamp and stamp is not None:
                return False
            self._stamp = stamp
            self.content = self._parse_lines(self._reload() if stamp is not None else [])
            return True

    def _reload(self, retry=1):
        """The file's lines (errors logged and read as no lines)."""
        self.logger.debug('Reloading file %s', self._filename)
        try:
            with open(self._filename, encoding='utf-8', errors='replace') as handle:
                return handle.readlines()
        except OSError as error:
            self.logger.error('cannot read %s: %s', self._filename, error)
            return []

    def _apply_linefilters(self, line):
        for linefilter in self.linefilters:
            line = linefilter(line)
            if line is None:
                break
        return line

    def _filter_lines(self, lines):
        filtered = (self._apply_linefilters(line) for line in lines)
        return [line for line in filtered if line is not None]

    def _parse_lines(self, lines):
        return self._filter_lines(lines)

    def get_list(self):
        self._reload_if_necessary()
        return self.content

    @staticmethod
    def inline_comments_filter(line):
        """A line filter that drops everything from '#' on (and the line if nothing
        is left)."""
        if line and '#' in line:
            line = line[:line.index('#')].strip() or None
        return line


class SuspectFilterResult(collections.namedtuple('SuspectFilterResult',
                                                  'fieldname value arg pattern')):
    """One match of a rule: field name, the value that matched, the rule's argument,
    and its regex (or comparison, e.g. '>5'). Unpacks as the 4-tuple of older FuGlu."""
    __slots__ = ()


class SuspectFilterRule(object):
    """One rule: ``fieldname``, ``args`` (None when empty), and either ``pattern`` (a
    compiled regex) or ``op``/``num``/``cmp`` (a numeric comparison)."""

    op_map = {
        '<': operator.lt, '<=': operator.le, '=': operator.eq, '==': operator.eq,
        '!=': operator.ne, '<>': operator.ne, '>': operator.gt, '>=': operator.ge,
    }

    def __init__(self, fieldname, args=None):
        self.fieldname = fieldname[:-1] if fieldname.endswith(':') else fieldname
        self.args = None if isinstance(args, str) and not args.strip() else args
        self.pattern = self.op = self.num = self.cmp = None
        self.lineno, self.text = 0, ''

    def __repr__(self):
        return '<SuspectFilterRule fieldname=%s args=%s pattern=%s cmp=%s>' % (
            self.fieldname, self.args, self.pattern, self.cmp)

    def set_rgx(self, pattern, reflags=0):
        self.pattern = re.compile(pattern, reflags)

    def set_cmp(self, cmp, num):
        self.op = self.op_map.get(cmp)
        if self.op is None:
            raise ValueError('failed to identify operator %s use one of %s'
                             % (cmp, ','.join(self.op_map)))
        self.num = float(num)
        self.cmp = '%s%s' % (cmp, num)

    def test(self, value, deadline=None):
        """The text of this match (the regex, or the comparison), or None. With a
        ``deadline`` (time.monotonic()) the regex search is bounded in time
        (RuleTimeLimitExceeded)."""
        if self.pattern is not None:
            if deadline is None:
                found = self.pattern.search(value) is not None
            else:
                found = search_within(self.pattern, value, deadline)
            return self.pattern.pattern if found else None
        try:
            return self.cmp if self.op(float(value), self.num) else None
        except (TypeError, ValueError):
            return None


NUMERIC_RULE_RE = re.compile(r'^(<=|>=|==|!=|<>|<|>|=)(-?\d+(?:\.\d+)?)$')
SLASH_RULE_RE = re.compile(r'^(\S+?):?\s+/((?:[^/\\]|\\.)*)/([im]*)(?:\s+(.*))?$')


class SuspectFilter(FileList):
    """A rule file of lines `field regex [args]` (FuGlu's format), matched against messages.
    One parser for every plugin that reads rules; ``SuspectFilter(None)`` has no rules.

    Methods: matches(suspect, extended=False) -> (True, args of the first matching
    rule) or (False, None); get_args(suspect, extended=False) -> args of every match;
    extended gives SuspectFilterResult objects instead of args. get_field(suspect,
    name) -> the values of a field (headers, envelope, @tags, body...). lint() -> bool.
    The file is re-read when it changes (checked at most every 5 seconds).

    Time bound: the rules' regexes get MATCH_TIME_LIMIT seconds together per call of
    matches()/get_args(), whatever the fields hold (a rule like ``body .*word`` is
    quadratic in the body's length). Values are never cut short, since a rule that
    stops matching past a size can let a message through. When time is up the call
    raises RuleTimeLimitExceeded (a LimitExceeded): logged with the rule, and a
    scanner gets its problemaction. FuGlu 1.7.0 has no such bound.
    """

    MATCH_TIME_LIMIT = 10     # seconds per matches()/get_args() call
    INLINE_SIZE = 4096        # characters a value may have to be searched in-process

    def __init__(self, *args, **kwargs):
        self.logger = logging.getLogger('fuglu.suspectfilter')
        self.errors = []
        super().__init__(*args, **kwargs)

    rules = property(lambda self: self.content)

    # -- parsing --------------------------------------------------------------
    @classmethod
    def parse_line(cls, line, lineno=0):
        """One rule line -> SuspectFilterRule; ValueError when it fits no format."""
        text = line.strip()
        if text.startswith('{'):
            import json
            data = json.loads(text)
            rule = SuspectFilterRule(data['field'], data.get('args'))
            if 'regex' in data:
                rule.set_rgx(data['regex'], cls._get_regexflags(data.get('flags', '')))
            else:
                rule.set_cmp(data['cmp'], data['num'])
        else:
            match = SLASH_RULE_RE.match(text)
            if match:
                field, pattern, flags, args = match.groups()
                rule = SuspectFilterRule(field, args.strip() if args else None)
                rule.set_rgx(pattern.replace('\\/', '/'), cls._get_regexflags(flags))
            else:
                parts = text.split(None, 2)
                if len(parts) < 2:
                    raise ValueError('not a rule: %r' % text)
                rule = SuspectFilterRule(parts[0], parts[2].strip() if len(parts) > 2 else None)
                numeric = NUMERIC_RULE_RE.match(parts[1])
                if numeric:
                    rule.set_cmp(numeric.group(1), numeric.group(2))
                else:
                    rule.set_rgx(parts[1], re.IGNORECASE | re.DOTALL)
        rule.lineno, rule.text = lineno, text
        return rule

    @staticmethod
    def _get_regexflags(flags):
        value = 0
        for flag in (flags or '').lower():
            value |= {'i': re.IGNORECASE, 'm': re.MULTILINE}.get(flag, 0)
        return value

    def _parse_lines(self, lines):
        rules, errors = [], []
        if self._filename is not None and self._stamp is None:
            errors.append('cannot read %s' % self._filename)
        for lineno, line in enumerate(lines, 1):
            line = self._apply_linefilters(line)
            if line is None:
                continue
            try:
                rules.append(self.parse_line(line, lineno))
            except (ValueError, KeyError, TypeError, re.error) as error:
                message = '%s line %d: %s' % (self._filename, lineno, error)
                self.logger.error('skipping rule: %s', message)
                errors.append(message)
        self.errors = errors
        return rules

    # -- fields ---------------------------------------------------------------
    def get_field(self, suspect, headername):
        """All values (str) of a rule field for a message."""
        return force_uString(list(self.field_values(suspect, force_uString(headername), self)))

    @staticmethod
    def field_values(suspect, field, rulefile=None):
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
            rulefile = rulefile or SuspectFilter()
            parts = rulefile.get_decoded_textparts(suspect)
            return parts if name == 'body:raw' else [rulefile.strip_text(part) for part in parts]
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
        if value is None:
            return []
        if isinstance(value, (list, tuple, set)):
            return [force_uString(v) for v in value]
        if isinstance(value, dict):
            return [str(v) for v in value.values()]
        return [force_uString(value)]

    def get_decoded_textparts(self, suspect, attachment=None, inline=None):
        """The decoded text of every text/* part (str). attachment / inline: None =
        all parts, True = only parts with Content-Disposition attachment / inline,
        False = only parts without it."""
        texts = []
        for disposition, text in self._decoded_textparts(suspect.get_message_rep()):
            if attachment is not None and attachment != (disposition == 'attachment'):
                continue
            if inline is not None and inline != (disposition == 'inline'):
                continue
            texts.append(text)
        return texts

    @staticmethod
    def _decoded_textparts(msgrep):
        """(disposition, decoded text) of each text part, decoded once per parsed message
        and kept with it (as FuGlu keeps them: rules and plugins asking again get the
        same strings; a replaced message is parsed, and decoded, anew)."""
        parts = getattr(msgrep, '_fuglu_decoded_textparts', None)
        if parts is not None:
            return parts
        parts = []
        for part in msgrep.walk():
            if part.get_content_maintype() != 'text' or part.is_multipart():
                continue
            disposition = (part.get('Content-Disposition') or '').split(';')[0].strip().lower()
            payload = part.get_payload(decode=True)
            if payload is not None:
                parts.append((disposition, force_uString(
                    payload, part.get_content_charset() or 'utf-8', 'strict+replace')))
        msgrep._fuglu_decoded_textparts = parts
        return parts

    @deprecated
    def get_decoded_textparts_deprecated(self, messagerep):
        """The decoded text parts of an email.message.Message (FuGlu's old API)."""
        texts = []
        for part in messagerep.walk():
            if part.get_content_maintype() == 'text' and not part.is_multipart():
                payload = part.get_payload(decode=True)
                if payload is not None:
                    texts.append(force_uString(payload, part.get_content_charset() or 'utf-8'))
        return texts

    def strip_text(self, content, remove_tags=None, replace_nbsp=True, use_bfs=True,
                   fugluid='<>'):
        """Text of an HTML document: tags removed (and everything inside
        ``remove_tags``, default script and style), entities decoded, newlines as
        spaces (as SpamAssassin sees a body). use_bfs is accepted: BeautifulSoup is
        not used, the standard library's parser does the work."""
        from email.header import Header
        if isinstance(content, Header):
            content = str(content)
        content = force_uString(content).replace('\n', ' ')
        if replace_nbsp:
            for entity in ('&nbsp;', '&#xa0;', '&#160;'):
                content = content.replace(entity, ' ')
        remove_tags = [force_uString(tag) for tag in (remove_tags or ['script', 'style'])]
        stripper = HTMLStripper(strip_tags=remove_tags)
        try:
            stripper.feed(content)
            stripper.close()
            text = stripper.get_stripped_data()
        except Exception:   # the parser gave up: remove what looks like tags
            text = re.sub(r'<[^>]*?>', '', content)
        return text.replace('\xa0', ' ') if replace_nbsp else text

    # -- matching -------------------------------------------------------------
    def _get_matches(self, suspect, verbose=False, firsthit=True):
        """SuspectFilterResult of each matching value (firsthit: only the first
        matching rule)."""
        found = []
        deadline = time.monotonic() + self.MATCH_TIME_LIMIT
        for rule in self.get_list():
            try:
                values = self.field_values(suspect, rule.fieldname, self)
            except Exception as error:
                self.logger.warning('%s: rule %s line %d: %s', suspect.id, rule.fieldname,
                                    rule.lineno, error)
                continue
            for value in values:
                if value is None:
                    continue
                text = value if isinstance(value, str) else str(value)
                try:
                    matched = rule.test(text, deadline)
                except RuleTimeLimitExceeded as error:
                    self.log_time_limit(suspect, rule, text, error)
                    raise
                if matched is None:
                    continue
                suspect.debug('rule %s line %d matched %r (%s)' % (self.filename, rule.lineno,
                                                                    text[:100], rule.text))
                found.append(SuspectFilterResult(rule.fieldname, text, rule.args, matched))
                if firsthit:
                    return found
        return found

    def log_time_limit(self, suspect, rule, value, error):
        self.logger.error('%s: %s line %d (%s): no answer within %ss on a %d character %s value '
                          '(%s); the message is a problem, not a non-match', suspect.id,
                          self.filename, rule.lineno, rule.text[:100], self.MATCH_TIME_LIMIT,
                          len(value), rule.fieldname, error)

    def matches(self, suspect, extended=False, verbose=False):
        found = self._get_matches(suspect, verbose, firsthit=True)
        if not found:
            suspect.debug('message does not match any rule in %s' % self.filename)
            return False, None
        return True, (found[0] if extended else found[0].arg)

    def get_args(self, suspect, extended=False, verbose=False):
        found = self._get_matches(suspect, verbose, firsthit=False)
        return found if extended else [result.arg for result in found]

    def lint(self):
        if self.filename is None:
            print('ERROR: SuspectFilter file not defined')
            return False
        if not os.path.exists(self.filename):
            print('rule file not found: %s' % self.filename)
            return False
        self._stamp, self._last_check = None, 0
        self._reload_if_necessary()
        for error in self.errors:
            print('unparsable rule: %s' % error)
        return not self.errors


class HTMLStripper(HTMLParser):
    """Collects the text of an HTML document, without the content of ``strip_tags``."""

    def __init__(self, strip_tags=None):
        super().__init__()
        self.strip_tags = strip_tags or ['script', 'style']
        self.collect = True
        self.stripped_data = []

    def handle_data(self, data):
        if data and self.collect:
            self.stripped_data.append(data)

    def handle_starttag(self, tag, attrs):
        if tag.lower() in self.strip_tags:
            self.collect = False

    def handle_endtag(self, tag):
        if tag.lower() in self.strip_tags:
            self.collect = True

    def get_stripped_data(self):
        return ''.join(self.stripped_data)


###############################################################################
# Plugins: base classes and loader
###############################################################################

def call_plugin(method, *args, **kwargs):
    """Call a plugin method and return its result; if it is a coroutine (a plugin's
    ``async def examine``, as FuGlu 1.7's own plugins have), run it to completion on
    this thread's event loop first. Works from any worker thread."""
    result = method(*args, **kwargs)
    if not hasattr(result, '__await__'):
        return result
    return run_coroutine(result)


_plugin_loops = threading.local()


def run_coroutine(awaitable):
    """Run ``awaitable`` on an event loop owned by this thread (made on first use and
    kept, so a plugin's connections can be reused by later messages)."""
    import asyncio
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:   # called from inside a running loop: it cannot be re-entered, use a helper thread
        outcome = {}

        def run_elsewhere():
            try:
                outcome['value'] = run_coroutine(awaitable)
            except BaseException as error:
                outcome['error'] = error
        helper = threading.Thread(target=run_elsewhere, name='fuglu-coroutine')
        helper.start()
        helper.join()
        if 'error' in outcome:
            raise outcome['error']
        return outcome['value']
    loop = getattr(_plugin_loops, 'loop', None)
    if loop is None or loop.is_closed():
        loop = _plugin_loops.loop = asyncio.new_event_loop()
    return loop.run_until_complete(awaitable)


class RequiredVars(dict):
    """A plugin's ``requiredvars`` table. Every change registers the defaults with
    the config, so FuGlu's ``self.requiredvars.update({...})`` in a plugin's __init__
    works like an assignment."""

    def __init__(self, plugin, table=()):
        super().__init__(table)
        self._plugin = plugin

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self._plugin._register_defaults(self)

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        self._plugin._register_defaults(self)


class PluginLogger(object):
    """``plugin.logger`` when the plugin set none: its _logger(). A non-data
    descriptor, because FuGlu's BasicPlugin sets no logger: a plugin may assign
    self.logger or define a ``logger`` property of its own (without a setter)."""

    def __get__(self, plugin, owner=None):
        if plugin is None:
            return self
        logger = plugin.__dict__['logger'] = plugin._logger()   # asked once per plugin
        return logger


class BasicPlugin(object):
    """Base of every plugin. One instance per configured entry, shared by all worker
    threads: keep per-message state in the Suspect (tags, see SUSPECT_TAGS), not in
    the plugin.

    Methods for the daemon:
        __init__(config, section=None)
        lint() -> bool           prints human-readable diagnostics (--lint)
        check_peers() -> [(peer description, ok, detail)]   (healthcheck --deep)
        shutdown(), ashutdown()  when the daemon stops
    Any plugin method may be ``async def``: the daemon awaits it (call_plugin).

    Methods that may be overridden:
        lint()                   default: check_config()
        check_peers()            default: no peers
        shutdown(), ashutdown()  default: nothing
        __str__()                the name in lint and logs (default: friendly_name or
                                 the class name, with a custom section in brackets)
    plus the stage method of the subclass: ScannerPlugin.examine,
    PrependerPlugin.pluginlist / appenderlist, AppenderPlugin.process.

    Helpers for subclasses: check_config(), lint_actioncode(option, ...),
    _problemaction() (the action of option problemaction), _logger().

    Class attributes that may be overridden:
        requiredvars             option -> {'default': str, 'description': str, optional
                                 'section', 'validator', 'confidential'}; may also be
                                 assigned or updated in __init__, as FuGlu plugins do
        friendly_name            the name for __str__
        ignored_options          regexes: FuGlu options accepted without effect

    Instance attributes: config (FuConfigParser), section (the config section; default
    the class name), logger (``fuglu.plugin.<Class>``).
    """

    friendly_name = None
    ignored_options = ()   # regexes: FuGlu options of this plugin accepted without effect
    logger = PluginLogger()

    def _get_requiredvars(self):
        table = self.__dict__.get('_requiredvars')
        if table is None:
            table = self.__dict__['_requiredvars'] = RequiredVars(self)
        return table

    def _set_requiredvars(self, table):
        if isinstance(table, dict):
            table = RequiredVars(self, table)
        self.__dict__['_requiredvars'] = table
        self._register_defaults(table)

    requiredvars = property(_get_requiredvars, _set_requiredvars)

    def upd(self, dictupdt):
        """FuGlu's hook: register changed requiredvars defaults with the config."""
        self._register_defaults(dictupdt)

    def _register_defaults(self, table):
        if isinstance(table, dict) and hasattr(getattr(self, 'config', None), 'set_defaults'):
            self.config.set_defaults(self.section, table)

    def __init__(self, config, section=None):
        self.config = config
        self.section = section or getattr(self, 'default_section', None) or self.__class__.__name__
        self._custom_section = section is not None
        table = self.requiredvars
        if isinstance(table, dict) and not isinstance(table, RequiredVars):
            # a class attribute: this instance's copy, so .update() registers too
            table = self.__dict__['requiredvars'] = RequiredVars(self, table)
        self._register_defaults(table)

    def _logger(self):
        """The logger of this plugin (FuGlu's name: fuglu.plugin.<Class>)."""
        return logging.getLogger('fuglu.plugin.%s' % self.__class__.__name__)

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

    def _option_table(self):
        """requiredvars as a dict; FuGlu's old list (option names) and tuple
        ((section, option) pairs) forms declare options without defaults."""
        table = self.requiredvars
        if isinstance(table, list):
            return {option: {} for option in table}
        if isinstance(table, tuple):
            return {option: {'section': section} for section, option in table}
        return dict(table)

    def check_config(self):
        """Every declared option readable and valid, declared paths usable (see
        check_paths); options in the plugin's section that it does not declare are errors
        (typos; FuGlu itself does not check this), options without effect warnings."""
        table = self._option_table()
        table.setdefault('overrideaction', {'description': ''})
        table.setdefault('overridemessage', {'description': ''})
        errors = [e for e in check_options(self.config, self.section, table, self.ignored_options)
                  if not (e.startswith('Missing') and
                          ('overrideaction' in e or 'overridemessage' in e))]
        for error in errors:
            print(error)
        findings = check_inert_options(self.config, self.section, table, self.ignored_options)
        findings += check_paths(self.config, self.section, table)
        for level, text in findings:
            print('%s%s' % ('' if level in ('note', 'info') else level.upper() + ': ', text))
        return not errors and not any(level == 'error' for level, _text in findings)

    @deprecated
    def checkConfig(self):
        return self.check_config()

    def lint_actioncode(self, option, *, allow_empty=False, allow_extras=()):
        """True if option ``option`` of this plugin names an action (or one of
        ``allow_extras``); prints an ERROR line and returns False otherwise."""
        try:
            value = self.config.get(self.section, option)
        except (configparser.NoOptionError, configparser.NoSectionError):
            if allow_empty:
                return True
            print('ERROR: %s.%s is not set' % (self.section, option))
            return False
        if not value:
            if allow_empty:
                return True
            print('ERROR: %s.%s is empty' % (self.section, option))
            return False
        if value.strip().upper() in {extra.upper() for extra in allow_extras}:
            return True
        if string_to_actioncode(value, self.config) is None:
            extras = ' or one of %s' % list(allow_extras) if allow_extras else ''
            print('ERROR: %s.%s=%r is not a valid action%s' % (self.section, option, value, extras))
            return False
        return True

    def lint(self):
        return self.check_config()

    def check_peers(self):
        """The services this plugin needs, checked now (for ``fuglu healthcheck
        --deep``): a list of (peer description, ok, detail). Plugins that talk to a
        daemon or a database override it; the default has none."""
        return []

    def shutdown(self):
        pass

    async def ashutdown(self):
        pass


class ReturnOverrideMixin(object):
    """FuGlu's ``overrideaction`` / ``overridemessage`` options: a dry run replaces the
    plugin's verdict by the configured one. (The scan session applies them to every
    scanner; this gives plugins FuGlu's methods for it.)"""

    @property
    def overrideaction(self):
        value = self.config.get(self.section, 'overrideaction', fallback=None)
        return string_to_actioncode(value, self.config) if value else None

    @property
    def milter_overrideaction(self):
        action = self.overrideaction
        return None if action is None else MILTER_RETCODES[action]

    def _check_apply_override(self, out=None, suspectid='<>'):
        code, message = out if isinstance(out, tuple) else (out, None)
        override = self.overrideaction
        if override is not None and code is not None and code != override:
            self._logger().warning('%s overrideaction: plugin=%s/msg=%s, override=%s', suspectid,
                                   actioncode_to_string(code), message or '',
                                   actioncode_to_string(override))
            code = override
            message = self.config.get(self.section, 'overridemessage', fallback='').strip() or None
        return (code, message) if message is not None and code is not None else code


class ScannerPlugin(ReturnOverrideMixin, BasicPlugin):
    """A scanner looks at a message and may decide about it.

    Override ``examine(suspect)`` (may be ``async def``): return DUNNO/ACCEPT/DELETE/
    REJECT/DEFER, a tuple (action, message), or None (= DUNNO). Options
    ``overrideaction`` and ``overridemessage`` in the plugin's section replace its
    decision (dry runs). ``_problemcode()`` is the action of option problemaction
    (DEFER when unset or invalid); it is also the decision when ``examine`` raises.
    """

    def examine(self, suspect):
        return DUNNO

    def run_examine(self, suspect):
        return self._check_apply_override(call_plugin(self.examine, suspect), suspectid=suspect.id)

    def _problemcode(self, configoption='problemaction'):
        value = self.config.get(self.section, configoption, fallback=None)
        code = string_to_actioncode(value, self.config) if value is not None else None
        return DEFER if code is None else code

    def _blockreport(self, suspect, blockinfo, enginename=None):
        engine = enginename or str(self)
        if blockinfo is None:
            suspect.tags['blocked'][engine] = False
            return
        suspect.tags['blocked'][engine] = True
        suspect.tags['%s.blocked' % engine] = blockinfo
        suspect.debug('block reason found in message : %s' % (blockinfo,))

    def _spamreport(self, suspect, is_spam, is_highspam, spamreport, spamscore, enginename=None):
        engine = enginename or str(self)
        suspect.tags['spam'][engine] = is_spam
        suspect.tags['highspam'][engine] = is_highspam
        suspect.tags['%s.report' % engine] = spamreport
        suspect.tags['%s.score' % engine] = spamscore


class AsyncScannerPlugin(ScannerPlugin):
    """ScannerPlugin whose examine() and lint() are coroutines."""

    async def examine(self, suspect):
        return DUNNO

    async def run_examine(self, suspect):
        return self._check_apply_override(await self.examine(suspect), suspectid=suspect.id)

    async def lint(self):
        return self.check_config()


class AVScannerPlugin(ScannerPlugin):
    """Base of scanners that ask an antivirus daemon (FuGlu's AVScannerPlugin).

    Subclasses implement ``scan_stream(content, suspectid)`` -> None or {name:
    virus}, and declare the options the helpers read: host, port (number or Unix
    socket path), timeout, maxsize, retries, virusaction, problemaction,
    rejectmessage (template with ${virusname} and ${infectedfile}), optional
    enginename, skip_on_previous_virus, lint_body_eicar. examine() does size check,
    retries, tagging and the verdict."""

    enginename = 'generic-av'
    eicar = ('Date: Mon, 08 Sep 2008 17:33:54 +0200\r\n'
             'To: recipient@unittests.fuglu.org\r\nFrom: sender@unittests.fuglu.org\r\n'
             'Subject: test eicar attachment\r\nMIME-Version: 1.0\r\n'
             'Content-Type: multipart/mixed; boundary="----=_MIME_BOUNDARY_000_12140"\r\n\r\n'
             '------=_MIME_BOUNDARY_000_12140\r\nContent-Type: text/plain\r\n\r\nEicar test\r\n'
             '------=_MIME_BOUNDARY_000_12140\r\nContent-Type: application/octet-stream\r\n'
             'Content-Transfer-Encoding: BASE64\r\nContent-Disposition: attachment\r\n\r\n'
             'UEsDBAoAAAAAAGQ7WyUjS4psRgAAAEYAAAAJAAAAZWljYXIuY29tWDVPIVAlQEFQWzRcUFpYNTQo\r\n'
             'UF4pN0NDKTd9JEVJQ0FSLVNUQU5EQVJELUFOVElWSVJVUy1URVNULUZJTEUhJEgrSCoNClBLAQIU\r\n'
             'AAoAAAAAAGQ7WyUjS4psRgAAAEYAAAAJAAAAAAAAAAEAIAD/gQAAAABlaWNhci5jb21QSwUGAAAA\r\n'
             'AAEAAQA3AAAAbQAAAAAA\r\n\r\n------=_MIME_BOUNDARY_000_12140--\r\n')
    eicar_body = ('Date: Mon, 08 Sep 2008 17:33:54 +0200\r\nTo: recipient@unittests.fuglu.org\r\n'
                  'From: sender@unittests.fuglu.org\r\nSubject: test eicar in body\r\n'
                  'MIME-Version: 1.0\r\n\r\n'
                  'X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*\r\n\r\n')

    def _logger(self):
        return logging.getLogger('fuglu.plugin.%s(%s)' % (self.__class__.__name__,
                                                          self._get_enginename()))

    def scan_stream(self, content, suspectid='(N/A)'):
        self._logger().warning('Unimplemented scan_stream() method')
        return None

    def _get_enginename(self):
        configured = self.config.get(self.section, 'enginename', fallback='') \
            if getattr(self, 'config', None) is not None else ''
        return configured or self.enginename

    def _check_too_big(self, suspect):
        maxsize = self.config.getint(self.section, 'maxsize')
        if suspect.size and suspect.size > maxsize:
            self._logger().info('%s Not scanning - message too big (message %d bytes > config '
                                '%d bytes)',
                                suspect.id, suspect.size, maxsize)
            return True
        return False

    def _virusreport(self, suspect, viruses):
        """Tag the result of a scan; -> (action, message) (DUNNO, None when clean)."""
        engine = self._get_enginename()
        if viruses is None:
            suspect.tags['virus'][engine] = False
            return DUNNO, None
        self._logger().info('%s Virus found in message from %s : %s', suspect.id,
                            suspect.from_address, viruses)
        suspect.tags['virus'][engine] = True
        suspect.tags['%s.virus' % engine] = viruses
        suspect.tags['%s.virus' % self.__class__.__name__] = viruses
        suspect.debug('viruses found in message : %s' % (viruses,))
        action = string_to_actioncode(self.config.get(self.section, 'virusaction'), self.config)
        if action is None:
            action = DEFER
        infected, virusname = next(iter(viruses.items()))
        message = apply_template(self.config.get(self.section, 'rejectmessage'), suspect,
                                 dict(infectedfile=infected, virusname=virusname))
        return action, message

    def lint_eicar(self, scan_function_name='scan_stream'):
        """Scan the EICAR test message; True (and a line) if the engine finds it."""
        body = self.config.getboolean(self.section, 'lint_body_eicar', fallback=False)
        try:
            result = call_plugin(getattr(self, scan_function_name),
                                 force_bString(self.eicar_body if body else self.eicar))
        except Exception as error:
            print('ERROR in %s: %s: %s' % (scan_function_name, error.__class__.__name__, error))
            return False
        if result is None:
            print('EICAR Test virus not found!')
            return False
        where = 'body' if body else 'zip attachment'
        print('%s testing eicar in %s: found virus %s' % (self, where, result))
        return True

    def _skip_on_previous_virus(self, suspect):
        """'' to scan, else why this scan is skipped (option skip_on_previous_virus:
        none, all, or a list of engine names)."""
        skiplist = self.config.get(self.section, 'skip_on_previous_virus', fallback='none')
        if skiplist.strip().lower() == 'none':
            return ''
        if skiplist.strip().lower() == 'all':
            return "Message is virus and skiplist is 'all' -> skip!" if suspect.is_virus() else ''
        for engine in parse_list(skiplist):
            if suspect.tags['virus'].get(engine):
                return 'Scanner %s has already tagged message as virus -> skip' % engine
        return ''

    def lintinfo_skip(self):
        skiplist = self.config.get(self.section, 'skip_on_previous_virus', fallback='none')
        if skiplist.strip().lower() == 'none':
            print('%s will always scan, even if message is already marked as virus'
                  % self.enginename)
        elif skiplist.strip().lower() == 'all':
            print('%s will skip scan if message is already marked as virus' % self.enginename)
        else:
            print('%s will skip scan if message is already marked as virus by: %s'
                  % (self.enginename, ','.join(parse_list(skiplist))))
        return True

    def examine(self, suspect):
        if self._check_too_big(suspect):
            return DUNNO
        content = suspect.get_source()
        retries = self.config.getint(self.section, 'retries')
        for attempt in range(retries):
            try:
                return self._virusreport(suspect, call_plugin(self.scan_stream, content,
                                                              suspect.id))
            except Exception as error:
                self._logger().warning('%s Error encountered while contacting %s server '
                                       '(try %d of %d): %s: %s',
                                       suspect.id, self.enginename, attempt + 1, retries,
                                       error.__class__.__name__, error)
        self._logger().error('%s %s scan failed after %d retries', suspect.id, self.enginename,
                             retries)
        return self._problemcode()

    def __init_socket__(self):
        """A connected socket to the daemon: option port is a TCP port on host, or the
        path of a Unix socket."""
        target = self.config.get(self.section, 'port')
        timeout = self.config.getfloat(self.section, 'timeout')
        if not target.strip().isdigit():
            if not os.path.exists(target):
                raise Exception('unix socket %s not found' % target)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(target)
            except OSError as error:
                sock.close()
                raise Exception('Could not reach %s server using unix socket %s due to %s'
                                % (self.enginename, target, error))
            return sock
        host = self.config.get(self.section, 'host', resolve_env=True)
        try:
            return socket.create_connection((host, int(target)), timeout)
        except OSError as error:
            raise Exception('Could not reach %s server using network (%s, %s) due to %s'
                            % (self.enginename, host, target, error))

    def _close_socket(self, sock):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError as error:
            self._logger().warning('%s Error terminating connection: %s', self.enginename, error)
        finally:
            sock.close()


class AsyncAVScannerPlugin(AVScannerPlugin, AsyncScannerPlugin):
    """AVScannerPlugin whose scan_stream(), examine() and lint() are coroutines."""

    async def scan_stream(self, content, suspectid='(N/A)'):
        raise NotImplementedError()

    async def examine(self, suspect):
        return AVScannerPlugin.examine(self, suspect)

    async def run_examine(self, suspect):
        return self._check_apply_override(await self.examine(suspect), suspectid=suspect.id)

    async def lint(self):
        return self.check_config()

    async def lint_eicar(self, scan_function_name='scan_stream'):
        return AVScannerPlugin.lint_eicar(self, scan_function_name)


class PrependerPlugin(BasicPlugin):
    """Runs before the scanners. Override ``pluginlist(suspect, pluginlist)`` and/or
    ``appenderlist(suspect, appenderlist)`` (may be ``async def``): return a new list
    to replace the scanners or appenders for this message, or None to keep them."""

    def pluginlist(self, suspect, pluginlist):
        return None

    def appenderlist(self, suspect, appenderlist):
        return None


class AsyncPrependerPlugin(PrependerPlugin):
    async def pluginlist(self, suspect, pluginlist):
        return None

    async def appenderlist(self, suspect, appenderlist):
        return None

    async def lint(self):
        return self.check_config()


class AppenderPlugin(BasicPlugin):
    """Runs after the message was delivered or refused (not when it was deferred).
    Override ``process(suspect, decision)`` (may be ``async def``); the return value
    is ignored."""

    def process(self, suspect, decision):
        pass


class AsyncAppenderPlugin(AppenderPlugin):
    async def process(self, suspect, decision):
        pass

    async def lint(self):
        return self.check_config()


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


class PluginLoadError(FugluError):
    """A plugin named in the configuration cannot be imported or created."""


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


def fuglu_home():
    """Where fuglu's own files are: the .pyz (a zipapp) or the source folder."""
    return os.path.dirname(os.path.abspath(__file__))


def _zipapp_archive():
    loader = globals().get('__loader__')
    return getattr(loader, 'archive', None)


def bundled_conf_files():
    """Names of the sample files shipped with fuglu, relative to its conf/ folder
    (rules, templates, rule files, logging.conf, fuglu.service), plus fuglu.conf.dist."""
    names = []
    archive = _zipapp_archive()
    if archive:
        import zipfile
        with zipfile.ZipFile(archive) as bundle:
            names = [name[len('conf/'):] for name in bundle.namelist()
                     if name.startswith('conf/') and not name.endswith('/')]
    else:
        root = os.path.join(fuglu_home(), 'conf')
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d != '__pycache__']
            names += [os.path.relpath(os.path.join(folder, name), root).replace(os.sep, '/')
                      for name in files if not name.startswith('.')]
    return sorted(names) + ['fuglu.conf.dist']


def read_bundled_conf(relative_path):
    """A file of fuglu's own conf/ folder (or fuglu.conf.dist) as bytes, from the
    zipapp or the source tree; None when there is no such file."""
    inside = relative_path if relative_path == 'fuglu.conf.dist' else 'conf/' + relative_path
    archive = _zipapp_archive()
    if archive:   # zipimport: the loader reads any file of its archive
        try:
            return globals()['__loader__'].get_data(os.path.join(archive, inside))
        except OSError:
            return None
    try:
        with open(os.path.join(fuglu_home(), *inside.split('/')), 'rb') as handle:
            return handle.read()
    except OSError:
        return None


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
    except NotInThisBuild as error:
        raise PluginLoadError(str(error))
    except Exception as error:
        raise PluginLoadError('cannot import %s for plugin %s: %s: %s'
                              % (module_name, name, error.__class__.__name__, error))
    try:
        return getattr(module, class_name)
    except AttributeError:
        if module_name.startswith('fuglu.plugins.'):
            raise PluginLoadError('%s is a plugin of FuGlu 1.7 that is not part of this build'
                                  % target)
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
    """Process-wide counters: control `stats`, the Prometheus metrics, MRTG files.

    Connectors and the scan session call ``received()``, ``begin(session, suspect)`` /
    ``end(session)`` around a message (a session that vanishes without end() stops
    counting as in flight), ``plugin_time(stage, plugin, seconds)``, ``plugin_error``,
    ``verdict(action)`` and ``finished(suspect, delivered, scantime)`` (which counts
    with ``count_finished(delivered, spam, virus, blocked, scantime)``: what the
    process backend's parent replays for its workers)."""

    def __init__(self):
        import weakref
        self.lock = threading.Lock()
        self.starttime = time.time()
        self.incount = self.outcount = 0
        self.spamcount = self.viruscount = self.blockedcount = self.hamcount = 0
        self.scantimes = []
        self.verdicts = dict.fromkeys(ALLCODES, 0)      # action name -> messages
        self.plugin_times = {}                          # (stage, plugin) -> [runs, seconds]
        self.plugin_errors = {}                         # plugin -> errors
        self.errors = 0                                 # every recorded exception
        self.in_flight = weakref.WeakSet()              # scan sessions not finished yet

    def received(self):
        with self.lock:
            self.incount += 1

    def begin(self, session, suspect=None):
        with self.lock:
            self.in_flight.add(session)

    def end(self, session):
        with self.lock:
            self.in_flight.discard(session)

    def plugin_time(self, stage, plugin, seconds):
        with self.lock:
            entry = self.plugin_times.setdefault((stage, str(plugin)), [0, 0.0])
            entry[0] += 1
            entry[1] += seconds

    def plugin_error(self, plugin):
        with self.lock:
            self.plugin_errors[str(plugin)] = self.plugin_errors.get(str(plugin), 0) + 1

    def error(self):
        with self.lock:
            self.errors += 1

    def verdict(self, action):
        with self.lock:
            name = actioncode_to_string(action)
            self.verdicts[name] = self.verdicts.get(name, 0) + 1

    def finished(self, suspect, delivered, scantime):
        self.count_finished(bool(delivered), suspect.is_spam(), suspect.is_virus(),
                            suspect.is_blocked(), scantime)

    def count_finished(self, delivered, spam, virus, blocked, scantime):
        with self.lock:
            if delivered:
                self.outcount += 1
            if spam:
                self.spamcount += 1
            if virus:
                self.viruscount += 1
            if blocked:
                self.blockedcount += 1
            if not spam and not virus:
                self.hamcount += 1
            self.scantimes = (self.scantimes + [(time.time(), scantime)])[-100:]

    def average_scantime(self):
        """Average of the last 100 scan times; 0 when none in the last 5 minutes."""
        with self.lock:
            recent = [t for stamp, t in self.scantimes if stamp > time.time() - 300]
        return sum(recent) / len(recent) if recent else 0

    def report(self):
        average = self.average_scantime()
        with self.lock:
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


# control characters (a line break would start a new reply line, a NUL ends a milter string)
REPLY_UNPRINTABLE_RE = re.compile(r'[\x00-\x1f\x7f]+')
# a reply text at most: with "550 5.7.1 " and CRLF a reply line stays within 512 octets
# (RFC 5321 4.5.3.1.5)
REPLY_MAX_CHARS = 500


class ProtocolHandler(object):
    """What a connector's session implements to have a message scanned and answered:
    the scan session drives (``ScanSession.handle``), the protocol answers (the shape
    of FuGlu's ProtocolHandler). The flow is the same for every connector:

        suspect = make_suspect(...)     InvalidAddress: address_compliance_fail_action
        verdict = before_scan(suspect), or else the scanners' verdict
        DUNNO, ACCEPT -> commitback(suspect)    DELETE -> discard(text)
        REJECT -> reject(text)                  DEFER  -> defer(text)
        any exception on the way -> defer('internal problem ...', '4.3.0')
        then the message is finished: counters, and the appenders if it was delivered

    No mail is lost as long as a peer hears "accepted" only from commitback(), and
    commitback() returns True only once the message is safe with the next hop (the
    downstream's 250, the MTA keeping its own copy, the script holding the output).

    Methods that must be overridden:
        make_suspect(*args) -> Suspect    the received message (``args`` are those
                                          given to ScanSession.handle)
        commitback(suspect) -> bool       pass the message on and tell the peer; True
                                          when the message was delivered
        discard(text) -> bool             accept and drop
        reject(text, status) -> bool      permanent refusal
        defer(text, status) -> bool       temporary refusal: the peer tries again
    Each answer returns False when the peer was gone, and never raises for that.
    ``status`` is an RFC 3463 code ('5.7.1', '4.7.1' by default) for the protocols
    that carry one; a text that starts with a code of the same class keeps its own.

    Methods that may be overridden:
        before_scan(suspect) -> (action, message)  a verdict that replaces the scan
                                                   (the milter's eob plugins); the
                                                   default, (DUNNO, None), scans
        peer_label() -> str                        who is talking, for log lines

    Attributes the flow reads: connector (its ``protocol`` goes into log lines), peer
    ((address, port) of the connection).
    """

    connector = None
    peer = ('unknown', 0)

    def make_suspect(self, *args):
        raise NotImplementedError

    def commitback(self, suspect):
        raise NotImplementedError

    def discard(self, text):
        raise NotImplementedError

    def reject(self, text, status='5.7.1'):
        raise NotImplementedError

    def defer(self, text, status='4.7.1'):
        raise NotImplementedError

    def before_scan(self, suspect):
        return DUNNO, None

    def peer_label(self):
        return 'unknown'


class ScanSession(object):
    """Runs one message through the plugins and finishes it afterwards.

    For connectors: ``handle(protocol, *args)`` is the whole flow for one message
    (see ProtocolHandler). Its steps, for tools that scan without a protocol:
    ``scan(suspect)`` -> (action, message) runs prependers, scanners, adds fuglu's
    headers and logs; ``reply_text(suspect, action, message)`` the text for a
    refusal; ``finish(suspect, action, delivered)`` updates counters, writes the
    trash copy and runs the appenders once the peer has its answer.
    """

    # the answer to a message whose processing failed (with the message id, if any)
    INTERNAL_PROBLEM = 'internal problem - message deferred'

    def __init__(self, controller):
        self.controller = controller
        self.config = controller.config
        self.logger = logging.getLogger('fuglu.SessionHandler')
        self.started = time.time()
        self.timings = []   # (stage, plugin, seconds): main.scantimelogger, metrics

    def handle(self, protocol, *args):
        """Make the message (``protocol.make_suspect(*args)``), scan it, answer through
        ``protocol``, turn any failure into a temporary one, finish the message.
        Returns (suspect, action), or (None, action) for a refused envelope."""
        try:
            suspect = protocol.make_suspect(*args)
        except InvalidAddress as error:
            return None, self.refuse_envelope(protocol, error)
        except Exception:
            self.failed(protocol, None)
            return None, DEFER
        self.logger.info('%s queueid=%s from=%s, nrec=%d, size=%d, client=%s (%s from %s:%s)',
                         suspect.id, suspect.queue_id, suspect.from_address or '<>',
                         len(suspect.recipients), suspect.size,
                         suspect.clientinfo[1] if suspect.clientinfo else 'unknown',
                         protocol.connector.protocol, *protocol.peer[:2])
        action, delivered = DEFER, False
        try:
            try:
                action, message = protocol.before_scan(suspect)
                if action == DUNNO:
                    action, message = self.scan(suspect)
                if action in (DUNNO, ACCEPT):
                    delivered = protocol.commitback(suspect)
                else:
                    self.refusal(protocol, action)(self.reply_text(suspect, action, message))
            except Exception:
                action, delivered = DEFER, False
                self.failed(protocol, suspect)
        finally:
            self.finish(suspect, action, delivered)
        return suspect, action

    def failed(self, protocol, suspect):
        """The exception being handled ends the message: logged, counted, deferred."""
        trace = traceback.format_exc()
        name = suspect.id if suspect is not None else protocol.peer_label()
        self.logger.error('%s: processing failed, deferring: %s', name, trace)
        self.controller.record_exception(trace)
        text = self.INTERNAL_PROBLEM
        if suspect is not None:
            text += ' (%s)' % suspect.id
        protocol.defer(text, '4.3.0')

    @staticmethod
    def refusal(protocol, action):
        """The answer of ``protocol`` for DELETE, REJECT or DEFER."""
        return {DELETE: protocol.discard, REJECT: protocol.reject}.get(action, protocol.defer)

    # [main] address_compliance_fail_action -> the answer (FuGlu: anything else defers)
    COMPLIANCE_ACTIONS = {'defer': DEFER, 'reject': REJECT, 'discard': DELETE}

    def refuse_envelope(self, protocol, error):
        """Answer an envelope the address check refused as
        address_compliance_fail_action says; returns the action."""
        config = self.config
        name = config.get('main', 'address_compliance_fail_action').strip().lower()
        action = self.COMPLIANCE_ACTIONS.get(name, DEFER)
        self.logger.warning('%s: %s, %s', protocol.peer_label(), error,
                            actioncode_to_string(action))
        self.refusal(protocol, action)(one_line(config.get('main',
                                                           'address_compliance_fail_message')))
        return action

    def _timed(self, stage, plugin, call, *args):
        """``call(*args)``, its duration counted for ``plugin``."""
        started = time.time()
        try:
            return call_plugin(call, *args)
        finally:
            elapsed = time.time() - started
            self.timings.append((stage, plugin, elapsed))
            self.controller.stats.plugin_time(stage, plugin, elapsed)

    def scan(self, suspect):
        controller = self.controller
        config = self.config
        controller.stats.received()
        suspect.tempdir = config.get('main', 'tempdir')
        controller.stats.begin(self, suspect)
        self.started = time.time()
        if len(suspect.recipients) != 1:
            self.logger.debug('%s has %d recipients', suspect.id, len(suspect.recipients))
        scanners = list(controller.plugins)
        appenders = list(controller.appenders)
        suspect.tags['appenders'] = appenders
        for prepender in controller.prependers:
            if suspect.tags.get('skip_prependers'):
                break
            try:
                result = self._timed('prepender', prepender, prepender.pluginlist, suspect,
                                     scanners)
                if result is not None:
                    self._log_list_change(suspect, prepender, 'scanners', scanners, result)
                    scanners = list(result)
                result = self._timed('prepender', prepender, prepender.appenderlist, suspect,
                                     appenders)
                if result is not None:
                    self._log_list_change(suspect, prepender, 'appenders', appenders, result)
                    appenders = list(result)
                    suspect.tags['appenders'] = appenders
            except Exception as error:
                self._plugin_error(suspect, prepender, error)

        action, message = DUNNO, None
        scan_start = time.time()
        for plugin in scanners:
            try:
                result = self._timed('scanner', plugin, plugin.examine, suspect)
            except RuntimeConfigError as error:
                # no wrong policy: without its per-recipient settings the message waits
                # (the database outage itself is logged once, by the database)
                self.logger.debug('%s: plugin %s: no runtime config: %s', suspect.id, plugin, error)
                suspect.tags['processingerrors'].append('plugin %s: runtime config: %s'
                                                        % (plugin, error))
                action, message = DEFER, 'per-recipient settings unavailable, try again later'
                break
            except Exception as error:
                # A bound that was hit, or a crash (say on bytes nobody expected), is a
                # problem, never a clean result: FuGlu goes on unscanned (fails open).
                self._plugin_error(suspect, plugin, error)
                reason = ('message too complex to check' if isinstance(error, LimitExceeded)
                          else 'message could not be checked')
                result = (getattr(plugin, '_problemaction', lambda: DEFER)(),
                          '%s (%s)' % (reason, error.__class__.__name__))
            code, text = result if isinstance(result, tuple) else (result, None)
            if code is None:
                code = DUNNO
            code, text = self._override(plugin, code, text, suspect)
            suspect.tags['scantimes'].append((plugin.section, self.timings[-1][2]))
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
        new_text = apply_template(new_text, suspect, limit=REPLY_MAX_CHARS) if new_text else text
        self.logger.warning('%s: plugin %s said %s, overridden to %s', suspect.id, plugin,
                            actioncode_to_string(code), actioncode_to_string(override))
        return override, new_text

    def _plugin_error(self, suspect, plugin, error):
        trace = traceback.format_exc()
        self.logger.error('%s: plugin %s failed: %s: %s', suspect.id, plugin,
                          error.__class__.__name__, error)
        self.logger.debug(trace)
        suspect.tags['processingerrors'].append('plugin %s: %s: %s'
                                                % (plugin, error.__class__.__name__, error))
        self.controller.stats.plugin_error(plugin)
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
        trashdir = shared_directory(trashdir, 'trash')
        try:
            dir_fd = open_directory(trashdir, create_mode=0o700, check_mode=False)
            try:
                name = '%s.eml' % suspect.id
                write_file_at(dir_fd, name, suspect.source_parts())
                if self.config.getboolean('main', 'trashlog'):
                    with append_file_at(dir_fd, '00-fuglutrash.log') as log:
                        log.write(('%s %s %s %s %s\n' % (
                            time.strftime('%Y-%m-%dT%H:%M:%SZ',
                                          time.gmtime()), suspect.from_address or '<>',
                            suspect.to_address, plugin, os.path.join(trashdir,
                                                                     name))).encode('utf-8',
                                                                                    'replace'))
            finally:
                os.close(dir_fd)
        except OSError as error:
            self.logger.error('%s: could not write trash copy: %s', suspect.id, error)

    def reply_text(self, suspect, action, message):
        """Text of a DELETE/REJECT/DEFER reply: the plugin's message as it is, or the
        default, with the id appended when suspectidreturn is on. The message is data,
        not a template: plugins fill their configured texts themselves (as in FuGlu),
        and what they put in (a file or virus name, a subject) comes from the sender.
        One line of printable text that, with the id, leaves room for the codes."""
        defaults = {DELETE: 'OK', REJECT: 'Rejected by content scanner', DEFER: 'Try again later'}
        text = force_uString(message) if message else defaults.get(action, '')
        text = REPLY_UNPRINTABLE_RE.sub(' ', text).strip()
        if self.config.getboolean('main', 'suspectidreturn') and suspect.id not in text:
            text = '%s (%s)' % (text[:REPLY_MAX_CHARS - 3 - len(suspect.id)], suspect.id)
        return one_line(text, REPLY_MAX_CHARS)

    def finish(self, suspect, action, delivered):
        """After the MTA has its answer: counters, appenders (not for deferred mail);
        then the message's temporary file (suspect.tempfile) is removed."""
        try:
            self._finish(suspect, action, delivered)
        finally:
            suspect.cleanup()

    def _finish(self, suspect, action, delivered):
        stats = self.controller.stats
        try:
            if action == DEFER or (action in (DUNNO, ACCEPT) and not delivered):
                self.logger.info('DEFERRED %s', suspect.id)
                stats.verdict(DEFER)
                return
            stats.verdict(action)
            if action == DELETE:
                self.logger.info('MESSAGE DELETED: %s', suspect.id)
            scantime = float(suspect.tags.get('fuglu.scantime', 0))
            stats.finished(suspect, delivered, scantime)
            if suspect.tags.get('noappenders'):
                return
            for appender in suspect.tags.get('appenders', self.controller.appenders):
                try:
                    self._timed('appender', appender, appender.process, suspect, action)
                except Exception as error:
                    self._plugin_error(suspect, appender, error)
        finally:
            stats.end(self)
            if self.config.getboolean('main', 'scantimelogger'):
                self.log_timings(suspect)

    # FuGlu's stage labels in the fuglu.Timings lines
    TIMING_LABELS = {'prepender': 'PRE', 'scanner': 'PLG', 'appender': 'APP'}
    SLOW_PLUGIN_SECONDS = 1.0

    def log_timings(self, suspect):
        """main.scantimelogger: FuGlu's per-message timing lines on the logger
        fuglu.Timings (INFO; a plugin step of a second or more also as a WARNING)."""
        timings_logger = logging.getLogger('fuglu.Timings')
        prefix = 'port: %s, id: %s,' % (suspect.tags.get('incomingport', -1), suspect.id)
        total = time.time() - self.started
        in_plugins = sum(seconds for _stage, _plugin, seconds in self.timings)
        timings_logger.info('%s total: %.6f', prefix, total)
        timings_logger.info('%s overhead: %.3f', prefix, max(total - in_plugins, 0.0))
        for stage, plugin, seconds in self.timings:
            timings_logger.info('%s (%s) %s: %.3f', prefix, self.TIMING_LABELS[stage], plugin,
                                seconds)
            if seconds >= self.SLOW_PLUGIN_SECONDS:
                timings_logger.warning('%s slow plugin step: %s took %.1fs - this blocks the '
                                       'worker',
                                       prefix, plugin, seconds)


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
DATA_BLOCK_SIZE = 262144   # whole lines leave the read buffer for the message in blocks this big


class ConnectionClosed(FugluError):
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
        connection = socket.create_connection((resolve_env_marker(host.strip()), int(port)),
                                              timeout)
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


class LineTooLong(FugluError):
    """A command or data line longer than the limit the reader was given."""


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

    def read_data(self, max_size, line_limit, message=None):
        """Message bytes after DATA, unstuffed, terminator removed, written to
        ``message`` (a MessageWriter: memory up to its threshold, then a spool file) as
        they arrive, so the message exists once (RFC 5321 4.5.2 unstuffing and the line
        check are done per block of whole lines). Returns (message.finish(), None) or
        (None, problem) where problem is 'size', 'line' or 'spool' (the spool file could
        not be written) after the rest of the data was read and thrown away. Raises
        ConnectionClosed when the peer leaves before CRLF.CRLF (the message is
        discarded). Only CRLF.CRLF ends the data: LF.LF, CR.CR and friends are message
        content (no SMTP smuggling)."""
        message = MessageWriter() if message is None else message
        try:
            problem = self._read_data_into(message, max_size, line_limit)
            if problem is None and max_size and message.size > max_size:
                problem = 'size'
        except BaseException:
            message.discard()
            raise
        if problem is not None:
            message.discard()
            return None, problem
        return message.finish(), None

    def _read_data_into(self, message, max_size, line_limit):
        buffer = self.buffer
        # The buffer starts at the start of a line: blocks of whole lines leave it
        # (_write_lines); the terminator is CRLF.CRLF inside it, or ".\r\n" at its start.
        search_from = 0
        line_start = 0      # where the last line still in the buffer starts
        while True:
            if buffer.startswith(b'.\r\n'):
                del buffer[:3]
                return None
            end = buffer.find(DATA_END, search_from)
            if end >= 0:
                problem = self._write_lines(message, end + 2, line_limit)
                if problem is not None:
                    return self._discard_data(problem)
                del buffer[:3]
                return None
            last = buffer.rfind(CRLF, max(search_from - 1, 0))
            if last >= 0:
                line_start = last + 2
            problem = None
            if line_limit and len(buffer) - line_start > line_limit:
                problem = 'line'
            elif max_size and message.size + len(buffer) > max_size + max_size // 100 + 1024:
                problem = 'size'
            elif line_start >= DATA_BLOCK_SIZE:
                problem = self._write_lines(message, line_start, line_limit)
                line_start = 0
            if problem is not None:
                return self._discard_data(problem)
            search_from = max(len(buffer) - 4, 0)
            self._fill(DATA_READ_SIZE)

    def _write_lines(self, message, length, line_limit):
        """The first ``length`` bytes of the buffer (whole lines) leave it, unstuffed,
        into ``message``. Returns a problem ('line', 'spool') or None."""
        with memoryview(self.buffer) as view:
            block = bytes(view[:length])
        del self.buffer[:length]
        if line_limit and len(block) > line_limit and \
                max(map(len, block.split(CRLF))) > line_limit:
            return 'line'
        if block.startswith(b'.') or b'\r\n.' in block:
            block = (CRLF + block).replace(b'\r\n.', CRLF)[2:]
        try:
            message.write(block)
        except OSError as error:
            logging.getLogger('fuglu.spool').error('cannot spool a message: %s', error)
            return 'spool'
        return None

    def _discard_data(self, problem):
        """Read on to the terminator without keeping anything; returns ``problem``."""
        buffer = self.buffer
        buffer[:0] = CRLF   # the buffer starts at a line start: ".\r\n" there ends the data
        while True:
            end = buffer.find(DATA_END)
            if end >= 0:
                del buffer[:end + 5]
                return problem
            del buffer[:-4]
            self._fill(DATA_READ_SIZE)


def dot_stuff_parts(parts):
    """Message parts (joined, they are the message: bytes, and FileSections of a spool
    file) -> the parts to send after DATA, terminator included. Without lines to stuff
    (the usual case) the parts are sent as they are, without copying the message;
    otherwise they are stuffed block by block as they are sent (a generator that reads
    a spool file as it goes)."""
    parts = [part for part in parts if len(part)]
    if any(part.spool.has_dot_lines if isinstance(part, FileSection) else
           part.startswith(b'.') or b'\n.' in part for part in parts):
        stuffed = _stuffed_blocks(parts)
    else:
        stuffed = list(parts)
    ending = [b'.\r\n']
    if not parts or _part_tail(parts[-1], 2) != CRLF:
        ending.insert(0, CRLF)
    return itertools.chain(stuffed, ending) if not isinstance(stuffed, list) else stuffed + ending


def _part_tail(part, length):
    if isinstance(part, FileSection):
        return part.spool.read(max(part.end - length, part.start), part.end)
    return bytes(part[-length:])


def _stuffed_blocks(parts):
    """The parts with a '.' added before every line that starts with one (RFC 5321
    4.5.2), in blocks of at most SPOOL_CHUNK_SIZE bytes for spool file sections."""
    at_line_start = True
    for part in parts:
        blocks = (part.spool.chunks(part.start, part.end) if isinstance(part, FileSection)
                  else (part,))
        for block in blocks:
            if not block:
                continue
            if at_line_start and block[:1] == b'.':
                yield b'.'
            yield block.replace(b'\n.', b'\n..')
            at_line_start = block[-1:] == b'\n'


def part_chunks(parts, size):
    """The bytes of message parts (bytes-like, FileSections of a spool file) in order,
    as pieces of at most ``size`` bytes: views of the parts, blocks read from the file."""
    for part in parts:
        blocks = (part.spool.chunks(part.start, part.end) if isinstance(part, FileSection)
                  else (part,))
        for block in blocks:
            view = memoryview(block)
            for start in range(0, len(view), size):
                yield view[start:start + size]


def send_parts(sock, parts, deadline=None):
    """sendall for parts of a message: bytes-like parts are gathered by sendmsg (no
    joining copy), FileSections of a spool file go by sendfile. ``parts`` may be any
    iterable; ``deadline`` (time.monotonic()) is checked between sends. Empty parts are
    left out: sendmsg() of nothing but them sends 0 bytes for ever. Raises OSError."""
    pending = []

    def flush():
        views = [memoryview(part) for part in pending]
        del pending[:]
        while views:
            if deadline is not None and time.monotonic() > deadline:
                raise socket.timeout('deadline')
            sent = sock.sendmsg(views[:64])
            while sent:
                if sent >= len(views[0]):
                    sent -= len(views.pop(0))
                else:
                    views[0] = views[0][sent:]
                    sent = 0
    for part in parts:
        if not len(part):
            continue
        if isinstance(part, FileSection):
            flush()
            if deadline is not None and time.monotonic() > deadline:
                raise socket.timeout('deadline')
            part.spool.send(sock, part.start, part.end)
            continue
        pending.append(part)
        if len(pending) >= 64:
            flush()
    flush()


class SMTPError(FugluError):
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
                   timeout=config.getfloat('main', 'downstream_reply_timeout'),
                   connect_timeout=config.getfloat('main', 'downstream_connect_timeout'),
                   data_timeout=config.getfloat('main', 'downstream_data_timeout'))

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
            raise SMTPError(451, '4.4.1 downstream %s:%s unavailable: %s'
                            % (self.host, self.port, last_error), True)
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
            raise SMTPError(451, '4.4.2 downstream %s:%s connection lost' % (self.host, self.port),
                            True)
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
            raise SMTPError(451, '4.4.2 downstream %s:%s connection lost: %s'
                            % (self.host, self.port, error), True)
        except LineTooLong:
            self.close()
            raise SMTPError(451, '4.4.2 downstream reply line too long', True)

    def _send(self, data):
        if self.sock is None:   # closed after an earlier failure
            raise SMTPError(451, '4.4.2 downstream %s:%s connection lost' % (self.host, self.port),
                            True)
        try:
            self.sock.sendall(data)
        except OSError as error:
            self.close()
            raise SMTPError(451, '4.4.2 downstream %s:%s connection lost: %s'
                            % (self.host, self.port, error), True)

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
        """Send the message (bytes, or a list of parts: bytes and FileSections of a
        spool file, see send_parts); returns (code, text) of the final reply. With
        ``chunking`` and a server offering CHUNKING (RFC 3030) it goes as one BDAT LAST
        chunk: no waiting for 354, no dot-stuffing; else DATA."""
        parts = message if isinstance(message, list) else [message]
        if chunking and 'CHUNKING' in self.extensions:
            size = sum(len(part) for part in parts)
            self._send_parts([('BDAT %d LAST\r\n' % size).encode('ascii')] + parts)
            code, lines = self._reply(self.data_timeout)
            return code, ' '.join(lines)
        code, lines = self.command('DATA')
        if code != 354:
            return code, ' '.join(lines)
        self._send_parts(dot_stuff_parts(parts))
        code, lines = self._reply(self.data_timeout)
        return code, ' '.join(lines)

    def _send_parts(self, parts):
        try:
            send_parts(self.sock, parts, self.deadline)
        except OSError as error:
            self.close()
            raise SMTPError(451, '4.4.2 downstream %s:%s connection lost: %s'
                            % (self.host, self.port, error), True)

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
            stale = [client for parked, client in self.idle
                     if everything or now - parked > self.max_idle]
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


def send_bounce(config, suspect, recipient, message_bytes, sender=''):
    """Deliver a generated message (a bounce) with the null sender (or ``sender``) to
    bouncehost:bounceport. Returns the downstream queue id, or None when bounces are
    off for this message or recipient. Raises SMTPError on delivery failure."""
    logger = logging.getLogger('fuglu.bouncer')
    if suspect is not None and suspect.tags.get('nobounce'):
        logger.info('%s: no bounce (tag nobounce)', suspect.id)
        return None
    if not sender and config.getboolean('main', 'disablebounces'):
        logger.info('%s: no bounce (disablebounces)', suspect.id if suspect else '-')
        return None
    domain = split_address(recipient)[1].lower()
    nobouncefile = config.get('main', 'nobouncefile')
    try:
        with open(nobouncefile) as handle:
            if domain in {line.strip().lower() for line in handle
                          if line.strip() and not line.startswith('#')}:
                logger.info('no bounce to %s (listed in %s)', recipient, nobouncefile)
                return None
    except OSError:
        pass
    host, port = outgoing_target(config, bounce=True)
    client = SMTPClient.from_config(config, host, port, outgoing_helo(config))
    client.connect()
    try:
        client.ehlo()
        for line, expected in (('MAIL FROM:<%s>' % sender, 250), ('RCPT TO:<%s>' % recipient, 250)):
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


def queueid_from_postfixreply(logline):
    """The queue id in a Postfix '250 2.0.0 Ok: queued as ...' reply, or None."""
    match = QUEUE_ID_RE.search(force_uString(logline) or '')
    return match.group(1) if match else None


class Bounce(object):
    """FuGlu's bouncer for plugins: ``send_template_file(recipient, templatefile,
    suspect, values)`` / ``send_template_string(...)`` fill a template (apply_template)
    and send it with the null sender; ``send(fromaddress, toaddress, message)`` sends
    a complete message. All go through send_bounce (bouncehost, disablebounces,
    nobouncefile, tag nobounce) and return the downstream queue id or None."""

    def __init__(self, config):
        self.config = config
        self.logger = logging.getLogger('fuglu.bouncer')
        self.nobounce = None

    def _add_required_headers(self, recipient, messagecontent):
        import email
        import email.utils
        message = email.message_from_string(messagecontent)
        message.set_charset('utf-8')
        defaults = (('To', recipient),
                    ('From', 'MAILER-DAEMON@%s' % get_outgoing_helo(self.config)),
                    ('Auto-Submitted', 'auto-generated'),
                    ('Date', email.utils.formatdate(localtime=True)),
                    ('Message-ID', email.utils.make_msgid()))
        for name, value in defaults:
            if name not in message:
                message[name] = value
        return message.as_string()

    def send_template_file(self, recipient, templatefile, suspect, values):
        if not os.path.exists(templatefile):
            self.logger.error('%s Template file does not exist: %s', suspect.id, templatefile)
            return None
        with open(templatefile, encoding='utf-8', errors='replace') as handle:
            return self.send_template_string(recipient, handle.read(), suspect, values)

    def send_template_string(self, recipient, templatecontent, suspect, values):
        if suspect.get_tag('nobounce'):
            self.logger.info('%s Not sending bounce to %s - bounces disabled by plugin',
                             suspect.id, recipient)
            return None
        message = apply_template(templatecontent, suspect, values)
        try:
            message = self._add_required_headers(recipient, message)
        except Exception as error:   # a broken template is still sent as written
            self.logger.warning('%s Bounce message template could not be verified: %s', suspect.id,
                                error)
        return self.send('<>', recipient, message)

    def _get_targethost(self):
        return outgoing_target(self.config, bounce=True)[0]

    def _get_targetport(self):
        return outgoing_target(self.config, bounce=True)[1]

    def send(self, fromaddress, toaddress, message):
        sender = '' if fromaddress in (None, '', '<>') else strip_address(fromaddress)
        message = force_bString(message).replace(b'\r\n', b'\n').replace(b'\n', b'\r\n')
        return send_bounce(self.config, None, toaddress, message, sender=sender)

    @deprecated
    def _send(self, fromaddress, toaddress, message):
        self.send(fromaddress, toaddress, message)

    def lint(self):
        try:
            host, port = outgoing_target(self.config, bounce=True)
        except Exception as error:
            print('ERROR: failed to initialise bouncer: %s' % error)
            return False
        print('INFO: config checked: targethost=%s port=%s helo=%s' % (host, port,
                                                                       outgoing_helo(self.config)))
        return True


class HeloSingleton(object):
    """FuGlu's holder of the outgoing EHLO name: outgoinghelo(config)."""

    @classmethod
    def outgoinghelo(cls, config):
        return get_outgoing_helo(config)


def get_outgoing_helo(config=None):
    """FuGlu's name: the EHLO name for outgoing mail (this host's FQDN without a
    config)."""
    if config is None:
        return sys.modules[__name__].HOSTNAME.lower()
    return outgoing_helo(config)


# Envelope address checks (FuGlu's address_compliance_checker)
def address_is_valid(address, checker='Default', maxsize=64):
    if checker == 'NoCheck':
        return True
    if address.lower() == 'postmaster':
        return True
    local, sep, domain = address.rpartition('@')
    if checker in ('AsciiOnly', 'PrintableAsciiOnly'):
        allowed = ((lambda c: 32 < ord(c) < 127) if checker == 'PrintableAsciiOnly'
                   else (lambda c: ord(c) < 128))
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


class Addrcheck(object):
    """The process-wide envelope address check (FuGlu's singleton): ``set(name,
    maxsize)`` picks Default, LazyLocalPart, AsciiOnly, PrintableAsciiOnly or NoCheck
    (the daemon sets [main] address_compliance_checker at start-up); ``valid(address,
    allow_postmaster=False)``. Suspect() refuses addresses it finds invalid."""

    CHECKERS = ('Default', 'LazyLocalPart', 'AsciiOnly', 'PrintableAsciiOnly', 'NoCheck')
    _instance = None

    def __new__(cls):
        if Addrcheck._instance is None:
            Addrcheck._instance = object.__new__(cls)
            Addrcheck._instance.name, Addrcheck._instance.maxsize = 'Default', 64
        return Addrcheck._instance

    def set(self, name, maxsize=64):
        if name not in self.CHECKERS:
            logging.getLogger('fuglu.Addrcheck').warning(
                'Mail address check "%s" not valid, using default...', name)
            name = 'Default'
        self.name, self.maxsize = name, int(maxsize)

    def valid(self, address, allow_postmaster=False):
        if not address:
            return False
        if address.lower() == 'postmaster':
            return allow_postmaster or self.name == 'NoCheck'
        return address_is_valid(address, self.name, self.maxsize)


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


class EnvelopeSyntaxError(FugluError, ValueError):
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
    seconds = config.getfloat('main', 'max_session_time')
    return time.monotonic() + seconds if seconds > 0 else None


class SMTPServerSession(object):
    """The server side of one SMTP connection, shared by the smtp and esmtp
    connectors (which add the scanning: AfterQueueSession).

    Commands dispatch by name to ``smtp_<VERB>(argument)``; a subclass adds or
    replaces verbs. Replies are collected while more pipelined input is waiting and
    written in one go (RFC 2920).

    Methods for the connector: __init__(connector, sock, peer), run().

    Methods that may be overridden:
        smtp_<VERB>(argument)    a command; the argument without surrounding blanks
        banner() -> str          the text of the 220 greeting
        extensions() -> [str]    the EHLO keywords offered
        before_wait()            before waiting for more client input (and flushing
                                 the replies queued so far)
        reset()                  a transaction ends (RSET, HELO/EHLO, after DATA):
                                 call the base
        cleanup()                the connection is over
        dispatch(line)           one command line (call the base)

    Helpers for subclasses: reply(code, text or [lines]), flush(), error(code, text)
    (counts towards MAX_ERRORS), parse_mail(argument) / parse_rcpt(argument) (None
    after replying to bad syntax), receive_data(), clientinfo(), smtp_options(),
    peer_label().

    Class attributes that may be overridden: MAX_ERRORS, UNIMPLEMENTED.

    Instance attributes: connector, controller, config, logger, sock, peer (ip,
    port), reader, trusted, helo, esmtp, xforward (dict of raw attributes), sender,
    recipients, mail_params, rcpt_params (list per recipient), in_transaction,
    closing.
    """

    MAX_ERRORS = 20
    ENVELOPE_VERBS = ('MAIL', 'RCPT')   # their parsers refuse control characters with 5.1.x codes
    UNIMPLEMENTED = ('EXPN', 'TURN', 'ETRN', 'STARTTLS', 'AUTH', 'BDAT', 'HELP', 'SEND', 'SOML',
                     'SAML')

    def __init__(self, connector, sock, peer):
        self.connector = connector
        self.controller = connector.controller
        self.config = connector.controller.config
        self.logger = connector.logger
        self.sock = sock
        self.peer = peer
        self.reader = SocketReader(sock, session_deadline(self.config),
                                   self.config.getfloat('main', 'smtptimeout'))
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
        data, problem = self.reader.read_data(self.max_size, self.data_line_limit,
                                              message_writer(self.config))
        if problem == 'spool':
            self.reply(451, '4.3.0 Error: cannot store the message, try again later')
        elif problem == 'size':
            self.logger.warning('%s: message over smtp_max_message_size refused', self.peer_label())
            self.reply(552, '5.3.4 Message size exceeds fixed maximum message size %d (configured '
                            'limit smtp_max_message_size)' % self.max_size)
        elif problem == 'line':
            self.logger.warning('%s: message with a line over smtp_data_line_limit refused',
                                self.peer_label())
            self.reply(552, '5.3.4 Line in message exceeds %d octets (configured limit '
                            'smtp_data_line_limit) - fold long headers or '
                            'reduce message size' % self.data_line_limit)
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


###############################################################################
# Connectors
###############################################################################

class Connector(object):
    """Base of the protocol adapters registered in CONNECTORS: one connector per
    incomingport entry. A connector's ``serve`` runs a session object that speaks the
    protocol and, for each message, hands itself as a ProtocolHandler to
    ``ScanSession.handle``: so a new connector is the protocol alone.

    Methods for the daemon:
        __init__(controller, address, port)
        handle(sock, peer)       in a worker, for every accepted connection: runs it,
                                 closes the socket, never raises
        refuse_busy(sock)        in the accept thread, for a connection over
                                 max_sessions_per_client: busy_reply, close

    Methods that must be overridden:
        serve(sock, peer)        the whole connection (exceptions are logged by handle)

    Helpers for sessions: peer_is_trusted(ip) (trusted_xforward_peers), config.

    Class attributes to override:
        protocol                 the name in incomingport and CONNECTORS
        busy_reply               bytes refuse_busy sends (b'' sends nothing)

    Instance attributes: controller, address, port, logger (``fuglu.incoming.<port>``).
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
            set_socket_timeout(sock, self.config.getfloat('main', 'smtptimeout'))
            self.serve(sock, peer)
        except Exception:
            self.logger.error('connection from %s:%s failed: %s', peer[0], peer[1],
                              traceback.format_exc())
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


class AfterQueueSession(SMTPServerSession, ProtocolHandler):
    """The `smtp` connector: Postfix's content_filter talks to us, we scan and
    re-inject to outgoinghost:outgoingport, and answer Postfix only after the
    downstream's final reply (commitback).

    Recipients are checked downstream at RCPT time: each RCPT is forwarded right
    away and the downstream's verdict is what Postfix sees for that recipient, so a
    refused recipient is deferred or bounced by Postfix itself and never silently
    dropped. (If a plugin changes the envelope, it is sent again at delivery; a
    refusal then defers the whole message.)

    Methods that may be overridden (EsmtpSession does):
        open_downstream() -> SMTPClient   connected and greeted
        downstream_params(params, size)   the MAIL/RCPT parameters passed on
        accepted_reply(code, lines, local_text) -> (code, text)   the reply to a
                                          MAIL/RCPT the downstream accepted
        downstream_deadline()             a context bounding one delivery
        make_suspect(data)                and the other ProtocolHandler answers

    Class attributes that may be overridden: accepted_template_option,
    reuse_downstream.
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
            if (self.reuse_downstream and self.downstream_clean and not self.in_transaction
                and not self.awaiting):
                self.controller.downstream_pool.park(self.downstream)
            else:
                self.downstream.quit()
            self.downstream = None

    def smtp_QUIT(self, argument):
        # park the downstream connection before the client hears 221: it may start the
        # next session at once, and that session should find the connection in the pool
        if self.reuse_downstream:
            self.cleanup()
        super().smtp_QUIT(argument)

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
            self.logger.warning('%s: MAIL FROM:<%s> deferred, downstream: %s', self.peer_label(),
                                sender, error)
            return self.reply(error.code, error.text)
        self.sender, self.mail_params, self.in_transaction = sender, params, True
        if self.xforward and 'XFORWARD' in client.extensions:
            for line in client.xforward_lines(self.xforward):
                self.send_downstream(line, self.on_xforward_reply)
        self.send_downstream(self.envelope_command('MAIL FROM', sender, params),
                             lambda code, lines: self.on_mail_reply(sender, code, lines))

    def on_xforward_reply(self, code, lines):
        if code != 250:
            self.logger.warning('%s: downstream refused XFORWARD: %s %s', self.peer_label(), code,
                                ' '.join(lines))

    def accepted_reply(self, code, lines, local_text):
        """The reply for a MAIL/RCPT the downstream accepted. After-queue: our own
        text; the esmtp proxy relays the downstream's reply instead."""
        return 250, local_text

    def on_mail_reply(self, sender, code, lines):
        if code == 250:
            return self.reply(*self.accepted_reply(code, lines, '2.1.0 Ok'))
        self.logger.warning('%s: MAIL FROM:<%s> refused downstream: %s %s', self.peer_label(),
                            sender, code,
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
            self.logger.info('%s: recipient <%s> refused downstream: %s %s', self.peer_label(),
                             address, code,
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
            ScanSession(self.controller).handle(self, data)
        if self.in_transaction and self.downstream is not None and self.downstream.connected:
            self.downstream.rset()   # no-op after a completed delivery; aborts otherwise
        self.reset()

    # -- the answers to the scan session (ProtocolHandler) ----------------------------
    def make_suspect(self, data):
        suspect = Suspect(self.sender, list(self.recipients), inbuffer=data,
                          queue_id=xtext_decode(self.xforward.get('IDENT', '')) or None,
                          smtp_options=self.smtp_options(), clientinfo=self.clientinfo())
        suspect.tags['incomingport'] = self.connector.port
        return suspect

    def commitback(self, suspect):
        code, text, delivered = self.deliver(suspect)
        self.answer(code, text)
        return delivered

    def discard(self, text):
        self.in_transaction = bool(self.downstream)   # abort the downstream side
        return self.answer(250, text)

    def reject(self, text, status='5.7.1'):
        return self.answer(550, ensure_enhanced(text, status))

    def defer(self, text, status='4.7.1'):
        return self.answer(451, ensure_enhanced(text, status))

    def answer(self, code, text):
        """Send a reply now; False (and the session ends) when the client is gone."""
        self.reply(code, text)
        try:
            self.flush()
            return True
        except ConnectionClosed:
            self.closing = True
            return False

    def deliver(self, suspect):
        """Re-inject; returns (code, text, delivered) for Postfix."""
        template = self.config.get(*self.accepted_template_option)
        if suspect.tags.get('noreinject'):
            record_inject_result(suspect, 250, 'message not re-injected by plugin request')
            return (250, one_line(apply_template(template, suspect, {
                'injectanswer': suspect.tags['injectanswer']})), True)
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
        return code, one_line('%s (%s)' % (text, suspect.id) if suspect.id not in text
                              else text), False

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
        code, text = client.command(self.envelope_command('MAIL FROM', suspect.from_address,
                                                          self.mail_params, size))
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
    PROXIED_EXTENSIONS = ('PIPELINING', 'SIZE', '8BITMIME', 'SMTPUTF8', 'DSN',
                          'ENHANCEDSTATUSCODES')

    accepted_template_option = ('esmtpconnector', 'queuetemplate')
    reuse_downstream = False   # greeted with this client's own name

    def __init__(self, connector, sock, peer):
        super().__init__(connector, sock, peer)
        self.ignore_multiple_recipients = self.config.getboolean('esmtpconnector',
                                                                 'ignore_multiple_recipients')
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
            budget = self.config.getfloat('esmtpconnector', 'downstream_timeout')
            connect_timeout = min(budget,
                                  self.config.getfloat('main', 'downstream_connect_timeout'))
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
        budget = self.config.getfloat('esmtpconnector', 'downstream_timeout')
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
            self.logger.info('%s: %s %s refused downstream: %s %s', self.peer_label(), verb,
                             argument, code,
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

    def make_suspect(self, data):
        suspect = super().make_suspect(data)
        if self.ignored_recipients:
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

NETCAT_BANNER = (b'fuglu scanner ready - please pipe your message, (optional) include env '
                 b'sender/recipient in the beginning, see documentation\r\n')
NETCAT_DEFAULT_ADDRESS = 'unknown@example.org'
NETCAT_BLOCK_START = b'X-DATA-PREPEND-START:'
NETCAT_BLOCK_END = 'X-DATA-PREPEND-END'
NETCAT_HEALTHY = b'DUNNO: healthcheck'


class EnvelopeBlockError(FugluError, ValueError):
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
                raise EnvelopeBlockError('envelope block end token %r does not match the '
                                         'start token %r'
                                         % (value[:40], token[:40]))
            return token, fields, data[position:]
        else:
            fields.append((name, value))


def uses_bare_lf(message):
    """True when the message's first line ends in LF alone (a Unix .eml)."""
    end = message.find(b'\n')
    return end >= 0 and message[end - 1:end] != b'\r'


class NetcatSession(ProtocolHandler):
    """One netcat connection; see the section comment for the exchange.

    Answers: ``DUNNO:`` + the whole message with fuglu's headers (commitback),
    ``DISCARD:text``, ``REJECT:text``, ``DEFER:text``; ``DUNNO: healthcheck`` to a
    health probe. The connection is half-closed after the answer."""

    def __init__(self, connector, sock, peer):
        self.connector = connector
        self.controller = connector.controller
        self.config = connector.controller.config
        self.logger = connector.logger
        self.sock = sock
        self.peer = peer

    def peer_label(self):
        return '%s:%s' % self.peer[:2]

    def run(self):
        label = self.peer_label()
        self.sock.sendall(NETCAT_BANNER)
        limit = self.connector.size_limit()
        try:
            data, oversized = self.read_message(limit, session_deadline(self.config))
        except DeadlineExpired:
            self.logger.warning('%s: netcat client still sending after max_session_time (%ss), '
                                'closing', label, self.config.get('main', 'max_session_time'))
            return self.defer('timeout exceeded (session time limit)')
        except ConnectionClosed as why:
            self.logger.info('%s: netcat client left before sending a whole message: %s',
                             label, why)
            return
        if oversized:
            self.logger.warning('%s: netcat message over %d bytes refused', label, limit)
            return self.reject('message exceeds %d octets (configured limit '
                               'netcat_max_message_size)' % limit)
        sender, recipients, tags = NETCAT_DEFAULT_ADDRESS, [NETCAT_DEFAULT_ADDRESS], {}
        try:
            block = split_envelope_block(data)
        except EnvelopeBlockError as error:
            block = error
        if block is not None and not self.connector.peer_is_trusted(self.peer[0]):
            self.logger.info('%s: envelope block from an untrusted peer kept as message '
                             'content', label)
        elif isinstance(block, EnvelopeBlockError):
            self.logger.warning('%s: broken envelope block: %s', label, block)
            return self.reject('broken envelope block: %s' % block)
        elif block is not None:
            token, fields, data = block
            found_sender, found_recipients = None, []
            for name, value in fields:
                key = name.upper()
                if key == 'X-HEALTHCHECK':
                    self.logger.info('HEALTHCHECK netcat from %s', label)
                    return self.send_answer(NETCAT_HEALTHY)
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
            return self.reject('empty message')
        ScanSession(self.controller).handle(self, sender, recipients, tags, data)

    def read_message(self, limit, deadline=None):
        """Everything up to the client's half-close: (bytes, False), or (b'', True)
        when over ``limit`` (the rest is read and dropped, so the reply is not lost
        to a connection reset). DeadlineExpired after ``deadline``."""
        try:
            return read_until_eof(self.sock, limit, drain=True, deadline=deadline,
                                  idle=self.config.getfloat('main', 'smtptimeout'))
        except OSError as error:
            raise ConnectionClosed('timeout' if is_timeout(error) else str(error))

    # -- the answers to the scan session (ProtocolHandler) ----------------------------
    def make_suspect(self, sender, recipients, tags, data):
        suspect = Suspect(sender, recipients, inbuffer=data)
        for name, value in tags.items():
            suspect.tags.setdefault(name, value)   # never replace the core's own tags
        suspect.tags['incomingport'] = self.connector.port
        return suspect

    def commitback(self, suspect):
        return self.send_answer(b'DUNNO:' + self.output_message(suspect))

    def discard(self, text):
        return self.send_answer(b'DISCARD:', text)

    def reject(self, text, status='5.7.1'):
        return self.send_answer(b'REJECT:', text)

    def defer(self, text, status='4.7.1'):
        return self.send_answer(b'DEFER:', text)

    def send_answer(self, reply, text=''):
        """Send ``reply`` (bytes), then ``text`` as one line; half-close."""
        reply += one_line(text).encode('utf-8', 'replace')
        try:
            self.sock.sendall(reply)
            self.sock.shutdown(socket.SHUT_WR)
            return True
        except OSError as error:
            self.logger.warning('%s: netcat reply not delivered: %s', self.peer_label(), error)
            return False

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


class NetcatConnector(Connector):
    """Raw message pipe for scripts (NetcatSession)."""

    protocol = 'netcat'
    busy_reply = NETCAT_BANNER + b'DEFER:too many connections from your address, try again later'

    def size_limit(self):
        value = self.config.get('main', 'netcat_max_message_size').strip()
        return int(value) if value else self.config.getint('main', 'smtp_max_message_size')

    def serve(self, sock, peer):
        NetcatSession(self, sock, peer).run()


###############################################################################
# Connector: milter
###############################################################################
# The Sendmail/Postfix milter protocol, version 6, written from its public descriptions
# (Todd Vierling's protocol notes, libmilter's mfdef.h, Postfix's milter8.c). The MTA is
# the socket client; one milter connection carries any number of messages. Every packet,
# in both directions, is
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


class MilterProtocolError(FugluError):
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
        out.append(('%d%s%s %s' % (code, separator, enhanced, line[:400])).rstrip()
                   .replace('%', '%%'))
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
                    raise MilterProtocolError('connection closed inside a packet (%d bytes '
                                              'of it read)'
                                              % decoder.pending())
                raise ConnectionClosed('EOF')
            decoder.feed(chunk)



MILTER_DEFER_CODE = 450      # FuGlu's milter answers every temporary failure with 450
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

    milter_mode is a list of words (separated by commas or blanks) that add up
    (FuGlu's documented modes; its async connector reads a list):
        readonly        change nothing, ask the MTA for no modification rights; it
                        wins over every other word
        tags            the parts the tag milter_replace names (all, body, headers,
                        from, to)
        manual          the parts milter_mode_options names
        auto            whatever the plugins changed: headers, body, sender, recipients
        autoheaders, autofrom, autoto   the same, for one part each
        replace_demo    replace the whole message by a notice (to test the wiring)
    Every mode but readonly also adds fuglu's own headers. Unknown words are left
    out; with no valid word left the mode is tags. milter_mode_options word prepend
    puts added headers on top (INSHEADER 0) instead of the bottom.

    Attributes: name (the words in effect), readonly, tags, demo, auto_parts,
    forced_parts (sets of 'headers', 'body', 'from', 'to'), prepend, actions (the
    SMFIF_* rights to ask for), findings ((level, text) for lint and the log).
    """

    AUTO_WORDS = {'auto': ('headers', 'body', 'from', 'to'), 'autoheaders': ('headers',),
                  'autofrom': ('from',), 'autoto': ('to',)}
    OTHER_WORDS = ('readonly', 'tags', 'manual', 'replace_demo')
    OPTION_WORDS = ('all', 'prepend') + tuple(MILTER_PART_ACTIONS)

    def __init__(self, config):
        self.findings = []
        where = config.where('milter', 'milter_mode')
        words = split_list_value(config.get('milter', 'milter_mode'), ', \t', lower=True)
        known = []
        for word in words:
            if (word in self.AUTO_WORDS or word in self.OTHER_WORDS) and word not in known:
                known.append(word)
        unknown = [word for word in words if word not in known]
        if unknown:
            self.findings.append(('warning', '%s: unknown words %s left out'
                                  % (where, ', '.join(unknown))))
        if not known:
            self.findings.append(('warning', '%s: no valid mode, using tags' % where))
            known = ['tags']
        if 'readonly' in known and len(known) > 1:
            self.findings.append(('warning', '%s: readonly wins, %s changes nothing'
                                  % (where, ', '.join(w for w in known if w != 'readonly'))))
            known = ['readonly']
        self.name = ','.join(known)
        self.readonly = known == ['readonly']
        self.tags = 'tags' in known
        self.demo = 'replace_demo' in known
        if self.demo:
            self.findings.append(('warning', '%s: replace_demo replaces every message by a '
                                             'notice (for tests only)' % where))
        options = split_list_value(config.get('milter', 'milter_mode_options'), ', \t',
                                   lower=True)
        strange = [word for word in options if word not in self.OPTION_WORDS]
        if strange:
            self.findings.append(('warning', '%s: unknown words %s left out' % (
                config.where('milter', 'milter_mode_options'), ', '.join(strange))))
        self.prepend = 'prepend' in options
        parts = set(MILTER_PART_ACTIONS) if 'all' in options else \
            set(options) & set(MILTER_PART_ACTIONS)
        self.forced_parts = parts if 'manual' in known else set()
        self.auto_parts = set()
        for word in known:
            self.auto_parts.update(self.AUTO_WORDS.get(word, ()))
        self.actions = 0
        if not self.readonly:
            # fuglu's own X-Fuglu-* headers, in every writing mode
            self.actions = SMFIF_ADDHDRS
            every_part = set(MILTER_PART_ACTIONS)
            wanted = every_part if (self.tags or self.demo) else \
                self.auto_parts | self.forced_parts
            for part in wanted:
                self.actions |= MILTER_PART_ACTIONS[part]


def check_milter_mode(config):
    """milter_mode and milter_mode_options: what MilterMode leaves out or overrides."""
    return MilterMode(config).findings


def milter_source_value(value, leading_space):
    """Header value as the MTA sent it -> as it stands in the message source: the
    leading space as received with HDR_LEADSPC (``leading_space``), else the one
    space Postfix strips; CRLF between folded lines."""
    if b'\n' in value:      # folded: the MTA separates the lines with LF
        # (an LF not followed by a blank would start a header of its own in
        # fuglu's copy only: it is folded)
        value = re.sub(rb'\r?\n([ \t]?)', lambda match: b'\r\n' + (match.group(1) or b' '),
                       value)
    return value if leading_space else b' ' + value


def milter_mta_value(value, leading_space):
    """Header value as in the message source -> as the MTA wants it."""
    value = value.replace(b'\r\n', b'\n')
    if leading_space:
        return value if value[:1] in (b' ', b'\t') else b' ' + value
    return value[1:] if value.startswith(b' ') else value


class MilterModifications(object):
    """What to change in the MTA's copy of one message, per milter_mode (MilterMode);
    no socket involved.

    ``MilterModifications(mode, actions, leading_space, headers, body, rcpt_arguments)``
    takes the mode, the SMFIF_* rights the MTA granted, whether header values keep
    their leading space (SMFIP_HDR_LEADSPC), the headers as the MTA sent them
    ((name, value) bytes), the body as received and recipient -> RCPT argument as
    received. ``packets(suspect)`` -> the modification packets in the order sender,
    recipients, headers, fuglu's headers, body (a body replacement must not be
    interleaved with other changes). A change whose right was not granted is left out
    and named in ``problems`` (once per kind).
    """

    def __init__(self, mode, actions, leading_space, headers, body, rcpt_arguments):
        self.mode = mode
        self.actions = actions
        self.leading_space = leading_space
        self.headers = headers
        self.body = body
        self.rcpt_arguments = rcpt_arguments
        self.problems = []
        self.missing_rights = set()

    def packets(self, suspect):
        mode = self.mode
        if mode.readonly:
            return []
        if mode.demo:
            return self.demo_packets(suspect)
        forced = set(mode.forced_parts)
        if mode.tags:
            wanted = force_uString(suspect.tags.get('milter_replace') or '').lower()
            forced |= set(MILTER_PART_ACTIONS) if 'all' in wanted else \
                {part for part in MILTER_PART_ACTIONS if part in wanted}
        auto = mode.auto_parts
        packets = []
        if 'from' in forced or ('from' in auto and suspect.orig_from_address_changed()):
            self.modify(packets, SMFIF_CHGFROM, milter_packet(SMFIR_CHGFROM, milter_strings(
                '<%s>' % suspect.from_address)), 'change the sender')
        if 'to' in forced or ('to' in auto and suspect.orig_recipients_changed()):
            self.recipient_packets(suspect, packets)
        body_packets = []
        if suspect.is_modified() or 'headers' in forced or 'body' in forced:
            original_headers = [(name, milter_source_value(value, self.leading_space))
                                for name, value in self.headers]
            header_block, body = split_message_source(suspect.get_source())
            current_headers = parse_header_block(header_block)
            if 'headers' in forced:
                self.delete_headers(packets, original_headers)
                self.add_headers(packets, current_headers)
            elif 'headers' in auto and current_headers != original_headers:
                self.header_diff_packets(packets, original_headers, current_headers)
            if 'body' in forced or ('body' in auto and body != self.body):
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
        """Queue a change if its right was granted; else note it (once per kind)."""
        if self.actions & right:
            packets.append(packet)
        elif right not in self.missing_rights:
            self.missing_rights.add(right)
            self.problems.append('cannot %s: %s was not negotiated with the MTA'
                                 % (what, describe_milter_flags(right, SMFIF_NAMES)))

    def recipient_packets(self, suspect, packets):
        """Delete the recipients that are gone, add the new ones (the same end result
        as FuGlu's delete-all-then-add, without touching kept recipients)."""
        original, current = suspect.original_recipients, suspect.recipients
        for recipient in original:
            if recipient not in current:
                argument = self.rcpt_arguments.get(recipient, '<%s>' % recipient)
                self.modify(packets, SMFIF_DELRCPT,
                            milter_packet(SMFIR_DELRCPT, milter_strings(argument)),
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
                self.modify(packets, SMFIF_CHGHDRS,
                            encode_header_packet(SMFIR_CHGHEADER, names[key], b'', index),
                            'delete a header')

    def add_headers(self, packets, headers):
        """ADDHEADER (bottom of the header block), or with the mode option prepend
        INSHEADER at index 0 (on top, in the given order)."""
        if self.mode.prepend:
            for name, value in reversed(headers):
                self.modify(packets, SMFIF_ADDHDRS, encode_header_packet(
                    SMFIR_INSHEADER, name, milter_mta_value(value, self.leading_space), 0),
                    'insert a header')
        else:
            for name, value in headers:
                self.modify(packets, SMFIF_ADDHDRS, encode_header_packet(
                    SMFIR_ADDHEADER, name, milter_mta_value(value, self.leading_space)),
                    'add a header')

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
                self.modify(packets, SMFIF_CHGHDRS,
                            encode_header_packet(SMFIR_CHGHEADER, name, b'', index),
                            'delete a header')
            for index in range(min(len(old_values), len(new_values))):
                if old_values[index] != new_values[index]:
                    value = milter_mta_value(new_values[index], self.leading_space)
                    self.modify(packets, SMFIF_CHGHDRS, encode_header_packet(
                        SMFIR_CHGHEADER, name, value, index + 1), 'change a header')
            added.extend((name, value) for value in new_values[len(old_values):])
        for key, (name, new_values) in after.items():
            if key not in before:
                added.extend((name, value) for value in new_values)
        self.add_headers(packets, added)

    @staticmethod
    def body_packets(body):
        """REPLBODY chunks of at most 65535 bytes, CRLF line ends."""
        body = re.sub(rb'(?<!\r)\n', b'\r\n', body)
        chunks = [body[start:start + MILTER_CHUNK_SIZE]
                  for start in range(0, len(body), MILTER_CHUNK_SIZE)]
        return [milter_packet(SMFIR_REPLBODY, chunk) for chunk in chunks or [b'']]

    def demo_packets(self, suspect):
        """replace_demo: the whole message becomes a short notice."""
        packets = []
        original = [(name, milter_source_value(value, self.leading_space))
                    for name, value in self.headers]
        self.delete_headers(packets, original)
        notice = [(b'From', b' <%s>' % force_bString(suspect.from_address or 'MAILER-DAEMON')),
                  (b'To', b' <%s>' % force_bString(suspect.to_address or
                                                   'undisclosed-recipients')),
                  (b'Subject', b' fuglu milter replace_demo')]
        self.add_headers(packets, notice)
        body = ('This message was replaced by fuglu (milter_mode replace_demo).\r\n'
                'Suspect: %s\r\n' % suspect.id).encode('ascii')
        for packet in self.body_packets(body):
            self.modify(packets, SMFIF_CHGBODY, packet, 'replace the body')
        return packets


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


# -- FuGlu's milter plugin API (fuglu.mshared) ------------------------------------
# FuGlu's milter plugins return milter codes (sm.CONTINUE, sm.REJECT ...) and pick
# their stages with option ``state``; they run here as MilterPlugins.
MILTER_CONNECT, MILTER_HELO, MILTER_MAILFROM, MILTER_RCPT = 'connect', 'helo', 'mailfrom', 'rcpt'
MILTER_HEADER, MILTER_EOH, MILTER_EOB, MILTER_EOM = 'header', 'eoh', 'eob', 'eom'
MILTER_RETCODES = {DUNNO: b'continue', ACCEPT: b'accept', DELETE: b'discard', REJECT: b'reject',
                   DEFER: b'tempfail'}
MILTER_STR2RETCODE = {code.decode(): code for code in MILTER_RETCODES.values()}
MILTER_STR2RETCODE.update(conn_fail=b'conn_fail', shutdown=b'shutdown')
MILTER_RETCODE_ACTIONS = {code: action for action, code in MILTER_RETCODES.items()}


def convert_return2milter(ret):
    """An action (or (action, message)) -> the milter code (or (code, message))."""
    if isinstance(ret, tuple):
        return MILTER_RETCODES[ret[0]], ret[1]
    if isinstance(ret, int):
        return MILTER_RETCODES[ret]
    raise ValueError('ret type should be tuple(int, str) or int -> but is %s' % type(ret))


class BMPConnectMixin(object):
    def examine_connect(self, sess, host, addr):
        raise NotImplementedError()


class BMPHeloMixin(object):
    def examine_helo(self, sess, helo):
        raise NotImplementedError()


class BMPMailFromMixin(object):
    def examine_mailfrom(self, sess, sender):
        raise NotImplementedError()


class BMPRCPTMixin(object):
    def examine_rcpt(self, sess, recipient):
        raise NotImplementedError()


class BMPHeaderMixin(object):
    def examine_header(self, sess, key, value):
        raise NotImplementedError()


class BMPEOHMixin(object):
    def examine_eoh(self, sess):
        raise NotImplementedError()


class BMPEOBMixin(ReturnOverrideMixin):
    def examine_eob(self, sess):
        raise NotImplementedError()


class BMPConnectAsyncMixin(BMPConnectMixin):
    async def examine_connect(self, sess, host, addr):
        raise NotImplementedError()


class BMPHeloAsyncMixin(BMPHeloMixin):
    async def examine_helo(self, sess, helo):
        raise NotImplementedError()


class BMPMailFromAsyncMixin(BMPMailFromMixin):
    async def examine_mailfrom(self, sess, sender):
        raise NotImplementedError()


class BMPRCPTAsyncMixin(BMPRCPTMixin):
    async def examine_rcpt(self, sess, recipient):
        raise NotImplementedError()


class BMPHeaderAsyncMixin(BMPHeaderMixin):
    async def examine_header(self, sess, key, value):
        raise NotImplementedError()


class BMPEOHAsyncMixin(BMPEOHMixin):
    async def examine_eoh(self, sess):
        raise NotImplementedError()


class BMPEOBAsyncMixin(BMPEOBMixin):
    async def examine_eob(self, sess):
        raise NotImplementedError()


class BasicMilterPlugin(ReturnOverrideMixin, MilterPlugin):
    """FuGlu's milter plugin base: derive from it and the BMP*Mixin of each stage,
    list the stages in option ``state``, return milter codes (fuglu.mshared.CONTINUE,
    REJECT, TEMPFAIL, DISCARD, ACCEPT), optionally with a message. ``examine_eob``
    gets only the session (the message is ``sess`` 's; fuglu passes the Suspect to
    MilterPlugins). ``sess`` is fuglu's MilterSession, not FuGlu's."""

    ALL_STATES = {MILTER_CONNECT: BMPConnectMixin, MILTER_HELO: BMPHeloMixin,
                  MILTER_MAILFROM: BMPMailFromMixin, MILTER_RCPT: BMPRCPTMixin,
                  MILTER_HEADER: BMPHeaderMixin, MILTER_EOH: BMPEOHMixin, MILTER_EOB: BMPEOBMixin}

    def __init__(self, config, section=None):
        super().__init__(config, section=section)
        self.requiredvars.update({
            'state': {'default': '',
                      'description': 'comma/space separated list of states this plugin '
                      'is applied in (%s)' % ','.join(self.ALL_STATES)},
        })
        self._state = None

    @property
    def state(self):
        if self._state is None:
            self._state = [name.lower() for name in Suspect.getlist_space_comma_separated(
                self.config.get(self.section, 'state'))]
        return self._state

    def lint(self, state=None):
        if not super().lint():
            return False
        states = state or self.state
        states = [states] if isinstance(states, str) else states
        for name in states:
            if name not in self.ALL_STATES:
                print('Error: Not all states are available/implemented: %s' % name)
                return False
            if not isinstance(self, self.ALL_STATES[name]):
                print('ERROR: %s does not implement %s' % (self.__class__.__name__,
                                                           self.ALL_STATES[name].__name__))
                return False
        return True

    def _logger(self):
        return logging.getLogger('fuglu.mplugin.%s' % self.__class__.__name__)

    def _problemcode(self, configoption='problemaction'):
        value = self.config.get(self.section, configoption, fallback='')
        return MILTER_STR2RETCODE.get(value.strip().lower(), b'continue')


class AsyncBasicMilterPlugin(BasicMilterPlugin):
    async def lint(self, state=None):
        return BasicMilterPlugin.lint(self, state)


class SumAsyncTime(object):
    """Context manager adding the time spent inside to ``timer.sum_asynctime``
    (FuGlu's timing helper; fuglu keeps no per-plugin async timings)."""

    def __init__(self, timer, key=None, logid=None):
        self.timer, self.key, self.logid = timer, key, logid
        self.asyncstart = self.asyncend = 0

    def __enter__(self):
        self.asyncstart = time.time()

    def __exit__(self, exc_type, exc_value, traceback):
        self.asyncend = time.time()
        add = getattr(self.timer, 'sum_asynctime', None)
        if add is not None:
            add(self.asyncend - self.asyncstart, self.key, logid=self.logid)


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


class MilterSession(ProtocolHandler):
    """One milter connection from the MTA: option negotiation, then any number of
    messages (Postfix opens one milter connection per SMTP connection).

    Events dispatch by command name (SMFIC_NAMES) to ``on_<name>(data)``
    (on_connect, on_mail, on_bodyeob ...), as SMTP commands go to ``smtp_<VERB>``.
    A handler returns None (= continue) or a reply packet; the reply is sent only if
    the event was not negotiated as no-reply. OPTNEG and BODYEOB answer themselves;
    at BODYEOB the scan session decides and the answers below (ProtocolHandler) tell
    the MTA, with the modifications MilterModifications computes. Any internal error
    becomes a temporary failure (at once where a reply is due, else at the end of the
    message); EOF at any point ends the session quietly; broken framing closes it
    with a log line.

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

    def __init__(self, connector, sock, peer):
        self.connector = connector
        self.controller = connector.controller
        self.config = config = connector.controller.config
        self.logger = connector.logger
        self.sock = sock
        self.peer = peer
        max_packet = max(config.getint('milter', 'milter_max_packet_size'), MILTER_CHUNK_SIZE + 1)
        self.reader = MilterReader(sock, max_packet, session_deadline(config),
                                   config.getfloat('main', 'smtptimeout'))
        self.debug = config.getboolean('milter', 'milter_debug')
        self.max_size = config.getint('main', 'smtp_max_message_size')
        self.trusted = connector.peer_is_trusted(peer[0])
        self.mplugins = connector.milter_plugins()
        self.mode = connector.milter_mode()
        self.stage_plugins = {}
        for stage in MilterPlugin.STAGES:
            self.stage_plugins[stage] = [p for p in self.mplugins
                                         if stage in (getattr(p, 'state', None) or ())]
        self.send_lock = threading.Lock()
        self.scanning = False
        self.answered = False      # the MTA got the verdict on the last message
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
        if getattr(self, 'message', None) is not None:
            self.message.discard()   # a message not handed to a Suspect (aborted, refused)
        self.message = None      # MessageWriter: the header block, then the body as it comes
        self.body_start = 0      # where the body starts in it
        self.size = 0
        self.oversize = False
        self.message_failure = None
        self.envelope_refusal = None     # (code, text) at end of message: a bad sender/recipient

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

    def peer_label(self):
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
            self.logger.debug('%s: > PROGRESS', self.peer_label())

    def log_packets(self, direction, data):
        decoder = MilterPacketDecoder(len(data) + 1)
        decoder.feed(data)
        while True:
            packet = decoder.next_packet()
            if packet is None:
                break
            command, payload = packet
            names = SMFIC_NAMES if direction == '<' else SMFIR_NAMES
            self.logger.debug('%s: %s %s %r', self.peer_label(), direction,
                              names.get(command, command), payload[:200])

    # -- main loop --------------------------------------------------------------
    def run(self):
        try:
            while not self.closing:
                command, data = self.reader.read_packet()
                if self.debug:
                    self.logger.debug('%s: < %s %r', self.peer_label(),
                                      SMFIC_NAMES.get(command, command), data[:200])
                self.dispatch(command, data)
        except DeadlineExpired:
            # the MTA applies its milter_default_action (Postfix: tempfail)
            self.logger.warning('%s: milter connection longer than max_session_time (%ss), closing',
                                self.peer_label(), self.config.get('main', 'max_session_time'))
        except ConnectionClosed as why:
            self.logger.debug('%s: milter connection closed: %s', self.peer_label(), why)
        except MilterProtocolError as error:
            self.logger.warning('%s: milter protocol error, closing the connection: %s',
                                self.peer_label(), error)
        finally:
            self.scanning = False
            self.connector.progress.unwatch(self)

    def dispatch(self, command, data):
        name = SMFIC_NAMES.get(command)
        handler = getattr(self, 'on_' + name.lower(), None) if name else None
        if handler is None:
            raise MilterProtocolError('unknown command %r with %d data bytes'
                                      % (command, len(data)))
        try:
            reply = handler(data)
        except (ConnectionClosed, MilterProtocolError):
            raise
        except Exception:
            trace = traceback.format_exc()
            self.logger.error('%s: handling %s failed: %s', self.peer_label(), name, trace)
            self.controller.record_exception(trace)
            if self.in_message or command in (SMFIC_MAIL, SMFIC_BODYEOB):
                self.message_failure = 'internal problem at %s' % name
            else:
                self.connection_failure = 'internal problem at %s' % name
            reply = milter_reply_code(MILTER_DEFER_CODE,
                                      '4.3.0 internal problem - try again later')
            if command == SMFIC_BODYEOB:    # the verdict is due right now
                self.reset_message()
                return self.send(reply)
        no_reply_flag = MILTER_NO_REPLY_FLAGS.get(command)
        if no_reply_flag is None:
            return      # OPTNEG and BODYEOB answered already; MACRO, ABORT, QUIT get no reply
        if self.protocol & no_reply_flag:
            if reply is not None:
                # negotiated as no-reply: answering now would desynchronise the MTA
                self.logger.warning('%s: cannot answer %s (negotiated as no-reply); dropping '
                                    'the answer',
                                    self.peer_label(), SMFIC_NAMES[command])
            return
        self.send(reply or MILTER_CONTINUE)

    # -- events -----------------------------------------------------------------
    def on_optneg(self, data):
        version, actions, protocol = parse_optneg(data)
        if version < 2:
            raise MilterProtocolError('the MTA offers milter protocol version %d; 2 or later '
                                      'needed' % version)
        self.version = min(version, MILTER_VERSION)
        self.actions = self.mode.actions & actions
        if self.mode.actions & ~actions:
            self.logger.warning('%s: the MTA does not offer %s, needed by milter_mode %s',
                                self.peer_label(),
                                describe_milter_flags(self.mode.actions & ~actions, SMFIF_NAMES),
                                self.mode.name)
        # Ask only for what we use: no reply to stages without milter plugins, no
        # unknown SMTP commands, header values with their leading space (so the
        # message is rebuilt byte for byte), SKIP for oversize bodies.
        wanted = (SMFIP_HDR_LEADSPC | SMFIP_NOUNKNOWN | SMFIP_NR_UNKN | SMFIP_NR_DATA
                  | SMFIP_NR_BODY | SMFIP_SKIP)
        for stage, command in self.STAGE_COMMANDS.items():
            if not self.stage_plugins[stage]:
                wanted |= MILTER_NO_REPLY_FLAGS[command]
        self.protocol = wanted & protocol
        self.leading_space = bool(self.protocol & SMFIP_HDR_LEADSPC)
        self.logger.debug('%s: negotiated version %d, actions %s, protocol %s (offered %d, %s, %s)',
                          self.peer_label(),
                          self.version, describe_milter_flags(self.actions, SMFIF_NAMES),
                          describe_milter_flags(self.protocol, SMFIP_NAMES), version,
                          describe_milter_flags(actions, SMFIF_NAMES),
                          describe_milter_flags(protocol, SMFIP_NAMES))
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
        # 8-bit addresses are kept as they came (as in the smtp connector): written
        # back or compared, they must be the MTA's bytes
        arguments = [item.decode('utf-8', 'surrogateescape')
                     for item in split_milter_strings(data)]
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
        arguments = [item.decode('utf-8', 'surrogateescape')
                     for item in split_milter_strings(data)]
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
        self.logger.warning('%s: %s refused: %s', self.peer_label(), SMFIC_NAMES[command], text)
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
        if self.message_failure:
            return None
        try:
            self.message_writer().write(data)
        except OSError as error:    # deferred at the end of the message
            self.logger.error('%s: cannot spool the message: %s', self.peer_label(), error)
            self.message_failure = 'no spool file (%s)' % error
            self.message.discard()
            self.message = None
        return None

    def message_writer(self):
        """The MessageWriter of this message (memory up to spool_threshold, then a spool
        file), begun with the header block on first use: the body follows as it comes."""
        if self.message is None:
            lines = [name + b':' + milter_source_value(value, self.leading_space) + CRLF
                     for name, value in self.headers]
            lines.append(CRLF)
            header_block = b''.join(lines)
            self.message = message_writer(self.config)
            self.message.write(header_block)
            self.body_start = len(header_block)
        return self.message

    def drop_oversize(self):
        """The message passed smtp_max_message_size: keep nothing more of it; it is
        refused (452 4.3.4, as FuGlu does) at its end."""
        if not self.oversize:
            self.logger.warning('%s: message over smtp_max_message_size %d (headers and body), '
                                'will be refused', self.peer_label(), self.max_size)
            self.oversize = True
            self.headers = []
            if self.message is not None:
                self.message.discard()
                self.message = None

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
                self.logger.error('%s: DELETE (discard) is not allowed at %s; answering with a '
                                  'temporary failure',
                                  self.peer_label(), stage)
                return milter_reply_code(451, '4.7.1 Try again later')
            return milter_packet(SMFIR_DISCARD)
        if action == REJECT:
            return milter_reply_code(550, message or 'Rejected by content scanner')
        return milter_reply_code(MILTER_DEFER_CODE, message or 'Try again later')

    def stage_verdict(self, stage, plugins, args):
        """(action, message) of the first plugin with a decision, else (DUNNO, None).
        A plugin that raises is logged and skipped (fail-open: these are envelope checks;
        the content scanners still run at the end of the message)."""
        skipped = set(parse_list(force_uString(self.tags.get('skipmplugins', ''))))
        for plugin in plugins:
            if plugin.__class__.__name__ in skipped:
                continue
            try:
                if stage == 'eob' and isinstance(plugin, BasicMilterPlugin):
                    result = call_plugin(plugin.examine_eob, self)   # FuGlu's signature
                else:
                    result = call_plugin(getattr(plugin, 'examine_' + stage), self, *args)
            except Exception as error:
                trace = traceback.format_exc()
                self.logger.error('%s: milter plugin %s failed at %s: %s: %s', self.peer_label(),
                                  plugin, stage,
                                  error.__class__.__name__, error)
                self.logger.debug(trace)
                self.controller.record_exception(trace)
                continue
            code, text = result if isinstance(result, tuple) else (result, None)
            code = MILTER_RETCODE_ACTIONS.get(code, code)   # FuGlu's milter codes
            if code is None or code == DUNNO:
                continue
            if code not in (ACCEPT, DELETE, REJECT, DEFER):
                self.logger.error('%s: milter plugin %s returned an invalid action %r at '
                                  '%s, ignored',
                                  self.peer_label(), plugin, code, stage)
                continue
            self.logger.info('%s: milter plugin %s at %s: %s %s', self.peer_label(), plugin, stage,
                             actioncode_to_string(code), text or '')
            return code, text
        return DUNNO, None

    # -- end of message -----------------------------------------------------------
    def end_of_message(self):
        """The verdict on the message: through the scan session, unless the message
        is already refused (an earlier failure, its envelope, its size)."""
        self.answered = False
        failure = self.connection_failure or self.message_failure
        refusal = self.connection_refusal or self.envelope_refusal
        if failure:
            self.logger.error('%s: %s earlier in this message; deferring it', self.peer_label(),
                              failure)
            self.defer('internal problem - message deferred', '4.3.0')
        elif refusal:
            self.logger.warning('%s: message refused for its envelope: %s %s', self.peer_label(),
                                *refusal)
            self.send_verdict([milter_reply_code(*refusal)])
        elif self.oversize:
            self.send_verdict([milter_reply_code(
                452, '4.3.4 message size exceeds fixed maximum message size %d' % self.max_size)])
        else:
            self.scan_message()
        if not self.answered:
            raise ConnectionClosed('the MTA left before the verdict')

    def scan_message(self):
        self.scanning = True
        self.connector.progress.watch(self)
        try:
            suspect, action = ScanSession(self.controller).handle(self)
        finally:
            self.stop_progress()
        if suspect is not None:
            self.logger.info('%s queueid=%s: milter verdict %s%s', suspect.id, suspect.queue_id,
                             actioncode_to_string(action),
                             '' if self.answered else ' (the MTA was gone)')

    # -- the answers to the scan session (ProtocolHandler) ----------------------------
    def make_suspect(self):
        suspect = Suspect(self.sender or '', list(self.recipients),
                          inbuffer=self.rebuild_message(), queue_id=self.queue_id(),
                          clientinfo=self.clientinfo(), milter_macros=self.all_macros())
        suspect.tags['incomingport'] = self.connector.port
        return suspect

    def before_scan(self, suspect):
        return self.stage_verdict('eob', self.stage_plugins['eob'], (suspect,))

    def commitback(self, suspect):
        # the body as received is only compared when plugin changes are written back
        body = self.received_body(suspect) if 'body' in self.mode.auto_parts else None
        changes = MilterModifications(self.mode, self.actions, self.leading_space, self.headers,
                                      body, self.rcpt_arguments)
        packets = changes.packets(suspect)
        for problem in changes.problems:
            self.logger.error('%s: %s', self.peer_label(), problem)
        return self.send_verdict(packets + [MILTER_CONTINUE])

    def discard(self, text):
        return self.send_verdict([milter_packet(SMFIR_DISCARD)])

    def reject(self, text, status='5.7.1'):
        return self.send_verdict([milter_reply_code(550, text, status)])

    def defer(self, text, status='4.7.1'):
        return self.send_verdict([milter_reply_code(MILTER_DEFER_CODE, text, status)])

    def send_verdict(self, packets):
        """Stop the keep-alives and send modifications + verdict in one write.
        Returns False (and remembers it in ``answered``) when the MTA is gone."""
        data = b''.join(packets)
        with self.send_lock:
            self.scanning = False
            try:
                self.sock.sendall(data)
                self.answered = True
            except OSError:
                self.answered = False
        if self.debug:
            self.log_packets('>', data)
        return self.answered

    def stop_progress(self):
        with self.send_lock:
            self.scanning = False
        self.connector.progress.unwatch(self)

    def rebuild_message(self):
        """The message as the MTA has it: 'name:' + value per header (the value's
        leading space as received with HDR_LEADSPC, else the one space Postfix
        strips), CRLF line ends, a blank line, the body bytes as received. Bytes, or a
        MessageSpool for a message over spool_threshold; it is the Suspect's now."""
        message = self.message_writer().finish()
        self.message = None
        return message

    def received_body(self, suspect):
        """The body as the MTA sent it (from the Suspect's original source)."""
        source = suspect.get_original_source()
        return source[self.body_start:]

    def clientinfo(self):
        """(helo, ip, rdns) from CONNECT/HELO when the MTA is trusted to tell."""
        if not self.trusted or not self.client_address:
            return None
        name = self.hostname or ''
        if not name or name.startswith('['):    # Postfix sends [ip] without a reverse name
            name = 'unknown'
        return self.helo or '', self.client_address, name


class MilterConnector(Connector):
    """Sendmail/Postfix milter (protocol 6): ``smtpd_milters = inet:HOST:PORT`` in
    Postfix, ``milter:PORT`` in incomingport. One MilterSession per connection."""

    protocol = 'milter'
    # no milter packet fits before the MTA's OPTNEG: closing makes the MTA apply its
    # milter_default_action (Postfix: tempfail, "451 4.7.1 Service unavailable")
    busy_reply = b''

    def __init__(self, controller, address, port):
        super().__init__(controller, address, port)
        self.progress = MilterProgressWatch(controller.config.getfloat('milter',
                                                                       'milter_progress_interval'))
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
        self._mode = MilterMode(config)
        log_findings(self.logger, self._mode.findings)
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
    """Runs the connection handlers: the listeners hand every accepted connection to
    ``submit_connection``, and a worker runs the connector's ``handle`` for it
    (``Listener.run_session`` in a thread; a worker process for the process backend).
    Registered by ``name`` in BACKENDS; [performance] backend picks one.

    Methods for the daemon (MainController):
        __init__(config, controller=None)
        start()                  before the first connection
        submit_connection(listener, sock, peer)
                                 in the listener's accept thread: have the connection
                                 served; may block while all workers are busy (the
                                 back-pressure on the accept loop)
        submit(function, *args)  run function(*args) in a worker thread
        reconfigure(config)      after a reload (SIGHUP)
        reopen_logs()            after SIGHUP reopened this process's log files
        stop()                   no new work; a connection still queued gets a temporary
                                 failure (refuse_queued_connection), messages in flight
                                 are given a grace period to finish
        describe() -> str        the workers, for the control socket
        worker_usage() -> (busy, running, most)   for the metrics
        thread_count() -> int    threads alive, for the MRTG file

    Methods that must be overridden: submit (the default submit_connection runs
    ``listener.run_session`` through it), or submit_connection. May be overridden:
    start, stop, reconfigure (call the base), reopen_logs, describe, worker_usage,
    thread_count.

    Class attribute to override: name (the [performance] backend value).
    Instance attributes: config, controller (the MainController; None for a backend
    run on its own, which then only runs ``submit``).
    """

    name = None

    def __init__(self, config, controller=None):
        self.config = config
        self.controller = controller

    def start(self):
        pass

    def submit_connection(self, listener, sock, peer):
        self.submit(listener.run_session, sock, peer)

    def submit(self, function, *args):
        raise NotImplementedError

    def stop(self):
        pass

    def reconfigure(self, config):
        self.config = config

    def reopen_logs(self):
        pass

    def describe(self):
        return ''

    def worker_usage(self):
        return 0, 0, 0

    def thread_count(self):
        return threading.active_count()


class ThreadBackend(Backend):
    """A pool of worker threads between [performance] minthreads and maxthreads
    (FuGlu's semantics). A worker is started when a task arrives and nobody is idle;
    idle workers above minthreads (and minfreethreads) end after a second without
    work. The task queue holds 10 x maxthreads entries."""

    name = 'thread'

    def __init__(self, config, controller=None):
        super().__init__(config, controller)
        self.lock = threading.Lock()
        self.all_idle = threading.Condition(self.lock)   # notified when a task ends
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
                    if len(self.workers) > self.minthreads and \
                            self.idle - 1 >= self.minfreethreads and busy < len(self.workers):
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
                    self.all_idle.notify_all()
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
        with self.lock:
            self.all_idle.wait_for(lambda: 'processing' not in self.workers.values(),
                                   self.SHUTDOWN_GRACE)

    SHUTDOWN_GRACE = 10

    def worker_usage(self):
        with self.lock:
            return len(self.workers) - self.idle, len(self.workers), self.maxthreads

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


# -- the process backend ------------------------------------------------------
# Postfix's master and its children, or a pre-fork server: the parent (this backend,
# in the daemon's process) owns the listening sockets, the configuration and the
# signals, and supervises; it does not scan. Worker processes do: each one runs the
# connectors with plugins of its own and a ThreadBackend inside, so a worker serves a
# few slow, I/O-bound sessions (a milter connection lasts a whole SMTP session) while
# the CPU-bound work of different workers runs on different cores.
#
#   parent:   Listener accept threads -> client caps (ClientSessions) -> submit_connection
#             hands the socket to the least busy worker (SCM_RIGHTS) and closes its
#             copy; a supervisor thread reads what the workers report, replays their
#             counters on the parent's Statistics (control stats, metrics, MRTG), and
#             replaces workers that died, hung on a message (stuck_worker_timeout) or
#             served max_requests_per_worker connections.
#   fork server: forked once by the parent before the parent starts any thread, it
#             only forks workers on request and reports their exits. The workers are
#             forked from it, a process with one thread, never from the parent with
#             its accept, control and supervisor threads: a lock some thread held at
#             the fork would stay locked for ever in the child (the reason CPython 3.12
#             warns about fork() with threads, and 3.14 leaves "fork" as multiprocessing's
#             default start method). multiprocessing is not used: its start methods
#             ("spawn", "forkserver") re-import the main module, which fails for a
#             zipapp or a module only root could read, and "fork" forks the threaded
#             parent.
#   worker:   builds its own MainController (WorkerController) and plugins from the
#             configuration, after the privilege drop (it is forked from the dropped
#             parent), and runs the connections it is sent until told to retire (after
#             a reload or its last request: it finishes what it holds) or to stop
#             (SIGTERM: idle sessions close, messages in flight get the grace period).
#
# Each worker has one SOCK_SEQPACKET socket pair with the parent: one send is one
# message, descriptors travel along, and the parent sees the worker's end close when
# the worker dies, however it dies. Counters travel as the Statistics calls a worker
# made, sent with the packet that ends a message; nothing is shared in memory, so a
# worker killed in the middle of anything cannot leave a lock held or a counter
# half-written. A worker's connection dies with it: the MTA sees the connection drop
# without a 2xx and retries.
#
# Threads or processes?  The thread backend is one process: smallest, and all plugins
# share caches and connections. Every plugin's Python work shares one interpreter lock,
# though, so it uses about one core. Pick the process backend for CPU-bound plugins
# (pure-Python scanning, parsing, rule engines) on a host with several cores, for
# plugins that may crash the interpreter or leak memory (a worker is replaced, the
# daemon stays), and to reload the configuration without dropping connections. It
# costs a little memory per worker (what its plugins allocate: the code is shared
# copy-on-write) and per connection a hand-over to a worker.

# A process-backend packet: a JSON list (kind, fields...), a newline and an optional
# binary payload (the pickled configuration for the fork server).
PACKET_LIMIT = 4 << 20
EXCEPTION_TEXT_LIMIT = 16000

def send_packet(sock, fields, payload=b'', fds=(), flags=0):
    """One packet on a SOCK_SEQPACKET socket, with file descriptors (SCM_RIGHTS)."""
    import json
    data = json.dumps(fields, separators=(',', ':')).encode('utf-8') + b'\n' + payload
    if fds:
        import array
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                               array.array('i', fds).tobytes())], flags)
    else:
        sock.send(data, flags)


def receive_packet(sock, flags=0, size=65536):
    """(fields, payload, fds) of the next packet, None when the other end closed.
    Received descriptors are close-on-exec."""
    import array
    import json
    flags |= getattr(socket, 'MSG_CMSG_CLOEXEC', 0)
    data, ancillary, message_flags, _ = sock.recvmsg(size, socket.CMSG_SPACE(16), flags)
    fds = []
    for level, kind, blob in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array('i', blob[:len(blob) - len(blob) % 4]))
    if not data and not fds:
        return None
    if message_flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise OSError('process backend: packet truncated (%d bytes)' % len(data))
    header, _, payload = data.partition(b'\n')
    return json.loads(header.decode('utf-8')), payload, fds


def usable_cpus():
    """The CPUs this process may run on (a cpuset or taskset limits them)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def worker_process_count(config):
    """[performance] initialprocs as FuGlu reads it: n >= 1 processes, 0 = two per
    CPU, a fraction or a negative x = CPUs x |x| (at least 1)."""
    value = config.getfloat('performance', 'initialprocs')
    if value >= 1:
        return int(value)
    if value == 0:
        return 2 * usable_cpus()
    return max(1, int(usable_cpus() * abs(value)))


def thread_limits(config):
    """(minthreads, maxthreads) as the thread pools use them."""
    minthreads = max(1, config.getint('performance', 'minthreads'))
    return minthreads, max(minthreads, config.getint('performance', 'maxthreads'))


def describe_backend(config):
    """The backend and its workers in one line (start-up log, --lint)."""
    name = config.get('performance', 'backend').strip().lower()
    minthreads, maxthreads = thread_limits(config)
    if BACKENDS.get(name) is not ProcessBackend:
        return '%s backend: %d to %d worker threads' % (name, minthreads, maxthreads)
    processes = worker_process_count(config)
    text = ('process backend: %d worker processes (initialprocs %s, %d CPUs), each with %d '
            'to %d threads: up to %d connections at once'
            % (processes, config.get('performance', 'initialprocs').strip(), usable_cpus(),
               minthreads, maxthreads, processes * maxthreads))
    if name != ProcessBackend.name:
        text += ' (backend %s is served by the process backend)' % name
    return text


def exit_description(status):
    """A waitpid() status in words."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            return 'killed by signal %d (%s)' % (number, signal.Signals(number).name)
        except ValueError:
            return 'killed by signal %d' % number
    return 'exit status %d' % os.WEXITSTATUS(status)


class WorkerConnection(object):
    """A connection a worker process serves, as the parent sees it."""

    def __init__(self, job, protocol, peer):
        self.job, self.protocol, self.peer = job, protocol, peer
        self.since = time.time()
        self.message_id = self.message_since = None

    def label(self):
        text = '%s:%s %s' % (self.peer[0], self.peer[1], self.protocol)
        if self.message_id:
            text += ' message %s' % self.message_id
        return text


class WorkerProcess(object):
    """The parent's view of one worker process."""

    def __init__(self, number, generation, channel):
        self.number, self.generation, self.channel = number, generation, channel
        self.name = 'worker-%d' % number
        self.pid = None
        self.started = time.time()
        self.ready = False
        self.failure = None      # why it could not start, as it said
        self.retiring = None     # why it leaves: 'recycled', 'reload', 'stop'
        self.told = None         # the last of 'retire', 'stop' it was sent
        self.killed = None       # why the parent killed it
        self.unusable = False    # its channel failed: it is about to be found dead
        self.served = 0
        self.threads = 0
        self.connections = {}    # job -> WorkerConnection

    def state(self):
        if self.killed:
            return 'killed (%s)' % self.killed
        if not self.ready:
            return 'starting'
        if self.retiring:
            return 'retiring (%s)' % self.retiring
        if any(connection.message_id for connection in self.connections.values()):
            return 'scanning'
        return 'busy' if self.connections else 'idle'


class ProcessBackend(Backend):
    """Pre-forked worker processes (see the notes above): [performance] initialprocs
    workers, each serving up to maxthreads connections with minthreads to maxthreads
    threads. The parent gives a new connection to the ready worker with the fewest.

    A worker that dies is replaced at once; its connections close without an answer
    and the parent logs which messages they carried. max_requests_per_worker recycles
    a worker, stuck_worker_timeout kills one that hangs on a message. reconfigure()
    (SIGHUP) starts workers with the new configuration and retires the old ones once
    the new ones are ready: they finish their connections, then exit. stop() drains
    every worker within ThreadBackend.SHUTDOWN_GRACE.
    """

    name = 'process'
    START_TIMEOUT = 60      # seconds for a new worker to load its plugins
    TICK = 0.25             # the supervisor's housekeeping interval

    def __init__(self, config, controller=None):
        super().__init__(config, controller)
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)   # a worker got ready, freed, died
        self.workers = {}             # number -> WorkerProcess, until its channel closed
        self.departed = {}            # pid -> (worker, lost connections): exit not reported yet
        self.exits = {}               # pid -> exit text reported before the channel closed
        self.unreported = set()       # pids of workers that left cleanly, exit not reported
        self.generation = 0
        self.next_number = 1
        self.jobs = 0
        self.running = self.stopping = False
        self.stop_deadline = None
        self.pending_config = None
        self.start_failures = 0
        self.respawn_at = 0
        self.spool_scan_at = None     # when to look for spool files of dead workers again
        self.startup_failure = None
        self.restarts = {'crashed': 0, 'recycled': 0, 'stuck': 0}
        self.fork_server_pid = self.fork_server = None
        self.selector = self.thread = None
        self.logger = logging.getLogger('fuglu.procpool')
        self._read_limits(config)

    def _read_limits(self, config):
        self.processes = worker_process_count(config)
        self.minthreads, self.maxthreads = thread_limits(config)
        self.max_requests = max(0, config.getint('performance', 'max_requests_per_worker'))
        self.stuck_timeout = config.getfloat('performance', 'stuck_worker_timeout')

    # -- start-up ---------------------------------------------------------------
    def start(self):
        import selectors
        if self.controller is None:
            raise FugluError('the process backend needs the MainController')
        self._fork_fork_server()
        self.selector = selectors.DefaultSelector()
        self.wakeup_read, self.wakeup_write = socket.socketpair()
        self.wakeup_read.setblocking(False)
        self.wakeup_write.setblocking(False)
        self.selector.register(self.wakeup_read, selectors.EVENT_READ, 'wakeup')
        self.selector.register(self.fork_server, selectors.EVENT_READ, 'fork server')
        self.running = True
        self.generation = 1
        for _ in range(self.processes):
            self._spawn()
        self.thread = threading.Thread(target=self._supervise, name='procpool', daemon=True)
        self.thread.start()
        with self.lock:
            started = self.changed.wait_for(
                lambda: self.startup_failure or sum(1 for worker in self.workers.values()
                                                    if worker.ready) >= self.processes,
                self.START_TIMEOUT)
            failure = self.startup_failure
        if failure or not started:
            self.stop()
            if failure and failure[0] == 'plugins':
                raise PluginLoadError(failure[1])
            raise OSError('the worker processes did not start: %s' % (
                failure[1] if failure else 'none ready within %d s' % self.START_TIMEOUT))

    def _fork_fork_server(self):
        parent_end, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        inherited = self._parent_sockets()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            status = 70
            try:
                parent_end.close()
                for sock in inherited:
                    sock.close()
                close_main_process_fds()
                status = ForkServer(self.controller, self.config, server_end).run()
            except BaseException:
                logging.getLogger('fuglu.procpool').error('fork server failed: %s',
                                                          traceback.format_exc())
            finally:
                os._exit(status)
        server_end.close()
        self.fork_server_pid, self.fork_server = pid, parent_end

    def _parent_sockets(self):
        """The parent's own sockets, which a forked process must not keep open: the
        listeners (a port would stay bound, connections would queue where nobody
        accepts), the control and metrics sockets, the backend's channels."""
        controller = self.controller
        sockets = [listener.sock for listener in controller.listeners.values()]
        if controller.control is not None:
            sockets.append(controller.control.sock)
        if controller.metrics is not None:
            sockets.append(controller.metrics.server.socket)
        if self.selector is not None:
            sockets += [self.wakeup_read, self.wakeup_write, self.fork_server]
            sockets += [worker.channel for worker in self.workers.values()]
        return sockets

    def _spawn(self):
        """Ask the fork server for a worker of the current generation."""
        import selectors
        parent_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        number = self.next_number
        self.next_number += 1
        worker = WorkerProcess(number, self.generation, parent_end)
        try:
            send_packet(self.fork_server, ['spawn', number, self.generation],
                        fds=[worker_end.fileno()])
        except OSError as error:
            parent_end.close()
            self.logger.error('cannot start a worker: the fork server does not answer: %s', error)
            return None
        finally:
            worker_end.close()
        with self.lock:
            self.workers[number] = worker
        self.selector.register(parent_end, selectors.EVENT_READ, worker)
        return worker

    # -- connections ------------------------------------------------------------
    def submit(self, function, *args):
        raise NotImplementedError('the process backend runs connections '
                                  '(submit_connection), not functions')

    def submit_connection(self, listener, sock, peer):
        connector = listener.connector
        spec = [connector.protocol, connector.address, connector.port]
        try:
            while True:
                with self.lock:
                    worker = None
                    while self.running:
                        worker = self._least_busy()
                        if worker is not None:
                            break
                        self.changed.wait(1)
                    if worker is None:
                        refuse_queued_connection(sock)
                        self.controller.client_sessions.release(peer[0])
                        return
                    self.jobs += 1
                    job = self.jobs
                    worker.connections[job] = WorkerConnection(job, connector.protocol, peer)
                    worker.served += 1
                    recycle = (self.max_requests and worker.served >= self.max_requests and
                               not worker.retiring)
                    if recycle:
                        worker.retiring = 'recycled'
                        self.restarts['recycled'] += 1
                try:
                    send_packet(worker.channel, ['job', job, spec, list(peer)],
                                fds=[sock.fileno()], flags=socket.MSG_DONTWAIT)
                except OSError as error:
                    # a full channel (the worker is not reading) or a dead worker: another
                    with self.lock:
                        worker.connections.pop(job, None)
                        worker.served -= 1
                        worker.unusable = True
                    self.logger.warning('%s (pid %s) does not take connections (%s): another '
                                        'worker serves %s:%s', worker.name, worker.pid, error,
                                        peer[0], peer[1])
                    self._wake()
                    continue
                if recycle:
                    self._wake()
                return
        finally:
            sock.close()

    def _least_busy(self):
        best = None
        for worker in self.workers.values():
            if not worker.ready or worker.retiring or worker.killed or worker.unusable:
                continue
            load = len(worker.connections)
            if load < self.maxthreads and (best is None or load < len(best.connections)):
                best = worker
        return best

    def _wake(self):
        try:
            self.wakeup_write.send(b'.')
        except OSError:     # full: the supervisor is awake already
            pass

    # -- supervision (the 'procpool' thread) ----------------------------------------
    def _supervise(self):
        try:
            while True:
                for key, _events in self.selector.select(self.TICK):
                    if key.data == 'wakeup':
                        try:
                            while self.wakeup_read.recv(4096):
                                pass
                        except OSError:
                            pass
                    elif key.data == 'fork server':
                        self._from_fork_server()
                    else:
                        self._from_worker(key.data)
                if not self._housekeeping():
                    return
        except Exception:
            self.logger.error('process backend supervisor failed: %s', traceback.format_exc())
            self.controller.record_exception(traceback.format_exc())

    @staticmethod
    def _waiting_packets(channel):
        """The packets waiting on ``channel``, then None if the other end closed."""
        while True:
            try:
                packet = receive_packet(channel, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                packet = None
            yield packet
            if packet is None:
                return

    def _from_worker(self, worker):
        for packet in self._waiting_packets(worker.channel):
            if packet is None:
                self._worker_gone(worker)
                return
            fields, _payload, fds = packet
            for fd in fds:
                os.close(fd)
            handler = self.WORKER_PACKETS.get(fields[0])
            if handler is not None:
                handler(self, worker, *fields[1:])

    # the Statistics calls a worker may report (WorkerStatistics)
    REPLAYED_CALLS = frozenset(['received', 'plugin_time', 'plugin_error', 'verdict',
                                'count_finished'])

    def _replay(self, calls):
        stats = self.controller.stats
        for call in calls:
            if call[0] in self.REPLAYED_CALLS:
                getattr(stats, call[0])(*call[1:])

    def _on_ready(self, worker, pid, threads):
        with self.lock:
            worker.ready, worker.pid, worker.threads = True, pid, threads
            self.start_failures = 0
            current = [other for other in self.workers.values()
                       if other.generation == self.generation and not other.retiring]
            if worker.generation == self.generation and len(current) >= self.processes and \
                    all(other.ready for other in current):
                # the new generation serves: the old one finishes what it holds
                for other in self.workers.values():
                    if other.generation < self.generation and not other.retiring:
                        other.retiring = 'reload'
            self.changed.notify_all()
        self.logger.debug('%s (pid %d) ready', worker.name, pid)

    def _on_failed(self, worker, kind, text):
        worker.failure = text
        self.logger.error('%s could not start: %s', worker.name, text)
        with self.lock:
            if self.startup_failure is None and self.generation == 1 and not any(
                    other.ready for other in self.workers.values()):
                self.startup_failure = (kind, text)
            self.changed.notify_all()

    def _on_begin(self, worker, job, message_id, calls):
        self._replay(calls)
        connection = worker.connections.get(job)
        if connection is not None:
            connection.message_id, connection.message_since = message_id, time.time()
            self.controller.stats.begin(connection)

    def _on_end(self, worker, job, calls, threads):
        self._replay(calls)
        worker.threads = threads
        connection = worker.connections.get(job)
        if connection is not None:
            connection.message_since = None
            self.controller.stats.end(connection)

    def _on_done(self, worker, job, calls, threads):
        self._replay(calls)
        worker.threads = threads
        with self.lock:
            connection = worker.connections.pop(job, None)
            self.changed.notify_all()
        if connection is not None:
            self.controller.stats.end(connection)
            self.controller.client_sessions.release(connection.peer[0])

    def _on_leaving(self, worker, reason):
        with self.lock:
            worker.retiring = worker.retiring or reason
            self.changed.notify_all()

    def _on_error(self, worker, stamp, thread, trace):
        controller = self.controller
        controller.stats.error()
        controller.exceptions = (controller.exceptions + [(stamp, thread, trace)])[-10:]

    WORKER_PACKETS = {'ready': _on_ready, 'failed': _on_failed, 'begin': _on_begin,
                      'end': _on_end, 'done': _on_done, 'leaving': _on_leaving,
                      'error': _on_error}

    def _worker_gone(self, worker):
        """The worker's end of the channel closed: it exited or died."""
        try:
            self.selector.unregister(worker.channel)
        except (KeyError, ValueError):
            pass
        worker.channel.close()
        with self.lock:
            self.workers.pop(worker.number, None)
            lost = list(worker.connections.values())
            worker.connections.clear()
            if not worker.ready:
                self.start_failures += 1
                self.respawn_at = time.time() + min(30.0, 0.5 * 2 ** (self.start_failures - 1))
            elif not worker.killed and (lost or not worker.retiring):
                self.restarts['crashed'] += 1
            self.changed.notify_all()
        for connection in lost:
            if connection.message_since is not None:
                self.controller.stats.end(connection)
            self.controller.client_sessions.release(connection.peer[0])
        if worker.pid is None:
            self.logger.error('%s ended before it started', worker.name)
            return
        if worker.retiring and not worker.killed and not lost:
            # it left as told, with its work done: how it exited adds nothing
            self.logger.info('%s (pid %d) ended (%s) after %d connections', worker.name,
                             worker.pid, worker.retiring, worker.served)
            if self.exits.pop(worker.pid, None) is None:
                self.unreported.add(worker.pid)
            return
        if worker.pid in self.exits:
            self._log_exit(worker, lost, self.exits.pop(worker.pid))
        else:
            self.departed[worker.pid] = (worker, lost)

    def _from_fork_server(self):
        for packet in self._waiting_packets(self.fork_server):
            if packet is None:
                self._fork_server_gone()
                return
            fields = packet[0]
            if fields[0] == 'spawned':
                worker = self.workers.get(fields[1])
                if worker is not None and worker.pid is None:
                    worker.pid = fields[2]
            elif fields[0] == 'exited':
                pid, text = fields[1], fields[2]
                if pid in self.unreported:
                    self.unreported.discard(pid)
                elif pid in self.departed:
                    self._log_exit(*self.departed.pop(pid), exit_text=text)
                else:
                    self.exits[pid] = text

    def _fork_server_gone(self):
        import selectors
        try:
            self.selector.unregister(self.fork_server)
        except (KeyError, ValueError):
            pass
        self.fork_server.close()
        try:
            _pid, status = os.waitpid(self.fork_server_pid, 0)
            text = exit_description(status)
        except ChildProcessError:
            text = 'already reaped'
        for pid, (worker, lost) in list(self.departed.items()):
            self._log_exit(worker, lost, 'exit status unknown')
        self.departed.clear()
        if self.stopping:
            self.fork_server = None
            return
        self.logger.error('the fork server (pid %d) ended (%s): starting another one',
                          self.fork_server_pid, text)
        self._fork_fork_server()
        self.selector.register(self.fork_server, selectors.EVENT_READ, 'fork server')

    def _log_exit(self, worker, lost, exit_text):
        if worker.failure is not None:
            self.logger.error('%s (pid %d) ended (%s): it could not start', worker.name,
                              worker.pid, exit_text)
        elif lost:
            self.logger.error('%s (pid %d) died (%s) while serving %d connection(s): %s; they were '
                              'closed without an answer, the MTA will retry', worker.name,
                              worker.pid, exit_text, len(lost),
                              ', '.join(connection.label() for connection in lost))
        else:
            self.logger.error('%s (pid %d) died (%s) while idle', worker.name, worker.pid,
                              exit_text)
        # the spool files of the messages it held: unlocked now that it is gone
        self.controller.remove_stale_spool_files()
        # one it had just created is still empty and spared a while (it could be one that
        # another process is creating): look again once that while is over
        self.spool_scan_at = time.time() + SPOOL_STALE_EMPTY_SECONDS + 1

    def _kill(self, worker, reason):
        worker.killed = reason
        if worker.pid is not None:
            try:
                os.kill(worker.pid, signal.SIGKILL)
            except OSError:
                pass

    def _housekeeping(self):
        """Once a tick: apply a new configuration, kill stuck workers, tell workers to
        retire or stop, keep the worker count. False once stopped."""
        now = time.time()
        with self.lock:
            config, self.pending_config = self.pending_config, None
        if config is not None and self.fork_server is not None:
            import pickle
            try:
                send_packet(self.fork_server, ['config'], payload=pickle.dumps(config))
                self.generation += 1
            except OSError as error:
                self.logger.error('cannot pass the new configuration to the fork server: %s',
                                  error)
        for worker in list(self.workers.values()):
            if worker.killed:
                continue
            if self.stopping and not worker.ready:
                self._kill(worker, 'stopping')    # it holds no connection yet
                continue
            if not worker.ready and now - worker.started > self.START_TIMEOUT:
                self.logger.error('%s (pid %s) did not start within %d s: killing it',
                                  worker.name, worker.pid, self.START_TIMEOUT)
                self._kill(worker, 'start-up timeout')
                continue
            if self.stuck_timeout > 0:
                for connection in list(worker.connections.values()):
                    since = connection.message_since
                    if since is not None and now - since > self.stuck_timeout:
                        self.logger.error('%s (pid %s) stuck on message %s for %d s '
                                          '(stuck_worker_timeout): killing it', worker.name,
                                          worker.pid, connection.message_id, now - since)
                        self.restarts['stuck'] += 1
                        self._kill(worker, 'stuck')
                        break
            if worker.killed:
                continue
            order = 'stop' if self.stopping else 'retire' if worker.retiring else None
            if order and worker.told != order and worker.ready:
                worker.told = order
                try:
                    send_packet(worker.channel, [order])
                except OSError:
                    pass
        if self.spool_scan_at is not None and now >= self.spool_scan_at:
            self.spool_scan_at = None
            self.controller.remove_stale_spool_files()
        if self.stopping:
            if not self.workers:
                return self._stop_fork_server()
            if now > self.stop_deadline:
                for worker in list(self.workers.values()):
                    self.logger.error('%s (pid %s) still busy after the grace period: killing it',
                                      worker.name, worker.pid)
                    self._kill(worker, 'stopping')
                self.stop_deadline = now + 5
            return True
        if self.running and now >= self.respawn_at and self.fork_server is not None:
            with self.lock:
                current = sum(1 for worker in self.workers.values()
                              if worker.generation == self.generation and not worker.retiring and
                              not worker.killed and not worker.unusable)
            for _ in range(self.processes - current):
                if self._spawn() is None:
                    break
        return True

    def _stop_fork_server(self):
        if self.fork_server is not None:
            try:
                send_packet(self.fork_server, ['exit'])
            except OSError:
                pass
            deadline = time.time() + 5
            while True:
                try:
                    pid, _status = os.waitpid(self.fork_server_pid, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid:
                    break
                if time.time() > deadline:
                    os.kill(self.fork_server_pid, signal.SIGKILL)
                    deadline = time.time() + 5
                time.sleep(0.01)
            self.fork_server.close()
            self.fork_server = None
        for pid, (worker, lost) in list(self.departed.items()):
            self._log_exit(worker, lost, self.exits.pop(pid, 'exit status unknown'))
        self.departed.clear()
        self.selector.close()
        self.wakeup_read.close()
        self.wakeup_write.close()
        return False

    # -- the rest of the Backend contract ---------------------------------------------
    def stop(self):
        with self.lock:
            if self.stopping or self.thread is None:
                self.running = False
                self.changed.notify_all()
                return
            self.running = False
            self.stopping = True
            self.stop_deadline = time.time() + ThreadBackend.SHUTDOWN_GRACE + 2
            for worker in self.workers.values():
                worker.retiring = worker.retiring or 'stop'
            self.changed.notify_all()
        self._wake()
        self.thread.join(ThreadBackend.SHUTDOWN_GRACE + 20)

    def reconfigure(self, config):
        super().reconfigure(config)
        with self.lock:
            self._read_limits(config)
            self.pending_config = config
        self._wake()

    def reopen_logs(self):
        for channel in [self.fork_server] + [worker.channel for worker in
                                             list(self.workers.values())]:
            try:
                send_packet(channel, ['reopen'])
            except (OSError, AttributeError):
                pass

    def worker_usage(self):
        with self.lock:
            busy = sum(len(worker.connections) for worker in self.workers.values())
            ready = sum(1 for worker in self.workers.values()
                        if worker.ready and not worker.retiring)
            return busy, ready * self.maxthreads, self.processes * self.maxthreads

    def thread_count(self):
        with self.lock:
            return threading.active_count() + sum(worker.threads
                                                  for worker in self.workers.values())

    def describe(self):
        now = time.time()
        with self.lock:
            workers = sorted(self.workers.values(), key=lambda worker: worker.number)
            lines = ['Total %d worker processes (generation %d), %d connections' % (
                len(workers), self.generation,
                sum(len(worker.connections) for worker in workers))]
            for worker in workers:
                lines.append('*******')
                lines.append('<[%s]>: pid %s, %s, %d connections, %d served, up %.1f s' % (
                    worker.name, worker.pid, worker.state(), len(worker.connections),
                    worker.served, now - worker.started))
                for connection in sorted(worker.connections.values(), key=lambda c: c.job):
                    line = '    %s:%s %s, connected %.1f s' % (
                        connection.peer[0], connection.peer[1], connection.protocol,
                        now - connection.since)
                    if connection.message_since is not None:
                        line += ', message %s for %.1f s' % (connection.message_id,
                                                             now - connection.message_since)
                    lines.append(line)
        return '\n'.join(lines)


BACKENDS = {
    'thread': ThreadBackend,
    'process': ProcessBackend,
    'asyncprocess': ProcessBackend,   # FuGlu's asyncio process backend: served by ours
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
    """One listening socket with its accept thread. ``__init__`` binds (the daemon does
    that before dropping privileges, so ports below 1024 work); ``start(connector)``
    starts accepting, and the backend runs ``connector.handle`` for every connection."""

    def __init__(self, controller, address, port, backlog):
        self.controller = controller
        self.connector = None
        self.logger = logging.getLogger('fuglu.incoming.%s' % port)
        family = socket.AF_INET6 if ':' in address else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((address, port))
            self.sock.listen(backlog if backlog > 0 else socket.SOMAXCONN)
        except OSError:
            self.sock.close()
            raise
        self.stay_alive = True
        self.thread = threading.Thread(target=self.serve, name='listener-%s' % port)
        self.thread.daemon = True

    def start(self, connector):
        self.connector = connector
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
            self.controller.backend.submit_connection(self, sock, peer)
            waited = (time.time() - started) * 1000
            if warn_ms and waited > warn_ms:
                self.logger.warning('handing a connection to the workers took %d ms: all busy?',
                                    waited)

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

def control_socket_path(config):
    """The unix control socket of ``config`` (None for a TCP port or none at all), moved
    out of a world-writable directory (see "Files in shared directories")."""
    spec = config.get('main', 'controlport').strip()
    if not spec or spec.isdigit():
        return None
    return shared_file_path(spec, 'run')


def unix_socket_answers(path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(path)
            return True
        except OSError:
            return False


class ControlServer(object):
    """The control socket (FuGlu's): one command per connection, a text reply.

    ``__init__`` binds (before privileges are dropped; a unix socket is created with
    mode 0600 and given to the daemon user ``owner``), ``start()`` serves, ``stop()``
    closes and removes the socket file. A TCP port needs controltoken unless it is
    bound to loopback. Commands are the ``command_<name>`` methods; there is no remote
    Python console."""

    def __init__(self, controller, owner=None):
        self.controller = controller
        config = controller.config
        self.logger = logging.getLogger('fuglu.control')
        self.spec = config.get('main', 'controlport').strip()
        self.token = config.get('main', 'controltoken').strip()
        self.unix_path = None
        self._unix_inode = None
        if self.spec.isdigit():
            address = config.get('main', 'controladdress').strip() or '127.0.0.1'
            if not is_loopback_address(address) and not self.token:
                raise ConfigProblem('controlport %s on %s needs controltoken'
                                    % (self.spec, address))
            family = socket.AF_INET6 if ':' in address else socket.AF_INET
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((address, int(self.spec)))
        else:
            self.unix_path = control_socket_path(config)
            self.sock = self._bind_unix(self.unix_path, owner)
        self.sock.listen(16)
        self.thread = threading.Thread(target=self.serve, name='control')
        self.thread.daemon = True
        self.running = True

    def _bind_unix(self, path, owner):
        directory, name = os.path.split(path)
        if path != os.path.abspath(self.spec):
            prepare_shared_home(directory, 'run', owner)
        owners = {0, os.geteuid()} | ({owner[0]} if owner else set())
        dir_fd = open_directory(directory, owners=owners)
        try:
            try:
                info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                info = None
            if info is not None:
                # a socket left by an earlier fuglu is replaced; anything else is not ours to remove
                if not stat.S_ISSOCK(info.st_mode):
                    raise ConfigProblem('controlport %s exists and is not a socket: remove it or '
                                        'choose another path' % path)
                if info.st_uid not in owners:
                    raise ConfigProblem('controlport %s belongs to uid %d, not to fuglu'
                                        % (path, info.st_uid))
                if unix_socket_answers(path):
                    raise ConfigProblem('controlport %s is in use by a running fuglu' % path)
                os.unlink(name, dir_fd=dir_fd)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old_umask = os.umask(0o177)
            try:
                sock.bind(path)
            except OSError:
                sock.close()
                raise
            finally:
                os.umask(old_umask)
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            self._unix_inode = (info.st_dev, info.st_ino)
            if owner is not None and os.geteuid() == 0:
                os.chown(name, owner[0], owner[1], dir_fd=dir_fd, follow_symlinks=False)
            return sock
        finally:
            os.close(dir_fd)

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
        method = getattr(self, 'command_' + command, None) if command.isidentifier() else None
        if method is None:
            return 'ERR no such command: %s\n' % command
        return method(args.strip())

    # -- commands: the first docstring line is the `help` text --------------------
    def command_help(self, args):
        """this list"""
        lines = ['Commands:']
        for name in sorted(dir(self)):
            if name.startswith('command_'):
                doc = (getattr(self, name).__doc__ or '').strip().splitlines()[0]
                lines.append('%-14s %s' % (name[len('command_'):], doc))
        return '\n'.join(lines) + '\n'

    def command_stats(self, args):
        """message counters and the average scan time"""
        return self.controller.stats.report()

    def command_uptime(self, args):
        """when fuglu started and how long ago"""
        start = self.controller.stats.starttime
        return 'Fuglu was started on %s\nuptime: %s\n' % (
            time.strftime('%Y-%m-%d %H:%M:%S',
                          time.localtime(start)), format_duration(time.time() - start))

    def command_workerlist(self, args):
        """the workers and what each one does"""
        return self.controller.backend.describe() + '\n'

    def command_threadlist(self, args):
        """every thread of the process"""
        threads = threading.enumerate()
        return '\n'.join(['Total %d Threads' % len(threads)] + [
            'name=%s alive=%s daemon=%s' % (t.name, t.is_alive(),
                                            t.daemon) for t in threads]) + '\n'

    def command_exceptionlist(self, args):
        """the last 10 errors with their tracebacks"""
        return '\n\n'.join('%s %s\n%s' % (time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(stamp)),
                                          thread,
                                            trace)
                            for stamp, thread, trace in self.controller.exceptions) + '\n'

    def command_metrics(self, args):
        """the counters in Prometheus text format"""
        return metrics_text(self.controller)

    def stop(self):
        self.running = False
        try:
            self.sock.close()
        except OSError:
            pass
        if self.unix_path:
            # only our own socket: a later fuglu may have replaced it meanwhile
            try:
                info = os.stat(self.unix_path, follow_symlinks=False)
                if (info.st_dev, info.st_ino) == self._unix_inode:
                    os.unlink(self.unix_path)
            except FileNotFoundError:
                pass
            except OSError as error:
                self.logger.warning('cannot remove the control socket %s: %s', self.unix_path,
                                    error)


###############################################################################
# Monitoring: Prometheus metrics, MRTG files
###############################################################################

def prometheus_label(value):
    return str(value).replace('\\', '\\\\').replace('"', '\\"').replace('\n', '\\n')


def metrics_text(controller):
    """The counters in the Prometheus text exposition format (version 0.0.4)."""
    stats = controller.stats
    out = []

    def metric(name, kind, help_text, samples):
        out.append('# HELP %s %s' % (name, help_text))
        out.append('# TYPE %s %s' % (name, kind))
        for labels, value in samples:
            label_text = ','.join('%s="%s"' % (key, prometheus_label(val)) for key, val in labels)
            out.append('%s%s %s' % (name, '{%s}' % label_text if label_text else '',
                                    repr(float(value))
                                    if isinstance(value, float) else value))

    busy, running, most = controller.backend.worker_usage() if controller.backend else (0, 0, 0)
    with stats.lock:
        verdicts = sorted(stats.verdicts.items())
        plugin_times = sorted(stats.plugin_times.items())
        plugin_errors = sorted(stats.plugin_errors.items())
        counters = [('received', stats.incount), ('delivered', stats.outcount),
                    ('ham', stats.hamcount),
                    ('spam', stats.spamcount), ('virus', stats.viruscount),
                    ('blocked', stats.blockedcount)]
        in_flight = len(stats.in_flight)
        errors = stats.errors
    metric('fuglu_info', 'gauge', 'fuglu version and identifier.',
           [((('version', __version__),
              ('identifier', controller.config.get('main', 'identifier'))), 1)])
    metric('fuglu_uptime_seconds', 'gauge', 'Seconds since fuglu started.',
           [((), round(time.time() - stats.starttime, 3))])
    metric('fuglu_messages_total', 'counter',
           'Messages scanned, by verdict (DEFER includes messages that could not be delivered).',
           [((('verdict', name.lower()),), count) for name, count in verdicts])
    metric('fuglu_messages_counted_total', 'counter',
           'Messages as counted by control stats and MRTG.',
           [((('kind', kind),), count) for kind, count in counters])
    metric('fuglu_messages_in_flight', 'gauge', 'Messages being scanned or delivered right now.',
           [((), in_flight)])
    metric('fuglu_plugin_seconds_total', 'counter', 'Time spent in each plugin.',
           [((('stage', stage), ('plugin', plugin)), round(runs_seconds[1], 6))
            for (stage, plugin), runs_seconds in plugin_times])
    metric('fuglu_plugin_runs_total', 'counter', 'Plugin runs.',
           [((('stage', stage), ('plugin', plugin)), runs_seconds[0])
            for (stage, plugin), runs_seconds in plugin_times])
    metric('fuglu_plugin_errors_total', 'counter', 'Exceptions raised by each plugin.',
           [((('plugin', plugin),), count) for plugin, count in plugin_errors])
    metric('fuglu_errors_total', 'counter', 'Errors recorded (control exceptionlist).',
           [((), errors)])
    metric('fuglu_workers', 'gauge', 'Workers by state; "limit" is the most the backend starts.',
           [((('state', 'busy'),), busy), ((('state', 'idle'),), running - busy),
            ((('state', 'limit'),), most)])
    restarts = getattr(controller.backend, 'restarts', None)
    if restarts is not None:
        metric('fuglu_worker_restarts_total', 'counter',
               'Worker processes replaced, by reason (process backend).',
               [((('reason', reason),), count) for reason, count in sorted(restarts.items())])
    return '\n'.join(out) + '\n'


def parse_loopback_listen(value):
    """main.metrics_listen: 'port' or 'address:port' on a loopback address -> (address,
    port); ValueError otherwise (the metrics carry no authentication)."""
    value = value.strip()
    if value.isdigit():
        address, port = '127.0.0.1', value
    else:
        address, _, port = value.rpartition(':')
        address = address.strip('[]')
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError('metrics_listen %r: expected [loopback address:]port' % value)
    if not is_loopback_address(address):
        raise ValueError('metrics_listen %r: only a loopback address is allowed (no '
                         'authentication)' % value)
    return address, int(port)


class MetricsServer(object):
    """The optional HTTP listener of main.metrics_listen: GET /metrics answers
    metrics_text(). Bound by ``__init__`` (before privileges are dropped), served by
    ``start()`` in a thread, closed by ``stop()``."""

    def __init__(self, controller):
        from http.server import BaseHTTPRequestHandler, HTTPServer
        address, port = parse_loopback_listen(controller.config.get('main', 'metrics_listen'))

        class Handler(BaseHTTPRequestHandler):
            def do_GET(handler):
                if handler.path.split('?')[0] not in ('/metrics', '/'):
                    handler.send_error(404)
                    return
                body = metrics_text(controller).encode('utf-8')
                handler.send_response(200)
                handler.send_header('Content-Type', 'text/plain; version=0.0.4; charset=utf-8')
                handler.send_header('Content-Length', str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)

            def log_message(handler, *args):
                pass

        class Server(HTTPServer):
            address_family = socket.AF_INET6 if ':' in address else socket.AF_INET

        self.server = Server((address, port), Handler)
        self.address = '%s:%d' % (address, port)
        self.thread = threading.Thread(target=self.serve, name='metrics', daemon=True)

    def start(self):
        self.thread.start()

    def serve(self):
        """socketserver's request handling with an accept loop of our own: stop() ends
        it at once, as a Listener's (serve_forever would notice within half a second)."""
        server = self.server
        while True:
            try:
                request, client = server.get_request()
            except OSError:     # stop()
                return
            try:
                server.process_request(request, client)
            except Exception:   # as serve_forever: the next request is served all the same
                server.handle_error(request, client)
                server.shutdown_request(request)

    def stop(self):
        try:
            self.server.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self.thread.is_alive():
            self.thread.join(5)
        self.server.server_close()


def mrtg_uptime(seconds):
    """FuGlu's MRTG uptime text: '1 day, 2 hours, 0 minutes, 5 seconds' (leading zero
    units left out)."""
    seconds = int(seconds)
    parts, started = [], False
    for size, unit in ((86400, 'day'), (3600, 'hour'), (60, 'minute')):
        count, seconds = divmod(seconds, size)
        if count or started:
            started = True
            parts.append('%d %s%s' % (count, unit, '' if count == 1 else 's'))
    parts.append('%d second%s' % (seconds, '' if seconds == 1 else 's'))
    return ', '.join(parts)


class MrtgWriter(object):
    """main.mrtgdir: every main.mrtg_interval seconds the files inout, hamspam,
    threads, virus and scantime are replaced, each with FuGlu's four lines: value,
    second value (or 0), uptime, 'FuGLU'."""

    IDENTIFIER = 'FuGLU'

    def __init__(self, controller, directory):
        self.controller = controller
        self.directory = directory
        self.interval = max(controller.config.getfloat('main', 'mrtg_interval'), 0.1)
        self.logger = logging.getLogger('fuglu.stats')
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, name='mrtg', daemon=True)

    def start(self):
        self.thread.start()

    def run(self):
        self.logger.info('writing MRTG statistics to %s every %g s', self.directory, self.interval)
        while not self.stopped.wait(self.interval):
            try:
                self.write()
            except OSError as error:
                self.logger.error('cannot write the MRTG files in %s: %s', self.directory, error)

    def files(self):
        stats = self.controller.stats
        uptime = mrtg_uptime(time.time() - stats.starttime)
        average = '%.4f' % stats.average_scantime() if stats.average_scantime() else '0'
        backend = self.controller.backend
        threads = backend.thread_count() if backend else threading.active_count()
        with stats.lock:
            values = {'inout': (float(stats.incount), float(stats.outcount)),
                      'hamspam': (float(stats.hamcount), float(stats.spamcount)),
                      'threads': (threads, 0),
                      'virus': (float(stats.viruscount), 0),
                      'scantime': (average, 0)}
        return {name: ('%s\n%s\n%s\n%s\n' % (first, second or 0, uptime, self.IDENTIFIER)).encode()
                for name, (first, second) in values.items()}

    def write(self):
        dir_fd = open_directory(self.directory)
        try:
            for name, data in sorted(self.files().items()):
                write_file_at(dir_fd, name, data, mode=0o644)
        finally:
            os.close(dir_fd)

    def stop(self):
        self.stopped.set()


###############################################################################
# Daemon
###############################################################################
# The process around the MainController, in functions any backend can call: who the
# daemon runs as (service_account, drop_privileges), the pid file (PidFile), telling
# the starter how start-up went (daemonize, StartupReport, notify_service_manager:
# systemd's sd_notify) and the logs (setup_logging, reopen_log_files).
#
# Start-up order (start_daemon): the pid file, every listening socket (ports below 1024
# need root), the control socket, the metrics listener and the directories shared
# paths were moved to are made as root; the plugin modules are imported; then
# privileges are dropped, in every mode (-f too), before logging opens its files and
# before the plugins are created and the first connection is accepted. What the
# daemon must remove at exit belongs to its user.

class ServiceAccount(object):
    """The account a root-started fuglu becomes: main.user and the first existing
    group of main.group (the user's own group when that option is empty or names no
    existing group: ``group_problem`` says so)."""

    def __init__(self, name, uid, gid, groups, group_problem=None):
        self.name, self.uid, self.gid, self.groups = name, uid, gid, groups
        self.group_problem = group_problem

    @property
    def owner(self):
        return self.uid, self.gid


def service_account(config):
    """ServiceAccount of main.user/main.group; ConfigProblem when the user does not
    exist."""
    import grp
    import pwd
    name = config.get('main', 'user').strip() or 'nobody'
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ConfigProblem('%s: user %s does not exist' % (config.where('main', 'user'), name))
    groups = parse_list(config.get('main', 'group'))
    gid, problem = entry.pw_gid, None
    for group in groups:
        try:
            gid = grp.getgrnam(group).gr_gid
            break
        except KeyError:
            continue
    else:
        if groups:
            try:
                own = grp.getgrgid(gid).gr_name
            except KeyError:
                own = str(gid)
            problem = '%s: none of the groups %s exists: user %s\'s own group %s is used' % (
                config.where('main', 'group'), ', '.join(groups), name, own)
    return ServiceAccount(name, entry.pw_uid, gid, os.getgrouplist(name, gid), problem)


def drop_privileges(account):
    """Become ``account`` when running as root (supplementary groups, group, user:
    for good, the saved ids too). Returns True when the identity changed."""
    if os.geteuid() != 0 or account.uid == 0:
        return False
    os.setgroups(account.groups)
    os.setresgid(account.gid, account.gid, account.gid)
    os.setresuid(account.uid, account.uid, account.uid)
    if os.geteuid() != account.uid or os.getuid() != account.uid:
        raise OSError('could not become %s' % account.name)
    # helpers the daemon starts find the user's home, not root's
    import pwd
    os.environ['HOME'] = pwd.getpwuid(account.uid).pw_dir
    return True


def readable_by(path, account):
    """Whether ``account`` may read ``path`` and enter every folder on the way, by the
    permission bits (ACLs are not looked at)."""
    if account.uid == 0:
        return True
    path = os.path.abspath(path)
    parts = path.split('/')
    for index in range(1, len(parts) + 1):
        current = '/'.join(parts[:index]) or '/'
        try:
            info = os.stat(current)
        except OSError:
            return False
        need = 0o1 if index < len(parts) else (0o5 if stat.S_ISDIR(info.st_mode) else 0o4)
        if info.st_uid == account.uid:
            bits = info.st_mode >> 6
        elif info.st_gid == account.gid or info.st_gid in account.groups:
            bits = info.st_mode >> 3
        else:
            bits = info.st_mode
        if bits & need != need:
            return False
    return True


# Standard library modules fuglu and its bundled plugins import on first use, and the
# codecs mail may need. A Python installed where only root can read (pyenv under
# /root) cannot import them once fuglu runs as main.user: preload_modules() imports
# them before the privilege drop in that case.
PRELOAD_MODULES = (
    'email.parser', 'email.feedparser', 'email.policy', 'email.utils', 'email.generator',
    'email.header',
    'email.headerregistry', 'email._header_value_parser', 'email.message', 'email.charset',
    'email.encoders', 'email.iterators', 'email.contentmanager', 'email.mime.multipart',
    'email.mime.text',
    'email.mime.application', 'email.mime.base', 'email.mime.nonmultipart', 'quopri', 'base64',
    'html', 'html.parser', 'zipfile', 'tarfile', 'gzip', 'bz2', 'lzma', 'json', 'hmac', 'hashlib',
    'mimetypes', 'http.server', 'logging.handlers', 'logging.config', 'weakref', 'glob', 'fcntl',
    'tempfile', 'ctypes', 'calendar', 'datetime', 'locale', 'random', 'uuid', 'unicodedata',
    'importlib.util', 'subprocess', 'select', 'selectors', 'socketserver', 'argparse', 'shutil',
    'asyncio', 'email.mime.message', 'encodings.aliases', 'errno', 'functools', 'grp',
    'importlib.machinery', 'io', 'pkgutil', 'pwd', 'smtplib', 'sqlite3', 'types',
    'urllib.parse', 'inspect', 'array', 'pickle')


def preload_modules(account):
    """Import PRELOAD_MODULES and every codec when ``account`` cannot read the
    standard library; returns the number of modules imported."""
    if readable_by(os.path.dirname(os.__file__), account):
        return 0
    import encodings
    import pkgutil
    codecs = ['encodings.' + info.name for info in pkgutil.iter_modules(encodings.__path__)]
    names = list(PRELOAD_MODULES) + codecs
    loaded = 0
    for name in names:
        try:
            importlib.import_module(name)
            loaded += 1
        except Exception:   # a codec of another platform (mbcs), a module this Python lacks
            continue
    return loaded


# Descriptors only the daemon's main process may keep: the pid file and the pipe to the
# process waiting for start-up (daemonize). The processes the process backend forks close
# them: a copy of that pipe would keep the starter waiting for ever.
MAIN_PROCESS_FDS = set()


def close_main_process_fds():
    """In a process forked from the daemon: close MAIN_PROCESS_FDS."""
    for fd in list(MAIN_PROCESS_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    MAIN_PROCESS_FDS.clear()


class AlreadyRunning(FugluError):
    """The pid file names a fuglu that is still running."""


class PidFile(object):
    """A pid file that proves a running fuglu: opened without following a link, locked
    (fcntl) for the life of the process, never rewritten while another process holds
    the lock, removed at exit (emptied when its directory does not let the daemon user
    remove it). A path in a world-writable directory is moved (shared_file_path)."""

    def __init__(self, path):
        self.path = shared_file_path(path, 'run')
        self.configured = path
        self.dir_fd = self.fd = None

    def acquire(self, owner=None):
        """Create and lock; AlreadyRunning when another process holds the lock."""
        import fcntl
        directory, name = os.path.split(self.path)
        if self.path != os.path.abspath(self.configured):
            prepare_shared_home(directory, 'run', owner)
        owners = {0, os.geteuid()} | ({owner[0]} if owner else set())
        self.dir_fd = open_directory(directory, owners=owners)
        flags = os.O_RDWR | os.O_CREAT | O_NOFOLLOW | O_CLOEXEC
        try:
            fd = os.open(name, flags, 0o644, dir_fd=self.dir_fd)
        except OSError as error:
            self._close_dir()
            raise UnsafeLocation('pid file %s: %s' % (self.path, error.strerror or error))
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_uid not in owners:
            os.close(fd)
            self._close_dir()
            raise UnsafeLocation('pid file %s is not a plain file of fuglu\'s own' % self.path)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            running = os.pread(fd, 32, 0).decode('ascii', 'replace').strip()
            os.close(fd)
            self._close_dir()
            raise AlreadyRunning('fuglu is already running (pid %s, pid file %s)' % (running or '?',
                                                                                     self.path))
        os.ftruncate(fd, 0)
        os.pwrite(fd, ('%d\n' % os.getpid()).encode(), 0)
        os.fchmod(fd, 0o644)
        self.fd = fd
        MAIN_PROCESS_FDS.update((fd, self.dir_fd))
        return self

    def _close_dir(self):
        if self.dir_fd is not None:
            MAIN_PROCESS_FDS.discard(self.dir_fd)
            os.close(self.dir_fd)
            self.dir_fd = None

    def release(self):
        """Remove the pid file (only our own) and give up the lock."""
        if self.fd is None:
            return
        name = os.path.basename(self.path)
        try:
            mine = os.fstat(self.fd)
            current = os.stat(name, dir_fd=self.dir_fd, follow_symlinks=False)
            if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                os.unlink(name, dir_fd=self.dir_fd)
        except FileNotFoundError:
            pass
        except OSError:
            os.ftruncate(self.fd, 0)   # an empty pid file names no process
        MAIN_PROCESS_FDS.discard(self.fd)
        os.close(self.fd)
        self.fd = None
        self._close_dir()


def notify_service_manager(*fields):
    """sd_notify(3), written with the standard library: the ``KEY=value`` fields as one
    datagram to the unix socket named in $NOTIFY_SOCKET (a path, or an abstract name
    starting with '@'). Nothing happens outside systemd's Type=notify. True when sent."""
    address = os.environ.get('NOTIFY_SOCKET', '')
    if not address or address[0] not in '/@':
        return False
    if address[0] == '@':
        address = '\0' + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall('\n'.join(fields).encode('utf-8'))
        return True
    except OSError as error:
        logging.getLogger('fuglu.main').warning('cannot notify the service manager at %s: %s',
                                                os.environ.get('NOTIFY_SOCKET'), error)
        return False


def monotonic_usec():
    """CLOCK_MONOTONIC in microseconds (what systemd wants with RELOADING=1)."""
    if hasattr(time, 'clock_gettime_ns'):
        return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return int(time.monotonic() * 1000000)


class StartupReport(object):
    """How start-up went, for whoever waits for it: the parent of a daemonized fuglu
    (through a pipe; it exits with the status it reads) and systemd (sd_notify).
    ``ready(status_text)`` once fuglu serves, ``failed(message, status)`` otherwise."""

    def __init__(self, pipe_fd=None):
        self.pipe_fd = pipe_fd

    def _tell_parent(self, text):
        if self.pipe_fd is None:
            return
        try:
            os.write(self.pipe_fd, text.encode('utf-8', 'replace'))
        except OSError:
            pass
        MAIN_PROCESS_FDS.discard(self.pipe_fd)
        os.close(self.pipe_fd)
        self.pipe_fd = None

    def ready(self, status_text=''):
        self._tell_parent('READY\n')
        notify_service_manager('READY=1', 'MAINPID=%d' % os.getpid(), 'STATUS=%s' % status_text)

    def failed(self, message, status=1):
        self._tell_parent('FAILED %d %s\n' % (status, one_line(message, 2000)))
        notify_service_manager('STATUS=start-up failed: %s' % one_line(message, 200),
                               'ERRNO=%d' % status)


def daemonize():
    """Double fork into a new session. The original process stays until the daemon
    reports through its StartupReport, prints a failure on stderr and exits with the
    daemon's status: 0 once it serves, the failure's exit code otherwise. Returns the
    daemon's StartupReport."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child:
        os.close(write_fd)
        chunks = []
        while True:
            chunk = os.read(read_fd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
        os.waitpid(child, 0)
        answer = b''.join(chunks).decode('utf-8', 'replace')
        if answer.startswith('READY'):
            os._exit(0)
        status, message = 1, 'fuglu ended during start-up without saying why (see its log)'
        if answer.startswith('FAILED '):
            parts = answer.rstrip('\n').split(' ', 2)
            status, message = int(parts[1]), parts[2] if len(parts) > 2 else ''
        sys.stderr.write('fuglu did not start: %s\n' % message)
        sys.stderr.flush()
        os._exit(status if 0 < status < 256 else 1)
    os.close(read_fd)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir('/')
    os.umask(0o077)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)
    os.set_inheritable(write_fd, False)
    MAIN_PROCESS_FDS.add(write_fd)
    return StartupReport(write_fd)


FOREGROUND_LOG_FORMAT = '[%(process)d] %(asctime)s : %(name)s: %(levelname)s, %(message)s'
FILE_LOG_FORMAT = '%(asctime)s %(name)-12s: %(levelname)s %(message)s'
SYSLOG_FORMAT = 'fuglu[%(process)d]: %(name)s: %(levelname)s %(message)s'
DAEMON_LOG_FILE = '/var/log/fuglu/fuglu.log'


def setup_logging(config, logconfig, foreground, baseloglevel):
    """The daemon's logging, set up after privileges were dropped, so that its files
    belong to the daemon user and SIGHUP can reopen them: ``logconfig`` (a
    logging.fileConfig file) if given, else stderr in the foreground and
    DAEMON_LOG_FILE when daemonized; main.syslog adds the local syslog.
    Returns a description for the start-up log line."""
    root = logging.getLogger()
    for handler in list(root.handlers):   # the start-up handler on stderr
        root.removeHandler(handler)
    # our formats name no source file, line or function: skip finding the caller's
    # frame for every record (the costliest part of a log call)
    logging._srcfile = None
    logging.logMultiprocessing = False
    level = getattr(logging, baseloglevel.upper(), logging.INFO)
    if logconfig:
        from logging import config as logging_config
        logging_config.fileConfig(logconfig, disable_existing_loggers=False)
        target = 'logging configured from %s' % logconfig
    else:
        root.setLevel(level)
        if foreground:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(FOREGROUND_LOG_FORMAT))
            target = 'logging to stderr'
        else:
            handler = logging.FileHandler(DAEMON_LOG_FILE)
            handler.setFormatter(logging.Formatter(FILE_LOG_FORMAT))
            target = 'logging to %s' % DAEMON_LOG_FILE
        root.addHandler(handler)
    if config.getboolean('main', 'syslog'):
        root.addHandler(syslog_handler(config))
        target += ' and to syslog (facility %s)' % config.get('main', 'syslog_facility').strip()
    return target


def syslog_handler(config):
    from logging.handlers import SysLogHandler
    facility = config.get('main', 'syslog_facility').strip().lower()
    if facility not in SysLogHandler.facility_names:
        raise ConfigProblem('%s: unknown syslog facility %r' % (config.where('main',
                                                                             'syslog_facility'),
                                                                facility))
    handler = SysLogHandler(address=config.get('main', 'syslog_address').strip(),
                            facility=SysLogHandler.facility_names[facility])
    handler.setFormatter(logging.Formatter(SYSLOG_FORMAT))
    return handler


def log_handlers():
    handlers = list(logging.getLogger().handlers)
    for logger in list(logging.Logger.manager.loggerDict.values()):
        handlers.extend(getattr(logger, 'handlers', []))
    return handlers


def reopen_log_files():
    """Every log file handler opens its file again (kill -HUP after logrotate moved
    the files). Returns the paths reopened."""
    reopened = []
    for handler in log_handlers():
        if not isinstance(handler, logging.FileHandler):
            continue
        handler.acquire()
        try:
            if handler.stream is not None:
                handler.stream.flush()
                handler.stream.close()
            handler.stream = handler._open()
            reopened.append(handler.baseFilename)
        except OSError as error:
            handler.stream = None
            logging.getLogger('fuglu.main').error('cannot reopen log file %s: %s',
                                                  handler.baseFilename, error)
        finally:
            handler.release()
    return reopened


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
    control server. ``bind(owner)`` makes the sockets and directories that need
    root, ``startup()`` brings up the rest (and binds first when nobody did),
    ``reload()`` applies a changed configuration (SIGHUP), ``shutdown()`` ends it:
    every step runs even when an earlier one failed, and mail in flight gets
    the backend's grace period."""

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
        self.metrics = None
        self.mrtg = None
        self.bound = False
        self.owner = None
        self.stayalive = True
        self.trusted_networks = None
        # SMTP sessions, so shutdown can wake those waiting for a command
        self.smtp_sessions = set()
        self.downstream_pool = DownstreamPool()
        self.client_sessions = ClientSessions(self)
        self._apply_trusted(config)
        use_safe_log_records()

    def _apply_trusted(self, config):
        value = config.get('main', 'trusted_xforward_peers').strip()
        self.trusted_networks = parse_networks(value) if value else None
        # the address check Suspect() applies, as the connectors do
        Addrcheck().set(config.get('main', 'address_compliance_checker').strip(),
                        config.getint('main', 'address_compliance_checker_maxsize'))

    def record_exception(self, trace):
        self.stats.error()
        self.exceptions = (self.exceptions + [(time.time(), threading.current_thread().name,
                                               trace)])[-10:]

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
    def bind(self, owner=None):
        """The part of start-up that may need root: every listening socket, the
        control socket and the metrics listener, the directories shared paths were
        moved to (given to ``owner``, the daemon user's (uid, gid)), and importing
        the plugin modules (so fuglu may live where only root can read)."""
        config = self.config
        self.owner = owner
        self.bound = True
        raise_errors(check_listeners(config))
        for protocol, address, port in self.listen_specs():
            self.bind_listener(protocol, address, port)
        for directory, home in shared_homes_needed(config):
            prepare_shared_home(directory, home, owner)
        if config.get('main', 'controlport').strip():
            self.control = ControlServer(self, owner)
        if config.get('main', 'metrics_listen').strip():
            self.metrics = MetricsServer(self)
        add_plugin_dirs(config)
        for option in ('plugins', 'prependers', 'appenders', 'mplugins'):
            for name, _section in split_plugin_list(config.get('main', option)):
                resolve_plugin_class(name, config)

    def bind_listener(self, protocol, address, port):
        try:
            listener = Listener(self, address, port,
                                self.config.getint('performance', 'listen_backlog'))
        except OSError as error:
            raise OSError('cannot listen on %s:%s:%d: %s' % (protocol, address, port,
                                                             error.strerror or error))
        self.listeners[(protocol, address, port)] = listener
        return listener

    def startup(self):
        config = self.config
        if not self.bound:
            self.bind()
        self.logger.info('fuglu %s, configuration %s', __version__,
                         config.get('main', 'identifier'))
        self.plugins, self.prependers, self.appenders = self.load_plugins()
        self.logger.info('plugins: scanners=%s prependers=%s appenders=%s',
                         [str(p) for p in self.plugins], [str(p) for p in self.prependers],
                         [str(p) for p in self.appenders])
        self.logger.info(runtime_config_summary(config))
        log_findings(self.logger, startup_findings(config, self.plugins + self.prependers +
                                                   self.appenders))
        raise_errors(check_backend(config))
        self.remove_stale_spool_files()
        backend_name = config.get('performance', 'backend').strip().lower()
        self.backend = BACKENDS[backend_name](config, self)
        self.backend.start()
        self.logger.info('%s', describe_backend(config))
        if self.trusted_networks is None and any(
                not is_loopback_address(address) for _, address, _ in self.listen_specs()):
            self.logger.warning('trusted_xforward_peers is empty: every client may supply client '
                                'information')
        for spec, listener in self.listeners.items():
            self.start_listener(spec, listener)
        if self.control is not None:
            self.control.start()
            self.logger.info('control socket listening on %s',
                             self.control.unix_path or self.control.spec)
        if self.metrics is not None:
            self.metrics.start()
            self.logger.info('Prometheus metrics on http://%s/metrics', self.metrics.address)
        self.start_mrtg()
        self.logger.info('Startup complete')

    def remove_stale_spool_files(self):
        """Spool files a fuglu process left when it died mid-message (see "Message
        spool"): Postfix never had a 250 for them and sends them again."""
        tempdir = self.config.get('main', 'tempdir')
        try:
            removed = remove_stale_spool_files(tempdir)
        except OSError as error:
            self.logger.error('tempdir %s: cannot look for stale spool files: %s', tempdir, error)
            return
        if removed:
            self.logger.warning('removed %d spool file(s) left in %s by a fuglu process that '
                                'ended mid-message (their messages were not acknowledged)',
                                removed, spool_directory(tempdir))

    def start_listener(self, spec, listener):
        protocol, address, port = spec
        listener.start(CONNECTORS[protocol](self, address, port))
        self.logger.info('%s connector listening on %s:%d', protocol, address, port)

    def start_mrtg(self):
        mrtgdir = self.config.get('main', 'mrtgdir').strip()
        if not mrtgdir:
            return
        directory = shared_directory(mrtgdir, 'mrtg')
        if not os.path.isdir(directory):
            self.logger.error('mrtgdir %s does not exist: no MRTG statistics', directory)
            return
        self.mrtg = MrtgWriter(self, directory)
        self.mrtg.start()

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
        backend = config.get('performance', 'backend').strip().lower()
        if BACKENDS.get(backend) is not type(self.backend):
            self.logger.warning('backend %s: a new backend takes effect at the next start; the %s '
                                'backend keeps running', backend, self.backend.name)
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
            if spec[0] not in CONNECTORS:
                self.logger.error('incomingport %s:%s:%s: unknown protocol', *spec)
                continue
            try:
                self.start_listener(spec, self.bind_listener(*spec))
            except OSError as error:
                self.logger.error('%s', error)
        self.logger.info('Reload config complete. Current configuration: %s',
                         config.get('main', 'identifier'))
        return True

    def shutdown(self):
        """Stop accepting, let mail in flight finish (the backend's grace period), then
        stop the rest. A step that fails is logged; the next ones still run."""
        self.stayalive = False
        steps = [('listener %s:%s:%s' % spec, listener.stop) for spec,
                 listener in self.listeners.items()]
        steps.append(('idle sessions', self._wake_idle_sessions))
        for name, part in (('control socket', self.control), ('metrics listener', self.metrics),
                           ('MRTG writer', self.mrtg), ('backend', self.backend)):
            if part is not None:
                steps.append((name, part.stop))
        steps.append(('downstream connections',
                      lambda: self.downstream_pool.purge(everything=True)))
        for plugin in self.plugins + self.prependers + self.appenders:
            steps.append(('plugin %s' % plugin, lambda plugin=plugin: shutdown_plugin(plugin)))
        for name, step in steps:
            try:
                step()
            except Exception:
                self.logger.error('shutdown: stopping the %s failed: %s', name,
                                  traceback.format_exc())
        self.logger.info('shutdown complete')

    def _wake_idle_sessions(self):
        for session in list(self.smtp_sessions):
            if session.waiting_for_client:
                try:
                    session.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def shutdown_plugin(plugin):
    """A plugin's shutdown(), and its ashutdown() when it has its own (FuGlu 1.7)."""
    call_plugin(plugin.shutdown)
    ashutdown = getattr(type(plugin), 'ashutdown', BasicPlugin.ashutdown)
    if ashutdown is not BasicPlugin.ashutdown:   # no event loop for the no-op
        call_plugin(plugin.ashutdown)


def is_loopback_address(address):
    if address in ('localhost',):
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def names_log_home(logconfig, log_home):
    """Whether the logging configuration file ``logconfig`` writes into ``log_home``
    (the bundled logging.conf does); one that logs elsewhere needs no such folder."""
    if not logconfig:
        return False
    try:
        with open(logconfig, 'r', errors='replace') as config_file:
            return log_home in config_file.read()
    except OSError:
        return True      # the logging set-up reports the file as it cannot read it


class StartupFailed(FugluError):
    """Start-up cannot go on; ``status`` is the exit status for the command line."""

    def __init__(self, message, status=1):
        super().__init__(message)
        self.message, self.status = message, status


def start_daemon(config, config_path, configdir, logconfig, foreground, baseloglevel, pidfile):
    """Start fuglu in the order described at the top of this section. Returns
    (controller, pid file or None); raises StartupFailed with the exit status."""
    logger = logging.getLogger('fuglu.main')
    account = None
    if os.geteuid() == 0:
        try:
            account = service_account(config)
        except ConfigProblem as error:
            raise StartupFailed(str(error))
    owner = account.owner if account is not None and account.uid != 0 else None
    try:
        raise_errors(check_ports(config) + check_listeners(config) + check_backend(config))
    except ConfigProblem as error:
        raise StartupFailed(str(error))
    pid = controller = None
    try:
        if pidfile:
            pid = PidFile(pidfile).acquire(owner)
        controller = MainController(config, config_path, configdir)
        controller.bind(owner)
        log_home = os.path.dirname(DAEMON_LOG_FILE)
        if os.geteuid() == 0 and (not foreground or names_log_home(logconfig, log_home)):
            # the default log file and the bundled logging.conf write there, as the daemon user
            prepare_shared_home(log_home, 'log', owner)
        if account is not None and account.uid != 0:
            if preload_modules(account):
                logger.info('Python\'s library is not readable by user %s: its modules were loaded '
                            'before dropping privileges', account.name)
            drop_privileges(account)
            logger.info('running as user %s (uid %d, gid %d)', account.name, account.uid,
                        account.gid)
        log_target = setup_logging(config, logconfig, foreground, baseloglevel)
        logger.info('fuglu %s (python %s) starting, config %s, %s', __version__,
                    sys.version.split()[0],
                    config_path or '<embedded default>', log_target)
        if account is not None and account.group_problem:
            logger.warning('%s', account.group_problem)
        controller.startup()
    except AlreadyRunning as error:
        raise StartupFailed(str(error))
    except PluginLoadError as error:
        logger.error('Some plugins failed to load: %s', error)
        failure = StartupFailed('Some plugins failed to load, please check the logs. Aborting. '
                                '(%s)' % error,
                                EXIT_PLUGIN_LOAD_FAILED)
    except (ConfigProblem, OSError, ValueError, configparser.Error) as error:
        failure = StartupFailed(str(error))
    else:
        return controller, pid
    if controller is not None:
        controller.shutdown()
    if pid is not None:
        pid.release()
    raise failure


def serve_until_stopped(controller, pid=None, on_ready=None):
    """The main loop: SIGHUP reloads the configuration and reopens the log files,
    SIGTERM/SIGINT end it (mail in flight is finished first). Tells systemd about
    each (RELOADING/READY, STOPPING). ``on_ready()`` is called once the signal handlers
    are in place (a reload requested right after READY must not kill the daemon).
    Returns the exit status."""
    logger = logging.getLogger('fuglu.main')
    stop_requested = threading.Event()
    reload_requested = threading.Event()
    woken = threading.Event()   # either request: the loop acts at once, not at its next tick

    def on_term(signum, frame):
        stop_requested.set()
        woken.set()

    def on_hup(signum, frame):
        reload_requested.set()
        woken.set()
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    if hasattr(signal, 'SIGHUP'):
        signal.signal(signal.SIGHUP, on_hup)
    if on_ready is not None:
        on_ready()
    status = 0
    try:
        while controller.stayalive and not stop_requested.is_set():
            woken.wait(0.2)
            woken.clear()
            controller.downstream_pool.purge()
            release_memory_after_big_messages()
            if reload_requested.is_set():
                reload_requested.clear()
                notify_service_manager('RELOADING=1', 'MONOTONIC_USEC=%d' % monotonic_usec())
                reopen_log_files()
                controller.backend.reopen_logs()
                controller.reload()
                notify_service_manager('READY=1', 'STATUS=configuration reloaded')
    except Exception:
        logger.error('unhandled error: %s', traceback.format_exc())
        status = EXIT_UNHANDLED
    notify_service_manager('STOPPING=1')
    logger.info('stopping: finishing the messages in flight')
    controller.shutdown()
    if pid is not None:
        pid.release()
    return status


###############################################################################
# Process backend: the fork server and the workers
###############################################################################
# The parent's side is ProcessBackend (see the notes before it in Backends); what
# runs in the processes it forks is here, after the MainController it builds on.

class ForkServer(object):
    """The process that forks the workers. Forked from the parent before the parent
    starts any thread, it keeps a single thread of its own, so a worker never
    inherits a lock that some other thread held.

    It answers the parent's packets on ``channel``: ['spawn', number, generation]
    with the worker's channel (SCM_RIGHTS) forks a worker and answers ['spawned',
    number, pid]; ['config'] + pickled configuration is the one for the next
    workers (the log files are reopened too); ['reopen'] reopens the log files;
    ['exit'], or the parent's end closing, ends it (signals do not: it ignores SIGTERM,
    which systemd sends to every process of the service). It reaps its workers and
    reports ['exited', pid, how]."""

    POLL = 0.2     # seconds between looks for exited workers

    def __init__(self, controller, config, channel):
        self.controller, self.config, self.channel = controller, config, channel

    def run(self):
        import gc
        import select
        # the parent ends it; a SIGTERM to the whole group (systemd's stop) must not
        for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
        # workers share the start-up heap copy-on-write: their garbage collector is to
        # leave the objects they inherited alone, or it would copy every page of them
        gc.freeze()
        release_freed_memory()
        while True:
            readable, _, _ = select.select([self.channel], [], [], self.POLL)
            self.reap()
            if not readable:
                continue
            packet = receive_packet(self.channel, size=PACKET_LIMIT)
            if packet is None:
                return 0
            fields, payload, fds = packet
            if fields[0] == 'spawn' and fds:
                self.spawn(fields[1], fds.pop(0))
            elif fields[0] == 'config':
                import pickle
                self.config = pickle.loads(payload)
                reopen_log_files()
            elif fields[0] == 'reopen':
                reopen_log_files()
            elif fields[0] == 'exit':
                return 0
            for fd in fds:
                os.close(fd)

    def spawn(self, number, fd):
        pid = os.fork()
        if pid == 0:
            status = 70
            try:
                self.channel.close()
                controller = self.controller
                worker = WorkerController(self.config, controller.config_path,
                                          controller.configdir, socket.socket(fileno=fd), number)
                status = worker.run()
            except BaseException:
                logging.getLogger('fuglu.procpool').error('worker-%d failed: %s', number,
                                                          traceback.format_exc())
            finally:
                os._exit(status)
        os.close(fd)
        try:
            send_packet(self.channel, ['spawned', number, pid])
        except OSError:
            pass

    def reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            try:
                send_packet(self.channel, ['exited', pid, exit_description(status)])
            except OSError:
                pass


class WorkerStatistics(Statistics):
    """A worker's counters belong to the parent, which keeps the totals (control
    stats, metrics, MRTG). Each call is kept, per thread (one thread serves one
    connection), as (method, arguments) and sent with the worker's next begin, end or
    done packet; the parent replays them on its own Statistics."""

    def __init__(self, worker):
        super().__init__()
        self.worker = worker
        self.local = threading.local()

    def _keep(self, *call):
        pending = getattr(self.local, 'pending', None)
        if pending is None:
            pending = self.local.pending = []
        pending.append(call)

    def take(self):
        """The calls kept for this thread, handed over."""
        pending = getattr(self.local, 'pending', None) or []
        self.local.pending = []
        return pending

    def received(self):
        self._keep('received')

    def begin(self, session, suspect=None):
        self.worker.tell('begin', self.worker.current_job(),
                         suspect.id if suspect is not None else None, self.take())

    def end(self, session):
        self.worker.tell('end', self.worker.current_job(), self.take(), threading.active_count())

    def plugin_time(self, stage, plugin, seconds):
        self._keep('plugin_time', stage, str(plugin), seconds)

    def plugin_error(self, plugin):
        self._keep('plugin_error', str(plugin))

    def error(self):
        pass    # WorkerController.record_exception sends the exception itself

    def verdict(self, action):
        self._keep('verdict', action)

    def finished(self, suspect, delivered, scantime):
        self._keep('count_finished', bool(delivered), suspect.is_spam(), suspect.is_virus(),
                   suspect.is_blocked(), scantime)


class WorkerController(MainController):
    """The MainController of a process-backend worker, built in the worker from the
    configuration the fork server holds. It has no listeners, control socket or
    metrics: the parent sends it connections over ``channel`` (['job', job, spec,
    peer] with the socket), and a ThreadBackend of its own runs the connector for
    each. Counters (WorkerStatistics) and exceptions go to the parent, and so do
    ['ready', pid, threads] once the plugins are loaded (['failed', kind, text] if
    not), ['done', job, ...] when a connection is over.

    ``run()`` is the worker's life; it returns the exit status. The parent's
    ['retire'] lets the connections it holds end on their own, then it exits;
    ['stop'] (or SIGTERM, or the parent gone) ends it as the daemon's shutdown ends
    the thread backend: sessions waiting for a command are closed, messages in
    flight get ThreadBackend.SHUTDOWN_GRACE."""

    def __init__(self, config, config_path, configdir, channel, number):
        super().__init__(config, config_path, configdir)
        self.channel = channel
        self.name = 'worker-%d' % number
        self.stats = WorkerStatistics(self)
        self.connectors = {}
        self.current = threading.local()          # .job: the connection a thread serves
        self.active = 0                           # connections received, not done
        self.active_changed = threading.Condition()
        self.stop_requested = False

    def tell(self, *fields):
        try:
            send_packet(self.channel, list(fields))
        except OSError:
            pass    # the parent is gone: the main loop notices and stops

    def current_job(self):
        return getattr(self.current, 'job', None)

    def record_exception(self, trace):
        self.tell('error', time.time(), '%s[%d] %s' % (
            self.name, os.getpid(), threading.current_thread().name),
            trace[-EXCEPTION_TEXT_LIMIT:])

    def _on_term(self, signum, frame):
        self.stop_requested = True

    def run(self):
        for signum in (signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)   # the parent decides
        signal.signal(signal.SIGTERM, self._on_term)
        try:
            self.plugins, self.prependers, self.appenders = self.load_plugins()
            self.backend = ThreadBackend(self.config, self)
            self.backend.start()
        except PluginLoadError as error:
            self.tell('failed', 'plugins', str(error))
            return EXIT_PLUGIN_LOAD_FAILED
        except Exception:
            self.tell('failed', 'error', traceback.format_exc()[-EXCEPTION_TEXT_LIMIT:])
            return 1
        self.tell('ready', os.getpid(), threading.active_count())
        self.finish(self.serve_parent())
        return 0

    def serve_parent(self):
        """Take the parent's packets until told to leave; returns 'retire' or 'stop'."""
        import select
        retiring = False
        while not self.stop_requested:
            if retiring:
                with self.active_changed:
                    if not self.active:
                        return 'retire'
            readable, _, _ = select.select([self.channel], [], [], 0.5)
            self.downstream_pool.purge()
            # as the daemon's main loop does (the malloc arena limit came with the fork)
            release_memory_after_big_messages()
            if not readable:
                continue
            try:
                packet = receive_packet(self.channel)
            except OSError:
                packet = None
            if packet is None:
                self.logger.error('%s: the parent process is gone: stopping', self.name)
                return 'stop'
            fields, _payload, fds = packet
            if fields[0] == 'job' and fds:
                self.take_job(fields[1], fields[2], fields[3], fds.pop(0))
            elif fields[0] == 'retire':
                retiring = True
            elif fields[0] == 'stop':
                return 'stop'
            elif fields[0] == 'reopen':
                reopen_log_files()
            for fd in fds:
                os.close(fd)
        self.tell('leaving', 'SIGTERM')   # not told to: the parent replaces it
        return 'stop'

    def take_job(self, job, spec, peer, fd):
        sock = socket.socket(fileno=fd)
        with self.active_changed:
            self.active += 1
        self.backend.submit(self.run_job, sock, job, tuple(spec), tuple(peer))

    def connector(self, spec):
        with self.active_changed:
            connector = self.connectors.get(spec)
            if connector is None:
                protocol, address, port = spec
                connector = self.connectors[spec] = CONNECTORS[protocol](self, address, port)
            return connector

    def run_job(self, sock, job, spec, peer):
        self.current.job = job
        try:
            self.connector(spec).handle(sock, peer)
        finally:
            self.current.job = None
            self.tell('done', job, self.stats.take(), threading.active_count())
            with self.active_changed:
                self.active -= 1
                self.active_changed.notify_all()

    def finish(self, leaving):
        if leaving == 'stop':
            self.stayalive = False
            self._wake_idle_sessions()
        self.backend.stop()
        self.downstream_pool.purge(everything=True)
        for plugin in self.plugins + self.prependers + self.appenders:
            try:
                shutdown_plugin(plugin)
            except Exception:
                self.logger.error('%s: stopping plugin %s failed: %s', self.name, plugin,
                                  traceback.format_exc())


###############################################################################
# Lint
###############################################################################
# Each check_* function returns findings, (level, text) with level 'error', 'warning',
# 'info' or 'note' (lint only). `--lint` prints them and counts the errors; start-up
# runs the same checks (a port error stops it, the rest is logged).

OPTIONAL_DEPENDENCIES = (
    ('magic', 'python-magic: file type detection by content (attachment plugin)'),
    ('sqlalchemy', 'sqlalchemy: SQL databases besides SQLite for per-recipient settings and rules'),
    ('rarfile', 'rarfile: rar archive contents (attachment plugin)'),
    ('py7zr', 'py7zr: 7z archive contents (attachment plugin)'),
)

PLUGIN_LIST_OPTIONS = ('plugins', 'prependers', 'appenders', 'mplugins')


def module_available(name):
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def option_tables(config, plugins=None):
    """(section, option table) of the core and of the plugins: the instances'
    ``requiredvars`` when ``plugins`` are given, else those of the configured plugin
    classes (imported, not created; classes that fail to import are left out)."""
    tables = list(CORE_DEFAULTS.items())
    if plugins is not None:
        return tables + [(plugin.section, plugin.requiredvars) for plugin in plugins]
    for option in PLUGIN_LIST_OPTIONS:
        try:
            entries = split_plugin_list(config.get('main', option))
        except PluginLoadError:
            continue
        for name, section in entries:
            try:
                cls = resolve_plugin_class(name, config)
            except PluginLoadError:
                continue
            table = getattr(cls, 'requiredvars', None)
            if isinstance(table, dict):
                tables.append((section or getattr(cls, 'default_section', None) or cls.__name__,
                               table))
    return tables


def option_value(config, section, option, spec):
    """The value of an option, its declared default when the component that declares
    it was not created yet."""
    value = config.get(section, option, fallback=None)
    if value is None:
        value = config.expand(spec.get('default', ''))
    return value.strip()


def written_location(value, spec):
    """Where fuglu writes for a 'writefile' / 'writedir' option (see "Files in shared
    directories"): the directory that gets the files."""
    if spec['path'] == 'writedir':
        return shared_directory(value, spec['home'])
    return os.path.dirname(shared_file_path(value, spec['home']))


def shared_homes_needed(config):
    """(directory, home) for every written path of the configuration that was moved
    out of a world-writable directory: the daemon creates them before dropping
    privileges."""
    needed = []
    for section, table in option_tables(config):
        for option, spec in table.items():
            if spec.get('home') not in SHARED_HOMES:   # none, or made by the daemon user
                continue
            section_name = spec.get('section', section)
            value = option_value(config, section_name, option, spec)
            if not value or (option == 'controlport' and value.isdigit()):
                continue
            location = written_location(value, spec)
            configured = value if spec['path'] == 'writedir' else \
                os.path.dirname(os.path.abspath(value))
            if location != configured and (location, spec['home']) not in needed:
                needed.append((location, spec['home']))
    return needed


def is_default_value(config, section, option, spec):
    raw = config.get(section, option, raw=True, fallback=spec.get('default', ''))
    return raw.strip() == str(spec.get('default', '')).strip()


def path_kind(path):
    """'dir', 'file', 'missing' or 'denied' (a folder on the way cannot be entered)."""
    try:
        return 'dir' if stat.S_ISDIR(os.stat(path).st_mode) else 'file'
    except FileNotFoundError:
        return 'missing'
    except OSError:
        return 'denied'


def check_path(path, kind, user):
    """The problem with a path fuglu reads ('file', 'dir') or writes into ('writedir'),
    as seen by the running user, or None."""
    found = path_kind(path)
    wanted = 'file' if kind == 'file' else 'dir'
    if found == 'missing':
        return '%s does not exist' % path
    if found == 'denied':
        return '%s cannot be reached by user %s (a folder on the way is closed)' % (path, user)
    if found != wanted:
        return '%s is not a %s' % (path, 'directory' if wanted == 'dir' else 'file')
    if kind == 'writedir':
        if not os.access(path, os.W_OK | os.X_OK):
            return 'directory %s is not writable by user %s' % (path, user)
    elif not os.access(path, os.R_OK | (os.X_OK if kind == 'dir' else 0)):
        return '%s is not readable by user %s' % (path, user)
    return None


def check_paths(config, section, table):
    """Paths declared in an option table (key 'path' of an option): files and
    directories fuglu reads must exist and be readable (a default path may be missing:
    the option's 'missing' text says what happens then), directories fuglu writes to must exist
    and be writable. Checked as the running user: lint runs this as main.user."""
    findings = []
    user = current_user_name()
    for option, spec in table.items():
        kind = spec.get('path')
        if not kind:
            continue
        section_name = spec.get('section', section)
        value = option_value(config, section_name, option, spec)
        if not value or (option == 'controlport' and value.isdigit()):
            continue
        where = config.where(section_name, option)
        if kind == 'dirs':
            findings += [('error', '%s: %s' % (where, problem)) for problem in
                         (check_path(directory, 'dir',
                                     user) for directory in parse_list(value)) if problem]
            continue
        if kind in ('file', 'dir'):
            problem = check_path(value, kind, user)
            if problem and path_kind(value) == 'missing' and is_default_value(config, section_name,
                                                                              option, spec):
                findings.append(('note',
                                 '%s: %s: %s' % (where, problem, spec.get('missing', 'not used'))))
            elif problem:
                findings.append(('error', '%s: %s' % (where, problem)))
            continue
        location = written_location(value, spec)
        configured = value if kind == 'writedir' else os.path.dirname(os.path.abspath(value))
        if location != configured:
            findings.append(('info',
                             '%s: %s lies in a directory anybody may write to: fuglu uses %s'
                             % (where, value, location)))
            if path_kind(location) == 'missing':
                continue   # created at start
        problem = check_path(location, 'writedir', user)
        if problem and spec.get('made_as_root') and path_kind(location) == 'dir':
            findings.append(('warning',
                             '%s: %s: it is made before privileges are dropped, but stays behind '
                                        'when fuglu stops' % (where, problem)))
        elif problem:
            findings.append(('error', '%s: %s' % (where, problem)))
    return findings


def check_inert_options(config, section, table, ignored=()):
    """Options present in the file that fuglu accepts without acting on them: the
    spec's 'inert' reason, FuGlu options outside fuglu's scope (IGNORED_OPTIONS,
    ``ignored``)."""
    findings = []
    if not config.has_section(section):
        return findings
    for option, _value in configparser.RawConfigParser.items(config, section, raw=True):
        if option in config.defaults():
            continue
        spec = table.get(option)
        if spec is not None and spec.get('inert'):
            findings.append(('warning',
                             '%s has no effect in fuglu: %s' % (config.where(section, option),
                                                                         spec['inert'])))
        elif spec is None and is_ignored_option(section, option, ignored):
            findings.append(('warning',
                             '%s has no effect in fuglu (a FuGlu feature this build does not have)'
                             % config.where(section, option)))
    return findings


def check_service_user(config):
    """main.user and main.group exist (an error when fuglu would start as root)."""
    try:
        account = service_account(config)
    except ConfigProblem as error:
        return [('error' if os.geteuid() == 0 else 'warning', str(error))]
    findings = [('warning', account.group_problem)] if account.group_problem else []
    if account.uid == 0:
        return findings + [('warning',
                            '%s: fuglu would run as root' % config.where('main', 'user'))]
    if os.geteuid() != 0:
        return findings + [('note', 'not started as root: fuglu runs as %s, %s is not used'
                            % (current_user_name(), config.where('main', 'user')))]
    return findings + [('note', 'the daemon runs as user %s (uid %d, gid %d)'
                        % (account.name, account.uid, account.gid))]


def _port_problem(value, allow_empty=False):
    value = str(value).strip()
    if allow_empty and value in ('', '0'):
        return None
    if not value.isdigit() or not 0 < int(value) < 65536:
        return 'is not a port number (1-65535)'
    return None


def check_listeners(config):
    """The incomingport entries: each parses and names a connector (errors), and what
    listens where (notes)."""
    findings = []
    bindaddress = config.get('main', 'bindaddress').strip()
    where = config.where('main', 'incomingport')
    milter = False
    for entry in parse_list(config.get('main', 'incomingport')):
        try:
            protocol, address, port = parse_incomingport(entry, bindaddress)
        except ValueError as error:
            findings.append(('error', '%s: %s' % (where, error)))
            continue
        if protocol not in CONNECTORS:
            findings.append(('error', '%s: unknown protocol %r in %r (available: %s)'
                             % (where, protocol, entry, ', '.join(sorted(CONNECTORS)))))
            continue
        milter = milter or protocol == 'milter'
        findings.append(('note', 'listener %s on %s:%d' % (protocol, address, port)))
    if milter:
        findings.append(('note', 'advice: a milter connection holds a worker thread for its '
                                 'whole SMTP session; keep [performance] maxthreads (now %s) at '
                                 'least at Postfix\'s smtpd process limit'
                         % config.get('performance', 'maxthreads')))
    return findings


def check_backend(config):
    """[performance] backend names a backend."""
    name = config.get('performance', 'backend').strip().lower()
    if name in BACKENDS:
        return []
    return [('error', '%s: unknown backend %r (available: %s)' % (
        config.where('performance', 'backend'), name, ', '.join(sorted(BACKENDS))))]


def raise_errors(findings):
    """ConfigProblem with the first error among ``findings``, if any (start-up)."""
    for level, text in findings:
        if level == 'error':
            raise ConfigProblem(text)


def check_ports(config):
    """Every port value but the listeners' (check_listeners): outgoingport,
    bounceport, a TCP controlport (and its address), metrics_listen."""
    findings = []
    for option, allow_empty in (('outgoingport', False), ('bounceport', True)):
        problem = _port_problem(config.get('main', option), allow_empty)
        if problem:
            findings.append(('error',
                             '%s = %r %s' % (config.where('main', option),
                                             config.get('main', option),
                                                      problem)))
    control = config.get('main', 'controlport').strip()
    if control.isdigit():
        problem = _port_problem(control)
        if problem:
            findings.append(('error',
                             '%s = %r %s' % (config.where('main', 'controlport'), control,
                                             problem)))
        address = config.get('main', 'controladdress').strip()
        if not is_loopback_address(address) and not config.get('main', 'controltoken').strip():
            findings.append(('error', '%s: a TCP control port on %s needs controltoken'
                             % (config.where('main', 'controlport'), address)))
    if config.get('main', 'metrics_listen').strip():
        try:
            parse_loopback_listen(config.get('main', 'metrics_listen'))
        except ValueError as error:
            findings.append(('error', '%s: %s' % (config.where('main', 'metrics_listen'), error)))
    return findings


def tcp_listen_addresses(config):
    """(what, address, port) of every TCP socket the daemon listens on."""
    found = []
    bindaddress = config.get('main', 'bindaddress').strip()
    for entry in parse_list(config.get('main', 'incomingport')):
        try:
            protocol, address, port = parse_incomingport(entry, bindaddress)
        except ValueError:
            continue
        found.append(('incomingport %s' % entry, address, port))
    control = config.get('main', 'controlport').strip()
    if control.isdigit() and not _port_problem(control):
        found.append(('controlport', config.get('main', 'controladdress').strip() or '127.0.0.1',
                      int(control)))
    if config.get('main', 'metrics_listen').strip():
        try:
            address, port = parse_loopback_listen(config.get('main', 'metrics_listen'))
            found.append(('metrics_listen', address, port))
        except ValueError:
            pass
    return found


def check_listen_free(config):
    """Every listen address can be bound now (run as root, like the daemon's start)."""
    findings = []
    for what, address, port in tcp_listen_addresses(config):
        family = socket.AF_INET6 if ':' in address else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((address, port))
        except OSError as error:
            findings.append(('error', '%s: cannot listen on %s:%d: %s' % (what, address, port,
                                                                         error.strerror or error)))
    return findings


def check_downstream(config):
    """The re-injection target answers with a 220 greeting (a warning otherwise: mail
    is deferred until it does)."""
    if config.get('main', 'outgoinghost').strip() == '${injecthost}':
        return [('note',
                 'outgoinghost ${injecthost}: the downstream is each sending host, not checked')]
    try:
        host, port = outgoing_target(config)
    except (ValueError, configparser.Error) as error:
        return [('warning', 'downstream not checked: %s' % error)]
    if _port_problem(port):
        return []   # reported with the ports
    client = SMTPClient(host, port, 'localhost', timeout=5)
    try:
        client.connect()
    except SMTPError as error:
        return [('warning', 'downstream %s:%d does not answer (mail is deferred until it does): %s'
                 % (host, port, error))]
    finally:
        client.close()
    return [('note', 'downstream %s:%d answers' % (host, port))]


def check_logging(config, logconfig):
    """The logging configuration loads (as the daemon user: its files are opened),
    and the syslog socket exists when main.syslog is on."""
    findings = []
    if logconfig:
        try:
            from logging import config as logging_config
            logging_config.fileConfig(logconfig, disable_existing_loggers=False)
            findings.append(('note', 'logging configuration %s loads' % logconfig))
        except Exception as error:
            findings.append(('error',
                             'logging configuration %s: %s: %s (are its log directories writable '
                                      'by user %s?)' % (logconfig, error.__class__.__name__, error,
                                                        current_user_name())))
        finally:
            for handler in list(logging.getLogger().handlers):
                if isinstance(handler, logging.FileHandler):
                    logging.getLogger().removeHandler(handler)
                    handler.close()
    if config.getboolean('main', 'syslog'):
        address = config.get('main', 'syslog_address').strip()
        try:
            if not stat.S_ISSOCK(os.stat(address).st_mode):
                findings.append(('error', 'syslog: %s is not a socket' % address))
            syslog_handler(config).close()
        except (OSError, ConfigProblem) as error:
            findings.append(('error', 'syslog: %s' % error))
    return findings


def check_python_readable():
    """The standard library is readable by the running user (else modules a plugin
    imports late fail; fuglu itself preloads what it uses)."""
    library = os.path.dirname(os.__file__)
    if os.access(library, os.R_OK | os.X_OK):
        return []
    return [('warning', 'Python\'s library %s is not readable by user %s: fuglu loads the modules '
                        'it uses before dropping privileges, a plugin that imports others later '
                        'fails; install fuglu\'s Python where the user can read it'
             % (library, current_user_name()))]


def check_program_readable():
    """fuglu's own files (fuglu.pyz, or fuglu.py and fuglu_plugins/) are readable by
    the daemon user: bundled rules and templates are read from them at run time."""
    program = os.path.abspath(__file__)
    if not os.path.exists(program):    # inside a zipapp: the .pyz itself
        program = os.path.dirname(program)
    if os.access(program, os.R_OK):
        return []
    return [('warning', '%s is not readable by user %s: bundled rule files and templates cannot be '
                        'read after the privilege drop; put fuglu where the user can read it'
             % (program, current_user_name()))]


def startup_findings(config, plugins):
    """What start-up logs about the configuration (as the daemon user)."""
    findings = []
    components = [(section, table, ()) for section, table in CORE_DEFAULTS.items()]
    components += [(plugin.section, plugin.requiredvars,
                    plugin.ignored_options) for plugin in plugins]
    for section, table, ignored in components:
        findings += check_inert_options(config, section, table, ignored)
        findings += [finding for finding in check_paths(config, section,
                                                        table) if finding[0] != 'note']
    return findings + check_program_readable() + check_python_readable()


class Lint(object):
    """`fuglu --lint`: checks the service account, ports, dependencies, listeners,
    plugins, every option, paths, peers and the downstream, and prints what it finds.
    ``run()`` returns the number of errors. Started as root, everything after the
    account and port checks runs in a child process that dropped privileges to
    main.user: files, directories and the logging configuration are checked as the
    daemon will see them."""

    COLORS = {'error': 'red', 'warning': 'yellow'}

    def __init__(self, config, out=None, logconfig=None):
        self.config = config
        self.out = out or sys.stdout
        self.logconfig = logconfig
        self.color = getattr(self.out, 'isatty', lambda: False)()

    def say(self, text, color=None):
        codes = {'red': '\033[91m', 'green': '\033[92m', 'yellow': '\033[93m'}
        if self.color and color:
            text = '%s%s\033[0m' % (codes[color], text)
        print(text, file=self.out)

    def report(self, findings):
        """Print findings; returns the number of errors among them."""
        for level, text in findings:
            self.say('%s%s' % ('' if level in ('note', 'info') else level.upper() + ': ', text),
                     self.COLORS.get(level))
        return sum(1 for level, _text in findings if level == 'error')

    def run(self):
        config = self.config
        self.say('Fuglu %s' % __version__)
        self.say('---------- LINT MODE ----------')
        self.say('Checking the service account, ports, listeners and backend...')
        backend = check_backend(config) or [('info', describe_backend(config))]
        errors = self.report(check_service_user(config) + check_ports(config) +
                             check_listeners(config) + check_listen_free(config) + backend)
        account = None
        if os.geteuid() == 0:
            try:
                account = service_account(config)
            except ConfigProblem:
                account = None
        if account is not None and account.uid != 0:
            # what the daemon loads before it drops privileges
            preload_modules(account)
            try:
                add_plugin_dirs(config)
                for name, _section in [entry for option in PLUGIN_LIST_OPTIONS
                                       for entry in split_plugin_list(config.get('main', option))]:
                    resolve_plugin_class(name, config)
            except PluginLoadError:
                pass   # reported by the checks
            return self.run_as(account, errors)
        return self.run_checks(errors)

    def run_as(self, account, errors):
        """run_checks() in a child process running as ``account``; its exit status is
        the error count."""
        try:
            self.out.flush()
            self.out.fileno()
        except (AttributeError, OSError, ValueError):
            self.say('WARNING: output is not a file: checking as root, not as %s' % account.name,
                     'yellow')
            return self.run_checks(errors)
        sys.stdout.flush()
        child = os.fork()
        if child == 0:
            status = 255
            try:
                drop_privileges(account)
                self.say('Checking as user %s, as the daemon will run...' % account.name)
                status = min(self.run_checks(errors), 255)
            except BaseException:
                traceback.print_exc()
            finally:
                try:
                    self.out.flush()
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(status)
        _pid, wait_status = os.waitpid(child, 0)
        if os.WIFEXITED(wait_status):
            return os.WEXITSTATUS(wait_status)
        self.say('ERROR: the check as user %s ended abnormally' % account.name, 'red')
        return errors + 1

    def run_checks(self, errors):
        """The checks that run as the daemon user; returns ``errors`` plus their errors."""
        self.describe_environment()
        plugins, failed = self.load_plugins()
        errors += failed + self.lint_main_config()
        self.say('Linting runtime configuration [databaseconfig]')
        runtime_errors = lint_runtime_config(self.config, self.say)
        if runtime_errors:
            self.say('ERROR', 'red')
        errors += runtime_errors + self.lint_plugins(plugins)
        self.say('Checking the downstream, logging and fuglu\'s own files...')
        errors += self.report(check_downstream(self.config) +
                              check_logging(self.config, self.logconfig) +
                              check_program_readable() + check_python_readable())
        self.say('Lint status: %s' % ('OK' if errors == 0 else 'FAIL'),
                 'green' if errors == 0 else 'red')
        return errors

    def describe_environment(self):
        """Which optional modules are there, and what they add."""
        self.say('Checking dependencies...')
        for module, description in OPTIONAL_DEPENDENCIES:
            if module_available(module):
                self.say('%s: installed' % description, 'green')
            else:
                self.say('%s: not installed (optional)' % description, 'yellow')
        self.say('Loading extensions...')
        self.say('file type detection: %s' % ('python-magic' if module_available('magic')
                                               else 'built-in signature table'))
        self.say('archives: zip, tar, gz, bz2, xz%s%s' % (
            ', rar' if module_available('rarfile') else '',
            ', 7z' if module_available('py7zr') else ''))
        sqlalchemy = import_sqlalchemy() if module_available('sqlalchemy') else None
        if sqlalchemy is not None:
            drivers = [name for name in ('psycopg2', 'psycopg', 'pymysql', 'MySQLdb')
                       if module_available(name)]
            self.say('SQL databases: SQLAlchemy %s; drivers: sqlite3%s' % (
                sqlalchemy.__version__, ''.join(', ' + name for name in drivers)))
        else:
            self.say('SQL databases: sqlite:///path only (standard library sqlite3)')

    def load_plugins(self):
        """({plugin list option: plugins}, errors)."""
        self.say('Loading plugins...')
        plugins = {}
        try:
            add_plugin_dirs(self.config)
            for option in PLUGIN_LIST_OPTIONS:
                plugins[option] = load_plugins(self.config, option)
            self.say('Plugin loading complete')
        except PluginLoadError as error:
            self.say('At least one plugin failed to load: %s' % error, 'red')
            return plugins, 1
        return plugins, 0

    def lint_main_config(self):
        """The core's options: 1 when any has an error, else 0."""
        config = self.config
        self.say('Linting main configuration')
        main_errors = []
        findings = []
        for section, table in CORE_DEFAULTS.items():
            if section != 'PluginAlias':   # any alias name is fine
                main_errors += check_options(config, section, table)
            findings += check_inert_options(config, section, table)
            findings += check_paths(config, section, table)
        findings += check_milter_mode(config)
        for section in CORE_DEFAULTS:
            if section not in ('PluginAlias', 'databaseconfig', 'environment') and \
                    not config.has_section(section):
                self.say('section [%s] not in the config file: all values default' % section,
                         'yellow')
        for error in main_errors:
            self.say(error, 'red')
        failed = bool(main_errors) | bool(self.report(findings))
        self.say('ERROR' if failed else 'OK', 'red' if failed else 'green')
        return 1 if failed else 0

    def lint_plugins(self, plugins):
        """Each plugin's own lint(); returns the number that failed."""
        failed = 0
        for option in PLUGIN_LIST_OPTIONS:
            for plugin in plugins.get(option, []):
                self.say('Linting Plugin %s Config section: %s' % (plugin, plugin.section))
                try:
                    ok = call_plugin(plugin.lint)
                except Exception as error:
                    self.say('ERROR: %s: %s' % (error.__class__.__name__, error), 'red')
                    ok = False
                self.say('OK' if ok else 'ERROR', 'green' if ok else 'red')
                failed += 0 if ok else 1
        self.say('%d plugins reported errors.' % failed, 'red' if failed else None)
        return failed


class FunkyConsole(object):
    """FuGlu's ANSI colours for lint output: strcolor(text, 'red') (or a list of
    codes from FG, BG, MODE)."""

    FG = {'white': '00', 'black': '30', 'red': '31', 'green': '32', 'brown': '33', 'blue': '34',
          'magenta': '35', 'cyan': '36', 'gray': '37', 'yellow': '33;1'}
    BG = {'black': '40', 'red': '41', 'green': '42', 'brown': '43', 'blue': '44', 'magenta': '45',
          'cyan': '46', 'white': '47'}
    MODE = {'default': '0', 'bold': '1', 'blink': '5', 'noblink': '25'}
    RESET = '\x1b[0m'

    def strcolor(self, content, commandlist, reset_after=True):
        if isinstance(commandlist, str):
            commandlist = (self.FG[commandlist],)
        text = '\x1b[%sm%s' % (';'.join(c for c in commandlist if c is not None), content)
        return text + self.RESET if reset_after else text


###############################################################################
# FuGlu's module names
###############################################################################
# fuglu is one module; plugins written for FuGlu import from its package layout
# (fuglu.shared, fuglu.extensions.sql, fuglu.plugins.sa ...). Those names are
# registered in sys.modules: fuglu.shared and fuglu.stringencode are this module,
# the others small module objects holding the names from here that FuGlu has there.
# fuglu.plugins.<name> of a bundled plugin is its fuglu_plugins module, imported when
# first asked for; any other fuglu.* name FuGlu has gets an ImportError that says it
# is not part of this build.

# upstream FuGlu 1.7 plugin modules (fuglu.plugins.<name>) -> our bundled module
BUNDLED_UPSTREAM_PLUGIN_MODULES = {
    'archive': 'fuglu_plugins.archive', 'attachment': 'fuglu_plugins.attachment',
    'clamav': 'fuglu_plugins.clamav', 'sa': 'fuglu_plugins.spamassassin',
    'p_debug': 'fuglu_plugins.debug', 'p_skipper': 'fuglu_plugins.skip',
}
UPSTREAM_PLUGIN_MODULES = (
    'a_logging', 'a_statsd', 'antivirus', 'archive', 'attachment', 'bacn', 'btc', 'call_ahead',
    'clamav', 'dataprovider', 'decision', 'delay', 'dnsdata', 'domainauth', 'fuzor', 'geoip',
    'knownsubject', 'logheaders', 'mailcopy', 'messagesize', 'originpolicy', 'outpolicy', 'p_blwl',
    'p_debug', 'p_fraction', 'p_skipper', 'ratelimit', 'restrictions', 'rspamd', 'sa', 'script',
    'sigenc', 'taction', 'tlspolicy', 'uriextract', 'vacation',
)



def _bounce_module_getattr(name):
    if name == 'FugluSMTPClient':
        if 'FugluSMTPClient' in globals():
            return globals()['FugluSMTPClient']
        import smtplib

        class FugluSMTPClient(smtplib.SMTP):
            """smtplib.SMTP that remembers the last reply and the queue id in it."""
            queueid = lastserveranswer = lastservercode = None

            def getreply(self):
                code, response = smtplib.SMTP.getreply(self)
                self.lastserveranswer, self.lastservercode = response, code
                self.queueid = queueid_from_postfixreply(response) or self.queueid
                return code, response

            def xclient(self, xclient_args=None):
                """Send XCLIENT with the attributes the server offers."""
                self.ehlo_or_helo_if_needed()
                if 'xclient' not in self.esmtp_features:
                    raise smtplib.SMTPNotSupportedError('SMTP XCLIENT extension not supported '
                                                        'by server.')
                offered = self.esmtp_features['xclient'].upper().split()
                args = dict(xclient_args or {})
                if ':' in args.get('ADDR', '') and not args['ADDR'].startswith('IPV6:'):
                    args['ADDR'] = 'IPV6:' + args['ADDR']
                words = ['%s=%s' % (k.upper(), force_uString(v)) for k, v in args.items()
                         if v and k.upper() in offered]
                return self.docmd('XCLIENT', ' '.join(words)) if words else None
        globals()['FugluSMTPClient'] = FugluSMTPClient   # one class, however often asked
        return FugluSMTPClient
    raise AttributeError("module 'fuglu.bounce' has no attribute %r" % name)


# FuGlu's flags for optional libraries it may use. fuglu does not use them (HTML is
# stripped by HTMLStripper, bounces are sent with smtplib), so a plugin that checks a
# flag takes its fallback path here.
HAVE_BEAUTIFULSOUP = HAVE_LXML = HAVE_AIOFILES = HAVE_AIOSMTP = False

# module name -> the names it holds (taken from this module), or a module getattr hook
COMPAT_MODULES = {
    'fuglu.stringencode': None, 'fuglu.shared': None,   # this very module
    'fuglu.mixins': ['SimpleTimeoutMixin', 'ReturnOverrideMixin'],
    'fuglu.addrcheck': ['Addrcheck'],
    'fuglu.bounce': ['Bounce', 'queueid_from_postfixreply', 'QUEUE_ID_RE', 'HAVE_AIOSMTP',
                     _bounce_module_getattr],
    'fuglu.extensions': [],
    'fuglu.connectors': [],
    'fuglu.connectors.milterconnector': [],
    'fuglu.mshared': [
        'convert_return2milter', 'SumAsyncTime', 'BasicMilterPlugin', 'AsyncBasicMilterPlugin',
        'BMPConnectMixin', 'BMPHeloMixin', 'BMPMailFromMixin', 'BMPRCPTMixin', 'BMPHeaderMixin',
        'BMPEOHMixin', 'BMPEOBMixin', 'BMPConnectAsyncMixin', 'BMPHeloAsyncMixin',
        'BMPMailFromAsyncMixin', 'BMPRCPTAsyncMixin', 'BMPHeaderAsyncMixin', 'BMPEOHAsyncMixin',
        'BMPEOBAsyncMixin', 'ReturnOverrideMixin'],
    'fuglu.funkyconsole': ['FunkyConsole'],
    'fuglu.plugins': [],
    'fuglu.mplugins': [],
}
# FuGlu's milter constants, in fuglu.connectors.milterconnector and fuglu.mshared
MILTER_COMPAT_NAMES = {
    'CONNECT': MILTER_CONNECT, 'HELO': MILTER_HELO, 'MAILFROM': MILTER_MAILFROM,
    'RCPT': MILTER_RCPT,
    'HEADER': MILTER_HEADER, 'EOH': MILTER_EOH, 'EOB': MILTER_EOB,
    'ACCEPT': MILTER_RETCODES[ACCEPT], 'CONTINUE': MILTER_RETCODES[DUNNO],
    'REJECT': MILTER_RETCODES[REJECT], 'TEMPFAIL': MILTER_RETCODES[DEFER],
    'DISCARD': MILTER_RETCODES[DELETE], 'CONN_FAIL': b'conn_fail', 'SHUTDOWN': b'shutdown',
    'STR2RETCODE': MILTER_STR2RETCODE,
    'RETCODE2STR': {code: name for name, code in MILTER_STR2RETCODE.items()},
}


class Unavailable(object):
    """Stands for a class of a FuGlu extension this build does not have (redis, DNS):
    a plugin may import it and check the module's ENABLED flag; using it raises."""

    def __init__(self, *args, **kwargs):
        raise NotInThisBuild('%s is part of a FuGlu extension that is not in this build'
                             % self.__class__.__name__)


def unavailable_extension(fullname, flags, classes):
    """A FuGlu extension module whose flags say it is not available."""
    import types
    module = types.ModuleType(fullname, 'FuGlu %s: not part of this build.' % fullname)
    module.__path__ = []
    module.STATUS = 'not part of this build'
    for flag in flags:
        setattr(module, flag, False)
    for name in classes:
        setattr(module, name, type(name, (Unavailable,), {}))
    return module


# FuGlu extensions plugins guard with a flag: importable, flags False, classes refuse
UNAVAILABLE_EXTENSIONS = {
    'fuglu.extensions.redisext': (('ENABLED',), ('RedisPooledConn', 'RedisKeepAlive')),
    'fuglu.extensions.aioredisext': (('ENABLED',), ('AIORedisBaseBackend', 'ExpiringCounter')),
    'fuglu.extensions.dnsquery': (('ENABLED', 'DNSQUERY_EXTENSION_ENABLED', 'HAVE_DNSPYTHON',
                                   'HAVE_PYDNS'), ()),
    'fuglu.extensions.aiodnsquery': (('ENABLED', 'AIODNSQUERY_EXTENSION_ENABLED'), ()),
}

class AIORedisMixin(object):
    """FuGlu's redis mixin for plugins, in a build without redis: as FuGlu's without
    the redis module, it adds option ``redis_conn`` and the plugin loads (FuGlu's own
    plugins then check ENABLED and do nothing); asking for ``aioredisbackend`` raises."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.requiredvars.update({'redis_conn': {
            'default': '', 'description': 'redis backend database connection: '
            'redis://host:port/dbid (redis is not part of this build)'}})
        self._aioredisbackend = None

    @property
    def aioredisbackend(self):
        return sys.modules['fuglu.extensions.aioredisext'].AIORedisBaseBackend()

    async def ashutdown(self):
        parent_ashutdown = getattr(super(), 'ashutdown', None)
        result = parent_ashutdown() if parent_ashutdown is not None else None
        if hasattr(result, '__await__'):
            await result


# FuGlu's DNS extensions without a DNS library (dnspython, pydns): the names plugins
# import are there, and every lookup answers None (FuGlu's "lookup failed") without
# asking DNS, as FuGlu's do when neither library is installed. Plugins check
# DNSQUERY_EXTENSION_ENABLED first; those that do not get None and carry on.
DNS_QTYPES = ('A', 'AAAA', 'CAA', 'CDS', 'CNAME', 'DNSKEY', 'DS', 'MX', 'NS', 'NSEC', 'NSEC3',
              'NSEC3PARAM', 'PTR', 'RRSIG', 'SOA', 'SPF', 'SRV', 'SSHFP', 'TLSA', 'TXT')
DNS_ERRORS = ('FuNXDOMAIN', 'FuTIMEOUT', 'FuSERVFAIL', 'FuNoNameserver', 'FuNoAnswer',
              'FuNoDNSSec')
DNS_LOOKUPS = ('lookup', 'mxlookup', 'revlookup', 'fcrdnslookup')


def dns_lookup_unavailable(*args, **kwargs):
    """FuGlu's lookup(), mxlookup() ... in a build without a DNS library: None."""
    return None


async def dns_lookup_unavailable_async(*args, **kwargs):
    return None


def add_dns_standins(module, asynchronous):
    lookup = dns_lookup_unavailable_async if asynchronous else dns_lookup_unavailable
    for qtype in DNS_QTYPES:
        setattr(module, 'QTYPE_' + qtype, qtype)
    for name in DNS_ERRORS:
        setattr(module, name, type(name, (Exception,), {'__module__': module.__name__}))
    for name in DNS_LOOKUPS:
        setattr(module, name, lookup)
    module.DNS_TIMEOUT = TimeoutError


# FuGlu's packages: below them a missing name is a module; below any other a name
FUGLU_PACKAGES = ('fuglu', 'fuglu.extensions', 'fuglu.plugins', 'fuglu.plugins.ratelimit',
                  'fuglu.mplugins', 'fuglu.connectors', 'fuglu.lib', 'fuglu.utils')
FUGLU_MODULES = (   # FuGlu 1.7's top-level modules (fuglu.<name>)
    'addrcheck', 'asyncprocpool', 'bounce', 'caching', 'connectors', 'core', 'daemon', 'debug',
    'extensions', 'funkyconsole', 'lib', 'loghandlers', 'logtools', 'mailattach', 'mixins',
    'mplugins', 'mshared', 'plugins', 'procpool', 'protocolbase', 'scansession', 'shared',
    'stats', 'stringencode', 'threadpool', 'utils')


class NotInThisBuild(FugluError, ImportError):
    """A module of FuGlu that this build does not have."""


class FugluModuleFinder(object):
    """Import hook for fuglu.* names that are not registered: fuglu.plugins.<name> of
    a bundled plugin loads it; FuGlu's other modules get a clear ImportError."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith('fuglu.') or fullname in sys.modules:
            return None
        import importlib.machinery
        _, _, name = fullname.rpartition('.')
        bundled = BUNDLED_UPSTREAM_PLUGIN_MODULES
        if fullname.rpartition('.')[0] == 'fuglu.plugins' and name in bundled:
            return importlib.machinery.ModuleSpec(fullname, self)
        if fullname.startswith('fuglu.plugins.') and name in UPSTREAM_PLUGIN_MODULES:
            names = ', '.join('fuglu.plugins.' + n for n in sorted(bundled))
            raise NotInThisBuild('%s is a plugin of FuGlu 1.7 that is not part of this build '
                                 '(fuglu bundles %s)' % (fullname, names), name=fullname)
        parent = fullname.rpartition('.')[0]
        # `from fuglu.shared import X` (fuglu.shared is this module, named fuglu) or
        # `from fuglu.extensions.sql import X`, and X is not here: a name, not a module
        if parent not in FUGLU_PACKAGES or (parent == 'fuglu' and name not in FUGLU_MODULES):
            where = 'fuglu.shared / fuglu.stringencode' if parent == 'fuglu' else parent
            raise NotInThisBuild('cannot import name %r from %s: not part of this build (see '
                                 'README, FuGlu compatibility)' % (name, where), name=fullname)
        raise NotInThisBuild('%s is a module of FuGlu that is not part of this build (see README, '
                             'FuGlu compatibility)' % fullname, name=fullname)

    def create_module(self, spec):
        # the bundled plugin module itself, under FuGlu's name
        ensure_bundled_plugins_importable()
        name = spec.name.rpartition('.')[2]
        module = importlib.import_module(BUNDLED_UPSTREAM_PLUGIN_MODULES[name])
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module):
        # the import system set __spec__ to FuGlu's name: give the module its own back
        module.__spec__ = module.__spec__.loader_state


def register_compat_modules():
    """Put FuGlu's module names in sys.modules (once; idempotent)."""
    import types
    this = sys.modules[__name__]
    this.__path__ = []   # `import fuglu.x` consults the import hook below
    sys.modules.setdefault('fuglu', this)
    for fullname, names in COMPAT_MODULES.items():
        parent, _, child = fullname.rpartition('.')
        if fullname in sys.modules:
            setattr(sys.modules[parent], child, sys.modules[fullname])
            continue
        if names is None:
            module = this
        else:
            module = types.ModuleType(fullname,
                                      'FuGlu %s: the names fuglu provides from it.' % fullname)
            module.__path__ = []
            for name in names:
                if callable(name) and not isinstance(name, str):
                    module.__getattr__ = name
                else:
                    setattr(module, name, globals()[name])
            if fullname in ('fuglu.mshared', 'fuglu.connectors.milterconnector'):
                module.__dict__.update(MILTER_COMPAT_NAMES)
            if fullname == 'fuglu.mshared':
                module.retcode2milter, module.EOM = dict(MILTER_RETCODES), MILTER_EOM
            if fullname == 'fuglu.bounce':
                module.requeue_rgx = QUEUE_ID_RE
        sys.modules[fullname] = module
        setattr(sys.modules[parent], child, module)
    for fullname, (flags, classes) in UNAVAILABLE_EXTENSIONS.items():
        if fullname not in sys.modules:
            sys.modules[fullname] = unavailable_extension(fullname, flags, classes)
            if fullname.endswith('dnsquery'):
                add_dns_standins(sys.modules[fullname], fullname.endswith('aiodnsquery'))
            if fullname.endswith('aioredisext'):
                sys.modules[fullname].AIORedisMixin = AIORedisMixin
        setattr(sys.modules['fuglu.extensions'], fullname.rpartition('.')[2], sys.modules[fullname])
    if not any(isinstance(finder, FugluModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, FugluModuleFinder())


register_compat_modules()


###############################################################################
# Command line
###############################################################################

# glibc's malloc keeps freed memory for reuse, in an arena for each thread that met
# contention (up to 8 per CPU): with dozens of workers passing big messages the resident
# size climbs round after round although Python holds nothing. At start-up fuglu limits
# the arenas to MALLOC_ARENAS (an admin's MALLOC_ARENA_MAX in the environment wins);
# after big messages the main loop gives back what the arenas hold free (malloc_trim).
# glibc's mmap threshold stays dynamic: fixing it low would give every big buffer back
# at once, but costs a quarter more CPU on 500 KB messages for about 1 MB less RSS.
# Without glibc (musl, BSD, macOS) nothing of this is done.
M_ARENA_MAX = -8     # mallopt() parameter, glibc's malloc.h
MALLOC_ARENAS = 2
_glibc = []


def glibc():
    """glibc's malloc functions through ctypes, or None elsewhere."""
    if not _glibc:
        try:
            import ctypes
            libc = ctypes.CDLL('libc.so.6')
            libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError, ImportError):
            libc = None
        _glibc.append(libc)
    return _glibc[0]


def tune_allocator():
    """The malloc setting above, for this process and the processes it forks. Returns
    the settings made ({} without glibc, or when the environment sets it)."""
    libc = glibc()
    if libc is None or 'MALLOC_ARENA_MAX' in os.environ:
        return {}
    return {'MALLOC_ARENA_MAX': MALLOC_ARENAS} if libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS) == 1 \
        else {}


def release_freed_memory():
    """Return the memory freed after start-up (compiling this file, loading plugins),
    or after big messages, to the system; glibc would keep it, and it would count as
    resident size."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


def release_memory_after_big_messages():
    """release_freed_memory() when big messages ended since the last call (the daemon's
    main loop calls this a few times a second)."""
    global big_messages_done
    if big_messages_done:
        big_messages_done = 0
        release_freed_memory()


DEFAULT_PIDFILE = '/run/fuglu/fuglu.pid'


def parse_args(argv):
    import argparse
    commands = '\n'.join('  %-14s %s' % (name, (function.__doc__ or '').strip().splitlines()[0])
                         for name, function in sorted(COMMANDS.items()))
    parser = argparse.ArgumentParser(
        prog='fuglu', description='fuglu mail content filter %s' % __version__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='commands (fuglu COMMAND --help for each):\n%s' % commands)
    parser.add_argument('--version', action='version', version=__version__)
    parser.add_argument('--lint', action='store_true', help='check configuration and plugins, '
                                                            'then exit')
    parser.add_argument('-c', '--config',
                        help='main config file (default %s)' % DEFAULT_CONFIG_PATH)
    parser.add_argument('--configdir', help='conf.d directory (default: conf.d beside the config '
                                            'file, only for the default config)')
    parser.add_argument('-f', '--foreground', action='store_true',
                        help='do not daemonize, log to stderr (privileges are dropped all the '
                             'same)')
    parser.add_argument('--pidfile',
                        help='pid file (default when daemonized: %s; in the foreground: none)'
                                          % DEFAULT_PIDFILE)
    parser.add_argument('--logconfig', help='logging configuration file '
                                            '(logging.fileConfig format)')
    parser.add_argument('--baseloglevel', default='INFO',
                        choices=['DEBUG', 'INFO', 'WARNING', 'ERROR'],
                        help='log level of the foreground log')
    parser.add_argument('--dump-defaults', action='store_true',
                        help='print the complete default configuration with descriptions')
    return parser.parse_args(argv)


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
    """send a message to a running netcat connector and print the verdict (FuGlu's fuglu_client)"""
    import argparse
    parser = argparse.ArgumentParser(
        prog='fuglu client', description='Send a message to a netcat connector, print the verdict. '
                                         'Exit code: DUNNO 0, DISCARD 2, REJECT 3, DEFER 4, any '
                                         'problem 1.')
    parser.add_argument('--host', default='127.0.0.1', help='connector host (default %(default)s)')
    parser.add_argument('-p', '--port', type=int, default=20099, help='connector port (default '
                                                                      '%(default)s)')
    parser.add_argument('-s', '--sender', help='envelope sender ("<>" for the null sender)')
    parser.add_argument('-r', '--recipient', action='append', default=[],
                        help='envelope recipient (repeatable)')
    parser.add_argument('-i', '--input', default='-', help='message file (default: standard input)')
    parser.add_argument('-o', '--output', action='store_true',
                        help='write the scanned message to standard output (the verdict goes to '
                             'standard error)')
    parser.add_argument('-t', '--timeout', type=float, default=300,
                        help='seconds to wait (default %(default)s)')
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
        print('%s: %s' % (status, rest.decode('utf-8', 'replace')),
              file=sys.stderr if args.output else sys.stdout)
    return CLIENT_EXIT_CODES[status]


# Health probes (FuGlu's HCHK and X-HEALTHCHECK): each returns (healthy, what was seen)

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
    answer = netcat_exchange(host, port, envelope_block([('X-HEALTHCHECK', 'true')]),
                             timeout).strip()
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


HEALTH_PROBES = {'smtp': probe_smtp, 'esmtp': probe_smtp, 'netcat': probe_netcat,
                 'milter': probe_milter}


# `fuglu healthcheck --deep` exit codes, those of monitoring plugins (Nagios, Icinga)
HEALTH_OK, HEALTH_CRITICAL, HEALTH_UNKNOWN = 0, 2, 3


def deep_health(config, timeout):
    """[(name, ok, detail)] for every connector of ``config`` (its health probe), every
    peer of every configured plugin (BasicPlugin.check_peers) and the downstream."""
    results = []
    bindaddress = config.get('main', 'bindaddress').strip()
    for entry in parse_list(config.get('main', 'incomingport')):
        protocol, address, port = parse_incomingport(entry, bindaddress)
        host = '127.0.0.1' if address in ('0.0.0.0',
                                          '') else ('::1' if address == '::' else address)
        probe = HEALTH_PROBES.get(protocol)
        if probe is None:
            continue
        try:
            healthy, seen = probe(host, port, timeout)
        except OSError as error:
            healthy, seen = False, str(error) or error.__class__.__name__
        results.append(('connector %s %s:%d' % (protocol, host, port), healthy, seen))
    controller = MainController(config)
    plugins = []
    for option in PLUGIN_LIST_OPTIONS:
        plugins += load_plugins(config, option)
    controller.plugins = plugins
    for plugin in plugins:
        try:
            checks = plugin.check_peers()
        except Exception as error:
            checks = [('%s peers' % plugin, False, '%s: %s' % (error.__class__.__name__, error))]
        results += [('plugin %s: %s' % (plugin, peer), ok, detail) for peer, ok, detail in checks]
    for level, text in check_downstream(config):
        results.append(('downstream', level == 'note', text))
    return results


def command_healthcheck(argv):
    """probe a running connector, or with --deep everything fuglu needs (monitoring)"""
    import argparse
    parser = argparse.ArgumentParser(
        prog='fuglu healthcheck',
        description='Probe a running connector: exit 0 when healthy, 1 when not. With --deep: '
                    'probe every connector of the configuration, every plugin\'s peers (clamd, '
                    'spamd, databases ...) and the downstream; exit 0 (OK), 2 (CRITICAL: something '
                    'fails) or 3 (UNKNOWN: the configuration or a plugin cannot be loaded), as '
                    'monitoring plugins do.')
    parser.add_argument('connector', nargs='?', choices=sorted(HEALTH_PROBES))
    parser.add_argument('target', nargs='?', metavar='HOST:PORT')
    parser.add_argument('--deep', action='store_true',
                        help='check everything the configuration uses')
    parser.add_argument('-c', '--config',
                        help='config file for --deep (default %s)' % DEFAULT_CONFIG_PATH)
    parser.add_argument('-t', '--timeout', type=float, default=5,
                        help='seconds (default %(default)s)')
    args = parser.parse_args(argv)
    if args.deep:
        logging.basicConfig(level=logging.CRITICAL)
        try:
            results = deep_health(read_config_for(args.config)[0], args.timeout)
        except (ConfigProblem, PluginLoadError, ValueError, configparser.Error) as error:
            print('UNKNOWN: %s' % error)
            return HEALTH_UNKNOWN
        for name, ok, detail in results:
            print('%s %s (%s)' % ('OK      ' if ok else 'CRITICAL', name, detail))
        failed = [name for name, ok, _detail in results if not ok]
        print('%s: %d checks, %d failed%s' % ('CRITICAL' if failed else 'OK', len(results),
                                              len(failed),
                                              (': ' + ', '.join(failed)) if failed else ''))
        return HEALTH_CRITICAL if failed else HEALTH_OK
    if not args.connector or not args.target:
        parser.error('give CONNECTOR HOST:PORT, or --deep')
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


def read_config_for(config_path, configdir=None):
    """(config, config path or None, configdir) the way the daemon finds them: -c, else
    /etc/fuglu/fuglu.conf (with conf.d), else the embedded default. Raises
    ConfigProblem when a config file given does not exist or cannot be read."""
    if config_path is None and os.path.exists(DEFAULT_CONFIG_PATH):
        config_path = DEFAULT_CONFIG_PATH
    if config_path is not None and not os.path.exists(config_path):
        raise ConfigProblem('config file %s not found; start from fuglu.conf.dist (fuglu '
                            '--dump-defaults)'
                            % config_path)
    if configdir is None and config_path == DEFAULT_CONFIG_PATH:
        configdir = os.path.join(DEFAULT_CONFDIR, 'conf.d')
    try:
        config = load_config(config_path, configdir,
                             embedded=None if config_path else EMBEDDED_CONFIG)
    except (configparser.Error, OSError, UnicodeError) as error:
        raise ConfigProblem('cannot read the configuration: %s' % error)
    return config, config_path, configdir


def command_control(argv):
    """send a command to a running fuglu's control socket (help lists them)"""
    import argparse
    parser = argparse.ArgumentParser(
        prog='fuglu control', description='Send a command to the control socket of a running fuglu '
                                          'and print the answer (FuGlu\'s fuglu_control). Exit 1 '
                                          'when it cannot be reached or refuses the command.')
    parser.add_argument('-c', '--config',
                        help='config file naming controlport (default %s)' % DEFAULT_CONFIG_PATH)
    parser.add_argument('-p', '--port',
                        help='unix socket path or TCP port on 127.0.0.1 (default: controlport)')
    parser.add_argument('-t', '--token',
                        help='controltoken of a TCP control port (default: $FUGLU_CONTROLTOKEN, '
                                              'then the config)')
    parser.add_argument('command', nargs='+',
                        help='stats, uptime, workerlist, threadlist, exceptionlist, '
                                                   'metrics, help')
    args = parser.parse_args(argv)
    target, token = args.port, args.token or os.environ.get('FUGLU_CONTROLTOKEN')
    if target is None or token is None:
        try:
            config = read_config_for(args.config)[0]
        except ConfigProblem as error:
            print(error, file=sys.stderr)
            return 1
        if target is None:
            spec = config.get('main', 'controlport').strip()
            if not spec:
                print('no controlport in the configuration', file=sys.stderr)
                return 1
            target = spec if spec.isdigit() else control_socket_path(config)
        if token is None:
            token = config.get('main', 'controltoken').strip()
    request = ' '.join(args.command)
    try:
        if target.isdigit():
            sock = socket.create_connection(('127.0.0.1', int(target)), timeout=30)
            if token:
                request = 'auth %s %s' % (token, request)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(30)
            sock.connect(target)
        with sock:
            sock.sendall(request.encode('utf-8'))
            sock.shutdown(socket.SHUT_WR)
            answer = read_until_eof(sock)[0].decode('utf-8', 'replace')
    except OSError as error:
        print('Cannot connect to fuglu control daemon (%s) - is fuglu running? %s' % (target,
                                                                                      error),
              file=sys.stderr)
        return 1
    sys.stdout.write(answer if answer.endswith('\n') else answer + '\n')
    return 1 if answer.startswith('ERR ') else 0


def message_envelope(message, sender=None, recipients=()):
    """Envelope for an offline check of a message file: the given addresses, else the
    Return-Path/From and Delivered-To/To headers (as FuGlu's tools do)."""
    from email.parser import BytesHeaderParser
    from email.utils import getaddresses
    headers = BytesHeaderParser().parsebytes(message)

    def first_address(*names):
        for name in names:
            found = [address for _name,
                     address in getaddresses([str(v) for v in headers.get_all(name, [])])
                     if address]
            if found:
                return found[0]
        return None
    if sender is None:
        sender = first_address('Return-Path', 'From') or 'sender@example.com'
    recipients = list(recipients) or [first_address('Delivered-To',
                                                    'To') or 'recipient@example.com']
    return sender, recipients


def read_message_file(path):
    if path == '-':
        return sys.stdin.buffer.read()
    with open(path, 'rb') as handle:
        return handle.read()


def command_suspectfilter(argv):
    """show which rules of a rule file match a message, and why"""
    import argparse
    parser = argparse.ArgumentParser(
        prog='fuglu suspectfilter', description='Match a SuspectFilter rule file against a message '
                                                'file (FuGlu\'s fuglu_suspectfilter). Exit 0 when '
                                                'a rule matches, 1 when none does, 2 when the rule '
                                                'file has errors or a file cannot be read.')
    parser.add_argument('rulefile')
    parser.add_argument('message', help='message file (- for standard input)')
    parser.add_argument('-s', '--sender', help='envelope sender (default: Return-Path or From)')
    parser.add_argument('-r', '--recipient', action='append', default=[],
                        help='envelope recipient (default: Delivered-To or To)')
    args = parser.parse_args(argv)
    try:
        message = read_message_file(args.message)
    except OSError as error:
        print('cannot read the message: %s' % error, file=sys.stderr)
        return 2
    if not os.path.isfile(args.rulefile):
        print('rule file not found: %s' % args.rulefile, file=sys.stderr)
        return 2
    rules = SuspectFilter(args.rulefile)
    for error in rules.errors:
        print('unparsable rule: %s' % error)
    sender, recipients = message_envelope(message, args.sender, args.recipient)
    suspect = Suspect(sender, recipients, inbuffer=message)
    print('%d rules in %s; envelope from=%s to=%s' % (len(rules.rules), args.rulefile,
                                                      sender or '<>',
                                                      ', '.join(recipients)))
    matched = 0
    for rule in rules.rules:
        values = [value for value in SuspectFilter.field_values(suspect, rule.fieldname)
                  if value is not None and rule.test(value) is not None]
        if not values:
            continue
        matched += 1
        print('\nline %d: %s' % (rule.lineno, rule.text))
        print('  %s' % ('decides (the first matching rule)' if matched == 1 else 'matches too'))
        print('  field %s, value %r' % (rule.fieldname, one_line(values[0], 200)))
        print('  argument: %s' % (rule.args if rule.args is not None else '(none)'))
    if not matched:
        print('no rule matches')
    return 2 if rules.errors else (0 if matched else 1)


def command_scan(argv):
    """scan a message file with the configured plugins, offline; print verdict, tags, headers"""
    import argparse
    parser = argparse.ArgumentParser(
        prog='fuglu scan', description='Run the configured prependers and scanners (appenders with '
                                       '-a) on a message file in this process, print the verdict, '
                                       'tags and the headers fuglu would add. Nothing is '
                                       'delivered. Exit code: DUNNO 0, DISCARD 2, REJECT 3, DEFER '
                                       '4, any problem 1.')
    parser.add_argument('message', help='message file (- for standard input)')
    parser.add_argument('-c', '--config', help='config file (default %s)' % DEFAULT_CONFIG_PATH)
    parser.add_argument('-s', '--sender', help='envelope sender (default: Return-Path or From)')
    parser.add_argument('-r', '--recipient', action='append', default=[],
                        help='envelope recipient (default: Delivered-To or To)')
    parser.add_argument('-a', '--appenders', action='store_true', help='run the appenders too')
    parser.add_argument('-o', '--output', action='store_true',
                        help='print the message with fuglu\'s headers')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    try:
        config = read_config_for(args.config)[0]
        message = read_message_file(args.message)
    except (ConfigProblem, OSError) as error:
        print(error, file=sys.stderr)
        return 1
    controller = MainController(config)
    try:
        controller.plugins, controller.prependers, controller.appenders = controller.load_plugins()
    except PluginLoadError as error:
        print('Some plugins failed to load: %s' % error, file=sys.stderr)
        return 1
    if not args.appenders:
        controller.appenders = []
    sender, recipients = message_envelope(message, args.sender, args.recipient)
    suspect = Suspect(sender, recipients, inbuffer=message)
    session = ScanSession(controller)
    action, text = session.scan(suspect)
    if args.appenders:
        session.finish(suspect, action, action in (DUNNO, ACCEPT))
    name = actioncode_to_string(action)
    print('verdict: %s%s' % (name,
                             ': ' + session.reply_text(suspect, action, text) if action not in (
        DUNNO, ACCEPT) else ''))
    print('envelope: from=%s to=%s' % (sender or '<>', ', '.join(recipients)))
    for stage, plugin, seconds in session.timings:
        print('%s %s: %.3f s' % (stage, plugin, seconds))
    print('tags:')
    for key in sorted(suspect.tags):
        value = suspect.tags[key]
        if key in ('appenders', 'debugfile') or value in (None, {}, [], ''):
            continue
        print('  %s = %s' % (key, one_line(repr(value), 300)))
    print('headers added:')
    added = list(suspect.added_headers.items()) + list(suspect.addheaders.items())
    for header_name, value in added:
        print('  %s: %s' % (header_name, one_line(value, 300)))
    if args.output:
        sys.stdout.flush()
        sys.stdout.buffer.write(NetcatSession.output_message(suspect))
    return CLIENT_EXIT_CODES.get({'DELETE': 'DISCARD', 'ACCEPT': 'DUNNO'}.get(name, name), 1)


def config_values_equal(default, value):
    """FuGlu's fuglu_conf comparison: case and blanks do not matter, yes/true/on/1 are
    one value, a trailing / of a path does not count."""
    def normal(text):
        text = (text or '').strip().lower()
        if text in ('yes', 'true', 'on', '1'):
            return '1'
        return text[:-1] if len(text) > 1 and text.endswith('/') else text
    return normal(default) == normal(value)


def command_conf(argv):
    """print the active configuration, or with -n the options that differ from the defaults"""
    import argparse
    parser = argparse.ArgumentParser(
        prog='fuglu conf', description='Print the configuration in effect (FuGlu\'s fuglu_conf): '
                                       'every option of the core and of the configured plugins '
                                       'with its value.')
    parser.add_argument('-c', '--config', help='config file (default %s)' % DEFAULT_CONFIG_PATH)
    parser.add_argument('--configdir', help='conf.d directory')
    parser.add_argument('-n', '--non-default', action='store_true',
                        help='only options whose value differs from the default, as opt=value '
                             '(def: default)')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format='%(levelname)s %(name)s: %(message)s')
    try:
        config = read_config_for(args.config, args.configdir)[0]
    except ConfigProblem as error:
        print(error, file=sys.stderr)
        return 1
    sections = {}
    for section, table in option_tables(config):
        for option, spec in table.items():
            if 'default' in spec:
                sections.setdefault(spec.get('section', section), {}).setdefault(option, spec)
    for section, options in sections.items():
        lines = []
        for option, spec in options.items():
            value = config.get(section, option, raw=True, fallback=spec['default'])
            default = str(spec['default'])
            if args.non_default:
                if config_values_equal(default, value):
                    continue
                if spec.get('confidential') and value.strip():
                    value = '***REDACTED***'
                shown = default if default.strip() else 'empty'
                shown = shown if len(shown) <= 15 else shown[:12] + '...'
                lines.append('%s=%s (def: %s)' % (option, value, shown))
            else:
                if spec.get('confidential') and value.strip():
                    value = '***REDACTED***'
                lines.append('%s=%s' % (option, value))
        if lines:
            print('\n[%s]' % section)
            print('\n'.join(lines))
    return 0


def command_samples(argv):
    """write the bundled samples (rules, templates, logging.conf, systemd unit ...) to a folder"""
    import argparse
    parser = argparse.ArgumentParser(
        prog='fuglu samples', description='Write the files bundled with fuglu into DIRECTORY, laid '
                                          'out as the defaults expect them beside fuglu.conf: '
                                          'rules/, templates/, archive.regex, skipplugins.regex, '
                                          'logging.conf, fuglu.service, fuglu.conf.dist. Existing '
                                          'files are never overwritten.')
    parser.add_argument('directory')
    args = parser.parse_args(argv)
    written = kept = 0
    for relative in bundled_conf_files():
        target = os.path.join(args.directory, *relative.split('/'))
        data = read_bundled_conf(relative)
        if data is None:
            continue
        os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW, 0o644)
        except FileExistsError:
            print('kept      %s (exists)' % target)
            kept += 1
            continue
        with os.fdopen(fd, 'wb') as out:
            out.write(data)
        print('wrote     %s' % target)
        written += 1
    print('%d files written, %d existing files kept' % (written, kept))
    return 0


# Extra commands: `fuglu <command> [args]` runs COMMANDS[command](args) -> exit code.
COMMANDS = {
    'client': command_client,
    'healthcheck': command_healthcheck,
    'control': command_control,
    'suspectfilter': command_suspectfilter,
    'scan': command_scan,
    'conf': command_conf,
    'samples': command_samples,
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    args = parse_args(argv)
    if args.dump_defaults:
        sys.stdout.write(dump_defaults(bundled_plugin_classes()))
        return 0
    try:
        config, config_path, configdir = read_config_for(args.config, args.configdir)
    except ConfigProblem as error:
        print(error, file=sys.stderr)
        return 1
    embedded = config_path is None
    logconfig = args.logconfig
    if logconfig is None and not embedded:
        candidate = os.path.join(config.confdir, 'logging.conf')
        daemonized = not args.foreground and config.getboolean('main', 'daemonize')
        if (daemonized or args.lint) and os.path.exists(candidate):
            logconfig = candidate

    if args.lint:
        logging.basicConfig(level=logging.ERROR, format='%(levelname)s %(name)s: %(message)s')
        if embedded:
            print('no config file at %s: checking the embedded default' % DEFAULT_CONFIG_PATH)
        errors = Lint(config, logconfig=logconfig).run()
        return min(errors, 255)

    foreground = args.foreground or embedded or not config.getboolean('main', 'daemonize')
    # until the daemon's logging is set up (after the privilege drop): stderr
    bootstrap = logging.StreamHandler(sys.stderr)
    bootstrap.setFormatter(logging.Formatter(FOREGROUND_LOG_FORMAT))
    logging.getLogger().addHandler(bootstrap)
    logging.getLogger().setLevel(getattr(logging, args.baseloglevel))
    logger = logging.getLogger('fuglu.main')
    if embedded:
        logger.info('no config file at %s: running on the embedded default (after-queue smtp on '
                    '127.0.0.1:10025, re-injection to 127.0.0.1:10026, no '
                    'plugins)', DEFAULT_CONFIG_PATH)
    pidfile = args.pidfile
    if pidfile is None and not foreground:
        pidfile = DEFAULT_PIDFILE
    report = StartupReport() if foreground else daemonize()
    allocator = tune_allocator()
    try:
        controller, pid = start_daemon(config, config_path, configdir, logconfig, foreground,
                                       args.baseloglevel, pidfile)
    except StartupFailed as failure:
        logger.error('start-up failed: %s', failure.message)
        report.failed(failure.message, failure.status)
        return failure.status
    release_freed_memory()
    if allocator:
        logger.info('malloc limited: %s',
                    ', '.join('%s=%d' % item for item in sorted(allocator.items())))
    status_text = '%d listeners, configuration %s' % (len(controller.listeners),
                                                      config.get('main', 'identifier'))
    return serve_until_stopped(controller, pid, on_ready=lambda: report.ready(status_text))


if __name__ == '__main__':
    sys.exit(main())
