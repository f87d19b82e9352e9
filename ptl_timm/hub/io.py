"""Hugging Face Hub I/O of full checkpoints of every model ptl_timm registers (``ptl_*``, MGN, ``reid_*``): save,
export from a checkpoint, load with actionable errors, push.

``timm.create_model('hf-hub:ORG/NAME', pretrained=True)`` and ``timm.create_model('local-dir:PATH',
pretrained=True)`` read ``config.json`` (timm passes ``model_args`` to the registered entry point) and load
the weights through the model's checkpoint filter. :func:`load_model` is the same call with
errors that name the fix (offline cache miss, unregistered architecture, corrupted file).
"""
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.models import (
    get_pretrained_cfg,
    load_model_config_from_hf,
    parse_model_name,
    save_for_hf,
    split_model_name_tag,
)
from torch import nn

from . import HubError
from .cache import cached_file, hub_weights_source, missing_weights_message, require_hub_files
from .checkpoint import TRAIN_DATA_ARGS, corrupted_file_message, file_sha256, model_from_checkpoint
from .kinds import backbone_name, has_cells, is_registered, model_args, registered_models
from .manifest import WEIGHTS_NAME
from .model_card import model_card

__all__ = [
    'save_pretrained', 'export_checkpoint', 'load_model', 'check_export_folder', 'push_folder',
]


def _registered_architecture(model: nn.Module) -> str:
    arch = model.pretrained_cfg.get('architecture')
    if not arch or not is_registered(arch):
        raise ValueError(
            f'{arch} is not a model ptl_timm registers (built with create_ptl_model or create_reid_model around an '
            'unregistered backbone), so timm could not rebuild it from config.json. Export a registered model: '
            f'{", ".join(registered_models())}.')
    return arch


def save_pretrained(
        model: nn.Module,
        directory: Union[str, Path],
        data_config: Optional[Dict[str, Any]] = None,
        label_names: Optional[List[str]] = None,
        notes: Optional[str] = None,
        license: Optional[str] = None,
        repo_id: Optional[str] = None,
        training: Optional[Dict[str, Any]] = None,
) -> Dict[str, str]:
    """Write ``model`` as a Hub-ready folder with timm's ``save_for_hf``: model.safetensors, config.json
    (``model_args`` from :func:`ptl_timm.hub.kinds.model_args`) and README.md (:func:`model_card`, given ``repo_id`` and
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
    default_note = ('Full PTL checkpoint: backbone, BConv-Cells, head and latent state.' if has_cells(model) else
                    'Full checkpoint: backbone and head.')
    model_config: Dict[str, Any] = dict(pretrained_cfg=dict(tag=None, notes=[notes or default_note]))
    if license:
        model_config['pretrained_cfg']['license'] = license
    if label_names:
        if len(label_names) != model.num_classes:
            raise ValueError(f'{len(label_names)} label names for a model with {model.num_classes} classes.')
        model_config['label_names'] = list(label_names)
    save_for_hf(model, str(directory), model_config=model_config, model_args=model_args(model),
                safe_serialization=True, data_config=data_config)
    config_path = directory / 'config.json'
    config = json.loads(config_path.read_text())
    config['pretrained_cfg'] = {k: v for k, v in config['pretrained_cfg'].items() if v is not None}
    # the grid of forward_features at the recorded input size (timm checks it against its models' cfgs)
    reduction = model.feature_info[-1]['reduction']
    config['pretrained_cfg']['pool_size'] = [-(-n // reduction) for n in config['pretrained_cfg']['input_size'][1:]]
    # num_classes lives at the root of config.json, from where timm passes it on; transformers' TimmWrapper
    # passes num_classes=num_labels next to model_args, so a copy in model_args is a duplicate keyword there
    config['model_args'].pop('num_classes', None)
    config_path.write_text(json.dumps(config, indent=2) + '\n')
    (directory / 'README.md').write_text(model_card(config, repo_id=repo_id, training=training,
                                                    backbone=backbone_name(model), cells=has_cells(model)))
    # safetensors writes its file owner-only (0600); a folder meant for sharing gets ordinary permissions
    _ordinary_permissions(directory / WEIGHTS_NAME)
    return {name: file_sha256(directory / name) for name in (WEIGHTS_NAME, 'config.json', 'README.md')}


def _ordinary_permissions(path: Path) -> None:
    """Give ``path`` the mode a newly created file gets under the process's umask (0644 under umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


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

    data = {k: train_args[k] for k in TRAIN_DATA_ARGS if train_args.get(k) is not None}
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
def _verify_round_trip(model: nn.Module, directory: Path) -> None:
    """Load ``directory`` the way users will and demand bit-identical eval outputs (latent state included)."""
    device = next(model.parameters()).device
    loaded = timm.create_model(f'local-dir:{directory}', pretrained=True).to(device).eval()
    x = torch.randn(2, model.in_chans, *model.img_size, generator=torch.Generator().manual_seed(0)).to(device)
    if not torch.equal(model(x), loaded(x)):
        raise HubError(f'The export in {directory} does not reproduce the model exactly; please report this bug.')


