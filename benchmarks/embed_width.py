"""The embedding width in the search, or not: top-1 at equal measured latency, right after pruning and retrained.

On a converged dense model (the run given with --run, e.g. fmnist-vit in runs/teacher30, with its search), at each
target (a fraction of the dense model's latency measured on this machine in the same rounds):
  without embed      slimdeploy's selection on the run's own search (tokens, heads, head channels, MLP units)
  with embed         the same on a search of the same dense model with --embed (the embedding width is one more
                     kind: searched, profiled, and among the candidates)
  embed search, kept the --embed search's weights and importances with the embedding kept whole (what the embedding
                     mask's training alone changes)
each brought within 3% below the target by the closed loop (pipeline recipe: candidates ranked after 200 recovery
steps), scored on the 10,000 test images right after pruning (phase `measure`: it measures, keep the machine
quiet), then retrained with the pipeline's recipe (5 epochs of soft distillation from the dense model) per seed
(phase `retrain`). The profile is this machine's (--device local: measured on first use, with its embedding tables).

    .venv/bin/python benchmarks/embed_width.py prepare --run runs/teacher30     # the --embed search (runs/embed)
    .venv/bin/python benchmarks/embed_width.py measure --run runs/teacher30
    .venv/bin/python benchmarks/embed_width.py retrain --run runs/teacher30 --workers 2
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

from slimdeploy.data import load_data  # noqa: E402
from slimdeploy.errors import SlimError  # noqa: E402
from slimdeploy.latency.backends import get_backend  # noqa: E402
from slimdeploy.latency.fingerprint import cpu_name  # noqa: E402
from slimdeploy.latency.measure import SpecMeasurer  # noqa: E402
from slimdeploy.latency.profile import load_latency_model  # noqa: E402
from slimdeploy.models import arch_of, data_config, load_dense  # noqa: E402
from slimdeploy.prune import searched_model  # noqa: E402
from slimdeploy.select.importance import load_importance  # noqa: E402
from slimdeploy.select.scoring import calibration_set  # noqa: E402
from slimdeploy.slim import build_slim  # noqa: E402
from slimdeploy.types import SlimSpec  # noqa: E402

METHODS = ("without embed", "with embed", "embed search, kept")


def prepare(args) -> None:
    """A search of the run's dense model with --embed, in --embed-run (same epochs as the run's own search)."""
    dst = Path(args.embed_run)
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("model.json", "base.safetensors"):
        if not (dst / name).is_file():
            shutil.copy(Path(args.run) / name, dst / name)
    argv = ["search", str(dst), "--embed", "--epochs", str(args.search_epochs)]
    print("$ slimdeploy " + " ".join(argv), flush=True)
    subprocess.run([sys.executable, "-m", "slimdeploy", *argv], check=True)


def source(args, name: str) -> tuple[Path, bool]:
    """(the run whose search a method uses, whether its embedding importance is used)."""
    return {"without embed": (Path(args.run), False), "with embed": (Path(args.embed_run), True),
            "embed search, kept": (Path(args.embed_run), False)}[name]


def measure(args) -> dict:
    teacher, cfg = load_dense(args.run)
    a = arch_of(teacher)
    bundle = load_data("fashion-mnist", data_config(teacher), a.num_classes)
    dense_spec = SlimSpec.dense(cfg, a)
    lm, warnings = load_latency_model(args.device, teacher, cfg)
    p = lm.profile
    backend = get_backend(p.backend, threads=p.threads)
    cal = calibration_set(bundle, teacher, 2048)
    out = load(args) or {"cpu": cpu_name(), "warnings": warnings, "targets": {}}
    out.update(date=dt.datetime.now().isoformat(timespec="seconds"), teacher_top1=top1(teacher, bundle),
               profile=str(lm.path), embed_widths=lm.embed_widths())
    print(f"dense top-1 {out['teacher_top1']:.2f}%, profile {lm.path}", flush=True)
    for f in args.targets:
        rows = out["targets"].setdefault(str(f), {})
        for name in METHODS:
            if name in rows:
                continue
            run, with_embed = source(args, name)
            imp, _ = load_importance(run)
            if not with_embed:
                imp = replace(imp, embed=None)
            elif imp.embed is None:
                raise SlimError(f"{run} has no embedding search: run the prepare phase")
            searched = searched_model(run, dense_spec)
            measurer = SpecMeasurer(backend, searched, a, p.batch_size, teacher)
            rows[name] = selection_to_target(a, cfg, imp, searched, teacher, bundle, cal, lm, measurer, dense_spec,
                                             f, recovery_steps=args.recovery_steps)
            spec = SlimSpec.from_dict(rows[name]["spec"])
            rows[name]["embed_dim"] = spec.embed_dim
            rows[name]["widths"] = spec.summary()
            print(f"{f:.1f}x {name:20s} {rows[name]['ratio'] / f:.3f} of target, embed {spec.embed_dim}, "
                  f"{rows[name]['family']}, top-1 right after pruning {rows[name]['top1_pruned']:.2f}%, "
                  f"prediction error {100 * rows[name]['prediction_error']:+.1f}%", flush=True)
            save(args, out)
    return out


def retrain_one(args, job) -> dict:
    torch.set_num_threads(args.threads)
    f, name, seed, row = job
    teacher, cfg = load_dense(args.run)
    a = arch_of(teacher)
    bundle = load_data("fashion-mnist", data_config(teacher), a.num_classes)
    run, _ = source(args, name)
    student = build_slim(SlimSpec.from_dict(row["spec"]), searched_model(run, SlimSpec.dense(cfg, a)))
    work = Path(args.work) / f"{f}-{name.replace(' ', '_').replace(',', '')}-{seed}"
    return retrain_job(args, student, teacher, bundle, work, f, name, seed, row["spec"])


def retrain_all(args) -> None:
    out = load(args)
    if not out:
        raise SlimError("run the measure phase first")
    jobs = [(f, name, seed, row) for seed in args.seeds for f, rows in out["targets"].items()
            for name, row in rows.items() if name in args.methods and str(seed) not in row.get("retrained", {})]
    jobs.sort(key=lambda j: (args.seeds.index(j[2]), float(j[0])))
    retrain_pool(args, retrain_one, jobs, lambda res: out["targets"][res["target"]][res["method"]],
                 lambda: save(args, out))


def load(args) -> dict | None:
    return json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else None


def save(args, out) -> None:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["prepare", "measure", "retrain"])
    ap.add_argument("--run", required=True, help="a trained dense model with its (embedding-free) search")
    ap.add_argument("--embed-run", default="runs/embed", help="where the --embed search goes")
    ap.add_argument("--search-epochs", type=int, default=2)
    ap.add_argument("--device", default="local")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--recovery-steps", type=int, default=200)
    ap.add_argument("--methods", nargs="+", default=list(METHODS[:2]), help="which rows to retrain")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores / workers)")
    ap.add_argument("--work", default="runs/embed_width")
    ap.add_argument("--out", default="benchmarks/results/embed_width.json")
    args = ap.parse_args()
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    {"prepare": prepare, "measure": measure, "retrain": retrain_all}[args.phase](args)


if __name__ == "__main__":
    main()
