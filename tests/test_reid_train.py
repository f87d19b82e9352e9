"""``ptl-timm train-reid`` end to end on tiny folders: a Market-1501 layout of JPEGs written here and an emoji subset.

Trains a couple of steps, evaluates, writes a checkpoint that ``ptl-timm extract``, ``export`` and ``deploy`` read,
resumes bit-exactly; plain, control (cells removed) and PTL models alike.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from helpers import torchrun
from PIL import Image
from test_emoji_reid import make_emoji_modules

from ptl_timm.cli import build_parser, main
from ptl_timm.deploy import load_exported
from ptl_timm.reid import read_reid_data, train_reid
from ptl_timm.reid.train import config_from_args, load_training_checkpoint

SIZE = ['64', '32']
BASE = ['--img-size', *SIZE, '--ids-per-batch', '3', '--num-instances', '2', '--no-pretrained', '--no-progress',
        '--lr', '0.01']
MODELS = {
    'plain': ['--model', 'reid_resnet18'],
    'control': ['--model', 'reid_ptl_resnet18', '--model-kwargs', 'cells_removed=True'],
    'ptl': ['--model', 'reid_ptl_resnet18'],
}


def write_market(root: Path, ids: int = 6, seed: int = 0) -> Path:
    """bounding_box_train / bounding_box_test / query of tiny JPEGs named <pid>_c<cam>s1_<n>_00.jpg: every identity
    a colour, seen by two cameras; a junk (-1) and a distractor (0000) image in the gallery."""
    rng = np.random.default_rng(seed)
    base = root / 'Market-1501-v15.09.15'
    for folder in ('bounding_box_train', 'bounding_box_test', 'query'):
        (base / folder).mkdir(parents=True)
    colours = rng.integers(0, 256, (2 * ids + 1, 3))

    def save(folder: str, pid: int, cam: int, n: int) -> None:
        img = np.clip(colours[max(pid, 0) % len(colours)] + rng.normal(0, 30, (64, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(base / folder / f'{pid:04d}_c{cam}s1_{n:06d}_00.jpg'.replace('-001', '-1'))

    for pid in range(1, ids + 1):
        for cam in (1, 2):
            for n in range(2):
                save('bounding_box_train', pid, cam, n)
    for pid in range(ids + 1, 2 * ids + 1):
        save('query', pid, 1, 0)
        for n in range(2):
            save('bounding_box_test', pid, 2, n)
        save('bounding_box_test', pid, 1, 5)  # same camera as its query: removed from that query's gallery
    save('bounding_box_test', 0, 3, 0)
    save('bounding_box_test', -1, 3, 1)
    return base


class Interrupted(Exception):
    pass


def _interrupt(epoch: int, record: dict) -> None:
    raise Interrupted(epoch)


@pytest.fixture(scope='module')
def market(tmp_path_factory) -> Path:
    return write_market(tmp_path_factory.mktemp('market'))


def _train(market: Path, out: Path, model: str, *extra: str) -> dict:
    assert main(['train-reid', str(market), *BASE, *MODELS[model], '--output', str(out), '--eval-every', '1',
                 *extra]) == 0
    return json.loads((out / 'metrics.json').read_text())


@pytest.mark.parametrize('model', list(MODELS))
def test_train_evaluate_resume_bit_exactly_and_extract(market, tmp_path, model, capsys):
    straight = _train(market, tmp_path / 'straight', model, '--epochs', '2', '--memory', 'identity', 'xbm')
    m = straight['metrics']
    assert 0 < m['mAP'] <= 100 and 0 <= m['rank1'] <= 100 and len(straight['history']) == 2
    assert all(0 < h['metrics']['mAP'] <= 100 for h in straight['history'])  # --eval-every 1

    # the same run stopped after its first epoch (as if killed), then resumed from its checkpoint: every tensor equal
    args = build_parser().parse_args(['train-reid', str(market), *BASE, *MODELS[model], '--eval-every', '1',
                                      '--output', str(tmp_path / 'split'), '--epochs', '2', '--memory', 'identity',
                                      'xbm'])
    with pytest.raises(Interrupted):
        train_reid(config_from_args(args), read_reid_data(market, (64, 32)), on_epoch=_interrupt)
    first = load_training_checkpoint(tmp_path / 'split' / 'last.pth.tar')
    assert first['epoch'] == 1 and first['arch'] == MODELS[model][1]
    _train(market, tmp_path / 'split', model, '--epochs', '2', '--memory', 'identity', 'xbm',
           '--resume', str(tmp_path / 'split' / 'last.pth.tar'))
    a = load_training_checkpoint(tmp_path / 'straight' / 'last.pth.tar')
    b = load_training_checkpoint(tmp_path / 'split' / 'last.pth.tar')
    for part in ('state_dict', 'criterion'):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            va, vb = a[part][k], b[part][k]
            assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, (part, k)
    assert a['history'][-1]['metrics'] == b['history'][-1]['metrics']
    assert any(k.startswith('memories.0.centroids') for k in a['criterion'])

    # the checkpoint is what `ptl-timm extract` takes
    npy = tmp_path / 'query.npy'
    kwargs = ['--model-kwargs', 'img_size=(64,32)'] + (['cells_removed=True'] if model == 'control' else [])
    assert main(['extract', str(market / 'query'), str(npy), '--model', MODELS[model][1], '--checkpoint',
                 str(tmp_path / 'straight' / 'last.pth.tar'), '--img-size', *SIZE, *kwargs]) == 0
    feats = np.load(npy)
    assert feats.shape[0] == 6 and np.isfinite(feats).all()

    # ... and what `ptl-timm export` (a Hub folder, reloaded bit for bit) and `ptl-timm deploy` (.pt2) take: the
    # deployed program gives the reloaded model's eval output
    checkpoint = tmp_path / 'straight' / 'last.pth.tar'
    assert main(['export', str(checkpoint), str(tmp_path / 'hub')]) == 0
    reloaded = timm.create_model(f'local-dir:{tmp_path / "hub"}', pretrained=True).eval()
    assert reloaded.state_dict().keys() == a['state_dict'].keys()
    assert all(torch.equal(v, a['state_dict'][k]) for k, v in reloaded.state_dict().items())
    assert main(['deploy', str(checkpoint), str(tmp_path / 'model.pt2'), '--no-check']) == 0  # checked below
    x = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_exported(tmp_path / 'model.pt2')(x), reloaded(x))


def test_train_reid_on_an_emoji_subset(tmp_path, monkeypatch):
    root = make_emoji_modules(tmp_path / 'node_modules', num_plain=40)
    monkeypatch.setenv('PTL_TIMM_CACHE', str(tmp_path / 'cache'))
    out = tmp_path / 'run'
    assert main(['train-reid', str(root), '--dataset', 'emoji', '--model', 'reid_ptl_resnet18', '--img-size', '32',
                 '--ids-per-batch', '4', '--num-instances', '2', '--epochs', '1', '--no-pretrained', '--no-progress',
                 '--output', str(out)]) == 0
    m = json.loads((out / 'metrics.json').read_text())['metrics']
    assert 0 < m['mAP'] <= 100 and set(m['per_camera']) == {'0', '1', '2', '3'}


def test_bad_input_is_named(market, tmp_path, capsys):
    assert main(['train-reid', str(tmp_path), *BASE, *MODELS['plain']]) == 2
    assert 'bounding_box_train' in capsys.readouterr().err
    assert main(['train-reid', '--model', 'reid_resnet18']) == 2
    assert 'needs DATA' in capsys.readouterr().err
    assert main(['train-reid', str(market), *BASE, '--model', 'resnet18']) == 2
    assert 'not a ReID model' in capsys.readouterr().err


@pytest.mark.slow
def test_train_reid_under_torchrun(market, tmp_path):
    """Two gloo ranks, each on its share of the batches, the identity memory updated from both."""
    torchrun(['-m', 'ptl_timm', 'train-reid', str(market), *BASE, *MODELS['ptl'], '--epochs', '1', '--output',
              str(tmp_path)], timeout=300)
    ckpt = load_training_checkpoint(tmp_path / 'last.pth.tar')
    assert ckpt['epoch'] == 1 and 0 < json.loads((tmp_path / 'metrics.json').read_text())['metrics']['mAP']
