"""The latent state's rules and the training paths that take other kernels on an accelerator.

Every test here takes the ``device`` fixture (TORCH_DEVICE, default cpu; tests/conftest.py) and is marked
``device``, so the same tests run on the CPU in CI and on a GPU with ``TORCH_DEVICE=cuda pytest -m device``
(benchmarks/gpu_check.py). Results on the device are compared with a float32 CPU twin of the same model.
"""
import pytest
import timm
import torch
import torch.nn.functional as F

import ptl_timm  # noqa: F401  (registers the ptl_* models)
from ptl_timm import bconv_cells

MODES = ('shared', 'carried', 'reset')
# cuDNN / cuBLAS sum in other orders than the CPU kernels: float32 results agree to about 1e-5 (TF32 is off)
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(autouse=True)
def no_tf32():
    """TF32 convolutions and matmuls round to 10 mantissa bits: off, so that float32 means float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _model(mode: str = 'shared') -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model('ptl_resnet18', num_classes=4, img_size=32, state_mode=mode, state_slots=4)


def _batches(n: int, batch: int = 4) -> list:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 4, (batch,), generator=gen))
            for _ in range(n)]


def _states(model: torch.nn.Module) -> list:
    return [c.state for c in bconv_cells(model)]


def _train(model: torch.nn.Module, batches: list, device: torch.device, **autocast) -> list:
    """SGD steps on ``batches``; returns the logits of each step (float32, on the CPU)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    outs = []
    for x, y in batches:
        with torch.autocast(device.type, **autocast) if autocast else torch.autocast(device.type, enabled=False):
            logits = model(x.to(device))
        loss = F.cross_entropy(logits.float(), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        outs.append(logits.detach().float().cpu())
    return outs


@pytest.mark.parametrize('mode', MODES)
def test_state_rules_on_the_device_match_the_cpu(device, mode):
    cpu, dev = _model(mode), _model(mode).to(device)
    batches = _batches(3)
    for a, b in zip(_train(cpu, batches, torch.device('cpu')), _train(dev, batches, device)):
        torch.testing.assert_close(b, a, **TOL)
    for s_cpu, s_dev in zip(_states(cpu), _states(dev)):
        assert s_dev.device.type == device.type and s_dev.dtype == torch.float32
        torch.testing.assert_close(s_dev.cpu(), s_cpu, **TOL)
        assert (s_dev.abs().sum() > 0) == (mode != 'reset')
    for p_cpu, p_dev in zip(cpu.parameters(), dev.parameters()):  # gradients reached the same weights
        torch.testing.assert_close(p_dev.detach().cpu(), p_cpu.detach(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize('mode', MODES)
def test_eval_is_deterministic_batch_independent_and_never_writes(device, mode):
    model = _model(mode).to(device)
    _train(model, _batches(2), device)
    state = [s.clone() for s in _states(model)]
    model.eval()
    x = torch.randn(5, 3, 32, 32, device=device)
    with torch.no_grad():
        out = model(x)
        assert torch.equal(model(x), out)
        for k in range(len(x)):
            torch.testing.assert_close(model(x[k:k + 1])[0], out[k], **TOL)
    assert all(torch.equal(a, b) for a, b in zip(_states(model), state))


def test_freeze_and_reset_on_the_device(device):
    model = _model('shared').to(device)
    _train(model, _batches(1), device)
    model.freeze_state()
    frozen = [s.clone() for s in _states(model)]
    _train(model, _batches(2), device)
    assert all(torch.equal(a, b) for a, b in zip(_states(model), frozen))
    model.reset_state()
    assert all(s.abs().sum() == 0 and s.device.type == device.type for s in _states(model))


@pytest.mark.parametrize('mode', ('shared', 'carried'))
def test_round_trip_between_the_device_and_the_cpu(device, mode):
    model = _model(mode).to(device)
    _train(model, _batches(2), device)
    model.freeze_state()
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x.to(device))
    on_cpu = _model(mode).eval()
    on_cpu.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    back = _model(mode).to(device).eval()
    back.load_state_dict(on_cpu.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(on_cpu(x), ref.cpu(), **TOL)
        assert torch.equal(back(x.to(device)), ref)
    assert all(bool(c.state_frozen) for c in bconv_cells(back))


@pytest.mark.parametrize('dtype', (torch.bfloat16, torch.float16), ids=('bf16', 'fp16'))
def test_autocast_training_keeps_a_float32_state(device, dtype):
    ref, amp = _model('shared').to(device), _model('shared').to(device)
    batches = _batches(2)
    out_ref, out_amp = _train(ref, batches, device), _train(amp, batches, device, dtype=dtype)
    tol = 0.05 if dtype == torch.bfloat16 else 0.01  # 8 / 11 mantissa bits in the autocast ops
    for a, b in zip(out_ref, out_amp):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)
    for s_ref, s_amp in zip(_states(ref), _states(amp)):
        assert s_amp.dtype == torch.float32 and torch.isfinite(s_amp).all()
        torch.testing.assert_close(s_amp, s_ref, rtol=tol, atol=tol)
    assert all(torch.isfinite(p).all() for p in amp.parameters())


def test_channels_last_matches_contiguous(device):
    plain, cl = _model('shared').to(device), _model('shared').to(device, memory_format=torch.channels_last)
    batches = _batches(2)
    for a, b in zip(_train(plain, batches, device), _train(cl, batches, device)):
        torch.testing.assert_close(b, a, **TOL)
    for s, t in zip(_states(plain), _states(cl)):
        torch.testing.assert_close(t, s, **TOL)


@pytest.mark.parametrize('mode', ('shared', 'carried'))
def test_torch_compile_trains_like_eager(device, mode):
    """Compiled training gives the eager outputs, weights (so gradients) and state, step by step, for the
    dataset-level and the per-slot state. Inductor on a GPU; on the CPU aot_eager_decomp_partition: Dynamo's
    capture and inductor's decompositions and min-cut partitioner (the one that may recompute a state read after
    its write) without the C++ build, which costs a minute here."""
    backend = 'inductor' if device.type == 'cuda' else 'aot_eager_decomp_partition'
    eager, src = _model(mode).to(device), _model(mode).to(device)
    compiled = torch.compile(src, backend=backend)
    batches = _batches(3)
    for a, b in zip(_train(eager, batches, device), _train(compiled, batches, device)):
        torch.testing.assert_close(b, a, **TOL)
    for s, t in zip(_states(eager), _states(src)):
        torch.testing.assert_close(t, s, **TOL)
    for p, q in zip(eager.parameters(), src.parameters()):
        torch.testing.assert_close(q, p, **TOL)
