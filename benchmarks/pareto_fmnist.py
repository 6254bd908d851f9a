"""Accuracy vs measured latency on Fashion-MNIST at 0.5x and 0.7x dense latency, four ways:

 (a) slimdeploy: search importances + latency-aware selection (closed loop) + distillation
 (b) ViT-Slim's selection: one kept fraction for every mask kind, chosen to hit the same latency
 (c) magnitude pruning: weight-norm importance, same selector and widths machinery, base weights
 (d) a dense model of uniformly reduced width (heads, head width, MLP) at the same latency,
     trained from scratch for the same total epochs
Same data, same dense model, same retraining recipe and the same total training budget:
(a)/(b) search E_s epochs + retrain E_r; (c) retrains E_s + E_r; (d) trains E_t + E_s + E_r.
Uses the dense model and search of a run directory (the demo's by default).

    .venv/bin/python benchmarks/pareto_fmnist.py --run runs/demo --device epyc-2c-ort1t-b1-fmnist-vit
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
from pathlib import Path

import torch

from slimdeploy.analysis import spec_macs, spec_params
from slimdeploy.backends import get_backend
from slimdeploy.data import load_data, make_loader
from slimdeploy.latency import LatencyModel
from slimdeploy.models import arch_of, data_config, load_dense
from slimdeploy.profile import measure_model
from slimdeploy.prune import searched_model
from slimdeploy.retrain import DistillConfig, retrain
from slimdeploy.search import load_masks
from slimdeploy.select import Target, select_structure
from slimdeploy.selector import Importance, fraction_spec
from slimdeploy.slim import build_slim
from slimdeploy.train import classification_loss
from slimdeploy.trainer import TrainConfig, evaluate, fit
from slimdeploy.types import BlockSpec, SlimSpec


def magnitude_importance(model, arch) -> Importance:
    """Weight-norm importance: q/k channel ||W_q row|| * ||W_k row||, v channel ||W_v row|| * ||proj col||,
    MLP unit ||fc1 row|| * ||fc2 col||; no token importance (weights say nothing about tokens)."""
    A, hd = arch.num_heads * arch.head_dim, arch.head_dim
    qk, v, mlp = [], [], []
    with torch.no_grad():
        for blk in model.blocks:
            w = blk.attn.qkv.weight
            qn, kn, vn = w[:A].norm(dim=1), w[A:2 * A].norm(dim=1), w[2 * A:].norm(dim=1)
            pn = blk.attn.proj.weight.norm(dim=0)
            qk.append((qn * kn).reshape(arch.num_heads, hd))
            v.append((vn * pn).reshape(arch.num_heads, hd))
            mlp.append(blk.mlp.fc1.weight.norm(dim=1) * blk.mlp.fc2.weight.norm(dim=0))
    return Importance(qk=torch.stack(qk).double().numpy(), v=torch.stack(v).double().numpy(),
                      mlp=torch.stack(mlp).double().numpy(), tok=None, mode="magnitude-weights")


def uniform_spec(cfg, arch, lm, target_ms) -> SlimSpec:
    """The uniform structure (same heads, head width and MLP width in every block) with the most MACs
    whose predicted latency fits the target."""
    best = None
    for h in range(1, arch.num_heads + 1):
        for d in range(8, arch.head_dim + 1, 8):
            for m in range(32, arch.mlp_dim + 1, 32):
                spec = SlimSpec.dense(cfg, arch)
                spec.blocks = [BlockSpec(tokens=list(range(arch.num_tokens)), heads=list(range(h)),
                                         qk=[list(range(d))] * h, v=[list(range(d))] * h, mlp=list(range(m)))
                               for _ in range(arch.depth)]
                if lm.predict(spec) <= target_ms and (best is None or spec_macs(spec) > spec_macs(best)):
                    best = spec
    return best


def fractions_for(cfg, arch, imp, lm, target_ms) -> SlimSpec:
    """ViT-Slim: one kept fraction f for every kind, bisected so the predicted latency meets the target."""
    lo, hi = 0.02, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if lm.predict(fraction_spec(arch, cfg, imp, mid, mid, mid)) <= target_ms:
            lo = mid
        else:
            hi = mid
    return fraction_spec(arch, cfg, imp, lo, lo, lo)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--device", default="epyc-2c-ort1t-b1-fmnist-vit")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--methods", nargs="+", default=["slimdeploy", "vit-slim", "magnitude", "uniform-scratch"])
    ap.add_argument("--retrain-epochs", type=int, default=5)
    ap.add_argument("--search-epochs", type=int, default=2)
    ap.add_argument("--train-epochs", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/pareto_fmnist.json")
    ap.add_argument("--train-limit", type=int, default=None, help="smoke runs only: a subset of the training set")
    ap.add_argument("--val-limit", type=int, default=None, help="smoke runs only: a subset of the test set")
    args = ap.parse_args()
    os.environ.setdefault("SLIMDEPLOY_QUIET", "1")

    lm = LatencyModel.load(args.device)
    p = lm.profile
    be = get_backend(p.backend, threads=p.threads)
    base, cfg = load_dense(args.run)
    arch = arch_of(base)
    dense_spec = SlimSpec.dense(cfg, arch)
    masks, mcfg = load_masks(args.run)
    factors = {"qk": mcfg["w_attn"], "v": mcfg["w_attn"], "mlp": mcfg["w_mlp"], "tok": mcfg["w_tok"]}
    imp_search = Importance.from_masks(masks, factors)
    searched = searched_model(args.run, dense_spec)
    bundle = load_data("fashion-mnist", data_config(base), arch.num_classes, args.train_limit, args.val_limit)
    val = make_loader(bundle.val, bundle.transform, 256, False)
    out = Path(args.out)
    prev = json.loads(out.read_text()) if out.is_file() else {}
    if prev.get("rows"):  # resume a partly done benchmark against the same dense reference and targets
        results = {**prev, "args": vars(args)}
    else:
        dense = {"measured_ms": measure_model(be, base, arch, p.batch_size)["median_ms"],
                 "top1": evaluate(base, val, torch.device("cpu")), "macs": spec_macs(dense_spec),
                 "params": spec_params(dense_spec)}
        results = {"dense": dense, "rows": [], "args": vars(args),
                   "date": dt.datetime.now().isoformat(timespec="seconds")}
    dense_ms = results["dense"]["measured_ms"]
    done = {(r["method"], r["fraction"]) for r in results["rows"]}
    tcfg_retrain = TrainConfig(epochs=args.retrain_epochs, batch_size=128, lr=1e-3, warmup_epochs=0.2)
    for f in args.targets:
        target = f * dense_ms
        for method in args.methods:
            if (method, f) in done:
                continue
            print(f"== {method} at {f}x ({target:.3f} ms)", flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                if method == "slimdeploy":
                    spec = select_structure(imp_search, dense_spec, Target("latency", target), lm, searched,
                                            verify_latency=True)["spec"]
                    student, teacher, epochs = build_slim(spec, searched), base, args.retrain_epochs
                elif method == "vit-slim":
                    spec = fractions_for(cfg, arch, imp_search, lm, target)
                    student, teacher, epochs = build_slim(spec, searched), base, args.retrain_epochs
                elif method == "magnitude":
                    spec = select_structure(magnitude_importance(base, arch), dense_spec, Target("latency", target),
                                            lm, base, verify_latency=True)["spec"]
                    student, teacher, epochs = build_slim(spec, base), base, args.retrain_epochs + args.search_epochs
                else:
                    spec = uniform_spec(cfg, arch, lm, target)
                    student, teacher = build_slim(spec), None
                    epochs = args.train_epochs + args.search_epochs + args.retrain_epochs
                measured_before = measure_model(be, student, arch, p.batch_size)["median_ms"]
                before = evaluate(student, val, torch.device("cpu"))
                if teacher is not None:
                    rec = retrain(student, teacher, bundle, TrainConfig(**{**tcfg_retrain.__dict__, "epochs": epochs}),
                                  DistillConfig("soft"), tmp, torch_device="cpu")
                    top1 = rec["top1"]
                else:
                    scratch = TrainConfig(epochs=epochs, batch_size=128, lr=1e-3, label_smoothing=0.1)
                    hist = fit(student, classification_loss(0.1), bundle, scratch, Path(tmp) / "c.pt",
                               torch_device="cpu")
                    top1 = hist[-1]["top1"]
                row = {"method": method, "fraction": f, "target_ms": target, "measured_ms": measured_before,
                       "measured_over_target": measured_before / target, "top1": top1, "top1_before_training": before,
                       "macs": spec_macs(spec), "params": spec_params(spec), "epochs": epochs,
                       "structure": spec.summary()}
            results["rows"].append(row)
            out.write_text(json.dumps(results, indent=2))
            print(json.dumps({k: v for k, v in row.items() if k != "structure"}), flush=True)
    plot(results, out.with_suffix(".png"))


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    d = results["dense"]
    ax.plot([d["measured_ms"]], [d["top1"]], "k*", ms=12, label="dense")
    markers = {"slimdeploy": "o", "vit-slim": "s", "magnitude": "^", "uniform-scratch": "D"}
    for m in markers:
        rows = sorted((r for r in results["rows"] if r["method"] == m), key=lambda r: r["measured_ms"])
        if rows:
            ax.plot([r["measured_ms"] for r in rows], [r["top1"] for r in rows], marker=markers[m], label=m)
    ax.set_xlabel("measured latency (ms, ORT CPU, batch 1)")
    ax.set_ylabel("Fashion-MNIST top-1 (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    main()
