"""The ReID recipe, one training loop: ``ptl-timm train-reid`` and :func:`train_reid`.

The recipe (defaults of :class:`ReIDTrainConfig`, chosen on the emoji validation split, docs/reid.md): a BNNeck
model (``reid_*``: plain, PTL, or the control with ``cells_removed=True``), P x K batches, random flip and random
erasing, batch-hard triplet (margin 0.3) + cross-entropy with label smoothing 0.1, AdamW with a one-cycle schedule
(its first 15 % a warm-up), and the identity memory in the loss (:class:`~ptl_timm.reid.memory.IdentityMemory`).
Evaluation: query / gallery with the standard protocol (or cross-camera on one table), mAP, rank-1, mINP.

Everything random is drawn from seeded generators (the model's initialisation from ``seed``, batches from the
P x K sampler, augmentation from its own generator) and saved in the checkpoint with the model, optimiser,
scheduler, memories and gradient scaler: a resumed run continues bit-exactly. Under ``torchrun`` every rank takes
its own share of each epoch's batches; the memories apply every rank's batch (:mod:`ptl_timm.reid.memory`).
Checkpoints are train.py's format (``state_dict``, ``arch``, ``args``, ``epoch``), read by ``ptl-timm extract``.
"""
import dataclasses
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
import torch.distributed as dist
from torch import nn

from ..data.reid import PKBatchSampler
from ..data.tables import ImageTable, ReIDData, batches_of
from .losses import ReIDLoss
from .memory import IdentityMemory, build_memories, identity_centroids
from .metrics import evaluate

__all__ = ['ReIDTrainConfig', 'train_reid', 'create_model', 'embed_table', 'evaluate_data', 'random_erasing',
           'load_training_checkpoint', 'AMP_MODES']

_logger = logging.getLogger(__name__)

AMP_MODES = ('none', 'auto', 'bf16', 'fp16')
CHECKPOINT_NAME = 'last.pth.tar'


@dataclasses.dataclass
class ReIDTrainConfig:
    """The recipe's settings. ``memories``: any of 'identity', 'xbm' (in that order of loss terms), none for ()."""
    model: str = 'reid_ptl_resnet50'
    model_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    pretrained: bool = True
    pretrained_file: Optional[str] = None  # weights file for the pretrained cfg (an offline copy)
    img_size: Tuple[int, int] = (256, 128)
    epochs: int = 60
    p: int = 16
    k: int = 4
    optimizer: str = 'adamw'  # or 'adam' (amsgrad, the PTL paper's)
    lr: float = 1e-3
    weight_decay: float = 5e-4
    schedule: str = 'onecycle'  # or 'step' (x0.1 at each of `milestones`, epochs)
    warmup: float = 0.15  # one-cycle: the share of steps the learning rate rises
    milestones: Tuple[int, ...] = ()
    margin: float = 0.3
    label_smoothing: float = 0.1
    flip: float = 0.5
    erasing: float = 0.5
    memories: Tuple[str, ...] = ('identity',)
    identity_momentum: float = 0.2
    temperature: float = 0.05
    xbm_size: int = 1024
    xbm_start_epochs: int = 1
    seed: int = 0
    channels_last: bool = True
    amp: str = 'none'
    compile: bool = False
    device: str = 'cpu'
    workers: int = 0
    eval_every: int = 0  # epochs; 0: at the end only
    eval_batch: int = 256
    rerank: bool = False
    flip_test: bool = False
    output: Optional[str] = None  # folder of last.pth.tar (None: no checkpoint)
    progress: bool = True

    def check(self) -> None:
        if self.optimizer not in ('adamw', 'adam'):
            raise ValueError(f"optimizer must be 'adamw' or 'adam', got {self.optimizer!r}.")
        if self.schedule not in ('onecycle', 'step'):
            raise ValueError(f"schedule must be 'onecycle' or 'step', got {self.schedule!r}.")
        if self.amp not in AMP_MODES:
            raise ValueError(f'amp must be one of {list(AMP_MODES)}, got {self.amp!r}.')
        if self.epochs < 1:
            raise ValueError(f'epochs must be >= 1, got {self.epochs}.')


