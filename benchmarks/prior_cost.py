"""What attentive mode's position prior costs in a whole model (issue 16): at each kept fraction, the structure of
ViT-Slim's token fraction rule on the static search (every head, channel and unit kept) built three ways: static
positions, attentive ranking by attention alone, and attentive ranking with the attentive search's prior. All are
measured interleaved with the dense model (slimdeploy's whole-model protocol on ONNX Runtime CPU), --reps times;
the paired differences per repeat are reported.

    .venv/bin/python benchmarks/prior_cost.py --static-run runs/tokens-plain-static \\
        --attentive-run runs/tokens-plain-attentive --out benchmarks/results/prior_cost_plain.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from token_rules import own_prior, ranked  # noqa: E402

from slimdeploy.data import load_data  # noqa: E402
from slimdeploy.defaults import TOKENS  # noqa: E402
from slimdeploy.latency.backends import get_backend  # noqa: E402
from slimdeploy.latency.fingerprint import cpu_name  # noqa: E402
from slimdeploy.latency.measure import measure_models  # noqa: E402
from slimdeploy.models import arch_of, data_config, load_dense  # noqa: E402
from slimdeploy.prune import searched_model  # noqa: E402
from slimdeploy.select.importance import load_importance  # noqa: E402
from slimdeploy.select.vitslim import fraction_spec  # noqa: E402
from slimdeploy.slim import build_slim  # noqa: E402
from slimdeploy.types import SlimSpec  # noqa: E402

WAYS = ("static", "attentive", "prior")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="fashion-mnist", help="for a search made before it recorded the prior")
    ap.add_argument("--static-run", required=True)
    ap.add_argument("--attentive-run", required=True)
    ap.add_argument("--keep-tokens", type=float, nargs="+", default=[0.5, 0.3])
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    teacher, cfg = load_dense(args.static_run)
    a = arch_of(teacher)
    dense_spec = SlimSpec.dense(cfg, a)
    static_imp, _ = load_importance(args.static_run)
    weights = searched_model(args.attentive_run, dense_spec)
    prior = own_prior(args.attentive_run, weights, load_data(args.data, data_config(teacher), a.num_classes), a)
    models, out = {"dense": teacher}, {"cpu": cpu_name(), "reps": args.reps, "rows": {}}
    for keep in args.keep_tokens:
        spec = fraction_spec(a, cfg, static_imp, 1.0, 1.0, keep)
        spec.blocks[0].tokens = list(range(a.num_tokens))
        att = spec.in_mode("attentive")
        built = (build_slim(spec, weights), build_slim(att, weights),
                 ranked(att, weights, "prior", prior, TOKENS["prior_weight"]))
        for way, m in zip(WAYS, built):
            models[f"{keep:g} {way}"] = m
        out["rows"][f"{keep:g}"] = {"counts": spec.token_counts()}
    ms = {k: [] for k in models}
    for _ in range(args.reps):
        for k, m in measure_models(get_backend("ort-cpu"), models, a, 1).items():
            ms[k].append(m.median_ms)
        print(time.strftime("%H:%M:%S"), {k: round(v[-1] * 1000, 1) for k, v in ms.items()}, flush=True)
    for key, row in out["rows"].items():
        us = {w: 1000 * np.array(ms[f"{key} {w}"]) for w in WAYS}
        row.update({f"{w}_us": float(np.median(us[w])) for w in WAYS})
        row["prior_minus_attentive_us"] = (us["prior"] - us["attentive"]).tolist()
        row["attentive_minus_static_us"] = (us["attentive"] - us["static"]).tolist()
        print(key, f"static {row['static_us']:.0f} us, attentive {row['attentive_us']:.0f}, prior "
              f"{row['prior_us']:.0f}; prior - attentive median {np.median(row['prior_minus_attentive_us']):.0f} us "
              f"(range {min(row['prior_minus_attentive_us']):.0f} to {max(row['prior_minus_attentive_us']):.0f})")
    out["dense_us"] = float(np.median(ms["dense"])) * 1000
    out["ms"] = ms
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
