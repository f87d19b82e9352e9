"""Build a checkpoint of weights/manifest.json from its recipe, export it, measure it and update the manifest.

    python weights/build.py ptl_mobilenetv2_100.animal_mnist --out /tmp/ptl-export

Trains with the recipe stored in the manifest entry (offline ImageNet backbone weights, offline data),
saves a train.py-format checkpoint with timm's CheckpointSaver, exports it with
``ptl-timm export`` (the code path users run), loads the export back with
``timm.create_model('local-dir:...')`` to measure the test accuracy, then writes the measured results,
the exported config.json and the sha256 of model.safetensors into the manifest and re-renders the model
cards. The status stays "not yet published" until ``ptl-timm push`` has uploaded the folder.

    python weights/build.py ptl_mobilenetv2_100.animal_mnist --config-only

rewrites only the entry's config.json for the current code (no training); when it changes (e.g. a new
ptl_timm default), the measured results and the sha256 no longer describe a checkpoint this code builds,
so they are cleared until the next full build.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.utils import CheckpointSaver

import ptl_timm  # noqa: F401  registers the ptl_* models
from ptl_timm.data.offline import few_shot_split, load_animal_mnist, to_model_input
from ptl_timm.hub.checkpoint import file_sha256
from ptl_timm.hub.io import save_pretrained
from ptl_timm.hub.manifest import REPO_MANIFEST_PATH, WEIGHTS_NAME, load_manifest
from ptl_timm.hub.model_card import replace_manifest_table, write_zoo
from ptl_timm.offline.weights import create_offline_model

REPO_ROOT = Path(__file__).resolve().parent.parent
# data loaders of the recipes' datasets: uint8 images (N, H, W[, 3]) and int64 labels
DATASETS = {'Animal-MNIST': load_animal_mnist}


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, size: int, mean, std) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), 256):
        logits = model(to_model_input(images[i:i + 256], size, mean, std))
        correct += int((logits.argmax(1) == torch.from_numpy(labels[i:i + 256])).sum())
    return 100.0 * correct / len(images)


def train_args(arch: str, num_classes: int, recipe: dict, mean, std) -> argparse.Namespace:
    """What train.py would store in its checkpoint; the export reads model kwargs and preprocessing from it."""
    return argparse.Namespace(
        model=arch, num_classes=num_classes, img_size=recipe['img_size'], input_size=None, in_chans=3, gp=None,
        model_kwargs=dict(img_size=recipe['img_size'], **recipe['model_kwargs']), mean=tuple(mean), std=tuple(std),
        crop_pct=1.0, interpolation='bilinear')


def update_manifest(name: str, **changes) -> None:
    """Write ``changes`` into the manifest entry, then re-render the cards and the table in docs/hub.md."""
    manifest = json.loads(REPO_MANIFEST_PATH.read_text())
    for e in manifest['checkpoints']:
        if e['name'] == name:
            e.update(changes)
    tmp_path = REPO_MANIFEST_PATH.with_suffix('.tmp')
    tmp_path.write_text(json.dumps(manifest, indent=2) + '\n')
    os.replace(tmp_path, REPO_MANIFEST_PATH)
    write_zoo()
    replace_manifest_table(REPO_ROOT / 'docs' / 'hub.md')


def config_only(name: str) -> bool:
    """Regenerate the entry's config.json with the current code; True when it changed."""
    entry = load_manifest()[name]
    recipe, arch = entry['recipe'], name.split('.')[0]
    model = timm.create_model(arch, num_classes=entry['config']['num_classes'], img_size=recipe['img_size'],
                              **recipe['model_kwargs'])
    data_cfg = timm.data.resolve_data_config({}, model=model)
    args = train_args(arch, model.num_classes, recipe, data_cfg['mean'], data_cfg['std'])
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, license=entry['licence'], data_config={
            k: getattr(args, k) for k in ('img_size', 'mean', 'std', 'crop_pct', 'interpolation')})
        config = json.loads((Path(tmp) / 'config.json').read_text())
    if config == entry['config']:
        return False
    update_manifest(name, config=config, results=None, files=None)
    return True


