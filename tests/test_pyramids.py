"""PTL on feature pyramids whose final features are not an NCHW map: channels-last (Swin, MambaOut), tokens (Hiera,
CoaT with a class token, PiT with class tokens only) and lists (EfficientViM). Small configurations of timm's
backbones at 64 px: the layout of the joined features, the state rules, features_only in every form, tracing,
scripting, export, pruning and the Hub round trip."""
import pytest
import timm
import torch

import ptl_timm
from ptl_timm import bconv_cells
from ptl_timm.hub.io import load_model, save_pretrained

SIZE = 64
# key -> (backbone, backbone kwargs: the smallest configuration that runs at SIZE, layout of the final features)
BACKBONES = {
    'swin': ('swin_tiny_patch4_window7_224',
             dict(window_size=2, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)), 'NHWC'),
    'mambaout': ('test_mambaout', {}, 'NHWC'),
    'hiera': ('hiera_tiny_224', dict(embed_dim=16, num_heads=1, stages=(1, 1, 1, 1)), 'NLC'),
    'coat_lite': ('coat_lite_tiny', {}, 'NLC'),
    'pit': ('pit_ti_224', {}, 'NLC'),
    'efficientvim': ('efficientvim_m1', {}, 'NCL'),
}


def _model(key: str, **kwargs) -> ptl_timm.PTLNet:
    backbone, backbone_kwargs, _ = BACKBONES[key]
    torch.manual_seed(0)
    kwargs.setdefault('num_classes', 3)
    return ptl_timm.create_ptl_model(backbone, img_size=SIZE, **backbone_kwargs, **kwargs)


def _x(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _cells_in_layout(cells: torch.Tensor, join) -> torch.Tensor:
    """The last stage's cell map (B, w, H, W) laid out as the join lays it out beside the final features."""
    if join.layout == 'NHWC':
        return cells.permute(0, 2, 3, 1)
    if join.layout == 'NCL':
        return cells.flatten(2)
    tokens = cells.flatten(2).transpose(1, 2)
    mean = tokens.mean(1, keepdim=True).expand(-1, join.prefix, -1)
    return torch.cat([mean, tokens], 1) if join.grid else mean


@pytest.mark.parametrize('key', sorted(BACKBONES))
@torch.no_grad()
def test_final_features_keep_the_backbone_layout_beside_the_last_cell_map(key):
    model = _model(key).eval()
    assert model.output_fmt == BACKBONES[key][2]
    x = _x()
    final, maps = model.forward_intermediates(x)
    plain = model.backbone.forward_features(x)
    if model.final_in_list:  # EfficientViM: the cells join the last element, the others are the backbone's
        assert all(torch.equal(a, b) for a, b in zip(final[:-1], plain[:-1]))
        final, plain = final[-1], plain[-1]
    backbone_part, cell_part = model.final_join.split(final, model.backbone_features)
    assert torch.equal(backbone_part, plain)  # the backbone runs unchanged
    cells = maps[-1][:, -model.cell_widths[-1]:]  # the last stage map is cat[f, c] (NCHW)
    torch.testing.assert_close(cell_part, _cells_in_layout(cells, model.final_join))
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pooled.shape == (2, model.head_hidden_size)
    assert model(x).shape == (2, 3)


def test_class_tokens_get_the_mean_and_the_head_pools_the_grid_only():
    model = _model('coat_lite').eval()
    assert (model.final_join.prefix, model.final_join.grid) == (1, True)
    pit = _model('pit')  # PiT's final features are its class token alone
    assert (pit.final_join.prefix, pit.final_join.grid) == (1, False)
    with torch.no_grad():
        _, cell_part = model.final_join.split(model.forward_features(_x()), model.backbone_features)
        pooled = model.forward_head(model.forward_features(_x()), pre_logits=True)[:, -model.cell_widths[-1]:]
    torch.testing.assert_close(pooled, cell_part[:, 1:].mean(1))


@pytest.mark.parametrize('key', ['swin', 'hiera', 'pit'])
@torch.no_grad()
def test_state_rules_hold(key):
    model, x = _model(key), _x(4)
    model.train()
    model(x)
    written = [c.state.clone() for c in bconv_cells(model)]
    assert all(s.abs().sum() > 0 for s in written)
    model.eval()
    batch = model(x)
    assert all(torch.equal(a, c.state) for a, c in zip(written, bconv_cells(model)))  # eval never writes
    torch.testing.assert_close(model(x[:1]), batch[:1], rtol=1e-5, atol=1e-6)  # batch-independent
    model.reset_state()
    model.freeze_state()
    model.train()
    model(x)
    assert all(not c.state.any() for c in bconv_cells(model))


@pytest.mark.parametrize('key', ['swin', 'hiera', 'efficientvim'])
@torch.no_grad()
def test_features_only_gives_the_nchw_stage_maps_in_every_feature_cls(key):
    backbone, backbone_kwargs, _ = BACKBONES[key]
    x = _x()
    expected = _model(key).eval().forward_intermediates(x, intermediates_only=True)
    classes = ['getter', 'list', 'dict', 'hook'] + (['fx'] if key == 'swin' else [])  # Hiera's own FX trace fails
    for feature_cls in classes:
        torch.manual_seed(0)
        model = ptl_timm.create_ptl_model(backbone, img_size=SIZE, features_only=True, feature_cls=feature_cls,
                                          **backbone_kwargs).eval()
        feats = model(x)
        feats = list(feats.values()) if isinstance(feats, dict) else feats
        assert [f.shape[1] for f in feats] == model.feature_info.channels(), feature_cls
        assert all(torch.equal(a, b) for a, b in zip(feats, expected)), feature_cls


# Swin, MambaOut: their modules chain (channels-last stages); PiT: through its own forward_intermediates
@pytest.mark.parametrize('key', ['swin', 'mambaout', 'pit'])
@torch.no_grad()
def test_torchscript_matches_eager_where_the_backbone_scripts(key):
    model, x = _model(key).eval(), _x()
    torch.testing.assert_close(torch.jit.script(model)(x), model(x))


def test_torchscript_refusal_names_the_alternatives_where_the_backbone_does_not_script():
    with pytest.raises(ValueError, match='hiera_tiny_224.*Use torch.export or torch.compile'):
        torch.jit.script(_model('hiera').eval())


@pytest.mark.parametrize('key', ['mambaout', 'hiera'])
@torch.no_grad()
def test_torch_export_matches_eager(key):
    model, x = _model(key).eval(), _x()
    torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), model(x))


