"""Latency-aware selection on synthetic importances and a synthetic staircase profile."""

from __future__ import annotations

import pytest

from slimdeploy.errors import SlimError
from slimdeploy.latency import check_profile_fits
from slimdeploy.models import arch_of
from slimdeploy.selector import LatencyCost, Selector, fraction_spec, parse_count, parse_latency, spec_importance
from slimdeploy.types import ModelConfig, SlimSpec

from .conftest import tiny_model
from .synthetic import staircase_model, staircase_profile, synthetic_importance


@pytest.fixture(scope="module")
def setup():
    from slimdeploy.models import register_model

    register_model("t-wide", dict(img_size=32, patch_size=4, in_chans=3, num_classes=5, embed_dim=64, depth=4,
                                  num_heads=4, mlp_ratio=4.0))
    model = tiny_model("t-wide")
    arch = arch_of(model)
    lm = staircase_model(arch)
    imp = synthetic_importance(arch)
    sel = Selector(arch, ModelConfig("t-wide"), imp, LatencyCost(lm))
    dense = lm.predict(SlimSpec.dense(ModelConfig("t-wide"), arch))
    return arch, lm, imp, sel, dense


@pytest.mark.parametrize("frac", [0.3, 0.45, 0.6, 0.75, 0.9])
def test_never_exceeds_target(setup, frac):
    arch, lm, imp, sel, dense = setup
    res = sel.select(frac * dense)
    assert lm.predict(res.spec) <= frac * dense + 1e-9
    assert res.cost == pytest.approx(lm.predict(res.spec), rel=1e-9)


def test_lands_on_step_starts(setup):
    """No kept width can grow to the next grid width without paying more latency."""
    arch, lm, imp, sel, dense = setup
    spec = sel.select(0.5 * dense).spec
    grid_hd, grid_mlp = sel.c.qk, sel.c.mlp
    checked = 0
    for b in spec.blocks:
        n, h, q, v, m = b.num_tokens, b.num_heads, b.qk_dim, b.v_dim, b.mlp_dim
        base = lm.block_ms(n, h, q, v, m)
        if 0 < m < arch.mlp_dim:
            bigger = min(w for w in grid_mlp if w > m)
            assert lm.block_ms(n, h, q, v, bigger) > base
            assert m % 32 == 0  # the synthetic tile: a step ends at a multiple of 32
            checked += 1
        if h and q < arch.head_dim:
            assert lm.block_ms(n, h, min(w for w in grid_hd if w > q), v, m) > base
            checked += 1
        if h and v < arch.head_dim:
            assert lm.block_ms(n, h, q, min(w for w in grid_hd if w > v), m) > base
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("frac", [0.5, 0.7, 0.9])
def test_beats_per_type_fractions_at_same_latency(setup, frac):
    arch, lm, imp, sel, dense = setup
    baseline = fraction_spec(arch, ModelConfig("t-wide"), imp, frac, frac, frac)
    budget = lm.predict(baseline)
    ours = sel.select(budget)
    assert ours.cost <= budget + 1e-9
    assert ours.importance >= spec_importance(baseline, imp)
    assert ours.importance == pytest.approx(spec_importance(ours.spec, imp), rel=1e-9)


def test_monotone_in_target(setup):
    arch, lm, imp, sel, dense = setup
    kept = [sel.select(f * dense).importance for f in (0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95)]
    assert all(b >= a - 1e-12 for a, b in zip(kept, kept[1:])), kept


def test_tokens_are_monotone_and_prefix_kept(setup):
    arch, lm, imp, sel, dense = setup
    spec = sel.select(0.4 * dense).spec
    assert any(b.num_tokens < arch.num_tokens for b in spec.blocks)
    for prev, b in zip(spec.blocks, spec.blocks[1:]):
        assert set(b.tokens) <= set(prev.tokens)
    assert all(b.tokens[: arch.num_prefix_tokens] == list(range(arch.num_prefix_tokens)) for b in spec.blocks)


def test_unreachable_target(setup):
    arch, lm, imp, sel, dense = setup
    with pytest.raises(SlimError, match="smallest this profile allows"):
        sel.select(sel.minimum_cost() * 0.5)


