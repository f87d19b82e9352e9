"""torchrun worker of tests/test_distributed.py: a few DistributedDataParallel steps of a small ptl_* model.

Run by the test as ``torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py --out DIR`` (gloo, CPU).
Every rank trains on its own data, then saves what the test needs to check the distributed state rule:
the initial weights, its batches, its final ``state_dict`` (after timm's ``distribute_bn``, as train.py
does at the end of each epoch with ``--dist-bn reduce``) and the number of ``all_reduce`` calls each training
step issued (counted around the real collective, which still runs).
"""
import argparse
import contextlib
import datetime
import functools
from pathlib import Path
from typing import Any, Dict, List, Tuple

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.utils import distribute_bn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from ptl_timm import BConvCell, bconv_cells  # importing ptl_timm registers the ptl_* models
from ptl_timm.reid.mgn import MGN

MODEL = 'ptl_resnet18'
NUM_CLASSES = 5
SIZE = 32
MGN_SIZE = (48, 16)  # the smallest input MGN's 3 stripes allow
BATCH = 4  # per rank
STEPS = 3
LR = 0.1
STATE_SLOTS = 6  # 'carried': more slots than a rank's batch, so some slots are left untouched by a step

# name -> model kwargs and DDP / layout settings. DDP's broadcast_buffers default (True) syncs rank 0's buffers,
# the latent state included, at wrapping and before each forward; train.py's --no-ddp-bb turns that off, so the
# rule must hold without it too, even for ranks that start from different states (``rank_state``). ``micro``:
# micro-batches per step, all but the last inside ``no_sync()`` as timm's train.py runs --grad-accum-steps;
# ``checkpoint``: every cell re-run in the backward (non-reentrant activation checkpointing).
_BASE = dict(state_mode='shared', broadcast_buffers=True, channels_last=False, rank_state=False, micro=1,
             checkpoint=False, mgn=False)
SCENARIOS: Dict[str, Dict[str, Any]] = {
    'shared': _BASE,
    'shared_no_broadcast': dict(_BASE, broadcast_buffers=False, rank_state=True),
    'carried_channels_last': dict(_BASE, state_mode='carried', channels_last=True),
    'carried_accumulate_checkpoint': dict(_BASE, state_mode='carried', micro=2, checkpoint=True),
    'mgn_accumulate': dict(_BASE, mgn=True, micro=2, broadcast_buffers=False),
}


def create(scenario: str) -> torch.nn.Module:
    """The scenario's model, with the same initial weights in every process (seeded)."""
    cfg = SCENARIOS[scenario]
    torch.manual_seed(0)
    kwargs = dict(num_classes=NUM_CLASSES, state_mode=cfg['state_mode'], state_slots=STATE_SLOTS)
    if cfg['mgn']:
        model = MGN(backbone='resnet18', feat_dim=8, ptl=True, img_size=MGN_SIZE, **kwargs)
    else:
        model = timm.create_model(MODEL, img_size=SIZE, **kwargs)
    if cfg['channels_last']:
        model = model.to(memory_format=torch.channels_last)
    if cfg['checkpoint']:
        for cell in bconv_cells(model):
            cell.forward = functools.partial(checkpoint, cell.forward, use_reentrant=False)
    return model


def rank_batches(rank: int, scenario: str) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """STEPS * micro batches of images (BATCH, 3, H, W) and labels (BATCH,), different on every rank."""
    cfg = SCENARIOS[scenario]
    gen = torch.Generator().manual_seed(1000 + rank)
    size = MGN_SIZE if cfg['mgn'] else (SIZE, SIZE)
    return [
        (torch.randn(BATCH, 3, *size, generator=gen), torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen))
        for _ in range(STEPS * cfg['micro'])
    ]


def layout(x: torch.Tensor, scenario: str) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if SCENARIOS[scenario]['channels_last'] else x


def train(scenario: str, rank: int, world_size: int, out: Path, device: torch.device) -> None:
    cfg = SCENARIOS[scenario]
    model = create(scenario).to(device)
    if cfg['rank_state']:
        gen = torch.Generator().manual_seed(2000 + rank)
        with torch.no_grad():
            for cell in bconv_cells(model):
                cell.state.copy_(torch.rand(cell.state.shape, generator=gen))
    ddp = DistributedDataParallel(model, broadcast_buffers=cfg['broadcast_buffers'])
    # what this rank starts from, after wrapping
    init = {k: v.to('cpu', copy=True) for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=0.9)
    batches = rank_batches(rank, scenario)
    micro = cfg['micro']
    ddp.train()
    collectives = []  # per step: all_reduce calls in its no_sync() micro-batches, then in its last one
    for step in range(STEPS):
        optimizer.zero_grad()
        counts = []
        for k, (x, y) in enumerate(batches[step * micro:(step + 1) * micro]):
            before = ALL_REDUCE_CALLS[0]
            # as timm's train.py: forward and backward of every micro-batch but the last inside no_sync()
            with ddp.no_sync() if k < micro - 1 else contextlib.nullcontext():
                F.cross_entropy(ddp(layout(x.to(device), scenario)), y.to(device)).backward()
            counts.append(ALL_REDUCE_CALLS[0] - before)
        collectives.append(counts)
        optimizer.step()
    distribute_bn(ddp, world_size, reduce=True)
    torch.save(dict(init=init, batches=batches, final=model.cpu().state_dict(), collectives=collectives,
                    cells=sum(isinstance(m, BConvCell) for m in model.modules())),
               out / f'{scenario}_rank{rank}.pt')


# every dist.all_reduce call in this process, counted around the real one (the collective still runs)
ALL_REDUCE_CALLS = [0]


def _count_all_reduce() -> None:
    real = dist.all_reduce

    @functools.wraps(real)
    def counted(*args: Any, **kwargs: Any) -> Any:
        ALL_REDUCE_CALLS[0] += 1
        return real(*args, **kwargs)

    dist.all_reduce = counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--out', type=Path, required=True)
    parser.add_argument('--scenarios', nargs='+', default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument('--device', default='cpu', help='cpu, or cuda: the ranks share it (gloo)')
    args = parser.parse_args()
    torch.set_num_threads(1)
    # a short timeout turns a hung collective into an error instead of a stuck test
    dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=90))
    _count_all_reduce()
    try:
        for scenario in args.scenarios:
            train(scenario, dist.get_rank(), dist.get_world_size(), args.out, torch.device(args.device))
    finally:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
