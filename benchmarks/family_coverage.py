"""Does the generic wrapper take any timm feature-pyramid backbone? One model of every timm model family.

A family is one of timm's model modules (``timm.list_modules()``); its model here is the one with the fewest
parameters (counted on the meta device; a module with timm's own ``test_*`` configs picks among those, which
are its smallest). Each model is first classified from the plain timm backbone, then wrapped with
``ptl_timm.create_ptl_model`` and checked:

- *hierarchical CNN* (the rule, decided on the plain backbone before any PTL code runs): it has
  ``feature_info`` and ``forward_intermediates``; it reports at least two stages whose reductions never
  shrink and grow overall; ``forward_intermediates`` gives NCHW maps (4-d, channels = ``feature_info``'s
  ``num_chs``; final: ``num_features``) whose spatial size never grows from stage to stage. Anything else
  (plain ViTs, token or channels-last outputs, MLPs) is *not hierarchical*: PTL must refuse it at build time
  with an error that names the reason.
- build: ``create_ptl_model(name, num_classes=4, img_size=S)``;
- forward/backward: train-mode forward of 2 images, logits (2, 4), finite gradients that reach the cells;
- state rules: a train forward writes the state, an eval forward does not, eval outputs are batch-independent,
  ``reset_state`` zeroes the state, a frozen state is not written in train mode;
- features_only: ``create_ptl_model(name, features_only=True)`` (timm's getter wrapper) gives one NCHW map per
  stage with the channels its ``feature_info`` lists.

Then, for the families where all of that works, and outside that verdict: TorchScript, ``torch.jit.script`` of the
eval model gives the eager outputs (a backbone whose forward is not a chain of its modules is refused by name).

Input: S = the first of 64, 128 and 224 px the plain backbone runs at, else its own pretrained input size (and
that size when it is fixed). Writes
benchmarks/results/family_coverage.{json,md}; every finished family is appended to
benchmarks/results/family_coverage.jsonl first, so an interrupted run resumes where it stopped.

    python benchmarks/family_coverage.py                       # every family (about an hour on 2 busy cores)
    python benchmarks/family_coverage.py --families resnet,vgg --out /tmp/fc.json  # some families
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
from common import RESULTS_DIR, environment, write_json  # noqa: E402

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


@torch.no_grad()
def classify(name: str) -> Dict[str, Any]:
    """Apply the hierarchical-CNN rule of the module docstring to the plain backbone ``name``."""
    model = timm.create_model(name, pretrained=False).eval()
    info = getattr(model, 'feature_info', None)
    if not hasattr(model, 'forward_intermediates') or not info:
        return dict(hierarchical=False, size=SIZES[0], rule='no feature_info / forward_intermediates')
    reductions = [i['reduction'] for i in info]
    fixed = model.pretrained_cfg.get('fixed_input_size')
    own = tuple(model.pretrained_cfg['input_size'][-2:])
    sizes = [own] if fixed else [(s, s) for s in SIZES] + [own]
    error = None
    for size in sizes:
        try:
            final, feats = model.forward_intermediates(torch.zeros(1, 3, *size))
            break
        except Exception as e:
            error = e
    else:
        return dict(hierarchical=False, size=sizes[-1][0], reductions=reductions,
                    rule=f'forward_intermediates fails: {_reason(error)}')
    row = dict(size=size[0], reductions=reductions)
    shapes = [tuple(f.shape) if isinstance(f, torch.Tensor) else None for f in feats]
    if len(info) < 2:
        why = 'fewer than two stages'
    elif any(b < a for a, b in zip(reductions, reductions[1:])) or reductions[-1] <= reductions[0]:
        why = f'reductions {reductions} do not grow'
    elif not isinstance(final, torch.Tensor) or final.ndim != 4 or final.shape[1] != model.num_features:
        got = tuple(final.shape) if isinstance(final, torch.Tensor) else type(final).__name__
        why = f'final features {got} are not an NCHW map of {model.num_features} channels'
    elif any(s is None or len(s) != 4 or s[1] != i['num_chs'] for s, i in zip(shapes, info)):
        why = f'stage outputs {shapes} are not NCHW maps of {[i["num_chs"] for i in info]} channels'
    elif any(b[2] > a[2] or b[3] > a[3] for a, b in zip(shapes, shapes[1:])):
        why = f'stage maps {shapes} grow'
    else:
        return dict(row, hierarchical=True, rule='NCHW maps, reductions grow')
    return dict(row, hierarchical=False, rule=why)


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
    except Exception as e:  # the plain backbone itself cannot be built or classified
        row.update(hierarchical=False, rule=f'plain backbone fails: {_reason(e)}')
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
    cnn = [r for r in rows if r['hierarchical']]
    working = [r for r in cnn if r['works']]
    early = [r for r in rows if not r['works'] and r.get('failed_step') == 'build']
    return dict(
        families=len(rows), hierarchical=len(cnn), hierarchical_working=len(working),
        hierarchical_working_pct=round(100 * len(working) / len(cnn), 1) if cnn else None,
        not_hierarchical=len(rows) - len(cnn),
        not_hierarchical_working=sum(r['works'] for r in rows if not r['hierarchical']),
        failures_at_build=len(early), failures=sum(not r['works'] for r in rows),
        hierarchical_scriptable=sum(r.get('torchscript') == 'ok' for r in working),
    )


def markdown(rows: Sequence[Dict[str, Any]], stats: Dict[str, Any]) -> str:
    lines = [
        f'Hierarchical CNN families that work: {stats["hierarchical_working"]} of {stats["hierarchical"]} '
        f'({stats["hierarchical_working_pct"]} %); not hierarchical: {stats["not_hierarchical"]} families, '
        f'{stats["not_hierarchical_working"]} of them work; failures at build time: {stats["failures_at_build"]} '
        f'of {stats["failures"]}. TorchScript of the working hierarchical families: '
        f'{stats["hierarchical_scriptable"]} of {stats["hierarchical_working"]}.',
        '',
        '| family | model | kind | px | build | fwd/bwd | state | features_only | TorchScript | reason |',
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        kind = 'hierarchical CNN' if r['hierarchical'] else 'not hierarchical'
        reason = '' if r['works'] else (r.get(r.get('failed_step', ''), '') or r['rule'])
        if r['works'] and r.get('torchscript') not in (None, 'ok'):
            reason = f'TorchScript: {r["torchscript"]}'

        if not r['hierarchical'] and r['rule'] not in reason:
            reason = f'{r["rule"]}; PTL: {reason}' if reason else r['rule']
        reason = reason.replace('|', '/').replace('\n', ' ')
        lines.append(
            f'| {r["family"]} | `{r["model"]}` | {kind} | {r.get("size", "-")} | {_cell(r.get("build"))} | '
            f'{_cell(r.get("forward_backward"))} | {_cell(r.get("state"))} | {_cell(r.get("features_only"))} | '
            f'{_cell(r.get("torchscript"))} | {reason} |')
    return '\n'.join(lines) + '\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--families', default='', help='comma-separated families (default: every timm module)')
    parser.add_argument('--out', type=Path, default=RESULTS_DIR / 'family_coverage.json')
    parser.add_argument('--timeout', type=int, default=600, help='seconds per family')
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    families = [f for f in args.families.split(',') if f] or timm_families()
    partial = args.out.with_suffix('.jsonl')
    partial.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if partial.exists():  # resume: the families an interrupted run finished
        done = {r['family']: r for r in map(json.loads, partial.read_text().splitlines()) if r}
    for family in families:
        if family in done:
            continue
        row = check_family(family, timeout=args.timeout)
        done[family] = row
        with partial.open('a') as f:
            f.write(json.dumps(row) + '\n')
        status = 'works' if row['works'] else f'fails ({row.get("failed_step") or row["rule"]})'
        print(f'{family:28s} {row["model"]:36s} {status} {row["seconds"]}s', flush=True)
    rows = [done[f] for f in families]
    stats = summary(rows)
    write_json(args.out, dict(environment=environment(), summary=stats, rows=rows))
    args.out.with_suffix('.md').write_text(markdown(rows, stats))
    partial.unlink()
    print(markdown(rows, stats))


if __name__ == '__main__':
    main()
