"""Does the generic wrapper take any timm feature-pyramid backbone? One model of every timm model family.

A family is one of timm's model modules (``timm.list_modules()``); its model here is the one with the fewest
parameters (counted on the meta device; a module with timm's own ``test_*`` configs picks among those, which
are its smallest). Each model is first classified from the plain timm backbone, then wrapped with
``ptl_timm.create_ptl_model`` and checked:

- *feature pyramid* (the rule, decided on the plain backbone's ``feature_info`` alone, before any PTL code runs
  and whatever the layout of its maps): its reductions never shrink and take at least three values (4, 8, 16,
  32 for most; 16, 32, 64 for LeViT). Anything else (plain ViTs and MLPs at one reduction, models without
  ``feature_info``) is *not a pyramid*; PTL may take it or refuse it at build time, with the reason.
- build: ``create_ptl_model(name, num_classes=4, img_size=S)``;
- forward/backward: train-mode forward of 2 images, logits (2, 4), finite gradients that reach the cells;
- state rules: a train forward writes the state, an eval forward does not, eval outputs are batch-independent,
  ``reset_state`` zeroes the state, a frozen state is not written in train mode;
- features_only: ``create_ptl_model(name, features_only=True)`` (timm's getter wrapper) gives one NCHW map per
  stage with the channels its ``feature_info`` lists.

Then, for the families where all of that works, and outside that verdict: TorchScript, ``torch.jit.script`` of the
eval model gives the eager outputs (a backbone whose forward is not a chain of its modules is refused by name);
where it fails, whether the plain backbone scripts at all.

Input: S = the first of 64, 128 and 224 px the plain backbone runs at, else its own pretrained input size (and
that size when it is fixed). Writes
benchmarks/results/family_coverage.{json,md}; every finished family is appended to
benchmarks/results/family_coverage.jsonl first, so an interrupted run resumes where it stopped.

    python benchmarks/family_coverage.py                       # every family (about an hour on 2 busy cores)
    python benchmarks/family_coverage.py --families resnet,vgg --out /tmp/fc.json  # some families
    python benchmarks/family_coverage.py --report              # family_coverage.md from the JSON (no checks run)

Each row carries the commit and core hash it was checked at (a resumed run mixes runs); the Markdown ends with
them and the ``--report`` command.
"""
import argparse
import json
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch

import ptl_timm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, file_stamp, repo_path, stamp, stamp_of, write_json, write_report  # noqa: E402

SIZES = (64, 128, 224)  # the first a backbone runs at; a ViT's own size can be large (deepseek_vit: 546 px)
STEPS = ('build', 'forward_backward', 'state', 'features_only')
NUM_CLASSES = 4


def timm_families() -> List[str]:
    """timm's model modules, without the ones ``import ptl_timm`` registers (ptlnet, bnneck, mgn)."""
    return [m for m in timm.list_modules() if not any(
        timm.models.model_entrypoint(n).__module__.startswith('ptl_timm') for n in timm.list_models(module=m))]


def _params_on_meta(name: str) -> Optional[int]:
    """Parameter count of ``name`` without allocating it (None: the model cannot be built on meta)."""
    try:
        with torch.device('meta'):
            model = timm.create_model(name, pretrained=False)
    except Exception:
        return None
    return sum(p.numel() for p in model.parameters())


def smallest_model(family: str) -> Tuple[str, Optional[int]]:
    """The model of ``family`` with the fewest parameters (timm's ``test_*`` configs when it has some)."""
    names = timm.list_models(module=family)
    candidates = [n for n in names if n.startswith('test_')] or names
    counted = [(p, n) for n in candidates if (p := _params_on_meta(n)) is not None]
    if not counted:
        return candidates[0], None
    params, name = min(counted)
    return name, params


