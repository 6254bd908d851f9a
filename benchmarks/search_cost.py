"""Cost of a mask-search step relative to a plain training step (same model, same batch).

Both steps are forward + backward + AdamW step; the search step adds the masks, their L1 term
and the Taylor-importance bookkeeping. Steps alternate (plain, search, plain, ...) so both see
the same machine state; the ratio of medians is reported.

    .venv/bin/python benchmarks/search_cost.py --model fmnist-vit --batch-size 128
    .venv/bin/python benchmarks/search_cost.py --model deit_tiny_patch16_224 --batch-size 16
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slimdeploy.masks import MaskedViT
from slimdeploy.models import arch_of, create_model
from slimdeploy.search import SearchConfig, TaylorImportance, _param_groups
from slimdeploy.types import ModelConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fmnist-vit")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--num-classes", type=int, default=10)
    args = ap.parse_args()

    torch.manual_seed(0)
    plain = create_model(ModelConfig(args.model, num_classes=args.num_classes)).train()
    a = arch_of(plain)
    masked = MaskedViT(copy.deepcopy(plain)).train()
    scfg = SearchConfig()
    hook = TaylorImportance(masked, scfg)
    opt_p = torch.optim.AdamW(plain.parameters(), lr=1e-4, weight_decay=1e-3)
    opt_m = torch.optim.AdamW(_param_groups(masked, 1e-3), lr=1e-4)
    x = torch.randn(args.batch_size, a.in_chans, a.img_size, a.img_size)
    y = torch.randint(0, a.num_classes, (args.batch_size,))

    def plain_step():
        loss = F.cross_entropy(plain(x), y)
        opt_p.zero_grad(set_to_none=True)
        loss.backward()
        opt_p.step()

    def search_step():
        loss = F.cross_entropy(masked(x), y) + sum(scfg.factor(k) * v for k, v in masked.l1().items())
        opt_m.zero_grad(set_to_none=True)
        loss.backward()
        hook.after_backward(masked)
        opt_m.step()

    for _ in range(3):
        plain_step()
        search_step()
    tp, ts = [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        plain_step()
        tp.append(time.perf_counter() - t)
        t = time.perf_counter()
        search_step()
        ts.append(time.perf_counter() - t)
    mp, ms = statistics.median(tp) * 1e3, statistics.median(ts) * 1e3
    res = {"model": args.model, "batch_size": args.batch_size, "steps": args.steps, "plain_step_ms": mp,
           "search_step_ms": ms, "ratio": ms / mp, "threads": torch.get_num_threads(),
           "date": dt.datetime.now().isoformat(timespec="seconds")}
    print(json.dumps(res, indent=2))
    out = Path(f"benchmarks/results/search_cost_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
