"""Closed-loop selection on the device: measured latency after the loop vs the target, and the rounds needed.

For targets of 0.3 .. 0.9 x the dense model's latency measured on the device (percentage targets, as users give
them), the family chosen by the measured selection (or the solver with equal kind weights for synthetic
importances) goes through the closed loop: prune, export, measure interleaved with dense, refit, at most --rounds
rounds (a round measures the structures solved at the bracket of budgets together). Reported: measured / target
of the kept structure, its 95% interval, whether round one held a structure in [0.9, 1.0], how many rounds and
structures it took, and how far the structure solved at the full budget was off in round one. Then the kept
structure is measured again the way `verify` does (a fresh export and session, in a separate measurement with the
dense model): the loop and verify should agree within 3%.

    .venv/bin/python benchmarks/select_loop.py --device local --run runs/teacher30
    .venv/bin/python benchmarks/select_loop.py --device local --model deit_small_patch16_224
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import numpy as np

from slimdeploy.latency.backends import get_backend
from slimdeploy.latency.components import nontrivial_
from slimdeploy.latency.draws import synthetic_importance
from slimdeploy.latency.fingerprint import cpu_name
from slimdeploy.latency.measure import SpecMeasurer
from slimdeploy.latency.profile import load_latency_model
from slimdeploy.models import arch_of, create_model, load_dense
from slimdeploy.select.candidates import Family, Problem
from slimdeploy.select.solver import LatencyCost
from slimdeploy.types import ModelConfig, SlimSpec


def verify_ratio(be, spec, model, dense_model, arch, batch) -> float:
    """slim / dense the way verify measures it: fresh exports (both before either is loaded) and sessions, the
    slim model loaded first, one interleaved measurement (again, longer, where its interval is wide)."""
    from slimdeploy.latency import timing
    from slimdeploy.latency.measure import measure_models
    from slimdeploy.slim import build_slim

    models = {"slim": build_slim(spec, model), "dense": dense_model}
    t, _ = timing.measured_steadily(lambda p: measure_models(be, models, arch, batch, p))
    return timing.ratio(t["slim"], t["dense"]).median_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="local")
    ap.add_argument("--model", default=None)
    ap.add_argument("--run", default=None, help="run directory with search masks (real importances)")
    ap.add_argument("--family", default="greedy:1,1,1", help="kind:params of the family re-solved by the loop, "
                    "e.g. greedy:1,1,16 or fractions:0.5,1,0")
    ap.add_argument("--profiles-dir", default=None)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    ap.add_argument("--fold", default=None, help="then fold every round into a copy of the profile written here, "
                    "and run the targets again on it (the loop's measurements teach the model its own region)")
    ap.add_argument("--out", default=None, help="results file (default: benchmarks/results/select_loop_NAME.json, "
                    "NAME the run's folder or the model); an existing file is not overwritten")
    args = ap.parse_args()
    name = Path(args.run).name if args.run else args.model
    out = Path(args.out or f"benchmarks/results/select_loop_{name}.json")
    if out.exists():
        raise SystemExit(f"error: {out} exists (earlier results): give another --out")
    kind, _, params = args.family.partition(":")
    family = Family(kind, tuple(float(x) for x in params.split(",")) if params else ())
    if args.run:
        from slimdeploy.prune import searched_model
        from slimdeploy.select.importance import load_importance

        dense_model, cfg = load_dense(args.run)
        imp, _ = load_importance(args.run)
        arch = arch_of(dense_model)
        model = searched_model(args.run, SlimSpec.dense(cfg, arch))
        label = f"{cfg.name} (search of {args.run})"
    else:
        cfg = ModelConfig(args.model)
        dense_model = model = nontrivial_(create_model(cfg)).eval()
        arch = arch_of(model)
        imp = synthetic_importance(arch, np.random.default_rng(0))
        label = f"{cfg.name} (random weights, synthetic importances)"
    lm, warnings = load_latency_model(args.device, dense_model, cfg, profiles_dir=args.profiles_dir)
    p = lm.profile
    be = get_backend(p.backend, threads=p.threads, precision=p.precision)
    measure = SpecMeasurer(be, model, arch, p.batch_size, dense_model)
    dense_spec = SlimSpec.dense(cfg, arch)

    def solve(m, budget):
        return Problem(arch, cfg, imp, LatencyCost(m)).solve(family, budget)

    rows = run_targets(args, lm, solve, measure, be, model, dense_model, arch, dense_spec, p)
    summary = summarise(args, lm, family, warnings, dense_spec, rows, label)
    if args.fold:
        import shutil

        from slimdeploy.latency.model import LatencyModel
        from slimdeploy.latency.profile import fold_rounds

        shutil.copy(lm.path, args.fold)
        rounds = [r for row in rows for r in row["round_log"]]
        folded = LatencyModel(fold_rounds(args.fold, rounds), path=Path(args.fold))
        again = run_targets(args, folded, solve, measure, be, model, dense_model, arch, dense_spec, p)
        summary["after_fold"] = summarise(args, folded, family, warnings, dense_spec, again, label)
    out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=2, default=str)[:3000])


def run_targets(args, lm, solve, measure, be, model, dense_model, arch, dense_spec, p) -> list[dict]:
    from slimdeploy.select.loop import closed_loop

    rows = []
    for f in args.fractions:
        res = closed_loop(solve, lm, measure, dense_spec, None, f, args.rounds)
        first = [m for m in res.measured if m["round"] == 1]
        in_window = [m for m in first if 0.9 <= m["y"] and m["y_high"] <= 1.0]
        again = verify_ratio(be, res.spec, model, dense_model, arch, p.batch_size)
        loop_ratio = res.over_dense
        row = {"fraction": f, "target_ms": res.target_ms, "dense_ms": res.dense_ms, "measured_ms": res.measured_ms,
               "measured_over_target": res.measured_ms / res.target_ms,
               "high_over_target": res.measured_high_ms / res.target_ms, "met": res.met,
               "rounds": res.rounds, "structures_measured": len(res.measured), "chosen_round": res.chosen_round,
               # landed in round one, and kept: confirmed by the second measurement
               "first_round_in_window": bool(in_window) and res.chosen_round == 1 and res.met,
               # the structure solved at the full budget: how far the latency model alone is off
               "first_round_predicted_over_target": first[0]["predicted_ms"] / res.target_ms,
               "first_round_measured_over_target": first[0]["y"], "loop_over_dense": loop_ratio,
               "verify_over_dense": again, "loop_vs_verify": again / loop_ratio - 1, "round_log": res.measured}
        rows.append(row)
        print(f"{f:.1f}x: target {res.target_ms:.3f} ms, kept round {res.chosen_round}: {res.measured_ms:.3f} ms "
              f"({row['measured_over_target']:.3f} of target, interval up to {row['high_over_target']:.3f}); "
              f"round 1 {[round(m['y'], 3) for m in first]}; {res.rounds} round(s); "
              f"verify {100 * row['loop_vs_verify']:+.1f}%",
              flush=True)
    return rows


def summarise(args, lm, family, warnings, dense_spec, rows, label) -> dict:
    return {"label": label, "device": args.device, "profile": str(lm.path), "cpu": cpu_name(), "family": family.name,
            "warnings": warnings, "dense_predicted_ms": lm.predict(dense_spec),
            "in_window": sum(0.9 <= r["measured_over_target"] and r["met"] for r in rows),
            "first_round_in_window": sum(r["first_round_in_window"] for r in rows), "targets": len(rows),
            "rounds_total": sum(r["rounds"] for r in rows),
            "structures_measured": sum(r["structures_measured"] for r in rows),
            "loop_vs_verify_max_abs": max(abs(r["loop_vs_verify"]) for r in rows),
            "date": dt.datetime.now().isoformat(timespec="seconds"), "rows": rows}


if __name__ == "__main__":
    main()
