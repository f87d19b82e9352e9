"""Disjoint-class retrieval, the ReID protocol on offline data: PTL vs plain vs the cells-removed control.

No person ReID data exists offline, so identities are classes of a real image set: the model trains on some
classes (identity classifier + batch-hard triplet, P x K batches, as in ReID) and is scored by ranking a
gallery of the other, unseen classes for each query (mAP, rank-1 with ``ptl_timm.reid.evaluate``; queries
come from "camera 0", the gallery from "camera 1", so no same-camera exclusion applies).

Variants (BNNeck ReID head, same recipe, data order and augmentation for all; trained by the package's one ReID
training loop, ``ptl_timm.reid.train_reid``, with flip as the only augmentation and no memory):

- ``plain``: ``reid_mobilenetv2_100`` (the timm backbone alone).
- ``control``: ``reid_ptl_mobilenetv2_100`` with ``cells_removed=True``: zero cell maps, so the cells
  contribute nothing but the model, head, initialisation and optimiser are the PTL model's.
- ``ptl``: ``reid_ptl_mobilenetv2_100``.
- ``imagenet``: ``plain`` without any training (ImageNet features + a fresh BN), the floor to beat.

Backbones start from ImageNet weights shipped in a pip package (``ptl_timm.offline.weights``). Results: a
results store of the benchmark core (``benchmarks/common.py``), benchmarks/results/reid_retrieval.jsonl (one record
per run; a rerun skips finished runs), and reid_retrieval.md / .png written from its records alone. Examples::

    python benchmarks/reid_retrieval.py                         # Animal-MNIST, 5 seeds
    python benchmarks/reid_retrieval.py --task fashion --seeds 3
    python benchmarks/reid_retrieval.py --report                # the table and plot from the records only

With real person ReID data (not available offline), ``--data`` runs the standard protocol instead: train
on ``bounding_box_train`` with the PTL paper's recipe (Adam 2e-4, weight decay 5e-4, amsgrad, P=4 x K=4,
flip + random erasing, triplet margin 1.2 + CE, 400 epochs with steps at 320 and 360), then rank ``query``
against ``bounding_box_test`` with flip-averaged features (mAP, CMC, mINP; with and without re-ranking)::

    python benchmarks/reid_retrieval.py --data /data/Market-1501-v15.09.15 --model ptl_mgn_resnet50 --device cuda
    # the same, the package's command: ptl-timm train-reid DATA --model ptl_mgn_resnet50 --optimizer adam --lr 2e-4
    #   --schedule step --milestones 320 360 --epochs 400 --ids-per-batch 4 --num-instances 4 --margin 1.2
    #   --label-smoothing 0 --memory --flip-test --img-size 384 128
    python benchmarks/reid_retrieval.py --data /data/DukeMTMC-reID --dataset dukemtmc --model mgn_resnet50
"""
import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (  # noqa: E402
    Store,
    bar_plot,
    fmt_ci,
    fmt_mean_std,
    paired,
    repo_path,
    results_path,
    run_key,
    stamp,
    store_file,
    write_report,
)

from ptl_timm.reid import (  # noqa: E402  (importing registers the models)
    ArrayTable,
    ReIDData,
    ReIDTrainConfig,
    create_model,
    evaluate,
    train_reid,
)
from ptl_timm.reid.train import embed_table  # noqa: E402

VARIANTS = ('imagenet', 'plain', 'control', 'ptl')
MODELS = {'imagenet': 'reid_mobilenetv2_100', 'plain': 'reid_mobilenetv2_100', 'control': 'reid_ptl_mobilenetv2_100',
          'ptl': 'reid_ptl_mobilenetv2_100'}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_task(task: str) -> Tuple[np.ndarray, np.ndarray]:
    """Grey uint8 images (N, 28, 28) and class labels."""
    from ptl_timm.data import offline as data

    if task == 'animal':
        return data.load_animal_mnist()
    if task == 'fashion':
        return data.load_fashion_mnist('train')
    raise ValueError(f'Unknown task {task!r}; choose animal or fashion.')


