"""Archive: FuGlu's ArchivePlugin (alias ``archive``, section ``[ArchivePlugin]``).

Keeps a copy of the messages that the rules in ``archiverules`` select, as files under
``local_archivedir``. Works as a scanner (returns ``problemaction`` when a copy was
wanted and could not be written) or as an appender (same work, result ignored).

Where a copy lands comes from templates filled with message data
(``${to_domain}/${to_localpart}/${date}``, ``${archiveid}.eml``). Senders choose that
data, so every path component is filled and cleaned on its own: no '/' survives inside
a component, '.' and '..' are replaced. The directories below the archive root are
opened one by one relative to their parent without following links (and created that
way), so neither a planted link nor one swapped in meanwhile leads out of the archive.
Files are written under a fresh name (O_EXCL) and renamed, so a reader never sees half
a message. A local_archivedir anybody may write to (the default, /tmp) is not used as
is: fuglu archives to /var/lib/fuglu/archive when started as root, else to a private
fuglu-USER/archive directory there (fuglu.shared_directory).
"""

import errno
import grp
import os
import pwd
import re

import fuglu
from fuglu import DUNNO, AppenderPlugin, ScannerPlugin, apply_template

SUPPORTED_BACKENDS = ('localdir',)
UPSTREAM_ONLY_BACKENDS = ('lmtp', 'elastic', 'cassandra', 'aios3', 's3', 'aiowebdav', 'webdav')
FUGLU_ID_RE = re.compile(r'^[0-9a-f]{32}$')
# characters never kept in a path component: separators, NUL and other controls
UNSAFE_COMPONENT_RE = re.compile(r'[/\\\x00-\x1f\x7f]')


# bytes of one path component at most (file systems allow 255)
COMPONENT_MAX_BYTES = 200
# directories are opened never through a link (0 where the platform lacks a flag)
O_DIRECTORY = getattr(os, 'O_DIRECTORY', 0)
O_NOFOLLOW = getattr(os, 'O_NOFOLLOW', 0)
O_CLOEXEC = getattr(os, 'O_CLOEXEC', 0)


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


class ArchiveError(Exception):
    pass


