"""The model table of the README: every ptl_* classification model against the plain timm model it wraps.

Counts parameters and FLOPs (torch.utils.flop_counter, one 224x224 image) of each ptl_* model and of
``timm.create_model(backbone)``, both with timm's 1000-class ImageNet head: "vs plain timm" is what PTL adds
(cells, fuses, the classifier's wider input), as ``ptl-timm info`` counts it. Writes
benchmarks/results/models.json (the rows, stamped with the environment, commit and core hash) and models.md::

    python benchmarks/model_table.py
    python benchmarks/model_table.py --report     # models.md from models.json
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import timm
import torch
from timm.models import get_arch_pretrained_cfgs
from torch.utils.flop_counter import FlopCounterMode

import ptl_timm  # noqa: F401  (registers the ptl_* models)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, stamp, write_json, write_report  # noqa: E402

COMMAND = 'python benchmarks/model_table.py --report'


def _flops(model: torch.nn.Module, size: int) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops()


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure(size: int) -> List[Dict[str, Any]]:
    rows = []
    for name in timm.list_models(module='ptlnet'):  # the registered ptl_* PTLNet models, naturally sorted
        ptl = timm.create_model(name).eval()
        plain = timm.create_model(ptl.backbone_name).eval()
        rows.append(dict(
            model=name, backbone=ptl.backbone_name, cell_widths=ptl.cell_widths,
            params=_params(ptl), backbone_params=_params(plain),
            gflops=_flops(ptl, size) / 1e9, backbone_gflops=_flops(plain, size) / 1e9,
            pretrained_tags=len(get_arch_pretrained_cfgs(name)),
        ))
        print(f'{name}: {rows[-1]["params"] / 1e6:.2f}M params', flush=True)
    return rows


def report(data: Dict[str, Any], path: Path) -> str:
    size = data['input']
    lines = [
        f'| model | backbone | cell widths | params (M) | vs plain timm | GFLOPs @{size} | vs plain timm | tags |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for r in data['rows']:
        lines.append(
            f'| `{r["model"]}` | `{r["backbone"]}` | {"/".join(map(str, r["cell_widths"]))} | '
            f'{r["params"] / 1e6:.2f} | +{r["params"] / r["backbone_params"] - 1:.1%} | {r["gflops"]:.2f} | '
            f'+{r["gflops"] / r["backbone_gflops"] - 1:.1%} | {r["pretrained_tags"]} |')
    lines += ['', f'Both models with timm\'s 1000-class head, one {size}x{size} image; "vs plain timm" is what the '
              'PTL model adds over `timm.create_model(backbone)`: cells, fuses, the classifier\'s wider input.']
    return write_report(path, '\n'.join(lines), [data], COMMAND)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--out', type=Path, default=RESULTS_DIR / 'models.json')
    parser.add_argument('--report', action='store_true', help='only write models.md from models.json')
    args = parser.parse_args()
    if args.report:
        data = json.loads(args.out.read_text())
    else:
        data = dict(stamp(), input=args.size, rows=measure(args.size))
        write_json(args.out, data)
    print(report(data, args.out.with_suffix('.md')))


if __name__ == '__main__':
    main()
