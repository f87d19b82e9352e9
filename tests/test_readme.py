"""The README's Python snippets run as written, offline: in a fresh interpreter with an empty Hub cache and
HF_HUB_OFFLINE=1, every line but those marked ``# needs the Hub``, which must stop at once with the error that
names the fixes. The README cannot rot."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import repo_on_pythonpath

ROOT = Path(__file__).resolve().parents[1]
NEEDS_HUB = '# needs the Hub'


def _python_blocks() -> list:
    return re.findall(r'^```python\n(.*?)^```', (ROOT / 'README.md').read_text(), flags=re.M | re.S)


@pytest.fixture
def offline_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith('HF_')}
    env.update(HF_HOME=str(tmp_path / 'hf'), HF_HUB_CACHE=str(tmp_path / 'hf' / 'hub'), HF_HUB_OFFLINE='1',
               PTL_TIMM_CACHE=str(tmp_path / 'cache'), OMP_NUM_THREADS='1')
    return repo_on_pythonpath(env)


def _run(code: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-c', code], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_readme_has_snippets_and_marks_the_hub_lines():
    blocks = _python_blocks()
    assert len(blocks) >= 2, 'the README lost its Python snippets'
    assert any(NEEDS_HUB in b for b in blocks), 'the quick start shows no pretrained load from the Hub'


@pytest.mark.slow
def test_readme_snippets_run_offline_as_written(offline_env, tmp_path):
    for block in _python_blocks():
        code = '\n'.join(line for line in block.splitlines() if NEEDS_HUB not in line)
        result = _run(code, offline_env, tmp_path)
        assert result.returncode == 0, f'{code}\n--- stderr:\n{result.stderr[-3000:]}'


@pytest.mark.slow
def test_readme_lines_that_need_the_hub_fail_at_once_offline(offline_env, tmp_path):
    for block in _python_blocks():
        lines = block.splitlines()
        for line in (x for x in lines if NEEDS_HUB in x):
            code = '\n'.join(lines[:1] + [line])  # the block's import line, then the Hub line
            start = time.monotonic()
            result = _run(code, offline_env, tmp_path)
            assert result.returncode != 0 and time.monotonic() - start < 120, line
            last = result.stderr.strip().splitlines()[-1]
            assert last.startswith('ptl_timm.hub.HubError') and 'HF_HUB_OFFLINE=1' in last, result.stderr[-2000:]
