"""What timm's train.py does to a model, done to ptl_* models with the same timm APIs (train.py itself is not in
the timm wheel: the real run is in docs/training.md), and ``ptl-timm run`` (ptl_timm.launch)."""
import argparse
import os
import subprocess
import sys
from typing import List, Tuple

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import repo_on_pythonpath
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.layers import convert_sync_batchnorm
from timm.models import load_checkpoint, resume_checkpoint
from timm.optim import create_optimizer_v2
from timm.utils import CheckpointSaver, ModelEmaV3

from ptl_timm import PTLNet, bconv_cells
from ptl_timm.launch import SCRIPTS_ENV, resolve_script

MODEL = 'ptl_resnet18'
NUM_CLASSES = 5
SIZE = 32



def _model(**kwargs) -> PTLNet:
    torch.manual_seed(0)
    return timm.create_model(MODEL, num_classes=NUM_CLASSES, img_size=SIZE, **kwargs)


def _batches(n: int, batch: int = 4, seed: int = 1) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, SIZE, SIZE, generator=gen), torch.randint(0, NUM_CLASSES, (batch,), generator=gen))
            for _ in range(n)]


def _states(model: torch.nn.Module) -> List[torch.Tensor]:
    return [cell.state.clone() for cell in bconv_cells(model)]


def _train(model: torch.nn.Module, batches, optimizer=None, memory_format=torch.contiguous_format,
           ) -> List[torch.Tensor]:
    """train.py's inner loop (forward, loss, backward, step); returns the logits of each step."""
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    logits = []
    for x, y in batches:
        out = model(x.contiguous(memory_format=memory_format))
        optimizer.zero_grad()
        F.cross_entropy(out.float(), y).backward()
        optimizer.step()
        logits.append(out.detach())
    return logits


def _assert_states_close(a: torch.nn.Module, b: torch.nn.Module, **tol) -> None:
    for sa, sb in zip(_states(a), _states(b), strict=True):
        torch.testing.assert_close(sa, sb, **tol)


@pytest.fixture(scope='module')
def eager():
    """The eager model trained two steps on ``_batches(2)``, and its logits: the reference that channels_last,
    grad checkpointing, SyncBatchNorm and torch.compile must reproduce (tests only read it)."""
    model = _model()
    return model, _train(model, _batches(2))


