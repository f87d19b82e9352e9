"""Transfer accuracy: PTL vs plain timm fine-tuning vs the cells-removed control, on real images, CPU.

Every run fine-tunes ImageNet weights (offline, from pip packages, loaded through timm's pretrained
path) on a few labelled images per class and scores a fixed held-out test set and a separate validation
set (``ptl_timm.data.offline.few_shot_split``). Variants, all with the same data order, augmentation and schedule:

- ``plain``: ``timm.create_model(arch, pretrained=True, num_classes=N)``, timm's own head.
- ``control``: the PTL model built with ``cells_removed=True`` (same parameters, head, init, optimiser groups,
  schedule; zero cell maps, the ladder does not run), so the cells contribute nothing (docs/benchmarks.md: a new
  head alone moves accuracy by many points).
- ``shared`` / ``carried`` / ``reset``: the PTL model with that ``state_mode``.

Ablations (``--ablate``): cell ``width_mult`` and the learning-rate multiplier of the non-backbone
parameters; ``--ablate-cell-norm``: the other ``cell_norm`` head. Defaults are chosen on validation accuracy
(``--report`` prints both). Every PTL run also scores its trained model again with the cells' output and with
the latent state replaced by zeros: what the cells contribute at inference; and measures how much the pooled
backbone and cell features (and their shares of the logits) vary across test images, before and after training.

Runs go to a results store of the benchmark core (``benchmarks/common.py``): ``--out`` (default
benchmarks/results/transfer_default.jsonl), one record per run appended as it finishes, so a rerun skips finished
runs and ``--shard i/n`` lets processes share a grid; the report (``.md``) and plot (``.png``) beside it are
made from the records alone. ``--quick`` writes to the git-ignored benchmarks/results/quick/. Examples::

    python benchmarks/transfer.py --quick
    python benchmarks/transfer.py --models mobilenetv2_100 --tasks animal --shots 10 --seeds 5
    python benchmarks/transfer.py --report      # tables and plot from the records only
"""
import argparse
import itertools
import math
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: a frozen copy may win
from common import (  # noqa: E402
    Store,
    bar_plot,
    core_hash,
    fmt_avg,
    fmt_ci,
    fmt_mean_std,
    repo_path,
    results_path,
    run_key,
    shard,
    stamp,
    store_file,
    write_report,
)

VARIANTS = ('plain', 'control', 'shared', 'carried', 'reset')
PTL_VARIANTS = ('shared', 'carried', 'reset')
TASKS = ('animal', 'fashion', 'emoji')
DEFAULT_WIDTH = 0.125
DEFAULT_LR_MULT = 1.0
DEFAULT_CELL_NORM = False
DEFAULT_SETTING = (DEFAULT_WIDTH, DEFAULT_LR_MULT, DEFAULT_CELL_NORM)  # (width, lr_mult, cell_norm)
GAIN_PAIRS = (('shared', 'control'), ('carried', 'control'), ('reset', 'control'), ('shared', 'plain'))


# --- data -------------------------------------------------------------------------------------------
def load_task(task: str) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Images (N, H, W) grey or (N, H, W, 3) RGB uint8, labels (N,), and the official test pool (or None)."""
    from ptl_timm.data import offline as data

    if task == 'animal':
        x, y = data.load_animal_mnist()
        return x, y, None
    if task == 'fashion':
        (xa, ya), (xb, yb) = data.load_fashion_mnist('train'), data.load_fashion_mnist('test')
        pool = np.r_[np.zeros(len(ya), bool), np.ones(len(yb), bool)]
        return np.concatenate([xa, xb]), np.concatenate([ya, yb]), pool
    if task == 'emoji':
        x, y, _ = data.load_emoji('category', min_count=60)  # drops 'Component' (5 images)
        return x, y, None
    raise ValueError(f'Unknown task {task!r}; choose from {TASKS}.')


def split_counts(task: str) -> Tuple[int, int]:
    """(val, test) images per class: emoji's smallest categories hold about 80 images."""
    return (10, 40) if task == 'emoji' else (50, 150)


