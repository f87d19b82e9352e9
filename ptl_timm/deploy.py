"""Export a model for deployment: TorchScript, torch.export and ONNX, with the frozen latent state baked in (any model
ptl_timm registers: ``ptl_*``, MGN, ``reid_*``; any timm model too).

A model in eval mode never writes its state: every forward reads the same dataset-level state, so for deployment
the state is a constant of the graph, like BN running statistics. ONNX and torch.export graphs take images of one
spatial size (the one given at export; the state is resampled to that grid once, in the graph) and any batch
size; TorchScript (compiled, not traced) takes any size::

    from ptl_timm.deploy import export_onnx
    export_onnx(model, 'model.onnx', input_size=(3, 224, 224))   # input 'input' (B, 3, 224, 224) -> 'output'

or from a checkpoint written by timm's train.py (its arch, classes, --model-kwargs and image size are read
from the checkpoint): :func:`deploy_checkpoint`, on the command line ``ptl-timm deploy CHECKPOINT model.onnx``.
:func:`check_export` reloads the file and compares it with the PyTorch eval model at two batch sizes (ONNX
through onnxruntime: ``pip install onnx onnxruntime onnxscript``).
"""
import copy
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from timm.data import resolve_data_config
from timm.layers import to_2tuple
from torch import nn

from .hub.checkpoint import model_from_checkpoint
from .layers import bconv_cells

__all__ = [
    'EXPORT_FORMATS', 'prepare_for_export', 'example_input', 'export_torchscript', 'export_program', 'export_onnx',
    'export_model', 'load_exported', 'check_export', 'deploy_checkpoint',
]

_logger = logging.getLogger(__name__)

EXPORT_FORMATS: Dict[str, str] = {'onnx': '.onnx', 'torchscript': '.pt', 'export': '.pt2'}
ONNX_INPUT, ONNX_OUTPUT = 'input', 'output'
_ONNX_MAX_PROTO_BYTES = 2 ** 31 - 2 ** 26  # protobuf's 2 GiB limit, with room for the graph


