"""What the benchmarks that compare structures at equal measured latency share: a search's measured selection
brought to a fraction of the dense model's latency by the closed loop, and a pool that retrains many structures."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict

import torch

from slimdeploy.data import make_loader
from slimdeploy.select.candidates import Family, Problem
from slimdeploy.select.loop import closed_loop, dense_reference
from slimdeploy.select.scoring import Scorer
from slimdeploy.select.solver import LatencyCost
from slimdeploy.select.stage import rank_candidates
from slimdeploy.slim import build_slim
from slimdeploy.trainer import evaluate

TOLERANCE = 0.03  # equal latency: within 3% below the target, measured


def top1(model, bundle) -> float:
    """Top-1 (%) on the bundle's validation split (the 10,000 test images for Fashion-MNIST)."""
    return evaluate(model, make_loader(bundle.val, bundle.transform, 256, False), torch.device("cpu"))


def selection_to_target(a, cfg, imp, searched, teacher, bundle, cal, lm, measurer, dense_spec, f: float,
                        recovery_steps: int = 0, family: Family | None = None) -> dict:
    """slimdeploy's selection for a fraction f of the dense latency: candidates ranked (after `recovery_steps` of
    recovery), then the chosen family (or the `family` given, unranked) brought within TOLERANCE below the target
    by the closed loop; the row with the measured ratio, the model's prediction of it and top-1 right after
    pruning."""
    dense = dense_reference(measurer, dense_spec)
    cands, fam = [], family
    if fam is None:
        now = lm.corrected(dense[1] / lm.predict(dense_spec), 0.0)  # as select_run: today's speed of the machine
        scorer = Scorer(searched, teacher, bundle, cal, recovery_steps)
        cands, best = rank_candidates(Problem(a, cfg, imp, LatencyCost(now)), 0.95 * f * dense[0], scorer, 3, now)
        fam = cands[best]["_family"]

    def solve(m, b):
        return Problem(a, cfg, imp, LatencyCost(m)).solve(fam, b)
    res = closed_loop(solve, lm, measurer, dense_spec, None, f, rounds=8, dense=dense,
                      window=(1 - TOLERANCE, 1.0), aim=1 - TOLERANCE / 2)
    spec, ratio = res.spec, res.measured[res.chosen]["over_dense"]
    predicted = lm.predict(spec) / lm.predict(dense_spec)
    return {"family": fam.name, "spec": spec.to_dict(), "ratio": ratio, "predicted_ratio": predicted,
            "prediction_error": predicted / ratio - 1, "top1_pruned": top1(build_slim(spec, searched), bundle),
            "candidates": [{k: v for k, v in c.items() if not k.startswith("_")} for c in cands]}


def retrain_job(args, student, teacher, bundle, work, f, name: str, seed: int, structure) -> dict:
    """The pipeline's retraining recipe (args.epochs of soft distillation from the dense teacher) on one structure;
    its result row for retrain_pool. `structure` (JSON) names what the student was built from: as in the retrain
    stage, an interrupted job resumes, and a checkpoint in `work` made from another structure is dropped first."""
    from slimdeploy.retrain import DistillConfig, retrain
    from slimdeploy.runs import Run
    from slimdeploy.trainer import TrainConfig

    tcfg = TrainConfig(epochs=args.epochs, batch_size=128, lr=1e-3, warmup_epochs=0.2, seed=seed)
    run = Run(work)
    inputs = run.inputs({"structure": structure, "train": asdict(tcfg)}, [])
    run.restart_if_changed("retrain", inputs, ["retrain/checkpoint.pt", "retrain/before.json"])
    rec = retrain(student, teacher, bundle, tcfg, DistillConfig("soft", 0.7, 2.0), work, resume=True,
                  torch_device="cpu")
    run.finished("retrain", inputs, [])
    return {"target": f, "method": name, "seed": seed, "top1": rec["top1"]}


def retrain_pool(args, worker: Callable, jobs: list, row_of: Callable[[dict], dict], save: Callable[[], None],
                 key_of: Callable[[dict], str] = lambda res: str(res["seed"])) -> None:
    """Run worker(args, job) for every job in a pool of args.workers processes; each result's top-1 goes into
    its row's `retrained` (by key_of) with the mean and spread, saved as it comes."""
    from concurrent.futures import ProcessPoolExecutor

    print(f"{len(jobs)} retraining jobs", flush=True)
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for res in pool.map(worker, [args] * len(jobs), jobs):
            row = row_of(res)
            row.setdefault("retrained", {})[key_of(res)] = res["top1"]
            vals = list(row["retrained"].values())
            row["top1_retrained_mean"] = statistics.mean(vals)
            row["top1_retrained_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            print(f"{res['target']}x {res['method']} seed {res['seed']}: {res['top1']:.2f}%", flush=True)
            save()