def augment(x: torch.Tensor, gen: torch.Generator, pad: int) -> torch.Tensor:
    """Random horizontal flip and random shift by up to ``pad`` pixels (reflection padding)."""
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    padded = F.pad(x, (pad,) * 4, mode='reflect')
    ox, oy = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()  # one shift per batch: cheap
    return padded[..., oy:oy + x.shape[-2], ox:ox + x.shape[-1]]


# --- models ------------------------------------------------------------------------------------------
def build(run: Dict[str, Any], num_classes: int) -> Tuple[nn.Module, List[Dict[str, Any]]]:
    """The model of ``run`` and its two parameter groups: backbone, and new layers (cells, fuses, head)."""
    import ptl_timm  # noqa: F401  (registers ptl_* models)
    from ptl_timm.offline.weights import create_offline_model

    torch.manual_seed(run['seed'])
    if run['variant'] == 'plain':
        model = create_offline_model(run['model'], num_classes=num_classes)
        head = model.pretrained_cfg['classifier']
        is_new = [n.startswith(f'{head}.') for n, _ in model.named_parameters()]
        params = [p for _, p in model.named_parameters()]
    else:
        state_mode = run['variant'] if run['variant'] in PTL_VARIANTS else 'shared'
        model = create_offline_model(
            f'ptl_{run["model"]}', num_classes=num_classes, state_mode=state_mode, width_mult=run['width'],
            img_size=run['img_size'], cell_norm=cell_norm(run), cells_removed=run['variant'] == 'control')
        is_new = [not n.startswith('backbone.') for n, _ in model.named_parameters()]
        params = [p for _, p in model.named_parameters()]
    lr = run['lr']
    groups = [
        dict(params=[p for p, new in zip(params, is_new) if not new], lr=lr),
        dict(params=[p for p, new in zip(params, is_new) if new], lr=lr * run['lr_mult']),
    ]
    return model, groups


# --- one run ------------------------------------------------------------------------------------------
_TASK_CACHE: Dict[str, Any] = {}


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return 100.0 * correct / len(x)


