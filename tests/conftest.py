"""Shared test settings."""
import pytest
import torch


@pytest.fixture(autouse=True, scope='session')
def one_thread():
    """One intra-op thread for the whole suite: on a small or shared CI machine several threads run these small
    models many times slower, and one thread makes sums reproducible (the DDP replay compares them exactly)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
