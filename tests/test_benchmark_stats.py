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
