"""MGN and MGN_PTL, the paper's ReID system, in timm's registry: ``mgn_resnet50`` and ``ptl_mgn_resnet50``.

``mgn_resnet50`` is the Multiple Granularity Network (Wang et al., ACM MM 2018): a ResNet-50 shared up
to ``layer3[0]``, then three branches with their own copies of ``layer3[1:]`` and ``layer4`` (the two part
branches with a stride-1 ``layer4``): a global branch, a 2-stripe and a 3-stripe branch. Every global and
stripe feature is max-pooled and reduced to 256 dims (1x1 conv = linear, BN, ReLU) and has its own identity
classifier; the embedding is the concatenation of the 8 reduced features (2048 dims).

``ptl_mgn_resnet50`` adds the PTL ladder of the reference MGN_PTL (``ptl_timm.layers.ladder``): BConv-Cells
beside the shared trunk (one chain per stage, fused with the trunk's stage output by 1x1 conv + BN + ReLU on
their concatenation), then one final cell per branch (stride 2 for the global branch, 1 for the part
branches, so each matches its branch's map), concatenated with the branch's map before pooling. As in
:class:`~ptl_timm.PTLNet`, the first cell reads the stem's output by default; ``image_cells=True`` puts the
paper's first cell on the image. The ResNet runs unchanged, so ImageNet weights load as they are; the MGN
branch layers start as copies of ``layer3[1:]`` / ``layer4``.

Outputs follow timm's conventions by default (``model(x)``: logits, or the embedding with ``num_classes=0``);
``reid_output=True`` gives the ReID recipe's: in train mode a :class:`~ptl_timm.reid.losses.ReIDOutput` for
:class:`~ptl_timm.reid.losses.ReIDLoss`, in eval mode the embedding (B, 2048), deterministic and independent of
the batch.
"""
import copy
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn.functional as F
from timm.layers import to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.resnet import ResNet
from torch import nn

from ..hub.cache import require_pretrained
from ..layers import (
    DEFAULT_STATE_MODE,
    BConvCell,
    ConcatFuse,
    LadderMixin,
    LadderStage,
    StateMode,
    build_ladder,
    match_size,
    strided_grid,
)
from ..models._helpers import check_model_name, derived_pretrained_cfgs, first_conv_prefixes, set_feature_cfg
from ..models.ptlnet import DEFAULT_WIDTH_MULT, resolve_cell_widths
from ._common import REID_CFG, fit_checkpoint
from .losses import ReIDOutput

__all__ = ['MGN', 'mgn_checkpoint_filter_fn', 'MGN_INPUT_SIZE']

MGN_INPUT_SIZE = (3, 384, 128)

# torch.fx.wrap patches the names of the module that calls it: this module's reference to the shape test too
torch.fx.wrap('match_size')


def _mgn_reduction(in_chs: int, out_chs: int) -> nn.Sequential:
    """1x1 conv on a pooled (B, C) feature = linear, then BN and ReLU (MGN's reduction)."""
    lin = nn.Linear(in_chs, out_chs, bias=False)
    nn.init.kaiming_normal_(lin.weight, mode='fan_in')
    bn = nn.BatchNorm1d(out_chs)
    nn.init.normal_(bn.weight, 1.0, 0.02)
    return nn.Sequential(lin, bn, nn.ReLU(inplace=True))


def _stride_one(layer: nn.Sequential) -> nn.Sequential:
    """``layer`` (a ResNet stage) with its first block's stride 2 convs set to stride 1."""
    for m in layer[0].modules():
        if isinstance(m, nn.Conv2d) and m.stride != (1, 1):
            m.stride = (1, 1)
        elif isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)) or type(m).__name__ in ('BlurPool2d',):
            raise ValueError('MGN part branches need a ResNet without pooling in the downsample path '
                             '(no avg_down / anti-aliasing variants); use e.g. resnet50.')
    return layer


