"""ReID training losses: batch-hard triplet (Hermans et al. 2017) + cross-entropy with label smoothing.

The ReID models of this package created with ``reid_output=True`` return a :class:`ReIDOutput` in train
mode; :class:`ReIDLoss` takes it with the identity targets::

    out = model(images)                     # train mode
    loss = ReIDLoss(margin=1.2)(out, pids)  # mean CE over out.logits + mean triplet over out.features

Cross-batch memories (:mod:`ptl_timm.reid.memory`) add their terms: ``ReIDLoss(memories=[IdentityMemory(...)])``.
"""
from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .memory import memory_input

__all__ = ['ReIDOutput', 'batch_hard_triplet_loss', 'TripletLoss', 'ReIDLoss']


class ReIDOutput(NamedTuple):
    """Train-mode output of the ReID models.

    Attributes:
        logits: identity logits (B, num_classes), one per classifier (MGN has 8, a BNNeck model 1).
        features: (B, D_i) features the triplet loss is applied to (MGN: the 3 global reductions;
            BNNeck: the pooled feature before the BN).
        embedding: (B, D) what eval mode returns for the same input.
    """
    logits: List[torch.Tensor]
    features: List[torch.Tensor]
    embedding: torch.Tensor


def batch_hard_triplet_loss(
        features: torch.Tensor, targets: torch.Tensor, margin: Optional[float] = 0.3, normalize: bool = False,
) -> torch.Tensor:
    """Batch-hard triplet loss: each anchor against its farthest positive and nearest negative.

    Args:
        features: (B, D).
        targets: (B,) identities; the batch needs at least two identities.
        margin: hinge margin; ``None`` uses the soft margin ``log(1 + exp(d_ap - d_an))``.
        normalize: L2-normalise the features first.

    Returns the mean over anchors (a scalar). Euclidean distances, as in the paper.
    """
    if features.ndim != 2 or targets.shape != features.shape[:1]:
        raise ValueError(f'Expected features (B, D) and targets (B,), got {tuple(features.shape)} '
                         f'and {tuple(targets.shape)}.')
    if normalize:
        features = F.normalize(features, dim=1)
    same = targets[:, None] == targets[None, :]
    if same.all():
        raise ValueError('The batch holds a single identity: the triplet loss needs negatives. Sample batches '
                         'with PKBatchSampler (P >= 2 identities).')
    d2 = features.pow(2).sum(1, keepdim=True) + features.pow(2).sum(1) - 2 * features @ features.T
    dist = d2.clamp(min=1e-12).sqrt()  # the clamp keeps the gradient of sqrt finite at 0
    d_ap = dist.masked_fill(~same, float('-inf')).amax(1)
    d_an = dist.masked_fill(same, float('inf')).amin(1)
    if margin is None:
        return F.softplus(d_ap - d_an).mean()
    return F.relu(d_ap - d_an + margin).mean()


class TripletLoss(nn.Module):
    """Module form of :func:`batch_hard_triplet_loss`."""

    def __init__(self, margin: Optional[float] = 0.3, normalize: bool = False):
        super().__init__()
        self.margin = margin
        self.normalize = normalize

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return batch_hard_triplet_loss(features, targets, self.margin, self.normalize)


class ReIDLoss(nn.Module):
    """``ce_weight * mean CE(logits) + triplet_weight * mean triplet(features)`` over a :class:`ReIDOutput`.

    Args:
        margin: triplet margin (the PTL paper: 1.2 for MGN; 0.3 is common for BNNeck models).
        label_smoothing: of the cross-entropy (0.1 in the BNNeck recipe).
        ce_weight, triplet_weight: loss weights (0 disables a term).
        memories: cross-batch memories (:class:`~ptl_timm.reid.memory.IdentityMemory`,
            :class:`~ptl_timm.reid.memory.XBMemory`), each adding its loss on the output field it reads, in this
            order; their state is part of this module's ``state_dict`` (``memories.<i>.``).
    """

    def __init__(self, margin: Optional[float] = 0.3, label_smoothing: float = 0.1, ce_weight: float = 1.0,
                 triplet_weight: float = 1.0, normalize: bool = False, memories: Sequence[nn.Module] = ()):
        super().__init__()
        self.ce = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.triplet = TripletLoss(margin, normalize)
        self.ce_weight = ce_weight
        self.triplet_weight = triplet_weight
        self.memories = nn.ModuleList(memories)

    def forward(self, output: ReIDOutput, targets: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, ReIDOutput):
            raise TypeError(f'ReIDLoss takes the train-mode ReIDOutput of a ReID model, got {type(output).__name__}: '
                            'create the model with reid_output=True (else it gives logits, as timm models do) and '
                            'call model.train().')
        loss = torch.zeros((), device=targets.device)
        if self.ce_weight:
            loss = loss + self.ce_weight * torch.stack([self.ce(lg, targets) for lg in output.logits]).mean()
        if self.triplet_weight:
            loss = loss + self.triplet_weight * torch.stack([self.triplet(f, targets) for f in output.features]).mean()
        for memory in self.memories:
            loss = loss + memory(memory_input(memory, output), targets)
        return loss
