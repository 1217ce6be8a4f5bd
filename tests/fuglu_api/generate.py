"""Writes fuglu_1.7.0.txt: the public names and signatures of the FuGlu modules that
plugins import from, read from FuGlu's own source with the ast module (nothing of
FuGlu is imported or copied).

    pip download fuglu==1.7.0 --no-deps -d /tmp/fuglu
    tar xzf /tmp/fuglu/fuglu-1.7.0.tar.gz -C /tmp/fuglu
    python3 tests/fuglu_api/generate.py /tmp/fuglu/fuglu-1.7.0/src/fuglu \
        > tests/fuglu_api/fuglu_1.7.0.txt

One line per name:  module | name | kind | parameters
kind: function, class (parameters of __init__), method, staticmethod, classmethod,
property, attribute, constant. Parameters: positional names in order ('=' marks a
default), '*name' / '**name' for varargs, 'kw:name' for keyword-only ones.
"""

import ast
import os
import sys

MODULES = ['shared', 'stringencode', 'mshared', 'bounce', 'extensions/sql']

# protected members that plugins call or override (the rest of _names is internal)
PROTECTED = {
    '_logger', '_problemcode', '_blockreport', '_spamreport', '_virusreport', '_check_too_big',
    '_get_enginename', '_skip_on_previous_virus', '_close_socket', '__init_socket__',
    '_check_apply_override', '_parse_rcvd_header', '_short_tag_rep', '_parse_lines',
    '_reload_if_necessary', '_apply_linefilters', '_filter_lines', '_add_required_headers',
    '_SuspectTemplate',   # module-level, private, but FuGlu's own plugins import it
}


def parameters(function):
    args = function.args
    positional = list(getattr(args, 'posonlyargs', [])) + list(args.args)
    first_default = len(positional) - len(args.defaults)
    out = [arg.arg + ('=' if index >= first_default else '') for index,
           arg in enumerate(positional)]
    if args.vararg:
        out.append('*' + args.vararg.arg)
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        out.append('kw:' + arg.arg + ('=' if default is not None else ''))
    if args.kwarg:
        out.append('**' + args.kwarg.arg)
    return ','.join(out)


def is_overload(function):
    return any(getattr(d, 'id', None) == 'overload' for d in function.decorator_list)


def method_kind(function):
    names = {getattr(d, 'id', getattr(d, 'attr', '')) for d in function.decorator_list}
    for kind in ('staticmethod', 'classmethod', 'property'):
        if kind in names:
            return kind
    if any(isinstance(d, ast.Attribute) and d.attr in ('setter',
                                                       'deleter') for d in function.decorator_list):
        return None
    return 'method'


def wanted(name):
    return not name.startswith('_') or name in PROTECTED or name == '__init__'


def class_members(node, mixins):
    members = {}
    for base in node.bases:
        base_name = getattr(base, 'id', None)
        if base_name in mixins:   # FuGlu's mixins are part of what a subclass offers
            members.update(mixins[base_name])
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and wanted(item.name):
            kind = method_kind(item)
            if kind:
                members[item.name] = (kind, parameters(item) if kind != 'property' else '')
        elif isinstance(item, ast.Assign):
            for target in item.targets:
                if isinstance(target, ast.Name) and not target.id.startswith('_'):
                    members[target.id] = ('attribute', '')
    return members


def top_level(body, guarded=False):
    """The statements of a module body, those under a top-level try/if included: FuGlu
    sets its optional-library flags (CHARDET_AVAILABLE ...) there. Under try/if only
    definitions and upper-case flags count; the rest are module placeholders (bs4 = None)."""
    for node in body:
        if isinstance(node, (ast.Try, ast.If)):
            handlers = [line for handler in getattr(node, 'handlers', []) for line in handler.body]
            yield from top_level(node.body + handlers + node.orelse
                                 + getattr(node, 'finalbody', []), guarded=True)
        elif not guarded or not isinstance(node, (ast.Assign, ast.AnnAssign)):
            yield node
        elif all(isinstance(target, ast.Name) and target.id.isupper()
                 for target in getattr(node, 'targets', [getattr(node, 'target', None)])):
            yield node


def main(srcdir):
    with open(os.path.join(srcdir, 'mixins.py')) as handle:
        mixin_tree = ast.parse(handle.read())
    mixins = {}
    for node in mixin_tree.body:
        if isinstance(node, ast.ClassDef):
            mixins[node.name] = class_members(node, {})
    lines = []
    for relative in MODULES:
        module = 'fuglu.' + relative.replace('/', '.')
        with open(os.path.join(srcdir, relative + '.py')) as handle:
            tree = ast.parse(handle.read())
        inits = {}   # class -> parameters of the __init__ it has (own or inherited here)
        for node in top_level(tree.body):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if not node.name.startswith('_') and not is_overload(node):
                    lines.append((module, node.name, 'function', parameters(node)))
            elif isinstance(node, ast.ClassDef) and wanted(node.name):
                members = class_members(node, mixins)
                init = members.pop('__init__', (None, None))[1]
                for base in node.bases:
                    base_name = getattr(base, 'id', None) or getattr(base, 'attr', None)
                    if init is None and base_name in inits:
                        init = inits[base_name]
                inits[node.name] = init
                # '' : the __init__ of a class from elsewhere (smtplib, object ...)
                lines.append((module, node.name, 'class', init or ''))
                for name, (kind, params) in sorted(members.items()):
                    lines.append((module, '%s.%s' % (node.name, name), kind, params))
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Name) and not target.id.startswith('_'):
                        lines.append((module, target.id, 'constant', ''))
    seen = set()
    out = ['# public API of FuGlu 1.7.0 (generated by tests/fuglu_api/generate.py; do not edit)']
    for line in lines:
        if line[:2] not in seen:
            seen.add(line[:2])
            out.append(' | '.join(line))
    print('\n'.join(out))


if __name__ == '__main__':
    main(sys.argv[1])
