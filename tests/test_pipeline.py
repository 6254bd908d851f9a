"""End to end on a tiny model and synthetic data: train -> search -> select (closed loop on an injected
measurement) -> prune -> retrain -> export -> verify, through the function `slimdeploy run` calls. No assertion
depends on how fast this machine is today: the loop's measurements are injected, and verify's timing is only
checked for being there."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import slimdeploy
from slimdeploy.latency import timing
from slimdeploy.latency.backends import get_backend
from slimdeploy.latency.model import LatencyModel
from slimdeploy.models import arch_of, create_model
from slimdeploy.pipeline import RunOptions, run_pipeline
from slimdeploy.select.target import parse_target
from slimdeploy.types import DeviceProfile, ModelConfig, SlimSpec
from slimdeploy.verify import drop_words, report_dict_schema_errors

from .synthetic import staircase_profile


def tiny_profile(folder, name="tiny-cpu"):
    """A synthetic staircase profile for t-demo that names this machine's ONNX Runtime CPU backend."""
    arch = arch_of(create_model(ModelConfig("t-demo")))
    prof = staircase_profile(arch)
    be = get_backend("ort-cpu")
    prof.device, prof.backend, prof.threads, prof.fingerprint = name, "ort-cpu", 1, be.fingerprint()
    prof.save(folder / f"{name}.json")
    return LatencyModel(prof)


def injected(lm, slowdown=1.1, dense_ms=None):
    """A device that runs `slowdown` x slower than the profile predicts, with tight intervals."""
    def m(ms):
        return timing.Measurement(ms, 0.997 * ms, 1.003 * ms, 15, 150, [ms] * 15)

    def measure(specs, long=False):
        d = dense_ms or slowdown * lm.predict(SlimSpec.dense(ModelConfig("t-demo"), arch_of(create_model(
            ModelConfig("t-demo")))))
        return m(d), [m(slowdown * lm.predict(s)) for s in specs]
    return measure


def tiny_options(root, out: str, **kw) -> RunOptions:
    """A tiny run of t-demo on synthetic data in root/out, against a tiny profile written to root, its closed
    loop measuring through `injected`; kw overrides."""
    lm = tiny_profile(root)
    base = dict(out=root / out, target=parse_target("75%"), device="tiny-cpu", profiles_dir=root, model="t-demo",
                data="synthetic", batch_size=64, torch_device="cpu", measure=injected(lm))
    return RunOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    opts = tiny_options(root, "run", train_limit=512, val_limit=256, train_epochs=3, search_epochs=1,
                        retrain_epochs=1, rounds=3, calibration_images=256, recovery_steps=10)
    report = run_pipeline(opts)
    return root, opts, report


def test_artifacts_exist(run):
    root, opts, report = run
    r = opts.out
    for name in ("model.json", "base.safetensors", "search/masks.safetensors", "search/weights.safetensors",
                 "search/structure.png", "spec.json", "select.json", "structure.png", "candidates.png",
                 "pruned.safetensors", "prune.json", "slim.safetensors", "retrain.json", "model.onnx", "export.json",
                 "report.json", "report.md", "report.png", "run.json"):
        assert (r / name).is_file(), name


