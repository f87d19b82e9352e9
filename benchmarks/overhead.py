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
    python benchmarks/overhead.py --quick         # resnet18 / mobilenetv2 at 96 px, 3 repeats
    python benchmarks/overhead.py --img-size 128 --static-widths 0.0625,0.125,0.25   # params / FLOPs only
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: a frozen copy may win
from common import RESULTS_DIR, environment, write_json  # noqa: E402

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


def train_step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        model.train()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def infer_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def infer() -> None:
        model.eval()
        with torch.inference_mode():
            model(x)
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
        outs = model._ladder(x, feats)
        t2 = time.perf_counter()
        model.forward_head(model._join(final, outs[-1]))
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


def report(data: Dict[str, Any], stem: Path) -> str:
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
    text = '\n'.join(lines) + '\n'
    stem.with_suffix('.md').write_text(text)
    _plot(data, stem.with_suffix('.png'))
    return text


def _plot(data: Dict[str, Any], path: Path) -> None:
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def static_costs(backbones: List[str], width_mults: List[float], img_size: int, path: Path) -> str:
    """Parameters and FLOPs of PTL / plain at several ``width_mult`` (no timing: exact, quick)."""
    rows, results = [], []
    for backbone in backbones:
        plain = make_model(dict(name=backbone))
        base_params, base_flops = sum(p.numel() for p in plain.parameters()), count_flops(plain, img_size)
        for mult in width_mults:
            ptl = make_model(dict(name=f'ptl_{backbone}', kwargs=dict(img_size=img_size, width_mult=mult)))
            params, flops = sum(p.numel() for p in ptl.parameters()), count_flops(ptl, img_size)
            results.append(dict(backbone=backbone, width_mult=mult, cell_widths=ptl.cell_widths, params=params,
                                flops=flops, plain_params=base_params, plain_flops=base_flops))
            rows.append(f'| {backbone} | {mult:g} | {"/".join(map(str, ptl.cell_widths))} | '
                        f'{params / base_params:.3f}x | {flops / base_flops:.3f}x |')
    write_json(path, dict(environment=environment(), config=dict(img_size=img_size), results=results))
    text = '\n'.join([
        f'### Parameters and FLOPs of PTL / plain by cell width ({img_size} px, FlopCounterMode, 1000 classes)', '',
        '| backbone | width_mult | cell widths | params | FLOPs |', '|---|---|---|---|---|', *rows]) + '\n'
    path.with_suffix('.md').write_text(text)
    return text


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--backbones', default=','.join(BACKBONES))
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--img-size', type=int, default=160)
    p.add_argument('--repeats', type=int, default=7)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--out', default=str(RESULTS_DIR / 'overhead.json'))
    p.add_argument('--quick', action='store_true', help='resnet18 and mobilenetv2 at 96 px, 3 repeats')
    p.add_argument('--report', action='store_true', help='only write the table and plot from the JSON')
    p.add_argument('--static-widths', help='only params and FLOPs at these width_mult values (comma list), '
                   'written to overhead_widths.json / .md')
    p.add_argument('--memory-child', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.static_widths:
        torch.set_num_threads(args.threads)
        print(static_costs(args.backbones.split(','), [float(w) for w in args.static_widths.split(',')],
                           args.img_size, Path(args.out).with_name('overhead_widths.json')))
        return
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child), args.batch, args.img_size, steps=3)))
        return
    if args.quick:
        args.backbones, args.img_size, args.repeats = 'resnet18,mobilenetv2_100', 96, 3
        args.out = str(Path(args.out).with_name('overhead_quick.json'))
    path = Path(args.out)
    if args.report:
        data = json.loads(path.read_text())
    else:
        from tqdm import tqdm

        torch.set_num_threads(args.threads)
        data = dict(environment=environment(), results=[],
                    config=dict(batch=args.batch, img_size=args.img_size, repeats=args.repeats))
        for backbone in tqdm(args.backbones.split(','), unit='backbone'):
            data['results'].append(bench_backbone(backbone, args))
            write_json(path, data)
    print(report(data, path.with_suffix('')))


if __name__ == '__main__':
    main()
