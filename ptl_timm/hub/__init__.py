"""Full PTL checkpoints: the weights manifest, reading checkpoints, Hub I/O and model cards.

A full PTL checkpoint (backbone, cells, fuses, head and the cells' latent ``state`` / ``state_frozen``
buffers) is a folder in timm's own Hub format, so timm's loaders rebuild it::

    model.safetensors   # the whole state_dict, latent state included
    config.json         # timm's format: architecture, model_args (cell widths, state mode, ...), pretrained_cfg
    README.md           # model card

Modules, from the bottom up (each imports only those above it):

- :mod:`.manifest`: the weights manifest (``weights/manifest.json``) and the pretrained cfgs of its tags;
  imports nothing else of ptl_timm, so the model registry can read it.
- :mod:`.cache`: whether the local Hub cache holds a model's weights, and the error that names the fix when
  they can be had neither from it nor from the Hub.
- :mod:`.checkpoint`: reading train.py checkpoints and rebuilding the PTL model one holds.
- :mod:`.model_card`: model cards and the table of the manifest's checkpoints.
- :mod:`.io`: ``save_pretrained``, ``export_checkpoint``, ``load_model``, ``push_folder``.
"""

__all__ = ['HubError']


class HubError(RuntimeError):
    """A Hub / checkpoint problem the user can act on; the message names the fix."""
