"""The ptl_* models in timm's registry, their pretrained cfgs and the pretrained-weight filter.

Each ``ptl_X`` offers every pretrained tag of timm's ``X``: ``ptl_resnet50.a1_in1k`` loads
``timm/resnet50.a1_in1k`` into the backbone (through the backbone module's own checkpoint filter) and
starts the PTL branch and the head fresh. A full PTL checkpoint (keys under ``backbone.``) loads as is.
"""
import dataclasses
import logging
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import timm
import torch
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    get_arch_pretrained_cfgs,
    model_entrypoint,
    register_model,
    split_model_name_tag,
)

from .hub import load_manifest, manifest_pretrained_cfgs, tag_model_args
from .ptl_net import PTLNet, check_model_name

__all__ = ['create_ptl_model', 'checkpoint_filter_fn', 'ptl_pretrained_cfgs', 'PTL_BACKBONES']

_logger = logging.getLogger(__name__)

PTL_BACKBONES: Tuple[str, ...] = (
    'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152',
    'densenet121', 'densenet161', 'densenet169', 'densenet201',
    'mobilenetv2_100', 'tf_efficientnet_lite0', 'tf_efficientnet_lite1', 'tf_efficientnet_lite2',
    'efficientnet_b0', 'convnext_tiny', 'regnety_016',
)

# DenseNet stages are wide for their parameter count: half the default width keeps the branch
# under +10 % parameters (1/8 would add 17 %).
_DENSENET_ARGS = dict(width_mult=1 / 16)

# Names timm's model modules give the filter they pass to build_model_with_cfg as pretrained_filter_fn.
_BACKBONE_FILTER_NAMES = ('checkpoint_filter_fn', '_filter_fn', '_filter_torchvision_pretrained')


def _as_tuple(names: Any) -> Tuple[str, ...]:
    if not names:
        return ()
    return (names,) if isinstance(names, str) else tuple(names)


def ptl_pretrained_cfgs(backbone: str) -> Dict[str, Dict[str, Any]]:
    """Pretrained cfgs 'ptl_X.tag' for every tag of timm's X: same weights source and preprocessing,
    with the input conv under ``backbone.`` and the PTL head ``fc`` as classifier."""
    cfgs = {}
    for name, cfg in get_arch_pretrained_cfgs(backbone).items():
        _, tag = split_model_name_tag(name)
        cfg = dataclasses.asdict(cfg)
        cfg.update(
            architecture=None, tag=None, classifier='fc',
            first_conv=tuple(f'backbone.{n}' for n in _as_tuple(cfg.get('first_conv'))) or None,
            notes=_as_tuple(cfg.get('notes')) + (f'Backbone weights: {name}; PTL branch and head start fresh.',),
        )
        cfgs[f'ptl_{backbone}.{tag}' if tag else f'ptl_{backbone}'] = cfg
    if not cfgs:
        cfgs[f'ptl_{backbone}'] = dict(classifier='fc')
    return cfgs


def backbone_filter_fn(backbone: str) -> Optional[Callable]:
    """The checkpoint filter timm's module for ``backbone`` applies to its pretrained weights, if any."""
    module = sys.modules.get(model_entrypoint(backbone).__module__)
    for name in _BACKBONE_FILTER_NAMES:
        fn = getattr(module, name, None)
        if callable(fn):
            return fn
    return None


def _describe_mismatch(state_dict: Dict[str, torch.Tensor], model: PTLNet, skip: Tuple[str, ...]) -> List[str]:
    expected = model.state_dict()
    problems = [f'missing {k}' for k in expected if k not in state_dict]
    problems += [f'unexpected {k}' for k in state_dict if k not in expected]
    problems += [
        f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}'
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape and not k.startswith(skip)
    ]
    return problems


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: PTLNet) -> Dict[str, torch.Tensor]:
    """Fit a plain backbone checkpoint or a full PTL checkpoint to ``model``.

    A plain checkpoint of the backbone goes through the backbone module's own filter, loses the
    backbone's classifier (the PTL head replaces it) and gets the ``backbone.`` prefix; the PTL branch
    and the head keep their fresh initialisation (logged). Keys or shapes that do not fit raise a
    ValueError listing them.
    """
    is_ptl_checkpoint = any(k.startswith('backbone.') for k in state_dict)
    if not is_ptl_checkpoint:
        bb_filter = backbone_filter_fn(model.backbone_name)
        if bb_filter is not None:
            state_dict = bb_filter(state_dict, model.backbone)
        bb_classifier = _as_tuple(model.backbone.pretrained_cfg.get('classifier'))
        head_keys = {f'{c}.{p}' for c in bb_classifier for p in ('weight', 'bias')}
        backbone_keys = set(model.backbone.state_dict())
        state_dict = {
            f'backbone.{k}': v for k, v in state_dict.items() if k not in head_keys or k in backbone_keys
        }
        fresh = {k: v for k, v in model.state_dict().items() if not k.startswith('backbone.')}
        groups = sorted({k.split('.', 1)[0] for k in fresh})
        _logger.info(
            f'Loaded a plain {model.backbone_name} checkpoint into the backbone ({len(state_dict)} tensors); '
            f'{len(fresh)} PTL tensors start fresh ({", ".join(groups)}).')
        state_dict.update(fresh)
    first_conv = _as_tuple(getattr(model, 'pretrained_cfg', {}).get('first_conv'))
    # timm adapts the input conv (in_chans) and drops the classifier (num_classes) after this filter
    skip = tuple(f'{n}.' for n in first_conv) + ('fc.',)
    problems = _describe_mismatch(state_dict, model, skip)
    if problems:
        kind = 'PTL' if is_ptl_checkpoint else f'plain {model.backbone_name}'
        shown = '\n  '.join(problems[:20]) + (f'\n  ... {len(problems) - 20} more' if len(problems) > 20 else '')
        raise ValueError(
            f'The {kind} checkpoint does not fit the PTL model '
            f'(backbone {model.backbone_name}, cell widths {model.cell_widths}, state_mode {model.state_mode}):'
            f'\n  {shown}\nIt comes from another architecture or other PTL settings; create the model with the '
            'settings the checkpoint was trained with.')
    return state_dict


