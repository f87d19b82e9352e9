"""Shared test settings and fixtures."""
import os

import pytest
import torch
from huggingface_hub import constants as hf_constants


@pytest.fixture(autouse=True, scope='session')
def one_thread():
    """One intra-op thread for the whole suite: on a small or shared CI machine several threads run these small
    models many times slower, and one thread makes sums reproducible (the DDP replay compares them exactly)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def device() -> torch.device:
    """The device of the tests that take this fixture (and are marked ``device``): TORCH_DEVICE, as in timm's
    own tests, default cpu. ``TORCH_DEVICE=cuda python -m pytest -m device`` runs them on a GPU."""
    name = os.environ.get('TORCH_DEVICE', 'cpu')
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        pytest.fail(f'TORCH_DEVICE={name} but torch sees no CUDA device: a device run must not fall back to the CPU.')
    return device


def pytest_collection_modifyitems(config, items):
    """Mark every test that takes the ``device`` fixture ``device``: ``-m device`` selects the device suite."""
    for item in items:
        if 'device' in getattr(item, 'fixturenames', ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hub cache, offline mode on; huggingface_hub read both at import time, so patch its constants."""
    cache = tmp_path / 'hf' / 'hub'
    cache.mkdir(parents=True)
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
    return cache


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With PTL_TIMM_STRICT_TESTS=1 (CI; tests/run.sh when everything installed) a skipped test fails: every
    test must run there, and a skip would hide a missing install step."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get('PTL_TIMM_STRICT_TESTS') == '1' and not hasattr(report, 'wasxfail'):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = 'failed'
        report.longrepr = f'skipped, but PTL_TIMM_STRICT_TESTS=1 requires every test to run: {reason}'
