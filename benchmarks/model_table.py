"""The model table of the README: every ptl_* classification model against its plain backbone.

Counts parameters and FLOPs (torch.utils.flop_counter, one 224x224 image, 1000 classes) of each
ptl_* model and of the timm backbone it wraps, and writes benchmarks/results/models.{json,md}.

    python benchmarks/model_table.py
"""
import argparse
import json
from pathlib import Path

import timm
import torch
from timm.models import get_arch_pretrained_cfgs
from torch.utils.flop_counter import FlopCounterMode

import ptl_timm

RESULTS = Path(__file__).parent / 'results'


def _flops(model: torch.nn.Module, size: int) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops()


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--out', type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    for name in timm.list_models(module='ptlnet'):  # the registered ptl_* PTLNet models, naturally sorted
        ptl = timm.create_model(name).eval()
        plain = timm.create_model(ptl.backbone_name).eval()
        rows.append(dict(
            model=name, backbone=ptl.backbone_name, cell_widths=ptl.cell_widths,
            params=_params(ptl), backbone_params=_params(plain),
            gflops=_flops(ptl, args.size) / 1e9, backbone_gflops=_flops(plain, args.size) / 1e9,
            pretrained_tags=len(get_arch_pretrained_cfgs(name)),
        ))
        print(f'{name}: {rows[-1]["params"] / 1e6:.2f}M params', flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, timm=timm.__version__, ptl_timm=ptl_timm.__version__, input=args.size)
    (args.out / 'models.json').write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [
        f'| model | backbone | cell widths | params (M) | vs backbone | GFLOPs @{args.size} | vs backbone | tags |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        lines.append(
            f'| `{r["model"]}` | `{r["backbone"]}` | {"/".join(map(str, r["cell_widths"]))} | '
            f'{r["params"] / 1e6:.2f} | +{r["params"] / r["backbone_params"] - 1:.1%} | {r["gflops"]:.2f} | '
            f'+{r["gflops"] / r["backbone_gflops"] - 1:.1%} | {r["pretrained_tags"]} |')
    (args.out / 'models.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
