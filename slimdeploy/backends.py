"""Runners behind one small interface: ort-cpu, ort-cuda, trt, torch (cpu or cuda).

A Backend turns an ONNX file (or, for `torch`, a module) into a Session; a Session runs a
batch and can be timed. Timing = warm-up, then the median of many runs with p10/p90 kept,
on a fixed thread count for CPU and with synchronisation for CUDA.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import SlimError

BACKEND_NAMES = ("ort-cpu", "ort-cuda", "trt", "torch")


@dataclass
class Timing:
    """Latency of one call in milliseconds: median over warm runs, with the 10th/90th percentiles."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: the relative spread of the runs."""
        return (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "spread": self.spread}


def time_call(fn: Callable[[], object], warmup: int = 5, min_runs: int = 20, min_seconds: float = 0.2,
              max_runs: int = 1000, sync: Callable[[], None] | None = None, repeats: int = 1) -> Timing:
    """Time fn(): `warmup` calls, then at least min_runs calls and min_seconds of calls.

    With repeats > 1 the runs are split into that many rounds separated by a short pause and
    the median is taken over all runs: it evens out slow phases of a shared machine.
    """
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    samples: list[float] = []
    for r in range(repeats):
        start = time.perf_counter()
        n = 0
        while (n < min_runs or time.perf_counter() - start < min_seconds / repeats) and n < max_runs:
            t = time.perf_counter()
            fn()
            sync()
            samples.append(time.perf_counter() - t)
            n += 1
        if r + 1 < repeats:
            time.sleep(0.01)
    q = statistics.quantiles(samples, n=10) if len(samples) >= 2 else samples * 9
    return Timing(statistics.median(samples) * 1e3, q[0] * 1e3, q[-1] * 1e3, len(samples))


class Session:
    """A loaded model: run(x) -> numpy output, and timed(x) for latency."""

    def run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def call_for_timing(self, x: np.ndarray) -> tuple[Callable[[], object], Callable[[], None] | None]:
        """A zero-argument call (inputs already placed) and the sync to wait for it."""
        return (lambda: self.run(x)), None

    def time(self, x: np.ndarray, **kw) -> Timing:
        fn, sync = self.call_for_timing(x)
        return time_call(fn, sync=sync, **kw)


class Backend:
    name = ""
    precision = "fp32"

    def version(self) -> str:
        raise NotImplementedError

    def hardware(self) -> str:
        raise NotImplementedError

    def load_onnx(self, onnx: str | Path | bytes) -> Session:
        raise NotImplementedError

    def load_module(self, module: nn.Module, example: torch.Tensor) -> Session:
        """Sessions from a torch module: export to ONNX first unless the backend runs torch."""
        from .export import onnx_bytes

        return self.load_onnx(onnx_bytes(module, example))

    def describe(self) -> dict:
        return {"backend": self.name, "backend_version": self.version(), "hardware": self.hardware(),
                "precision": self.precision}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


# ---- ONNX Runtime ------------------------------------------------------------------------------

