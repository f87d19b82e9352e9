"""Retrieval evaluation for person re-identification: CMC, mAP, mINP and k-reciprocal re-ranking.

The standard protocol (Market-1501, DukeMTMC-reID, MSMT17; as in torchreid and fast-reid): for each
query, gallery images of the same identity taken by the same camera are removed, and gallery images
with identity ``-1`` (junk) are removed for every query; distractors (identity ``0`` in Market-1501)
stay, as negatives. Queries left with no true match are skipped (their count is reported).

Everything works on query chunks, so the memory is ``chunk_size x num_gallery`` whatever the number
of queries, and no (Q, G) matrix is ever built unless asked for (:func:`pairwise_distance`).
Ties in distance rank the gallery images in their given order (stable sort).
"""
import math
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    'Metric', 'JUNK_PID', 'RetrievalResult', 'pairwise_distance', 'evaluate_rankings', 'evaluate',
    're_ranking', 'default_chunk_size',
]

Metric = Literal['cosine', 'euclidean']
ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]

# Gallery images with this identity are ignored for every query (Market-1501's "-1" junk).
JUNK_PID = -1

# Elements of one (chunk, gallery) block: 2^22, so a block and its temporaries stay around 200 MB.
_BLOCK_ELEMENTS = 1 << 22


def default_chunk_size(num_columns: int) -> int:
    """Rows per chunk so that a (rows, num_columns) block holds about 4M elements."""
    return max(1, _BLOCK_ELEMENTS // max(1, num_columns))


def _as_tensor(x: ArrayLike, dtype: torch.dtype, name: str) -> torch.Tensor:
    try:
        t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f'{name} must be a numeric array or tensor ({e}).') from e
    if t.is_complex():
        raise TypeError(f'{name} must be real numbers, got dtype {t.dtype}.')
    return t.detach().cpu().to(dtype)


def _features(x: ArrayLike, name: str) -> torch.Tensor:
    t = _as_tensor(x, torch.float32, name)
    if t.ndim != 2:
        raise ValueError(f'{name} must be a (N, D) feature matrix, got shape {tuple(t.shape)}.')
    if not torch.isfinite(t).all():
        raise ValueError(f'{name} holds NaN or inf values; check the model output.')
    return t


def _labels(x: ArrayLike, n: int, name: str) -> torch.Tensor:
    t = _as_tensor(x, torch.int64, name).reshape(-1)
    if t.numel() != n:
        raise ValueError(f'{name} has {t.numel()} entries for {n} features: one per image is needed.')
    return t


def _prepare(x: torch.Tensor, metric: Metric) -> torch.Tensor:
    if metric == 'cosine':
        return F.normalize(x, dim=1)
    if metric == 'euclidean':
        return x
    raise ValueError(f"Unknown metric {metric!r}; choose 'cosine' or 'euclidean'.")


def _distance_block(q: torch.Tensor, g: torch.Tensor, metric: Metric) -> torch.Tensor:
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
    q = _prepare(_features(query, 'query'), metric)
    g = _prepare(_features(gallery, 'gallery'), metric)
    return _distance_block(q, g, metric)


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

    def to_dict(self) -> Dict[str, object]:
        d = asdict(self)
        d['cmc'] = self.cmc.tolist()
        return d


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
    dist = _as_tensor(distmat, torch.float64, 'distmat')
    if dist.ndim != 2:
        raise ValueError(f'distmat must be (num_query, num_gallery), got shape {tuple(dist.shape)}.')
    nq, ng = dist.shape
    q_pids, q_cams = _labels(q_pids, nq, 'q_pids'), _labels(q_camids, nq, 'q_camids')
    g_pids, g_cams = _labels(g_pids, ng, 'g_pids'), _labels(g_camids, ng, 'g_camids')
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
    qf, gf = _features(query_features, 'query_features'), _features(gallery_features, 'gallery_features')
    if qf.shape[1] != gf.shape[1]:
        raise ValueError(f'Query features have {qf.shape[1]} dims, gallery features {gf.shape[1]}: '
                         'extract both with the same model.')
    nq, ng = len(qf), len(gf)
    q_pids, q_cams = _labels(q_pids, nq, 'q_pids'), _labels(q_camids, nq, 'q_camids')
    g_pids, g_cams = _labels(g_pids, ng, 'g_pids'), _labels(g_camids, ng, 'g_camids')
    acc = _Accumulator(_check_max_rank(max_rank, ng))
    if rerank:
        blocks = _re_ranking_blocks(qf, gf, metric, k1, k2, lambda_value, chunk_size)
    else:
        q, g = _prepare(qf, metric), _prepare(gf, metric)
        chunk_size = chunk_size or default_chunk_size(ng)
        blocks = ((s, _distance_block(q[s:s + chunk_size], g, metric)) for s in range(0, nq, chunk_size))
    for s, dist in blocks:
        order = torch.sort(dist, dim=1, stable=True).indices
        e = s + len(dist)
        acc.add(order, q_pids[s:e], q_cams[s:e], g_pids, g_cams)
    return acc.result()


