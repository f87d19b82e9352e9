"""Parity with the plain timm twin (issue 23): every model class ptl_timm registers (PTLNet, MGN, ReIDNet), in every
state mode, goes through one battery of the operations timm users apply to a model (checkpointing, BN swaps,
features_only in every form, transformers' TimmBackbone and a DETR built on it, timm's EMA, FX quantization, our own
export / deploy / reload / extract), and so does its twin: the same backbone without cells.

Nothing is hard-coded: where the twin works the PTL model must work, and the change an operation makes to the PTL
model's function (outputs, gradients, state after a training step) must be no larger in kind than the change it
makes to the twin's: exact where the twin's is exact, rounding where the twin's is rounding. Tiny inputs and the
smallest backbones (resnet18; MGN on a resnet18 trunk) keep the whole file within seconds.
"""
import argparse
import copy
from typing import Any, Callable, Dict, List, Tuple, Union

import pytest
import timm
import torch
from timm.layers import convert_sync_batchnorm, freeze_batch_norm_2d
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.checkpoint import checkpoint

import ptl_timm
from ptl_timm.cli import main
from ptl_timm.deploy import check_export, export_model, load_exported, prepare_for_export
from ptl_timm.reid.extract import FeatureExtractor, embed

SIZE = 32  # PTLNet and ReIDNet input (H, W); MGN needs 16 px per stripe: (48, 16)
MGN_SIZE = (48, 16)
SLIM = dict(channels=(16, 32, 64, 128))  # resnet18 at 1/4 width, for twin and PTL model alike: a fast battery
MGN = dict(backbone='resnet18', img_size=MGN_SIZE)

# id -> ((PTL model, kwargs), (twin, kwargs)): every registered class in every state mode
PAIRS: Dict[str, Tuple[Tuple[str, Dict[str, Any]], Tuple[str, Dict[str, Any]]]] = {}
for _mode in ptl_timm.STATE_MODES:
    _state = dict(state_mode=_mode, **(dict(state_slots=2) if _mode == 'carried' else {}))
    PAIRS[f'ptlnet-{_mode}'] = (('ptl_resnet18', dict(img_size=SIZE, **SLIM, **_state)), ('resnet18', SLIM))
    PAIRS[f'mgn-{_mode}'] = (('ptl_mgn_resnet50', dict(MGN, **SLIM, **_state)), ('mgn_resnet50', dict(MGN, **SLIM)))
    PAIRS[f'reid-{_mode}'] = (('reid_ptl_resnet18', dict(img_size=SIZE, **SLIM, **_state)),
                              ('reid_resnet18', dict(img_size=SIZE, **SLIM)))
# the clients that do not touch the state: one pair per class
CLASS_PAIRS = [f'{kind}-{ptl_timm.DEFAULT_STATE_MODE}' for kind in ('ptlnet', 'mgn', 'reid')]
WHICH = ('ptl', 'twin')  # the order of PAIRS' entries


def _size(pair: str) -> Tuple[int, int]:
    return MGN_SIZE if pair.startswith('mgn') else (SIZE, SIZE)


def _images(pair: str, batch: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, *_size(pair), generator=torch.Generator().manual_seed(seed))


def _create(pair: str, which: str, **kwargs: Any) -> nn.Module:
    name, model_kwargs = PAIRS[pair][WHICH.index(which)]
    torch.manual_seed(0)
    return timm.create_model(name, **dict(model_kwargs, **kwargs))


_MODELS: Dict[Tuple[str, str], nn.Module] = {}


def _model(pair: str, which: str) -> nn.Module:
    """A copy of the pair's model with 3 classes, after one training forward (a non-trivial state and BN statistics)."""
    key = (pair, which)
    if key not in _MODELS:
        model = _create(pair, which, num_classes=3)
        with torch.no_grad():
            model.train()(_images(pair, seed=0))
        _MODELS[key] = model
    return copy.deepcopy(_MODELS[key])


# --- the function of a model, and how far an operation moves it ----------------------------------------------------
def _tensors(value: Any) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in _tensors(value[k])]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _delta(a: Any, b: Any) -> float:
    """The largest difference between two results (tensors, lists, dicts), relative to their scale; inf when their
    structure differs."""
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb)):
        return float('inf')
    worst = 0.
    for x, y in zip(ta, tb):
        if x.dtype == torch.bool or not x.is_floating_point():
            worst = max(worst, 0. if torch.equal(x, y) else float('inf'))
        elif x.numel():
            worst = max(worst, ((x.float() - y.float()).abs().max() / x.float().abs().max().clamp_min(1e-12)).item())
    return worst


