"""PTLNet: a ladder of BConv-Cells beside any timm CNN that exposes stage features, and the ``ptl_*`` models.

The backbone runs exactly as timm defines it (its pretrained weights load unchanged); information flows
from the backbone into the branch only. For backbone stage features f_0..f_{n-1} at reductions
r_0..r_{n-1} (timm's ``feature_info``)::

    h_0 = fuse_0(f_0)                            # 1x1 conv + BN + ReLU down to the branch width w_0
    c_k = cell_k(h_{k-1})                        # stride r_k / r_{k-1}, k = 1..n-1
    h_k = fuse_k(cat[f_k, c_k])                  # k = 1..n-2
    features = cat[backbone final map, c_{n-1}]  # joined before the head, in the backbone's own layout

The cells always run on NCHW stage maps (``forward_intermediates``); the final features keep the backbone's
layout (NCHW, NHWC as Swin's and MambaOut's, tokens as Hiera's or with class tokens, a list as CoaT's):
``ptl_timm.models._layout`` joins the cell map in that layout and splits it again for the head.

A stride of 4 or more is a chain of stride-2 cells (the ladder: ``ptl_timm.layers.ladder``). The head pools
the backbone part with the backbone's own head (``pre_logits``: its pooling and, e.g. for ConvNeXt, its norm)
and the cell part with the same global pool, concatenates them and applies dropout and a fresh ``fc``. This is
the reference MGN_PTL topology of the paper generalised to any staged CNN, with one change by default: the
branch starts from the backbone's first stage (the stem, a pretrained function of the image) instead of
cells on the raw image, so that no cell runs at the first stage's resolution, where the gates' element-wise
passes are costly (docs/benchmarks.md, "Cost"). ``image_cells=True`` restores the paper's cells on the
image: ``c_0 = cell_0(image)`` at stride r_0 and ``h_0 = fuse_0(cat[f_0, c_0])``.

The ``ptl_*`` entry points at the end of this file are the registered models: each ``ptl_X`` offers every
pretrained tag of timm's ``X`` (``ptl_resnet50.a1_in1k`` loads ``timm/resnet50.a1_in1k`` into the backbone
through the backbone module's own checkpoint filter and starts the PTL branch and the head fresh), and the
full-PTL tags of the weights manifest (``ptl_timm.hub.manifest``), whose checkpoints hold every tensor.
"""
import logging
import re
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import timm
import torch
from timm.layers import SelectAdaptivePool2d, make_divisible, to_2tuple
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    get_pretrained_cfg_value,
    register_model,
    split_model_name_tag,
)
from timm.models._features import feature_take_indices
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from ..hub.cache import require_pretrained
from ..hub.manifest import load_manifest, manifest_pretrained_cfgs, tag_model_args
from ..layers import (
    DEFAULT_STATE_MODE,
    LadderMixin,
    LadderStage,
    StageFuse,
    StageJoin,
    StateMode,
    bconv_cells,
    build_ladder,
)
from ._helpers import (
    as_tuple,
    backbone_filter_fn,
    check_model_name,
    check_state_dict_fits,
    derived_pretrained_cfgs,
    first_conv_prefixes,
    prefix_group_matcher,
    set_feature_cfg,
    tagged_cfg,
)
from ._layout import FinalJoin, final_layout
from ._stages import module_copy, staged_backbone

__all__ = [
    'PTLNet', 'DEFAULT_WIDTH_MULT', 'PTL_BACKBONES', 'resolve_cell_widths', 'checkpoint_filter_fn',
    'create_ptl_model', 'ptl_pretrained_cfgs',
]

_logger = logging.getLogger(__name__)

# an FX symbolic trace (torch.fx, timm's and torchvision's extractors), not torch.export or torch.compile; older
# torch has only is_fx_tracing, which warns on newer torch that it covers both
_is_fx_symbolic_tracing = getattr(
    torch.fx._symbolic_trace, 'is_fx_symbolic_tracing', torch.fx._symbolic_trace.is_fx_tracing)

# Cell width = backbone stage width x 1/8 (rounded to 8): ResNet-50 gets 8/32/64/128/256.
DEFAULT_WIDTH_MULT = 0.125

# the pool types of timm's SelectAdaptivePool2d, which pools the cell part; token pooling ('token', 'map')
# has no counterpart on a cell map, which is averaged instead
_MAP_POOLS = ('', 'avg', 'max', 'avgmax', 'catavgmax')


def resolve_cell_widths(
        stage_chs: Sequence[int],
        width_mult: float = DEFAULT_WIDTH_MULT,
        cell_widths: Optional[Sequence[int]] = None,
) -> List[int]:
    """Cell output width per backbone stage: ``cell_widths`` if given, else ``stage_chs * width_mult``."""
    if cell_widths is not None:
        cell_widths = [int(w) for w in cell_widths]
        if len(cell_widths) != len(stage_chs) or min(cell_widths) < 1:
            raise ValueError(
                f'cell_widths needs one positive width per backbone stage ({len(stage_chs)} stages: '
                f'{list(stage_chs)} channels), got {cell_widths}.')
        return cell_widths
    if width_mult <= 0:
        raise ValueError(f'width_mult must be > 0, got {width_mult}.')
    return [make_divisible(c * width_mult, 8) for c in stage_chs]


