"""Retrieval metrics against hand-computed cases and straightforward per-query loops."""
import numpy as np
import pytest
import torch

from ptl_timm.reid import evaluate, evaluate_rankings, pairwise_distance, re_ranking


def _loop_reference(dist, q_pids, g_pids, q_cams, g_cams, max_rank):
    """The protocol written as a plain loop: exclude same id + same cam and junk -1, AP = mean precision@hit."""
    aps, inps, cmc, n = [], [], np.zeros(max_rank), 0
    for i in range(len(dist)):
        order = sorted(range(dist.shape[1]), key=lambda j: (dist[i, j], j))
        kept = [j for j in order if g_pids[j] != -1 and not (g_pids[j] == q_pids[i] and g_cams[j] == q_cams[i])]
        hits = [g_pids[j] == q_pids[i] for j in kept]
        if not any(hits):
            continue
        n += 1
        precisions, found = [], 0
        for rank, hit in enumerate(hits, 1):
            if hit:
                found += 1
                precisions.append(found / rank)
        aps.append(np.mean(precisions))
        last = max(r for r, h in enumerate(hits, 1) if h)
        inps.append(sum(hits) / last)
        first = hits.index(True)
        cmc[first:] += 1
    return np.mean(aps), np.mean(inps), cmc[:max_rank] / n, n


def test_hand_computed_case():
    # one query (id 1, cam 0); gallery ordered by distance:
    # g0 id1 cam0 (excluded), g1 id2, g2 id1 cam1 (hit at kept rank 2), g3 junk -1, g4 id3, g5 id1 cam2 (rank 4)
    dist = np.array([[0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])
    res = evaluate_rankings(dist, [1], [1, 2, 1, -1, 3, 1], [0], [0, 1, 1, 1, 1, 2], max_rank=4)
    assert res.mAP == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert res.mINP == pytest.approx(2 / 4)
    np.testing.assert_allclose(res.cmc, [0, 1, 1, 1])
    assert res.rank1 == 0 and res.rank(2) == 1
    assert (res.num_valid, res.num_queries) == (1, 1)


def test_query_without_match_is_skipped_and_all_skipped_raises():
    dist = np.array([[0.1, 0.2], [0.1, 0.3]])
    # query 0 (id 5) only matches g0 in its own camera: skipped; query 1 (id 7) hits g1 at rank 2
    res = evaluate_rankings(dist, [5, 7], [5, 7], [0, 0], [0, 1])
    assert (res.num_valid, res.num_queries) == (1, 2)
    assert res.mAP == pytest.approx(0.5) and res.rank1 == 0.0
    with pytest.raises(ValueError, match='No query has a true match'):
        evaluate_rankings(dist, [5, 7], [5, 7], [0, 1], [0, 1])


@pytest.mark.parametrize('metric', ['cosine', 'euclidean'])
def test_random_data_matches_loop_reference_and_chunking(metric):
    rng = np.random.default_rng(0)
    qf, gf = rng.normal(size=(37, 8)), rng.normal(size=(91, 8))
    q_pids, g_pids = rng.integers(0, 6, 37), rng.integers(-1, 6, 91)
    q_cams, g_cams = rng.integers(0, 3, 37), rng.integers(0, 3, 91)
    if metric == 'cosine':
        qn, gn = qf / np.linalg.norm(qf, axis=1, keepdims=True), gf / np.linalg.norm(gf, axis=1, keepdims=True)
        dist = 1 - qn @ gn.T
    else:
        dist = np.sqrt(((qf[:, None] - gf[None]) ** 2).sum(-1))
    np.testing.assert_allclose(pairwise_distance(qf, gf, metric).numpy(), dist, atol=1e-5)
    ap, inp, cmc, n = _loop_reference(dist, q_pids, g_pids, q_cams, g_cams, 20)
    for chunk in (None, 5):
        res = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, metric=metric, max_rank=20, chunk_size=chunk)
        assert res.mAP == pytest.approx(ap, abs=1e-9)
        assert res.mINP == pytest.approx(inp, abs=1e-9)
        np.testing.assert_allclose(res.cmc, cmc)
        assert res.num_valid == n


