"""Compiled and exported training: the state update is data (a select on the frozen flag), not control flow, so
``torch.compile(fullgraph=True)`` and ``torch.export`` take a train-mode forward whole, and match eager: outputs,
gradients and the state after each step (frozen steps included)."""
import copy

import pytest
import timm
import torch

import ptl_timm
from ptl_timm import BConvCell


def _buffers(module):
    return {k: v.clone() for k, v in module.named_buffers()}


def _steps(model, steps=3):
    """Inputs of a short training run; the last step runs with the state frozen."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2 + k % 2, model.in_chans if hasattr(model, 'in_chans') else model.in_chs, 32, 32,
                        generator=gen) for k in range(steps)]


def _assert_same_training(eager, compiled_fn, compiled_module, xs, exact=True):
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)  # inductor fuses: float rounding differs
    for k, x in enumerate(xs):
        if k == len(xs) - 1:
            ptl_timm.freeze_state(eager)
            ptl_timm.freeze_state(compiled_module)
        y_ref, y = eager(x), compiled_fn(x)
        y_ref.square().mean().backward()
        y.square().mean().backward()
        torch.testing.assert_close(y, y_ref, **tol)
        for (name, p_ref), p in zip(eager.named_parameters(), compiled_module.parameters()):
            # gradients through the state read: a compiled backward must use the state before the step's write
            torch.testing.assert_close(p.grad, p_ref.grad, msg=f'gradient of {name} at step {k}')
        ref_buffers, buffers = _buffers(eager), _buffers(compiled_module)
        for name, b in buffers.items():
            torch.testing.assert_close(b, ref_buffers[name], **tol, msg=f'buffer {name} at step {k}')
        eager.zero_grad()
        compiled_module.zero_grad()


@pytest.mark.parametrize('state_mode', ['shared', 'carried'])
def test_compiled_cell_training_matches_eager(state_mode):
    torch.manual_seed(0)
    cell = BConvCell(3, 8, stride=2, state_mode=state_mode, state_size=16, state_slots=3).train()
    with torch.no_grad():
        cell.state.normal_()
    ref = copy.deepcopy(cell)
    compiled = torch.compile(cell, backend='aot_eager', fullgraph=True)
    _assert_same_training(ref, compiled, cell, _steps(cell, steps=4))


@pytest.mark.slow
def test_inductor_cell_training_matches_eager():
    """With inductor, the partitioner recomputes cheap reads in the backward: the state read must not be one of
    them, or the gradients use the state after the step's in-place write (off by about half here)."""
    torch.manual_seed(0)
    cell = BConvCell(3, 8, stride=2, state_mode='shared', state_size=16).train()
    with torch.no_grad():
        cell.state.normal_()
    ref = copy.deepcopy(cell)
    compiled = torch.compile(cell, backend='inductor', fullgraph=True)
    _assert_same_training(ref, compiled, cell, _steps(cell, steps=3), exact=False)


@pytest.mark.slow
def test_compiled_model_training_matches_eager():
    """A whole PTL model in one graph per forward (fullgraph): no break at the cells' frozen flag."""
    torch.manual_seed(0)
    model = timm.create_model('ptl_resnet18', num_classes=5, img_size=32).train()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    _assert_same_training(ref, compiled, model, _steps(model))


@pytest.mark.parametrize('state_mode', ['shared', 'carried'])
def test_export_training_matches_eager(state_mode):
    """torch.export of a train-mode forward: the exported program updates the state as eager does."""
    torch.manual_seed(0)
    model = timm.create_model('ptl_resnet18', num_classes=5, img_size=32, state_mode=state_mode,
                              state_slots=3).train()
    ref = copy.deepcopy(model)
    xs = _steps(model, steps=3)
    exported = torch.export.export(copy.deepcopy(model), (xs[0],)).module()
    for k, x in enumerate(xs):
        if k == len(xs) - 1:
            ptl_timm.freeze_state(ref)
            for name, flag in exported.named_buffers():  # the exported module keeps the buffers, not the cells
                if name.endswith('state_frozen'):
                    flag.fill_(True)
        with torch.no_grad():
            y_ref, y = ref(x[:2]), exported(x[:2])
        torch.testing.assert_close(y, y_ref)
        ref_buffers, buffers = _buffers(ref), _buffers(exported)
        for name, b in ref_buffers.items():
            torch.testing.assert_close(buffers[name], b, msg=f'buffer {name} at step {k}')


def test_export_training_with_a_dynamic_batch_matches_eager():
    """A carried-state training forward exported with a dynamic batch: one program for every batch size (batches
    above and below the slot count), updating the state as eager does."""
    torch.manual_seed(0)
    model = timm.create_model('ptl_resnet18', num_classes=5, img_size=32, state_mode='carried',
                              state_slots=3).train()
    ref = copy.deepcopy(model)
    batch = torch.export.Dim('batch', min=2, max=16)
    exported = torch.export.export(model, (torch.randn(4, 3, 32, 32),), dynamic_shapes=({0: batch},)).module()
    gen = torch.Generator().manual_seed(0)
    for size in (5, 2, 7):
        x = torch.randn(size, 3, 32, 32, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), ref(x))
        buffers = _buffers(exported)
        for name, b in _buffers(ref).items():
            if name.endswith('.state'):
                torch.testing.assert_close(buffers[name], b, msg=f'{name} after a batch of {size}')
