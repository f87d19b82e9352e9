"""Recomputed forwards (activation checkpointing from outside the model) train exactly as plain forwards.

torch.utils.checkpoint, reentrant or not, around the whole model or around the modules that hold cells, re-runs
the cells in the backward. The rule (docs/method.md, "Recomputed forwards"): the re-run reads what the first run
read and writes nothing. Each PTL model is compared with itself without checkpointing: outputs, every gradient
and the cells' state after one and two SGD steps, exactly where its plain twin (the same model without cells)
is exact under the same checkpointing. BN running statistics are left out of the comparison: a re-run updates
them again in every timm model (torch's documented caveat), the twin included.
"""
import copy
import functools
from typing import Callable, List

import pytest
import timm
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import ptl_timm  # noqa: F401  (registers the models)
from ptl_timm import BConvCell
from ptl_timm.reid.mgn import MGN


def _resnet18(ptl: bool, mode: str) -> nn.Module:
    kwargs = dict(img_size=32, state_mode=mode, state_slots=3) if ptl else {}
    return timm.create_model('ptl_resnet18' if ptl else 'resnet18', num_classes=5, **kwargs)


def _reid(ptl: bool, mode: str) -> nn.Module:
    kwargs = dict(state_mode=mode, state_slots=3) if ptl else {}
    return timm.create_model('reid_ptl_resnet18' if ptl else 'reid_resnet18', num_classes=5, img_size=(32, 16),
                             **kwargs)


def _mgn(ptl: bool, mode: str) -> nn.Module:
    kwargs = dict(state_mode=mode, state_slots=3) if ptl else {}
    return MGN(backbone='resnet18', feat_dim=8, ptl=ptl, img_size=(48, 16), num_classes=5, **kwargs)


MODELS = {'ptl_resnet18': (_resnet18, (4, 3, 32, 32)), 'reid_ptl_resnet18': (_reid, (4, 3, 32, 16)),
          'ptl_mgn': (_mgn, (4, 3, 48, 16))}


def _checkpointed_parts(model: nn.Module) -> List[nn.Module]:
    """The modules that hold cells (each cell itself), or in the twin the stages in their place."""
    cells = [m for m in model.modules() if isinstance(m, BConvCell)]
    return cells or [m for n, m in model.named_modules() if n.rsplit('.', 1)[-1] in ('layer2', 'layer3')]


def _runner(model: nn.Module, where: str, reentrant: bool) -> Callable[[torch.Tensor], object]:
    """``model``'s forward with activation checkpointing around the model, around its parts, or none."""
    if where == 'model':
        return lambda x: checkpoint(model, x, use_reentrant=reentrant)
    if where == 'parts':
        for part in _checkpointed_parts(model):
            part.forward = functools.partial(checkpoint, part.forward, use_reentrant=reentrant)
    return model


