"""What the ReID model files share: the pretrained cfg of a ReID model, and checkpoint fitting."""
import math
from typing import Any, Dict, Optional, Tuple

import torch
from timm.models import get_pretrained_cfg
from torch import nn

from ..models._helpers import check_state_dict_fits

__all__ = ['REID_CFG', 'fit_checkpoint', 'pool_size']

# A backbone's pretrained cfg as a ReID model's: person crops at full size, no identity classifier (the
# input size, its pool size and the classifier's name are the model's own).
REID_CFG: Dict[str, Any] = dict(
    test_input_size=None, min_input_size=None, fixed_input_size=False, crop_pct=1.0, test_crop_pct=None,
    test_pool_size=None, num_classes=0, label_names=None, label_descriptions=None,
)


def fit_checkpoint(state_dict: Dict[str, torch.Tensor], model: nn.Module, fresh_prefixes: Tuple[str, ...],
                   skip: Tuple[str, ...], what: str) -> Dict[str, torch.Tensor]:
    """Add the model's fresh tensors under ``fresh_prefixes``; raise naming every key that does not fit."""
    out = dict(state_dict)
    out.update({k: v for k, v in model.state_dict().items() if k.startswith(fresh_prefixes) and k not in out})
    check_state_dict_fits(out, model, skip, f'The {what} checkpoint does not fit {type(model).__name__}',
                          'It comes from another architecture or other settings; create the model with the settings '
                          'it was trained with.')
    return out


def pool_size(backbone: str, input_size: Tuple[int, int, int]) -> Optional[Tuple[int, int]]:
    """The (H, W) grid of ``backbone``'s final features at ``input_size``, at the total stride its pretrained cfg
    implies (input size over pool size); None when the cfg gives no pool size."""
    cfg = get_pretrained_cfg(backbone)
    if cfg is None or not cfg.pool_size:
        return None
    strides = (cfg.input_size[1] / cfg.pool_size[0], cfg.input_size[2] / cfg.pool_size[1])
    return math.ceil(input_size[1] / strides[0]), math.ceil(input_size[2] / strides[1])
