"""What the model files share (``ptl_*`` PTLNet, MGN, the BNNeck ReID models): backbone names, pretrained cfgs
derived from a backbone's, group matchers under a prefix, checkpoint fitting with errors that list the keys, and
the ``features_only`` extractors."""
import dataclasses
import difflib
import re
import sys
from collections import OrderedDict
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
from timm.layers import Format
from timm.models import FeatureGraphNet, get_arch_pretrained_cfgs, model_entrypoint, split_model_name_tag
from timm.models._features import (
    FeatureDictNet,
    FeatureGetterNet,
    FeatureHookNet,
    FeatureListNet,
    OutIndicesT,
    _get_feature_info,
)
from torch import nn

__all__ = [
    'as_tuple', 'check_model_name', 'backbone_filter_fn', 'derived_pretrained_cfgs', 'tagged_cfg',
    'prefix_group_matcher', 'first_conv_prefixes', 'check_state_dict_fits', 'IntermediatesDictNet',
    'IntermediatesListNet', 'feature_model', 'set_feature_cfg',
]

# Names timm's model modules give the filter they pass to build_model_with_cfg as pretrained_filter_fn.
_BACKBONE_FILTER_NAMES = ('checkpoint_filter_fn', '_filter_fn', '_filter_torchvision_pretrained')


def as_tuple(names: Any) -> Tuple[str, ...]:
    """A pretrained cfg's name field (None, one name or several) as a tuple."""
    if not names:
        return ()
    return (names,) if isinstance(names, str) else tuple(names)


def check_model_name(name: str) -> None:
    """Raise a ValueError naming close matches when timm does not know the model ``name``."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        hint = f' Close matches: {", ".join(close)}.' if close else ''
        raise ValueError(f'Unknown timm backbone {name!r}.{hint} See timm.list_models() for every name.')


def backbone_filter_fn(backbone: str) -> Optional[Callable]:
    """The checkpoint filter timm's module for ``backbone`` applies to its pretrained weights, if any."""
    module = sys.modules.get(model_entrypoint(backbone).__module__)
    for name in _BACKBONE_FILTER_NAMES:
        fn = getattr(module, name, None)
        if callable(fn):
            return fn
    return None


def derived_pretrained_cfgs(
        backbone: str, name: str, note: str, prefix: str = '', **changes: Any) -> Dict[str, Dict[str, Any]]:
    """Pretrained cfgs ``name.tag`` for every tag of the registered ``backbone``: the same weights source and
    preprocessing, the input conv under ``prefix``, ``changes`` applied, and a note naming the source weights."""
    cfgs = {}
    for source, cfg in get_arch_pretrained_cfgs(backbone).items():
        tag = split_model_name_tag(source)[1]
        cfg = dataclasses.asdict(cfg)
        cfg.update(
            architecture=None, tag=None,
            first_conv=tuple(f'{prefix}{n}' for n in as_tuple(cfg.get('first_conv'))) or None,
            notes=as_tuple(cfg.get('notes')) + (f'Backbone weights: {source}; {note}',),
            **changes,
        )
        cfgs[f'{name}.{tag}' if tag else name] = cfg
    return cfgs


def tagged_cfg(cfgs: Dict[str, Dict[str, Any]], name: str, tag: str, backbone: str) -> Dict[str, Any]:
    """The cfg of ``name.tag`` among ``cfgs`` (the default one without a tag), as an unregistered model's
    ``pretrained_cfg``; a ValueError lists the tags ``backbone`` has."""
    key = f'{name}.{tag}' if tag else next(iter(cfgs))
    if key not in cfgs:
        raise ValueError(f'{backbone} has no pretrained tag {tag!r}; its tags: '
                         f'{", ".join(k.split(".", 1)[1] for k in cfgs if "." in k)}.')
    return dict(cfgs[key], architecture=name)


def _prefix_pattern(pattern: str, prefix: str) -> str:
    """Anchor a timm group_matcher regex (whose alternatives may start with '^') under ``prefix``."""
    unanchored = re.sub(r'(^|[|(])\^', r'\1', pattern)
    return rf'^{re.escape(prefix)}(?:{unanchored})'


