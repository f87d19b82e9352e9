"""The timm model contract, as timm's own tests/test_models.py checks it, on small PTL models: unpooled features
with ``global_pool=''``, FX tracing and feature extraction, every ``features_only`` extractor returning exactly
the stage maps ``feature_info`` describes (``forward_intermediates``'s), and TorchScript."""
import copy

import pytest
import timm
import torch
from torchvision.models.feature_extraction import create_feature_extractor as tv_create_feature_extractor

import ptl_timm
from ptl_timm import PTLNet

IMG = 64
FEATURE_CLS = ['getter', 'list', 'dict', 'hook', 'fx']


def _model(name='ptl_resnet18', **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, img_size=IMG, **kwargs).eval()


def _image(batch=2):
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def _inner(features) -> torch.nn.Module:
    """The model inside a features_only wrapper (the PTLNet, or FX's graph module of it)."""
    return next((m for m in features.modules() if isinstance(m, PTLNet)), None) or features.graph_module


@pytest.mark.parametrize('out_indices', [None, (1, 3)])
@pytest.mark.parametrize('feature_cls', FEATURE_CLS)
def test_features_only_gives_the_described_maps(feature_cls, out_indices):
    kwargs = {} if out_indices is None else dict(out_indices=out_indices)
    features = timm.create_model('ptl_resnet18', features_only=True, feature_cls=feature_cls, img_size=IMG,
                                 **kwargs).eval()
    model = _model()
    inner = _inner(features)  # the getter prunes the head: load what it kept
    inner.load_state_dict({k: v for k, v in model.state_dict().items() if k in inner.state_dict()})
    x = _image()
    with torch.no_grad():
        out = features(x)
        expected = model.forward_intermediates(
            x, indices=None if out_indices is None else list(out_indices), intermediates_only=True)
    maps = list(out.values()) if isinstance(out, dict) else out
    if feature_cls == 'dict':
        assert list(out) == [str(i) for i in (out_indices or range(5))]
    assert features.feature_info.channels() == [m.shape[1] for m in maps]
    assert len(maps) == len(expected)
    for got, want in zip(maps, expected):
        assert torch.equal(got, want)


def test_feature_info_modules_output_the_stage_maps():
    """Hooks on the modules feature_info names see cat[f_k, c_k], not the backbone map alone."""
    model = _model()
    seen = {}
    for info in model.feature_info:
        model.get_submodule(info['module']).register_forward_hook(
            lambda mod, args, out, name=info['module']: seen.__setitem__(name, out))
    x = _image()
    with torch.no_grad():
        model(x)
        expected = model.forward_intermediates(x, intermediates_only=True)
    assert [seen[info['module']].shape[1] for info in model.feature_info] == [i['num_chs'] for i in model.feature_info]
    for info, want in zip(model.feature_info, expected):
        assert torch.equal(seen[info['module']], want)


def test_stage_joins_run_only_when_observed(monkeypatch):
    """A plain forward skips the joins' copies of the stage maps (nothing reads them); a hook on one makes them run,
    and the model's output is the same either way."""
    from ptl_timm.layers import ladder

    calls = []
    join_maps = ladder._join_maps
    monkeypatch.setattr(ladder, '_join_maps', lambda f, c: calls.append(1) or join_maps(f, c))
    model, x = _model(), _image()
    with torch.no_grad():
        plain = model(x)
        assert not calls
        handle = model.joins[2].register_forward_hook(lambda *args: None)
        hooked = model(x)
        assert len(calls) == len(model.joins)
        handle.remove()
    assert torch.equal(plain, hooked)


def test_unknown_feature_cls_names_the_choices():
    with pytest.raises(ValueError, match="'getter', 'list', 'dict', 'hook' or 'fx'"):
        timm.create_model('ptl_resnet18', features_only=True, feature_cls='nope')


def test_unpooled_features():
    """global_pool='' and reset_classifier(0, '') give (B, C, H, W) maps, as for every timm CNN."""
    x = _image()
    model = _model(num_classes=0, global_pool='')
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, model.num_features, IMG // 32, IMG // 32)
    model = _model(num_classes=7)
    model.reset_classifier(0, '')
    with torch.no_grad():
        assert model(x).shape == out.shape
    model.reset_classifier(3, 'avg')
    with torch.no_grad():
        assert model(x).shape == (2, 3)