def build(name: str, out: Path, update: bool) -> dict:
    entry = load_manifest()[name]
    recipe = entry['recipe']
    arch = name.split('.')[0]
    torch.manual_seed(recipe['seed'])
    images, labels = DATASETS[entry['data']['name']]()
    split = few_shot_split(labels, recipe['train_per_class'], seed=recipe['seed'],
                           val_per_class=recipe['val_per_class'], test_per_class=recipe['test_per_class'])
    size = recipe['img_size']
    model = create_offline_model(arch, num_classes=int(labels.max()) + 1, img_size=size, **recipe['model_kwargs'])
    data_cfg = timm.data.resolve_data_config({}, model=model)
    mean, std = data_cfg['mean'], data_cfg['std']
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe['lr'], weight_decay=recipe['weight_decay'])
    steps_per_epoch = -(-len(split.train) // recipe['batch_size'])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe['lr'],
                                                    total_steps=recipe['epochs'] * steps_per_epoch)
    rng = np.random.default_rng(recipe['seed'])
    args = train_args(arch, model.num_classes, recipe, data_cfg['mean'], data_cfg['std'])
    with tempfile.TemporaryDirectory() as tmp:
        saver = CheckpointSaver(model, optimizer, args=args, checkpoint_dir=tmp,
                                recovery_dir=tmp, max_history=1)
        for epoch in range(recipe['epochs']):
            model.train()
            order = rng.permutation(split.train)
            for i in range(0, len(order), recipe['batch_size']):
                idx = order[i:i + recipe['batch_size']]
                x = to_model_input(images[idx], size, mean, std)
                if recipe['hflip']:
                    flip = torch.rand(len(idx)) < 0.5
                    x[flip] = x[flip].flip(-1)
                loss = F.cross_entropy(model(x), torch.from_numpy(labels[idx]))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
            val = accuracy(model, images[split.val], labels[split.val], size, mean, std)
            print(f'epoch {epoch}: loss {loss.item():.4f} val top1 {val:.2f}', flush=True)
            saver.save_checkpoint(epoch, metric=val)
        checkpoint = Path(tmp) / 'last.pth.tar'
        subprocess.run([sys.executable, '-m', 'ptl_timm', 'export', str(checkpoint), str(out),
                        '--repo-id', entry['hf_hub_id'], '--license', entry['licence']], check=True)
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    results = dict(
        top1_test=round(accuracy(loaded, images[split.test], labels[split.test], size, mean, std), 2),
        top1_val=round(accuracy(loaded, images[split.val], labels[split.val], size, mean, std), 2),
        n_train=len(split.train), n_val=len(split.val), n_test=len(split.test),
        measured=f'{datetime.date.today()} on {platform.machine()} CPU, torch {torch.__version__}, '
                 f'timm {timm.__version__}, 1 seed ({recipe["seed"]})',
    )
    weights = out / WEIGHTS_NAME
    files = {WEIGHTS_NAME: dict(sha256=file_sha256(weights), bytes=weights.stat().st_size)}
    print(json.dumps(dict(results=results, files=files), indent=1))
    if update:
        update_manifest(name, results=results, files=files, config=json.loads((out / 'config.json').read_text()))
        # the folder push uploads carries the zoo card (task, data, results), not the generic export card
        (out / 'README.md').write_text((REPO_MANIFEST_PATH.parent / name / 'README.md').read_text())
    return dict(results=results, files=files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('name', help='a manifest entry, e.g. ptl_mobilenetv2_100.animal_mnist')
    parser.add_argument('--out', type=Path, help='export folder (model.safetensors, config, card)')
    parser.add_argument('--no-update', action='store_true', help='do not write results into the manifest')
    parser.add_argument('--config-only', action='store_true', help='only regenerate the config (no training)')
    parser.add_argument('--threads', type=int, default=min(2, os.cpu_count() or 1), help='torch CPU threads')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.config_only:
        print(f'{args.name}: config {"updated, results cleared" if config_only(args.name) else "unchanged"}.')
    elif args.out is None:
        parser.error('--out is required to build')
    else:
        build(args.name, args.out, update=not args.no_update)


if __name__ == '__main__':
    main()
