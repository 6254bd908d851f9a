"""Latency model fidelity: predicted vs measured end-to-end latency over random slim specs.

For each random spec (seeds disjoint from the profile's calibration models) the slim model is
built, exported as `slimdeploy export` does and timed on the profile's backend; the prediction
comes from the profile's tables. Baseline: a FLOPs-proportional predictor,
measured_dense * MACs(spec) / MACs(dense).

    .venv/bin/python benchmarks/latency_fidelity.py --device epyc-2c-ort1t-b1-fmnist-vit --model fmnist-vit -n 30
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import statistics
from pathlib import Path

import numpy as np

from slimdeploy.analysis import spec_macs
from slimdeploy.backends import get_backend
from slimdeploy.latency import LatencyModel, check_profile_fits
from slimdeploy.models import arch_of, create_model
from slimdeploy.profile import measure_model, nontrivial_, random_spec
from slimdeploy.slim import build_slim
from slimdeploy.types import ModelConfig, SlimSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", required=True)
    ap.add_argument("--model", default="fmnist-vit")
    ap.add_argument("-n", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--profiles-dir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    lm = LatencyModel.load(args.device, args.profiles_dir)
    cfg = ModelConfig(args.model)
    model = nontrivial_(create_model(cfg))
    arch = arch_of(model)
    check_profile_fits(lm.profile, arch)
    p = lm.profile
    backend = get_backend(p.backend, threads=p.threads, precision=p.precision)
    dense_spec = SlimSpec.dense(cfg, arch)
    dense = measure_model(backend, model, arch, p.batch_size)["median_ms"]
    rng = random.Random(args.seed)
    rows = []
    for i in range(args.n):
        spec = random_spec(arch, cfg, rng, step=p.model.get("step", 8))
        t = measure_model(backend, build_slim(spec, model), arch, p.batch_size)
        pred = lm.predict(spec)
        flops = dense * spec_macs(spec) / spec_macs(dense_spec)
        rows.append({"spec": i, "measured_ms": t["median_ms"], "spread": t["spread"], "predicted_ms": pred,
                     "flops_proxy_ms": flops, "macs_ratio": spec_macs(spec) / spec_macs(dense_spec)})
        m = t["median_ms"]
        print(f"{i:3d} measured {m:8.3f} ms  predicted {pred:8.3f} ({100 * (pred / m - 1):+5.1f}%)"
              f"  flops {flops:8.3f} ({100 * (flops / m - 1):+5.1f}%)", flush=True)
    err = np.array([abs(r["predicted_ms"] / r["measured_ms"] - 1) for r in rows])
    ferr = np.array([abs(r["flops_proxy_ms"] / r["measured_ms"] - 1) for r in rows])
    summary = {"model": args.model, "device": args.device, "hardware": p.hardware, "backend": p.backend,
               "batch_size": p.batch_size, "n": len(rows), "dense_measured_ms": dense,
               "dense_predicted_ms": lm.predict(dense_spec),
               "median_abs_error": float(np.median(err)), "p90_abs_error": float(np.percentile(err, 90)),
               "max_abs_error": float(err.max()), "flops_median_abs_error": float(np.median(ferr)),
               "flops_p90_abs_error": float(np.percentile(ferr, 90)), "flops_max_abs_error": float(ferr.max()),
               "median_spread": statistics.median(r["spread"] for r in rows),
               "date": dt.datetime.now().isoformat(timespec="seconds"), "rows": rows}
    out = Path(args.out or f"benchmarks/results/latency_fidelity_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
