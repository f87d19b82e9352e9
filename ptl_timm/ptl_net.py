"""PTLNet: a ladder of BConv-Cells beside any timm CNN that exposes stage features.

The backbone runs exactly as timm defines it (its pretrained weights load unchanged); information flows
from the backbone into the branch only. For backbone stage features f_0..f_{n-1} at reductions
r_0..r_{n-1} (timm's ``feature_info``)::

    h_0 = fuse_0(f_0)                            # 1x1 conv + BN + ReLU down to the branch width w_0
    c_k = cell_k(h_{k-1})                        # stride r_k / r_{k-1}, k = 1..n-1
    h_k = fuse_k(cat[f_k, c_k])                  # k = 1..n-2
    features = cat[backbone final map, c_{n-1}]  # joined before the head

A stride of 4 or more is a chain of stride-2 cells. The head pools the backbone part with the backbone's own head
(``pre_logits``: its pooling and, e.g. for ConvNeXt, its norm) and the cell part with the same global
pool, concatenates them and applies dropout and a fresh ``fc``. This is the reference MGN_PTL
topology of the paper (method.md) generalised to any staged CNN, with one change by default: the branch
starts from the backbone's first stage (the stem, a pretrained function of the image) instead of cells
on the raw image. No cell then runs at the first stage's resolution, where the gates' element-wise
passes made the branch cost up to 1.2x the backbone's inference time (MobileNetV2, CPU).
``image_cells=True`` restores the paper's cells on the image: ``c_0 = cell_0(image)`` at stride r_0 and
``h_0 = fuse_0(cat[f_0, c_0])``.
"""
import difflib
import logging
import re
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import timm
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, SelectAdaptivePool2d, make_divisible
from timm.models._features import feature_take_indices
from torch import nn

from .bconv_cell import DEFAULT_STATE_MODE, BConvCell, StateMode, bconv_cells, stride_chain

__all__ = ['PTLNet', 'StageFuse', 'DEFAULT_WIDTH_MULT', 'resolve_cell_widths', 'check_model_name']

_logger = logging.getLogger(__name__)

# Cell width = backbone stage width x 1/8 (rounded to 8): ResNet-50 gets 8/32/64/128/256.
DEFAULT_WIDTH_MULT = 0.125


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


