"""Many-identity re-identification on emoji artwork: where PTL's premise can hold.

Identity = emoji (skin tones merged), camera = vendor (Apple, Google, Twitter, Facebook; real artwork from
npm, ``ptl_timm.data.offline.load_emoji_reid``). Half the identities are the test set, never used for a decision;
a fifth of the other half is the validation set every design choice is made on; the rest (750 identities,
5,980 images) trains. Batches of P=16 identities x K=4 images see about 2 % of the training identities,
the regime of the PTL paper (Market-1501: 0.5 %) and of the cross-batch methods that work.

Recipe (``ptl_timm.reid.train_reid``, the package's one ReID training loop, as ``ptl-timm train-reid``): BNNeck
models over ImageNet MobileNetV2 (offline weights), 64 px, batch-hard
triplet (margin 0.3) + cross-entropy with label smoothing 0.1, random flip + random erasing, AdamW with a
one-cycle schedule; every variant of a seed sees the same batches, augmentations and initial backbone.
Scoring: query = one vendor, gallery = the other three (cross-camera), cosine distance; mAP, rank-1 and
mINP averaged over the four query vendors (per vendor in each record).

Variants (``--variants``), see ``VARIANTS``:
  imagenet   ImageNet features, no training
  plain      reid_mobilenetv2_100
  control    reid_ptl_mobilenetv2_100 with cells_removed=True: zero cell maps (same head, init, optimiser)
  shared / carried / reset   reid_ptl_mobilenetv2_100 with that state_mode
  xbm        plain + a cross-batch memory of past embeddings in the triplet term (pytorch-metric-learning's
             CrossBatchMemory, XBM, Wang et al. 2020), switched on after the first epoch
  idmem      plain + the identity memory in the loss (one centroid per identity, ptl_timm.reid.IdentityMemory);
             shared_idmem, control_idmem, shared_xbm, control_xbm: the memories with the cells or the control
Every PTL run is also scored with its state zeroed (the reference code's evaluation) and with the cells'
removed (what the cells contribute at inference). The variants under study (``shared_xbm``, ``shared_idmem``, ...)
are chosen on validation: the report shows only their validation scores. ``ema`` (a running average of the shared
state) and ``camstate`` (a state slot per camera) patched private methods of ptl_timm and were rejected on
validation: they no longer run, and the report keeps their recorded rows.

Runs append to a results store of the benchmark core (``benchmarks/common.py``),
``benchmarks/results/emoji_reid.jsonl``, as they finish (a rerun skips finished runs; shards let several processes
share the grid); ``--report`` writes emoji_reid.md / .png from its records alone; ``--quick`` writes to the
git-ignored benchmarks/results/quick/::

    npm install --prefix ~/.cache/ptl_timm/npm emoji-datasource-{apple,google,twitter,facebook}@16.0.0
    python benchmarks/emoji_reid.py --schedules short,long --seeds 5 --shard 0/2 &   # two processes,
    python benchmarks/emoji_reid.py --schedules short,long --seeds 5 --shard 1/2 &   # one thread each
    python benchmarks/emoji_reid.py --report
    python benchmarks/emoji_reid.py --quick       # one seed, tiny schedule: a smoke test

The same runs on another machine (another ``--out``) are compared run by run with
``--report --out OTHER.jsonl --reference benchmarks/results/emoji_reid.jsonl``.
"""
import argparse
import dataclasses
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: a frozen copy may win
from common import (  # noqa: E402
    Store,
    bar_plot,
    fmt_ci,
    fmt_mean_std,
    repo_path,
    results_path,
    run_key,
    shard,
    stamp,
    store_file,
    t_ci95,
    write_report,
)

