"""Batch-related Convolutional Cell (BConv-Cell) of Progressive Transfer Learning.

Yu et al., "Progressive Transfer Learning", arXiv 1908.02492. One convolution of the input gives the
gates; a latent state ``c`` carried from one training mini-batch to the next collects dataset-level
information and rectifies the output::

    i, f, o, g = split(conv(x), 4)             # order as in the paper
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    h_t = sigmoid(o) * tanh(c_t)

The gates never see ``h_{t-1}`` or ``c_{t-1}`` and no gradient flows into earlier batches.

Unlike the reference code, the state is a registered buffer of fixed shape ``(S, C, Hs, Ws)``: it
follows ``.to()``, is saved in ``state_dict`` / safetensors, is averaged by timm's EMA and loads back
bit-exactly. ``(Hs, Ws)`` is the cell's output grid at the model's nominal input size. Inputs of any
other size read the state resampled bilinearly to their grid and write it back resampled to the
stored grid (antialiased when shrinking), so any batch size or resolution may follow any other.
"""
import math
from typing import Iterator, List, Literal, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple
from torch import nn

from .state_sync import average_now_or_at_sync, recomputing

__all__ = [
    'BConvCell', 'StateMode', 'STATE_MODES', 'DEFAULT_STATE_MODE',
    'bconv_cells', 'reset_state', 'freeze_state', 'unfreeze_state', 'stride_chain',
]

StateMode = Literal['shared', 'carried', 'reset']
STATE_MODES: Tuple[str, ...] = ('shared', 'carried', 'reset')

# 'shared' keeps one dataset-level state (1, C, Hs, Ws): a sample's output never depends on which samples
# share its batch, train and eval read the same state, and the buffer is S times smaller than 'carried'.
# Validation does not separate the three rules, so the method's carried state is the default: see
# docs/benchmarks.md, "Defaults".
DEFAULT_STATE_MODE: StateMode = 'shared'


# The shape checks below are plain Python on proxies; torch.fx.wrap keeps them out of every FX trace (torch's,
# timm's and torchvision's tracers alike) as one call each, run on real tensors.
@torch.fx.wrap
def _resize(x: torch.Tensor, size: List[int]) -> torch.Tensor:
    """``x`` (N, C, H, W) resampled bilinearly to ``size`` (antialiased when shrinking); ``x`` if already there.
    Half precision is resampled in float32 (the CPU has no half-precision antialiased kernel), returned in ``x``'s
    dtype; other dtypes in their own."""
    if x.shape[-2] == size[0] and x.shape[-1] == size[1]:
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    half = x.dtype == torch.float16 or x.dtype == torch.bfloat16
    y = F.interpolate(x.float() if half else x, size=size, mode='bilinear', align_corners=False, antialias=shrink)
    return y.to(x.dtype)


@torch.fx.wrap
def _check_channels(x: torch.Tensor, in_chs: int) -> None:
    if x.shape[1] != in_chs:
        raise ValueError(f'BConvCell expects {in_chs} input channels, got {x.shape[1]} (input shape {x.shape}).')


# A training forward reads the state, then writes it. Two things may run that forward again before the step ends,
# and both must see what the first run saw (docs/method.md, "State rules"):
# - activation checkpointing (torch.utils.checkpoint, reentrant or not, or any library built on autograd) re-runs
#   it inside the backward pass: a forward that runs while autograd executes a backward is a recomputation, so it
#   reads the state its cell's last training forward read (kept in the buffer ``read_snapshot``) and writes nothing;
# - torch.compile's partitioner may recompute a cheap read of the state in the compiled backward, after the write
#   (pytorch/pytorch#197039): it never recomputes a custom op, and where an activation-checkpoint region makes it
#   re-run this one in the backward, the op returns the snapshot, so the read is the same.
# Both decisions are taken inside custom ops at run time, so eager, FX, TorchScript, compiled and exported graphs
# follow the same rule.
@torch.library.custom_op('ptl_timm::state_read', mutates_args=('snapshot',))
def _state_read_op(state: torch.Tensor, snapshot: torch.Tensor) -> torch.Tensor:
    """What a training forward reads: ``state``, copied into ``snapshot`` first, or ``snapshot`` in a
    recomputation. Shapes (S, C, Hs, Ws)."""
    if not recomputing():
        snapshot.copy_(state)
    return snapshot.clone()


