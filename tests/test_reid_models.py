"""MGN / MGN_PTL and BNNeck ReID models: registry, outputs (timm's and the ReID recipe's), determinism, losses,
feature extraction, pretrained loading."""
import copy

import pytest
import timm
import torch
from safetensors.torch import save_file

import ptl_timm.reid  # noqa: F401  (registers the ReID models)
from ptl_timm import bconv_cells
from ptl_timm.reid import MGN, ReIDLoss, ReIDNet, ReIDOutput, create_reid_model
from ptl_timm.reid.bnneck import REID_INPUT_SIZE
from ptl_timm.reid.mgn import MGN_INPUT_SIZE, mgn_checkpoint_filter_fn


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _small_mgn(ptl: bool, **kwargs) -> MGN:
    kwargs = dict(dict(reid_output=True, num_classes=5), **kwargs)
    return MGN(backbone='resnet18', feat_dim=8, ptl=ptl, img_size=(48, 16), **kwargs)


@pytest.mark.parametrize('name', timm.list_models(module=['mgn', 'bnneck']))
def test_registered_reid_models_have_person_crop_cfgs_without_classifier(name):
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.input_size == (MGN_INPUT_SIZE if 'mgn_' in name else REID_INPUT_SIZE)
    assert cfg.num_classes == 0
    assert 'mgn_resnet50.a1_in1k' in timm.list_pretrained('mgn_resnet50*')


@pytest.mark.parametrize('ptl', [False, True])
def test_mgn_eval_embedding_is_deterministic_and_batch_independent(ptl):
    model = _small_mgn(ptl)
    assert len(list(bconv_cells(model))) == (3 + 3 if ptl else 0)  # layer1..3 + one per branch
    x = torch.randn(4, 3, 48, 16)
    model.train()
    for _ in range(2):  # train steps write the cells' state: eval must then read it, not noise
        model(x)
    model.eval()
    with torch.no_grad():
        full = model(x)
        again = model(x)
        alone = model(x[1:2])
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
    assert full.shape == (4, 8 * 8)
    assert torch.equal(full, again) and torch.equal(full, pre)
    torch.testing.assert_close(alone, full[1:2], atol=1e-5, rtol=1e-5)


def test_mgn_train_output_feeds_the_losses_and_trains_every_part():
    model = _small_mgn(True, image_cells=True).train()
    assert len(list(bconv_cells(model))) == 4 + 3  # the paper's cell on the image added
    x, y = torch.randn(8, 3, 48, 16), torch.arange(4).repeat_interleave(2)
    states = [c.state.clone() for c in bconv_cells(model)]
    out = model(x)
    assert isinstance(out, ReIDOutput)
    assert len(out.logits) == 8 and all(lg.shape == (8, 5) for lg in out.logits)
    assert len(out.features) == 3 and out.embedding.shape == (8, 64)
    ReIDLoss(margin=1.2)(out, y).backward()
    # (timm zero-inits each block's last BN, so a block's first conv gets no gradient at step 0)
    for name in ('conv1.weight', 'layer1.0.bn2.weight', 'branches.0.layer4.0.downsample.0.weight',
                 'branches.2.layer4.0.downsample.0.weight',
                 'cells.0.0.conv.weight', 'branch_cells.1.conv.weight', 'reductions.7.0.weight'):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert any(not torch.equal(s, c.state) for s, c in zip(states, bconv_cells(model)))


def test_mgn_branches_start_as_the_resnet():
    resnet = timm.create_model('resnet18').eval()
    model = _small_mgn(False).eval()
    model.load_state_dict(mgn_checkpoint_filter_fn(resnet.state_dict(), model))
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        trunk = model.layer3(model.layer2(model.layer1(model.maxpool(model.act1(model.bn1(model.conv1(x)))))))
        glob, part = model.branches[0](trunk), model.branches[1](trunk)
        torch.testing.assert_close(glob, resnet.forward_features(x))
    # part branches: same weights, layer4 at stride 1 (twice the resolution)
    assert part.shape[-2:] == (2 * glob.shape[-2], 2 * glob.shape[-1])
    assert torch.equal(model.branches[2].layer4[1].conv1.weight, resnet.layer4[1].conv1.weight)
    with pytest.raises(ValueError, match='does not fit'):
        mgn_checkpoint_filter_fn(timm.create_model('resnet34').state_dict(), model)


