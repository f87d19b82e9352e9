"""Hugging Face Hub I/O for PTL models: export, load with actionable errors, upload, and the weights manifest.

A full PTL checkpoint (backbone, cells, fuses, head and the cells' latent ``state`` / ``state_frozen``
buffers) is a folder in timm's own Hub format, so timm's loaders rebuild it::

    model.safetensors   # the whole state_dict, latent state included
    config.json         # timm's format: architecture, model_args (cell widths, state mode, ...), pretrained_cfg
    README.md           # model card

``timm.create_model('hf-hub:ORG/NAME', pretrained=True)`` and ``timm.create_model('local-dir:PATH',
pretrained=True)`` read ``config.json`` (timm passes ``model_args`` to the ``ptl_*`` entrypoint) and load
the weights through ``ptl_zoo.checkpoint_filter_fn``. :func:`load_model` is the same call with errors that
name the fix (offline cache miss, unregistered architecture, corrupted file).

``weights/manifest.json`` lists the checkpoints this project publishes or plans; every entry becomes a
registered tag ``ptl_X.tag`` whose ``hf_hub_id`` points at its PTL repo (:func:`manifest_pretrained_cfgs`,
:func:`tag_model_args`), and the model cards under ``weights/`` are rendered from it (:func:`render_zoo`).
"""
import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.models import parse_model_name, save_for_hf, split_model_name_tag
from timm.models._pretrained import PretrainedCfg

from .bconv_cell import bconv_cells
from .ptl_net import PTLNet

__all__ = [
    'HubError', 'MANIFEST_PATH', 'REPO_MANIFEST_PATH', 'WEIGHTS_NAME', 'STATUSES', 'file_sha256', 'ptl_model_args',
    'save_pretrained', 'read_checkpoint', 'model_from_checkpoint', 'export_checkpoint', 'load_model',
    'check_export_folder', 'push_folder', 'load_manifest', 'manifest_pretrained_cfgs', 'tag_model_args',
    'model_card', 'manifest_table', 'render_zoo', 'write_zoo',
]

_logger = logging.getLogger(__name__)

# The repository's manifest (weights/ beside the package: a checkout or an editable install) is the one that is
# edited and renders the model cards; a built package reads the copy setup.py put inside it.
REPO_MANIFEST_PATH = Path(__file__).resolve().parent.parent / 'weights' / 'manifest.json'
_PACKAGED_MANIFEST = Path(__file__).resolve().parent / '_manifest.json'
MANIFEST_PATH = _PACKAGED_MANIFEST if _PACKAGED_MANIFEST.is_file() else REPO_MANIFEST_PATH
WEIGHTS_NAME = 'model.safetensors'
STATUSES = ('published', 'not yet published')
_ENTRY_KEYS = ('name', 'hf_hub_id', 'status', 'task', 'data', 'backbone_weights', 'licence', 'recipe', 'command',
               'results', 'files', 'config')
_CFG_FIELDS = {f.name for f in dataclasses.fields(PretrainedCfg)}


class HubError(RuntimeError):
    """A Hub / checkpoint problem the user can act on; the message names the fix."""


