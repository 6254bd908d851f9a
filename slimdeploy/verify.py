"""Stage: verify the deployed model. Parity with PyTorch, accuracy, measured latency, the report.

Parity runs through polygraphy's Comparator: the PyTorch slim model in fp32 (on the GPU where there is one, TF32
off) is one runner, the deployment engine (ONNX Runtime, TensorRT, or torch on another device or precision) the
other; every eval batch goes through both. Invariant 3: fp32 needs max |diff| <= 1e-4 and 100% top-1 agreement;
fp16 needs >= 99.5% top-1 agreement. Latency: the deployed artifact and the dense model measured together by the
one protocol (interleaved rounds, a 95% interval; measured again, longer, where the ratio's interval is wide, as
the closed loop does); `met_target` holds when the interval's upper end is within the
target (for a percentage target, on the paired ratio to dense). The accuracy guard: top-1 may fall at most
`max_drop` points below the dense model's. Whatever fails, the report is written, says why, and the command
exits 1.
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
from .data import make_loader
from .errors import SlimError
from .export import slim_of_run
from .fileio import atomic_write_bytes, read_json, write_json
from .latency import timing
from .latency.backends import disable_tf32, get_backend
from .latency.measure import export_first, measure_loaders, session_loader
from .models import load_dense
from .types import ModelFigures, Parity, Report, SlimSpec

FP32_ATOL = 1e-4
FP16_AGREEMENT = 0.995
# int8 and bf16: a sanity floor on agreement; the decision is the accuracy guard against the fp32 twin
QUANT_AGREEMENT = 0.9
MAX_QUANT_DROP = 1.0  # points of top-1 a quantized model may lose against its fp32 twin (--max-drop)


def parity_rule(precision: str) -> str:
    if precision == "fp32":
        return f"max |diff| <= {FP32_ATOL} and 100% top-1 agreement"
    if precision == "fp16":
        return f"top-1 agreement >= {100 * FP16_AGREEMENT}%"
    return f"top-1 agreement >= {100 * QUANT_AGREEMENT:g}%, and top-1 within --max-drop of the fp32 twin"


class TorchRunner(BaseRunner):
    """A polygraphy runner over a torch module (polygraphy has none built in)."""

    def __init__(self, module: torch.nn.Module, input_shape: tuple[int, int, int], name: str = "pytorch",
                 device: str = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(name=name, prefix="torch-runner")
        self.module, self.device, self.dtype, self.input_shape = module, device, dtype, input_shape

    def activate_impl(self):
        if str(self.device).startswith("cuda") and self.dtype == torch.float32:
            disable_tf32()
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


def reference_device() -> str:
    """Where the fp32 reference runs: the GPU when there is one (ImageNet-sized evals are slow on CPU)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def deployed_runner(run_dir: Path, backend: str, threads: int | None, torch_device: str, precision: str,
                    slim_module, input_shape):
    """The polygraphy runner for the deployed artifact on `backend`, and its precision."""
    if backend in ("ort-cpu", "ort-cuda"):
        from polygraphy.backend.onnxrt import OnnxrtRunner

        onnx = run_dir / ("model.int8.onnx" if precision == "int8" else "model.onnx")
        if not onnx.is_file():
            step = "quantize" if precision == "int8" else "export"
            raise SlimError(f"{onnx} not found: run 'slimdeploy {step} {run_dir}' first")
        be = get_backend(backend, threads, precision=precision)  # one clear line if a package is missing
        return OnnxrtRunner(lambda: be.session(onnx)), precision
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
        be = get_backend("torch", threads, precision=precision, torch_device=torch_device)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        return TorchRunner(slim_module, input_shape, name="torch-deployed", device=str(be.device),
                           dtype=dtype), precision
    raise SlimError(f"unknown backend '{backend}'")