def check_model_name(name: str) -> None:
    """Raise a ValueError naming close matches when timm does not know the model ``name``."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        hint = f' Close matches: {", ".join(close)}.' if close else ''
        raise ValueError(f'Unknown timm backbone {name!r}.{hint} See timm.list_models() for every name.')


def _prefix_pattern(pattern: str, prefix: str) -> str:
    """Anchor a timm group_matcher regex (whose alternatives may start with '^') under ``prefix``."""
    unanchored = re.sub(r'(^|[|(])\^', r'\1', pattern)
    return rf'^{re.escape(prefix)}(?:{unanchored})'


class StageFuse(nn.Module):
    """Fuse of a backbone stage map and the cell output beside it: ReLU(BN(conv1x1(cat[f, c]))).

    The 1x1 conv of the concatenation is computed as the sum of one conv per part: the same function
    without materialising the concatenated copy of the (large) backbone map. With ``cell_chs=0`` it only
    projects f (the entry of the branch at a stage without a cell).
    Shapes: f (B, feat_chs, H, W), c (B, cell_chs, H, W) -> (B, out_chs, H, W).
    """

    def __init__(self, feat_chs: int, cell_chs: int, out_chs: int):
        super().__init__()
        # no conv bias: the BN that follows cancels it (the reference code had one)
        self.feat_conv = nn.Conv2d(feat_chs, out_chs, 1, bias=False)
        self.cell_conv = nn.Conv2d(cell_chs, out_chs, 1, bias=False) if cell_chs else None
        self.bn = BatchNormAct2d(out_chs)

    def forward(self, f: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.feat_conv(f)
        if self.cell_conv is not None:
            x = x + self.cell_conv(c)
        return self.bn(x)


class PTLNet(nn.Module):
    """Progressive Transfer Learning model around a timm backbone.

    Args:
        backbone: timm model name (created without weights; load them with ``pretrained=True``).
        num_classes: classes of the final ``fc`` (0: no classifier, ``forward`` gives pooled features).
        in_chans: image channels.
        global_pool: global pooling of the head, for the backbone part and the cell part alike.
        drop_rate: dropout before ``fc``.
        width_mult: cell width per stage as a fraction of the backbone stage's channels.
        cell_widths: explicit branch width w_k of every backbone stage (overrides ``width_mult``).
        image_cells: start the ladder with cells on the image as the paper did, instead of on f_0.
        cell_norm: batch-normalise the last cell's map before it joins the backbone's final features.
        state_mode: latent state rule of every cell, see :class:`BConvCell`.
        state_slots: slots of the ``'carried'`` state.
        img_size: nominal input size; the cells store their state at the grid it gives
            (default: the backbone's pretrained input size).
        kernel_size: kernel of the cells' gate convolutions.
        **backbone_kwargs: passed to the backbone (``drop_path_rate``, ``bn_eps``, ...).

    Shapes: ``forward_features`` (B, in_chans, H, W) -> (B, backbone.num_features + w_last, H/32, W/32);
    ``forward`` -> (B, num_classes).
    """

    def __init__(
            self,
            backbone: str,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            width_mult: float = DEFAULT_WIDTH_MULT,
            cell_widths: Optional[Sequence[int]] = None,
            state_mode: StateMode = DEFAULT_STATE_MODE,
            state_slots: int = 32,
            img_size: Optional[Union[int, Tuple[int, int]]] = None,
            kernel_size: int = 3,
            image_cells: bool = False,
            cell_norm: bool = False,
            **backbone_kwargs: Any,
    ):
        super().__init__()
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.state_mode = state_mode
        check_model_name(backbone)
        self.backbone = timm.create_model(
            backbone, pretrained=False, num_classes=0, in_chans=in_chans, global_pool=global_pool, **backbone_kwargs)
        self._check_backbone()
        stage_info = self.backbone.feature_info
        stage_chs = [info['num_chs'] for info in stage_info]
        reductions = [info['reduction'] for info in stage_info]
        self.image_cells = image_cells
        self.first_cell_stage = first = 0 if image_cells else 1
        if len(stage_chs) < 2:
            raise ValueError(f'{backbone} reports {len(stage_chs)} stage(s); PTL needs at least two.')
        self.cell_widths = resolve_cell_widths(stage_chs, width_mult, cell_widths)
        if img_size is None:
            img_size = self.backbone.pretrained_cfg.get('input_size', (in_chans, 224, 224))[-2:]
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)

        cell_args = dict(kernel_size=kernel_size, state_mode=state_mode, state_slots=state_slots)
        self.cells = nn.ModuleList()
        self.fuses = nn.ModuleList()
        in_chs, prev_reduction = (in_chans, 1) if image_cells else (self.cell_widths[0], reductions[0])
        grid = tuple(-(-s // prev_reduction) for s in self.img_size)
        if not image_cells:
            self.fuses.append(StageFuse(stage_chs[0], 0, self.cell_widths[0]))
        for k in range(first, len(stage_chs)):
            width = self.cell_widths[k]
            if reductions[k] % prev_reduction:
                raise ValueError(
                    f'{backbone}: stage {k} reduction {reductions[k]} is not a multiple of {prev_reduction}; '
                    'PTL needs stages that downsample by powers of two.')
            chain = []
            for stride in stride_chain(reductions[k] // prev_reduction):
                grid = (-(-grid[0] // stride), -(-grid[1] // stride))
                chain.append(BConvCell(in_chs, width, stride=stride, state_size=grid, **cell_args))
                in_chs = width
            self.cells.append(nn.Sequential(*chain))
            if k < len(stage_chs) - 1:
                self.fuses.append(StageFuse(stage_chs[k], width, width))
            prev_reduction = reductions[k]

        self.num_stages = len(stage_chs)
        widths = [0] * first + self.cell_widths[first:]
        self.feature_info = [
            dict(num_chs=chs + width, reduction=reduction, module=f'backbone.{info["module"]}')
            for chs, width, reduction, info in zip(stage_chs, widths, reductions, stage_info)
        ]
        self.backbone_features = self.backbone.num_features
        self.num_features = self.backbone_features + self.cell_widths[-1]
        self.global_pool = global_pool
        # Unnormalised, the pooled cell features vary 10 to 70x less across images than the backbone's (before
        # and after fine-tuning, benchmarks/results/cell_scale.md) and the classifier ignores them; the paper's
        # MGN head has a BN after the join. Optional: it measured worse on validation (README, Benchmarks).
        self.cell_norm = nn.BatchNorm2d(self.cell_widths[-1]) if cell_norm else nn.Identity()
        self.cell_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.head_hidden_size = self._pooled_width()
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    @torch.no_grad()
    def _check_backbone(self) -> None:
        """Fail early, naming the reason, for a backbone whose features cannot feed the ladder."""
        name, bb = self.backbone_name, self.backbone
        if not hasattr(bb, 'forward_intermediates') or not getattr(bb, 'feature_info', None):
            raise ValueError(
                f'{name} does not report stage features (feature_info + forward_intermediates); '
                'PTL needs a timm CNN with stages.')
        size = (2 * max(info['reduction'] for info in bb.feature_info),) * 2
        if bb.pretrained_cfg.get('fixed_input_size'):
            size = tuple(bb.pretrained_cfg['input_size'][-2:])
        was_training = bb.training
        bb.eval()
        try:
            final, feats = bb.forward_intermediates(torch.zeros(1, self.in_chans, *size))
        except Exception as e:
            raise ValueError(f'{name} cannot run on a {size} input ({e}); PTL needs a CNN '
                             'without a fixed input size.') from e
        finally:
            bb.train(was_training)
        if final.ndim != 4 or final.shape[1] != bb.num_features:
            raise ValueError(
                f'{name} gives final features of shape {tuple(final.shape)}, not an NCHW map of '
                f'{bb.num_features} channels (a token or channels-last model); PTL supports CNNs only.')
        for info, feat in zip(bb.feature_info, feats):
            if feat.ndim != 4 or feat.shape[1] != info['num_chs']:
                raise ValueError(f'{name} stage {info["module"]} gives {tuple(feat.shape)}, not an NCHW map '
                                 f'of {info["num_chs"]} channels; PTL supports CNNs only.')

    @torch.no_grad()
    def _pooled_width(self) -> int:
        """Width of the head's pooled features, read off the backbone head and the cell pool."""
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            pooled = self.backbone.forward_head(torch.zeros(1, self.backbone_features, 2, 2), pre_logits=True)
        finally:
            self.backbone.train(was_training)
        return pooled.shape[1] + self.cell_widths[-1] * self.cell_pool.feat_mult()

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
    def state_frozen(self) -> bool:
        return all(bool(cell.state_frozen) for cell in bconv_cells(self))

    # --- timm model interface -------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Backbone groups as the backbone defines them; the PTL branch and both heads form the last group,
        so fresh layers keep the full learning rate under ``--layer-decay``."""
        matcher: Dict[str, Any] = {}
        for group, spec in self.backbone.group_matcher(coarse=coarse).items():
            if isinstance(spec, (list, tuple)):
                matcher[group] = [(_prefix_pattern(p, 'backbone.'), suffix) for p, suffix in spec]
            elif spec is not None:
                matcher[group] = _prefix_pattern(spec, 'backbone.')
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
        """Checkpoint the backbone only: re-running a cell in backward would write its state twice."""
        self.backbone.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        skip = getattr(self.backbone, 'no_weight_decay', lambda: set())()
        return {f'backbone.{n}' for n in skip}

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
            self.backbone.reset_classifier(0, global_pool)
            self.cell_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
            self.head_hidden_size = self._pooled_width()
        self.fc = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f'{type(self).__name__}({self.backbone_name}) expects (B, {self.in_chans}, H, W) images, got shape '
                f'{tuple(x.shape)}. Create the model with in_chans={x.shape[1] if x.ndim == 4 else "..."} '
                'or convert the images.')

    def _ladder(self, x: torch.Tensor, feats: List[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        """Cell output c_k (B, w_k, H_k, W_k) of every stage given its features (None: no cell there)."""
        first = self.first_cell_stage
        outs: List[Optional[torch.Tensor]] = []
        h = x
        for k, feat in enumerate(feats):
            c = self.cells[k - first](h) if k >= first else None
            if c is not None and c.shape[-2:] != feat.shape[-2:]:  # odd sizes: padding rules differ by a pixel
                c = F.interpolate(c, size=feat.shape[-2:], mode='bilinear', align_corners=False)
            outs.append(c)
            if k < len(self.fuses):
                h = self.fuses[k](feat, c)
        return outs

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
        self._check_input(x)
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        upto = list(range(max_index + 1)) if (stop_early or intermediates_only) else None
        final, feats = self.backbone.forward_intermediates(
            x, indices=upto, norm=norm, stop_early=upto is not None, intermediates_only=False)
        outs = self._ladder(x, feats)
        intermediates = [feats[k] if outs[k] is None else torch.cat([feats[k], outs[k]], dim=1) for k in take_indices]
        if intermediates_only:
            return intermediates
        if len(outs) == self.num_stages:
            final = self._join(final, outs[-1])
        return final, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (backbone and ladder) after the last of ``indices``, and the head."""
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        self.backbone.prune_intermediate_layers(take_indices, prune_norm=prune_norm, prune_head=prune_head)
        self.cells = self.cells[:max(max_index + 1 - self.first_cell_stage, 0)]
        self.fuses = self.fuses[:max_index]
        self.num_stages = max_index + 1
        if prune_head:
            self.cell_pool = nn.Identity()
            self.head_drop = nn.Identity()
            self.fc = nn.Identity()
        return take_indices

    def _join(self, final: torch.Tensor, cell_out: torch.Tensor) -> torch.Tensor:
        cell_out = self.cell_norm(cell_out)
        if cell_out.shape[-2:] != final.shape[-2:]:
            cell_out = F.interpolate(cell_out, size=final.shape[-2:], mode='bilinear', align_corners=False)
        return torch.cat([final, cell_out], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        final, feats = self.backbone.forward_intermediates(x)
        return self._join(final, self._ladder(x, feats)[-1])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        backbone_part, cell_part = x.split([self.backbone_features, x.shape[1] - self.backbone_features], dim=1)
        x = torch.cat([
            self.backbone.forward_head(backbone_part, pre_logits=True),
            self.cell_pool(cell_part),
        ], dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