def _reason(e: BaseException) -> str:
    """One line naming an error: its type and the first line of its message, shortened."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ''
    text = f'{type(e).__name__}: {text}' if text else type(e).__name__
    return text if len(text) <= 240 else text[:237] + '...'


def is_pyramid(reductions: Sequence[int]) -> bool:
    """The pyramid rule: reductions that never shrink and grow through at least three levels."""
    return all(b >= a for a, b in zip(reductions, reductions[1:])) and len(set(reductions)) >= 3


@torch.no_grad()
def classify(name: str) -> Dict[str, Any]:
    """Apply the pyramid rule of the module docstring to the plain backbone ``name``, and find the input size S
    it runs at."""
    model = timm.create_model(name, pretrained=False).eval()
    info = getattr(model, 'feature_info', None)
    if not hasattr(model, 'forward_intermediates') or not info:
        return dict(pyramid=False, size=SIZES[0], rule='no feature_info / forward_intermediates')
    reductions = [i['reduction'] for i in info]
    pyramid = is_pyramid(reductions)
    rule = f'reductions {reductions}' + ('' if pyramid else ' do not grow through three levels')
    fixed = model.pretrained_cfg.get('fixed_input_size')
    own = tuple(model.pretrained_cfg['input_size'][-2:])
    sizes = [own] if fixed else [(s, s) for s in SIZES] + [own]
    error = None
    for size in sizes:
        try:
            final, _ = model.forward_intermediates(torch.zeros(1, 3, *size))
            break
        except Exception as e:
            error = e
    else:  # no size found: the build step fails at S and says why
        return dict(pyramid=pyramid, size=sizes[-1][0], reductions=reductions, rule=rule,
                    final=f'forward_intermediates fails: {_reason(error)}')
    return dict(pyramid=pyramid, size=size[0], reductions=reductions, rule=rule, final=_layout_of(final))


def _layout_of(final: Any) -> str:
    """The plain backbone's final features, as a shape (or a list of shapes)."""
    if isinstance(final, torch.Tensor):
        return str(tuple(final.shape))
    if isinstance(final, (list, tuple)):
        return f'list of {len(final)}: {_layout_of(final[-1])} last'
    return type(final).__name__


def _states(model: torch.nn.Module) -> List[torch.Tensor]:
    return [cell.state.clone() for cell in ptl_timm.bconv_cells(model)]