def _architecture(name: str, cache_dir: Optional[Union[str, Path]]) -> str:
    """The architecture ``name`` builds: its own, or the one its config.json names (``hf-hub:``, ``local-dir:``)."""
    source, model_id = parse_model_name(name)
    if source == 'hf-hub':
        require_hub_files(name, model_id, ('config.json',), cache_dir)
        return load_model_config_from_hf(model_id, cache_dir=cache_dir)[1]
    if source == 'local-dir':
        config = Path(model_id) / 'config.json'
        if not config.is_file():
            raise FileNotFoundError(f'{name}: no config.json in {model_id} (an export folder holds one).')
        return json.loads(config.read_text()).get('architecture', '')
    return split_model_name_tag(model_id)[0]


def _weights_file(name: str, pretrained_cfg: Any, cache_dir: Optional[Union[str, Path]]) -> Optional[Path]:
    """The weights file ``name`` loaded (a local-dir: folder's, or the Hub cache's), if it can be told."""
    source, model_id = parse_model_name(name)
    if source == 'local-dir':
        path = Path(model_id) / WEIGHTS_NAME
        return path if path.is_file() else None
    if source == 'hf-hub':
        return cached_file(model_id, (WEIGHTS_NAME,), cache_dir)
    arch, tag = split_model_name_tag(model_id)
    tag = pretrained_cfg if isinstance(pretrained_cfg, str) else tag
    cfg = get_pretrained_cfg(f'{arch}.{tag}' if tag else arch)
    hub = hub_weights_source(cfg.to_dict()) if cfg is not None else None
    return cached_file(*hub, cache_dir) if hub else None


def load_model(name: str, pretrained: bool = True, **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model(name, pretrained=pretrained, **kwargs)`` with errors that say what to do.

    ``name``: a ptl_* model or tag, ``hf-hub:ORG/NAME[@REV]`` or ``local-dir:PATH``. Raises HubError at once when
    the weights are neither in the local Hub cache nor downloadable (naming the repo, the cache dir,
    ``HF_HUB_OFFLINE`` and the other ways to load them) or are corrupted / truncated, ValueError when the name or
    config.json names an architecture timm does not know (``import ptl_timm``) or the checkpoint does not fit the
    model (keys listed).
    """
    cache_dir = kwargs.get('cache_dir')
    arch = _architecture(name, cache_dir)
    if not timm.is_model(arch):
        n = len(timm.list_models('ptl_*'))
        if parse_model_name(name)[0] is None:
            raise ValueError(f'Unknown model {name!r}: `import ptl_timm` registers the ptl_* models ({n} now '
                             'registered).')
        raise ValueError(
            f'config.json of {name} names architecture {arch!r}, which is not registered in timm. `import ptl_timm` '
            f'registers the ptl_* models; this ptl_timm version knows {n} (ptl-timm list). A newer ptl_timm may be '
            'needed.')
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (EntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError) as e:
        source, model_id = parse_model_name(name)
        repo_id = model_id if source == 'hf-hub' else name
        reason = f'{type(e).__name__}: {str(e).splitlines()[0]}'
        raise HubError(missing_weights_message(name, repo_id, reason, cache_dir)) from e
    except SafetensorError as e:
        raise HubError(corrupted_file_message(_weights_file(name, kwargs.get('pretrained_cfg'), cache_dir), e)) from e


def check_export_folder(directory: Union[str, Path]) -> Dict[str, Any]:
    """Check that ``directory`` is a complete, readable export before it leaves the machine; returns config."""
    directory = Path(directory)
    missing = [n for n in (WEIGHTS_NAME, 'config.json', 'README.md') if not (directory / n).is_file()]
    if missing:
        raise HubError(f'{directory} is not an export folder: {", ".join(missing)} missing. '
                       'Create it with export_checkpoint(checkpoint, directory).')
    try:
        config = json.loads((directory / 'config.json').read_text())
        arch = config['architecture']
    except (ValueError, KeyError) as e:
        raise HubError(f'{directory / "config.json"} is not a timm config ({e}); export the folder again.') from e
    try:
        load_file(str(directory / WEIGHTS_NAME))
    except SafetensorError as e:
        raise HubError(corrupted_file_message(directory / WEIGHTS_NAME, e)) from e
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
