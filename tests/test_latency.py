"""The latency model on a synthetic profile: interpolation, staircase, calibration, resolution."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slimdeploy.errors import SlimError
from slimdeploy.latency import LatencyModel, Table, resolve_profile
from slimdeploy.models import arch_of
from slimdeploy.profile import fit_calibration, isotonic
from slimdeploy.types import DeviceProfile, ModelConfig, SlimSpec

from .conftest import random_spec, tiny_model
from .synthetic import staircase_profile


def test_table_is_linear_in_tokens_and_a_staircase_in_width():
    t = Table({"axes": ["tokens", "w"], "grid": {"tokens": [10, 20], "w": [8, 16, 24]},
               "ms": [[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]]})
    assert t(10, 8) == 1.0 and t(20, 24) == 5.0
    assert t(15, 16) == pytest.approx(3.0)  # halfway in tokens
    assert t(10, 9) == 2.0 and t(10, 16) == 2.0 and t(10, 17) == 3.0  # pays the next step
    assert t(10, 1) == 1.0  # below the smallest width: the smallest entry
    assert t(5, 8) == pytest.approx(0.5)  # below the smallest token count: proportional


def test_predict_is_the_calibrated_sum_of_tables():
    model = tiny_model("t-cls")
    a = arch_of(model)
    prof = staircase_profile(a)
    lm = LatencyModel(prof)
    spec = random_spec(model, 3)
    by_hand = 0.0
    for b in spec.blocks:
        n, h, q, v, m = b.num_tokens, b.num_heads, b.qk_dim, b.v_dim, b.mlp_dim
        by_hand += lm.rest(n) + lm.mlp(n, m)
        if h:
            by_hand += lm.qkv(n, h * (2 * q + v)) + lm.core(n, h, q, v) + lm.proj(n, h * v)
    assert lm.predict(spec) == pytest.approx(prof.calibration["alpha"] * by_hand + prof.calibration["beta"])
    dense = SlimSpec.dense(ModelConfig("t-cls"), a)
    assert lm.predict(spec) < lm.predict(dense)
    assert sum(sum(r.values()) for r in lm.breakdown(dense)) == pytest.approx(lm.predict(dense) - lm.beta)


def test_isotonic_removes_noise_but_keeps_steps():
    noisy = np.array([1.0, 1.02, 0.99, 1.01, 2.0, 1.98, 2.01])
    fit = isotonic(noisy)
    assert (np.diff(fit) >= 0).all()
    assert fit[3] < 1.1 and fit[4] > 1.9  # the step is still there


def test_calibration_fit_recovers_per_kind_coefficients():
    rng = np.random.default_rng(0)
    true = {"rest": 0.5, "attn": 0.9, "mlp": 0.8}
    pts = []
    for _ in range(16):
        parts = {k: float(rng.uniform(0.1, 2.0)) for k in true}
        pts.append({"parts": parts, "measured_ms": 0.2 + sum(true[k] * parts[k] for k in true)})
    cal = fit_calibration(pts)
    for k, v in true.items():
        assert cal["coef"][k] == pytest.approx(v, rel=1e-6)
    assert cal["beta"] == pytest.approx(0.2, rel=1e-6) and cal["fit_max_abs_error"] < 1e-9
    # coefficients stay >= 0 even when the data pull one below zero
    for p in pts:
        p["measured_ms"] -= 0.95 * p["parts"]["attn"]
    assert min(fit_calibration(pts)["coef"].values()) >= 0
    # with few points: one shared coefficient
    few = [{"parts": {k: r for k in true}, "measured_ms": 0.8 * 3 * r + 0.3} for r in (1.0, 2.0, 4.0)]
    cal = fit_calibration(few)
    assert set(np.round(list(cal["coef"].values()), 6)) == {0.8} and cal["beta"] == pytest.approx(0.3)


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
    with pytest.raises(SlimError, match="no profile for device 'nope'.*known: .*dev"):
        resolve_profile("nope", mine)


def test_corrupt_profile_is_one_clear_error(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SlimError, match="not valid JSON"):
        DeviceProfile.load(tmp_path / "bad.json")
    (tmp_path / "old.json").write_text(json.dumps({"schema": 99}))
    with pytest.raises(SlimError):
        DeviceProfile.load(tmp_path / "old.json")


def test_interrupted_profile_resumes(tmp_path):
    """A profile killed halfway keeps its measurements and the next call reuses them."""
    from slimdeploy.backends import get_backend
    from slimdeploy.profile import profile_device

    model = tiny_model("t-demo")
    out = tmp_path / "p.json"
    backend = get_backend("ort-cpu")
    calls = {"n": 0}
    real = backend.load_module

    def flaky(module, x):
        calls["n"] += 1
        if calls["n"] == 60:
            raise KeyboardInterrupt
        return real(module, x)

    backend.load_module = flaky
    with pytest.raises(KeyboardInterrupt):
        profile_device("t", backend, model, ModelConfig("t-demo"), 1, out, token_points=2, calibration_models=2,
                       per_call_s=0.002)
    partial = tmp_path / ".p.partial.json"
    assert partial.is_file() and not out.exists()
    saved = len(json.loads(partial.read_text())["cache"])
    assert saved >= 50
    calls["n"] = 0
    backend.load_module = lambda module, x: (calls.__setitem__("n", calls["n"] + 1), real(module, x))[1]
    profile_device("t", backend, model, ModelConfig("t-demo"), 1, out, token_points=2, calibration_models=2,
                   per_call_s=0.002)
    assert out.is_file() and not partial.exists()
    prof = json.loads(out.read_text())
    tables = prof["tables"]
    assert prof["measurements"] > 1 + sum(np.asarray(t["ms"]).size for k, t in tables.items() if k != "stem_head")
    assert calls["n"] == prof["measurements"] - saved  # only what the first attempt had not saved was measured
