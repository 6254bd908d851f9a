"""The latency model, the timing protocol, fingerprints and profiling, on synthetic profiles and tiny models."""

from __future__ import annotations

import copy
import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from slimdeploy.errors import SlimError
from slimdeploy.latency import timing
from slimdeploy.latency.calibration import FIT, fit_calibration
from slimdeploy.latency.model import LatencyModel, Table, fingerprint_warning, resolve_profile, spec_sizes
from slimdeploy.latency.profile import token_grid, width_grid
from slimdeploy.latency.tables import despike, isotonic, monotone, smoothed
from slimdeploy.models import arch_of
from slimdeploy.types import DeviceProfile, ModelConfig, SlimSpec

from .conftest import random_spec, tiny_model
from .synthetic import staircase_profile, wide_arch


def test_table_is_linear_in_tokens_and_in_widths_past_the_tile():
    t = Table({"axes": ["tokens", "w"], "grid": {"tokens": [10, 20], "w": [8, 16, 24, 56]},
               "ms": [[1.0, 2.0, 3.0, 7.0], [3.0, 4.0, 5.0, 9.0]]}, tile=8)
    assert t(10, 8) == 1.0 and t(20, 24) == 5.0
    assert t(15, 16) == pytest.approx(3.0)  # halfway in tokens
    assert t(10, 9) == 2.0 and t(10, 16) == 2.0 and t(10, 17) == 3.0  # padded to the tile: pays the next step
    assert t(10, 40) == pytest.approx(5.0)  # half way between 24 and 56, grid points four tiles apart
    assert t(10, 26) == pytest.approx(4.0)  # padded to 32 first: a quarter of the way
    assert t(15, 40) == pytest.approx(6.0)  # both at once
    assert t(10, 1) == 1.0 and t(10, 64) == 7.0  # outside the widths measured: the nearest entry
    kept = Table({"axes": ["tokens", "kept"], "grid": {"tokens": [10, 20], "kept": [2, 5, 15, 40]},
                  "ms": [[1.0, 2.0, 3.0, 8.0], [1.0, 2.0, 3.0, 8.0]]}, tile=8)
    assert kept(10, 17) == pytest.approx(3.4)  # a count of tokens is not padded to the tile
    # below the grid the fixed cost stays: linear extrapolation, not a scaling to zero
    assert t(5, 8) == pytest.approx(0.0) and t(8, 24) == pytest.approx(2.6)
    with pytest.raises(SlimError, match="NaN or negative"):
        Table({"axes": ["tokens"], "grid": {"tokens": [1, 2]}, "ms": [0.1, float("nan")]})
    with pytest.raises(SlimError, match="NaN or negative"):
        Table({"axes": ["tokens"], "grid": {"tokens": [1, 2]}, "ms": [0.1, -1.0]})


def test_a_matmul_table_is_read_as_a_line_in_width_where_its_grid_is_coarse():
    """Where the width grid turns coarse, a matmul's entries (each a piece timed in a few ms) are replaced by their
    least-squares line at each token count; the fine part is read as measured."""
    widths = [8, 16, 128, 256, 384, 512]
    line = [0.1 + 0.01 * w for w in widths]
    noisy = [[v * (1 + e) for v, e in zip(line, (0.05, -0.05, 0.2, -0.2, 0.2, -0.1))], line]
    d = {"axes": ["tokens", "hidden"], "grid": {"tokens": [5, 17], "hidden": widths}, "ms": noisy}
    t = Table(d, tile=8, affine_from=128)
    assert t(5, 8) == pytest.approx(noisy[0][0]) and t(5, 16) == pytest.approx(noisy[0][1])  # the fine part
    coarse = np.array(widths[2:], dtype=float)
    slope, icpt = np.polyfit(coarse, noisy[0][2:], 1)
    assert [t(5, w) for w in widths[2:]] == pytest.approx(list(icpt + slope * coarse))
    assert [t(17, w) for w in widths[2:]] == pytest.approx(line[2:])  # a line stays itself
    assert Table(d, tile=8)(5, 256) == pytest.approx(noisy[0][3])  # without it: as measured
    prof = DeviceProfile.load(resolve_profile("xeon-2c-ort1t-b1-deit_small"))  # the MLP grid reaches 1536
    lm, stored = LatencyModel(prof), smoothed(prof.tables["mlp"]["raw_ms"])  # what the model reads (tables.py)
    fine = np.array(prof.tables["mlp"]["grid"]["hidden"]) < 16 * prof.model["step"]
    assert np.array_equal(lm.tables["mlp"].ms[:, fine], stored[:, fine])
    assert not np.allclose(lm.tables["mlp"].ms[:, ~fine], stored[:, ~fine])  # measured entries are not a line
    assert np.array_equal(lm.tables["rest"].ms, smoothed(prof.tables["rest"]["raw_ms"]))  # not a matmul


def _features_by_hand(lm: LatencyModel, spec: SlimSpec) -> float:
    """The model's formula written out: stem + per block (gather, both branches), uncalibrated."""
    t = lm.tables
    tot, prev = lm.stem_head(spec.blocks[-1].num_tokens), spec.arch.num_tokens
    for b in spec.blocks:
        n, h, q, v, m = b.num_tokens, b.num_heads, b.qk_dim, b.v_dim, b.mlp_dim
        tot += t["gather"](n) if n < prev else 0.0
        if h:
            core = t["core_q"](n, h, q) + t["core_v"](n, h, v) - t["core_q"](n, h, spec.arch.head_dim)
            tot += t["rest"](n) + t["qkv"](n, h * (2 * q + v)) + core + t["proj"](n, h * v)
        else:
            tot += t["const"](n)
        tot += t["rest"](n) + t["mlp"](n, m) if m else t["const"](n)
        prev = n
    return tot


def test_predict_is_the_calibrated_sum_of_the_pieces():
    model = tiny_model("t-cls")
    a = arch_of(model)
    prof = staircase_profile(a)
    prof.calibration = {"scale_fixed": 1.3, "scale_tokens": 0.9, "per_attn": 0.002, "per_mlp": 0.001,
                        "per_gather": 0.003, "beta": 0.01}
    lm = LatencyModel(prof)
    spec = random_spec(model, 3, force="no-heads")
    f = lm.features([(b.num_tokens, b.num_heads, b.qk_dim, b.v_dim, b.mlp_dim) for b in spec.blocks], a.num_tokens)
    assert f["fixed_shared"] + f["fixed_cold"] + f["tok_shared"] + f["tok_cold"] == pytest.approx(
        _features_by_hand(lm, spec))
    counts = {"attn": sum(b.num_heads > 0 for b in spec.blocks), "mlp": sum(b.mlp_dim > 0 for b in spec.blocks)}
    gathers = sum(b.num_tokens < p for p, b in zip([a.num_tokens] + [x.num_tokens for x in spec.blocks], spec.blocks))
    assert f["attn"] == counts["attn"] and f["mlp"] == counts["mlp"] and f["gather"] == gathers
    expected = (1.3 * (f["fixed_shared"] + f["fixed_cold"]) + 0.9 * (f["tok_shared"] + f["tok_cold"])
                + 0.002 * counts["attn"] + 0.001 * counts["mlp"] + 0.003 * gathers + 0.01)
    assert lm.predict(spec) == pytest.approx(expected)
    dense = SlimSpec.dense(ModelConfig("t-cls"), a)
    assert lm.predict(spec) < lm.predict(dense)