def _kind(delta: float) -> int:
    """0: exact; 1: rounding (the same function computed in another order); 2: another function."""
    return 0 if delta == 0 else 1 if delta < 1e-4 else 2


def _step(model: Callable, params: nn.Module, x: torch.Tensor, names: Dict[int, str] = None) -> Dict[str, Any]:
    """One forward and backward of ``model`` (a module in train mode, or a function around one): its output, the
    gradient of every parameter of ``params``, and after it the BN statistics (every other floating buffer) and the
    cells' latent state, by the name ``names`` gives each tensor (by default its own: wrapping modules renames it)."""
    names = names or _names(params)
    out = model(x)
    out = out if isinstance(out, torch.Tensor) else torch.cat([o.flatten(1) for o in _tensors(out)], 1)
    out.float().square().mean().backward()
    grads = {names.get(id(p), n): p.grad for n, p in params.named_parameters() if p.grad is not None}
    buffers = {names.get(id(b), n): b.detach().clone() for n, b in params.named_buffers() if b.is_floating_point()}
    return dict(out=out.detach(), grads=grads, bn={k: v for k, v in buffers.items() if not k.endswith('.state')},
                cells={k: v for k, v in buffers.items() if k.endswith('.state')})


def _step_change(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, float]:
    """How far step ``b`` is from step ``a``, per part (on the names both have: a BN swap turns BN parameters
    into buffers)."""
    change = {}
    for key in a:
        common = sorted(set(a[key]) & set(b[key])) if isinstance(a[key], dict) else None
        change[key] = _delta(*(({k: r[key][k] for k in common} for r in (a, b)) if common is not None else
                               (a[key], b[key])))
    return change


def _names(model: nn.Module) -> Dict[int, str]:
    return {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}


