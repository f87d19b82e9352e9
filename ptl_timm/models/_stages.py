"""A scriptable run of a timm backbone's stages, for ``torch.jit.script`` of the models that wrap it.

PTLNet reads a backbone's stage maps with timm's ``forward_intermediates``, which TorchScript cannot compile
for most CNNs (ResNet's slices a tuple by a variable index). :func:`staged_backbone` returns a copy of the
backbone that shares every module, parameter and buffer with it (same ``state_dict`` keys) and adds
``forward_stages(x, feats)``: the modules ``forward_features`` calls, in the order it calls them, appending
the output of every ``feature_info`` module to ``feats`` (channels-last for Swin and MambaOut: ``stage_nhwc``
says so, and the caller permutes them). The copy is checked against ``forward_intermediates``
on an example input, so a backbone whose forward does more than chain its modules fails at once, by name.
"""
import copy
import warnings
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ['staged_backbone', 'module_copy']


class _StagedModule(nn.Module):
    """Mixed into a copy of a module (with :class:`~torch.nn.ModuleDict`, for ``items()`` in TorchScript):
    runs the children named in ``stage_body`` in that order (the order ``forward_features`` calls them, which
    need not be the order they were registered in), keeping the outputs of those in ``stage_taps``."""
    stage_body: List[str]
    stage_taps: List[str]
    stage_nhwc: bool = False  # the taps are channels-last maps (the top copy only; set by staged_backbone)

    def forward_stages(self, x: torch.Tensor, feats: List[torch.Tensor]) -> torch.Tensor:
        for target in self.stage_body:
            for name, module in self.items():  # TorchScript reaches a child by a name only in such a loop
                if name == target:
                    if hasattr(module, 'stage_taps'):  # resolved when scripting: a group with taps inside
                        x = module.forward_stages(x, feats)
                    else:
                        x = module(x)
                    if name in self.stage_taps:
                        feats.append(x)
        return x

    def __reduce_ex__(self, protocol: Any) -> Any:
        return _unstaged, (type(self).__bases__[-1], self.__dict__)


class _StagedBackbone(_StagedModule):
    """The staged backbone itself: its ``forward`` is the backbone's (head of the features), through the stages,
    so TorchScript compiles this one and not the backbone's own, which may not script."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats: List[torch.Tensor] = []
        return self.forward_head(self.forward_stages(x, feats))


class _StagedSequential(nn.Sequential):
    """Mixed into a copy of a Sequential: runs every child, keeping the outputs at ``stage_taps``."""
    stage_taps: List[int]

    def forward_stages(self, x: torch.Tensor, feats: List[torch.Tensor]) -> torch.Tensor:
        for i, module in enumerate(self):
            if hasattr(module, 'stage_taps'):
                x = module.forward_stages(x, feats)
            else:
                x = module(x)
            if i in self.stage_taps:
                feats.append(x)
        return x

    def __reduce_ex__(self, protocol: Any) -> Any:
        return _unstaged, (type(self).__bases__[-1], self.__dict__)


def _unstaged(cls: type, state: Dict[str, Any]) -> nn.Module:
    """A pickled (or deep-copied) staged copy comes back as a module of its own class."""
    module = cls.__new__(cls)
    module.__dict__.update({k: v for k, v in state.items() if k not in ('stage_body', 'stage_taps', 'stage_nhwc')})
    return module


_CLASSES: Dict[Tuple[type, Union[bool, str]], type] = {}


def _staged_copy(module: nn.Module, body: List[str], taps: List[str], groups: Dict[str, nn.Module],
                 top: bool = False) -> nn.Module:
    cls = type(module)
    sequential = isinstance(module, nn.Sequential)
    if (cls, top) not in _CLASSES:
        mixin = _StagedBackbone if top else _StagedModule
        bases = (_StagedSequential, cls) if sequential else (mixin, nn.ModuleDict, cls)
        _CLASSES[cls, top] = type(f'Staged{cls.__name__}', bases, {'__module__': __name__})
    staged = module_copy(module)
    staged._modules.update(groups)
    staged.__class__ = _CLASSES[cls, top]
    names = list(module._modules)
    if sequential:
        staged.stage_taps = [names.index(t) for t in taps]
    else:
        staged.stage_body = body
        staged.stage_taps = taps
    return staged


class _IntermediatesBackbone(nn.Module):
    """Mixed into a copy of a backbone whose modules do not chain (its forward computes between them: position
    embeddings, token reshapes) but whose own ``forward_intermediates`` compiles in TorchScript (Twins, LeViT,
    MViTv2, PiT, TResNet, ...): ``forward_stages`` calls that."""

    def forward_stages(self, x: torch.Tensor, feats: List[torch.Tensor]) -> torch.Tensor:
        out = self.forward_intermediates(x)
        assert torch.jit.isinstance(out, Tuple[torch.Tensor, List[torch.Tensor]])
        final, maps = out
        for m in maps:
            feats.append(m)
        return final

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats: List[torch.Tensor] = []
        return self.forward_head(self.forward_stages(x, feats))

    def __reduce_ex__(self, protocol: Any) -> Any:
        return _unstaged, (type(self).__bases__[-1], self.__dict__)


@torch.no_grad()
def staged_backbone(backbone: nn.Module, examples: Sequence[torch.Tensor], name: str) -> nn.Module:
    """A copy of the timm ``backbone`` with a scriptable ``forward_stages(x, feats) -> final``; ``feats`` gets
    the maps ``forward_intermediates`` gives. ``examples``: inputs (B, C, H, W) to check that on; the first must
    run, a later one the backbone cannot take (another size) is skipped. Checking at two sizes catches a forward
    whose logic between modules depends on the input size (padding, say). Where the modules do not chain, a copy
    that calls the backbone's own ``forward_intermediates``, if that compiles in TorchScript."""
    try:
        return _chained_backbone(backbone, examples, name)
    except ValueError as chain_error:
        final, _ = backbone.forward_intermediates(examples[0])
        if not isinstance(final, torch.Tensor):  # CoaT, EfficientViM: a list of final features
            raise
        cls = type(backbone)
        if (cls, 'intermediates') not in _CLASSES:
            _CLASSES[cls, 'intermediates'] = type(
                f'Intermediates{cls.__name__}', (_IntermediatesBackbone, cls), {'__module__': __name__})
        staged = module_copy(backbone)
        staged.__class__ = _CLASSES[cls, 'intermediates']
        staged.stage_nhwc = False  # forward_intermediates gives NCHW maps
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')  # torch.jit.script's deprecation notice
                torch.jit.script(staged)
        except Exception:
            raise chain_error from None
        return staged