def test_report_schema_and_parity(run):
    root, opts, report = run
    d = json.loads((opts.out / "report.json").read_text())
    assert report_dict_schema_errors(d) == []
    assert d["parity"]["max_abs_diff"] <= 1e-4 and d["parity"]["top1_agreement"] == 1.0
    assert d["slim"]["macs"] < d["dense"]["macs"]
    assert 0 < d["slim"]["latency_low_ms"] <= d["slim"]["latency_ms"] <= d["slim"]["latency_high_ms"]
    spec = SlimSpec.load(opts.out / "spec.json")
    assert d["slim"]["macs"] == spec.meta["macs"]
    retrain = json.loads((opts.out / "retrain.json").read_text())
    assert d["slim"]["top1_before_retrain"] == retrain["top1_before_retrain"]
    # the teacher is the dense model itself (not the weights the search trained): same accuracy
    assert retrain["teacher_top1"] == pytest.approx(d["dense"]["top1"])
    # the accuracy guard is reported, and decides `passed` with parity and the target
    assert d["accuracy"]["drop"] == pytest.approx(d["dense"]["top1"] - d["slim"]["top1"])
    assert d["accuracy"]["passed"] == (d["accuracy"]["drop"] <= 1.5)
    assert d["passed"] == (not d["failures"])
    # the percentage target is taken of the dense model measured beside the slim one, decided on the interval
    assert d["target_latency_ms"] == pytest.approx(0.75 * d["dense"]["latency_ms"])
    assert d["met_target"] == (d["extra"]["slim_over_dense"]["high_ms"] <= 0.75)
    # the report says the drop in words, with its sign read for the user
    assert drop_words(d["accuracy"]["drop"]) in (opts.out / "report.md").read_text()


def test_drop_words_say_which_side_of_dense():
    assert drop_words(1.234) == "1.23 points below dense"
    assert drop_words(-0.72) == "0.72 points above dense"
    assert drop_words(0.001) == "level with dense"
    assert drop_words(None) == "top-1 change unknown"


def test_select_records_every_candidate_and_the_loop(run):
    root, opts, report = run
    sel = json.loads((opts.out / "select.json").read_text())
    cands = sel["candidates"]
    assert len(cands) >= 5 and cands[0]["family"].startswith("ViT-Slim's equal fractions")
    for c in cands:
        assert c["predicted_ms"] > 0 and c["loss"] >= 0 and "agreement" in c
    chosen = cands[sel["chosen_index"]]
    assert chosen["family"] == sel["chosen"] and "lowest distillation loss after recovery" in sel["why"]
    recovered = [c for c in cands if "loss_after_recovery" in c]
    assert chosen["loss_after_recovery"] == min(c["loss_after_recovery"] for c in recovered)
    assert cands[0] in recovered  # ViT-Slim's rule is always scored the same way
    # the loop: a percentage of the injected dense latency, the device 10% slower than the profile
    assert sel["target_ms"] == pytest.approx(0.75 * sel["dense_measured_ms"])
    for row in sel["measured"]:
        assert row["measured_ms"] == pytest.approx(1.1 * row["predicted_ms"], rel=0.01)
    kept = sel["measured"][sel["chosen_measured"]]
    assert sel["rounds"] == 1 and kept["round"] == sel["chosen_round"] == 1
    assert sel["met"] and 0.9 <= kept["y"] <= 1.0
    assert sel["refit"]["a"] == pytest.approx(1.1, rel=0.01)
    assert sel["scoring_seconds"] > 0 and sel["search_seconds"] > 0


