"""One training loop for every stage that trains (dense training, mask search, retraining).

Single process or DDP under torchrun, AMP on CUDA, rich progress, an atomic checkpoint each
epoch and exact resume (weights, optimizer, schedule, EMA, RNG, data order).
Stages plug in through `loss_fn` and an optional `hooks` object.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import dist
from .data import DataBundle, make_loader
from .errors import SlimError
from .fileio import load_torch, save_torch
from .progress import log, make_progress

SYNC_EVERY = 20  # training steps between host syncs (the loss check, the progress line)


@dataclass
class TrainConfig:
    """Optimisation settings (AdamW + cosine schedule with warm-up, per-step)."""

    epochs: int = 6
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.0
    clip_grad: float | None = 1.0
    mixup: float = 0.0
    cutmix: float = 0.0
    ema_decay: float | None = None
    seed: int = 0
    amp: bool = True  # bf16 autocast, CUDA only
    workers: int = 0

    def check(self) -> TrainConfig:
        if self.epochs < 0:
            raise SlimError("--epochs must be >= 0")
        if self.lr <= 0 or self.batch_size <= 0:
            raise SlimError("--lr and --batch-size must be positive")
        if self.weight_decay < 0 or not 0 <= self.label_smoothing < 1:
            raise SlimError("--weight-decay must be >= 0 and --label-smoothing in [0, 1)")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise SlimError("--ema must be in (0, 1)")
        return self


class Hooks:
    """Optional stage callbacks; state() is saved in the checkpoint for exact resume."""

    def after_backward(self, model: nn.Module) -> None: ...
    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None: ...
    def state(self) -> dict[str, Any]: return {}
    def load_state(self, state: dict[str, Any]) -> None: ...


def eval_counts(device: torch.device) -> torch.Tensor:
    """(correct, seen) accumulated on the model's device: NCCL all-reduces device tensors only."""
    return torch.zeros(2, dtype=torch.float64, device=device)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device) -> float:
    """Top-1 accuracy in percent, summed exactly over ranks."""
    was_training = model.training
    model.eval()
    counts = eval_counts(device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        counts[0] += (model(x).argmax(-1) == y).sum()
        counts[1] += len(y)
    dist.all_reduce_sum(counts)
    model.train(was_training)
    return float(100.0 * counts[0] / counts[1].clamp_min(1))


def fit(model: nn.Module, loss_fn: Callable, data: DataBundle, cfg: TrainConfig, ckpt_path: str | Path,
        *, resume: bool = False, param_groups: list[dict] | None = None, hooks: Hooks | None = None,
        desc: str = "train", eval_model: Callable[[nn.Module], nn.Module] | None = None,
        torch_device: str = "auto") -> list[dict[str, float]]:
    """Train `model` in place; return the per-epoch history.

    loss_fn(outputs, inputs, targets) -> (loss, {name: tensor}); targets are class indices, or
    soft targets when mixup/cutmix is on. eval_model maps the trained module to the module
    evaluated each epoch (default: the EMA model if any, else the model).
    """
    cfg.check()
    hooks = hooks or Hooks()
    ctx = dist.setup(torch_device)
    torch.manual_seed(cfg.seed)
    model.to(ctx.device)
    ddp = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None) if ctx.world > 1 else model

    per_rank = cfg.batch_size // ctx.world
    if per_rank < 1 or cfg.batch_size % ctx.world:
        raise SlimError(f"--batch-size {cfg.batch_size} must be a multiple of the {ctx.world} processes")
    cuda = ctx.device.type == "cuda"
    train_loader = make_loader(data.train, data.transform, per_rank, True, cfg.seed, ctx.rank, ctx.world, cfg.workers,
                               pin_memory=cuda)
    val_loader = make_loader(data.val, data.transform, per_rank, False, cfg.seed, ctx.rank, ctx.world, cfg.workers,
                             pin_memory=cuda)
    steps = len(train_loader)
    if steps == 0:
        raise SlimError(f"the training set ({len(data.train)} images) is smaller than one batch ({cfg.batch_size})")

    opt = create_optimizer_v2(param_groups if param_groups is not None else model, opt="adamw", lr=cfg.lr,
                              weight_decay=cfg.weight_decay)
    sched = CosineLRScheduler(opt, t_initial=max(1, cfg.epochs * steps), lr_min=cfg.min_lr,
                              warmup_t=int(cfg.warmup_epochs * steps), warmup_lr_init=cfg.lr * 0.01,
                              t_in_epochs=False)
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay else None
    mixup = (Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                   num_classes=data.num_classes) if cfg.mixup > 0 or cfg.cutmix > 0 else None)
    use_amp = cfg.amp and cuda and bf16_native(ctx.device)
    if cfg.amp and cuda and not use_amp:
        log(f"{desc}: this GPU emulates bf16 (before Ampere): training in fp32", ctx.is_main)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else nullcontext
    evaluated = eval_model or (lambda m: ema.module if ema is not None else m)

    start, history = 0, []
    ckpt_path = Path(ckpt_path)
    if resume and ckpt_path.is_file():
        ck = load_torch(ckpt_path, "training checkpoint")
        if ck.get("config") != _cfg_key(cfg):
            raise SlimError(f"{ckpt_path} was written with other training settings; remove it or drop --resume")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        hooks.load_state(ck.get("hooks", {}))
        torch.set_rng_state(ck["rng"])
        if cuda and ck.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(ck["cuda_rng"])
        start, history = ck["epoch"] + 1, ck["history"]
        log(f"{desc}: resuming after epoch {start}/{cfg.epochs}", ctx.is_main)

    with make_progress(ctx.is_main) as progress:
        task = progress.add_task(desc, total=cfg.epochs * steps, completed=start * steps, info="")
        for epoch in range(start, cfg.epochs):
            train_loader.sampler.set_epoch(epoch)
            model.train()
            t0, seen = time.perf_counter(), 0
            loss_sum = torch.zeros((), device=ctx.device)  # summed on the device: one sync per SYNC_EVERY steps
            parts_sum: dict[str, torch.Tensor] = {}
            for step, (x, y) in enumerate(train_loader):
                x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
                if mixup is not None:
                    x, y = mixup(x, y)
                with autocast():
                    out = ddp(x)
                    loss, parts = loss_fn(out, x, y)
                if (step % SYNC_EVERY == 0 or step == steps - 1) and not math.isfinite(loss.item()):
                    raise SlimError(f"{desc}: loss became {loss.item()} at epoch {epoch + 1}; lower --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                hooks.after_backward(model)
                if cfg.clip_grad:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                opt.step()
                sched.step_update(epoch * steps + step + 1)
                if ema is not None:
                    ema.update(model)
                seen += len(x)
                loss_sum += loss.detach()
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v.detach()
                info = None
                if step % SYNC_EVERY == 0:
                    rate = seen * ctx.world / (time.perf_counter() - t0)
                    info = f"epoch {epoch + 1}/{cfg.epochs} loss {loss_sum.item() / (step + 1):.3f} {rate:.0f} img/s"
                progress.update(task, advance=1, **({"info": info} if info else {}))
            top1 = evaluate(evaluated(model), val_loader, ctx.device)
            metrics = {"epoch": epoch + 1, "loss": loss_sum.item() / steps, "top1": top1,
                       "img_per_s": seen * ctx.world / (time.perf_counter() - t0), "lr": opt.param_groups[0]["lr"],
                       "seconds": time.perf_counter() - t0,
                       **{k: float(v) / steps for k, v in parts_sum.items()}}
            history.append(metrics)
            hooks.on_epoch_end(epoch, metrics)
            log(f"{desc}: epoch {epoch + 1}/{cfg.epochs} loss {metrics['loss']:.4f} top-1 {metrics['top1']:.2f}%",
                ctx.is_main)
            if ctx.is_main:
                save_torch({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                            "history": history, "rng": torch.get_rng_state(), "config": _cfg_key(cfg),
                            "cuda_rng": torch.cuda.get_rng_state_all() if cuda else None,
                            "ema": ema.state_dict() if ema is not None else {}, "hooks": hooks.state()}, ckpt_path)
            dist.barrier()
    if ema is not None:
        model.load_state_dict(ema.module.state_dict())
    return history


def bf16_native(device: torch.device) -> bool:
    """Whether the GPU runs bf16 natively (Ampere and later); torch would emulate it silently before."""
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def _cfg_key(cfg: TrainConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the interrupted one."""
    d = asdict(cfg)
    d.pop("workers")
    return d
