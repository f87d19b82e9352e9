"""The join of the last cell map with a backbone's final features, in the backbone's own layout.

The cells run on NCHW stage maps (timm's ``forward_intermediates``); a backbone's final features need not be one:

| layout | final features | backbones |
|---|---|---|
| ``NCHW`` | (B, C, H, W) | CNNs, most hybrids |
| ``NHWC`` | (B, H, W, C) | Swin, MambaOut, SAM2's Hiera |
| ``NLC`` | (B, N, C): ``prefix`` class tokens, then the grid in raster order | Hiera, MViTv2, Twins, LeViT, CoaT |
| ``NLC``, no grid | (B, N, C): class tokens only | PiT |
| ``NCL`` | (B, C, N) | EfficientViM |

A backbone whose final features are a list (CoaT's parallel scales, EfficientViM's per-stage states) has the cells
joined to its last element. :class:`FinalJoin` appends the cell map as channels in that layout: at every grid
position its own cell vector; at a class token (which summarises the image) the cell map's mean; at every token
where the tokens are not in raster order (Hiera pruned before its last stage keeps its unrolled order) the mean.
The head splits the channels again, gives the backbone's part to the backbone's own head, and pools the cell part
over its grid.
"""
from typing import Optional, Tuple

import torch
from torch import nn

from ..layers import match_size

__all__ = ['FinalJoin', 'LAYOUTS', 'final_layout']

torch.fx.wrap('match_size')

LAYOUTS = ('NCHW', 'NHWC', 'NLC', 'NCL')


def _shape(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return str(tuple(x.shape))
    if isinstance(x, (list, tuple)):
        return f'a {type(x).__name__} of [{", ".join(_shape(v) for v in x)}]'
    return type(x).__name__


def final_layout(final: object, last_map: torch.Tensor, chs: int, output_fmt: Optional[str] = None
                 ) -> Tuple[str, int, bool, bool]:
    """``(layout, prefix, grid, in_list)`` of a backbone's final features ``final``, given its last stage map
    ``last_map`` (B, C, H, W) and the channels ``chs`` the final features have (the backbone's ``num_features``;
    the last stage's channels for a list). ``prefix``: the tokens before the grid (NLC); ``grid``: whether the
    tokens hold the H x W grid in raster order (PiT's final features are its class tokens only). A ValueError names what
    does not fit."""
    in_list = isinstance(final, (list, tuple))
    t = final[-1] if in_list and len(final) else final
    if not isinstance(t, torch.Tensor):
        raise ValueError(f'final features {_shape(final)} are neither a tensor nor a list of tensors')
    cells = last_map.shape[-2] * last_map.shape[-1]
    if t.ndim == 4 and t.shape[1] == chs and output_fmt != 'NHWC':
        return 'NCHW', 0, True, in_list
    if t.ndim == 4 and t.shape[-1] == chs:
        return 'NHWC', 0, True, in_list
    if t.ndim == 3 and t.shape[-1] == chs:
        tokens = t.shape[1]
        if tokens >= cells and not _shuffled(t, last_map):
            return 'NLC', tokens - cells, True, in_list
        return 'NLC', tokens, False, in_list
    if t.ndim == 3 and t.shape[1] == chs and t.shape[-1] == cells:
        return 'NCL', 0, True, in_list
    raise ValueError(f'final features {_shape(final)} are not laid out as NCHW, NHWC, (B, N, C) tokens or '
                     f'(B, C, N) with {chs} channels and the {tuple(last_map.shape[-2:])} grid of the last stage')


def _shuffled(tokens: torch.Tensor, last_map: torch.Tensor) -> bool:
    """Whether ``tokens`` are the last stage map's own positions in another order than the raster order: Hiera's
    before its last stage (its unrolled order), where no cell vector can be placed by position."""
    grid = last_map.flatten(2).transpose(1, 2)
    return tokens.shape == grid.shape and not torch.allclose(tokens, grid) and \
        torch.allclose(tokens.sort(1).values, grid.sort(1).values)


class FinalJoin(nn.Module):
    """cat[final features, last cell map] along the final features' channel axis, in their own ``layout``.
    Parameter-free (no state_dict keys). Shapes, cell map c (B, w, H, W): NCHW (B, C, H, W) -> (B, C + w, H, W);
    NHWC (B, H, W, C) -> (B, H, W, C + w); NLC (B, prefix + H*W, C) -> (B, prefix + H*W, C + w); NCL (B, C, H*W)
    -> (B, C + w, H*W)."""

    def __init__(self, layout: str = 'NCHW', prefix: int = 0, grid: bool = True):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f'layout must be one of {LAYOUTS}, got {layout!r}.')
        self.layout = layout
        self.prefix = prefix
        self.grid = grid
        self.channel_dim = 1 if layout in ('NCHW', 'NCL') else -1

    def forward(self, final: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        if self.layout == 'NCHW':
            return torch.cat([final, match_size(cell, final)], dim=1)
        if self.layout == 'NHWC':
            return torch.cat([final, match_size(cell, final.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)], dim=-1)
        if self.layout == 'NCL':
            return torch.cat([final, cell.flatten(2)], dim=1)
        tokens = cell.flatten(2).transpose(1, 2)  # (B, H*W, w), raster order
        summary = tokens.mean(1, keepdim=True)
        if self.grid:
            tokens = torch.cat([summary.expand(-1, self.prefix, -1), tokens], dim=1)
        else:
            tokens = summary.expand(-1, self.prefix, -1)
        return torch.cat([final, tokens], dim=-1)

    def split(self, x: torch.Tensor, chs: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The backbone's part (``chs`` channels) and the cell part of joined features."""
        dim = self.channel_dim
        return x.narrow(dim, 0, chs), x.narrow(dim, chs, x.shape[dim] - chs)

    def cell_map(self, cells: torch.Tensor) -> torch.Tensor:
        """The cell part as a (B, w, H, W) map (tokens: (B, w, H*W, 1)) for a 2D pool: its grid only."""
        if self.layout == 'NCHW':
            return cells
        if self.layout == 'NHWC':
            return cells.permute(0, 3, 1, 2)
        if self.layout == 'NCL':
            return cells.unsqueeze(-1)
        if self.grid:
            cells = cells[:, self.prefix:]
        return cells.transpose(1, 2).unsqueeze(-1)

    def extra_repr(self) -> str:
        return f'layout={self.layout}, prefix={self.prefix}, grid={self.grid}'
