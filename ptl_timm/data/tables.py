"""Image tables for ReID training and evaluation: a dataset folder or in-memory arrays, loaded a batch at a time.

A table holds identities, cameras and a way to turn a list of indices into a normalised float batch
(B, 3, H, W). The training loop draws P x K batches of indices from it, augments them with its own generator and
evaluates query / gallery tables with the standard protocol (:func:`ptl_timm.reid.evaluate`).
"""
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .reid import ReIDSample, read_dukemtmc, read_market1501, read_msmt17

__all__ = ['ImageTable', 'ArrayTable', 'FolderTable', 'ReIDData', 'read_reid_data', 'emoji_reid_data', 'DATASETS']

DATASETS = ('auto', 'market1501', 'dukemtmc', 'msmt17', 'emoji')
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _normalise(x: torch.Tensor, size: Tuple[int, int], mean: Sequence[float], std: Sequence[float],
               antialias: Optional[bool]) -> torch.Tensor:
    """uint8 (B, H, W, 3), or grey (B, H, W) repeated on 3 channels -> float (B, 3, *size), resized bilinearly
    (``antialias`` None: not at all) and normalised, as ``ptl_timm.data.offline.to_model_input``."""
    x = x.float().div_(255)
    x = x.unsqueeze(1).expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    if antialias is not None:
        x = F.interpolate(x, size=size, mode='bilinear', align_corners=False, antialias=antialias)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