def _eval(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


Change = Union[float, Dict[str, float]]


def _parity(client: Callable[[str, str], Change], pair: str) -> None:
    """Run ``client`` on the twin, then on the PTL model: where the twin works the PTL model must, with a change of
    its function no larger in kind, part by part (outputs, gradients, BN statistics). The latent state has no
    counterpart in the twin: it must change no more than the twin's function (outputs and gradients) does."""
    try:
        twin = client(pair, 'twin')
    except Exception:  # the twin cannot do it: nothing to match (the PTL model may try)
        return
    ptl = client(pair, 'ptl')
    twin, ptl = ({'out': c} if isinstance(c, float) else c for c in (twin, ptl))
    function = max(_kind(twin[k]) for k in ('out', 'grads') if k in twin)
    for part, change in ptl.items():
        allowed = _kind(twin[part]) if part in twin and part != 'cells' else function
        assert _kind(change) <= allowed, (
            f'{client.__name__} on {pair}: the PTL model\'s {part} moves by {change:.3g}; the twin\'s '
            f'{part if part in twin and part != "cells" else "function"} by '
            f'{twin.get(part, max(twin.get("out", 0.), twin.get("grads", 0.))):.3g}')


# --- checkpointing ----------------------------------------------------------------------------------------------
def own_grad_checkpointing(pair: str, which: str) -> Dict[str, float]:
    x = _images(pair)
    plain, ckpt = _model(pair, which).train(), _model(pair, which).train()
    ckpt.set_grad_checkpointing(True)
    return _step_change(_step(plain, plain, x), _step(ckpt, ckpt, x))


def features_grad_checkpointing(pair: str, which: str) -> Dict[str, float]:
    x = _images(pair)
    plain = _create(pair, which, features_only=True).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    return _step_change(_step(plain, plain, x), _step(ckpt, ckpt, x))


class _Checkpointed(nn.Module):
    """A module run under torch.utils.checkpoint, as activation-checkpointing wrappers of other libraries do."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.module, *args, use_reentrant=False)


def _wrap_parts(model: nn.Module) -> None:
    """Checkpoint each backbone ``layer2`` (every twin and PTL model has one) and each part that holds cells."""
    parents = [m for m in model.modules()
               if any(n == 'layer2' or isinstance(c, ptl_timm.BConvCell) for n, c in m.named_children())]
    for parent in parents:
        for name, child in list(parent.named_children()):
            if name == 'layer2' or isinstance(child, ptl_timm.BConvCell):
                parent._modules[name] = _Checkpointed(child)


def external_checkpoint_model(pair: str, which: str) -> Dict[str, float]:
    x = _images(pair)
    plain, ckpt = _model(pair, which).train(), _model(pair, which).train()
    return _step_change(_step(plain, plain, x), _step(lambda t: checkpoint(ckpt, t, use_reentrant=False), ckpt, x))


def external_checkpoint_parts(pair: str, which: str) -> Dict[str, float]:
    x = _images(pair)
    plain, ckpt = _model(pair, which).train(), _model(pair, which).train()
    names = _names(ckpt)
    _wrap_parts(ckpt)
    return _step_change(_step(plain, plain, x), _step(ckpt, ckpt, x, names))


# --- BN swaps ---------------------------------------------------------------------------------------------------
def _detr_frozen_bn(model: nn.Module) -> nn.Module:
    from transformers.models.detr.modeling_detr import replace_batch_norm
    with torch.no_grad():
        replace_batch_norm(model)
    return model


def _swap_change(pair: str, which: str, swap: Callable[[nn.Module], nn.Module], frozen: bool) -> Dict[str, float]:
    """How far ``swap`` moves the eval function, the eval stage maps and a training step. A frozen BN normalises
    with the running statistics in train mode too: its reference step runs the BNs in eval mode."""
    x = _images(pair)
    model = _model(pair, which)
    swapped = swap(_model(pair, which))
    with torch.no_grad():
        delta = max(_delta(_eval(model, x), _eval(swapped, x)),
                    _delta(model.forward_intermediates(x, intermediates_only=True),
                           swapped.forward_intermediates(x, intermediates_only=True)))
    reference, swapped = _model(pair, which).train(), swapped.train()
    if frozen:
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()  # the swaps freeze 2D BNs only (timm's and DETR's)
    change = _step_change(_step(reference, reference, x), _step(swapped, swapped, x))
    change['out'] = max(change['out'], delta)
    return change


def sync_batchnorm_torch(pair: str, which: str) -> Dict[str, float]:
    return _swap_change(pair, which, nn.SyncBatchNorm.convert_sync_batchnorm, frozen=False)


def sync_batchnorm_timm(pair: str, which: str) -> Dict[str, float]:
    return _swap_change(pair, which, convert_sync_batchnorm, frozen=False)


def frozen_batchnorm_timm(pair: str, which: str) -> Dict[str, float]:
    return _swap_change(pair, which, freeze_batch_norm_2d, frozen=True)


def frozen_batchnorm_detr(pair: str, which: str) -> Dict[str, float]:
    return _swap_change(pair, which, _detr_frozen_bn, frozen=True)


# --- EMA, quantization ------------------------------------------------------------------------------------------
def timm_ema(pair: str, which: str) -> float:
    """ModelEmaV3 after one SGD step: the average of every float tensor (latent state included), nothing else."""
    model = _model(pair, which).train()
    ema = ModelEmaV3(model, decay=0.5)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    _step(model, model, _images(pair))
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    ema.update(model)
    expected = {k: (v.lerp(model.state_dict()[k], 0.5) if v.is_floating_point() else model.state_dict()[k])
                for k, v in before.items()}
    _eval(ema.module, _images(pair))  # the average runs
    return _delta(expected, ema.module.state_dict())


def fx_quantization(pair: str, which: str) -> float:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    x = _images(pair)
    model = _model(pair, which).eval()
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping('fbgemm'), (x,))
    with torch.no_grad():
        prepared(x)
        quantized = convert_fx(prepared)(x)
    assert torch.isfinite(quantized).all()
    return _delta(_eval(model, x), quantized)


# --- our own tools ----------------------------------------------------------------------------------------------
# every registered class, with and without cells, at its default width (config.json records the model's own
# arguments, not backbone kwargs such as ``channels``)
OWN_MODELS = {
    'ptl_resnet18': dict(img_size=SIZE), 'ptl_mgn_resnet50': MGN, 'mgn_resnet50': MGN,
    'reid_ptl_resnet18': dict(img_size=SIZE), 'reid_resnet18': dict(img_size=SIZE),
}


@pytest.mark.slow
@pytest.mark.parametrize('name', list(OWN_MODELS))
def test_export_deploy_reload_extract_reproduce_every_registered_model(name, tmp_path):
    """A train.py checkpoint through ``ptl-timm export`` (its folder reloaded by timm), ``deploy`` (torch.export)
    and ``extract``: each reproduces the model bit for bit."""
    kwargs = OWN_MODELS[name]
    size = kwargs['img_size'] if isinstance(kwargs['img_size'], tuple) else (kwargs['img_size'],) * 2
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3, **kwargs)
    x = torch.randn(4, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.train()(x.flip(0))
    model.eval()
    checkpoint_file = tmp_path / 'last.pth.tar'
    args = argparse.Namespace(model=name, model_kwargs=kwargs, input_size=[3, *size], img_size=None, in_chans=None,
                              gp=None)
    torch.save(dict(arch=name, args=args, epoch=1, state_dict=model.state_dict()), checkpoint_file)
    assert main(['export', str(checkpoint_file), str(tmp_path / 'hub')]) == 0  # checks the reloaded folder too
    assert main(['info', f'local-dir:{tmp_path / "hub"}']) == 0
    reloaded = timm.create_model(f'local-dir:{tmp_path / "hub"}', pretrained=True).eval()
    assert main(['deploy', str(checkpoint_file), str(tmp_path / 'model.pt2'), '--no-check']) == 0  # checked below
    program = load_exported(tmp_path / 'model.pt2')
    extractor = FeatureExtractor(name, checkpoint=checkpoint_file, **kwargs)
    with torch.no_grad():
        assert torch.equal(model(x), reloaded(x))
        assert torch.equal(prepare_for_export(model)(x), program(x))
        assert torch.equal(embed(model, x), extractor(x))


@pytest.mark.slow
def test_mgn_deploys_to_onnx(tmp_path):
    """MGN's stripe pooling exports to ONNX (which has no adaptive max pooling), with and without cells."""
    for name in ('ptl_mgn_resnet50', 'mgn_resnet50'):
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=0, **MGN).eval()
        path = export_model(model, tmp_path / f'{name}.onnx', input_size=(3, *MGN_SIZE))
        assert check_export(model, path, input_size=(3, *MGN_SIZE)) < 1e-4


