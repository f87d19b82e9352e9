"""Person re-identification data: Market-1501 / DukeMTMC-reID folders, MSMT17 list files, a P x K sampler.

Market-1501 and DukeMTMC-reID ship three folders of crops named ``<pid>_c<cam>...jpg``::

    Market-1501-v15.09.15/
        bounding_box_train/0002_c1s1_000451_03.jpg   # 751 identities
        bounding_box_test/ 0000_c1s1_...jpg -1_c1s1_...jpg ...  # gallery, with distractors and junk
        query/0001_c1s1_001051_00.jpg

The standard protocol (as torchreid and the official evaluation code): identity ``-1`` is junk and
is dropped; identity ``0000`` is a distractor, kept in the gallery as a negative and dropped from
training and query; camera ids become 0-based. MSMT17 lists each split in a text file of
``<relative path> <pid>`` lines, the camera being the third ``_`` field of the file name.
"""
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

__all__ = [
    'ReIDSample', 'ReIDSplits', 'IMAGE_EXTENSIONS', 'parse_reid_name', 'read_reid_folder', 'read_market1501',
    'read_dukemtmc', 'read_msmt17', 'read_list_file', 'relabel', 'ReIDDataset', 'PKBatchSampler',
]

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')
MARKET_FOLDERS = ('bounding_box_train', 'bounding_box_test', 'query')
JUNK_PID = -1
DISTRACTOR_PID = 0

_NAME = re.compile(r'^(-?\d+)_c(\d+)')


class ReIDSample(NamedTuple):
    path: str
    pid: int
    camid: int


@dataclass
class ReIDSplits:
    """Train / query / gallery samples. ``train`` pids are relabelled 0..num_train_pids-1."""
    train: List[ReIDSample]
    query: List[ReIDSample]
    gallery: List[ReIDSample]

    @property
    def num_train_pids(self) -> int:
        return len({s.pid for s in self.train})

    @property
    def num_train_cams(self) -> int:
        return len({s.camid for s in self.train})

    def describe(self) -> str:
        rows = [(name, getattr(self, name)) for name in ('train', 'query', 'gallery')]
        return ', '.join(f'{n}: {len({s.pid for s in v})} ids / {len(v)} images' for n, v in rows)


def parse_reid_name(name: str) -> Tuple[int, int]:
    """(pid, 0-based camid) of a Market-1501 / DukeMTMC-reID file name such as ``0002_c1s1_000451_03.jpg``."""
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f'{name!r} is not a ReID image name: expected <pid>_c<camera>..., e.g. '
                         '0002_c1s1_000451_03.jpg (Market-1501) or 0001_c2_f0046182.jpg (DukeMTMC-reID).')
    cam = int(m.group(2))
    if cam < 1:
        raise ValueError(f'{name!r}: camera numbers start at 1 (c1), got c{cam}.')
    return int(m.group(1)), cam - 1