def random_erasing(x: torch.Tensor, gen: torch.Generator, p: float = 0.5, area: Tuple[float, float] = (0.02, 0.4),
                   ratio: Tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """Zhong et al.'s random erasing of a batch (B, C, H, W): one rectangle per image with probability ``p``,
    filled with 0 (the normalised mean), drawn from ``gen``."""
    x = x.clone()
    h, w = x.shape[-2:]
    draws = torch.rand(len(x), 5, generator=gen).tolist()
    for i, (u, a, r, y0, x0) in enumerate(draws):
        if u >= p:
            continue
        target = (area[0] + a * (area[1] - area[0])) * h * w
        aspect = math.exp(math.log(ratio[0]) + r * (math.log(ratio[1]) - math.log(ratio[0])))
        eh, ew = min(h, round(math.sqrt(target * aspect))), min(w, round(math.sqrt(target / aspect)))
        top, left = int(y0 * (h - eh + 1)), int(x0 * (w - ew + 1))
        x[i, :, top:top + eh, left:left + ew] = 0
    return x


def augment(x: torch.Tensor, gen: torch.Generator, flip: float, erasing: float) -> torch.Tensor:
    """Random horizontal flip (probability ``flip``) then random erasing (``erasing``) of (B, C, H, W), from
    ``gen``; a probability of 0 draws nothing."""
    if flip:
        mirror = torch.rand(len(x), generator=gen) < flip
        x = torch.where(mirror.view(-1, 1, 1, 1), x.flip(3), x)
    if erasing:
        x = random_erasing(x, gen, erasing)
    return x


def create_model(cfg: ReIDTrainConfig, num_classes: int) -> nn.Module:
    """The ReID model of ``cfg`` (``reid_output=True``), its initialisation drawn after ``torch.manual_seed(seed)``."""
    kwargs = dict(cfg.model_kwargs)
    kwargs.setdefault('img_size', tuple(cfg.img_size))
    if cfg.pretrained and cfg.pretrained_file:
        kwargs['pretrained_cfg_overlay'] = dict(file=str(cfg.pretrained_file))
    not_reid = ValueError(f'{cfg.model} is not a ReID model of ptl_timm (reid_*, mgn_resnet50, ptl_mgn_resnet50): '
                          'the recipe needs its ReIDOutput; for a backbone X use reid_X (create_reid_model).')
    torch.manual_seed(cfg.seed)
    try:
        model = timm.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=num_classes, reid_output=True,
                                  **kwargs)
    except TypeError as e:
        if 'reid_output' in str(e):
            raise not_reid from e
        raise
    if not hasattr(model, 'forward_reid_head'):
        raise not_reid
    model = model.to(cfg.device)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _input(table: ImageTable, indices: Sequence[int], cfg: ReIDTrainConfig) -> torch.Tensor:
    x = table[indices]
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x


@torch.no_grad()
def embed_table(model: nn.Module, table: ImageTable, cfg: ReIDTrainConfig) -> torch.Tensor:
    """Eval-mode embeddings (N, D) of every image of ``table``, in order (with ``flip_test`` the mean with the
    mirrored image's)."""
    from .extract import flip_embed

    model.eval()
    out = []
    for idx in batches_of(len(table), cfg.eval_batch):
        x = _input(table, idx, cfg).to(cfg.device)
        out.append((flip_embed(model, x) if cfg.flip_test else model(x)).float().cpu())
    return torch.cat(out)