def eval_batch_for(run_dir: Path, backend: str, wanted: int) -> tuple[int, bool]:
    """The eval batch size the deployed artifact accepts, and whether it is fixed (then the last batch is
    padded): a static ONNX graph's batch, a TensorRT engine's profile range (the wanted size clamped into it)."""
    if backend in ("ort-cpu", "ort-cuda"):
        import onnx

        graph = onnx.load(str(run_dir / "model.onnx"), load_external_data=False).graph
        fixed = graph.input[0].type.tensor_type.shape.dim[0].dim_value
        return (fixed, True) if fixed else (wanted, False)
    if backend == "trt":
        from .trt import engine_batch_range

        lo, hi = engine_batch_range((run_dir / "model.plan").read_bytes())
        if lo == hi:
            return lo, True
        return max(lo, min(wanted, hi)), True  # every batch padded to it: the engine's shape range holds
    return wanted, False


def check_parity(results, labels: list[np.ndarray], precision: str) -> tuple[Parity, dict]:
    ref_name, dep_name = results[0][0], results[1][0]
    # outputs of padded rows (a fixed-batch engine's last batch) are dropped
    ref = np.concatenate([o["logits"][:len(y)] for o, y in zip(results[0][1], labels)])
    dep = np.concatenate([np.asarray(next(iter(o.values())), dtype=np.float32)[:len(y)]
                          for o, y in zip(results[1][1], labels)])
    y = np.concatenate(labels)
    diff = float(np.abs(ref - dep).max())
    agree = float((ref.argmax(1) == dep.argmax(1)).mean())
    passed = ((diff <= FP32_ATOL and agree == 1.0) if precision == "fp32"
              else agree >= (FP16_AGREEMENT if precision == "fp16" else QUANT_AGREEMENT))
    acc = {"deployed_top1": float(100 * (dep.argmax(1) == y).mean()),
           "pytorch_top1": float(100 * (ref.argmax(1) == y).mean()), "reference": ref_name, "deployed": dep_name}
    return Parity(backend="", max_abs_diff=diff, top1_agreement=agree, passed=passed, samples=len(y)), acc


