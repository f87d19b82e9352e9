"""The benchmark core: how every benchmark stores, resumes, compares and reports its runs.

API (a benchmark script puts ``benchmarks/`` on ``sys.path`` and imports these names):

- Results: ``results_path(name, quick)`` is ``benchmarks/results/<name>``, or the git-ignored
  ``benchmarks/results/quick/<name>`` for ``--quick`` smoke runs and tests (``RESULTS_DIR``, ``QUICK_DIR``);
  ``repo_path(path)`` names a file as a command run from the repository root does (for a report's command);
  ``store_file`` is the argparse type of a store's ``--out`` (a ``.jsonl`` file).
- ``Store(path)``: a JSON-lines file, one record per run (``benchmarks/results/<name>.jsonl``). A record is a
  flat dict with a ``key`` (``run_key(fields)``: a stable digest of what defines the run); ``store.append(rec)``
  stamps it (``stamp()``: ``env``, the environment with the git ``commit`` and the ptl_timm ``core`` hash) and
  appends it under a file lock, so several processes (``shard(items, 'i/n')``) can fill one grid;
  ``store.latest()`` is {key: last record}, ``store.done()`` the keys that finished without ``error``. A rerun
  of a grid skips what is done (resume); runs are deterministic on one machine, so a rerun of a finished key
  reproduces it.
- Paired statistics: ``t_ci95`` (mean and 95 % t interval), ``paired(a, b)`` (per-seed differences of two
  {seed: value} maps, on their common seeds), ``mean_of_means_ci95`` (the average over cells of per-cell paired
  means), and their report strings ``fmt_ci``, ``fmt_avg``, ``fmt_mean_std``.
- Report: ``write_report(path, text, records, command)`` writes the Markdown with a footer naming the records'
  commits and core hashes and the command that regenerates it; the rows come from the records alone, so
  ``--report`` reproduces them to the digit. ``bar_plot(groups, series, path)`` draws paired gains with their
  intervals and stamps the same provenance into the PNG. ``file_stamp()`` stamps, and ``stamp_of(data)`` reads,
  the commit and core of a file that keeps its environment beside its rows (``overhead.py``,
  ``family_coverage.py``), for its report's footer.

Porting a benchmark: build its grid as records (one dict per run, ``key=run_key(...)``), run the ones not in
``store.done()``, ``store.append`` each result, and derive every table from ``store.latest().values()``.
``benchmarks/transfer.py`` is the worked example.
"""
import argparse
import fcntl
import hashlib
import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / 'results'
QUICK_DIR = RESULTS_DIR / 'quick'  # git-ignored: --quick and test outputs

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


def git_commit() -> Optional[str]:
    """Short hash of the checkout's HEAD, with ``+dirty`` when tracked files differ from it (None outside git)."""
    def git(*args: str) -> str:
        return subprocess.run(['git', *args], capture_output=True, text=True, cwd=Path(__file__).parent,
                              check=True).stdout.strip()
    try:
        commit = git('rev-parse', '--short', 'HEAD')
        return commit + ('+dirty' if git('status', '--porcelain', '--untracked-files=no') else '')
    except (OSError, subprocess.CalledProcessError):
        return None


# variables that cap the vector extensions torch's own kernels and oneDNN use: with both at AVX2 an AVX-512
# machine reproduces an AVX2 machine's results (docs/benchmarks.md, "Where these figures were measured")
KERNEL_ENV = ('ATEN_CPU_CAPABILITY', 'ONEDNN_MAX_CPU_ISA', 'DNNL_MAX_CPU_ISA', 'MKL_ENABLE_INSTRUCTIONS')


def environment() -> Dict[str, Any]:
    """Versions, threads and CPU of this run (model, vector extensions, the kernels torch picked for them),
    stored with every result file: another CPU may give other last digits."""
    import timm
    import torch

    import ptl_timm

    cpu, cpu_flags = cpu_description()
    return dict(
        python=platform.python_version(), torch=torch.__version__, timm=timm.__version__, numpy=np.__version__,
        platform=platform.platform(), cpu=cpu, cpu_flags=cpu_flags,
        torch_cpu_capability=torch.backends.cpu.get_cpu_capability(), cpu_count=os.cpu_count(),
        kernel_env={k: os.environ[k] for k in KERNEL_ENV if k in os.environ},
        torch_threads=torch.get_num_threads(),
        git_commit=git_commit(), ptl_timm_path=str(Path(ptl_timm.__file__).parent), ptl_core_hash=core_hash(),
    )


def write_json(path: Path, data: Dict[str, Any]) -> None:
    """Write atomically, so a reader (or an interrupted run) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + '.tmp')
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + '\n')
    os.replace(tmp, path)


def repo_path(path: Path) -> str:
    """``path`` as a command run from the repository root names it (relative there; as given outside it)."""
    try:
        return str(Path(path).resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return str(path)


def store_file(text: str) -> Path:
    """The argparse type of a results store's path (``--out``): a .jsonl file, its report and plot go beside it."""
    if Path(text).suffix != '.jsonl':
        raise argparse.ArgumentTypeError(f'{text}: a results store is a .jsonl file (the report and plot are written '
                                         'beside it)')
    return Path(text)


def results_path(name: str, quick: bool = False) -> Path:
    """Where a benchmark writes ``name``: under ``benchmarks/results/``, or the git-ignored ``quick/`` folder for
    smoke runs and tests."""
    return (QUICK_DIR if quick else RESULTS_DIR) / name


# --- results store -----------------------------------------------------------------------------------------
def run_key(fields: Dict[str, Any]) -> str:
    """A stable key of the fields that define a run (their JSON, sorted; a short sha1)."""
    return hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stamp() -> Dict[str, Any]:
    """What every record carries: the environment, with the git commit and the ptl_timm core hash on top."""
    env = environment()
    return dict(commit=env['git_commit'], core=env['ptl_core_hash'], env=env)


