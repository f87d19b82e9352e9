"""The weights manifest: the full PTL checkpoints this project publishes or plans.

``weights/manifest.json`` lists them; every entry becomes a registered tag ``ptl_X.tag`` whose ``hf_hub_id``
points at its PTL repo (:func:`manifest_pretrained_cfgs`, :func:`tag_model_args`), and the model cards under
``weights/`` are rendered from it (``ptl_timm.hub.model_card``). This module imports nothing else of
ptl_timm: the model registry reads it at import.
"""
import copy
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Union

from timm.models import split_model_name_tag
from timm.models._pretrained import PretrainedCfg

__all__ = [
    'MANIFEST_PATH', 'REPO_MANIFEST_PATH', 'WEIGHTS_NAME', 'STATUSES', 'entry_sha', 'load_manifest',
    'manifest_pretrained_cfgs', 'tag_model_args',
]

_logger = logging.getLogger(__name__)

# The repository's manifest (weights/ beside the package: a checkout or an editable install) is the one that is
# edited and renders the model cards; a built package reads the copy setup.py put inside it.
REPO_MANIFEST_PATH = Path(__file__).resolve().parents[2] / 'weights' / 'manifest.json'
_PACKAGED_MANIFEST = Path(__file__).resolve().parents[1] / '_manifest.json'
MANIFEST_PATH = _PACKAGED_MANIFEST if _PACKAGED_MANIFEST.is_file() else REPO_MANIFEST_PATH
WEIGHTS_NAME = 'model.safetensors'
STATUSES = ('published', 'not yet published')
_ENTRY_KEYS = ('name', 'hf_hub_id', 'status', 'task', 'data', 'backbone_weights', 'licence', 'recipe', 'command',
               'results', 'files', 'config')
_CFG_FIELDS = {f.name for f in dataclasses.fields(PretrainedCfg)}


def entry_sha(entry: Dict[str, Any]) -> Optional[str]:
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
            sha = entry_sha(entry)
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
    """Pretrained cfgs of the full-PTL tags of ``entries`` (:func:`load_manifest`), to merge into the
    ``default_cfgs`` of ``ptl_timm.models.ptlnet``: the preprocessing of their config.json and the ``hf_hub_id``
    of their PTL repo."""
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
