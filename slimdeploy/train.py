"""Stage: dense training of a model that has no checkpoint yet (e.g. the embedded fmnist-vit)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from . import dist
from .data import DataBundle
from .errors import SlimError
from .fileio import write_json
from .models import create_model, save_dense
from .runs import Run
from .trainer import TrainConfig, fit
from .types import ModelConfig

OUTPUTS = ["model.json", "base.safetensors"]


def classification_loss(label_smoothing: float = 0.0):
    """Cross-entropy on class indices, or on soft targets (mixup/cutmix)."""
    soft = SoftTargetCrossEntropy()

    def loss_fn(out, x, y):
        loss = soft(out, y) if y.ndim == 2 else F.cross_entropy(out, y, label_smoothing=label_smoothing)
        return loss, {}
    return loss_fn


def train_dense(model: nn.Module, cfg: ModelConfig, data: DataBundle, tcfg: TrainConfig, run_dir: str | Path,
                resume: bool = False, torch_device: str = "auto") -> list[dict]:
    """Train model in place and write run_dir/base.safetensors + model.json + train/history.json."""
    run_dir = Path(run_dir)
    history = fit(model, classification_loss(tcfg.label_smoothing), data, tcfg, run_dir / "train" / "checkpoint.pt",
                  resume=resume, desc="train", torch_device=torch_device)
    if dist.setup().is_main:
        model.cpu()
        save_dense(model, cfg, run_dir)
        write_json(run_dir / "train" / "history.json", history)
    dist.barrier()
    return history


def train_run(run_dir: str | Path, cfg: ModelConfig, data: DataBundle, tcfg: TrainConfig,
              torch_device: str = "auto", drop_path: float = 0.0) -> list[dict] | None:
    """The train stage: skipped when base.safetensors is current; resumes an interrupted training."""
    r = Run(run_dir)
    inputs = r.inputs({"model": cfg.to_dict(), "train": asdict(tcfg), "data": data.key, "drop_path": drop_path},
                          [])
    if r.current("train", inputs, OUTPUTS):
        return None
    if (r / "base.safetensors").is_file() and r.record("train") is None:
        raise SlimError(f"{r.dir} already holds a model that slimdeploy did not train there: choose another --out")
    torch.manual_seed(tcfg.seed)  # the initial weights, so that a run is reproducible from its options
    model = create_model(cfg, drop_path_rate=drop_path) if drop_path else create_model(cfg)
    r.restart_if_changed("train", inputs, ["train/checkpoint.pt"])
    history = train_dense(model, cfg, data, tcfg, run_dir, resume=True, torch_device=torch_device)
    if dist.setup().is_main:
        r.finished("train", inputs, OUTPUTS)
    return history
