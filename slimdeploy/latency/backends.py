"""Runners behind one small interface: ort-cpu, ort-cuda, trt, torch (cpu or cuda).

A Backend turns an ONNX file (or, for `torch`, a module) into a Session; a Session runs a batch and hands
the timing protocol (timing.py) a call with its inputs already in place: on CUDA the inputs and outputs stay on
the device (ORT I/O binding, bound TensorRT buffers), so no copy is timed. fp32 runs with TF32 off everywhere,
so that fp32 parity holds at 1e-4.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import SlimError
from . import timing
from .fingerprint import cpu_fingerprint, cpu_name, gpu_fingerprint

BACKEND_NAMES = ("ort-cpu", "ort-cuda", "trt", "torch")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# what each backend runs (torch: cpu / cuda)
SUPPORTED = {"ort-cpu": ("fp32", "int8"), "ort-cuda": ("fp32",), "trt": ("fp32", "fp16", "int8"),
             "torch-cpu": ("fp32", "bf16"), "torch-cuda": ("fp32", "fp16", "bf16")}


class Session:
    """A loaded model: run(x) -> numpy output; timed(x) -> (call, sync) for the timing protocol."""

    def run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def timed(self, x: np.ndarray) -> timing.Timed:
        return (lambda: self.run(x)), None

    def time(self, x: np.ndarray, protocol: timing.Protocol = timing.MODEL) -> timing.Measurement:
        """This session alone, by the protocol (use timing.measure to interleave several)."""
        return timing.measure({"model": self.timed(x)}, protocol)["model"]

    def close(self) -> None:
        """Free what the session holds (CUDA streams, contexts)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Backend:
    name = ""
    precision = "fp32"
    threads: int | None = None

    def version(self) -> str:
        raise NotImplementedError

    def hardware(self) -> str:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        raise NotImplementedError

    def load_onnx(self, onnx: str | Path | bytes) -> Session:
        raise NotImplementedError

    def load_module(self, module: nn.Module, example: torch.Tensor) -> Session:
        """A session from a torch module: exported to ONNX first unless the backend runs torch."""
        from ..export import onnx_bytes

        return self.load_onnx(onnx_bytes(module, example))

    def describe(self) -> dict:
        return {"backend": self.name, "backend_version": self.version(), "hardware": self.hardware(),
                "precision": self.precision, "threads": self.threads}


# ---- ONNX Runtime ------------------------------------------------------------------------------

