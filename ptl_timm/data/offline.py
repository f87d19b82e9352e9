"""Real labelled images that install offline from package registries (docs/offline.md), and their conversion to
model input."""
import dataclasses
import gzip
import hashlib
import importlib.util
import json
import os
import pickle
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    'default_cache_dir', 'package_file', 'to_model_input', 'load_animal_mnist', 'load_fashion_mnist', 'load_emoji',
    'FewShotSplit', 'few_shot_split', 'FASHION_MNIST_DIR', 'fashion_mnist_dir', 'EMOJI_NPM_PACKAGE', 'EMOJI_VENDORS',
    'EmojiReID', 'load_emoji_reid', 'IdentitySplit', 'identity_split',
]

# Debian's dataset-fashion-mnist installs the original idx files here.
FASHION_MNIST_DIR = Path('/usr/share/datasets/fashion-mnist')
EMOJI_NPM_PACKAGE = 'emoji-datasource-google@16.0.0'
EMOJI_VERSION = '16.0.0'
EMOJI_VENDORS = ('apple', 'google', 'twitter', 'facebook')
# Fitzpatrick skin-tone modifiers: an emoji and its tones are one identity (one person, other clothes)
_SKIN_TONES = frozenset(('1f3fb', '1f3fc', '1f3fd', '1f3fe', '1f3ff'))


def default_cache_dir() -> Path:
    """Where converted weights and decoded images are cached: $PTL_TIMM_CACHE, else ~/.cache/ptl_timm."""
    return Path(os.environ.get('PTL_TIMM_CACHE', Path.home() / '.cache' / 'ptl_timm'))


def to_model_input(
        images: np.ndarray,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        antialias: bool = False,
) -> torch.Tensor:
    """uint8 images (N, H, W) grey or (N, H, W, 3) RGB -> float (N, 3, size, size), resized bilinearly
    (``antialias`` as F.interpolate's) and normalised with ``mean`` / ``std``; grey repeated on 3 channels."""
    x = torch.from_numpy(images).float().div_(255)
    x = x.unsqueeze(1).expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False, antialias=antialias)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def package_file(package: str, relative: str, install: str) -> Path:
    """Path of a data file shipped inside ``package``, without importing the package.

    Raises FileNotFoundError naming the pip command that installs it.
    """
    spec = importlib.util.find_spec(package)
    path = Path(spec.origin).parent / relative if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f'{relative} of the {package!r} package is missing; install it with: {install}')
    return path


def load_animal_mnist() -> Tuple[np.ndarray, np.ndarray]:
    """Animal-MNIST (MIT): 10,000 grey 28x28 silhouettes of animals, 10 classes x 1,000.

    Returns ``images`` uint8 (N, 28, 28) and ``labels`` int64 (N,).
    """
    install = 'pip install --no-deps animal-mnist==0.4'
    arrays = []
    for name in ('animal_data_version_3.gz', 'animal_label_version_3.gz'):
        path = package_file('animal_mnist', f'data/Animal_MNIST/{name}', install)
        with gzip.open(path, 'rb') as f:
            arrays.append(np.asarray(pickle.load(f)))  # the package ships numpy pickles
    images, labels = arrays
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise ValueError(f'Unexpected Animal-MNIST arrays {images.shape} / {labels.shape}; reinstall: {install}')
    return images.astype(np.uint8), labels.astype(np.int64)


def _read_idx(path: Path) -> np.ndarray:
    """An idx file (gzipped) as a numpy array: big-endian header of dims, then uint8 data."""
    with gzip.open(path, 'rb') as f:
        raw = f.read()
    if raw[:2] != b'\x00\x00' or raw[2] != 0x08:
        raise ValueError(f'{path} is not a uint8 idx file (magic {raw[:4].hex()}); reinstall dataset-fashion-mnist.')
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist_dir() -> Path:
    """Where Fashion-MNIST's idx files are: Debian's package folder, else the ptl_timm cache's ``fashion-mnist``
    (where tests/run.sh unpacks the package without root); the Debian folder when neither holds them."""
    for folder in (FASHION_MNIST_DIR, default_cache_dir() / 'fashion-mnist'):
        if (folder / 't10k-labels-idx1-ubyte.gz').is_file():
            return folder
    return FASHION_MNIST_DIR


