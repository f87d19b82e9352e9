"""BNNeck ReID models over any timm or ``ptl_*`` backbone, and the registered ``reid_*`` ones.

``reid_<backbone>`` (e.g. ``reid_ptl_resnet50``, ``reid_resnet50``) is the BNNeck global-feature model
(Luo et al., "Bag of Tricks", 2019): pooled backbone feature -> BatchNorm without a shift -> linear
classifier without bias. Any other timm or ``ptl_*`` backbone: :func:`create_reid_model`.

Outputs follow timm's conventions by default: ``model(x)`` gives the identity logits (B, num_classes), or the
embedding (B, D) with ``num_classes=0``; ``forward_head(x, pre_logits=True)`` gives the embedding, deterministic
and independent of the batch in eval mode, ready to L2-normalise. So timm's train.py trains them with its
cross-entropy. ``reid_output=True`` gives the ReID recipe's outputs instead: in train mode a
:class:`~ptl_timm.reid.losses.ReIDOutput` (logits for cross-entropy, features for the triplet loss, embedding) for
:class:`~ptl_timm.reid.losses.ReIDLoss`, in eval mode the embedding.
"""
from typing import Any, Dict, List, Optional, Tuple, Union

import timm
import torch
from timm.layers import to_2tuple
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    model_entrypoint,
    register_model,
    split_model_name_tag,
)
from torch import nn

from ..hub.cache import require_pretrained
from ..models import ptlnet
from ..models._helpers import (
    backbone_filter_fn,
    check_model_name,
    derived_pretrained_cfgs,
    first_conv_prefixes,
    prefix_group_matcher,
    set_feature_cfg,
    tagged_cfg,
)
from ..models._stages import module_copy
from ..models.ptlnet import PTLNet, checkpoint_filter_fn
from ._common import REID_CFG, fit_checkpoint, pool_size
from .losses import ReIDOutput

__all__ = ['ReIDNet', 'create_reid_model', 'reid_checkpoint_filter_fn', 'REID_INPUT_SIZE', 'REID_BACKBONES']

REID_INPUT_SIZE = (3, 256, 128)


class BNNeck(nn.BatchNorm1d):
    """BNNeck's BatchNorm without a shift (the embedding stays centred), over pooled features (B, D), and at every
    position of unpooled maps (B, D, H, W) (``global_pool=''``), as the head norms of timm's CNNs.

    It has no bias at all (``bias`` is None, as a BatchNorm's parameter slot allows): nothing for an optimiser or
    weight decay to move, a gradient for every parameter, and BN-swapping utilities
    (``torch.nn.SyncBatchNorm.convert_sync_batchnorm``) carry the missing bias over as they carry a parameter, so a
    converted model has the same state_dict. Checkpoints of ptl_timm 0.1, which held the bias as a zero buffer
    (``neck.bias``), load: a zero ``bias`` is accepted and dropped, any other is an error."""

    def __init__(self, num_features: int, **kwargs: Any):
        super().__init__(num_features, **kwargs)
        del self.bias
        self.register_parameter('bias', None)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.ones_(self.weight)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        _check_neck_input(input)

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, local_metadata: Dict[str, Any],
                              strict: bool, missing_keys: List[str], unexpected_keys: List[str],
                              error_msgs: List[str]) -> None:
        bias = state_dict.pop(prefix + 'bias', None)
        if bias is not None and bool(torch.as_tensor(bias).any()):
            error_msgs.append(f'{prefix}bias: BNNeck has no shift, but the checkpoint holds a non-zero bias (it comes '
                              'from a BatchNorm with a trained bias, not from a BNNeck).')
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


# shape tests: one call each in an FX graph (any tracer), run on real tensors
@torch.fx.wrap
def _check_pooled(embedding: torch.Tensor) -> None:
    if embedding.dim() != 2:
        raise ValueError("Unpooled features (global_pool='') have no identity logits: create the model with "
                         'num_classes=0, or reset_classifier(0, ...).')


@torch.fx.wrap
def _check_neck_input(x: torch.Tensor) -> None:
    if x.dim() != 2 and x.dim() != 4:
        raise ValueError(f'BNNeck expects (B, D) or (B, D, H, W) features, got {x.dim()}D input')