class OrtSession(Session):
    def __init__(self, sess, device: str):
        self.sess, self.device = sess, device
        self.input = sess.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.sess.run(None, {self.input: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def timed(self, x):
        """Inputs (an array, or a tuple of arrays for a graph with several) and outputs bound once (I/O binding):
        only the model is timed, not the conversion of arrays on each call."""
        from onnxruntime import OrtValue

        xs = x if isinstance(x, tuple) else (x,)
        feeds = {i.name: np.ascontiguousarray(a, dtype=np.float32) for i, a in zip(self.sess.get_inputs(), xs)}
        outs = self.sess.run(None, feeds)  # learns the output shapes
        binding = self.sess.io_binding()
        dev = "cuda" if self.device == "cuda" else "cpu"
        values = [OrtValue.ortvalue_from_numpy(a, dev, 0) for a in feeds.values()] + \
                 [OrtValue.ortvalue_from_numpy(o, dev, 0) for o in outs]
        for name, val in zip(feeds, values):
            binding.bind_ortvalue_input(name, val)
        for out, val in zip(self.sess.get_outputs(), values[len(feeds):]):
            binding.bind_ortvalue_output(out.name, val)

        def call(binding=binding, values=values):  # values: kept alive with the call
            self.sess.run_with_iobinding(binding)
        return call, (binding.synchronize_outputs if dev == "cuda" else None)


def _ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise SlimError("onnxruntime is not installed: pip install 'slimdeploy[cpu]' (CPU) or 'slimdeploy[gpu]' "
                        "(onnxruntime-gpu, for ort-cuda)") from None
    return ort


class OrtBackend(Backend):
    def __init__(self, device: str = "cpu", threads: int | None = 1, precision: str = "fp32"):
        self.ort = _ort()
        self.device, self.name, self.threads = device, f"ort-{device}", threads
        self.precision = precision
        if device == "cuda":
            if hasattr(self.ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* pip packages
                try:
                    self.ort.preload_dlls()
                except Exception:  # noqa: BLE001 - the provider check below says what is wrong
                    pass
            if "CUDAExecutionProvider" not in self.ort.get_available_providers():
                raise SlimError("ort-cuda needs onnxruntime-gpu and a CUDA GPU: pip install 'slimdeploy[gpu]' "
                                "(in an environment without the CPU onnxruntime)")

    def version(self) -> str:
        return self.ort.__version__

    def hardware(self) -> str:
        if self.device == "cuda":
            return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CUDA GPU"
        return cpu_name()

    def fingerprint(self) -> dict:
        if self.device == "cuda":
            return gpu_fingerprint(self.name, self.version())
        return cpu_fingerprint(self.name, self.version(), self.threads)

    def options(self):
        so = self.ort.SessionOptions()
        so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        return so

    def providers(self) -> list:
        if self.device == "cuda":
            # TF32 off: fp32 parity at 1e-4 fails with it (the provider's default is on)
            return [("CUDAExecutionProvider", {"use_tf32": 0})]
        return ["CPUExecutionProvider"]

    def session(self, onnx):
        """The raw onnxruntime.InferenceSession, refused when CUDA was asked for and ORT fell back to the CPU."""
        src = str(onnx) if isinstance(onnx, Path) else onnx
        try:
            sess = self.ort.InferenceSession(src, self.options(), providers=self.providers())
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise SlimError(f"ONNX Runtime cannot load the model: {str(e).splitlines()[0][:200]}") from None
        if self.device == "cuda" and sess.get_providers()[0] != "CUDAExecutionProvider":
            raise SlimError("ort-cuda: ONNX Runtime could not load its CUDA provider and would run on the CPU "
                            f"(providers {sess.get_providers()}): check the CUDA/cuDNN libraries "
                            "(slimdeploy doctor)")
        return sess

    def load_onnx(self, onnx, quantized: bool = False):
        """A session of the graph; at int8 an fp32 graph is quantized first (random calibration: for timing;
        deployed int8 graphs come from the quantize stage and are loaded with quantized=True)."""
        if self.precision == "int8" and not quantized:
            import tempfile

            from ..quantize import quantize_for_timing

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "q.onnx"
                quantize_for_timing(onnx if isinstance(onnx, bytes) else Path(onnx), path)
                return OrtSession(self.session(path), self.device)
        return OrtSession(self.session(onnx), self.device)


# ---- torch eager -------------------------------------------------------------------------------

def disable_tf32() -> None:
    """fp32 on CUDA means fp32: no TF32 in matmuls or cuDNN convolutions (the patch embedding)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def device_sync(device: torch.device):
    """What waits for work queued on `device`: the model's own GPU (torch.cuda.synchronize() alone waits on the
    current one, so a model on cuda:1 would be timed too fast), nothing on the CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


TORCH_MODES = ("eager", "compile", "graph")


class TorchSession(Session):
    """A module run as deployed in torch: eager, torch.compile'd, or (CUDA) replayed from a captured CUDA graph."""

    def __init__(self, module: nn.Module, device: torch.device, dtype: torch.dtype, mode: str = "eager"):
        self.module, self.device, self.dtype, self.mode = module, device, dtype, mode
        self.fn = torch.compile(module) if mode == "compile" else module

    @torch.inference_mode()
    def run(self, x):
        out = self.fn(torch.as_tensor(x).to(self.device, self.dtype))
        return out.float().cpu().numpy()

    def timed(self, x):
        xs = tuple(torch.as_tensor(a).to(self.device, self.dtype) for a in (x if isinstance(x, tuple) else (x,)))
        if self.mode == "graph":
            return self._graph(xs), device_sync(self.device)

        @torch.inference_mode()
        def call():
            return self.fn(*xs)
        return call, device_sync(self.device)

    @torch.inference_mode()
    def _graph(self, xs):
        """Capture one call in a CUDA graph (after warm-up on a side stream, as torch's docs do); replay it."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(3):
                self.module(*xs)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._static_out = self.module(*xs)
        return graph.replay


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, device: str = "cpu", threads: int | None = 1, precision: str = "fp32", mode: str = "eager"):
        self.device = torch.device(device)
        self.precision, self.threads, self.mode = precision, threads, mode
        if mode not in TORCH_MODES:
            raise SlimError(f"--torch-mode must be one of {', '.join(TORCH_MODES)}, not '{mode}'")
        if mode == "graph" and self.device.type != "cuda":
            raise SlimError("--torch-mode graph (CUDA graphs) needs a CUDA device")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise SlimError("the torch backend on cuda needs a CUDA GPU and a CUDA build of torch")
        if precision == "int8":
            raise SlimError("int8 runs on ort-cpu (ONNX Runtime) or trt, not on the torch backend")
        if precision == "fp16" and self.device.type == "cpu":
            raise SlimError("fp16 on the torch backend needs a CUDA device (--torch-device cuda); bf16 runs on CPUs")
        if self.device.type == "cuda" and precision == "fp32":
            disable_tf32()
        if self.device.type == "cpu" and threads:
            torch.set_num_threads(threads)

    def version(self) -> str:
        return torch.__version__ + (f" (CUDA {torch.version.cuda})" if self.device.type == "cuda" else "")

    def hardware(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else cpu_name()

    def fingerprint(self) -> dict:
        if self.device.type == "cuda":
            return gpu_fingerprint(self.name, self.version(), self.device.index or 0)
        return cpu_fingerprint(self.name, self.version(), self.threads)

    def describe(self) -> dict:
        return {**super().describe(), "torch_device": str(self.device), "torch_mode": self.mode}

    def load_module(self, module, example=None):
        import copy

        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision, torch.float32)
        moved = dtype != torch.float32 or any(p.device != self.device for p in module.parameters())
        # the caller's module stays as it was: a copy is cast and moved
        module = copy.deepcopy(module).to(self.device, dtype) if moved else module
        return TorchSession(module.eval(), self.device, dtype, self.mode)

    def load_onnx(self, onnx):
        raise SlimError("the torch backend runs torch modules, not ONNX files")


# ---- TensorRT ----------------------------------------------------------------------------------

class TrtSession(Session):
    """A serialized engine behind polygraphy's TrtRunner (activated once, deactivated on close)."""

    def __init__(self, plan: bytes):
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self.runner = TrtRunner(EngineFromBytes(plan))
        self.runner.activate()
        self.input = next(iter(self.runner.get_input_metadata().keys()))

    def run(self, x: np.ndarray) -> np.ndarray:
        out = self.runner.infer({self.input: np.ascontiguousarray(x, dtype=np.float32)})
        return np.asarray(next(iter(out.values())), dtype=np.float32)

    def timed(self, x: np.ndarray):
        """execute_async_v3 on buffers bound once (polygraphy's infer checks every call, which dominates
        small engines); the sync waits on the session's own stream."""
        from ..trt import require_tensorrt

        trt = require_tensorrt()
        engine, ctx = self.runner.engine, self.runner.context
        stream = torch.cuda.Stream()
        self._buffers = []  # kept alive with the session
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                t = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32)).cuda()
                ctx.set_input_shape(name, tuple(t.shape))
            else:
                t = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=torch.float32, device="cuda")
            ctx.set_tensor_address(name, t.data_ptr())
            self._buffers.append(t)
        return (lambda: ctx.execute_async_v3(stream.cuda_stream)), stream.synchronize

    def close(self) -> None:
        if self.runner.is_active:
            self.runner.deactivate()  # frees its CUDA stream and context


