"""Calibration: the whole models a profile measures, and the fit of their latency against the tables.

An optimiser drives into a model's errors, so the whole models come from three places: random structures of
every size (some blocks without heads or MLP, tokens dropped at some blocks), the structures the solver itself
picks at budgets from 20% to 95% of dense, under random exchange rates between kinds (few tokens, narrow MLPs:
where fixed per-operator costs dominate), and pairs of ranked-token twins of some of them (their drops made by a
ranking, and the same sizes static), measured side by side for the cost of a ranking in a whole model.
The fit, with rows weighted by 1 / measured (relative errors):

    measured = scale_fixed * fixed + scale_tokens * tokens + per_attn * n_attn + per_mlp * n_mlp
               + per_gather * n_gather + per_rank * n_rank + per_fuse * n_fuse + beta
    fixed, tokens = table sums at each block's fewest tokens, and what its tokens add above that, each
                    = pieces without weights + warm + phi(weight bytes) * (cold - warm)

The first point is the dense model, and it counts as DENSE_WEIGHT models: a target is a fraction of the dense
model, so the dense model's own error would move every target (held-out models on five Xeon profiles: the mean
signed error of the ratio to dense went from -3.0..+5.9% to -0.3..+2.4%). Every cost is kept >= 0: a node never
makes a model faster, and the per-branch and per-gather costs that fitted a few us below zero were noise (held out,
the p90 error fell on four of the five profiles). FIT says which version of this fit a profile's calibration
holds: an older one is fitted again from its points when loaded (model.py), their features read again from their
widths by the current tables, with nothing measured again.

Two scales, not one per table group (one per group overfits: it was 0.3 for attention and 1.8 for the MLP on 16
random models, and wrong on the solver's structures), but one for what an operator costs whatever its tokens
(dispatch, weight streaming: pieces timed in copies run with warm predictors that a whole model does not have)
and one for the arithmetic per token (which overlaps with the streaming in a whole model). The counts carry the
per-operator costs of a branch or gather that pieces timed apart do not share with the whole model; phi says how
far a model with that many bytes of weights runs from a cold cache (a small model stays in L2 between calls).
"""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np

from ..defaults import TOKENS
from ..errors import SlimError
from ..types import RANKED_TOKEN_MODES, Arch, ModelConfig, SlimSpec
from .model import COUNTS, RANKING_TABLE, calibrated

FIT = 4  # the fit's version (see the module's docstring); bump when the same points would fit otherwise. 3: widths
# read linearly between grid points further apart than the profile's step, and the tokens a ranking keeps linearly,
# not as a staircase; 4: the matmul tables read as a line in width where the grid is coarse (model.py)
DENSE_WEIGHT = 30.0  # the dense model (the first point) counts as this many models


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
    from ..select.importance import Importance

    depth = np.linspace(1.5, 0.5, arch.depth)[:, None]
    w = np.exp(rng.uniform(np.log(0.1), np.log(10.0), 4))
    emb = rng.exponential(1.0, arch.embed_dim) * w[3] * arch.depth * 0.25 if embed else None
    return Importance(qk=rng.exponential(1.0, (arch.depth, arch.num_heads, arch.head_dim)) * depth[:, :, None] * w[0],
                      v=rng.exponential(1.0, (arch.depth, arch.num_heads, arch.head_dim)) * depth[:, :, None] * w[0],
                      mlp=rng.exponential(1.0, (arch.depth, arch.mlp_dim)) * depth * w[1] * 0.25,
                      tok=rng.exponential(1.0, (arch.depth, arch.num_patches)) * depth * w[2], mode="synthetic",
                      embed=emb)


def solver_specs(lm, arch: Arch, source: ModelConfig, count: int, seed: int = 0) -> list[SlimSpec]:
    """What selection picks on `lm` at budgets spread over 20-95% of dense: each a random candidate family
    (select/candidates.py: the greedy solver under kind weights, channel-only, ViT-Slim fractions, uniform)
    solved under random importances, so the whole models come from the region selection drives into."""
    from ..select.candidates import Problem, families
    from ..select.solver import LatencyCost

    rng = np.random.default_rng(seed)
    dense = lm.predict(SlimSpec.dense(source, arch))
    with_embed = "stem_head" in lm.embed_tables
    out = []
    for i in range(count * 3):
        if len(out) == count:
            break
        frac = 0.2 + 0.75 * ((i * 0.618) % 1.0)
        imp = synthetic_importance(arch, rng, embed=with_embed and i % 2 == 1)
        fams = families(imp)
        spec = Problem(arch, source, imp, LatencyCost(lm)).solve(fams[int(rng.integers(len(fams)))], frac * dense)
        if spec is not None:
            out.append(spec)
    return out


