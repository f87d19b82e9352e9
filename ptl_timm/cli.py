"""The ``ptl-timm`` / ``python -m ptl_timm`` command line.

    list [PATTERN] [--tags]              registered ptl_* models, their tags, and the full-PTL checkpoints
    info NAME                            config, parameters, stages and cell widths (a name, tag, hf-hub:, local-dir:)
    export CHECKPOINT DIR                a checkpoint (train.py's, a state_dict, safetensors) to a Hub-ready folder
    push DIR REPO_ID                     upload an export folder with huggingface_hub
    deploy CHECKPOINT FILE               a checkpoint to ONNX (.onnx), torch.export (.pt2) or TorchScript (.pt)
    run SCRIPT [ARGS...]                 timm's train.py / validate.py / inference.py with the models registered
    extract FOLDER OUT.npy --model M     embed every image of a folder with a ReID model
    train-reid DATA --model M            the ReID recipe on a Market-1501 / Duke / MSMT17 folder or the emoji set

The same flags mean the same everywhere: ``--model`` (a model name), ``--ema`` (the EMA weights of a train.py
checkpoint), ``--model-kwargs K=V ...`` (model arguments, read as train.py reads its ``--model-kwargs``) and
``--img-size H [W]`` (the size of the images the model is given). Errors a user can act on print one line
(``error: ...``) and exit with status 2, without a traceback.
"""
import argparse
import ast
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import timm
from timm.models import get_arch_pretrained_cfgs, get_pretrained_cfg, parse_model_name, split_model_name_tag

from .deploy import EXPORT_FORMATS, deploy_checkpoint
from .hub import HubError
from .hub.io import export_checkpoint, load_model, push_folder
from .hub.kinds import backbone_name, inner_ptl_net
from .hub.manifest import load_manifest
from .launch import SCRIPT_NAMES, SCRIPTS_ENV, resolve_script, run_script
from .layers import bconv_cells
from .models import PTLNet
from .reid.extract import FeatureExtractor, list_images

__all__ = ['main', 'build_parser', 'ModelKwargs']

# library arguments -> the flags that set them, named after an error that mentions the argument
_FLAGS = dict(model_name='--model', use_ema='--ema', model_kwargs='--model-kwargs',
              export_checkpoint='ptl-timm export CHECKPOINT DIR')


