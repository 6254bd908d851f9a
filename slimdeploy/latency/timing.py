"""The one measurement protocol, used by profiling, the closed loop, verify, `info --latency` and the benchmarks.

1. Warm-up by time: every model is called until `warmup_s` of its calls have elapsed.
2. Interleaved rounds: in each round every model runs for `round_s` (and at least `min_calls` calls), in an
   order that rotates from round to round, so a slow phase of a shared machine hits all of them alike.
3. The result of a model is the median of its round medians, with a 95% interval for that median from the
   order statistics of the round medians (distribution-free). Ratios of two models are taken per round
   (paired: both ran in the same round), then summarised the same way.
A model may be given as several sessions (`Protocol.sessions` of the same model, loaded apart): each round
then runs each of them for its share of the round and takes the median of their medians. Where a session's
buffers land in memory moves a small model's latency by up to 6% (4 sessions of one fmnist-vit slim model,
interleaved: 230-243 us), and a single session would carry that luck into every comparison.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

# A timed call: fn() runs the model once on inputs already in place; sync() waits for it (CUDA) or is None.
Timed = tuple[Callable[[], object], Callable[[], None] | None]


@dataclass(frozen=True)
class Protocol:
    warmup_s: float
    rounds: int
    round_s: float
    min_calls: int = 3
    max_calls: int = 100_000
    sessions: int = 1  # sessions of each whole model (see above)


# Whole models (closed loop, verify, info, benchmarks): 15 rounds give a 95% interval from the 4th to the 12th.
MODEL = Protocol(warmup_s=0.5, rounds=15, round_s=0.12, min_calls=3, sessions=3)
# Re-measurement of a round whose interval was too wide to decide on.
MODEL_LONG = Protocol(warmup_s=0.5, rounds=31, round_s=0.12, min_calls=3, sessions=3)
# A paired ratio whose 95% interval is wider than this (relative half-width) is too noisy to decide on: it is
# measured again with MODEL_LONG (measured_steadily; the closed loop does the same near its target).
WIDE = 0.02
# Profiling components: thousands of small graphs, so fewer and shorter rounds.
COMPONENT = Protocol(warmup_s=0.01, rounds=4, round_s=0.003, min_calls=3, max_calls=2000)
# Whole models measured while profiling (calibration). One call a session and round at least: a model slower
# than a round's share (deit_small on one CPU thread: 96 ms) makes one call of it anyway, and two doubled the
# calibration's time for such models (27 calls a model, not 54), with the round medians as tight.
CALIBRATION = Protocol(warmup_s=0.2, rounds=9, round_s=0.06, min_calls=1, sessions=3)


@dataclass
class Measurement:
    """Latency of one call in ms: the median of round medians, with its 95% interval."""

    median_ms: float
    low_ms: float
    high_ms: float
    rounds: int
    calls: int
    round_ms: list[float] = field(default_factory=list)

    @property
    def rel_halfwidth(self) -> float:
        """Half the 95% interval relative to the median (0.02 = +-2%)."""
        return (self.high_ms - self.low_ms) / 2 / self.median_ms if self.median_ms > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "rel_halfwidth": self.rel_halfwidth}

    @classmethod
    def from_values(cls, values: list[float], calls: int) -> Measurement:
        lo, hi = median_interval(values)
        return cls(median(values), lo, hi, len(values), calls, [round(v, 6) for v in values])


def median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free interval for the median: order statistics k and n+1-k (1-based), with k the largest
    such that P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2. With fewer than 6 values: min and max."""
    s = sorted(values)
    n = len(s)
    if n == 0:
        raise ValueError("no values")
    tail = (1 - confidence) / 2
    k, cdf = 0, 0.0
    while k < n // 2:
        p = math.comb(n, k) / 2 ** n  # P(X = k)
        if cdf + p > tail:
            break
        cdf += p
        k += 1
    if k == 0:
        return s[0], s[-1]
    return s[k - 1], s[n - k]


def measure(timed: Mapping[str, Timed | list[Timed]], protocol: Protocol = MODEL) -> dict[str, Measurement]:
    """Time every model in `timed` (a call, or a list of calls: sessions of one model) by the protocol; returns
    a Measurement per name."""
    names = list(timed)
    if not names:
        return {}
    groups = {n: t if isinstance(t, list) else [t] for n, t in timed.items()}
    clock = time.perf_counter
    for name in names:  # warm-up by time
        for fn, sync in groups[name]:
            start = clock()
            while True:
                fn()
                if sync:
                    sync()
                if clock() - start >= protocol.warmup_s / len(groups[name]):
                    break
    per_round: dict[str, list[float]] = {n: [] for n in names}
    calls = dict.fromkeys(names, 0)
    for r in range(protocol.rounds):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            share = protocol.round_s / len(groups[name])
            medians = []
            for fn, sync in groups[name]:
                samples: list[float] = []
                start = clock()
                while len(samples) < protocol.max_calls and (len(samples) < protocol.min_calls
                                                              or clock() - start < share):
                    t = clock()
                    fn()
                    if sync:
                        sync()
                    samples.append(clock() - t)
                medians.append(median(samples))
                calls[name] += len(samples)
            per_round[name].append(median(medians) * 1e3)
    return {n: Measurement.from_values(per_round[n], calls[n]) for n in names}


def ratio(a: Measurement, b: Measurement) -> Measurement:
    """a / b from paired rounds (both measured in one `measure` call), with its 95% interval."""
    if len(a.round_ms) != len(b.round_ms) or not a.round_ms:
        raise ValueError("a ratio needs two measurements from the same interleaved rounds")
    return Measurement.from_values([x / y for x, y in zip(a.round_ms, b.round_ms)], min(a.calls, b.calls))


def measured_steadily(measure: Callable[[Protocol], dict[str, Measurement]], slim: str = "slim",
                      dense: str = "dense") -> tuple[dict[str, Measurement], Protocol]:
    """measure(MODEL); where the paired ratio slim / dense came out wider than WIDE (a noisy minute of a shared
    machine), measure(MODEL_LONG) as well, and keep the one whose ratio is narrower. Returns it with its
    protocol. A Zen 5 EPYC's verify read a 0.3x structure 15% slower than the loop once, where four more
    readings agreed with the loop within 0.6% (benchmarks/RESULTS.md)."""
    t = measure(MODEL)
    first = ratio(t[slim], t[dense]).rel_halfwidth
    if first <= WIDE:
        return t, MODEL
    again = measure(MODEL_LONG)
    return (again, MODEL_LONG) if ratio(again[slim], again[dense]).rel_halfwidth < first else (t, MODEL)
