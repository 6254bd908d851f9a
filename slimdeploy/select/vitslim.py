"""The simple rules, kept as candidates and baselines: ViT-Slim's per-kind kept fractions and uniform widths, and
a bisection that solves any one-parameter rule to a budget.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import SlimError
from ..types import RANKED_TOKEN_MODES, Arch, BlockSpec, ModelConfig, SlimSpec
from .importance import Importance
from .solver import Cost, StructureBuilder, top
from .solver import State as _State


def fraction_spec(arch: Arch, source: ModelConfig, imp: Importance, keep_attn: float = 1.0, keep_mlp: float = 1.0,
                  keep_tokens: float = 1.0, keep_embed: float = 1.0, one_count: bool = False) -> SlimSpec:
    """ViT-Slim's budget: per mask kind, one global threshold keeps the top fraction of elements.

    Made valid for a dense slim model: per block, kept heads = heads with a kept q/k and v channel,
    and every kept head keeps the block's mean number of kept channels (its top ones).
    Tokens: from the first block that may drop them, monotone over depth (cumulative minimum of importance),
    then the global threshold. `one_count` (ranked modes only): every block from the first that may drop tokens
    keeps the same count, the top `keep_tokens` of the patches (what each image keeps still changes per block).
    Embedding (not part of ViT-Slim's search): the top fraction of channels.
    """
    for f in (keep_attn, keep_mlp, keep_tokens, keep_embed):
        if not 0 < f <= 1:
            raise SlimError("--keep-attn/--keep-mlp/--keep-tokens/--keep-embed must be in (0, 1]")
    if keep_embed < 1 and imp.embed is None:
        raise SlimError("--keep-embed needs a search of the embedding width: run the search with --embed")
    a = arch
    P = a.num_prefix_tokens

    def keep_mask(x, frac):
        flat = np.sort(x.reshape(-1))[::-1]
        thr = flat[max(1, int(round(frac * flat.size))) - 1]
        return x >= thr

    qk_keep = keep_mask(imp.qk, keep_attn) if imp.qk is not None else None
    v_keep = keep_mask(imp.v, keep_attn) if imp.v is not None else None
    mlp_keep = keep_mask(imp.mlp, keep_mlp) if imp.mlp is not None else None
    tok_keep = None
    if imp.tok is not None:
        # from the first block that may drop tokens: in ranked modes block 0 ranks nothing (its importance is
        # about 0), and a minimum taken through it would give every later block block 0's count
        first = imp.first_token_block
        tok_keep = np.ones(imp.tok.shape, dtype=bool)
        if one_count:
            if imp.token_mode not in RANKED_TOKEN_MODES:
                raise SlimError("one token count per block is a rule of ranked token modes (attentive, fused)")
            tok_keep[first:] = keep_mask(imp.tok[first], keep_tokens)[None, :]  # ranks are ordered: a count
        else:
            tok_keep[first:] = keep_mask(np.minimum.accumulate(imp.tok[first:], axis=0), keep_tokens)
    blocks = []
    tokens = list(range(a.num_tokens))
    for i in range(a.depth):
        if tok_keep is not None:
            keep = [t for t in tokens[P:] if tok_keep[i, t - P]]
            tokens = tokens[:P] + (keep or [tokens[P]])
        heads, qk, v = [], [], []
        qcnt = qk_keep[i].sum(1) if qk_keep is not None else np.full(a.num_heads, a.head_dim)
        vcnt = v_keep[i].sum(1) if v_keep is not None else np.full(a.num_heads, a.head_dim)
        alive = [h for h in range(a.num_heads) if qcnt[h] > 0 and vcnt[h] > 0]
        if alive:
            q = max(1, int(round(qcnt[alive].mean())))
            w = max(1, int(round(vcnt[alive].mean())))
            heads = alive
            qk = [top(imp.qk[i, h] if imp.qk is not None else None, q, a.head_dim) for h in heads]
            v = [top(imp.v[i, h] if imp.v is not None else None, w, a.head_dim) for h in heads]
        mlp = (np.nonzero(mlp_keep[i])[0].tolist() if mlp_keep is not None else list(range(a.mlp_dim)))
        kept = list(range(len(tokens))) if imp.token_mode in RANKED_TOKEN_MODES else list(tokens)  # a count
        blocks.append(BlockSpec(tokens=kept, heads=heads, qk=qk, v=v, mlp=mlp))
    embed = top(imp.embed, max(1, int(round(keep_embed * a.embed_dim))), a.embed_dim)
    return SlimSpec(source=source, arch=a, blocks=blocks, token_mode=imp.token_mode, embed=embed,
                    **imp.ranking()).validate()


def uniform_spec(builder: StructureBuilder, keep: float, multiple: int = 8) -> SlimSpec:
    """Every block the same: all heads and tokens, q/k, v and MLP widths at `keep` of full (multiples of 8),
    the kept channels and units chosen by importance."""
    a = builder.arch

    def width(full: int) -> int:
        w = int(round(keep * full / multiple)) * multiple if full >= multiple else int(round(keep * full))
        return max(min(multiple, full), min(full, w))

    q, m = width(a.head_dim), width(a.mlp_dim)
    state: _State = [[a.num_tokens, a.num_heads, q, q, m] for _ in range(a.depth)]
    return builder.spec(state, [list(range(a.num_patches))] * a.depth)


def solve_scalar(make: Callable[[float], SlimSpec], cost: Cost, budget: float, iters: int = 24
                 ) -> tuple[float, SlimSpec] | None:
    """The largest s in (0, 1] with cost(make(s)) <= budget, by bisection (cost is taken to grow with s);
    None when even the smallest s does not fit."""
    cost_of = cost.of_spec
    full = make(1.0)
    if cost_of(full) <= budget:
        return 1.0, full
    lo, hi = 1e-3, 1.0
    best = make(lo)
    if cost_of(best) > budget:
        return None
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        spec = make(mid)
        if cost_of(spec) <= budget:
            lo, best = mid, spec
        else:
            hi = mid
    return lo, best