# --- k-reciprocal re-ranking ------------------------------------------------------------------------------
def _top_neighbours(x: torch.Tensor, metric: Metric, k: int, chunk_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices (N, k) of each row's k nearest rows (itself included) and each row's largest squared distance."""
    n = len(x)
    nn_idx = torch.empty(n, k, dtype=torch.int64)
    row_max = torch.empty(n, dtype=torch.float64)
    for s in range(0, n, chunk_size):
        d = _distance_block(x[s:s + chunk_size], x, metric).double().pow_(2)
        row_max[s:s + chunk_size] = d.amax(1)
        # sort, not topk: a stable order makes ties deterministic
        nn_idx[s:s + chunk_size] = torch.sort(d, dim=1, stable=True).indices[:, :k]
    return nn_idx, row_max


def _pair_dist2(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, metric: Metric) -> torch.Tensor:
    """Squared distances between x[rows] and x[cols], elementwise, in pair chunks (the gathered rows of
    millions of pairs would not fit in memory)."""
    out = torch.empty(len(rows), dtype=torch.float64)
    step = default_chunk_size(x.shape[1])
    for s in range(0, len(rows), step):
        a, b = x[rows[s:s + step]].double(), x[cols[s:s + step]].double()
        if metric == 'cosine':
            out[s:s + step] = (1.0 - (a * b).sum(-1)).clamp(min=0.0).pow(2)
        else:
            out[s:s + step] = (a - b).pow(2).sum(-1)
    return out


def _reciprocal(nn_idx: torch.Tensor, rows: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """k nearest (+ itself) of each of ``rows`` (R, k') and the mask of the k-reciprocal ones: j is among i's
    k nearest and i among j's."""
    fwd = nn_idx[rows, :k + 1]
    back = nn_idx[fwd][..., :k + 1]
    return fwd, (back == rows[:, None, None]).any(-1)


def _encode_rows(
        x: torch.Tensor, nn_idx: torch.Tensor, row_max: torch.Tensor, metric: Metric, k1: int, chunk_size: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse rows V_i of the k-reciprocal encoding as COO arrays (row, col, value), vectorised by row chunks.

    The set of i is R(i, k1) expanded by every R(c, k1/2), c in R(i, k1), that shares more than 2/3 of its
    members with R(i, k1); V_i weighs its members by exp(-d(i, j)), normalised to sum 1.
    """
    n = len(x)
    half_fwd, half_mask = _reciprocal(nn_idx, torch.arange(n), int(round(k1 / 2)))
    # rows per chunk: the membership test below holds chunk * k'^2 * k'/2 booleans
    step = max(1, _BLOCK_ELEMENTS // (nn_idx.shape[1] ** 2 * half_fwd.shape[1]))
    keys = []
    for s in range(0, n, step):
        rows = torch.arange(s, min(n, s + step))
        fwd, mask = _reciprocal(nn_idx, rows, k1)                    # R(i): (c, K)
        cand, cand_mask = half_fwd[fwd], half_mask[fwd]                # R(c, k1/2) of each neighbour: (c, K, H)
        shared = ((cand[..., None] == fwd[:, None, None, :]) & mask[:, None, None, :]).any(-1) & cand_mask
        take = mask & (shared.sum(-1) > 2.0 / 3.0 * cand_mask.sum(-1))
        owner = rows[:, None].expand_as(fwd)
        extra = take[..., None] & cand_mask
        keys.append(torch.cat([owner[mask] * n + fwd[mask],
                               owner[:, :, None].expand_as(cand)[extra] * n + cand[extra]]))
    keys = torch.unique(torch.cat(keys))
    rows_t, cols_t = keys // n, keys % n
    w = torch.exp(-_pair_dist2(x, rows_t, cols_t, metric) / row_max[rows_t])
    w = w / torch.zeros(n, dtype=torch.float64).index_add_(0, rows_t, w)[rows_t]
    return rows_t, cols_t, w


def _coalesce(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, n: int) -> Tuple[torch.Tensor, ...]:
    """Sum duplicate (row, col) entries of an (n, n) sparse matrix; entries come out sorted by row, then col."""
    keys, inverse = torch.unique(rows * n + cols, return_inverse=True)
    summed = torch.zeros(len(keys), dtype=vals.dtype).index_add_(0, inverse, vals)
    return keys // n, keys % n, summed


def _pointers(sorted_rows: torch.Tensor, n: int) -> torch.Tensor:
    """CSR row pointers (n + 1,) of entries sorted by row."""
    ptr = torch.zeros(n + 1, dtype=torch.int64)
    ptr[1:] = torch.bincount(sorted_rows, minlength=n).cumsum(0)
    return ptr


def _gather_ranges(ptr: torch.Tensor, which: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Positions of the entries of rows ``which`` (concatenated) and each row's entry count."""
    starts, lengths = ptr[which], ptr[which + 1] - ptr[which]
    offsets = torch.repeat_interleave(starts - torch.cumsum(lengths, 0) + lengths, lengths)
    return offsets + torch.arange(int(lengths.sum())), lengths


def _re_ranking_blocks(
        qf: torch.Tensor, gf: torch.Tensor, metric: Metric, k1: int, k2: int, lambda_value: float,
        chunk_size: Optional[int],
) -> Iterator[Tuple[int, torch.Tensor]]:
    """Yield (first query index, re-ranked (chunk, G) distances)."""
    if k1 < 1 or k2 < 1 or not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f'Re-ranking needs k1 >= 1, k2 >= 1 and 0 <= lambda <= 1, got {k1}, {k2}, {lambda_value}.')
    nq = len(qf)
    x = _prepare(torch.cat([qf, gf]), metric)
    n = len(x)
    chunk_size = chunk_size or default_chunk_size(n)
    nn_idx, row_max = _top_neighbours(x, metric, min(n, k1 + 1), chunk_size)
    row_max = row_max.clamp(min=torch.finfo(torch.float64).tiny)
    v_rows, v_cols, v_vals = _encode_rows(x, nn_idx, row_max, metric, k1, chunk_size)
    if k2 > 1:
        # local query expansion: V_i <- mean of V_j over i's k2 nearest neighbours
        kk = min(k2, nn_idx.shape[1])
        pos, lengths = _gather_ranges(_pointers(v_rows, n), nn_idx[:, :kk].reshape(-1))
        owners = torch.arange(n).repeat_interleave(kk).repeat_interleave(lengths)
        v_rows, v_cols, v_vals = _coalesce(owners, v_cols[pos], v_vals[pos] / kk, n)
    row_ptr = _pointers(v_rows, n)
    # inverted index: column c -> the rows holding a non-zero in c, with the values (CSC order)
    c_cols, c_rows, c_vals = _coalesce(v_cols, v_rows, v_vals, n)
    col_ptr = _pointers(c_cols, n)
    g = x[nq:]
    for s in range(0, nq, chunk_size):
        e = min(nq, s + chunk_size)
        original = _distance_block(x[s:e], g, metric).double().pow_(2) / row_max[s:e, None]
        overlap = torch.zeros(e - s, n, dtype=torch.float64)
        for i in range(s, e):
            ks, kv = v_cols[row_ptr[i]:row_ptr[i + 1]], v_vals[row_ptr[i]:row_ptr[i + 1]]
            pos, lengths = _gather_ranges(col_ptr, ks)
            mins = torch.minimum(kv.repeat_interleave(lengths), c_vals[pos])
            overlap[i - s].index_add_(0, c_rows[pos], mins)
        jaccard = 1.0 - overlap[:, nq:] / (2.0 - overlap[:, nq:])
        yield s, (jaccard * (1.0 - lambda_value) + original * lambda_value).float()


def re_ranking(
        query_features: ArrayLike,
        gallery_features: ArrayLike,
        metric: Metric = 'cosine',
        k1: int = 20,
        k2: int = 6,
        lambda_value: float = 0.3,
        chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """k-reciprocal re-ranked (Q, G) distances (Zhong et al., "Re-ranking Person Re-identification with
    k-reciprocal Encoding", CVPR 2017), from features rather than three full distance matrices.

    The base distance is ``metric`` squared and divided by its maximum over each row (queries and gallery
    together), as in the reference algorithm. The k-reciprocal encoding is sparse, so memory grows with
    ``(Q + G) * k1`` plus one (chunk, Q + G) block. For evaluation use ``evaluate(..., rerank=True)``,
    which never holds the (Q, G) result either.
    """
    qf, gf = _features(query_features, 'query_features'), _features(gallery_features, 'gallery_features')
    blocks = list(_re_ranking_blocks(qf, gf, metric, k1, k2, lambda_value, chunk_size))
    return torch.cat([b for _, b in blocks]) if blocks else torch.zeros(0, len(gf))
