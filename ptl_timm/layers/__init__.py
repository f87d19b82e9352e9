"""Layers of PTL models: the BConv-Cell with its latent state, and the ladder of cells beside a backbone."""
from .bconv_cell import (
    DEFAULT_STATE_MODE,
    STATE_MODES,
    BConvCell,
    StateMode,
    bconv_cells,
    freeze_state,
    reset_state,
    stride_chain,
    unfreeze_state,
)
from .ladder import (
    ConcatFuse,
    FuseLayer,
    Ladder,
    LadderMixin,
    LadderStage,
    StageFuse,
    StageJoin,
    build_ladder,
    match_size,
    strided_grid,
)

__all__ = [
    'BConvCell', 'StateMode', 'STATE_MODES', 'DEFAULT_STATE_MODE', 'bconv_cells', 'reset_state', 'freeze_state',
    'unfreeze_state', 'stride_chain', 'StageFuse', 'ConcatFuse', 'StageJoin', 'FuseLayer', 'LadderStage', 'Ladder',
    'LadderMixin', 'build_ladder', 'strided_grid', 'match_size',
]