class Store:
    """A JSON-lines results file: one record per run, appended as runs finish (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def records(self) -> List[Dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def latest(self) -> Dict[str, Dict[str, Any]]:
        """{key: the last record of that key}, in the order keys first appeared."""
        out: Dict[str, Dict[str, Any]] = {}
        for record in self.records():
            out[record['key']] = record
        return out

    def done(self) -> set:
        """Keys whose last record finished without an ``error``."""
        return {k for k, r in self.latest().items() if 'error' not in r}

    def append(self, record: Dict[str, Any], stamped: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Stamp ``record`` (``stamped``, default :func:`stamp`; a record's own ``core`` wins: a worker process
        measured it) and append it under a lock: several processes may finish at once."""
        record = {**(stamped or stamp()), **record}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, 'a') as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(json.dumps(record) + '\n')
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)
        return record


def shard(items: Iterable[Any], spec: Optional[str]) -> List[Any]:
    """The items of shard ``'i/n'`` (every n-th from the i-th; all items for None)."""
    items = list(items)
    if not spec:
        return items
    i, n = (int(v) for v in spec.split('/'))
    if not 0 <= i < n:
        raise ValueError(f'shard {spec!r}: expected i/n with 0 <= i < n, e.g. 0/2')
    return items[i::n]


# --- paired statistics ---------------------------------------------------------------------------------------
def paired(a: Dict[Any, float], b: Dict[Any, float]) -> List[float]:
    """Per-seed differences a - b on the seeds both have, in a's order."""
    return [v - b[s] for s, v in a.items() if s in b]


def fmt_ci(values: Sequence[float]) -> str:
    """``+mean [lo, hi]`` (95 % t interval), or ``+mean (n=1)`` for a single value."""
    mean, lo, hi = t_ci95(values)
    if math.isnan(lo):
        return f'{mean:+.2f} (n={len(values)})'
    return f'{mean:+.2f} [{lo:+.2f}, {hi:+.2f}]'


def fmt_avg(groups: Sequence[Sequence[float]]) -> str:
    """The average over cells of their paired means with its interval (:func:`mean_of_means_ci95`)."""
    mean, lo, hi = mean_of_means_ci95(groups)
    if math.isnan(mean):  # every cell has a single seed (e.g. --quick): no standard error to average with
        return 'n/a (needs 2 seeds per cell)'
    return f'{mean:+.2f}' if math.isnan(lo) else f'{mean:+.2f} [{lo:+.2f}, {hi:+.2f}]'


def fmt_mean_std(values: Sequence[float]) -> str:
    """``mean +- std`` over seeds (std 0 for one value)."""
    return f'{np.mean(values):.2f} +- {np.std(values, ddof=1) if len(values) > 1 else 0:.2f}'


# --- report and plot -----------------------------------------------------------------------------------------
def provenance(records: Sequence[Dict[str, Any]], command: str) -> str:
    """One line naming the commits and ptl_timm core hashes the records were made with (with their counts) and
    the command that regenerates the file from them."""
    def counts(field: str) -> str:
        values: Dict[str, int] = {}
        for r in records:
            values[str(r.get(field))] = values.get(str(r.get(field)), 0) + 1
        return ', '.join(f'`{v}` ({n})' for v, n in sorted(values.items()))

    made = f'{len(records)} record' + ('s' if len(records) != 1 else '')
    return (f'Made from {made}; commits {counts("commit")}; ptl_timm core hashes {counts("core")}. '
            f'Regenerate: `{command}`.')


def file_stamp() -> Dict[str, Any]:
    """:func:`stamp` for a results file that keeps its environment under ``environment``, beside its rows."""
    stamped = stamp()
    return dict(commit=stamped['commit'], core=stamped['core'], environment=stamped['env'])


def stamp_of(data: Dict[str, Any]) -> Dict[str, Any]:
    """The ``commit`` and ``core`` of a results file or record: its own, else those its environment names
    (``git_commit``, ``ptl_core_hash``: files written before they were stamped on top keep them there)."""
    env = data.get('env') or data.get('environment') or {}
    return dict(commit=data.get('commit') or env.get('git_commit'), core=data.get('core') or env.get('ptl_core_hash'))


def write_report(path: Path, text: str, records: Sequence[Dict[str, Any]], command: str) -> str:
    """Write the Markdown report ``text`` with its provenance footer; returns what was written."""
    text = text.rstrip('\n') + '\n\n' + provenance(records, command) + '\n'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def bar_plot(groups: Sequence[Tuple[str, Dict[str, Sequence[float]]]], series: Sequence[str], path: Path,
             ylabel: str, records: Sequence[Dict[str, Any]], command: str) -> None:
    """Grouped bars: for each (label, {series: paired differences}) the mean of each series with its 95 %
    t interval; the provenance goes into the PNG's metadata."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    if not groups:
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups)), 4))
    width = 0.8 / len(series)
    for j, name in enumerate(series):
        means, errs = [], []
        for _, diffs in groups:
            mean, lo, hi = t_ci95(diffs[name]) if diffs.get(name) else (math.nan,) * 3
            means.append(mean)
            errs.append(0 if math.isnan(lo) else hi - mean)
        ax.bar(np.arange(len(groups)) + (j - (len(series) - 1) / 2) * width, means, width, yerr=errs, capsize=2,
               label=name)
    ax.axhline(0, color='k', lw=0.8)
    ax.set_xticks(np.arange(len(groups)), [g[0] for g in groups], fontsize=7)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={'Description': provenance(records, command)})
    plt.close(fig)
