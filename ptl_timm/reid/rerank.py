"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal Encoding",
CVPR 2017) from features, with a sparse encoding: memory grows with (Q + G) x k1, never (Q + G)^2."""
from typing import Iterator, Optional, Tuple

import torch

from .distance import BLOCK_ELEMENTS, ArrayLike, Metric, as_features, default_chunk_size, distance_block, prepare

__all__ = ['re_ranking', 're_ranking_blocks']


def _top_neighbours(x: torch.Tensor, metric: Metric, k: int, chunk_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices (N, k) of each row's k nearest rows (itself included) and each row's largest squared distance."""
    n = len(x)
    nn_idx = torch.empty(n, k, dtype=torch.int64)
    row_max = torch.empty(n, dtype=torch.float64)
    for s in range(0, n, chunk_size):
        d = distance_block(x[s:s + chunk_size], x, metric).double().pow_(2)
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
    step = max(1, BLOCK_ELEMENTS // (nn_idx.shape[1] ** 2 * half_fwd.shape[1]))
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


def re_ranking_blocks(
        qf: torch.Tensor, gf: torch.Tensor, metric: Metric, k1: int, k2: int, lambda_value: float,
        chunk_size: Optional[int],
) -> Iterator[Tuple[int, torch.Tensor]]:
    """Yield (first query index, re-ranked (chunk, G) distances)."""
    if k1 < 1 or k2 < 1 or not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f'Re-ranking needs k1 >= 1, k2 >= 1 and 0 <= lambda <= 1, got {k1}, {k2}, {lambda_value}.')
    nq = len(qf)
    x = prepare(torch.cat([qf, gf]), metric)
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
        original = distance_block(x[s:e], g, metric).double().pow_(2) / row_max[s:e, None]
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
    qf, gf = as_features(query_features, 'query_features'), as_features(gallery_features, 'gallery_features')
    blocks = list(re_ranking_blocks(qf, gf, metric, k1, k2, lambda_value, chunk_size))
    return torch.cat([b for _, b in blocks]) if blocks else torch.zeros(0, len(gf))