class ReIDNet(nn.Module):
    """BNNeck global-feature ReID model over any timm or ``ptl_*`` backbone.

    pooled feature f (B, D) -> BN (no shift) -> embedding (B, D) -> linear (no bias) -> logits.
    The triplet loss sees f, the cross-entropy the logits, retrieval the embedding.

    Args:
        backbone: timm model name, ``ptl_*`` included (created without weights; the registered
            ``reid_*`` models load them with ``pretrained=True``).
        num_classes: training identities (0: no classifier).
        in_chans: image channels.
        img_size: nominal input (H, W); a PTL backbone stores its cells' state at the grids it gives.
        reid_output: ``forward`` gives a :class:`~ptl_timm.reid.losses.ReIDOutput` in train mode and the
            embedding in eval mode (the ReID recipe), instead of logits (timm's convention).
        **backbone_kwargs: passed to the backbone (``drop_path_rate``, ``state_mode``, ...).
    """

    def __init__(
            self,
            backbone: str,
            num_classes: int = 751,
            in_chans: int = 3,
            img_size: Union[int, Tuple[int, int]] = REID_INPUT_SIZE[1:],
            reid_output: bool = False,
            device: Optional[Union[str, torch.device]] = None,
            dtype: Optional[torch.dtype] = None,
            **backbone_kwargs: Any,
    ):
        super().__init__()
        check_model_name(split_model_name_tag(backbone)[0])
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = to_2tuple(img_size)
        self.reid_output = reid_output
        if _is_ptl(backbone):
            backbone_kwargs['img_size'] = self.img_size
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0, in_chans=in_chans,
                                          device=device, dtype=dtype, **backbone_kwargs)
        # width of forward_head(pre_logits=True), which can differ from num_features (e.g. a conv head after pooling)
        self.num_features = self.head_hidden_size = getattr(self.backbone, 'head_hidden_size', None) or \
            self.backbone.num_features
        # the backbone's stages, under its name here: features_only extractors find them in this model
        self.feature_info = [dict(info, module=f'backbone.{info["module"]}') for info in self.backbone.feature_info]
        self.neck = BNNeck(self.num_features)
        self.classifier = self._classifier(num_classes)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)  # the neck and the classifier; the backbone was created there

    def _classifier(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        ref = next(self.backbone.parameters())  # the model's device and dtype (after .to() too)
        fc = nn.Linear(self.num_features, num_classes, bias=False, device=ref.device, dtype=ref.dtype)
        nn.init.normal_(fc.weight, std=0.001)
        return fc

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'classifier' if name_only else self.classifier

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            self.backbone.reset_classifier(0, global_pool)
        self.num_classes = num_classes
        self.classifier = self._classifier(num_classes)
        self.classifier.train(self.training)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        matcher = prefix_group_matcher(self.backbone.group_matcher(coarse=coarse), 'backbone.')
        matcher['neck'] = r'^neck|^classifier'
        return matcher

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The backbone's stage features (``feature_info``), and its final features unless ``intermediates_only``."""
        return self.backbone.forward_intermediates(
            x, indices=indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt,
            intermediates_only=intermediates_only)

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the backbone stages after the last of ``indices``. With ``prune_head``, or where the backbone's
        features now end early, the neck and the classifier go too (``num_classes`` 0): ``forward`` then gives
        the backbone's last kept map, as a pruned timm CNN does."""
        head_width = self.head_hidden_size
        take_indices = self.backbone.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        width = getattr(self.backbone, 'head_hidden_size', None) or self.backbone.num_features
        if prune_head or width != head_width:
            self.neck = nn.Identity()
            self.num_classes = 0
            self.classifier = nn.Identity()
            self.num_features = self.head_hidden_size = width
        return take_indices

    def __prepare_scriptable__(self) -> 'ReIDNet':
        """``torch.jit.script`` puts a prepared copy of a PTL backbone in place of the child it compiles: a copy
        of this model takes it, not this one."""
        return module_copy(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Embedding (B, D) with ``pre_logits``, else the identity logits (B, num_classes) (the embedding when
        ``num_classes=0``). Unpooled features (``global_pool=''``) give a (B, D, H, W) embedding map."""
        embedding = self.neck(self.backbone.forward_head(x, pre_logits=True))
        if pre_logits:
            return embedding
        if self.num_classes > 0:
            _check_pooled(embedding)
        return self.classifier(embedding)

    def forward_reid_head(self, x: torch.Tensor) -> ReIDOutput:
        """The ReID recipe's outputs from ``forward_features``: the pooled feature f for the triplet loss, the
        embedding BN(f) and its logits for the cross-entropy."""
        f = self.backbone.forward_head(x, pre_logits=True)
        embedding = self.neck(f)
        logits = [self.classifier(embedding)] if self.num_classes > 0 else []
        return ReIDOutput(logits=logits, features=[f], embedding=embedding)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, ReIDOutput]:
        x = self.forward_features(x)
        if self.reid_output and self.training:
            return self.forward_reid_head(x)
        return self.forward_head(x, pre_logits=self.reid_output)


def _is_ptl(name: str) -> bool:
    arch = split_model_name_tag(name)[0]
    return timm.is_model(arch) and model_entrypoint(arch).__module__ == ptlnet.__name__


def reid_checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: ReIDNet) -> Dict[str, torch.Tensor]:
    """Fit a checkpoint of the backbone (plain timm or PTL, through its own filter) or a full ReIDNet one."""
    is_reid = any(k.startswith('neck.') for k in state_dict)
    if not is_reid:
        bb = model.backbone
        if isinstance(bb, PTLNet):
            state_dict = checkpoint_filter_fn(state_dict, bb)
        else:
            bb_filter = backbone_filter_fn(split_model_name_tag(model.backbone_name)[0])
            if bb_filter is not None:
                state_dict = bb_filter(state_dict, bb)
            keys = bb.state_dict()
            state_dict = {k: v for k, v in state_dict.items() if k in keys}  # drops the ImageNet classifier
        state_dict = {f'backbone.{k}': v for k, v in state_dict.items()}
    elif isinstance(model.neck, BNNeck) and 'neck.bias' in state_dict and not state_dict['neck.bias'].any():
        state_dict = {k: v for k, v in state_dict.items() if k != 'neck.bias'}  # ptl_timm 0.1's zero buffer
    return fit_checkpoint(state_dict, model, ('neck.', 'classifier.'), first_conv_prefixes(model) + ('classifier.',),
                          'ReID' if is_reid else f'plain {model.backbone_name}')


def _create_reid(variant: str, backbone: str, pretrained: bool = False, **kwargs: Any) -> ReIDNet:
    require_pretrained(variant, pretrained, kwargs)
    set_feature_cfg(kwargs)
    return build_model_with_cfg(ReIDNet, variant, pretrained, pretrained_filter_fn=reid_checkpoint_filter_fn,
                                backbone=backbone, **kwargs)


def _reid_cfgs(backbone: str) -> Dict[str, Dict[str, Any]]:
    pool = pool_size(backbone, REID_INPUT_SIZE)
    cfgs = derived_pretrained_cfgs(backbone, f'reid_{backbone}', 'ReID layers start fresh.', prefix='backbone.',
                                   classifier='classifier', input_size=REID_INPUT_SIZE, **REID_CFG, pool_size=pool)
    return cfgs or {f'reid_{backbone}': dict(input_size=REID_INPUT_SIZE, pool_size=pool, classifier='classifier',
                                             num_classes=0)}


def create_reid_model(backbone: str, pretrained: bool = False, **kwargs: Any) -> ReIDNet:
    """BNNeck ReID model over any timm or ``ptl_*`` backbone (``'convnext_nano'``, ``'ptl_densenet121.tv_in1k'``).

    ``pretrained=True`` loads the backbone tag's weights (default tag if none is given); registered
    ``reid_*`` names give the same model as ``timm.create_model``.
    """
    arch, tag = split_model_name_tag(backbone)
    check_model_name(arch)
    name = f'reid_{arch}'
    if timm.is_model(name):
        return timm.create_model(f'{name}.{tag}' if tag else name, pretrained=pretrained, **kwargs)
    return _create_reid(name, arch, pretrained, pretrained_cfg=tagged_cfg(_reid_cfgs(arch), name, tag, arch), **kwargs)


default_cfgs = generate_default_cfgs({
    **_reid_cfgs('resnet50'), **_reid_cfgs('ptl_resnet50'), **_reid_cfgs('resnet18'), **_reid_cfgs('ptl_resnet18'),
    **_reid_cfgs('mobilenetv2_100'), **_reid_cfgs('ptl_mobilenetv2_100'),
})


@register_model
def reid_resnet50(pretrained: bool = False, **kwargs: Any) -> ReIDNet:
    """BNNeck ReID model over ``resnet50``, input 256x128."""
    return _create_reid('reid_resnet50', 'resnet50', pretrained, **kwargs)


@register_model
def reid_ptl_resnet50(pretrained: bool = False, **kwargs: Any) -> ReIDNet:
    """BNNeck ReID model over ``ptl_resnet50``, input 256x128."""
    return _create_reid('reid_ptl_resnet50', 'ptl_resnet50', pretrained, **kwargs)


@register_model
def reid_resnet18(pretrained: bool = False, **kwargs: Any) -> ReIDNet:
    """BNNeck ReID model over ``resnet18``, input 256x128."""
    return _create_reid('reid_resnet18', 'resnet18', pretrained, **kwargs)


@register_model
def reid_ptl_resnet18(pretrained: bool = False, **kwargs: Any) -> ReIDNet:
    """BNNeck ReID model over ``ptl_resnet18``, input 256x128."""
    return _create_reid('reid_ptl_resnet18', 'ptl_resnet18', pretrained, **kwargs)


@register_model
def reid_mobilenetv2_100(pretrained: bool = False, **kwargs: Any) -> ReIDNet:
    """BNNeck ReID model over ``mobilenetv2_100``, input 256x128."""
    return _create_reid('reid_mobilenetv2_100', 'mobilenetv2_100', pretrained, **kwargs)


@register_model
def reid_ptl_mobilenetv2_100(pretrained: bool = False, **kwargs: Any) -> ReIDNet:
    """BNNeck ReID model over ``ptl_mobilenetv2_100``, input 256x128."""
    return _create_reid('reid_ptl_mobilenetv2_100', 'ptl_mobilenetv2_100', pretrained, **kwargs)


# The entry points above are the registered BNNeck models; this is that list by backbone.
REID_BACKBONES: Tuple[str, ...] = tuple(
    name[len('reid_'):] for name in timm.list_models(module=__name__.rsplit('.', 1)[-1]))