def test_a_block_that_drops_tokens_pays_the_gather():
    model = tiny_model("t-cls")
    a = arch_of(model)
    lm = LatencyModel(staircase_profile(a, fixed=0.01))
    sizes = [(a.num_tokens, a.num_heads, a.head_dim, a.head_dim, a.mlp_dim)] * a.depth
    dropped = [sizes[0], (a.num_tokens - 4, *sizes[0][1:]), (a.num_tokens - 4, *sizes[0][1:])]
    f = lm.features(dropped, a.num_tokens)
    assert f["gather"] == 1  # block 1 gathers; block 2 keeps what it gets
    gather = lm.tables["gather"](a.num_tokens - 4)
    shrink = [lm.block_raw(a.num_tokens, a.num_tokens, *sizes[0][1:])[0] - lm.block_raw(
        a.num_tokens, a.num_tokens - 4, *sizes[0][1:])[0] for _ in range(2)]
    assert gather > 0 and all(s > 0 for s in shrink)


def test_isotonic_removes_noise_but_keeps_steps():
    noisy = np.array([1.0, 1.02, 0.99, 1.01, 2.0, 1.98, 2.01])
    fit = isotonic(noisy)
    assert (np.diff(fit) >= 0).all()
    assert fit[3] < 1.1 and fit[4] > 1.9  # the step is still there
    grid = monotone(np.array([[1.0, 0.9], [0.8, 2.0]]))
    assert (np.diff(grid, axis=0) >= 0).all() and (np.diff(grid, axis=1) >= 0).all()


def test_a_single_slow_reading_does_not_lift_the_widths_above_it():
    # fmnist-vit's MLP at 2 tokens on a Zen 5 EPYC (us): one reading of four spiked
    raw = np.array([7.0, 7.5, 11.5, 8.2, 8.9])
    assert isotonic(raw)[3] > 9.0  # pooled with the spike: 8.2 read as 9.5
    assert smoothed(raw).tolist() == pytest.approx([7.0, 7.5, 8.2, 8.9, 8.9])
    # a monotone run, steps included, is its own median of three: nothing moves
    step = np.array([[1.0, 1.0, 2.0, 2.1, 4.0], [1.1, 1.2, 2.2, 2.3, 4.1], [1.5, 1.6, 2.9, 3.0, 5.0]])
    assert np.array_equal(despike(step), step) and np.array_equal(smoothed(step), step)
    # a spike along the token axis goes too
    tokens = np.array([[1.0, 2.0], [5.0, 6.0], [1.2, 2.2], [1.4, 2.4]])
    assert smoothed(tokens)[:, 0].tolist() == pytest.approx([1.0, 1.2, 1.4, 1.4])


