"""How a profile table is made from its measurements: single spikes removed, then made monotone.

A piece timed while the shared machine was busy for a moment reads high. The isotonic fit alone pools such a
reading with its neighbours and lifts every width above it: on a 2-core Zen 5 EPYC (2026-12-03) fmnist-vit's MLP
at 2 tokens read 7.5, 11.5, 8.2 and 8.9 us at 416-512 units, and the pooled 9.0 us priced 480 units 10% high,
exactly where the solver's picks go (every channel, few tokens). A median of three along each axis first removes
such a spike and leaves any monotone run as it is (the median of three ordered values is the middle one), so a
real step survives. Refitted from stored measurements (benchmarks/calibration_loo.py at the commit before and
after this one): deit_small's random specs on that machine from 3.3% to 1.0% median error, its solver's picks
from 5.6% to 4.1% at worst; an older EPYC's fmnist-vit leave-one-out from 2.7 / 6.2% to 1.9 / 4.4% (median / p90).
"""

from __future__ import annotations

import numpy as np


def isotonic(values: np.ndarray) -> np.ndarray:
    """Least-squares non-decreasing fit (pool adjacent violators) along the last axis."""
    out = np.array(values, dtype=np.float64)
    flat = out.reshape(-1, out.shape[-1])
    for row in flat:
        merged: list[list[float]] = []
        for v in row:
            merged.append([float(v), 1])
            while len(merged) > 1 and merged[-2][0] > merged[-1][0]:
                v2, n2 = merged.pop()
                v1, n1 = merged.pop()
                merged.append([(v1 * n1 + v2 * n2) / (n1 + n2), n1 + n2])
        row[:] = np.concatenate([[v] * int(n) for v, n in merged])
    return out


def monotone(ms: np.ndarray) -> np.ndarray:
    """Non-decreasing along every axis (more tokens, heads or channels never cost less)."""
    for ax in range(ms.ndim):
        ms = np.moveaxis(isotonic(np.moveaxis(ms, ax, -1)), -1, ax)
    return ms


def despike(ms: np.ndarray) -> np.ndarray:
    """Each inner entry replaced by the median of itself and its two neighbours, along each axis in turn (the ends
    kept): a single high or low reading goes, a monotone run stays."""
    out = np.array(ms, dtype=np.float64)
    for ax in range(out.ndim):
        a = np.moveaxis(out, ax, -1)
        if a.shape[-1] >= 3:
            a = a.copy()
            a[..., 1:-1] = np.median(np.stack([a[..., :-2], a[..., 1:-1], a[..., 2:]]), axis=0)
        out = np.moveaxis(a, -1, ax)
    return out


def smoothed(raw) -> np.ndarray:
    """What the latency model reads of a table measured as `raw`."""
    return monotone(despike(np.asarray(raw, dtype=np.float64)))
