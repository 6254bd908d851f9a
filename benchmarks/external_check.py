"""An independent check of a run's latency claim: plain onnxruntime and a hand-written interleaved loop, none of
slimdeploy's timing code. The slim model is the run's model.onnx; the dense model is exported once (slimdeploy's
exporter, so that both graphs come from the same tool) at the same batch size.

    .venv/bin/python benchmarks/external_check.py runs/demo
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--rounds", type=int, default=41)
    ap.add_argument("--calls", type=int, default=200, help="calls per model per round")
    args = ap.parse_args()
    run = Path(args.run)
    report = json.loads((run / "report.json").read_text())
    from slimdeploy.export import export_onnx
    from slimdeploy.models import arch_of, load_dense

    dense, _ = load_dense(run)
    a = arch_of(dense)
    batch = report["batch_size"]
    x = np.random.default_rng(1).standard_normal((batch, a.in_chans, a.img_size, a.img_size), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        dense_onnx = export_onnx(dense, Path(tmp) / "dense.onnx", (a.in_chans, a.img_size, a.img_size), batch)
        sessions = {"slim": session(run / "model.onnx"), "dense": session(dense_onnx)}
        feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
        for k, s in sessions.items():  # warm-up
            for _ in range(200):
                s.run(None, feeds[k])
        per_round = {k: [] for k in sessions}
        for r in range(args.rounds):
            for k in (["slim", "dense"] if r % 2 else ["dense", "slim"]):
                s, f, ts = sessions[k], feeds[k], []
                for _ in range(args.calls):
                    t = time.perf_counter()
                    s.run(None, f)
                    ts.append(time.perf_counter() - t)
                per_round[k].append(statistics.median(ts) * 1e3)
    ratios = [s / d for s, d in zip(per_round["slim"], per_round["dense"])]
    q = np.percentile(ratios, [2.5, 97.5])
    fraction = report["extra"].get("target_fraction")
    out = {"slim_ms": statistics.median(per_round["slim"]), "dense_ms": statistics.median(per_round["dense"]),
           "slim_over_dense": statistics.median(ratios), "ratio_2.5_97.5": q.tolist(), "target_fraction": fraction,
           "report_slim_over_dense": report["extra"]["slim_over_dense"]["median_ms"],
           "within_target": statistics.median(ratios) <= fraction if fraction else None}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