def ranked_twins(specs: list[SlimSpec], count: int) -> list[tuple[SlimSpec, SlimSpec]]:
    """Up to `count` pairs (ranked, static) from the specs that drop tokens: the ranked one in attentive and fused
    token mode by turns, each drop made by a ranking; the static one the same sizes with its tokens at fixed
    positions. Measured side by side, their difference is what the rankings cost in a whole model: more than
    their nodes timed alone (a 0.3x structure of a 65-token model: 24 us above its static twin, where the piece's
    table says 16 us), and too little of a whole model's latency for a regression over models to find."""
    out = []
    for s in specs:
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
        mode = RANKED_TOKEN_MODES[len(out) % len(RANKED_TOKEN_MODES)]
        prior = uniform_prior(s.arch) if mode == "attentive" else {}  # attentive mode ranks with the search's
        twin = replace(s, token_mode=mode, blocks=blocks, **prior)
        try:
            out.append((twin.validate(), twin.in_mode("static")))
        except SlimError:  # leaves no place for the fused token
            continue
    return out


def uniform_prior(arch: Arch) -> dict:
    """A rank prior for timing (values do not change the cost): rising over the patches, the default weight."""
    n = arch.num_patches
    return {"rank_prior": [[1.0 + j / n for j in range(n)] for _ in range(arch.depth)],
            "prior_weight": TOKENS["prior_weight"]}


def pair_record(ranked_features: dict, static_features: dict, token_mode: str, static_ms: float,
                paired_ratio: float) -> dict:
    """A measured pair for fit_calibration: the ranked model measured `paired_ratio` times its static twin (in
    the same rounds), which measured `static_ms`."""
    return {"token_mode": token_mode, "ranked": ranked_features, "static": static_features,
            "delta_ms": static_ms * (paired_ratio - 1.0)}


def fit_calibration(points: list[dict], pairs: list[dict] | None = None) -> dict:
    """Fit measured ms against each point's features (LatencyModel.features); see the module's docstring.

    How cold the weighted pieces run, phi(bytes) = sigmoid((ln bytes - center) / width), is chosen on a grid
    (the linear coefficients by weighted least squares at each grid point). A token mode with measured pairs
    (pair_record) takes its per-ranking cost from them: the median over pairs of what the ranked model measured
    above its twin, less what the rest of the fit predicts for that difference, per ranking (kept >= 0); the
    pairs' ranked points ("ranked_twin") then stay out of the least squares, and other ranked points enter it
    with that cost. Without pairs the cost is fitted with the rest."""
    pairs = list(pairs or [])
    paired = sorted({RANKING_TABLE[p["token_mode"]] for p in pairs})
    counts = [k for k in COUNTS if k not in paired]
    feats = [p["features"] for p in points]
    rows = [i for i, p in enumerate(points) if not (paired and p.get("ranked_twin"))]  # the pairs price those
    ranked = [i for i in rows if any(feats[i].get(k, 0.0) for k in paired)]
    cal = _fit(points, [i for i in rows if i not in ranked], counts)
    cal.update(_pair_costs(pairs, cal))
    if ranked:  # other ranked points (a closed loop's, folded in) join the fit, their rankings at the pairs' cost
        cal = _fit(points, rows, counts, {f"per_{k}": cal[f"per_{k}"] for k in paired})
        cal.update(_pair_costs(pairs, cal))
    has_warm = cal.pop("has_warm")
    err = np.array([calibrated(f, cal, has_warm) / p["measured_ms"] - 1 for f, p in zip(feats, points)])
    return {**cal, "fit": FIT, "points": points, "pairs": pairs,
            "fit_median_abs_error": float(np.median(np.abs(err))),
            "fit_max_abs_error": float(np.abs(err).max())}


