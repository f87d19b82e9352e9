"""Cost of PTL against the plain backbone: training step, inference, parameters, FLOPs, peak memory (CPU).

For each backbone three models run in one process, interleaved repeat by repeat (so a change of machine load
hits all of them alike), and the median over repeats is kept:

- ``plain``: ``timm.create_model(backbone, num_classes=1000)``;
- ``ptl``: ``ptl_<backbone>`` at the package's default cell widths;
- ``ptl_ref``: ``ptl_<backbone>`` at the reference topology's widths (docs/method.md: ResNet-50 cells
  16 / 64 / 256 / 512 / 128 at reductions 2 / 4 / 8 / 16 / 32, i.e. 1/4, 1/4, 1/2, 1/2, 1/16 of the stage
  widths; other backbones get the same fractions of their own stage widths).

Training step = forward + cross-entropy + backward + AdamW step. Inference = eval-mode forward under
``torch.inference_mode``. FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` on one forward (counts
matmul / conv ops, 1 multiply-add = 2 FLOPs). Peak memory: in a fresh subprocess per model, the rise of the
peak resident set size (Linux VmHWM, reset through /proc/self/clear_refs once the model is built) over the
resident size of the built model while running 3 training steps; it counts every allocation of the process
(activations, gradients, optimiser state), not the weights themselves.
The ``where`` column splits one PTL inference forward into backbone (``forward_intermediates``), the ladder
(cells + fuses) and the head, to show which part costs.

    python benchmarks/overhead.py                 # all five backbones, batch 8 at 160 px, 1 thread
    python benchmarks/overhead.py --quick         # resnet18 / mobilenetv2 at 96 px, 3 repeats, under results/quick/
    python benchmarks/overhead.py --img-size 128 --static-widths 0.0625,0.125,0.25   # params / FLOPs only
    python benchmarks/overhead.py --report        # overhead.md / .png from overhead.json (no measuring)

``--threads-sweep`` (issue 26) measures how the cost scales with threads: plain and PTL at default widths, batch 4
at 160 px, at 1 and 2 threads and at the machine's core count, eager and compiled (``torch.compile``, inductor),
written to ``overhead_threads.json`` / ``.md``. Each repeat times plain and PTL back to back (in alternating
order), so the ratio of one pair sees one machine load; the table gives the median of the pair ratios and their
range. Every finished (backbone, threads, mode) is saved at once and ``--resume`` skips it, so an interrupted run
continues where it stopped; compiled runs (minutes per model on 2 cores) stop being started once
``--compile-budget-s`` seconds went to them, and the table names what was left out. ``--profile`` writes where the
ladder's time goes by kind of op (torch.profiler, ``overhead_profile.json`` / ``.md``)::

    python benchmarks/overhead.py --threads-sweep            # five backbones; compiled until the budget is used
    python benchmarks/overhead.py --profile                  # ptl_resnet50, 2 threads, batch 4 at 160 px
    python benchmarks/overhead.py --threads-sweep --profile --quick  # eager, small: under benchmarks/results/quick/

Every file is stamped with the commit and core hash it was measured at, and its Markdown ends with them and the
``--report`` command that rewrites it from the JSON.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: a frozen copy may win
from common import RESULTS_DIR, file_stamp, provenance, repo_path, stamp_of, write_json, write_report  # noqa: E402

BACKBONES = ('resnet50', 'densenet161', 'mobilenetv2_100', 'tf_efficientnet_lite0', 'convnext_tiny')
# Reference MGN_PTL widths as fractions of the ResNet-50 stage widths, by reduction (docs/method.md).
REF_FRACTIONS = {2: 1 / 4, 4: 1 / 4, 8: 1 / 2, 16: 1 / 2, 32: 1 / 16}
TARGETS = dict(train=1.15, infer=1.10, params=1.10, memory=1.15)


def reference_widths(backbone: str) -> List[int]:
    """Cell widths of the reference topology, carried over to ``backbone`` by stage reduction, for the
    stages that get cells (the package may start the ladder at a later stage than the image)."""
    import timm
    from timm.layers import make_divisible

    import ptl_timm  # noqa: F401

    info = timm.create_model(backbone, pretrained=False, num_classes=0).feature_info
    widths = [make_divisible(i['num_chs'] * REF_FRACTIONS[i['reduction']], 8) for i in info]
    num_cells = len(timm.create_model(f'ptl_{backbone}', pretrained=False, num_classes=0).cell_widths)
    return widths[len(widths) - num_cells:]


def make_model(spec: Dict[str, Any]) -> nn.Module:
    import timm

    import ptl_timm  # noqa: F401  (registers ptl_* models)

    torch.manual_seed(0)
    return timm.create_model(spec['name'], pretrained=False, num_classes=1000, **spec.get('kwargs', {}))


def specs_for(backbone: str, img_size: int) -> Dict[str, Dict[str, Any]]:
    ptl = dict(name=f'ptl_{backbone}', kwargs=dict(img_size=img_size))
    ref = dict(name=f'ptl_{backbone}', kwargs=dict(img_size=img_size, cell_widths=reference_widths(backbone)))
    return dict(plain=dict(name=backbone), ptl=ptl, ptl_ref=ref)


def train_step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  run: Optional[Callable] = None) -> Callable[[], None]:
    """One AdamW training step of ``model`` on (x, y), forwarding through ``run`` (a compiled ``model``) if given."""
    run = model if run is None else run
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        model.train()
        loss = F.cross_entropy(run(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def infer_fn(model: nn.Module, x: torch.Tensor, run: Optional[Callable] = None) -> Callable[[], None]:
    """One eval forward of ``model`` on ``x``, through ``run`` (a compiled ``model``) if given."""
    run = model if run is None else run

    def infer() -> None:
        model.eval()
        with torch.inference_mode():
            run(x)
    return infer


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def count_flops(model: nn.Module, img_size: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, img_size, img_size))
    return counter.get_total_flops()


@torch.inference_mode()
def ptl_breakdown(model: nn.Module, x: torch.Tensor, repeats: int) -> Dict[str, float]:
    """Median seconds of the backbone, the ladder and the head within one PTL inference forward."""
    model.eval()
    parts: Dict[str, List[float]] = dict(backbone=[], backbone_plain_forward=[], ladder=[], head=[])
    for _ in range(repeats):
        parts['backbone_plain_forward'].append(timed(lambda: model.backbone.forward_features(x)))
        t0 = time.perf_counter()
        final, feats = model.backbone.forward_intermediates(x)
        t1 = time.perf_counter()
        features = model.forward_cells(x, final, feats)
        t2 = time.perf_counter()
        model.forward_head(features)
        t3 = time.perf_counter()
        parts['backbone'].append(t1 - t0)
        parts['ladder'].append(t2 - t1)
        parts['head'].append(t3 - t2)
    return {k: statistics.median(v) for k, v in parts.items()}


def _status_kib(field: str) -> int:
    line = next(line for line in Path('/proc/self/status').read_text().splitlines() if line.startswith(field + ':'))
    return int(line.split()[1])


def memory_child(spec: Dict[str, Any], batch: int, img_size: int, steps: int) -> Dict[str, float]:
    """Run in a fresh process: peak RSS rise (MiB) over the built model while running training steps.

    Linux only: writing 5 to /proc/self/clear_refs resets the peak RSS (VmHWM), so the peak of importing torch
    and building the model does not hide the training peak.
    """
    torch.set_num_threads(1)
    model = make_model(spec)
    x, y = torch.randn(batch, 3, img_size, img_size), torch.randint(0, 1000, (batch,))
    step = train_step_fn(model, x, y)
    base = _status_kib('VmRSS')
    Path('/proc/self/clear_refs').write_text('5')
    for _ in range(steps):
        step()
    peak = _status_kib('VmHWM')
    return dict(model_rss_mib=base / 1024, peak_rss_mib=peak / 1024, train_peak_rise_mib=(peak - base) / 1024)


def measure_memory(spec: Dict[str, Any], args: argparse.Namespace) -> Dict[str, float]:
    cmd = [sys.executable, __file__, '--memory-child', json.dumps(spec), '--batch', str(args.batch),
           '--img-size', str(args.img_size)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_backbone(backbone: str, args: argparse.Namespace) -> Dict[str, Any]:
    specs = specs_for(backbone, args.img_size)
    models = {k: make_model(s) for k, s in specs.items()}
    x, y = torch.randn(args.batch, 3, args.img_size, args.img_size), torch.randint(0, 1000, (args.batch,))
    train = {k: train_step_fn(m, x, y) for k, m in models.items()}
    infer = {k: infer_fn(m, x) for k, m in models.items()}
    for k in models:  # warm-up: allocator, lazy init, first-touch of optimiser state
        train[k]()
        infer[k]()
    times: Dict[str, Dict[str, List[float]]] = {k: dict(train=[], infer=[]) for k in models}
    for _ in range(args.repeats):
        for k in models:
            times[k]['train'].append(timed(train[k]))
            times[k]['infer'].append(timed(infer[k]))
    out: Dict[str, Any] = dict(backbone=backbone, models={})
    for k, m in models.items():
        out['models'][k] = dict(
            spec=specs[k],
            cell_widths=getattr(m, 'cell_widths', None),
            params=sum(p.numel() for p in m.parameters()),
            flops=count_flops(m, args.img_size),
            train_step_s=statistics.median(times[k]['train']),
            infer_img_per_s=args.batch / statistics.median(times[k]['infer']),
            train_times=times[k]['train'], infer_times=times[k]['infer'],
            memory=measure_memory(specs[k], args),
        )
    out['ptl_breakdown_s'] = ptl_breakdown(models['ptl'], x, args.repeats)
    return out


def ratios(entry: Dict[str, Any], key: str) -> Dict[str, float]:
    p, q = entry['models']['plain'], entry['models'][key]
    return dict(
        train=q['train_step_s'] / p['train_step_s'],
        infer=p['infer_img_per_s'] / q['infer_img_per_s'],  # time ratio, >1 = slower
        params=q['params'] / p['params'],
        flops=q['flops'] / p['flops'],
        memory=q['memory']['train_peak_rise_mib'] / p['memory']['train_peak_rise_mib'],
    )


def report(data: Dict[str, Any], stem: Path, command: str) -> str:
    cfg = data['config']
    lines = [
        '### Cost of PTL vs the plain backbone (CPU)', '',
        f'Batch {cfg["batch"]} at {cfg["img_size"]} px, {data["environment"].get("torch_threads")} thread(s), '
        f'median of {cfg["repeats"]} interleaved repeats; {data["environment"].get("cpu")}, '
        f'torch {data["environment"].get("torch")}. Ratios are PTL / plain (time ratios: >1 is slower). '
        f'Targets at default widths: train <= {TARGETS["train"]}x, inference <= {TARGETS["infer"]}x, '
        f'params <= {TARGETS["params"]}x, memory <= {TARGETS["memory"]}x.', '',
        '| backbone | widths | cell widths | train step | inference | params | FLOPs | peak memory | '
        'plain train s | plain img/s | plain params (M) | plain GFLOPs | plain train peak rise (MiB) |',
        '|---|---|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for entry in data['results']:
        p = entry['models']['plain']
        for key, label in (('ptl', 'default'), ('ptl_ref', 'reference')):
            r = ratios(entry, key)

            def mark(name: str, r: Dict[str, float] = r, label: str = label) -> str:
                miss = label == 'default' and name in TARGETS and r[name] > TARGETS[name]
                return f'{r[name]:.3f}x' + (' (miss)' if miss else '')
            lines.append(
                f'| {entry["backbone"]} | {label} | {"/".join(map(str, entry["models"][key]["cell_widths"]))} | '
                f'{mark("train")} | {mark("infer")} | {mark("params")} | {r["flops"]:.3f}x | {mark("memory")} | '
                f'{p["train_step_s"]:.3f} | {p["infer_img_per_s"]:.1f} | {p["params"] / 1e6:.2f} | '
                f'{p["flops"] / 1e9:.2f} | {p["memory"]["train_peak_rise_mib"]:.0f} |')
    lines += ['', '#### Where a PTL inference forward spends its time (default widths, seconds, median)', '',
              '| backbone | plain forward_features | backbone forward_intermediates | ladder (cells + fuses) | head |',
              '|---|---|---|---|---|']
    for entry in data['results']:
        b = entry['ptl_breakdown_s']
        lines.append(f'| {entry["backbone"]} | {b["backbone_plain_forward"]:.4f} | {b["backbone"]:.4f} | '
                     f'{b["ladder"]:.4f} | {b["head"]:.4f} |')
    _plot(data, stem.with_suffix('.png'), provenance([stamp_of(data)], command))
    return write_report(stem.with_suffix('.md'), '\n'.join(lines), [stamp_of(data)], command)


def _plot(data: Dict[str, Any], path: Path, made: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = ('train', 'infer', 'params', 'flops', 'memory')
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, key in zip(axes, ('ptl', 'ptl_ref')):
        for j, entry in enumerate(data['results']):
            r = ratios(entry, key)
            ax.bar(np.arange(len(metrics)) + (j - 2) * 0.16, [r[m] for m in metrics], 0.16, label=entry['backbone'])
        ax.axhline(1, color='k', lw=0.8)
        ax.set_xticks(np.arange(len(metrics)), metrics)
        ax.set_title('default widths' if key == 'ptl' else 'reference widths')
    axes[0].set_ylabel('PTL / plain')
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={'Description': made})
    plt.close(fig)


def static_costs(backbones: List[str], width_mults: List[float], img_size: int) -> Dict[str, Any]:
    """Parameters and FLOPs of PTL / plain at several ``width_mult`` (no timing: exact, quick)."""
    results = []
    for backbone in backbones:
        plain = make_model(dict(name=backbone))
        base_params, base_flops = sum(p.numel() for p in plain.parameters()), count_flops(plain, img_size)
        for mult in width_mults:
            ptl = make_model(dict(name=f'ptl_{backbone}', kwargs=dict(img_size=img_size, width_mult=mult)))
            params, flops = sum(p.numel() for p in ptl.parameters()), count_flops(ptl, img_size)
            results.append(dict(backbone=backbone, width_mult=mult, cell_widths=ptl.cell_widths, params=params,
                                flops=flops, plain_params=base_params, plain_flops=base_flops))
    return dict(file_stamp(), config=dict(img_size=img_size), results=results)


def static_report(data: Dict[str, Any], stem: Path, command: str) -> str:
    rows = [f'| {r["backbone"]} | {r["width_mult"]:g} | {"/".join(map(str, r["cell_widths"]))} | '
            f'{r["params"] / r["plain_params"]:.3f}x | {r["flops"] / r["plain_flops"]:.3f}x |' for r in data['results']]
    text = '\n'.join([
        f'### Parameters and FLOPs of PTL / plain by cell width ({data["config"]["img_size"]} px, FlopCounterMode, '
        '1000 classes)', '', '| backbone | width_mult | cell widths | params | FLOPs |', '|---|---|---|---|---|',
        *rows])
    return write_report(stem.with_suffix('.md'), text, [stamp_of(data)], command)


# --- issue 26: scaling with threads, eager and compiled --------------------------------------------------------------
SWEEP_TARGETS = dict(train=1.12, infer=1.10)  # ptl_resnet50, 2 threads, eager (issue 26)


def thread_counts(spec: str) -> List[int]:
    """``'1,2,0'`` -> [1, 2, cores]: 0 stands for the machine's core count; repeats are dropped."""
    counts = [int(t) or (os.cpu_count() or 1) for t in spec.split(',')]
    return sorted(set(counts))


