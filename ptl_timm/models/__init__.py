"""PTL models in timm's registry: importing this package registers the ``ptl_*`` models."""
from .ptlnet import (
    DEFAULT_WIDTH_MULT,
    PTL_BACKBONES,
    PTLNet,
    checkpoint_filter_fn,
    create_ptl_model,
    ptl_pretrained_cfgs,
    resolve_cell_widths,
)

__all__ = [
    'PTLNet', 'DEFAULT_WIDTH_MULT', 'PTL_BACKBONES', 'resolve_cell_widths', 'checkpoint_filter_fn',
    'create_ptl_model', 'ptl_pretrained_cfgs',
]
