"""ptl_timm: Progressive Transfer Learning (arXiv 1908.02492) for every timm CNN.

Importing the package registers the ``ptl_*`` models, MGN / MGN_PTL and the ``reid_*`` models in timm's
registry. Map of the package (docs/development.md has more):

- ``layers``: the BConv-Cell and its latent state; the ladder of cells beside a backbone.
- ``models``: PTLNet and the ``ptl_*`` entry points (the registry).
- ``hub``: the weights manifest, checkpoints, Hub I/O, model cards.
- ``reid``: MGN / MGN_PTL, BNNeck models, losses, retrieval metrics, feature extraction.
- ``data``: datasets, one module per kind: images that install from package registries (``offline``), ReID
  folder readers and the P x K sampler (``reid``).
- ``offline``: real ImageNet weights that install from package registries.
- ``deploy``: ONNX / torch.export / TorchScript; ``launch``: timm's scripts with the models registered;
  ``cli``: the ``ptl-timm`` command line.
"""
from . import reid  # noqa: F401  (registers mgn_resnet50, ptl_mgn_resnet50 and the reid_* models)
from .hub import HubError
from .hub.io import export_checkpoint, load_model, save_pretrained
from .layers import (
    DEFAULT_STATE_MODE,
    STATE_MODES,
    BConvCell,
    bconv_cells,
    freeze_state,
    reset_state,
    unfreeze_state,
)
from .models import (
    DEFAULT_WIDTH_MULT,
    PTL_BACKBONES,
    PTLNet,
    checkpoint_filter_fn,
    create_ptl_model,
    resolve_cell_widths,
)

__version__ = '0.1.0'

__all__ = [
    'BConvCell', 'PTLNet', 'create_ptl_model', 'checkpoint_filter_fn', 'resolve_cell_widths',
    'reset_state', 'freeze_state', 'unfreeze_state', 'bconv_cells',
    'load_model', 'save_pretrained', 'export_checkpoint', 'HubError',
    'STATE_MODES', 'DEFAULT_STATE_MODE', 'DEFAULT_WIDTH_MULT', 'PTL_BACKBONES', '__version__',
]
