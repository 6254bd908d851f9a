"""Calibration: the fit of whole models' measured latency against the tables (the models come from draws.py).

The fit, with rows weighted by 1 / measured (relative errors):

    measured = scale_fixed * fixed + scale_tokens * tokens + per_attn * n_attn + per_mlp * n_mlp
               + per_gather * n_gather + per_rank * n_rank + per_fuse * n_fuse + per_mb * weight MB + beta
    fixed, tokens = table sums at each block's fewest tokens, and what its tokens add above that, each
                    = pieces without weights + warm + phi(weight bytes) * (cold - warm)
    per_mb: only in profiles without warm tables (see below); 0 in the others

The first point is the dense model, and it counts as DENSE_WEIGHT models: a target is a fraction of the dense model,
so the dense model's own error would move every target (held-out models on five Xeon profiles: the mean signed error
of the ratio to dense went from -3.0..+5.9% to -0.3..+2.4%). Every cost is kept >= 0: a node never makes a model
faster, and the per-branch and per-gather costs that fitted a few us below zero were noise (held out, the p90 error
fell on four of the five profiles). The constant beta too (version 9): a model of nothing costs nothing or more, and
a negative constant was the fit bending a line through the largest models. On a Zen 5 EPYC deit_small's profile (FIT
8) read beta -3.9 ms with scale_fixed 1.96, and priced random structures under 0.1 x dense 14-23% slow; kept >= 0,
on that profile's and two earlier runs' random specs (computed from stored measurements) the p90 fell from 13.7 /
6.1 / 6.1% to 5.5 / 4.5 / 5.5%, its picks' worst from 3.5 / 4.6 / 4.4% to 4.0 / 4.2 / 4.0%; fmnist-vit's profiles,
whose constant read a few us below zero, barely move. FIT says which version of this fit a profile's calibration
holds: an older one is fitted again from its points when loaded (model.py), their features read again from their
widths by the current tables, with nothing measured again.

Two scales, not one per table group (one per group overfits: it was 0.3 for attention and 1.8 for the MLP on 16
random models, and wrong on the solver's structures), but one for what an operator costs whatever its tokens
(dispatch, weight streaming: pieces timed in copies run with warm predictors that a whole model does not have)
and one for the arithmetic per token (which overlaps with the streaming in a whole model). The counts carry the
per-operator costs of a branch or gather that pieces timed apart do not share with the whole model; phi says how
far a model with that many bytes of weights runs from a cold cache (a small model stays in L2 between calls).
Bytes alone: versions 5 and 6 let the fit scale the bytes by the kept token fraction to a power, for ranked picks
of the shifted set (5-15 of 65 tokens, all 4.7 MB of weights) that measured 10-16% faster than priced cold. Once
the tables' spikes were gone (version 6) that power no longer paid there (its picks within 7.1% with it, 7.4%
without), and where no calibration model holds many bytes and few tokens it priced one warm by extrapolation: on a
Zen 5 EPYC the fit chose the fraction squared, from small models with one token, and priced the solver's 0.3x
picks of fmnist-vit (3.4 MB, 1-2 of 17 tokens in every block) 6-9% fast; by bytes alone they are within 4.7%, on
the same measurements (benchmarks/RESULTS.md).

Streaming from memory (version 8): a profile times its weighted pieces out of L2 but in L3 (copies of 2x L2), and
measures warm tables only for models that fit in L2 (profile.py), where phi says how warm they run. A model whose
weights outgrow the last-level cache (DeiT-S: 85 MB against 32 MB of L3) streams them from memory on every call,
a cost in its bytes that no piece paid. Without a term for it, the fit bent scale_fixed (2.2 on a Zen 5 EPYC) and
a constant (-2.5 ms of a 52 ms model) into a line through it, and that line priced small random structures 6-19%
slow. So profiles without warm tables fit per_mb (ms per MB of weights, >= 0; 0.04 there, about 25 GB/s): on
three deit_small profiles with their five fidelity runs the leave-one-out p90 fell from 7.0-14.2% to 5.5-9.9%, and
the random specs' p90 from 4.2-6.7% to 2.9-4.4% on the three runs that missed or neared the goal (2.7 -> 1.8 and
2.9 -> 3.0% on the other two); the smallest random structure (0.04 x dense) is priced slower still. The small
fmnist-vit models (warm tables) keep phi alone.
"""

from __future__ import annotations

import numpy as np

FIT = 9  # the fit's version (see the module's docstring); bump when the same points would fit otherwise. 3: widths
# read linearly between grid points further apart than the profile's step, and the tokens a ranking keeps linearly,
# not as a staircase; 4: the matmul tables read as a line in width where the grid is coarse (model.py); 5: the
# cache term in bytes and tokens (phi_tokens); 6: the tables' single spikes removed before the monotone fit
# (tables.py); 7: the cache term in bytes alone again; 8: per_mb, the weights streamed from memory, in profiles
# without warm tables; 9: the constant kept >= 0 too
DENSE_WEIGHT = 30.0  # the dense model (the first point) counts as this many models
RANKING_TABLE = {"attentive": "rank", "fused": "fuse"}  # what a dropping block pays instead of the gather
RANKINGS = tuple(RANKING_TABLE.values())
# structural counts with their own per-operator cost; "rank" and "fuse" count the drops made by a ranking in
# attentive and in fused token mode (their in-context costs differ: 24 and 48 us on the shifted set)
COUNTS = ("attn", "mlp", "gather", *RANKINGS)
FEATURES = ("fixed_shared", "fixed_cold", "fixed_warm", "tok_shared", "tok_cold", "tok_warm", "bytes", *COUNTS)
PHI_WIDTHS = (0.1, 0.25, 0.5, 1.0)  # the widths of phi's step (in ln bytes) the fit chooses from
MB = 1e6  # per_mb's unit of weight bytes


