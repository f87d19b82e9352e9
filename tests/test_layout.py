"""The package's layering (docs/development.md): each part imports only the parts its layout allows, no import
circle, a model registry that does no Hub I/O, a manifest module that imports nothing of ours, registered models
that document themselves, and benchmarks on the public API only."""
import ast
from pathlib import Path
from typing import Dict, Set

import timm
from timm.models import model_entrypoint

import ptl_timm

PACKAGE = Path(ptl_timm.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _import_graph() -> Dict[str, Set[str]]:
    """ptl_timm module -> the ptl_timm modules it imports, at the top or inside functions."""
    modules = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == '__init__.py' else name.rsplit('.', 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.split('.')[0] == 'ptl_timm')
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ''
                if node.level:
                    parent = package.split('.')[:len(package.split('.')) - node.level + 1]
                    base = '.'.join(parent + ([base] if base else []))
                if base.split('.')[0] != 'ptl_timm':
                    continue
                for alias in node.names:  # `from pkg import module` imports the module
                    edges.add(f'{base}.{alias.name}' if f'{base}.{alias.name}' in modules else base)
        graph[name] = edges - {name}
    return graph


# what each part of ptl_timm may import of ptl_timm besides itself: the tree of docs/development.md
ALLOWED = {
    'layers': set(),
    'data': set(),
    'offline': {'data'},
    'models': {'layers', 'hub'},  # hub.manifest and hub.cache only (test_registry_and_manifest_import_no_hub_io)
    'hub': {'layers', 'models', 'reid'},
    'reid': {'layers', 'models', 'data', 'hub'},
    'deploy': {'layers', 'models', 'reid', 'hub'},
    'launch': set(),
    'cli': {'layers', 'models', 'reid', 'data', 'offline', 'hub', 'deploy', 'launch'},
    '__main__': {'cli'},
}


def _part(module: str) -> str:
    parts = module.split('.')
    return parts[1] if len(parts) > 1 else ''


def test_each_part_imports_only_what_the_layout_allows():
    graph = _import_graph()
    parts = {_part(m) for m in graph} - {''}  # '' is the package's __init__, which re-exports the public names
    assert parts == set(ALLOWED), f'parts without a rule here and in docs/development.md: {parts ^ set(ALLOWED)}'
    wrong = sorted(f'{m} imports {d}' for m, deps in graph.items() for d in deps
                   if _part(m) and _part(d) != _part(m) and _part(d) not in ALLOWED[_part(m)])
    assert not wrong, ('imports against the layout of docs/development.md (move the code to where it belongs, or '
                       'change the layout there and in ALLOWED):\n' + '\n'.join(wrong))


def test_no_import_circle():
    graph = _import_graph()
    done: Set[str] = set()

    def visit(module: str, path: tuple) -> None:
        assert module not in path, 'import circle: ' + ' -> '.join(path[path.index(module):] + (module,))
        if module in done:
            return
        for dep in graph.get(module, ()):
            visit(dep, path + (module,))
        done.add(module)

    for module in graph:
        visit(module, ())


def test_registry_and_manifest_import_no_hub_io():
    graph = _import_graph()
    assert graph['ptl_timm.hub.manifest'] == set(), 'the manifest module imports nothing of ptl_timm'
    hub_modules = {m for m in graph['ptl_timm.models.ptlnet'] if m.startswith('ptl_timm.hub')}
    assert hub_modules <= {'ptl_timm.hub.manifest', 'ptl_timm.hub.cache'}, hub_modules
    assert not graph['ptl_timm.hub.cache'] & {'ptl_timm.hub.io', 'ptl_timm.hub.checkpoint', 'ptl_timm.hub.model_card'}
    assert not any(m.startswith('ptl_timm.models') for m in graph['ptl_timm.hub.cache'])


def test_every_registered_model_has_a_docstring_and_lives_in_a_model_file():
    names = timm.list_models(module=['ptlnet', 'mgn', 'bnneck'])
    assert set(timm.list_models('ptl_*')) <= set(names) and 'mgn_resnet50' in names
    for name in names:
        entry = model_entrypoint(name)
        assert entry.__module__.startswith('ptl_timm.') and (entry.__doc__ or '').strip(), name
    assert ptl_timm.PTL_BACKBONES == tuple(n[len('ptl_'):] for n in timm.list_models(module='ptlnet'))


# --- benchmarks use the public API only ------------------------------------------------------------------
BENCHMARKS = Path(__file__).resolve().parents[1] / 'benchmarks'


def _package_names() -> tuple:
    """(private names defined anywhere in ptl_timm: module-level, class attributes, methods and ``self._x``;
    the method names of ptl_timm's classes, properties aside)."""
    private, methods = set(), set()
    for path in PACKAGE.rglob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                private.add(node.name)
            if isinstance(node, ast.ClassDef):
                methods.update(n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                               and not any('property' in ast.unparse(d) for d in n.decorator_list))
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                private.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                private.add(node.attr)
    is_private = lambda n: n.startswith('_') and not (n.startswith('__') and n.endswith('__'))  # noqa: E731
    return {n for n in private if is_private(n)}, {n for n in methods if not n.startswith('__')}


def _benchmark_violations(path: Path, private: Set[str], methods: Set[str]):
    """(line, what) for each private ptl_timm name ``path`` imports or reads, and each ptl_timm method it
    assigns (patching)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split('.')
                if parts[0] == 'ptl_timm' and any(p.startswith('_') for p in parts):
                    yield node.lineno, f'imports the private module {alias.name}'
        elif isinstance(node, ast.ImportFrom) and (node.module or '').split('.')[0] == 'ptl_timm':
            if any(p.startswith('_') for p in node.module.split('.')):
                yield node.lineno, f'imports from the private module {node.module}'
            for alias in node.names:
                if alias.name.startswith('_'):
                    yield node.lineno, f'imports the private name {alias.name} from {node.module}'
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if (isinstance(target, ast.Attribute) and target.attr in methods
                        and not (isinstance(target.value, ast.Name) and target.value.id == 'self')):
                    yield node.lineno, f'patches the method {target.attr} of a ptl_timm class'
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and node.attr in private:
            yield node.lineno, f'uses the private ptl_timm name {node.attr}'
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ('setattr', 'getattr')
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
            name = node.args[1].value
            if node.func.id == 'setattr' and name in methods:
                yield node.lineno, f'patches the method {name} of a ptl_timm class (setattr)'
            elif name in private:
                yield node.lineno, f'uses the private ptl_timm name {name} (getattr)'


def test_benchmarks_use_public_names_of_ptl_timm_only():
    """A benchmark that imports a private name of ptl_timm, or replaces a method of one of its classes, measures
    something the package does not define: a refactor of the package could change it with no test failing."""
    private, methods = _package_names()
    found = [f'{path.relative_to(BENCHMARKS.parent)}:{line}: {what}' for path in sorted(BENCHMARKS.rglob('*.py'))
             for line, what in sorted(set(_benchmark_violations(path, private, methods)))]
    assert not found, ('benchmarks must use the public API of ptl_timm only. Fix: measure a documented option of the '
                       'package (add one, with its test, if a variant needs it) or a public function:\n'
                       + '\n'.join(found))


def test_the_benchmark_check_sees_private_imports_and_patches(tmp_path):
    script = tmp_path / 'bench.py'
    script.write_text('import types\n'
                      'from ptl_timm.layers.bconv_cell import _resize\n'
                      'from ptl_timm.models._helpers import fit_checkpoint\n'
                      'from ptl_timm import BConvCell, PTLNet\n'
                      'def f(cell, model, x):\n'
                      '    cell.forward = types.MethodType(print, cell)\n'
                      '    setattr(cell, "reset_state", print)\n'
                      '    return model._ladder(x), BConvCell.state_mode, PTLNet.forward_head\n')
    found = [line for line, _ in _benchmark_violations(script, *_package_names())]
    assert sorted(found) == [2, 3, 6, 7, 8]
