"""A FuGlu-style scanner plugin that spends a fixed amount of pure-Python CPU time on
every message (bench/process.py calibrates ``iterations`` to ~5 ms on the
machine and gives both filters the same number). It imports only FuGlu's plugin API,
so upstream FuGlu 1.7.0 and fuglu load it unchanged (``plugindir`` = this folder,
``plugins = cpuburn.CPUBurn``)."""

from fuglu.shared import DUNNO, ScannerPlugin


def burn(iterations, seed):
    """Integer arithmetic in the interpreter loop: no I/O, no C helper releasing the
    GIL, the same work for every call."""
    value = seed & 0x7fffffff
    for _ in range(iterations):
        value = (value * 1103515245 + 12345) & 0x7fffffff
    return value


class CPUBurn(ScannerPlugin):
    """Burns ``iterations`` rounds of burn() per message, answers DUNNO."""

    def __init__(self, config, section=None):
        super().__init__(config, section)
        self.requiredvars = {
            'iterations': {'default': '50000',
                           'description': 'rounds of pure-Python arithmetic per message'},
        }

    def examine(self, suspect):
        burn(self.config.getint(self.section, 'iterations'), suspect.size)
        return DUNNO

    def lint(self):
        return self.check_config()
