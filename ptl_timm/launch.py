"""Run one of timm's scripts (train.py, validate.py, inference.py) with the ptl_* models registered.

timm's ``train.py`` imports the modules named by ``--device-modules`` before it creates the model, so
``python train.py --device-modules ptl_timm ...`` needs nothing else. ``validate.py`` and ``inference.py``
have no such flag; :func:`run_script` imports ``ptl_timm`` and then runs the script unchanged, as ``python
script.py`` would (``__name__ == '__main__'``, ``sys.argv``, the script's folder first on ``sys.path``). On the
command line::

    ptl-timm run validate --model ptl_resnet50 --checkpoint model_best.pth.tar ...
    ptl-timm run /path/to/pytorch-image-models/inference.py --model ptl_resnet50 ...
    torchrun --nproc_per_node=4 -m ptl_timm run train --model ptl_resnet50 ...

The script is a path to a ``.py`` file, or one of ``train``, ``validate``, ``inference`` looked up in
``scripts_dir`` or ``$PTL_TIMM_SCRIPTS``: a checkout of huggingface/pytorch-image-models at the tag of the
installed timm (the scripts are not in the timm wheel).
"""
import os
import runpy
import sys
from pathlib import Path
from typing import Optional, Sequence

import timm

__all__ = ['SCRIPT_NAMES', 'SCRIPTS_ENV', 'resolve_script', 'run_script']

SCRIPT_NAMES = ('train', 'validate', 'inference')
SCRIPTS_ENV = 'PTL_TIMM_SCRIPTS'


def _clone_hint() -> str:
    return (f'git clone --depth 1 --branch v{timm.__version__} https://github.com/huggingface/pytorch-image-models '
            f'&& export {SCRIPTS_ENV}=$PWD/pytorch-image-models')


def resolve_script(script: str, scripts_dir: Optional[str] = None) -> Path:
    """The script file: ``script`` itself if it is a path, else ``<scripts_dir or $PTL_TIMM_SCRIPTS>/<script>.py``.

    Raises FileNotFoundError naming what was looked for and how to get timm's scripts.
    """
    if script in SCRIPT_NAMES:
        folder = scripts_dir or os.environ.get(SCRIPTS_ENV)
        if not folder:
            raise FileNotFoundError(
                f'Where is timm\'s {script}.py? Set ${SCRIPTS_ENV} (or scripts_dir) to a checkout of '
                f'pytorch-image-models, or give the path to the script. To get them: {_clone_hint()}')
        path = Path(folder).expanduser() / f'{script}.py'
    else:
        path = Path(script).expanduser()
    if not path.is_file():
        hint = (f'Give one of {", ".join(SCRIPT_NAMES)} or a path to a .py file.' if path.suffix != '.py'
                else f'To get timm\'s scripts: {_clone_hint()}')
        raise FileNotFoundError(f'No script at {path}. {hint}')
    return path.resolve()


def run_script(script: Path, argv: Sequence[str]) -> None:
    """Run ``script`` as ``python script argv...`` would, with the ptl_* models registered (importing this module
    imported ptl_timm)."""
    sys.argv = [str(script), *argv]
    sys.path.insert(0, str(script.parent))
    runpy.run_path(str(script), run_name='__main__')
