"""Cross-batch memories for the ReID loss: dataset-level information collected progressively across batches.

A batch of P identities x K images sees a small fraction of the training identities (Market-1501: 16 of 751).
A memory lets the loss of every batch reach the others:

- :class:`IdentityMemory`: one L2-normalised embedding centroid per training identity, moved towards the batch's
  embeddings with momentum; the loss is a softmax over the cosine similarities to all centroids (the supervised form
  of the identity memories of SpCL and Cluster Contrast).
- :class:`XBMemory`: XBM (Wang et al., CVPR 2020), a FIFO queue of past features used as extra pairs of the
  batch-hard triplet term: pytorch-metric-learning's ``CrossBatchMemory``, kept in a ``state_dict``.

Both are ``nn.Module`` losses that :class:`~ptl_timm.reid.losses.ReIDLoss` adds to its own (``memories=``); each
reads the part of the :class:`~ptl_timm.reid.losses.ReIDOutput` it needs (``source``). Their whole state is in
``state_dict``, so a resumed run continues exactly. Under ``torch.distributed`` every rank computes its loss on its
own batch and then applies the same update from all ranks' batches (gathered in rank order), so the memories of all
ranks stay equal.
"""
from typing import Any, Dict, List, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ['IdentityMemory', 'XBMemory', 'identity_centroids', 'gather_batch', 'MEMORIES']