# --- features_only, transformers ---------------------------------------------------------------------------------
FEATURE_FORMS = [(cls, None) for cls in (None, 'list', 'dict', 'hook', 'fx', 'getter')] + [
    (None, (1, 3)), ('dict', (1, 3)), ('getter', (1, 3))]


def _features_change(pair: str, which: str, feature_cls: Any, out_indices: Any) -> Tuple[float, nn.Module]:
    """features_only in one form against the full model's forward_intermediates, the same random init; and the
    wrapper."""
    kwargs = {k: v for k, v in dict(feature_cls=feature_cls, out_indices=out_indices).items() if v is not None}
    features = _create(pair, which, features_only=True, **kwargs)
    model = _reference(pair, which)
    x = _images(pair)
    with torch.no_grad():
        out = features.eval()(x)
        want = model.forward_intermediates(x, indices=list(out_indices) if out_indices else None,
                                           intermediates_only=True)
    maps = list(out.values()) if isinstance(out, dict) else out
    if features.feature_info.channels() != [m.shape[1] for m in maps]:
        return float('inf'), features
    return _delta(want, maps), features


_REFERENCES: Dict[Tuple[str, str], nn.Module] = {}


def _reference(pair: str, which: str) -> nn.Module:
    """The pair's model as created (the random init features_only wrappers of it start from), in eval mode."""
    if (pair, which) not in _REFERENCES:
        _REFERENCES[pair, which] = _create(pair, which).eval()
    return _REFERENCES[pair, which]


def _timm_backbone_change(pair: str, which: str) -> float:
    """transformers' TimmBackbone in every output mode against forward_intermediates, the same random init."""
    from transformers import TimmBackbone, TimmBackboneConfig
    name, kwargs = PAIRS[pair][WHICH.index(which)]
    x = _images(pair)
    worst = 0.
    for out_indices in (None, (1, 3), (-1,)):
        config = TimmBackboneConfig(backbone=name, use_pretrained_backbone=False, out_indices=out_indices)
        torch.manual_seed(0)
        backbone = TimmBackbone(config, **kwargs).eval()
        torch.manual_seed(0)
        model = timm.create_model(name, **kwargs).eval()
        with torch.no_grad():
            stages = model.forward_intermediates(x, intermediates_only=True)
            for hidden in (False, True):
                out = backbone(x, output_hidden_states=hidden)
                tuple_out = backbone(x, output_hidden_states=hidden, return_dict=False)
                worst = max(worst, _delta([stages[i] for i in backbone.out_indices], list(out.feature_maps)),
                            _delta(list(out.feature_maps), list(tuple_out[0])))
                if hidden:
                    worst = max(worst, _delta(stages[:len(out.hidden_states)], list(out.hidden_states)))
    return worst


