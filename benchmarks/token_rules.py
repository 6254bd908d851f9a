"""Which tokens to keep, per image or fixed, at equal counts: accuracy only, nothing timed (issue 16).

Every rule keeps the same number of tokens in each block (ViT-Slim's token fraction rule on the static search,
every head, channel and unit kept, block 0 keeping every token), so only the choice of tokens differs:
  static        the static search's positions (slimdeploy's static token mode)
  attentive     per image, the class token's attention in the last block before, averaged over heads (the
                attentive mode as shipped)
  value         the same attention weighted by each token's value norm, per head (ATS, Fayyaz et al. 2022)
  prior w       per image, (1 - w) x the attention above + w x a per-position prior, both normalised over the
                patches; the prior is the static search's importance of each position from that block on (what the
                static mode ranks by). The positions ride along with the tokens, so a later ranking still knows them.
  mean-attn w   the same with the prior from data: the dense model's class-token attention in the block before,
                averaged over 4,096 training images
  own w         the same with the attentive search's own prior (slimdeploy's attentive mode since it ranks with
                one, SlimSpec.rank_prior): the first-order importance of each position on the searched weights
                (search.position_importance; taken from the search when it recorded it, else computed here)
Every prior is a SlimSpec.rank_prior, so these are slimdeploy's attentive models.
Ranked rules run on the attentive search's weights and on the dense model's; static on the static search's and the
dense model's. The value rule is built by wrapping the slim model's attention.

    .venv/bin/python benchmarks/token_rules.py --static-run runs/tokens-plain-static \\
        --attentive-run runs/tokens-plain-attentive --out benchmarks/results/token_rules_plain.json

With --retrain-epochs N, static, attentive and own 0.5 are then retrained at each kept fraction (the pipeline's
recipe, one retraining seed), on the weights they were pruned from; results already in --out are kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from equal_latency import retrain_job, top1  # noqa: E402

from slimdeploy.data import load_data, make_loader  # noqa: E402
from slimdeploy.latency.fingerprint import cpu_name  # noqa: E402
from slimdeploy.models import arch_of, data_config, load_dense  # noqa: E402
from slimdeploy.prune import searched_model  # noqa: E402
from slimdeploy.search import position_importance  # noqa: E402
from slimdeploy.select.importance import load_importance  # noqa: E402
from slimdeploy.select.vitslim import fraction_spec  # noqa: E402
from slimdeploy.slim import build_slim, token_scores  # noqa: E402
from slimdeploy.types import SlimSpec  # noqa: E402


class ValueScored(nn.Module):
    """A SlimAttention whose token scores weight each head's class-token attention by the value norms (ATS)."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.inner = attn

    def forward(self, x: torch.Tensor, scores: str | None = None):
        a = self.inner
        if scores is None:
            return a(x)
        q, k, v = a.heads(x)
        out = a.proj(F.scaled_dot_product_attention(q, k, v, scale=a.scale).transpose(1, 2).flatten(2))
        p = ((q[:, :, :1] * a.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, 0] * v.norm(dim=-1)  # (B, H, N)
        return out, (p / p.sum(-1, keepdim=True).clamp_min(1e-12)).mean(1)


def search_prior(imp, a) -> torch.Tensor:
    """The static search's importance of each position from block i on (the static mode's drop order)."""
    R = np.flip(np.cumsum(np.flip(imp.tok, 0), 0), 0)
    prior = torch.zeros(a.depth, a.num_tokens)
    prior[:, a.num_prefix_tokens:] = torch.tensor(R - R.min(1, keepdims=True) + 1e-6, dtype=torch.float32)
    return prior


@torch.no_grad()
def attention_prior(teacher, bundle, a, images: int = 4096) -> torch.Tensor:
    """The dense model's class-token attention (mean over heads and images) of the block before each block."""
    acc, n = torch.zeros(a.depth, a.num_tokens), 0
    for xb, _ in make_loader(bundle.train, bundle.transform, 256, False):
        x = teacher.norm_pre(teacher._pos_embed(teacher.patch_embed(xb)))
        for i, blk in enumerate(teacher.blocks):
            at, y = blk.attn, blk.norm1(x)
            q, k, _ = at.qkv(y).reshape(*y.shape[:2], 3, at.num_heads, -1).permute(2, 0, 3, 1, 4)
            acc[i] += token_scores(at.q_norm(q), at.k_norm(k), at.scale, "cls").sum(0)
            x = blk(x)
        n += xb.shape[0]
        if n >= images:
            break
    prior = torch.zeros(a.depth, a.num_tokens)
    prior[1:, a.num_prefix_tokens:] = acc[:-1, a.num_prefix_tokens:] / n
    return prior


def own_prior(attentive_run: str, weights, bundle, a) -> torch.Tensor:
    """The attentive search's own position importance, as the product ranks with (Importance.ranking)."""
    imp, _ = load_importance(attentive_run)
    pos = imp.pos if imp.pos is not None else position_importance(weights, bundle, 256, "cpu").numpy()
    prior = torch.zeros(a.depth, a.num_tokens)
    prior[:, a.num_prefix_tokens:] = torch.tensor(replace(imp, pos=pos).ranking()["rank_prior"])
    return prior


def ranked(spec: SlimSpec, weights, rule: str, prior: torch.Tensor | None = None, w: float = 0.0) -> nn.Module:
    if rule == "prior":  # every row valid (a block that does not rank ignores its row)
        rows = prior[:, spec.arch.num_prefix_tokens:].clone()
        rows[rows.sum(1) <= 0] = 1.0
        spec = SlimSpec.from_dict({**spec.to_dict(), "rank_prior": rows.tolist(), "prior_weight": w})
    model = build_slim(spec, weights).eval()
    if rule == "value":
        for blk in model.blocks:
            if blk.scores is not None:
                blk.attn = ValueScored(blk.attn)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--static-run", required=True, help="a trained dense model with a static search")
    ap.add_argument("--attentive-run", required=True, help="an attentive search of the same dense model")
    ap.add_argument("--keep-tokens", type=float, nargs="+", default=[0.75, 0.5, 0.3])
    ap.add_argument("--mix", type=float, nargs="+", default=[0.5, 0.8, 1.0], help="prior weights w")
    ap.add_argument("--out", default=None, help="results (json); kept fractions already in it are not evaluated again")
    ap.add_argument("--retrain-epochs", type=int, default=0, help="then retrain static, attentive and own 0.5 at "
                    "each kept fraction (the pipeline's recipe: soft distillation from the dense model)")
    ap.add_argument("--work", default="runs/token_rules", help="retraining checkpoints (resumed)")
    args = ap.parse_args()
    teacher, cfg = load_dense(args.static_run)
    a = arch_of(teacher)
    bundle = load_data(args.data, data_config(teacher), a.num_classes)
    dense_spec = SlimSpec.dense(cfg, a)
    imp, _ = load_importance(args.static_run)
    weights = {"static": searched_model(args.static_run, dense_spec),
               "attentive": searched_model(args.attentive_run, dense_spec), "dense": teacher}
    priors = {"prior": search_prior(imp, a), "mean-attn": attention_prior(teacher.eval(), bundle, a),
              "own": own_prior(args.attentive_run, weights["attentive"], bundle, a)}
    done = json.loads(Path(args.out).read_text()) if args.out and Path(args.out).is_file() else None
    out = done or {"data": args.data, "cpu": cpu_name(), "static_run": args.static_run,
                   "attentive_run": args.attentive_run, "dense_top1": top1(teacher, bundle), "rows": {}}
    specs = {}
    for keep in args.keep_tokens:
        spec = fraction_spec(a, cfg, imp, 1.0, 1.0, keep)
        spec.blocks[0].tokens = list(range(a.num_tokens))  # ranked rules have no attention before block 0
        att = spec.in_mode("attentive")
        specs[keep] = spec, att
        if str(keep) in out["rows"]:
            continue
        row = {"counts": spec.token_counts()}
        for on in ("search", "dense"):
            row[f"static/{on}"] = top1(build_slim(spec, weights["static" if on == "search" else "dense"]), bundle)
            wts = weights["attentive" if on == "search" else "dense"]
            for rule in ("attentive", "value"):
                row[f"{rule}/{on}"] = top1(ranked(att, wts, rule), bundle)
            for name, prior in priors.items():
                for w in args.mix:
                    row[f"{name} {w:g}/{on}"] = top1(ranked(att, wts, "prior", prior, w), bundle)
        out["rows"][str(keep)] = row
        print(f"keep {keep:g}: " + ", ".join(f"{k} {v}" if k == "counts" else f"{k} {v:.2f}"
                                             for k, v in row.items()), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    if args.retrain_epochs:
        args.epochs = args.retrain_epochs
        for keep, (spec, att) in specs.items():
            row = out["rows"][str(keep)]
            for rule in ("static", "attentive", "own 0.5"):
                if rule in row.get("retrained", {}):
                    continue
                student = (build_slim(spec, weights["static"]) if rule == "static" else
                           ranked(att, weights["attentive"], "attentive") if rule == "attentive" else
                           ranked(att, weights["attentive"], "prior", priors["own"], 0.5))
                work = Path(args.work) / f"{Path(args.attentive_run).name}-{keep:g}-{rule.replace(' ', '')}"
                res = retrain_job(args, student, teacher, bundle, work, keep, rule, 0,
                                  [spec.to_dict(), rule, args.attentive_run])
                row.setdefault("retrained", {})[rule] = res["top1"]
                print(f"keep {keep:g}: {rule} retrained {args.epochs} epochs: {res['top1']:.2f}", flush=True)
                if args.out:
                    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
