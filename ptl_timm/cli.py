"""The ``ptl-timm`` / ``python -m ptl_timm`` commands: one ``cmd_*`` function per subcommand and :func:`run`.

The commands and their flags are listed in ``ptl_timm_cli`` (the parser, which imports no torch so that
``ptl-timm -h`` answers at once). Errors a user can act on print one line (``error: ...``) and exit with status 2,
without a traceback.
"""
import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import timm
from timm.models import get_arch_pretrained_cfgs, get_pretrained_cfg, parse_model_name, split_model_name_tag

from ptl_timm_cli import build_parser, main  # noqa: F401  (the command line's entry points, re-exported)

from .deploy import deploy_checkpoint
from .hub import HubError
from .hub.io import export_checkpoint, load_model, push_folder
from .hub.kinds import backbone_name, inner_ptl_net
from .hub.manifest import load_manifest
from .launch import resolve_script, run_script
from .layers import bconv_cells
from .models import PTLNet
from .reid.extract import FeatureExtractor, list_images

__all__ = ['main', 'build_parser', 'run']

# library arguments -> the flags that set them, named after an error that mentions the argument
_FLAGS = dict(model_name='--model', use_ema='--ema', model_kwargs='--model-kwargs',
              export_checkpoint='ptl-timm export CHECKPOINT DIR')


def _img_size(values: Optional[List[int]]) -> Optional[Union[int, Tuple[int, int]]]:
    """``--img-size S`` (square) or ``--img-size H W``."""
    if not values:
        return None
    if len(values) > 2 or min(values) < 1:
        raise ValueError(f'--img-size takes one size or a height and a width, got {values}.')
    return values[0] if len(values) == 1 else (values[0], values[1])


# --- commands ---------------------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> None:
    manifest = load_manifest()
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
    model = load_model(args.name, pretrained=args.pretrained, **args.model_kwargs)
    cfg = model.pretrained_cfg
    cells = list(bconv_cells(model))
    full = parse_model_name(args.name)[0] is not None or args.name in load_manifest()
    kind = ('full PTL (backbone, cells, head, latent state)' if cells else 'full (backbone, head)') if full else \
        'backbone only (the rest fresh)'
    info: Dict[str, Any] = dict(
        name=args.name, architecture=cfg.get('architecture'), model_class=type(model).__name__,
        backbone=backbone_name(model),
        weights=f'{kind}, {"loaded" if args.pretrained else "not loaded (--pretrained loads them)"}',
        params=_param_count(model),
    )
    ptl = inner_ptl_net(model)
    if ptl is not None:  # a PTLNet, or the one a ReID model is built on
        total, backbone = _param_count(ptl), _param_count(ptl.backbone)
        # the overhead as the model table counts it: against the plain timm model with the same classes
        plain = _param_count(timm.create_model(ptl.backbone_name, num_classes=ptl.num_classes))
        info.update(params_backbone=backbone, params_plain=plain,
                    ptl_overhead=f'{100.0 * (total - plain) / plain:+.1f} % parameters over {ptl.backbone_name} with '
                                 f'the same {ptl.num_classes} classes (cells, fuses, the classifier\'s wider input)')
    info.update(num_classes=model.num_classes, num_features=model.num_features)
    if cells:
        info.update(state_mode=cells[0].state_mode, cell_widths=list((ptl or model).cell_widths))
    info['img_size'] = list(model.img_size)
    if ptl is not None:
        info['stages'] = _stages(ptl)
    info['pretrained_cfg'] = {k: v for k, v in cfg.items() if k in (
        'hf_hub_id', 'source', 'tag', 'input_size', 'interpolation', 'crop_pct', 'mean', 'std', 'num_classes',
        'license', 'notes') and v is not None}
    info['cells'] = len(cells)
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
    img_size = _img_size(args.img_size)
    labels = Path(args.label_names).read_text().split() if args.label_names else None
    summary = export_checkpoint(
        args.checkpoint, args.directory, model_name=args.model, use_ema=args.ema, model_kwargs=args.model_kwargs,
        data_config=dict(img_size=img_size) if img_size else None, label_names=labels, repo_id=args.repo_id,
        license=args.license)
    print(f'Exported {summary["model"]} ({summary["weights"]}) to {summary["directory"]}; '
          'verified: timm.create_model(local-dir:) gives bit-identical eval outputs.')
    print(f'model_args: {json.dumps(summary["model_args"])}')
    for name, digest in summary['files'].items():
        print(f'  {name}  sha256 {digest}')


