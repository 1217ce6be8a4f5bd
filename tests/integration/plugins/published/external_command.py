# Style: the message handed to an external program as suspect.tempfile (as plugins
# that call a command-line scanner do).
import os
import subprocess
import sys

from fuglu.shared import ScannerPlugin, DUNNO, DEFER


class ExternalCommand(ScannerPlugin):
    def __init__(self, config, section=None):
        super().__init__(config, section)
        self.requiredvars = {'timeout': {'default': '20', 'description': 'seconds'}}

    def examine(self, suspect):
        # the daemon runs as an unprivileged user: call the system's interpreter, as a
        # plugin calls a command-line scanner installed for everybody
        python = '/usr/bin/python3' if os.path.exists('/usr/bin/python3') else sys.executable
        command = [python, '-c', 'import sys; print(len(open(sys.argv[1], "rb").read()))',
                   suspect.tempfile]
        try:
            output = subprocess.run(command, stdout=subprocess.PIPE, check=True,
                                    timeout=self.config.getint(self.section, 'timeout')).stdout
        except (OSError, subprocess.SubprocessError) as error:
            self._logger().error('%s external command failed: %s', suspect.id, error)
            return DEFER, 'external check failed'
        suspect.add_header('X-External-Size', output.decode().strip())
        suspect.set_tag('external_command.tempfile', suspect.tempfile)
        return DUNNO
