"""The models timm's own tests/test_models.py runs on (tests/run.sh): every model this package registers.

Run as a script, prints a pytest -k expression of their names (a name also selects its pretrained tags, which
timm's cfg test runs one by one). Loaded as a pytest plugin into timm's test run (``-p timm_models``), it
registers the models and the marks timm's tests use beyond their own list.
"""
import timm

import ptl_timm  # noqa: F401  (registers the models)

# the model modules of ptl_timm: PTLNet (ptl_*), the BNNeck ReID models (reid_*), MGN (mgn_*, ptl_mgn_*)
MODULES = ['ptlnet', 'bnneck', 'mgn']


def registered_models() -> list:
    return timm.list_models(module=MODULES)


def pytest_configure(config) -> None:
    """timm's CI gets the ``timeout`` mark from pytest-timeout; registered here, not enforced: timm's limits are
    sized for its CI runners, not for a shared 2-core machine."""
    config.addinivalue_line('markers', 'timeout(seconds): time limit of a test in timm CI (pytest-timeout)')


if __name__ == '__main__':
    print(' or '.join(registered_models()))
