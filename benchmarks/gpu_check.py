"""One prepared device check: PTL's correctness and cost on a GPU, measured in one short run.

On a CUDA machine (``bash benchmarks/gpu_check.sh``, well under 10 minutes on one H200) it:

1. runs the device tests (``pytest -m device``) with ``TORCH_DEVICE=cuda``: the state rules, round trips, batch
   independence, fp16 and bf16 autocast, channels_last and torch.compile (inductor) against eager, the same
   tests that run on the CPU by default;
2. measures the cost of PTL against the plain backbone for resnet50, mobilenetv2_100, convnext_tiny and
   densenet161: a training step (forward, cross-entropy, backward, AdamW) and inference at batch 64, 224 px,
   bf16 autocast, channels_last; eager and ``torch.compile``; plain and PTL interleaved repeat by repeat in
   one process, medians; peak memory of training (``torch.cuda.max_memory_allocated``);
3. profiles one eager PTL training step (the kernels that cost most, and the ladder's share);
4. (run right after the tests) checks the distributed state rule on the device: two ranks (gloo, both on this
   device), DDP without buffer broadcast, different data per rank, a few training steps in ``'shared'`` and
   ``'carried'`` mode; every cell's state must be identical on both ranks (the cells' own averaging) and must
   have moved;
5. records the environment (GPU, driver, CUDA, cuDNN, torch, timm).

The device tests include the carried state (state rules, round trips) and compiled training against eager in
``'shared'`` and ``'carried'`` mode (``tests/test_device.py``).

Results: ``gpu_check.json`` (everything), ``gpu_check.md`` (tables), ``tests.log`` / ``junit.xml`` and
``profile.txt`` in ``--out``. Compiling is the slow part: the compiled measurements stop when ``--budget-s``
would be exceeded and say which ones were left out.

``--quick`` runs the same code on the CPU in about a minute (tiny batch and images, resnet18 only, two device
tests, float32, torch.compile with the ``eager`` backend: Dynamo's capture without a compiler), so CI keeps it
from rotting::

    python benchmarks/gpu_check.py --quick --out /tmp/gpu_check
"""
import argparse
import contextlib
import os
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

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = ('resnet50', 'mobilenetv2_100', 'convnext_tiny', 'densenet161')
TARGETS = dict(train=1.15, infer=1.10)


def device_environment(device: torch.device) -> Dict[str, Any]:
    env = environment()
    env.update(device=str(device), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                   multiprocessors=props.multi_processor_count)
        try:
            env['driver'] = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                                           capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env['driver'] = None
    return env


# --- 1. the device tests ------------------------------------------------------------------------------------
def run_device_tests(device: torch.device, out: Path, select: List[str], timeout_s: int) -> Dict[str, Any]:
    """``pytest`` on the tests marked ``device``, with the device in TORCH_DEVICE (tests/conftest.py)."""
    cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-m', 'device',
           f'--junitxml={out / "junit.xml"}', *select]
    env = dict(os.environ, TORCH_DEVICE=str(device),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])))
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout_s)
        log, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:
        log, rc = f'{e.stdout or ""}{e.stderr or ""}\ntimed out after {timeout_s} s', -1
    (out / 'tests.log').write_text(log)
    summary = next((line for line in reversed(log.splitlines()) if ' in ' in line and
                    any(w in line for w in ('passed', 'failed', 'error', 'skipped', 'deselected'))), '')
    return dict(command=' '.join(cmd), returncode=rc, summary=summary.strip('= '), seconds=time.perf_counter() - t0)


# --- 2. cost ---------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def make_model(name: str, img_size: int, device: torch.device) -> nn.Module:
    import timm

    import ptl_timm  # noqa: F401  (registers the ptl_* models)

    torch.manual_seed(0)
    kwargs = dict(img_size=img_size) if name.startswith('ptl_') else {}
    model = timm.create_model(name, pretrained=False, num_classes=1000, **kwargs)
    return model.to(device, memory_format=torch.channels_last)


