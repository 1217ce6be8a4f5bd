"""pytest hooks for the unit tests (their helpers are in helpers.py)."""

import re


def pytest_make_parametrize_id(config, val, argname):
    """Test ids that are the same in every process: a parameter made of random or
    binary bytes (a generated archive, a program with random content) is named after
    its argument, not spelled out, so pytest-xdist's workers collect the same tests."""
    if isinstance(val, (bytes, bytearray)) and \
            (len(val) > 40 or not re.fullmatch(rb'[\x20-\x7e]*', bytes(val))):
        return argname
    return None
