"""The prepared GPU check runs on the CPU with --quick, so it cannot rot before a GPU is at hand."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import repo_on_pythonpath

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_quick_runs_every_step_on_the_cpu(tmp_path):
    env = repo_on_pythonpath({'PATH': '/usr/bin:/bin', 'HOME': str(Path.home()), 'OMP_NUM_THREADS': '1'})
    done = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'gpu_check.py'), '--quick', '--out',
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / 'gpu_check.json').read_text())
    assert data['environment']['device'] == 'cpu' and 'cudnn' in data['environment']
    assert data['tests']['returncode'] == 0 and '2 passed' in data['tests']['summary'], data['tests']
    assert (tmp_path / 'junit.xml').is_file() and (tmp_path / 'tests.log').is_file()
    assert [(r['backbone'], r['compiled']) for r in data['cost']] == [('resnet18', False), ('resnet18', True)]
    for r in data['cost']:
        assert r['ratios']['train'] > 0 and r['ratios']['infer'] > 0
        assert len(r['models']['ptl']['train_times']) == 2
    assert data['profile']['ptl_us'] > 0 and data['profile']['plain_us'] > 0 and data['profile']['top']
    assert data['ddp']['ok'] and set(data['ddp']['modes']) == {'shared', 'carried'}, data['ddp']
    md = (tmp_path / 'gpu_check.md').read_text()
    assert '| resnet18 | eager |' in md and '| resnet18 | compiled |' in md and 'Device tests' in md
    assert 'Distributed state rule on the device' in md and '**ok**' in md
