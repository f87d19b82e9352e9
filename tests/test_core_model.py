"""PTLNet and the ptl_* registry: the timm model interface, state rules on whole models, loading."""
import copy
import logging
import re
from pathlib import Path

import pytest
import timm
import timm.optim
import torch
from safetensors.torch import load, save, save_file
from timm.models import get_arch_pretrained_cfgs, split_model_name_tag

import ptl_timm
from ptl_timm import PTLNet, bconv_cells
from ptl_timm.hub.io import load_model, save_pretrained
from ptl_timm.layers import StageFuse
from ptl_timm.models._helpers import backbone_filter_fn

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
REGISTERED = timm.list_models(module='ptlnet')  # the ptl_* PTLNet models: the registry is the list


def _small(name: str = 'ptl_resnet18', **kwargs) -> PTLNet:
    torch.manual_seed(0)
    kwargs.setdefault('num_classes', 7)
    kwargs.setdefault('img_size', SIZE)
    return timm.create_model(name, **kwargs)


def _trained(model: PTLNet, steps: int = 3, batch: int = 4) -> PTLNet:
    """A few training forwards so the latent state is non-trivial."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(batch, model.in_chans, SIZE, SIZE))
    return model


def _pattern_list(matcher):
    for spec in matcher.values():
        if spec is None:
            continue
        for p in ([s[0] for s in spec] if isinstance(spec, (list, tuple)) else [spec]):
            yield re.compile(p)


def test_the_model_table_lists_every_registered_model():
    """benchmarks/results/models.md (the README's model table) is regenerated when the registry changes."""
    rows = [line for line in (ROOT / 'benchmarks' / 'results' / 'models.md').read_text().splitlines()[2:]
            if line.startswith('| `')]
    assert sorted(row.split('`')[1] for row in rows) == sorted(REGISTERED), 'run python benchmarks/model_table.py'
    assert len(REGISTERED) >= 16


@pytest.mark.parametrize('name', REGISTERED)
def test_variant_forward_backward_every_param_gets_grad_and_matcher_covers_all(name):
    model = _small(name).train()
    x = torch.randn(2, 3, SIZE, SIZE)
    out = model(x)
    assert out.shape == (2, 7)
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f'parameters without gradient: {no_grad[:5]}'
    assert list(dict(model.named_children()))[-1] == 'fc', 'the head must be registered last'
    for coarse in (False, True):
        patterns = list(_pattern_list(model.group_matcher(coarse=coarse)))
        unmatched = [n for n, _ in model.named_parameters() if not any(p.match(n) for p in patterns)]
        assert not unmatched, f'group_matcher(coarse={coarse}) misses {unmatched[:5]}'
    bb_name = split_model_name_tag(name)[0][len('ptl_'):]
    ptl_tags = {split_model_name_tag(n)[1] for n in get_arch_pretrained_cfgs(name)}
    bb_tags = {split_model_name_tag(n)[1] for n in get_arch_pretrained_cfgs(bb_name)}
    assert bb_tags <= ptl_tags, "every backbone tag is offered (full PTL tags may come on top)"


def test_default_overhead_in_parameters_stays_small():
    for name in ('ptl_resnet50', 'ptl_densenet161', 'ptl_mobilenetv2_100', 'ptl_convnext_tiny'):
        model = timm.create_model(name, num_classes=0)
        plain = sum(p.numel() for p in model.backbone.parameters())
        total = sum(p.numel() for p in model.parameters())
        assert total / plain <= 1.10, f'{name}: +{total / plain - 1:.1%} parameters'


def test_layer_decay_gives_fresh_layers_the_full_learning_rate():
    model = _small('ptl_resnet18')
    opt = timm.optim.create_optimizer_v2(model, 'adamw', lr=1e-3, layer_decay=0.5)
    by_param = {id(p): g['lr_scale'] for g in opt.param_groups for p in g['params']}
    names = dict(model.named_parameters())
    assert by_param[id(names['cells.0.0.conv.weight'])] == 1.0
    assert by_param[id(names['fuses.0.feat_conv.weight'])] == 1.0
    assert by_param[id(names['fc.weight'])] == 1.0
    assert by_param[id(names['backbone.conv1.weight'])] < by_param[id(names['backbone.layer4.0.conv1.weight'])] < 1


def test_interface_shapes():
    model = _small('ptl_resnet18').eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features, 2, 2)
    assert model.num_features == model.backbone.num_features + model.cell_widths[-1]
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, model.head_hidden_size)
    assert model.get_classifier() is model.fc and model.get_classifier(name_only=True) == 'fc'
    assert model.pretrained_cfg['architecture'] == 'ptl_resnet18'
    assert model.pretrained_cfg['first_conv'] == ('backbone.conv1',)
    final, inters = model.forward_intermediates(x)
    torch.testing.assert_close(final, feats)
    assert [t.shape[1] for t in inters] == [i['num_chs'] for i in model.feature_info]
    assert [SIZE // t.shape[-1] for t in inters] == [i['reduction'] for i in model.feature_info]
    only = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    torch.testing.assert_close(only, [inters[1], inters[3]])
    # the stage features are the backbone's own, untouched, with the cells' output beside them
    plain = model.backbone.forward_intermediates(x, intermediates_only=True)
    for t, p in zip(inters, plain):
        torch.testing.assert_close(t[:, :p.shape[1]], p)


def test_reset_classifier_and_global_pool():
    model = _small('ptl_resnet18').eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, model.head_hidden_size)
    model.reset_classifier(4, global_pool='catavgmax')
    assert model.head_hidden_size == 2 * model.num_features
    assert model(x).shape == (2, 4)


