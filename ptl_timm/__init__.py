"""ptl_timm: Progressive Transfer Learning (arXiv 1908.02492) for every timm CNN.

Importing the package registers the ``ptl_*`` models in timm's registry.
"""
from . import reid  # noqa: F401  (registers mgn_resnet50, ptl_mgn_resnet50 and the reid_* models)
from .bconv_cell import (
    DEFAULT_STATE_MODE,
    STATE_MODES,
    BConvCell,
    bconv_cells,
    freeze_state,
    reset_state,
    unfreeze_state,
)
from .hub import export_checkpoint, load_model, save_pretrained
from .ptl_net import DEFAULT_WIDTH_MULT, PTLNet, resolve_cell_widths
from .ptl_zoo import PTL_BACKBONES, checkpoint_filter_fn, create_ptl_model

__version__ = '0.1.0'

__all__ = [
    'BConvCell', 'PTLNet', 'create_ptl_model', 'checkpoint_filter_fn', 'resolve_cell_widths',
    'reset_state', 'freeze_state', 'unfreeze_state', 'bconv_cells',
    'load_model', 'save_pretrained', 'export_checkpoint',
    'STATE_MODES', 'DEFAULT_STATE_MODE', 'DEFAULT_WIDTH_MULT', 'PTL_BACKBONES', '__version__',
]
