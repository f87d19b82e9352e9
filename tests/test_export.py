"""Deployment export: ONNX (dynamic batch, checked with onnxruntime), torch.export and TorchScript, state baked in."""
import argparse
import copy
import logging

import onnx
import pytest
import timm
import torch
import torch.nn.functional as F

from ptl_timm import bconv_cells
from ptl_timm.cli import main
from ptl_timm.deploy import (
    check_export,
    example_input,
    export_model,
    export_onnx,
    load_exported,
    prepare_for_export,
)

MODEL = 'ptl_resnet18'
NUM_CLASSES = 5
SIZE = 32
INPUT_SIZE = (3, SIZE, SIZE)



def _trained(seed: int = 0) -> torch.nn.Module:
    """A small ptl model after a few training steps: a non-zero state, BN statistics that moved."""
    torch.manual_seed(seed)
    model = timm.create_model(MODEL, num_classes=NUM_CLASSES, img_size=SIZE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(3):
        x, y = torch.randn(4, *INPUT_SIZE), torch.randint(0, NUM_CLASSES, (4,))
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert all(cell.state.abs().amax() > 0 for cell in bconv_cells(model))
    return model


@pytest.fixture(scope='module')
def trained():
    return _trained()


@pytest.mark.slow
def test_onnx_has_a_dynamic_batch_the_state_inside_and_matches_pytorch_eval(trained, tmp_path):
    path = export_onnx(trained, tmp_path / 'model.onnx', input_size=INPUT_SIZE)
    assert [p.name for p in tmp_path.iterdir()] == ['model.onnx'], 'weights and state belong inside the one file'
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ['input'], 'the state must be baked in, not an input'
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value, 'batch dimension is not dynamic'
    assert [d.dim_value for d in dims[1:]] == list(INPUT_SIZE)
    worst = check_export(trained, path, input_size=INPUT_SIZE, batch_sizes=(1, 3, 8), rtol=1e-3, atol=1e-5)
    assert worst < 1e-4


@pytest.fixture(scope='module')
def program(trained, tmp_path_factory):
    """``trained`` exported once with torch.export (the slowest exporter after ONNX)."""
    return export_model(trained, tmp_path_factory.mktemp('export') / 'model.pt2', input_size=INPUT_SIZE)


def test_torch_export_matches_pytorch_eval_and_rejects_another_image_size(trained, program):
    check_export(trained, program, input_size=INPUT_SIZE, batch_sizes=(1, 3), rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match='(?i)shape|dim|size|guard|constraint'):
        load_exported(program)(torch.randn(2, 3, SIZE * 2, SIZE * 2))


@pytest.mark.slow
def test_torchscript_matches_pytorch_eval(trained, tmp_path):
    """Compiled, not traced: the file takes any image size, the state resampled as in eager."""
    path = export_model(trained, tmp_path / 'model.pt', input_size=INPUT_SIZE)
    check_export(trained, path, input_size=INPUT_SIZE, batch_sizes=(1, 3), rtol=1e-5, atol=1e-6)
    other = (INPUT_SIZE[0], INPUT_SIZE[1] + 16, INPUT_SIZE[2] + 8)
    check_export(trained, path, input_size=other, batch_sizes=(2,), rtol=1e-5, atol=1e-6)


def test_export_uses_a_frozen_copy_and_leaves_the_model_alone(trained, program):
    # ``program`` was exported from ``trained``: the model itself is still as training left it
    assert trained.training and not trained.state_frozen and all(p.requires_grad for p in trained.parameters())
    model = copy.deepcopy(trained)
    states = [cell.state.clone() for cell in bconv_cells(model)]
    snapshot = prepare_for_export(model)
    assert not snapshot.training and snapshot.state_frozen
    x = example_input(model, INPUT_SIZE, batch_size=3)
    with torch.no_grad():
        torch.testing.assert_close(load_exported(program)(x), snapshot(x), rtol=1e-5, atol=1e-6)
        snapshot.train()(x)  # a frozen state is not written, even in train mode
        model(torch.randn(4, *INPUT_SIZE))  # the original keeps training
    assert all(torch.equal(cell.state, s) for cell, s in zip(bconv_cells(snapshot), states))
    assert not any(torch.equal(cell.state, s) for cell, s in zip(bconv_cells(model), states))


def test_export_warns_about_an_untrained_state(caplog):
    model = timm.create_model(MODEL, num_classes=NUM_CLASSES, img_size=SIZE)
    with caplog.at_level(logging.WARNING, logger='ptl_timm.deploy'):
        prepare_for_export(model)
    assert 'all-zero initial state' in caplog.text


def test_export_bad_arguments_say_what_to_do(trained, tmp_path):
    with pytest.raises(ValueError, match='fmt= one of'):
        export_model(trained, tmp_path / 'model.bin')
    with pytest.raises(ValueError, match='Unknown export format'):
        export_model(trained, tmp_path / 'model.pt', fmt='tflite')
    with pytest.raises(ValueError, match='opset_version must be >= 18'):
        export_onnx(trained, tmp_path / 'model.onnx', opset_version=17)
    with pytest.raises(ValueError, match=r'\(channels, height, width\)'):
        example_input(trained, (SIZE, SIZE))


@pytest.mark.slow
def test_cli_exports_the_ema_weights_of_a_train_py_checkpoint(trained, tmp_path):
    ema = _trained(seed=2)
    checkpoint = tmp_path / 'model_best.pth.tar'
    # the layout timm's CheckpointSaver writes (tests/test_training_api.py checks it with the saver itself)
    torch.save({'epoch': 1, 'state_dict': trained.state_dict(), 'state_dict_ema': ema.state_dict()}, checkpoint)
    out = tmp_path / 'model.pt'
    assert main(['deploy', str(checkpoint), str(out), '--model', MODEL, '--ema', '--img-size', str(SIZE),
                 '--model-kwargs', f'num_classes={NUM_CLASSES}', f'img_size={SIZE}']) == 0
    x = example_input(ema, INPUT_SIZE, batch_size=2)
    with torch.no_grad():
        torch.testing.assert_close(load_exported(out)(x), prepare_for_export(ema)(x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_cli_rebuilds_the_model_a_train_py_checkpoint_describes_and_rejects_bad_files(trained, tmp_path, capsys):
    """train.py's CheckpointSaver stores ``arch`` and its args: no --model or --model-kwargs needed. Bad files give
    one ``error:`` line and exit status 2."""
    checkpoint = tmp_path / 'last.pth.tar'
    train_args = argparse.Namespace(model=MODEL, model_kwargs=dict(img_size=SIZE), img_size=SIZE, input_size=None,
                                    in_chans=None, gp=None)
    torch.save({'arch': MODEL, 'args': train_args, 'epoch': 3, 'state_dict': trained.state_dict()}, checkpoint)
    out = tmp_path / 'model.pt2'
    assert main(['deploy', str(checkpoint), str(out)]) == 0
    x = example_input(trained, INPUT_SIZE, batch_size=2)
    with torch.no_grad():
        torch.testing.assert_close(load_exported(out)(x), prepare_for_export(trained)(x), rtol=1e-5, atol=1e-6)
    capsys.readouterr()

    truncated = tmp_path / 'truncated.pth.tar'
    truncated.write_bytes(checkpoint.read_bytes()[:1000])
    other_size = tmp_path / 'resnet.pth.tar'
    torch.save({'arch': 'ptl_resnet34', 'state_dict': trained.state_dict()}, other_size)
    for argv, needle in [
        ([str(truncated)], 'truncated'),
        ([str(other_size)], 'layer'),  # resnet34 has more blocks: the missing keys are named
        ([str(checkpoint), '--ema'], 'state_dict_ema'),
        ([str(tmp_path / 'missing.pth.tar')], 'missing.pth.tar'),
    ]:
        assert main(['deploy', argv[0], str(tmp_path / 'x.pt2'), *argv[1:]]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith('error: ') and needle in err and 'Traceback' not in err, (argv, err)
    # an error that names a library argument names its flag too
    main(['deploy', str(checkpoint), str(tmp_path / 'x.pt2'), '--ema'])
    assert '--ema for use_ema' in capsys.readouterr().err


def test_export_follows_the_models_device(trained, device, tmp_path):
    """The example input (and so the traced graph and its check) lives where the model lives."""
    model = copy.deepcopy(trained).to(device)
    x = example_input(model, INPUT_SIZE)
    assert x.device == next(model.parameters()).device and x.dtype == next(model.parameters()).dtype
    path = export_model(model, tmp_path / 'model.pt2', input_size=INPUT_SIZE)
    assert check_export(model, path, input_size=INPUT_SIZE, rtol=1e-5, atol=1e-6) <= 1e-6