def step_fns(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: Optional[torch.dtype],
             compile_backend: Optional[str]) -> Dict[str, Callable[[], None]]:
    """A training step and an inference call of ``model`` (compiled with ``compile_backend`` if given)."""
    run = torch.compile(model, backend=compile_backend) if compile_backend else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train() -> None:
        model.train()
        with _autocast(x.device, dtype):
            loss = F.cross_entropy(run(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer() -> None:
        model.eval()
        with torch.inference_mode(), _autocast(x.device, dtype):
            run(x)
    return dict(train=train, infer=infer)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def peak_train_memory(fn: Callable[[], None], device: torch.device, steps: int = 2) -> Optional[float]:
    """Peak allocated GiB over ``steps`` training steps (CUDA only)."""
    if device.type != 'cuda':
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) / 2 ** 30


def bench_backbone(backbone: str, compiled: bool, args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    """Plain and PTL, interleaved repeat by repeat: median seconds of a training step and of inference."""
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    models = {k: make_model(n, args.img_size, device) for k, n in (('plain', backbone), ('ptl', f'ptl_{backbone}'))}
    fns = {k: step_fns(m, x, y, args.dtype, args.compile_backend if compiled else None) for k, m in models.items()}
    t0 = time.perf_counter()
    for k in models:  # warm-up: compilation, cuDNN's algorithm search, allocator, optimiser state
        for _ in range(args.warmup):
            fns[k]['train']()
            fns[k]['infer']()
    warmup_s = time.perf_counter() - t0
    times: Dict[str, Dict[str, List[float]]] = {k: dict(train=[], infer=[]) for k in models}
    for _ in range(args.repeats):
        for k in models:
            for mode in ('train', 'infer'):
                times[k][mode].append(_timed(fns[k][mode], device))
    out: Dict[str, Any] = dict(backbone=backbone, compiled=compiled, warmup_s=warmup_s, models={})
    for k, m in models.items():
        out['models'][k] = dict(
            params=sum(p.numel() for p in m.parameters()),
            train_step_s=statistics.median(times[k]['train']), infer_s=statistics.median(times[k]['infer']),
            train_times=times[k]['train'], infer_times=times[k]['infer'],
            peak_train_gib=peak_train_memory(fns[k]['train'], device))
    p, q = out['models']['plain'], out['models']['ptl']
    out['ratios'] = dict(train=q['train_step_s'] / p['train_step_s'], infer=q['infer_s'] / p['infer_s'])
    if p['peak_train_gib']:
        out['ratios']['memory'] = q['peak_train_gib'] / p['peak_train_gib']
    del models, fns
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    return out


# --- 3. profile -------------------------------------------------------------------------------------------------
def _op_times(model: nn.Module, args: argparse.Namespace, device: torch.device) -> Dict[str, List[float]]:
    """{op: [self kernel time in us, calls]} of one eager training step (after two warm-up steps)."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    train = step_fns(model, x, y, args.dtype, None)['train']
    for _ in range(2):
        train()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=activities) as prof:
        train()
        _sync(device)
    key = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    return {e.key: [getattr(e, key), e.count] for e in prof.key_averages()}


def profile_step(backbone: str, args: argparse.Namespace, device: torch.device, path: Path) -> Dict[str, Any]:
    """Where PTL's extra training time goes: per-op kernel time of one eager step, PTL minus plain."""
    plain = _op_times(make_model(backbone, args.img_size, device), args, device)
    ptl = _op_times(make_model(f'ptl_{backbone}', args.img_size, device), args, device)
    extra = {op: (t - plain.get(op, [0.0, 0])[0], n - plain.get(op, [0.0, 0])[1]) for op, (t, n) in ptl.items()}
    rows = sorted(extra.items(), key=lambda kv: kv[1][0], reverse=True)
    path.write_text('op | extra us | extra calls\n' + '\n'.join(f'{op} | {t:.0f} | {n}' for op, (t, n) in rows) + '\n')
    return dict(backbone=backbone, plain_us=sum(t for t, _ in plain.values()),
                ptl_us=sum(t for t, _ in ptl.values()),
                top=[dict(op=op, extra_us=t, extra_calls=n) for op, (t, n) in rows[:12]])


# --- 4. the distributed state rule on the device ------------------------------------------------------------------
DDP_MODES = ('shared', 'carried')


def _ddp_worker(rank: int, world: int, port: int, device: str, out: str) -> None:
    """One rank: a few DDP training steps per state mode on its own data; saves every cell's state."""
    import datetime

    import timm
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ptl_timm import bconv_cells

    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        dev = torch.device(device)
        states = {}
        for mode in DDP_MODES:
            torch.manual_seed(0)
            model = timm.create_model('ptl_resnet18', num_classes=5, img_size=32, state_mode=mode, state_slots=6)
            model = model.to(dev)
            # no buffer broadcast (train.py --no-ddp-bb): only the cells' own averaging can make the ranks agree
            ddp = DistributedDataParallel(model, broadcast_buffers=False)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
            gen = torch.Generator().manual_seed(100 + rank)
            for _ in range(3):
                x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 5, (4,), generator=gen)
                loss = F.cross_entropy(ddp(x.to(dev)), y.to(dev))
                opt.zero_grad()
                loss.backward()
                opt.step()
            states[mode] = [c.state.detach().cpu() for c in bconv_cells(model)]
        torch.save(states, Path(out) / f'rank{rank}.pt')
    finally:
        dist.destroy_process_group()


def ddp_state_check(device: torch.device, out: Path, world: int = 2) -> Dict[str, Any]:
    """Two ranks on ``device``: is every cell's state identical across ranks, and did it move?"""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    t0 = time.perf_counter()
    try:
        mp.spawn(_ddp_worker, args=(world, port, str(device), str(out)), nprocs=world, join=True)
    except Exception as e:  # the report says what failed; the other checks' results are kept
        return dict(ok=False, error=f'{type(e).__name__}: {e}', seconds=time.perf_counter() - t0)
    ranks = [torch.load(out / f'rank{r}.pt') for r in range(world)]
    result: Dict[str, Any] = dict(seconds=time.perf_counter() - t0, modes={})
    for mode in DDP_MODES:
        cells = list(zip(*(r[mode] for r in ranks)))
        result['modes'][mode] = dict(
            cells=len(cells),
            max_rank_difference=max(float((s[0] - t).abs().max()) for s in cells for t in s[1:]),
            moved=all(bool(s[0].abs().sum() > 0) for s in cells))
    result['ok'] = all(m['max_rank_difference'] == 0 and m['moved'] for m in result['modes'].values())
    return result


# --- report --------------------------------------------------------------------------------------------------------
def report(data: Dict[str, Any]) -> str:
    env, cfg = data['environment'], data['config']
    lines = ['# PTL on a GPU: device check', '',
             f'{env.get("gpu") or env.get("cpu")} ({env["device"]}), driver {env.get("driver")}, '
             f'CUDA {env.get("cuda")}, cuDNN {env.get("cudnn")}, torch {env.get("torch")}, timm {env.get("timm")}, '
             f'commit {env.get("git_commit")}.', '',
             f'Device tests (`{data["tests"]["command"]}`): **{data["tests"]["summary"] or "no summary"}** '
             f'(exit {data["tests"]["returncode"]}, {data["tests"]["seconds"]:.0f} s).', '',
             f'## Cost: PTL / plain at batch {cfg["batch"]}, {cfg["img_size"]} px, {cfg["dtype"]} autocast, '
             f'channels_last; median of {cfg["repeats"]} interleaved repeats', '',
             f'Targets: training step <= {TARGETS["train"]}x, inference <= {TARGETS["infer"]}x.', '',
             '| backbone | mode | train step | inference | peak train memory | plain train ms | plain infer ms | '
             'PTL train ms | PTL infer ms |', '|---|---|---|---|---|---|---|---|---|']
    for r in data['cost']:
        p, q, ratio = r['models']['plain'], r['models']['ptl'], r['ratios']
        mem = f'{ratio["memory"]:.3f}x' if 'memory' in ratio else '-'
        lines.append(f'| {r["backbone"]} | {"compiled" if r["compiled"] else "eager"} | {ratio["train"]:.3f}x | '
                     f'{ratio["infer"]:.3f}x | {mem} | {1e3 * p["train_step_s"]:.1f} | {1e3 * p["infer_s"]:.1f} | '
                     f'{1e3 * q["train_step_s"]:.1f} | {1e3 * q["infer_s"]:.1f} |')
    if data['skipped']:
        lines += ['', 'Not measured (time budget): ' + ', '.join(data['skipped']) + '.']
    ddp = data.get('ddp')
    if ddp:
        lines += ['', f'## Distributed state rule on the device (2 ranks, gloo, DDP without buffer broadcast): '
                  f'**{"ok" if ddp["ok"] else "FAILED"}**', '']
        if 'error' in ddp:
            lines.append(f'`{ddp["error"]}`')
        for mode, m in ddp.get('modes', {}).items():
            lines.append(f'- `{mode}`: {m["cells"]} cells, largest state difference between ranks '
                         f'{m["max_rank_difference"]:.3g}, states moved: {m["moved"]}')
    prof = data.get('profile')
    if prof:
        lines += ['', f'## Where the extra time of one eager PTL training step goes ({prof["backbone"]}, profiler)', '',
                  f'Kernel time: plain {prof["plain_us"] / 1e3:.1f} ms, PTL {prof["ptl_us"] / 1e3:.1f} ms. The ops '
                  'that grew most (profile.txt has all):', '', '| op | extra ms | extra calls |', '|---|---|---|']
        lines += [f'| `{t["op"]}` | {t["extra_us"] / 1e3:.2f} | {t["extra_calls"]} |' for t in prof['top']]
    return '\n'.join(lines) + '\n'


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cuda')
    p.add_argument('--backbones', default=','.join(BACKBONES))
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float16', 'float32'))
    p.add_argument('--repeats', type=int, default=10)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--compile-backend', default='inductor', help="torch.compile backend; 'none' skips compiling")
    p.add_argument('--budget-s', type=float, default=480, help='stop starting compiled measurements after this')
    p.add_argument('--tests-timeout-s', type=int, default=240)
    p.add_argument('--tests', nargs='*', default=['tests'], help='test paths or -k expressions for pytest')
    p.add_argument('--out', type=Path, default=RESULTS_DIR / 'gpu_check')
    p.add_argument('--quick', action='store_true', help='CPU smoke run: tiny sizes, one backbone, eager backend')
    args = p.parse_args(argv)
    if args.quick:
        args.device, args.backbones, args.batch, args.img_size = 'cpu', 'resnet18', 2, 64
        # float32: CPUs without bf16 units run bf16 convolutions through slow reference kernels
        args.repeats, args.warmup, args.compile_backend, args.dtype = 2, 1, 'eager', 'float32'
        args.tests = ['tests/test_device.py', '-k', 'round_trip']
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        p.error('--device cuda but torch sees no CUDA device; use --quick (CPU) or run on a GPU machine')
    args.dtype = None if args.dtype == 'float32' else getattr(torch, args.dtype)
    args.compile_backend = None if args.compile_backend == 'none' else args.compile_backend
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data: Dict[str, Any] = dict(
        environment=device_environment(device), cost=[], skipped=[],
        config=dict(batch=args.batch, img_size=args.img_size, dtype=str(args.dtype).replace('torch.', ''),
                    repeats=args.repeats, warmup=args.warmup, compile_backend=args.compile_backend))
    print('device tests ...', flush=True)
    data['tests'] = run_device_tests(device, args.out, args.tests, args.tests_timeout_s)
    print(f'  {data["tests"]["summary"]}', flush=True)
    print('distributed state rule ...', flush=True)
    data['ddp'] = ddp_state_check(device, args.out)
    print(f'  {"ok" if data["ddp"]["ok"] else "FAILED"}', flush=True)
    backbones = args.backbones.split(',')
    plan = [(b, False) for b in backbones] + ([(b, True) for b in backbones] if args.compile_backend else [])
    for backbone, compiled in plan:
        elapsed = time.perf_counter() - start
        if compiled and elapsed > args.budget_s:
            data['skipped'].append(f'{backbone} compiled')
            continue
        print(f'cost {backbone} {"compiled" if compiled else "eager"} ({elapsed:.0f} s) ...', flush=True)
        try:
            data['cost'].append(bench_backbone(backbone, compiled, args, device))
        except Exception as e:  # one failing configuration must not lose the others' results
            data['skipped'].append(f'{backbone} {"compiled" if compiled else "eager"} ({type(e).__name__}: {e})')
        write_json(args.out / 'gpu_check.json', data)
    data['profile'] = profile_step(backbones[0], args, device, args.out / 'profile.txt')
    data['seconds'] = time.perf_counter() - start
    write_json(args.out / 'gpu_check.json', data)
    text = report(data)
    (args.out / 'gpu_check.md').write_text(text)
    print(text)
    return 0 if data['tests']['returncode'] == 0 and data['ddp']['ok'] else 1


if __name__ == '__main__':
    sys.exit(main())