def split(labels: np.ndarray, args: argparse.Namespace, seed: int) -> Dict[str, np.ndarray]:
    """Train images of the train classes; query and gallery images of the other classes (disjoint)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    train_cls, test_cls = classes[:args.train_classes], classes[args.train_classes:]
    out = {'train': [], 'query': [], 'gallery': []}
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        if c in train_cls:
            out['train'].append(idx[:args.train_per_class])
        else:
            out['query'].append(idx[:args.query_per_class])
            out['gallery'].append(idx[args.query_per_class:args.query_per_class + args.gallery_per_class])
    assert len(test_cls) >= 2, 'need at least two unseen classes to rank'
    return {k: np.concatenate(v) for k, v in out.items()}


def recipe(variant: str, args: argparse.Namespace, seed: int) -> ReIDTrainConfig:
    """The package's recipe with this benchmark's settings: flip only, no memory, inputs as given."""
    from ptl_timm.offline.weights import offline_weights_file

    path = offline_weights_file('mobilenetv2_100')
    return ReIDTrainConfig(
        model=MODELS[variant], model_kwargs=dict(cells_removed=True) if variant == 'control' else {},
        pretrained_file=str(path), img_size=(args.img_size, args.img_size), epochs=args.epochs, p=args.p, k=args.k,
        lr=args.lr, weight_decay=args.weight_decay, margin=args.margin, erasing=0.0, memories=(), seed=seed,
        channels_last=False, eval_batch=128, progress=False)


def run_one(images: np.ndarray, labels: np.ndarray, variant: str, seed: int, args: argparse.Namespace
            ) -> Dict[str, Any]:
    idx = split(labels, args, seed)
    y_train = np.unique(labels[idx['train']], return_inverse=True)[1]
    size = (args.img_size, args.img_size)
    tables = {k: ArrayTable(images[idx[k]], y_train if k == 'train' else labels[idx[k]],
                            np.zeros(len(idx[k])) if k != 'gallery' else np.ones(len(idx[k])), size, MEAN, STD,
                            antialias=False) for k in ('train', 'query', 'gallery')}
    data = ReIDData(tables['train'], tables['query'], tables['gallery'])
    cfg = recipe(variant, args, seed)
    if variant == 'imagenet':
        model, train_s, steps, loss = create_model(cfg, data.num_classes), 0.0, 0, 0.0
    else:
        result = train_reid(cfg, data)
        model, train_s, steps, loss = result['model'], result['train_s'], result['steps'], result['last_loss']
    q, g = embed_table(model, data.query, cfg), embed_table(model, data.gallery, cfg)
    ids = (data.query.pids, data.gallery.pids, data.query.camids, data.gallery.camids)
    res = evaluate(q, g, *ids)
    rr = evaluate(q, g, *ids, rerank=True)
    return dict(task=args.task, variant=variant, seed=seed, mAP=100 * res.mAP, rank1=100 * res.rank1,
                mINP=100 * res.mINP, mAP_rerank=100 * rr.mAP, rank1_rerank=100 * rr.rank1, train_s=train_s,
                steps=steps, final_loss=loss, settings=settings(args))


def settings(args: argparse.Namespace) -> Dict[str, Any]:
    keys = ('train_classes', 'train_per_class', 'query_per_class', 'gallery_per_class', 'img_size', 'epochs',
            'p', 'k', 'lr', 'weight_decay', 'margin')
    return {k: getattr(args, k) for k in keys}


METRICS = ('mAP', 'rank1', 'mINP', 'mAP_rerank')


def report(records: List[Dict[str, Any]], stem: Path, command: str) -> str:
    """Per task, the table of the task's latest settings (mean +- std of each variant, paired differences of ptl)
    and a plot of the paired mAP differences, from the records alone."""
    lines = ['### Disjoint-class retrieval (%, mean +- std over seeds; paired differences with 95 % t-interval)', '']
    groups = []
    for task in sorted({r['task'] for r in records}):
        last = [r for r in records if r['task'] == task][-1]  # the table shows the latest settings
        recs = [r for r in records if r['task'] == task and r['settings'] == last['settings']]
        by = {v: {r['seed']: r for r in recs if r['variant'] == v} for v in VARIANTS}
        seeds = sorted(set.intersection(*(set(by[v]) for v in VARIANTS)))
        if not seeds:
            continue
        s = recs[0]['settings']
        lines += [f'**{task}**: train on {s["train_classes"]} classes x {s["train_per_class"]} images, rank '
                  f'{s["query_per_class"]} queries vs {s["gallery_per_class"]} gallery images per unseen class; '
                  f'{s["img_size"]} px, {s["epochs"]} epochs of P={s["p"]} x K={s["k"]} batches, AdamW lr '
                  f'{s["lr"]:g}, triplet margin {s["margin"]:g} + CE; {len(seeds)} seeds.', '',
                  '| metric | imagenet (no training) | plain | control | ptl | ptl - control | ptl - plain |',
                  '|---|---|---|---|---|---|---|']
        for metric in METRICS:
            vals = {v: {sd: by[v][sd][metric] for sd in seeds} for v in VARIANTS}
            lines.append(f'| {metric} | ' + ' | '.join(fmt_mean_std(list(vals[v].values())) for v in VARIANTS) +
                         f' | {fmt_ci(paired(vals["ptl"], vals["control"]))} | '
                         f'{fmt_ci(paired(vals["ptl"], vals["plain"]))} |')
        secs = {v: np.mean([by[v][sd]['train_s'] for sd in seeds]) for v in VARIANTS[1:]}
        env = recs[-1].get('env', {})
        lines += ['', 'Training time per run (s, 1 thread, shared CPU): ' +
                  ', '.join(f'{v} {t:.0f}' for v, t in secs.items()) +
                  f'. ptl_timm core {recs[-1].get("core")}, commit {env.get("git_commit")}, torch {env.get("torch")}, '
                  f'timm {env.get("timm")}.', '']
        mAP = {v: {sd: by[v][sd]['mAP'] for sd in seeds} for v in VARIANTS}
        groups.append((task, {f'ptl - {b}': paired(mAP['ptl'], mAP[b]) for b in ('control', 'plain')}))
    text = write_report(stem.with_suffix('.md'), '\n'.join(lines), records, command)
    bar_plot(groups, ['ptl - control', 'ptl - plain'], stem.with_suffix('.png'),
             'paired mAP difference (points, 95 % CI)', records, command)
    return text


def run_real(args: argparse.Namespace) -> None:
    """Train and evaluate on a real ReID dataset (Market-1501, DukeMTMC-reID, MSMT17) with the PTL paper's recipe,
    through the package's training loop (``ptl-timm train-reid`` with these settings)."""
    from ptl_timm.reid import read_reid_data

    cfg = ReIDTrainConfig(
        model=args.model, pretrained=args.pretrained, img_size=tuple(timm.get_pretrained_cfg(
            args.model).input_size[1:]), epochs=args.epochs, p=args.p, k=args.k, optimizer='adam', lr=args.lr,
        weight_decay=args.weight_decay, schedule='step', milestones=tuple(args.milestones), margin=args.margin,
        label_smoothing=0.0, memories=(), device=args.device, workers=args.workers, eval_every=args.eval_every,
        flip_test=True, output=str(args.checkpoint.parent / args.checkpoint.stem))
    data = read_reid_data(args.data, cfg.img_size, args.dataset)
    print(data.describe(), flush=True)
    result = train_reid(cfg, data)
    print(' '.join(f'{k} {v:.2f}' for k, v in result['metrics'].items()), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--task', default='animal', choices=('animal', 'fashion'))
    p.add_argument('--seeds', type=int, default=5)
    p.add_argument('--first-seed', type=int, default=0, help='tune on other seeds than those reported')
    p.add_argument('--variants', default=','.join(VARIANTS))
    p.add_argument('--train-classes', type=int, default=5)
    p.add_argument('--train-per-class', type=int, default=40)
    p.add_argument('--query-per-class', type=int, default=20)
    p.add_argument('--gallery-per-class', type=int, default=100)
    p.add_argument('--img-size', type=int, default=64)
    # None: 6 / 4 / 8 / 1e-3 / 0.3 here, the paper's 400 / 4 / 4 / 2e-4 / 1.2 with --data
    p.add_argument('--epochs', type=int)
    p.add_argument('--p', type=int)
    p.add_argument('--k', type=int)
    p.add_argument('--lr', type=float)
    p.add_argument('--weight-decay', type=float, default=5e-4)
    p.add_argument('--margin', type=float)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--out', type=store_file, default=results_path('reid_retrieval.jsonl'), help='results store')
    p.add_argument('--report', action='store_true', help='only rebuild the table and plot from the records')
    real = p.add_argument_group('real ReID data (--data): the standard protocol with the PTL paper recipe')
    real.add_argument('--data', type=Path, help='dataset root, e.g. Market-1501-v15.09.15')
    real.add_argument('--dataset', default='market1501', choices=('market1501', 'dukemtmc', 'msmt17'))
    real.add_argument('--model', default='ptl_mgn_resnet50')
    real.add_argument('--no-pretrained', dest='pretrained', action='store_false')
    real.add_argument('--milestones', type=int, nargs='+', default=[320, 360])
    real.add_argument('--eval-every', type=int, default=50)
    real.add_argument('--workers', type=int, default=4)
    real.add_argument('--device', default='cpu')
    real.add_argument('--checkpoint', type=Path, default=Path('reid_model.pth'),
                      help='its stem names the folder of the checkpoint (last.pth.tar)')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    real = args.data is not None
    defaults = dict(epochs=400, lr=2e-4, margin=1.2, p=4, k=4) if real else \
        dict(epochs=6, lr=1e-3, margin=0.3, p=4, k=8)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if real:
        run_real(args)
        return
    store = Store(args.out)
    if not args.report:
        run_grid(args, store)
    records = list(store.latest().values())
    if records:
        print(report(records, args.out.with_suffix(''), f'python benchmarks/reid_retrieval.py --report --out '
                     f'{repo_path(args.out)}'))


def run_grid(args: argparse.Namespace, store: Store) -> None:
    """Every variant of every seed of ``args.task`` that the store does not hold yet."""
    images, labels = load_task(args.task)
    stamped = stamp()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for variant in args.variants.split(','):
            key = run_key(dict(task=args.task, variant=variant, seed=seed, settings=settings(args)))
            if key in store.done():
                continue
            rec = store.append(dict(run_one(images, labels, variant, seed, args), key=key), stamped)
            print(f"{args.task} {variant} seed {seed}: mAP {rec['mAP']:.2f} rank-1 {rec['rank1']:.2f} "
                  f"(re-ranked mAP {rec['mAP_rerank']:.2f}) {rec['train_s']:.0f}s", flush=True)


if __name__ == '__main__':
    main()
