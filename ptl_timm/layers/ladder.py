"""The PTL ladder, written once for PTLNet and MGN: chains of BConv-Cells beside a backbone's stages, the
fuses that feed each stage's map back into the branch, and the size matching between them.

For the stage maps f_1..f_n beside which cells run, starting from a branch input h_0 (the image, a stem
map or a projection of the first stage)::

    c_k = cells_k(h_{k-1})        # a chain of cells whose strides take h_{k-1} to f_k's reduction
    h_k = fuse_k(f_k, c_k)        # where a fuse exists

Every cell stores its latent state at the grid its output has for the model's nominal input size.
"""
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .bconv_cell import BConvCell, stride_chain

__all__ = [
    'StageFuse', 'ConcatFuse', 'StageJoin', 'FuseLayer', 'LadderStage', 'Ladder', 'LadderMixin', 'build_ladder',
    'strided_grid', 'match_size',
]


# The fuses normalise with a plain nn.BatchNorm2d (``bn``) and apply a separate ``act``, not timm's BatchNormAct2d
# (a BatchNorm2d subclass with the activation inside): the BN-swapping utilities of other libraries
# (torch.nn.SyncBatchNorm.convert_sync_batchnorm, the frozen-BN replacements of detection libraries) rebuild any
# BatchNorm2d as a plain BN and would drop an activation held inside it. The state_dict keys are BatchNormAct2d's
# (``bn.*``), so checkpoints written before load unchanged.


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
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)

    def forward(self, f: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.feat_conv(f)
        if self.cell_conv is not None:
            assert c is not None, 'this fuse joins a cell output: pass c'
            x = x + self.cell_conv(c)
        return self.act(self.bn(x))


class ConcatFuse(nn.Module):
    """The same function as :class:`StageFuse` with one conv over the materialised concatenation, as MGN_PTL
    has it: ``conv``, ``bn``, ``act`` as timm's ``ConvNormAct`` names them, so MGN checkpoints keep their keys
    and its initialisation its random numbers. Shapes as :class:`StageFuse`."""

    def __init__(self, feat_chs: int, cell_chs: int, out_chs: int):
        super().__init__()
        self.conv = nn.Conv2d(feat_chs + cell_chs, out_chs, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)

    def forward(self, f: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(torch.cat([f, c], dim=1))))


class StageJoin(nn.Module):
    """A stage's feature map: cat[f, c] of the backbone map and the cell output beside it (f alone where the
    stage has no cell). Parameter-free; a model calls one per stage, so a forward hook on it, or an FX node of
    it, yields exactly the map ``feature_info`` describes.
    Shapes: f (B, C, H, W), c (B, w, H, W) -> (B, C + w, H, W).
    """

    def forward(self, f: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _join_maps(f, c)


@torch.fx.wrap  # one node inside each join even where it passes f through: FX return nodes can name every join
def _join_maps(f: torch.Tensor, c: Optional[torch.Tensor]) -> torch.Tensor:
    return f if c is None else torch.cat([f, c], dim=1)


# (feat_chs, cell_chs, out_chs) -> a module called as fuse(f, c)
FuseLayer = Callable[[int, int, int], nn.Module]


class LadderStage(NamedTuple):
    """A backbone stage with cells beside it: its map's channels and reduction, and the cells' width."""
    feat_chs: int
    reduction: int
    width: int


class Ladder(NamedTuple):
    """What :func:`build_ladder` made: one cell chain per stage, the fuses, and the width and state grid of
    the last cell (where a further cell, e.g. an MGN branch cell, continues)."""
    cells: nn.ModuleList
    fuses: nn.ModuleList
    out_chs: int
    grid: Tuple[int, int]


def strided_grid(size: Tuple[int, int], stride: int) -> Tuple[int, int]:
    """The grid a map of ``size`` has after a stride (or reduction) ``stride``: ceil(size / stride)."""
    return -(-size[0] // stride), -(-size[1] // stride)


@torch.fx.wrap  # a shape test: one call in an FX graph (any tracer), run on real tensors
def match_size(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``x`` resized to ``ref``'s grid where they differ: at odd input sizes the cells' padding and the
    backbone's differ by a pixel."""
    if x.shape[-2] == ref.shape[-2] and x.shape[-1] == ref.shape[-1]:
        return x
    return F.interpolate(x, size=ref.shape[-2:], mode='bilinear', align_corners=False)


def build_ladder(
        stages: Sequence[LadderStage],
        in_chs: int,
        in_reduction: int,
        img_size: Tuple[int, int],
        fuse_layer: FuseLayer,
        fuse_last: bool = True,
        **cell_kwargs: Any,
) -> Ladder:
    """Cell chains and fuses beside ``stages``, for a branch input of ``in_chs`` channels at ``in_reduction``.

    Stage k gets a chain of cells (stride 2 per factor of two between the previous reduction and its own,
    one stride-1 cell when they are equal), storing their state at the grids of the nominal ``img_size``,
    then ``fuse_layer(feat_chs, width, width)`` (the last stage only with ``fuse_last``). Modules are
    created in that order, chain then fuse, stage by stage: it fixes their random initialisation.
    ``cell_kwargs`` go to every :class:`BConvCell` (kernel_size, state_mode, state_slots).
    """
    cells, fuses = nn.ModuleList(), nn.ModuleList()
    prev_reduction = in_reduction
    grid = strided_grid(img_size, in_reduction)
    for k, stage in enumerate(stages):
        if stage.reduction % prev_reduction:
            raise ValueError(f'a stage at reduction {stage.reduction} follows one at {prev_reduction}; PTL needs '
                             'stages that downsample by powers of two.')
        chain = []
        for stride in stride_chain(stage.reduction // prev_reduction):
            grid = strided_grid(grid, stride)
            chain.append(BConvCell(in_chs, stage.width, stride=stride, state_size=grid, **cell_kwargs))
            in_chs = stage.width
        cells.append(nn.Sequential(*chain))
        if fuse_last or k < len(stages) - 1:
            fuses.append(fuse_layer(stage.feat_chs, stage.width, stage.width))
        prev_reduction = stage.reduction
    return Ladder(cells, fuses, in_chs, grid)


class LadderMixin:
    """For a model that holds its ladder as ``self.cells`` and ``self.fuses`` (what :func:`build_ladder` made,
    PTLNet and MGN): runs it, in eager mode and in TorchScript alike."""

    def run_ladder(
            self,
            h: torch.Tensor,
            feats: List[torch.Tensor],
            fuse_offset: int = 0,
    ) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Run the ladder from the branch input ``h`` beside the stage maps ``feats`` (one per cell chain; fewer
        stop it early): ``c_k = cells[k](h)`` on ``feats[k]``'s grid, then ``h = fuses[k + fuse_offset](feats[k],
        c_k)`` where that fuse exists. Returns every c_k (B, w_k, H_k, W_k) and the last h."""
        outs: List[torch.Tensor] = []
        for k, cell in enumerate(self.cells):
            if k < len(feats):
                c = match_size(cell(h), feats[k])
                outs.append(c)
                for j, fuse in enumerate(self.fuses):  # TorchScript indexes a ModuleList by literals only
                    if j == k + fuse_offset:
                        h = fuse(feats[k], c)
        return outs, h