@_state_read_op.register_fake
def _(state: torch.Tensor, snapshot: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(snapshot)


@torch.library.custom_op('ptl_timm::state_copy', mutates_args=())
def _state_copy_op(state: torch.Tensor) -> torch.Tensor:
    """What a TorchScript training forward reads (it has no snapshot): a copy of ``state``. A recomputation
    could only read the state the first run already wrote, so it stops with an error instead."""
    if recomputing():
        raise RuntimeError('A TorchScript PTL model cannot be re-run by activation checkpointing: the recomputed '
                           'forward cannot read the state its first run read. Checkpoint the eager model, a '
                           'torch.compile or a torch.export of it instead.')
    return state.clone()


@_state_copy_op.register_fake
def _(state: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(state)


@torch.library.custom_op('ptl_timm::state_commit', mutates_args=('state',))
def _state_commit_op(state: torch.Tensor, new: torch.Tensor) -> None:
    """``state.copy_(new)``, except in a recomputation, which writes nothing."""
    if not recomputing():
        state.copy_(new)


@_state_commit_op.register_fake
def _(state: torch.Tensor, new: torch.Tensor) -> None:
    return None


# The state is read and written by functions of the buffers: an FX trace records each as one call on the
# live buffers, where operations on a buffer alone would run at trace time and bake its value into the graph.
@torch.fx.wrap
def _state_read(
        state: torch.Tensor, snapshot: Optional[torch.Tensor], frozen: torch.Tensor, c: torch.Tensor, training: bool,
) -> torch.Tensor:
    """The state (S, C, Hs, Ws) as read for the cell map ``c`` (B, C, H, W): per slot in training, the
    dataset-level mean (1, C, Hs, Ws) in eval or when ``frozen``; at ``c``'s grid. A training read goes through
    ``snapshot`` (the same shape as ``state``), which keeps it for a recomputation of the forward; TorchScript,
    which has no snapshot, reads a copy (and refuses a recomputation)."""
    if training:
        state = torch.ops.ptl_timm.state_copy(state) if snapshot is None else torch.ops.ptl_timm.state_read(
            state, snapshot)
    prev = state if state.shape[0] == 1 else state.mean(0, keepdim=True)  # a one-slot mean is the slot itself
    if training and state.shape[0] > 1:
        # per slot while updating, the dataset-level state when frozen: selected on the flag's value, not
        # branched on it, so compiled and exported graphs serve both without a guard on the buffer's data.
        # One slot reads the same either way, broadcast over the batch.
        slots = torch.arange(c.shape[0], device=state.device) % state.shape[0]
        prev = torch.where(frozen, prev, state.index_select(0, slots))
    return _resize(prev, c.shape[-2:])


def _slot_sums(c: torch.Tensor, num_slots: int, grouped: bool) -> torch.Tensor:
    """Sum of the samples ``j, j + S, ...`` of ``c`` (B, C, Hs, Ws) for every slot ``j`` < S: (S, C, Hs, Ws).

    ``grouped``: zero rows up to a multiple of S and a sum over the (B / S, S, ...) view, deterministic on every
    device; else a scatter-add, sequential (so deterministic) on the CPU, atomic on CUDA, and the one that exports
    with a dynamic batch."""
    batch = c.shape[0]
    if grouped:
        pad = (-batch) % num_slots
        if pad:
            c = torch.cat([c, c.new_zeros([pad] + list(c.shape[1:]))])
        return c.reshape([-1, num_slots] + list(c.shape[1:])).sum(0)
    slots = torch.arange(batch, device=c.device) % num_slots
    return c.new_zeros([num_slots] + list(c.shape[1:])).index_add_(0, slots, c)


def _slot_means(state: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The carried write: slot ``j`` of ``state`` (S, C, Hs, Ws) gets the mean of the samples ``j, j + S, ...``
    of ``c`` (B, C, Hs, Ws), float32; a slot no sample hits keeps its value. Deterministic on every device, and
    nothing the host has to read back: the counts follow from B and S (a bincount would be read back)."""
    batch, num_slots = c.shape[0], state.shape[0]
    sums = _slot_sums(c, num_slots, grouped=c.is_cuda)
    counts = torch.div(batch + num_slots - 1 - torch.arange(num_slots, device=c.device), num_slots,
                       rounding_mode='floor').clamp(min=0).to(sums.dtype).view(-1, 1, 1, 1)
    return torch.where(counts > 0, sums / counts.clamp(min=1), state.float())


@torch.fx.wrap
def _state_write(state: torch.Tensor, frozen: torch.Tensor, c: torch.Tensor, carried: bool) -> None:
    """Write the detached cell map ``c`` (B, C, H, W) into ``state`` (S, C, Hs, Ws) in place, unless ``frozen``:
    slot ``j % S`` gets the mean of its samples (``carried``), else the one slot the batch mean."""
    c = _resize(c.float(), state.shape[-2:])
    new = _slot_means(state, c) if carried else c.mean(0, keepdim=True)
    if not torch.jit.is_scripting():
        new = average_now_or_at_sync(new)
    # always written, the frozen flag selecting the old value: data, not control flow (see _state_read)
    torch.ops.ptl_timm.state_commit(state, torch.where(frozen, state, new.to(state.dtype)))


def _mul_tanh(a: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``a * tanh(z)`` computed as ``2 a sigmoid(2 z) - a``: four cheap passes instead of one slow tanh (see
    :meth:`BConvCell.forward`)."""
    return torch.addcmul(a.neg(), a, (z * 2).sigmoid(), value=2)


class BConvCell(nn.Module):
    """BConv-Cell with a latent state carried across training mini-batches.

    Shapes: ``x`` (B, in_chs, H, W) -> ``h`` (B, out_chs, H', W') with H' = ceil(H / stride)
    (padding ``kernel_size // 2``, odd kernels). The state buffer is (S, out_chs, *state_size),
    S = ``state_slots`` for ``'carried'``, else 1.

    State modes:
        ``'shared'``: one dataset-level state; each training forward reads it (broadcast over the batch)
            and writes back the batch mean of ``c_t``.
        ``'carried'``: the paper's per-slot state; sample ``j`` reads and writes slot ``j % S`` (a slot
            hit by several samples keeps their mean; slots not hit keep their value). Eval and a
            frozen state read the dataset-level state, the mean over slots.
        ``'reset'``: no carried state (``c_{t-1} = 0`` always), what the reference code effectively ran.

    Rules common to all modes: training forwards update the state unless it is frozen; eval forwards
    are deterministic, never update, and are batch-independent. A forward re-run for backward (activation
    checkpointing) reads what its first run read and writes nothing. Under ``torch.distributed`` the
    written state is averaged over ranks, as SyncBatchNorm does for batch statistics, so every rank holds
    the same state after each step that synchronises gradients (``ptl_timm.layers.state_sync``).

    Args:
        in_chs: input channels.
        out_chs: output (and state) channels.
        kernel_size: odd kernel size of the gate convolution.
        stride: stride of the gate convolution.
        state_mode: ``'shared'`` (default), ``'carried'`` or ``'reset'``.
        state_size: (Hs, Ws) grid the state is stored at.
        state_slots: slots of the ``'carried'`` state (the paper used one per batch position).
    """

    # TorchScript lists non-persistent buffers in its state_dict: the snapshot stays out of scripted modules
    __jit_ignored_attributes__ = ['read_snapshot']

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int = 3,
            stride: int = 1,
            state_mode: StateMode = DEFAULT_STATE_MODE,
            state_size: Union[int, Tuple[int, int]] = 7,
            state_slots: int = 32,
    ):
        super().__init__()
        if state_mode not in STATE_MODES:
            raise ValueError(f"Unknown state_mode {state_mode!r}; choose one of {STATE_MODES}.")
        if kernel_size % 2 != 1:
            raise ValueError(f'kernel_size must be odd to keep the grid aligned, got {kernel_size}.')
        if state_slots < 1:
            raise ValueError(f'state_slots must be >= 1, got {state_slots}.')
        state_size = to_2tuple(state_size)
        self.in_chs = in_chs
        self.out_chs = out_chs
        self.stride = stride
        self.state_mode = state_mode
        self.conv = nn.Conv2d(in_chs, 4 * out_chs, kernel_size, stride, padding=kernel_size // 2, bias=False)
        slots = state_slots if state_mode == 'carried' else 1
        self.register_buffer('state', torch.zeros(slots, out_chs, *state_size))
        self.register_buffer('state_frozen', torch.zeros((), dtype=torch.bool))
        # what the last training forward read, for a recomputation of that forward (see _state_read_op)
        self.register_buffer('read_snapshot', torch.zeros_like(self.state), persistent=False)

    def extra_repr(self) -> str:
        return f'state_mode={self.state_mode}, state={tuple(self.state.shape)}'

    @property
    def carries_state(self) -> bool:
        """True when training forwards write the state (every mode but ``'reset'``), frozen or not."""
        return self.state_mode != 'reset'

    @property
    def updates_state(self) -> bool:
        """True when a forward in the current mode writes the state."""
        return self.training and self.state_mode != 'reset' and not bool(self.state_frozen)

    def dataset_state(self) -> torch.Tensor:
        """The dataset-level state (1, C, Hs, Ws) that eval and a frozen state read."""
        return self.state.mean(0, keepdim=True)

    def _read_state(self, c: torch.Tensor) -> torch.Tensor:
        """The state ``c_{t-1}`` for the cell map ``c`` (B, C, H, W), at its grid."""
        snapshot: Optional[torch.Tensor] = None
        if hasattr(self, 'read_snapshot'):  # static in TorchScript, which does not see the snapshot
            snapshot = self.read_snapshot
        return _state_read(self.state, snapshot, self.state_frozen, c, self.training)

    def _write_state(self, c: torch.Tensor) -> None:
        """Write the detached cell map ``c`` (B, C, H, W) into the state, unless the state is frozen."""
        _state_write(self.state, self.state_frozen, c, self.state_mode == 'carried')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_channels(x, self.in_chs)
        # Every tanh is taken as tanh(z) = 2 sigmoid(2z) - 1, the same function to float rounding: torch's CPU
        # tanh kernel is several times slower than its sigmoid on some CPUs (docs/benchmarks.md, "Cost"). The
        # split (not two slices) gives one gradient copy into the gates in backward.
        ifo, g = self.conv(x).split([3 * self.out_chs, self.out_chs], dim=1)
        i, f, o = ifo.sigmoid().chunk(3, dim=1)
        c = _mul_tanh(i, g)
        if self.state_mode != 'reset':
            c = torch.addcmul(c, f, self._read_state(c).to(f.dtype))
            if self.training:
                with torch.no_grad():
                    self._write_state(c.detach())
        return _mul_tanh(o, c)

    @torch.no_grad()
    def reset_state(self) -> None:
        """Zero the state (the initial state). The frozen flag is left as it is."""
        self.state.zero_()

    @torch.no_grad()
    def freeze_state(self) -> None:
        """Stop state updates, in train mode too; every forward reads the dataset-level state."""
        self.state_frozen.fill_(True)

    @torch.no_grad()
    def unfreeze_state(self) -> None:
        """Resume state updates in train mode (the inverse of :meth:`freeze_state`)."""
        self.state_frozen.fill_(False)


def bconv_cells(module: nn.Module) -> Iterator[BConvCell]:
    """Every BConvCell inside ``module`` (a model, a DDP / EMA wrapper or a feature extractor)."""
    return (m for m in module.modules() if isinstance(m, BConvCell))


def _apply(module: nn.Module, method: str) -> int:
    cells = list(bconv_cells(module))
    if not cells:
        raise ValueError(f'{type(module).__name__} holds no BConvCell: it is not a PTL model.')
    for cell in cells:
        getattr(cell, method)()
    return len(cells)


def reset_state(module: nn.Module) -> int:
    """Zero the latent state of every cell in ``module``; returns the number of cells."""
    return _apply(module, 'reset_state')


def freeze_state(module: nn.Module) -> int:
    """Freeze the latent state of every cell in ``module``; returns the number of cells."""
    return _apply(module, 'freeze_state')


def unfreeze_state(module: nn.Module) -> int:
    """Unfreeze the latent state of every cell in ``module``; returns the number of cells."""
    return _apply(module, 'unfreeze_state')


def stride_chain(ratio: int) -> Tuple[int, ...]:
    """Strides of the cells that take a map down by ``ratio`` (a power of two): 2, 2, ... or (1,)."""
    if ratio < 1 or ratio & (ratio - 1):
        raise ValueError(f'Reduction ratio between stages must be a power of two, got {ratio}.')
    return (2,) * int(math.log2(ratio)) if ratio > 1 else (1,)
