"""Archive: FuGlu's ArchivePlugin (alias ``archive``, section ``[ArchivePlugin]``),
spec section 6.2.

Keeps a copy of the messages that the rules in ``archiverules`` select, as files under
``local_archivedir``. Works as a scanner (returns ``problemaction`` when a copy was
wanted and could not be written) or as an appender (same work, result ignored).

Where a copy lands comes from templates filled with message data
(``${to_domain}/${to_localpart}/${date}``, ``${archiveid}.eml``). Senders choose that
data, so every path component is filled and cleaned on its own: no '/' survives inside
a component, '.' and '..' are replaced, and the final path is checked to lie inside
the archive directory (symbolic links resolved). Files are written under a temporary
name and renamed, so a reader never sees half a message.
"""

import grp
import os
import pwd
import re
import tempfile

import fuglu
from fuglu import DUNNO, AppenderPlugin, ScannerPlugin, apply_template

SUPPORTED_BACKENDS = ('localdir',)
UPSTREAM_ONLY_BACKENDS = ('lmtp', 'elastic', 'cassandra', 'aios3', 's3', 'aiowebdav', 'webdav')
FUGLU_ID_RE = re.compile(r'^[0-9a-f]{32}$')
# characters never kept in a path component: separators, NUL and other controls
UNSAFE_COMPONENT_RE = re.compile(r'[/\\\x00-\x1f\x7f]')


# bytes of one path component at most (file systems allow 255)
COMPONENT_MAX_BYTES = 200


def safe_component(text):
    """One directory or file name from message data: separators and control
    characters become '_', names the file system treats specially ('', '.', '..')
    become '_' too, and the name is cut to COMPONENT_MAX_BYTES bytes of UTF-8 (text
    that is not UTF-8, like the escapes of 8-bit header bytes, is replaced)."""
    text = UNSAFE_COMPONENT_RE.sub('_', text or '').strip()
    encoded = text.encode('utf-8', 'replace')[:COMPONENT_MAX_BYTES]
    text = encoded.decode('utf-8', 'ignore').strip()  # no character cut in half
    if text in ('', '.', '..'):
        return '_'
    return text


def path_inside(root, path):
    """True when ``path`` (after resolving symbolic links) lies inside ``root``."""
    root = os.path.realpath(root)
    path = os.path.realpath(path)
    return os.path.commonpath([root, path]) == root and path != root


class ArchiveError(Exception):
    pass


