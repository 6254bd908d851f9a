"""The whole models a profile calibrates on (calibration.py fits their latency).

An optimiser drives into a model's errors, so they come from three places: random structures of every size (some
blocks without heads or MLP, tokens dropped at some blocks), the structures the solver itself picks at budgets from
20% to 95% of dense, under random exchange rates between kinds (few tokens, narrow MLPs: where fixed per-operator
costs dominate), and pairs of ranked-token twins (their drops made by a ranking, and the same sizes static),
measured side by side for the cost of a ranking in a whole model. The twins are what selection picks in the ranked
token modes: a ranked importance sorts each block's ranks, so the solver keeps every channel and drops most tokens
(5-15 of 65 at 0.3x on the shifted set), a region the static picks never reach and where a model priced from
static draws alone was 10-16% too slow; their static halves calibrate the static model there too.

The solver's picks outnumber the random structures (23 to 16 of 40 by default, DRAWS 2; 15 to 16 of 32 in DRAWS
1): the fit serves the picks first, since selection is what the model prices, and the random structures keep it
honest elsewhere. With DRAWS 1 a Zen 5 EPYC profile priced the picks +2.1% slow at the median (worst 5.6%) while
it held random structures at +0.2%; fitted with more picks it priced held-out ones better (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np

from ..defaults import TOKENS
from ..errors import SlimError
from ..select.candidates import Problem, families
from ..select.importance import Importance
from ..select.solver import LatencyCost
from ..types import RANKED_TOKEN_MODES, Arch, ModelConfig, SlimSpec

DRAWS = 2  # how a profile draws its whole models (see the module's docstring); a cached local profile of an older
# version is measured again (profile.is_current)


def random_spec(arch: Arch, source: ModelConfig, rng: random.Random, step: int = 8, min_keep: float = 0.15,
                size: float | None = None, empty_branches: float = 0.1, embed_widths: list[int] | None = None
                ) -> SlimSpec:
    """A random slim structure of overall size `size` (default: random in [min_keep, 1]), with per block and
    dimension kept fractions around it, tokens dropped at some blocks (monotone), a branch (all heads or
    the whole MLP) removed with probability `empty_branches`, and, given embed_widths, half the time one of them
    near the size as the embedding width."""
    spec = SlimSpec.dense(source, arch)
    size = rng.uniform(min_keep, 1.0) if size is None else size
    if embed_widths and rng.random() < 0.5:
        near = [w for w in embed_widths if w >= arch.embed_dim * size * rng.uniform(0.7, 1.3)]
        spec.embed = list(range(near[0] if near else arch.embed_dim))
    tokens = list(range(arch.num_tokens))

    def width(full: int) -> int:
        w = full * min(1.0, max(0.05, size * rng.uniform(0.7, 1.3)))
        return max(1, min(full, int(round(w / step)) * step if full >= step else int(round(w))))

    for b in spec.blocks:
        if rng.random() < 0.4:
            patches = [t for t in tokens if t >= arch.num_prefix_tokens]
            keep = max(1, int(round(len(patches) * rng.uniform(max(0.3, size), 1.0))))
            tokens = tokens[:arch.num_prefix_tokens] + sorted(rng.sample(patches, keep))
        h = max(1, min(arch.num_heads, int(round(arch.num_heads * size * rng.uniform(0.7, 1.3)))))
        q, v, m = width(arch.head_dim), width(arch.head_dim), width(arch.mlp_dim)
        heads = sorted(rng.sample(range(arch.num_heads), h))
        if rng.random() < empty_branches:
            heads = []
        if rng.random() < empty_branches:
            m = 0
        b.tokens, b.heads = list(tokens), heads
        b.qk = [list(range(q)) for _ in heads]
        b.v = [list(range(v)) for _ in heads]
        b.mlp = list(range(m))
    return spec.validate()


def synthetic_importance(arch: Arch, rng: np.random.Generator, embed: bool = False):
    """Random importances shaped like a search's (deep blocks matter less), with a random exchange rate
    between kinds: enough to send the solver everywhere it goes with real ones. embed: with the embedding width
    searched (its channels as important as a block's MLP at a random rate)."""
    depth = np.linspace(1.5, 0.5, arch.depth)[:, None]
    w = np.exp(rng.uniform(np.log(0.1), np.log(10.0), 4))
    emb = rng.exponential(1.0, arch.embed_dim) * w[3] * arch.depth * 0.25 if embed else None
    return Importance(qk=rng.exponential(1.0, (arch.depth, arch.num_heads, arch.head_dim)) * depth[:, :, None] * w[0],
                      v=rng.exponential(1.0, (arch.depth, arch.num_heads, arch.head_dim)) * depth[:, :, None] * w[0],
                      mlp=rng.exponential(1.0, (arch.depth, arch.mlp_dim)) * depth * w[1] * 0.25,
                      tok=rng.exponential(1.0, (arch.depth, arch.num_patches)) * depth * w[2], mode="synthetic",
                      embed=emb)


def solver_specs(lm, arch: Arch, source: ModelConfig, count: int, seed: int = 0, ranked: bool = False
                 ) -> list[SlimSpec]:
    """What selection picks on `lm` at budgets spread over 20-95% of dense: each a random candidate family
    (select/candidates.py: the greedy solver under kind weights, channel-only, ViT-Slim fractions, uniform)
    solved under random importances, so the whole models come from the region selection drives into.

    ranked: what it picks in the ranked token modes instead (attentive and fused by turns, attentive with a
    position prior, as its search records one), at 25-75% of dense, by the greedy families (those that drop
    tokens by importance), priced with that mode's ranking; none where the model cannot rank."""
    if ranked and (arch.num_prefix_tokens < 1 or arch.num_patches < 2):
        return []
    rng = np.random.default_rng(seed + 1 if ranked else seed)
    dense = lm.predict(SlimSpec.dense(source, arch))
    with_embed = not ranked and "stem_head" in lm.embed_tables
    low, span = (0.25, 0.5) if ranked else (0.2, 0.75)
    out = []
    for i in range(count * 3):
        if len(out) == count:
            break
        frac = low + span * ((i * 0.618) % 1.0)
        mode = RANKED_TOKEN_MODES[len(out) % len(RANKED_TOKEN_MODES)] if ranked else "static"
        imp = synthetic_importance(arch, rng, embed=with_embed and i % 2 == 1)
        if ranked:
            imp = replace(imp, token_mode=mode, pos=rng.exponential(1.0, imp.tok.shape) if mode == "attentive"
                          else None)
        fams = [f for f in families(imp) if not ranked or f.kind == "greedy"]
        spec = Problem(arch, source, imp, LatencyCost(lm.for_tokens(mode))).solve(
            fams[int(rng.integers(len(fams)))], frac * dense)
        if spec is not None and spec.token_mode == mode:
            out.append(spec)
    return out


def ranked_twins(specs: list[SlimSpec], count: int) -> list[tuple[SlimSpec, SlimSpec]]:
    """Up to `count` pairs (ranked, static) from the specs that drop tokens: the ranked one in the spec's own
    ranked mode, else in attentive and fused token mode by turns, each drop made by a ranking; the static one
    the same sizes with its tokens at fixed positions. Measured side by side, their difference is what the
    rankings cost in a whole model: more than their nodes timed alone (a 0.3x structure of a 65-token model:
    24 us above its static twin, where the piece's table says 16 us), and too little of a whole model's latency
    for a regression over models to find.

    Where the specs give fewer than `count` (a small model's solver, on tables measured on a busy machine, picked
    no token drop at all), the first spec with half its patches dropped after block 0 closes the list, so that a
    profile always measures the cost of a ranking where the model can rank."""
    out, last_resort = [], [halved_tokens(specs[0])] if specs else []
    for s in [*specs, *last_resort]:
        if len(out) == count:
            break
        blocks, heads_before = [], False
        for b in s.blocks:  # a block before any attention has no scores to rank by: it keeps every token
            n = b.num_tokens if heads_before else s.arch.num_tokens
            blocks.append(replace(b, tokens=list(range(n))))
            heads_before = heads_before or b.num_heads > 0
        counts = [s.arch.num_tokens] + [b.num_tokens for b in blocks]
        if all(n == p for p, n in zip(counts, counts[1:])):
            continue
        mode = (s.token_mode if s.token_mode in RANKED_TOKEN_MODES
                else RANKED_TOKEN_MODES[len(out) % len(RANKED_TOKEN_MODES)])
        prior = uniform_prior(s.arch) if mode == "attentive" else {}  # attentive mode ranks with the search's
        twin = replace(s, token_mode=mode, blocks=blocks, **prior)
        try:
            out.append((twin.validate(), twin.in_mode("static")))
        except SlimError:  # leaves no place for the fused token
            continue
    return out


def halved_tokens(spec: SlimSpec) -> SlimSpec:
    """`spec` with half its patches (at least one) kept from block 1 on, its widths unchanged."""
    half = spec.arch.num_prefix_tokens + max(1, spec.arch.num_patches // 2)
    return replace(spec, blocks=[b if i == 0 else replace(b, tokens=list(range(min(b.num_tokens, half))))
                                 for i, b in enumerate(spec.blocks)])


def uniform_prior(arch: Arch) -> dict:
    """A rank prior for timing (values do not change the cost): rising over the patches, the default weight."""
    n = arch.num_patches
    return {"rank_prior": [[1.0 + j / n for j in range(n)] for _ in range(arch.depth)],
            "prior_weight": TOKENS["prior_weight"]}
