"""The closed loop: prune, export and measure the chosen family's structures on the device; refine until a
measurement lands in [0.9, 1.0] x target.

Each round solves the structure at six budgets around the aim (BRACKET), one a little over it and four under, and
measures the distinct ones interleaved with the dense model, in one measurement (the one protocol). Near small
structures, where fixed per-operator costs dominate, the latency model errs on one side for a given CPU (on a
2-core Xeon it underpredicts them by up to ~20%; on a 2-core EPYC it overpredicts them by 2-9%), so a bracket
usually holds a structure in the window in the first round, where a single structure needs a second.
The latency model is refitted from every measurement so far, the dense model's first (measured = a * predicted +
b: a scale with one point, a line through them with more), not rescaled blindly, and the next round is solved on
the refitted model; the budget stays bracketed between the best structures measured under and over the target
(bisected when a refit would leave the bracket).
A structure whose interval is wide near the target is measured again, longer, before it is judged. A structure
that lands in the window is confirmed by a second, longer measurement with fresh sessions (as verify measures
it: placement of a session's memory moves small models by several percent); it is kept only if both intervals
are under the target (a confirmation with a wide interval and its median under the target is made once more,
and the second decides). Of the structures that land, the one nearest AIM is confirmed, not the largest: two
measurements of one model differ by up to ~5% on a shared CPU, and verify measures it again. When the
confirmation refuses it, the next one that landed in the round and measured faster is confirmed (one that
measured slower would be refused too; measured on a Xeon: the one round of seven that needed a second had a
structure at 0.92 x target beside the refused one). The structure kept
is the confirmed one, else the one nearest the target from below whose 95% interval is under it; `met` is
decided on that interval. A confirmed structure's latency is reported from its confirmation: the longer
measurement, with fresh sessions, is the one verify repeats.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import SlimError
from ..latency import timing
from ..latency.model import LatencyModel, spec_sizes
from ..progress import log
from ..types import SlimSpec

WINDOW = (0.9, 1.0)  # accepted measured / target
AIM = 0.95  # where a round aims inside the window
BRACKET = (1.05, 1.0, 0.95, 0.9, 0.85, 0.8)  # a round's budgets, x AIM x target. Measured on a 2-core Xeon,
# fmnist-vit: one budget landed 2 of 7 first rounds in the window (0.96-1.16 x target); three 8% apart, 5 of 7 (a
# budget step of 8% moved the small structures' latency by up to 12%, over the window's width); four 5% apart, 7, 7
# and 6 of 7 (the miss: at 0.4x every structure measured 1.22 x its budget, so the lowest, 0.81 x target, measured
# 0.99 with an interval over the target); the fifth (0.8) reaches a structure that is 20% slower than the model
# says. On a 2-core EPYC (2026-12-02) the refitted model priced the 0.3x and 0.4x structures 6-8% too slow, so the
# top budget's landed at 0.89 and 0.87 x target and those targets took a second round: the first (1.05, the target
# itself) reaches a structure that is up to 10% faster than the model says
MIN_SCALE, MAX_SCALE = 0.25, 4.0

# measure(specs, long) -> (dense, [slim per spec]), all from one interleaved measurement
Measure = Callable[[list[SlimSpec], bool], tuple[timing.Measurement, list[timing.Measurement]]]
# solve(latency_model, budget_ms) -> spec or None
Solve = Callable[[LatencyModel, float], SlimSpec | None]


@dataclass
class LoopResult:
    spec: SlimSpec
    measured: list[dict]  # every structure measured, in order, each with its round
    chosen: int  # index into measured
    met: bool
    measured_ms: float
    measured_high_ms: float
    target_ms: float
    dense_ms: float
    over_dense: float  # the kept structure's measured ratio to the dense model
    refit: dict = field(default_factory=dict)

    @property
    def rounds(self) -> int:
        return max(row["round"] for row in self.measured)

    @property
    def chosen_round(self) -> int:
        return self.measured[self.chosen]["round"]


def dense_reference(measure: Measure, dense_spec: SlimSpec) -> tuple[float, float]:
    """(the dense reference, the dense model as deployed), in ms, from one interleaved measurement.

    Where both run at one precision (a measure with `one_precision` true, as SpecMeasurer at fp32), they are two
    readings of the dense structure, and both are given as their geometric mean. Where a small model's sessions
    land in memory moves its reading by several percent: on a 2-core EPYC the two read 0.92-1.07 of each other
    (fmnist-vit, 28 loop targets in four runs, 2026-12-01 to 03), and the first round is solved on the model
    scaled by the deployed reading, so a reading 6% high put every structure of the 0.8x target's first round
    under the window (the top one at 0.89 x target). Two readings halve that variance; the target, a fraction of
    the same dense model, takes the same mean."""
    ref, (deployed,) = measure([dense_spec], False)
    if getattr(measure, "one_precision", False):
        both = math.sqrt(ref.median_ms * deployed.median_ms)
        return both, both
    return ref.median_ms, deployed.median_ms


def refit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """measured = a * predicted + b from (predicted, measured) points: a scale through the origin with one point
    (or points at one prediction), a least-squares line with more; a stays in [MIN_SCALE, MAX_SCALE]."""
    p = np.array([x for x, _ in points])
    m = np.array([y for _, y in points])
    if len(points) >= 2 and np.ptp(p) > 0.01 * p.mean():
        a, b = np.polyfit(p, m, 1)
        if MIN_SCALE <= a <= MAX_SCALE:
            return float(a), float(b)
    a = float(np.clip((m / p).mean(), MIN_SCALE, MAX_SCALE))
    return a, 0.0


def closed_loop(solve: Solve, lm: LatencyModel, measure: Measure, dense_spec: SlimSpec, target_ms: float | None,
                fraction: float | None, rounds: int = 4, dense: tuple[float, float] | None = None,
                window: tuple[float, float] = WINDOW, aim: float = AIM,
                bracket: tuple[float, ...] = BRACKET) -> LoopResult:
    """Run the loop for an absolute target (target_ms) or a fraction of the dense model's measured latency.

    dense: (the dense reference in ms, the dense model at the deployment precision in ms), measured here unless
    given; they differ when deploying int8 against an fp32 reference. The second is the first point of the
    refit: it says how fast the machine runs now against the profile (a shared machine drifts by several
    percent over minutes). bracket: the budgets of a round, as multiples of aim x target."""
    dense_ms, deploy_ms = dense or dense_reference(measure, dense_spec)
    target = target_ms if target_ms is not None else fraction * dense_ms
    rows: list[dict] = []
    specs: list[SlimSpec] = []
    points: list[tuple[float, float]] = [(lm.predict(dense_spec), deploy_ms)]
    model = lm.corrected(*refit(points))
    for r in range(max(1, rounds)):
        budgets = [k * aim * target for k in bracket]
        batch = _round_specs(solve, model, lm, budgets, *_bracket(rows, window), specs)
        if not batch:
            if not rows:
                raise SlimError(f"this rule cannot reach {target:.4g} ms on the profile's model: raise the target")
            break
        measured = _measure_specs(measure, [s for s, _ in batch], dense_ms, fraction, target, window)
        for (spec, budget), row in zip(batch, measured):
            pred = lm.predict(spec)
            row.update(round=r + 1, budget_ms=budget, predicted_ms=pred, predicted_refit_ms=model.predict(spec),
                       sizes=[list(s) for s in spec_sizes(spec)],
                       embed=spec.embed_dim, token_mode=spec.token_mode)
            rows.append(row)
            specs.append(spec)
            log(f"select: round {r + 1}: predicted {row['predicted_refit_ms']:.3f} ms, measured "
                f"{row['measured_ms']:.3f} ms ({100 * row['y']:.1f}% of target, 95% interval up to "
                f"{100 * row['y_high']:.1f}%)")
            points.append((pred, row["measured_ms"]))
        landed = [i for i in range(len(rows) - len(measured), len(rows))
                  if rows[i]["y"] >= window[0] and rows[i]["y_high"] <= window[1]]
        # the one nearest AIM first (the margin for the next measurement); when fresh sessions refuse it, the
        # next one that landed and measured faster is confirmed before another round is solved
        landed.sort(key=lambda i: abs(rows[i]["y"] - aim))
        if _confirm_in_turn(landed, lambda i: _confirm(measure, rows[i], specs[i], dense_ms, fraction, target,
                                                        window, points), rows):
            break
        model = lm.corrected(*refit(points))
    met = [i for i, r in enumerate(rows) if r["y_high"] <= window[1]]
    below = [i for i, r in enumerate(rows) if r["y"] <= window[1]]
    confirmed = [i for i in met if rows[i].get("confirmed")]
    if confirmed:
        chosen = confirmed[-1]
    elif met:
        chosen = max(met, key=lambda i: rows[i]["y"])
    elif below:
        chosen = max(below, key=lambda i: rows[i]["y"])
    else:
        chosen = min(range(len(rows)), key=lambda i: rows[i]["y"])
    a, b = refit(points)
    best = rows[chosen]
    kept = best.get("confirmation", best)  # the longer measurement with fresh sessions, as verify makes it
    return LoopResult(spec=specs[chosen], measured=rows, chosen=chosen, met=best["y_high"] <= window[1],
                      measured_ms=kept["measured_ms"], measured_high_ms=kept["measured_high_ms"], target_ms=target,
                      dense_ms=dense_ms, over_dense=kept["over_dense"],
                      refit={"a": a, "b": b, "points": [list(p) for p in points]})


def _bracket(rows: list[dict], window: tuple[float, float]) -> tuple[float | None, float | None]:
    """Predicted ms of the best structure measured under the target and of the best over it."""
    under = max((r for r in rows if r["y_high"] <= window[1]), key=lambda r: r["y"], default=None)
    over = min((r for r in rows if r["y_high"] > window[1]), key=lambda r: r["y"], default=None)
    return (under["predicted_ms"] if under else None, over["predicted_ms"] if over else None)


def _confirm_in_turn(landed: list[int], confirm: Callable[[int], bool], rows: list[dict]) -> bool:
    """Confirm the landed structures in the order given until one holds; after a refusal, only those that measured
    faster than the refused one (a slower one would be refused too)."""
    ceiling = float("inf")
    for i in landed:
        if rows[i]["y"] < ceiling:
            if confirm(i):
                return True
            ceiling = rows[i]["first_measurement"]["y"]
    return False


def _confirm(measure: Measure, row: dict, spec: SlimSpec, dense_ms: float, fraction: float | None, target: float,
             window: tuple[float, float], points: list[tuple[float, float]]) -> bool:
    """Measure the structure that landed once more, with fresh sessions of it and of the dense model and the
    long protocol, as verify will: it is kept only if this interval is under the target too. A structure that
    fails takes the confirmation's numbers (the later, longer measurement), so it is not kept after all.
    A confirmation whose median is under the target but whose interval is wide (a noisy minute, not a slow
    structure) is made once more, and the second decides: on a Zen 5 EPYC a 0.4x structure that had landed at
    0.912 x target confirmed at 0.911, its interval up to 1.014, and cost the loop a second round."""
    (again,) = _rows(measure, [spec], dense_ms, fraction, target, long=True)
    points.append((row["predicted_ms"], again["measured_ms"]))
    if again["y_high"] > window[1] >= again["y"] and again["y_halfwidth"] > timing.WIDE:
        log(f"select: confirmed with fresh sessions: {100 * again['y']:.1f}% of target, a wide interval (up to "
            f"{100 * again['y_high']:.1f}%): measured again")
        (again,) = _rows(measure, [spec], dense_ms, fraction, target, long=True)
        points.append((row["predicted_ms"], again["measured_ms"]))
    ok = again["y_high"] <= window[1]
    log(f"select: confirmed with fresh sessions: {100 * again['y']:.1f}% of target, 95% interval up to "
        f"{100 * again['y_high']:.1f}%" + ("" if ok else ": over the target, not kept"))
    first = {k: row[k] for k in ("measured_ms", "measured_low_ms", "measured_high_ms", "over_dense", "y", "y_high")}
    if ok:
        row["confirmation"] = {k: again[k] for k in first}
    else:
        row.update({k: again[k] for k in first}, first_measurement=first)
    row["confirmed"] = ok
    return ok


def _round_specs(solve: Solve, model: LatencyModel, lm: LatencyModel, budgets: list[float],
                 under: float | None, over: float | None, seen: list[SlimSpec]
                 ) -> list[tuple[SlimSpec, float]]:
    """The round's distinct structures, not measured before, with their budgets. The first budget's structure is
    replaced by the bisection of the bracket when the refit would leave it."""
    out: list[tuple[SlimSpec, float]] = []
    for i, budget in enumerate(budgets):
        spec = solve(model, budget)
        if i == 0 and spec is not None and under and over and not under < lm.predict(spec) < over:
            budget = 0.5 * (under + over)
            spec = solve(lm, budget)  # the refit left the bracket: bisect it instead
        if spec is not None and spec not in seen and all(spec != s for s, _ in out):
            out.append((spec, budget))
    return out


def _measure_specs(measure: Measure, specs: list[SlimSpec], dense_ms: float, fraction: float | None,
                   target: float, window: tuple[float, float]) -> list[dict]:
    """One interleaved measurement of the structures and dense; the ones whose interval is wide near the target
    are measured again, longer, together."""
    rows = _rows(measure, specs, dense_ms, fraction, target, long=False)
    again = [i for i, row in enumerate(rows)
             if window[0] - 0.05 <= row["y"] <= window[1] + 0.05 and row["y_halfwidth"] > timing.WIDE]
    if again:
        longer = _rows(measure, [specs[i] for i in again], dense_ms, fraction, target, long=True)
        for i, row in zip(again, longer):
            rows[i] = {**row, "remeasured": True}
    return rows


def _rows(measure: Measure, specs: list[SlimSpec], dense_ms: float, fraction: float | None, target: float,
          long: bool) -> list[dict]:
    """One interleaved measurement of the structures and dense; for a relative target the paired ratio to dense
    decides (expressed in ms of the first dense measurement, so that rounds compare)."""
    dense, slims = measure(specs, long)
    rows = []
    for slim in slims:
        ratio = timing.ratio(slim, dense)
        if fraction is not None:
            ms, lo, hi = (ratio.median_ms * dense_ms, ratio.low_ms * dense_ms, ratio.high_ms * dense_ms)
        else:
            ms, lo, hi = slim.median_ms, slim.low_ms, slim.high_ms
        rows.append({"measured_ms": ms, "measured_low_ms": lo, "measured_high_ms": hi, "slim_ms": slim.median_ms,
                     "dense_ms": dense.median_ms, "over_dense": ratio.median_ms, "y": ms / target,
                     "y_high": hi / target, "y_halfwidth": (hi - lo) / 2 / ms, "rounds": slim.rounds,
                     "remeasured": False})
    return rows
