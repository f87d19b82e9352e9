"""The ``ptl-timm`` / ``python -m ptl_timm`` command line.

    list [PATTERN] [--tags]          registered ptl_* models, their tags, and the full-PTL checkpoints
    info NAME                        config, parameters, stages and cell widths of a model / tag / hf-hub: / local-dir:
    export CHECKPOINT DIR [--ema]    a train.py checkpoint (or state_dict / safetensors) to a Hub-ready folder
    push DIR REPO_ID                 upload an export folder with huggingface_hub
    manifest-table [--update MD...]  the README's table of weights/manifest.json
    zoo [--check]                    render weights/<name>/config.json and README.md from the manifest

Errors a user can act on print one line (``error: ...``) and exit with status 2, without a traceback.
"""
import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import timm
from timm.models import get_arch_pretrained_cfgs, get_pretrained_cfg, parse_model_name, split_model_name_tag

from . import hub
from .bconv_cell import bconv_cells
from .ptl_net import PTLNet

__all__ = ['main', 'build_parser']


def _parse_kwargs(items: Optional[List[str]]) -> Dict[str, Any]:
    """``k=v`` pairs, values read as JSON when they parse (``cell_widths=[8,16]``, ``img_size=64``)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise ValueError(f'--model-kwargs expects key=value pairs, got {item!r}.')
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def cmd_list(args: argparse.Namespace) -> None:
    manifest = hub.load_manifest()
    for model_name in timm.list_models(args.pattern or 'ptl_*'):
        if not model_name.startswith('ptl_'):
            continue
        tags = [split_model_name_tag(n)[1] for n in get_arch_pretrained_cfgs(model_name)]
        full = [t for t in tags if f'{model_name}.{t}' in manifest]
        line = f'{model_name:28s} {len(tags) - len(full):3d} backbone-only tags (default: {tags[0] or "-"})'
        if full:
            line += f', full PTL: {", ".join(full)}'
        print(line)
        if args.tags:
            for tag in tags:
                cfg = get_pretrained_cfg(f'{model_name}.{tag}')
                kind = 'full PTL' if f'{model_name}.{tag}' in manifest else 'backbone only'
                print(f'    {f"{model_name}.{tag}":48s} {kind:13s} {cfg.hf_hub_id or cfg.url or "-"}')
    if manifest:
        print('\nFull PTL checkpoints (weights/manifest.json):')
        for name, entry in manifest.items():
            print(f'  {name:40s} {entry["status"]:18s} hf-hub:{entry["hf_hub_id"]}')


def _param_count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def _stages(model: PTLNet) -> List[Dict[str, Any]]:
    """One row per backbone stage: its channels and reduction, and the cells beside it (if any)."""
    stages = model.backbone.feature_info
    offset = len(stages) - len(model.cells)  # the ladder's cells sit beside the last stages
    rows = []
    for k, info in enumerate(stages):
        row = dict(stage=k, module=f'backbone.{info["module"]}', reduction=info['reduction'],
                   backbone_chs=info['num_chs'], cell_width=None, cell_strides=None, state_shape=None)
        if k >= offset:
            cells = model.cells[k - offset]
            row.update(cell_width=cells[-1].out_chs, cell_strides=[c.stride for c in cells],
                       state_shape=list(cells[-1].state.shape))
        rows.append(row)
    return rows


def cmd_info(args: argparse.Namespace) -> None:
    kwargs = _parse_kwargs(args.model_kwargs)
    model = hub.load_model(args.name, pretrained=args.pretrained, **kwargs)
    if not isinstance(model, PTLNet):
        raise ValueError(f'{args.name} is a {type(model).__name__}, not a PTL model (ptl_*).')
    total, backbone = _param_count(model), _param_count(model.backbone)
    cfg = model.pretrained_cfg
    full_ptl = parse_model_name(args.name)[0] is not None or args.name in hub.load_manifest()
    weights = 'full PTL (backbone, cells, head, latent state)' if full_ptl else 'backbone only (cells, head fresh)'
    info = dict(
        name=args.name, architecture=cfg.get('architecture'), backbone=model.backbone_name,
        weights=f'{weights}, {"loaded" if args.pretrained else "not loaded (--pretrained loads them)"}',
        params=total, params_backbone=backbone, params_ptl=total - backbone,
        ptl_overhead=f'{100.0 * (total - backbone) / backbone:+.1f} %',
        num_classes=model.num_classes, num_features=model.num_features, state_mode=model.state_mode,
        cell_widths=list(model.cell_widths), img_size=list(model.img_size),
        stages=_stages(model),
        pretrained_cfg={k: v for k, v in cfg.items() if k in (
            'hf_hub_id', 'source', 'tag', 'input_size', 'interpolation', 'crop_pct', 'mean', 'std', 'num_classes',
            'license', 'notes') and v is not None},
        cells=len(list(bconv_cells(model))),
    )
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return
    for key, value in info.items():
        if key == 'stages':
            print('stages:')
            print('  k  reduction  backbone_chs  cell_width  cell_strides  state_shape              module')
            for s in value:
                width, strides, shape = (str(s[k] or '-') for k in ('cell_width', 'cell_strides', 'state_shape'))
                print(f'  {s["stage"]}  {s["reduction"]:9d}  {s["backbone_chs"]:12d}  {width:>10s}  {strides:12s}  '
                      f'{shape:23s}  {s["module"]}')
        elif key == 'pretrained_cfg':
            print('pretrained_cfg:')
            for k, v in value.items():
                print(f'  {k}: {v}')
        else:
            print(f'{key}: {value}')


def cmd_export(args: argparse.Namespace) -> None:
    data = {}
    if args.img_size:
        data['img_size'] = args.img_size
    labels = Path(args.label_names).read_text().split() if args.label_names else None
    summary = hub.export_checkpoint(
        args.checkpoint, args.directory, model_name=args.model, use_ema=args.ema,
        model_kwargs=_parse_kwargs(args.model_kwargs), data_config=data, label_names=labels, repo_id=args.repo_id,
        license=args.license)
    print(f'Exported {summary["model"]} ({summary["weights"]}) to {summary["directory"]}; '
          'verified: timm.create_model(local-dir:) gives bit-identical eval outputs.')
    print(f'model_args: {json.dumps(summary["model_args"])}')
    for name, digest in summary['files'].items():
        print(f'  {name}  sha256 {digest}')


def cmd_push(args: argparse.Namespace) -> None:
    url = hub.push_folder(args.directory, args.repo_id, private=args.private, commit_message=args.message)
    print(f'Pushed {args.directory} to {args.repo_id}: {url}')
    print(f"Load it with: timm.create_model('hf-hub:{args.repo_id}', pretrained=True) after `import ptl_timm`.")


TABLE_MARKERS = ('<!-- manifest-table -->\n', '<!-- /manifest-table -->')


def replace_manifest_table(path: Path, table: str) -> None:
    """Replace the text between the manifest-table markers of ``path`` with ``table``."""
    text = path.read_text()
    start, end = (text.find(m) for m in TABLE_MARKERS)
    if start < 0 or end < start:
        raise ValueError(f'{path} has no {TABLE_MARKERS[0].strip()} ... {TABLE_MARKERS[1]} block.')
    path.write_text(text[:start + len(TABLE_MARKERS[0])] + table + text[end:])


def cmd_manifest_table(args: argparse.Namespace) -> None:
    table = hub.manifest_table(args.manifest)
    if not args.update:
        sys.stdout.write(table)
        return
    for path in args.update:
        replace_manifest_table(path, table)
        print(f'Updated the table in {path}.')


def cmd_zoo(args: argparse.Namespace) -> None:
    stale = hub.write_zoo(args.manifest, check=args.check)
    if args.check and stale:
        raise ValueError(f'Out of date with the manifest: {", ".join(map(str, stale))}. Run: python -m ptl_timm zoo')
    print(f'{"Checked" if args.check else "Wrote"} the model cards of {len(hub.load_manifest(args.manifest))} '
          f'manifest entries' + (f' ({len(stale)} updated)' if stale and not args.check else '') + '.')


_LOG_HANDLER = logging.StreamHandler()
_LOG_HANDLER.setFormatter(logging.Formatter('%(message)s'))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='ptl-timm', description='Progressive Transfer Learning models for timm.')
    parser.add_argument('-v', '--verbose', action='store_true', help='log timm / ptl_timm info messages')
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('list', help='registered ptl_* models, their tags and the full-PTL checkpoints')
    p.add_argument('pattern', nargs='?', help="fnmatch pattern, e.g. 'ptl_resnet*'")
    p.add_argument('--tags', action='store_true', help='every pretrained tag with its weight source')
    p.set_defaults(func=cmd_list)

    p = sub.add_parser('info', help='config, parameters, stages and cell widths of a model')
    p.add_argument('name', help='ptl_resnet50, ptl_resnet50.a1_in1k, hf-hub:ORG/NAME or local-dir:PATH')
    p.add_argument('--pretrained', action='store_true', help='also load the weights (checks they are usable)')
    p.add_argument('--model-kwargs', nargs='*', metavar='K=V', help='model arguments, e.g. num_classes=10')
    p.add_argument('--json', action='store_true', help='print JSON')
    p.set_defaults(func=cmd_info)

    p = sub.add_parser('export', help='a checkpoint to a Hub-ready folder (model.safetensors, config.json, README)')
    p.add_argument('checkpoint', help="train.py checkpoint (.pth.tar), a state_dict (.pth) or .safetensors")
    p.add_argument('directory', help='output folder')
    p.add_argument('--model', help="ptl_* model name (default: the checkpoint's 'arch')")
    p.add_argument('--ema', action='store_true', help="export the EMA weights ('state_dict_ema')")
    p.add_argument('--model-kwargs', nargs='*', metavar='K=V', help='model arguments the checkpoint was trained '
                   'with, when it does not store them (e.g. img_size=64 state_mode=carried)')
    p.add_argument('--img-size', type=int, help='input size of the preprocessing recorded in config.json')
    p.add_argument('--label-names', help='text file, one class name per line')
    p.add_argument('--repo-id', help='Hub repo the folder is meant for (used in the model card)')
    p.add_argument('--license', help="licence id of the weights (default: the backbone weights' licence)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser('push', help='upload an export folder to the Hugging Face Hub')
    p.add_argument('directory')
    p.add_argument('repo_id', help='ORG/NAME')
    p.add_argument('--private', action='store_true')
    p.add_argument('--message', default='Add PTL checkpoint', help='commit message')
    p.set_defaults(func=cmd_push)

    p = sub.add_parser('manifest-table', help="print the README's table of weights/manifest.json")
    p.add_argument('--manifest', type=Path, help='manifest path (default: weights/manifest.json)')
    p.add_argument('--update', type=Path, nargs='+', metavar='MARKDOWN',
                   help='replace the table between <!-- manifest-table --> markers in these files')
    p.set_defaults(func=cmd_manifest_table)

    p = sub.add_parser('zoo', help='render weights/<name>/config.json and README.md from the manifest')
    p.add_argument('--manifest', type=Path, help='manifest path (default: weights/manifest.json)')
    p.add_argument('--check', action='store_true', help='only check that the files are up to date')
    p.set_defaults(func=cmd_zoo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ('ptl_timm', 'timm'):  # not the root logger: huggingface_hub prints through its own handler
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO if args.verbose else logging.WARNING)
        if _LOG_HANDLER not in logger.handlers:  # main() may run several times in one process (tests)
            logger.addHandler(_LOG_HANDLER)
    try:
        args.func(args)
    except (hub.HubError, ValueError, FileNotFoundError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
