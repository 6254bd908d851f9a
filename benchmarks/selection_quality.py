"""Selection quality: slimdeploy against ViT-Slim's fractions, uniform widths and Torch-Pruning, at equal
measured latency, right after pruning and after the same distillation retraining (several seeds).

Phase 1 (quiet machine; it measures): for each target (a fraction of the dense model's latency measured on this
CPU) every method's structure is brought within 3% below the target by the one protocol (interleaved with the
dense model): slimdeploy by its closed loop on the family its measured selection chose (no-retrain mode:
candidates scored right after pruning; retrain mode: after a short recovery), ViT-Slim's equal fractions and
uniform widths by the same loop on their rule, Torch-Pruning by bisecting its pruning ratio. Top-1 right after
pruning on the 10,000 test images. Phase 2 (--retrain; any machine state): every structure retrained with the
pipeline's recipe (5 epochs, soft distillation from the dense teacher) for each seed.

Torch-Pruning is used as its ViT example does: Taylor (or magnitude) group importance, pruning MLP units and
head dimensions (`prune_head_dims`, heads kept, the embedding left alone: `fc2` and the head ignored), a uniform
ratio per layer. It needs help on timm: its example replaces each Attention's forward (the original reshapes to
the full width), which this benchmark does on its own copy of the model, and Taylor importance needs gradients
from a few training batches. The pruned model is read back into a SlimSpec (kept rows matched exactly) and
rebuilt by slimdeploy (checked equal to Torch-Pruning's output), so that every method is exported, measured and
retrained the same way.

    .venv/bin/python benchmarks/selection_quality.py --run runs/teacher30 --device local            # phase 1
    .venv/bin/python benchmarks/selection_quality.py --run runs/teacher30 --retrain --workers 2      # phase 2
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
from pathlib import Path

import torch
from equal_latency import TOLERANCE, retrain_job, retrain_pool, top1

from slimdeploy.data import load_data, make_loader
from slimdeploy.errors import SlimError
from slimdeploy.latency.backends import get_backend
from slimdeploy.latency.fingerprint import cpu_name
from slimdeploy.latency.measure import SpecMeasurer
from slimdeploy.latency.profile import load_latency_model
from slimdeploy.models import arch_of, data_config, load_dense
from slimdeploy.prune import searched_model
from slimdeploy.select.candidates import Family, Problem
from slimdeploy.select.importance import load_importance
from slimdeploy.select.loop import closed_loop, dense_reference
from slimdeploy.select.scoring import Scorer, calibration_set
from slimdeploy.select.solver import LatencyCost
from slimdeploy.select.stage import rank_candidates
from slimdeploy.slim import build_slim
from slimdeploy.types import BlockSpec, SlimSpec

# ---- Torch-Pruning, as its users run it -------------------------------------------------------------

def _tp_attention_forward(self, x, attn_mask=None, is_causal=False, **_):
    """Torch-Pruning's timm example re-implements Attention.forward so that the output width follows the pruned
    qkv (timm's reshapes to the full embedding width)."""
    import torch.nn.functional as F

    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
    return self.proj(x.transpose(1, 2).reshape(B, N, -1))


def tp_prune(teacher, bundle, ratio: float, importance: str):
    """Torch-Pruning at `ratio` (MLP units and head dims); returns the pruned copy."""
    import timm
    import torch_pruning as tp

    model = copy.deepcopy(teacher).train()
    a = arch_of(teacher)
    x = torch.randn(1, a.in_chans, a.img_size, a.img_size)
    num_heads, ignored = {}, [model.head]
    for m in model.modules():
        if isinstance(m, timm.models.vision_transformer.Attention):
            m.forward = _tp_attention_forward.__get__(m, type(m))
            num_heads[m.qkv] = m.num_heads
        if isinstance(m, timm.models.vision_transformer.Mlp):
            ignored.append(m.fc2)  # MLP + head dims: the embedding stays
    imp = (tp.importance.GroupTaylorImportance() if importance == "taylor"
           else tp.importance.GroupMagnitudeImportance(p=2))
    pruner = tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=ratio, ignored_layers=ignored,
                                  num_heads=num_heads, prune_head_dims=True, prune_num_heads=False, round_to=1)
    if importance == "taylor":
        model.zero_grad()
        for i, (xb, yb) in enumerate(make_loader(bundle.train, bundle.transform, 64, True, seed=0)):
            if i >= 10:
                break
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
    pruner.step()
    for m in model.modules():
        if isinstance(m, timm.models.vision_transformer.Attention):
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
    return model.eval()