class ArchivePlugin(ScannerPlugin, AppenderPlugin):
    """Copies selected messages into an archive directory."""

    friendly_name = 'Archive'
    # FuGlu's other archive backends: accepted in a config, not available here
    ignored_options = tuple(r'%s_\w+' % backend for backend in UPSTREAM_ONLY_BACKENDS)

    requiredvars = {
        'archiverules': {'default': '${confdir}/archive.regex',
                         'description': 'rule file (SuspectFilter); the first matching rule '
                                        'decides: argument '
                                        '"no" = do not archive, "yes" (or no argument) = archive',
                         'path': 'file', 'missing': 'nothing is archived'},
        'archivebackends': {'default': 'localdir', 'description': 'where copies go; this build: '
                                                                  'localdir'},
        'multibackend': {'default': 'False', 'description': 'write to every backend (else: stop '
                                                            'after the first one that worked)'},
        'fugluid_headername': {'default': '', 'description': 'take the archive id from this header '
                                                             '(the id an upstream fuglu gave the '
                                                             'message)'},
        'fugluid_headername_skipmissing': {'default': 'True',
                                           'description': 'do not archive when that header '
                                                          'is missing or not a fuglu id'},
        'problemaction': {'default': 'DEFER', 'description': 'scanner result when archiving was '
                                                             'wanted and failed'},
        'local_archivedir': {'default': '/tmp',
                             'description': 'root directory of the archive (must exist). A '
                                            'directory anybody may write to (/tmp) is not used as '
                                            'is: fuglu archives to /var/lib/fuglu/archive when '
                                            'started as root, else to a private fuglu-USER/archive '
                                            'directory there',
                             'path': 'writedir', 'home': 'archive'},
        'local_subdirtemplate': {'default': '${to_domain}/${to_localpart}/${date}',
                                 'description': 'directory below local_archivedir (template; each '
                                                '/-separated component is filled and cleaned '
                                                'separately)'},
        'local_filenametemplate': {'default': '${archiveid}.eml',
                                   'description': 'file name (template)'},
        'local_useoriginal': {'default': 'True', 'description': 'archive the message as received '
                                                                '(False: with the changes of '
                                                                'earlier plugins)'},
        'local_chmod': {'default': '', 'description': 'octal mode of the archived file '
                                                      '(default 0600)'},
        'local_chown': {'default': '', 'description': 'owner (user name or uid) of the '
                                                      'archived file'},
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
    def archive_root(self):
        """local_archivedir, or where it was moved (see the module docstring)."""
        return fuglu.shared_directory(self.config.get(self.section, 'local_archivedir'), 'archive')

    def target_path(self, suspect, archive_id):
        """(directory components below the root, file name), each filled and cleaned."""
        section = self.section
        values = {'archiveid': archive_id}
        components = []
        for piece in self.config.get(section, 'local_subdirtemplate').strip('/').split('/'):
            if piece.strip():
                components.append(safe_component(apply_template(piece, suspect, values)))
        filename = safe_component(apply_template(self.config.get(section, 'local_filenametemplate'),
                                                 suspect, values))
        return components, filename

    def open_root(self):
        """(path, descriptor) of the archive root."""
        configured = self.config.get(self.section, 'local_archivedir')
        root = self.archive_root()
        if root == configured:   # the admin's directory (a link to it is fine)
            try:
                return root, os.open(root, os.O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            except FileNotFoundError:
                raise ArchiveError('local_archivedir %s does not exist' % root)
        if not fuglu.STARTED_AS_ROOT:
            fuglu.prepare_shared_home(root, 'archive')
        return root, fuglu.open_directory(root)

    @staticmethod
    def open_subdirectory(dir_fd, name, where):
        """``name`` below the open directory ``dir_fd`` (created 0755 when missing),
        never through a link."""
        flags = os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC
        try:
            try:
                return os.open(name, flags, dir_fd=dir_fd)
            except FileNotFoundError:
                try:
                    os.mkdir(name, 0o755, dir_fd=dir_fd)
                except FileExistsError:
                    pass
                return os.open(name, flags, dir_fd=dir_fd)
        except OSError as error:
            if error.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            try:
                target = ' (to %s)' % os.readlink(name, dir_fd=dir_fd)
            except OSError:
                target = ''
            raise ArchiveError('refusing to write outside the archive: %s is a link or no '
                               'directory%s'
                               % (os.path.join(where, name), target))

    def write_localdir(self, suspect, archive_id):
        section = self.section
        components, filename = self.target_path(suspect, archive_id)
        # as parts: a spooled message is copied from its file, not read into memory
        if self.config.getboolean(section, 'local_useoriginal'):
            data = suspect.source_parts(original=True)
        else:
            data = (suspect.get_output_parts() if hasattr(suspect, 'get_output_parts')
                    else suspect.get_source())
        mode, uid, gid = self.file_attributes()
        root, dir_fd = self.open_root()
        where = root
        try:
            for component in components:
                next_fd = self.open_subdirectory(dir_fd, component, where)
                os.close(dir_fd)
                dir_fd, where = next_fd, os.path.join(where, component)
            fuglu.write_file_at(dir_fd, filename, data, mode=0o600 if mode is None else mode,
                                owner=None if (uid, gid) == (-1, -1) else (uid, gid))
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.EISDIR):
                raise ArchiveError('refusing to replace %s: not a plain file'
                                   % os.path.join(where, filename))
            raise
        finally:
            os.close(dir_fd)
        return os.path.join(where, filename)

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
        try:
            self.file_attributes()
        except (ValueError, KeyError) as error:
            print('local_chmod / local_chown / local_chgrp: %s' % error)
            ok = False
        path = self.config.get(section, 'archiverules')
        if os.path.isfile(path) and not fuglu.SuspectFilter(path).lint():
            ok = False
        return ok