def test_registered_ptl_mgn_loads_resnet50_weights_through_timm(tmp_path):
    resnet = timm.create_model('resnet50')
    path = tmp_path / 'resnet50.safetensors'
    save_file(resnet.state_dict(), str(path))
    model = timm.create_model('ptl_mgn_resnet50', pretrained=True, num_classes=7, reid_output=True,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(model.branches[1].layer3[0].conv2.weight, resnet.layer3[1].conv2.weight)
    assert torch.equal(model.layer3[0].downsample[0].weight, resnet.layer3[0].downsample[0].weight)
    assert model.classifiers[0].out_features == 7 and model.ptl
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 32)).shape == (1, 2048)


def test_mgn_errors_name_the_problem():
    with pytest.raises(ValueError, match='timm ResNet'):
        MGN(backbone='mobilenetv2_100')
    model = _small_mgn(False).eval()
    with pytest.raises(ValueError, match='too small'):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'):
        model(torch.randn(1, 1, 96, 32))


@pytest.mark.parametrize('backbone', ['ptl_resnet18', 'resnet18'])
def test_bnneck_model(backbone):
    model = ReIDNet(backbone, num_classes=6, img_size=(64, 32), reid_output=True)
    x, y = torch.randn(8, 3, 64, 32), torch.arange(4).repeat_interleave(2)
    out = model.train()(x)
    assert len(out.logits) == 1 and out.logits[0].shape == (8, 6)
    assert out.features[0].shape == out.embedding.shape == (8, model.num_features)
    ReIDLoss()(out, y).backward()
    # BNNeck: no shift, no bias at all (timm's tests want a gradient for every parameter; BN swaps carry None over)
    assert model.classifier.bias is None and model.neck.bias is None
    assert all(p.grad is not None for p in model.parameters())
    assert model.backbone.get_classifier().__class__.__name__ == 'Identity' or model.backbone.num_classes == 0
    model.eval()
    with torch.no_grad():
        emb = model(x)
        torch.testing.assert_close(model(x[:3]), emb[:3], atol=1e-5, rtol=1e-5)
        assert torch.equal(emb, model.forward_head(model.forward_features(x), pre_logits=True))
    model.reset_classifier(0)
    assert model.get_classifier().__class__.__name__ == 'Identity'
    assert model.train()(x).logits == []


def test_reid_models_load_backbone_weights_through_timm(tmp_path):
    resnet = timm.create_model('resnet18')
    path = tmp_path / 'resnet18.safetensors'
    save_file(resnet.state_dict(), str(path))
    plain = timm.create_model('reid_resnet18', pretrained=True, num_classes=3,
                              pretrained_cfg_overlay=dict(file=str(path)))
    ptl = create_reid_model('ptl_resnet18', pretrained=True, num_classes=3,
                            pretrained_cfg_overlay=dict(file=str(path)))
    w = resnet.layer2[0].conv1.weight
    assert torch.equal(plain.backbone.layer2[0].conv1.weight, w)
    assert torch.equal(ptl.backbone.backbone.layer2[0].conv1.weight, w)
    assert ptl.backbone.img_size == (256, 128)  # the cells' state grids follow the ReID input
    # a backbone without a registered reid_* entry goes through the same path
    other = create_reid_model('resnet10t', num_classes=2)
    assert other.pretrained_cfg['input_size'] == (3, 256, 128)