SCHEDULES = {'short': 4, 'long': 12}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of training the ReID model, through ``ptl_timm.reid.train_reid`` (the package's recipe).

    ``memory``: ``'xbm'`` adds XBM's triplet term against a FIFO memory of past embeddings (``XBMemory``);
    ``'identity'`` adds a per-identity memory of embedding centroids and a contrastive loss against all of them
    (``IdentityMemory``), both from ``ptl_timm.reid.memory``. ``cells_removed``: the control, the PTL model's
    ``cells_removed=True`` (same parameters and initialisation, zero cell maps).
    """
    arch: str
    train: bool = True
    cells_removed: bool = False  # the control
    memory: Optional[str] = None
    xbm_memory: Optional[int] = None  # None: --xbm-memory
    model_kwargs: Tuple[Tuple[str, Any], ...] = ()

    @property
    def ptl(self) -> bool:
        return '_ptl_' in self.arch


PLAIN, PTL = 'reid_mobilenetv2_100', 'reid_ptl_mobilenetv2_100'
SHARED = (('state_mode', 'shared'),)
VARIANTS: Dict[str, Variant] = {
    'imagenet': Variant(PLAIN, train=False),
    'plain': Variant(PLAIN),
    'control': Variant(PTL, cells_removed=True),
    'shared': Variant(PTL, model_kwargs=SHARED),
    'carried': Variant(PTL, model_kwargs=(('state_mode', 'carried'),)),
    'reset': Variant(PTL, model_kwargs=(('state_mode', 'reset'),)),
    'xbm': Variant(PLAIN, memory='xbm'),
    'xbm_4096': Variant(PLAIN, memory='xbm', xbm_memory=4096),  # the peer's own setting, chosen on validation
    # memories in the loss, with and without the cells (chosen on validation)
    'shared_xbm': Variant(PTL, model_kwargs=SHARED, memory='xbm'),
    'control_xbm': Variant(PTL, cells_removed=True, memory='xbm'),
    'shared_idmem': Variant(PTL, model_kwargs=SHARED, memory='identity'),
    'control_idmem': Variant(PTL, cells_removed=True, memory='identity'),
    'idmem': Variant(PLAIN, memory='identity'),
}
# variants validation rejected, no longer runnable (they patched private methods of ptl_timm: 'ema' a running
# average of the shared state, 'camstate' a state slot per camera); the report keeps their recorded rows
RETIRED = ('ema', 'camstate')
# the paired differences the report shows, where both sides ran
COMPARISONS = (
    ('control', 'plain'), ('shared', 'control'), ('carried', 'control'), ('reset', 'control'), ('shared', 'reset'),
    ('carried', 'reset'), ('xbm', 'plain'), ('shared', 'xbm'), ('carried', 'xbm'), ('reset', 'xbm'),
    ('ema', 'shared'), ('ema', 'control'), ('camstate', 'shared'), ('camstate', 'control'),
    ('shared_xbm', 'control_xbm'), ('shared_xbm', 'xbm'),
    ('shared_xbm', 'shared'), ('control_xbm', 'control'), ('shared_idmem', 'control_idmem'), ('shared_idmem', 'shared'),
    ('control_idmem', 'control'), ('idmem', 'plain'), ('shared_idmem', 'idmem'),
    ('shared_idmem', 'xbm'), ('shared_idmem', 'plain'), ('shared_idmem', 'control'),
)
MAIN_VARIANTS = ('imagenet', 'plain', 'control', 'shared', 'carried', 'reset', 'xbm')
# the package's default recipe (ptl-timm train-reid: identity memory, shared state), chosen on validation, and the
# variants of its pre-registered test comparisons (against plain, the control, XBM, the same memory without cells)
DEFAULT = 'shared_idmem'
TEST_VARIANTS = MAIN_VARIANTS + ('idmem', 'control_idmem', DEFAULT)
# issue 24's target for the default recipe on test: (other side, least mean mAP gain, interval above zero)
TARGET = (('xbm', 1.0, True), ('control', 2.0, False), ('control_idmem', None, True), ('idmem', None, False),
          ('plain', None, False))


# --- data, training and scoring: the package's ReID recipe ----------------------------------------------------
def load_splits(args: argparse.Namespace) -> Dict[str, Any]:
    """'train' (identities 0..N-1), 'val' and 'test' image tables of the fixed identity split."""
    from ptl_timm.data import offline as data
    from ptl_timm.data.tables import emoji_tables

    return emoji_tables(data.load_emoji_reid(root=args.root), (args.img_size, args.img_size), args.split_seed,
                        args.max_identities)


def recipe(variant: Variant, args: argparse.Namespace, seed: int, epochs: int) -> Any:
    """The package's recipe config of ``variant``: the benchmark's settings, memory and model."""
    from ptl_timm.offline.weights import offline_weights_file
    from ptl_timm.reid import ReIDTrainConfig

    path = offline_weights_file('mobilenetv2_100')  # before seeding: a cold cache must not move the RNG
    kwargs = dict(variant.model_kwargs)
    if kwargs.get('state_mode') == 'carried' and 'state_slots' not in kwargs:
        kwargs['state_slots'] = args.p * args.k  # one slot per batch position, as in the paper
    if variant.cells_removed:
        kwargs['cells_removed'] = True
    return ReIDTrainConfig(
        model=variant.arch, model_kwargs=kwargs, pretrained_file=str(path), img_size=(args.img_size, args.img_size),
        epochs=epochs, p=args.p, k=args.k, lr=args.lr, weight_decay=args.weight_decay, margin=args.margin,
        memories=(variant.memory,) if variant.memory else (), xbm_size=variant.xbm_memory or args.xbm_memory,
        seed=seed, progress=False)


def _score(model: nn.Module, cfg: Any, data: Any, table: Any) -> Dict[str, Any]:
    """Query = each vendor in turn, gallery = the other vendors; metrics in %, and their mean over vendors."""
    from ptl_timm.reid import evaluate_data

    out = evaluate_data(model, data, cfg, query=table)
    out['per_vendor'] = out.pop('per_camera')
    return out


def run_variant(variant: Variant, splits: Dict[str, Any], args: argparse.Namespace, seed: int, epochs: int
                ) -> Dict[str, Any]:
    """Train (unless ``imagenet``) and score on val and test; PTL models also with the state zeroed and with the
    cells removed (what they contribute at inference)."""
    from ptl_timm.reid import ReIDData, create_model, train_reid

    cfg = recipe(variant, args, seed, epochs)
    data = ReIDData(splits['train'], splits['val'])
    fit: Dict[str, Any] = {}
    if variant.train:
        result = train_reid(cfg, data)
        model = result['model']
        fit = dict(train_s=result['train_s'], steps=result['steps'], final_loss=result['final_loss'])
    else:
        model = create_model(cfg, data.num_classes)
    out = {name: _score(model, cfg, data, splits[name]) for name in ('val', 'test')}
    if variant.ptl and not variant.cells_removed:
        from ptl_timm import bconv_cells

        cells = list(bconv_cells(model))
        saved = [c.state.clone() for c in cells]
        for c in cells:
            c.reset_state()
        for name in ('val', 'test'):
            out[f'{name}_state_zeroed'] = _score(model, cfg, data, splits[name])
        for c, s in zip(cells, saved):
            c.state.copy_(s)
        model.backbone.cells_removed = True
        for name in ('val', 'test'):
            out[f'{name}_cells_off'] = _score(model, cfg, data, splits[name])
        model.backbone.cells_removed = False
    return dict(fit, **out)


# --- runs and records ------------------------------------------------------------------------------------
def settings(args: argparse.Namespace, schedule: str) -> Dict[str, Any]:
    keys = ('img_size', 'p', 'k', 'lr', 'weight_decay', 'margin', 'xbm_memory', 'split_seed', 'max_identities')
    return dict({k: getattr(args, k) for k in keys}, epochs=args.quick_epochs if args.quick else SCHEDULES[schedule])


def key_of(schedule: str, variant: str, seed: int, sett: Dict[str, Any]) -> str:
    """The run's key in the results store: the fields that define it."""
    return run_key(dict(schedule=schedule, variant=variant, seed=seed, settings=sett))


def planned(args: argparse.Namespace) -> Iterator[Tuple[str, str, int]]:
    for schedule in args.schedules:
        for seed in args.seeds:
            for variant in args.variants:
                if variant == 'imagenet' and (schedule, seed) != (args.schedules[0], args.seeds[0]):
                    continue  # no training, no randomness: one record serves every schedule and seed
                yield schedule, variant, seed


def run_grid(args: argparse.Namespace, store: Store) -> None:
    splits = load_splits(args)
    todo = shard(planned(args), args.shard)
    num_classes = int(splits['train'].pids.max()) + 1
    print(f'train {num_classes} identities / {len(splits["train"].pids)} images, val '
          f'{len(np.unique(splits["val"].pids))} / {len(splits["val"].pids)}, test '
          f'{len(np.unique(splits["test"].pids))} / {len(splits["test"].pids)}; shard {args.shard or "0/1"}: '
          f'{len(todo)} runs', flush=True)
    stamped = stamp()
    for schedule, name, seed in _progress(todo):
        sett = settings(args, schedule)
        key = key_of(schedule, name, seed, sett)
        if key in store.done():  # finished before this process started, or since by another one on the same store
            continue
        rec = store.append(dict(key=key, schedule=schedule, variant=name, seed=seed, settings=sett,
                                **run_variant(VARIANTS[name], splits, args, seed, sett['epochs'])), stamped)
        print(f'{schedule} {name} seed {seed}: test mAP {rec["test"]["mAP"]:.2f} rank-1 {rec["test"]["rank1"]:.2f} '
              f'| val mAP {rec["val"]["mAP"]:.2f} | {rec.get("train_s", 0):.0f} s', flush=True)


def _progress(items: Sequence[Any]) -> Iterator[Any]:
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is in the bench extra; the grid runs without it
        return iter(items)
    return iter(tqdm(items, desc='runs', file=sys.stdout, mininterval=30))


# --- report ------------------------------------------------------------------------------------------------
def _ci(values: Sequence[float]) -> str:
    """The core's interval string; a single seed shows its value alone (this report's style)."""
    return fmt_ci(values) if len(values) > 1 else f'{values[0]:+.2f}'


def _mean(values: Sequence[float]) -> str:
    return fmt_mean_std(values).replace('+-', '±') if len(values) > 1 else f'{values[0]:.2f}'


Runs = Dict[Tuple[str, str, int], Dict[str, Any]]


def by_run(records: List[Dict[str, Any]]) -> Runs:
    """(schedule, variant, seed) -> its record among the schedule's most common settings (runs with other
    settings, e.g. a trial learning rate, never mix into the tables); imagenet counts under every schedule."""
    trained = [r for r in records if r['variant'] != 'imagenet']
    schedules = sorted({r['schedule'] for r in trained})
    main = {s: Counter(run_key(r['settings']) for r in trained if r['schedule'] == s).most_common(1)[0][0]
            for s in schedules}
    out = {}
    for r in records:
        if r['variant'] == 'imagenet':
            for schedule in schedules:
                out[(schedule, 'imagenet', r['seed'])] = r
        elif run_key(r['settings']) == main[r['schedule']]:
            out[(r['schedule'], r['variant'], r['seed'])] = r
    return out


def machine_section(by: Runs, reference: Runs, name: str) -> List[str]:
    """Markdown: the same runs (same key) as recorded in another results store, paired: how far another machine
    moves each run's mAP. Empty where the stores share no run."""
    def cpu(r: Dict[str, Any]) -> str:
        env = r.get('env', {})
        return f'{env.get("cpu")} ({env.get("torch_cpu_capability") or "kernels not recorded"})'

    shared = sorted(k for k in by if k in reference and k[1] != 'imagenet' and by[k]['key'] == reference[k]['key'])
    if not shared:
        return []
    lines = [f'### The same runs in `{name}` (another machine or core)', '',
             'mAP here minus mAP there, run by run (same seed, batches and settings); the CPUs: here ' +
             ', '.join(sorted({cpu(by[k]) for k in shared})) + '; there ' +
             ', '.join(sorted({cpu(reference[k]) for k in shared})) + '.', '',
             '| schedule | variant | part | seeds | per seed | mean [95 % CI] |', '|---|---|---|---|---|---|']
    for schedule, variant in sorted({k[:2] for k in shared}):
        seeds = [k[2] for k in shared if k[:2] == (schedule, variant)]
        for part in ('val', 'test') if variant in MAIN_VARIANTS else ('val',):
            d = [by[(schedule, variant, sd)][part]['mAP'] - reference[(schedule, variant, sd)][part]['mAP']
                 for sd in seeds]
            lines.append(f'| {schedule} | {variant} | {part} | {len(seeds)} | ' +
                         ', '.join(f'{x:+.2f}' for x in d) + f' | {_ci(d)} |')
    return lines + ['']


def part_section(recs: Dict[str, Dict[int, Dict[str, Any]]], variants: List[str], part: str) -> List[str]:
    """Markdown: the scores of ``part`` (val or test) and the paired differences of COMPARISONS. Variants under
    study are chosen on validation: their test scores stay out of the report, but for the pre-registered comparisons
    of the default recipe chosen that way (TEST_VARIANTS)."""
    shown = [v for v in variants if recs[v] and (part == 'val' or v in TEST_VARIANTS)]
    lines = [f'### {part}', '', '| variant | mAP | rank-1 | mINP | train s |', '|---|---|---|---|---|']
    for v in shown:
        rs = list(recs[v].values())
        secs = [r['train_s'] for r in rs if 'train_s' in r]
        lines.append(f'| {v} | ' + ' | '.join(_mean([r[part][m] for r in rs]) for m in ('mAP', 'rank1', 'mINP')) +
                     (f' | {np.median(secs):.0f} |' if secs else ' | - |'))
    lines.append('')
    pairs = [(a, b, sorted(set(recs[a]) & set(recs[b]))) for a, b in COMPARISONS if a in shown and b in shown]
    pairs = [(a, b, seeds) for a, b, seeds in pairs if seeds]
    if pairs:
        lines += ['| paired difference (mAP) | seeds | mean [95 % CI] | rank-1 |', '|---|---|---|---|']
        for a, b, seeds in pairs:
            d = {m: [recs[a][sd][part][m] - recs[b][sd][part][m] for sd in seeds] for m in ('mAP', 'rank1')}
            lines.append(f'| {a} - {b} | {len(seeds)} | {_ci(d["mAP"])} | {_ci(d["rank1"])} |')
        lines.append('')
    return lines


def target_section(recs: Dict[str, Dict[int, Dict[str, Any]]]) -> List[str]:
    """Markdown: the default recipe's pre-registered test comparisons against the target, where all ran."""
    if not recs.get(DEFAULT) or not all(recs.get(b) for b, _, _ in TARGET):
        return []
    lines = [f'### The default recipe (`{DEFAULT}`, chosen on validation): pre-registered test comparisons', '',
             '| comparison | seeds | test mAP, mean [95 % CI] | target | reached |', '|---|---|---|---|---|']
    for other, least, above in TARGET:
        seeds = sorted(set(recs[DEFAULT]) & set(recs[other]))
        d = [recs[DEFAULT][sd]['test']['mAP'] - recs[other][sd]['test']['mAP'] for sd in seeds]
        mean, lo, _ = t_ci95(d)
        wanted = [w for w in (f'>= {least:+.1f}' if least is not None else '', 'interval above 0' if above else '')
                  if w]
        ok = (least is None or mean >= least) and (not above or lo > 0)
        lines.append(f'| {DEFAULT} - {other} | {len(seeds)} | {_ci(d)} | {", ".join(wanted) or "-"} | '
                     f'{("yes" if ok else "no") if wanted else "-"} |')
    return lines + ['']


def probe_section(recs: Dict[str, Dict[int, Dict[str, Any]]], variants: List[str]) -> List[str]:
    """Markdown: the PTL models scored again with the state zeroed and with the cells removed."""
    probe = [v for v in variants if recs[v] and 'test_state_zeroed' in next(iter(recs[v].values()))]
    if not probe:
        return []
    lines = ['### What the state and the cells contribute at inference (mAP; the same trained models)', '',
             'Evaluated again with the latent state zeroed (the reference code\'s evaluation) and with the '
             'cells\' output zeroed; changes against the model as trained, paired, 95 % CI.', '',
             '| variant | part | as trained | state zeroed | cells\' output zeroed |', '|---|---|---|---|---|']
    for v in probe:
        rs = list(recs[v].values())
        for part in ('val', 'test') if v in MAIN_VARIANTS else ('val',):
            lines.append(f'| {v} | {part} | {_mean([r[part]["mAP"] for r in rs])} | '
                         f'{_ci([r[f"{part}_state_zeroed"]["mAP"] - r[part]["mAP"] for r in rs])} | '
                         f'{_ci([r[f"{part}_cells_off"]["mAP"] - r[part]["mAP"] for r in rs])} |')
    return lines + ['']


def paired_mAP(recs: Dict[str, Dict[int, Dict[str, Any]]], a: str, b: str) -> Dict[str, List[float]]:
    """{part: per-seed mAP differences a - b}; test only where the report shows both variants' test scores."""
    parts = ('val', 'test') if a in TEST_VARIANTS and b in TEST_VARIANTS else ('val',)
    return {part: [recs[a][sd][part]['mAP'] - recs[b][sd][part]['mAP'] for sd in recs[a] if sd in recs[b]]
            for part in parts}


def report(records: List[Dict[str, Any]], stem: Path, command: str, reference: Optional[Path] = None) -> str:
    """Markdown tables per schedule (test, val, the default recipe's target, the probes) and a plot of the paired
    differences, from the records alone; with ``reference`` the runs both stores hold, paired."""
    by = by_run(records)
    schedules = [s for s in SCHEDULES if any(k[0] == s for k in by)] or sorted({k[0] for k in by})
    order = list(VARIANTS)
    order[order.index('xbm_4096') + 1:order.index('xbm_4096') + 1] = RETIRED  # where they stood when they ran
    variants = [v for v in order if any(k[1] == v for k in by)]
    lines = ['# Many-identity ReID on emoji (4 vendors = cameras)', '',
             f'Generated by `python benchmarks/emoji_reid.py --report` from `{stem.name}.jsonl`. Query = one vendor, '
             'gallery = the other three; metrics (%) are means over the four query vendors; mean ± std over seeds; '
             'paired differences over the same seeds with 95 % t-intervals.', '']
    plot_groups = []
    for schedule in schedules:
        recs = {v: {k[2]: r for k, r in by.items() if k[0] == schedule and k[1] == v} for v in variants}
        s = next(r for v in variants for r in recs[v].values() if r['variant'] != 'imagenet')['settings']
        lines += [f'## {schedule} schedule: {s["epochs"]} epochs', '',
                  f'{s["img_size"]} px, P={s["p"]} x K={s["k"]}, AdamW lr {s["lr"]:g} one-cycle, weight decay '
                  f'{s["weight_decay"]:g}, triplet margin {s["margin"]:g} + CE (label smoothing 0.1), XBM memory '
                  f'{s["xbm_memory"]}. Seeds per variant: ' +
                  ', '.join(f'{v} {len(recs[v])}' for v in variants if recs[v]) + '.', '']
        lines += part_section(recs, variants, 'test') + part_section(recs, variants, 'val')
        lines += target_section(recs) + probe_section(recs, variants)
        plot_groups += [(f'{schedule}\n{a} - {b}', paired_mAP(recs, a, b)) for a, b in COMPARISONS
                        if recs.get(a) and recs.get(b)]
    if reference:
        lines += machine_section(by, by_run(list(Store(reference).latest().values())), reference.name)
    text = write_report(stem.with_suffix('.md'), '\n'.join(lines), records, command)
    bar_plot(plot_groups, ['val', 'test'], stem.with_suffix('.png'), 'paired mAP difference (points, 95 % CI)',
             records, command)
    return text


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--schedules', default='short,long', help=f'comma list of {list(SCHEDULES)}')
    p.add_argument('--variants', default=','.join(MAIN_VARIANTS), help=f'comma list of {list(VARIANTS)}')
    p.add_argument('--seeds', default='5', help='a count N (seeds 0..N-1) or a comma list (one seed: "3,")')
    p.add_argument('--shard', metavar='I/N', help='run every N-th planned run starting at the I-th')
    p.add_argument('--img-size', type=int, default=64)
    p.add_argument('--p', type=int, default=16)
    p.add_argument('--k', type=int, default=4)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--weight-decay', type=float, default=5e-4)
    p.add_argument('--margin', type=float, default=0.3)
    p.add_argument('--xbm-memory', type=int, default=1024, help='embeddings in the XBM memory')
    p.add_argument('--split-seed', type=int, default=0, help='fixes the identity split (keep it for all runs)')
    p.add_argument('--root', type=Path, help='node_modules folder of the emoji packages (default: see load_emoji_reid)')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--out', type=store_file, help='results store, .jsonl (default benchmarks/results/emoji_reid.jsonl; '
                   'with --quick benchmarks/results/quick/emoji_reid.jsonl, git-ignored)')
    p.add_argument('--quick', action='store_true', help='one seed, 2 epochs, 40 identities per part: a smoke test')
    p.add_argument('--report', action='store_true', help='only rebuild the tables and plot from --out')
    p.add_argument('--reference', type=store_file, help='another results store: the report pairs the runs both hold '
                   '(how far another machine moves them)')
    args = p.parse_args(argv)
    args.schedules = args.schedules.split(',')
    args.variants = args.variants.split(',')
    for name, known in (('schedule', SCHEDULES), ('variant', VARIANTS)):
        bad = [x for x in getattr(args, f'{name}s') if x not in known]
        if bad:
            p.error(f'unknown {name}(s) {bad}; choose from {list(known)}')
    if args.reference and not args.reference.is_file():
        p.error(f'--reference {args.reference}: no such results file (a .jsonl this script wrote)')
    if args.seeds.isdigit() and int(args.seeds) < 1:
        p.error(f'--seeds {args.seeds} is a count of seeds and runs nothing; for seed 0 alone write a list: --seeds 0,')
    args.seeds = list(range(int(args.seeds))) if args.seeds.isdigit() else [int(s) for s in args.seeds.split(',') if s]
    args.out = args.out or results_path('emoji_reid.jsonl', quick=args.quick)
    args.max_identities = None
    args.quick_epochs = 2  # XBM switches on after the first epoch
    if args.quick:
        args.seeds, args.max_identities, args.schedules = args.seeds[:1], 40, args.schedules[:1]
    torch.set_num_threads(args.threads)
    store = Store(args.out)
    if not args.report:
        run_grid(args, store)
    records = list(store.latest().values())
    if records:
        command = f'python benchmarks/emoji_reid.py --report --out {repo_path(args.out)}' + (
            f' --reference {repo_path(args.reference)}' if args.reference else '')
        print(report(records, args.out.with_suffix(''), command, args.reference))


if __name__ == '__main__':
    main()
