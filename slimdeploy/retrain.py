"""Stage: retrain the pruned model with knowledge distillation from the dense model.

loss = (1 - alpha) * CE(student, labels) + alpha * KD, with KD
  soft  tau^2 * KL(softmax(teacher / tau) || softmax(student / tau))   (Hinton et al.)
  hard  CE(student, argmax teacher)                                    (DeiT's hard distillation)
  none  alpha ignored: plain cross-entropy
The teacher runs in eval mode under no_grad on every rank and is never wrapped in DDP.
Writes slim.safetensors and retrain.json (top-1 of teacher, right after pruning, after retraining).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import dist
from .data import DataBundle, make_loader
from .errors import SlimError
from .fileio import read_json, save_weights, write_json
from .trainer import TrainConfig, evaluate, fit


@dataclass
class DistillConfig:
    mode: str = "soft"  # soft | hard | none
    alpha: float = 0.7
    tau: float = 2.0

    def check(self) -> DistillConfig:
        if self.mode not in ("soft", "hard", "none"):
            raise SlimError("--distill must be soft, hard or none")
        if not 0 <= self.alpha <= 1 or self.tau <= 0:
            raise SlimError("--alpha must be in [0, 1] and --tau > 0")
        return self


def distill_loss(student: torch.Tensor, teacher: torch.Tensor | None, target: torch.Tensor, cfg: DistillConfig,
                 label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The retraining loss for one batch; target holds class indices or soft targets (mixup)."""
    if target.ndim == 2:
        base = -(target * F.log_softmax(student, -1)).sum(-1).mean()
    else:
        base = F.cross_entropy(student, target, label_smoothing=label_smoothing)
    if cfg.mode == "none" or teacher is None:
        return base, {"ce": base.detach()}
    if cfg.mode == "soft":
        kd = F.kl_div(F.log_softmax(student / cfg.tau, -1), F.log_softmax(teacher / cfg.tau, -1),
                      reduction="batchmean", log_target=True) * cfg.tau ** 2
    else:
        kd = F.cross_entropy(student, teacher.argmax(-1))
    return (1 - cfg.alpha) * base + cfg.alpha * kd, {"ce": base.detach(), "kd": kd.detach()}


def retrain(student: nn.Module, teacher: nn.Module, data: DataBundle, tcfg: TrainConfig, dcfg: DistillConfig,
            run_dir: str | Path, resume: bool = False, torch_device: str = "auto", stem: str = "slim") -> dict:
    """Retrain student in place; write <stem>.safetensors and retrain.json in run_dir."""
    dcfg.check()
    run_dir = Path(run_dir)
    ctx = dist.setup(torch_device)
    teacher = teacher.to(ctx.device).eval().requires_grad_(False)
    val = make_loader(data.val, data.transform, max(1, tcfg.batch_size // ctx.world), False, 0, ctx.rank, ctx.world)
    ckpt = run_dir / "retrain" / "checkpoint.pt"
    student.to(ctx.device)
    before = run_dir / "retrain" / "before.json"
    if resume and ckpt.is_file() and before.is_file():  # the first attempt recorded the pre-retraining figures
        prev = read_json(before, "retrain record")
        record = {k: prev[k] for k in ("teacher_top1", "top1_before_retrain")}
    else:
        record = {"teacher_top1": evaluate(teacher, val, ctx.device),
                  "top1_before_retrain": evaluate(student, val, ctx.device)}
        if ctx.is_main:
            write_json(before, record)

    def loss_fn(out, x, y):
        t = None
        if dcfg.mode != "none":
            with torch.no_grad():
                t = teacher(x)
        return distill_loss(out, t, y, dcfg, tcfg.label_smoothing)

    history = fit(student, loss_fn, data, tcfg, ckpt, resume=resume, desc="retrain", torch_device=torch_device)
    record.update(top1=history[-1]["top1"] if history else record["top1_before_retrain"], epochs=tcfg.epochs,
                  distill=asdict(dcfg), history=history)
    if ctx.is_main:
        save_weights(student.state_dict(), run_dir / f"{stem}.safetensors")
        write_json(run_dir / "retrain.json", record)
    dist.barrier()
    return record


OUTPUTS = ["slim.safetensors", "retrain.json"]


def retrain_run(run_dir: str | Path, data: DataBundle, tcfg: TrainConfig, dcfg: DistillConfig,
                torch_device: str = "auto") -> dict | None:
    """The retrain stage: pruned.safetensors -> slim.safetensors, the teacher being the run's dense base model
    (never the weights the search trained). Skipped when current, resumed when interrupted."""
    from .runs import Run
    from .slim import load_slim

    r = Run(run_dir)
    inputs = r.inputs({"train": asdict(tcfg), "distill": asdict(dcfg.check()), "data": data.key},
                          [r / "spec.json", r / "pruned.safetensors", r / "base.safetensors"])
    if r.current("retrain", inputs, OUTPUTS):
        return None
    student = load_slim(r.spec(), r / "pruned.safetensors")
    teacher, _ = r.base()
    r.restart_if_changed("retrain", inputs, ["retrain/checkpoint.pt", "retrain/before.json"])
    record = retrain(student, teacher, data, tcfg, dcfg, run_dir, resume=True, torch_device=torch_device)
    if dist.setup().is_main:
        r.finished("retrain", inputs, OUTPUTS)
    return record