def prefix_group_matcher(matcher: Dict[str, Any], prefix: str) -> Dict[str, Any]:
    """A submodule's ``group_matcher`` as its parent's, the submodule living under ``prefix``."""
    out: Dict[str, Any] = {}
    for group, spec in matcher.items():
        if isinstance(spec, (list, tuple)):
            out[group] = [(_prefix_pattern(p, prefix), suffix) for p, suffix in spec]
        elif spec is not None:
            out[group] = _prefix_pattern(spec, prefix)
    return out


def first_conv_prefixes(model: nn.Module) -> Tuple[str, ...]:
    """Key prefixes of the input conv(s) in ``model``'s pretrained cfg: timm adapts them to ``in_chans``."""
    return tuple(f'{n}.' for n in as_tuple(getattr(model, 'pretrained_cfg', {}).get('first_conv')))


def check_state_dict_fits(
        state_dict: Dict[str, torch.Tensor], model: nn.Module, skip: Tuple[str, ...], what: str, fix: str) -> None:
    """Raise a ValueError ``what:`` + the missing, unexpected and misshapen keys + ``fix`` when ``state_dict``
    does not fit ``model`` (shapes under the ``skip`` prefixes are left to timm, which adapts them)."""
    expected = model.state_dict()
    problems = [f'missing {k}' for k in expected if k not in state_dict]
    problems += [f'unexpected {k}' for k in state_dict if k not in expected]
    problems += [
        f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}'
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape and not k.startswith(skip)
    ]
    if problems:
        shown = '\n  '.join(problems[:20]) + (f'\n  ... {len(problems) - 20} more' if len(problems) > 20 else '')
        raise ValueError(f'{what}:\n  {shown}\n{fix}')


