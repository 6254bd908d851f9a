"""Property tests: target parsing and SlimSpec validation never fail with anything but a SlimError."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimdeploy.errors import SlimError
from slimdeploy.models import arch_of
from slimdeploy.select.target import parse_count, parse_latency, parse_target
from slimdeploy.types import BlockSpec, ModelConfig, SlimSpec

from .conftest import tiny_model

ARCH = arch_of(tiny_model("t-reg"))  # 2 register tokens + class token: prefix rules are exercised
text = st.one_of(st.text(max_size=12), st.from_regex(r"\s*-?\d{0,4}(\.\d{0,3})?\s*(ms|us|µs|s|%|[kKmMgG]|x|e9)?\s*",
                                                       fullmatch=True))


@given(text)
@settings(max_examples=300)
def test_latency_targets_parse_or_refuse(t):
    try:
        kind, value = parse_latency(t)
    except SlimError:
        return
    assert kind in ("ms", "fraction") and value > 0 and (kind == "ms" or value <= 1.0)


@given(text)
@settings(max_examples=300)
def test_counts_parse_or_refuse(t):
    try:
        assert parse_count(t, "MACs target") > 0
    except SlimError:
        pass


@given(st.one_of(st.none(), text), st.one_of(st.none(), text), st.one_of(st.none(), text),
       st.tuples(*[st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))] * 3))
@settings(max_examples=300)
def test_targets_from_any_options_parse_or_refuse(lat, macs, params, keep):
    try:
        t = parse_target(lat, macs, params, keep)
    except SlimError:
        return
    assert t.kind in ("latency", "macs", "params", "fractions")
    if t.kind == "fractions":
        assert all(0 < k <= 1 for k in t.keep)


@st.composite
def valid_specs(draw):
    a = ARCH
    spec = SlimSpec.dense(ModelConfig("t-reg"), a)
    tokens = list(range(a.num_tokens))
    blocks = []
    for _ in range(a.depth):
        patches = [t for t in tokens if t >= a.num_prefix_tokens]
        keep = draw(st.lists(st.sampled_from(patches), min_size=1, unique=True)) if patches else []
        tokens = list(range(a.num_prefix_tokens)) + sorted(keep)
        heads = sorted(draw(st.lists(st.integers(0, a.num_heads - 1), unique=True)))
        nq, nv = draw(st.integers(1, a.head_dim)), draw(st.integers(1, a.head_dim))
        qk = [sorted(draw(st.lists(st.integers(0, a.head_dim - 1), min_size=nq, max_size=nq, unique=True)))
              for _ in heads]
        v = [sorted(draw(st.lists(st.integers(0, a.head_dim - 1), min_size=nv, max_size=nv, unique=True)))
             for _ in heads]
        mlp = sorted(draw(st.lists(st.integers(0, a.mlp_dim - 1), unique=True)))
        blocks.append(BlockSpec(tokens=list(tokens), heads=heads, qk=qk, v=v, mlp=mlp))
    spec.blocks = blocks
    return spec.validate()


@given(valid_specs())
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_valid_specs_round_trip(spec):
    again = SlimSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again.to_dict() == spec.to_dict()


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=False),
                                     st.text(max_size=4)),
                           lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=6), c,
                                                                                        max_size=4)), max_leaves=12)


@given(valid_specs(), st.data())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_broken_specs_are_refused_with_a_slim_error(spec, data):
    d = spec.to_dict()
    path = data.draw(st.sampled_from([("blocks",), ("arch",), ("source",), ("schema",), ("meta",)]
                                     + [("blocks", i, k) for i in range(len(d["blocks"]))
                                        for k in ("tokens", "heads", "qk", "v", "mlp")]))
    target = d
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = data.draw(json_values)
    try:
        SlimSpec.from_dict(json.loads(json.dumps(d)))
    except SlimError:
        pass