def test_the_model_reads_a_table_from_its_measurements():
    t = copy.deepcopy(staircase_profile(wide_arch()).tables["mlp"])
    raw = np.array(t["ms"], dtype=np.float64)
    raw[0, len(raw[0]) // 2] *= 3  # one slow reading, as measured
    stored = {**t, "ms": monotone(raw).tolist(), "raw_ms": raw.tolist()}  # smoothed as before tables.py
    read = Table(stored).ms
    assert np.allclose(read, smoothed(raw)) and not np.allclose(read, monotone(raw))
    assert np.allclose(Table({k: v for k, v in stored.items() if k != "raw_ms"}).ms, monotone(raw))


def test_ranking_tables_hold_what_was_timed_and_refuse_a_missing_entry():
    from slimdeploy.latency.calibration import RANKINGS
    from slimdeploy.latency.profile import assemble, jobs_for

    a = arch_of(tiny_model("t-cls"))
    jobs, grids = jobs_for(a, 8, 6)
    cache = {"/".join(map(str, j)): (1.0, 1.0) for j in jobs}
    for j in jobs:
        if j[0] in RANKINGS:
            cache["/".join(map(str, j))] = (j[1] * 1000.0 + j[2], 0.0)
    name, p = RANKINGS[0], a.num_prefix_tokens
    raw = np.array(assemble(cache, grids, False, p)[name]["raw_ms"])
    ns, nin = grids["tokens"], grids["tokens_coarse"]
    for i, n_in in enumerate(nin[1:], 1):
        timed = [n for n in ns if p < n < n_in]
        for j, n in enumerate(ns):
            kept = min(max(n, timed[0]), timed[-1])  # the prefix alone as one patch; at most what it gets
            assert raw[i, j] == n_in * 1000.0 + kept
    assert np.array_equal(raw[0], raw[1])  # the fewest tokens in rank nothing: the next row's
    cache.pop(f"{name}/{nin[-1]}/{ns[2]}")
    with pytest.raises(KeyError):  # an entry jobs_for times is never filled in from its neighbour
        assemble(cache, grids, False, p)


def test_grids_cover_the_few_token_region_and_end_at_the_full_width():
    a = arch_of(tiny_model("t-cls"))
    ns = token_grid(a, 6)
    # the prefix alone (where the solver drops every patch), one patch, ..., every token
    assert ns[:2] == [a.num_prefix_tokens, a.num_prefix_tokens + 1] and ns[-1] == a.num_tokens
    assert ns == sorted(set(ns))
    no_prefix = replace(a, num_prefix_tokens=0, num_tokens=a.num_tokens - 1)
    assert token_grid(no_prefix, 6)[0] == 1  # a model without prefix tokens keeps one patch at least
    assert width_grid(512, 8)[:16] == list(range(8, 136, 8)) and width_grid(512, 8)[-1] == 512
    assert width_grid(100, 8)[-1] == 100 and width_grid(4, 8) == [4]
    g = np.array(width_grid(1536, 8))
    rel = np.diff(g) / g[1:]
    assert rel[g[1:] > 128].max() <= 0.125 + 1e-9  # beyond 16 steps, at most 1/8 of the width between widths


def _cal_points(truth: dict, rng, n: int = 24, warm: bool = False) -> list[dict]:
    from slimdeploy.latency.calibration import calibrated

    pts = []
    for _ in range(n):
        f = {"fixed_shared": rng.uniform(0.01, 0.1), "fixed_cold": rng.uniform(0.05, 0.5),
             "tok_shared": rng.uniform(0.0, 0.1), "tok_cold": rng.uniform(0.0, 0.6), "bytes": rng.uniform(1e5, 1e7),
             "attn": float(rng.integers(0, 7)), "mlp": float(rng.integers(0, 7)), "gather": float(rng.integers(0, 4))}
        f["rank"] = float(rng.integers(0, f["gather"] + 1))  # a ranking is a gather chosen by scores
        f["fuse"] = 0.0
        f["fixed_warm"] = f["fixed_cold"] * (0.5 if warm else 1.0)
        f["tok_warm"] = f["tok_cold"] * (0.8 if warm else 1.0)
        pts.append({"features": f, "measured_ms": calibrated(f, truth, warm)})
    return pts


def test_calibration_fit_recovers_its_coefficients():
    truth = {"scale_fixed": 1.2, "scale_tokens": 0.85, "per_attn": 0.004, "per_mlp": 0.002, "per_gather": 0.003,
             "per_rank": 0.009, "per_mb": 0.01, "beta": 0.02}
    cal = fit_calibration(_cal_points(truth, np.random.default_rng(0)))
    for k, v in truth.items():
        assert cal[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    assert cal["fit_max_abs_error"] < 1e-9
    # a cost fitted below zero is noise: it is left out, not allowed to make models faster
    cal = fit_calibration(_cal_points({**truth, "per_rank": -0.004}, np.random.default_rng(3)))
    assert cal["per_rank"] == 0.0 and cal["scale_fixed"] > 0
    cal = fit_calibration(_cal_points({**truth, "per_mlp": -0.003}, np.random.default_rng(3)))
    assert cal["per_mlp"] == 0.0 and cal["per_attn"] > 0 and cal["scale_fixed"] > 0
    # a cold/warm crossover is found on the grid: models above ~1 MB of weights run cold
    # (with warm tables phi says how cold the weights run, and no memory streaming is fitted)
    truth = {**truth, "phi_center": float(np.log(1e6)), "phi_width": 0.25, "per_mb": 0.0}
    pts = _cal_points(truth, np.random.default_rng(1), n=40, warm=True)
    cal = fit_calibration(pts)
    assert cal["fit_median_abs_error"] < 0.01
    assert abs(cal["phi_center"] - truth["phi_center"]) < 0.5
    assert cal["per_mb"] == 0.0
    # with few points: the two scales only
    few = _cal_points({"scale_fixed": 1.1, "scale_tokens": 0.9}, np.random.default_rng(2), n=4)
    cal = fit_calibration(few)
    assert cal["scale_fixed"] == pytest.approx(1.1) and cal["scale_tokens"] == pytest.approx(0.9)
    assert cal["per_attn"] == 0.0 and cal["beta"] == 0.0


RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def _errors_against_dense(lm: LatencyModel, rows: list[dict]) -> list[float]:
    """Each stored fidelity row's predicted ratio to the dense model against its measured one, minus 1."""
    from slimdeploy.latency.model import point_sizes

    dense = lm.predict_sizes(lm.dense_sizes())
    return [lm.predict_sizes(*point_sizes(r)) / dense / r["measured_over_dense"] - 1 for r in rows]


def test_a_model_keeping_its_weights_and_few_tokens_is_priced_by_its_bytes():
    """Measured on a Zen 5 EPYC (benchmarks/RESULTS.md): the calibration's small models with one token run warm,
    and a cache term scaled by the kept token fraction extrapolated that to the solver's 0.3x picks, which keep
    3.4 MB of weights and 1-2 of 17 tokens in every block; it priced them 6-9% fast. By their bytes they are
    priced within 5% of their measured ratio to dense (the fidelity goal for a pick)."""
    from slimdeploy.latency.model import point_sizes

    lm = LatencyModel(DeviceProfile.load(RESULTS / "profiles" / "fmnist-vit_zen5_1203h.json"))
    rows = json.loads((RESULTS / "latency_fidelity_fmnist-vit_zen5_1203h.json").read_text())["rows"]
    picks = [r for r in rows if r["kind"].startswith("solver") and r["target"] == 0.3]
    assert len(picks) == 3 and all(max(n for n, *_ in point_sizes(r)[0]) <= 2 for r in picks)
    errors = _errors_against_dense(lm, picks)
    assert max(abs(e) for e in errors) < 0.05, errors


def test_weights_streamed_from_memory_are_priced_by_their_megabytes():
    """Measured on a Zen 5 EPYC (benchmarks/RESULTS.md): deit_small's 85 MB of weights outgrow its 32 MB of L3,
    and a fit without a term for streaming them bent its fixed scale and constant into a line that priced small
    random structures up to 19% slow (p90 5.0% and 6.7% over two fidelity runs). With the weights' megabytes as a
    term, the fit reads a memory bandwidth (tens of GB/s), and the random specs' p90 is within the goal (5%)."""
    lm = LatencyModel(DeviceProfile.load(RESULTS / "profiles" / "deit_small_zen5_1203g.json"))
    assert not lm.warm and 10 < 1 / lm.cal["per_mb"] < 100  # MB per ms = GB/s
    for run in ("1203g", "1203i"):
        rows = json.loads((RESULTS / f"latency_fidelity_deit_small_zen5_{run}.json").read_text())["rows"]
        errors = _errors_against_dense(lm, [r for r in rows if r["kind"] == "random"])
        assert len(errors) == 30 and np.percentile(np.abs(errors), 90) < 0.05, run


def test_the_dense_model_anchors_the_fit_and_an_older_fit_is_redone_on_load():
    """Targets are fractions of the dense model (the first point): its own error would move every target, so the
    fit holds it almost exactly, even when its measurement sits off what the other models say. A profile whose
    calibration an older fit made is fitted again from its points when loaded."""
    from slimdeploy.latency.calibration import FIT, calibrated
    from slimdeploy.latency.model import point_sizes

    truth = {"scale_fixed": 1.2, "scale_tokens": 0.85, "per_gather": 0.003, "beta": 0.02}
    rng = np.random.default_rng(7)
    pts = _cal_points(truth, rng, n=30)
    for p in pts:
        p["measured_ms"] *= rng.uniform(0.95, 1.05)
    dense = pts[0]
    dense["features"] = dict(dense["features"], fixed_cold=0.6, tok_cold=0.7, gather=0.0, rank=0.0)
    dense["measured_ms"] = calibrated(dense["features"], truth, False) * 1.06  # 6% off the others
    cal = fit_calibration(pts)
    assert cal["fit"] == FIT
    held = abs(calibrated(dense["features"], cal, False) / dense["measured_ms"] - 1)
    moved = fit_calibration([pts[1], *pts[2:], pts[0]])  # the same points, the dense one no longer first
    plain = abs(calibrated(dense["features"], moved, False) / dense["measured_ms"] - 1)
    assert held < 0.02 < plain and held < 0.5 * plain  # every cost >= 0, the constant too: no line bent to it

    # an older fit, whose points' features an older reading of the tables gave: both are done again on load
    prof = DeviceProfile.load(resolve_profile("xeon-2c-ort1t-b1-fmnist-vit"))
    stale = [{**p, "features": {k: 2 * v for k, v in p["features"].items()}} for p in prof.calibration["points"]]
    stale[1]["ranked_twin"] = True  # a pair's features are its two points' (here: two static models as a pair)
    pairs = [{"token_mode": "attentive", "ranked": stale[1]["features"], "static": stale[2]["features"],
              "delta_ms": 0.001}]
    old = {**prof.calibration, "fit": FIT - 1, "points": stale, "pairs": pairs, "beta": prof.calibration["beta"] + 1}
    prof.calibration = old
    lm = LatencyModel(prof)
    cal = prof.calibration
    assert cal["fit"] == FIT and len(cal["points"]) == len(stale)
    n = int(prof.model["num_tokens"])
    for p in cal["points"]:
        sizes, embed = point_sizes(p)
        assert p["features"] == lm.for_tokens(p.get("token_mode") or "static").features(sizes, n, embed)
    twins = [i for i, p in enumerate(cal["points"]) if p.get("ranked_twin")]
    assert len(twins) == len(cal["pairs"]) > 0
    for pair, i in zip(cal["pairs"], twins):
        assert pair["ranked"] == cal["points"][i]["features"] and pair["static"] == cal["points"][i + 1]["features"]
    assert lm.cal["beta"] == cal["beta"] == pytest.approx(fit_calibration(cal["points"], cal["pairs"])["beta"])
    assert LatencyModel(prof).cal == lm.cal  # current now: not fitted again


def test_paired_twins_give_a_ranking_its_cost_where_the_regression_cannot():
    """A ranking costs a few percent of a model: against noise of a few percent per model, the least squares over
    models miss it (here it is fitted at 0), while pairs measured side by side (noise of a fraction of that)
    recover it, and the ranked points then do not bias the rest of the fit."""
    from slimdeploy.latency.calibration import calibrated, pair_record

    truth = {"scale_fixed": 1.2, "scale_tokens": 0.85, "per_gather": 0.003, "per_rank": 0.006, "per_fuse": 0.02}
    rng = np.random.default_rng(5)
    pts = _cal_points(truth, rng, n=40)
    for p in pts:  # noise of +-4% on every whole model; rankings only where the twins have them
        p["features"]["rank"] = 0.0
        p["measured_ms"] = calibrated(p["features"], truth, False) * rng.uniform(0.96, 1.04)
    pairs = []
    for i, mode in enumerate(["attentive", "fused"] * 3):
        static = dict(pts[i]["features"], gather=max(1.0, pts[i]["features"]["gather"]))
        ranked = dict(static, **{"rank" if mode == "attentive" else "fuse": static["gather"]})
        s_ms, r_ms = calibrated(static, truth, False), calibrated(ranked, truth, False)
        noise = rng.uniform(0.997, 1.003)  # a paired ratio is precise
        pts += [{"features": ranked, "measured_ms": r_ms * rng.uniform(0.96, 1.04), "ranked_twin": True},
                {"features": static, "measured_ms": s_ms * rng.uniform(0.96, 1.04)}]
        pairs.append(pair_record(ranked, static, mode, s_ms, r_ms / s_ms * noise))
    with_pairs = fit_calibration(pts, pairs)
    assert with_pairs["per_rank"] == pytest.approx(0.006, abs=0.002)
    assert with_pairs["per_fuse"] == pytest.approx(0.02, abs=0.003)
    assert with_pairs["pairs"] == pairs  # kept, so that a refit (fold) keeps them
    # a closed loop's ranked rows, folded in later, enter the fit at the pairs' cost and leave it where it was
    loop = []
    for p in pts[:6]:
        f = dict(p["features"], gather=2.0, fuse=2.0)
        loop.append({"features": f, "measured_ms": calibrated(f, truth, False) * rng.uniform(0.98, 1.02)})
    folded = fit_calibration(pts + loop, pairs)
    assert folded["per_fuse"] == pytest.approx(with_pairs["per_fuse"], abs=0.002)
    assert abs(folded["per_fuse"] - 0.02) < 0.003
    alone = fit_calibration(pts)  # the same points without their pairing
    assert abs(alone["per_fuse"] - 0.02) > abs(with_pairs["per_fuse"] - 0.02)


def test_median_interval_is_distribution_free():
    vals = list(range(1, 16))  # 15 rounds: the 4th and the 12th order statistics
    assert timing.median_interval(vals) == (4, 12)
    assert timing.median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few rounds for 95%: min and max
    m = timing.Measurement.from_values([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0], 70)
    assert m.median_ms == 1.0 and m.low_ms <= 1.0 <= m.high_ms


def test_measure_interleaves_rounds_and_pairs_ratios():
    calls = []

    def fake(name, cost):
        def fn():
            calls.append(name)
            import time

            t = time.perf_counter()
            while time.perf_counter() - t < cost:
                pass
        return fn, None
    proto = timing.Protocol(warmup_s=0.001, rounds=6, round_s=0.001, min_calls=2)
    t = timing.measure({"a": fake("a", 2e-4), "b": fake("b", 1e-4)}, proto)
    assert t["a"].rounds == 6 and t["b"].rounds == 6
    # the order rotates: some rounds start with a, some with b (after the warm-up)
    timed = calls[calls.index("b"):]
    starts = [timed[i] for i in range(1, len(timed)) if timed[i] != timed[i - 1]]
    assert "a" in starts and "b" in starts
    r = timing.ratio(t["a"], t["b"])
    assert r.median_ms == pytest.approx(np.median(np.array(t["a"].round_ms) / np.array(t["b"].round_ms)))
    assert 1.3 < r.median_ms < 3.0


def test_fingerprint_mismatch_warns_naming_both_machines(tmp_path):
    from slimdeploy.latency.backends import get_backend
    from slimdeploy.latency.profile import load_latency_model

    model = tiny_model("t-cls")
    prof = staircase_profile(arch_of(model))
    here = get_backend("ort-cpu").fingerprint()
    prof.backend, prof.threads, prof.fingerprint = "ort-cpu", 1, dict(here)
    assert fingerprint_warning(prof, here) is None
    prof.fingerprint = {**here, "model": "AMD EPYC 7B13", "isa": ["avx2"]}
    w = fingerprint_warning(prof, here)
    assert "AMD EPYC 7B13" in w and here["model"] in w and "differs in isa, model" in w
    prof.save(tmp_path / "other.json")
    _, warnings = load_latency_model(str(tmp_path / "other.json"), model, ModelConfig("t-cls"))
    assert len(warnings) == 1 and "AMD EPYC 7B13" in warnings[0]


def test_a_profile_measured_on_a_busy_machine_is_loaded_with_a_warning(tmp_path):
    from slimdeploy.latency.backends import get_backend
    from slimdeploy.latency.model import steadiness_warning
    from slimdeploy.latency.profile import load_latency_model

    model = tiny_model("t-cls")
    prof = staircase_profile(arch_of(model))
    prof.backend, prof.threads, prof.fingerprint = "ort-cpu", 1, dict(get_backend("ort-cpu").fingerprint())
    dense = {"features": {}, "measured_ms": 1.0, "halfwidth": 0.0}
    prof.calibration = {"points": [dense] + [{"features": {}, "measured_ms": 0.5, "halfwidth": hw}
                                             for hw in (0.01, 0.02, 0.03)], "fit_median_abs_error": 0.02,
                        "fit": FIT}  # current: not fitted again from these points
    assert steadiness_warning(prof) is None  # +-2%: a quiet machine
    prof.calibration["points"][1:] = [{**p, "halfwidth": hw} for p, hw in zip(prof.calibration["points"][1:],
                                                                               (0.04, 0.15, 0.3))]
    prof.calibration["fit_median_abs_error"] = 0.07
    w = steadiness_warning(prof)
    assert "busy machine" in w and "+-15%" in w and "fit 7% median error" in w and "slimdeploy profile" in w
    prof.save(tmp_path / "busy.json")
    _, warnings = load_latency_model(str(tmp_path / "busy.json"), model, ModelConfig("t-cls"))
    assert warnings == [w]  # the same machine: only the busy measurement is reported


def test_profile_measures_a_wide_chunk_of_whole_models_again_and_keeps_the_narrowest(monkeypatch):
    from slimdeploy.latency.profile import REMEASURE, WholeModels

    def measurement(values):
        return timing.Measurement.from_values(list(values), 9)
    tight, loose = [0.50] * 4 + [0.51] * 5, [0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9]
    whole = WholeModels(None, None, None, 1, {}, lambda: None, lambda n, info: None)
    queue: list[list[float]] = []

    def fake(models):  # each call measures the chunk's models with the next rounds in the queue
        rounds = queue.pop(0)
        return {"dense": measurement([1.0] * 9), **{k: measurement(rounds) for k in models if k != "dense"}}
    monkeypatch.setattr(whole, "_measure", lambda models, protocol: fake(models))

    def chunk(name, *measurements):
        queue[:] = list(measurements)
        whole._measure_chunk({f"{name}/1": None, f"{name}/2": None})
        left = len(queue)
        return len(measurements) - left, whole.cache[f"{name}/1"][:2]

    def kept(rounds):
        return pytest.approx(np.median(rounds)), pytest.approx(measurement(rounds).rel_halfwidth)
    assert REMEASURE >= 2
    assert chunk("quiet", tight, loose) == (1, kept(tight))  # narrow: measured once
    assert chunk("blip", loose, tight, loose) == (2, kept(tight))  # a busy moment: measured again, the narrow kept
    assert whole.remeasures == REMEASURE - 1
    # wide again after a re-measurement: the machine is busy throughout, and nothing more is measured again
    assert chunk("busy", loose, loose, tight) == (2, kept(loose))
    assert whole.remeasures == 0
    assert chunk("later", loose, tight) == (1, kept(loose))


def test_profile_resolution_order(tmp_path, monkeypatch):
    model = tiny_model("t-cls")
    prof = staircase_profile(arch_of(model))
    user, mine = tmp_path / "user", tmp_path / "mine"
    monkeypatch.setenv("SLIMDEPLOY_PROFILES", str(user))
    prof.device = "user"
    prof.save(user / "dev.json")
    prof.device = "mine"
    prof.save(mine / "dev.json")
    assert DeviceProfile.load(resolve_profile("dev")).device == "user"
    assert DeviceProfile.load(resolve_profile("dev", mine)).device == "mine"
    assert resolve_profile(str(mine / "dev.json")) == mine / "dev.json"
    with pytest.raises(SlimError, match="no profile for device 'nope'.*known: .*dev.*--device local"):
        resolve_profile("nope", mine)


def test_corrupt_or_old_profiles_are_one_clear_error(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SlimError, match="not valid JSON"):
        DeviceProfile.load(tmp_path / "bad.json")
    (tmp_path / "old.json").write_text(json.dumps({"schema": 1}))
    with pytest.raises(SlimError, match="schema 1 is not supported.*re-measure"):
        DeviceProfile.load(tmp_path / "old.json")
    prof = staircase_profile(arch_of(tiny_model("t-cls")))
    del prof.tables["core_v"]
    with pytest.raises(SlimError, match="lacks the tables"):
        LatencyModel(prof)


def test_replicated_graph_runs_k_distinct_copies():
    import onnxruntime as ort
    import torch

    from slimdeploy.export import onnx_bytes
    from slimdeploy.latency.components import nontrivial_, replicate

    lin = nontrivial_(torch.nn.Linear(8, 4))
    x = torch.randn(1, 3, 8)
    one = onnx_bytes(lin, x)
    sess = ort.InferenceSession(replicate(one, 3), providers=["CPUExecutionProvider"])
    assert len(sess.get_inputs()) == 3 and len(sess.get_outputs()) == 3
    feeds = {i.name: x.numpy() for i in sess.get_inputs()}
    outs = sess.run(None, feeds)
    with torch.no_grad():
        ref = lin(x).numpy()
    assert np.abs(outs[0] - ref).max() < 1e-6  # copy 0 keeps the weights
    assert np.abs(outs[1] - ref).max() > 1e-6 and np.abs(outs[1] - outs[2]).max() > 1e-6  # the others differ


def test_interrupted_profile_resumes(tmp_path, monkeypatch):
    """A profile killed halfway keeps its measurements and the next call reuses them."""
    from slimdeploy.defaults import PROFILE
    from slimdeploy.latency import profile
    from slimdeploy.latency.backends import get_backend
    from slimdeploy.latency.draws import DRAWS
    from slimdeploy.latency.profile import is_current, profile_device

    monkeypatch.setattr(profile, "REMEASURE", 0)  # loads are counted below: no chunk measured again on a busy machine

    model = tiny_model("t-demo")
    out = tmp_path / "p.json"
    backend = get_backend("ort-cpu")
    calls = {"n": 0}
    real = backend.load_onnx

    def flaky(onnx):
        calls["n"] += 1
        if calls["n"] == 120:
            raise KeyboardInterrupt
        return real(onnx)

    backend.load_onnx = flaky
    with pytest.raises(KeyboardInterrupt):
        profile_device("t", backend, model, ModelConfig("t-demo"), 1, out, token_points=2, calibration_models=8)
    partial = tmp_path / ".p.partial.json"
    assert partial.is_file() and not out.exists()
    saved = len(json.loads(partial.read_text())["cache"])
    assert saved >= 50
    calls["n"] = 0
    backend.load_onnx = lambda onnx: (calls.__setitem__("n", calls["n"] + 1), real(onnx))[1]
    prof = profile_device("t", backend, model, ModelConfig("t-demo"), 1, out, token_points=2, calibration_models=8)
    assert out.is_file() and not partial.exists()
    assert prof.measurements > saved
    assert calls["n"] < 2 * (prof.measurements - saved) + 40  # only what was not saved was measured again
    assert prof.fingerprint["kind"] == "cpu" and prof.fingerprint["runtime"] == "ort-cpu"
    modes = [p["token_mode"] for p in prof.calibration["points"]]
    assert modes[:2] == ["static", "static"] and "attentive" in modes[2:]  # ranked twins are measured whole
    pair = prof.calibration["pairs"][0]  # beside their static twins
    assert pair["token_mode"] == "attentive" and pair["ranked"]["rank"] == pair["static"]["gather"] > 0
    assert pair["static"]["rank"] == 0 and "per_rank" in prof.calibration and "per_fuse" in prof.calibration
    assert prof.tables["rank"]["axes"] == ["tokens", "kept"] and is_current(prof)
    ms = np.array(prof.tables["fuse"]["ms"])
    assert ms.shape == (len(prof.tables["fuse"]["grid"]["tokens"]),) * 2 and (np.diff(ms, axis=0) >= 0).all()
    older = DeviceProfile.from_dict(prof.to_dict())
    older.tables["rank"] = {"axes": ["tokens"], "grid": {"tokens": [2, 17]}, "ms": [0.01, 0.02]}
    assert not is_current(older)  # a cached local profile like this one is measured again
    unpaired = DeviceProfile.from_dict(prof.to_dict())
    del unpaired.calibration["pairs"]
    assert not is_current(unpaired)  # nor one whose rankings were fitted without pairs
    assert prof.tables["rank"]["with_prior"]
    no_prior = DeviceProfile.from_dict(prof.to_dict())
    del no_prior.tables["rank"]["with_prior"]
    assert not is_current(no_prior)  # nor one whose attentive rankings were timed without the positions' prior
    assert prof.draws == DRAWS
    drawn = [p["drawn"] for p in prof.calibration["points"]]
    n_random = round(8 * PROFILE["random_share"])
    assert drawn[:n_random + 2] == ["dense"] + ["random"] * n_random + ["solver"]  # the share of 8 random
    assert drawn.count("random") == n_random and drawn.count("solver") >= 2 and "twin" in drawn
    assert not is_current(replace(prof, draws=DRAWS - 1))  # nor one calibrated on whole models drawn otherwise
    assert prof.tables["stem_head"]["axes"] == ["tokens"]  # the head over the tokens the last block keeps
    one_head = DeviceProfile.from_dict(prof.to_dict())
    one_head.tables["stem_head"] = {"ms": 0.01}
    assert not is_current(one_head)  # nor one whose head was timed at every token only
    LatencyModel(prof).predict(SlimSpec.dense(ModelConfig("t-demo"), arch_of(model)))


@pytest.mark.parametrize("mode", ["attentive", "fused"])
def test_only_the_block_that_drops_pays_the_ranking_in_both_calibrated_parts(mode):
    """A ranked spec costs its static twin plus one ranking piece, split into its few-token (fixed) part and what
    its tokens add, each at its own scale: blocks that keep the count they get pay nothing."""
    model = tiny_model("t-cls")
    a = arch_of(model)
    prof = staircase_profile(a)
    prof.calibration = {"scale_fixed": 1.4, "scale_tokens": 0.7, "per_gather": 0.002, "per_rank": 0.005,
                        "per_fuse": 0.011}
    lm = LatencyModel(prof)
    full = (a.num_heads, a.head_dim, a.head_dim, a.mlp_dim)
    n = a.num_tokens - 5
    sizes = [(a.num_tokens, *full), (n, *full), (n, *full), (n, *full)][: a.depth]
    assert a.depth >= 3
    few = a.num_prefix_tokens + 1
    ranked, static = lm.for_tokens(mode), lm.for_tokens("static")
    N = a.num_tokens
    piece, gather = ranked.drop, static.drop  # both from N tokens
    expected = (1.4 * (piece(N, few) - gather(N, few)) + 0.7 * (piece(N, n) - piece(N, few) - gather(N, n)
                                                              + gather(N, few))
                + {"attentive": 0.005, "fused": 0.011}[mode])  # one ranking's per-operator cost in a whole model
    assert ranked.predict_sizes(sizes) - static.predict_sizes(sizes) == pytest.approx(expected)


def test_ranked_twins_keep_the_sizes_and_rank_every_drop():
    from slimdeploy.latency.draws import random_spec, ranked_twins

    model = tiny_model("t-cls")
    a = arch_of(model)
    rng = random.Random(0)
    specs = [random_spec(a, ModelConfig("t-cls"), rng, step=4) for _ in range(40)]
    pairs = ranked_twins(specs, 6)
    twins = [t for t, _ in pairs]
    assert len(twins) == 6 and [t.token_mode for t in twins[:2]] == ["attentive", "fused"]
    assert all(s.token_mode == "static" and spec_sizes(s) == spec_sizes(t) for t, s in pairs)
    # attentive twins rank with a positions' prior, as attentive models from a search do: its cost is in the pair
    assert all((t.rank_prior is not None) == (t.token_mode == "attentive") and s.rank_prior is None for t, s in pairs)
    widths = {tuple(x[1:] for x in spec_sizes(s)) for s in specs}
    for t in twins:
        assert tuple(x[1:] for x in spec_sizes(t)) in widths  # the widths of a spec; its counts where it can rank
        counts = [a.num_tokens] + t.token_counts()
        assert any(n < p for p, n in zip(counts, counts[1:]))  # only specs that drop tokens have twins
        f = LatencyModel(staircase_profile(a)).for_tokens(t.token_mode).features(spec_sizes(t), a.num_tokens)
        assert f[{"attentive": "rank", "fused": "fuse"}[t.token_mode]] == f["gather"] > 0
    static = LatencyModel(staircase_profile(a)).features(spec_sizes(twins[0]), a.num_tokens)
    assert static["rank"] == 0


def test_a_profile_has_a_ranked_twin_even_where_no_draw_drops_a_token():
    """On tables measured on a busy machine a small model's solver may pick no token drop at all (a fresh-clone
    test run beside a training job saw it); the profile still measures one pair for the cost of a ranking."""
    from slimdeploy.latency.draws import ranked_twins

    a = arch_of(tiny_model("t-cls"))
    dense = SlimSpec.dense(ModelConfig("t-cls"), a)
    pairs = ranked_twins([dense, dense], 3)
    assert len(pairs) == 1
    ranked, static = pairs[0]
    half = a.num_prefix_tokens + a.num_patches // 2
    assert ranked.token_mode == "attentive" and static.token_mode == "static"
    assert ranked.token_counts() == static.token_counts() == [a.num_tokens] + [half] * (a.depth - 1)
    assert spec_sizes(ranked) == spec_sizes(static)
    assert ranked_twins([], 3) == []


def test_the_ranked_twins_come_from_what_ranked_selection_picks():
    """The calibration's twins are drawn where selection goes in the ranked token modes: a ranked importance sorts
    each block's ranks, so the solver drops most tokens and keeps the channels, a region no static pick reaches
    (where a model calibrated on static draws alone priced the shifted set's picks 10-16% too slow)."""
    from slimdeploy.latency.draws import ranked_twins, solver_specs

    a = wide_arch("t-wide-draws")
    cfg, lm = ModelConfig("t-wide-draws"), LatencyModel(staircase_profile(a))
    ranked = solver_specs(lm, a, cfg, 6, seed=0, ranked=True)
    assert [s.token_mode for s in ranked] == ["attentive", "fused"] * 3
    pairs = ranked_twins(ranked, 3)
    dropping = [s.token_mode for s in ranked if min(s.token_counts()) < a.num_tokens]
    assert [t.token_mode for t, _ in pairs] == dropping[:3]
    assert all(s.token_mode == "static" and spec_sizes(s) == spec_sizes(t) for t, s in pairs)

    def kept(specs):  # (the fewest tokens a block keeps, the mean kept fraction of MLP units) of each
        return [(min(s.token_counts()), np.mean([b.mlp_dim for b in s.blocks]) / a.mlp_dim) for s in specs]
    fewest_ranked = min(kept(ranked))
    static = solver_specs(lm, a, cfg, 12, seed=0)
    assert fewest_ranked[0] <= 0.1 * a.num_tokens and fewest_ranked[1] >= 0.9  # few tokens, every channel
    assert not any(n <= 0.1 * a.num_tokens and m >= 0.9 for n, m in kept(static))


def test_a_ranking_costs_what_it_ranks_and_keeps():
    """A ranking is priced over the tokens it gets: the second ranking of a model, from fewer tokens, costs less
    than the first; a profile measured before this (a table over the kept count alone) still prices."""
    model = tiny_model("t-cls")
    a = arch_of(model)
    prof = staircase_profile(a)
    lm = LatencyModel(prof).for_tokens("attentive")
    N, n = a.num_tokens, a.num_tokens // 2
    assert lm.drop(N, n) > lm.drop(n + 1, n) > 0
    assert lm.drop(N, n) > lm.drop(N, n - 3)  # keeping fewer gathers less
    full = (a.num_heads, a.head_dim, a.head_dim, a.mlp_dim)
    once, twice = [(N, *full), (n, *full), (n, *full)], [(N, *full), (N - 1, *full), (n, *full)]
    f_once, f_twice = lm.features(once, N), lm.features(twice, N)
    shared = lambda f: f["fixed_shared"] + f["tok_shared"]  # noqa: E731
    stat = LatencyModel(prof)
    extra = (shared(f_twice) - shared(stat.features(twice, N))) - (shared(f_once) - shared(stat.features(once, N)))
    drops = lambda m, sizes: sum(m.drop(p[0], s[0]) for p, s in zip([(N,)] + sizes, sizes) if s[0] < p[0])  # noqa
    assert extra == pytest.approx(drops(lm, twice) - drops(lm, once) - drops(stat, twice) + drops(stat, once))
    assert drops(lm, twice) == pytest.approx(lm.drop(N, N - 1) + lm.drop(N - 1, n))  # the second from N - 1
    prof.tables["rank"] = {"axes": ["tokens"], "grid": {"tokens": [2, N]}, "ms": [0.001, 0.002]}
    old = LatencyModel(prof).for_tokens("attentive")
    assert old.drop(N, n) == old.drop(n + 1, n) > 0


def test_folded_loop_rows_are_priced_in_their_token_mode(tmp_path):
    """A closed loop's rows fold into the calibration with their rankings counted (rows before the token mode was
    recorded fold as static)."""
    from slimdeploy.latency.draws import random_spec as spec_of
    from slimdeploy.latency.profile import fold_rounds

    model = tiny_model("t-cls")
    a = arch_of(model)
    prof = staircase_profile(a)
    lm = LatencyModel(prof)
    rng = random.Random(0)
    specs = [spec_of(a, ModelConfig("t-cls"), rng, step=4) for _ in range(12)]
    prof.calibration = fit_calibration([{"features": lm.features(spec_sizes(s), a.num_tokens),
                                         "measured_ms": 1.1 * lm.predict(s)} for s in specs])
    path = tmp_path / "p.json"
    prof.save(path)
    full = [a.num_heads, a.head_dim, a.head_dim, a.mlp_dim]
    sizes = [[a.num_tokens, *full], [a.num_tokens - 4, *full], [a.num_tokens - 4, *full]]
    rows = [{"sizes": sizes, "over_dense": 0.8, "token_mode": "attentive"}, {"sizes": sizes, "over_dense": 0.7}]
    points = fold_rounds(path, rows).calibration["points"]
    assert [p["features"]["rank"] for p in points[-2:]] == [1, 0]
    assert [p["features"]["gather"] for p in points[-2:]] == [1, 1]
    assert [p["token_mode"] for p in points[-2:]] == ["attentive", "static"]

    # folded by an older version (no token mode, no embedding width kept) and fitted by an older fit: read again on
    # load in the mode and at the width their features were computed with
    narrow = a.embed_dim // 2
    old_row = {"features": lm.for_tokens("attentive").features([tuple(s) for s in sizes], a.num_tokens, narrow),
               "measured_ms": 0.5, "widths": sizes}
    cal = {**prof.calibration, "fit": FIT - 1,
           "points": [*({k: v for k, v in p.items() if k not in ("token_mode", "embed")} for p in points), old_row]}
    prof.calibration = cal
    again = LatencyModel(prof).profile.calibration["points"]
    assert [p["features"]["rank"] for p in again[-3:]] == [1, 0, 1]
    assert again[-1]["features"] == pytest.approx(old_row["features"])  # the same tables: the same features


def test_export_deployed_writes_each_model_as_deployed(tmp_path):
    """The profile's whole models exported ahead of timing, in the export workers: each file computes what its
    PyTorch model does (the dense model for None, the pruned one for a spec)."""
    import onnxruntime as ort
    import torch

    from slimdeploy.latency.measure import example_input, export_deployed
    from slimdeploy.slim import build_slim

    model = tiny_model("t-demo")
    a = arch_of(model)
    specs = {"dense": None, "a": random_spec(model, 1), "b": random_spec(model, 2, force="no-mlp")}
    done = []
    files = export_deployed(model, specs, a, 2, tmp_path, done=done.append)
    assert sorted(done) == sorted(specs) and all(p.parent == tmp_path and p.is_file() for p in files.values())
    x = example_input(a, 2)
    for name, spec in specs.items():
        m = model if spec is None else build_slim(spec, model)
        with torch.no_grad():
            ref = m(torch.as_tensor(x)).numpy()
        out = ort.InferenceSession(str(files[name]), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        assert np.abs(out - ref).max() < 1e-4, name
    slim = ort.InferenceSession(str(files["a"]), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        assert np.abs(slim - model(torch.as_tensor(x)).numpy()).max() > 1e-3  # the spec was applied


def test_export_deployed_falls_back_to_this_process(tmp_path):
    """A user's script without a main guard: the spawned workers die re-running it, and the exports still
    happen, in the calling process, with one line that says so."""
    import os
    import pathlib
    import subprocess
    import sys

    script = tmp_path / "no_guard.py"
    script.write_text(
        "from pathlib import Path\n"
        "from slimdeploy.latency.measure import export_deployed\n"
        "from slimdeploy.models import arch_of\n"
        "from tests.conftest import tiny_model\n"
        "m = tiny_model('t-demo')\n"
        f"files = export_deployed(m, {{'a': None, 'b': None}}, arch_of(m), 1, Path({str(tmp_path)!r}))\n"
        "print('EXPORTED', sorted(p.name for p in files.values() if p.is_file()))\n")
    root = pathlib.Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=root, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(root), "SLIMDEPLOY_QUIET": "0"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "EXPORTED ['0.onnx', '1.onnx']" in r.stdout
    assert "the export workers failed (BrokenProcessPool)" in r.stdout + r.stderr


def test_comparisons_export_everything_before_loading(monkeypatch):
    """measure_models and the closed loop's measurer export every model, in a worker process, before they load
    any: an export in the measuring process moved the latency of what was loaded after it (export_first)."""
    import slimdeploy.export as export_mod
    from slimdeploy.latency.backends import get_backend
    from slimdeploy.latency.measure import SpecMeasurer, measure_models
    from slimdeploy.slim import build_slim

    events = []
    real_export, backend = export_mod.export_onnx, get_backend("ort-cpu")
    real_load = backend.load_onnx

    def export(model, path, *a, **k):  # an export in this process
        events.append("export here")
        return real_export(model, path, *a, **k)

    def load(onnx, **k):  # how many models of the comparison were on disk at this load
        events.append(len(list(Path(onnx).parent.glob("*.onnx"))))
        return real_load(onnx, **k)

    monkeypatch.setattr(export_mod, "export_onnx", export)
    backend.load_onnx = load
    model = tiny_model("t-demo")
    a = arch_of(model)
    fast = timing.Protocol(warmup_s=0.0, rounds=2, round_s=0.001, min_calls=1, sessions=2)
    t = measure_models(backend, {"dense": model, "slim": build_slim(random_spec(model, 1), model)}, a, 1, fast)
    assert set(t) == {"dense", "slim"}
    assert events == [2] * 4  # every load found both files; nothing was exported in this process
    events.clear()
    monkeypatch.setattr(timing, "MODEL", fast)
    dense, slims = SpecMeasurer(backend, model, a, 1)([random_spec(model, 2), random_spec(model, 3)])
    assert len(slims) == 2 and dense.median_ms > 0
    assert events == [3] * 3 * fast.sessions  # each model as the protocol's sessions


def test_sessions_load_round_robin_and_a_failed_load_closes_the_rest():
    """Every model's first session before any model's second (the placement of a session's memory depends on
    what was loaded before it); a one-session loader (the torch backend) loads once; a load that fails closes
    what was loaded."""
    from slimdeploy.latency.measure import load_round_robin

    class S:
        closed = 0

        def __init__(self, name):
            self.name = name

        def close(self):
            S.closed += 1

    order = []

    def loader(name, n):
        return (lambda: order.append(name) or S(name)), n

    got = load_round_robin({"slim": loader("slim", 3), "dense": loader("dense", 3), "torch": loader("torch", 1)})
    assert order == ["slim", "dense", "torch", "slim", "dense", "slim", "dense"]
    assert {k: [s.name for s in v] for k, v in got.items()} == {"slim": ["slim"] * 3, "dense": ["dense"] * 3,
                                                                 "torch": ["torch"]}

    def broken():
        raise RuntimeError("cannot load")

    with pytest.raises(RuntimeError):
        load_round_robin({"slim": loader("slim", 2), "bad": (broken, 2)})
    assert S.closed == 1  # the slim session loaded before the failure


def test_verify_loads_the_slim_and_dense_sessions_round_robin(monkeypatch, tmp_path):
    """verify measures as every comparison does: the deployed file's sessions and the dense model's, in turns."""
    import slimdeploy.verify as verify_mod
    from slimdeploy.export import export_onnx
    from slimdeploy.latency.backends import get_backend
    from slimdeploy.slim import build_slim

    model = tiny_model("t-demo")
    a = arch_of(model)
    slim = build_slim(random_spec(model, 4), model)
    export_onnx(slim, tmp_path / "model.onnx", (a.in_chans, a.img_size, a.img_size), 1)
    backend = get_backend("ort-cpu")
    real_load, loads = backend.load_onnx, []

    def load(onnx, **k):
        loads.append("slim" if Path(onnx) == tmp_path / "model.onnx" else "dense")
        return real_load(onnx, **k)

    backend.load_onnx = load
    monkeypatch.setattr(timing, "MODEL", timing.Protocol(warmup_s=0.0, rounds=2, round_s=0.001, min_calls=1,
                                                         sessions=2))
    monkeypatch.setattr(timing, "WIDE", float("inf"))  # two rounds are wide: no measurement again here
    s, d, twin, used = verify_mod._measure(backend, backend, tmp_path, slim, model, a, 1)
    assert loads == ["slim", "dense", "slim", "dense"] and twin is None and s.median_ms > 0 < d.median_ms
    assert used is timing.MODEL


def test_a_wide_ratio_is_measured_again_longer_and_the_narrower_kept():
    """verify (and the benchmarks' verify) measure once; a paired ratio wider than WIDE is measured again with
    the long protocol, and the narrower of the two decides."""
    def reading(spread):  # slim at 0.5 x dense, its 15 round medians spread by +-spread
        slim = [0.5 * (1 + spread * ((i % 5) - 2) / 2) for i in range(15)]
        return {"slim": timing.Measurement.from_values(slim, 3),
                "dense": timing.Measurement.from_values([1.0] * 15, 3)}

    def halfwidth(t):
        return timing.ratio(t["slim"], t["dense"]).rel_halfwidth

    for spreads, kept in (([0.001], 0), ([0.2, 0.001], 1), ([0.2, 0.4], 0)):
        calls = []

        def measure(protocol, calls=calls, spreads=spreads):
            calls.append(protocol)
            return reading(spreads[len(calls) - 1])
        t, used = timing.measured_steadily(measure)
        assert calls == [timing.MODEL, timing.MODEL_LONG][:len(spreads)]  # again only where the first was wide
        assert used is calls[kept] and halfwidth(t) == pytest.approx(halfwidth(reading(spreads[kept])))
    assert halfwidth(reading(0.001)) <= timing.WIDE < halfwidth(reading(0.2))


def test_export_first_falls_back_when_a_model_does_not_pickle(tmp_path, capsys, monkeypatch):
    """A model the worker cannot receive is exported here instead, with one line that says so."""
    from slimdeploy.latency.backends import get_backend
    from slimdeploy.latency.measure import export_first

    monkeypatch.setenv("SLIMDEPLOY_QUIET", "0")
    model = tiny_model("t-demo")
    model.unpicklable = lambda: None  # a local object: pickle refuses it
    files = export_first(get_backend("ort-cpu"), {"m": model}, arch_of(model), 1, tmp_path)
    assert files["m"].is_file()
    out = capsys.readouterr()
    assert "the export workers failed" in out.out + out.err and "in this process" in out.out + out.err


def test_the_head_is_priced_at_the_tokens_the_last_block_keeps():
    """A profile's stem_head table over tokens is read at the last block's count, and nowhere else; a profile made
    before it (one value) prices every model with that value."""
    model = tiny_model("t-cls")
    a = arch_of(model)
    prof = staircase_profile(a)
    ns = prof.tables["rest"]["grid"]["tokens"]
    prof.tables["stem_head"] = {"axes": ["tokens"], "grid": {"tokens": ns}, "ms": [0.05 + 0.01 * n for n in ns]}
    old = DeviceProfile.from_dict(prof.to_dict())
    old.tables["stem_head"] = {"ms": 0.05}
    lm, lm_old = LatencyModel(prof), LatencyModel(old)
    full = (a.num_heads, a.head_dim, a.head_dim, a.mlp_dim)
    for last in (ns[0], ns[1], a.num_tokens):
        sizes = [(a.num_tokens, *full)] * (a.depth - 1) + [(last, *full)]
        f, f_old = lm.features(sizes, a.num_tokens), lm_old.features(sizes, a.num_tokens)
        assert f["fixed_shared"] - f_old["fixed_shared"] == pytest.approx(0.01 * last)
        assert {k: v for k, v in f.items() if k != "fixed_shared"} == {k: v for k, v in f_old.items()
                                                                        if k != "fixed_shared"}


def test_the_stem_head_piece_normalises_the_last_blocks_tokens_after_a_residual_add():
    """What the profile times for the head: the model's own stem, the first n tokens (all by default) doubled as by
    a residual add, its final norm and head; numerically the model's parts in that order."""
    import torch

    from slimdeploy.latency import components

    model = tiny_model("t-cls").eval()
    a = arch_of(model)
    x = torch.randn(2, a.in_chans, a.img_size, a.img_size)
    with torch.no_grad():
        tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        for n in (2, a.num_tokens):
            want = model.forward_head(model.norm(2 * tokens[:, :n]))
            piece = components.stem_head(model, tokens=n).eval()
            torch.testing.assert_close(piece(x), want)
        torch.testing.assert_close(components.stem_head(model).eval()(x), want)  # every token
