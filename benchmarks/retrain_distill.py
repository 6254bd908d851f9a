"""Retraining with and without distillation, same pruned model, same epochs.

Takes a run directory after `prune` (the demo's by default): top-1 right after pruning, after
retraining with soft distillation from the dense model, and after retraining with cross-entropy
only. Both retrain from the same pruned weights with the same recipe and seed.

    .venv/bin/python benchmarks/retrain_distill.py --run runs/demo --epochs 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
from pathlib import Path

from slimdeploy.data import load_data
from slimdeploy.models import data_config, load_dense
from slimdeploy.retrain import DistillConfig, retrain
from slimdeploy.runs import Run
from slimdeploy.slim import load_slim
from slimdeploy.trainer import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--modes", nargs="+", default=["soft", "none"])
    args = ap.parse_args()
    os.environ.setdefault("SLIMDEPLOY_QUIET", "1")
    r = Run(args.run)
    teacher, _ = load_dense(args.run)
    spec = r.spec()
    bundle = load_data("fashion-mnist", data_config(teacher), spec.arch.num_classes)
    res = {"run": args.run, "epochs": args.epochs, "predicted_latency_ms": spec.meta.get("predicted_latency_ms"),
           "dense_predicted_latency_ms": spec.meta.get("dense_predicted_latency_ms"),
           "date": dt.datetime.now().isoformat(timespec="seconds"), "modes": {}}
    for mode in args.modes:
        student = load_slim(spec, r / "pruned.safetensors")
        with tempfile.TemporaryDirectory() as tmp:
            rec = retrain(student, teacher, bundle, TrainConfig(epochs=args.epochs, batch_size=128, lr=1e-3,
                                                                warmup_epochs=0.2, seed=0),
                          DistillConfig(mode), tmp, torch_device="cpu")
        res["modes"][mode] = {k: rec[k] for k in ("teacher_top1", "top1_before_retrain", "top1")}
        print(mode, res["modes"][mode], flush=True)
    Path("benchmarks/results/retrain_distill.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
