"""What the Hub, deploy and CLI code needs to know about each model class ptl_timm registers (PTLNet, MGN, ReIDNet),
found from the model itself (its class, its cells), never from its name: the arguments that rebuild it, its
checkpoint filter, its classifier, the PTLNet inside it."""
from typing import Any, Callable, Dict, List, Optional, Tuple

import timm
import torch
from timm.models import get_pretrained_cfg, model_entrypoint, split_model_name_tag
from torch import nn

from ..layers import bconv_cells
from ..models._helpers import as_tuple
from ..models.ptlnet import PTLNet, checkpoint_filter_fn
from ..reid.bnneck import ReIDNet, reid_checkpoint_filter_fn
from ..reid.mgn import MGN, mgn_checkpoint_filter_fn

__all__ = [
    'registered_models', 'is_registered', 'has_cells', 'inner_ptl_net', 'model_args', 'checkpoint_filter',
    'classifier_prefixes', 'backbone_name',
]

ModelFilter = Callable[[Dict[str, torch.Tensor], nn.Module], Dict[str, torch.Tensor]]
_FILTERS: Tuple[Tuple[type, ModelFilter], ...] = (
    (PTLNet, checkpoint_filter_fn), (MGN, mgn_checkpoint_filter_fn), (ReIDNet, reid_checkpoint_filter_fn))


def registered_models() -> List[str]:
    """Every model ptl_timm registers in timm (``ptl_*``, ``mgn_resnet50``, ``reid_*``)."""
    return [name for name in timm.list_models() if is_registered(name)]


def is_registered(name: str) -> bool:
    """Whether ``name`` (a tag allowed) is a model ptl_timm registers: its entry point lives in ptl_timm."""
    arch = split_model_name_tag(name)[0]
    return timm.is_model(arch) and model_entrypoint(arch).__module__.startswith('ptl_timm.')


def has_cells(model: nn.Module) -> bool:
    """Whether ``model`` holds BConv-Cells (a latent state)."""
    return next(bconv_cells(model), None) is not None


def inner_ptl_net(model: nn.Module) -> Optional[PTLNet]:
    """The PTLNet that is ``model`` or its backbone (a ReIDNet over a ``ptl_*`` backbone), if any."""
    if isinstance(model, PTLNet):
        return model
    backbone = getattr(model, 'backbone', None)
    return backbone if isinstance(backbone, PTLNet) else None


def _cell_args(model: nn.Module) -> Dict[str, Any]:
    """The state rule and kernel every cell of ``model`` shares."""
    cell = next(bconv_cells(model))
    args: Dict[str, Any] = dict(state_mode=cell.state_mode, kernel_size=cell.conv.kernel_size[0])
    if cell.state_mode == 'carried':
        args['state_slots'] = cell.state.shape[0]
    return args


def _ptl_args(model: PTLNet) -> Dict[str, Any]:
    args = dict(
        cell_widths=list(model.cell_widths), state_mode=model.state_mode, img_size=list(model.img_size),
        kernel_size=next(bconv_cells(model)).conv.kernel_size[0], in_chans=model.in_chans,
        num_classes=model.num_classes, global_pool=model.global_pool,
        cell_norm=not isinstance(model.cell_norm, nn.Identity),
    )
    if model.state_mode == 'carried':
        args['state_slots'] = next(bconv_cells(model)).state.shape[0]
    args['image_cells'] = bool(model.image_cells)
    if getattr(model, 'cells_removed', False):  # the control without cells (PTLNet's cells_removed, where it exists)
        args['cells_removed'] = True
    return args


def _mgn_args(model: MGN) -> Dict[str, Any]:
    args = dict(
        backbone=model.backbone_name, parts=list(model.parts), feat_dim=model.feat_dim, img_size=list(model.img_size),
        in_chans=model.in_chans, num_classes=model.num_classes, global_pool=model.global_pool,
        reid_output=model.reid_output, image_cells=bool(model.image_cells),
    )
    if has_cells(model):
        args.update(cell_widths=list(model.cell_widths), **_cell_args(model))
    return args


def _reid_args(model: ReIDNet) -> Dict[str, Any]:
    args: Dict[str, Any] = {}
    ptl = inner_ptl_net(model)
    if ptl is not None:  # the backbone's own arguments; the ReID model's size, channels and classes are its own
        args.update({k: v for k, v in _ptl_args(ptl).items() if k not in ('img_size', 'in_chans', 'num_classes')})
    args.update(img_size=list(model.img_size), in_chans=model.in_chans, num_classes=model.num_classes,
                reid_output=model.reid_output)
    return args


def model_args(model: nn.Module) -> Dict[str, Any]:
    """Arguments that rebuild ``model`` exactly with its registered entry point, resolved from the model itself
    (not from defaults a later ptl_timm version may change): cell widths, state rule, the grid the state is
    stored at, the head."""
    if isinstance(model, PTLNet):
        if not has_cells(model):
            raise ValueError('This PTLNet was pruned to the stages before its first cell: it has no PTL part left to '
                             'rebuild from arguments.')
        return _ptl_args(model)
    if isinstance(model, MGN):
        return _mgn_args(model)
    if isinstance(model, ReIDNet):
        return _reid_args(model)
    raise ValueError(f'Expected a model ptl_timm registers (PTLNet, MGN, ReIDNet), got {type(model).__name__}.')


def checkpoint_filter(model: nn.Module) -> ModelFilter:
    """The checkpoint filter ``model``'s entry point gives timm (``pretrained_filter_fn``)."""
    for cls, fn in _FILTERS:
        if isinstance(model, cls):
            return fn
    raise ValueError(f'Expected a model ptl_timm registers (PTLNet, MGN, ReIDNet), got {type(model).__name__}.')


def classifier_prefixes(arch: str) -> Tuple[str, ...]:
    """The key prefixes of the classifier(s) of the registered model ``arch`` (its pretrained cfg's)."""
    cfg = get_pretrained_cfg(split_model_name_tag(arch)[0])
    return tuple(f'{name}.' for name in as_tuple(cfg.classifier if cfg is not None else None))


def backbone_name(model: nn.Module) -> str:
    """The timm backbone ``model`` is built on (the PTL backbone of a ReIDNet over a ``ptl_*`` one)."""
    ptl = inner_ptl_net(model)
    return ptl.backbone_name if ptl is not None else getattr(model, 'backbone_name', type(model).__name__)