class ArchivePlugin(ScannerPlugin, AppenderPlugin):
    """Copies selected messages into an archive directory (spec 6.2)."""

    friendly_name = 'Archive'
    # FuGlu's other archive backends: accepted in a config, not available here
    ignored_options = tuple(r'%s_\w+' % backend for backend in UPSTREAM_ONLY_BACKENDS)

    requiredvars = {
        'archiverules': {'default': '${confdir}/archive.regex',
                         'description': 'rule file (SuspectFilter); the first matching rule decides: argument '
                                        '"no" = do not archive, "yes" (or no argument) = archive'},
        'archivebackends': {'default': 'localdir', 'description': 'where copies go; this build: localdir'},
        'multibackend': {'default': 'False', 'description': 'write to every backend (else: stop after the '
                                                            'first one that worked)'},
        'fugluid_headername': {'default': '', 'description': 'take the archive id from this header (the id an '
                                                             'upstream fuglu gave the message)'},
        'fugluid_headername_skipmissing': {'default': 'True', 'description': 'do not archive when that header '
                                                                             'is missing or not a fuglu id'},
        'problemaction': {'default': 'DEFER', 'description': 'scanner result when archiving was wanted and '
                                                             'failed'},
        'local_archivedir': {'default': '/tmp', 'description': 'root directory of the archive (must exist)'},
        'local_subdirtemplate': {'default': '${to_domain}/${to_localpart}/${date}',
                                 'description': 'directory below local_archivedir (template; each /-separated '
                                                'component is filled and cleaned separately)'},
        'local_filenametemplate': {'default': '${archiveid}.eml', 'description': 'file name (template)'},
        'local_useoriginal': {'default': 'True', 'description': 'archive the message as received (False: with '
                                                                'the changes of earlier plugins)'},
        'local_chmod': {'default': '', 'description': 'octal mode of the archived file (default 0600)'},
        'local_chown': {'default': '', 'description': 'owner (user name or uid) of the archived file'},
        'local_chgrp': {'default': '', 'description': 'group (name or gid) of the archived file'},
    }

    def __init__(self, config, section=None):
        super().__init__(config, section)
        self._filters = {}

    # -- plugin entry points -------------------------------------------------------
    def examine(self, suspect):
        failed = self.archive(suspect)
        return self._problemaction() if failed else DUNNO

    def process(self, suspect, decision):
        self.archive(suspect)

    # -- the work ------------------------------------------------------------------
    def rules(self):
        path = self.config.get(self.section, 'archiverules')
        if not path or not os.path.exists(path):
            return None
        current = self._filters.get(path)
        if current is None:
            current = self._filters[path] = fuglu.SuspectFilter(path)
        return current

    def wanted(self, suspect):
        """Does a rule ask for a copy of this message?"""
        rules = self.rules()
        if rules is None:
            return False
        matched, argument = rules.matches(suspect)
        if not matched:
            return False
        argument = (argument or '').strip().lower()
        if argument == 'no':
            return False
        if argument not in ('', 'yes'):
            self.logger.warning('%s: archive rule argument %r is neither yes nor no, archiving',
                                suspect.id, argument)
        # a rule without argument archives, as the shipped rules file documents
        # (upstream silently does nothing in that case)
        return True

    def archive_id(self, suspect):
        headername = self.config.get(self.section, 'fugluid_headername').strip()
        if not headername:
            return suspect.id
        value = (suspect.get_header(headername) or '').strip().lower()
        if FUGLU_ID_RE.match(value):
            return value
        if self.config.getboolean(self.section, 'fugluid_headername_skipmissing'):
            return None
        return suspect.id

    def archive(self, suspect):
        """Archive if the rules say so. Returns True when a wanted copy could not be
        written by any backend."""
        suspect.tags['archived'] = False
        for status in ('ham', 'spam', 'blocked', 'virus'):
            suspect.tags['archive.%s' % status] = getattr(suspect, 'is_%s' % status)()
        if not self.wanted(suspect):
            return False
        if suspect.get_tag('debug'):
            suspect.debug('archive rules match: message would be archived (not in debug mode)')
            return False
        archive_id = self.archive_id(suspect)
        if archive_id is None:
            self.logger.info('%s: not archived, header %s missing or invalid', suspect.id,
                             self.config.get(self.section, 'fugluid_headername'))
            return False
        results, errors = {}, {}
        multibackend = self.config.getboolean(self.section, 'multibackend')
        for backend in self.config.getlist(self.section, 'archivebackends', lower=True):
            if backend not in SUPPORTED_BACKENDS:
                errors[backend] = 'backend not supported by this build'
                self.logger.error('%s: archive backend %s is not supported', suspect.id, backend)
                continue
            try:
                results[backend] = self.write_localdir(suspect, archive_id)
            except (ArchiveError, OSError, ValueError, KeyError) as error:
                errors[backend] = str(error)
                self.logger.error('%s: archiving to %s failed: %s', suspect.id, backend, error)
                continue
            self.logger.info('%s: archived to %s', suspect.id, results[backend])
            if not multibackend:
                break
        suspect.tags['archived'] = bool(results)
        suspect.tags['archived.result'] = results
        suspect.tags['archived.errors'] = errors
        return not results

    # -- localdir backend ----------------------------------------------------------
    def target_path(self, suspect, archive_id):
        """Archive root, sub directories and file name, each filled and cleaned."""
        section = self.section
        root = self.config.get(section, 'local_archivedir')
        values = {'archiveid': archive_id}
        components = []
        for piece in self.config.get(section, 'local_subdirtemplate').strip('/').split('/'):
            if piece.strip():
                components.append(safe_component(apply_template(piece, suspect, values)))
        filename = safe_component(apply_template(self.config.get(section, 'local_filenametemplate'),
                                                 suspect, values))
        directory = os.path.join(root, *components)
        path = os.path.join(directory, filename)
        if not path_inside(root, path):
            raise ArchiveError('refusing to write outside %s: %r' % (root, path))
        return directory, path

    def write_localdir(self, suspect, archive_id):
        section = self.section
        root = self.config.get(section, 'local_archivedir')
        if not os.path.isdir(root):
            raise ArchiveError('local_archivedir %s does not exist' % root)
        directory, path = self.target_path(suspect, archive_id)
        os.makedirs(directory, mode=0o755, exist_ok=True)
        if not path_inside(root, directory + os.sep + 'x'):  # a link created meanwhile
            raise ArchiveError('refusing to write outside %s' % root)
        if self.config.getboolean(section, 'local_useoriginal'):
            data = suspect.get_original_source()
        else:
            data = suspect.get_output_source() if hasattr(suspect, 'get_output_source') else suspect.get_source()
        mode, uid, gid = self.file_attributes()
        handle, temporary = tempfile.mkstemp(prefix='.archive-', dir=directory)
        try:
            with os.fdopen(handle, 'wb') as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            if mode is not None:
                os.chmod(temporary, mode)
            if uid != -1 or gid != -1:
                os.chown(temporary, uid, gid)
            os.replace(temporary, path)
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise
        return path

    def file_attributes(self):
        """(mode or None, uid or -1, gid or -1) from local_chmod/chown/chgrp."""
        section = self.section
        mode_text = self.config.get(section, 'local_chmod').strip()
        mode = int(mode_text, 8) if mode_text else None
        owner = self.config.get(section, 'local_chown').strip()
        group = self.config.get(section, 'local_chgrp').strip()
        uid = -1 if not owner else (int(owner) if owner.isdigit() else pwd.getpwnam(owner).pw_uid)
        gid = -1 if not group else (int(group) if group.isdigit() else grp.getgrnam(group).gr_gid)
        return mode, uid, gid

    # -- lint ----------------------------------------------------------------------
    def lint(self):
        ok = self.check_config()
        section = self.section
        for backend in self.config.getlist(section, 'archivebackends', lower=True):
            if backend in UPSTREAM_ONLY_BACKENDS:
                print('archive backend %s exists in FuGlu but not in this build' % backend)
                ok = False
            elif backend not in SUPPORTED_BACKENDS:
                print('unknown archive backend %s' % backend)
                ok = False
        root = self.config.get(section, 'local_archivedir')
        if not os.path.isdir(root):
            print('local_archivedir %s does not exist' % root)
            ok = False
        elif not os.access(root, os.W_OK | os.X_OK):
            print('local_archivedir %s is not writable' % root)
            ok = False
        try:
            self.file_attributes()
        except (ValueError, KeyError) as error:
            print('local_chmod / local_chown / local_chgrp: %s' % error)
            ok = False
        path = self.config.get(section, 'archiverules')
        if not os.path.exists(path):
            print('archiverules %s not found: nothing will be archived' % path)
        elif not fuglu.SuspectFilter(path).lint():
            ok = False
        return ok