def _pool_type(backbone: nn.Module) -> str:
    """The global pool a timm model was created with (its own default), as a pool type name."""
    for owner in (backbone, getattr(backbone, 'head', None)):
        pool = getattr(owner, 'global_pool', None)
        if isinstance(pool, str):
            return pool
        if isinstance(getattr(pool, 'pool_type', None), str):
            return pool.pool_type
    return 'avg'


def _cell_pool(global_pool: str) -> SelectAdaptivePool2d:
    """The pool of the cell part: the model's global pool, averaging where the backbone pools tokens."""
    pool_type = global_pool if global_pool in _MAP_POOLS or global_pool.startswith('fast') else 'avg'
    return SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))


def _shape(x: Any) -> str:
    """A backbone output's shape, or what it is instead of a tensor (some give a list of tensors)."""
    if isinstance(x, torch.Tensor):
        return str(tuple(x.shape))
    if isinstance(x, (list, tuple)):
        return f'a {type(x).__name__} of [{", ".join(_shape(v) for v in x)}]'
    return type(x).__name__


class PTLNet(LadderMixin, nn.Module):
    """Progressive Transfer Learning model around a timm backbone.

    Args:
        backbone: timm model name (created without weights; load them with ``pretrained=True``).
        num_classes: classes of the final ``fc`` (0: no classifier, ``forward`` gives pooled features).
        in_chans: image channels.
        global_pool: global pooling of the head, for the backbone part and the cell part alike (default: the
            backbone's own; the cell part is averaged where the backbone pools tokens, e.g. ``'token'``).
        drop_rate: dropout before ``fc``.
        width_mult: cell width per stage as a fraction of the backbone stage's channels.
        cell_widths: explicit branch width w_k of every backbone stage (overrides ``width_mult``).
        image_cells: start the ladder with cells on the image as the paper did, instead of on f_0.
        cell_norm: batch-normalise the last cell's map before it joins the backbone's final features.
        cells_removed: the control of every benchmark: the same model (parameters, head, initialisation,
            ``state_dict``) whose cell maps are replaced by zeros; the ladder does not run, so only the cells
            separate it from the PTL model (docs/benchmarks.md, "The question and the baselines").
        state_mode: latent state rule of every cell, see :class:`BConvCell`.
        state_slots: slots of the ``'carried'`` state.
        img_size: nominal input size; the cells store their state at the grid it gives (default: the
            backbone's pretrained input size). Passed to backbones of a fixed input size (Swin, Hiera, ...).
        kernel_size: kernel of the cells' gate convolutions.
        **backbone_kwargs: passed to the backbone (``drop_path_rate``, ``bn_eps``, ...).

    Shapes: ``forward_features`` (B, in_chans, H, W) -> (B, backbone.num_features + w_last, H/32, W/32) for an
    NCHW backbone, the backbone's own layout otherwise (Swin: (B, H/32, W/32, C + w_last); tokens:
    (B, N, C + w_last)); ``forward`` -> (B, num_classes).
    """

    def __init__(
            self,
            backbone: str,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: Optional[str] = None,
            drop_rate: float = 0.,
            width_mult: float = DEFAULT_WIDTH_MULT,
            cell_widths: Optional[Sequence[int]] = None,
            state_mode: StateMode = DEFAULT_STATE_MODE,
            state_slots: int = 32,
            img_size: Optional[Union[int, Tuple[int, int]]] = None,
            kernel_size: int = 3,
            image_cells: bool = False,
            cell_norm: bool = False,
            cells_removed: bool = False,
            device: Optional[Union[str, torch.device]] = None,
            dtype: Optional[torch.dtype] = None,
            **backbone_kwargs: Any,
    ):
        super().__init__()
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.state_mode = state_mode
        check_model_name(backbone)
        if img_size is not None and get_pretrained_cfg_value(backbone, 'fixed_input_size'):
            backbone_kwargs.setdefault('img_size', img_size)  # its position embeddings, windows... fit that size
        if global_pool is not None:
            backbone_kwargs['global_pool'] = global_pool
        self.backbone = timm.create_model(
            backbone, pretrained=False, num_classes=0, in_chans=in_chans, device=device, dtype=dtype,
            **backbone_kwargs)
        if img_size is None:
            img_size = self.backbone.pretrained_cfg.get('input_size', (in_chans, 224, 224))[-2:]
        self.img_size = to_2tuple(img_size)
        self._probe_backbone()
        stage_info = self.backbone.feature_info
        stage_chs = [info['num_chs'] for info in stage_info]
        reductions = [info['reduction'] for info in stage_info]
        self.image_cells = image_cells
        self.cells_removed = cells_removed
        self.first_cell_stage = first = 0 if image_cells else 1
        if len(stage_chs) < 2:
            raise ValueError(f'{backbone} reports {len(stage_chs)} stage(s); PTL needs at least two.')
        self.cell_widths = resolve_cell_widths(stage_chs, width_mult, cell_widths)

        # created in this order (entry fuse, then each stage's cells and fuse): it fixes the random init
        entry = [] if image_cells else [StageFuse(stage_chs[0], 0, self.cell_widths[0])]
        in_chs, in_reduction = (in_chans, 1) if image_cells else (self.cell_widths[0], reductions[0])
        stages = [LadderStage(stage_chs[k], reductions[k], self.cell_widths[k]) for k in range(first, len(stage_chs))]
        try:
            ladder = build_ladder(stages, in_chs, in_reduction, self.img_size, StageFuse, fuse_last=False,
                                  kernel_size=kernel_size, state_mode=state_mode, state_slots=state_slots)
        except ValueError as e:
            raise ValueError(f'{backbone}: {e}') from e
        self.cells = ladder.cells
        self.fuses = nn.ModuleList([*entry, *ladder.fuses])

        self.num_stages = len(stage_chs)
        # parameter-free: adds no state_dict keys and draws no random numbers
        self.joins = nn.ModuleList([StageJoin() for _ in range(self.num_stages)])
        widths = [0] * first + self.cell_widths[first:]
        self.feature_info = [
            dict(num_chs=chs + width, reduction=reduction, module=f'joins.{k}')
            for k, (chs, width, reduction) in enumerate(zip(stage_chs, widths, reductions))
        ]
        self.num_features = self.backbone_features + self.cell_widths[-1]
        self.global_pool = _pool_type(self.backbone) if global_pool is None else global_pool
        # Unnormalised, the pooled cell features vary far less across images than the backbone's and the
        # classifier ignores them; the paper's MGN head has a BN after the join. Optional, off by default:
        # it did worse on validation (docs/benchmarks.md, "Defaults").
        self.cell_norm = nn.BatchNorm2d(self.cell_widths[-1]) if cell_norm else nn.Identity()
        self.cell_pool = _cell_pool(self.global_pool)
        self.head_hidden_size = self._pooled_width()
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)  # the branch and the head; the backbone was created there

    def _example(self, *shape: int) -> torch.Tensor:
        """Zeros of ``shape`` on the backbone's device and dtype (a model created on 'meta' included)."""
        ref = next(self.backbone.parameters())
        return torch.zeros(shape, device=ref.device, dtype=ref.dtype)

    @torch.no_grad()
    def _backbone_example(self, indices: Optional[List[int]] = None) -> Tuple[Any, List[torch.Tensor]]:
        """The backbone's final features and stage maps (``indices``: those, after pruning) of one image, at a small
        size it runs at (its fixed size, else 2 pixels at the last stage, else ``img_size``)."""
        name, bb = self.backbone_name, self.backbone
        if not hasattr(bb, 'forward_intermediates') or not getattr(bb, 'feature_info', None):
            raise ValueError(
                f'{name} does not report stage features (feature_info + forward_intermediates); '
                'PTL needs a timm backbone with stages (a feature pyramid).')
        size = (2 * max(info['reduction'] for info in bb.feature_info),) * 2
        if bb.pretrained_cfg.get('fixed_input_size'):
            size = self.img_size
        was_training = bb.training
        bb.eval()
        try:
            try:
                return bb.forward_intermediates(self._example(1, self.in_chans, *size), indices=indices)
            except Exception:  # some CNNs (Inception, HaloNet) need more than 2 pixels at the last stage
                size = self.img_size
                return bb.forward_intermediates(self._example(1, self.in_chans, *size), indices=indices)
        except Exception as e:
            raise ValueError(f'{name} cannot run on a {size} input ({type(e).__name__}: {e}); PTL needs a backbone '
                             'that runs at the img_size given to the model.') from e
        finally:
            bb.train(was_training)

    def _probe_backbone(self, indices: Optional[List[int]] = None) -> None:
        """Read the layout of the backbone's final features off one forward (``final_join``, ``backbone_features``:
        their channels); fail early, naming the reason, for a backbone whose features cannot feed the ladder.
        ``indices``: the stages a pruned backbone kept."""
        name, bb = self.backbone_name, self.backbone
        final, feats = self._backbone_example(indices)
        infos = bb.feature_info if indices is None else [bb.feature_info[i] for i in indices]
        for info, feat in zip(infos, feats):
            if not isinstance(feat, torch.Tensor) or feat.ndim != 4 or feat.shape[1] != info['num_chs']:
                raise ValueError(f'{name} stage {info["module"]} gives {_shape(feat)}, not an NCHW map of '
                                 f'{info["num_chs"]} channels, from forward_intermediates; PTL needs NCHW stage maps.')
        # a list (CoaT's scales, EfficientViM's states) joins its last element: the backbone's or the last stage's width
        chs = [bb.num_features]
        if isinstance(final, (list, tuple)):
            chs.append(infos[-1]['num_chs'])
        error = None
        for c in chs:
            try:
                layout, prefix, grid, in_list = final_layout(final, feats[-1], c, getattr(bb, 'output_fmt', None))
                break
            except ValueError as e:
                error = e
        else:
            raise ValueError(f'{name}: its {error}, so the cells cannot join them (a token or channels-last model '
                             'of another layout).') from error
        reductions = [info['reduction'] for info in bb.feature_info]
        if layout != 'NCHW' and reductions[-1] <= reductions[0]:
            raise ValueError(
                f'{name} is not a feature pyramid (feature_info reductions {reductions}) and its final features '
                f'{_shape(final)} are tokens or channels-last: a token or channels-last model joins the cells only '
                'where its stages grow coarser (Swin, Hiera, MViTv2, ...). Use a hierarchical backbone.')
        self.final_join = FinalJoin(layout, prefix, grid)
        self.final_in_list = in_list
        self.output_fmt = layout  # timm's name for the layout of forward_features (as Swin's 'NHWC')
        self.backbone_features = c
        # the final features' shapes (batch 1), to read the width the backbone's head gives them
        self._final_shapes = [tuple(t.shape) for t in (final if in_list else [final])]

    @torch.no_grad()
    def _pooled_width(self) -> int:
        """Width of the head's pooled features, read off the backbone head and the cell pool."""
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            final = [self._example(*shape) for shape in self._final_shapes]
            pooled = self.backbone.forward_head(final if self.final_in_list else final[0], pre_logits=True)
        finally:
            self.backbone.train(was_training)
        if isinstance(pooled, (list, tuple)):  # unpooled list features (EfficientViM): the joined last element
            pooled = pooled[-1]
        cells = (self.num_features - self.backbone_features) * self.cell_pool.feat_mult()
        return pooled.shape[self.final_join.channel_dim] + cells

    # --- latent state -------------------------------------------------------------------------------
    def reset_state(self) -> None:
        """Zero the latent state of every cell (the state of a fresh model)."""
        for cell in bconv_cells(self):
            cell.reset_state()

    def freeze_state(self) -> None:
        """Stop every state update (train mode too); forwards read the dataset-level state."""
        for cell in bconv_cells(self):
            cell.freeze_state()

    def unfreeze_state(self) -> None:
        """Resume state updates in train mode."""
        for cell in bconv_cells(self):
            cell.unfreeze_state()

    @property
    @torch.jit.unused
    def state_frozen(self) -> bool:
        return all(bool(cell.state_frozen) for cell in bconv_cells(self))

    # --- timm model interface -------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Backbone groups as the backbone defines them; the PTL branch and both heads form the last group,
        so fresh layers keep the full learning rate under ``--layer-decay``."""
        matcher = prefix_group_matcher(self.backbone.group_matcher(coarse=coarse), 'backbone.')
        covered = [re.compile(p) for spec in matcher.values()
                   for p in ([s[0] for s in spec] if isinstance(spec, list) else [spec])]
        head = sorted({
            re.escape(n.rsplit('.', 1)[0]) for n, _ in self.named_parameters()
            if not any(p.match(n) for p in covered)
        })
        matcher['head'] = rf'^(?:{"|".join(head)})\.' if head else None
        return matcher

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint the backbone's stages (where the memory is); cells may be checkpointed from outside."""
        self.backbone.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        skip = getattr(self.backbone, 'no_weight_decay', lambda: set())()
        return {f'backbone.{n}' for n in skip}

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            self.backbone.reset_classifier(0, global_pool)  # first: a head that refuses the pool changes nothing
            self.global_pool = global_pool
            self.cell_pool = _cell_pool(global_pool)
            self.head_hidden_size = self._pooled_width()
        self.num_classes = num_classes
        ref = next(self.backbone.parameters())
        self.fc = nn.Linear(self.head_hidden_size, num_classes, device=ref.device, dtype=ref.dtype) \
            if num_classes > 0 else nn.Identity()
        self.fc.train(self.training)

    def forward_cells(self, x: torch.Tensor, final: Any, feats: List[torch.Tensor]) -> Any:
        """What the cells add to the backbone, alone: the final features with the last cell map joined, given the
        input ``x`` and the backbone's final features and stage maps (``backbone.forward_intermediates(x)``).
        ``forward_features(x)`` is this on the backbone's outputs (benchmarks time the ladder through it)."""
        return self._join(final, self._ladder(x, feats))

    def _ladder(self, x: torch.Tensor, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        """Cell output c_k (B, w_k, H_k, W_k) of every stage from ``first_cell_stage`` on, given the stage
        features; fewer features (stop_early) stop the ladder early."""
        first = self.first_cell_stage
        if self.cells_removed:
            return self._removed_cells(feats)
        h = x
        if first > 0:
            for j, fuse in enumerate(self.fuses):  # fuses[0], the branch's entry (TorchScript: no ModuleList[int])
                if j == 0:
                    h = fuse(feats[0])
        outs, _ = self.run_ladder(h, feats[first:], fuse_offset=first)
        return outs

    def _removed_cells(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        """Zeros in place of the cell maps c_k (B, w_k, H_k, W_k), at the grid of the stage features."""
        outs: List[torch.Tensor] = []
        for k, feat in enumerate(feats):
            if k >= self.first_cell_stage:
                outs.append(feat.new_zeros(feat.shape[0], self.cell_widths[k], feat.shape[-2], feat.shape[-1]))
        return outs

    @torch.jit.unused
    def _joins_observed(self) -> bool:
        """True while the stage joins' outputs can be seen: forward (pre-)hooks on a join or on every module
        (timm's hook-based feature extractors), or an FX trace (feature_cls='fx', create_feature_extractor)."""
        if _is_fx_symbolic_tracing() or _global_forward_hooks or _global_forward_pre_hooks:
            return True
        return any(join._forward_hooks or join._forward_pre_hooks for join in self.joins)

    @torch.jit.unused
    def _stage_maps(self, feats: List[torch.Tensor], outs: List[torch.Tensor]) -> List[torch.Tensor]:
        """The stage features cat[f_k, c_k] ``feature_info`` describes (f_k alone before the first cell stage),
        each made by its ``joins[k]``."""
        first = self.first_cell_stage
        return [join(feats[k], outs[k - first] if k >= first else None)
                for k, join in enumerate(self.joins) if k < len(feats)]

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage features cat[f_k, c_k] (B, C_k + w_k, H/r_k, W/r_k) (f_k alone before the first cell
        stage), and the final features unless ``intermediates_only``. Indices follow ``feature_info``."""
        assert output_fmt == 'NCHW', 'Output shape must be NCHW.'
        _check_input(x, self.in_chans, self.backbone_name)
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        upto = list(range(max_index + 1)) if (stop_early or intermediates_only) else None
        if intermediates_only:  # MobileNetV3 and its kin stop early only when asked for intermediates alone
            feats = self.backbone.forward_intermediates(
                x, indices=upto, norm=norm, stop_early=True, intermediates_only=True)
            final = feats[-1]  # not returned
        else:
            final, feats = self.backbone.forward_intermediates(
                x, indices=upto, norm=norm, stop_early=upto is not None, intermediates_only=False)
        outs = self._ladder(x, feats)
        maps = self._stage_maps(feats, outs)
        intermediates = [maps[k] for k in take_indices]
        if intermediates_only:
            return intermediates
        if len(outs) == self.num_stages - self.first_cell_stage:
            _check_final(final, self.backbone_name, self.final_in_list)
            final = self._join(final, outs)
        return final, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (backbone and ladder) after the last of ``indices``, and the head.

        As timm's CNNs: where the features now end early (a stage dropped, or the backbone's head-side layers
        such as a conv head pruned with the head), ``forward_features`` gives the last kept stage's map, the
        head is reset to ``(0, '')`` and ``forward`` returns that map unpooled (pooled, where the backbone's head
        cannot drop its pooling)."""
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        prune_end = max_index < self.num_stages - 1
        self.backbone.prune_intermediate_layers(take_indices, prune_norm=prune_norm, prune_head=prune_head)
        self.cells = self.cells[:max(max_index + 1 - self.first_cell_stage, 0)]
        self.fuses = self.fuses[:max_index]
        self.joins = self.joins[:max_index + 1]
        self.num_stages = max_index + 1
        backbone_features = self.backbone_features
        final, _ = self._backbone_example(take_indices)
        if isinstance(final, (list, tuple)) == self.final_in_list:  # HRNet's pruned list of branches fails in forward
            self._probe_backbone(take_indices)  # the pruned features may end in another layout (a token stage's map)
        if prune_head or prune_end or self.backbone_features != backbone_features:
            # the head and the norm before it were sized for the last stage's cell and the backbone's final map
            self.cell_norm = nn.Identity()
            self.num_features = self.backbone_features + (self.cell_widths[max_index] if self.cells else 0)
            self.head_drop = nn.Identity()
            try:
                self.reset_classifier(0, '')
            except AssertionError:  # heads that cannot drop their pooling (EfficientViT, InceptionNeXt) keep it, as
                self.reset_classifier(0)  # the backbone's own prune does; its pruned head may have a new width
                try:
                    self.head_hidden_size = self._pooled_width()
                except AssertionError:  # CoaT's pruned head cannot run at all (its own forward_head says why)
                    pass
        return take_indices

    def _join(self, final: torch.Tensor, outs: List[torch.Tensor]) -> torch.Tensor:
        """The final features: the backbone's final features and the last cell map beside it, in their layout
        (none: pruned to the stages before the first cell)."""
        if len(outs) == 0:
            return final
        if self.final_in_list:
            return self._join_list(final, self.cell_norm(outs[-1]))
        return self.final_join(final, self.cell_norm(outs[-1]))

    @torch.jit.unused
    def _join_list(self, final: Any, cells: torch.Tensor) -> torch.Tensor:
        """A list of final features (CoaT's scales, EfficientViM's states) gets the cells in its last element.
        Returns that list: the annotation is for TorchScript, which compiles list backbones nowhere."""
        return [*final[:-1], self.final_join(final[-1], cells)]

    def _backbone_maps(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The backbone's final features and stage maps; scripted, through the staged copy of the backbone
        that ``__prepare_scriptable__`` put in its place."""
        if torch.jit.is_scripting():
            feats: List[torch.Tensor] = []
            final = self.backbone.forward_stages(x, feats)
            if self.backbone.stage_nhwc:  # Swin's and MambaOut's stages run channels-last
                feats = [f.permute(0, 3, 1, 2) for f in feats]
            return final, feats
        return self._backbone_intermediates(x)

    @torch.jit.unused
    def _backbone_intermediates(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        final, feats = self.backbone.forward_intermediates(x)
        _check_final(final, self.backbone_name, self.final_in_list)
        return final, feats

    def __prepare_scriptable__(self) -> 'PTLNet':
        """What ``torch.jit.script`` compiles: a copy of this model (the same modules, parameters and buffers)
        whose backbone runs its stages in TorchScript (timm's ``forward_intermediates`` does not script)."""
        scripted = module_copy(self)
        ref = next(self.backbone.parameters())
        gen = torch.Generator().manual_seed(0)
        h, w = self.img_size
        examples = [torch.randn(1, self.in_chans, *size, generator=gen).to(device=ref.device, dtype=ref.dtype)
                    for size in ((h, w), (h + 17, w + 9))]  # the nominal size and an odd one
        scripted._modules['backbone'] = staged_backbone(self.backbone, examples, self.backbone_name)
        return scripted

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_chans, self.backbone_name)
        final, feats = self._backbone_maps(x)
        outs = self._ladder(x, feats)
        # the stage joins run only where something observes them (hooks, FX return nodes): nothing here reads
        # them, and their copies of the stage maps would cost a few % of every forward
        if not torch.jit.is_scripting() and self._joins_observed():
            self._stage_maps(feats, outs)
        return self._join(final, outs)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The backbone's part of the features through the backbone's own head (its pooling and norm), the cell
        part through the cell pool, side by side; then dropout and ``fc``."""
        if self.final_in_list:
            return self._forward_head_list(x, pre_logits)
        backbone_part, cell_part = self.final_join.split(x, self.backbone_features)
        return self._head(self.backbone.forward_head(backbone_part, pre_logits=True), cell_part, pre_logits)

    @torch.jit.unused
    def _forward_head_list(self, x: Any, pre_logits: bool) -> torch.Tensor:
        if self.cell_pool.is_identity():  # unpooled: the list itself, as the backbone's head leaves it
            return x
        backbone_part, cell_part = self.final_join.split(x[-1], self.backbone_features)
        return self._head(self.backbone.forward_head([*x[:-1], backbone_part], pre_logits=True), cell_part, pre_logits)

    def _head(self, backbone_part: torch.Tensor, cell_part: torch.Tensor, pre_logits: bool) -> torch.Tensor:
        if self.cell_pool.is_identity():  # unpooled features: both parts in the backbone's layout
            x = torch.cat([backbone_part, cell_part], dim=self.final_join.channel_dim)
        else:
            x = torch.cat([backbone_part, self.cell_pool(self.final_join.cell_map(cell_part))], dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@torch.fx.wrap  # shape tests: one call in an FX graph (any tracer), run on real tensors
def _check_input(x: torch.Tensor, in_chans: int, backbone: str) -> None:
    if x.ndim != 4 or x.shape[1] != in_chans:
        fix = f'in_chans={x.shape[1]}' if x.ndim == 4 else 'in_chans=...'
        raise ValueError(
            f'PTLNet({backbone}) expects (B, {in_chans}, H, W) images, got shape {x.shape}. Create the model with '
            f'{fix} or convert the images.')


@torch.fx.wrap
def _check_final(final: Any, backbone: str, in_list: bool = False) -> None:
    if not in_list and not isinstance(final, torch.Tensor):  # HRNet pruned to a branch keeps every branch's output
        raise ValueError(
            f'PTLNet({backbone}): the pruned backbone gives {_shape(final)} as its final features, not one map, so '
            'the cells cannot join it. Take the stage maps with forward_intermediates(x, intermediates_only=True) '
            'or create the model with features_only=True.')


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
        bb_classifier = as_tuple(model.backbone.pretrained_cfg.get('classifier'))
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
    kind = 'PTL' if is_ptl_checkpoint else f'plain {model.backbone_name}'
    # timm adapts the input conv (in_chans) and drops the classifier (num_classes) after this filter
    check_state_dict_fits(
        state_dict, model, first_conv_prefixes(model) + ('fc.',),
        f'The {kind} checkpoint does not fit the PTL model (backbone {model.backbone_name}, cell widths '
        f'{model.cell_widths}, state_mode {model.state_mode})',
        'It comes from another architecture or other PTL settings; create the model with the settings the '
        'checkpoint was trained with.')
    return state_dict


def _create_ptl(variant: str, backbone: str, pretrained: bool = False, **kwargs: Any) -> PTLNet:
    set_feature_cfg(kwargs)
    # a full-PTL tag (weights manifest) rebuilds the model its checkpoint holds: cell widths, state grid...
    kwargs = dict(tag_model_args(_MANIFEST, variant, kwargs.get('pretrained_cfg')), **kwargs)
    require_pretrained(variant, pretrained, kwargs)  # fail at once, not after the Hub's retries
    return build_model_with_cfg(
        PTLNet, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        backbone=backbone,
        **kwargs,
    )


def ptl_pretrained_cfgs(backbone: str) -> Dict[str, Dict[str, Any]]:
    """Pretrained cfgs 'ptl_X.tag' for every tag of timm's X: same weights source and preprocessing,
    with the input conv under ``backbone.`` and the PTL head ``fc`` as classifier."""
    cfgs = derived_pretrained_cfgs(
        backbone, f'ptl_{backbone}', 'PTL branch and head start fresh.', prefix='backbone.', classifier='fc')
    return cfgs or {f'ptl_{backbone}': dict(classifier='fc')}


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
    cfg = tagged_cfg(ptl_pretrained_cfgs(arch), f'ptl_{arch}', tag, arch)
    return _create_ptl(f'ptl_{arch}', arch, pretrained, pretrained_cfg=cfg, **kwargs)


# read once: the full-PTL tags registered below and the model_args each of them rebuilds
_MANIFEST = load_manifest()
default_cfgs = generate_default_cfgs({
    **ptl_pretrained_cfgs('resnet18'), **ptl_pretrained_cfgs('resnet34'), **ptl_pretrained_cfgs('resnet50'),
    **ptl_pretrained_cfgs('resnet101'), **ptl_pretrained_cfgs('resnet152'),
    **ptl_pretrained_cfgs('densenet121'), **ptl_pretrained_cfgs('densenet161'),
    **ptl_pretrained_cfgs('densenet169'), **ptl_pretrained_cfgs('densenet201'),
    **ptl_pretrained_cfgs('mobilenetv2_100'), **ptl_pretrained_cfgs('tf_efficientnet_lite0'),
    **ptl_pretrained_cfgs('tf_efficientnet_lite1'), **ptl_pretrained_cfgs('tf_efficientnet_lite2'),
    **ptl_pretrained_cfgs('efficientnet_b0'), **ptl_pretrained_cfgs('convnext_tiny'),
    **ptl_pretrained_cfgs('regnety_016'), **ptl_pretrained_cfgs('swin_tiny_patch4_window7_224'),
    **ptl_pretrained_cfgs('hiera_tiny_224'), **ptl_pretrained_cfgs('mambaout_femto'),
    **manifest_pretrained_cfgs(_MANIFEST),  # full-PTL tags, after the backbone tags (not default)
})

# DenseNet stages are wide for their parameter count: half the default width keeps the branch within the
# parameter budget of the others (docs/benchmarks.md, "Cost").
_DENSENET_ARGS = dict(width_mult=1 / 16)


@register_model
def ptl_resnet18(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    """PTL on timm's ``resnet18``: branch widths 8/8/16/32/64 (1/8 of its stage widths)."""
    return _create_ptl('ptl_resnet18', 'resnet18', pretrained, **kwargs)


@register_model
def ptl_resnet34(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    """PTL on timm's ``resnet34``: branch widths 8/8/16/32/64 (1/8 of its stage widths)."""
    return _create_ptl('ptl_resnet34', 'resnet34', pretrained, **kwargs)


@register_model
def ptl_resnet50(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    """PTL on timm's ``resnet50``: branch widths 8/32/64/128/256 (1/8 of its stage widths)."""
    return _create_ptl('ptl_resnet50', 'resnet50', pretrained, **kwargs)


@register_model
def ptl_resnet101(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    """PTL on timm's ``resnet101``: branch widths 8/32/64/128/256 (1/8 of its stage widths)."""
    return _create_ptl('ptl_resnet101', 'resnet101', pretrained, **kwargs)


@register_model
def ptl_resnet152(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    """PTL on timm's ``resnet152``: branch widths 8/32/64/128/256 (1/8 of its stage widths)."""
    return _create_ptl('ptl_resnet152', 'resnet152', pretrained, **kwargs)


@register_model
def ptl_densenet121(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    """PTL on timm's ``densenet121``: branch widths 8/16/32/64/64 (1/16 of its stage widths)."""
    return _create_ptl('ptl_densenet121', 'densenet121', pretrained, **dict(_DENSENET_ARGS, **kwargs))


@register_model
def ptl_densenet161(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    """PTL on timm's ``densenet161``: branch widths 8/24/48/136/136 (1/16 of its stage widths)."""
    return _create_ptl('ptl_densenet161', 'densenet161', pretrained, **dict(_DENSENET_ARGS, **kwargs))


@register_model
def ptl_densenet169(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    """PTL on timm's ``densenet169``: branch widths 8/16/32/80/104 (1/16 of its stage widths)."""
    return _create_ptl('ptl_densenet169', 'densenet169', pretrained, **dict(_DENSENET_ARGS, **kwargs))


@register_model
def ptl_densenet201(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    """PTL on timm's ``densenet201``: branch widths 8/16/32/112/120 (1/16 of its stage widths)."""
    return _create_ptl('ptl_densenet201', 'densenet201', pretrained, **dict(_DENSENET_ARGS, **kwargs))


@register_model
def ptl_mobilenetv2_100(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    """PTL on timm's ``mobilenetv2_100``: branch widths 8/8/8/16/40 (1/8 of its stage widths)."""
    return _create_ptl('ptl_mobilenetv2_100', 'mobilenetv2_100', pretrained, **kwargs)


@register_model
def ptl_tf_efficientnet_lite0(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    """PTL on timm's ``tf_efficientnet_lite0``: branch widths 8/8/8/16/40 (1/8 of its stage widths)."""
    return _create_ptl('ptl_tf_efficientnet_lite0', 'tf_efficientnet_lite0', pretrained, **kwargs)


@register_model
def ptl_tf_efficientnet_lite1(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    """PTL on timm's ``tf_efficientnet_lite1``: branch widths 8/8/8/16/40 (1/8 of its stage widths)."""
    return _create_ptl('ptl_tf_efficientnet_lite1', 'tf_efficientnet_lite1', pretrained, **kwargs)


@register_model
def ptl_tf_efficientnet_lite2(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    """PTL on timm's ``tf_efficientnet_lite2``: branch widths 8/8/8/16/48 (1/8 of its stage widths)."""
    return _create_ptl('ptl_tf_efficientnet_lite2', 'tf_efficientnet_lite2', pretrained, **kwargs)


@register_model
def ptl_efficientnet_b0(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    """PTL on timm's ``efficientnet_b0``: branch widths 8/8/8/16/40 (1/8 of its stage widths)."""
    return _create_ptl('ptl_efficientnet_b0', 'efficientnet_b0', pretrained, **kwargs)


@register_model
def ptl_convnext_tiny(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    """PTL on timm's ``convnext_tiny``: branch widths 16/24/48/96 (1/8 of its stage widths)."""
    return _create_ptl('ptl_convnext_tiny', 'convnext_tiny', pretrained, **kwargs)


@register_model
def ptl_regnety_016(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    """PTL on timm's ``regnety_016``: branch widths 8/8/16/40/112 (1/8 of its stage widths)."""
    return _create_ptl('ptl_regnety_016', 'regnety_016', pretrained, **kwargs)


@register_model
def ptl_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    """PTL on timm's ``swin_tiny_patch4_window7_224`` (Swin-T): branch widths 16/24/48/96 (1/8 of its stage
    widths); channels-last features (B, 7, 7, 864) at 224 px, Swin's own head."""
    return _create_ptl('ptl_swin_tiny_patch4_window7_224', 'swin_tiny_patch4_window7_224', pretrained, **kwargs)


@register_model
def ptl_hiera_tiny_224(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    """PTL on timm's ``hiera_tiny_224`` (Hiera-T): branch widths 16/24/48/96 (1/8 of its stage widths); token
    features (B, 49, 864) at 224 px, Hiera's own head."""
    return _create_ptl('ptl_hiera_tiny_224', 'hiera_tiny_224', pretrained, **kwargs)


@register_model
def ptl_mambaout_femto(pretrained: bool = False, **kwargs: Any) -> PTLNet:
    """PTL on timm's ``mambaout_femto``: branch widths 8/16/24/40 (1/8 of its stage widths); channels-last
    features (B, 7, 7, 328) at 224 px, MambaOut's own head."""
    return _create_ptl('ptl_mambaout_femto', 'mambaout_femto', pretrained, **kwargs)


# The entry points above are the list of models; this is that list by backbone.
PTL_BACKBONES: Tuple[str, ...] = tuple(
    name[len('ptl_'):] for name in timm.list_models(module=__name__.rsplit('.', 1)[-1]))
