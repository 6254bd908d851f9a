"""What a ranking costs inside a whole model: ranked structures against their static twins.

Each ranked (attentive or fused) structure kept by `token_modes.py measure` is measured with its static twin (the
same counts and widths, the tokens fixed positions) and the dense model, interleaved, repeated; the paired
difference is what the ranking costs in the whole model, beside what the latency model predicts for each.

    .venv/bin/python benchmarks/ranked_twins.py --results benchmarks/results/token_modes_shifted_rank2d.json \
        --run runs/tokens-shifted-static --target 0.3 --reps 5

Or the solver's ranked picks of a `latency_fidelity.py --token-mode attentive` run (`--fidelity`, every pick at
the targets given), rebuilt from their sizes on a random-weight model of the run's input size, with a rank prior
(its values do not change the cost), each beside its static twin:

    .venv/bin/python benchmarks/ranked_twins.py \
        --fidelity benchmarks/results/latency_fidelity_fmnist-vit_56px_attentive_epyc_1202b.json --target 0.3 0.4
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from slimdeploy.latency import timing
from slimdeploy.latency.backends import get_backend
from slimdeploy.latency.components import nontrivial_
from slimdeploy.latency.draws import uniform_prior
from slimdeploy.latency.fingerprint import cpu_name
from slimdeploy.latency.measure import measure_models
from slimdeploy.latency.model import point_sizes
from slimdeploy.latency.profile import load_latency_model
from slimdeploy.models import arch_of, create_model, load_dense
from slimdeploy.select.solver import shape_block
from slimdeploy.slim import build_slim
from slimdeploy.types import RANKED_TOKEN_MODES, ModelConfig, SlimSpec


def from_results(path: str, run: str, target: str):
    """The dense model, its config and the ranked structures a token_modes.py results file kept at `target`."""
    teacher, cfg = load_dense(Path(run))
    rows = json.loads(Path(path).read_text())["targets"][target]
    specs = {mode: SlimSpec.from_dict(row["spec"]) for mode, row in rows.items()
             if mode in ("static", *RANKED_TOKEN_MODES) and row.get("spec")}
    return teacher, cfg, specs


def from_fidelity(path: str, targets: list[float]):
    """A random-weight model of the fidelity run's size and its ranked picks at `targets`, rebuilt from their
    sizes (which heads, channels or units a block keeps does not change the cost)."""
    run = json.loads(Path(path).read_text())
    cfg = ModelConfig(run["model"], img_size=run["img_size"])
    model = nontrivial_(create_model(cfg)).eval()
    a = arch_of(model)
    specs = {}
    for row in run["rows"]:
        if row["kind"].startswith("solver") and row["token_mode"] in RANKED_TOKEN_MODES and any(
                abs(row["target"] - t) < 1e-9 for t in targets):
            sizes, embed = point_sizes(row)
            prior = uniform_prior(a) if row["token_mode"] == "attentive" else {}
            specs[row["kind"].removeprefix("solver ")] = SlimSpec(
                source=cfg, arch=a, blocks=[shape_block(*s) for s in sizes], token_mode=row["token_mode"],
                embed=list(range(embed or a.embed_dim)), **prior).validate()
    return model, cfg, specs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--results", help="a token_modes.py results file (with --run)")
    src.add_argument("--fidelity", help="a latency_fidelity.py results file with ranked picks")
    ap.add_argument("--run", help="the dense model's run folder (with --results)")
    ap.add_argument("--target", nargs="+", default=["0.3"])
    ap.add_argument("--device", default="local")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, help="results file (default: beside the source, named by the target)")
    args = ap.parse_args()
    if args.results and not args.run:
        ap.error("--results needs --run")
    if args.results:
        teacher, cfg, found = from_results(args.results, args.run, args.target[0])
    else:
        teacher, cfg, found = from_fidelity(args.fidelity, [float(t) for t in args.target])
    a = arch_of(teacher)
    lm, warnings = load_latency_model(args.device, teacher, cfg)
    specs = {}
    for name, spec in found.items():
        specs[name] = spec
        if spec.token_mode in RANKED_TOKEN_MODES:
            specs[f"{name} as static"] = spec.in_mode("static")
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
    out = {"cpu": cpu_name(), "warnings": warnings, "target": " ".join(args.target), "dense_ms": dense_ms,
           "rows": {}}
    for k, s in specs.items():
        measured = statistics.median(x / d for x, d in zip(ms[k], ms["dense"]))
        predicted = lm.predict(s) / dense_pred
        row = {"measured": measured, "predicted": predicted, "error": predicted / measured - 1}
        if s.token_mode in RANKED_TOKEN_MODES:  # the ranking's cost: paired with its twin in the same rounds
            twin = f"{k} as static"
            row["ranking_us"] = 1e3 * statistics.median(x - y for x, y in zip(ms[k], ms[twin]))
            row["ranking_predicted_us"] = 1e3 * (lm.predict(s) - lm.predict(specs[twin]))
        out["rows"][k] = row
        extra = (f", ranking {row['ranking_us']:.1f} us measured, {row['ranking_predicted_us']:.1f} us predicted"
                 if "ranking_us" in row else "")
        print(f"{k:20s} measured {measured:.4f} x dense, predicted {predicted:.4f} ({100 * row['error']:+.1f}%){extra}")
    source = Path(args.results or args.fidelity)
    dest = Path(args.out or source.with_name(source.stem + f"_twins_{'_'.join(args.target)}.json"))
    dest.write_text(json.dumps(out, indent=2))
    print(f"dense {dense_ms:.3f} ms; written {dest}")


if __name__ == "__main__":
    main()
