"""The emoji ReID set (a small folder in the npm packages' layout) and its benchmark's smoke run."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import repo_on_pythonpath
from PIL import Image

from ptl_timm.data import offline as data

VENDORS = data.EMOJI_VENDORS
TONES = ('1f3fb', '1f3fc', '1f3fd', '1f3fe', '1f3ff')


def _write_png(path: Path, rng: np.random.Generator) -> None:
    """A 64x64 RGBA picture: a random opaque disc on a transparent background."""
    yy, xx = np.mgrid[:64, :64]
    cy, cx, r = rng.integers(20, 44), rng.integers(20, 44), rng.integers(8, 20)
    rgba = np.zeros((64, 64, 4), np.uint8)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
    rgba[disc, :3] = rng.integers(0, 256, 3)
    rgba[disc, 3] = 255
    Image.fromarray(rgba, 'RGBA').save(path)


def make_emoji_modules(root: Path, num_plain: int, num_toned: int = 2, seed: int = 0) -> Path:
    """node_modules/emoji-datasource-<vendor>/img/<vendor>/64/*.png for every vendor: ``num_plain`` emoji with one
    image each, ``num_toned`` with a base image and five skin tones, and one file only Apple draws."""
    rng = np.random.default_rng(seed)
    stems = [f'1f6{i:02x}' for i in range(num_plain)]
    for j in range(num_toned):
        base = f'1f9{j:02x}'
        stems += [base] + [f'{base}-{t}' for t in TONES]
    for vendor in VENDORS:
        folder = root / f'emoji-datasource-{vendor}' / 'img' / vendor / '64'
        folder.mkdir(parents=True)
        for stem in stems + (['1f4a9-apple-only'] if vendor == 'apple' else []):
            _write_png(folder / f'{stem}.png', rng)
    return root


@pytest.fixture(scope='module')
def emoji_root(tmp_path_factory) -> Path:
    return make_emoji_modules(tmp_path_factory.mktemp('npm') / 'node_modules', num_plain=78)


def test_identities_merge_skin_tones_and_vendors_are_cameras(emoji_root, tmp_path):
    ds = data.load_emoji_reid(root=emoji_root, cache_dir=tmp_path)
    assert len(ds.identities) == 80 and len(ds) == (78 + 2 * 6) * 4  # the Apple-only file is dropped
    assert ds.vendors == VENDORS and np.bincount(ds.camids).tolist() == [90] * 4
    toned = ds.identities.index('1f900')
    assert (ds.pids == toned).sum() == 6 * 4  # base + five tones, drawn by four vendors
    assert {n for n, p in zip(ds.names, ds.pids) if p == toned} == {'1f900', *(f'1f900-{t}' for t in TONES)}
    assert ds.images.shape == (len(ds), 64, 64, 3) and ds.images.dtype == np.uint8
    assert (ds.images[:, 0, 0] == 255).all()  # transparent corners composited on white


def test_cache_is_written_once_and_read_back(emoji_root, tmp_path):
    first = data.load_emoji_reid(root=emoji_root, cache_dir=tmp_path, size=32)
    cached = list(tmp_path.glob('emoji_reid_32px_*.npz'))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    second = data.load_emoji_reid(root=emoji_root, cache_dir=tmp_path, size=32)
    assert cached[0].stat().st_mtime_ns == stamp
    assert np.array_equal(first.images, second.images) and first.images.shape[1:] == (32, 32, 3)
    assert np.array_equal(first.pids, second.pids)
    grey = data.load_emoji_reid(root=emoji_root, cache_dir=tmp_path, size=32, background=(128, 128, 128))
    assert (grey.images[:, 0, 0] == 128).all()  # another background is another cache entry


def test_missing_packages_name_the_npm_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'npm install --prefix ~/.cache/ptl_timm/npm emoji-datasource-apple@'):
        data.load_emoji_reid(root=tmp_path)
    with pytest.raises(ValueError, match='two distinct vendors'):
        data.load_emoji_reid(root=tmp_path, vendors=('apple',))


def test_identity_split_is_disjoint_fixed_and_sized():
    a, b = data.identity_split(1876), data.identity_split(1876)
    assert (len(a.train), len(a.val), len(a.test)) == (750, 188, 938)
    assert not set(a.train) & set(a.val) and not set(a.train) & set(a.test) and not set(a.val) & set(a.test)
    assert sorted(np.r_[a.train, a.val, a.test].tolist()) == list(range(1876))
    assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ('train', 'val', 'test'))
    assert not np.array_equal(a.test, data.identity_split(1876, seed=1).test)
    with pytest.raises(ValueError, match='too few'):
        data.identity_split(3)


@pytest.mark.slow
def test_benchmark_quick_run_and_report(emoji_root, tmp_path):
    """The benchmark end to end on the small folder: real MobileNetV2 weights, the control, a PTL state rule,
    the XBM peer and the identity memory; every run scored on val and test, PTL runs probed; tables and plot."""
    out = tmp_path / 'runs.jsonl'
    script = Path(__file__).resolve().parent.parent / 'benchmarks' / 'emoji_reid.py'
    cmd = [sys.executable, str(script), '--quick', '--root', str(emoji_root), '--img-size', '32', '--p', '4',
           '--variants', 'control,shared,xbm,shared_idmem', '--out', str(out)]
    env = repo_on_pythonpath({'PATH': '/usr/bin:/bin', 'HOME': str(Path.home()), 'PTL_TIMM_CACHE': str(tmp_path)})
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r['variant'] for r in runs] == ['control', 'shared', 'xbm', 'shared_idmem']
    for r in runs:
        assert r['steps'] > 0 and np.isfinite(r['final_loss'])
        assert 0 < r['test']['mAP'] <= 100 and len(r['val']['per_vendor']) == 4
    assert 'test_state_zeroed' in runs[1] and 'test_cells_off' in runs[1] and 'test_cells_off' not in runs[0]
    assert (tmp_path / 'runs.md').read_text().count('| shared - control |') == 2  # test and val tables
    assert (tmp_path / 'runs.png').stat().st_size > 0
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and len(out.read_text().splitlines()) == 4  # finished runs are skipped

    # the same runs recorded elsewhere (here: shared's val mAP one point lower) are paired run by run
    other = tmp_path / 'other.jsonl'
    moved = [dict(r, val=dict(r['val'], mAP=r['val']['mAP'] - 1.0)) if r['variant'] == 'shared' else r
             for r in runs]
    other.write_text(''.join(json.dumps(r) + '\n' for r in moved))
    paired = subprocess.run([sys.executable, str(script), '--report', '--out', str(out), '--reference', str(other)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert paired.returncode == 0, paired.stderr[-3000:]
    section = (tmp_path / 'runs.md').read_text().split('### The same runs in `other.jsonl`')[1]
    rows = {tuple(c.strip() for c in line.split('|')[2:4]): line
            for line in section.splitlines() if line.startswith('| short |')}
    assert '| +1.00 |' in rows[('shared', 'val')] and '| +0.00 |' in rows[('shared', 'test')]
    assert '| +0.00 |' in rows[('control', 'val')]


@pytest.mark.slow
def test_benchmark_refuses_a_seed_count_of_zero(tmp_path):
    """``--seeds 0`` reads as a count and would run nothing: the error names the list form for seed 0 alone."""
    script = Path(__file__).resolve().parent.parent / 'benchmarks' / 'emoji_reid.py'
    cmd = [sys.executable, str(script), '--seeds', '0', '--out', str(tmp_path / 'runs.jsonl')]
    env = repo_on_pythonpath({'PATH': '/usr/bin:/bin'})
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and '--seeds 0,' in done.stderr
    assert not (tmp_path / 'runs.jsonl').exists()
    missing = subprocess.run([sys.executable, str(script), '--report', '--reference', str(tmp_path / 'nope.jsonl')],
                             capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 2 and 'no such results file' in missing.stderr
