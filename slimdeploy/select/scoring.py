"""Measured scores of candidate structures: the distillation loss against the dense teacher on a calibration split.

Each candidate is pruned from the searched weights (the same function as the hard-masked searched model, by the
prune equivalence), and scored on a fixed subset of the training images that verify never reports on:
  KL(teacher || student) at temperature tau, averaged over the images (plus cross-entropy and top-1 agreement
  with the teacher, recorded). It ranked 27 structures of one latency almost exactly as test top-1 did
  (Spearman -0.95), where summed first-order importance did not (+0.37).
Two modes, because token removal recovers far better than it starts: right after pruning (for deployment
without retraining), or after a short recovery (a few hundred steps of distillation on the other training
images) for runs that retrain.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..data import DataBundle, _collate, training_images
from ..slim import build_slim
from ..types import SlimSpec


@dataclass
class CalibrationSet:
    """Images (as the model sees them), the dense teacher's logits on them, and which training images they are."""

    x: torch.Tensor
    teacher: torch.Tensor
    indices: list[int]


@torch.no_grad()
def calibration_set(bundle: DataBundle, teacher: nn.Module, size: int, seed: int = 0, batch: int = 256
                    ) -> CalibrationSet:
    """A fixed, seeded subset of the training images (evaluation transform) with the teacher's logits."""
    x, indices = training_images(bundle, size, seed)
    teacher = teacher.eval()
    logits = torch.cat([teacher(x[i:i + batch]) for i in range(0, len(x), batch)])
    return CalibrationSet(x, logits.float(), indices)


def kd(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * KL(softmax(teacher / tau) || softmax(student / tau)), averaged over images."""
    return F.kl_div(F.log_softmax(student / tau, -1), F.log_softmax(teacher / tau, -1), reduction="batchmean",
                    log_target=True) * tau * tau


@torch.no_grad()
def score(model: nn.Module, cal: CalibrationSet, tau: float = 1.0, batch: int = 256) -> dict:
    """Distillation loss (the score: lower is better), cross-entropy against the teacher's labels, agreement."""
    model = model.eval()
    out = torch.cat([model(cal.x[i:i + batch]) for i in range(0, len(cal.x), batch)]).float()
    labels = cal.teacher.argmax(-1)
    return {"loss": float(kd(out, cal.teacher, tau)), "ce": float(F.cross_entropy(out, labels)),
            "agreement": float((out.argmax(-1) == labels).float().mean())}


def recover(student: nn.Module, teacher: nn.Module, bundle: DataBundle, cal: CalibrationSet, steps: int,
            batch: int = 32, lr: float = 5e-4, tau: float = 1.0, seed: int = 0) -> nn.Module:
    """A copy of the student after `steps` of distillation (AdamW, constant lr) on training images outside the
    calibration split."""
    if steps <= 0:
        return student
    student = copy.deepcopy(student).train()
    held = set(cal.indices)
    rest = Subset(bundle.train, [i for i in range(len(bundle.train)) if i not in held])
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(rest, batch_size=batch, shuffle=True, generator=g, drop_last=True,
                        collate_fn=_collate(bundle.transform) if bundle.transform is not None else None)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    teacher = teacher.eval()
    done = 0
    while done < steps:
        for x, _ in loader:
            with torch.no_grad():
                t = teacher(x)
            loss = kd(student(x), t, tau)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done >= steps:
                break
    return student.eval()


@dataclass
class Scorer:
    """Scores specs pruned from the searched weights; recovery (when asked for) from the dense teacher."""

    searched: nn.Module
    teacher: nn.Module
    bundle: DataBundle
    cal: CalibrationSet
    recovery_steps: int = 0
    recovery_batch: int = 32
    tau: float = 1.0
    seconds: float = 0.0

    def __call__(self, spec: SlimSpec, recovery: bool = False) -> dict:
        start = time.perf_counter()
        model = build_slim(spec, self.searched)
        out = score(model, self.cal, self.tau)
        if recovery and self.recovery_steps > 0:
            out = {"immediate": out, **score(recover(model, self.teacher, self.bundle, self.cal,
                                                     self.recovery_steps, self.recovery_batch, tau=self.tau),
                                             self.cal, self.tau)}
        self.seconds += time.perf_counter() - start
        return out


@torch.no_grad()
def quantized_loss(spec: SlimSpec, searched: nn.Module, cal: CalibrationSet, bundle: DataBundle, tau: float = 1.0
                   ) -> float:
    """The distillation loss of a structure as an int8 deployment runs it: pruned from the searched weights,
    exported, quantized (calibrated on other training images) and run by ONNX Runtime on the calibration split."""
    import tempfile
    from pathlib import Path

    from ..export import export_onnx
    from ..latency.backends import get_backend
    from ..quantize import QuantConfig, calibration_batches, quantize_onnx

    a = spec.arch
    model = build_slim(spec, searched)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, Path(tmp) / "m.onnx", (a.in_chans, a.img_size, a.img_size), None)
        q = Path(tmp) / "m.int8.onnx"
        quantize_onnx(fp32, q, calibration_batches(bundle, 256, 64), QuantConfig(images=256))
        sess = get_backend("ort-cpu", precision="int8").load_onnx(q, quantized=True)
        out = torch.cat([torch.as_tensor(sess.run(cal.x[i:i + 256].numpy())) for i in range(0, len(cal.x), 256)])
    return float(kd(out.float(), cal.teacher, tau))
