"""Where the noise of a slim / dense ratio comes from: the sessions' memory placement, or the machine over time.

Each repetition loads --sessions fresh sessions of the dense model and of two random structures of about
--size of it, and measures every session as its own model (interleaved rounds, the whole-model protocol). Within
a repetition, the spread of one model's sessions is placement; between repetitions (a fresh set of sessions,
tens of seconds later, the same process), the ratio of the sessions' medians moves with placement averaged over
--sessions and with the machine's state. Repeated with ONNX Runtime's CPU memory arena on and off.

    .venv/bin/python benchmarks/timing_drift.py --reps 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from slimdeploy.analysis import spec_macs
from slimdeploy.export import export_onnx
from slimdeploy.latency import timing
from slimdeploy.latency.backends import get_backend
from slimdeploy.latency.components import nontrivial_
from slimdeploy.latency.draws import random_spec
from slimdeploy.latency.fingerprint import cpu_name
from slimdeploy.latency.measure import example_input
from slimdeploy.models import arch_of, create_model
from slimdeploy.slim import build_slim
from slimdeploy.types import ModelConfig, SlimSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fmnist-vit")
    ap.add_argument("--size", type=float, default=0.3, help="the random structures' size (fraction kept)")
    ap.add_argument("--sessions", type=int, default=6)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--arenas", nargs="+", default=["on", "off"], choices=["on", "off"],
                    help="ONNX Runtime's CPU memory arena, in this order")
    ap.add_argument("--out", default="benchmarks/results/timing_drift.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig(args.model)
    model = nontrivial_(create_model(cfg)).eval()
    arch = arch_of(model)
    rng = random.Random(7)
    dense_macs = spec_macs(SlimSpec.dense(cfg, arch))
    specs = []
    while len(specs) < 2:
        s = random_spec(arch, cfg, rng, size=args.size)
        if 0.2 < spec_macs(s) / dense_macs < 0.4:
            specs.append(s)
    tmp = Path(tempfile.mkdtemp())
    shape = (arch.in_chans, arch.img_size, arch.img_size)
    paths = {"dense": export_onnx(model, tmp / "dense.onnx", shape, 1)}
    paths |= {f"slim{i}": export_onnx(build_slim(s, model), tmp / f"slim{i}.onnx", shape, 1)
              for i, s in enumerate(specs)}
    x = example_input(arch, 1)
    out = {"cpu": cpu_name(), "model": args.model, "sessions": args.sessions,
           "date": dt.datetime.now().isoformat(timespec="seconds"), "arena": {}}
    for arena in args.arenas:
        backend = get_backend("ort-cpu")
        base_options = backend.options

        def options(base_options=base_options, arena=arena):
            so = base_options()
            so.enable_cpu_mem_arena = arena == "on"
            return so
        backend.options = options
        reps, t0 = [], time.time()
        for rep in range(args.reps):
            sessions = {f"{n}/{k}": backend.load_onnx(p) for k in range(args.sessions) for n, p in paths.items()}
            m = timing.measure({n: s.timed(x) for n, s in sessions.items()}, timing.MODEL)
            per = {n: [m[f"{n}/{k}"].median_ms for k in range(args.sessions)] for n in paths}
            row = {"t_s": round(time.time() - t0, 1), "session_ms": per,
                   "median_ms": {n: statistics.median(v) for n, v in per.items()},
                   "session_range": {n: max(v) / min(v) for n, v in per.items()}}
            row["over_dense"] = {n: row["median_ms"][n] / row["median_ms"]["dense"] for n in paths if n != "dense"}
            reps.append(row)
            print(f"arena {arena} rep {rep + 1} at {row['t_s']:5.0f} s: dense {row['median_ms']['dense']:.4f} ms; "
                  + "; ".join(f"{n} {r:.4f} x dense (sessions {row['session_range'][n]:.3f})"
                              for n, r in row["over_dense"].items()), flush=True)
            del sessions
        drift = {n: max(r["over_dense"][n] for r in reps) / min(r["over_dense"][n] for r in reps)
                 for n in reps[0]["over_dense"]}
        out["arena"][arena] = {"reps": reps, "ratio_range_over_reps": drift,
                               "median_session_range": float(np.median([v for r in reps
                                                                        for v in r["session_range"].values()]))}
        print(f"arena {arena}: ratio range over repetitions {drift}; median session range "
              f"{out['arena'][arena]['median_session_range']:.3f}")
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
