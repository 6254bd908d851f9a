"""End to end on a tiny model and synthetic data: profile -> train -> search -> select (closed loop)
-> prune -> retrain -> export -> verify, through the same function `slimdeploy run` calls."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import slimdeploy
from slimdeploy.backends import get_backend
from slimdeploy.models import create_model
from slimdeploy.pipeline import RunOptions, run_pipeline
from slimdeploy.profile import profile_device
from slimdeploy.types import DeviceProfile, ModelConfig, SlimSpec
from slimdeploy.verify import report_dict_schema_errors


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    profiles = root / "profiles"
    model = create_model(ModelConfig("t-demo"))
    profile_device("tiny-cpu", get_backend("ort-cpu"), model, ModelConfig("t-demo"), 1, profiles / "tiny-cpu.json",
                   step=8, token_points=3, calibration_models=3, per_call_s=0.01)
    opts = RunOptions(out=root / "run", target_latency="75%", device="tiny-cpu", profiles_dir=profiles,
                      model="t-demo", data="synthetic", train_limit=512, val_limit=256, batch_size=64,
                      train_epochs=3, search_epochs=1, retrain_epochs=1, rounds=3, torch_device="cpu")
    report = run_pipeline(opts)
    return root, opts, report


def test_artifacts_exist(run):
    root, opts, report = run
    r = opts.out
    for name in ("model.json", "base.safetensors", "search/masks.safetensors", "search/weights.safetensors",
                 "search/structure.png", "spec.json", "select.json", "structure.png", "pruned.safetensors",
                 "prune.json", "slim.safetensors", "retrain.json", "model.onnx", "export.json", "report.json",
                 "report.md", "report.png"):
        assert (r / name).is_file(), name


def test_report_schema_and_parity(run):
    root, opts, report = run
    d = json.loads((opts.out / "report.json").read_text())
    assert report_dict_schema_errors(d) == []
    assert d["parity"]["max_abs_diff"] <= 1e-4 and d["parity"]["top1_agreement"] == 1.0
    assert d["slim"]["macs"] < d["dense"]["macs"]
    assert d["slim"]["latency_ms"] > 0 and d["dense"]["latency_ms"] > 0
    # the figures come from this run's artifacts
    spec = SlimSpec.load(opts.out / "spec.json")
    assert d["slim"]["macs"] == spec.meta["macs"]
    retrain = json.loads((opts.out / "retrain.json").read_text())
    assert d["slim"]["top1_before_retrain"] == retrain["top1_before_retrain"]
    # the teacher is the dense model itself (not the weights the search trained): same accuracy
    assert retrain["teacher_top1"] == pytest.approx(d["dense"]["top1"])


def test_closed_loop_rounds_recorded(run):
    root, opts, report = run
    sel = json.loads((opts.out / "select.json").read_text())
    assert sel["rounds"], sel
    for row in sel["rounds"]:
        assert row["measured_ms"] > 0 and row["predicted_ms"] > 0
    chosen = sel["rounds"][sel["chosen_round"] - 1]
    assert chosen["predicted_ms"] <= chosen["budget_ms"] + 1e-9


def test_load_roundtrip(run):
    root, opts, report = run
    model = slimdeploy.load(opts.out)
    # run exports at the profile's batch size (1 here): feed samples one at a time
    x = torch.randn(4, 1, 16, 16)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(opts.out / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(x).numpy()
    name = sess.get_inputs()[0].name
    got = np.concatenate([sess.run(None, {name: x[i : i + 1].numpy()})[0] for i in range(len(x))])
    assert np.abs(ref - got).max() <= 1e-4


def test_rerun_skips_every_stage(run):
    root, opts, report = run
    before = {p: p.stat().st_mtime_ns for p in opts.out.glob("*.safetensors")}
    again = run_pipeline(opts)
    after = {p: p.stat().st_mtime_ns for p in opts.out.glob("*.safetensors")}
    assert before == after
    assert again["slim"]["macs"] == report["slim"]["macs"]


def test_changed_options_are_refused(run):
    from dataclasses import replace

    from slimdeploy.errors import SlimError

    root, opts, report = run
    with pytest.raises(SlimError, match="target_latency"):
        run_pipeline(replace(opts, target_latency="40%"))


def test_profile_is_complete(run):
    root, opts, report = run
    p = DeviceProfile.load(root / "profiles" / "tiny-cpu.json")
    assert p.backend == "ort-cpu" and p.batch_size == 1 and p.threads == 1
    assert set(p.tables) == {"rest", "qkv", "proj", "mlp", "core", "stem_head"}
    assert len(p.calibration["points"]) == 3
    assert "AMD" in p.hardware or "Intel" in p.hardware or "cores" in p.hardware
    mlp = np.asarray(p.tables["mlp"]["ms"])
    assert (np.diff(mlp, axis=1) >= -1e-12).all()  # monotone in width
    g = onnx.load(str(opts.out / "model.onnx"))
    # run exports a static graph at the profile's batch size: what the loop measured
    assert g.graph.input[0].type.tensor_type.shape.dim[0].dim_value == p.batch_size


def test_verify_on_the_torch_backend(run, tmp_path):
    import shutil

    from slimdeploy.data import load_data
    from slimdeploy.models import data_config, load_dense
    from slimdeploy.verify import verify

    root, opts, report = run
    copy = tmp_path / "copy"
    shutil.copytree(opts.out, copy)
    dense, _ = load_dense(copy)
    bundle = load_data("synthetic", data_config(dense), 10, val_limit=64, with_train=False)
    rep = verify(copy, bundle, backend="torch", torch_device="cpu")
    assert rep.backend == "torch" and rep.parity.passed and rep.parity.max_abs_diff == 0.0
    assert rep.slim.latency_ms > 0 and rep.dense.latency_ms > 0
    assert json.loads((copy / "report.json").read_text())["backend"] == "torch"