@pytest.mark.parametrize('name, kwargs', [
    ('ptl_resnet18', {}),
    ('ptl_resnet18', dict(image_cells=True, cell_norm=True)),
    ('ptl_mobilenetv2_100', {}),  # a conv head after the last stage, pruned with the head
    ('reid_ptl_resnet18', {}),
    ('ptl_mgn_resnet50', dict(reid_output=True)),
])
@pytest.mark.parametrize('indices, prune_norm, prune_head', [
    ([0], False, True), ([4], False, True), ([0, 1, 2, 3, 4], True, True), ([1, 2], False, False)])
def test_pruned_model_forwards_its_last_kept_map(name, kwargs, indices, prune_norm, prune_head):
    """As timm's test_prune_intermediate_layers_params_used checks its CNNs: pruned, the kept maps are unchanged
    and use every parameter (DDP); and as a pruned timm CNN, forward then gives the last kept map, unpooled."""
    model = _model(name, num_classes=5, **kwargs)
    x = _image()
    with torch.no_grad():
        want = model.forward_intermediates(x, indices=indices, intermediates_only=True)
    trained = copy.deepcopy(model).train()  # a training forward moves the state and BN statistics
    take = trained.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
    assert take == indices
    sum(f.sum() for f in trained.forward_intermediates(x, indices=take, intermediates_only=True)).backward()
    assert [n for n, p in trained.named_parameters() if p.grad is None] == []
    pruned = copy.deepcopy(model)
    pruned.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
    with torch.no_grad():
        got = pruned.forward_intermediates(x, indices=take, intermediates_only=True)
        out = pruned(x)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert torch.equal(out, want[-1])
    assert out.shape[1] == pruned.num_features == pruned.head_hidden_size == model.feature_info[indices[-1]]['num_chs']


def test_pruned_model_keeps_a_pool_its_backbone_cannot_drop():
    """EfficientViT's head cannot disable its pooling (timm's own pruned model stays pooled): the pruned PTL model
    gives the last kept map pooled, and head_hidden_size says its width."""
    model = ptl_timm.create_ptl_model('efficientvit_b0', num_classes=5, img_size=IMG).eval()
    x = _image()
    model.prune_intermediate_layers([1, 2])
    with torch.no_grad():
        last = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)[-1]
        assert torch.equal(model.forward_features(x), last)
        out = model(x)
    assert out.shape == (2, model.head_hidden_size) == (2, last.shape[1])


@pytest.mark.parametrize('name', ['ptl_resnet18', 'reid_ptl_resnet18'])
def test_pruned_model_scripts(name):
    """A pruned model compiles with TorchScript and gives its eager output."""
    model = _model(name, num_classes=5)
    model.prune_intermediate_layers([1, 2])
    x = _image()
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x))


def test_pruned_without_the_head_keeps_the_classifier():
    """prune_head=False at the last stage keeps the head: the logits are the unpruned model's."""
    model = _model(num_classes=5)
    x = _image()
    with torch.no_grad():
        want = model(x)
        model.prune_intermediate_layers([4], prune_head=False)
        assert torch.equal(model(x), want)


@pytest.mark.parametrize('name', ['ptl_resnet18', 'ptl_mobilenetv2_100'])
def test_fx_symbolic_trace(name):
    model = _model(name, num_classes=5)
    traced = torch.fx.symbolic_trace(model)
    x = _image()
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))


def test_fx_graph_reads_and_writes_the_live_state():
    """A train-mode FX graph updates the cells' state as eager does, and reads the state it holds now, not the
    value it had when traced."""
    model = _model(num_classes=5).train()
    ref = copy.deepcopy(model)
    traced = torch.fx.symbolic_trace(model)
    for step in range(2):
        x = _image(batch=2 + step)
        with torch.no_grad():
            assert torch.equal(traced(x), ref(x))
        ref_buffers = dict(ref.named_buffers())
        for name, buffer in traced.named_buffers():
            assert torch.equal(buffer, ref_buffers[name]), name


@pytest.mark.parametrize('extractor', ['timm', 'torchvision'])
def test_fx_feature_extractor(extractor):
    model = _model()
    nodes = [info['module'] for info in model.feature_info]
    create = timm.models.create_feature_extractor if extractor == 'timm' else tv_create_feature_extractor
    fx_model = create(model, return_nodes=nodes)
    x = _image()
    with torch.no_grad():
        out = list(fx_model(x).values())
        expected = model.forward_intermediates(x, intermediates_only=True)
    for got, want in zip(out, expected):
        assert torch.equal(got, want)


