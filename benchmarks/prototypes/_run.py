"""Run a prototype change of the PTL model through benchmarks/transfer.py's recipe and compare it, seed by
seed, with the package's shared-state model and the control of ``transfer_default.json``."""
import argparse
import multiprocessing as mp
import sys
from functools import partial
from pathlib import Path
from typing import Callable, List, Optional

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import transfer  # noqa: E402
from common import RESULTS_DIR, environment, write_json  # noqa: E402


def _compare(runs: List[dict], reference: List[dict]) -> List[str]:
    ref = {(r['model'], r['task'], r['shots'], r['seed'], r['variant']): r for r in reference
           if 'error' not in r and transfer.is_main(r)}
    lines = ['| task | seeds | metric | vs control | vs shared (package) | minus no cells |',
             '|---|---|---|---|---|---|']
    for task in sorted({r['task'] for r in runs}):
        sel = [r for r in runs if r['task'] == task]
        for metric in ('val_acc', 'test_acc'):
            row = [task, str(len(sel)), metric]
            for variant in ('control', 'shared'):
                diffs = [r[metric] - ref[(r['model'], r['task'], r['shots'], r['seed'], variant)][metric]
                         for r in sel if (r['model'], r['task'], r['shots'], r['seed'], variant) in ref]
                row.append(transfer._fmt_ci(diffs) if diffs else '-')
            row.append(transfer._fmt_ci([r[metric] - r[f'{metric}_no_cells'] for r in sel]))
            lines.append('| ' + ' | '.join(row) + ' |')
    return lines


def run_prototype(name: str, modify: Callable[[nn.Module], List[nn.Parameter]], argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=f'prototype {name}')
    p.add_argument('--tasks', default='animal,fashion,emoji')
    p.add_argument('--seeds', type=int, default=5)
    p.add_argument('--workers', type=int, default=2)
    args = p.parse_args(argv)
    grid_args = transfer.parse_args(['--models', 'mobilenetv2_100', '--tasks', args.tasks, '--shots', '10',
                                     '--seeds', str(args.seeds), '--variants', 'shared'])
    runs = [dict(run, prototype=name) for run in transfer.grid(grid_args)]
    with mp.get_context('spawn').Pool(args.workers) as pool:
        results = pool.map(partial(transfer.run_one, modify=modify), runs)
    path = RESULTS_DIR / 'prototypes' / f'{name}.json'
    write_json(path, dict(environment=environment(), runs=results))
    reference = transfer._load(RESULTS_DIR / 'transfer_default.json')['runs']
    text = '\n'.join([f'### Prototype {name} (MobileNetV2, 10 images per class, paired by seed)', ''] +
                     _compare(results, reference)) + '\n'
    path.with_suffix('.md').write_text(text)
    print(text)
