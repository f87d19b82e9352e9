"""The ``ptl-timm`` / ``python -m ptl_timm`` command line: its parser.

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

This module is the parser alone and imports nothing but the standard library, so ``ptl-timm -h`` answers at once;
importing ``ptl_timm`` (torch, timm, the registry) waits until a command runs (``ptl_timm.cli``, the commands).
"""
import argparse
import ast
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

__all__ = ['main', 'build_parser', 'ModelKwargs', 'EXPORT_FORMATS', 'SCRIPT_NAMES']

# the choices the commands take; tests/test_cli.py checks them against ptl_timm.deploy and ptl_timm.launch
EXPORT_FORMATS = ('onnx', 'torchscript', 'export')
SCRIPT_NAMES = ('train', 'validate', 'inference')


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


def _add_model_flags(p: argparse.ArgumentParser, model_help: str, required: bool = False) -> None:
    p.add_argument('--model', required=required, help=model_help)
    p.add_argument('--ema', action='store_true', help="the EMA weights of a train.py checkpoint ('state_dict_ema')")
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ModelKwargs, metavar='K=V',
                   help='model arguments as train.py reads them, e.g. img_size=64 state_mode=carried '
                        "(img_size is the model's nominal size: the grid of the cells' state)")


def _add_img_size(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument('--img-size', type=int, nargs='+', metavar=('H', 'W'), help=f'{what}: one size or H W')


# --- parser -----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='ptl-timm', description='Progressive Transfer Learning models for timm.')
    parser.add_argument('-v', '--verbose', action='store_true', help='log timm / ptl_timm info messages')
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('list', help='registered ptl_* models, their tags and the full-PTL checkpoints')
    p.add_argument('pattern', nargs='?', help="fnmatch pattern, e.g. 'ptl_resnet*'")
    p.add_argument('--tags', action='store_true', help='every pretrained tag with its weight source')
    p.set_defaults(handler='cmd_list')

    p = sub.add_parser('info', help='config, parameters, stages and cell widths of a model')
    p.add_argument('name', help='ptl_resnet50, ptl_resnet50.a1_in1k, hf-hub:ORG/NAME or local-dir:PATH')
    p.add_argument('--pretrained', action='store_true', help='also load the weights (checks they are usable)')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ModelKwargs, metavar='K=V',
                   help='model arguments as train.py reads them, e.g. num_classes=10 img_size=64')
    p.add_argument('--json', action='store_true', help='print JSON')
    p.set_defaults(handler='cmd_info')

    p = sub.add_parser('export', help='a checkpoint to a Hub-ready folder (model.safetensors, config.json, README)')
    p.add_argument('checkpoint', help='train.py checkpoint (.pth.tar), a state_dict (.pth) or .safetensors')
    p.add_argument('directory', help='output folder')
    _add_model_flags(p, "registered model name (default: the checkpoint's 'arch')")
    _add_img_size(p, 'input size of the preprocessing recorded in config.json')
    p.add_argument('--label-names', help='text file, one class name per line')
    p.add_argument('--repo-id', help='Hub repo the folder is meant for (used in the model card)')
    p.add_argument('--license', help="licence id of the weights (default: the backbone weights' licence)")
    p.set_defaults(handler='cmd_export')

    p = sub.add_parser('push', help='upload an export folder to the Hugging Face Hub')
    p.add_argument('directory')
    p.add_argument('repo_id', help='ORG/NAME')
    p.add_argument('--private', action='store_true')
    p.add_argument('--message', default='Add PTL checkpoint', help='commit message')
    p.set_defaults(handler='cmd_push')

    p = sub.add_parser('deploy', help='a checkpoint to ONNX, torch.export or TorchScript, the latent state baked in')
    p.add_argument('checkpoint', help='train.py checkpoint (.pth.tar), a state_dict (.pth) or .safetensors')
    p.add_argument('output', help='file to write: .onnx, .pt2 (torch.export) or .pt (TorchScript)')
    _add_model_flags(p, "registered model name (default: the checkpoint's 'arch')")
    _add_img_size(p, "input size of the exported graph (default: train.py's, else the model's data config)")
    p.add_argument('--format', choices=EXPORT_FORMATS, help='default: from the output suffix')
    p.add_argument('--no-check', action='store_true', help='skip the comparison with the PyTorch model')
    p.set_defaults(handler='cmd_deploy')

    p = sub.add_parser('run', help="timm's train.py / validate.py / inference.py with the ptl_* models registered",
                       description='Everything after SCRIPT (an optional -- first) goes to the script.')
    p.add_argument('--scripts-dir', metavar='DIR', help="folder of timm's scripts (default: $PTL_TIMM_SCRIPTS)")
    p.add_argument('script', help=f'{" | ".join(SCRIPT_NAMES)} or a path to a .py script')
    p.add_argument('script_args', nargs=argparse.REMAINDER, help='arguments of the script')
    p.set_defaults(handler='cmd_run')

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
    p.set_defaults(handler='cmd_extract')

    p = sub.add_parser('train-reid', help='train a ReID model with the recipe (P x K, triplet + CE, memory), evaluate',
                       description='Defaults: the recipe chosen on the emoji validation split (docs/reid.md). '
                                   'Under torchrun every rank trains on its share of the batches.',
                       argument_default=argparse.SUPPRESS)
    p.add_argument('data', nargs='?', type=Path, default=None,
                   help='dataset folder (Market-1501 layout or MSMT17); with --dataset emoji the node_modules folder '
                        'of the emoji packages (default: see load_emoji_reid)')
    p.add_argument('--dataset', default='auto', choices=('auto', 'market1501', 'dukemtmc', 'msmt17', 'emoji'),
                   help='auto: MSMT17 if DATA holds list_train.txt, else the Market-1501 layout')
    p.add_argument('--model', help='a ReID model (reid_*, mgn_resnet50, ...; default: reid_ptl_resnet50); the '
                   'control of a PTL model: --model-kwargs cells_removed=True')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ModelKwargs, metavar='K=V',
                   help='model arguments, e.g. state_mode=carried cells_removed=True')
    p.add_argument('--no-pretrained', dest='pretrained', action='store_false', help='random initial weights')
    p.add_argument('--pretrained-file', help='weights file of the pretrained backbone (an offline copy)')
    _add_img_size(p, 'training and test image size (default: 256 128, the emoji set: 64)')
    p.add_argument('--epochs', type=int)
    # not --p / --k: torchrun reads every flag of the command line and --p is a prefix of its own
    p.add_argument('--ids-per-batch', type=int, metavar='P', help='identities per batch (P)')
    p.add_argument('--num-instances', type=int, metavar='K', help='images per identity (K)')
    p.add_argument('--optimizer', choices=('adamw', 'adam'))
    p.add_argument('--lr', type=float)
    p.add_argument('--weight-decay', type=float)
    p.add_argument('--schedule', choices=('onecycle', 'step'))
    p.add_argument('--warmup', type=float, help='one-cycle: share of the steps of rising lr')
    p.add_argument('--milestones', type=int, nargs='*', help='step: epochs where lr drops x0.1')
    p.add_argument('--margin', type=float, help='triplet margin')
    p.add_argument('--label-smoothing', type=float)
    p.add_argument('--erasing', type=float, help='random erasing probability')
    p.add_argument('--memory', nargs='*', choices=('identity', 'xbm'),
                   help='cross-batch memories in the loss (none: --memory with no value)')
    p.add_argument('--temperature', type=float, help='of the identity memory')
    p.add_argument('--identity-momentum', type=float)
    p.add_argument('--xbm-size', type=int)
    p.add_argument('--seed', type=int)
    p.add_argument('--amp', choices=('none', 'auto', 'bf16', 'fp16'),
                   help='autocast: auto = fp16 on CUDA, bf16 on CPU')
    p.add_argument('--compile', action='store_true', help='torch.compile the model')
    p.add_argument('--device', help='cpu or cuda (under torchrun: cuda:LOCAL_RANK)')
    p.add_argument('--workers', type=int, help='data loading processes')
    p.add_argument('--eval-every', type=int, help='epochs between evaluations (0: at the end)')
    p.add_argument('--rerank', action='store_true', help='k-reciprocal re-ranking in the evaluation')
    p.add_argument('--flip-test', action='store_true', help='test features averaged with the mirrored image')
    p.add_argument('--emoji-part', default='val', choices=('val', 'test'), help='emoji: the evaluation identities')
    p.add_argument('--output', type=Path, help='folder of the checkpoint last.pth.tar and metrics.json')
    p.add_argument('--resume', type=Path, default=None, help='continue a run from its last.pth.tar')
    p.add_argument('--no-progress', dest='progress', action='store_false', help='no progress bar')
    # the recipe's settings left out take ReIDTrainConfig's defaults (ptl_timm.reid.train.config_from_args)
    p.set_defaults(handler='cmd_train_reid')

    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from ptl_timm.cli import run  # the package (torch, timm, the registry) only once a command runs

    return run(args)