def load_fashion_mnist(split: str = 'train', root: Optional[Path] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST (MIT): grey 28x28 photos of clothes, 10 classes; 60,000 ``'train'``, 10,000 ``'test'``.

    Reads the idx files of Debian's ``dataset-fashion-mnist`` from ``root`` (default :func:`fashion_mnist_dir`).
    Returns ``images`` uint8 (N, 28, 28) and ``labels`` int64 (N,).
    """
    if split not in ('train', 'test'):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    root = Path(root) if root is not None else fashion_mnist_dir()
    prefix = 'train' if split == 'train' else 't10k'
    paths = [root / f'{prefix}-images-idx3-ubyte.gz', root / f'{prefix}-labels-idx1-ubyte.gz']
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f'Fashion-MNIST files missing ({", ".join(missing)}); install them with: apt-get install '
            f'dataset-fashion-mnist (root), or without root: apt-get download dataset-fashion-mnist && dpkg-deb -x '
            f'dataset-fashion-mnist_*.deb DIR, then copy DIR/usr/share/datasets/fashion-mnist/* to '
            f'{default_cache_dir() / "fashion-mnist"} (tests/run.sh does this), or pass root= a folder of the idx '
            'files.')
    images, labels = (_read_idx(p) for p in paths)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise ValueError(f'Unexpected Fashion-MNIST arrays {images.shape} / {labels.shape} in {root}.')
    return images.copy(), labels.astype(np.int64)


def _emoji_root(root: Optional[Path]) -> Path:
    if root is not None:
        return Path(root)
    env = os.environ.get('PTL_TIMM_EMOJI_DIR')
    if env:
        return Path(env)
    return Path.home() / '.cache' / 'ptl_timm' / 'npm' / 'node_modules' / 'emoji-datasource-google'


def load_emoji(
        label: str = 'category',
        size: int = 64,
        root: Optional[Path] = None,
        min_count: int = 1,
) -> Tuple[np.ndarray, np.ndarray, Tuple[str, ...]]:
    """Google's emoji images (Apache-2.0) from the npm package emoji-datasource-google@16.0.0.

    ``label`` is ``'category'`` (10 with Google images, 'Component' has 5 of them) or ``'subcategory'``;
    classes are unbalanced and those with fewer than ``min_count`` images are left out. Images are composited
    on white. ``root`` (or $PTL_TIMM_EMOJI_DIR) is the package folder; the default is where
    ``npm install --prefix ~/.cache/ptl_timm/npm emoji-datasource-google@16.0.0`` puts it.

    Returns ``images`` uint8 (N, size, size, 3), ``labels`` int64 (N,) and the class names.
    """
    from PIL import Image  # a dependency of the package; imported here to keep this module light

    if label not in ('category', 'subcategory'):
        raise ValueError(f"label must be 'category' or 'subcategory', got {label!r}.")
    root = _emoji_root(root)
    index, img_dir = root / 'emoji.json', root / 'img' / 'google' / '64'
    if not index.is_file() or not img_dir.is_dir():
        raise FileNotFoundError(
            f'The emoji images are missing under {root}; install them with: '
            f'npm install --prefix ~/.cache/ptl_timm/npm {EMOJI_NPM_PACKAGE} (or set PTL_TIMM_EMOJI_DIR).')
    entries = [e for e in json.loads(index.read_text()) if e.get('has_img_google') and (img_dir / e['image']).is_file()]
    counts: Dict[str, int] = {}
    for e in entries:
        counts[e[label]] = counts.get(e[label], 0) + 1
    entries = [e for e in entries if counts[e[label]] >= min_count]
    names = tuple(sorted({e[label] for e in entries}))
    class_idx = {n: i for i, n in enumerate(names)}
    images = np.empty((len(entries), size, size, 3), dtype=np.uint8)
    for i, e in enumerate(entries):
        with Image.open(img_dir / e['image']) as im:
            rgba = im.convert('RGBA')
            if rgba.size != (size, size):
                rgba = rgba.resize((size, size), Image.BILINEAR)
            white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
            images[i] = np.asarray(Image.alpha_composite(white, rgba).convert('RGB'))
    labels = np.array([class_idx[e[label]] for e in entries], dtype=np.int64)
    return images, labels, names


@dataclasses.dataclass(frozen=True)
class FewShotSplit:
    """Indices into one labelled pool: ``train`` (changes with the seed), ``val`` and ``test`` (fixed)."""
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def few_shot_split(
        labels: np.ndarray,
        train_per_class: int,
        seed: int,
        val_per_class: int = 50,
        test_per_class: int = 200,
        test_pool: Optional[np.ndarray] = None,
        split_seed: int = 0,
) -> FewShotSplit:
    """A balanced few-shot split with a held-out test set and a separate validation set.

    ``test`` and ``val`` depend on ``split_seed`` only, so every training seed is scored on the same
    images; ``train`` draws ``train_per_class`` images per class from what is left, with ``seed``.
    ``test_pool`` (bool, like ``labels``) restricts the test set to those images (e.g. an official test
    split) and keeps train / val out of them. Classes with fewer images than asked get all that remain
    in train, after val and test are served (then train is not balanced: check ``np.bincount``).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f'labels must be 1-D class indices, got shape {labels.shape}.')
    if min(train_per_class, val_per_class, test_per_class) < 0 or train_per_class < 1:
        raise ValueError(f'train_per_class must be >= 1 and val/test counts >= 0, got '
                         f'{train_per_class} / {val_per_class} / {test_per_class}.')
    test_pool = np.zeros_like(labels, dtype=bool) if test_pool is None else np.asarray(test_pool, dtype=bool)
    if test_pool.shape != labels.shape:
        raise ValueError(f'test_pool must have the shape of labels {labels.shape}, got {test_pool.shape}.')
    fixed_rng = np.random.default_rng(split_seed)
    train_rng = np.random.default_rng([split_seed, seed])
    train, val, test = [], [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        in_test_pool = test_pool[idx]
        if in_test_pool.any():
            test_idx = fixed_rng.permutation(idx[in_test_pool])[:test_per_class]
            rest = fixed_rng.permutation(idx[~in_test_pool])
        else:
            perm = fixed_rng.permutation(idx)
            test_idx, rest = perm[:test_per_class], perm[test_per_class:]
        val_idx, rest = rest[:val_per_class], rest[val_per_class:]
        if len(test_idx) < test_per_class or len(val_idx) < val_per_class or not len(rest):
            raise ValueError(f'Class {c} has {len(idx)} images: too few for {test_per_class} test, {val_per_class} '
                             'val and at least 1 train image. Lower the counts or drop the class.')
        test.append(test_idx)
        val.append(val_idx)
        train.append(train_rng.choice(rest, size=min(train_per_class, len(rest)), replace=False))
    return FewShotSplit(*(np.sort(np.concatenate(part)) for part in (train, val, test)))


@dataclasses.dataclass(frozen=True)
class EmojiReID:
    """Emoji drawn by several vendors as a re-identification set: identity = emoji, camera = vendor.

    Attributes:
        images: uint8 (N, size, size, 3), composited on ``background``.
        pids: int64 (N,) identity index into ``identities``.
        camids: int64 (N,) vendor index into ``vendors``.
        names: (N,) file stem of every image (the code points, tones included).
        identities: identity keys: code points without skin-tone modifiers.
        vendors: the vendors, in ``camids`` order.
    """
    images: np.ndarray
    pids: np.ndarray
    camids: np.ndarray
    names: Tuple[str, ...]
    identities: Tuple[str, ...]
    vendors: Tuple[str, ...]

    def __len__(self) -> int:
        return len(self.pids)


def emoji_install_command(vendors: Sequence[str] = EMOJI_VENDORS) -> str:
    return ('npm install --prefix ~/.cache/ptl_timm/npm ' +
            ' '.join(f'emoji-datasource-{v}@{EMOJI_VERSION}' for v in vendors))


def _npm_modules(root: Optional[Path]) -> Path:
    if root is not None:
        return Path(root)
    env = os.environ.get('PTL_TIMM_NPM_MODULES')
    return Path(env) if env else Path.home() / '.cache' / 'ptl_timm' / 'npm' / 'node_modules'


def _identity_key(stem: str) -> str:
    return '-'.join(p for p in stem.split('-') if p not in _SKIN_TONES)


def load_emoji_reid(
        size: int = 64,
        root: Optional[Path] = None,
        vendors: Sequence[str] = EMOJI_VENDORS,
        background: Tuple[int, int, int] = (255, 255, 255),
        cache_dir: Optional[Path] = None,
) -> EmojiReID:
    """Emoji of four vendors (npm ``emoji-datasource-<vendor>@16.0.0``) as a many-identity ReID set.

    Every emoji drawn by all ``vendors`` is kept; its identity is its code point sequence without the
    skin-tone modifiers 1f3fb..1f3ff. With the four vendors: 14,568 images of 1,876 identities (1,564
    with one image per vendor, the rest with 5 to 26 tone variants per vendor).

    ``root`` (or $PTL_TIMM_NPM_MODULES) is the ``node_modules`` folder holding the packages; the default is
    where ``npm install --prefix ~/.cache/ptl_timm/npm ...`` puts them. The decoded arrays are cached once
    in ``cache_dir`` (default $PTL_TIMM_CACHE or ~/.cache/ptl_timm) as a compressed ``.npz`` keyed by the
    file list, size and background, so later loads take about a second.
    """
    from PIL import Image  # a dependency of the package; imported here to keep this module light

    vendors = tuple(vendors)
    if len(vendors) < 2 or len(set(vendors)) != len(vendors):
        raise ValueError(f'Need at least two distinct vendors (cameras), got {vendors}.')
    root = _npm_modules(root)
    dirs = {v: root / f'emoji-datasource-{v}' / 'img' / v / '64' for v in vendors}
    missing = [v for v, d in dirs.items() if not d.is_dir()]
    if missing:
        raise FileNotFoundError(
            f'The emoji images of {", ".join(missing)} are missing under {root}; install them with: '
            f'{emoji_install_command(vendors)} (or point PTL_TIMM_NPM_MODULES at a node_modules folder holding them).')
    files = {v: {p.stem for p in d.glob('*.png')} for v, d in dirs.items()}
    stems = sorted(set.intersection(*files.values()))
    if not stems:
        raise ValueError(f'No emoji is drawn by all of {vendors} under {root}.')
    key = hashlib.sha1(json.dumps([vendors, stems, size, list(background)]).encode()).hexdigest()[:12]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache = cache_dir / f'emoji_reid_{size}px_{key}.npz'
    identities = tuple(sorted({_identity_key(s) for s in stems}))
    pid_of = {k: i for i, k in enumerate(identities)}
    names = tuple(s for _ in vendors for s in stems)
    pids = np.array([pid_of[_identity_key(s)] for s in names], dtype=np.int64)
    camids = np.repeat(np.arange(len(vendors), dtype=np.int64), len(stems))
    if cache.is_file():
        with np.load(cache) as z:
            images = z['images']
    else:
        images = np.empty((len(names), size, size, 3), dtype=np.uint8)
        fill = Image.new('RGBA', (size, size), (*background, 255))
        for i, (cam, stem) in enumerate(zip(camids, names)):
            with Image.open(dirs[vendors[cam]] / f'{stem}.png') as im:
                rgba = im.convert('RGBA')
            if rgba.size != (size, size):
                rgba = rgba.resize((size, size), Image.BILINEAR)
            images[i] = np.asarray(Image.alpha_composite(fill, rgba).convert('RGB'))
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f'{cache.stem}.{os.getpid()}.tmp.npz')  # atomic: parallel loaders may race
        np.savez_compressed(tmp, images=images)
        os.replace(tmp, cache)
    return EmojiReID(images, pids, camids, names, identities, vendors)


@dataclasses.dataclass(frozen=True)
class IdentitySplit:
    """Disjoint identity sets (sorted arrays of pids): ``train``, ``val`` (taken from the training half) and
    ``test`` (never used for any decision)."""
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def identity_split(num_identities: int, test_fraction: float = 0.5, val_fraction: float = 0.2,
                   seed: int = 0) -> IdentitySplit:
    """Split identities ``0..num_identities-1``: ``test_fraction`` of them for test, then ``val_fraction``
    of the rest for validation; the remainder trains. Depends on ``seed`` only (fix it across runs)."""
    if not (0 < test_fraction < 1 and 0 <= val_fraction < 1):
        raise ValueError(f'Need 0 < test_fraction < 1 and 0 <= val_fraction < 1, got {test_fraction}, {val_fraction}.')
    perm = np.random.default_rng(seed).permutation(num_identities)
    n_test = int(round(num_identities * test_fraction))
    n_val = int(round((num_identities - n_test) * val_fraction))
    if min(n_test, num_identities - n_test - n_val) < 2:
        raise ValueError(f'{num_identities} identities are too few for this split.')
    test, val, train = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
    return IdentitySplit(np.sort(train), np.sort(val), np.sort(test))
