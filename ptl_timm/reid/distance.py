"""Distances between ReID features, computed block by block, and the input checks of the evaluation."""
from typing import Literal, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    'Metric', 'ArrayLike', 'BLOCK_ELEMENTS', 'default_chunk_size', 'as_tensor', 'as_features', 'as_labels', 'prepare',
    'distance_block', 'pairwise_distance',
]

Metric = Literal['cosine', 'euclidean']
ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]

# Elements of one (chunk, gallery) block: 2^22, so a block and its temporaries stay around 200 MB.
BLOCK_ELEMENTS = 1 << 22


def default_chunk_size(num_columns: int) -> int:
    """Rows per chunk so that a (rows, num_columns) block holds about 4M elements."""
    return max(1, BLOCK_ELEMENTS // max(1, num_columns))


def as_tensor(x: ArrayLike, dtype: torch.dtype, name: str) -> torch.Tensor:
    """``x`` as a detached CPU tensor of ``dtype``; a TypeError names ``name`` for non-numeric input."""
    try:
        t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f'{name} must be a numeric array or tensor ({e}).') from e
    if t.is_complex():
        raise TypeError(f'{name} must be real numbers, got dtype {t.dtype}.')
    return t.detach().cpu().to(dtype)


def as_features(x: ArrayLike, name: str) -> torch.Tensor:
    """A finite float32 (N, D) feature matrix."""
    t = as_tensor(x, torch.float32, name)
    if t.ndim != 2:
        raise ValueError(f'{name} must be a (N, D) feature matrix, got shape {tuple(t.shape)}.')
    if not torch.isfinite(t).all():
        raise ValueError(f'{name} holds NaN or inf values; check the model output.')
    return t


def as_labels(x: ArrayLike, n: int, name: str) -> torch.Tensor:
    """An int64 vector of ``n`` labels (one per image)."""
    t = as_tensor(x, torch.int64, name).reshape(-1)
    if t.numel() != n:
        raise ValueError(f'{name} has {t.numel()} entries for {n} features: one per image is needed.')
    return t


def prepare(x: torch.Tensor, metric: Metric) -> torch.Tensor:
    """Rows ready for :func:`distance_block`: L2-normalised for the cosine distance."""
    if metric == 'cosine':
        return F.normalize(x, dim=1)
    if metric == 'euclidean':
        return x
    raise ValueError(f"Unknown metric {metric!r}; choose 'cosine' or 'euclidean'.")


def distance_block(q: torch.Tensor, g: torch.Tensor, metric: Metric) -> torch.Tensor:
    """(Q, G) distances between already prepared rows: 1 - cos, or the Euclidean distance."""
    if metric == 'cosine':
        return (1.0 - q @ g.T).clamp_(min=0.0)
    # |q|^2 + |g|^2 - 2 q.g in float64: float32 cancellation would tie or misorder close neighbours
    q64, g64 = q.double(), g.double()
    d2 = q64.pow(2).sum(1, keepdim=True) + g64.pow(2).sum(1) - 2.0 * (q64 @ g64.T)
    return d2.clamp_(min=0.0).sqrt_().float()


def pairwise_distance(query: ArrayLike, gallery: ArrayLike, metric: Metric = 'cosine') -> torch.Tensor:
    """Full (Q, G) distance matrix: ``1 - cosine similarity`` or the Euclidean distance.

    Only for sets that fit in memory; :func:`evaluate` never builds it.
    """
    q = prepare(as_features(query, 'query'), metric)
    g = prepare(as_features(gallery, 'gallery'), metric)
    return distance_block(q, g, metric)