def evaluate_data(model: nn.Module, data: ReIDData, cfg: ReIDTrainConfig,
                  query: Optional[ImageTable] = None) -> Dict[str, Any]:
    """mAP, rank-1 and mINP (%) of ``model`` on ``data``'s evaluation tables (``query`` replaces its query table).

    Cross-camera protocol (no gallery): also ``per_camera``, the metrics with each camera as the query."""
    query = query if query is not None else data.query
    q = embed_table(model, query, cfg)
    if data.gallery is not None:
        g = embed_table(model, data.gallery, cfg)
        r = evaluate(q, g, query.pids, data.gallery.pids, query.camids, data.gallery.camids, rerank=cfg.rerank)
        return dict(mAP=100 * r.mAP, rank1=100 * r.rank1, mINP=100 * r.mINP)
    per = {}
    for cam in np.unique(query.camids):
        qm, gm = query.camids == cam, query.camids != cam
        r = evaluate(q[qm], q[gm], query.pids[qm], query.pids[gm], query.camids[qm], query.camids[gm],
                     rerank=cfg.rerank)
        per[int(cam)] = dict(mAP=100 * r.mAP, rank1=100 * r.rank1, mINP=100 * r.mINP)
    mean = {m: float(np.mean([v[m] for v in per.values()])) for m in ('mAP', 'rank1', 'mINP')}
    return dict(mean, per_camera=per)


def _autocast(cfg: ReIDTrainConfig):
    if cfg.amp == 'none':
        return nullcontext()
    device = torch.device(cfg.device).type
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16).get(cfg.amp)
    if dtype is None:  # auto: fp16 on CUDA, bf16 elsewhere
        dtype = torch.float16 if device == 'cuda' else torch.bfloat16
    return torch.autocast(device, dtype=dtype)


def _uses_scaler(cfg: ReIDTrainConfig) -> bool:
    return cfg.amp in ('auto', 'fp16') and torch.device(cfg.device).type == 'cuda'


def _rng_state(gen: torch.Generator, cfg: ReIDTrainConfig) -> Dict[str, Any]:
    state = dict(torch=torch.get_rng_state(), augment=gen.get_state())
    if torch.device(cfg.device).type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def load_training_checkpoint(path: Path) -> Dict[str, Any]:
    """A checkpoint :func:`train_reid` wrote (train.py's layout plus the training state)."""
    return torch.load(path, map_location='cpu', weights_only=True)


def _config_args(cfg: ReIDTrainConfig, num_classes: int) -> Dict[str, Any]:
    """The checkpoint's ``args``: the config with the model's full creation arguments under ``model_kwargs``."""
    args = dataclasses.asdict(cfg)
    args['model_kwargs'] = dict(cfg.model_kwargs, img_size=list(cfg.model_kwargs.get('img_size', cfg.img_size)))
    args.update(img_size=list(cfg.img_size), input_size=[3, *cfg.img_size], num_classes=num_classes)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in args.items()}


