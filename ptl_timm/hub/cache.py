"""Can a model's pretrained weights be had? A local file, the local Hub cache, or a Hub that answers; and the
error that names the fix when none can.

huggingface_hub retries an unreachable Hub for up to a minute before it gives up with a generic error. The
``ptl_*``, MGN and ReID model builders call :func:`require_pretrained` first, so a load that cannot succeed
fails at once and says what to do. This module reads the local cache and opens at most one TCP connection
(when nothing is cached and offline mode is off); it never downloads.
"""
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from timm.models import resolve_pretrained_cfg

from . import HubError
from .manifest import load_manifest

__all__ = ['hub_weights_source', 'cached_file', 'hub_reachable', 'missing_weights_message', 'require_hub_files',
           'require_pretrained']

# what timm's load_state_dict_from_hf reads when a cfg names no file: the safetensors alternative first
_HUB_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')
_PROBE_TIMEOUT_S = 3.0


def hub_weights_source(pretrained_cfg: Dict[str, Any]) -> Optional[Tuple[str, Tuple[str, ...]]]:
    """(repo id, files, any of which will do) that timm reads the weights of ``pretrained_cfg`` from on the Hub,
    or None when they come from elsewhere (a file, a state_dict, a local-dir: folder, a URL). Mirrors the order
    of timm's ``load_pretrained``."""
    if pretrained_cfg.get('source') == 'local-dir':
        return None
    if pretrained_cfg.get('source') != 'hf-hub' and (pretrained_cfg.get('state_dict') or pretrained_cfg.get('file')):
        return None
    repo_id = pretrained_cfg.get('hf_hub_id')
    if not repo_id:
        return None
    filename = pretrained_cfg.get('hf_hub_filename')
    return repo_id, (filename,) if filename else _HUB_WEIGHT_FILES


def cached_file(repo_id: str, filenames: Sequence[str], cache_dir: Optional[Union[str, Path]] = None
                ) -> Optional[Path]:
    """The first of ``filenames`` the local Hub cache holds for ``repo_id`` (``ORG/NAME[@REVISION]``), or None."""
    repo, _, revision = repo_id.partition('@')
    for filename in filenames:
        found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir, revision=revision or None)
        if isinstance(found, str):
            return Path(found)
    return None


def hub_reachable(timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hub endpoint (or the HTTPS proxy in use) opens within ``timeout`` s,
    name resolution included."""
    proxy = urllib.request.getproxies().get('https')
    url = urllib.parse.urlsplit(proxy or hf_constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == 'https' else 80)
    opened = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(timeout)
    return bool(opened)


def _manifest_note(repo_id: str) -> str:
    entry = next((e for e in load_manifest().values() if e['hf_hub_id'] == repo_id.split('@')[0]), None)
    if entry is None or entry['status'] == 'published':
        return ''
    return (f' {entry["name"]} is listed in weights/manifest.json as "{entry["status"]}": build it with '
            f'`{entry["command"]}`, then load that folder with local-dir:PATH.')


def missing_weights_message(what: str, repo_id: str, reason: str, cache_dir: Optional[Union[str, Path]] = None
                            ) -> str:
    """Why ``what`` cannot load from the Hugging Face repo ``repo_id`` (``reason``), and the ways to fix it."""
    cache = Path(cache_dir or hf_constants.HF_HUB_CACHE)
    name = 'NAME' if ':' in what else what  # a hf-hub: name takes no file overlay
    return (
        f'{what} needs the Hugging Face repo {repo_id}, which is not in the local Hub cache {cache} and cannot be '
        f'downloaded: {reason}. Fixes: copy a Hub cache that holds it (`hf download {repo_id}` on a connected '
        'machine) and point HF_HUB_CACHE or HF_HOME at it, with HF_HUB_OFFLINE=1 so that nothing tries the '
        f"network; or load the weights from a file: timm.create_model('{name}', pretrained=True, "
        "pretrained_cfg_overlay=dict(file=PATH)); or load an exported PTL folder: "
        f"timm.create_model('local-dir:PATH', pretrained=True).{_manifest_note(repo_id)}")


def require_hub_files(what: str, repo_id: str, filenames: Sequence[str],
                      cache_dir: Optional[Union[str, Path]] = None) -> None:
    """Raise HubError at once when none of ``filenames`` of ``repo_id`` is cached and the Hub cannot be
    reached (offline mode, or no connection); otherwise return and let huggingface_hub fetch or reuse it."""
    if cached_file(repo_id, filenames, cache_dir) is not None:
        return
    if hf_constants.HF_HUB_OFFLINE:
        reason = 'HF_HUB_OFFLINE=1 (offline mode)'
    elif not hub_reachable():
        reason = f'HF_HUB_OFFLINE is not set, but {hf_constants.ENDPOINT} cannot be reached'
    else:
        return
    raise HubError(missing_weights_message(what, repo_id, reason, cache_dir))


def require_pretrained(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> None:
    """For a model builder: fail fast (:func:`require_hub_files`) when ``pretrained`` weights of ``variant`` with
    the builder's ``kwargs`` (``pretrained_cfg``, ``pretrained_cfg_overlay``, ``cache_dir``) would come from a Hub
    that cannot be reached, resolving the cfg as timm's ``build_model_with_cfg`` does."""
    if not pretrained:
        return
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                 pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay')).to_dict()
    source = hub_weights_source(cfg)
    if source is not None:
        tag = cfg.get('tag')
        require_hub_files(f'{variant}.{tag}' if tag else variant, *source, cache_dir=kwargs.get('cache_dir'))