@pytest.mark.parametrize('make', [
    lambda **kw: _small_mgn(True, reid_output=False, **kw),
    lambda **kw: ReIDNet('ptl_resnet18', img_size=(64, 32), **dict(dict(num_classes=5), **kw)),
], ids=['mgn', 'bnneck'])
def test_reid_models_follow_timms_output_conventions(make):
    """Without reid_output: logits in train and eval mode (what timm's train.py and validate.py take), the
    embedding without a classifier, unpooled maps with global_pool=''; the ReID loss names the switch."""
    model = make()
    x, y = torch.randn(4, 3, 64, 32), torch.arange(2).repeat_interleave(2)
    logits = model.train()(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (4, 5)
    torch.nn.functional.cross_entropy(logits, y).backward()
    with pytest.raises(TypeError, match='reid_output=True'):
        ReIDLoss()(logits, y)
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape[1] == model.num_features
        emb = model.forward_head(feats, pre_logits=True)
        assert emb.shape == (4, model.head_hidden_size)
        assert model(x).shape == (4, 5)
        model.reset_classifier(0)
        assert torch.equal(model(x), emb)
        model.reset_classifier(0, '')
        assert model(x).shape[-2:] == feats.shape[-2:] and model(x).ndim == 4
        model = make(num_classes=0, global_pool='')
        assert model.eval()(x).ndim == 4
        model.reset_classifier(3)
        with pytest.raises(ValueError, match='num_classes=0'):
            model(x)


def test_mgn_joined_features_pool_as_the_branch_maps():
    """forward_features joins the branch maps at the part branches' grid (the global one upsampled, nearest):
    the embedding is the max-pooled branches' as if pooled one by one."""
    model = _small_mgn(True).eval()
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        maps = model._branch_maps(x, model._trunk(x))
        joined = model.forward_features(x)
        glob = model.reductions[0](maps[0].amax(dim=(2, 3)))
        emb = model.forward_head(joined, pre_logits=True)
    assert maps[0].shape[-1] * 2 == maps[1].shape[-1] and joined.shape[-2:] == maps[1].shape[-2:]
    assert torch.equal(emb[:, :8], glob)
    assert torch.equal(joined[:, :maps[0].shape[1]].amax(dim=(2, 3)), maps[0].amax(dim=(2, 3)))


@pytest.mark.slow
@pytest.mark.parametrize('feature_cls', ['getter', 'hook', 'list', 'dict', 'fx'])
def test_mgn_features_only_gives_the_maps_feature_info_describes(feature_cls):
    """Every features_only form gives the trunk's maps and the joined branch map, as feature_info says."""
    kwargs = dict(num_classes=0, img_size=(64, 32))
    x = torch.randn(1, 3, 64, 32)
    torch.manual_seed(1)
    model = timm.create_model('ptl_mgn_resnet50', **kwargs).eval()
    torch.manual_seed(1)  # the same weights inside the extractor
    extractor = timm.create_model('ptl_mgn_resnet50', features_only=True, feature_cls=feature_cls,
                                  out_indices=(1, 4), **kwargs).eval()
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        got = extractor(x)
    assert torch.equal(final, model.forward_features(x)) and torch.equal(maps[-1], final)
    assert [m.shape[1] for m in maps] == [i['num_chs'] for i in model.feature_info]
    assert [64 // m.shape[-2] for m in maps] == [i['reduction'] for i in model.feature_info]
    got = list(got.values()) if isinstance(got, dict) else got
    assert extractor.feature_info.channels() == [maps[1].shape[1], maps[4].shape[1]]
    assert len(got) == 2
    for g, m in zip(got, (maps[1], maps[4])):
        torch.testing.assert_close(g, m, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['reid_ptl_resnet18', 'ptl_mgn_resnet50'])
def test_reid_models_script_trace_and_compile(name):
    """TorchScript (eval embedding; train mode's ReIDOutput as a tuple), an FX trace and a whole-graph compiled
    training step give the eager outputs."""
    kwargs = dict(num_classes=4, img_size=(64, 32), reid_output=True)
    x = torch.randn(4, 3, 64, 32)
    model = timm.create_model(name, **kwargs).eval()
    with pytest.warns(FutureWarning):  # torch.jit.script's deprecation notice
        scripted = torch.jit.script(model)
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(scripted(x), expected)
        torch.testing.assert_close(traced(x), expected)
        logits, features, embedding = scripted.train()(x)
    assert len(logits) == (8 if 'mgn' in name else 1) and embedding.shape == expected.shape
    model.train()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    out, ref = compiled(x), eager(x)
    assert isinstance(out, ReIDOutput)
    torch.testing.assert_close(out.embedding, ref.embedding)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b)