def cmd_push(args: argparse.Namespace) -> None:
    url = push_folder(args.directory, args.repo_id, private=args.private, commit_message=args.message)
    print(f'Pushed {args.directory} to {args.repo_id}: {url}')
    print(f"Load it with: timm.create_model('hf-hub:{args.repo_id}', pretrained=True) after `import ptl_timm`.")


def cmd_deploy(args: argparse.Namespace) -> None:
    summary = deploy_checkpoint(
        args.checkpoint, args.output, fmt=args.format, model_name=args.model, use_ema=args.ema,
        model_kwargs=args.model_kwargs, img_size=_img_size(args.img_size), check=not args.no_check)
    print(f'Exported {summary["model"]} ({summary["input_size"]}, dynamic batch) to {summary["path"]}')
    if summary['max_abs_difference'] is not None:
        print(f'Checked against PyTorch eval at batch sizes 1 and 3: max abs difference '
              f'{summary["max_abs_difference"]:.3g}')


def cmd_run(args: argparse.Namespace) -> None:
    script = resolve_script(args.script, args.scripts_dir)
    run_script(script, args.script_args[1:] if args.script_args[:1] == ['--'] else args.script_args)


def cmd_extract(args: argparse.Namespace) -> None:
    files = list_images(args.folder)
    extractor = FeatureExtractor(
        args.model, checkpoint=args.checkpoint, use_ema=args.ema, pretrained=args.pretrained,
        image_size=_img_size(args.img_size), batch_size=args.batch_size,
        device=args.device, flip=args.flip, normalize=args.normalize, **args.model_kwargs)
    feats = extractor(files).numpy()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.output, feats)
    args.output.with_suffix('.txt').write_text(''.join(f'{p.relative_to(args.folder)}\n' for p in files))
    print(f'{len(files)} images -> {args.output} {feats.shape}, paths in {args.output.with_suffix(".txt")}')


def cmd_train_reid(args: argparse.Namespace) -> None:
    from .reid.train import run_from_args  # lazily: the training loop is not needed to list commands

    run_from_args(args)


def _cli_message(error: Exception) -> str:
    """The library's error, with the flags that set the arguments it names."""
    message = str(error)
    flags = [f'{flag} for {arg}' for arg, flag in _FLAGS.items() if arg in message]
    return message + (f' (on the command line: {"; ".join(flags)})' if flags else '')


_LOG_HANDLER = logging.StreamHandler()
_LOG_HANDLER.setFormatter(logging.Formatter('%(message)s'))


def run(args: argparse.Namespace) -> int:
    """Run the command ``args`` (parsed by :func:`ptl_timm_cli.build_parser`); the exit status."""
    for name in ('ptl_timm', 'timm'):  # not the root logger: huggingface_hub prints through its own handler
        if args.command == 'run':  # timm's scripts set up their own logging
            break
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO if args.verbose else logging.WARNING)
        if _LOG_HANDLER not in logger.handlers:  # main() may run several times in one process (tests)
            logger.addHandler(_LOG_HANDLER)
    try:
        globals()[args.handler](args)
    except (HubError, ValueError, FileNotFoundError, ImportError) as e:
        print(f'error: {_cli_message(e)}', file=sys.stderr)
        return 2
    return 0