def run_one(run: Dict[str, Any]) -> Dict[str, Any]:
    """Fine-tune once and return ``run`` with val / test accuracy and timing."""
    from ptl_timm.data.offline import few_shot_split, to_model_input

    torch.set_num_threads(run.get('threads', 1))
    t0 = time.time()
    if run['task'] not in _TASK_CACHE:
        _TASK_CACHE.clear()
        _TASK_CACHE[run['task']] = load_task(run['task'])
    images, labels, test_pool = _TASK_CACHE[run['task']]
    num_classes = int(labels.max()) + 1
    val_n, test_n = split_counts(run['task'])
    split = few_shot_split(labels, run['shots'], run['seed'], val_n, test_n, test_pool=test_pool)
    model, groups = build(run, num_classes)
    mean, std = model.pretrained_cfg['mean'], model.pretrained_cfg['std']
    xs = {k: to_model_input(images[getattr(split, k)], run['img_size'], mean, std, antialias=True)
          for k in ('train', 'val', 'test')}
    ys = {k: torch.from_numpy(labels[getattr(split, k)]) for k in ('train', 'val', 'test')}

    # the same measure before training (eval mode writes no state and draws no random numbers)
    init_scale = ({f'init_{k}': v for k, v in cell_feature_scale(model, xs['test']).items()}
                  if run['variant'] in PTL_VARIANTS else {})
    n, bs = len(ys['train']), run['batch_size']
    steps = max(run['min_steps'], run['epochs'] * math.ceil(n / bs))
    opt = torch.optim.AdamW(groups, weight_decay=run['weight_decay'])
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g['lr'] for g in groups], total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(run['seed'])  # same batches and augmentation for every variant
    order = torch.empty(0, dtype=torch.long)
    model.train()
    for _ in range(steps):
        if len(order) < bs:
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        idx, order = order[:bs], order[bs:]
        x = augment(xs['train'][idx], gen, pad=run['img_size'] // 10)
        loss = F.cross_entropy(model(x), ys['train'][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    t_train = time.time() - t0
    result = dict(run, **init_scale, core=core_hash(), steps=steps, final_loss=loss.item(),
                  val_acc=accuracy(model, xs['val'], ys['val']), test_acc=accuracy(model, xs['test'], ys['test']))
    if run['variant'] in PTL_VARIANTS:
        result.update(probe_trained_cells(model, run, num_classes, xs, ys))
    return dict(result, train_seconds=round(t_train, 1), seconds=round(time.time() - t0, 1))


@torch.no_grad()
def cell_feature_scale(model: nn.Module, x: torch.Tensor, batch: int = 250) -> Dict[str, float]:
    """How much the pooled features the classifier sees vary across the images ``x``, backbone part vs cell
    part (std over images, mean over feature dimensions), and the std over images of each part's share of
    the logits (``fc`` split by columns; mean over classes). Eval mode: nothing is written."""
    model.eval()
    pooled = torch.cat([model.forward_head(model.forward_features(x[i:i + batch]), pre_logits=True)
                        for i in range(0, len(x), batch)])
    split = pooled.shape[1] - model.cell_widths[-1]
    out = {}
    for part, cols in (('backbone', slice(None, split)), ('cells', slice(split, None))):
        out[f'feat_std_{part}'] = pooled[:, cols].std(0).mean().item()
        out[f'logit_std_{part}'] = (pooled[:, cols] @ model.fc.weight[:, cols].T).std(0).mean().item()
    return out


def probe_trained_cells(model: nn.Module, run: Dict[str, Any], num_classes: int, xs: Dict[str, torch.Tensor],
                        ys: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """What the trained cells contribute: the same trained weights scored by the control model
    (``cells_removed=True``, ``*_no_cells``) and, for a carried state, with the learned state replaced by zeros
    (``*_zero_state``)."""
    from ptl_timm import reset_state

    with torch.random.fork_rng():  # building draws random numbers; the caller's stay as they were
        removed, _ = build(dict(run, variant='control'), num_classes)
    removed.load_state_dict(model.state_dict())
    out = {f'{k}_acc_no_cells': accuracy(removed, xs[k], ys[k]) for k in ('val', 'test')}
    out.update({f'trained_{k}': v for k, v in cell_feature_scale(model, xs['test']).items()})
    if model.state_mode != 'reset':  # a 'reset' state is always zero
        reset_state(model)
        out.update({f'{k}_acc_zero_state': accuracy(model, xs[k], ys[k]) for k in ('val', 'test')})
    return out


# --- grid ---------------------------------------------------------------------------------------------
def cell_norm(run: Dict[str, Any]) -> bool:
    """The run's ``cell_norm`` (records written before the option existed ran without it)."""
    return bool(run.get('cell_norm', False))


def setting(run: Dict[str, Any]) -> Tuple[float, float, bool]:
    """(width, lr_mult, cell_norm) of a run, comparable with ``DEFAULT_SETTING``."""
    return run['width'], run['lr_mult'], cell_norm(run)


def is_main(run: Dict[str, Any]) -> bool:
    """A run of the main table: the package defaults (cell_norm only concerns the PTL variants)."""
    width, lr_mult, norm = setting(run)
    return (width, lr_mult) == DEFAULT_SETTING[:2] and (run['variant'] not in PTL_VARIANTS or norm == DEFAULT_CELL_NORM)


def _default_cell_norm(variant: str) -> bool:
    return DEFAULT_CELL_NORM and variant in PTL_VARIANTS  # the control and plain have no cell features


KEY_FIELDS = ('model', 'task', 'shots', 'variant', 'width', 'lr_mult', 'seed', 'img_size', 'epochs', 'min_steps',
              'lr')


def key_of(run: Dict[str, Any]) -> str:
    """The run's key in the results store: the fields that define it."""
    return run_key(dict({k: run[k] for k in KEY_FIELDS}, cell_norm=cell_norm(run)))


def grid(args: argparse.Namespace) -> Iterator[Dict[str, Any]]:
    """Runs seed by seed (so an interrupted grid still has every cell at fewer seeds); ablations follow
    the main variants of the same seed."""
    base = dict(img_size=args.img_size, batch_size=args.batch_size, epochs=args.epochs, min_steps=args.min_steps,
                lr=args.lr, weight_decay=args.weight_decay, width=DEFAULT_WIDTH, lr_mult=DEFAULT_LR_MULT)
    for seed, model, task, shots in itertools.product(args.seeds, args.models, args.tasks, args.shots):
        cell = dict(base, model=model, task=task, shots=shots, seed=seed)
        for variant in args.variants:
            yield dict(cell, variant=variant, cell_norm=_default_cell_norm(variant))
        if args.ablate_cell_norm:
            yield dict(cell, variant='shared', cell_norm=not DEFAULT_CELL_NORM)
        if args.ablate:
            for width in args.ablate_widths:
                yield dict(cell, variant='shared', width=width)
            for lr_mult in args.ablate_lr_mults:
                for variant in ('shared', 'control'):
                    yield dict(cell, variant=variant, lr_mult=lr_mult, cell_norm=_default_cell_norm(variant))


def _worker(run: Dict[str, Any]) -> Dict[str, Any]:
    try:
        return run_one(run)
    except Exception as e:  # one failing run must not lose the others; it is recorded and reported
        return dict(run, error=f'{type(e).__name__}: {e}')


def is_complete(record: Dict[str, Any]) -> bool:
    """A finished run; PTL records written before the probe of the trained cells existed are run again (runs
    are deterministic)."""
    return 'error' not in record and (record['variant'] not in PTL_VARIANTS or 'test_acc_no_cells' in record)


def run_grid(args: argparse.Namespace, store: Store) -> None:
    from tqdm import tqdm

    done = {k for k, r in store.latest().items() if is_complete(r)}
    todo = shard([r for r in grid(args) if key_of(r) not in done], args.shard)
    print(f'{len(todo)} runs to do ({len(done)} already in {store.path})', flush=True)
    if not todo:
        return
    stamped = stamp()
    stamped['env'].update(workers=args.workers, threads_per_worker=1)
    ctx = mp.get_context('spawn')
    with ctx.Pool(args.workers, maxtasksperchild=20) as pool, tqdm(total=len(todo), unit='run') as bar:
        for result in pool.imap(_worker, todo):
            store.append(dict(result, key=key_of(result)), stamped)
            bar.set_postfix_str(f'{result["model"][:12]} {result["task"]} {result["shots"]} {result["variant"]} '
                                f'{result.get("test_acc", result.get("error", ""))}')
            bar.update()


# --- report -------------------------------------------------------------------------------------------
def _by_seed(runs: List[Dict[str, Any]], metric: str) -> Dict[int, float]:
    return {r['seed']: r[metric] for r in runs}


def _by_ptl_cell(runs: List[Dict[str, Any]], cells: List[Tuple]) -> Iterator[Tuple[Tuple, List[Dict[str, Any]]]]:
    """((model, task, shots, variant), runs) of every table cell and PTL variant that has runs."""
    for (model, task, shots), variant in itertools.product(cells, PTL_VARIANTS):
        sel = [r for r in runs if (r['model'], r['task'], r['shots'], r['variant']) == (model, task, shots, variant)]
        if sel:
            yield (model, task, shots, variant), sel


def _table_head(title: str, intro: Optional[str], columns: List[str]) -> List[str]:
    """A report section's first lines: heading, an optional paragraph, the table's header row and rule."""
    return ([f'### {title}', ''] + ([intro, ''] if intro else []) +
            ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)])


def report(records: List[Dict[str, Any]], stem: Path, command: str) -> str:
    """Markdown tables (main comparison and ablations, test and validation) and a plot of paired gains, from the
    records alone."""
    runs = [r for r in records if 'error' not in r]
    errors = [r for r in records if 'error' in r]
    main = [r for r in runs if is_main(r)]
    cells = sorted({(r['model'], r['task'], r['shots']) for r in main})
    env = records[-1].get('env', {}) if records else {}
    lines = _table_head(
        'Transfer accuracy (%, mean +- std over seeds; paired differences with 95 % t-interval)',
        f'Fixed held-out test set; {len(runs)} runs; torch {env.get("torch")}, timm {env.get("timm")}, '
        f'{env.get("cpu")}, {env.get("workers")} processes x 1 thread.',
        ['model', 'task', 'shots/class', 'seeds', *VARIANTS,
         'shared - control', 'carried - control', 'reset - control', 'shared - plain'])
    gains: Dict[Tuple[str, str], List[List[float]]] = {pair: [] for pair in GAIN_PAIRS}
    plot_rows = []
    for model, task, shots in cells:
        sel = [r for r in main if (r['model'], r['task'], r['shots']) == (model, task, shots)]
        acc = {v: _by_seed([r for r in sel if r['variant'] == v], 'test_acc') for v in VARIANTS}
        seeds = sorted(set.intersection(*(set(a) for a in acc.values() if a)) if any(acc.values()) else set())
        row = [model, task, str(shots), str(len(seeds))]
        for v in VARIANTS:
            vals = list(acc[v].values())
            row.append(fmt_mean_std(vals) if vals else '-')
        diffs = {}
        for v, ref in GAIN_PAIRS:
            paired = [acc[v][s] - acc[ref][s] for s in seeds if s in acc[v] and s in acc[ref]]
            diffs[(v, ref)] = paired
            row.append(fmt_ci(paired) if paired else '-')
        for pair, paired in diffs.items():
            if paired:
                gains[pair].append(paired)
        plot_rows.append((f'{model.replace("tf_efficientnet_", "eff")}\n{task} {shots}',
                          {f'{v} - {ref}': d for (v, ref), d in diffs.items()}))
        lines.append('| ' + ' | '.join(row) + ' |')
    lines += ['', 'Average over the table\'s cells of the paired gain (mean of the cell means, 95 % interval from '
              'their standard errors): ' + ', '.join(
                  f'{v} - {ref} {fmt_avg(g)} ({len(g)} cells)' for (v, ref), g in gains.items() if g) + '.', '']

    abl = [r for r in runs if r['variant'] in ('shared', 'control')]
    settings = sorted({setting(r) for r in abl if r['variant'] == 'shared'})
    if len(settings) > 1:
        lines += _table_head(
            'Ablations: cell width, learning-rate multiplier of the new layers, cell_norm (shared state)',
            'Validation accuracy chooses defaults; test accuracy shown for reference only. Gain = paired '
            'difference vs the control at the same lr multiplier; vs default = paired difference vs the shared model '
            'at the package defaults, same seeds.',
            ['model', 'task', 'shots/class', 'width_mult', 'lr_mult', 'cell_norm', 'seeds', 'val control',
             'val shared', 'val gain vs control', 'val vs default', 'test control', 'test shared',
             'test gain vs control'])
        ablated = sorted({(r['model'], r['task'], r['shots']) for r in abl
                          if r['variant'] == 'shared' and setting(r) != DEFAULT_SETTING})
        defaults = {cell: _by_seed([r for r in main if (r['model'], r['task'], r['shots'], r['variant']) ==
                                    (*cell, 'shared')], 'val_acc') for cell in ablated}
        for (model, task, shots), (width, lr_mult, norm) in itertools.product(ablated, settings):
            sel = [r for r in abl if (r['model'], r['task'], r['shots'], r['lr_mult']) == (model, task, shots, lr_mult)]
            ptl = [r for r in sel if r['variant'] == 'shared' and r['width'] == width and cell_norm(r) == norm]
            ctl = [r for r in sel if r['variant'] == 'control' and r['width'] == DEFAULT_WIDTH]
            default = defaults[(model, task, shots)]
            if not ptl:
                continue
            row = [model, task, str(shots), f'{width:g}', f'{lr_mult:g}', str(norm), str(len(ptl))]
            for metric in ('val_acc', 'test_acc'):
                p, c = _by_seed(ptl, metric), _by_seed(ctl, metric)
                seeds = [s for s in p if s in c]  # both means over the same seeds as the paired gain
                row.append(f'{np.mean([c[s] for s in seeds]):.2f}' if seeds else '-')
                row.append(f'{np.mean(list(p.values())):.2f}')
                paired = [p[s] - c[s] for s in seeds]
                row.append(fmt_ci(paired) if paired else '-')
                if metric == 'val_acc':
                    is_default = (width, lr_mult, norm) == DEFAULT_SETTING
                    vs_default = [] if is_default else [p[s] - default[s] for s in p if s in default]
                    row.append(fmt_ci(vs_default) if vs_default else '-')
            lines.append('| ' + ' | '.join(row) + ' |')
        lines.append('')

    probed = [r for r in main if 'test_acc_no_cells' in r]
    if probed:
        lines += _table_head(
            'What the trained cells contribute (the same trained model, scored again)',
            'Test accuracy of each trained PTL model minus its accuracy with the cells\' output replaced by zeros '
            '(no cells) and with the learned latent state replaced by zeros (zero state); mean [95 % CI] over seeds.',
            ['model', 'task', 'shots/class', 'variant', 'seeds', 'test', 'minus no cells', 'minus zero state'])
        for (model, task, shots, variant), sel in _by_ptl_cell(probed, cells):
            no_cells = [r['test_acc'] - r['test_acc_no_cells'] for r in sel]
            zero = [r['test_acc'] - r['test_acc_zero_state'] for r in sel if 'test_acc_zero_state' in r]
            lines.append(f'| {model} | {task} | {shots} | {variant} | {len(sel)} | '
                         f'{np.mean([r["test_acc"] for r in sel]):.2f} | {fmt_ci(no_cells)} | '
                         f'{fmt_ci(zero) if zero else "-"} |')
        lines.append('')

    scaled = [r for r in main if 'trained_feat_std_cells' in r]
    if scaled:
        lines += _table_head(
            'How much the classifier\'s inputs vary across test images',
            'Std over the test images of the pooled features the classifier sees (mean over feature dimensions), '
            'backbone part and cell part, for the freshly built model (init) and the trained one; and the std over '
            'the test images of each part\'s share of the trained logits (mean over classes). Means over seeds.',
            ['model', 'task', 'shots/class', 'variant', 'seeds', 'backbone features init / trained',
             'cell features init / trained', 'ratio trained', 'backbone logits', 'cell logits'])
        for (model, task, shots, variant), sel in _by_ptl_cell(scaled, cells):
            m = {k: np.mean([r[k] for r in sel]) for k in sel[0] if k.startswith(('init_', 'trained_'))}
            ratio = np.mean([r['trained_feat_std_backbone'] / r['trained_feat_std_cells'] for r in sel])
            lines.append(
                f'| {model} | {task} | {shots} | {variant} | {len(sel)} | '
                f'{m["init_feat_std_backbone"]:.3f} / {m["trained_feat_std_backbone"]:.3f} | '
                f'{m["init_feat_std_cells"]:.4f} / {m["trained_feat_std_cells"]:.4f} | {ratio:.0f}x | '
                f'{m["trained_logit_std_backbone"]:.3f} | {m["trained_logit_std_cells"]:.4f} |')
        lines.append('')

    val_lines = _table_head('Validation accuracy of the main variants (what defaults are chosen on)', None,
                            ['model', 'task', 'shots/class', *VARIANTS])
    val_pairs = [(v, 'control') for v in PTL_VARIANTS] + [('shared', 'reset'), ('shared', 'carried')]
    val_gains: Dict[Tuple[str, str], List[List[float]]] = {pair: [] for pair in val_pairs}
    for model, task, shots in cells:
        sel = [r for r in main if (r['model'], r['task'], r['shots']) == (model, task, shots)]
        by_variant = {v: _by_seed([r for r in sel if r['variant'] == v], 'val_acc') for v in VARIANTS}
        val_lines.append(f'| {model} | {task} | {shots} | ' + ' | '.join(
            f'{np.mean(list(a.values())):.2f}' if a else '-' for a in by_variant.values()) + ' |')
        for v, ref in val_pairs:
            paired = [acc - by_variant[ref][seed] for seed, acc in by_variant[v].items() if seed in by_variant[ref]]
            if paired:
                val_gains[(v, ref)].append(paired)
    val_lines += ['', 'Average over the cells of the paired validation difference: ' + ', '.join(
        f'{v} - {ref} {fmt_avg(g)} ({len(g)} cells)' for (v, ref), g in val_gains.items() if g) + '.']
    lines += val_lines + ['']
    if errors:
        lines += [f'{len(errors)} runs failed: ' + '; '.join(sorted({r["error"][:120] for r in errors})), '']
    text = write_report(stem.with_suffix('.md'), '\n'.join(lines), records, command)
    bar_plot(plot_rows, [f'{v} - {ref}' for v, ref in GAIN_PAIRS], stem.with_suffix('.png'),
             'paired test accuracy gain (points, 95 % CI)', records, command)
    return text


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--models', default='mobilenetv2_100,tf_efficientnet_lite0')
    p.add_argument('--tasks', default='animal,fashion', help=f'comma list of {TASKS}')
    p.add_argument('--shots', default='10,50', help='train images per class, comma list')
    p.add_argument('--seeds', default='5', help='a count (0..N-1) or a comma list of seeds')
    p.add_argument('--variants', default=','.join(VARIANTS))
    p.add_argument('--ablate', action='store_true', help='add width and lr-multiplier runs (shared state)')
    p.add_argument('--ablate-widths', default='0.0625,0.25')
    p.add_argument('--ablate-lr-mults', default='3,10')
    p.add_argument('--ablate-cell-norm', action='store_true',
                   help=f'add shared-state runs with cell_norm={not DEFAULT_CELL_NORM} (the non-default head)')
    p.add_argument('--img-size', type=int, default=64)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--epochs', type=int, default=6)
    p.add_argument('--min-steps', type=int, default=40, help='at least this many steps (tiny training sets)')
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--weight-decay', type=float, default=0.01)
    p.add_argument('--workers', type=int, default=2, help='processes, 1 thread each')
    p.add_argument('--out', type=store_file, help='results store, .jsonl (default '
                   'benchmarks/results/transfer_default.jsonl; with '
                   '--quick benchmarks/results/quick/transfer.jsonl, git-ignored)')
    p.add_argument('--shard', metavar='I/N', help='run every N-th run of the grid from the I-th (processes sharing '
                   'one --out)')
    p.add_argument('--quick', action='store_true', help='smoke run: 1 seed, MobileNetV2, Animal-MNIST, 10 shots')
    p.add_argument('--report', action='store_true', help='only write tables and plot from the stored records')
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.tasks, args.shots, args.seeds, args.min_steps = 'mobilenetv2_100', 'animal', '10', '1', 20
    default = 'transfer.jsonl' if args.quick else 'transfer_default.jsonl'
    args.out = args.out or results_path(default, quick=args.quick)
    args.models = args.models.split(',')
    args.tasks = args.tasks.split(',')
    bad = [t for t in args.tasks if t not in TASKS]
    if bad:
        p.error(f'unknown tasks {bad}; choose from {TASKS}')
    args.variants = args.variants.split(',')
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f'unknown variants {bad}; choose from {VARIANTS}')
    args.shots = [int(s) for s in args.shots.split(',')]
    args.seeds = list(range(int(args.seeds))) if ',' not in args.seeds else [int(s) for s in args.seeds.split(',')]
    args.ablate_widths = [float(w) for w in args.ablate_widths.split(',') if w]
    args.ablate_lr_mults = [float(m) for m in args.ablate_lr_mults.split(',')]
    return args


def report_command(path: Path) -> str:
    """The command that rewrites the report of the store ``path`` from its records (run from the repository)."""
    return f'python benchmarks/transfer.py --report --out {repo_path(path)}'


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    store = Store(args.out)
    if not args.report:
        run_grid(args, store)
    records = list(store.latest().values())
    print(report(records, args.out.with_suffix(''), report_command(args.out)))
    if not args.report:  # the runs asked for, one line each (the demo's output)
        asked = {key_of(r) for r in grid(args)}
        for r in records:
            if r['key'] in asked:
                name = r['model'] if r['variant'] == 'plain' else f'ptl_{r["model"]} ({r["variant"]})'
                print(f'{r["task"]} {r["shots"]}/class seed {r["seed"]}: {name:45s} '
                      f'test {r.get("test_acc", float("nan")):.2f} %  val {r.get("val_acc", float("nan")):.2f} %')


if __name__ == '__main__':
    main()
