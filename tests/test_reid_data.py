"""ReID data on a small folder in the real Market-1501 layout (real Animal-MNIST images), losses, extraction."""
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ptl_timm.cli import main as cli_main
from ptl_timm.data.offline import load_animal_mnist
from ptl_timm.reid import (
    FeatureExtractor,
    PKBatchSampler,
    ReIDDataset,
    ReIDLoss,
    ReIDOutput,
    batch_hard_triplet_loss,
    evaluate,
    read_market1501,
    read_msmt17,
)

# (folder, pid, camera, count): identity = Animal-MNIST class, so images of one identity look alike
_LAYOUT = [
    ('bounding_box_train', 2, 1, 3), ('bounding_box_train', 2, 3, 2), ('bounding_box_train', 7, 2, 3),
    ('bounding_box_train', 9, 1, 2), ('bounding_box_train', 11, 4, 4),
    ('query', 1, 1, 1), ('query', 3, 2, 1), ('query', 5, 1, 1),
    ('bounding_box_test', 1, 1, 1), ('bounding_box_test', 1, 2, 2), ('bounding_box_test', 3, 3, 2),
    ('bounding_box_test', 5, 2, 2), ('bounding_box_test', 0, 1, 2), ('bounding_box_test', -1, 1, 2),
]



@pytest.fixture(scope='module')
def market(tmp_path_factory) -> Path:
    images, labels = load_animal_mnist()
    root = tmp_path_factory.mktemp('data') / 'Market-1501-v15.09.15'
    used = Counter()
    for folder, pid, cam, count in _LAYOUT:
        (root / folder).mkdir(parents=True, exist_ok=True)
        cls = pid % 10 if pid > 0 else 0
        pool = np.flatnonzero(labels == cls)
        for j in range(count):
            img = images[pool[used[cls]]]
            used[cls] += 1
            name = f'{pid:04d}' if pid >= 0 else '-1'
            Image.fromarray(img).convert('RGB').resize((32, 64)).save(
                root / folder / f'{name}_c{cam}s1_{1000 + j:06d}_0{j}.jpg', quality=95)
    (root / 'bounding_box_test' / 'Thumbs.db').write_bytes(b'not an image')  # ships with Market-1501
    return root


def test_market_reader_applies_the_protocol(market):
    for root in (market, market.parent):  # the dataset folder or the folder holding it
        splits = read_market1501(root)
        assert [len(splits.train), len(splits.query), len(splits.gallery)] == [14, 3, 9]
    assert sorted({s.pid for s in splits.train}) == [0, 1, 2, 3] and splits.num_train_pids == 4
    assert splits.num_train_cams == 4 and min(s.camid for s in splits.train) == 0  # c1 -> 0
    g = Counter(s.pid for s in splits.gallery)
    assert g[0] == 2 and -1 not in g  # distractors kept as negatives, junk dropped
    q = splits.query[0]
    assert Path(q.path).name.startswith('0001_c1') and (q.pid, q.camid) == (1, 0)
    ds = ReIDDataset(splits.gallery)
    img, pid, camid = ds[0]
    assert img.size == (32, 64) and img.mode == 'RGB' and (pid, camid) == splits.gallery[0][1:]


def test_wrong_layouts_raise_clear_errors(market, tmp_path):
    (tmp_path / 'bounding_box_train').mkdir()
    with pytest.raises(FileNotFoundError, match='missing bounding_box_test, query'):
        read_market1501(tmp_path)
    bad = tmp_path / 'bad'
    for folder in ('bounding_box_train', 'bounding_box_test', 'query'):
        (bad / folder).mkdir(parents=True)
    Image.new('RGB', (8, 8)).save(bad / 'query' / 'person.jpg')
    with pytest.raises(ValueError, match="'person.jpg' is not a ReID image name"):
        read_market1501(bad)


def test_msmt17_list_files(market, tmp_path):
    src = next((market / 'query').iterdir())
    for split, folder in (('train', 'train'), ('val', 'train'), ('query', 'test'), ('gallery', 'test')):
        (tmp_path / folder / '0003').mkdir(parents=True, exist_ok=True)
        name = f'0003/0003_012_05_0303morning_00{len(split)}_0.jpg'
        (tmp_path / folder / name).write_bytes(src.read_bytes())
        (tmp_path / f'list_{split}.txt').write_text(f'{name} 3\n')
    splits = read_msmt17(tmp_path)
    assert len(splits.train) == 2 and splits.train[0].pid == 0  # train + val, relabelled
    assert (splits.query[0].pid, splits.query[0].camid) == (3, 4) and Path(splits.gallery[0].path).is_file()
    (tmp_path / 'list_query.txt').write_text('0003/broken.jpg\n')
    with pytest.raises(ValueError, match='list_query.txt:1'):
        read_msmt17(tmp_path)


