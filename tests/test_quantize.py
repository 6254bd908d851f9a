"""Quantization: an int8 export that runs in ONNX Runtime, its agreement with fp32 reported, the --max-drop gate,
profiles of one precision refused for another, int8 and bf16 backends."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from slimdeploy.errors import SlimError
from slimdeploy.latency.backends import get_backend
from slimdeploy.models import arch_of, data_config

from .conftest import tiny_model
from .synthetic import staircase_profile
from .test_gpu_paths import _exported_run


@pytest.fixture(scope="module")
def quantized_run(tmp_path_factory):
    from slimdeploy.data import load_data
    from slimdeploy.quantize import QuantConfig, quantize_run

    run = _exported_run(tmp_path_factory.mktemp("q"))
    (run / "export.json").write_text(json.dumps({"batch_size": None}))
    data = load_data("synthetic", data_config(tiny_model("t-demo")), 10, 256, 64)
    rec = quantize_run(run, data, QuantConfig(images=64))
    return run, data, rec


def test_quantized_export_runs_in_onnx_runtime(quantized_run):
    run, data, rec = quantized_run
    from slimdeploy.quantize import QuantConfig, calibration_batches, quantize_onnx

    model = onnx.load(str(run / "model.int8.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    assert rec["method"] == "minmax" and rec["images"] == 64 and rec["nodes_kept_fp32"] > 0
    # the layers kept in fp32 are kept: quantizing everything puts more Q/DQ pairs in the graph
    everything = quantize_onnx(run / "model.onnx", run / "all.onnx", calibration_batches(data, 16, 16),
                               QuantConfig(images=16, keep_fp32=[]))
    assert everything["nodes_kept_fp32"] == 0
    all_ops = [n.op_type for n in onnx.load(str(run / "all.onnx")).graph.node]
    assert all_ops.count("QuantizeLinear") > ops.count("QuantizeLinear")
    sess = get_backend("ort-cpu", precision="int8").load_onnx(run / "model.int8.onnx", quantized=True)
    fp32 = get_backend("ort-cpu").load_onnx(run / "model.onnx")
    x = np.random.default_rng(0).standard_normal((8, 1, 16, 16)).astype(np.float32)
    q, f = sess.run(x), fp32.run(x)
    assert q.shape == f.shape and np.isfinite(q).all()
    assert np.abs(q - f).max() < 0.5 * np.abs(f).max()  # quantized, not broken


def test_verify_reports_the_int8_model_beside_its_fp32_twin_and_gates_on_the_drop(quantized_run, monkeypatch):
    from slimdeploy import verify

    run, data, _ = quantized_run
    rep = verify.verify(run, data, backend="ort-cpu", precision="int8", max_quant_drop=100.0)
    q = rep.accuracy["quantized"]
    assert 0.0 <= q["agreement"] <= 1.0 and q["agreement"] == rep.parity.top1_agreement
    assert q["fp32_twin_top1"] == rep.extra["pytorch_slim_top1"] and q["top1"] == rep.slim.top1
    assert q["drop"] == pytest.approx(q["fp32_twin_top1"] - q["top1"])
    assert rep.extra["fp32_twin_timing"]["median_ms"] > 0 and rep.extra["quantize"]["method"] == "minmax"
    assert q["passed"] and not any("fp32 twin" in f for f in rep.failures())
    strict = verify.verify(run, data, backend="ort-cpu", precision="int8", max_quant_drop=q["drop"] - 0.5)
    assert not strict.accuracy["quantized"]["passed"] and not strict.passed
    assert any("below its fp32 twin's, more than" in f for f in strict.failures())
    report = json.loads((run / "report.json").read_text())
    assert report["passed"] is False and report["accuracy"]["quantized"]["passed"] is False


def test_profiles_of_one_precision_are_refused_for_another(tmp_path):
    from slimdeploy.latency.model import check_profile_fits
    from slimdeploy.latency.profile import load_latency_model
    from slimdeploy.types import ModelConfig

    model = tiny_model("t-cls")
    a = arch_of(model)
    prof = staircase_profile(a)
    prof.precision = "int8"
    with pytest.raises(SlimError, match="measured at int8, not fp32.*--precision fp32"):
        check_profile_fits(prof, a, precision="fp32")
    prof.precision = "fp32"
    prof.save(tmp_path / "fp32.json")
    with pytest.raises(SlimError, match="measured at fp32, not int8.*--precision int8"):
        load_latency_model(str(tmp_path / "fp32.json"), model, ModelConfig("t-cls"), precision="int8")


def test_backends_run_the_precisions_they_support():
    x = torch.randn(2, 4)
    lin = torch.nn.Linear(4, 3)
    q = get_backend("ort-cpu", precision="int8").load_module(lin, x)  # quantized for timing on load
    assert q.run(x.numpy()).shape == (2, 3)
    bf16 = get_backend("torch", precision="bf16", torch_device="cpu").load_module(lin)
    assert np.allclose(bf16.run(x.numpy()), lin(x).detach().numpy(), atol=5e-2)
    for name, precision, needle in (("torch", "int8", "does not run int8"), ("ort-cpu", "bf16", "does not run bf16"),
                                    ("ort-cpu", "fp64", "--precision must be one of")):
        with pytest.raises(SlimError, match=needle):
            get_backend(name, precision=precision, torch_device="cpu")


def test_an_int8_profile_measures_quantized_pieces(tmp_path):
    from slimdeploy.latency.profile import profile_device
    from slimdeploy.types import ModelConfig

    p = profile_device("t", get_backend("ort-cpu", precision="int8"), tiny_model("t-demo"), ModelConfig("t-demo"), 1,
                       tmp_path / "p.json", step=32, token_points=2, calibration_models=2)
    assert p.precision == "int8" and p.tables["mlp"]["ms"][-1][-1] > 0


def test_precision_auto_keeps_the_precision_whose_best_structure_scores_best():
    from slimdeploy.latency.model import LatencyModel
    from slimdeploy.select.stage import SelectOptions, _choose_precision
    from slimdeploy.select.target import parse_target
    from slimdeploy.types import ModelConfig, SlimSpec

    from .test_select import _dead_mlp_toy

    model, a, imp, scorer = _dead_mlp_toy()
    fp32 = staircase_profile(a)
    int8 = staircase_profile(a)
    int8.precision = "int8"
    int8.calibration = {"scale_fixed": 0.5, "scale_tokens": 0.5}  # an engine twice as fast
    lms = [LatencyModel(fp32), LatencyModel(int8)]
    record = {}
    dense = SlimSpec.dense(ModelConfig("t-demo"), a)
    chosen = _choose_precision(lms, imp, a, ModelConfig("t-demo"), parse_target("60%"), dense, model, model,
                               scorer.bundle, SelectOptions(calibration_images=64), record)
    opts = {r["precision"]: r for r in record["precision_auto"]["options"]}
    assert set(opts) == {"fp32", "int8"} and all(r["reaches"] and r["loss"] >= 0 for r in opts.values())
    best = min(opts.values(), key=lambda r: r["loss"])["precision"]
    assert chosen.profile.precision == best == record["precision_auto"]["chosen"]
    # on the twice-as-fast int8 tables the same target leaves room for a larger structure
    assert opts["int8"]["predicted_ms"] <= 0.6 * 0.95 * lms[0].predict(dense) + 1e-9
