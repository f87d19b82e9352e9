"""Retrieval evaluation for person re-identification: CMC, mAP and mINP, optionally after re-ranking.

The standard protocol (Market-1501, DukeMTMC-reID, MSMT17; as in torchreid and fast-reid): for each
query, gallery images of the same identity taken by the same camera are removed, and gallery images
with identity ``-1`` (junk) are removed for every query; distractors (identity ``0`` in Market-1501)
stay, as negatives. Queries left with no true match are skipped (their count is reported).

Everything works on query chunks, so the memory is ``chunk_size x num_gallery`` whatever the number
of queries, and no (Q, G) matrix is ever built (:func:`~ptl_timm.reid.distance.pairwise_distance` builds one).
Ties in distance rank the gallery images in their given order (stable sort).
"""
import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from ..data.reid import JUNK_PID
from .distance import ArrayLike, Metric, as_features, as_labels, as_tensor, default_chunk_size, distance_block, prepare
from .rerank import re_ranking_blocks

__all__ = ['RetrievalResult', 'evaluate_rankings', 'evaluate']


@dataclass
class RetrievalResult:
    """Averages over the valid queries (fractions in [0, 1]).

    ``cmc[k - 1]`` is rank-k accuracy; ``num_valid`` queries had at least one true match left after
    the exclusions, ``num_queries - num_valid`` were skipped.
    """
    mAP: float
    mINP: float
    cmc: np.ndarray
    num_valid: int
    num_queries: int

    @property
    def rank1(self) -> float:
        return float(self.cmc[0])

    def rank(self, k: int) -> float:
        """Rank-k accuracy (CMC at k)."""
        if not 1 <= k <= len(self.cmc):
            raise ValueError(f'rank k must be in 1..{len(self.cmc)} (max_rank of the evaluation), got {k}.')
        return float(self.cmc[k - 1])

    def summary(self, ranks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
        """Percentages: mAP, mINP and the requested CMC ranks."""
        out = dict(mAP=100 * self.mAP, mINP=100 * self.mINP)
        out.update({f'rank{k}': 100 * self.rank(k) for k in ranks if k <= len(self.cmc)})
        return out


class _Accumulator:
    def __init__(self, max_rank: int):
        self.max_rank = max_rank
        self.ap_sum = 0.0
        self.inp_sum = 0.0
        self.cmc_sum = torch.zeros(max_rank, dtype=torch.float64)
        self.num_valid = 0
        self.num_queries = 0

    def add(self, order: torch.Tensor, q_pids: torch.Tensor, q_cams: torch.Tensor,
            g_pids: torch.Tensor, g_cams: torch.Tensor) -> None:
        """Score one chunk of queries from their gallery order (Qc, G), best match first."""
        pids = g_pids[order]
        match = pids == q_pids[:, None]
        keep = ~(match & (g_cams[order] == q_cams[:, None])) & (pids != JUNK_PID)
        match &= keep
        valid_rank = keep.cumsum(1)  # 1-based rank among the kept gallery images
        num_rel = match.sum(1)
        ok = num_rel > 0
        self.num_queries += len(order)
        if not ok.any():
            return
        match, valid_rank, num_rel = match[ok], valid_rank[ok].double(), num_rel[ok].double()
        hits = match.cumsum(1).double()
        precision = torch.where(match, hits / valid_rank.clamp(min=1), 0.0)
        self.ap_sum += float(precision.sum(1).div(num_rel).sum())
        first = torch.where(match, valid_rank, math.inf).amin(1)
        last = torch.where(match, valid_rank, 0.0).amax(1)
        self.inp_sum += float((num_rel / last).sum())
        ks = torch.arange(1, self.max_rank + 1, dtype=torch.float64)
        self.cmc_sum += (first[:, None] <= ks).double().sum(0)
        self.num_valid += int(ok.sum())

    def result(self) -> RetrievalResult:
        if self.num_valid == 0:
            raise ValueError(
                'No query has a true match in the gallery once same-identity-same-camera images are removed: '
                'check that query and gallery share identities and that camera ids are right.')
        n = self.num_valid
        return RetrievalResult(mAP=self.ap_sum / n, mINP=self.inp_sum / n, cmc=(self.cmc_sum / n).numpy(),
                               num_valid=n, num_queries=self.num_queries)


def _check_max_rank(max_rank: int, num_gallery: int) -> int:
    if max_rank < 1:
        raise ValueError(f'max_rank must be >= 1, got {max_rank}.')
    return min(max_rank, num_gallery)


def evaluate_rankings(
        distmat: ArrayLike,
        q_pids: ArrayLike,
        g_pids: ArrayLike,
        q_camids: ArrayLike,
        g_camids: ArrayLike,
        max_rank: int = 50,
        chunk_size: Optional[int] = None,
) -> RetrievalResult:
    """CMC, mAP and mINP from a given (Q, G) distance matrix (smaller = more similar)."""
    dist = as_tensor(distmat, torch.float64, 'distmat')
    if dist.ndim != 2:
        raise ValueError(f'distmat must be (num_query, num_gallery), got shape {tuple(dist.shape)}.')
    nq, ng = dist.shape
    q_pids, q_cams = as_labels(q_pids, nq, 'q_pids'), as_labels(q_camids, nq, 'q_camids')
    g_pids, g_cams = as_labels(g_pids, ng, 'g_pids'), as_labels(g_camids, ng, 'g_camids')
    acc = _Accumulator(_check_max_rank(max_rank, ng))
    chunk_size = chunk_size or default_chunk_size(ng)
    for s in range(0, nq, chunk_size):
        order = torch.sort(dist[s:s + chunk_size], dim=1, stable=True).indices
        acc.add(order, q_pids[s:s + chunk_size], q_cams[s:s + chunk_size], g_pids, g_cams)
    return acc.result()


def evaluate(
        query_features: ArrayLike,
        gallery_features: ArrayLike,
        q_pids: ArrayLike,
        g_pids: ArrayLike,
        q_camids: ArrayLike,
        g_camids: ArrayLike,
        metric: Metric = 'cosine',
        rerank: bool = False,
        max_rank: int = 50,
        chunk_size: Optional[int] = None,
        k1: int = 20,
        k2: int = 6,
        lambda_value: float = 0.3,
) -> RetrievalResult:
    """Standard ReID evaluation of query features against gallery features, chunk by chunk.

    Args:
        query_features: (Q, D) embeddings.
        gallery_features: (G, D) embeddings.
        q_pids, g_pids: identities (gallery ``-1`` = junk, ignored).
        q_camids, g_camids: camera ids (same identity + same camera = excluded).
        metric: ``'cosine'`` (1 - cosine similarity) or ``'euclidean'``.
        rerank: apply k-reciprocal re-ranking (Zhong et al., CVPR 2017) with ``k1``, ``k2``, ``lambda_value``.
        max_rank: length of the returned CMC curve (capped at G).
        chunk_size: queries per block (default: about 4M distances per block).
    """
    qf, gf = as_features(query_features, 'query_features'), as_features(gallery_features, 'gallery_features')
    if qf.shape[1] != gf.shape[1]:
        raise ValueError(f'Query features have {qf.shape[1]} dims, gallery features {gf.shape[1]}: '
                         'extract both with the same model.')
    nq, ng = len(qf), len(gf)
    q_pids, q_cams = as_labels(q_pids, nq, 'q_pids'), as_labels(q_camids, nq, 'q_camids')
    g_pids, g_cams = as_labels(g_pids, ng, 'g_pids'), as_labels(g_camids, ng, 'g_camids')
    acc = _Accumulator(_check_max_rank(max_rank, ng))
    if rerank:
        blocks = re_ranking_blocks(qf, gf, metric, k1, k2, lambda_value, chunk_size)
    else:
        q, g = prepare(qf, metric), prepare(gf, metric)
        chunk_size = chunk_size or default_chunk_size(ng)
        blocks = ((s, distance_block(q[s:s + chunk_size], g, metric)) for s in range(0, nq, chunk_size))
    for s, dist in blocks:
        order = torch.sort(dist, dim=1, stable=True).indices
        e = s + len(dist)
        acc.add(order, q_pids[s:e], q_cams[s:e], g_pids, g_cams)
    return acc.result()

