"""The ``python -m ptl_timm`` command line, end to end in subprocesses: list, info, export, push, and the
errors (one line, no traceback, exit status 2)."""
import argparse
import os
import subprocess
import sys

import pytest
import timm
import torch
from helpers import repo_on_pythonpath, train_and_save
from huggingface_hub import constants as hf_constants
from safetensors.torch import load_file

import ptl_timm  # noqa: F401
import ptl_timm_cli
from ptl_timm import cli
from ptl_timm.hub.checkpoint import file_sha256
from ptl_timm.hub.io import export_checkpoint
from ptl_timm.hub.manifest import load_manifest

SIZE = 32


@pytest.fixture
def env(tmp_path):
    """A clean environment: its own empty Hub cache, offline, no token."""
    dropped = ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_OIDC_RESOURCE', 'HF_ENDPOINT')
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(HF_HOME=str(tmp_path / 'hf'), HF_HUB_CACHE=str(tmp_path / 'hf' / 'hub'), HF_HUB_OFFLINE='1',
               HF_TOKEN_PATH=str(tmp_path / 'hf' / 'no-token'), OMP_NUM_THREADS='1')
    return repo_on_pythonpath(env)


def run(env, *args):
    return subprocess.run([sys.executable, '-m', 'ptl_timm', *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)


def assert_clean_error(result, *needles):
    assert result.returncode == 2, result.stderr
    assert 'Traceback' not in result.stderr and result.stderr.startswith('error: '), result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A train.py-format checkpoint (timm's CheckpointSaver, EMA on) of ptl_resnet18 after a few steps on
    real Animal-MNIST images, and the trained model."""
    torch.manual_seed(0)
    model_kwargs = dict(img_size=SIZE, state_mode='carried', state_slots=4)
    model = timm.create_model('ptl_resnet18', num_classes=10, **model_kwargs)
    root = tmp_path_factory.mktemp('cli')
    ema = train_and_save(model, 'ptl_resnet18', model_kwargs, root, images=32, batch=8)
    return dict(path=root / 'last.pth.tar', ema=ema.module.eval(), root=root)


@pytest.fixture(scope='module')
def export_folder(checkpoint):
    """The EMA weights of ``checkpoint`` exported in process (the CLI's own export is tested end to end below)."""
    out = checkpoint['root'] / 'export'
    export_checkpoint(checkpoint['path'], out, use_ema=True)
    return out


@pytest.mark.slow
def test_list_shows_models_backbone_tags_and_manifest_checkpoints(env):
    result = run(env, 'list')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in timm.list_models('ptl_*'):
        assert any(line.startswith(name + ' ') for line in lines), name
    for name, entry in load_manifest().items():
        assert any(name in line and entry['status'] in line and entry['hf_hub_id'] in line for line in lines)


@pytest.mark.slow
def test_info_reports_config_params_stages_and_cell_widths(env):
    result = run(env, 'info', 'ptl_resnet18', '--model-kwargs', 'num_classes=5', f'img_size={SIZE}')
    assert result.returncode == 0, result.stderr
    model = timm.create_model('ptl_resnet18', num_classes=5, img_size=SIZE)
    out = result.stdout
    assert f'cell_widths: {list(model.cell_widths)}' in out
    assert f'params: {sum(p.numel() for p in model.parameters())}' in out
    assert 'num_classes: 5' in out and 'state_mode: shared' in out
    rows = [line.split() for line in out.splitlines() if line.startswith('  ') and line.split()[0].isdigit()]
    assert [(int(r[0]), int(r[1]), int(r[2])) for r in rows] == [
        (k, info['reduction'], info['num_chs']) for k, info in enumerate(model.backbone.feature_info)]
    assert [int(r[3]) for r in rows if r[3] != '-'] == [cells[-1].out_chs for cells in model.cells]
    plain = sum(p.numel() for p in timm.create_model('resnet18', num_classes=5).parameters())
    assert f'params_plain: {plain}' in out  # the overhead is counted as the model table counts it
    overhead = 100.0 * (sum(p.numel() for p in model.parameters()) - plain) / plain
    assert f'ptl_overhead: {overhead:+.1f} % parameters over resnet18 with the same 5 classes' in out


@pytest.mark.slow
def test_export_ema_end_to_end_then_push_fails_cleanly_offline(env, checkpoint, tmp_path):
    out = tmp_path / 'export'
    result = run(env, 'export', checkpoint['path'], out, '--ema')
    assert result.returncode == 0, result.stderr
    assert 'state_dict_ema' in result.stdout and 'bit-identical' in result.stdout
    for name in ('model.safetensors', 'config.json', 'README.md'):
        assert f'{name}  sha256 {file_sha256(out / name)}' in result.stdout
    weights = load_file(str(out / 'model.safetensors'))
    assert all(torch.equal(weights[k], v) for k, v in checkpoint['ema'].state_dict().items())
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert loaded.state_mode == 'carried' and loaded.cells[0][0].state.shape[0] == 4
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), checkpoint['ema'](x))

    assert_clean_error(run(env, 'push', out, 'someone/ptl_resnet18.test'), 'someone/ptl_resnet18.test',
                       'HF_HUB_OFFLINE')


def in_process(capsys, *args):
    """``cli.main`` in this process (cheaper than a subprocess); returns (exit status, stderr)."""
    status = cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert err == '' if status == 0 else (err.startswith('error: ') and err.count('\n') == 1), err
    return status, err


def test_errors_are_one_line_with_exit_status_2(checkpoint, export_folder, offline_cache, tmp_path, capsys,
                                               monkeypatch):
    status, err = in_process(capsys, 'info', 'hf-hub:someone/not-cached')
    assert status == 2 and 'someone/not-cached' in err and str(offline_cache) in err and 'HF_HUB_OFFLINE' in err
    status, err = in_process(capsys, 'export', tmp_path / 'missing.pth.tar', tmp_path / 'o')
    assert status == 2 and 'missing.pth.tar' in err
    truncated = tmp_path / 'truncated.pth.tar'
    data = checkpoint['path'].read_bytes()
    truncated.write_bytes(data[:len(data) // 3])
    status, err = in_process(capsys, 'export', truncated, tmp_path / 'o')
    assert status == 2 and 'truncated' in err
    status, err = in_process(capsys, 'push', tmp_path, 'someone/x')
    assert status == 2 and 'model.safetensors' in err and 'ptl-timm export' in err
    # online mode but no token: refused before any network call
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(hf_constants, 'HF_TOKEN_PATH', str(tmp_path / 'no-token'))
    for var in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_OIDC_RESOURCE'):
        monkeypatch.delenv(var, raising=False)
    status, err = in_process(capsys, 'push', export_folder, 'someone/x')
    assert status == 2 and 'not logged in' in err and 'HF_TOKEN' in err


def test_one_meaning_per_flag_across_commands():
    """--model-kwargs reads values as train.py does (Python literals, else text) in every command; --ema and
    --img-size H [W] are the same flags wherever they appear."""
    parser = cli.build_parser()
    args = parser.parse_args(['info', 'ptl_resnet18', '--model-kwargs', 'cell_norm=True', 'img_size=64',
                              'cell_widths=[8,8,16,32,64]', 'state_mode=carried', 'drop_rate=0.1'])
    assert args.model_kwargs == dict(cell_norm=True, img_size=64, cell_widths=[8, 8, 16, 32, 64],
                                     state_mode='carried', drop_rate=0.1)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert not {'zoo', 'manifest-table'} & set(subparsers), 'maintainer commands live in weights/zoo.py'
    flags = {name: {opt: a for a in p._actions for opt in a.option_strings} for name, p in subparsers.items()}
    for command in ('export', 'deploy', 'extract'):
        assert isinstance(flags[command]['--model-kwargs'], ptl_timm_cli.ModelKwargs), command
        assert flags[command]['--ema'].const is True and flags[command]['--img-size'].nargs == '+', command
    assert isinstance(flags['info']['--model-kwargs'], ptl_timm_cli.ModelKwargs)
    assert not any(opt == '--use-ema' for command in flags.values() for opt in command)
    with pytest.raises(SystemExit):
        parser.parse_args(['info', 'ptl_resnet18', '--model-kwargs', 'no_value'])


def test_the_parser_answers_without_torch_and_names_the_packages_choices():
    """`ptl-timm -h` parses before anything imports torch; its choices are the package's own."""
    from ptl_timm.deploy import EXPORT_FORMATS
    from ptl_timm.launch import SCRIPT_NAMES

    assert set(ptl_timm_cli.EXPORT_FORMATS) == set(EXPORT_FORMATS)
    assert tuple(ptl_timm_cli.SCRIPT_NAMES) == tuple(SCRIPT_NAMES)
    code = ('import sys, ptl_timm_cli\n'
            'try:\n    ptl_timm_cli.main(["train-reid", "-h"])\nexcept SystemExit:\n    pass\n'
            'assert "torch" not in sys.modules, "the parser imported torch"\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert '--ids-per-batch' in out.stdout