def file_sha256(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


# --- export -----------------------------------------------------------------------------------------------
def ptl_model_args(model: PTLNet) -> Dict[str, Any]:
    """Arguments that rebuild ``model`` exactly, resolved from the model itself (not from defaults that a
    later ptl_timm version may change): the cell widths, state rule and the grid the state is stored at."""
    if not isinstance(model, PTLNet):
        raise ValueError(f'Expected a PTLNet (a ptl_* model), got {type(model).__name__}.')
    cell = next(bconv_cells(model))
    args = dict(
        cell_widths=list(model.cell_widths), state_mode=model.state_mode, img_size=list(model.img_size),
        kernel_size=cell.conv.kernel_size[0], in_chans=model.in_chans, num_classes=model.num_classes,
        global_pool=model.global_pool, cell_norm=isinstance(model.cell_norm, torch.nn.BatchNorm2d),
    )
    if model.state_mode == 'carried':
        args['state_slots'] = cell.state.shape[0]
    if hasattr(model, 'image_cells'):
        args['image_cells'] = bool(model.image_cells)
    return args


def _registered_architecture(model: PTLNet) -> str:
    arch = model.pretrained_cfg.get('architecture') or f'ptl_{model.backbone_name}'
    if not timm.is_model(arch):
        raise ValueError(
            f'{arch} is not a registered timm model (built with create_ptl_model around an unregistered backbone), '
            'so timm could not rebuild it from config.json. Export a registered ptl_* model: '
            f'{", ".join(timm.list_models("ptl_*"))}.')
    return arch


def save_pretrained(
        model: PTLNet,
        directory: Union[str, Path],
        data_config: Optional[Dict[str, Any]] = None,
        label_names: Optional[List[str]] = None,
        notes: Optional[str] = None,
        license: Optional[str] = None,
        repo_id: Optional[str] = None,
        training: Optional[Dict[str, Any]] = None,
) -> Dict[str, str]:
    """Write ``model`` as a Hub-ready folder with timm's ``save_for_hf``: model.safetensors, config.json
    (``model_args`` from :func:`ptl_model_args`) and README.md (:func:`model_card`, given ``repo_id`` and
    ``training``).

    ``data_config`` (input_size / img_size, mean, std, crop_pct, interpolation) describes the preprocessing
    the weights were trained with; default: the model's nominal ``img_size``. ``license`` replaces the one
    inherited from the backbone weights' cfg. Returns {file: sha256}.
    """
    _registered_architecture(model)
    directory = Path(directory)
    data_config = dict(data_config or {})
    if data_config.get('input_size') is None and data_config.get('img_size') is None:
        data_config['input_size'] = (model.in_chans, *model.img_size)
    # the source tag and its notes describe the backbone weights the training started from, not this file
    model_config: Dict[str, Any] = dict(pretrained_cfg=dict(
        tag=None, notes=[notes or 'Full PTL checkpoint: backbone, BConv-Cells, head and latent state.']))
    if license:
        model_config['pretrained_cfg']['license'] = license
    if label_names:
        if len(label_names) != model.num_classes:
            raise ValueError(f'{len(label_names)} label names for a model with {model.num_classes} classes.')
        model_config['label_names'] = list(label_names)
    save_for_hf(model, str(directory), model_config=model_config, model_args=ptl_model_args(model),
                safe_serialization=True, data_config=data_config)
    config_path = directory / 'config.json'
    config = json.loads(config_path.read_text())
    config['pretrained_cfg'] = {k: v for k, v in config['pretrained_cfg'].items() if v is not None}
    config_path.write_text(json.dumps(config, indent=2) + '\n')
    (directory / 'README.md').write_text(model_card(config, repo_id=repo_id, training=training))
    return {name: file_sha256(directory / name) for name in (WEIGHTS_NAME, 'config.json', 'README.md')}


def read_checkpoint(path: Union[str, Path], use_ema: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The state_dict of a train.py checkpoint (``state_dict`` / ``state_dict_ema``), a bare state_dict
    (.pth / .pt / .bin) or a safetensors file, and the checkpoint's metadata (``arch``, ``args``, ``epoch``,
    ``metric``, ``source``: which state_dict was taken)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'No checkpoint at {path}.')
    if path.suffix == '.safetensors':
        try:
            return load_file(str(path)), dict(source='safetensors')
        except SafetensorError as e:
            raise HubError(f'{path} is not a readable safetensors file ({e}): truncated or corrupted. '
                           'Copy or export it again.') from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # train.py stores its args namespace
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... for bad files
        raise HubError(f'{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e}): truncated, '
                       'corrupted or not a checkpoint.') from e
    if not isinstance(checkpoint, dict):
        raise HubError(f'{path} holds a {type(checkpoint).__name__}, not a state_dict or a train.py checkpoint.')
    if 'state_dict' in checkpoint or 'state_dict_ema' in checkpoint:
        key = 'state_dict_ema' if use_ema else 'state_dict'
        if checkpoint.get(key) is None:
            hint = ('it was trained without --model-ema; drop --ema' if use_ema else 'pass --ema to export the EMA')
            raise HubError(f'{path} has no {key!r} ({hint}). Keys: {", ".join(checkpoint)}.')
        if not use_ema and checkpoint.get('state_dict_ema') is not None:
            _logger.info(f'{path} also holds EMA weights (state_dict_ema); exporting the raw model (--ema: EMA).')
        state_dict = checkpoint[key]
        args = checkpoint.get('args')
        meta = dict(source=key, arch=checkpoint.get('arch'), epoch=checkpoint.get('epoch'),
                    metric=checkpoint.get('metric'), args=vars(args) if isinstance(args, argparse.Namespace) else args)
    else:
        if use_ema:
            raise HubError(f'{path} is a bare state_dict: it has no EMA weights; drop --ema.')
        state_dict, meta = checkpoint, dict(source='state_dict')
    prefixes = ('module.', '_orig_mod.')  # DDP / torch.compile wrappers
    clean = {}
    for k, v in state_dict.items():
        while k.startswith(prefixes):
            k = k.split('.', 1)[1]
        clean[k] = v
    return clean, meta