class TrtBackend(Backend):
    name = "trt"

    def __init__(self, precision: str = "fp32", opt_batch: int = 1, timing_cache: str | Path | None = None, **_):
        from ..trt import require_tensorrt

        self.trt = require_tensorrt()
        self.precision, self.opt_batch, self.timing_cache = precision, opt_batch, timing_cache

    def version(self) -> str:
        return self.trt.__version__

    def hardware(self) -> str:
        return torch.cuda.get_device_name(0)

    def fingerprint(self) -> dict:
        return gpu_fingerprint(self.name, self.version())

    def load_onnx(self, onnx):
        from ..trt import build_engine

        plan = build_engine(onnx, precision=self.precision, opt_batch=self.opt_batch,
                            timing_cache=self.timing_cache)
        return TrtSession(plan)


def get_backend(name: str, threads: int | None = 1, precision: str = "fp32", torch_device: str = "auto",
                **kw) -> Backend:
    """The backend called `name`; SlimError naming what to install when it cannot run here."""
    if precision not in PRECISIONS:
        raise SlimError(f"--precision must be one of {', '.join(PRECISIONS)}, not '{precision}'")
    cuda = torch_device.startswith("cuda") or (torch_device == "auto" and torch.cuda.is_available())
    key = name if name != "torch" else f"torch-{'cuda' if cuda else 'cpu'}"
    if name in BACKEND_NAMES and precision not in SUPPORTED[key]:
        raise SlimError(f"{key} does not run {precision} (it runs {', '.join(SUPPORTED[key])})")
    if name == "ort-cpu":
        return OrtBackend("cpu", threads, precision)
    if name == "ort-cuda":
        return OrtBackend("cuda", threads, precision)
    if name == "trt":
        return TrtBackend(precision, **kw)
    if name == "torch":
        dev = torch_device if torch_device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        return TorchBackend(dev, threads, precision, kw.get("torch_mode", "eager"))
    raise SlimError(f"unknown backend '{name}': choose one of {', '.join(BACKEND_NAMES)}")
