"""The registered models timm's own tests/test_models.py runs on (tests/run.sh): one per code path, the smallest.

Every registered model is a model class of this package (PTLNet, ReIDNet, MGN) over a backbone class of timm's
(a PTLNet inside a ReIDNet counts too); models that share that chain share every line timm's tests exercise and
differ only in depth or width. Running the smallest of each keeps timm's tests within the suite's time on two
CPU cores. Prints a pytest -k expression of those names.
"""
import timm
import torch

import ptl_timm  # noqa: F401  (registers the models)

MODULES = ['ptlnet', 'bnneck', 'mgn']


def code_path(model: torch.nn.Module) -> tuple:
    """The chain of model classes from ``model`` down its backbones (MGN: with or without the ladder)."""
    path = [type(model).__name__]
    if hasattr(model, 'ptl'):
        path.append(f'ptl={model.ptl}')
    while hasattr(model, 'backbone') and isinstance(model.backbone, torch.nn.Module):
        model = model.backbone
        path.append(type(model).__name__)
    return tuple(path)


def smallest_per_code_path() -> list:
    chosen = {}
    for name in timm.list_models(module=MODULES):
        model = timm.create_model(name, device='meta')
        size = sum(p.numel() for p in model.parameters())
        key = code_path(model)
        if key not in chosen or size < chosen[key][0]:
            chosen[key] = (size, name)
    return sorted(name for _, name in chosen.values())


if __name__ == '__main__':
    print(' or '.join(smallest_per_code_path()))
