"""Feature extraction like torchreid's ``FeatureExtractor``: images in, an (N, D) embedding tensor out.

    extractor = FeatureExtractor('reid_ptl_resnet50', checkpoint='model_best.pth.tar')
    feats = extractor(['a.jpg', 'b.jpg'])           # paths, PIL images, HxWxC uint8 arrays or tensors

Command line, every image of a folder (recursively) into a ``.npy`` file, with the relative paths in
the same order next to it (``OUT.txt``)::

    ptl-timm extract FOLDER OUT.npy --model reid_ptl_resnet50 --checkpoint model.pth
"""
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import resolve_data_config
from timm.layers import to_2tuple
from torch import nn
from torchvision.transforms import v2 as T

from ..data.reid import IMAGE_EXTENSIONS
from ..hub.checkpoint import read_checkpoint

__all__ = ['FeatureExtractor', 'embed', 'flip_embed', 'list_images', 'load_weights']

ImageInput = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]


@torch.no_grad()
def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The embedding of ``x`` (B, C, H, W): a timm model's pre-logits features (``forward_head(...,
    pre_logits=True)``, whatever its classifier or ``reid_output``), else what ``model(x)`` returns."""
    if hasattr(model, 'forward_features') and hasattr(model, 'forward_head'):
        return model.forward_head(model.forward_features(x), pre_logits=True)
    return model(x)


@torch.no_grad()
def flip_embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean of the embeddings of ``x`` (B, C, H, W) and of its horizontal mirror: the usual test-time flip."""
    return (embed(model, x) + embed(model, torch.flip(x, dims=[3]))) / 2


def load_weights(model: nn.Module, path: Union[str, Path], use_ema: bool = False) -> None:
    """Load a checkpoint (train.py's, with ``use_ema`` its EMA weights; a state_dict; safetensors) into ``model``.

    Classifier tensors the model does not have (it was created with ``num_classes=0``) are skipped; any
    other difference is an error.
    """
    state_dict, _ = read_checkpoint(path, use_ema=use_ema)
    expected = model.state_dict()
    classifier = getattr(model, 'get_classifier', lambda name_only: '')(name_only=True)
    prefixes = tuple(f'{c}.' for c in ([classifier] if isinstance(classifier, str) else classifier) if c)
    state_dict = {k: v for k, v in state_dict.items() if k in expected or not k.startswith(prefixes)}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f'{path} does not fit the model: missing {missing[:10]}, unexpected {unexpected[:10]}. '
                         'Create the model the checkpoint was trained with.')


class FeatureExtractor:
    """Embed images with a ReID model in eval mode.

    Args:
        model: a registered name (created with ``num_classes=0``) or an ``nn.Module``.
        checkpoint: weights to load into a named model (a training checkpoint).
        pretrained: load the named model's pretrained (backbone) weights.
        image_size: (H, W) or one size the images are resized to; default: the model's pretrained cfg input size.
        batch_size: images per forward.
        device: where the model runs.
        flip: average with the mirrored image's embedding.
        normalize: L2-normalise the output rows.
        use_ema: load the checkpoint's EMA weights (train.py's ``state_dict_ema``), not the model's.
        model_kwargs: extra arguments of ``timm.create_model`` for a named model.

    Calling it with one image or a list of them returns a float32 (N, D) CPU tensor. Paths, PIL images
    and HxWxC / HxW uint8 arrays are resized to ``image_size`` and normalised with the model's mean and
    std; tensors (C, H, W) or (N, C, H, W) are taken as already preprocessed, as torchreid does.
    """

    def __init__(
            self,
            model: Union[str, nn.Module],
            checkpoint: Optional[Union[str, Path]] = None,
            pretrained: bool = False,
            image_size: Optional[Union[int, Tuple[int, int]]] = None,
            batch_size: int = 32,
            device: Union[str, torch.device] = 'cpu',
            flip: bool = False,
            normalize: bool = False,
            use_ema: bool = False,
            **model_kwargs: Any,
    ):
        if isinstance(model, str):
            model = timm.create_model(model, pretrained=pretrained, num_classes=0, **model_kwargs)
            if checkpoint is not None:
                load_weights(model, checkpoint, use_ema)
        elif checkpoint is not None or use_ema or pretrained or model_kwargs:
            raise ValueError('checkpoint, pretrained and model kwargs apply to a model name; load the weights '
                             'into the module yourself.')
        if batch_size < 1:
            raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        cfg = resolve_data_config(model=model)
        self.image_size = to_2tuple(image_size) if image_size is not None else tuple(cfg['input_size'][-2:])
        self.batch_size = batch_size
        self.flip = flip
        self.normalize = normalize
        self.transform = T.Compose([
            T.Resize(self.image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(cfg['mean'], cfg['std']),
        ])

    def _load(self, item: ImageInput) -> torch.Tensor:
        if isinstance(item, (str, Path)):
            with Image.open(item) as img:
                item = img.convert('RGB')
        elif isinstance(item, np.ndarray):
            if item.dtype != np.uint8 or item.ndim not in (2, 3):
                raise ValueError(f'Arrays must be HxW or HxWxC uint8 images, got {item.dtype} {item.shape}; '
                                 'pass preprocessed data as a float tensor instead.')
            item = Image.fromarray(item)
        if not isinstance(item, Image.Image):
            raise TypeError(f'Cannot read an image from {type(item).__name__}: pass paths, PIL images, uint8 arrays '
                            'or preprocessed tensors.')
        return self.transform(item.convert('RGB'))

    def _batches(self, inputs: Union[ImageInput, Sequence[ImageInput]]):
        if isinstance(inputs, torch.Tensor):
            x = inputs.unsqueeze(0) if inputs.ndim == 3 else inputs
            if x.ndim != 4:
                raise ValueError(f'Tensors must be (C, H, W) or (N, C, H, W), got shape {tuple(inputs.shape)}.')
            for s in range(0, len(x), self.batch_size):
                yield x[s:s + self.batch_size].float()
            return
        single = isinstance(inputs, (str, Path, Image.Image)) or (isinstance(inputs, np.ndarray) and inputs.ndim < 4)
        items = [inputs] if single else list(inputs)  # a (N, H, W, C) array is a list of images
        for s in range(0, len(items), self.batch_size):
            yield torch.stack([self._load(it) for it in items[s:s + self.batch_size]])

    @torch.no_grad()
    def __call__(self, inputs: Union[ImageInput, Sequence[ImageInput]]) -> torch.Tensor:
        outs = []
        for x in self._batches(inputs):
            x = x.to(self.device)
            f = flip_embed(self.model, x) if self.flip else embed(self.model, x)
            if not isinstance(f, torch.Tensor) or f.ndim != 2:
                raise ValueError(f'The model gave {type(f).__name__} of shape {getattr(f, "shape", None)}, not (B, D) '
                                 "embeddings: use a model with a pooling head (not global_pool='').")
            outs.append(f.float().cpu())
        if not outs:
            raise ValueError('No images were given.')
        out = torch.cat(outs)
        return torch.nn.functional.normalize(out, dim=1) if self.normalize else out


def list_images(folder: Union[str, Path]) -> List[Path]:
    """Image files under ``folder`` (recursively), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'{folder} is not a folder of images.')
    files = sorted(p for p in folder.rglob('*') if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f'{folder} holds no image files ({", ".join(IMAGE_EXTENSIONS)}).')
    return files
