"""Stage: verify the deployed model. Parity with PyTorch, accuracy, measured latency, the report.

Parity runs through polygraphy's Comparator: the PyTorch slim model (fp32, CPU) is one runner, the
deployment engine (ONNX Runtime, TensorRT, or torch on another device/precision) the other; every
eval batch goes through both. Invariant 3: fp32 needs max |diff| <= 1e-4 and 100% top-1
agreement; fp16 needs >= 99.5% top-1 agreement. A failed check still writes the report (saying
why) and makes the command exit non-zero.
"""

from __future__ import annotations

import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.comparator import Comparator
from polygraphy.logger import G_LOGGER

from .analysis import spec_macs, spec_params
from .backends import get_backend
from .data import make_loader
from .errors import SlimError
from .export import export_onnx, slim_of_run
from .fileio import atomic_write_bytes, read_json, write_json
from .models import load_dense
from .profile import measure_model
from .types import ModelFigures, Parity, Report, SlimSpec

FP32_ATOL = 1e-4
FP16_AGREEMENT = 0.995


class TorchRunner(BaseRunner):
    """A polygraphy runner over a torch module (polygraphy has none built in)."""

    def __init__(self, module: torch.nn.Module, input_shape: tuple[int, int, int], name: str = "pytorch",
                 device: str = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(name=name, prefix="torch-runner")
        self.module, self.device, self.dtype, self.input_shape = module, device, dtype, input_shape

    def activate_impl(self):
        self.module = self.module.to(self.device, self.dtype).eval()

    def get_input_metadata_impl(self):
        from polygraphy.common import TensorMetadata

        return TensorMetadata().add("x", np.float32, shape=("batch", *self.input_shape))

    @torch.no_grad()
    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        x = torch.as_tensor(feed_dict["x"]).to(self.device, self.dtype)
        out = OrderedDict(logits=self.module(x).float().cpu().numpy())
        self.inference_time = time.perf_counter() - start  # polygraphy sums these
        return out

    def deactivate_impl(self):
        pass


def deployed_runner(run_dir: Path, backend: str, threads: int | None, torch_device: str, slim_module, input_shape):
    """The polygraphy runner for the deployed artifact on `backend`, and its precision."""
    if backend in ("ort-cpu", "ort-cuda"):
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

        get_backend(backend, threads)  # one clear line if the package/provider is missing
        onnx = run_dir / "model.onnx"
        if not onnx.is_file():
            raise SlimError(f"{onnx} not found: run 'slimdeploy export {run_dir}' first")
        provider = "CUDAExecutionProvider" if backend == "ort-cuda" else "CPUExecutionProvider"
        return OnnxrtRunner(SessionFromOnnx(str(onnx), providers=[provider])), "fp32"
    if backend == "trt":
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        from .trt import require_tensorrt

        require_tensorrt()
        plan = run_dir / "model.plan"
        if not plan.is_file():
            raise SlimError(f"{plan} not found: run 'slimdeploy export {run_dir} --trt' first")
        export = read_json(run_dir / "export.json", "export record")
        return TrtRunner(EngineFromBytes(plan.read_bytes())), export.get("precision", "fp32")
    if backend == "torch":
        be = get_backend("torch", threads, torch_device=torch_device)
        return TorchRunner(slim_module, input_shape, name="torch-deployed", device=str(be.device)), "fp32"
    raise SlimError(f"unknown backend '{backend}'")


def static_batch(run_dir: Path, backend: str) -> int | None:
    """The fixed batch size of the deployed artifact, or None when its batch axis is dynamic."""
    if backend in ("ort-cpu", "ort-cuda"):
        import onnx

        graph = onnx.load(str(run_dir / "model.onnx"), load_external_data=False).graph
        return graph.input[0].type.tensor_type.shape.dim[0].dim_value or None
    if backend == "trt" and (run_dir / "export.json").is_file():
        return read_json(run_dir / "export.json", "export record").get("batch_size")
    return None


def check_parity(results, labels: list[np.ndarray], precision: str) -> tuple[Parity, dict]:
    ref_name, dep_name = results[0][0], results[1][0]
    # outputs of padded rows (a fixed-batch engine's last batch) are dropped
    ref = np.concatenate([o["logits"][:len(y)] for o, y in zip(results[0][1], labels)])
    dep = np.concatenate([np.asarray(next(iter(o.values())), dtype=np.float32)[:len(y)]
                          for o, y in zip(results[1][1], labels)])
    y = np.concatenate(labels)
    diff = float(np.abs(ref - dep).max())
    agree = float((ref.argmax(1) == dep.argmax(1)).mean())
    passed = (diff <= FP32_ATOL and agree == 1.0) if precision == "fp32" else agree >= FP16_AGREEMENT
    acc = {"deployed_top1": float(100 * (dep.argmax(1) == y).mean()),
           "pytorch_top1": float(100 * (ref.argmax(1) == y).mean()), "reference": ref_name, "deployed": dep_name}
    return Parity(backend="", max_abs_diff=diff, top1_agreement=agree, passed=passed, samples=len(y)), acc


def verify(run_dir: str | Path, data, backend: str = "ort-cpu", batch_size: int = 1, threads: int | None = 1,
           target_ms: float | None = None, device: str | None = None, lm=None, torch_device: str = "auto",
           eval_batch: int = 256, measure_dense: bool = True) -> Report:
    """Compare, measure and write report.json / report.md / report.png in run_dir."""
    run_dir = Path(run_dir)
    slim, spec, stem = slim_of_run(run_dir)
    dense, cfg = load_dense(run_dir)
    a = spec.arch
    shape = (a.in_chans, a.img_size, a.img_size)
    runner, precision = deployed_runner(run_dir, backend, threads, torch_device, slim, shape)
    static = static_batch(run_dir, backend)
    loader = make_loader(data.val, data.transform, static or eval_batch, False)
    feeds, labels = [], []
    for x, y in loader:
        n = len(y)
        if static and n < static:  # a fixed-batch engine: pad the last batch, drop the padding after
            x = torch.cat([x, x[:1].expand(static - n, *x.shape[1:])])
        feeds.append({"x": x.numpy().astype(np.float32)})
        labels.append(y.numpy())
    G_LOGGER.module_severity = G_LOGGER.ERROR  # polygraphy's per-batch chatter
    results = Comparator.run([TorchRunner(slim, shape), runner], data_loader=feeds)
    parity, acc = check_parity(results, labels, precision)
    parity.backend = backend
    # accuracy of the dense model, from the same eval images
    dense_top1 = 100.0 * _accuracy(dense, feeds, labels)  # padded rows are not counted
    # latency on the chosen backend at the deployment batch size
    be = get_backend(backend, threads, precision=precision, torch_device=torch_device)
    slim_t = _time_deployed(be, run_dir, slim, a, batch_size)
    dense_t = measure_model(be, dense, a, batch_size) if measure_dense else None
    retrain = read_json(run_dir / "retrain.json", "retrain record") if (run_dir / "retrain.json").is_file() else {}
    dense_spec = SlimSpec.dense(cfg, a)
    report = Report(
        model=cfg.name, device=device or be.hardware(), backend=backend, batch_size=batch_size,
        target_latency_ms=target_ms,
        dense=ModelFigures(latency_ms=dense_t["median_ms"] if dense_t else float("nan"),
                           latency_spread_ms=(dense_t["p90_ms"] - dense_t["p10_ms"]) if dense_t else None,
                           macs=spec_macs(dense_spec), params=spec_params(dense_spec), top1=dense_top1,
                           predicted_latency_ms=lm.predict(dense_spec) if lm else None),
        slim=ModelFigures(latency_ms=slim_t["median_ms"], latency_spread_ms=slim_t["p90_ms"] - slim_t["p10_ms"],
                          macs=spec_macs(spec), params=spec_params(spec), top1=acc["deployed_top1"],
                          predicted_latency_ms=lm.predict(spec) if lm else None,
                          top1_before_retrain=retrain.get("top1_before_retrain")),
        parity=parity,
        met_target=(slim_t["median_ms"] <= target_ms) if target_ms is not None else None,
        extra={"precision": precision, "weights": f"{stem}.safetensors", "eval_images": parity.samples,
               "pytorch_slim_top1": acc["pytorch_top1"], "teacher_top1": retrain.get("teacher_top1"),
               "slim_timing": slim_t, "dense_timing": dense_t, "hardware": be.hardware(),
               "backend_version": be.version(), "threads": threads,
               "speedup": (dense_t["median_ms"] / slim_t["median_ms"]) if dense_t else None,
               "parity_rule": f"max |diff| <= {FP32_ATOL} and 100% top-1 agreement" if precision == "fp32"
               else f"top-1 agreement >= {100 * FP16_AGREEMENT}%"},
    )
    write_report(report, run_dir)
    return report


@torch.no_grad()
def _accuracy(model, feeds, labels) -> float:
    model.eval()
    correct = total = 0
    for f, y in zip(feeds, labels):
        correct += int((model(torch.as_tensor(f["x"])).argmax(1).numpy()[:len(y)] == y).sum())
        total += len(y)
    return correct / max(1, total)


def _time_deployed(be, run_dir: Path, slim, arch, batch: int) -> dict:
    """Latency of the deployed artifact: model.onnx (or the engine) as exported, at `batch`."""
    x = np.random.default_rng(0).standard_normal((batch, arch.in_chans, arch.img_size, arch.img_size),
                                                 dtype=np.float32)
    if be.name == "torch":
        sess = be.load_module(slim, torch.as_tensor(x))
    elif be.name == "trt":
        from .backends import TrtSession

        sess = TrtSession((run_dir / "model.plan").read_bytes())
    else:
        onnx = run_dir / "model.onnx"
        export = read_json(run_dir / "export.json", "export record") if (run_dir / "export.json").is_file() else {}
        if export.get("batch_size") not in (None, batch):  # a fixed-batch export at another size: re-export
            with tempfile.TemporaryDirectory() as tmp:
                onnx = export_onnx(slim, Path(tmp) / "m.onnx", (arch.in_chans, arch.img_size, arch.img_size), batch)
                sess = be.load_onnx(onnx)
        else:
            sess = be.load_onnx(onnx)
    return sess.time(x, warmup=10, min_runs=30, min_seconds=1.0, repeats=5).to_dict()


def write_report(report: Report, run_dir: Path) -> None:
    d = report.to_dict()
    write_json(run_dir / "report.json", d)
    atomic_write_bytes(run_dir / "report.md", report_markdown(report).encode())
    from .plots import plot_report

    plot_report(report, run_dir / "report.png")


def report_markdown(r: Report) -> str:
    def f(v, fmt):
        return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, fmt)

    d, s, p = r.dense, r.slim, r.parity
    met = {True: "met", False: "not met", None: "none given"}[r.met_target]
    lines = [
        f"# slimdeploy report: {r.model}",
        "",
        f"Device `{r.device}` ({r.extra.get('hardware')}), backend `{r.backend}` {r.extra.get('backend_version')}, "
        f"batch size {r.batch_size}, {r.extra.get('precision')}, {r.extra.get('threads')} thread(s).",
        "",
        "| | dense | slim |",
        "|---|---:|---:|",
        f"| latency, measured (median ms) | {f(d.latency_ms, '.3f')} | {f(s.latency_ms, '.3f')} |",
        f"| latency spread p90-p10 (ms) | {f(d.latency_spread_ms, '.3f')} | {f(s.latency_spread_ms, '.3f')} |",
        f"| latency, predicted (ms) | {f(d.predicted_latency_ms, '.3f')} | {f(s.predicted_latency_ms, '.3f')} |",
        f"| MACs (M) | {d.macs / 1e6:.2f} | {s.macs / 1e6:.2f} |",
        f"| params (M) | {d.params / 1e6:.3f} | {s.params / 1e6:.3f} |",
        f"| top-1 (%) | {f(d.top1, '.2f')} | {f(s.top1, '.2f')} |",
        f"| top-1 right after pruning (%) | | {f(s.top1_before_retrain, '.2f')} |",
        "",
        f"Speed-up {f(r.extra.get('speedup'), '.2f')}x; target "
        f"{f(r.target_latency_ms, '.3f')} ms: {met}.",
        "",
        f"Parity ({p.backend} vs PyTorch fp32, {p.samples} images): max |diff| {p.max_abs_diff:.2e}, "
        f"top-1 agreement {100 * p.top1_agreement:.2f}% -> **{'PASS' if p.passed else 'FAIL'}** "
        f"(rule: {r.extra.get('parity_rule')}).",
        "",
        "Every figure was measured or computed by the run that wrote this file; latencies are medians of warm runs.",
    ]
    return "\n".join(lines) + "\n"


def report_dict_schema_errors(d: dict) -> list[str]:
    """Keys DESIGN.md requires in report.json, with their types; returns what is wrong."""
    num = (int, float)
    spec = {"schema": int, "model": str, "device": str, "backend": str, "batch_size": int,
            "target_latency_ms": (float, int, type(None)), "met_target": (bool, type(None)),
            "dense": {"latency_ms": num, "macs": int, "params": int, "top1": (float, int, type(None))},
            "slim": {"latency_ms": num, "predicted_latency_ms": (float, int, type(None)), "macs": int, "params": int,
                     "top1": (float, int, type(None)), "top1_before_retrain": (float, int, type(None))},
            "parity": {"backend": str, "max_abs_diff": num, "top1_agreement": num}}
    errors = []

    def walk(obj, sch, path):
        for k, t in sch.items():
            if k not in obj:
                errors.append(f"missing {path}{k}")
            elif isinstance(t, dict):
                walk(obj[k], t, f"{path}{k}.")
            elif not isinstance(obj[k], t) or (t is int and isinstance(obj[k], bool)):
                errors.append(f"{path}{k} has type {type(obj[k]).__name__}")
    walk(d, spec, "")
    return errors

