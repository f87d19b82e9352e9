"""Helpers shared by the benchmark scripts: environment record, JSON I/O, statistics."""
import hashlib
import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / 'results'

# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (scipy is not a dependency).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def _t975(df: float) -> float:
    return _T975[max(int(df), 1) - 1] if df < len(_T975) + 1 else 1.96


def t_ci95(values: Sequence[float]) -> Tuple[float, float, float]:
    """Mean and 95 % confidence interval (t-distribution) of ``values``; the interval is NaN for n < 2."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean()) if len(x) else math.nan
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = _t975(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, mean - half, mean + half


def mean_of_means_ci95(groups: Sequence[Sequence[float]]) -> Tuple[float, float, float]:
    """Unweighted mean of the group means (e.g. the average gain over tasks, each task its own seeds) and its
    95 % interval: standard error sqrt(sum se_i^2) / k, Welch-Satterthwaite degrees of freedom. Groups of
    fewer than 2 values are left out."""
    groups = [np.asarray(g, dtype=np.float64) for g in groups if len(g) >= 2]
    if not groups:
        return math.nan, math.nan, math.nan
    se2 = np.array([g.var(ddof=1) / len(g) for g in groups])
    mean = float(np.mean([g.mean() for g in groups]))
    if se2.sum() == 0:
        return mean, mean, mean
    df = se2.sum() ** 2 / sum(v ** 2 / (len(g) - 1) for v, g in zip(se2, groups))
    half = _t975(df) * math.sqrt(se2.sum()) / len(groups)
    return mean, mean - half, mean + half


# The sources of the models' computation; before the layout of docs/development.md they were bconv_cell.py,
# ptl_net.py and ptl_zoo.py (the hashes of earlier results).
CORE_FILES = ('layers/bconv_cell.py', 'layers/ladder.py', 'models/ptlnet.py', 'models/_helpers.py')


def core_hash() -> str:
    """Short sha1 of the imported ptl_timm core sources, so every result names the code it measured."""
    import ptl_timm

    root = Path(ptl_timm.__file__).parent
    digest = hashlib.sha1()
    for name in CORE_FILES:
        digest.update((root / name).read_bytes())
    return digest.hexdigest()[:10]


# CPU features that decide which kernels torch runs, and so the last digits of a result (x86 and ARM names)
_VECTOR_FLAG = re.compile(r'^(sse\w*|ssse3|avx\w*|amx\w*|fma\w*|f16c|\w*vnni\w*|asimd\w*|neon|sve\w*|sme\d*|sme_\w+)$')


def cpu_description() -> Tuple[str, List[str]]:
    """The CPU model and its vector extensions (sorted), from /proc/cpuinfo where there is one."""
    cpu, flags = platform.processor(), []
    try:
        lines = Path('/proc/cpuinfo').read_text().splitlines()
    except OSError:
        return cpu, flags
    fields = {}
    for line in lines:
        key, _, value = line.partition(':')
        fields.setdefault(key.strip(), value.strip())
    cpu = fields.get('model name') or fields.get('Model name') or cpu
    flags = sorted(f for f in (fields.get('flags') or fields.get('Features') or '').split() if _VECTOR_FLAG.match(f))
    return cpu, flags


def environment() -> Dict[str, Any]:
    """Versions, threads and CPU of this run (model, vector extensions, the kernels torch picked for them),
    stored with every result file: another CPU may give other last digits."""
    import timm
    import torch

    import ptl_timm

    cpu, cpu_flags = cpu_description()
    try:
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return dict(
        python=platform.python_version(), torch=torch.__version__, timm=timm.__version__, numpy=np.__version__,
        platform=platform.platform(), cpu=cpu, cpu_flags=cpu_flags,
        torch_cpu_capability=torch.backends.cpu.get_cpu_capability(), cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        git_commit=commit, ptl_timm_path=str(Path(ptl_timm.__file__).parent), ptl_core_hash=core_hash(),
    )


def write_json(path: Path, data: Dict[str, Any]) -> None:
    """Write atomically, so a reader (or an interrupted run) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + '.tmp')
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + '\n')
    os.replace(tmp, path)