def _train(make, shape, where: str, reentrant: bool, accumulate: int = 1, steps: int = 2) -> List[dict]:
    """Outputs, gradients and cell states after each of ``steps`` SGD steps of ``accumulate`` micro-batches."""
    torch.manual_seed(0)
    model = make().train()
    run = _runner(model, where, reentrant)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    record = []
    for _ in range(steps):
        optimizer.zero_grad()
        outs = []
        for _ in range(accumulate):
            x = torch.randn(*shape, generator=gen).requires_grad_(reentrant)  # reentrant needs an input with grad
            out = run(x)  # logits: a reentrant checkpoint passes gradients through tensor outputs only
            out.square().mean().backward()
            outs.append(out.detach())
        record.append(dict(
            out=outs,
            grads={n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            state={n: b.clone() for n, b in model.named_buffers() if n.endswith('.state')}))
        optimizer.step()
    return record


def _differences(a: List[dict], b: List[dict]) -> List[str]:
    """Where two recorded runs are not bit-identical."""
    diff = []
    for step, (ra, rb) in enumerate(zip(a, b)):
        diff += [f'output {i} step {step}' for i, (x, y) in enumerate(zip(ra['out'], rb['out']))
                 if not torch.equal(x, y)]
        for key in ('grads', 'state'):
            assert ra[key].keys() == rb[key].keys()
            diff += [f'{key} {n} step {step}' for n in ra[key] if not torch.equal(ra[key][n], rb[key][n])]
    return diff


def _assert_close(a: List[dict], b: List[dict]) -> None:
    for ra, rb in zip(a, b):
        torch.testing.assert_close(ra['out'], rb['out'], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ra['grads'], rb['grads'], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ra['state'], rb['state'], rtol=1e-5, atol=1e-6)


@functools.cache
def _twin_exact(name: str, where: str, reentrant: bool) -> bool:
    make, shape = MODELS[name]
    twin = functools.partial(make, False, 'shared')
    return not _differences(_train(twin, shape, where, reentrant), _train(twin, shape, 'none', reentrant))


@pytest.mark.parametrize('reentrant', [False, True], ids=['non_reentrant', 'reentrant'])
@pytest.mark.parametrize('where', ['model', 'parts'])
@pytest.mark.parametrize('mode', ['shared', 'carried', 'reset'])
# the ReID models take a few seconds per case: the everyday loop (-m 'not slow') keeps the ptl_resnet18 cases
@pytest.mark.parametrize('name', [n if n == 'ptl_resnet18' else pytest.param(n, marks=pytest.mark.slow)
                                  for n in MODELS])
def test_checkpointed_training_matches_plain_training(name, mode, where, reentrant):
    make, shape = MODELS[name]
    ptl = functools.partial(make, True, mode)
    plain, ckpt = _train(ptl, shape, 'none', reentrant), _train(ptl, shape, where, reentrant)
    assert plain[0]['state'] and (mode == 'reset') == all(not s.any() for s in plain[-1]['state'].values())
    if _twin_exact(name, where, reentrant):
        assert not _differences(ckpt, plain)
    else:  # the twin itself differs by float rounding under this checkpointing: so may the PTL model
        _assert_close(ckpt, plain)


@pytest.mark.parametrize('reentrant', [False, True], ids=['non_reentrant', 'reentrant'])
@pytest.mark.parametrize('mode', ['shared', 'carried'])
def test_gradient_accumulation_with_checkpointing_matches_plain(mode, reentrant):
    """Two micro-batches, each forward and backward, then the step: the same states and gradients."""
    make, shape = MODELS['ptl_resnet18']
    ptl = functools.partial(make, True, mode)
    plain = _train(ptl, shape, 'none', reentrant, accumulate=2)
    for where in ('model', 'parts'):
        assert not _differences(_train(ptl, shape, where, reentrant, accumulate=2), plain)


def test_own_grad_checkpointing_with_checkpointed_cells_matches_plain():
    """The model's set_grad_checkpointing (the backbone's stages) together with checkpointed cells."""
    make, shape = MODELS['ptl_resnet18']

    def ptl():
        model = make(True, 'shared')
        model.set_grad_checkpointing(True)
        return model

    assert not _differences(_train(ptl, shape, 'parts', False), _train(ptl, shape, 'none', False))


@pytest.mark.slow  # compiling takes about half a minute
def test_checkpointed_compiled_model_trains_like_eager():
    """Checkpointing around a torch.compile'd model re-runs the compiled forward in the backward: the decision
    to write is taken inside the graph, at run time, so it still writes once and reads the first run's state."""
    make, shape = MODELS['ptl_resnet18']
    torch.manual_seed(0)
    ref = make(True, 'carried').train()
    model = copy.deepcopy(ref)
    compiled = torch.compile(model, backend='aot_eager_decomp_partition', fullgraph=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(*shape, generator=gen)
        y_ref, y = ref(x), checkpoint(compiled, x, use_reentrant=False)
        y_ref.square().mean().backward()
        y.square().mean().backward()
        # the partitioner's decompositions round differently from eager: close, not equal
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        for (n, p_ref), p in zip(ref.named_parameters(), model.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-5, msg=lambda m, n=n: f'{n}: {m}')
        for (n, b_ref), b in zip(ref.named_buffers(), model.buffers()):
            if n.endswith('.state'):
                torch.testing.assert_close(b, b_ref, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f'{n}: {m}')
        ref.zero_grad()
        model.zero_grad()


def test_exported_training_under_checkpoint_matches_eager():
    """A torch.export'ed train-mode program, re-run by checkpointing, writes its state once."""
    make, shape = MODELS['ptl_resnet18']
    torch.manual_seed(0)
    ref = make(True, 'shared').train()
    x = torch.randn(*shape)
    exported = torch.export.export(copy.deepcopy(ref), (x,)).module()
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(*shape, generator=gen)
        y_ref, y = ref(x), checkpoint(exported, x, use_reentrant=False)
        torch.testing.assert_close(y, y_ref)
        y.square().mean().backward()
        states = {n: b for n, b in exported.named_buffers() if n.endswith('.state')}
        for n, b in ref.named_buffers():
            if n.endswith('.state'):
                torch.testing.assert_close(states[n], b, msg=lambda m, n=n: f'{n}: {m}')
