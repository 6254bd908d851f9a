"""Closed-loop selection on ONNX Runtime CPU: measured latency after the loop vs the target.

For targets of 0.4 .. 0.9 x the dense model's measured latency, select with verify_latency (prune,
export, measure, rescale the budget, at most --rounds rounds) and report measured / target and
the rounds needed. deit_small uses random weights and synthetic importances; a run directory
(e.g. runs/demo) uses its real search masks.

    .venv/bin/python benchmarks/select_loop.py --device epyc-2c-ort1t-b1-deit_small --model deit_small_patch16_224
    .venv/bin/python benchmarks/select_loop.py --device epyc-2c-ort1t-b1-fmnist-vit --run runs/demo
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import numpy as np

from slimdeploy.backends import get_backend
from slimdeploy.latency import LatencyModel, check_profile_fits
from slimdeploy.models import arch_of, create_model, load_dense
from slimdeploy.profile import measure_model, nontrivial_
from slimdeploy.select import Target, select_structure
from slimdeploy.selector import Importance
from slimdeploy.types import ModelConfig, SlimSpec


def synthetic_importance(arch, seed=0) -> Importance:
    rng = np.random.default_rng(seed)
    depth = np.linspace(1.5, 0.5, arch.depth)[:, None]
    return Importance(qk=rng.exponential(1.0, (arch.depth, arch.num_heads, arch.head_dim)) * depth[:, :, None] * 1e-3,
                      v=rng.exponential(1.0, (arch.depth, arch.num_heads, arch.head_dim)) * depth[:, :, None] * 1e-3,
                      mlp=rng.exponential(1.0, (arch.depth, arch.mlp_dim)) * depth * 2e-4,
                      tok=rng.exponential(1.0, (arch.depth, arch.num_patches)) * depth * 2e-3, mode="synthetic")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--run", default=None, help="run directory with search masks (real importances)")
    ap.add_argument("--profiles-dir", default=None)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    args = ap.parse_args()
    lm = LatencyModel.load(args.device, args.profiles_dir)
    if args.run:
        from slimdeploy.prune import searched_model
        from slimdeploy.search import load_masks

        dense_model, cfg = load_dense(args.run)
        masks, mcfg = load_masks(args.run)
        factors = {"qk": mcfg["w_attn"], "v": mcfg["w_attn"], "mlp": mcfg["w_mlp"], "tok": mcfg["w_tok"]}
        imp = Importance.from_masks(masks, factors)
        arch = arch_of(dense_model)
        dense_model = searched_model(args.run, SlimSpec.dense(cfg, arch))
        label = f"{cfg.name} (search masks of {args.run})"
    else:
        cfg = ModelConfig(args.model)
        dense_model = nontrivial_(create_model(cfg)).eval()
        arch = arch_of(dense_model)
        imp = synthetic_importance(arch)
        label = f"{cfg.name} (random weights, synthetic importances)"
    check_profile_fits(lm.profile, arch)
    p = lm.profile
    be = get_backend(p.backend, threads=p.threads, precision=p.precision)
    dense_spec = SlimSpec.dense(cfg, arch)
    dense_ms = measure_model(be, dense_model, arch, p.batch_size)["median_ms"]
    rows = []
    for f in args.fractions:
        target = f * dense_ms
        res = select_structure(imp, dense_spec, Target("latency", target, text=f"{f:.1f}x"), lm, dense_model,
                               verify_latency=True, rounds=args.rounds)
        final = res["measured_ms"]
        row = {"fraction": f, "target_ms": target, "measured_ms": final, "measured_over_target": final / target,
               "predicted_ms": res["predicted_ms"], "rounds": len(res["rounds"]), "chosen_round": res["chosen_round"],
               "in_window": 0.9 <= final / target <= 1.0, "round_log": res["rounds"]}
        rows.append(row)
        print(f"{f:.1f}x: target {target:.3f} ms, measured {final:.3f} ms ({final / target:.3f}), "
              f"rounds {row['rounds']}", flush=True)
    summary = {"label": label, "device": args.device, "dense_measured_ms": dense_ms,
               "dense_predicted_ms": lm.predict(dense_spec),
               "in_window": sum(r["in_window"] for r in rows), "targets": len(rows),
               "date": dt.datetime.now().isoformat(timespec="seconds"), "rows": rows}
    name = Path(args.run).name if args.run else args.model
    Path(f"benchmarks/results/select_loop_{name}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
