"""The models timm's own tests/test_models.py runs on (tests/run.sh): every model this package registers.

Prints a pytest -k expression of their names (a name also selects its pretrained tags, which timm's cfg test
runs one by one).
"""
import timm

import ptl_timm  # noqa: F401  (registers the models)

# the model modules of ptl_timm: PTLNet (ptl_*), the BNNeck ReID models (reid_*), MGN (mgn_*, ptl_mgn_*)
MODULES = ['ptlnet', 'bnneck', 'mgn']


def registered_models() -> list:
    return timm.list_models(module=MODULES)


if __name__ == '__main__':
    print(' or '.join(registered_models()))
