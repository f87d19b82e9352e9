"""Real labelled images that install offline from package registries (see README, "Offline data")."""
import gzip
import importlib.util
import pickle
from pathlib import Path
from typing import Tuple

import numpy as np

__all__ = ['package_file', 'load_animal_mnist']


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