class BranchJoin(nn.Module):
    """MGN's branch maps as one map: each resized (nearest) to the largest grid among them (the part branches'),
    then concatenated. Nearest upsampling only repeats positions, so the max over a map, or over its horizontal
    stripes, is that of the map before. Parameter-free; its output is the model's ``forward_features``.
    Shapes: [(B, C_b, H_b, W_b)] -> (B, sum C_b, max H_b, max W_b).
    """

    def forward(self, maps: List[torch.Tensor]) -> torch.Tensor:
        return _join_branches(maps)


@torch.fx.wrap  # shape-dependent: one call in an FX graph, run on real tensors
def _join_branches(maps: List[torch.Tensor]) -> torch.Tensor:
    h = max([m.shape[-2] for m in maps])
    w = max([m.shape[-1] for m in maps])
    resized: List[torch.Tensor] = []
    for m in maps:
        resized.append(m if m.shape[-2] == h and m.shape[-1] == w else F.interpolate(m, size=(h, w), mode='nearest'))
    return torch.cat(resized, dim=1)


class MGN(LadderMixin, nn.Module):
    """Multiple Granularity Network on a timm ResNet, with the optional PTL ladder (``ptl=True``).

    Args:
        num_classes: identities of the classifiers (0: no classifiers, e.g. for feature extraction).
        in_chans: image channels.
        backbone: timm ResNet name (weights come through the registered model's ``pretrained``).
        parts: stripes of each part branch (MGN: 2 and 3).
        feat_dim: reduced feature size per pooled feature (MGN: 256).
        global_pool: ``'max'`` (MGN's pooling of every branch and stripe) or ``''`` (no head: ``forward`` gives
            the unpooled ``forward_features`` map; needs ``num_classes=0``).
        reid_output: ``forward`` gives a :class:`~ptl_timm.reid.losses.ReIDOutput` in train mode and the
            embedding in eval mode (the ReID recipe), instead of logits (timm's convention).
        ptl: add the BConv-Cell ladder (MGN_PTL).
        width_mult, cell_widths: cell width per trunk stage + of the per-branch final cells, as in
            :class:`~ptl_timm.PTLNet` (default ResNet-50: 32, 64, 128 for layer1..3, 256 per branch;
            ``image_cells`` adds 8 for the stem).
        image_cells: start the ladder with a cell on the image (the paper) instead of on the stem output.
        state_mode, state_slots, kernel_size: of every cell, see :class:`~ptl_timm.BConvCell`.
        img_size: nominal input (H, W); the cells store their state at the grids it gives.
        **backbone_kwargs: passed to the ResNet (``drop_path_rate``, ...).

    Outputs: ``forward_head(x, pre_logits=True)`` is the embedding (B, feat_dim * (1 + 2 * len(parts) +
    sum(parts))) = (B, 2048) for MGN, deterministic and independent of the batch in eval mode. ``forward`` gives
    the mean of the 8 classifiers' logits (B, num_classes), or the embedding with ``num_classes=0`` (timm's
    convention), or with ``reid_output`` the ReID recipe's outputs. ``forward_features`` is the branch maps
    (each branch's ``layer4`` output, with its cell's output concatenated when ``ptl``) joined at the part
    branches' grid by :class:`BranchJoin`: (B, 3 * C, H/16, W/16). ``feature_info``: the trunk's maps (stem,
    layer1..3), then that joined map.
    """

    def __init__(
            self,
            num_classes: int = 751,
            in_chans: int = 3,
            backbone: str = 'resnet50',
            parts: Sequence[int] = (2, 3),
            feat_dim: int = 256,
            global_pool: str = 'max',
            reid_output: bool = False,
            ptl: bool = False,
            width_mult: float = DEFAULT_WIDTH_MULT,
            cell_widths: Optional[Sequence[int]] = None,
            state_mode: StateMode = DEFAULT_STATE_MODE,
            state_slots: int = 32,
            img_size: Union[int, Tuple[int, int]] = MGN_INPUT_SIZE[1:],
            kernel_size: int = 3,
            image_cells: bool = False,
            device: Optional[Union[str, torch.device]] = None,
            dtype: Optional[torch.dtype] = None,
            **backbone_kwargs: Any,
    ):
        super().__init__()
        check_model_name(backbone)
        _check_pool(global_pool)
        resnet = timm.create_model(backbone, pretrained=False, num_classes=0, in_chans=in_chans, device=device,
                                   dtype=dtype, **backbone_kwargs)
        if not isinstance(resnet, ResNet) or len(resnet.layer3) < 2:
            raise ValueError(f'MGN needs a timm ResNet (conv1 ... layer4, layer3 of 2+ blocks); {backbone} is a '
                             f'{type(resnet).__name__}.')
        if any(p < 1 for p in parts):
            raise ValueError(f'parts must be positive stripe counts, got {tuple(parts)}.')
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.parts = tuple(int(p) for p in parts)
        self.branch_stripes = [0, *self.parts]  # horizontal stripes pooled per branch besides its global max
        self.feat_dim = feat_dim
        self.global_pool = global_pool
        self.reid_output = reid_output
        self.ptl = ptl
        self.image_cells = image_cells
        self.img_size = to_2tuple(img_size)
        # shared trunk under timm's own names, so a plain ResNet checkpoint loads by name
        self.conv1, self.bn1, self.act1, self.maxpool = resnet.conv1, resnet.bn1, resnet.act1, resnet.maxpool
        self.layer1, self.layer2 = resnet.layer1, resnet.layer2
        self.layer3 = resnet.layer3[:1]
        rest3 = resnet.layer3[1:]
        self.branches = nn.ModuleList([
            nn.Sequential(OrderedDict(
                layer3=copy.deepcopy(rest3),
                layer4=copy.deepcopy(resnet.layer4) if b == 0 else _stride_one(copy.deepcopy(resnet.layer4)),
            )) for b in range(1 + len(self.parts))
        ])
        branch_chs = resnet.num_features
        self.num_stripes = [1] + [1 + p for p in self.parts]  # pooled features per branch: global (+ stripes)

        # act1, layer1, layer2, layer3 (its block 0 downsamples); without image cells the stem feeds the first
        stage_info = resnet.feature_info[:4] if image_cells else resnet.feature_info[1:4]
        self.cell_widths = resolve_cell_widths(
            [i['num_chs'] for i in stage_info] + [branch_chs], width_mult, cell_widths) if ptl else []
        # empty without the ladder: no state_dict keys, and TorchScript finds the attributes forward names
        self.cells, self.fuses, self.branch_cells = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        if ptl:
            stem = resnet.feature_info[0]
            first = (in_chans, 1) if image_cells else (stem['num_chs'], stem['reduction'])
            self._build_ladder(stage_info, first, kernel_size, state_mode, state_slots)
        joined = branch_chs + (self.cell_widths[-1] if ptl else 0)
        self.branch_chs = [joined] * len(self.branches)
        self.branch_join = BranchJoin()
        n_feats = sum(self.num_stripes)
        self.reductions = nn.ModuleList([_mgn_reduction(joined, feat_dim) for _ in range(n_feats)])
        self.num_features = sum(self.branch_chs)
        self.head_hidden_size = feat_dim * n_feats
        self.classifiers = self._classifiers(num_classes)
        self.feature_info = [dict(info) for info in resnet.feature_info[:4]] + [
            dict(num_chs=self.num_features, reduction=16, module='branch_join')]
        self.last_stage = len(self.feature_info) - 1  # lowered by prune_intermediate_layers
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)  # the ladder and the head; the trunk was created there

    def _build_ladder(self, stage_info: List[Dict[str, Any]], first: Tuple[int, int], kernel_size: int,
                      state_mode: StateMode, state_slots: int) -> None:
        """Cells and fuses for ``stage_info``; ``first`` = (channels, reduction) of the first cell's input."""
        cell_args = dict(kernel_size=kernel_size, state_mode=state_mode, state_slots=state_slots)
        stages = [LadderStage(info['num_chs'], info['reduction'], width)
                  for info, width in zip(stage_info, self.cell_widths)]
        ladder = build_ladder(stages, *first, self.img_size, ConcatFuse, **cell_args)
        self.cells, self.fuses = ladder.cells, ladder.fuses
        # one final cell per branch, strided to the branch's map: /32 global, /16 parts
        self.branch_cells = nn.ModuleList([
            BConvCell(ladder.out_chs, self.cell_widths[-1], stride=stride,
                      state_size=strided_grid(ladder.grid, stride), **cell_args)
            for stride in (2 if b == 0 else 1 for b in range(len(self.branches)))
        ])

    def _classifiers(self, num_classes: int) -> nn.ModuleList:
        if num_classes <= 0:
            return nn.ModuleList()
        ref = next(self.reductions.parameters())  # the model's device and dtype (after .to() too)
        heads = nn.ModuleList([nn.Linear(self.feat_dim, num_classes, device=ref.device, dtype=ref.dtype)
                               for _ in self.reductions])
        for fc in heads:
            nn.init.kaiming_normal_(fc.weight, mode='fan_out')
            nn.init.zeros_(fc.bias)
        return heads.train(self.training)

    # --- timm model interface -------------------------------------------------------------------------
    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'classifiers' if name_only else self.classifiers

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            _check_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.classifiers = self._classifiers(num_classes)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^conv1|^bn1|^maxpool',
            blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)',
            branches=r'^branches\.(\d+)' if coarse else r'^branches\.(\d+)\.layer(\d+)',
            head=r'^cells|^fuses|^branch_cells|^reductions|^classifiers',
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise NotImplementedError('MGN does not support gradient checkpointing.')

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop what the ``feature_info`` maps up to the last of ``indices`` do not need: the later trunk layers, and
        the branches with their cells when that is a trunk map; the head too with ``prune_head`` or then. As timm's
        CNNs, ``forward`` then gives the last kept map unpooled. ``prune_norm`` is ignored: MGN has no final norm."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        prune_end = max_index < self.last_stage
        if prune_end:
            self.branches, self.branch_cells = nn.ModuleList(), nn.ModuleList()
            self.cells, self.fuses = nn.ModuleList(), nn.ModuleList()  # the ladder feeds the branch cells only
            self.ptl = False
            for k, name in enumerate(('layer1', 'layer2', 'layer3'), start=1):
                if k > max_index:
                    setattr(self, name, nn.Sequential())
            if max_index == 0:
                self.maxpool = nn.Identity()
            self.last_stage = max_index
            self.num_features = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reductions = nn.ModuleList()
            self.reid_output = False  # no ReID head left to give its outputs
            self.head_hidden_size = self.num_features
            self.reset_classifier(0, '')
        return take_indices

    def _trunk(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The shared trunk's maps: stem (/2), layer1 (/4), layer2 (/8), layer3[0] (/16)."""
        stem = self.act1(self.bn1(self.conv1(x)))
        l1 = self.layer1(self.maxpool(stem))
        l2 = self.layer2(l1)
        return [stem, l1, l2, self.layer3(l2)]

    def _branch_maps(self, x: torch.Tensor, trunk: List[torch.Tensor]) -> List[torch.Tensor]:
        """Each branch's map (B, C, H_b, W_b), with its cell's output concatenated when ``ptl``."""
        maps = [branch(trunk[3]) for branch in self.branches]
        if not self.ptl:
            return maps
        first = 0 if self.image_cells else 1
        _, h = self.run_ladder(trunk[0] if first else x, trunk[first:])
        joined: List[torch.Tensor] = []
        for b, cell in enumerate(self.branch_cells):
            joined.append(torch.cat([maps[b], match_size(cell(h), maps[b])], dim=1))
        return joined

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The ``feature_info`` maps (trunk stages, then the joined branch map), and the final features
        (``forward_features``) unless ``intermediates_only``. ``norm`` is ignored: MGN has no final norm."""
        assert output_fmt == 'NCHW', 'Output shape must be NCHW.'
        _check_input(x, self.in_chans)
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        maps = self._trunk(x)
        if self.last_stage == len(maps) and not ((stop_early or intermediates_only) and max_index < len(maps)):
            maps.append(self.branch_join(self._branch_maps(x, maps)))
        intermediates = [maps[i] for i in take_indices]
        return intermediates if intermediates_only else (maps[min(self.last_stage, len(maps) - 1)], intermediates)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_chans)
        maps = self._trunk(x)
        if self.last_stage < len(maps):  # pruned to a trunk map
            return maps[self.last_stage]
        return self.branch_join(self._branch_maps(x, maps))

    def _pool(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Pooled (B, C) features: per branch the global max, then its horizontal stripes top to bottom."""
        pooled: List[torch.Tensor] = []
        maps = x.split(self.branch_chs, dim=1)
        for b, stripes in enumerate(self.branch_stripes):  # indexed, not iterated: FX traces it
            m = maps[b]
            pooled.append(m.amax(dim=(2, 3)))
            if stripes:
                _check_rows(m, stripes)
                rows = _stripe_max(m, stripes)
                for i in range(stripes):
                    pooled.append(rows[:, :, i])
        return pooled

    def _reduced(self, x: torch.Tensor) -> List[torch.Tensor]:
        pooled = self._pool(x)
        return [reduction(pooled[i]) for i, reduction in enumerate(self.reductions)]

    def _logits(self, reduced: List[torch.Tensor]) -> List[torch.Tensor]:
        return [fc(reduced[i]) for i, fc in enumerate(self.classifiers)]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The embedding (B, head_hidden_size) with ``pre_logits``, else the mean of the classifiers' logits (B,
        num_classes) (the embedding when ``num_classes=0``); ``global_pool=''`` leaves ``x`` unpooled."""
        if not self.global_pool:
            if pre_logits or self.num_classes == 0:
                return x
            raise ValueError("Unpooled features (global_pool='') have no identity logits: create the model with "
                             'num_classes=0, or reset_classifier(0, ...).')
        reduced = self._reduced(x)
        if pre_logits or self.num_classes == 0:
            return torch.cat(reduced, dim=1)
        return torch.stack(self._logits(reduced)).mean(0)

    def forward_reid_head(self, x: torch.Tensor) -> ReIDOutput:
        """The ReID recipe's outputs from ``forward_features``: every classifier's logits, the branches' global
        reduced features for the triplet loss, and the embedding."""
        reduced = self._reduced(x)
        # triplet on the branches' global features (index of each branch's first pooled feature)
        starts = [sum(self.num_stripes[:b]) for b in range(len(self.branches))]
        return ReIDOutput(logits=self._logits(reduced), features=[reduced[s] for s in starts],
                          embedding=torch.cat(reduced, dim=1))

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, ReIDOutput]:
        x = self.forward_features(x)
        if self.reid_output and self.training:
            return self.forward_reid_head(x)
        return self.forward_head(x, pre_logits=self.reid_output)


# shape tests: one call each in an FX graph, run on real tensors
@torch.fx.wrap
def _check_input(x: torch.Tensor, in_chans: int) -> None:
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(f'MGN expects (B, {in_chans}, H, W) images, got shape {x.shape}.')


@torch.fx.wrap
def _check_rows(m: torch.Tensor, stripes: int) -> None:
    if m.shape[2] < stripes:
        raise ValueError(f'A {m.shape[2]}-row map cannot give {stripes} stripes: the input is too small (use at '
                         f'least {16 * stripes} px high).')


@torch.fx.wrap  # shape arithmetic: one call in an FX graph, run on real tensors
def _stripe_max(m: torch.Tensor, stripes: int) -> torch.Tensor:
    """The max of each of ``stripes`` horizontal stripes of ``m`` (B, C, H, W), top to bottom: (B, C, stripes). The
    windows of ``adaptive_max_pool2d(m, (stripes, 1))``, taken as slices: ONNX has no adaptive max pooling."""
    h = m.shape[2]
    out: List[torch.Tensor] = []
    for i in range(stripes):
        out.append(m[:, :, (i * h) // stripes:-(-(i + 1) * h // stripes)].amax(dim=(2, 3)))
    return torch.stack(out, dim=2)


def _check_pool(global_pool: str) -> None:
    if global_pool not in ('max', ''):
        raise ValueError(f"MGN pools with max pooling (global_pool='max') or not at all (''); got {global_pool!r}.")


def mgn_checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: MGN) -> Dict[str, torch.Tensor]:
    """Fit a plain ResNet checkpoint (or a full MGN one) to ``model``.

    The trunk loads by name; ``layer3.i`` (i >= 1) and ``layer4`` are copied into every branch (keeping their
    names: ``branches.<b>.layer3.1`` is ``layer3.1``); the
    ImageNet ``fc`` is dropped; the reductions, classifiers and PTL cells start fresh.
    """
    is_mgn = any(k.startswith('branches.') for k in state_dict)
    if not is_mgn:
        out = {}
        for k, v in state_dict.items():
            if k.startswith('fc.'):
                continue
            if k.startswith('layer4.') or (k.startswith('layer3.') and not k.startswith('layer3.0.')):
                out.update({f'branches.{b}.{k}': v for b in range(len(model.branches))})
            else:
                out[k] = v
        state_dict = out
    fresh = ('cells.', 'fuses.', 'branch_cells.', 'reductions.', 'classifiers.')
    return fit_checkpoint(state_dict, model, fresh if not is_mgn else ('classifiers.',),
                          first_conv_prefixes(model) + ('classifiers.',),
                          'MGN' if is_mgn else f'plain {model.backbone_name}')


def _create_mgn(variant: str, pretrained: bool = False, **kwargs: Any) -> MGN:
    require_pretrained(variant, pretrained, kwargs)
    set_feature_cfg(kwargs)
    return build_model_with_cfg(MGN, variant, pretrained, pretrained_filter_fn=mgn_checkpoint_filter_fn, **kwargs)


def _mgn_cfgs(name: str) -> Dict[str, Dict[str, Any]]:
    classifiers = tuple(f'classifiers.{i}' for i in range(8))
    pool_size = (MGN_INPUT_SIZE[1] // 16, MGN_INPUT_SIZE[2] // 16)  # forward_features: the part branches' grid
    return derived_pretrained_cfgs('resnet50', name, 'ReID layers start fresh.', classifier=classifiers,
                                   input_size=MGN_INPUT_SIZE, pool_size=pool_size, **REID_CFG)


default_cfgs = generate_default_cfgs({**_mgn_cfgs('mgn_resnet50'), **_mgn_cfgs('ptl_mgn_resnet50')})


@register_model
def mgn_resnet50(pretrained: bool = False, **kwargs: Any) -> MGN:
    """MGN (Wang et al. 2018) on ResNet-50, input 384x128."""
    return _create_mgn('mgn_resnet50', pretrained, **kwargs)


@register_model
def ptl_mgn_resnet50(pretrained: bool = False, **kwargs: Any) -> MGN:
    """MGN_PTL (Yu et al., PTL): MGN with BConv-Cells beside the trunk and one final cell per branch."""
    return _create_mgn('ptl_mgn_resnet50', pretrained, **dict(kwargs, ptl=True))