def kept_rows(pruned: torch.Tensor, dense: torch.Tensor) -> list[int]:
    """Indices of the dense rows that the pruned weight kept (rows matched exactly, in order)."""
    out, j = [], 0
    for row in pruned:
        while not torch.equal(dense[j], row):
            j += 1
        out.append(j)
        j += 1
    return out


def spec_from_tp(pruned, teacher, cfg) -> SlimSpec:
    a = arch_of(teacher)
    spec = SlimSpec.dense(cfg, a)
    A, hd = a.num_heads * a.head_dim, a.head_dim
    for i, (bp, bd) in enumerate(zip(pruned.blocks, teacher.blocks)):
        rows = kept_rows(bp.attn.qkv.weight.detach(), bd.attn.qkv.weight.detach())
        q = [r for r in rows if r < A]
        v = [r - 2 * A for r in rows if r >= 2 * A]
        per = lambda idx: [[c % hd for c in idx if c // hd == h] for h in range(a.num_heads)]  # noqa: E731
        spec.blocks[i] = BlockSpec(tokens=list(range(a.num_tokens)), heads=list(range(a.num_heads)), qk=per(q),
                                   v=per(v), mlp=kept_rows(bp.mlp.fc1.weight.detach(), bd.mlp.fc1.weight.detach()))
    return spec.validate()


# ---- phase 1 -----------------------------------------------------------------------------------------

def phase1(args) -> dict:
    run = Path(args.run)
    teacher, cfg = load_dense(run)
    a = arch_of(teacher)
    bundle = load_data("fashion-mnist", data_config(teacher), a.num_classes)
    imp, _ = load_importance(run)
    dense_spec = SlimSpec.dense(cfg, a)
    searched = searched_model(run, dense_spec)
    lm, warnings = load_latency_model(args.device, teacher, cfg)
    p = lm.profile
    measure = SpecMeasurer(get_backend(p.backend, threads=p.threads), searched, a, p.batch_size, teacher)
    cal = calibration_set(bundle, teacher, 2048)
    results = {"teacher_top1": top1(teacher, bundle), "cpu": cpu_name(), "warnings": warnings,
               "date": dt.datetime.now().isoformat(timespec="seconds"), "targets": {}}
    if Path(args.out).is_file():  # resume: targets already done are kept
        results["targets"] = json.loads(Path(args.out).read_text()).get("targets", {})
    print(f"teacher top-1 {results['teacher_top1']:.2f}%", flush=True)

    def loop(family, fraction, dense):
        def solve(m, b):
            return Problem(a, cfg, imp, LatencyCost(m)).solve(family, b)
        res = closed_loop(solve, lm, measure, dense_spec, None, fraction, rounds=8, dense=dense,
                          window=(1 - TOLERANCE, 1.0), aim=1 - TOLERANCE / 2)
        return res.spec, res.measured[res.chosen]["over_dense"]

    for f in args.targets:
        if str(f) in results["targets"]:
            continue
        rows = {}
        dense = dense_reference(measure, dense_spec)
        dense_ms = dense[0]
        now = lm.corrected(dense[1] / lm.predict(dense_spec), 0.0)  # as select_run: today's speed of the machine
        for mode, steps in (("slimdeploy (no retrain)", 0), ("slimdeploy (retrain)", 200)):
            scorer = Scorer(searched, teacher, bundle, cal, steps)
            cands, best = rank_candidates(Problem(a, cfg, imp, LatencyCost(now)), 0.95 * f * dense_ms, scorer, 3, now)
            fam = cands[best]["_family"]
            spec, ratio = loop(fam, f, dense)
            rows[mode] = {"family": fam.name, "spec": spec, "ratio": ratio, "weights": "searched",
                          "candidates": [{k: v for k, v in c.items() if not k.startswith("_")} for c in cands]}
        for name, fam in (("ViT-Slim fractions", Family("fractions", (1.0, 1.0, 1.0))),
                          ("uniform widths", Family("uniform"))):
            try:
                spec, ratio = loop(fam, f, dense)
                rows[name] = {"family": fam.name, "spec": spec, "ratio": ratio, "weights": "searched"}
            except SlimError as e:
                rows[name] = {"family": fam.name, "spec": None, "ratio": None, "weights": "searched",
                              "cannot_reach": str(e)}
        for name, crit in (("Torch-Pruning Taylor", "taylor"), ("Torch-Pruning magnitude", "magnitude")):
            rows[name] = tp_to_target(teacher, bundle, cfg, crit, f, lm, measure)
        for name, r in rows.items():
            spec = r["spec"]
            if spec is None:
                print(f"{f:.1f}x {name:26s} cannot reach the target", flush=True)
                continue
            weights = teacher if r["weights"] == "dense" else searched
            r["top1_pruned"] = top1(build_slim(spec, weights), bundle)
            r["in_tolerance"] = abs(r["ratio"] / f - 1) <= TOLERANCE if r["ratio"] else False
            print(f"{f:.1f}x {name:26s} {r['ratio'] / f if r['ratio'] else float('nan'):.3f} of target, "
                  f"top-1 right after pruning {r['top1_pruned']:.2f}%", flush=True)
            r["spec"] = spec.to_dict()
        results["targets"][str(f)] = rows
        save(args, results)
    return results


def tp_to_target(teacher, bundle, cfg, crit, f, lm, measure) -> dict:
    """Torch-Pruning's ratio bisected on the latency model, then stepped on measurements until the structure
    lands within 3% below the target."""
    a = arch_of(teacher)
    dense_pred = lm.predict(SlimSpec.dense(cfg, a))
    lo, hi = 0.0, 0.97
    for _ in range(12):  # predicted latency first: cheap
        mid = 0.5 * (lo + hi)
        if lm.predict(spec_from_tp(tp_prune(teacher, bundle, mid, crit), teacher, cfg)) / dense_pred > 0.97 * f:
            lo = mid
        else:
            hi = mid
    r, delta, last, ratio = hi, 0.02, 0, None
    for _ in range(10):  # then measured
        spec = spec_from_tp(tp_prune(teacher, bundle, r, crit), teacher, cfg)
        dense, (m,) = measure([spec], False)
        ratio = m.median_ms / dense.median_ms
        if (1 - TOLERANCE) * f <= ratio <= f:
            break
        direction = 1 if ratio > f else -1  # too slow: prune more
        if last and direction != last:
            delta /= 2
        r, last = min(0.97, max(0.0, r + direction * delta)), direction
    pruned = tp_prune(teacher, bundle, r, crit)
    x = torch.randn(8, a.in_chans, a.img_size, a.img_size)
    with torch.no_grad():  # slimdeploy's rebuild of Torch-Pruning's model computes the same function
        diff = (build_slim(spec, teacher)(x) - pruned(x)).abs().max().item()
    assert diff < 1e-4, diff
    return {"family": f"Torch-Pruning {crit}, ratio {r:.3f}", "spec": spec, "ratio": ratio, "weights": "dense",
            "tp_ratio": r, "rebuild_max_diff": diff}


# ---- phase 2 -----------------------------------------------------------------------------------------

def retrain_one(args, job) -> dict:
    torch.set_num_threads(args.threads)
    f, name, seed, spec_d, weights = job
    run = Path(args.run)
    teacher, cfg = load_dense(run)
    a = arch_of(teacher)
    bundle = load_data("fashion-mnist", data_config(teacher), a.num_classes)
    spec = SlimSpec.from_dict(spec_d)
    base = teacher if weights == "dense" else searched_model(run, SlimSpec.dense(cfg, a))
    student = build_slim(spec, base)
    out = Path(args.work) / f"{f}-{name.replace(' ', '_').replace('(', '').replace(')', '')}-{seed}"
    return retrain_job(args, student, teacher, bundle, out, f, name, seed, [spec_d, weights])


def phase2(args, results: dict) -> None:

    jobs = []
    for seed in args.seeds:
        for f, rows in results["targets"].items():
            for name, r in rows.items():
                key = f"{name}|{seed}"
                if name == "slimdeploy (no retrain)" or r.get("ratio") is None:
                    continue  # its column is top-1 right after pruning; or it could not reach the target
                if r.get("retrained", {}).get(key) is None:
                    jobs.append((f, name, seed, r["spec"], r["weights"]))
    # the first seed at every target (a complete table early), then the other seeds target by target, the
    # smallest target first (where the methods differ most)
    jobs.sort(key=lambda j: (j[2] != args.seeds[0], float(j[0]), args.seeds.index(j[2])))
    retrain_pool(args, retrain_one, jobs, lambda res: results["targets"][res["target"]][res["method"]],
                 lambda: save(args, results), key_of=lambda res: f"{res['method']}|{res['seed']}")


def save(args, results) -> None:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run directory with a trained dense model and its search")
    ap.add_argument("--device", default="local")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--retrain", action="store_true", help="phase 2: retrain every structure of phase 1")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores / workers)")
    ap.add_argument("--work", default="runs/selection_quality")
    ap.add_argument("--out", default="benchmarks/results/selection_quality.json")
    args = ap.parse_args()
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    if args.retrain:
        phase2(args, json.loads(Path(args.out).read_text()))
    else:
        phase1(args)


if __name__ == "__main__":
    main()