def train_reid(cfg: ReIDTrainConfig, data: ReIDData, resume: Optional[Path] = None,
               on_epoch: Optional[Callable[[int, Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Train ``cfg.model`` on ``data`` with the recipe; returns the model (eval mode, unwrapped), the last
    evaluation (``metrics``), ``train_s``, ``steps``, ``final_loss`` (mean of the last 20 steps), ``last_loss``,
    ``history`` (one record per epoch) and ``criterion`` (the loss with its memories).

    ``resume``: a checkpoint of an earlier run of the same config, continued bit-exactly from its epoch.
    ``on_epoch(epoch, record)``: called on every rank after each epoch (1-based) with its loss and metrics.
    Under ``torchrun`` (a process group started by the caller), only rank 0 evaluates and writes.
    """
    cfg.check()
    device = torch.device(cfg.device)
    rank, world = _rank(), _world()
    model = create_model(cfg, data.num_classes)
    sampler = PKBatchSampler(data.train.pids.tolist(), cfg.p, cfg.k, seed=cfg.seed)
    per_epoch = len(sampler) // world
    if per_epoch < 1:
        raise ValueError(f'One epoch holds {len(sampler)} P x K batches, fewer than the {world} ranks: lower P or K.')
    steps = cfg.epochs * per_epoch
    params = model.parameters()
    opt = (torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if cfg.optimizer == 'adamw' else
           torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=True))
    if cfg.schedule == 'onecycle':
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=cfg.warmup)
    else:
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[m * per_epoch for m in cfg.milestones])
    memories = build_memories(list(cfg.memories), data.num_classes, model.num_features, model.num_features,
                              cfg.xbm_size, cfg.xbm_start_epochs * per_epoch, cfg.margin, cfg.identity_momentum,
                              cfg.temperature)
    criterion = ReIDLoss(margin=cfg.margin, label_smoothing=cfg.label_smoothing, memories=memories).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=_uses_scaler(cfg))
    gen = torch.Generator().manual_seed(cfg.seed + 7919 * rank)  # rank 0 draws what one process draws
    start_epoch, history, losses = 0, [], []
    if resume is not None:
        ckpt = load_training_checkpoint(Path(resume))
        model.load_state_dict(ckpt['state_dict'])
        opt.load_state_dict(ckpt['optimizer'])
        sched.load_state_dict(ckpt['scheduler'])
        criterion.load_state_dict(ckpt['criterion'])
        scaler.load_state_dict(ckpt['scaler'])
        start_epoch, history, losses = ckpt['epoch'], ckpt['history'], ckpt['losses']
        torch.set_rng_state(ckpt['rng']['torch'])
        gen.set_state(ckpt['rng']['augment'])
        if 'cuda' in ckpt['rng'] and device.type == 'cuda':
            torch.cuda.set_rng_state(ckpt['rng']['cuda'])
        sampler.epoch = start_epoch
    elif any(isinstance(m, IdentityMemory) for m in memories):
        # the identity memory starts at every identity's mean embedding under the initial model
        feats = embed_table(model, data.train, dataclasses.replace(cfg, flip_test=False))
        centroids = identity_centroids(feats, torch.from_numpy(data.train.pids), data.num_classes)
        for m in memories:
            if isinstance(m, IdentityMemory):
                m.initialise(centroids.to(device))
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    if cfg.compile:
        net = torch.compile(net)
    pids = torch.from_numpy(data.train.pids)
    model.train()
    t0 = time.time()
    progress = _progress(cfg, steps, start_epoch * per_epoch)
    metrics: Dict[str, Any] = history[-1].get('metrics', {}) if history else {}
    for epoch in range(start_epoch, cfg.epochs):
        batches = list(sampler)[rank::world][:per_epoch]
        loader = torch.utils.data.DataLoader(data.train, sampler=batches, batch_size=None, num_workers=cfg.workers)
        model.train()
        for batch, x in zip(batches, loader):
            x = augment(x, gen, cfg.flip, cfg.erasing)
            x = (x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x).to(device)
            y = pids[batch].to(device)
            with _autocast(cfg):
                out = net(x)
            out = type(out)(*(_float(v) for v in out))
            loss = criterion(out, y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            losses.append(loss.item())
            if progress is not None:
                progress.set_postfix(loss=f'{losses[-1]:.3f}', refresh=False)
                progress.update()
        record: Dict[str, Any] = dict(epoch=epoch + 1, loss=float(np.mean(losses[-per_epoch:])))
        last = epoch + 1 == cfg.epochs
        if (last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)) and rank == 0:
            metrics = evaluate_data(model, data, cfg)
            record['metrics'] = metrics
            _logger.info(f'epoch {epoch + 1}: ' + ' '.join(f'{k} {v:.2f}' for k, v in metrics.items()
                                                            if isinstance(v, float)))
        history.append(record)
        losses = losses[-20:]  # what final_loss needs; the checkpoint stays small
        if cfg.output and rank == 0:
            _save(Path(cfg.output), model, opt, sched, criterion, scaler, gen, cfg, data.num_classes,
                  epoch + 1, history, losses, metrics)
        if on_epoch is not None:
            on_epoch(epoch + 1, record)
        if world > 1:
            dist.barrier()
    if progress is not None:
        progress.close()
    model.eval()
    return dict(model=model, metrics=metrics, train_s=time.time() - t0, steps=steps, history=history,
                final_loss=float(np.mean(losses[-20:])) if losses else float('nan'),
                last_loss=losses[-1] if losses else float('nan'), criterion=criterion)


def _float(v: Any) -> Any:
    """ReIDOutput fields in float32 (losses and memories in full precision under autocast)."""
    if isinstance(v, torch.Tensor):
        return v.float()
    return [t.float() for t in v]


def _progress(cfg: ReIDTrainConfig, total: int, done: int):
    if not cfg.progress or _rank() != 0:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        _logger.info('tqdm is not installed (pip install tqdm): no progress bar')
        return None
    return tqdm(total=total, initial=done, desc='train-reid', unit='step', file=sys.stderr, dynamic_ncols=True)


def _save(folder: Path, model: nn.Module, opt, sched, criterion: nn.Module, scaler, gen: torch.Generator,
          cfg: ReIDTrainConfig, num_classes: int, epoch: int, history: List[Dict[str, Any]], losses: List[float],
          metrics: Dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = dict(epoch=epoch, arch=cfg.model, state_dict=model.state_dict(), optimizer=opt.state_dict(),
                scheduler=sched.state_dict(), criterion=criterion.state_dict(), scaler=scaler.state_dict(),
                rng=_rng_state(gen, cfg), args=_config_args(cfg, num_classes), history=history, losses=losses,
                metric=metrics.get('mAP'))
    tmp = folder / f'.{CHECKPOINT_NAME}.{os.getpid()}.tmp'
    torch.save(ckpt, tmp)
    os.replace(tmp, folder / CHECKPOINT_NAME)  # atomic: an interrupted save never spoils the last checkpoint


# the command line's names of the recipe's settings where they differ from ReIDTrainConfig's fields
_FLAG_FIELDS = dict(ids_per_batch='p', num_instances='k', memory='memories')


def config_from_args(args: Any) -> ReIDTrainConfig:
    """The config of the ``train-reid`` command line's arguments: the settings given, ReIDTrainConfig's defaults
    for the rest (the parser leaves a setting out unless it is given, so the defaults are written once)."""
    from ..data.tables import parse_size

    fields = {f.name for f in dataclasses.fields(ReIDTrainConfig)} - {'img_size', 'output'}
    given = {}
    for name, value in vars(args).items():
        field = _FLAG_FIELDS.get(name, name)
        if field in fields:
            given[field] = tuple(value) if isinstance(value, list) else value
    img_size, output = getattr(args, 'img_size', None), getattr(args, 'output', None)
    size = parse_size(img_size) if img_size else ((64, 64) if args.dataset == 'emoji' else (256, 128))
    return ReIDTrainConfig(**given, img_size=size, output=str(output) if output else None)


def _init_distributed(cfg: ReIDTrainConfig) -> None:
    """Join torchrun's process group (WORLD_SIZE > 1): NCCL on CUDA (this rank's LOCAL_RANK device), else gloo."""
    if int(os.environ.get('WORLD_SIZE', '1')) <= 1 or dist.is_initialized():
        return
    if torch.device(cfg.device).type == 'cuda':
        cfg.device = f'cuda:{int(os.environ.get("LOCAL_RANK", "0"))}'
        torch.cuda.set_device(cfg.device)
        dist.init_process_group('nccl')
    else:
        dist.init_process_group('gloo')


def run_from_args(args: Any) -> Dict[str, Any]:
    """``ptl-timm train-reid``: read the data, train, evaluate; metrics.json next to the checkpoint."""
    import json

    from ..data.tables import emoji_reid_data, read_reid_data

    cfg = config_from_args(args)
    if args.dataset == 'emoji':
        data = emoji_reid_data(cfg.img_size, part=args.emoji_part, root=args.data)
    elif args.data is None:
        raise ValueError('train-reid needs DATA, a dataset folder (or --dataset emoji).')
    else:
        data = read_reid_data(args.data, cfg.img_size, args.dataset)
    _init_distributed(cfg)
    if _rank() == 0:
        print(data.describe(), flush=True)
    result = train_reid(cfg, data, resume=args.resume)
    if _rank() == 0:
        m = result['metrics']
        print(f'{cfg.model} after {cfg.epochs} epochs ({result["train_s"]:.0f} s): ' +
              ', '.join(f'{k} {v:.2f}' for k, v in m.items() if isinstance(v, float)), flush=True)
        if cfg.output:
            Path(cfg.output, 'metrics.json').write_text(json.dumps(dict(metrics=m, history=result['history']),
                                                                   indent=1) + '\n')
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return result