def _create_ptl(variant: str, backbone: str, pretrained: bool = False, **kwargs: Any) -> PTLNet:
    kwargs.setdefault('feature_cfg', dict(feature_cls='getter', out_indices=None))
    # a full-PTL tag (weights/manifest.json) rebuilds the model its checkpoint holds: cell widths, state grid...
    kwargs = dict(tag_model_args(_MANIFEST, variant, kwargs.get('pretrained_cfg')), **kwargs)
    return build_model_with_cfg(
        PTLNet, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        backbone=backbone,
        **kwargs,
    )


def create_ptl_model(backbone: str, pretrained: bool = False, **kwargs: Any) -> PTLNet:
    """A PTL model around any timm CNN that reports stage features, registered or not.

    ``backbone`` may carry a pretrained tag (``'convnext_nano.d1h_in1k'``); ``pretrained=True`` loads that
    tag's backbone weights. Registered backbones give the same model as ``timm.create_model('ptl_X')``.
    """
    arch, tag = split_model_name_tag(backbone)
    if timm.is_model(f'ptl_{arch}'):
        name = f'ptl_{arch}.{tag}' if tag else f'ptl_{arch}'
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    check_model_name(arch)
    cfgs = ptl_pretrained_cfgs(arch)
    key = f'ptl_{arch}.{tag}' if tag else next(iter(cfgs))
    if key not in cfgs:
        raise ValueError(f'{arch} has no pretrained tag {tag!r}; its tags: '
                         f'{", ".join(k.split(".", 1)[1] for k in cfgs if "." in k)}.')
    return _create_ptl(f'ptl_{arch}', arch, pretrained, pretrained_cfg=dict(cfgs[key], architecture=f'ptl_{arch}'),
                       **kwargs)


# read once: the full-PTL tags registered below and the model_args each of them rebuilds
_MANIFEST = load_manifest()
default_cfgs = generate_default_cfgs({
    **{name: cfg for backbone in PTL_BACKBONES for name, cfg in ptl_pretrained_cfgs(backbone).items()},
    **manifest_pretrained_cfgs(_MANIFEST),  # full-PTL tags, after the backbone tags (not default)
})


@register_model
def ptl_resnet18(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    return _create_ptl('ptl_resnet18', 'resnet18', pretrained, **kwargs)


@register_model
def ptl_resnet34(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    return _create_ptl('ptl_resnet34', 'resnet34', pretrained, **kwargs)


@register_model
def ptl_resnet50(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    return _create_ptl('ptl_resnet50', 'resnet50', pretrained, **kwargs)


@register_model
def ptl_resnet101(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    return _create_ptl('ptl_resnet101', 'resnet101', pretrained, **kwargs)


@register_model
def ptl_resnet152(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    return _create_ptl('ptl_resnet152', 'resnet152', pretrained, **kwargs)


@register_model
def ptl_densenet121(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    return _create_ptl('ptl_densenet121', 'densenet121', pretrained, **dict(_DENSENET_ARGS, **kwargs))


@register_model
def ptl_densenet161(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    return _create_ptl('ptl_densenet161', 'densenet161', pretrained, **dict(_DENSENET_ARGS, **kwargs))


@register_model
def ptl_densenet169(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    return _create_ptl('ptl_densenet169', 'densenet169', pretrained, **dict(_DENSENET_ARGS, **kwargs))


@register_model
def ptl_densenet201(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    return _create_ptl('ptl_densenet201', 'densenet201', pretrained, **dict(_DENSENET_ARGS, **kwargs))


@register_model
def ptl_mobilenetv2_100(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    return _create_ptl('ptl_mobilenetv2_100', 'mobilenetv2_100', pretrained, **kwargs)


@register_model
def ptl_tf_efficientnet_lite0(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    return _create_ptl('ptl_tf_efficientnet_lite0', 'tf_efficientnet_lite0', pretrained, **kwargs)


@register_model
def ptl_tf_efficientnet_lite1(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    return _create_ptl('ptl_tf_efficientnet_lite1', 'tf_efficientnet_lite1', pretrained, **kwargs)


@register_model
def ptl_tf_efficientnet_lite2(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    return _create_ptl('ptl_tf_efficientnet_lite2', 'tf_efficientnet_lite2', pretrained, **kwargs)


@register_model
def ptl_efficientnet_b0(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    return _create_ptl('ptl_efficientnet_b0', 'efficientnet_b0', pretrained, **kwargs)


@register_model
def ptl_convnext_tiny(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    return _create_ptl('ptl_convnext_tiny', 'convnext_tiny', pretrained, **kwargs)


@register_model
def ptl_regnety_016(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    return _create_ptl('ptl_regnety_016', 'regnety_016', pretrained, **kwargs)