def prepare_for_export(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with the latent state frozen and no parameter requiring grad.

    The copy reads the state it was given forever (freezing also holds if someone calls ``.train()``);
    later training of ``model`` does not change it. Warns when a stateful cell still holds the all-zero
    initial state (a model that never trained, or whose state was reset).
    """
    model = copy.deepcopy(model).eval()
    cells = list(bconv_cells(model))
    for cell in cells:
        cell.freeze_state()
    untrained = [cell for cell in cells if cell.state_mode != 'reset' and not cell.state.any()]
    if untrained:
        _logger.warning(
            f'{len(untrained)} of {len(cells)} BConv-Cells hold the all-zero initial state: exporting a model whose '
            'state never trained (or was reset). Export the fine-tuned checkpoint instead.')
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _input_size(model: nn.Module, input_size: Optional[Sequence[int]]) -> Tuple[int, int, int]:
    if input_size is None:
        input_size = resolve_data_config({}, model=model)['input_size']
    if len(input_size) != 3 or min(input_size) < 1:
        raise ValueError(f'input_size must be (channels, height, width), got {tuple(input_size)}.')
    return tuple(int(s) for s in input_size)


def example_input(model: nn.Module, input_size: Optional[Sequence[int]] = None, batch_size: int = 2) -> torch.Tensor:
    """A (batch_size, C, H, W) example on the model's device and in its dtype (the same numbers on every device);
    ``input_size`` defaults to the model's data config (``pretrained_cfg``)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *_input_size(model, input_size), generator=generator)
    ref = next(model.parameters(), None)
    return x if ref is None else x.to(device=ref.device, dtype=ref.dtype)


def _batch_dim() -> torch.export.Dim:
    return torch.export.Dim('batch', min=1)


def export_torchscript(model: nn.Module, path: Union[str, Path], input_size: Optional[Sequence[int]] = None) -> Path:
    """TorchScript (loads with ``torch.jit.load``, no ptl_timm or timm needed): compiled with ``torch.jit.script``,
    so any batch and spatial size. A model TorchScript cannot compile (a backbone whose forward is not a chain of
    its modules) is traced instead, with a warning: any batch size, the traced spatial size."""
    model = prepare_for_export(model)
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit.script's deprecation notice
        try:
            scripted = torch.jit.script(model)
        except (ValueError, RuntimeError) as e:
            _logger.warning(f'torch.jit.script failed ({type(e).__name__}: {str(e).splitlines()[0]}); tracing '
                            'instead: the TorchScript file takes the example\'s spatial size only.')
            with torch.no_grad():
                # the tracer warns about every shape test: fixing the spatial size is the intent here
                warnings.simplefilter('ignore', torch.jit.TracerWarning)
                scripted = torch.jit.trace(model, example_input(model, input_size))
    scripted.save(str(path))
    return path


def export_program(model: nn.Module, path: Union[str, Path], input_size: Optional[Sequence[int]] = None) -> Path:
    """``torch.export`` ExportedProgram (``torch.export.load(path).module()``), dynamic batch, fixed spatial size."""
    model = prepare_for_export(model)
    path = Path(path)
    program = torch.export.export(model, (example_input(model, input_size),), dynamic_shapes=({0: _batch_dim()},))
    torch.export.save(program, str(path))
    return path


def export_onnx(
        model: nn.Module,
        path: Union[str, Path],
        input_size: Optional[Sequence[int]] = None,
        opset_version: int = 18,
) -> Path:
    """ONNX through ``torch.onnx.export`` (the torch.export-based exporter), input ``'input'`` (batch, C, H, W)
    with a dynamic batch dimension, output ``'output'``. Opset >= 18 is needed for the antialiased resampling
    of the state to the input's grid. Weights go inside the file unless it would pass protobuf's 2 GiB limit."""
    if opset_version < 18:
        raise ValueError(f'opset_version must be >= 18 (antialiased Resize of the state), got {opset_version}.')
    model = prepare_for_export(model)
    path = Path(path)
    n_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    torch.onnx.export(
        model, (example_input(model, input_size),), str(path),
        input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
        dynamic_shapes=({0: _batch_dim()},), opset_version=opset_version,
        external_data=n_bytes > _ONNX_MAX_PROTO_BYTES,
    )
    return path


_EXPORTERS: Dict[str, Callable[..., Path]] = {
    'onnx': export_onnx, 'torchscript': export_torchscript, 'export': export_program,
}


def _format_of(path: Path) -> Optional[str]:
    """The export format a file suffix names (``EXPORT_FORMATS``), or None."""
    return next((f for f, suffix in EXPORT_FORMATS.items() if path.suffix == suffix), None)


def export_model(
        model: nn.Module,
        path: Union[str, Path],
        fmt: Optional[str] = None,
        input_size: Optional[Sequence[int]] = None,
) -> Path:
    """Export in ``fmt`` (``'onnx'``, ``'torchscript'``, ``'export'``), by default the one ``path``'s suffix names."""
    path = Path(path)
    if fmt is None:
        fmt = _format_of(path)
        if fmt is None:
            raise ValueError(f'Cannot tell the export format from {path.name!r}: give fmt= one of '
                             f'{list(EXPORT_FORMATS)} or a file ending in {", ".join(EXPORT_FORMATS.values())}.')
    if fmt not in _EXPORTERS:
        raise ValueError(f'Unknown export format {fmt!r}; choose one of {list(EXPORT_FORMATS)}.')
    return _EXPORTERS[fmt](model, path, input_size=input_size)


def load_exported(path: Union[str, Path], fmt: Optional[str] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function images (B, C, H, W) -> outputs (B, ...) running an exported file (ONNX with onnxruntime)."""
    path = Path(path)
    fmt = fmt or _format_of(path)
    if fmt == 'torchscript':
        return torch.jit.load(str(path)).eval()
    if fmt == 'export':
        return torch.export.load(str(path)).module()
    if fmt == 'onnx':
        try:
            import onnxruntime
        except ImportError as e:
            raise ImportError('Running an ONNX file needs onnxruntime: pip install onnxruntime') from e
        session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
        return lambda x: torch.from_numpy(session.run([ONNX_OUTPUT], {ONNX_INPUT: x.detach().cpu().numpy()})[0])
    raise ValueError(f'Unknown export format {fmt!r} for {path.name}; choose one of {list(EXPORT_FORMATS)}.')


def check_export(
        model: nn.Module,
        path: Union[str, Path],
        fmt: Optional[str] = None,
        input_size: Optional[Sequence[int]] = None,
        batch_sizes: Sequence[int] = (1, 3),
        rtol: float = 1e-3,
        atol: float = 1e-5,
) -> float:
    """Compare the exported file with ``model`` in eval mode at several batch sizes; returns the largest absolute
    difference, raises AssertionError beyond ``rtol`` / ``atol``."""
    reference = prepare_for_export(model)
    run = load_exported(path, fmt)
    worst = 0.
    for batch_size in batch_sizes:
        x = example_input(reference, input_size, batch_size)
        with torch.no_grad():
            expected, got = reference(x), run(x)
        got = got.to(expected.device)  # onnxruntime answers on the CPU
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, msg=lambda m, b=batch_size: f'batch {b}: {m}')
        worst = max(worst, (got - expected).abs().max().item())
    return worst


def deploy_checkpoint(
        checkpoint: Union[str, Path],
        path: Union[str, Path],
        fmt: Optional[str] = None,
        model_name: Optional[str] = None,
        use_ema: bool = False,
        model_kwargs: Optional[Dict[str, Any]] = None,
        img_size: Optional[Union[int, Tuple[int, int]]] = None,
        check: bool = True,
) -> Dict[str, Any]:
    """Export the model a checkpoint holds (``ptl_timm.hub.checkpoint.model_from_checkpoint``: a train.py
    checkpoint names its model and arguments) for deployment, and check the file against it.

    The input size is ``img_size`` (H, W or one int), else the one train.py was run with, else the model's
    data config. Returns the model name, the input size, the file, and the largest difference of the check.
    """
    model, meta = model_from_checkpoint(checkpoint, model_name, use_ema, model_kwargs)
    if img_size is not None:
        input_size = (model.in_chans, *to_2tuple(img_size))
    else:
        input_size = resolve_data_config(meta.get('args') or {}, model=model)['input_size']
    path = export_model(model, path, fmt, input_size)
    worst = check_export(model, path, fmt, input_size) if check else None
    return dict(model=model.pretrained_cfg['architecture'], input_size=tuple(input_size), path=path,
                max_abs_difference=worst)