def _images(folder: Path) -> List[Path]:
    # Market-1501 ships a Thumbs.db among the crops: only image files count
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def read_reid_folder(folder: Union[str, Path], keep_distractors: bool = False) -> List[ReIDSample]:
    """Samples of one folder of ``<pid>_c<cam>...`` crops, junk (-1) dropped, distractors (0) kept if asked."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'{folder} is not a folder.')
    samples = []
    for path in _images(folder):
        pid, camid = parse_reid_name(path.name)
        if pid == JUNK_PID or (pid == DISTRACTOR_PID and not keep_distractors):
            continue
        if pid < 0:
            raise ValueError(f'{path}: negative identity {pid}; only -1 (junk) is allowed.')
        samples.append(ReIDSample(str(path), pid, camid))
    return samples


def relabel(samples: Sequence[ReIDSample]) -> List[ReIDSample]:
    """Identities mapped to 0..P-1 in sorted order (classifier targets)."""
    mapping = {pid: i for i, pid in enumerate(sorted({s.pid for s in samples}))}
    return [ReIDSample(s.path, mapping[s.pid], s.camid) for s in samples]


def _find_layout(root: Path, dataset: str) -> Path:
    """``root`` or its single sub-folder holding the three Market-style folders."""
    if not root.is_dir():
        raise FileNotFoundError(f'{dataset} root {root} does not exist.')
    if all((root / f).is_dir() for f in MARKET_FOLDERS):
        return root
    candidates = [d for d in sorted(root.iterdir()) if d.is_dir() and all((d / f).is_dir() for f in MARKET_FOLDERS)]
    if len(candidates) == 1:
        return candidates[0]
    missing = [f for f in MARKET_FOLDERS if not (root / f).is_dir()]
    hint = f' Several sub-folders qualify: {[c.name for c in candidates]}; pass one of them.' if candidates else ''
    raise FileNotFoundError(
        f'{root} is not a {dataset} folder: missing {", ".join(missing)}. Expected {root}/bounding_box_train, '
        f'{root}/bounding_box_test and {root}/query (the layout of the official zip, e.g. '
        f'Market-1501-v15.09.15/ or DukeMTMC-reID/).{hint}')


def _read_market_style(root: Union[str, Path], dataset: str) -> ReIDSplits:
    base = _find_layout(Path(root), dataset)
    splits = ReIDSplits(
        train=relabel(read_reid_folder(base / 'bounding_box_train')),
        query=read_reid_folder(base / 'query'),
        gallery=read_reid_folder(base / 'bounding_box_test', keep_distractors=True),
    )
    empty = [n for n in ('train', 'query', 'gallery') if not getattr(splits, n)]
    if empty:
        raise ValueError(f'{base}: no usable images in {", ".join(empty)} (only -1 / 0000 or no .jpg files).')
    _logger.info(f'{dataset} at {base}: {splits.describe()}')
    return splits


def read_market1501(root: Union[str, Path]) -> ReIDSplits:
    """Market-1501 from its folder (``Market-1501-v15.09.15`` or its parent)."""
    return _read_market_style(root, 'Market-1501')


def read_dukemtmc(root: Union[str, Path]) -> ReIDSplits:
    """DukeMTMC-reID from its folder (same layout and naming as Market-1501)."""
    return _read_market_style(root, 'DukeMTMC-reID')


def read_list_file(list_path: Union[str, Path], image_root: Union[str, Path]) -> List[ReIDSample]:
    """Samples of an MSMT17-style list: lines ``<path relative to image_root> <pid>``, camera = 3rd ``_`` field."""
    list_path, image_root = Path(list_path), Path(image_root)
    if not list_path.is_file():
        raise FileNotFoundError(f'List file {list_path} does not exist.')
    samples = []
    for n, line in enumerate(list_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        fields = Path(parts[0]).stem.split('_')
        if len(parts) != 2 or len(fields) < 3 or not parts[1].lstrip('-').isdigit() or not fields[2].isdigit():
            raise ValueError(f'{list_path}:{n}: {line!r} is not "<relative/path>_<..>_<camera>_... <pid>", '
                             'e.g. "0000/0000_000_01_0303morning_0015_0.jpg 0" (MSMT17 lists).')
        samples.append(ReIDSample(str(image_root / parts[0]), int(parts[1]), int(fields[2]) - 1))
    return samples


def read_msmt17(root: Union[str, Path], merge_val: bool = True) -> ReIDSplits:
    """MSMT17 (V1 ``train``/``test`` or V2 ``mask_train_v2``/``mask_test_v2``) from its list files.

    ``merge_val`` adds ``list_val.txt`` to training, as is common practice.
    """
    root = Path(root)
    for train_dir, test_dir in (('train', 'test'), ('mask_train_v2', 'mask_test_v2')):
        if (root / train_dir).is_dir() and (root / test_dir).is_dir():
            break
    else:
        raise FileNotFoundError(f'{root} is not an MSMT17 folder: expected train/ and test/ (V1) or '
                                'mask_train_v2/ and mask_test_v2/ (V2) next to list_train.txt, list_val.txt, '
                                'list_query.txt and list_gallery.txt.')
    train = read_list_file(root / 'list_train.txt', root / train_dir)
    if merge_val:
        train += read_list_file(root / 'list_val.txt', root / train_dir)
    return ReIDSplits(
        train=relabel(train),
        query=read_list_file(root / 'list_query.txt', root / test_dir),
        gallery=read_list_file(root / 'list_gallery.txt', root / test_dir),
    )


class ReIDDataset(Dataset):
    """Images of ``samples`` as ``(transform(image), pid, camid)``, read as RGB."""

    def __init__(self, samples: Sequence[ReIDSample], transform: Optional[Callable] = None):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, pid, camid = self.samples[index]
        with Image.open(path) as img:
            img = img.convert('RGB')
        return (self.transform(img) if self.transform is not None else img), pid, camid

    @property
    def pids(self) -> List[int]:
        return [s.pid for s in self.samples]


class PKBatchSampler(Sampler[List[int]]):
    """Identity-balanced batches: P identities x K images each (the batch-hard triplet loss needs them).

    Each epoch shuffles every identity's images into chunks of K (an identity with fewer than K
    images is sampled with replacement to fill one chunk); each batch takes one chunk from P distinct
    identities, chosen with probability proportional to their remaining chunks. ``len`` is
    ``total chunks // P``; when fewer than P identities still have chunks, the missing ones draw a
    fresh chunk. Pass it to ``DataLoader(dataset, batch_sampler=...)``. Batches are ordered
    identity-major: ``batch[i * K:(i + 1) * K]`` share an identity.

    Args:
        pids: identity of every sample (e.g. ``ReIDDataset.pids``).
        num_identities: P.
        num_instances: K.
        seed: base seed; epoch ``e`` (counted by iterations of the sampler) uses ``seed + e``.
    """

    def __init__(self, pids: Sequence[int], num_identities: int = 4, num_instances: int = 4, seed: int = 0):
        if num_identities < 2 or num_instances < 1:
            raise ValueError(f'Need P >= 2 identities (triplets need negatives) and K >= 1 images, '
                             f'got P={num_identities}, K={num_instances}.')
        self.index_by_pid: Dict[int, List[int]] = {}
        for i, pid in enumerate(pids):
            self.index_by_pid.setdefault(int(pid), []).append(i)
        if len(self.index_by_pid) < num_identities:
            raise ValueError(f'P={num_identities} identities per batch but the data holds only '
                             f'{len(self.index_by_pid)}: lower num_identities.')
        self.p, self.k = num_identities, num_instances
        self.seed = seed
        self.epoch = 0
        self._num_chunks = sum(max(1, len(v) // num_instances) for v in self.index_by_pid.values())

    def __len__(self) -> int:
        return self._num_chunks // self.p

    def _chunks(self, idx: List[int], gen: torch.Generator) -> List[List[int]]:
        t = torch.tensor(idx)
        if len(idx) < self.k:
            return [t[torch.randint(len(idx), (self.k,), generator=gen)].tolist()]
        t = t[torch.randperm(len(idx), generator=gen)]
        return [t[j * self.k:(j + 1) * self.k].tolist() for j in range(len(idx) // self.k)]

    def __iter__(self) -> Iterator[List[int]]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        pids = list(self.index_by_pid)
        chunks = [self._chunks(self.index_by_pid[p], gen) for p in pids]
        for _ in range(len(self)):
            left = torch.tensor([len(c) for c in chunks], dtype=torch.float64)
            if int((left > 0).sum()) < self.p:
                empty = torch.nonzero(left == 0).flatten()
                need = self.p - int((left > 0).sum())
                for j in empty[torch.randperm(len(empty), generator=gen)[:need]].tolist():
                    chunks[j] = self._chunks(self.index_by_pid[pids[j]], gen)
                left = torch.tensor([len(c) for c in chunks], dtype=torch.float64)
            chosen = torch.multinomial(left, self.p, replacement=False, generator=gen).tolist()
            yield [i for j in chosen for i in chunks[j].pop()]