class IntermediatesDictNet(FeatureDictNet):
    """timm's ``FeatureDictNet`` (what ``features_only=True, feature_cls='dict'`` gives a timm CNN) for a model whose
    stages are not a chain of its children (a ladder beside a backbone): the maps come from the model's
    ``forward_intermediates``, the interface is FeatureDictNet's.

    As in timm's class: ``return_layers`` ({``feature_info`` module name: output key}) says which stages ``forward``
    returns, and clients may change it (transformers' ``TimmBackbone`` asks for every stage with
    ``output_hidden_states``); the stages after the last of ``out_indices`` are dropped (they are absent from the
    output even if asked for); ``set_grad_checkpointing`` is the model's own. The model lives under ``model``.
    Shapes: (B, C, H, W) -> {key: (B, C_k, H / r_k, W / r_k)}.
    """

    def __init__(
            self,
            model: nn.Module,
            out_indices: OutIndicesT = (0, 1, 2, 3, 4),
            out_map: Optional[Sequence[Union[int, str]]] = None,
            output_fmt: str = 'NCHW',
            feature_concat: bool = False,
            flatten_sequential: bool = False,
    ):
        nn.ModuleDict.__init__(self)
        if Format(output_fmt) != Format.NCHW or feature_concat or flatten_sequential:
            raise ValueError(f'{type(model).__name__} gives NCHW stage maps through forward_intermediates: '
                             'output_fmt, feature_concat and flatten_sequential do not apply.')
        out_indices = model.prune_intermediate_layers(out_indices, prune_head=True)
        self.feature_info = _get_feature_info(model, out_indices)
        self.output_fmt = Format(output_fmt)
        self.concat = feature_concat
        self.grad_checkpointing = False
        # feature_info names a module per stage; the model keeps the stages up to the last one taken
        self.stage_index = {info['module']: k for k, info in enumerate(self.feature_info.info)}
        self.num_stages = max(out_indices) + 1
        names = self.feature_info.module_name()
        keys = out_map if out_map is not None else self.feature_info.out_indices
        self.return_layers = {name: str(key) for name, key in zip(names, keys)}
        self.model = model

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        self.model.set_grad_checkpointing(enable)

    def _collect(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        taken = sorted((self.stage_index[name], key) for name, key in self.return_layers.items()
                       if self.stage_index.get(name, self.num_stages) < self.num_stages)
        if not taken:
            return OrderedDict()
        maps = self.model.forward_intermediates(
            x, indices=[k for k, _ in taken], stop_early=True, intermediates_only=True)
        return OrderedDict((key, m) for (_, key), m in zip(taken, maps))


class IntermediatesListNet(IntermediatesDictNet, FeatureListNet):
    """timm's ``FeatureListNet`` (``features_only=True``'s default for a timm CNN) for the same models as
    :class:`IntermediatesDictNet`: the same interface, and a list of the maps in stage order.
    Shapes: (B, C, H, W) -> [(B, C_k, H / r_k, W / r_k)]."""

    def __init__(
            self,
            model: nn.Module,
            out_indices: OutIndicesT = (0, 1, 2, 3, 4),
            output_fmt: str = 'NCHW',
            feature_concat: bool = False,
            flatten_sequential: bool = False,
    ):
        super().__init__(model, out_indices, output_fmt=output_fmt, feature_concat=feature_concat,
                         flatten_sequential=flatten_sequential)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return list(self._collect(x).values())


def feature_model(
        model: nn.Module,
        feature_cls: Union[str, Callable[..., nn.Module]] = 'list',
        out_indices: Optional[Union[int, Sequence[int]]] = None,
        **kwargs: Any,
) -> nn.Module:
    """timm's ``features_only`` extractor ``feature_cls`` around ``model`` (every stage if ``out_indices`` is None):
    the class timm gives its CNNs for the same ``feature_cls``.

    ``feature_info`` names, per stage, a module whose output is that stage's map (PTLNet's ``joins``), so the
    hook and FX extractors return exactly the described maps. timm's ``list`` / ``dict`` extractors (the default is
    ``list``) re-run a model's children in sequence, which the ladder beside the backbone is not: they are
    :class:`IntermediatesListNet` / :class:`IntermediatesDictNet`, timm's classes fed by ``forward_intermediates``.
    """
    if out_indices is None:
        out_indices = tuple(range(len(model.feature_info)))
    fmt = kwargs.get('output_fmt', 'NCHW')
    if fmt != 'NCHW':  # the stage maps are the joins' NCHW maps, whatever layout the final features have
        if fmt != getattr(model, 'output_fmt', None):  # timm's builder passes the model's final layout on
            raise ValueError(f"The stage maps of {type(model).__name__} are NCHW; output_fmt={fmt!r} is not served.")
        kwargs['output_fmt'] = 'NCHW'
    if not isinstance(feature_cls, str):
        return feature_cls(model, out_indices=out_indices, **kwargs)
    name = feature_cls.lower()
    if name == 'getter':
        return FeatureGetterNet(model, out_indices=out_indices, **kwargs)
    if name == 'fx':
        return FeatureGraphNet(model, out_indices=tuple(out_indices), **kwargs)
    if 'hook' in name:
        return FeatureHookNet(model, out_indices=out_indices, **kwargs)
    if name == 'list':
        return IntermediatesListNet(model, out_indices=out_indices, **kwargs)
    if name == 'dict':
        return IntermediatesDictNet(model, out_indices=out_indices, **kwargs)
    raise ValueError(f"Unknown feature_cls {feature_cls!r}: use 'getter', 'list', 'dict', 'hook' or 'fx'.")


def set_feature_cfg(kwargs: Dict[str, Any]) -> None:
    """With ``features_only``, route ``feature_cls`` and ``out_indices`` of ``kwargs`` (timm's create_model
    arguments) to :func:`feature_model`, as the ``feature_cfg`` of ``build_model_with_cfg`` (in place)."""
    if kwargs.get('features_only') and 'feature_cfg' not in kwargs:
        kwargs['feature_cfg'] = dict(
            feature_cls=partial(feature_model, feature_cls=kwargs.pop('feature_cls', 'list')),
            out_indices=kwargs.pop('out_indices', None),
        )
