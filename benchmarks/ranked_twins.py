"""What a ranking costs inside a whole model: ranked structures against their static twins.

Each ranked (attentive or fused) structure kept by `token_modes.py measure` is measured with its static twin (the
same counts and widths, the tokens fixed positions) and the dense model, interleaved, repeated; the paired
difference is what the ranking costs in the whole model, beside what the latency model predicts for each.

    .venv/bin/python benchmarks/ranked_twins.py --results benchmarks/results/token_modes_shifted_rank2d.json \
        --run runs/tokens-shifted-static --target 0.3 --reps 5
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from slimdeploy.latency import timing
from slimdeploy.latency.backends import get_backend
from slimdeploy.latency.fingerprint import cpu_name
from slimdeploy.latency.measure import measure_models
from slimdeploy.latency.profile import load_latency_model
from slimdeploy.models import arch_of, load_dense
from slimdeploy.slim import build_slim
from slimdeploy.types import RANKED_TOKEN_MODES, SlimSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True, help="a token_modes.py results file")
    ap.add_argument("--run", required=True, help="the dense model's run folder")
    ap.add_argument("--target", default="0.3")
    ap.add_argument("--device", default="local")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, help="results file (default: beside --results, named by the target)")
    args = ap.parse_args()
    teacher, cfg = load_dense(Path(args.run))
    a = arch_of(teacher)
    lm, warnings = load_latency_model(args.device, teacher, cfg)
    rows = json.loads(Path(args.results).read_text())["targets"][args.target]
    specs = {}
    for mode, row in rows.items():
        if mode in ("static", *RANKED_TOKEN_MODES) and row.get("spec"):
            specs[mode] = SlimSpec.from_dict(row["spec"])
            if mode in RANKED_TOKEN_MODES:
                specs[f"{mode} as static"] = specs[mode].in_mode("static")
    models = {k: build_slim(s, teacher) for k, s in specs.items()} | {"dense": teacher}
    backend = get_backend(lm.profile.backend, threads=lm.profile.threads)
    ms = {k: [] for k in models}
    for rep in range(args.reps):
        t = measure_models(backend, models, a, lm.profile.batch_size, timing.MODEL)
        for k in models:
            ms[k].append(t[k].median_ms)
        print(f"round {rep + 1}: " + ", ".join(f"{k} {t[k].median_ms / t['dense'].median_ms:.4f}" for k in specs),
              flush=True)
    dense_ms, dense_pred = statistics.median(ms["dense"]), lm.predict(SlimSpec.dense(cfg, a))
    out = {"cpu": cpu_name(), "warnings": warnings, "target": args.target, "dense_ms": dense_ms, "rows": {}}
    for k, s in specs.items():
        measured = statistics.median(x / d for x, d in zip(ms[k], ms["dense"]))
        predicted = lm.predict(s) / dense_pred
        row = {"measured": measured, "predicted": predicted, "error": predicted / measured - 1}
        if k in RANKED_TOKEN_MODES:  # the ranking's cost: paired with its twin in the same rounds
            twin = f"{k} as static"
            row["ranking_us"] = 1e3 * statistics.median(x - y for x, y in zip(ms[k], ms[twin]))
            row["ranking_predicted_us"] = 1e3 * (lm.predict(s) - lm.predict(specs[twin]))
        out["rows"][k] = row
        extra = (f", ranking {row['ranking_us']:.1f} us measured, {row['ranking_predicted_us']:.1f} us predicted"
                 if "ranking_us" in row else "")
        print(f"{k:20s} measured {measured:.4f} x dense, predicted {predicted:.4f} ({100 * row['error']:+.1f}%){extra}")
    dest = Path(args.out or Path(args.results).with_name(Path(args.results).stem + f"_twins_{args.target}.json"))
    dest.write_text(json.dumps(out, indent=2))
    print(f"dense {dense_ms:.3f} ms; written {dest}")


if __name__ == "__main__":
    main()
