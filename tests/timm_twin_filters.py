"""A pytest plugin for timm's own tests/test_models.py (tests/run.sh loads it with ``-p timm_twin_filters``).

timm runs a part of its tests only on standard models: its ``NON_STD_FILTERS`` name the token and hybrid models
without the full spatial API (Hiera: token features, no TorchScript, no FX), which its filters match by name.
A PTL model wraps its backbone's forward, so ``ptl_X`` of such an ``X`` runs exactly the tests timm runs on ``X``
(its twin); every other ``ptl_*`` model (CNNs, Swin, MambaOut) runs every test, as before. Which tests timm runs
on ``X`` is read off each test's own ``model_name`` parametrization, so ``-k`` selections do not change it.
"""
import fnmatch
from typing import Any, List, Optional

import timm
from timm.models import split_model_name_tag


def _twin(model_name: Any) -> Optional[str]:
    """The backbone (with the tag) of a registered PTLNet model ``ptl_X[.tag]``, else None."""
    if not isinstance(model_name, str) or not model_name.startswith('ptl_'):
        return None
    arch, tag = split_model_name_tag(model_name)
    if arch not in timm.list_models(module='ptlnet'):
        return None
    backbone = arch[len('ptl_'):]
    return f'{backbone}.{tag}' if tag else backbone


def _model_names(item: Any) -> List[str]:
    for mark in item.iter_markers('parametrize'):
        if mark.args and mark.args[0] == 'model_name':
            return list(mark.args[1])
    return []


def pytest_collection_modifyitems(config: Any, items: List[Any]) -> None:
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, 'callspec', None)
        twin = _twin(callspec.params.get('model_name') if callspec else None)
        non_std = getattr(item.module, 'NON_STD_FILTERS', ())
        if twin and any(fnmatch.fnmatch(twin.split('.')[0], f) for f in non_std):
            names = _model_names(item)
            if twin not in names and twin.split('.')[0] not in names:
                drop.append(item)
                continue
        keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
