"""Prototype: the last cell's map also enters the backbone's final map, final + conv1x1(BN(c)) with the 1x1
conv zero-initialised (the pretrained function is intact at step 0), so the features the classifier relies on
carry the cells. Question: does the classifier then use the cells?

    python benchmarks/prototypes/additive_join.py      # -> benchmarks/results/prototypes/additive_join.{json,md}
"""
import types
from typing import List

import torch
import torch.nn.functional as F
from torch import nn


def _forward_features(self, x: torch.Tensor) -> torch.Tensor:
    final, feats = self.backbone.forward_intermediates(x)
    c = self._ladder(x, feats)[-1]
    if c.shape[-2:] != final.shape[-2:]:
        c = F.interpolate(c, size=final.shape[-2:], mode='bilinear', align_corners=False)
    return torch.cat([final + self.inject(self.inject_norm(c)), c], dim=1)


def modify(model: nn.Module) -> List[nn.Parameter]:
    model.inject_norm = nn.BatchNorm2d(model.cell_widths[-1])
    model.inject = nn.Conv2d(model.cell_widths[-1], model.backbone_features, 1, bias=False)
    nn.init.zeros_(model.inject.weight)
    model.forward_features = types.MethodType(_forward_features, model)
    return list(model.inject_norm.parameters()) + list(model.inject.parameters())


if __name__ == '__main__':
    from _run import run_prototype

    run_prototype('additive_join', modify)
