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


def _key(run: dict, variant: str) -> tuple:
    return run['model'], run['task'], run['shots'], run['seed'], variant


def _compare(runs: List[dict], reference: List[dict]) -> List[str]:
    """Paired differences of the prototype's shared-state runs against the package's control and shared
    model, and, where the prototype ran its own control (a change that also reaches the control, such as
    the head), against that."""
    ref = {_key(r, r['variant']): r for r in reference if 'error' not in r and transfer.is_main(r)}
    own = {_key(r, r['variant']): r for r in runs}
    columns = [('control', ref), ('shared', ref)]
    header = '| task | seeds | metric | vs control | vs shared (package) |'
    if any(r['variant'] == 'control' for r in runs):
        columns.append(('control', own))
        header += ' vs its own control | own control vs control |'
    lines = [header + ' minus no cells |', '|' + '---|' * (header.count('|'))]
    for task in sorted({r['task'] for r in runs}):
        sel = [r for r in runs if r['task'] == task and r['variant'] == 'shared']
        for metric in ('val_acc', 'test_acc'):
            row = [task, str(len(sel)), metric]
            for variant, table in columns:
                diffs = [r[metric] - table[_key(r, variant)][metric] for r in sel if _key(r, variant) in table]
                row.append(transfer._fmt_ci(diffs) if diffs else '-')
            if len(columns) == 3:
                diffs = [own[_key(r, 'control')][metric] - ref[_key(r, 'control')][metric] for r in sel
                         if _key(r, 'control') in own and _key(r, 'control') in ref]
                row.append(transfer._fmt_ci(diffs) if diffs else '-')
            row.append(transfer._fmt_ci([r[metric] - r[f'{metric}_no_cells'] for r in sel]))
            lines.append('| ' + ' | '.join(row) + ' |')
    return lines


def run_prototype(name: str, modify: Callable[[nn.Module], List[nn.Parameter]], argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=f'prototype {name}')
    p.add_argument('--tasks', default='animal,fashion,emoji')
    p.add_argument('--seeds', type=int, default=5)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--variants', default='shared',
                   help="add 'control' when the change also reaches the control (e.g. the head)")
    args = p.parse_args(argv)
    grid_args = transfer.parse_args(['--models', 'mobilenetv2_100', '--tasks', args.tasks, '--shots', '10',
                                     '--seeds', str(args.seeds), '--variants', args.variants])
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