def _chained_backbone(backbone: nn.Module, examples: Sequence[torch.Tensor], name: str) -> nn.Module:
    taps = [info['module'] for info in backbone.feature_info]
    order: List[str] = []
    hooks = [m.register_forward_pre_hook(lambda m, i, n=n: order.append(n)) for n, m in backbone.named_modules() if n]
    modes = {m: m.training for m in backbone.modules()}
    backbone.eval()
    try:
        backbone.forward_features(examples[0])
    finally:
        for h in hooks:
            h.remove()

    def stage(module: nn.Module, prefix: str) -> nn.Module:
        called = list(dict.fromkeys(n[len(prefix):].split('.')[0] for n in order if n.startswith(prefix)))
        groups = {k: stage(child, f'{prefix}{k}.') for k, child in module.named_children()
                  if any(t.startswith(f'{prefix}{k}.') for t in taps)}
        own = [k for k in module._modules if f'{prefix}{k}' in taps]
        if isinstance(module, nn.Sequential) and called != list(module._modules):
            raise _not_a_chain(name, f'{prefix}* runs {len(called)} of its {len(module)} modules')
        return _staged_copy(module, called, own, groups, top=not prefix)

    try:
        staged = stage(backbone, '')
        for i, example in enumerate(examples):
            try:
                final, feats = backbone.forward_intermediates(example)
            except Exception:
                if i == 0:
                    raise
                continue  # the backbone does not take this size: nothing to match there
            got: List[torch.Tensor] = []
            try:
                got_final = staged.forward_stages(example, got)
            except Exception as e:  # e.g. a residual block with a stage map inside: its modules do not chain
                raise _not_a_chain(name, f'running its modules in order fails: {type(e).__name__}: '
                                         f'{str(e).splitlines()[0] if str(e) else ""}') from e
            if not all(isinstance(t, torch.Tensor) for t in (got_final, *got)):
                raise _not_a_chain(name, 'its modules chain into lists, not maps')
            if i == 0:  # Swin's and MambaOut's stages run channels-last; forward_intermediates gives NCHW maps
                staged.stage_nhwc = len(got) == len(feats) > 0 and not _same(got, feats) and \
                    _same([a.permute(0, 3, 1, 2) if a.ndim == 4 else a for a in got], feats)
            if staged.stage_nhwc:
                got = [a.permute(0, 3, 1, 2) for a in got]
            if len(got) != len(feats) or not torch.equal(got_final, final) or \
                    not all(torch.equal(a, b) for a, b in zip(got, feats)):
                raise _not_a_chain(name, f'chaining its modules does not give forward_intermediates\' maps at '
                                         f'{tuple(example.shape[-2:])} px')
    finally:
        for m, mode in modes.items():
            m.training = mode
    return staged


def _same(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def _not_a_chain(name: str, why: str) -> ValueError:
    return ValueError(
        f'TorchScript of PTL on {name}: its forward_features is not a chain of its modules ({why}) and its '
        'forward_intermediates does not compile in TorchScript, so its stages cannot be run in TorchScript. Use '
        'torch.export or torch.compile for this backbone.')


def module_copy(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` with its own attribute and child dicts: replacing a child of the copy (as
    ``torch.jit.script`` does with the children it prepares) leaves ``module`` as it was."""
    out = copy.copy(module)
    out.__dict__ = dict(module.__dict__)
    out._modules = dict(module._modules)
    return out