def test_pk_sampler_batches():
    pids = [0] * 9 + [1] * 4 + [2] * 2 + [3] * 5 + [4] * 8
    sampler = PKBatchSampler(pids, num_identities=3, num_instances=4, seed=1)
    epoch1, epoch2 = list(sampler), list(sampler)
    assert len(epoch1) == len(sampler) == (2 + 1 + 1 + 1 + 2) // 3
    for batch in epoch1 + epoch2:
        ids = [pids[i] for i in batch]
        assert len(batch) == 12 and all(len(set(ids[j:j + 4])) == 1 for j in range(0, 12, 4))
        assert len(set(ids)) == 3
    assert epoch1 != epoch2  # a new shuffle each epoch
    assert list(PKBatchSampler(pids, 3, 4, seed=1)) == epoch1  # reproducible
    with pytest.raises(ValueError, match='only 5'):
        PKBatchSampler(pids, num_identities=6)


def test_batch_hard_triplet_by_hand():
    f = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 5.0]], requires_grad=True)
    y = torch.tensor([0, 0, 1, 1])
    # anchor 0: hardest positive 3 (pt 1), hardest negative 1 (pt 2); anchor 1: 3 vs sqrt(10); anchor 2: 4 vs 1;
    # anchor 3: 4 vs 5 (pt 0; pt 1 is at sqrt(34))
    d_ap = torch.tensor([3.0, 3.0, 4.0, 4.0])
    d_an = torch.tensor([1.0, 10 ** 0.5, 1.0, 5.0])
    loss = batch_hard_triplet_loss(f, y, margin=0.5)
    torch.testing.assert_close(loss, F.relu(d_ap - d_an + 0.5).mean())
    torch.testing.assert_close(batch_hard_triplet_loss(f, y, margin=None), F.softplus(d_ap - d_an).mean())
    loss.backward()
    assert torch.isfinite(f.grad).all()
    with pytest.raises(ValueError, match='single identity'):
        batch_hard_triplet_loss(f, torch.zeros(4, dtype=torch.long))


def test_reid_loss_combines_ce_and_triplet():
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(4, 3, generator=gen) for _ in range(2)]
    feats = [torch.randn(4, 5, generator=gen)]
    y = torch.tensor([0, 0, 2, 2])
    out = ReIDOutput(logits, feats, feats[0])
    expected = sum(F.cross_entropy(lg, y, label_smoothing=0.1) for lg in logits) / 2 + \
        batch_hard_triplet_loss(feats[0], y, 0.3)
    torch.testing.assert_close(ReIDLoss(margin=0.3, label_smoothing=0.1)(out, y), expected)
    with pytest.raises(TypeError, match=r'reid_output=True .* model\.train\(\)'):
        ReIDLoss()(feats[0], y)


@pytest.fixture(scope='module')
def extractor():
    torch.manual_seed(0)
    return FeatureExtractor('reid_ptl_resnet18', image_size=(64, 32), img_size=(64, 32), batch_size=3)


def test_feature_extractor_inputs_agree(market, extractor):
    paths = sorted((market / 'query').glob('*.jpg'))
    images = [Image.open(p).convert('RGB') for p in paths]
    arrays = np.stack([np.asarray(im) for im in images])
    from_paths = extractor(paths)
    assert from_paths.shape == (3, extractor.model.num_features) and from_paths.device.type == 'cpu'
    torch.testing.assert_close(extractor(images), from_paths)
    torch.testing.assert_close(extractor(arrays), from_paths)
    torch.testing.assert_close(extractor(str(paths[1])), from_paths[1:2])
    batch = torch.stack([extractor.transform(im) for im in images])
    torch.testing.assert_close(extractor(batch), from_paths)  # tensors: already preprocessed
    flipped = FeatureExtractor(extractor.model, flip=True, normalize=True)(batch)
    torch.testing.assert_close(flipped.norm(dim=1), torch.ones(3))
    assert not torch.allclose(flipped, F.normalize(from_paths, dim=1))
    with pytest.raises(ValueError, match='uint8'):
        extractor(np.zeros((8, 8, 3), dtype=np.float32))


def test_extract_cli_and_evaluation_end_to_end(market, extractor, tmp_path):
    torch.manual_seed(0)
    out = tmp_path / 'gallery.npy'
    assert cli_main(['extract', str(market / 'bounding_box_test'), str(out), '--model', 'reid_ptl_resnet18',
                     '--img-size', '64', '32']) == 0
    feats, names = np.load(out), out.with_suffix('.txt').read_text().split()
    assert feats.shape[0] == len(names) == 11 and names[0].startswith('-1_c1')  # every image, junk included
    splits = read_market1501(market)
    q = extractor([s.path for s in splits.query])
    g = extractor([s.path for s in splits.gallery])
    res = evaluate(q, g, [s.pid for s in splits.query], [s.pid for s in splits.gallery],
                   [s.camid for s in splits.query], [s.camid for s in splits.gallery])
    # query 0001_c1 has two gallery matches left in camera 2 (its camera-1 twin is excluded)
    assert res.num_valid == 3 and 0 < res.mAP <= 1 and len(res.cmc) == 9
