"""Helpers shared by test modules: real Animal-MNIST batches, a train.py-format checkpoint, a Hub cache, subprocess
env."""
import argparse
import functools
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from timm.utils import CheckpointSaver, ModelEmaV3

from ptl_timm.data.offline import load_animal_mnist, to_model_input


def repo_on_pythonpath(env: Dict[str, str]) -> Dict[str, str]:
    """``env`` with this checkout first on PYTHONPATH, so a subprocess imports the ptl_timm under test."""
    root = str(Path(__file__).resolve().parent.parent)
    return dict(env, PYTHONPATH=os.pathsep.join(filter(None, [root, env.get('PYTHONPATH')])))


def torchrun(args: Sequence[str], timeout: float, nproc: int = 2) -> str:
    """Run ``torchrun --standalone --nproc_per_node=nproc ARGS`` (gloo, one thread per rank, this checkout first on
    PYTHONPATH) in its own session; on a timeout the whole group is killed, never left hanging. Returns the log;
    the test fails with its tail if torchrun fails or times out."""
    env = repo_on_pythonpath(dict(os.environ, OMP_NUM_THREADS='1'))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f'torchrun did not finish in {timeout} s (a collective deadlock?):\n{log[-3000:]}')
    assert proc.returncode == 0, f'torchrun failed ({proc.returncode}):\n{log[-3000:]}'
    return log


@functools.lru_cache(maxsize=1)
def _animal_mnist():
    return load_animal_mnist()


def animal_batch(start: int, n: int, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """n real Animal-MNIST images (B, 3, size, size), ImageNet-normalised, and their labels (B,)."""
    images, labels = _animal_mnist()
    x = to_model_input(images[start:start + n], size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return x, torch.from_numpy(labels[start:start + n])


def train_and_save(
        model: torch.nn.Module,
        arch: str,
        model_kwargs: Dict[str, Any],
        root: Path,
        images: int = 48,
        batch: int = 16,
        **optimizer_kwargs: Any,
) -> ModelEmaV3:
    """A few SGD steps on real images with an EMA, so the latent state is non-trivial, then a checkpoint in
    train.py's format (timm's CheckpointSaver: state_dict, state_dict_ema, args) at ``root / 'last.pth.tar'``."""
    size = model_kwargs['img_size']
    size = size[0] if isinstance(size, (list, tuple)) else size
    ema = ModelEmaV3(model, decay=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, **optimizer_kwargs)
    x, y = animal_batch(0, images, size)
    model.train()
    for i in range(0, images, batch):
        loss = F.cross_entropy(model(x[i:i + batch]), y[i:i + batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model)
    args = argparse.Namespace(model=arch, num_classes=model.num_classes, model_kwargs=dict(model_kwargs),
                              img_size=size, input_size=None, in_chans=3, gp=None, mean=None, std=None)
    CheckpointSaver(model, optimizer, args=args, model_ema=ema, checkpoint_dir=str(root), recovery_dir=str(root),
                    max_history=1).save_checkpoint(0, metric=0.0)
    return ema


def place_in_hf_cache(folder: Path, repo_id: str, cache: Path) -> Path:
    """Lay ``folder`` out as huggingface_hub's cache does after a download of ``repo_id``: blobs named by
    their etag (sha256 for LFS files, git blob sha1 for small ones), snapshots/<commit>/ symlinks, refs/main."""
    repo = cache / f'models--{repo_id.replace("/", "--")}'
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / 'snapshots' / commit
    snapshot.mkdir(parents=True)
    (repo / 'blobs').mkdir()
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        if file.suffix == '.safetensors':
            etag = hashlib.sha256(data).hexdigest()
        else:
            etag = hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()
        (repo / 'blobs' / etag).write_bytes(data)
        (snapshot / file.name).symlink_to(Path('..') / '..' / 'blobs' / etag)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(commit)
    return repo