MEMORIES = ('identity', 'xbm')


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def gather_batch(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Every rank's ``tensors`` (same shapes on all ranks) concatenated in rank order; the tensors themselves
    outside ``torch.distributed``. Detached: what a memory stores carries no gradient."""
    if not _distributed():
        return tuple(t.detach() for t in tensors)
    out = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.detach().contiguous())
        out.append(torch.cat(parts))
    return tuple(out)


@torch.no_grad()
def identity_centroids(embeddings: torch.Tensor, targets: torch.Tensor, num_identities: int) -> torch.Tensor:
    """(num_identities, D) mean L2-normalised embedding of every identity: ``embeddings`` (N, D), ``targets`` (N,)
    in ``0..num_identities-1``. An identity without samples raises (its centroid would be undefined)."""
    counts = torch.bincount(targets, minlength=num_identities)
    if len(counts) > num_identities or not bool((counts > 0).all()):
        raise ValueError(f'Identity centroids need every identity 0..{num_identities - 1} at least once, got counts '
                         f'{counts.tolist()[:20]}...: relabel the training identities 0..N-1 (datasets.relabel).')
    f = F.normalize(embeddings.float(), dim=1)
    sums = torch.zeros(num_identities, f.shape[1], dtype=f.dtype, device=f.device).index_add_(0, targets, f)
    return sums / counts.unsqueeze(1).to(f.dtype)


class IdentityMemory(nn.Module):
    """One L2-normalised embedding centroid per training identity, and a loss against all of them.

    Each batch is contrasted with every identity's centroid (cross-entropy of cosine similarities /
    ``temperature``), not only the P identities it holds; then the centroids of the batch's identities move
    towards the batch's mean normalised embedding: ``c <- normalise(momentum * c + (1 - momentum) * mean)``.
    Under DDP the update uses every rank's batch. Initialise the centroids with :meth:`initialise` (the recipe: the
    mean normalised embedding of every training identity under the initial model, :func:`identity_centroids`);
    until then they are zero and the loss is the uniform cross-entropy.

    Args:
        num_identities: training identities (classifier classes).
        embedding_size: D.
        momentum: share of the old centroid kept at each update.
        temperature: of the softmax over cosine similarities.

    Shapes: embeddings (B, D), targets (B,) -> a scalar loss.
    """
    source = 'embedding'  # the ReIDOutput field it reads: the BNNeck embedding, what retrieval uses

    def __init__(self, num_identities: int, embedding_size: int, momentum: float = 0.2, temperature: float = 0.05):
        super().__init__()
        if not 0 <= momentum < 1 or temperature <= 0:
            raise ValueError(f'Need 0 <= momentum < 1 and temperature > 0, got {momentum} and {temperature}.')
        self.register_buffer('centroids', torch.zeros(num_identities, embedding_size))
        self.momentum = momentum
        self.temperature = temperature

    @torch.no_grad()
    def initialise(self, centroids: torch.Tensor) -> None:
        """Set the centroids (num_identities, D), L2-normalised here."""
        if centroids.shape != self.centroids.shape:
            raise ValueError(f'Expected centroids {tuple(self.centroids.shape)}, got {tuple(centroids.shape)}.')
        self.centroids.copy_(F.normalize(centroids, dim=1))

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        f = F.normalize(embeddings, dim=1)
        # a copy: the update below writes the buffer in place, and autograd needs the values it multiplied
        loss = F.cross_entropy(f @ self.centroids.clone().T / self.temperature, targets)
        self.update(*gather_batch(f, targets))
        return loss

    @torch.no_grad()
    def update(self, f: torch.Tensor, targets: torch.Tensor) -> None:
        """Move the centroids of ``targets`` towards the mean of their normalised embeddings ``f`` (N, D)."""
        ids, inverse = targets.unique(return_inverse=True)
        means = torch.zeros(len(ids), f.shape[1], dtype=f.dtype, device=f.device).index_add_(0, inverse, f)
        means /= torch.bincount(inverse, minlength=len(ids)).unsqueeze(1)
        self.centroids[ids] = F.normalize(self.momentum * self.centroids[ids] + (1 - self.momentum) * means, dim=1)

    def extra_repr(self) -> str:
        n, d = self.centroids.shape
        return f'{n}, {d}, momentum={self.momentum}, temperature={self.temperature}'


def _require_pml() -> Any:
    try:
        import pytorch_metric_learning  # noqa: F401
    except ImportError as e:
        raise ImportError('XBMemory uses pytorch-metric-learning\'s CrossBatchMemory, which is not installed: '
                          'pip install pytorch-metric-learning (or pip install "ptl_timm[reid]").') from e
    from pytorch_metric_learning import distances, losses, miners, reducers
    return distances, losses, miners, reducers


class XBMemory(nn.Module):
    """XBM: the batch-hard triplet term between the batch and a FIFO memory of past features, through
    pytorch-metric-learning's ``CrossBatchMemory`` (with the distance and reduction of this package's triplet term:
    Euclidean, unnormalised, mean over anchors).

    Every call enqueues the batch; the loss counts from call ``start`` on (XBM's warm-up: features drift fastest
    at first; before it the memory fills and the loss is 0). Its state (the queue, its position, the calls so
    far) is in ``state_dict``. Under DDP every rank enqueues all ranks' batches in rank order and scores its own
    batch against that memory.

    Args:
        embedding_size: D of the features.
        memory_size: features held.
        margin: triplet margin.
        start: calls before the loss counts.

    Shapes: features (B, D), targets (B,) -> a scalar loss.
    """
    source = 'features'  # the ReIDOutput field it reads: the pooled feature the triplet term uses

    def __init__(self, embedding_size: int, memory_size: int = 1024, margin: float = 0.3, start: int = 0):
        super().__init__()
        distances, losses, miners, reducers = _require_pml()
        dist_ = distances.LpDistance(normalize_embeddings=False)
        self.xbm = losses.CrossBatchMemory(
            losses.TripletMarginLoss(margin=margin, distance=dist_, reducer=reducers.MeanReducer()),
            embedding_size=embedding_size, memory_size=memory_size, miner=miners.BatchHardMiner(distance=dist_))
        self.start = start
        self.register_buffer('calls', torch.zeros((), dtype=torch.long))

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        active = int(self.calls) >= self.start
        self.calls += 1
        if not _distributed():
            if not active:
                self.xbm.add_to_memory(features.detach(), targets, len(features))
                return features.new_zeros(())
            return self.xbm(features, targets)
        return self._distributed_forward(features, targets, active)

    def _distributed_forward(self, features: torch.Tensor, targets: torch.Tensor, active: bool) -> torch.Tensor:
        # CrossBatchMemory.forward with all ranks' batches enqueued: the own batch's slots are its curr_batch_idx,
        # so its self-comparisons are removed as in one process
        xbm = self.xbm
        all_f, all_t = gather_batch(features, targets)
        xbm.add_to_memory(all_f, all_t, len(all_f))
        if not active:
            return features.new_zeros(())
        rank, b = dist.get_rank(), len(features)
        xbm.curr_batch_idx = xbm.curr_batch_idx[rank * b:(rank + 1) * b]
        e_mem, l_mem = ((xbm.embedding_memory, xbm.label_memory) if xbm.has_been_filled else
                        (xbm.embedding_memory[:xbm.queue_idx], xbm.label_memory[:xbm.queue_idx]))
        indices = xbm.create_indices_tuple(features, targets, e_mem, l_mem, None, True)
        return xbm.loss(features, targets, indices, e_mem, l_mem)

    def get_extra_state(self) -> Dict[str, Any]:
        return dict(queue_idx=int(self.xbm.queue_idx), has_been_filled=bool(self.xbm.has_been_filled))

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self.xbm.queue_idx, self.xbm.has_been_filled = state['queue_idx'], state['has_been_filled']

    def extra_repr(self) -> str:
        return f'{self.xbm.embedding_size}, memory_size={self.xbm.memory_size}, start={self.start}'


def memory_input(memory: nn.Module, output: Any) -> torch.Tensor:
    """The part of a :class:`~ptl_timm.reid.losses.ReIDOutput` ``memory`` reads (its ``source``): the embedding,
    or the first triplet feature."""
    return output.embedding if getattr(memory, 'source', 'embedding') == 'embedding' else output.features[0]


def build_memories(names: List[str], num_identities: int, embedding_size: int, feature_size: int,
                   xbm_size: int = 1024, xbm_start: int = 0, margin: float = 0.3, momentum: float = 0.2,
                   temperature: float = 0.05) -> List[nn.Module]:
    """The memories ``names`` (of :data:`MEMORIES`) with the recipe's settings, in that order."""
    bad = [n for n in names if n not in MEMORIES]
    if bad:
        raise ValueError(f'Unknown memory {bad}; choose from {list(MEMORIES)} (or none).')
    out: List[nn.Module] = []
    for name in names:
        if name == 'identity':
            out.append(IdentityMemory(num_identities, embedding_size, momentum, temperature))
        else:
            out.append(XBMemory(feature_size, xbm_size, margin, start=xbm_start))
    return out