@pytest.mark.parametrize('name', ['ptl_resnet18', 'ptl_convnext_tiny'])
def test_features_only(name):
    model = _small(name, features_only=True, num_classes=None)
    x = torch.randn(2, 3, SIZE, SIZE)
    feats = model(x)
    assert [f.shape[1] for f in feats] == model.feature_info.channels()
    assert [SIZE // f.shape[-1] for f in feats] == model.feature_info.reduction()
    picked = _small(name, features_only=True, out_indices=(1, 2), num_classes=None)
    assert [f.shape[1] for f in picked(x)] == picked.feature_info.channels() == model.feature_info.channels()[1:3]
    assert list(bconv_cells(picked)), 'the feature extractor keeps its cells'


def test_model_state_rules():
    model = _trained(_small('ptl_resnet18'))
    cells = list(bconv_cells(model))
    assert len(cells) == 4 and all(c.state.abs().sum() > 0 for c in cells)
    model.eval()
    states = [c.state.clone() for c in cells]
    x = torch.randn(5, 3, SIZE, SIZE)
    ref = model(x)
    assert torch.equal(model(x), ref)
    assert all(torch.equal(c.state, s) for c, s in zip(cells, states))
    for k in range(5):
        torch.testing.assert_close(model(x[k:k + 1])[0], ref[k], rtol=1e-4, atol=1e-5)
    model.freeze_state()
    assert model.state_frozen
    _trained(model)
    assert all(torch.equal(c.state, s) for c, s in zip(cells, states))
    model.unfreeze_state()
    _trained(model, steps=1)
    assert not all(torch.equal(c.state, s) for c, s in zip(cells, states))
    model.reset_state()
    assert all(c.state.abs().sum() == 0 for c in cells)
    # the module-level helpers reach cells through any wrapper
    wrapper = torch.nn.Sequential(model)
    assert ptl_timm.freeze_state(wrapper) == 4 and model.state_frozen
    with pytest.raises(ValueError, match='not a PTL model'):
        ptl_timm.reset_state(torch.nn.Linear(2, 2))


def test_state_changes_eval_outputs():
    model = _small('ptl_resnet18').eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    before = model(x)
    _trained(model).eval()
    assert not torch.allclose(model(x), before)


@pytest.mark.parametrize('mode', ['shared', 'carried', 'reset'])
def test_round_trips_give_identical_eval_outputs(mode):
    model = _trained(_small('ptl_resnet18', state_mode=mode, state_slots=4))
    model.freeze_state()
    model.eval()
    x = torch.randn(3, 3, SIZE, SIZE)
    ref = model(x)
    for sd in (model.state_dict(), load(save(model.state_dict()))):
        other = _small('ptl_resnet18', state_mode=mode, state_slots=4).eval()
        other.load_state_dict(sd)
        assert other.state_frozen
        assert torch.equal(other(x), ref)
    twin = copy.deepcopy(model)
    assert torch.equal(twin(x), ref)


def test_batch_size_and_resolution_changes():
    model = _small('ptl_resnet18').train()
    for b, hw in [(4, (64, 64)), (1, (64, 64)), (6, (96, 48)), (2, (65, 47)), (3, (256, 128)), (4, (64, 64))]:
        out = model(torch.randn(b, 3, *hw))
        assert out.shape == (b, 7) and torch.isfinite(out).all()
    model.eval()
    assert model(torch.randn(2, 3, 224, 224)).shape == (2, 7)


def test_channels_last_and_bf16_autocast():
    model = _small('ptl_resnet18').train().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, SIZE, SIZE).to(memory_format=torch.channels_last)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    assert torch.isfinite(out).all()
    assert all(c.state.dtype == torch.float32 for c in bconv_cells(model))