def verify(run_dir: str | Path, data, backend: str = "ort-cpu", batch_size: int = 1, threads: int | None = 1,
           target_ms: float | None = None, target_fraction: float | None = None, device: str | None = None,
           lm=None, torch_device: str = "auto", precision: str = "fp32", eval_batch: int = 256,
           max_drop: float | None = None, warnings: list[str] | None = None,
           max_quant_drop: float = MAX_QUANT_DROP) -> Report:
    """Compare, measure and write report.json / report.md / report.png in run_dir."""
    run_dir = Path(run_dir)
    slim, spec, stem = slim_of_run(run_dir)
    dense, cfg = load_dense(run_dir)
    a = spec.arch
    shape = (a.in_chans, a.img_size, a.img_size)
    runner, precision = deployed_runner(run_dir, backend, threads, torch_device, precision, slim, shape)
    batch, fixed = eval_batch_for(run_dir, backend, eval_batch)
    loader = make_loader(data.val, data.transform, batch, False)
    feeds, labels = [], []
    for x, y in loader:
        n = len(y)
        if fixed and n < batch:  # a fixed-batch engine: pad the last batch, drop the padding after
            x = torch.cat([x, x[:1].expand(batch - n, *x.shape[1:])])
        feeds.append({"x": x.numpy().astype(np.float32)})
        labels.append(y.numpy())
    G_LOGGER.module_severity = G_LOGGER.ERROR  # polygraphy's per-batch chatter
    ref_dev = reference_device()
    results = Comparator.run([TorchRunner(slim, shape, device=ref_dev), runner], data_loader=feeds)
    parity, acc = check_parity(results, labels, precision)
    parity.backend = backend
    dense_top1 = 100.0 * _accuracy(dense, feeds, labels, ref_dev)  # padded rows are not counted
    # latency: the deployed artifact and the dense model, interleaved, at the deployment batch size
    be = get_backend(backend, threads, precision=precision, torch_device=torch_device)
    reference = be if precision == "fp32" else get_backend(backend, threads, torch_device=torch_device)
    slim_t, dense_t, twin_t, protocol = _measure(be, reference, run_dir, slim, dense, a, batch_size, precision)
    ratio = timing.ratio(slim_t, dense_t)
    if target_fraction is not None:
        target_ms = target_fraction * dense_t.median_ms
        met = ratio.high_ms <= target_fraction
    else:
        met = (slim_t.high_ms <= target_ms) if target_ms is not None else None
    retrain = read_json(run_dir / "retrain.json", "retrain record") if (run_dir / "retrain.json").is_file() else {}
    dense_spec = SlimSpec.dense(cfg, a)
    drop = dense_top1 - acc["deployed_top1"]
    report = Report(
        model=cfg.name, device=device or be.hardware(), backend=backend, batch_size=batch_size,
        target_latency_ms=target_ms,
        dense=ModelFigures(latency_ms=dense_t.median_ms, latency_low_ms=dense_t.low_ms,
                           latency_high_ms=dense_t.high_ms, macs=spec_macs(dense_spec), params=spec_params(dense_spec),
                           top1=dense_top1, predicted_latency_ms=lm.predict(dense_spec) if lm else None),
        slim=ModelFigures(latency_ms=slim_t.median_ms, latency_low_ms=slim_t.low_ms, latency_high_ms=slim_t.high_ms,
                          macs=spec_macs(spec), params=spec_params(spec), top1=acc["deployed_top1"],
                          predicted_latency_ms=lm.predict(spec) if lm else None,
                          top1_before_retrain=retrain.get("top1_before_retrain")),
        parity=parity, met_target=met,
        accuracy=_accuracy_guards(drop, max_drop, precision, acc, parity, max_quant_drop),
        warnings=list(warnings or []),
        extra={"precision": precision, "weights": f"{stem}.safetensors", "eval_images": parity.samples,
               "pytorch_slim_top1": acc["pytorch_top1"], "teacher_top1": retrain.get("teacher_top1"),
               "reference_device": ref_dev, "eval_batch": batch, "slim_timing": slim_t.to_dict(),
               "dense_timing": dense_t.to_dict(), "slim_over_dense": ratio.to_dict(),
               "target_fraction": target_fraction, "hardware": be.hardware(), "fingerprint": be.fingerprint(),
               "profile_fingerprint": lm.profile.fingerprint if lm else None,
               "backend_version": be.version(), "threads": threads, "speedup": dense_t.median_ms / slim_t.median_ms,
               "protocol": protocol.__dict__, "parity_rule": parity_rule(precision),
               "fp32_twin_timing": twin_t.to_dict() if twin_t else None,
               "quantize": read_json(run_dir / "quantize.json", "quantize record")
               if precision == "int8" and (run_dir / "quantize.json").is_file() else None},
    )
    write_report(report, run_dir)
    return report


def _accuracy_guards(drop: float, max_drop: float | None, precision: str, acc: dict, parity, max_quant_drop: float
                     ) -> dict:
    """The drop from dense against --max-drop; at int8/bf16 also the drop from the fp32 twin (the same slim model
    in PyTorch fp32) against max_quant_drop."""
    out = {"drop": drop, "max_drop": max_drop, "passed": max_drop is None or drop <= max_drop}
    if precision in ("int8", "bf16"):
        q = acc["pytorch_top1"] - acc["deployed_top1"]
        out["quantized"] = {"fp32_twin_top1": acc["pytorch_top1"], "top1": acc["deployed_top1"],
                            "agreement": parity.top1_agreement, "drop": q, "max_drop": max_quant_drop,
                            "passed": q <= max_quant_drop}
        out["passed"] = out["passed"] and q <= max_quant_drop
    return out


@torch.no_grad()
def _accuracy(model, feeds, labels, device: str = "cpu") -> float:
    model = model.to(device).eval()
    correct = total = 0
    for f, y in zip(feeds, labels):
        out = model(torch.as_tensor(f["x"]).to(device)).argmax(1).cpu().numpy()
        correct += int((out[:len(y)] == y).sum())
        total += len(y)
    model.cpu()
    return correct / max(1, total)


