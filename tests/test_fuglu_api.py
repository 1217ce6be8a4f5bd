"""Every public name of the FuGlu 1.7.0 modules plugins import from exists in fuglu,
with a signature a FuGlu plugin can call the same way: the same positional parameters
in the same order, the same keyword names, defaults where FuGlu has them.

The list (fuglu_api/fuglu_1.7.0.txt) is generated from FuGlu's source by
fuglu_api/generate.py. The few names fuglu does not provide are in NOT_COVERED with
the reason; the README's compatibility section lists them too."""

import importlib
import inspect
import os

import pytest

from helpers import fuglu  # noqa: F401  (registers the fuglu.* module names)

HERE = os.path.dirname(os.path.abspath(__file__))
API_LIST = os.path.join(HERE, 'fuglu_api', 'fuglu_1.7.0.txt')

NOT_COVERED = {
    'fuglu.bounce.FugluAioSMTPClient': 'an aiosmtplib client; fuglu sends with its own SMTP client',
    'fuglu.bounce.AIOSMTP': "FuGlu's aiosmtplib client or its stand-in; HAVE_AIOSMTP is False",
    'fuglu.bounce.SMTPException': "aiosmtplib's exception or its stand-in (see AIOSMTP)",
    'fuglu.shared.sess2suspect': "builds a Suspect from FuGlu's own milter session object",
    'fuglu.shared.Suspect.att_mgr': "FuGlu's attachment manager (fuglu.mailattach) is not part "
                                    'of this build',
}


def not_covered(module, name):
    return any(key in NOT_COVERED for key in ('%s.%s' % (module, name),
                                              '%s.%s' % (module, name.split('.')[0])))


def entries(covered=True):
    for entry in all_entries():
        if not_covered(*entry[:2]) != covered:
            yield entry


def all_entries():
    with open(API_LIST) as handle:
        for line in handle:
            if line.startswith('#') or not line.strip():
                continue
            module, name, kind, params = [part.strip() for part in line.split('|')]
            yield module, name, kind, params


def upstream_parameters(text):
    return [p for p in text.split(',') if p]


def check_signature(function, upstream, skip_first):
    """Problems (list of str) calling ``function`` as FuGlu's signature allows."""
    problems = []
    ours = list(inspect.signature(function).parameters.values())
    kinds = inspect.Parameter
    var_positional = any(p.kind == kinds.VAR_POSITIONAL for p in ours)
    var_keyword = any(p.kind == kinds.VAR_KEYWORD for p in ours)
    if var_positional and var_keyword and len(ours) <= 3:
        return problems   # (self,) *args, **kwargs: takes whatever FuGlu passes
    positional = [p for p in ours if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    by_name = {p.name: p for p in ours}
    theirs_positional = [p for p in upstream if not p.startswith(('*', 'kw:'))]
    for index, spec in enumerate(theirs_positional):
        name, has_default = spec.rstrip('='), spec.endswith('=')
        if index >= len(positional):
            if not var_positional:
                problems.append('positional parameter %d (%s) missing' % (index, name))
            continue
        mine = positional[index]
        if mine.name != name and not (index == 0 and skip_first):
            problems.append('parameter %d is %r, FuGlu has %r' % (index, mine.name, name))
        if has_default and mine.default is kinds.empty:
            problems.append('parameter %s has no default (FuGlu has one)' % mine.name)
    for mine in positional[len(theirs_positional):]:
        if mine.default is kinds.empty:
            problems.append('extra required parameter %s' % mine.name)
    for mine in ours:
        if mine.kind == kinds.KEYWORD_ONLY and mine.default is kinds.empty:
            problems.append('extra required keyword %s' % mine.name)
    for spec in upstream:
        if spec.startswith('**') and not var_keyword:
            problems.append('no **kwargs')
        elif spec.startswith('*') and not spec.startswith('**') and not var_positional:
            problems.append('no *args')
        elif spec.startswith('kw:'):
            name = spec[3:].rstrip('=')
            if name not in by_name and not var_keyword:
                problems.append('keyword %s not accepted' % name)
    return problems


def resolve(module, name):
    target = importlib.import_module(module)
    owner = None
    for part in name.split('.'):
        owner = target
        target = getattr(target, part)
    return owner, target


@pytest.mark.parametrize('module,name,kind,params', list(entries()),
                         ids=['%s.%s' % entry[:2] for entry in entries()])
def test_fuglu_name_exists_with_a_compatible_signature(module, name, kind, params):
    owner, found = resolve(module, name)
    upstream = upstream_parameters(params)
    if kind == 'class':
        assert inspect.isclass(found), '%s is not a class' % name
        if not params:   # FuGlu's class takes its base's __init__ from outside FuGlu
            return
        init = found.__init__
        if init is object.__init__:
            init = found.__new__
        problems = check_signature(init, upstream, skip_first=True)
    elif kind == 'function':
        assert callable(found)
        problems = check_signature(found, upstream, skip_first=False)
    elif kind in ('method', 'staticmethod', 'classmethod'):
        member = inspect.getattr_static(owner, name.rsplit('.', 1)[1])
        if kind == 'staticmethod':
            assert isinstance(member, staticmethod), '%s is not a staticmethod' % name
            problems = check_signature(member.__func__, upstream, skip_first=False)
        else:
            function = member.__func__ if isinstance(member, (classmethod,
                                                              staticmethod)) else member
            assert callable(function), '%s is not callable' % name
            problems = check_signature(function, upstream, skip_first=True)
    elif kind == 'property':
        member = inspect.getattr_static(owner, name.rsplit('.', 1)[1])
        assert isinstance(member, property) or not callable(member), '%s is not a property' % name
        problems = []
    else:   # constant, attribute: present is enough
        problems = []
    assert not problems, '%s.%s: %s' % (module, name, '; '.join(problems))


def test_what_is_listed_as_not_covered_is_really_absent():
    # keeps NOT_COVERED (and the README) honest: a name provided later must leave it
    missing = list(entries(covered=False))
    assert missing
    for module, name, _kind, _params in missing:
        with pytest.raises(AttributeError):
            resolve(module, name)


def test_the_list_is_fuglu_1_7_and_not_empty():
    listed = list(all_entries())
    assert len(listed) > 250
    assert ('fuglu.shared', 'Suspect.get_message_rep', 'method', 'self') in listed


def test_bundled_plugins_use_only_public_names_of_the_core():
    import ast
    plugin_dir = os.path.join(os.path.dirname(HERE), 'fuglu_plugins')
    used = {}
    for name in sorted(os.listdir(plugin_dir)):
        if not name.endswith('.py'):
            continue
        with open(os.path.join(plugin_dir, name)) as handle:
            tree = ast.parse(handle.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == 'fuglu':
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id == 'fuglu':
                names = [node.attr]
            else:
                continue
            for used_name in names:
                used.setdefault(used_name, set()).add(name)
    assert used, 'no use of the core found: the test would pass vacuously'
    assert {name: files for name, files in used.items() if name not in fuglu.__all__} == {}
    assert [name for name in fuglu.__all__ if not hasattr(fuglu, name)] == []