def _pair_costs(pairs: list[dict], cal: dict) -> dict:
    """Per token mode, the median over its pairs of (measured difference - the difference `cal` predicts without
    rankings' own cost) per ranking, kept >= 0."""
    out = {}
    for key in sorted({RANKING_TABLE[p["token_mode"]] for p in pairs}):
        without = {**cal, f"per_{key}": 0.0}
        per = [(p["delta_ms"] - calibrated(p["ranked"], without, cal["has_warm"])
                + calibrated(p["static"], without, cal["has_warm"])) / p["ranked"][key]
               for p in pairs if RANKING_TABLE[p["token_mode"]] == key and p["ranked"].get(key)]
        out[f"per_{key}"] = max(0.0, float(np.median(per))) if per else 0.0
    return out


def _fit(points: list[dict], rows: list[int], counts: list[str], known: dict | None = None) -> dict:
    """The least squares of fit_calibration over the points `rows`, with the structural `counts` as regressors;
    the other counts cost what `known` says (per_<count>: ms), else 0."""
    known = known or {}
    feats = [points[i]["features"] for i in rows]
    y = np.array([points[i]["measured_ms"] for i in rows], dtype=np.float64)
    w = 1.0 / y * np.array([np.sqrt(DENSE_WEIGHT) if i == 0 else 1.0 for i in rows])  # squared in the fit
    y = y - np.array([sum(c * f.get(k.removeprefix("per_"), 0.0) for k, c in known.items()) for f in feats])
    logb = np.log(np.maximum([f["bytes"] for f in feats], 1.0))
    has_warm = any(abs(f["fixed_cold"] - f["fixed_warm"]) > 1e-12 for f in feats)
    grid = [(0.0, 1.0)]
    if has_warm:
        centers = np.linspace(logb.min() - 0.5, logb.max() + 0.5, 25)
        grid = [(c, wd) for c in centers for wd in (0.1, 0.25, 0.5, 1.0)]
    best = None
    for center, width in grid:
        cold = 1.0 / (1.0 + np.exp(-np.clip((logb - center) / width, -50, 50))) if has_warm else np.ones(len(y))

        def part(f, c, prefix):
            return f[f"{prefix}_shared"] + f[f"{prefix}_warm"] + c * (f[f"{prefix}_cold"] - f[f"{prefix}_warm"])
        X = np.array([[part(f, c, "fixed"), part(f, c, "tok")] + [f.get(k, 0.0) for k in counts] + [1.0]
                      for f, c in zip(feats, cold)])
        coef = _solve(X, y, w, len(rows))
        sse = float((((X @ coef) - y) * w) @ (((X @ coef) - y) * w))
        if best is None or sse < best[0] - 1e-15:
            best = (sse, coef, center, width)
    _, coef, center, width = best
    coefs = dict(zip(counts, coef[2:-1]))
    return {"scale_fixed": float(coef[0]), "scale_tokens": float(coef[1]),
            **{f"per_{k}": float(coefs.get(k, known.get(f"per_{k}", 0.0))) for k in COUNTS},
            "beta": float(coef[-1]), "phi_center": float(center), "phi_width": float(width), "has_warm": has_warm}


def _solve(X: np.ndarray, y: np.ndarray, w: np.ndarray, n: int) -> np.ndarray:
    """Weighted least squares: every coefficient with enough points, else the two scales only (then one
    scale); every coefficient but the constant (the last column) kept >= 0, a negative one refitted out, the
    most negative first (a negative cost is noise: on the shifted set eight ranked twins fitted -5 us a ranking,
    where a ranked structure measures 24 us above its static twin and its pieces say 16 us)."""
    k = X.shape[1]
    cols = list(range(k)) if n >= k + 3 else ([0, 1] if n >= 2 else [0])
    coef = np.zeros(k)
    while True:
        coef[:] = 0.0
        coef[cols] = np.linalg.lstsq(X[:, cols] * w[:, None], y * w, rcond=None)[0]
        negative = [c for c in cols if c < k - 1 and coef[c] < 0]
        if not negative:
            return coef
        cols.remove(min(negative, key=lambda c: coef[c]))