def test_train_then_eval_each_epoch():
    """train.py calls .train() before and .eval() after every epoch: train writes the state, eval only reads it."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x_val = torch.randn(6, 3, SIZE, SIZE)
    previous = None
    for epoch in range(2):
        before = _states(model)
        _train(model, _batches(2, seed=epoch), optimizer)
        after = _states(model)
        assert all(not torch.equal(b, a) for b, a in zip(before, after)), f'epoch {epoch}: state not updated'
        model.eval()
        with torch.no_grad():
            out = model(x_val)
            torch.testing.assert_close(model(x_val[:2]), out[:2])  # batch-independent and repeatable
        assert all(torch.equal(a, s) for a, s in zip(after, _states(model))), 'eval wrote the state'
        if previous is not None:
            assert not torch.allclose(previous, out), 'eval ignores the state trained in between'
        previous = out


def test_model_ema_v3_averages_the_latent_state():
    model = _model()
    ema = ModelEmaV3(model, decay=0.8)
    expected = _states(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step, batch in enumerate(_batches(3), start=1):
        _train(model, [batch], optimizer)
        ema.update(model, step=step)  # as train.py: step = number of optimizer updates so far
        weight = 1. - ema.get_decay(step)
        expected = [e + weight * (s - e) for e, s in zip(expected, _states(model))]
    assert ema.get_decay(3) == pytest.approx(0.8)
    for got, want, model_state in zip(_states(ema.module), expected, _states(model), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got, model_state), 'the EMA state is a copy, not an average'
    # the EMA model is evaluated by train.py: eval reads its averaged state and never writes it
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ema.module(x)
    torch.testing.assert_close(_states(ema.module), expected, rtol=1e-5, atol=1e-6)
    # the frozen flag (a bool buffer) is copied, not averaged
    model.freeze_state()
    ema.update(model, step=4)
    assert all(bool(cell.state_frozen) for cell in bconv_cells(ema.module))


def test_create_optimizer_v2_layer_decay_keeps_the_ptl_branch_at_full_lr():
    model = _model()
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.7)
    groups = optimizer.param_groups
    owner = {id(p): g for g in groups for p in g['params']}
    named = dict(model.named_parameters())
    assert len(owner) == len(named) == sum(len(g['params']) for g in groups), 'a parameter is missing or repeated'
    top = max(g['lr_scale'] for g in groups)
    assert top == pytest.approx(1.0)
    fresh = [n for n in named if not n.startswith('backbone.')]
    assert any(n.startswith('cells.') for n in fresh) and 'fc.weight' in fresh
    for name in fresh:
        assert owner[id(named[name])]['lr_scale'] == pytest.approx(top), f'{name} does not get the full lr'
    assert owner[id(named['backbone.conv1.weight'])]['lr_scale'] < 0.5 * top, 'the stem is not decayed'
    for name, p in named.items():
        if p.ndim <= 1:
            assert owner[id(p)]['weight_decay'] == 0, f'{name} (bias / norm) gets weight decay'
    cell_weight = next(bconv_cells(model)).conv.weight
    before = cell_weight.clone()
    _train(model, _batches(1), optimizer)
    assert not torch.equal(before, cell_weight)


def test_resolve_data_config_follows_the_backbone_and_the_command_line():
    model = _model()
    plain = timm.create_model('resnet18')
    cfg = resolve_data_config({}, model=model)
    assert cfg == resolve_data_config({}, model=plain)
    # train.py passes vars(args): --img-size overrides the input size
    args = dict(img_size=48, input_size=None, crop_pct=None, mean=None, std=None, interpolation='')
    cfg = resolve_data_config(args, model=model)
    assert cfg['input_size'] == (3, 48, 48)
    for is_training in (True, False):
        image = Image.new('RGB', (70, 60), (120, 30, 200))
        x = create_transform(**cfg, is_training=is_training)(image)
        assert x.shape == (3, 48, 48)
    model.eval()
    with torch.no_grad():
        assert model(x.unsqueeze(0)).shape == (1, NUM_CLASSES)


@pytest.mark.slow
def test_checkpoint_saver_resume_and_create_model_restore_the_latent_state(tmp_path):
    model = _model()
    ema = ModelEmaV3(model, decay=0.5)
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05)
    _train(model, _batches(2), optimizer)
    ema.update(model, step=2)
    args = argparse.Namespace(model=MODEL, num_classes=NUM_CLASSES)
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=ema, checkpoint_dir=str(tmp_path),
                            recovery_dir=str(tmp_path), max_history=2)
    saver.save_checkpoint(epoch=0, metric=50.)
    best = tmp_path / 'model_best.pth.tar'
    assert best.is_file() and (tmp_path / 'last.pth.tar').is_file()

    # create_model(checkpoint_path=) loads the EMA weights when the checkpoint has them (timm's default)
    from_ema = timm.create_model(MODEL, num_classes=NUM_CLASSES, img_size=SIZE, checkpoint_path=str(best))
    for k, v in ema.module.state_dict().items():
        assert torch.equal(from_ema.state_dict()[k], v), k
    # validate.py: --checkpoint, with and without --use-ema
    plain = _model(pretrained=False)
    load_checkpoint(plain, str(best), use_ema=False)
    for k, v in model.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k

    # train.py --resume: weights, latent state and optimizer; training then continues exactly as if uninterrupted
    resumed = _model()
    resumed_opt = create_optimizer_v2(resumed, 'adamw', lr=1e-3, weight_decay=0.05)
    assert resume_checkpoint(resumed, str(tmp_path / 'last.pth.tar'), optimizer=resumed_opt, log_info=False) == 1
    assert all(torch.equal(a, b) for a, b in zip(_states(model), _states(resumed), strict=True))
    more = _batches(2, seed=7)
    _train(model, more, optimizer)
    _train(resumed, more, resumed_opt)
    _assert_states_close(model, resumed, rtol=0, atol=0)


def test_autocast_bf16_trains_with_a_float32_state():
    model, ref = _model(), _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _batches(1)[0]
    model.train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x)
        loss = F.cross_entropy(out, y)
    loss.backward()
    assert out.dtype == torch.bfloat16
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
    ref.train()
    with torch.no_grad():
        ref(x)
    for got, want in zip(_states(model), _states(ref), strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)  # bf16 keeps ~3 significant digits
    model.eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert torch.isfinite(model(x)).all()


def test_channels_last_matches_contiguous_and_checkpoints_are_portable(eager):
    ref, out_ref = eager
    cl = _model().to(memory_format=torch.channels_last)
    out_cl = _train(cl, _batches(2), memory_format=torch.channels_last)
    torch.testing.assert_close(out_cl, out_ref, rtol=1e-4, atol=1e-4)
    _assert_states_close(cl, ref, rtol=1e-4, atol=1e-5)
    loaded = _model()
    loaded.load_state_dict(cl.state_dict())
    _assert_states_close(loaded, cl, rtol=0, atol=0)


def test_grad_checkpointing_gives_the_same_training_and_writes_the_state_once(eager):
    ref, out_ref = eager
    ckpt = _model()
    ckpt.set_grad_checkpointing(True)
    torch.testing.assert_close(_train(ckpt, _batches(2)), out_ref, rtol=1e-5, atol=1e-5)
    _assert_states_close(ckpt, ref, rtol=1e-5, atol=1e-6)
    for (n, a), b in zip(ckpt.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f'{n}: {m}')


def test_sync_batchnorm_conversion_keeps_cells_and_checkpoints(eager):
    """train.py --sync-bn converts with timm's convert_sync_batchnorm. Without a process group SyncBatchNorm
    behaves as BatchNorm (torch trains it across ranks on GPUs only), so training must match the plain model."""
    ref, out_ref = eager
    synced = convert_sync_batchnorm(_model())
    norms = [m for m in synced.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    assert len(list(bconv_cells(synced))) == len(list(bconv_cells(ref)))
    sd, ref_sd = synced.state_dict(), ref.state_dict()
    assert list(sd) == list(ref_sd) and all(sd[k].shape == ref_sd[k].shape for k in sd)
    torch.testing.assert_close(_train(synced, _batches(2)), out_ref, rtol=1e-5, atol=1e-5)
    _assert_states_close(synced, ref, rtol=1e-5, atol=1e-6)
    plain = _model()
    plain.load_state_dict(synced.state_dict())
    _assert_states_close(plain, synced, rtol=0, atol=0)


def test_torch_compile_trains_like_eager(eager):
    """train.py --torchcompile. The aot_eager backend runs Dynamo and AOTAutograd (where the in-place state write
    is functionalised) without inductor's C++ build, which takes minutes on a small CPU. The second step reads
    the state the first wrote (inductor's partitioner, which could recompute a state read after its write, is
    checked in tests/test_device.py and tests/test_compile.py; docs/training.md, torch.compile)."""
    ref, out_ref = eager
    compiled_src = _model()
    compiled = torch.compile(compiled_src, backend='aot_eager')
    torch.testing.assert_close(_train(compiled, _batches(2)), out_ref, rtol=1e-4, atol=1e-5)
    _assert_states_close(compiled_src, ref, rtol=1e-4, atol=1e-6)
    assert all(s.abs().amax() > 0 for s in _states(compiled_src))


# --- ptl-timm run (ptl_timm.launch) -------------------------------------------------------------------------

SCRIPT = '''import sys
import timm
print('registered', timm.is_model('ptl_resnet18'), 'name', __name__, 'argv', sys.argv[1:])
'''


@pytest.mark.slow
def test_launch_runs_a_script_with_ptl_models_registered(tmp_path):
    script = tmp_path / 'validate.py'
    script.write_text(SCRIPT)
    env = repo_on_pythonpath(dict(os.environ, **{SCRIPTS_ENV: str(tmp_path)}))
    cmd = [sys.executable, '-m', 'ptl_timm', 'run', 'validate', '--model', 'ptl_resnet18', '-b', '4']
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "registered True name __main__ argv ['--model', 'ptl_resnet18', '-b', '4']" in result.stdout


def test_launch_resolves_names_and_paths_and_explains_what_is_missing(tmp_path, monkeypatch):
    (tmp_path / 'train.py').write_text(SCRIPT)
    monkeypatch.delenv(SCRIPTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=SCRIPTS_ENV):
        resolve_script('train')
    assert resolve_script('train', str(tmp_path)) == (tmp_path / 'train.py').resolve()
    monkeypatch.setenv(SCRIPTS_ENV, str(tmp_path))
    assert resolve_script('train') == (tmp_path / 'train.py').resolve()
    assert resolve_script(str(tmp_path / 'train.py')) == (tmp_path / 'train.py').resolve()
    with pytest.raises(FileNotFoundError, match='git clone .*pytorch-image-models'):
        resolve_script('inference')
    with pytest.raises(FileNotFoundError, match='one of train, validate, inference'):
        resolve_script('valdate')
