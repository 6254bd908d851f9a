"""Token modes at equal measured latency: static tokens, attentive tokens, channels only, and token merging.

At each target (a fraction of the dense model's latency, measured on this machine in the same rounds), each method
is brought to the target by measurement:
  static      slimdeploy's selection (measured candidates, closed loop) on a static-token search
  attentive   the same on an attentive-token search (--token-mode attentive) of the same dense model
  fused       the same search in fused mode: the dropped tokens fused into one (EViT), counts chosen on its table
  channels    the same with no token pruning (channel families only, static search)
  merging     ToMe-style merging (benchmarks/tome.py) on the dense model, the number of merged tokens stepped
              on measurements
  static-tokens, attentive-tokens
              tokens alone: ViT-Slim's token fraction rule (every head, channel and unit kept) on the static and
              the attentive search, brought to the target by the same closed loop, not ranked against the other
              families. Where the selection prefers channels (it drops no token at 0.5x on the shifted set), this is
              the comparison of the two ways to choose tokens at equal measured latency.
  attentive-tokens-one
              tokens alone on the attentive search with one count in every block from block 1 on (the candidate
              family `one-count`)
then scored on the validation set right after pruning (phase 1, measures: keep the machine quiet) and after the
pipeline's retraining recipe, 5 epochs of soft distillation from the dense model, per seed (phase 2).
The attentive structures' predicted latency (the profile's model, relative to dense) is compared with the measured.

Datasets: plain Fashion-MNIST (fmnist-vit at 28 px, 16 patches) and shifted Fashion-MNIST (each item anywhere on a
56 x 56 canvas: fmnist-vit at --img-size 56, 64 patches), where fixed token positions throw content away, and
`--data shifted84` (an 84 x 84 canvas: 144 patches, the item on about 16 of them).

    .venv/bin/python benchmarks/token_modes.py prepare --data plain --static-run runs/teacher30      # searches
    .venv/bin/python benchmarks/token_modes.py measure --data plain --static-run runs/teacher30      # phase 1
    .venv/bin/python benchmarks/token_modes.py retrain --data plain --static-run runs/teacher30 --workers 2
    (retrain --targets 0.5 0.3: which targets, in that order; --methods: which methods)
    .venv/bin/python benchmarks/token_modes.py counts --data plain --static-run runs/teacher30   # tokens alone
    (--data shifted trains its dense model first: --teacher-epochs)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from equal_latency import retrain_job, retrain_pool, selection_to_target, top1  # noqa: E402
from tome import max_merged, tome  # noqa: E402

from slimdeploy.data import load_data  # noqa: E402
from slimdeploy.errors import SlimError  # noqa: E402
from slimdeploy.latency import timing  # noqa: E402
from slimdeploy.latency.backends import get_backend  # noqa: E402
from slimdeploy.latency.fingerprint import cpu_name  # noqa: E402
from slimdeploy.latency.measure import SpecMeasurer, measure_models  # noqa: E402
from slimdeploy.latency.profile import load_latency_model  # noqa: E402
from slimdeploy.models import arch_of, data_config, load_dense  # noqa: E402
from slimdeploy.prune import searched_model  # noqa: E402
from slimdeploy.select.candidates import Family  # noqa: E402
from slimdeploy.select.importance import load_importance  # noqa: E402
from slimdeploy.select.scoring import calibration_set  # noqa: E402
from slimdeploy.slim import build_slim  # noqa: E402
from slimdeploy.types import SlimSpec  # noqa: E402

DATA = {"plain": ("fashion-mnist", None), "shifted": ("fashion-mnist-shifted", 56),
        "shifted84": ("fashion-mnist-shifted-84", 84)}
METHODS = ("static", "attentive", "fused", "channels", "merging", "static-tokens", "attentive-tokens",
           "attentive-tokens-one")
# tokens alone (drop rates of attention, MLP, tokens), by the fraction rule or with one count per block
TOKENS_ALONE = {"static-tokens": Family("fractions", (0.0, 0.0, 1.0)),
                "attentive-tokens": Family("fractions", (0.0, 0.0, 1.0)),
                "attentive-tokens-one": Family("one-count", (0.0, 0.0, 1.0))}
# which search each pruned method's structures come from (merging works on the dense model)
SEARCH_OF = {"static": "static", "attentive": "attentive", "fused": "attentive", "channels": "static",
             "static-tokens": "static", "attentive-tokens": "attentive", "attentive-tokens-one": "attentive"}


def runs(args) -> dict[str, Path]:
    static = Path(args.static_run or f"runs/tokens-{args.data}-static")
    return {"static": static, "attentive": Path(args.attentive_run or f"runs/tokens-{args.data}-attentive")}


def dense_and_data(args):
    """The runs, the dense model (teacher), its config and architecture, and the data every phase scores on."""
    r = runs(args)
    teacher, cfg = load_dense(r["static"])
    a = arch_of(teacher)
    return r, teacher, cfg, a, load_data(DATA[args.data][0], data_config(teacher), a.num_classes,
                                         train_limit=args.train_limit)


def cli(*argv: str) -> None:
    print("$ slimdeploy " + " ".join(argv), flush=True)
    subprocess.run([sys.executable, "-m", "slimdeploy", *argv], check=True)


def prepare(args) -> None:
    """The dense model (shifted: trained here) and a static and an attentive search of it."""
    data, img = DATA[args.data]
    r = runs(args)
    limit = ["--train-limit", str(args.train_limit)] if args.train_limit else []
    extra = ["--data", data, *limit] + (["--img-size", str(img)] if img else [])
    if not (r["static"] / "base.safetensors").is_file():
        cli("train", "--out", str(r["static"]), *extra, "--epochs", str(args.teacher_epochs))
    if not (r["static"] / "search" / "masks.safetensors").is_file():
        cli("search", str(r["static"]), "--data", data, *limit, "--epochs", str(args.search_epochs))
    r["attentive"].mkdir(parents=True, exist_ok=True)
    for name in ("model.json", "base.safetensors"):
        if not (r["attentive"] / name).is_file():
            shutil.copy(r["static"] / name, r["attentive"] / name)
    cli("search", str(r["attentive"]), "--data", data, *limit, "--epochs", str(args.search_epochs),
        "--token-mode", "attentive")


def measure(args) -> dict:
    r, teacher, cfg, a, bundle = dense_and_data(args)
    dense_spec = SlimSpec.dense(cfg, a)
    lm, warnings = load_latency_model(args.device, teacher, cfg)
    p = lm.profile
    backend = get_backend(p.backend, threads=p.threads)
    cal = calibration_set(bundle, teacher, 2048)
    out = load(args) or {"data": args.data, "cpu": cpu_name(), "warnings": warnings, "targets": {}}
    out.update(date=dt.datetime.now().isoformat(timespec="seconds"), teacher_top1=top1(teacher, bundle))
    print(f"{args.data}: dense top-1 {out['teacher_top1']:.2f}%", flush=True)
    sources = {}
    for name, search in SEARCH_OF.items():
        if name not in args.methods:
            continue
        run = r[search]
        imp, _ = load_importance(run)
        if name == "channels":
            imp = replace(imp, tok=None)
        if name == "fused":  # the attentive search's counts, the dropped tokens fused (it searches the same way)
            imp = replace(imp, token_mode="fused")
        searched = searched_model(run, dense_spec)
        sources[name] = (imp, searched, lm.for_tokens(imp.token_mode),
                         SpecMeasurer(backend, searched, a, p.batch_size, teacher))
    for f in args.targets:
        rows = out["targets"].setdefault(str(f), {})
        for name, (imp, searched, lm_m, measurer) in sources.items():
            if name in rows:
                continue
            try:
                rows[name] = selection_to_target(a, cfg, imp, searched, teacher, bundle, cal, lm_m, measurer,
                                                 dense_spec, f, family=TOKENS_ALONE.get(name))
                rows[name]["tokens"] = SlimSpec.from_dict(rows[name]["spec"]).token_counts()
            except SlimError as e:  # tokens alone cannot reach every target
                rows[name] = {"ratio": None, "cannot_reach": str(e)}
            report(f, name, rows[name])
            save(args, out)
        if "merging" not in rows and "merging" in args.methods:
            rows["merging"] = merging_to_target(teacher, a, backend, p.batch_size, f)
            if rows["merging"].get("merged") is not None:
                rows["merging"]["top1_pruned"] = top1(tome(teacher, rows["merging"]["merged"]), bundle)
            report(f, "merging", rows["merging"])
            save(args, out)
    return out


def equal_counts(args) -> dict:
    """Tokens alone, at equal counts: the per-block counts of ViT-Slim's token fraction rule on the static search
    (every other dimension kept), taken as fixed positions (static search) or per image (attentive search; fused:
    the same, the dropped tokens fused into the last place), scored right after pruning: which tokens go, with
    nothing else changed."""
    from slimdeploy.select.vitslim import fraction_spec

    r, teacher, cfg, a, bundle = dense_and_data(args)
    dense_spec = SlimSpec.dense(cfg, a)
    out = load(args) or {"data": args.data, "cpu": cpu_name(), "targets": {}}
    rows = out.setdefault("equal_counts", {})
    static_imp, _ = load_importance(r["static"])
    for mode in ("static", "attentive", "fused"):
        searched = searched_model(r["static" if mode == "static" else "attentive"], dense_spec)
        for keep in args.keep_tokens:
            row = rows.setdefault(str(keep), {})
            if mode in row:
                continue
            spec = fraction_spec(a, cfg, static_imp, 1.0, 1.0, keep)  # the static rule's counts, for every mode
            spec.blocks[0].tokens = list(range(a.num_tokens))  # ranked modes have no attention before block 0
            if mode != "static":
                spec = SlimSpec.from_dict({**spec.to_dict(), "token_mode": mode,
                                           "blocks": [{**b, "tokens": list(range(len(b["tokens"])))}
                                                      for b in spec.to_dict()["blocks"]]})
            row[mode] = {"tokens": spec.token_counts(), "top1_pruned": top1(build_slim(spec, searched), bundle)}
            # the rule alone, the weights shared: on the static search's weights and on the dense model
            if mode != "static":
                row[mode]["top1_static_search_weights"] = top1(build_slim(spec, searched_model(
                    r["static"], dense_spec)), bundle)
            row[mode]["top1_dense_weights"] = top1(build_slim(spec, teacher), bundle)
            print(f"keep {keep:.2f} of the tokens, {mode:9s}: {row[mode]['tokens']} top-1 "
                  f"{row[mode]['top1_pruned']:.2f}% (on the dense weights {row[mode]['top1_dense_weights']:.2f}%)",
                  flush=True)
            save(args, out)
    return out


def merging_to_target(teacher, a, backend, batch: int, f: float) -> dict:
    """The merged-token count whose measured latency is nearest the target from below (bisection, measured
    against the dense model in the same rounds), or why none reaches it."""
    lo, hi = 0, max_merged(a.num_tokens, a.depth, a.num_prefix_tokens)
    seen: dict[int, float] = {}

    def ratio(k: int) -> float:
        if k not in seen:
            t = measure_models(backend, {"dense": teacher, "merging": tome(teacher, k)}, a, batch, timing.MODEL)
            seen[k] = timing.ratio(t["merging"], t["dense"]).median_ms
            print(f"  merging {k} tokens: {seen[k]:.3f} x dense", flush=True)
        return seen[k]

    if ratio(hi) > f:
        return {"merged": None, "ratio": seen[hi], "cannot_reach": f"merging all it can ({hi} tokens) measures "
                f"{seen[hi]:.3f} x dense, above {f}", "measured": seen}
    while hi - lo > 1:  # ratio(hi) <= f < ratio(lo)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ratio(mid) > f else (lo, mid)
    return {"merged": hi, "ratio": seen[hi], "measured": {str(k): v for k, v in seen.items()},
            "exports": "yes (one-hot matmul merge)"}


def report(f, name, row) -> None:
    if row.get("ratio") is None or row.get("top1_pruned") is None:
        print(f"{f:.1f}x {name:10s} {row.get('cannot_reach', 'not reached')}", flush=True)
        return
    print(f"{f:.1f}x {name:10s} {row['ratio'] / f:.3f} of target, top-1 right after pruning "
          f"{row['top1_pruned']:.2f}%", flush=True)


def retrain_one(args, job) -> dict:
    torch.set_num_threads(args.threads)
    f, name, seed, row = job
    r, teacher, cfg, a, bundle = dense_and_data(args)
    if name == "merging":
        student = tome(teacher, row["merged"])
    else:
        searched = searched_model(r[SEARCH_OF[name]], SlimSpec.dense(cfg, a))
        student = build_slim(SlimSpec.from_dict(row["spec"]), searched)
    return retrain_job(args, student, teacher, bundle, Path(args.work) / f"{args.data}-{f}-{name}-{seed}", f, name,
                       seed, row.get("spec", row.get("merged")))


def retrain_all(args) -> None:

    out = load(args)
    if not out:
        raise SlimError("run the measure phase first")
    order = [str(f) for f in args.targets]  # the targets asked for, in the order given
    jobs = [(f, name, seed, row) for seed in args.seeds for f, rows in out["targets"].items() if f in order
            for name, row in rows.items() if name in args.methods
            if row.get("top1_pruned") is not None and str(seed) not in row.get("retrained", {})]
    jobs.sort(key=lambda j: (j[2] != args.seeds[0], order.index(j[0])))
    retrain_pool(args, retrain_one, jobs, lambda res: out["targets"][res["target"]][res["method"]],
                 lambda: save(args, out))


def path(args) -> Path:
    return Path(args.out or f"benchmarks/results/token_modes_{args.data}.json")


def load(args) -> dict | None:
    return json.loads(path(args).read_text()) if path(args).is_file() else None


def save(args, out) -> None:
    path(args).parent.mkdir(parents=True, exist_ok=True)
    path(args).write_text(json.dumps(out, indent=2, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["prepare", "measure", "retrain", "counts"])
    ap.add_argument("--data", choices=sorted(DATA), default="plain")
    ap.add_argument("--static-run", default=None, help="a trained dense model with a static search")
    ap.add_argument("--attentive-run", default=None, help="where the attentive search goes")
    ap.add_argument("--teacher-epochs", type=int, default=15)
    ap.add_argument("--train-limit", type=int, default=None,
                    help="the first N training images, in every phase (the dense model, searches, scores, retraining)")
    ap.add_argument("--search-epochs", type=int, default=2)
    ap.add_argument("--device", default="local")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.3])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--keep-tokens", type=float, nargs="+", default=[0.75, 0.5, 0.3])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores / workers)")
    ap.add_argument("--work", default="runs/token_modes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    {"prepare": prepare, "measure": measure, "retrain": retrain_all, "counts": equal_counts}[args.phase](args)


if __name__ == "__main__":
    main()