def test_ties_keep_gallery_order():
    # both gallery images are at the same distance: the first listed ranks first
    res = evaluate_rankings(np.zeros((1, 2)), [1], [2, 1], [0], [1, 1])
    assert res.rank1 == 0.0 and res.mAP == pytest.approx(0.5)


def _rerank_reference(qf, gf, k1, k2, lam):
    """k-reciprocal re-ranking written densely from the paper's definitions (Zhong et al. 2017)."""
    x = np.concatenate([qf, gf])
    n, nq = len(x), len(qf)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)  # squared Euclidean
    d = d / d.max(1, keepdims=True)
    rank = np.argsort(d, axis=1, kind='stable')

    def recip(i, k):
        return [j for j in rank[i, :k + 1] if i in rank[j, :k + 1]]

    v = np.zeros((n, n))
    for i in range(n):
        r = recip(i, k1)
        expanded = set(r)
        for c in r:
            rc = recip(c, round(k1 / 2))
            if len(set(rc) & set(r)) > 2 / 3 * len(rc):
                expanded |= set(rc)
        idx = sorted(expanded)
        w = np.exp(-d[i, idx])
        v[i, idx] = w / w.sum()
    v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
    jac = np.zeros((nq, n))
    for i in range(nq):
        for j in range(n):
            s = np.minimum(v[i], v[j]).sum()
            jac[i, j] = 1 - s / (2 - s)
    return (jac * (1 - lam) + d[:nq] * lam)[:, nq:]


@pytest.mark.parametrize('k1,k2', [(8, 3), (5, 1)])
def test_re_ranking_matches_dense_reference(k1, k2):
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(5, 6)) * 2
    qf = centres[rng.integers(0, 5, 12)] + rng.normal(size=(12, 6))
    gf = centres[rng.integers(0, 5, 40)] + rng.normal(size=(40, 6))
    ref = _rerank_reference(qf, gf, k1=k1, k2=k2, lam=0.3)
    for chunk in (None, 5):
        got = re_ranking(qf, gf, metric='euclidean', k1=k1, k2=k2, lambda_value=0.3, chunk_size=chunk)
        np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)


def test_re_ranking_improves_clustered_retrieval_and_evaluates():
    # noisy, clustered features: re-ranking with the default k1=20, k2=6, lambda=0.3 must not hurt mAP
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 16, generator=gen)
    g_pids = torch.arange(6).repeat_interleave(16)
    q_pids = torch.arange(6).repeat_interleave(3)
    gf = centres[g_pids] + 0.9 * torch.randn(96, 16, generator=gen)
    qf = centres[q_pids] + 0.9 * torch.randn(18, 16, generator=gen)
    q_cams, g_cams = torch.zeros(18), torch.ones(96)
    plain = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams)
    reranked = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, rerank=True, chunk_size=7)
    assert reranked.mAP > plain.mAP
    full = re_ranking(qf, gf)
    direct = evaluate_rankings(full, q_pids, g_pids, q_cams, g_cams)
    assert direct.mAP == pytest.approx(reranked.mAP)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match='same model'):
        evaluate(np.ones((2, 3)), np.ones((2, 4)), [0, 1], [0, 1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match='one per image'):
        evaluate(np.ones((2, 3)), np.ones((2, 3)), [0], [0, 1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match='NaN'):
        evaluate(np.full((1, 3), np.nan), np.ones((2, 3)), [0], [0, 1], [0], [1, 1])
    with pytest.raises(ValueError, match='Unknown metric'):
        evaluate(np.ones((1, 3)), np.ones((2, 3)), [0], [0, 1], [0], [1, 1], metric='l1')