class ModelKwargs(argparse.Action):
    """``K=V ...`` into a dict, values read as timm's train.py reads ``--model-kwargs`` (a Python literal, else the
    text): ``img_size=64 cell_norm=True cell_widths=[8,16,32,64,128] state_mode=carried``."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        kwargs: Dict[str, Any] = {}
        for item in values:
            key, sep, value = item.partition('=')
            if not sep or not key:
                parser.error(f'{option_string} expects key=value pairs, got {item!r}')
            try:
                kwargs[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kwargs[key] = value
        setattr(namespace, self.dest, kwargs)


def _img_size(values: Optional[List[int]]) -> Optional[Union[int, Tuple[int, int]]]:
    """``--img-size S`` (square) or ``--img-size H W``."""
    if not values:
        return None
    if len(values) > 2 or min(values) < 1:
        raise ValueError(f'--img-size takes one size or a height and a width, got {values}.')
    return values[0] if len(values) == 1 else (values[0], values[1])


def _add_model_flags(p: argparse.ArgumentParser, model_help: str, required: bool = False) -> None:
    p.add_argument('--model', required=required, help=model_help)
    p.add_argument('--ema', action='store_true', help="the EMA weights of a train.py checkpoint ('state_dict_ema')")
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ModelKwargs, metavar='K=V',
                   help='model arguments as train.py reads them, e.g. img_size=64 state_mode=carried '
                        "(img_size is the model's nominal size: the grid of the cells' state)")


def _add_img_size(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument('--img-size', type=int, nargs='+', metavar=('H', 'W'), help=f'{what}: one size or H W')


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


# --- parser -----------------------------------------------------------------------------------------------
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
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ModelKwargs, metavar='K=V',
                   help='model arguments as train.py reads them, e.g. num_classes=10 img_size=64')
    p.add_argument('--json', action='store_true', help='print JSON')
    p.set_defaults(func=cmd_info)

    p = sub.add_parser('export', help='a checkpoint to a Hub-ready folder (model.safetensors, config.json, README)')
    p.add_argument('checkpoint', help='train.py checkpoint (.pth.tar), a state_dict (.pth) or .safetensors')
    p.add_argument('directory', help='output folder')
    _add_model_flags(p, "registered model name (default: the checkpoint's 'arch')")
    _add_img_size(p, 'input size of the preprocessing recorded in config.json')
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

    p = sub.add_parser('deploy', help='a checkpoint to ONNX, torch.export or TorchScript, the latent state baked in')
    p.add_argument('checkpoint', help='train.py checkpoint (.pth.tar), a state_dict (.pth) or .safetensors')
    p.add_argument('output', help='file to write: .onnx, .pt2 (torch.export) or .pt (TorchScript)')
    _add_model_flags(p, "registered model name (default: the checkpoint's 'arch')")
    _add_img_size(p, "input size of the exported graph (default: train.py's, else the model's data config)")
    p.add_argument('--format', choices=list(EXPORT_FORMATS), help='default: from the output suffix')
    p.add_argument('--no-check', action='store_true', help='skip the comparison with the PyTorch model')
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser('run', help="timm's train.py / validate.py / inference.py with the ptl_* models registered",
                       description='Everything after SCRIPT (an optional -- first) goes to the script.')
    p.add_argument('--scripts-dir', metavar='DIR', help=f"folder of timm's scripts (default: ${SCRIPTS_ENV})")
    p.add_argument('script', help=f'{" | ".join(SCRIPT_NAMES)} or a path to a .py script')
    p.add_argument('script_args', nargs=argparse.REMAINDER, help='arguments of the script')
    p.set_defaults(func=cmd_run)

    p = sub.add_parser('extract', help='embed every image of a folder with a ReID model (.npy + the paths in .txt)')
    p.add_argument('folder', type=Path)
    p.add_argument('output', type=Path, help='.npy file to write')
    _add_model_flags(p, 'registered model name, e.g. reid_ptl_resnet50', required=True)
    p.add_argument('--checkpoint', type=Path, help='trained weights to load')
    p.add_argument('--pretrained', action='store_true', help="load the model's pretrained (backbone) weights")
    _add_img_size(p, "size the images are resized to (default: the model's data config)")
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--device', default='cpu')
    p.add_argument('--flip', action='store_true', help='average with the mirrored image')
    p.add_argument('--normalize', action='store_true', help='L2-normalise the embeddings')
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser('train-reid', help='train a ReID model with the recipe (P x K, triplet + CE, memory), evaluate',
                       description='Defaults: the recipe chosen on the emoji validation split (docs/reid.md). '
                                   'Under torchrun every rank trains on its share of the batches.')
    p.add_argument('data', nargs='?', type=Path,
                   help='dataset folder (Market-1501 layout or MSMT17); with --dataset emoji the node_modules folder '
                        'of the emoji packages (default: see load_emoji_reid)')
    p.add_argument('--dataset', default='auto', choices=('auto', 'market1501', 'dukemtmc', 'msmt17', 'emoji'),
                   help='auto: MSMT17 if DATA holds list_train.txt, else the Market-1501 layout')
    p.add_argument('--model', default='reid_ptl_resnet50', help='a ReID model (reid_*, mgn_resnet50, ...); the '
                   'control of a PTL model: --model-kwargs cells_removed=True')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ModelKwargs, metavar='K=V',
                   help='model arguments, e.g. state_mode=carried cells_removed=True')
    p.add_argument('--no-pretrained', dest='pretrained', action='store_false', help='random initial weights')
    p.add_argument('--pretrained-file', help='weights file of the pretrained backbone (an offline copy)')
    _add_img_size(p, 'training and test image size (default: 256 128, the emoji set: 64)')
    p.add_argument('--epochs', type=int, default=60)
    # not --p / --k: torchrun reads every flag of the command line and --p is a prefix of its own
    p.add_argument('--ids-per-batch', type=int, default=16, metavar='P', help='identities per batch (P)')
    p.add_argument('--num-instances', type=int, default=4, metavar='K', help='images per identity (K)')
    p.add_argument('--optimizer', default='adamw', choices=('adamw', 'adam'))
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--weight-decay', type=float, default=5e-4)
    p.add_argument('--schedule', default='onecycle', choices=('onecycle', 'step'))
    p.add_argument('--warmup', type=float, default=0.15, help='one-cycle: share of the steps of rising lr')
    p.add_argument('--milestones', type=int, nargs='*', default=[], help='step: epochs where lr drops x0.1')
    p.add_argument('--margin', type=float, default=0.3, help='triplet margin')
    p.add_argument('--label-smoothing', type=float, default=0.1)
    p.add_argument('--erasing', type=float, default=0.5, help='random erasing probability')
    p.add_argument('--memory', nargs='*', default=['identity'], choices=('identity', 'xbm'),
                   help='cross-batch memories in the loss (none: --memory with no value)')
    p.add_argument('--temperature', type=float, default=0.05, help='of the identity memory')
    p.add_argument('--identity-momentum', type=float, default=0.2)
    p.add_argument('--xbm-size', type=int, default=1024)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--amp', default='none', choices=('none', 'auto', 'bf16', 'fp16'),
                   help='autocast: auto = fp16 on CUDA, bf16 on CPU')
    p.add_argument('--compile', action='store_true', help='torch.compile the model')
    p.add_argument('--device', default='cpu', help='cpu or cuda (under torchrun: cuda:LOCAL_RANK)')
    p.add_argument('--workers', type=int, default=0, help='data loading processes')
    p.add_argument('--eval-every', type=int, default=0, help='epochs between evaluations (0: at the end)')
    p.add_argument('--rerank', action='store_true', help='k-reciprocal re-ranking in the evaluation')
    p.add_argument('--flip-test', action='store_true', help='test features averaged with the mirrored image')
    p.add_argument('--emoji-part', default='val', choices=('val', 'test'), help='emoji: the evaluation identities')
    p.add_argument('--output', type=Path, help='folder of the checkpoint last.pth.tar and metrics.json')
    p.add_argument('--resume', type=Path, help='continue a run from its last.pth.tar')
    p.add_argument('--no-progress', dest='progress', action='store_false', help='no progress bar')
    p.set_defaults(func=cmd_train_reid)

    return parser


def _cli_message(error: Exception) -> str:
    """The library's error, with the flags that set the arguments it names."""
    message = str(error)
    flags = [f'{flag} for {arg}' for arg, flag in _FLAGS.items() if arg in message]
    return message + (f' (on the command line: {"; ".join(flags)})' if flags else '')


_LOG_HANDLER = logging.StreamHandler()
_LOG_HANDLER.setFormatter(logging.Formatter('%(message)s'))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ('ptl_timm', 'timm'):  # not the root logger: huggingface_hub prints through its own handler
        if args.command == 'run':  # timm's scripts set up their own logging
            break
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO if args.verbose else logging.WARNING)
        if _LOG_HANDLER not in logger.handlers:  # main() may run several times in one process (tests)
            logger.addHandler(_LOG_HANDLER)
    try:
        args.func(args)
    except (HubError, ValueError, FileNotFoundError, ImportError) as e:
        print(f'error: {_cli_message(e)}', file=sys.stderr)
        return 2
    return 0
