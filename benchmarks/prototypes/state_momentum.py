"""Prototype: the shared state written as a running average, state = 0.9 * state + 0.1 * batch mean of c_t,
instead of the batch mean alone (the package's rule). Question: does a smoother dataset-level state help?

    python benchmarks/prototypes/state_momentum.py     # -> benchmarks/results/prototypes/state_momentum.{json,md}
"""
import types
from typing import List

import torch
from torch import nn

from ptl_timm import BConvCell, bconv_cells

MOMENTUM = 0.1


@torch.no_grad()
def _running_average_write(cell: BConvCell, c: torch.Tensor) -> None:
    old = cell.state.clone()
    BConvCell._write_state(cell, c)
    cell.state.copy_(old.lerp(cell.state, MOMENTUM))


def modify(model: nn.Module) -> List[nn.Parameter]:
    for cell in bconv_cells(model):
        cell._write_state = types.MethodType(_running_average_write, cell)
    return []


if __name__ == '__main__':
    from _run import run_prototype

    run_prototype('state_momentum', modify)
