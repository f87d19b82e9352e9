"""Model cards of full PTL checkpoints, and the table of the manifest's checkpoints in the docs."""
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .manifest import REPO_MANIFEST_PATH, WEIGHTS_NAME, entry_sha, load_manifest

__all__ = ['model_card', 'manifest_table', 'TABLE_MARKERS', 'replace_manifest_table', 'render_zoo', 'write_zoo']


def _fmt(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def model_card(
        config: Dict[str, Any],
        repo_id: Optional[str] = None,
        entry: Optional[Dict[str, Any]] = None,
        training: Optional[Dict[str, Any]] = None,
        backbone: Optional[str] = None,
        cells: bool = True,
) -> str:
    """Markdown model card (Hub front matter) of an export's ``config``; ``entry`` (a manifest entry) adds
    task, data, recipe, the reproducing command, measured results and licences; ``training`` notes the
    checkpoint it came from. ``backbone``: the timm backbone (default: a ``ptl_X`` manifest entry's X); ``cells``:
    whether the model has BConv-Cells (MGN and the ``reid_*`` models over a plain backbone have none)."""
    arch = config['architecture']
    backbone = backbone or arch[len('ptl_'):]
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
        'reproduced exactly.' if cells else
        f'A model of ptl_timm on timm `{backbone}`, without BConv-Cells. The checkpoint holds every tensor, so eval '
        'outputs are reproduced exactly.', '',
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
                'cell_norm', 'cells_removed'):
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
        sha = entry_sha(entry)
        lines += ['', '## Files', '', f'- `{WEIGHTS_NAME}` sha256: `{sha}`' if sha else
                  f'- `{WEIGHTS_NAME}`: not built yet.']
        lines += ['', '## Licence', '', f'Model: {entry["licence"]}. Data: {data["licence"]}. '
                  f'Backbone weights: {bb["licence"]}.']
    return '\n'.join(lines) + '\n'


def manifest_table(path: Optional[Union[str, Path]] = None) -> str:
    """The table of full-PTL checkpoints in docs/hub.md, generated from the manifest."""
    rows = ['| tag | Hub repo | status | task | data | result | sha256 (model.safetensors) |',
            '|---|---|---|---|---|---|---|']
    for name, e in load_manifest(path).items():
        sha = entry_sha(e)
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


TABLE_MARKERS = ('<!-- manifest-table -->\n', '<!-- /manifest-table -->')


def replace_manifest_table(path: Union[str, Path], table: Optional[str] = None) -> None:
    """Replace the text between the manifest-table markers of the Markdown file ``path`` with ``table``
    (default: :func:`manifest_table` of the default manifest)."""
    path = Path(path)
    text = path.read_text()
    start, end = (text.find(m) for m in TABLE_MARKERS)
    if start < 0 or end < start:
        raise ValueError(f'{path} has no {TABLE_MARKERS[0].strip()} ... {TABLE_MARKERS[1]} block.')
    path.write_text(text[:start + len(TABLE_MARKERS[0])] + (table or manifest_table()) + text[end:])