def test_created_on_meta_device():
    """create_model(device='meta') places every tensor there (no allocation); reset_classifier follows the model's
    device, dtype and mode."""
    model = timm.create_model('ptl_resnet18', device='meta').eval()
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {'meta'}
    model.reset_classifier(3)
    assert model.fc.weight.device.type == 'meta' and not model.fc.training


@pytest.mark.parametrize('feature_cls', ['getter', 'hook'])
def test_reid_features_only_gives_the_backbone_maps(feature_cls):
    """A BNNeck ReID model's features are its (PTL) backbone's stage maps, under ``backbone.``."""
    torch.manual_seed(0)
    model = timm.create_model('reid_ptl_resnet18', img_size=(64, 32)).eval()
    features = timm.create_model('reid_ptl_resnet18', img_size=(64, 32), features_only=True,
                                 feature_cls=feature_cls, out_indices=(1, 3)).eval()
    inner = next(m for m in features.modules() if type(m).__name__ == 'ReIDNet')
    inner.load_state_dict({k: v for k, v in model.state_dict().items() if k in inner.state_dict()})
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        out = features(x)
        expected = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert features.feature_info.channels() == [72, 288]
    for got, want in zip(out, expected):
        assert torch.equal(got, want)


def _scripted(model):
    with pytest.warns(FutureWarning):  # torch.jit.script is deprecated in favour of torch.compile / torch.export
        return torch.jit.script(model)


@pytest.mark.parametrize('name, kwargs', [
    ('ptl_resnet18', {}),
    ('ptl_mobilenetv2_100', dict(state_mode='carried', state_slots=3, image_cells=True)),
    ('ptl_convnext_tiny', dict(drop_path_rate=0.)),
])
@pytest.mark.slow
def test_torchscript_matches_eager_in_training_and_eval(name, kwargs):
    """torch.jit.script compiles a copy of the model whose backbone runs its stages in TorchScript: the same
    modules and state_dict keys, the same outputs and state updates as eager, any input size; the model itself
    is left as it was."""
    model = _model(name, num_classes=5, **kwargs)
    backbone_class = type(model.backbone)
    scripted = _scripted(model)
    assert type(model.backbone) is backbone_class
    assert list(scripted.state_dict()) == list(model.state_dict())
    ref = copy.deepcopy(model).train()
    scripted.train()
    for step, size in enumerate((IMG, IMG, 48)):
        x = torch.randn(2 + step, 3, size, size, generator=torch.Generator().manual_seed(step))
        if step == 2:
            ptl_timm.freeze_state(ref)
            for name_, flag in scripted.named_buffers():
                if name_.endswith('state_frozen'):
                    flag.fill_(True)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), ref(x))
        ref_buffers = dict(ref.named_buffers())
        for name_, buffer in scripted.named_buffers():
            torch.testing.assert_close(buffer, ref_buffers[name_], msg=name_)
    ref.eval()
    scripted.eval()
    x = _image()
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), ref(x))


@pytest.mark.slow
def test_torchscript_of_a_wrapper_leaves_the_wrapped_model_alone():
    """torch.jit.script puts the prepared copy of a PTL backbone into the module it compiles: a ReID model scripts
    a copy of itself, so the model the user holds keeps its own backbone."""
    model = timm.create_model('reid_ptl_resnet18', num_classes=0, img_size=(64, 32)).eval()
    backbone = model.backbone
    scripted = _scripted(model)
    assert model.backbone is backbone and type(backbone.backbone).__name__ == 'ResNet'
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


def test_torchscript_refuses_a_backbone_that_is_not_a_chain_of_its_modules(monkeypatch):
    model = _model(num_classes=5)
    intermediates = model.backbone.forward_intermediates
    monkeypatch.setattr(model.backbone, 'forward_intermediates',
                        lambda x: (lambda final, feats: (2 * final, feats))(*intermediates(x)))
    with pytest.raises(ValueError, match='not a chain of its modules.*torch.export or torch.compile'):
        torch.jit.script(model)


def test_pruned_backbone_without_one_final_map_fails_clearly():
    """timm's HRNet pruned to a branch gives every branch's map as its final features: forward says why it cannot
    join the cells and what to use instead; the stage maps still come out."""
    model = ptl_timm.create_ptl_model('hrnet_w18_small', num_classes=5, img_size=IMG).eval()
    model.prune_intermediate_layers([1, 2])
    x = _image()
    with torch.no_grad():
        maps = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
        assert [m.shape[1] for m in maps] == [model.feature_info[k]['num_chs'] for k in (1, 2)]
        with pytest.raises(ValueError, match=r'not one map.*intermediates_only=True.*features_only=True'):
            model(x)
