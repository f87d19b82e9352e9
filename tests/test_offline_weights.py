"""Offline ImageNet weights: converted by position, loaded through timm's pretrained path, real files; a first run
(cold cache) gives what every later run (warm cache) gives."""
import sys
from pathlib import Path

import pytest
import timm
import torch

import ptl_timm  # noqa: F401  (registers ptl_* models)
from ptl_timm.data.offline import package_file
from ptl_timm.offline.weights import OFFLINE_WEIGHTS, convert_by_position, create_offline_model, offline_weights_file


def test_mobilenetv2_matches_torchvision(tmp_path):
    """The converted weights give torchvision's ImageNet logits in timm's architecture."""
    import torchvision as tv
    spec = OFFLINE_WEIGHTS['mobilenetv2_100']
    source = torch.load(package_file(spec.package, spec.relative, spec.pip), weights_only=True)
    reference = tv.models.mobilenet_v2()
    reference.load_state_dict(source)
    model = create_offline_model('mobilenetv2_100', cache_dir=tmp_path)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference.eval()(x), rtol=1e-4, atol=1e-4)


def test_ptl_backbone_gets_the_same_weights_and_a_fresh_head(tmp_path):
    plain = create_offline_model('mobilenetv2_100', cache_dir=tmp_path, num_classes=7)
    ptl = create_offline_model('ptl_mobilenetv2_100', cache_dir=tmp_path, num_classes=7, img_size=64)
    assert plain.get_classifier().out_features == 7 and ptl.fc.out_features == 7
    backbone = ptl.backbone.state_dict()
    for key, value in plain.state_dict().items():
        if not key.startswith('classifier.'):
            torch.testing.assert_close(backbone[key], value, rtol=0, atol=0)


def test_cache_is_reused(tmp_path):
    path = offline_weights_file('mobilenetv2_100', cache_dir=tmp_path)
    stamp = path.stat().st_mtime_ns
    assert offline_weights_file('mobilenetv2_100', cache_dir=tmp_path) == path
    assert path.stat().st_mtime_ns == stamp


def test_efficientnet_lite0_converts(tmp_path):
    model = create_offline_model('tf_efficientnet_lite0', cache_dir=tmp_path, num_classes=3)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_wrong_architecture_is_refused():
    source = timm.create_model('resnet18').state_dict()
    with pytest.raises(ValueError, match='not the same architecture'):
        convert_by_position(source, timm.create_model('mobilenetv2_100'))
    swapped = dict(reversed(list(timm.create_model('mobilenetv2_100').state_dict().items())))
    with pytest.raises(ValueError, match='does not fit'):
        convert_by_position(swapped, timm.create_model('mobilenetv2_100'))


def test_unknown_architecture_names_the_available_ones():
    with pytest.raises(ValueError, match='mobilenetv2_100'):
        offline_weights_file('resnet50')


def test_cold_and_warm_cache_give_the_same_initial_weights(tmp_path):
    """The conversion builds a template model: it must not draw from the RNG the caller seeded, or a first run
    (empty cache) initialises the PTL branch and the head differently from every later one."""
    models, rng_after = [], []
    for _ in ('cold', 'warm'):
        torch.manual_seed(0)
        models.append(create_offline_model('ptl_mobilenetv2_100', cache_dir=tmp_path, num_classes=5, img_size=64))
        rng_after.append(torch.get_rng_state())
    cold, warm = (m.state_dict() for m in models)
    assert list(cold) == list(warm) and all(torch.equal(cold[k], warm[k]) for k in cold)
    assert torch.equal(*rng_after)


@pytest.mark.slow
def test_demo_run_is_the_same_with_a_cold_and_a_warm_cache(tmp_path, monkeypatch):
    """benchmarks/transfer.py's run (what benchmarks/demo.sh runs), small: the same accuracies and loss on the
    first run, which converts the weights, as on the next."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
    try:
        import transfer
    finally:
        sys.path.pop(0)
    monkeypatch.setenv('PTL_TIMM_CACHE', str(tmp_path))
    args = transfer.parse_args(['--quick', '--variants', 'shared', '--epochs', '1', '--min-steps', '3',
                                '--img-size', '32'])
    run = next(transfer.grid(args))
    cold = transfer.run_one(run)
    assert (tmp_path / 'mobilenetv2_100.offline.safetensors').is_file()
    warm = transfer.run_one(run)
    for key in ('final_loss', 'val_acc', 'test_acc', 'test_acc_no_cells'):
        assert cold[key] == warm[key], key