def cache_size(f: dict[str, float]) -> float:
    """What phi reads: the weight bytes (log)."""
    return float(np.log(max(f["bytes"], 1.0)))


def phi(size: float, center: float, width: float) -> float:
    """How cold the weighted pieces run (0: warm, 1: cold) at cache_size `size`."""
    z = (size - center) / max(width, 1e-6)
    return float(1.0 / (1.0 + np.exp(-np.clip(z, -50, 50))))


def calibrated(f: dict[str, float], cal: dict, has_warm: bool) -> float:
    """End-to-end ms from a model's features and a calibration (see the module's docstring)."""
    size = cache_size(f)
    cold = phi(size, cal.get("phi_center", 0.0), cal.get("phi_width", 1.0)) if has_warm else 1.0

    def part(prefix):
        return f[f"{prefix}_shared"] + f[f"{prefix}_warm"] + cold * (f[f"{prefix}_cold"] - f[f"{prefix}_warm"])
    return (cal.get("scale_fixed", 1.0) * part("fixed") + cal.get("scale_tokens", 1.0) * part("tok")
            + sum(cal.get(f"per_{k}", 0.0) * f.get(k, 0.0) for k in COUNTS) + cal.get("per_mb", 0.0) * f["bytes"] / MB
            + cal.get("beta", 0.0))



def pair_record(ranked_features: dict, static_features: dict, token_mode: str, static_ms: float,
                paired_ratio: float) -> dict:
    """A measured pair for fit_calibration: the ranked model measured `paired_ratio` times its static twin (in
    the same rounds), which measured `static_ms`."""
    return {"token_mode": token_mode, "ranked": ranked_features, "static": static_features,
            "delta_ms": static_ms * (paired_ratio - 1.0)}


def fit_calibration(points: list[dict], pairs: list[dict] | None = None) -> dict:
    """Fit measured ms against each point's features (LatencyModel.features); see the module's docstring.

    How cold the weighted pieces run, phi = sigmoid((ln bytes - center) / width), is
    chosen on a grid (the linear coefficients by weighted least squares at each grid point). A token mode with
    measured pairs (pair_record) takes its per-ranking cost from them: the median over pairs of what the ranked
    model measured above its twin, less what the rest of the fit predicts for that difference, per ranking (kept
    >= 0); the pairs' ranked points ("ranked_twin") then stay out of the least squares, and other ranked points
    enter it with that cost. Without pairs the cost is fitted with the rest."""
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
    has_warm = any(abs(f["fixed_cold"] - f["fixed_warm"]) > 1e-12 for f in feats)
    size = np.array([cache_size(f) for f in feats])
    grid = [(0.0, 1.0)]
    if has_warm:
        grid = [(c, wd) for c in np.linspace(size.min() - 0.5, size.max() + 0.5, 25) for wd in PHI_WIDTHS]
    cols = {k: np.array([[f[f"{p}_{k}"] for p in ("fixed", "tok")] for f in feats]) for k in ("shared", "cold", "warm")}
    stream = not has_warm  # per_mb: weights streamed from memory (the module's docstring)
    rest = np.array([[f.get(k, 0.0) for k in counts] + ([f["bytes"] / MB] if stream else []) + [1.0]
                     for f in feats])
    best = None
    for center, width in grid:
        cold = 1.0 / (1.0 + np.exp(-np.clip((size - center) / width, -50, 50))) if has_warm else np.ones(len(y))
        X = np.hstack([cols["shared"] + cols["warm"] + cold[:, None] * (cols["cold"] - cols["warm"]), rest])
        coef = _solve(X, y, w, len(rows))
        sse = float((((X @ coef) - y) * w) @ (((X @ coef) - y) * w))
        if best is None or sse < best[0] * (1 - 1e-9) - 1e-15:
            best = (sse, coef, center, width)
    _, coef, center, width = best
    coefs = dict(zip(counts, coef[2:2 + len(counts)]))
    return {"scale_fixed": float(coef[0]), "scale_tokens": float(coef[1]),
            **{f"per_{k}": float(coefs.get(k, known.get(f"per_{k}", 0.0))) for k in COUNTS},
            "per_mb": float(coef[-2]) if stream else 0.0,
            "beta": float(coef[-1]), "phi_center": float(center), "phi_width": float(width),
            "has_warm": has_warm}


def _solve(X: np.ndarray, y: np.ndarray, w: np.ndarray, n: int) -> np.ndarray:
    """Weighted least squares: every coefficient with enough points, else the two scales only (then one
    scale); every coefficient kept >= 0, a negative one refitted out, the most negative first (a negative cost
    is noise: on the shifted set eight ranked twins fitted -5 us a ranking, where a ranked structure measures
    24 us above its static twin and its pieces say 16 us)."""
    k = X.shape[1]
    cols = list(range(k)) if n >= k + 3 else ([0, 1] if n >= 2 else [0])
    coef = np.zeros(k)
    while True:
        coef[:] = 0.0
        coef[cols] = np.linalg.lstsq(X[:, cols] * w[:, None], y * w, rcond=None)[0]
        negative = [c for c in cols if coef[c] < 0]
        if not negative:
            return coef
        cols.remove(min(negative, key=lambda c: coef[c]))
