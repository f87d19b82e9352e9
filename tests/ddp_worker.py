"""torchrun worker of tests/test_distributed.py: a few DistributedDataParallel steps of a small ptl_* model.

Run by the test as ``torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py --out DIR`` (gloo, CPU).
Every rank trains on its own data, then saves what the test needs to check the distributed state rule:
the initial weights, its batches and its final ``state_dict`` (after timm's ``distribute_bn``, as train.py
does at the end of each epoch with ``--dist-bn reduce``).
"""
import argparse
import datetime
from pathlib import Path
from typing import Any, Dict, List, Tuple

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.utils import distribute_bn
from torch.nn.parallel import DistributedDataParallel

from ptl_timm import bconv_cells  # importing ptl_timm registers the ptl_* models

MODEL = 'ptl_resnet18'
NUM_CLASSES = 5
SIZE = 32
BATCH = 4  # per rank
STEPS = 3
LR = 0.1
STATE_SLOTS = 6  # 'carried': more slots than a rank's batch, so some slots are left untouched by a step

# name -> model kwargs and DDP / layout settings. DDP's broadcast_buffers default (True) syncs rank 0's buffers,
# the latent state included, at wrapping and before each forward; train.py's --no-ddp-bb turns that off, so the
# rule must hold without it too, even for ranks that start from different states (``rank_state``).
SCENARIOS: Dict[str, Dict[str, Any]] = {
    'shared': dict(state_mode='shared', broadcast_buffers=True, channels_last=False, rank_state=False),
    'shared_no_broadcast': dict(state_mode='shared', broadcast_buffers=False, channels_last=False, rank_state=True),
    'carried_channels_last': dict(state_mode='carried', broadcast_buffers=True, channels_last=True, rank_state=False),
}


def create(scenario: str) -> torch.nn.Module:
    """The scenario's model, with the same initial weights in every process (seeded)."""
    cfg = SCENARIOS[scenario]
    torch.manual_seed(0)
    model = timm.create_model(
        MODEL, num_classes=NUM_CLASSES, img_size=SIZE, state_mode=cfg['state_mode'], state_slots=STATE_SLOTS)
    if cfg['channels_last']:
        model = model.to(memory_format=torch.channels_last)
    return model


def rank_batches(rank: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """STEPS batches of images (BATCH, 3, SIZE, SIZE) and labels (BATCH,), different on every rank."""
    gen = torch.Generator().manual_seed(1000 + rank)
    return [
        (torch.randn(BATCH, 3, SIZE, SIZE, generator=gen), torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen))
        for _ in range(STEPS)
    ]


def layout(x: torch.Tensor, scenario: str) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if SCENARIOS[scenario]['channels_last'] else x


def train(scenario: str, rank: int, world_size: int, out: Path) -> None:
    cfg = SCENARIOS[scenario]
    model = create(scenario)
    if cfg['rank_state']:
        gen = torch.Generator().manual_seed(2000 + rank)
        with torch.no_grad():
            for cell in bconv_cells(model):
                cell.state.copy_(torch.rand(cell.state.shape, generator=gen))
    ddp = DistributedDataParallel(model, broadcast_buffers=cfg['broadcast_buffers'])
    init = {k: v.clone() for k, v in model.state_dict().items()}  # what this rank starts from, after wrapping
    optimizer = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=0.9)
    batches = rank_batches(rank)
    ddp.train()
    for x, y in batches:
        loss = F.cross_entropy(ddp(layout(x, scenario)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    distribute_bn(ddp, world_size, reduce=True)
    torch.save(dict(init=init, batches=batches, final=model.state_dict()), out / f'{scenario}_rank{rank}.pt')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--out', type=Path, required=True)
    parser.add_argument('--scenarios', nargs='+', default=list(SCENARIOS), choices=list(SCENARIOS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    # a short timeout turns a hung collective into an error instead of a stuck test
    dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=90))
    try:
        for scenario in args.scenarios:
            train(scenario, dist.get_rank(), dist.get_world_size(), args.out)
    finally:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