class ImageTable(torch.utils.data.Dataset):
    """Images with identities ``pids`` (N,) and cameras ``camids`` (N,); ``table[indices]`` is the float batch
    (len(indices), 3, H, W) at ``size``, normalised with ``mean`` / ``std``."""

    def __init__(self, pids: Sequence[int], camids: Sequence[int], size: Tuple[int, int],
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.pids = np.asarray(pids, dtype=np.int64)
        self.camids = np.asarray(camids, dtype=np.int64)
        self.size, self.mean, self.std = tuple(size), tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.pids)

    def __getitem__(self, indices: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError


class ArrayTable(ImageTable):
    """Images held as a uint8 array, RGB (N, H, W, 3) or grey (N, H, W), resized bilinearly (``antialias`` as
    ``F.interpolate``'s)."""

    def __init__(self, images: np.ndarray, pids: Sequence[int], camids: Sequence[int], size: Tuple[int, int],
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, antialias: bool = True):
        super().__init__(pids, camids, size, mean, std)
        rgb = images.ndim == 4 and images.shape[-1] == 3
        if not (rgb or images.ndim == 3) or images.dtype != np.uint8 or len(images) != len(self.pids):
            raise ValueError(f'Expected uint8 images (N, H, W, 3) or (N, H, W) with N = {len(self.pids)} '
                             f'identities, got {images.dtype} {images.shape}.')
        self.images = images
        self.antialias = antialias

    def __getitem__(self, indices: Sequence[int]) -> torch.Tensor:
        return _normalise(torch.from_numpy(self.images[list(indices)]), self.size, self.mean, self.std,
                          self.antialias)


class FolderTable(ImageTable):
    """Images read from the files of ``samples`` (RGB), resized bilinearly to ``size`` (H, W)."""

    def __init__(self, samples: Sequence[ReIDSample], size: Tuple[int, int],
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__([s.pid for s in samples], [s.camid for s in samples], size, mean, std)
        self.paths = [s.path for s in samples]

    def _read(self, path: str) -> np.ndarray:
        with Image.open(path) as img:
            img = img.convert('RGB')
            if img.size != (self.size[1], self.size[0]):
                img = img.resize((self.size[1], self.size[0]), Image.BILINEAR)
            return np.asarray(img)

    def __getitem__(self, indices: Sequence[int]) -> torch.Tensor:
        batch = np.stack([self._read(self.paths[i]) for i in indices])
        return _normalise(torch.from_numpy(batch), self.size, self.mean, self.std, None)  # resized on reading


@dataclass
class ReIDData:
    """A training table (identities 0..N-1) and the evaluation protocol's tables.

    ``gallery`` None: the cross-camera protocol on ``query`` alone (each camera in turn is the query, the other
    cameras the gallery; metrics averaged over cameras), as for the emoji set. Else query against gallery, the
    standard protocol (same identity and same camera removed from each query's gallery)."""
    train: ImageTable
    query: ImageTable
    gallery: Optional[ImageTable] = None
    name: str = ''

    @property
    def num_classes(self) -> int:
        return int(self.train.pids.max()) + 1

    def describe(self) -> str:
        parts = [('train', self.train), ('query', self.query)] + ([('gallery', self.gallery)] if self.gallery else [])
        return f'{self.name}: ' + ', '.join(f'{n} {len(np.unique(t.pids))} ids / {len(t)} images' for n, t in parts)


def read_reid_data(root: Union[str, Path], size: Tuple[int, int], dataset: str = 'auto') -> ReIDData:
    """Market-1501 / DukeMTMC-reID (or any folder in their layout) or MSMT17 (its list files) at ``root``."""
    root = Path(root)
    if dataset not in DATASETS or dataset == 'emoji':
        raise ValueError(f'dataset {dataset!r} is not a folder dataset; choose from {list(DATASETS[:-1])}.')
    if dataset == 'auto':
        dataset = 'msmt17' if (root / 'list_train.txt').is_file() else 'market1501'
    reader = dict(market1501=read_market1501, dukemtmc=read_dukemtmc, msmt17=read_msmt17)[dataset]
    splits = reader(root)
    return ReIDData(FolderTable(splits.train, size), FolderTable(splits.query, size),
                    FolderTable(splits.gallery, size), name=f'{dataset} at {root}')


def emoji_reid_data(size: Tuple[int, int], part: str = 'val', root: Optional[Path] = None, split_seed: int = 0,
                    max_identities: Optional[int] = None) -> ReIDData:
    """The emoji identities (``ptl_timm.data.offline.load_emoji_reid``): the training identities of the fixed
    split, evaluated cross-camera on ``part`` ('val' or 'test'); ``max_identities`` takes the first of each part."""
    from . import offline as data

    if part not in ('val', 'test'):
        raise ValueError(f"part must be 'val' or 'test', got {part!r}.")
    tables = emoji_tables(data.load_emoji_reid(root=root), size, split_seed, max_identities)
    return ReIDData(tables['train'], tables[part], None, name=f'emoji ({part})')


def emoji_tables(ds, size: Tuple[int, int], split_seed: int = 0, max_identities: Optional[int] = None
                 ) -> dict:
    """'train' (identities relabelled 0..N-1), 'val' and 'test' tables of an ``EmojiReID`` set."""
    from . import offline as data

    ids = data.identity_split(len(ds.identities), seed=split_seed)
    if max_identities:
        ids = data.IdentitySplit(*(part[:max_identities] for part in (ids.train, ids.val, ids.test)))
    out = {}
    for name in ('train', 'val', 'test'):
        keep = np.isin(ds.pids, getattr(ids, name))
        pids = ds.pids[keep]
        if name == 'train':
            pids = np.unique(pids, return_inverse=True)[1]
        out[name] = ArrayTable(ds.images[keep], pids, ds.camids[keep], size)
    return out


def parse_size(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """(H, W) of one size or a pair."""
    if isinstance(size, int):
        return size, size
    size = list(size)
    if len(size) == 1:
        return size[0], size[0]
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f'An image size is one size or a height and a width, got {size}.')
    return size[0], size[1]


def batches_of(n: int, batch: int) -> List[List[int]]:
    """Index lists 0..n-1 in order, ``batch`` at a time."""
    return [list(range(s, min(n, s + batch))) for s in range(0, n, batch)]
