"""What the benchmarks record and compute (benchmarks/common.py): the environment of a result, and the statistics
behind the documented claims, against hand computations."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from common import environment, mean_of_means_ci95, t_ci95  # noqa: E402


def test_t_interval_of_a_mean():
    mean, lo, hi = t_ci95([1.0, 2.0, 3.0])  # sd 1, n 3, t(2) = 4.303
    assert mean == 2.0 and hi - mean == pytest.approx(4.303 / math.sqrt(3))
    assert mean - lo == pytest.approx(hi - mean)
    assert all(math.isnan(v) for v in t_ci95([5.0])[1:])


def test_mean_of_means_uses_the_standard_errors_and_welch_degrees_of_freedom():
    # means 2 and 4; squared standard errors var([1, 3]) / 2 = 1 and var([2, 4, 6]) / 3 = 4 / 3
    se2 = [1.0, 4.0 / 3.0]
    df = sum(se2) ** 2 / (se2[0] ** 2 / 1 + se2[1] ** 2 / 2)  # 2.88 -> t(2) = 4.303 (floored: conservative)
    assert int(df) == 2
    mean, lo, hi = mean_of_means_ci95([[1.0, 3.0], [2.0, 4.0, 6.0], [7.0]])  # the single value is left out
    assert mean == 3.0
    assert hi - mean == pytest.approx(4.303 * math.sqrt(sum(se2)) / 2)
    assert math.isnan(mean_of_means_ci95([[1.0]])[0])


def test_results_record_the_cpu_and_its_vector_extensions():
    """The kernels torch picks for a CPU's vector extensions change a result's last digits (an AVX-512 machine
    and an AVX2 one do not give the same accuracies): every result names them."""
    import torch

    env = environment()
    assert env['cpu'] and env['torch_cpu_capability'] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(env['cpu_flags'], list) and all(isinstance(f, str) for f in env['cpu_flags'])
    if Path('/proc/cpuinfo').is_file() and ' avx2 ' in f' {Path("/proc/cpuinfo").read_text()} ':
        assert 'avx2' in env['cpu_flags']


def test_overhead_sweep_statistics_and_thread_counts():
    """The pair-ratio summary and the thread list of ``overhead.py --threads-sweep`` (issue 26)."""
    import os

    import overhead

    q = overhead._quantiles([1.3, 1.0, 1.1, 1.2, 5.0])
    assert (q['median'], q['min'], q['max'], q['q1'], q['q3']) == (1.2, 1.0, 5.0, 1.1, 1.3)
    assert overhead.thread_counts('2,1,0,2') == sorted({1, 2, os.cpu_count()})
    assert overhead._ratio_cell(q, target=1.1) == '1.200x (1.000-5.000) (miss)'
    assert overhead._ratio_cell(None) == '-'


@pytest.mark.slow
def test_overhead_sweep_and_profile_quick(tmp_path):
    """``--threads-sweep --profile --quick`` runs every step (eager) and writes its tables under quick/."""
    import json

    import overhead

    overhead.main(['--threads-sweep', '--profile', '--quick', '--out', str(tmp_path / 'overhead.json')])
    sweep = json.loads((tmp_path / 'quick' / 'overhead_threads.json').read_text())
    assert set(sweep['results']) == {f'{b}/{t}/eager' for b in ('resnet18', 'mobilenetv2_100') for t in (1, 2)}
    for entry in sweep['results'].values():
        assert len(entry['times']['ptl']['train']) == 3 and entry['infer']['min'] <= entry['infer']['median']
    assert 1 < sweep['static']['resnet18']['flops'] < 1.1
    md = (tmp_path / 'quick' / 'overhead_threads.md').read_text()
    assert '| resnet18 | 2 | eager |' in md
    prof = json.loads((tmp_path / 'quick' / 'overhead_profile.json').read_text())['profile']
    kinds = prof['kinds']
    assert kinds['infer']['convolution'] > 0 and kinds['train']['gates and state mix (element-wise)'] > 0
    assert 'Where the ladder of ptl_resnet18' in (tmp_path / 'quick' / 'overhead_profile.md').read_text()
