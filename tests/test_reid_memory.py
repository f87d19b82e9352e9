"""The cross-batch memories against plain per-sample references written here, their state_dict, and DDP."""
import copy
from pathlib import Path

import pytest
import reid_memory_worker as worker
import torch
import torch.nn.functional as F
from helpers import torchrun

from ptl_timm.reid import IdentityMemory, ReIDLoss, ReIDOutput, XBMemory, identity_centroids


class ReferenceIdentityMemory:
    """One sample at a time: the softmax over cosine similarities to every centroid, then each identity's centroid
    moved towards the mean of its samples' normalised embeddings."""

    def __init__(self, centroids, momentum, temperature):
        self.c = [row / row.norm() for row in centroids.double()]
        self.m, self.t = momentum, temperature

    def loss(self, feats, targets):
        total = 0.0
        for f, y in zip(feats.double(), targets.tolist()):
            f = f / f.norm()
            logits = torch.stack([f @ c for c in self.c]) / self.t
            total += -(logits[y] - torch.logsumexp(logits, 0))
        return total / len(feats)

    def update(self, feats, targets):
        for y in sorted(set(targets.tolist())):
            rows = [f / f.norm() for f, t in zip(feats.double(), targets.tolist()) if t == y]
            mean = sum(rows) / len(rows)
            c = self.m * self.c[y] + (1 - self.m) * mean
            self.c[y] = c / c.norm()


class ReferenceXBM:
    """A FIFO list of (feature, label); each anchor of the batch against its hardest positive (not itself) and
    hardest negative in the memory, Euclidean; the mean over anchors that have both."""

    def __init__(self, size, margin, start):
        self.slots, self.size, self.margin, self.start, self.calls, self.pos = [None] * size, size, margin, start, 0, 0

    def enqueue(self, feats, targets):
        own = []
        for f, y in zip(feats.double(), targets.tolist()):
            self.slots[self.pos] = (f, y)
            own.append(self.pos)
            self.pos = (self.pos + 1) % self.size
        return own

    def __call__(self, feats, targets, enqueue=None):
        active = self.calls >= self.start
        self.calls += 1
        own = self.enqueue(*(enqueue[:2] if enqueue else (feats, targets)))
        if enqueue is not None:  # DDP: this rank's samples are a slice of the gathered batch
            own = own[enqueue[2]:enqueue[2] + len(feats)]
        if not active:
            return 0.0
        terms = []
        for i, (f, y) in enumerate(zip(feats.double(), targets.tolist())):
            d_pos = [(f - m).norm() for j, s in enumerate(self.slots) if s is not None and j != own[i]
                     for m, t in [s] if t == y]
            d_neg = [(f - m).norm() for s in self.slots if s is not None for m, t in [s] if t != y]
            if d_pos and d_neg:
                terms.append(F.relu(max(d_pos) - min(d_neg) + self.margin))
        return sum(terms) / len(terms) if terms else 0.0


def _batches(seed, steps, n=6, ids=5, dim=4):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, dim, generator=gen), torch.randint(ids, (n,), generator=gen)) for _ in range(steps)]


def test_identity_memory_matches_the_per_sample_reference():
    torch.manual_seed(0)
    mem = IdentityMemory(5, 4, momentum=0.3, temperature=0.1)
    init = torch.randn(5, 4)
    mem.initialise(init)
    ref = ReferenceIdentityMemory(init, 0.3, 0.1)
    for f, y in _batches(0, 5):
        f.requires_grad_(True)
        loss = mem(f, y)
        assert torch.allclose(loss.double(), ref.loss(f.detach(), y), atol=1e-5)
        loss.backward()  # the in-place update must not break autograd
        assert f.grad is not None and torch.isfinite(f.grad).all()
        ref.update(f.detach(), y)
        assert torch.allclose(mem.centroids.double(), torch.stack(ref.c), atol=1e-5)


def test_identity_centroids_are_mean_normalised_embeddings_and_need_every_identity():
    f, y = torch.randn(8, 3), torch.tensor([0, 1, 2, 0, 1, 2, 2, 0])
    c = identity_centroids(f, y, 3)
    for k in range(3):
        assert torch.allclose(c[k], F.normalize(f[y == k], dim=1).mean(0), atol=1e-6)
    with pytest.raises(ValueError, match='every identity'):
        identity_centroids(f, y, 4)