def _infer_model_args(state_dict: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Arguments the tensors themselves tell: the classes of the head and the slots of a 'carried' state."""
    args: Dict[str, Any] = dict(num_classes=state_dict['fc.weight'].shape[0] if 'fc.weight' in state_dict else 0)
    slots = next((v.shape[0] for k, v in state_dict.items() if k.startswith('cells.') and k.endswith('.state')), 1)
    if slots > 1:
        args.update(state_mode='carried', state_slots=slots)
    return args


# train.py arguments that create_model receives (train.py name -> model kwarg)
_TRAIN_MODEL_ARGS = dict(in_chans='in_chans', gp='global_pool', bn_momentum='bn_momentum', bn_eps='bn_eps')
_TRAIN_DATA_ARGS = ('input_size', 'img_size', 'mean', 'std', 'crop_pct', 'interpolation', 'crop_mode')


def model_from_checkpoint(
        checkpoint: Union[str, Path],
        model_name: Optional[str] = None,
        use_ema: bool = False,
        model_kwargs: Optional[Dict[str, Any]] = None,
) -> Tuple[PTLNet, Dict[str, Any]]:
    """The PTL model a checkpoint (see :func:`read_checkpoint`) holds, in eval mode, and the checkpoint's metadata.

    The model is rebuilt from ``model_name`` (default: the checkpoint's ``arch``), the train.py arguments
    stored in the checkpoint, what the tensors tell (classes, slots of a 'carried' state) and ``model_kwargs``
    (highest priority); the weights load through ``checkpoint_filter_fn`` (mismatching keys are listed).
    """
    from .ptl_zoo import checkpoint_filter_fn  # ptl_zoo imports this module for the manifest tags

    state_dict, meta = read_checkpoint(checkpoint, use_ema=use_ema)
    if not any(k.startswith('cells.') for k in state_dict):
        raise HubError(f'{checkpoint} holds no PTL tensors (cells.*): a plain backbone checkpoint is not a PTL model. '
                       "Load it into one with timm.create_model('ptl_X', pretrained=True, "
                       "pretrained_cfg_overlay=dict(file=PATH)), fine-tune, then export.")
    train_args = meta.get('args') or {}
    model_name = model_name or meta.get('arch')
    if not model_name:
        raise HubError(f'{checkpoint} does not say which model it holds: pass --model (e.g. ptl_resnet50).')
    arch = split_model_name_tag(model_name)[0]
    if not arch.startswith('ptl_') or not timm.is_model(arch):
        raise HubError(f'{arch!r} is not a registered ptl_* model; pass --model with one of: '
                       f'{", ".join(timm.list_models("ptl_*"))} (and `import ptl_timm` in your own code).')
    kwargs = {v: train_args[k] for k, v in _TRAIN_MODEL_ARGS.items() if train_args.get(k) is not None}
    kwargs.update(train_args.get('model_kwargs') or {})
    kwargs.update(_infer_model_args(state_dict))
    kwargs.update(model_kwargs or {})
    model = timm.create_model(arch, pretrained=False, **kwargs)
    try:
        model.load_state_dict(checkpoint_filter_fn(state_dict, model), strict=True)
    except ValueError as e:
        raise ValueError(f'{e}\nPass the settings it was trained with: --model-kwargs img_size=64 ... on the command '
                         'line, model_kwargs=dict(...) in Python.') from e
    return model.eval(), meta


def export_checkpoint(
        checkpoint: Union[str, Path],
        directory: Union[str, Path],
        model_name: Optional[str] = None,
        use_ema: bool = False,
        model_kwargs: Optional[Dict[str, Any]] = None,
        data_config: Optional[Dict[str, Any]] = None,
        label_names: Optional[List[str]] = None,
        repo_id: Optional[str] = None,
        license: Optional[str] = None,
) -> Dict[str, Any]:
    """Export a checkpoint to a Hub-ready folder and verify it.

    The model is rebuilt by :func:`model_from_checkpoint`. The folder is then loaded back with
    ``timm.create_model('local-dir:...')`` and must give bit-identical eval outputs.
    Returns a summary: model name, model_args, source state_dict, {file: sha256}, the folder.
    """
    model, meta = model_from_checkpoint(checkpoint, model_name, use_ema, model_kwargs)
    train_args = meta.get('args') or {}

    data = {k: train_args[k] for k in _TRAIN_DATA_ARGS if train_args.get(k) is not None}
    data.update(data_config or {})
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    training = dict(checkpoint=Path(checkpoint).name, weights=meta['source'])
    training.update({k: meta[k] for k in ('epoch', 'metric') if meta.get(k) is not None})
    with tempfile.TemporaryDirectory(dir=directory.parent) as tmp:
        hashes = save_pretrained(model, tmp, data_config=data, label_names=label_names, license=license,
                                 repo_id=repo_id, training=training)
        config = json.loads((Path(tmp) / 'config.json').read_text())
        _verify_round_trip(model, Path(tmp))
        for name in hashes:
            os.replace(Path(tmp) / name, directory / name)
    return dict(model=config['architecture'], model_args=config.get('model_args', {}), weights=meta['source'],
                files=hashes, directory=str(directory))


@torch.no_grad()
def _verify_round_trip(model: PTLNet, directory: Path) -> None:
    """Load ``directory`` the way users will and demand bit-identical eval outputs (latent state included)."""
    loaded = timm.create_model(f'local-dir:{directory}', pretrained=True).eval()
    x = torch.randn(2, model.in_chans, *model.img_size, generator=torch.Generator().manual_seed(0))
    if not torch.equal(model(x), loaded(x)):
        raise HubError(f'The export in {directory} does not reproduce the model exactly; please report this bug.')


# --- load -------------------------------------------------------------------------------------------------
def _hub_source(name: str, pretrained_cfg: Any = None) -> Tuple[Optional[str], Optional[str]]:
    """(kind, location) of the weights ``name`` loads: ('hf-hub', repo), ('local-dir', path) or (None, None)."""
    source, model_id = parse_model_name(name)
    if source:
        return source, model_id
    arch, tag = split_model_name_tag(model_id)
    if isinstance(pretrained_cfg, str):
        tag = pretrained_cfg
    cfg = timm.models.get_pretrained_cfg(f'{arch}.{tag}' if tag else arch) if timm.is_model(arch) else None
    if cfg is not None and cfg.hf_hub_id and not cfg.file and not cfg.state_dict:
        return 'hf-hub', cfg.hf_hub_id
    return None, None


def _manifest_note(repo_id: str) -> str:
    entry = next((e for e in load_manifest().values() if e['hf_hub_id'] == repo_id), None)
    if entry is None or entry['status'] == 'published':
        return ''
    return (f' {entry["name"]} is listed in weights/manifest.json as "{entry["status"]}": build it with '
            f'`{entry["command"]}`, then load that folder with local-dir:PATH.')


def _weights_path(kind: str, location: str, cache_dir: Optional[Union[str, Path]]) -> Optional[Path]:
    if kind == 'local-dir':
        path = Path(location) / WEIGHTS_NAME
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache
    repo_id, revision = (location.split('@') + [None])[:2]
    found = try_to_load_from_cache(repo_id, WEIGHTS_NAME, cache_dir=cache_dir, revision=revision)
    return Path(found) if isinstance(found, str) else None


def _corrupted_message(path: Optional[Path], error: Exception) -> str:
    if path is None:
        return f'The weights file is corrupted or truncated ({error}).'
    real = path.resolve()
    digest = file_sha256(real)
    msg = f'{path} is corrupted or truncated ({error}); sha256 {digest}, {real.stat().st_size} bytes.'
    # the Hub cache names a large file's blob after its sha256: a mismatch proves damage after download
    if real.parent.name == 'blobs' and len(real.name) == 64 and real.name != digest:
        msg += f' The Hub published sha256 {real.name}.'
    return msg + ' Delete it and download (or export) it again.'


def load_model(name: str, pretrained: bool = True, **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model(name, pretrained=pretrained, **kwargs)`` with errors that say what to do.

    ``name``: a ptl_* model or tag, ``hf-hub:ORG/NAME[@REV]`` or ``local-dir:PATH``. Raises HubError when
    the weights are not in the Hub cache while offline (naming the repo, the cache dir and
    ``HF_HUB_OFFLINE``) or are corrupted / truncated, ValueError when config.json names an architecture
    timm does not know (``import ptl_timm``) or the checkpoint does not fit the model (keys listed).
    """
    cache_dir = kwargs.get('cache_dir')
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (EntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError) as e:
        kind, location = _hub_source(name, kwargs.get('pretrained_cfg'))
        repo_id = (location or name).split('@')[0]
        cache = Path(cache_dir or hf_constants.HF_HUB_CACHE)
        offline = 'HF_HUB_OFFLINE=1 (offline mode)' if hf_constants.HF_HUB_OFFLINE else \
            'HF_HUB_OFFLINE is not set, but the Hub could not be reached'
        raise HubError(
            f'Hugging Face repo {repo_id} is not in the local Hub cache {cache} and cannot be downloaded: '
            f'{offline}. Download it on a connected machine (`hf download {repo_id}`) and copy the cache, point '
            f'HF_HUB_CACHE / HF_HOME at a cache that holds it, or load an exported folder with local-dir:PATH.'
            f'{_manifest_note(repo_id)} ({type(e).__name__})') from e
    except SafetensorError as e:
        kind, location = _hub_source(name, kwargs.get('pretrained_cfg'))
        path = _weights_path(kind, location, cache_dir) if kind else None
        raise HubError(_corrupted_message(path, e)) from e
    except RuntimeError as e:
        if not str(e).startswith('Unknown model'):
            raise
        source, model_id = parse_model_name(name)
        if source is None:
            raise ValueError(f'Unknown model {name!r}: `import ptl_timm` registers the ptl_* models '
                             f'({len(timm.list_models("ptl_*"))} now registered).') from e
        arch = str(e).split('(', 1)[-1].rstrip(')')
        raise ValueError(
            f'config.json of {name} names architecture {arch!r}, which is not registered in timm. `import ptl_timm` '
            f'registers the ptl_* models; this ptl_timm version knows {len(timm.list_models("ptl_*"))} '
            '(python -m ptl_timm list). A newer ptl_timm may be needed.') from e


# --- upload -----------------------------------------------------------------------------------------------
def check_export_folder(directory: Union[str, Path]) -> Dict[str, Any]:
    """Check that ``directory`` is a complete, readable export before it leaves the machine; returns config."""
    directory = Path(directory)
    missing = [n for n in (WEIGHTS_NAME, 'config.json', 'README.md') if not (directory / n).is_file()]
    if missing:
        raise HubError(f'{directory} is not an export folder: {", ".join(missing)} missing. '
                       'Create it with: python -m ptl_timm export CHECKPOINT DIR')
    try:
        config = json.loads((directory / 'config.json').read_text())
        arch = config['architecture']
    except (ValueError, KeyError) as e:
        raise HubError(f'{directory / "config.json"} is not a timm config ({e}); export the folder again.') from e
    try:
        load_file(str(directory / WEIGHTS_NAME))
    except SafetensorError as e:
        raise HubError(_corrupted_message(directory / WEIGHTS_NAME, e)) from e
    if not timm.is_model(arch):
        raise HubError(f'config.json names {arch!r}, not a registered model (`import ptl_timm`).')
    return config


def push_folder(
        directory: Union[str, Path],
        repo_id: str,
        private: bool = False,
        commit_message: str = 'Add PTL checkpoint',
        token: Optional[str] = None,
) -> str:
    """Upload an export folder to ``repo_id`` (created if needed); returns the commit URL.

    Raises HubError, before any upload, when the folder is incomplete, offline mode is on or no token is
    available, and with the server's reason when the upload fails.
    """
    from huggingface_hub import HfApi, get_token

    check_export_folder(directory)
    if hf_constants.HF_HUB_OFFLINE:
        raise HubError(f'Cannot push to {repo_id}: HF_HUB_OFFLINE=1 (offline mode). Unset it on a machine that '
                       'reaches huggingface.co.')
    try:
        token = token or get_token()
    except Exception as e:  # an OIDC exchange (HF_OIDC_RESOURCE) that failed
        raise HubError(f'Cannot push to {repo_id}: no token ({type(e).__name__}: {e}).') from e
    if not token:
        raise HubError(f'Cannot push to {repo_id}: not logged in. Run `hf auth login` or set HF_TOKEN to a token '
                       'with write access.')
    api = HfApi(token=token, library_name='ptl_timm')
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(directory), commit_message=commit_message,
                                   allow_patterns=[WEIGHTS_NAME, 'config.json', 'README.md'])
    except (HfHubHTTPError, OSError) as e:  # requests' ConnectionError is an OSError
        raise HubError(f'Upload to {repo_id} failed: {type(e).__name__}: {str(e).splitlines()[0]}. Check the '
                       'network, HF_ENDPOINT and that the token may write to this repo.') from e
    return commit.commit_url


# --- weights manifest -------------------------------------------------------------------------------------
def _entry_sha(entry: Dict[str, Any]) -> Optional[str]:
    """The recorded sha256 of a manifest entry's weights file, or None before it is built."""
    return (entry['files'] or {}).get(WEIGHTS_NAME, {}).get('sha256')


def load_manifest(path: Optional[Union[str, Path]] = None) -> Dict[str, Dict[str, Any]]:
    """Entries of the weights manifest (default :data:`MANIFEST_PATH`) by registered name, validated. A missing
    default manifest (a package built without setup.py's copy, outside a checkout) gives no entries."""
    path = Path(path) if path is not None else MANIFEST_PATH
    if not path.is_file():
        if path == MANIFEST_PATH:
            _logger.debug(f'No weights manifest at {path}: no full-PTL tags registered.')
            return {}
        raise FileNotFoundError(f'No weights manifest at {path}.')
    data = json.loads(path.read_text())
    entries: Dict[str, Dict[str, Any]] = {}
    for i, entry in enumerate(data.get('checkpoints', [])):
        missing = [k for k in _ENTRY_KEYS if k not in entry]
        name = entry.get('name', f'#{i}')
        problems = [f'missing {", ".join(missing)}'] if missing else []
        if not missing:
            arch, tag = split_model_name_tag(name)
            if not arch.startswith('ptl_') or not tag:
                problems.append('name must be ptl_<backbone>.<tag>')
            if entry['config'].get('architecture') != arch:
                problems.append(f'config architecture {entry["config"].get("architecture")!r} is not {arch!r}')
            if entry['status'] not in STATUSES:
                problems.append(f'status {entry["status"]!r} not in {STATUSES}')
            sha = _entry_sha(entry)
            if entry['status'] == 'published' and not sha:
                problems.append(f'published without the sha256 of {WEIGHTS_NAME}')
            if sha is not None and (len(sha) != 64 or set(sha) - set('0123456789abcdef')):
                problems.append(f'sha256 {sha!r} is not 64 hex digits')
        if name in entries:
            problems.append('duplicate name')
        if problems:
            raise ValueError(f'{path}: entry {name}: {"; ".join(problems)}.')
        entries[name] = entry
    return entries


def manifest_pretrained_cfgs(entries: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Pretrained cfgs of the full-PTL tags of ``entries`` (:func:`load_manifest`), to merge into
    ``ptl_zoo.default_cfgs``: the preprocessing of their config.json and ``hf_hub_id`` of their PTL repo."""
    cfgs = {}
    for name, entry in entries.items():
        cfg = {k: v for k, v in entry['config']['pretrained_cfg'].items() if k in _CFG_FIELDS}
        cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
        cfg.update(
            hf_hub_id=entry['hf_hub_id'], hf_hub_filename=WEIGHTS_NAME, architecture=None, tag=None,
            num_classes=entry['config']['num_classes'], label_names=entry['config'].get('label_names'),
            notes=(f'Full PTL checkpoint ({entry["status"]}): backbone, cells, head and latent state; '
                   f'{entry["task"]}.',),
        )
        cfgs[name] = cfg
    return cfgs


def tag_model_args(entries: Dict[str, Dict[str, Any]], variant: str, pretrained_cfg: Any = None) -> Dict[str, Any]:
    """``model_args`` of a full-PTL tag's config in ``entries`` (:func:`load_manifest`), for the ptl_*
    entrypoint: a registered tag (unlike an ``hf-hub:`` name) gets no ``model_args`` from timm, yet its cell
    widths and state grid must match."""
    if not isinstance(pretrained_cfg, str):
        return {}
    entry = entries.get(f'{variant}.{pretrained_cfg}')
    return copy.deepcopy(entry['config'].get('model_args', {})) if entry else {}


# --- model cards and the README table ---------------------------------------------------------------------
def _fmt(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def model_card(
        config: Dict[str, Any],
        repo_id: Optional[str] = None,
        entry: Optional[Dict[str, Any]] = None,
        training: Optional[Dict[str, Any]] = None,
) -> str:
    """Markdown model card (Hub front matter) of an export's ``config``; ``entry`` (a manifest entry) adds
    task, data, recipe, the reproducing command, measured results and licences; ``training`` notes the
    checkpoint it came from."""
    arch = config['architecture']
    backbone = arch[len('ptl_'):]
    args = config.get('model_args', {})
    cfg = config.get('pretrained_cfg', {})
    name = repo_id or (entry['hf_hub_id'] if entry else arch)
    licence = entry['licence'] if entry else cfg.get('license', 'other')
    lines = ['---', 'library_name: timm', f'license: {licence}', 'pipeline_tag: image-classification',
             'tags:', '- image-classification', '- timm', '- ptl_timm', '- progressive-transfer-learning', '---',
             f'# {name}', '']
    if entry:
        lines += [f'**Status: {entry["status"]}.**' + (
            ' The weights file is not on the Hub yet; the command below builds it.'
            if entry['status'] != 'published' else ''), '']
        lines += [f'{entry["task"]}', '']
    lines += [
        f'A Progressive Transfer Learning model (Yu et al., arXiv 1908.02492): timm `{backbone}` with a ladder of '
        'BConv-Cells whose latent state carries dataset-level information across training mini-batches. '
        'The checkpoint holds the backbone, the cells, the head and the latent state, so eval outputs are '
        'reproduced exactly.', '',
        '## Usage', '', '```python', 'import timm', 'import ptl_timm  # registers the ptl_* architectures', '',
        f"model = timm.create_model('hf-hub:{name}', pretrained=True).eval()",
    ]
    if entry:
        lines += [f"model = timm.create_model('{entry['name']}', pretrained=True).eval()  # same, registered tag"]
    lines += [
        "data_cfg = timm.data.resolve_data_config({}, model=model)",
        '```', '', 'Fine-tune on another task: `timm.create_model(..., pretrained=True, num_classes=N)` resets only '
        'the head; `model.reset_state()` zeroes the latent state before training on a new dataset.', '',
        '## Model details', '', '| field | value |', '|---|---|',
        f'| architecture | `{arch}` |', f'| backbone | `{backbone}` |',
        f'| classes | {config.get("num_classes")} |',
    ]
    for key in ('cell_widths', 'state_mode', 'state_slots', 'img_size', 'kernel_size', 'in_chans', 'global_pool',
                'cell_norm'):
        if key in args:
            lines.append(f'| {key} | `{_fmt(args[key])}` |')
    for key in ('input_size', 'mean', 'std', 'crop_pct', 'interpolation'):
        if key in cfg:
            lines.append(f'| {key} (preprocessing) | `{_fmt(cfg[key])}` |')
    if training:
        lines += ['', '## Source checkpoint', '']
        lines += [f'- {k}: `{_fmt(v)}`' for k, v in training.items()]
    if entry:
        data, bb = entry['data'], entry['backbone_weights']
        lines += ['', '## Training', '', f'- Data: {data["name"]} ({data["source"]}), licence {data["licence"]}. '
                  f'{data.get("split", "")}'.rstrip(),
                  f'- Backbone initialisation: {bb["source"]}, licence {bb["licence"]}.',
                  '- Recipe (weights/build.py: AdamW, one-cycle learning rate, cross-entropy): '
                  + ', '.join(f'{k}={_fmt(v)}' for k, v in entry['recipe'].items()) + '.',
                  '', 'Reproduce:', '', '```bash', entry['command'], '```', '',
                  '## Results', '']
        results = entry['results']
        if results:
            lines += [f'- {k}: {_fmt(v)}' for k, v in results.items()]
        else:
            lines += ['Not measured yet (the checkpoint has not been built).']
        sha = _entry_sha(entry)
        lines += ['', '## Files', '', f'- `{WEIGHTS_NAME}` sha256: `{sha}`' if sha else
                  f'- `{WEIGHTS_NAME}`: not built yet.']
        lines += ['', '## Licence', '', f'Model: {entry["licence"]}. Data: {data["licence"]}. '
                  f'Backbone weights: {bb["licence"]}.']
    return '\n'.join(lines) + '\n'


def manifest_table(path: Optional[Union[str, Path]] = None) -> str:
    """The README's table of full-PTL checkpoints, generated from the manifest."""
    rows = ['| tag | Hub repo | status | task | data | result | sha256 (model.safetensors) |',
            '|---|---|---|---|---|---|---|']
    for name, e in load_manifest(path).items():
        sha = _entry_sha(e)
        result = '; '.join(f'{k} {_fmt(v)}' for k, v in (e['results'] or {}).items() if k != 'measured') or '-'
        rows.append(f'| `{name}` | `{e["hf_hub_id"]}` | {e["status"]} | {e["task"]} | {e["data"]["name"]} | '
                    f'{result} | {f"`{sha[:12]}…`" if sha else "-"} |')
    return '\n'.join(rows) + '\n'


def render_zoo(path: Optional[Union[str, Path]] = None) -> Dict[Path, str]:
    """{file: text} of every ``weights/<name>/config.json`` and ``README.md``, rendered from the manifest
    (default: the repository's; an installed package's copy is never written beside)."""
    path = Path(path) if path is not None else REPO_MANIFEST_PATH
    files = {}
    for name, entry in load_manifest(path).items():
        folder = path.parent / name
        files[folder / 'config.json'] = json.dumps(entry['config'], indent=2) + '\n'
        files[folder / 'README.md'] = model_card(entry['config'], entry=entry)
    return files


def write_zoo(path: Optional[Union[str, Path]] = None, check: bool = False) -> List[Path]:
    """Bring ``weights/<name>/`` in line with the manifest (:func:`render_zoo`); returns the files that were
    out of date. ``check`` only reports them."""
    stale = []
    for file, text in render_zoo(path).items():
        if file.is_file() and file.read_text() == text:
            continue
        stale.append(file)
        if not check:
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(text)
    return stale
