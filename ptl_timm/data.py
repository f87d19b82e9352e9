"""Real labelled images that install offline from package registries (see README, "Offline data")."""
import dataclasses
import gzip
import importlib.util
import json
import os
import pickle
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

__all__ = [
    'package_file', 'load_animal_mnist', 'load_fashion_mnist', 'load_emoji', 'FewShotSplit', 'few_shot_split',
    'FASHION_MNIST_DIR', 'EMOJI_NPM_PACKAGE',
]

# Debian's dataset-fashion-mnist installs the original idx files here.
FASHION_MNIST_DIR = Path('/usr/share/datasets/fashion-mnist')
EMOJI_NPM_PACKAGE = 'emoji-datasource-google@16.0.0'


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


def load_fashion_mnist(split: str = 'train', root: Optional[Path] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST (MIT): grey 28x28 photos of clothes, 10 classes; 60,000 ``'train'``, 10,000 ``'test'``.

    Reads the idx files of Debian's ``dataset-fashion-mnist`` (``root`` defaults to
    /usr/share/datasets/fashion-mnist). Returns ``images`` uint8 (N, 28, 28) and ``labels`` int64 (N,).
    """
    if split not in ('train', 'test'):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    prefix = 'train' if split == 'train' else 't10k'
    paths = [root / f'{prefix}-images-idx3-ubyte.gz', root / f'{prefix}-labels-idx1-ubyte.gz']
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f'Fashion-MNIST files missing ({", ".join(missing)}); install them with: '
            'apt-get install dataset-fashion-mnist (Debian / Ubuntu), or pass root= a folder holding the idx files.')
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
    from PIL import Image  # a dependency of the package; imported here to keep `import ptl_timm.data` light

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