def test_train_py_kwargs_are_accepted():
    model = timm.create_model(
        'ptl_resnet18', num_classes=5, drop_rate=0.2, drop_path_rate=0.1, drop_block_rate=None,
        global_pool='avgmax', in_chans=1, img_size=SIZE,
    )
    assert model.head_drop.p == 0.2 and model.global_pool == 'avgmax'
    assert model(torch.randn(2, 1, SIZE, SIZE)).shape == (2, 5)
    model.set_grad_checkpointing(True)
    model.train()(torch.randn(2, 1, SIZE, SIZE)).sum().backward()
    assert isinstance(model.no_weight_decay(), set)


def test_create_ptl_model_any_cnn_and_registered_names():
    model = ptl_timm.create_ptl_model('convnext_nano', num_classes=10, img_size=SIZE)
    assert isinstance(model, PTLNet) and model.backbone_name == 'convnext_nano'
    assert model.pretrained_cfg['architecture'] == 'ptl_convnext_nano'
    assert model(torch.randn(1, 3, SIZE, SIZE)).shape == (1, 10)
    assert type(ptl_timm.create_ptl_model('resnet18', num_classes=2)) is PTLNet


def test_widths_are_configurable():
    model = _small('ptl_resnet18', cell_widths=[8, 8, 16, 16, 24])
    assert model.cell_widths == [8, 8, 16, 16, 24] and model.num_features == 512 + 24
    assert _small('ptl_resnet18', width_mult=0.25).cell_widths == [16, 16, 32, 64, 128]
    with pytest.raises(ValueError, match='one positive width per backbone stage'):
        _small('ptl_resnet18', cell_widths=[8, 8])


def test_cell_norm_batch_normalises_the_joined_cell_map():
    model = _small('ptl_resnet18', cell_norm=True).train()
    cell_part = model.forward_features(torch.randn(6, 3, SIZE, SIZE))[:, model.backbone_features:]
    # train mode, fresh BN: every cell channel has zero mean and unit variance over (batch, H, W)
    assert torch.allclose(cell_part.mean((0, 2, 3)), torch.zeros(cell_part.shape[1]), atol=1e-4)
    assert torch.allclose(cell_part.var((0, 2, 3), unbiased=False), torch.ones(cell_part.shape[1]), atol=0.05)
    assert 'cell_norm.running_var' in model.state_dict()
    assert 'cell_norm.running_var' not in _small('ptl_resnet18').state_dict()  # the default joins them as they are


