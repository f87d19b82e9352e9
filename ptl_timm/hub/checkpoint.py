"""Reading checkpoints (train.py's, bare state_dicts, safetensors files) and rebuilding the model one holds (any model
ptl_timm registers: PTLNet, MGN, ReIDNet)."""
import argparse
import hashlib
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.models import split_model_name_tag
from torch import nn

from . import HubError
from .kinds import checkpoint_filter, classifier_prefixes, is_registered, registered_models

__all__ = ['file_sha256', 'corrupted_file_message', 'read_checkpoint', 'model_from_checkpoint', 'TRAIN_DATA_ARGS']

_logger = logging.getLogger(__name__)


def file_sha256(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def corrupted_file_message(path: Optional[Path], error: Exception) -> str:
    """What to say about a weights file that does not read: its sha256, and the published one where the Hub
    cache shows it."""
    if path is None:
        return f'The weights file is corrupted or truncated ({error}).'
    real = path.resolve()
    digest = file_sha256(real)
    msg = f'{path} is corrupted or truncated ({error}); sha256 {digest}, {real.stat().st_size} bytes.'
    # the Hub cache names a large file's blob after its sha256: a mismatch proves damage after download
    if real.parent.name == 'blobs' and len(real.name) == 64 and real.name != digest:
        msg += f' The Hub published sha256 {real.name}.'
    return msg + ' Delete it and download (or export) it again.'


def read_checkpoint(path: Union[str, Path], use_ema: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The state_dict of a train.py checkpoint (``state_dict`` / ``state_dict_ema``), a bare state_dict
    (.pth / .pt / .bin) or a safetensors file, and the checkpoint's metadata (``arch``, ``args``, ``epoch``,
    ``metric``, ``source``: which state_dict was taken)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'No checkpoint at {path}.')
    if path.suffix == '.safetensors':
        try:
            return load_file(str(path)), dict(source='safetensors')
        except SafetensorError as e:
            raise HubError(f'{path} is not a readable safetensors file ({e}): truncated or corrupted. '
                           'Copy or export it again.') from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # train.py stores its args namespace
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... for bad files
        raise HubError(f'{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e}): truncated, '
                       'corrupted or not a checkpoint.') from e
    if not isinstance(checkpoint, dict):
        raise HubError(f'{path} holds a {type(checkpoint).__name__}, not a state_dict or a train.py checkpoint.')
    if 'state_dict' in checkpoint or 'state_dict_ema' in checkpoint:
        key = 'state_dict_ema' if use_ema else 'state_dict'
        if checkpoint.get(key) is None:
            hint = ('it was trained without an EMA; use_ema=False reads the model' if use_ema else
                    'it holds EMA weights only; use_ema=True reads them')
            raise HubError(f'{path} has no {key!r} ({hint}). Keys: {", ".join(checkpoint)}.')
        if not use_ema and checkpoint.get('state_dict_ema') is not None:
            _logger.info(f'{path} also holds EMA weights (state_dict_ema); reading the model (use_ema=True: the EMA).')
        state_dict = checkpoint[key]
        args = checkpoint.get('args')
        meta = dict(source=key, arch=checkpoint.get('arch'), epoch=checkpoint.get('epoch'),
                    metric=checkpoint.get('metric'), args=vars(args) if isinstance(args, argparse.Namespace) else args)
    else:
        if use_ema:
            raise HubError(f'{path} is a bare state_dict: it has no EMA weights; use_ema=False reads it.')
        state_dict, meta = checkpoint, dict(source='state_dict')
    prefixes = ('module.', '_orig_mod.')  # DDP / torch.compile wrappers
    clean = {}
    for k, v in state_dict.items():
        while k.startswith(prefixes):
            k = k.split('.', 1)[1]
        clean[k] = v
    return clean, meta


def _infer_model_args(state_dict: Dict[str, torch.Tensor], arch: str) -> Dict[str, Any]:
    """Arguments the tensors themselves tell: the classes of the head and the slots of a 'carried' state."""
    weights = [state_dict.get(f'{prefix}weight') for prefix in classifier_prefixes(arch)]
    args: Dict[str, Any] = dict(num_classes=weights[0].shape[0] if weights and weights[0] is not None else 0)
    slots = next((v.shape[0] for k, v in state_dict.items()
                  if k.endswith('.state') and f'{k}_frozen' in state_dict), 1)  # a BConvCell's state buffers
    if slots > 1:
        args.update(state_mode='carried', state_slots=slots)
    return args


# train.py arguments that create_model receives (train.py name -> model kwarg)
_TRAIN_MODEL_ARGS = dict(in_chans='in_chans', gp='global_pool', bn_momentum='bn_momentum', bn_eps='bn_eps')
TRAIN_DATA_ARGS = ('input_size', 'img_size', 'mean', 'std', 'crop_pct', 'interpolation', 'crop_mode')


def model_from_checkpoint(
        checkpoint: Union[str, Path],
        model_name: Optional[str] = None,
        use_ema: bool = False,
        model_kwargs: Optional[Dict[str, Any]] = None,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """The model a checkpoint (see :func:`read_checkpoint`) holds, in eval mode, and the checkpoint's metadata: any
    model ptl_timm registers (``ptl_*``, ``ptl_mgn_resnet50`` / ``mgn_resnet50``, ``reid_*``).

    The model is rebuilt from ``model_name`` (default: the checkpoint's ``arch``), the train.py arguments
    stored in the checkpoint, what the tensors tell (classes, slots of a 'carried' state) and ``model_kwargs``
    (highest priority); the weights load through the model's checkpoint filter (mismatching keys are listed). The
    checkpoint must hold every tensor of the model: a plain backbone checkpoint is refused, not completed with fresh
    tensors.
    """
    state_dict, meta = read_checkpoint(checkpoint, use_ema=use_ema)
    train_args = meta.get('args') or {}
    model_name = model_name or meta.get('arch')
    if not model_name:
        raise HubError(f"{checkpoint} does not say which model it holds: pass model_name (e.g. 'ptl_resnet50').")
    arch = split_model_name_tag(model_name)[0]
    if not is_registered(arch):
        raise HubError(f'{arch!r} is not a model ptl_timm registers; model_name must be one of: '
                       f'{", ".join(registered_models())} (registered by `import ptl_timm`).')
    kwargs = {v: train_args[k] for k, v in _TRAIN_MODEL_ARGS.items() if train_args.get(k) is not None}
    kwargs.update(train_args.get('model_kwargs') or {})
    kwargs.update(_infer_model_args(state_dict, arch))
    kwargs.update(model_kwargs or {})
    model = timm.create_model(arch, pretrained=False, **kwargs)
    missing = [k for k in model.state_dict() if k not in state_dict]
    if missing:
        raise HubError(
            f'{checkpoint} lacks {len(missing)} of the {len(model.state_dict())} tensors of {arch} (e.g. '
            f'{", ".join(missing[:3])}): it is not a full checkpoint of this model (a plain backbone checkpoint, or '
            "another model's). Load a backbone checkpoint with timm.create_model(NAME, pretrained=True, "
            'pretrained_cfg_overlay=dict(file=PATH)), fine-tune, then export; or pass the model_name and '
            'model_kwargs it was trained with.')
    try:
        model.load_state_dict(checkpoint_filter(model)(state_dict, model), strict=True)
    except ValueError as e:
        raise ValueError(f'{e}\nRebuild it with the settings it was trained with: model_kwargs=dict(img_size=64, '
                         '...).') from e
    return model.eval(), meta
