"""MessageDebugger (alias `debug`): messages arriving on the debug port are traced to a
file and, by default, neither re-injected, bounced nor passed to appenders."""

import os

import fuglu


class MessageDebugger(fuglu.PrependerPlugin):
    """Prepender: when a message arrives on ``debugport``, set the tags nobounce,
    noreinject and noappenders (per the options) and write the plugins' debug lines for
    it to ``debugfile``.

    The file is created anew for each debugged message (like FuGlu, the newest wins)
    under a fresh name and renamed into place, so a link planted at its name is
    replaced, never followed; a ``debugfile`` in a directory anybody may write to is
    moved (fuglu.shared_file_path: /var/log/fuglu when started as root)."""

    default_section = 'debug'
    friendly_name = 'Debugger'
    requiredvars = {
        'debugport': {'default': '10888', 'description': 'messages arriving on this port are '
                                                         'debugged'},
        'debugfile': {'default': '/tmp/fuglu_debug.log',
                      'description': 'file the debug lines are written to; in a directory anybody '
                                     'may write to (/tmp) it is moved to /var/log/fuglu when fuglu '
                                     'starts as root, else to a private fuglu-USER directory there',
                      'path': 'writefile', 'home': 'log'},
        'nobounce': {'default': 'True', 'description': 'send no bounces for debugged messages'},
        'noreinject': {'default': 'True', 'description': 'do not re-inject debugged messages'},
        'noappender': {'default': 'True', 'description': 'do not run appenders for debugged '
                                                         'messages'},
    }

    def pluginlist(self, suspect, pluginlist):
        if suspect.tags.get('incomingport') != self.config.getint(self.section, 'debugport'):
            return None
        config, section = self.config, self.section
        suspect.tags['nobounce'] = config.getboolean(section, 'nobounce')
        suspect.tags['noreinject'] = config.getboolean(section, 'noreinject')
        suspect.tags['noappenders'] = config.getboolean(section, 'noappender')
        path = fuglu.shared_file_path(config.get(section, 'debugfile'), 'log')
        try:
            handle = self.open_debug_file(path)
        except OSError as error:
            self.logger.error('%s: cannot open debug file %s: %s', suspect.id, path, error)
            return None
        suspect.tags['debug'] = True
        suspect.tags['debugfile'] = handle
        suspect.debug('debugging %s from=%s to=%s' % (suspect.id, suspect.from_address,
                                                      suspect.recipients))
        suspect.debug('scanners: %s' % ', '.join(str(p) for p in pluginlist))
        return None

    @staticmethod
    def open_debug_file(path):
        directory, name = os.path.split(path)
        dir_fd = fuglu.open_directory(directory, check_mode=False)
        try:
            handle = fuglu.create_file_at(dir_fd, name)
        finally:
            os.close(dir_fd)
        import io
        return io.TextIOWrapper(handle, encoding='utf-8', errors='replace', line_buffering=True)

    def lint(self):
        if not self.check_config():
            return False
        debugport = self.config.get(self.section, 'debugport').strip()
        bindaddress = self.config.get('main', 'bindaddress').strip()
        ports = set()
        for entry in fuglu.parse_list(self.config.get('main', 'incomingport')):
            try:
                ports.add(str(fuglu.parse_incomingport(entry, bindaddress)[2]))
            except ValueError:
                continue
        if debugport not in ports:
            print('debugport %s is not one of the incoming ports %s' % (debugport, sorted(ports)))
            return False
        return True