@pytest.mark.parametrize("text,expected", [("5ms", ("ms", 5.0)), ("5", ("ms", 5.0)), ("500us", ("ms", 0.5)),
                                           ("0.005s", ("ms", 5.0)), ("60%", ("fraction", 0.6)),
                                           (" 2.5 ms ", ("ms", 2.5))])
def test_parse_latency(text, expected):
    kind, value = parse_latency(text)
    assert kind == expected[0] and value == pytest.approx(expected[1])


@pytest.mark.parametrize("text", ["fast", "5 parsecs", "-3ms", "0", "150%", "5mss", ""])
def test_parse_latency_rejects(text):
    with pytest.raises(SlimError):
        parse_latency(text)


def test_parse_count():
    assert parse_count("2.3G", "MACs") == pytest.approx(2.3e9)
    assert parse_count("350M", "MACs") == pytest.approx(3.5e8)
    with pytest.raises(SlimError):
        parse_count("lots", "MACs")


def test_profile_mismatch_is_refused():
    model = tiny_model("t-cls")
    arch = arch_of(model)
    prof = staircase_profile(arch)
    check_profile_fits(prof, arch, 1, "fp32")
    with pytest.raises(SlimError, match="batch size"):
        check_profile_fits(prof, arch, 8, "fp32")
    with pytest.raises(SlimError, match="precision"):
        check_profile_fits(prof, arch, 1, "fp16")
    prof.model["embed_dim"] = 999
    with pytest.raises(SlimError, match="embed_dim 999"):
        check_profile_fits(prof, arch)


def test_parse_targets_for_macs_and_params(setup):
    from slimdeploy.analysis import spec_macs, spec_params
    from slimdeploy.selector import MacsCost, ParamsCost

    arch, lm, imp, sel, dense = setup
    full = SlimSpec.dense(ModelConfig("t-wide"), arch)
    for cost, fn in ((MacsCost(arch), spec_macs), (ParamsCost(arch), spec_params)):
        s = Selector(arch, ModelConfig("t-wide"), imp, cost)
        dense_state = [[arch.num_tokens, arch.num_heads, arch.head_dim, arch.head_dim, arch.mlp_dim]] * arch.depth
        assert cost.total(dense_state) == pytest.approx(fn(full))
        res = s.select(0.5 * fn(full))
        assert fn(res.spec) <= 0.5 * fn(full)
        assert res.cost == pytest.approx(fn(res.spec))


@pytest.mark.parametrize("bias", [0.8, 1.0, 1.15])
def test_closed_loop_corrects_a_biased_prediction(setup, bias):
    """The engine runs `bias` x slower than predicted: the loop rescales until the measurement fits."""
    from slimdeploy.select import Target, select_structure

    arch, lm, imp, sel, dense = setup
    dense_spec = SlimSpec.dense(ModelConfig("t-wide"), arch)
    target = 0.6 * dense
    calls = []

    def measure(spec):
        calls.append(spec)
        return {"median_ms": bias * lm.predict(spec), "spread": 0.0}

    res = select_structure(imp, dense_spec, Target("latency", target), lm, verify_latency=True, rounds=5,
                           measure=measure)
    assert 0.9 <= res["measured_ms"] / target <= 1.0
    assert len(res["rounds"]) == len(calls) and len(calls) <= 3
    assert all(r["measured_ms"] == pytest.approx(bias * r["predicted_ms"]) for r in res["rounds"])


def test_closed_loop_edges(setup):
    from slimdeploy.select import Target, select_structure

    arch, lm, imp, sel, dense = setup
    dense_spec = SlimSpec.dense(ModelConfig("t-wide"), arch)
    kept = select_structure(imp, dense_spec, Target("latency", 2 * dense), lm, verify_latency=True,
                            measure=lambda s: pytest.fail("the dense model needs no measurement"))
    assert kept["spec"].summary() == dense_spec.summary() and "dense model kept" in kept["note"]
    with pytest.raises(SlimError, match="below the smallest latency this profile allows"):
        select_structure(imp, dense_spec, Target("latency", 0.5 * sel.minimum_cost()), lm, verify_latency=True,
                         measure=lambda s: {"median_ms": 1.0})
