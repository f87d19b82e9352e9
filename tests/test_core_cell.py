"""BConvCell: the paper's equations and every rule of the latent state."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load, save

from ptl_timm import BConvCell

torch.manual_seed(0)


def _gates(cell: BConvCell, x: torch.Tensor):
    """Hand computation of the gates: one conv, split i, f, o, g in that order."""
    z = F.conv2d(x, cell.conv.weight, stride=cell.stride, padding=cell.conv.padding)
    i, f, o, g = torch.split(z, cell.out_chs, dim=1)
    return torch.sigmoid(i), torch.sigmoid(f), torch.sigmoid(o), torch.tanh(g)


def _cell(mode: str = 'shared', **kwargs) -> BConvCell:
    kwargs.setdefault('state_size', (4, 4))
    return BConvCell(3, 5, stride=2, state_mode=mode, **kwargs)


def test_equations_and_shared_update():
    cell = _cell('shared').train()
    prev = torch.randn(1, 5, 4, 4)
    cell.state.copy_(prev)
    x = torch.randn(6, 3, 8, 8)
    h = cell(x)
    i, f, o, g = _gates(cell, x)
    c = f * prev + i * g
    torch.testing.assert_close(h, o * torch.tanh(c))
    assert h.shape == (6, 5, 4, 4)
    torch.testing.assert_close(cell.state, c.mean(0, keepdim=True))


def test_train_forward_reads_state_left_by_previous_one():
    cell = _cell('shared').train()
    x1, x2 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    cell(x1)
    left = cell.state.clone()
    assert left.abs().sum() > 0
    h2 = cell(x2)
    i, f, o, g = _gates(cell, x2)
    torch.testing.assert_close(h2, o * torch.tanh(f * left + i * g))


def test_no_gradient_into_earlier_batches():
    cell = _cell('shared').train()
    cell(torch.randn(2, 3, 8, 8))
    assert not cell.state.requires_grad
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    cell(x).sum().backward()
    assert cell.conv.weight.grad is not None and x.grad is not None


@pytest.mark.parametrize('mode', ('shared', 'carried', 'reset'))
def test_gradients_are_those_of_the_equations(mode):
    """The cell computes its tanh through sigmoid (a faster kernel): its gradients equal those of the paper's
    equations with torch.tanh, in float64 to 1e-12."""
    cell = _cell(mode, state_slots=3).double().train()
    prev = torch.randn_like(cell.state)
    cell.state.copy_(prev)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, 4, 4, dtype=torch.float64)
    (cell(x) * w).sum().backward()
    got = x.grad, cell.conv.weight.grad
    x.grad, cell.conv.weight.grad = None, None
    i, f, o, g = _gates(cell, x)
    read = prev[torch.arange(4) % 3] if mode == 'carried' else prev
    c = i * g if mode == 'reset' else f * read + i * g
    (o * torch.tanh(c) * w).sum().backward()
    for a, b in zip(got, (x.grad, cell.conv.weight.grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if mode == 'shared':  # the state is written through float32
        torch.testing.assert_close(cell.state, c.detach().mean(0, keepdim=True), rtol=1e-6, atol=1e-6)


def test_carried_state_uses_one_slot_per_batch_position():
    cell = _cell('carried', state_slots=3).train()
    prev = torch.randn(3, 5, 4, 4)
    cell.state.copy_(prev)
    x = torch.randn(5, 3, 8, 8)  # more samples than slots: sample j uses slot j % 3
    h = cell(x)
    i, f, o, g = _gates(cell, x)
    slots = torch.tensor([0, 1, 2, 0, 1])
    c = f * prev[slots] + i * g
    torch.testing.assert_close(h, o * torch.tanh(c))
    expected = torch.stack([c[[0, 3]].mean(0), c[[1, 4]].mean(0), c[2]])
    torch.testing.assert_close(cell.state, expected)
    # a smaller batch writes its slots only
    before = cell.state.clone()
    cell(torch.randn(1, 3, 8, 8))
    torch.testing.assert_close(cell.state[1:], before[1:])
    assert not torch.equal(cell.state[0], before[0])


def test_reset_mode_never_carries_state():
    cell = _cell('reset').train()
    x = torch.randn(3, 3, 8, 8)
    h = cell(x)
    i, _, o, g = _gates(cell, x)
    torch.testing.assert_close(h, o * torch.tanh(i * g))
    assert cell.state.abs().sum() == 0
    torch.testing.assert_close(cell(x), h)


@pytest.mark.parametrize('mode', ['shared', 'carried'])
def test_eval_is_deterministic_batch_independent_and_uses_dataset_state(mode):
    cell = _cell(mode, state_slots=4).train()
    for _ in range(3):
        cell(torch.randn(4, 3, 8, 8))
    state = cell.state.clone()
    cell.eval()
    x = torch.randn(5, 3, 8, 8)
    h = cell(x)
    torch.testing.assert_close(cell(x), h, rtol=0, atol=0)
    assert torch.equal(cell.state, state), 'eval must not update the state'
    for k in range(5):
        torch.testing.assert_close(cell(x[k:k + 1])[0], h[k])
    i, f, o, g = _gates(cell, x)
    torch.testing.assert_close(h, o * torch.tanh(f * state.mean(0, keepdim=True) + i * g))


@pytest.mark.parametrize('mode', ['shared', 'carried'])
def test_freeze_stops_updates_in_train_mode_and_unfreeze_resumes(mode):
    cell = _cell(mode, state_slots=4).train()
    cell(torch.randn(4, 3, 8, 8))
    cell.freeze_state()
    frozen = cell.state.clone()
    x = torch.randn(3, 3, 8, 8)
    h_train = cell(x)
    assert torch.equal(cell.state, frozen)
    torch.testing.assert_close(h_train, cell.eval()(x))  # the frozen state is the inference state
    cell.train().unfreeze_state()
    cell(x)
    assert not torch.equal(cell.state, frozen)


def test_reset_returns_to_initial_state_and_keeps_freeze_flag():
    cell = _cell('shared').train()
    fresh = _cell('shared')
    fresh.load_state_dict(cell.state_dict())
    cell(torch.randn(2, 3, 8, 8))
    cell.freeze_state()
    cell.reset_state()
    assert torch.equal(cell.state, fresh.state) and bool(cell.state_frozen)


@pytest.mark.parametrize('mode', ['shared', 'carried'])
def test_state_dict_and_safetensors_round_trip_bit_exact(mode):
    cell = _cell(mode, state_slots=4).train()
    for _ in range(2):
        cell(torch.randn(3, 3, 8, 8))
    cell.freeze_state()
    x = torch.randn(2, 3, 8, 8)
    ref = cell.eval()(x)
    for sd in (cell.state_dict(), load(save(cell.state_dict()))):
        other = _cell(mode, state_slots=4).eval()
        other.load_state_dict(sd)
        assert torch.equal(other.state, cell.state) and bool(other.state_frozen)
        assert torch.equal(other(x), ref)
    buf = io.BytesIO()
    torch.save(cell.state_dict(), buf)
    buf.seek(0)
    other = _cell(mode, state_slots=4).eval()
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(other(x), ref)


def test_deepcopy_and_to_carry_the_state():
    cell = _cell('shared').train()
    cell(torch.randn(2, 3, 8, 8))
    twin = copy.deepcopy(cell)
    assert torch.equal(twin.state, cell.state) and twin.state.data_ptr() != cell.state.data_ptr()
    cell64 = twin.to(torch.float64)
    assert cell64.state.dtype == torch.float64
    assert cell64(torch.randn(2, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_any_batch_size_and_resolution_may_follow_any_other():
    cell = _cell('carried', state_slots=4).train()
    shape = cell.state.shape
    for b, hw in [(4, (8, 8)), (2, (8, 8)), (9, (8, 8)), (3, (14, 6)), (1, (31, 17)), (4, (8, 8))]:
        h = cell(torch.randn(b, 3, *hw))
        assert h.shape == (b, 5, -(-hw[0] // 2), -(-hw[1] // 2))
        assert cell.state.shape == shape


def test_other_resolution_reads_the_bilinear_resampled_state():
    cell = _cell('shared').eval()
    cell.state.copy_(torch.randn_like(cell.state))
    x = torch.randn(2, 3, 16, 12)
    i, f, o, g = _gates(cell, x)
    prev = F.interpolate(cell.state, size=(8, 6), mode='bilinear', align_corners=False)
    torch.testing.assert_close(cell(x), o * torch.tanh(f * prev + i * g))


def test_bf16_autocast_and_channels_last():
    cell = _cell('shared').train().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        h = cell(x)
    assert h.shape == (2, 5, 4, 4) and torch.isfinite(h).all()
    assert cell.state.dtype == torch.float32 and cell.state.abs().sum() > 0
    h.float().sum().backward()


@pytest.mark.parametrize('dtype', (torch.bfloat16, torch.float16), ids=('bf16', 'fp16'))
def test_half_precision_model_at_another_resolution(dtype):
    """A cell cast to half precision reads and writes its state at any input size (the CPU has no half-precision
    antialiased resampling), close to float32."""
    cell = _cell('shared').train()
    cell.state.copy_(torch.randn_like(cell.state))
    half = copy.deepcopy(cell).to(dtype)
    x = torch.randn(2, 3, 6, 10)  # a 3x5 grid: the stored state is shrunk to it, the written one grown back
    want = cell(x)
    got = half(x.to(dtype))
    assert got.dtype == half.state.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)
    torch.testing.assert_close(half.state.float(), cell.state, rtol=0.05, atol=0.05)


def test_double_precision_state_is_resampled_in_double():
    """Only half precision is resampled in float32: a float64 cell reads its state at full precision."""
    cell = _cell('shared').double().eval()
    cell.state.copy_(torch.randn_like(cell.state))
    x = torch.randn(2, 3, 6, 10, dtype=torch.float64)
    i, f, o, g = _gates(cell, x)
    prev = F.interpolate(cell.state, size=(3, 5), mode='bilinear', align_corners=False, antialias=True)
    torch.testing.assert_close(cell(x), o * torch.tanh(f * prev + i * g), rtol=1e-12, atol=1e-12)


def test_clear_errors():
    with pytest.raises(ValueError, match='state_mode'):
        BConvCell(3, 4, state_mode='sometimes')
    with pytest.raises(ValueError, match='odd'):
        BConvCell(3, 4, kernel_size=2)
    with pytest.raises(ValueError, match='expects 3 input channels, got 1'):
        _cell()(torch.randn(1, 1, 8, 8))


@pytest.mark.parametrize('batch, slots', [(1, 3), (3, 3), (4, 3), (7, 3), (5, 8), (16, 4)])
def test_carried_slot_sums_agree_on_every_formulation(batch, slots):
    """The carried write's two sums (grouped view on CUDA, sequential scatter-add elsewhere) give the same slot
    sums, and the computed counts are the number of samples each slot gets."""
    from ptl_timm.layers.bconv_cell import _slot_means, _slot_sums

    c = torch.randn(batch, 2, 3, 3)
    expected = torch.stack([c[j::slots].sum(0) for j in range(slots)])
    for grouped in (False, True):
        torch.testing.assert_close(_slot_sums(c, slots, grouped), expected)
    state = torch.randn(slots, 2, 3, 3)
    means = _slot_means(state, c)
    for j in range(slots):
        torch.testing.assert_close(means[j], c[j::slots].mean(0) if j < batch else state[j])