def test_clear_errors_for_bad_input():
    model = _small('ptl_resnet18')
    with pytest.raises(ValueError, match=r'expects \(B, 3, H, W\).*in_chans=1'):
        model(torch.randn(2, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match="Unknown timm backbone 'resnet5O'.*resnet50"):
        ptl_timm.create_ptl_model('resnet5O')
    with pytest.raises(ValueError, match='token or channels-last model'):
        ptl_timm.create_ptl_model('vit_tiny_patch16_224', img_size=224)
    with pytest.raises(ValueError, match='state_mode'):
        _small('ptl_resnet18', state_mode='always')


def test_plain_backbone_checkpoint_loads_through_the_overlay(tmp_path, caplog):
    torch.manual_seed(1)
    plain = timm.create_model('resnet18', num_classes=1000).eval()
    path = tmp_path / 'resnet18.safetensors'
    save_file(plain.state_dict(), str(path))
    with caplog.at_level(logging.INFO, logger='ptl_timm'):
        model = timm.create_model(
            'ptl_resnet18', pretrained=True, num_classes=7, pretrained_cfg_overlay=dict(file=str(path)))
    assert 'PTL tensors start fresh' in caplog.text
    model.eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    assert torch.equal(model.backbone.forward_features(x), plain.forward_features(x))
    torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True)[:, :512],
                               plain.forward_head(plain.forward_features(x), pre_logits=True))
    # in_chans adaptation of timm still applies to the backbone's input conv
    grey = timm.create_model('ptl_resnet18', pretrained=True, in_chans=1, pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(grey.backbone.conv1.weight, plain.conv1.weight.sum(1, keepdim=True))


def test_full_ptl_checkpoint_loads_and_mismatch_is_listed(tmp_path):
    model = _trained(_small('ptl_resnet18')).eval()
    path = tmp_path / 'ptl.safetensors'
    save_file(model.state_dict(), str(path))
    again = _small('ptl_resnet18', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    assert torch.equal(again(x), model(x))
    with pytest.raises(ValueError, match=r'(?s)does not fit.*cells\.3\.0\.conv\.weight'):
        _small('ptl_resnet18', cell_widths=[8, 8, 16, 32, 32], pretrained=True,
               pretrained_cfg_overlay=dict(file=str(path)))
    other = tmp_path / 'resnet34.safetensors'
    save_file(timm.create_model('resnet34').state_dict(), str(other))
    with pytest.raises(ValueError, match=r'(?s)plain resnet18 checkpoint does not fit.*unexpected backbone\.layer1\.2'):
        _small('ptl_resnet18', pretrained=True, pretrained_cfg_overlay=dict(file=str(other)))


def test_backbone_modules_own_filters_are_chained():
    assert backbone_filter_fn('densenet121').__module__ == 'timm.models.densenet'
    assert backbone_filter_fn('regnety_016').__module__ == 'timm.models.regnet'
    assert backbone_filter_fn('convnext_tiny').__name__ == 'checkpoint_filter_fn'
    assert backbone_filter_fn('resnet50') is None  # timm's resnet loads its weights unfiltered


def test_stage_fuse_is_the_1x1_conv_of_the_concatenation():
    fuse = StageFuse(6, 3, 4).eval()
    f, c = torch.randn(2, 6, 5, 5), torch.randn(2, 3, 5, 5)
    weight = torch.cat([fuse.feat_conv.weight, fuse.cell_conv.weight], dim=1)
    torch.testing.assert_close(fuse(f, c), fuse.act(fuse.bn(torch.nn.functional.conv2d(torch.cat([f, c], 1), weight))))


def test_cells_removed_is_the_ptl_model_with_zero_cell_maps(tmp_path):
    """The control: same init and parameters as the PTL model; outputs and gradients those of the PTL model whose
    last cell gives zeros (the only way the ladder reaches the output); the ladder neither runs nor writes."""
    x = torch.randn(4, 3, SIZE, SIZE)
    runs = []
    for removed in (False, True):
        model = _small(cells_removed=removed)
        if not removed:
            model.cells[-1].register_forward_hook(lambda m, i, o: torch.zeros_like(o))
        model(x).square().sum().backward()
        runs.append(model)
    hooked, control = runs
    assert all(torch.equal(p, q) for p, q in zip(hooked.parameters(), control.parameters()))  # the same init
    for (name, p), q in zip(hooked.named_parameters(), control.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        assert p.grad is None or torch.equal(p.grad, q.grad), name
    assert all(not c.state.any() for c in bconv_cells(control))  # the ladder never ran
    control.eval()
    feats = control.forward_intermediates(x, intermediates_only=True)
    assert all(not f[:, -w:].any() for f, w in zip(feats[1:], control.cell_widths[1:]))
    assert torch.equal(torch.jit.script(control)(x), control(x))
    save_pretrained(control, tmp_path / 'control')
    reloaded = load_model(f'local-dir:{tmp_path / "control"}').eval()
    assert reloaded.cells_removed and torch.equal(reloaded(x), control(x))


def test_forward_cells_is_what_the_ladder_adds_to_the_backbone():
    model = _trained(_small()).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    final, feats = model.backbone.forward_intermediates(x)
    assert torch.equal(model.forward_cells(x, final, feats), model.forward_features(x))