def _quantiles(values: List[float]) -> Dict[str, float]:
    v = sorted(values)
    q = statistics.quantiles(v, n=4, method='inclusive') if len(v) > 1 else [v[0]] * 3
    return dict(median=statistics.median(v), min=v[0], max=v[-1], q1=q[0], q3=q[2])


def interleaved_pairs(fns: Dict[str, Dict[str, Callable[[], None]]], pairs: int,
                      modes: Sequence[str]) -> Dict[str, Dict[str, List[float]]]:
    """Seconds of each call, plain and PTL back to back, the order alternating from one pair to the next."""
    times: Dict[str, Dict[str, List[float]]] = {k: {m: [] for m in modes} for k in fns}
    for r in range(pairs):
        for mode in modes:
            for k in (('plain', 'ptl') if r % 2 == 0 else ('ptl', 'plain')):
                times[k][mode].append(timed(fns[k][mode]))
    return times


def sweep_entry(backbone: str, threads: int, compiled: bool, args: argparse.Namespace) -> Dict[str, Any]:
    """One (backbone, threads, eager / compiled) measurement: per-pair time ratios PTL / plain."""
    torch.set_num_threads(threads)
    specs = specs_for(backbone, args.img_size)
    models = {k: make_model(specs[k]) for k in ('plain', 'ptl')}
    x, y = torch.randn(args.batch, 3, args.img_size, args.img_size), torch.randint(0, 1000, (args.batch,))
    if compiled:
        torch._dynamo.reset()  # each model and thread count compiles afresh (inductor bakes the thread count in)
    fns = {}
    for k, m in models.items():
        run = torch.compile(m, backend='inductor') if compiled else m
        fns[k] = dict(train=train_step_fn(m, x, y, run), infer=infer_fn(m, x, run))
    t0 = time.perf_counter()
    modes = args.compile_modes.split(',') if compiled else ['train', 'infer']
    for k in fns:  # warm-up: compilation, allocator, lazy init, optimiser state
        for _ in range(2):
            for mode in modes:
                fns[k][mode]()
    warmup_s = time.perf_counter() - t0
    times = interleaved_pairs(fns, args.pairs, modes)
    out: Dict[str, Any] = dict(backbone=backbone, threads=threads, compiled=compiled, modes=modes, warmup_s=warmup_s,
                               times=times)
    for mode in modes:
        out[mode] = _quantiles([q / p for p, q in zip(times['plain'][mode], times['ptl'][mode])])
        out[f'plain_{mode}_s'] = statistics.median(times['plain'][mode])
    return out