@pytest.mark.slow
@pytest.mark.parametrize('key', ['mambaout', 'hiera'])
def test_torch_compile_takes_the_joined_forward_whole_and_matches_eager(key):
    model, x = _model(key).eval(), _x()
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize('key', ['swin', 'hiera', 'coat_lite'])
@torch.no_grad()
def test_pruning_keeps_the_stage_maps_and_ends_the_features_at_the_last_kept_stage(key):
    model, x = _model(key).eval(), _x()
    taps = model.forward_intermediates(x, intermediates_only=True)
    model.prune_intermediate_layers([1])
    kept = model.forward_intermediates(x, intermediates_only=True)
    assert len(kept) == 2 and all(torch.equal(a, b) for a, b in zip(kept, taps))
    features = model(x)  # unpooled, in the backbone's layout, with the stage's cells beside it
    channel_dim = model.final_join.channel_dim
    assert features.shape[channel_dim] == model.num_features == taps[1].shape[1]
    if key == 'hiera':  # before its last stage Hiera's tokens are not in raster order: every token gets the mean
        assert not model.final_join.grid


@pytest.mark.parametrize('name', ['ptl_mambaout_femto', 'ptl_hiera_tiny_224'])
def test_registered_variants_round_trip_through_the_hub_format(name, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, img_size=SIZE)
    assert model.pretrained_cfg['classifier'] == 'fc'
    with torch.no_grad():
        model.train()(_x(4))  # a written state
        model.eval()
        expected = model(_x())
    save_pretrained(model, tmp_path / 'm')
    loaded = load_model(f'local-dir:{tmp_path / "m"}').eval()
    with torch.no_grad():
        assert torch.equal(loaded(_x()), expected)


def test_fixed_size_backbones_get_img_size_and_non_pyramids_are_refused_with_the_reason():
    assert _model('swin').backbone.patch_embed.img_size == (SIZE, SIZE)
    with pytest.raises(ValueError, match='not a feature pyramid.*token or channels-last model'):
        ptl_timm.create_ptl_model('test_vit', img_size=SIZE)
