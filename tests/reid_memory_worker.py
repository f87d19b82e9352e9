"""torchrun worker of tests/test_reid_memory.py: the cross-batch memories under DDP (gloo, CPU, 2 ranks).

Every rank feeds its own batches to an IdentityMemory and an XBMemory built identically, and saves its batches,
its losses and the memories' final state_dicts, so the test can replay all ranks in one process.
"""
import argparse
import datetime
from pathlib import Path

import torch
import torch.distributed as dist

from ptl_timm.reid.memory import IdentityMemory, XBMemory

IDS, DIM, BATCH, STEPS, XBM_SIZE, XBM_START = 6, 5, 4, 4, 12, 1


def batches(rank: int):
    """STEPS batches (features (BATCH, DIM), targets (BATCH,)) of ``rank``: two identities x two samples."""
    gen = torch.Generator().manual_seed(100 + rank)
    out = []
    for _ in range(STEPS):
        ids = torch.randperm(IDS, generator=gen)[:2]
        out.append((torch.randn(BATCH, DIM, generator=gen), ids.repeat_interleave(BATCH // 2)))
    return out


def memories():
    torch.manual_seed(0)
    idm = IdentityMemory(IDS, DIM, momentum=0.3, temperature=0.1)
    idm.initialise(torch.randn(IDS, DIM))
    return idm, XBMemory(DIM, XBM_SIZE, margin=0.3, start=XBM_START)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument('--out', type=Path, required=True)
    args = p.parse_args()
    dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    idm, xbm = memories()
    losses = []
    for f, t in batches(rank):
        losses.append((idm(f, t).item(), xbm(f, t).item()))
    torch.save(dict(losses=losses, identity=idm.state_dict(), xbm=xbm.state_dict()), args.out / f'rank{rank}.pt')
    dist.destroy_process_group()


if __name__ == '__main__':
    main()
