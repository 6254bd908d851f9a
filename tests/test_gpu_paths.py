"""The GPU and TensorRT paths, as far as a CPU reaches them: TF32 off for fp32, the provider check, device-side
counts, synchronising the model's own device, batch clamping to an engine's profile, backend and precision taken
from the profile, fp16 graphs with LayerNorm and Softmax kept in fp32, and the prepared GPU check script."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from slimdeploy.errors import SlimError
from slimdeploy.latency.backends import OrtBackend, TorchBackend, device_sync, disable_tf32

from .conftest import random_spec, tiny_model


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """A stand-in `tensorrt` module (enums and a version) and a visible GPU: enough to build configs."""
    def install(version: str):
        trt = types.SimpleNamespace(__version__=version, MemoryPoolType=types.SimpleNamespace(WORKSPACE="workspace"))
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        return trt
    return install


@pytest.mark.parametrize("version", ["10.8.0", "11.0.0"])
def test_tensorrt_configs_turn_tf32_off_and_use_the_timing_cache(fake_tensorrt, tmp_path, version):
    from slimdeploy.trt import build_config

    fake_tensorrt(version)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"x")
    shapes = {"x": ((1, 3, 8, 8), (4, 3, 8, 8), (64, 3, 8, 8))}
    cfg = build_config(fp16=False, shapes=shapes, timing_cache=cache)
    assert cfg.tf32 is False and cfg.fp16 is False
    assert str(cfg.timing_cache_path) == str(cache)
    assert cfg.memory_pool_limits == {"workspace": 4 << 30}
    fp16 = build_config(fp16=True, shapes=None, timing_cache=None)
    # TensorRT 10 takes the FP16 flag; 11 has none (its fp16 is an fp16 graph, strongly typed)
    assert fp16.fp16 is (version.startswith("10"))


def test_engine_profiles_are_tuned_at_the_deployment_batch():
    from slimdeploy.trt import profile_shapes

    assert profile_shapes("x", [None, 3, 8, 8], 1, 16, 64) == {"x": ((1, 3, 8, 8), (16, 3, 8, 8), (64, 3, 8, 8))}
    assert profile_shapes("x", [None, 3, 8, 8], 1, 128, 64)["x"][1] == (64, 3, 8, 8)  # opt inside [min, max]
    assert profile_shapes("x", [2, 3, 8, 8], 1, 16, 64) is None  # a static engine has no profile


def test_ort_cuda_turns_tf32_off_and_refuses_a_cpu_fallback():
    be = OrtBackend.__new__(OrtBackend)
    be.device, be.name, be.threads = "cuda", "ort-cuda", 1
    assert be.providers() == [("CUDAExecutionProvider", {"use_tf32": 0})]

    class FakeSession:  # what ORT returns when the CUDA provider's libraries fail to load
        def __init__(self, *a, **kw):
            pass

        def get_providers(self):
            return ["CPUExecutionProvider"]
    be.ort = types.SimpleNamespace(InferenceSession=FakeSession, SessionOptions=lambda: types.SimpleNamespace(),
                                   GraphOptimizationLevel=types.SimpleNamespace(ORT_ENABLE_ALL=99))
    with pytest.raises(SlimError, match="could not load its CUDA provider and would run on the CPU"):
        be.session(b"model")


def test_torch_fp32_reference_on_cuda_turns_tf32_off(monkeypatch):
    from slimdeploy.verify import TorchRunner, reference_device

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    class Module:  # stands for a model moved to the GPU
        def to(self, *a):
            return self

        def eval(self):
            return self
    TorchRunner(Module(), (1, 8, 8), device="cuda").activate_impl()
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    disable_tf32()
    assert not torch.backends.cuda.matmul.allow_tf32
    assert reference_device() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert reference_device() == "cuda"  # the fp32 reference and dense accuracy run on the GPU when there is one


def test_timing_waits_on_the_models_own_device(monkeypatch):
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    sync = device_sync(torch.device("cuda", 1))
    sync()
    assert waited == [torch.device("cuda", 1)]
    assert device_sync(torch.device("cpu")) is None


def test_eval_counts_live_on_the_models_device():
    from slimdeploy.trainer import eval_counts

    assert eval_counts(torch.device("meta")).device.type == "meta"  # NCCL all-reduces device tensors only


def test_bf16_is_used_only_where_it_is_native(monkeypatch):
    from slimdeploy.trainer import bf16_native

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    assert not bf16_native(torch.device("cuda", 0))  # T4: emulated, so training stays fp32
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert bf16_native(torch.device("cuda", 0))


def test_loaders_pin_memory_for_cuda():
    from slimdeploy.data import make_loader
    from slimdeploy.trainer import TrainConfig  # noqa: F401  (the trainer passes pin_memory=cuda)

    ds = torch.utils.data.TensorDataset(torch.zeros(4, 1), torch.zeros(4))
    assert make_loader(ds, None, 2, False, pin_memory=True).pin_memory
    assert not make_loader(ds, None, 2, False).pin_memory


def test_fp16_graphs_keep_layernorm_and_softmax_in_fp32(tmp_path):
    import onnx

    from slimdeploy.export import export_onnx
    from slimdeploy.slim import build_slim
    from slimdeploy.trt import FP32_OPS, fp16_onnx

    model = tiny_model("t-cls")
    path = export_onnx(build_slim(random_spec(model, 2), model), tmp_path / "m.onnx", (3, 16, 16), 2)
    for src in (path, path.read_bytes()):  # a path and bytes alike (TensorRT 11's fp16 needs both)
        g = onnx.load_from_string(fp16_onnx(src)).graph
        types_ = {i.name: i.data_type for i in g.initializer}
        assert g.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 input and output kept
        assert onnx.TensorProto.FLOAT16 in types_.values()
        for node in g.node:
            if node.op_type == "LayerNormalization":
                assert all(types_.get(i, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT for i in node.input[1:])
        assert {"LayerNormalization", "Softmax"} <= set(FP32_OPS)


def test_ort_timing_binds_inputs_and_outputs_once():
    from slimdeploy.export import onnx_bytes
    from slimdeploy.latency.backends import get_backend

    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    sess = get_backend("ort-cpu").load_onnx(onnx_bytes(lin, x))
    calls = []
    real_run = sess.sess.run
    sess.sess.run = lambda *a, **kw: (calls.append(1), real_run(*a, **kw))[1]
    fn, sync = sess.timed(x.numpy())
    n = len(calls)  # one run to learn the output shapes
    for _ in range(5):
        fn()
    assert len(calls) == n and sync is None  # the timed calls go through the binding, not run()


def test_a_trt_session_frees_its_runner(monkeypatch):
    import polygraphy.backend.trt as ptrt

    from slimdeploy.latency import backends

    class FakeRunner:
        def __init__(self, engine):
            self.is_active = False

        def activate(self):
            self.is_active = True

        def deactivate(self):
            self.is_active = False

        def get_input_metadata(self):
            return {"x": None}
    monkeypatch.setattr(ptrt, "TrtRunner", FakeRunner)
    monkeypatch.setattr(ptrt, "EngineFromBytes", lambda plan: plan)
    with backends.TrtSession(b"plan") as s:
        assert s.runner.is_active
    assert not s.runner.is_active  # its CUDA stream and context go with it


def test_verify_clamps_the_batch_to_an_engines_profile(monkeypatch, tmp_path):
    """An engine built for batches 1-8 is fed eval batches of 8 (not 256), the last one padded."""
    from polygraphy.backend.base import BaseRunner

    from slimdeploy import trt, verify
    from slimdeploy.data import load_data
    from slimdeploy.latency.backends import get_backend
    from slimdeploy.models import data_config

    run = _exported_run(tmp_path)
    (run / "model.plan").write_bytes(b"engine")
    seen = []

    class EngineRunner(BaseRunner):  # enforces the engine's shape range, computes with ONNX Runtime
        def __init__(self):
            super().__init__(name="fake-trt")
            self.sess = get_backend("ort-cpu").load_onnx(run / "model.onnx")

        def get_input_metadata_impl(self):
            from polygraphy.common import TensorMetadata
            return TensorMetadata().add("x", np.float32, shape=("batch", 1, 16, 16))

        def infer_impl(self, feed):
            x = feed["x"]
            seen.append(len(x))
            assert 1 <= len(x) <= 8, f"batch {len(x)} outside the engine's profile"
            self.inference_time = 0.0  # polygraphy's runners report their last inference's time
            return {"logits": self.sess.run(x)}

        def activate_impl(self):
            pass

        def deactivate_impl(self):
            pass
    monkeypatch.setattr(trt, "engine_batch_range", lambda plan: (1, 8))
    monkeypatch.setattr(verify, "deployed_runner", lambda *a: (EngineRunner(), "fp32"))
    monkeypatch.setattr(verify, "get_backend", lambda name, *a, **kw: get_backend("ort-cpu"))
    monkeypatch.setattr(verify, "_measure", lambda *a: _fake_timing())
    model = tiny_model("t-demo")
    data = load_data("synthetic", data_config(model), 10, val_limit=20, with_train=False)
    rep = verify.verify(run, data, backend="trt", eval_batch=256)
    assert set(seen) == {8} and rep.parity.passed and rep.parity.samples == 20


def _fake_timing():
    from slimdeploy.latency.timing import MODEL, Measurement

    m = Measurement(1.0, 0.99, 1.01, 15, 100, [1.0] * 15)
    return m, m, None, MODEL  # slim, dense, the int8 model's fp32 twin (none at fp32), the protocol kept


def _exported_run(tmp_path) -> Path:
    from slimdeploy.export import export_onnx
    from slimdeploy.models import save_dense
    from slimdeploy.prune import prune
    from slimdeploy.types import ModelConfig

    model = tiny_model("t-demo")
    run = tmp_path / "run"
    save_dense(model, ModelConfig("t-demo"), run)
    spec = random_spec(model, 3)
    spec.source = ModelConfig("t-demo")
    spec.save(run / "spec.json")
    slim, _ = prune(spec, model, run, torch.randn(4, 1, 16, 16))
    export_onnx(slim, run / "model.onnx", (1, 16, 16), None)
    (run / "export.json").write_text(json.dumps({"batch_size": None, "precision": "fp32"}))
    return run


def test_run_takes_backend_and_precision_from_the_profile(tmp_path, monkeypatch):
    from slimdeploy import verify
    from slimdeploy.latency.model import model_signature
    from slimdeploy.models import arch_of
    from slimdeploy.pipeline import RunOptions, deployment
    from slimdeploy.runs import Run
    from slimdeploy.select.target import parse_target
    from slimdeploy.types import SlimSpec

    from .synthetic import staircase_profile

    run = _exported_run(tmp_path)
    prof = staircase_profile(arch_of(tiny_model("t-demo")), batch=4)
    prof.backend, prof.precision, prof.model = "trt", "fp16", model_signature(arch_of(tiny_model("t-demo")))
    prof.torch_device = None
    prof.save(tmp_path / "a100.json")
    spec = SlimSpec.load(run / "spec.json")
    spec.meta["profile_path"] = str(tmp_path / "a100.json")
    spec.save(run / "spec.json")
    o = RunOptions(out=run, target=parse_target("50%"))
    assert deployment(Run(run), o) == (True, "fp16", 4)  # a TRT fp16 profile: a TRT fp16 engine at batch 4
    got = {}
    monkeypatch.setattr(verify, "verify", lambda *a, **kw: got.update(args=a, kw=kw))
    monkeypatch.setattr(verify, "get_backend", lambda *a, **kw: types.SimpleNamespace(fingerprint=lambda: {}))
    verify.verify_run(run, None)
    backend, batch = got["args"][2], got["args"][3]
    assert (backend, batch) == ("trt", 4) and got["args"][10] == "fp16"  # precision

    prof.backend, prof.precision, prof.torch_device = "torch", "fp32", "cuda:1"
    prof.save(tmp_path / "a100.json")
    verify.verify_run(run, None)
    assert got["args"][2] == "torch" and got["args"][9] == "cuda:1"  # a torch profile's device is used


def test_torch_profiles_record_their_device(tmp_path):
    from slimdeploy.latency.profile import profile_device
    from slimdeploy.types import ModelConfig

    p = profile_device("t", TorchBackend("cpu", threads=1), tiny_model("t-demo"), ModelConfig("t-demo"), 1,
                       tmp_path / "p.json", token_points=2, calibration_models=2)
    assert p.backend == "torch" and p.torch_device == "cpu" and p.torch_mode == "eager"


def test_gpu_check_script_runs_on_cpu(tmp_path):
    script = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
    r = subprocess.run([sys.executable, str(script), "--cpu", "--tiny", "--out", str(tmp_path)], capture_output=True,
                       text=True, timeout=900, env={**__import__("os").environ, "SLIMDEPLOY_QUIET": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = res["steps"]
    assert set(steps) == {"1_parity_tf32", "2_timing_vs_events", "3_train_search_bf16", "4_profile_torch",
                          "5_closed_loop", "6_retrain_verify"}
    bad = {k: v.get("error") for k, v in steps.items() if not v["ok"]}
    assert not bad, bad
    assert steps["1_parity_tf32"]["fp32_parity_1e-4_with_tf32_off"]
    assert steps["3_train_search_bf16"]["losses_finite"]
    assert steps["3_train_search_bf16"]["resume_max_mask_diff"] < 1e-5
    assert steps["6_retrain_verify"]["parity_passed"] and steps["6_retrain_verify"]["retrain_losses_finite"]
