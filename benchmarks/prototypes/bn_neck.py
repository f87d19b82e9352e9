"""Prototype: BatchNorm1d on the pooled [backbone, cells] features before the classifier (the "BNNeck" of
ReID practice). Measured (benchmarks/results/cell_scale.md): the pooled cell features vary 14 to 28 times less
across images than the backbone's and the trained classifier ignores them. Normalising each pooled feature puts
both on one scale. The head changes, so the control gets the same head
(``--variants shared,control``) and the cells are judged against that.

    python benchmarks/prototypes/bn_neck.py --variants shared,control   # -> results/prototypes/bn_neck.{json,md}
"""
import types
from typing import List

import torch
from torch import nn


def _forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    backbone_part, cell_part = x.split([self.backbone_features, x.shape[1] - self.backbone_features], dim=1)
    x = torch.cat([self.backbone.forward_head(backbone_part, pre_logits=True), self.cell_pool(cell_part)], dim=1)
    x = self.head_drop(self.neck(x))
    return x if pre_logits else self.fc(x)


def modify(model: nn.Module) -> List[nn.Parameter]:
    model.neck = nn.BatchNorm1d(model.head_hidden_size)
    model.forward_head = types.MethodType(_forward_head, model)
    return list(model.neck.parameters())


if __name__ == '__main__':
    from _run import run_prototype

    run_prototype('bn_neck', modify)
