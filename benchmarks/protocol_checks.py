"""Checks of the measurement protocol itself (issue 13), each a comparison run alone on the machine.

`calls`: the calibration protocol with one and with two calls a session and round at least, against the
whole-model protocol (`MODEL`), on random structures of a slow model (deit_small: one call is longer than a
round's share): slim / dense ratios under each, interleaved repetitions.

`load-order`: the same dense model twice in one chunk, loaded first and last with six random slim models
between, measured by `MODEL`. `--layout export-first` measures through `measure_models` (as every comparison
does); the others export once, in the worker processes, and load the files chunk after chunk: `worker-files`
each model's sessions together (as `measure_loaded` did up to 2026-12-01), `round-robin` every model's first
session, then every second one (as it does now), `alternate` the two by turns. dense_last / dense_first should be
1 up to noise.

`mlp-widths`: whole models whose every block keeps m MLP units (all else dense), m on the profile's MLP grid and
half way between its points, each with the dense model, by `MODEL`. `position` says where a half-way model
measured between its two neighbours: 1 for a staircase (the cost of the next point up, how the latency model read
such a width up to calibration version 2), 0.5 for linear (how it reads it since). On deit_small the grid steps by
128 above 1024 units, so the staircase priced a random MLP width up to 12% too high. `--from`: the narrowest grid
width to include (the whole grid is ~60 models a chunk on deit_small).

`interleave`: can the protocol's own settings beat a busy machine's noise? The dense model and two random
structures (about 0.3 and 0.6 of its size), exported once; every repetition measures them under each setting in
turn (rotating order), with fresh sessions: `MODEL` as is, shorter rounds (61 x 0.03 s: finer pairing), longer
rounds (3 x 0.6 s: calls warmer), six sessions a model (more placements), and `MODEL` on the same sessions every
repetition (`kept`: what is left of the spread without session placement). Per setting: the slim / dense ratio's
median over repetitions, its spread (sd / median) and the median 95% half-width one measurement reports.

`remeasure`: do a profile's whole models measure now as they did when it was made? The profile's static
calibration models, and the solver's picks of a latency_fidelity.py result (`--rows`) made with it, measured again
as the fidelity benchmark measures (chunks of seven with the dense model, `MODEL`, --reps passes in shuffled
chunks). Per model: the ratio to dense now against the profile's stored ratio (calibration) or the fidelity run's
(picks), and what the profile predicts. If the calibration models moved by what the picks are off, the machine's
state between the two measurements is the error; if they did not, the model is.

    .venv/bin/python benchmarks/protocol_checks.py calls --model deit_small_patch16_224 --reps 2
    .venv/bin/python benchmarks/protocol_checks.py load-order --layout alternate --chunks 16
    .venv/bin/python benchmarks/protocol_checks.py mlp-widths --model deit_small_patch16_224 --from 1024 --reps 3
    .venv/bin/python benchmarks/protocol_checks.py interleave --reps 10
    .venv/bin/python benchmarks/protocol_checks.py remeasure --profile PROFILE.json --rows FIDELITY.json --reps 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from slimdeploy.latency import timing
from slimdeploy.latency.backends import get_backend
from slimdeploy.latency.components import nontrivial_
from slimdeploy.latency.draws import random_spec
from slimdeploy.latency.fingerprint import cpu_name
from slimdeploy.latency.measure import close_all, export_deployed, load_round_robin, measure_models, measure_sessions
from slimdeploy.latency.model import LatencyModel, point_sizes
from slimdeploy.models import arch_of, create_model
from slimdeploy.slim import build_slim
from slimdeploy.types import BlockSpec, DeviceProfile, ModelConfig, SlimSpec


def calls(model, arch, cfg, backend, reps: int) -> dict:
    rng = random.Random(1)
    specs = {f"s{i}": random_spec(arch, cfg, rng, 8, size=0.15 + 0.8 * i / 6) for i in range(7)}
    protocols = {"calibration, 1 call": replace(timing.CALIBRATION, min_calls=1),
                 "calibration, 2 calls": replace(timing.CALIBRATION, min_calls=2), "MODEL": timing.MODEL}
    out: dict[str, list] = {k: [] for k in protocols}
    with tempfile.TemporaryDirectory() as tmp:
        files = export_deployed(model, {"dense": None, **specs}, arch, 1, tmp)
        for rep in range(reps):
            for name, proto in protocols.items():
                sessions = {k: [backend.load_onnx(files[k]) for _ in range(proto.sessions)] for k in ["dense", *specs]}
                t = measure_sessions(sessions, arch, 1, proto)
                close_all(sessions)
                out[name].append({k: timing.ratio(t[k], t["dense"]).median_ms for k in specs})
                print(rep, name, " ".join(f"{v:.3f}" for v in out[name][-1].values()), flush=True)
    vs_model = {name: [statistics.mean(r[k] for r in out[name]) / statistics.mean(r[k] for r in out["MODEL"]) - 1
                       for k in specs] for name in protocols if name != "MODEL"}
    return {"ratios": out, "vs_model": vs_model}


def load_order(model, arch, cfg, backend, chunks: int, layout: str) -> dict:
    rng = random.Random(3)
    specs = {f"s{i}": random_spec(arch, cfg, rng, 8) for i in range(6)}
    order = ["dense_first", *specs, "dense_last"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = export_deployed(model, {"dense": None, **specs}, arch, 1, tmp) if layout != "export-first" else {}
        for c in range(chunks):
            # worker-files: each model's sessions loaded together; round-robin: as measure_loaded loads them;
            # alternate: the two by turns, chunk by chunk, so that the machine's drift falls on both
            grouped = layout == "worker-files" or (layout == "alternate" and c % 2 == 0)
            if layout != "export-first":
                loaders = {k: (lambda k=k: backend.load_onnx(files["dense" if k.startswith("dense") else k]),
                               timing.MODEL.sessions) for k in order}
                sessions = ({k: [load() for _ in range(n)] for k, (load, n) in loaders.items()} if grouped
                            else load_round_robin(loaders))
                t = measure_sessions(sessions, arch, 1, timing.MODEL)
                close_all(sessions)
            else:
                modules = {k: model if k.startswith("dense") else build_slim(specs[k], model) for k in order}
                t = measure_models(backend, modules, arch, 1, timing.MODEL)
            last_over_first = timing.ratio(t["dense_last"], t["dense_first"]).median_ms
            rows.append({"loading": "grouped" if grouped else "round-robin", "last_over_first": last_over_first,
                         "dense_first_ms": t["dense_first"].median_ms,
                         "dense_last_ms": t["dense_last"].median_ms,
                         "ratios": {k: timing.ratio(t[k], t["dense_first"]).median_ms for k in specs}})
            print(c, rows[-1]["loading"], f"dense first {t['dense_first'].median_ms:.3f} ms, last / first "
                  f"{last_over_first:.3f}", flush=True)
    out = {"layout": layout, "rows": rows}
    for loading in sorted({r["loading"] for r in rows}):
        v = [r["last_over_first"] for r in rows if r["loading"] == loading]
        out[loading] = {"chunks": len(v), "median_last_over_first": statistics.median(v),
                        "chunks_last_faster_by_1pct": sum(x < 0.99 for x in v)}
        print(loading, out[loading], flush=True)
    return out


def mlp_widths(model, arch, cfg, backend, reps: int, low: int) -> dict:
    from slimdeploy.latency.profile import load_latency_model

    lm, _ = load_latency_model("local", model, cfg)
    grid = [w for w in lm.tables["mlp"].widths(1) if w >= low]
    widths = sorted(set(grid) | {(a + b) // 2 // 8 * 8 for a, b in zip(grid, grid[1:])})
    specs = {}
    for m in widths:
        spec = SlimSpec.dense(cfg, arch)
        for b in spec.blocks:
            b.mlp = list(range(m))
        specs[m] = spec.validate()
    dense = lm.predict(SlimSpec.dense(cfg, arch))
    measured: dict[int, list[float]] = {m: [] for m in widths}
    for rep in range(reps):
        order = widths if rep % 2 == 0 else widths[::-1]  # the load order alternates
        t = measure_models(backend, {"dense": model, **{f"m{m}": build_slim(specs[m], model) for m in order}},
                           arch, 1, timing.MODEL)
        for m in widths:
            measured[m].append(timing.ratio(t[f"m{m}"], t["dense"]).median_ms)
        print(rep, f"dense {t['dense'].median_ms:.3f} ms (+-{t['dense'].rel_halfwidth:.1%})", flush=True)
    rows = []
    for m in widths:
        r = statistics.median(measured[m])
        row = {"mlp": m, "on_grid": m in grid, "measured": measured[m], "median": r,
               "predicted": lm.predict(specs[m]) / dense}
        if m not in grid:
            lo, hi = max(g for g in grid if g < m), min(g for g in grid if g > m)
            r_lo, r_hi = statistics.median(measured[lo]), statistics.median(measured[hi])
            row.update(linear=(m - lo) / (hi - lo), position=(r - r_lo) / (r_hi - r_lo) if r_hi != r_lo else None)
        rows.append(row)
        print(f"m={m:5d} measured {r:.4f} ({' '.join(f'{x:.4f}' for x in measured[m])}) predicted "
              f"{row['predicted']:.4f}" + (f"  position {row['position']:+.2f} (linear {row['linear']:.2f})"
                                           if row.get("position") is not None else ""), flush=True)
    positions = [r["position"] for r in rows if r.get("position") is not None]
    return {"rows": rows, "median_position": statistics.median(positions) if positions else None,
            "profile": str(lm.path)}


def interleave(model, arch, cfg, backend, reps: int) -> dict:
    rng = random.Random(0)
    specs = {f"s{f}": random_spec(arch, cfg, rng, 8, size=f) for f in (0.3, 0.6)}
    m = timing.MODEL
    settings = {"MODEL": m, "rounds 61 x 0.03 s": replace(m, rounds=61, round_s=0.03),
                "rounds 3 x 0.6 s": replace(m, rounds=3, round_s=0.6), "6 sessions": replace(m, sessions=6),
                "kept sessions": m}
    ratios: dict[str, dict[str, list[float]]] = {k: {s: [] for s in specs} for k in settings}
    halfwidths: dict[str, list[float]] = {k: [] for k in settings}
    dense_ms: dict[str, list[float]] = {k: [] for k in settings}
    with tempfile.TemporaryDirectory() as tmp:
        files = export_deployed(model, {"dense": None, **specs}, arch, 1, tmp)

        def load(n: int) -> dict:
            return load_round_robin({k: (lambda k=k: backend.load_onnx(files[k]), n) for k in files})

        kept = load(m.sessions)
        names = list(settings)
        try:
            for rep in range(reps):
                for j in range(len(names)):
                    name = names[(rep + j) % len(names)]
                    sessions = kept if name == "kept sessions" else load(settings[name].sessions)
                    t = measure_sessions(sessions, arch, 1, settings[name])
                    if sessions is not kept:
                        close_all(sessions)
                    dense_ms[name].append(t["dense"].median_ms)
                    for k in specs:
                        r = timing.ratio(t[k], t["dense"])
                        ratios[name][k].append(r.median_ms)
                        halfwidths[name].append(r.rel_halfwidth)
                print(rep, f"dense {statistics.median(dense_ms['MODEL']):.3f} ms", flush=True)
        finally:
            close_all(kept)
    summary = {}
    for name in settings:
        spread = {k: statistics.stdev(v) / statistics.median(v) for k, v in ratios[name].items()}
        summary[name] = {"median_ratio": {k: statistics.median(v) for k, v in ratios[name].items()},
                         "ratio_spread": spread, "median_halfwidth": statistics.median(halfwidths[name]),
                         "dense_spread": statistics.stdev(dense_ms[name]) / statistics.median(dense_ms[name])}
        print(f"{name:20s} " + " ".join(f"{k} {summary[name]['median_ratio'][k]:.4f} (sd {spread[k]:.1%})"
                                        for k in specs)
              + f"  half-width {summary[name]['median_halfwidth']:.1%}  dense sd {summary[name]['dense_spread']:.1%}")
    return {"summary": summary, "ratios": ratios, "dense_ms": dense_ms}


def spec_of_sizes(arch, cfg, sizes: list[tuple[int, int, int, int, int]]) -> SlimSpec:
    """A static structure with these per-block sizes (n, h, q, v, m), keeping the first indices of each: which
    ones does not move its latency."""
    return SlimSpec(cfg, arch, [BlockSpec(list(range(n)), list(range(h)), [list(range(q))] * h,
                                          [list(range(v))] * h, list(range(m))) for n, h, q, v, m in sizes])


def remeasure(model, arch, cfg, backend, reps: int, profile: str, rows: str | None) -> dict:
    lm = LatencyModel(DeviceProfile.load(profile))
    points = lm.profile.calibration["points"]
    cases = []  # (kind, sizes, stored ratio to dense)
    for p in points[1:]:
        sizes, embed = point_sizes(p)
        if p.get("ranked_twin") or (p.get("token_mode") or "static") != "static" or (embed or arch.embed_dim) < \
                arch.embed_dim:
            continue
        cases.append(("calibration", sizes, p["measured_ms"] / points[0]["measured_ms"]))
    if rows:
        for r in json.loads(Path(rows).read_text())["rows"]:
            if r["kind"].startswith("solver") and r.get("token_mode", "static") == "static":
                cases.append((r["kind"], point_sizes(r)[0], r["measured_over_dense"]))
    dense = lm.predict_sizes(point_sizes(points[0])[0])
    specs = [spec_of_sizes(arch, cfg, sizes) for _, sizes, _ in cases]
    now: list[list[float]] = [[] for _ in cases]
    for rep in range(reps):
        order = list(range(len(cases)))
        random.Random(rep).shuffle(order)
        for start in range(0, len(order), 7):
            chunk = order[start:start + 7]
            t = measure_models(backend, {"dense": model, **{str(i): build_slim(specs[i], model) for i in chunk}},
                               arch, 1, timing.MODEL)
            for i in chunk:
                now[i].append(timing.ratio(t[str(i)], t["dense"]).median_ms)
        print(f"pass {rep + 1} of {reps} measured", flush=True)
    out = []
    for (kind, sizes, stored), ratios in zip(cases, now):
        measured, predicted = statistics.median(ratios), lm.predict_sizes(sizes) / dense
        out.append({"kind": kind, "sizes": sizes, "stored_over_dense": stored, "now_over_dense": ratios,
                    "moved": measured / stored - 1, "predicted_over_dense": predicted,
                    "error_now": predicted / measured - 1})
        print(f"{kind:24s} stored {stored:.3f} now {measured:.3f} ({100 * out[-1]['moved']:+5.1f}%), predicted "
              f"{out[-1]['predicted_over_dense']:.3f} ({100 * out[-1]['error_now']:+5.1f}% against now)", flush=True)
    summary = {}
    for kind in ("calibration", "solver"):
        sel = [r for r in out if r["kind"].startswith(kind)]
        if sel:
            summary[kind] = {"n": len(sel), "moved_median": statistics.median(r["moved"] for r in sel),
                             "error_now_median": statistics.median(r["error_now"] for r in sel),
                             "abs_error_now_median": statistics.median(abs(r["error_now"]) for r in sel)}
    return {"profile": profile, "rows_file": rows, "summary": summary, "rows": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("check", choices=["calls", "load-order", "mlp-widths", "interleave", "remeasure"])
    ap.add_argument("--model", default=None,
                    help="default: deit_small_patch16_224 (calls), fmnist-vit (the others)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=12)
    ap.add_argument("--layout", choices=["export-first", "worker-files", "round-robin", "alternate"],
                    default="export-first")
    ap.add_argument("--from", dest="low", type=int, default=0, help="mlp-widths: the narrowest grid width")
    ap.add_argument("--profile", default=None, help="remeasure: the profile whose whole models to measure again")
    ap.add_argument("--rows", default=None, help="remeasure: a latency_fidelity.py result made with that profile")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.check == "remeasure" and not args.profile:
        ap.error("remeasure needs --profile")
    cfg = ModelConfig(args.model or ("deit_small_patch16_224" if args.check == "calls" else "fmnist-vit"))
    model = nontrivial_(create_model(cfg)).eval()
    arch = arch_of(model)
    backend = get_backend("ort-cpu", threads=1)
    if args.check == "calls":
        result = calls(model, arch, cfg, backend, args.reps)
    elif args.check == "load-order":
        result = load_order(model, arch, cfg, backend, args.chunks, args.layout)
    elif args.check == "interleave":
        result = interleave(model, arch, cfg, backend, args.reps)
    elif args.check == "remeasure":
        result = remeasure(model, arch, cfg, backend, args.reps, args.profile, args.rows)
    else:
        result = mlp_widths(model, arch, cfg, backend, args.reps, args.low)
    result.update(check=args.check, model=cfg.name, cpu=cpu_name(),
                  date=dt.datetime.now().isoformat(timespec="seconds"))
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "ratios")}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
