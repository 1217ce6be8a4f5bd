"""Test plugin for the life-cycle tests (plugindir module `gate`): holds every message
until the test opens the gate, so that mail is in flight when the test wants it.

For each message it creates `waiting-<id>` in `gatedir` (the test counts those; it holds
the recipient and the pid of the process scanning), then
waits until the file `open` exists there (at most `limit` seconds), then says DUNNO.
"""

import os
import time

from fuglu.shared import DUNNO, ScannerPlugin


class Gate(ScannerPlugin):
    requiredvars = {
        'gatedir': {'default': '', 'description': 'folder of the waiting-* files and the open file'},
        'limit': {'default': '60', 'description': 'seconds to wait at most'},
    }

    def examine(self, suspect):
        gatedir = self.config.get(self.section, 'gatedir')
        with open(os.path.join(gatedir, 'waiting-%s' % suspect.id), 'w') as marker:
            marker.write('%s %d\n' % (suspect.to_address, os.getpid()))
        deadline = time.time() + self.config.getfloat(self.section, 'limit')
        while not os.path.exists(os.path.join(gatedir, 'open')) and time.time() < deadline:
            time.sleep(0.02)
        return DUNNO