class OrtSession(Session):
    def __init__(self, sess):
        self.sess = sess
        self.input = sess.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.sess.run(None, {self.input: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def call_for_timing(self, x):
        feed = {self.input: np.ascontiguousarray(x, dtype=np.float32)}
        return (lambda: self.sess.run(None, feed)), None


class OrtBackend(Backend):
    def __init__(self, device: str = "cpu", threads: int | None = 1, precision: str = "fp32"):
        try:
            import onnxruntime as ort
        except ImportError:
            raise SlimError("onnxruntime is not installed: pip install 'slimdeploy' (CPU) or "
                            "'slimdeploy[gpu]' (onnxruntime-gpu, for ort-cuda)") from None
        self.ort = ort
        self.device = device
        self.name = f"ort-{device}"
        self.threads = threads
        if precision != "fp32":
            raise SlimError(f"{self.name} profiles and runs fp32 models only (use --backend trt or torch for fp16)")
        self.provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
        if self.provider not in ort.get_available_providers():
            raise SlimError("ort-cuda needs onnxruntime-gpu and a CUDA GPU: pip install 'slimdeploy[gpu]' "
                            "(after pip uninstall onnxruntime)")

    def version(self) -> str:
        return self.ort.__version__

    def hardware(self) -> str:
        if self.device == "cuda":
            return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CUDA GPU"
        return cpu_name()

    def options(self):
        so = self.ort.SessionOptions()
        so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        return so

    def load_onnx(self, onnx):
        src = str(onnx) if isinstance(onnx, Path) else onnx
        try:
            return OrtSession(self.ort.InferenceSession(src, self.options(), providers=[self.provider]))
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise SlimError(f"ONNX Runtime cannot load the model: {str(e).splitlines()[0][:200]}") from None


# ---- torch eager -------------------------------------------------------------------------------

class TorchSession(Session):
    def __init__(self, module: nn.Module, device: torch.device, dtype: torch.dtype):
        self.module, self.device, self.dtype = module, device, dtype

    @torch.inference_mode()
    def run(self, x):
        out = self.module(torch.as_tensor(x).to(self.device, self.dtype))
        return out.float().cpu().numpy()

    def call_for_timing(self, x):
        xt = torch.as_tensor(x).to(self.device, self.dtype)

        @torch.inference_mode()
        def call():
            return self.module(xt)
        return call, (torch.cuda.synchronize if self.device.type == "cuda" else None)


class TorchBackend(Backend):
    def __init__(self, device: str = "cpu", threads: int | None = 1, precision: str = "fp32"):
        self.device = torch.device(device)
        self.name = "torch"
        self.precision = precision
        self.threads = threads
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise SlimError("the torch backend on cuda needs a CUDA GPU and a CUDA build of torch")
        if precision == "fp16" and self.device.type == "cpu":
            raise SlimError("fp16 on the torch backend needs --torch-device cuda")
        if self.device.type == "cpu" and threads:
            torch.set_num_threads(threads)

    def version(self) -> str:
        return torch.__version__ + (f" (CUDA {torch.version.cuda})" if self.device.type == "cuda" else "")

    def hardware(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else cpu_name()

    def load_module(self, module, example=None):
        dtype = torch.float16 if self.precision == "fp16" else torch.float32
        return TorchSession(module.eval().to(self.device, dtype), self.device, dtype)

    def load_onnx(self, onnx):
        raise SlimError("the torch backend runs torch modules, not ONNX files")


# ---- TensorRT ----------------------------------------------------------------------------------

class TrtSession(Session):
    """Runs a serialized engine through polygraphy's TrtRunner (inputs and outputs on the GPU)."""

    def __init__(self, plan: bytes):
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self.runner = TrtRunner(EngineFromBytes(plan))
        self.runner.activate()
        self.input = self.runner.get_input_metadata().keys().__iter__().__next__()

    def run(self, x):
        out = self.runner.infer({self.input: np.ascontiguousarray(x, dtype=np.float32)})
        return np.asarray(next(iter(out.values())), dtype=np.float32)

    def call_for_timing(self, x):
        xt = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32)).cuda()
        return (lambda: self.runner.infer({self.input: xt}, copy_outputs_to_host=False)), torch.cuda.synchronize


class TrtBackend(Backend):
    name = "trt"

    def __init__(self, precision: str = "fp32", **_):
        from .trt import require_tensorrt

        self.trt = require_tensorrt()
        self.precision = precision

    def version(self) -> str:
        return self.trt.__version__

    def hardware(self) -> str:
        return torch.cuda.get_device_name(0)

    def load_onnx(self, onnx):
        from .trt import build_engine

        return TrtSession(build_engine(onnx, fp16=self.precision == "fp16"))


def get_backend(name: str, threads: int | None = 1, precision: str = "fp32", torch_device: str = "auto") -> Backend:
    """The backend called `name`; SlimError naming what to install when it cannot run here."""
    if precision not in ("fp32", "fp16"):
        raise SlimError(f"--precision must be fp32 or fp16, not '{precision}'")
    if name == "ort-cpu":
        return OrtBackend("cpu", threads, precision)
    if name == "ort-cuda":
        return OrtBackend("cuda", threads, precision)
    if name == "trt":
        return TrtBackend(precision)
    if name == "torch":
        dev = torch_device if torch_device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        return TorchBackend(dev, threads, precision)
    raise SlimError(f"unknown backend '{name}': choose one of {', '.join(BACKEND_NAMES)}")