def _same(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _forward_backward(model: torch.nn.Module, x: torch.Tensor) -> None:
    model.train()
    out = model(x)
    if out.shape != (x.shape[0], NUM_CLASSES):
        raise AssertionError(f'logits of shape {tuple(out.shape)}, expected {(x.shape[0], NUM_CLASSES)}')
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    if any(g is not None and not torch.isfinite(g).all() for g in grads):
        raise AssertionError('non-finite gradients')
    cell_grads = [p.grad for c in ptl_timm.bconv_cells(model) for p in c.parameters()]
    if not cell_grads or any(g is None or not g.abs().sum() for g in cell_grads):
        raise AssertionError('no gradient reaches the BConv-Cells')


@torch.no_grad()
def _state_rules(model: torch.nn.Module, x: torch.Tensor) -> None:
    model.reset_state()
    model.train()
    model(x)
    written = _states(model)
    if all(not s.any() for s in written):
        raise AssertionError('a train forward did not write the state')
    model.eval()
    batch = model(x)
    if not _same(written, _states(model)):
        raise AssertionError('an eval forward wrote the state')
    single = model(x[:1])
    # relative to the largest logit: randomly initialised deep nets (Inception) give logits of 1e7 and more
    diff = (batch[:1] - single).abs().max().item() / max(batch.abs().max().item(), 1.)
    if diff > 1e-5:
        raise AssertionError(f'eval outputs depend on the batch (max relative difference {diff:.2e})')
    model.reset_state()
    if any(s.any() for s in _states(model)):
        raise AssertionError('reset_state left a non-zero state')
    model.freeze_state()
    model.train()
    model(x)
    if any(s.any() for s in _states(model)):
        raise AssertionError('a frozen state was written in train mode')
    model.unfreeze_state()


@torch.no_grad()
def _torchscript(model: torch.nn.Module, x: torch.Tensor) -> None:
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch.jit.script's deprecation notice
        scripted = torch.jit.script(model)
    expected, got = model(x), scripted(x)
    diff = (got - expected).abs().max().item() / max(expected.abs().max().item(), 1.)
    if diff > 1e-4:
        raise AssertionError(f'scripted outputs differ from eager (max relative difference {diff:.2e})')


@torch.no_grad()
def _twin_scripts(name: str, size: int) -> bool:
    """Whether the plain backbone compiles with ``torch.jit.script`` and runs at ``size``."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        try:
            torch.jit.script(timm.create_model(name, pretrained=False).eval())(torch.zeros(1, 3, size, size))
        except Exception:
            return False
    return True


@torch.no_grad()
def _features_only(name: str, size: int, x: torch.Tensor) -> None:
    model = ptl_timm.create_ptl_model(name, features_only=True, img_size=size).eval()
    feats = model(x)
    channels = model.feature_info.channels()
    got = [f.shape[1] if f.ndim == 4 else tuple(f.shape) for f in feats]
    if got != channels:
        raise AssertionError(f'features_only gives {got}, feature_info lists {channels} channels')


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout('the check ran past its time limit')


def check_family(family: str, model: Optional[str] = None, timeout: int = 600) -> Dict[str, Any]:
    """Classify the family's smallest model (or ``model``) and run every step; a failed step names its reason
    and skips the steps after it. ``works``: every step passed."""
    start = time.perf_counter()
    params = None
    if model is None:
        model, params = smallest_model(family)
    row: Dict[str, Any] = dict(family=family, model=model, params=params)
    torch.manual_seed(0)
    old = signal.signal(signal.SIGALRM, _alarm) if timeout else None
    signal.alarm(timeout)
    try:
        row.update(classify(model))
        size = row['size']
        x = torch.randn(2, 3, size, size)
        ptl = None
        for step in STEPS:
            try:
                if step == 'build':
                    ptl = ptl_timm.create_ptl_model(model, num_classes=NUM_CLASSES, img_size=size)
                    row['layout'] = ptl.output_fmt + (' (list)' if ptl.final_in_list else '')
                elif step == 'forward_backward':
                    _forward_backward(ptl, x)
                elif step == 'state':
                    _state_rules(ptl, x)
                else:
                    _features_only(model, size, x)
                row[step] = 'ok'
            except Exception as e:
                row[step] = _reason(e)
                row['failed_step'] = step
                break
        else:
            try:
                _torchscript(ptl, x)
                row['torchscript'] = 'ok'
            except Exception as e:
                row['torchscript'] = _reason(e)
                row['twin_scripts'] = _twin_scripts(model, size)
    except Exception as e:  # the plain backbone itself cannot be built or classified
        row.update(pyramid=False, rule=f'plain backbone fails: {_reason(e)}')
    finally:
        signal.alarm(0)
        if old is not None:
            signal.signal(signal.SIGALRM, old)
    row['works'] = all(row.get(step) == 'ok' for step in STEPS)
    row['seconds'] = round(time.perf_counter() - start, 1)
    return row


def _cell(value: Optional[str]) -> str:
    if value is None:
        return '-'
    return 'ok' if value == 'ok' else 'fails'


def summary(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    pyramids = [r for r in rows if r['pyramid']]
    working = [r for r in pyramids if r['works']]
    early = [r for r in rows if not r['works'] and r.get('failed_step') == 'build']
    return dict(
        families=len(rows), pyramids=len(pyramids), pyramids_working=len(working),
        pyramids_working_pct=round(100 * len(working) / len(pyramids), 1) if pyramids else None,
        not_pyramids=len(rows) - len(pyramids),
        not_pyramids_working=sum(r['works'] for r in rows if not r['pyramid']),
        failures_at_build=len(early), failures=sum(not r['works'] for r in rows),
        pyramids_scriptable=sum(r.get('torchscript') == 'ok' for r in working),
        pyramids_twin_scripts=sum(r.get('torchscript') == 'ok' or bool(r.get('twin_scripts')) for r in working),
    )


def headline(stats: Dict[str, Any]) -> str:
    return (
        f'Feature-pyramid families that work: {stats["pyramids_working"]} of {stats["pyramids"]} '
        f'({stats["pyramids_working_pct"]} %); not pyramids: {stats["not_pyramids"]} families, '
        f'{stats["not_pyramids_working"]} of them work; failures at build time: {stats["failures_at_build"]} '
        f'of {stats["failures"]}. TorchScript of the working pyramid families: {stats["pyramids_scriptable"]} of '
        f'{stats["pyramids_working"]} ({stats["pyramids_twin_scripts"]} of whose plain backbones script).')


def markdown(rows: Sequence[Dict[str, Any]], stats: Dict[str, Any]) -> str:
    lines = [
        headline(stats),
        '',
        '| family | model | kind | final features | px | build | fwd/bwd | state | features_only | TorchScript '
        '| reason |',
        '|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        kind = 'pyramid' if r['pyramid'] else 'not a pyramid'
        reason = '' if r['works'] else (r.get(r.get('failed_step', ''), '') or r['rule'])
        if r['works'] and r.get('torchscript') not in (None, 'ok'):
            twin = 'the plain backbone scripts' if r.get('twin_scripts') else 'nor does the plain backbone'
            reason = f'TorchScript ({twin}): {r["torchscript"]}'
        if not r['pyramid'] and r['rule'] not in reason:
            reason = f'{r["rule"]}; PTL: {reason}' if reason else r['rule']
        reason = reason.replace('|', '/').replace('\n', ' ')
        final = r.get('layout') or r.get('final', '-')
        lines.append(
            f'| {r["family"]} | `{r["model"]}` | {kind} | {final} | {r.get("size", "-")} | '
            f'{_cell(r.get("build"))} | {_cell(r.get("forward_backward"))} | {_cell(r.get("state"))} | '
            f'{_cell(r.get("features_only"))} | {_cell(r.get("torchscript"))} | {reason} |')
    return '\n'.join(lines) + '\n'


def report(data: Dict[str, Any], path: Path, command: str) -> str:
    """Write ``markdown`` of the file's rows with its provenance footer (a row checked before rows were stamped has
    the file's commit and core)."""
    records = [{**stamp_of(data), **{k: r[k] for k in ('commit', 'core') if k in r}} for r in data['rows']]
    return write_report(path, markdown(data['rows'], data['summary']), records, command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--families', default='', help='comma-separated families (default: every timm module)')
    parser.add_argument('--out', type=Path, default=RESULTS_DIR / 'family_coverage.json')
    parser.add_argument('--timeout', type=int, default=600, help='seconds per family')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--report', action='store_true', help='only rewrite the .md from the JSON')
    args = parser.parse_args()
    default = args.out.resolve() == (RESULTS_DIR / 'family_coverage.json').resolve()
    command = 'python benchmarks/family_coverage.py --report' + ('' if default else f' --out {repo_path(args.out)}')
    if args.report:
        print(report(json.loads(args.out.read_text()), args.out.with_suffix('.md'), command))
        return
    torch.set_num_threads(args.threads)
    families = [f for f in args.families.split(',') if f] or timm_families()
    partial = args.out.with_suffix('.jsonl')
    partial.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if partial.exists():  # resume: the families an interrupted run finished
        done = {r['family']: r for r in map(json.loads, partial.read_text().splitlines()) if r}
    stamped = stamp()
    for family in families:
        if family in done:
            continue
        row = dict(check_family(family, timeout=args.timeout), commit=stamped['commit'], core=stamped['core'])
        done[family] = row
        with partial.open('a') as f:
            f.write(json.dumps(row) + '\n')
        status = 'works' if row['works'] else f'fails ({row.get("failed_step") or row["rule"]})'
        print(f'{family:28s} {row["model"]:36s} {status} {row["seconds"]}s', flush=True)
    rows = [done[f] for f in families]
    data = dict(file_stamp(), summary=summary(rows), rows=rows)
    write_json(args.out, data)
    print(report(data, args.out.with_suffix('.md'), command))
    partial.unlink()


if __name__ == '__main__':
    main()