def static_ratios(backbone: str, img_size: int) -> Dict[str, Any]:
    """Parameter and FLOPs ratios PTL / plain: the floor a compute-bound CPU cannot beat."""
    specs = specs_for(backbone, img_size)
    out = {}
    for k in ('plain', 'ptl'):
        m = make_model(specs[k])
        out[k] = dict(params=sum(p.numel() for p in m.parameters()), flops=count_flops(m, img_size))
    return dict(params=out['ptl']['params'] / out['plain']['params'], flops=out['ptl']['flops'] / out['plain']['flops'],
                **{f'plain_{k}': v for k, v in out['plain'].items()})


def run_sweep(args: argparse.Namespace, path: Path) -> Dict[str, Any]:
    from tqdm import tqdm

    # what makes measurements comparable; which compiled runs to add is the plan of each invocation
    config = dict(batch=args.batch, img_size=args.img_size, pairs=args.pairs, threads=thread_counts(args.threads),
                  backbones=args.backbones.split(','))
    data: Dict[str, Any] = dict(file_stamp(), config=config, static={}, results={}, skipped=[])
    if args.resume and path.exists():
        old = json.loads(path.read_text())
        if all(old['config'].get(k) == v for k, v in config.items()):
            data.update(static=old['static'], results=old['results'])
        else:
            print(f'--resume: {path} has another configuration ({old["config"]}); starting afresh')
    plan = [(b, t, False) for b in config['backbones'] for t in config['threads']]
    plan += [(b, t, True) for b in config['backbones'] for t in thread_counts(args.compile_threads)
             if not args.no_compile]
    compile_modes = args.compile_modes.split(',')
    compiling_s = 0.0  # spent on compiled runs by this invocation
    for backbone, threads, compiled in tqdm(plan, unit='run'):
        key = f'{backbone}/{threads}/{"compiled" if compiled else "eager"}'
        if backbone not in data['static']:
            data['static'][backbone] = static_ratios(backbone, args.img_size)
        done = data['results'].get(key)
        if done and (not compiled or set(compile_modes) <= set(done.get('modes', ()))):
            continue
        if compiled and compiling_s > args.compile_budget_s:
            data['skipped'] = sorted({*data['skipped'], key})
            continue
        data['skipped'] = [k for k in data['skipped'] if k != key]
        t0 = time.perf_counter()
        # each measurement names the commit and core it ran at: --resume mixes invocations
        data['results'][key] = dict(sweep_entry(backbone, threads, compiled, args), commit=data['commit'],
                                    core=data['core'])
        compiling_s += (time.perf_counter() - t0) if compiled else 0.0
        write_json(path, data)
    data.update(file_stamp())
    write_json(path, data)
    return data


