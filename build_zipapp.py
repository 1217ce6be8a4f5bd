#!/usr/bin/env python3
"""Build dist/fuglu.pyz: fuglu.py, the bundled plugins (fuglu_plugins/), their default
rule files and templates (conf/) and fuglu.conf.dist in one executable zip.

The build is reproducible: the same sources and the same Python give the same bytes
(sorted entries, a fixed timestamp and permissions, no compression variance: entries
are stored, byte code compiled with a fixed hash seed).

Beside fuglu.py goes fuglu.pyc, its byte code for the Python that builds (a
hash-checked pyc): zipimport cannot cache compiled code, and compiling the core costs
about 0.1 s at every start. Another Python, or a fuglu.py changed inside the archive,
finds the pyc's magic number or source hash wrong and compiles the source as before.
Run: python3 build_zipapp.py [-o dist/fuglu.pyz]
"""

import argparse
import os
import stat
import subprocess
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
SHEBANG = b'#!/usr/bin/env python3\n'
FIXED_TIME = (1980, 1, 1, 0, 0, 0)

# __main__ only imports the module: every function stays in fuglu.py, so worker
# processes started by multiprocessing can find them (spawn/forkserver do not re-run
# __main__.py from a zip).
MAIN_PY = b'import sys\nimport fuglu\nsys.exit(fuglu.main())\n'


def members():
    """(name in the archive, path on disk) of everything that goes in, sorted."""
    found = [('fuglu.py', os.path.join(HERE, 'fuglu.py')),
             ('fuglu.conf.dist', os.path.join(HERE, 'fuglu.conf.dist'))]
    for folder in ('fuglu_plugins', 'conf'):
        for root, dirs, files in os.walk(os.path.join(HERE, folder)):
            dirs[:] = sorted(d for d in dirs if d != '__pycache__')
            for name in files:
                if name.endswith(('.pyc', '.pyo')) or name.startswith('.'):
                    continue
                path = os.path.join(root, name)
                found.append((os.path.relpath(path, HERE).replace(os.sep, '/'), path))
    return sorted(found)


# run in a child: PYTHONHASHSEED fixes the order of set constants in the byte code
COMPILE_PY = ('import py_compile, sys; py_compile.compile(sys.argv[1], cfile=sys.argv[2], '
              'dfile="fuglu.py", doraise=True, '
              'invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)')


def byte_code(source):
    """The hash-checked pyc of ``source`` for this Python."""
    with tempfile.TemporaryDirectory() as scratch:
        cfile = os.path.join(scratch, 'fuglu.pyc')
        env = dict(os.environ, PYTHONHASHSEED='0')
        subprocess.run([sys.executable, '-I', '-c', COMPILE_PY, source, cfile], env=env,
                       check=True)
        with open(cfile, 'rb') as handle:
            return handle.read()


def build(target):
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    temporary = target + '.tmp'
    with open(temporary, 'wb') as out:
        out.write(SHEBANG)
        with zipfile.ZipFile(out, 'w', compression=zipfile.ZIP_STORED) as archive:
            entries = [('__main__.py', None), ('fuglu.pyc', None)] + members()
            for name, path in sorted(entries):
                info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                info.create_system = 3  # unix, whatever machine builds it
                if name == 'fuglu.pyc':
                    data = byte_code(os.path.join(HERE, 'fuglu.py'))
                elif path is None:
                    data = MAIN_PY
                else:
                    with open(path, 'rb') as handle:
                        data = handle.read()
                archive.writestr(info, data)
    os.chmod(temporary, 0o755)
    os.replace(temporary, target)
    return target


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('-o', '--output', default=os.path.join(HERE, 'dist', 'fuglu.pyz'))
    args = parser.parse_args(argv)
    path = build(args.output)
    print('wrote %s (%d bytes)' % (os.path.relpath(path), os.path.getsize(path)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
