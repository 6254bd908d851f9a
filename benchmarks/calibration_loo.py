"""How well a profile's latency model predicts whole models it was not fitted on, computed from stored
measurements (nothing is timed).

For each profile: leave-one-out over its calibration's static whole models (each predicted as a ratio to the
dense model by the fit of all the others, with the tables as this version reads them); with --rows, also the
random specs and solver picks of latency_fidelity.py result files, predicted by the profile as it stands and
compared with their measured ratios to dense. Run at two commits to compare two versions of the model on the
same measurements (profiles of earlier sessions: benchmarks/results/profiles/). With --fold, the solver's picks
that `protocol_checks.py remeasure` measured again for that profile join its calibration, those of all but one
synthetic importance at a time, and the held-out ones are predicted: would more picks in the calibration price
the rest right?

    .venv/bin/python benchmarks/calibration_loo.py benchmarks/results/profiles/*.json profiles/xeon-*deit_small.json
    .venv/bin/python benchmarks/calibration_loo.py benchmarks/results/profiles/deit_small_epyc_0833.json \\
        --rows benchmarks/results/latency_fidelity_deit_small_epyc.json
    .venv/bin/python benchmarks/calibration_loo.py benchmarks/results/profiles/fmnist-vit_zen5_1203g.json \\
        --fold benchmarks/results/remeasure_fmnist-vit_zen5_1203g.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from slimdeploy.latency.calibration import calibrated, fit_calibration
from slimdeploy.latency.model import LatencyModel, point_sizes
from slimdeploy.types import DeviceProfile


def summary(errors: list[float]) -> dict:
    """|error| statistics as latency_fidelity.py reports them (p90 interpolated, numpy's default)."""
    a = np.abs(errors)
    return {"n": len(a), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "max": float(a.max()),
            "signed_median": float(np.median(errors))}


def leave_one_out(lm: LatencyModel) -> dict:
    cal = lm.profile.calibration
    points, pairs, warm = cal["points"], cal.get("pairs"), bool(lm.warm)
    errors, held = [], []
    for i, p in enumerate(points[1:], 1):
        if p.get("ranked_twin") or (p.get("token_mode") or "static") != "static":
            continue
        fit = fit_calibration(points[:i] + points[i + 1:], pairs)
        predicted = calibrated(p["features"], fit, warm) / calibrated(points[0]["features"], fit, warm)
        errors.append(predicted / (p["measured_ms"] / points[0]["measured_ms"]) - 1)
        held.append(p)
    return {**summary(errors), "errors": errors, "held": held}


def structure(p: dict, model: dict) -> dict:
    """What a held-out point is made of, each as a fraction of dense (gathers: a count)."""
    w = p["widths"]
    return {"tokens": np.mean([b["tokens"] for b in w]) / model["num_tokens"],
            "mlp": np.mean([b["mlp"] for b in w]) / model["mlp_dim"],
            "attention": np.mean([b["heads"] * (b["qk"] + b["v"]) for b in w]) / (2 * model["num_heads"]
                                                                                  * model["head_dim"]),
            "embed": w[0].get("embed", model["embed_dim"]) / model["embed_dim"],
            "gathers": p["features"]["gather"], "halfwidth": p.get("halfwidth", 0.0)}


def residual_structure(lm: LatencyModel, loo: dict) -> dict:
    """The correlation of the held-out errors with what the models are made of: a pattern would say what the fit
    misses; correlations that change sign from profile to profile say the errors are the measurements' noise."""
    rows = [structure(p, lm.profile.model) for p in loo["held"]]
    out = {}
    for key in rows[0]:
        x = np.array([r[key] for r in rows], float)
        if x.std() > 0:
            out[key] = float(np.corrcoef(x, loo["errors"])[0, 1])
    return out


def rows_error(lm: LatencyModel, path: Path) -> dict:
    dense = lm.predict_sizes(lm.dense_sizes())
    out = {}
    for kind in ("random", "solver"):
        errors = [lm.for_tokens(r.get("token_mode") or "static").predict_sizes(*point_sizes(r)) / dense
                  / r["measured_over_dense"] - 1
                  for r in json.loads(path.read_text())["rows"] if r["kind"].startswith(kind)]
        if errors:
            out[kind] = summary(errors)
    return out


def fold_picks(lm: LatencyModel, path: Path) -> list[dict]:
    """Per synthetic importance: the picks of the others folded into the calibration (at their measured ratio
    times the dense point's ms), the held-out picks predicted; see the module's docstring. The calibration's points
    are the model's own: featured as the tables are read now (LatencyModel refits an older fit on loading)."""
    cal, n, warm = lm.profile.calibration, int(lm.profile.model["num_tokens"]), bool(lm.warm)
    points = cal["points"]
    picks = [r for r in json.loads(path.read_text())["rows"] if r["kind"].startswith("solver")]

    def features(r):
        return lm.features([tuple(s) for s in r["sizes"]], n)

    def measured(r):
        return float(np.median(r["now_over_dense"]))

    def error(fit, r):
        return calibrated(features(r), fit, warm) / calibrated(points[0]["features"], fit, warm) / measured(r) - 1
    out = [{"held_out": "none (the profile as made)", **summary([error(cal, r) for r in picks])}]
    for name in sorted({r["kind"].split()[-1] for r in picks}):
        folded = [{"features": features(r), "halfwidth": 0.0, "measured_ms": measured(r) * points[0]["measured_ms"],
                   "token_mode": "static"} for r in picks if not r["kind"].endswith(name)]
        fit = fit_calibration(points + folded, cal.get("pairs"))
        out.append({"held_out": name, "folded": len(folded), "scale_fixed": fit["scale_fixed"],
                    **summary([error(fit, r) for r in picks if r["kind"].endswith(name)])})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profiles", nargs="+")
    ap.add_argument("--rows", nargs="*", default=[], help="latency_fidelity.py results to predict")
    ap.add_argument("--residuals", action="store_true", help="correlate the held-out errors with the structures")
    ap.add_argument("--fold", default=None, help="a protocol_checks.py remeasure result made for the (one) profile")
    args = ap.parse_args()
    for path in args.profiles:
        lm = LatencyModel(DeviceProfile.load(path))
        cal = lm.profile.calibration
        loo = leave_one_out(lm)
        print(f"{path}: fit {cal['fit_median_abs_error']:.1%} / {cal['fit_max_abs_error']:.1%}; leave-one-out "
              f"(n={loo['n']}) median {loo['median']:.1%}, p90 {loo['p90']:.1%}, max {loo['max']:.1%}, "
              f"signed {loo['signed_median']:+.1%}", flush=True)
        for kind in ("random", "solver"):  # profiles that record what each whole model was drawn as
            errors = [e for e, p in zip(loo["errors"], loo["held"]) if p.get("drawn") == kind]
            if errors:
                s = summary(errors)
                print(f"  held out, {kind} (n={s['n']}): median {s['median']:.1%}, max {s['max']:.1%}, "
                      f"signed {s['signed_median']:+.1%}")
        if args.residuals:
            print("  error correlates with: " + ", ".join(f"{k} {v:+.2f}"
                                                          for k, v in residual_structure(lm, loo).items()))
        if args.fold:
            for r in fold_picks(lm, Path(args.fold)):
                print(f"  picks, held out {r['held_out']}: median {r['median']:.1%}, max {r['max']:.1%}, signed "
                      f"{r['signed_median']:+.1%}" + (f" (folded {r['folded']}; scale_fixed {r['scale_fixed']:.3f})"
                                                      if "folded" in r else ""))
        for rows in args.rows:
            for kind, s in rows_error(lm, Path(rows)).items():
                print(f"  {Path(rows).name} {kind} (n={s['n']}): median {s['median']:.1%}, p90 {s['p90']:.1%}, "
                      f"max {s['max']:.1%}, signed {s['signed_median']:+.1%}", flush=True)


if __name__ == "__main__":
    main()