def _ratio_cell(q: Optional[Dict[str, float]], target: Optional[float] = None) -> str:
    if q is None:
        return '-'
    miss = ' (miss)' if target is not None and q['median'] > target else ''
    return f'{q["median"]:.3f}x ({q["min"]:.3f}-{q["max"]:.3f}){miss}'


def _seconds(value: Optional[float], digits: int) -> str:
    return '-' if value is None else f'{value:.{digits}f}'


def sweep_report(data: Dict[str, Any], stem: Path, command: str) -> str:
    cfg, env = data['config'], data['environment']
    lines = [
        '### Cost of PTL vs the plain backbone by threads, eager and compiled (CPU)', '',
        f'Batch {cfg["batch"]} at {cfg["img_size"]} px, default cell widths; {env.get("cpu")} '
        f'({env.get("cpu_count")} cores, torch kernels {env.get("torch_cpu_capability")}), torch {env.get("torch")}, '
        f'core `{env.get("ptl_core_hash")}`. Each of {cfg["pairs"]} pairs times plain and PTL back to back; '
        'a cell gives the median of the pairs\' time ratios PTL / plain and their range (min-max). Compiled: '
        '`torch.compile` (inductor) after warm-up (`-`: not measured). '
        'Params and FLOPs are the exact ratios, the floor of a compute-bound CPU. Targets (issue 26, resnet50, '
        '2 threads, eager): training step <= '
        f'{SWEEP_TARGETS["train"]}x, inference <= {SWEEP_TARGETS["infer"]}x.', '',
        '| backbone | threads | mode | train step | inference | plain train s | plain infer s | params | FLOPs |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    order = {b: i for i, b in enumerate(cfg['backbones'])}
    entries = sorted(data['results'].values(), key=lambda e: (order[e['backbone']], e['compiled'], e['threads']))
    for e in entries:
        st = data['static'][e['backbone']]
        graded = e['backbone'] == 'resnet50' and e['threads'] == 2 and not e['compiled']
        lines.append(
            f'| {e["backbone"]} | {e["threads"]} | {"compiled" if e["compiled"] else "eager"} | '
            f'{_ratio_cell(e.get("train"), SWEEP_TARGETS["train"] if graded else None)} | '
            f'{_ratio_cell(e.get("infer"), SWEEP_TARGETS["infer"] if graded else None)} | '
            f'{_seconds(e.get("plain_train_s"), 3)} | {_seconds(e.get("plain_infer_s"), 4)} | '
            f'{st["params"]:.3f}x | {st["flops"]:.3f}x |')
    if data['skipped']:
        lines += ['', 'Not measured (compile budget; rerun with `--resume` to add them): '
                  + ', '.join(f'`{k}`' for k in data['skipped']) + '.']
    # an entry measured before entries were stamped has the file's commit and core
    records = [{**stamp_of(data), **{k: e[k] for k in ('commit', 'core') if k in e}} for e in entries]
    return write_report(stem.with_suffix('.md'), '\n'.join(lines), records, command)


# --- issue 26: where the ladder's time goes, by kind of op ---------------------------------------------------------
OP_KINDS = ('convolution', 'gates and state mix (element-wise)', 'state read / write', 'resampling',
            'BN + ReLU', 'cat / split / copies', 'other ops', 'Python and dispatch')


def op_kind(name: str, in_state: bool) -> str:
    """The kind of a profiled op (aten name) inside the ladder; ops under the cells' state read and write count
    as such whatever they are."""
    n = name.lower()
    if in_state:
        return 'state read / write'
    if 'conv' in n:
        return 'convolution'
    if 'upsample' in n or 'interpolate' in n:
        return 'resampling'
    if 'batch_norm' in n or 'relu' in n or 'clamp_min' in n or 'threshold' in n:
        return 'BN + ReLU'
    if any(k in n for k in ('sigmoid', 'tanh', 'mul', 'neg', 'addcmul', 'aten::add', 'aten::sub', 'aten::div')):
        return 'gates and state mix (element-wise)'
    if any(k in n for k in ('cat', 'split', 'copy', 'clone', 'zero', 'fill', 'narrow', 'slice')):
        return 'cat / split / copies'
    return 'other ops'


# the cells' state reads and writes run as these custom ops (ptl_timm.layers.bconv_cell): the aten ops under them
# are the state's input and output
_STATE_OPS = 'ptl_timm::'


def _profile_kinds(fn: Callable[[], None], calls: int) -> Dict[str, float]:
    """Milliseconds of one call of ``fn`` by op kind (self CPU time of the ops; wall time not in any op: Python):
    of the fastest of ``calls`` profiled calls, the one least disturbed by other load on the machine."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    best = None
    for _ in range(calls):
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        wall_us = (time.perf_counter() - t0) * 1e6
        if best is None or wall_us < best[0]:
            best = (wall_us, prof)
    wall_us, prof = best
    kinds = dict.fromkeys(OP_KINDS, 0.0)
    for ev in prof.events():
        if ev.name.startswith('ProfilerStep') or not ev.name.startswith('aten::'):
            continue
        parent, in_state = ev.cpu_parent, False
        while parent is not None:
            in_state |= parent.name.startswith(_STATE_OPS)
            parent = parent.cpu_parent
        kinds[op_kind(ev.name, in_state)] += ev.self_cpu_time_total
    kinds['Python and dispatch'] = max(wall_us - sum(kinds.values()), 0.0)
    return {k: v / 1e3 for k, v in kinds.items()}


def profile_ladder(backbone: str, args: argparse.Namespace) -> Dict[str, Any]:
    """The ladder's time (cells, fuses and the join of one forward; forward and backward in training) by kind
    of op, against the plain backbone's forward and training step, at ``args.profile_threads``."""
    torch.set_num_threads(args.profile_threads)
    specs = specs_for(backbone, args.img_size)
    plain, ptl = make_model(specs['plain']), make_model(specs['ptl'])
    x, y = torch.randn(args.batch, 3, args.img_size, args.img_size), torch.randint(0, 1000, (args.batch,))
    plain_train, plain_infer = train_step_fn(plain, x, y), infer_fn(plain, x)
    ptl.eval()
    with torch.inference_mode():
        final, feats = ptl.backbone.forward_intermediates(x)

    def ladder_infer() -> None:
        with torch.inference_mode():
            ptl.forward_cells(x, final, feats)

    ptl.train()
    t_final, t_feats = ptl.backbone.forward_intermediates(x)
    t_final, t_feats = t_final.detach().requires_grad_(), [f.detach().requires_grad_() for f in t_feats]
    grad = torch.randn_like(ptl.forward_cells(x, t_final, t_feats))

    def ladder_train() -> None:
        ptl.forward_cells(x, t_final, t_feats).backward(grad)

    kinds = dict(infer=_profile_kinds(ladder_infer, args.profile_calls),
                 train=_profile_kinds(ladder_train, args.profile_calls))
    for fn in (plain_infer, plain_train):
        fn()
    base = dict(infer=min(timed(plain_infer) for _ in range(args.profile_calls)) * 1e3,
                train=min(timed(plain_train) for _ in range(args.profile_calls)) * 1e3)
    return dict(backbone=backbone, threads=args.profile_threads, batch=args.batch, img_size=args.img_size,
                calls=args.profile_calls, kinds=kinds, plain_ms=base,
                flops=static_ratios(backbone, args.img_size)['flops'])


def profile_report(data: Dict[str, Any], stem: Path, command: str) -> str:
    p, env = data['profile'], data['environment']
    lines = [
        f'### Where the ladder of ptl_{p["backbone"]} spends its time, by kind of op (torch.profiler)', '',
        f'Batch {p["batch"]} at {p["img_size"]} px, {p["threads"]} thread(s); {env.get("cpu")}, torch '
        f'{env.get("torch")}, core `{env.get("ptl_core_hash")}`. The ladder = the cells, the fuses and the join of '
        'the final features, run on the backbone\'s stage maps: inference = one eval forward; training = its '
        'forward and backward. Milliseconds of the fastest of several profiled calls (self time of the ops of '
        'each kind; Python and dispatch = the wall time outside every op) and as % of the plain backbone\'s '
        'fastest time for the same call (forward; training step with AdamW); the FLOPs ratio PTL / plain is '
        f'{p["flops"]:.3f}x.', '',
        '| kind | inference ms | % of plain forward | training ms | % of plain training step |',
        '|---|---|---|---|---|',
    ]
    for kind in [*OP_KINDS, 'total']:
        vals = {m: sum(p['kinds'][m].values()) if kind == 'total' else p['kinds'][m][kind] for m in ('infer', 'train')}
        name = f'**{kind}**' if kind == 'total' else kind
        lines.append(f'| {name} | {vals["infer"]:.2f} | {100 * vals["infer"] / p["plain_ms"]["infer"]:.1f} % | '
                     f'{vals["train"]:.2f} | {100 * vals["train"] / p["plain_ms"]["train"]:.1f} % |')
    lines += ['', f'Plain {p["backbone"]}: forward {p["plain_ms"]["infer"]:.1f} ms, training step '
              f'{p["plain_ms"]["train"]:.1f} ms (fastest of {p.get("calls", "several")}).']
    return write_report(stem.with_suffix('.md'), '\n'.join(lines), [stamp_of(data)], command)


def report_command(mode: str, args: argparse.Namespace) -> str:
    """The command that rewrites this invocation's report from its JSON (``mode``: its flags before ``--report``)."""
    out = Path(args.out)
    default = out.resolve() == (RESULTS_DIR / 'overhead.json').resolve()
    return ' '.join(['python benchmarks/overhead.py', *([mode] if mode else []), '--report',
                     *(['--quick'] if args.quick else []), *([] if default else [f'--out {repo_path(out)}'])])


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--backbones', default=','.join(BACKBONES))
    p.add_argument('--batch', type=int, help='default 8; 4 with --threads-sweep / --profile')
    p.add_argument('--img-size', type=int, default=160)
    p.add_argument('--repeats', type=int, default=7)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--out', default=str(RESULTS_DIR / 'overhead.json'))
    p.add_argument('--quick', action='store_true', help='resnet18 and mobilenetv2 at 96 px, 3 repeats')
    p.add_argument('--report', action='store_true', help='only rewrite the report (table, plot) from its JSON; with '
                   '--threads-sweep, --profile or --static-widths that one\'s')
    p.add_argument('--static-widths', help='only params and FLOPs at these width_mult values (comma list), '
                   'written to overhead_widths.json / .md')
    p.add_argument('--memory-child', help=argparse.SUPPRESS)
    p.add_argument('--threads-sweep', action='store_true',
                   help='PTL / plain at several thread counts, eager and compiled (overhead_threads.json / .md); '
                   'batch 4 at 160 px unless --batch / --img-size say otherwise')
    p.add_argument('--pairs', type=int, default=7, help='--threads-sweep: interleaved pairs per measurement')
    p.add_argument('--sweep-threads', dest='threads_list', default='1,2,0',
                   help='--threads-sweep: thread counts (0 = the core count)')
    p.add_argument('--compile-threads', default='2', help='--threads-sweep: thread counts of the compiled runs')
    p.add_argument('--compile-budget-s', type=float, default=150,
                   help='--threads-sweep: start no compiled measurement once this many seconds went to compiled ones')
    p.add_argument('--no-compile', action='store_true', help='--threads-sweep: eager only')
    p.add_argument('--compile-modes', default='infer', help="--threads-sweep: what the compiled runs measure, "
                   "'infer' or 'train,infer' (compiling a training step takes several minutes per model)")
    p.add_argument('--resume', action='store_true', help='--threads-sweep: keep the finished measurements of the '
                   'results file (same configuration) and measure the rest')
    p.add_argument('--profile', action='store_true', help='where the ladder spends its time, by kind of op '
                   '(overhead_profile.json / .md); batch 4 at 160 px unless --batch / --img-size say otherwise')
    p.add_argument('--profile-threads', type=int, default=2)
    p.add_argument('--profile-calls', type=int, default=15)
    args = p.parse_args(argv)
    if args.threads_sweep or args.profile:
        args.batch = args.batch or 4
        out_dir = Path(args.out).parent
        if args.quick:
            out_dir, args.batch, args.img_size, args.pairs, args.profile_calls = out_dir / 'quick', 2, 96, 3, 3
            args.no_compile = True  # compiling takes minutes per model on 2 cores
        if args.threads_sweep:
            if args.quick:
                args.backbones, args.threads_list, args.compile_threads = 'resnet18,mobilenetv2_100', '1,2', '1'
            args.threads = args.threads_list
            path = out_dir / 'overhead_threads.json'
            data = json.loads(path.read_text()) if args.report else run_sweep(args, path)
            print(sweep_report(data, path.with_suffix(''), report_command('--threads-sweep', args)))
        if args.profile:
            path = out_dir / 'overhead_profile.json'
            if args.report:
                data = json.loads(path.read_text())
            else:
                backbone = 'resnet18' if args.quick else 'resnet50'
                data = dict(file_stamp(), profile=profile_ladder(backbone, args))
                write_json(path, data)
            print(profile_report(data, path.with_suffix(''), report_command('--profile', args)))
        return
    args.batch = args.batch or 8
    if args.static_widths:
        torch.set_num_threads(args.threads)
        path = Path(args.out).with_name('overhead_widths.json')
        if args.report:
            data = json.loads(path.read_text())
        else:
            data = static_costs(args.backbones.split(','), [float(w) for w in args.static_widths.split(',')],
                                args.img_size)
            write_json(path, data)
        print(static_report(data, path.with_suffix(''), report_command(f'--static-widths {args.static_widths}', args)))
        return
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child), args.batch, args.img_size, steps=3)))
        return
    command = report_command('', args)
    if args.quick:
        args.backbones, args.img_size, args.repeats = 'resnet18,mobilenetv2_100', 96, 3
        args.out = str(Path(args.out).parent / 'quick' / 'overhead.json')
    path = Path(args.out)
    if args.report:
        data = json.loads(path.read_text())
    else:
        from tqdm import tqdm

        torch.set_num_threads(args.threads)
        data = dict(file_stamp(), results=[],
                    config=dict(batch=args.batch, img_size=args.img_size, repeats=args.repeats))
        for backbone in tqdm(args.backbones.split(','), unit='backbone'):
            data['results'].append(bench_backbone(backbone, args))
            write_json(path, data)
    print(report(data, path.with_suffix(''), command))


if __name__ == '__main__':
    main()