def test_load_roundtrip(run):
    root, opts, report = run
    model = slimdeploy.load(opts.out)
    x = torch.randn(4, 1, 16, 16)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(opts.out / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(x).numpy()
    name = sess.get_inputs()[0].name  # exported at the profile's batch size (1): one image at a time
    got = np.concatenate([sess.run(None, {name: x[i: i + 1].numpy()})[0] for i in range(len(x))])
    assert np.abs(ref - got).max() <= 1e-4
    g = onnx.load(str(opts.out / "model.onnx"))
    assert g.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def test_rerun_skips_every_stage(run):
    root, opts, report = run
    before = {p: p.stat().st_mtime_ns for p in opts.out.rglob("*") if p.is_file() and p.name != ".lock"
              and p.name not in ("report.json", "report.md", "report.png", "run.json")}
    again = run_pipeline(opts)
    after = {p: p.stat().st_mtime_ns for p in before}
    assert before == after
    assert again["slim"]["macs"] == report["slim"]["macs"]


def test_changed_target_reselects_and_what_follows(run, tmp_path):
    import shutil
    from dataclasses import replace

    root, opts, report = run
    copy = tmp_path / "copy"
    shutil.copytree(opts.out, copy)
    search_before = (copy / "search" / "masks.safetensors").stat().st_mtime_ns
    spec_before = (copy / "spec.json").read_text()
    again = run_pipeline(replace(opts, out=copy, target=parse_target("60%")))
    assert (copy / "search" / "masks.safetensors").stat().st_mtime_ns == search_before  # search kept
    assert (copy / "spec.json").read_text() != spec_before  # select ran again, and the stages after it
    assert json.loads((copy / "spec.json").read_text())["meta"]["target_fraction"] == 0.6
    assert again["slim"]["macs"] == json.loads((copy / "spec.json").read_text())["meta"]["macs"]


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


def test_profile_records_its_machine(run):
    root, opts, report = run
    p = DeviceProfile.load(root / "tiny-cpu.json")
    assert p.fingerprint["kind"] == "cpu" and p.fingerprint["runtime"] == "ort-cpu"


@pytest.mark.parametrize("mode", ["attentive", "fused"])
def test_attentive_token_mode_end_to_end(tmp_path, mode):
    """--token-mode attentive (and fused) through search, select (ViT-Slim's fractions keeping half the tokens),
    prune (checked against the hard-masked model of the rank masks; fused: as its attentive twin), retrain,
    export and verify: the spec is a count per block, the exported graph ranks with TopK, and ONNX matches
    PyTorch."""
    opts = tiny_options(tmp_path, "run", target=parse_target(keep=(None, None, 0.5)), train_limit=512,
                        val_limit=256, train_epochs=2, search_epochs=1, retrain_epochs=1, token_mode=mode)
    report = run_pipeline(opts)
    spec = SlimSpec.load(opts.out / "spec.json")
    counts = spec.token_counts()
    assert spec.token_mode == mode and counts[0] == spec.arch.num_tokens > counts[-1]
    assert all(b.tokens == list(range(b.num_tokens)) for b in spec.blocks)
    pruned = json.loads((opts.out / "prune.json").read_text())
    assert (spec.rank_prior is None) == (mode == "fused")  # attentive mode ranks with the positions' prior
    masks = __import__("safetensors.torch").torch.load_file(str(opts.out / "search" / "masks.safetensors"))
    assert masks["taylor.pos"].shape == (spec.arch.depth, spec.arch.num_patches) and (masks["taylor.pos"] > 0).any()
    assert pruned["passed"] and pruned.get("checked_as") == (
        "attentive twin" if mode == "fused" else "attentive twin, ranking by attention")
    ops = {n.op_type for n in onnx.load(str(opts.out / "model.onnx")).graph.node}
    assert "TopK" in ops
    assert report["parity"]["max_abs_diff"] <= 1e-4 and report["parity"]["top1_agreement"] == 1.0


def test_embedding_width_end_to_end(tmp_path):
    """--embed through search (the embedding mask), select (ViT-Slim's fractions keeping half the channels), prune
    (checked against the hard-masked twin), retrain, export and verify: every layer on the stream is narrower,
    and ONNX matches PyTorch."""
    opts = tiny_options(tmp_path, "run", target=parse_target(keep=(None, 0.75, None, 0.5)), train_limit=512,
                        val_limit=256, train_epochs=2, search_epochs=1, retrain_epochs=1, search_embed=True)
    report = run_pipeline(opts)
    spec = SlimSpec.load(opts.out / "spec.json")
    assert spec.embed_dim == spec.arch.embed_dim // 2
    masks = __import__("safetensors.torch").torch.load_file(str(opts.out / "search" / "masks.safetensors"))
    assert masks["embed"].shape == (spec.arch.embed_dim,) and "taylor.embed" in masks
    assert json.loads((opts.out / "prune.json").read_text())["passed"]
    g = onnx.load(str(opts.out / "model.onnx")).graph
    conv = next(t for t in g.initializer if t.name.endswith("patch_embed.proj.weight"))
    assert conv.dims[0] == spec.embed_dim
    assert report["parity"]["max_abs_diff"] <= 1e-4 and report["parity"]["top1_agreement"] == 1.0