def test_xbm_matches_the_per_sample_reference_with_its_warm_up():
    mem, ref = XBMemory(4, memory_size=10, margin=0.3, start=2), ReferenceXBM(10, 0.3, 2)
    for step, (f, y) in enumerate(_batches(1, 6, ids=3)):  # 6 steps of 6 wrap the queue of 10 several times
        loss, expected = mem(f, y), ref(f, y)
        assert abs(float(loss) - float(expected)) < 1e-5, step
        if step < 2:
            assert float(loss) == 0.0


@pytest.mark.parametrize('make', [lambda: IdentityMemory(5, 4), lambda: XBMemory(4, memory_size=10, start=1)])
def test_a_memory_resumed_from_its_state_dict_continues_exactly(make):
    batches = _batches(2, 6, ids=5)
    a = make()
    if isinstance(a, IdentityMemory):
        a.initialise(torch.randn(5, 4))
    for f, y in batches[:3]:
        a(f, y)
    b = make()
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for f, y in batches[3:]:
        assert torch.equal(a(f, y), b(f, y))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and (torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb)


def test_reid_loss_adds_each_memory_on_the_output_it_reads():
    torch.manual_seed(0)
    f, emb, y = torch.randn(6, 4), torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    out = ReIDOutput(logits=[torch.randn(6, 3)], features=[f], embedding=emb)
    idm, xbm = IdentityMemory(3, 4), XBMemory(4, memory_size=12)
    idm.initialise(torch.randn(3, 4))
    idm_copy, xbm_copy = copy.deepcopy(idm), copy.deepcopy(xbm)
    loss = ReIDLoss(memories=[idm, xbm])(out, y)
    expected = ReIDLoss()(out, y) + idm_copy(emb, y) + xbm_copy(f, y)
    assert torch.allclose(loss, expected)
    assert set(ReIDLoss(memories=[idm, xbm]).state_dict()) >= {'memories.0.centroids', 'memories.1.calls',
                                                               'memories.1._extra_state'}


def test_unknown_memory_and_bad_settings_are_named():
    from ptl_timm.reid.memory import build_memories

    with pytest.raises(ValueError, match="Unknown memory.*'identity', 'xbm'"):
        build_memories(['centroid'], 3, 4, 4)
    with pytest.raises(ValueError, match='momentum'):
        IdentityMemory(3, 4, momentum=1.0)


def test_memories_under_ddp_apply_every_ranks_batch(tmp_path):
    """torchrun, 2 gloo ranks: each rank's loss is its own batch against the memory; every rank ends with the
    memory that the ranks' batches, in rank order, give in one process."""
    torchrun([str(Path(worker.__file__)), '--out', str(tmp_path)], timeout=180)
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=False) for r in range(2)]
    idm, xbm = worker.memories()
    ref_id = ReferenceIdentityMemory(idm.centroids, idm.momentum, idm.temperature)
    ref_xbm = [ReferenceXBM(worker.XBM_SIZE, 0.3, worker.XBM_START) for _ in range(2)]
    per_rank = [worker.batches(r) for r in range(2)]
    for step in range(worker.STEPS):
        f_all = torch.cat([per_rank[r][step][0] for r in range(2)])
        t_all = torch.cat([per_rank[r][step][1] for r in range(2)])
        for r in range(2):
            f, t = per_rank[r][step]
            assert abs(ranks[r]['losses'][step][0] - float(ref_id.loss(f, t))) < 1e-5
            xbm_loss = ref_xbm[r](f, t, enqueue=(f_all, t_all, r * len(f)))
            assert abs(ranks[r]['losses'][step][1] - float(xbm_loss)) < 1e-5, (step, r)
        ref_id.update(f_all, t_all)
    for r in range(2):
        assert torch.allclose(ranks[r]['identity']['centroids'].double(), torch.stack(ref_id.c), atol=1e-5)
    for key in ranks[0]['identity']:
        assert torch.equal(ranks[0]['identity'][key], ranks[1]['identity'][key])
    for key, value in ranks[0]['xbm'].items():
        other = ranks[1]['xbm'][key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