def _measure(be, reference, run_dir: Path, slim, dense, arch, batch: int, precision: str = "fp32"):
    """The deployed artifact (model.onnx, model.int8.onnx or the engine; re-exported when it was exported at
    another batch size), the dense model (fp32) and, for a quantized deployment, the slim model's fp32 twin,
    measured together (again, longer, where the ratio came out wide: timing.measured_steadily). Returns their
    measurements and the protocol kept."""
    onnx, quantized = None, precision == "int8"
    if be.name in ("ort-cpu", "ort-cuda"):
        export = read_json(run_dir / "export.json", "export record") if (run_dir / "export.json").is_file() else {}
        if export.get("batch_size") in (None, batch):
            onnx = run_dir / ("model.int8.onnx" if quantized else "model.onnx")
    protocol = timing.MODEL
    with tempfile.TemporaryDirectory() as tmp:  # every export before any load (measure.export_first)
        refs = {"dense": dense, **({"twin": slim} if precision != "fp32" else {})}
        files = export_first(reference, refs, arch, batch, tmp)

        def exported_slim():  # where no deployed artifact fits this batch size
            return export_first(be, {"slim": slim}, arch, batch, tmp).get("slim")

        if be.name == "trt":
            from .latency.backends import TrtSession
            from .trt import engine_batch_range

            plan = (run_dir / "model.plan").read_bytes()
            lo, hi = engine_batch_range(plan)
            slim_loader = ((lambda: TrtSession(plan)), 1) if lo <= batch <= hi else session_loader(
                be, slim, arch, batch, exported_slim(), protocol.sessions)
        elif quantized and onnx is not None:  # the calibrated graph, as deployed
            slim_loader = (lambda: be.load_onnx(onnx, quantized=True)), protocol.sessions
        else:
            slim_loader = session_loader(be, slim, arch, batch, onnx or exported_slim(), protocol.sessions)
        loaders = {"slim": slim_loader}
        for name, m in refs.items():
            loaders[name] = session_loader(reference, m, arch, batch, files.get(name), protocol.sessions)
        t, used = timing.measured_steadily(lambda p: measure_loaders(loaders, arch, batch, p))
    return t["slim"], t["dense"], t.get("twin"), used


def drop_words(drop: float | None) -> str:
    """The slim model's top-1 against the dense model's, in words: a signed drop ("-0.72 points of drop") read
    a gain as a loss."""
    if drop is None:
        return "top-1 change unknown"
    if round(drop, 2) == 0:
        return "level with dense"
    return f"{abs(drop):.2f} points {'below' if drop > 0 else 'above'} dense"


def write_report(report: Report, run_dir: Path) -> None:
    d = report.to_dict()
    d["passed"] = report.passed
    d["failures"] = report.failures()
    write_json(run_dir / "report.json", d)
    atomic_write_bytes(run_dir / "report.md", report_markdown(report).encode())
    from .plots import plot_report

    plot_report(report, run_dir / "report.png")