def _detr_change(pair: str, which: str) -> float:
    """A DETR built offline on the model (frozen BN, as transformers does): its backbone maps against the model's
    in eval, and a training step that runs."""
    from transformers import DetrConfig, DetrForObjectDetection
    name, _ = PAIRS[pair][WHICH.index(which)]
    config = DetrConfig(use_timm_backbone=True, backbone=name, use_pretrained_backbone=False, d_model=16,
                        encoder_layers=1, decoder_layers=1, encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=3,
                        encoder_attention_heads=2, decoder_attention_heads=2, num_labels=2)
    torch.manual_seed(0)
    detr = DetrForObjectDetection(config)
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    backbone = detr.model.backbone.model
    with torch.no_grad():
        delta = _delta(model.forward_intermediates(x, indices=list(config.backbone_config.out_indices),
                                                   intermediates_only=True), backbone.eval()(x))
    labels = [dict(class_labels=torch.tensor([1]), boxes=torch.tensor([[0.5, 0.5, 0.2, 0.2]]))]
    detr.train()(pixel_values=x, labels=labels).loss.backward()
    return delta


# --- the battery --------------------------------------------------------------------------------------------------
STATEFUL = [own_grad_checkpointing, sync_batchnorm_torch, sync_batchnorm_timm, frozen_batchnorm_timm,
            frozen_batchnorm_detr, timm_ema]


@pytest.mark.parametrize('pair', list(PAIRS))
@pytest.mark.parametrize('client', STATEFUL, ids=lambda c: c.__name__)
def test_client_keeps_the_function_as_on_the_twin(client, pair):
    _parity(client, pair)


@pytest.mark.parametrize('model', ['ptl', 'twin'])
@pytest.mark.parametrize('pair', ['mgn-shared', 'reid-shared'])
@pytest.mark.parametrize('client', [sync_batchnorm_torch, sync_batchnorm_timm], ids=lambda c: c.__name__)
def test_sync_batchnorm_conversion_keeps_the_reid_models_as_the_timm_backbone(client, pair, model):
    """The twins of the ReID classes are ptl_timm's own models (their heads are ours): the SyncBN conversions must
    work on them, and on the PTL ones, as exactly as on the plain timm backbone both are built on."""
    backbone = client('ptlnet-shared', 'twin')  # plain timm resnet18
    change = client(pair, model)
    assert all(_kind(c) <= _kind(backbone[k]) for k, c in change.items() if k != 'cells'), (change, backbone)


@pytest.mark.parametrize('pair', CLASS_PAIRS)
@pytest.mark.parametrize('client', [features_grad_checkpointing, pytest.param(fx_quantization, marks=pytest.mark.slow)],
                         ids=lambda c: c.__name__)
def test_class_client_keeps_the_function_as_on_the_twin(client, pair):
    _parity(client, pair)


@pytest.mark.parametrize('pair', CLASS_PAIRS)
def test_every_features_only_form_gives_the_twins_wrapper_and_the_stage_maps(pair):
    for feature_cls, out_indices in FEATURE_FORMS:
        form = f'features_only(feature_cls={feature_cls}, out_indices={out_indices})'
        try:
            twin, twin_features = _features_change(pair, 'twin', feature_cls, out_indices)
        except Exception:
            continue  # the twin has no such form
        ptl, features = _features_change(pair, 'ptl', feature_cls, out_indices)
        assert _kind(ptl) <= _kind(twin), f'{form} on {pair}: PTL change {ptl:.3g}, twin {twin:.3g}'
        assert isinstance(features, type(twin_features)), (form, type(features), type(twin_features))
        public = {n for n in dir(twin_features) if not n.startswith('_') and n not in twin_features._modules}
        assert public <= set(dir(features)), (form, public - set(dir(features)))


@pytest.mark.parametrize('pair', CLASS_PAIRS)
def test_transformers_timm_backbone_in_every_output_mode(pair):
    _parity(_timm_backbone_change, pair)


@pytest.mark.parametrize('pair', ['ptlnet-shared', 'reid-shared'])
def test_transformers_detr_on_the_model(pair):
    _parity(_detr_change, pair)


@pytest.mark.parametrize('pair', list(PAIRS))
@pytest.mark.parametrize('client', [external_checkpoint_model, external_checkpoint_parts], ids=lambda c: c.__name__)
def test_external_activation_checkpointing_keeps_the_function(client, pair):
    """torch.utils.checkpoint around the model, or around the parts that hold cells, re-runs them in backward: the
    step must be the one without checkpointing (needs the state update that is safe under recomputation)."""
    _parity(client, pair)

