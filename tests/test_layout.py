"""The package's layering (docs/development.md): no import circle, a model registry that does no Hub I/O, a
manifest module that imports nothing of ours, and registered models that document themselves."""
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