def report_markdown(r: Report) -> str:
    def f(v, fmt):
        return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, fmt)

    d, s, p = r.dense, r.slim, r.parity
    met = {True: "met", False: "NOT met", None: "none given"}[r.met_target]
    drop = r.accuracy.get("drop")
    lines = [
        f"# slimdeploy report: {r.model}",
        "",
        f"Device `{r.device}` ({r.extra.get('hardware')}), backend `{r.backend}` {r.extra.get('backend_version')}, "
        f"batch size {r.batch_size}, {r.extra.get('precision')}, {r.extra.get('threads')} thread(s).",
        "",
        f"**Top-1: {f(s.top1, '.2f')}% slim vs {f(d.top1, '.2f')}% dense: {drop_words(drop)}"
        + (f" (guard: at most {r.accuracy['max_drop']:g}: {'ok' if r.accuracy['passed'] else 'EXCEEDED'})"
           if r.accuracy.get("max_drop") is not None else "") + ".**",
        "",
        "| | dense | slim |",
        "|---|---:|---:|",
        f"| latency, measured (median ms) | {f(d.latency_ms, '.3f')} | {f(s.latency_ms, '.3f')} |",
        f"| 95% interval (ms) | {f(d.latency_low_ms, '.3f')}-{f(d.latency_high_ms, '.3f')} | "
        f"{f(s.latency_low_ms, '.3f')}-{f(s.latency_high_ms, '.3f')} |",
        f"| latency, predicted (ms) | {f(d.predicted_latency_ms, '.3f')} | {f(s.predicted_latency_ms, '.3f')} |",
        f"| MACs (M) | {d.macs / 1e6:.2f} | {s.macs / 1e6:.2f} |",
        f"| params (M) | {d.params / 1e6:.3f} | {s.params / 1e6:.3f} |",
        f"| top-1 (%) | {f(d.top1, '.2f')} | {f(s.top1, '.2f')} |",
        f"| top-1 right after pruning (%) | | {f(s.top1_before_retrain, '.2f')} |",
        "",
        f"Slim / dense latency {f(r.extra.get('slim_over_dense', {}).get('median_ms'), '.3f')} (95% interval "
        f"{f(r.extra.get('slim_over_dense', {}).get('low_ms'), '.3f')}-"
        f"{f(r.extra.get('slim_over_dense', {}).get('high_ms'), '.3f')}); target "
        f"{f(r.target_latency_ms, '.3f')} ms: **{met}** (decided on the interval's upper end).",
        "",
        f"Parity ({p.backend} vs PyTorch fp32, {p.samples} images): max |diff| {p.max_abs_diff:.2e}, "
        f"top-1 agreement {100 * p.top1_agreement:.2f}% -> **{'PASS' if p.passed else 'FAIL'}** "
        f"(rule: {r.extra.get('parity_rule')}).",
        "",
    ]
    lines += [f"Warning: {w}" for w in r.warnings] + ([""] if r.warnings else [])
    lines += [f"**FAILED: {x}**" for x in r.failures()] + ([""] if r.failures() else [])
    lines.append("Every figure was measured or computed by the run that wrote this file; latencies are medians of "
                 "round medians from interleaved rounds (slimdeploy/latency/timing.py).")
    return "\n".join(lines) + "\n"


def report_dict_schema_errors(d: dict) -> list[str]:
    """The keys every report.json must have (the report schema), with their types; returns what is wrong."""
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


def verify_run(run_dir: str | Path, data, backend: str | None = None, device: str | None = None,
               profiles_dir: str | Path | None = None, batch_size: int | None = None, threads: int | None = None,
               torch_device: str = "auto", max_drop: float | None = None, lm=None,
               max_quant_drop: float | None = None) -> Report:
    """The verify stage: backend, precision, threads and batch size come from the profile the structure was
    selected on (recorded in spec.json) unless given; so does the target."""
    from .latency.model import LatencyModel, fingerprint_warning
    from .runs import Run
    from .types import DeviceProfile

    spec = Run(run_dir).spec()
    meta = spec.meta
    if lm is None and (device or meta.get("profile_path")):
        from .latency.model import resolve_profile

        path = resolve_profile(device, profiles_dir) if device else Path(meta["profile_path"])
        if not path.is_file():
            raise SlimError(f"the profile this run was selected on ({path}) is gone: pass --device")
        lm = LatencyModel(DeviceProfile.load(path))
    p = lm.profile if lm is not None else None
    backend = backend or (p.backend if p else "ort-cpu")
    precision = p.precision if p else "fp32"
    if torch_device == "auto" and p is not None and p.torch_device:
        torch_device = p.torch_device  # a torch profile measured on cuda:1 is verified on cuda:1
    warnings = list(meta.get("warnings") or [])
    if p is not None:
        here = get_backend(backend, threads or p.threads, precision=precision, torch_device=torch_device)
        w = fingerprint_warning(p, here.fingerprint())
        if w and w not in warnings:
            warnings.append(w)
    target_fraction = meta.get("target_fraction") if meta.get("target") == "latency" else None
    target_ms = None if target_fraction is not None else (
        meta.get("target_value") if meta.get("target") == "latency" else None)
    return verify(run_dir, data, backend, batch_size or (p.batch_size if p else 1),
                  threads or (p.threads if p else 1), target_ms, target_fraction, p.device if p else device, lm,
                  torch_device, precision, max_drop=max_drop, warnings=warnings,
                  max_quant_drop=MAX_QUANT_DROP if max_quant_drop is None else max_quant_drop)
