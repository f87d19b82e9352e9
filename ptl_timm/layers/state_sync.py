"""When the cells' latent states are written and averaged over ranks: the step rules of the state.

- Recomputation: a forward that runs while autograd executes a backward pass re-runs a forward for activation
  checkpointing (any library that recomputes through autograd does it there). It writes nothing and reads what
  the first run read (``bconv_cell``'s custom ops ask :func:`recomputing`).
- Ranks: under ``torch.distributed`` every rank must hold the same state after each step that synchronises
  gradients. Inside a :class:`~torch.nn.parallel.DistributedDataParallel` forward the cells write locally and
  the DDP module averages every cell's state in one all_reduce at the end of each forward whose backward
  synchronises gradients (the flag ``no_sync()`` clears, read as DDP reads it, at forward time): one collective
  per training step, none inside ``no_sync()``. Without a DDP module to follow (another wrapper, a compiled
  graph), each cell averages its own write at once; so do the cells in the first forward of a DDP module, the one
  in which they meet it (its hooks start with its next forward).

docs/method.md ("State rules") gives the reasons.
"""
from typing import List, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

__all__ = ['recomputing', 'average_now_or_at_sync', 'average_states']

# set on a DDP module whose hooks average the cells' states: False during the forward that registered them (they
# do not run at its end), True from its next forward on
_HOOKED = '_ptl_timm_state_sync'


def recomputing() -> bool:
    """True while autograd executes a backward pass (on this thread): a forward running now recomputes an earlier
    one. Reentrant and non-reentrant checkpointing, and compiled backwards, all run inside the autograd engine."""
    return torch._C._current_graph_task_id() != -1


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.jit.unused
def average_now_or_at_sync(new: torch.Tensor) -> torch.Tensor:
    """A cell's state write ``new`` as the cell must store it now: as it is in one process, in a recomputation
    (which stores nothing) and inside a DDP forward (the DDP module averages all states at the end of the step);
    else averaged over the ranks at once."""
    if _world_size() == 1:
        return new
    if not torch.compiler.is_compiling():
        if recomputing():
            return new
        ddp = _active_ddp()
        if ddp is not None:
            if _hooked(ddp):
                return new
            if not ddp.require_backward_grad_sync:
                return new  # inside no_sync(): the DDP module's next synchronising forward averages it
    dist.all_reduce(new)
    return new / _world_size()


def _active_ddp() -> Optional[DistributedDataParallel]:
    """The DDP module whose forward is running (DDP records it while it runs the wrapped module)."""
    get = getattr(DistributedDataParallel, '_get_active_ddp_module', None)
    return get() if get is not None else None


def _hooked(ddp: DistributedDataParallel) -> bool:
    """Whether ``ddp``'s hooks average the cells' states at the end of the running forward. A hook registered
    during a forward does not run at its end (the forward started without hooks): the first forward in which
    cells meet ``ddp`` registers them and returns False."""
    if not hasattr(ddp, _HOOKED):
        ddp.register_forward_pre_hook(_start_forward)
        ddp.register_forward_hook(_average_at_sync)
        setattr(ddp, _HOOKED, False)
    return getattr(ddp, _HOOKED)


def _start_forward(ddp: DistributedDataParallel, args: tuple) -> None:
    setattr(ddp, _HOOKED, True)


def _average_at_sync(ddp: DistributedDataParallel, args: tuple, output: object) -> None:
    """DDP forward hook: average every training cell's state over the ranks, when this step synchronises."""
    if not getattr(ddp, _HOOKED) or not ddp.require_backward_grad_sync or recomputing():
        return
    # every rank takes the same cells in the same order: the module's structure and train/eval modes
    cells = [m for m in ddp.module.modules() if getattr(m, 'carries_state', False) and m.training]
    if cells:
        average_states([m.state for m in cells], [m.state_frozen for m in cells])


@torch.no_grad()
def average_states(states: List[torch.Tensor], frozen: List[torch.Tensor]) -> None:
    """Replace every state (S, C, Hs, Ws) by its mean over the ranks, in one all_reduce of all of them (float32);
    a state whose ``frozen`` flag is set keeps its value."""
    flat = torch.cat([s.reshape(-1).float() for s in states])
    dist.all_reduce(flat)
    flat /= _world_size()
    for state, flag, mean in zip(states, frozen, flat.split([s.numel() for s in states])):
        state.copy_(torch.where(flag, state, mean.view_as(state).to(state.dtype)))
