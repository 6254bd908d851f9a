"""Does the solver lose anything by moving only on a profile's grid widths? Computed, nothing timed.

The latency model reads a width between two grid points linearly (latency/model.py), so the solver could move on
every multiple of `--fine` units (MLP) and of the profile's step (q/k and v) instead of on the measured grid. Here
both solve the same problems (random importances shaped like a search's, budgets of 30-90% of dense) and the
script reports how much of the budget each spends, the importance each keeps, and the solver's time.

    .venv/bin/python benchmarks/solver_widths.py benchmarks/results/profiles/deit_small_epyc_0833.json \\
        --model deit_small_patch16_224
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

from slimdeploy.latency.draws import synthetic_importance
from slimdeploy.latency.model import LatencyModel
from slimdeploy.models import arch_of, create_model
from slimdeploy.select.solver import LatencyCost, Selector, widths_for
from slimdeploy.types import ModelConfig, SlimSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile")
    ap.add_argument("--model", default="fmnist-vit")
    ap.add_argument("--fine", type=int, default=32, help="MLP step of the fine widths")
    ap.add_argument("--problems", type=int, default=6, help="random importances, each at 4 budgets")
    args = ap.parse_args()
    lm = LatencyModel.load(args.profile)
    a = arch_of(create_model(ModelConfig(args.model)))
    source = ModelConfig(args.model, a.num_classes, a.img_size, a.in_chans)
    cost = LatencyCost(lm)
    dense = cost.of_spec(SlimSpec.dense(source, a))
    step = int(lm.profile.model.get("step", 8))
    rng = np.random.default_rng(0)
    rows = {"grid": [], "fine": []}
    for _ in range(args.problems):
        imp = synthetic_importance(a, rng)
        grid = widths_for(a, cost, imp)
        fine = replace(grid, mlp=sorted(set(grid.mlp) | set(range(args.fine, a.mlp_dim, args.fine))),
                       qk=sorted(set(grid.qk) | set(range(step, a.head_dim, step))),
                       v=sorted(set(grid.v) | set(range(step, a.head_dim, step))))
        for f in (0.3, 0.5, 0.7, 0.9):
            for name, widths in (("grid", grid), ("fine", fine)):
                t = time.perf_counter()
                s = Selector(a, source, imp, cost, widths).select(f * dense)
                rows[name].append((s.cost / (f * dense), s.importance, time.perf_counter() - t))
    g, fi = np.array(rows["grid"]), np.array(rows["fine"])
    print(f"{args.profile} ({args.model}), {len(g)} problems; fine: MLP every {args.fine} units, q/k and v every "
          f"{step}")
    for name, r in (("grid", g), ("fine", fi)):
        print(f"  {name}: budget spent median {np.median(r[:, 0]):.4f}, min {r[:, 0].min():.4f}; "
              f"solve {np.median(r[:, 2]):.2f} s median")
    k = fi[:, 1] / g[:, 1]
    print(f"  importance kept, fine / grid: median {np.median(k):.4f}, min {k.min():.4f}, max {k.max():.4f}")


if __name__ == "__main__":
    main()
