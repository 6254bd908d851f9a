"""Pruning with quantization on this CPU: what int8 and bf16 buy, and whether pruning is worth it on top of int8.

latency  fp32, int8 (ONNX Runtime static QDQ, per-channel int8 weights, uint8 activations) and bf16 (torch on the
         CPU: AVX-512 BF16 / AMX) latency of a dense and a slim model, at batch 1 and 8, all measured together by
         the one protocol; ratios are paired (same rounds). One thread, as the profiles.
accuracy top-1 on the 10,000 test images of the dense model and a slim one in fp32 and int8 (calibrated on 512
         training images), for fmnist-vit.
question at fractions of the dense fp32 latency: top-1 of int8 alone (the dense model quantized, where it reaches
         the target), of pruning alone (fp32, selected on fp32 tables), and of pruning selected on int8 tables
         then quantized. The pruned models are retrained (5 epochs, distillation from the dense model, seed 0) before
         they are quantized.

    .venv/bin/python benchmarks/quantized.py latency --model fmnist-vit --run runs/teacher30
    .venv/bin/python benchmarks/quantized.py latency --model deit_small_patch16_224
    .venv/bin/python benchmarks/quantized.py question --run runs/teacher30 --fp32-device xeon-2c-ort1t-b1-fmnist-vit \\
        --int8-device xeon-2c-ort1t-b1-fmnist-vit-int8
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from slimdeploy.latency import timing
from slimdeploy.latency.backends import get_backend
from slimdeploy.latency.fingerprint import cpu_name
from slimdeploy.latency.measure import export_first, measure_loaded
from slimdeploy.models import arch_of, create_model, load_dense
from slimdeploy.types import ModelConfig, SlimSpec

OUT = Path("benchmarks/results")


def slim_for(model, cfg):
    """A slim model to compare: the solver's pick at half the dense MACs on random importances, pruned from the
    dense weights (not retrained: its int8 drop is what quantization costs a pruned model)."""
    from slimdeploy.analysis import spec_macs
    from slimdeploy.latency.draws import synthetic_importance
    from slimdeploy.select.solver import MacsCost, Selector
    from slimdeploy.slim import build_slim

    a = arch_of(model)
    imp = synthetic_importance(a, np.random.default_rng(0))
    spec = Selector(a, cfg, imp, MacsCost(a)).select(0.5 * spec_macs(SlimSpec.dense(cfg, a))).spec
    return build_slim(spec, model), spec


def latency(args) -> dict:
    torch.set_num_threads(1)
    if args.run:
        model, cfg = load_dense(args.run)
    else:
        from slimdeploy.latency.components import nontrivial_

        cfg = ModelConfig(args.model)
        model = nontrivial_(create_model(cfg)).eval()
    a = arch_of(model)
    slim, spec = slim_for(model, cfg)
    out = {"model": cfg.name, "cpu": cpu_name(), "date": dt.datetime.now().isoformat(timespec="seconds"),
           "slim_widths": spec.summary(), "batches": {}}
    fp32, int8 = get_backend("ort-cpu"), get_backend("ort-cpu", precision="int8")
    t32, tbf = get_backend("torch", torch_device="cpu"), get_backend("torch", precision="bf16", torch_device="cpu")
    for batch in args.batches:
        with tempfile.TemporaryDirectory() as tmp:  # one fp32 export each; the int8 backend quantizes it to load
            files = export_first(fp32, {"dense": model, "slim": slim}, a, batch, tmp)
            t = measure_loaded({f"{k}/{name}": (be, m, files[name])
                                for name, m in (("dense", model), ("slim", slim))
                                for k, be in (("ort-fp32", fp32), ("ort-int8", int8), ("torch-fp32", t32),
                                              ("torch-bf16", tbf))}, a, batch, timing.MODEL)
        row = {k: v.median_ms for k, v in t.items()}

        def r(x, y, t=t):
            return timing.ratio(t[x], t[y]).median_ms
        row.update({"int8_over_fp32_dense": r("ort-int8/dense", "ort-fp32/dense"),
                    "int8_over_fp32_slim": r("ort-int8/slim", "ort-fp32/slim"),
                    "bf16_over_fp32_dense": r("torch-bf16/dense", "torch-fp32/dense"),
                    "bf16_over_fp32_slim": r("torch-bf16/slim", "torch-fp32/slim"),
                    "slim_over_dense_fp32": r("ort-fp32/slim", "ort-fp32/dense"),
                    "slim_int8_over_dense_fp32": r("ort-int8/slim", "ort-fp32/dense")})
        out["batches"][str(batch)] = row
        print(json.dumps({str(batch): {k: round(v, 4) for k, v in row.items()}}), flush=True)
    if args.run:
        out["accuracy"] = accuracy(args.run, model, slim)
    (OUT / f"quantized_latency_{cfg.name}.json").write_text(json.dumps(out, indent=2))
    return out


def accuracy(run, model, slim) -> dict:
    """fp32 and int8 top-1 of the dense and the slim model (slim: pruned from the dense weights, not retrained)."""
    from slimdeploy.data import load_data, make_loader
    from slimdeploy.export import export_onnx
    from slimdeploy.models import data_config
    from slimdeploy.quantize import QuantConfig, calibration_batches, quantize_onnx

    a = arch_of(model)
    data = load_data("fashion-mnist", data_config(model), a.num_classes)
    x, y = next(iter(make_loader(data.val, data.transform, len(data.val), False)))
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in (("dense", model), ("slim", slim)):
            fp = export_onnx(m, Path(tmp) / f"{name}.onnx", (a.in_chans, a.img_size, a.img_size), None)
            q = Path(tmp) / f"{name}.int8.onnx"
            quantize_onnx(fp, q, calibration_batches(data, 512, 64), QuantConfig())
            for prec, path, be in (("fp32", fp, get_backend("ort-cpu")),
                                   ("int8", q, get_backend("ort-cpu", precision="int8"))):
                sess = be.load_onnx(path, quantized=True) if prec == "int8" else be.load_onnx(path)
                pred = np.concatenate([sess.run(x[i:i + 500].numpy()).argmax(1) for i in range(0, len(x), 500)])
                res[f"{name}_{prec}_top1"] = float(100 * (pred == y.numpy()).mean())
            res[f"{name}_int8_drop"] = res[f"{name}_fp32_top1"] - res[f"{name}_int8_top1"]
    print(json.dumps(res), flush=True)
    return res


def question(args) -> dict:
    """int8 alone vs pruning alone vs pruning on int8 tables then int8, at fractions of dense fp32 latency."""
    from slimdeploy.data import load_data
    from slimdeploy.export import export_run
    from slimdeploy.models import data_config
    from slimdeploy.prune import prune_run
    from slimdeploy.quantize import QuantConfig, quantize_run
    from slimdeploy.retrain import DistillConfig, retrain_run
    from slimdeploy.select.stage import SelectOptions, select_run
    from slimdeploy.select.target import parse_target
    from slimdeploy.trainer import TrainConfig
    from slimdeploy.verify import verify

    teacher, cfg = load_dense(args.run)
    a = arch_of(teacher)
    data = load_data("fashion-mnist", data_config(teacher), a.num_classes)
    out = {"cpu": cpu_name(), "date": dt.datetime.now().isoformat(timespec="seconds"), "targets": {}}
    path = OUT / "quantized_question.json"
    if path.is_file():
        out = json.loads(path.read_text())
    # int8 alone: the dense model, quantized
    dense_run = Path(args.work) / "dense-int8"
    if "int8_alone" not in out:
        _copy_base(args.run, dense_run)
        from slimdeploy.types import SlimSpec as S

        S.dense(cfg, a).save(dense_run / "spec.json")
        prune_run(dense_run, weights="base")
        export_run(dense_run, batch_size=1)
        quantize_run(dense_run, data, QuantConfig())
        rep = verify(dense_run, data, "ort-cpu", precision="int8", max_quant_drop=100)
        out["int8_alone"] = {"over_dense_fp32": rep.extra["slim_over_dense"]["median_ms"], "top1": rep.slim.top1,
                             "fp32_top1": rep.extra["pytorch_slim_top1"]}
        path.write_text(json.dumps(out, indent=2))
    for f in args.targets:
        rows = out["targets"].setdefault(str(f), {})
        for name, device, precision in (("pruning alone (fp32)", args.fp32_device, "fp32"),
                                        ("pruning on int8 tables, then int8", args.int8_device, "int8")):
            if name in rows:
                continue
            run = Path(args.work) / f"{f}-{precision}"
            _copy_base(args.run, run, search=True)
            select_run(run, parse_target(f"{100 * f:g}%"), data, device,
                       options=SelectOptions(verify_latency=True, recovery_steps=200, precision=precision))
            prune_run(run)
            retrain_run(run, data, TrainConfig(epochs=args.epochs, batch_size=128, lr=1e-3, warmup_epochs=0.2,
                                               seed=0), DistillConfig("soft", 0.7, 2.0), "cpu")
            export_run(run, batch_size=1)
            if precision == "int8":
                quantize_run(run, data, QuantConfig())
            rep = verify(run, data, "ort-cpu", precision=precision, target_fraction=f, max_quant_drop=100)
            rows[name] = {"over_dense_fp32": rep.extra["slim_over_dense"]["median_ms"], "met": rep.met_target,
                          "top1": rep.slim.top1, "fp32_twin_top1": rep.extra["pytorch_slim_top1"],
                          "widths": SlimSpec.load(run / "spec.json").summary()}
            path.write_text(json.dumps(out, indent=2))
            print(f, name, json.dumps(rows[name])[:300], flush=True)
        ia = out["int8_alone"]
        rows["int8 alone"] = {"over_dense_fp32": ia["over_dense_fp32"], "top1": ia["top1"] if
                              ia["over_dense_fp32"] <= f else None, "reaches": ia["over_dense_fp32"] <= f}
        path.write_text(json.dumps(out, indent=2))
    return out


def _copy_base(src, dst, search: bool = False) -> None:
    dst = Path(dst)
    if dst.exists():
        return
    dst.mkdir(parents=True)
    for name in ("model.json", "base.safetensors"):
        shutil.copy(Path(src) / name, dst / name)
    if search:
        shutil.copytree(Path(src) / "search", dst / "search", ignore=shutil.ignore_patterns("checkpoint.pt"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["latency", "question"])
    ap.add_argument("--model", default="fmnist-vit")
    ap.add_argument("--run", default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--fp32-device", default="xeon-2c-ort1t-b1-fmnist-vit")
    ap.add_argument("--int8-device", default="xeon-2c-ort1t-b1-fmnist-vit-int8")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--work", default="runs/quantized")
    args = ap.parse_args()
    latency(args) if args.part == "latency" else question(args)


if __name__ == "__main__":
    main()
