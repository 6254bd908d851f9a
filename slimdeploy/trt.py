"""TensorRT through polygraphy's loaders and runner, written against the documented API (TensorRT 10 and 11).

Engines are built with `NetworkFromOnnxPath/Bytes -> CreateConfig -> EngineBytesFromNetwork`, with TF32 off for
fp32 (parity at 1e-4 needs it), an optimisation profile tuned at the deployment batch size, and one timing cache
shared by every build of a process (profiling builds many small engines). TensorRT 10 takes the FP16 builder
flag; TensorRT 11 removed weak typing, so fp16 means an fp16 ONNX graph built strongly typed, with LayerNorm,
Softmax and the reductions kept in fp32 as NVIDIA's migration guide does.
What polygraphy lacks is hand-written: timing binds device buffers once and times `execute_async_v3`.
Nothing here runs without TensorRT and a CUDA GPU; callers get one clear line instead.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import SlimError

INSTALL_HINT = ("TensorRT is not installed: pip install 'slimdeploy[trt]' "
                "--extra-index-url https://pypi.nvidia.com (needs an NVIDIA GPU and driver)")
# ops kept in fp32 in fp16 graphs: their accuracy sets top-1 agreement
FP32_OPS = ["LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Erf", "Div"]
_TIMING_CACHE = Path(tempfile.gettempdir()) / "slimdeploy-trt-timing.cache"


def tensorrt_missing_reason() -> str | None:
    """Why TensorRT cannot run here, or None when it can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (pip install 'slimdeploy[trt]' from NVIDIA's index)"
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU and none is visible"
    return None


def require_tensorrt():
    reason = tensorrt_missing_reason()
    if reason is not None:
        raise SlimError(INSTALL_HINT if "not installed" in reason else reason)
    import tensorrt as trt

    return trt


def major_version(trt) -> int:
    return int(trt.__version__.split(".")[0])


def fp16_onnx(onnx: str | Path | bytes) -> bytes:
    """The ONNX model in fp16 with fp32 inputs/outputs and FP32_OPS kept in fp32 (TensorRT 11's fp16).

    NVIDIA Model Optimizer's AutoCast is used where installed; else ONNX Runtime's converter with a block list.
    """
    import onnx as onnx_lib

    model = onnx_lib.load_from_string(onnx) if isinstance(onnx, bytes) else onnx_lib.load(str(onnx))
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.onnx"
            onnx_lib.save(model, str(path))
            converted = convert_to_mixed_precision(onnx_path=str(path), low_precision_type="fp16",
                                                   op_types_to_exclude=FP32_OPS, keep_io_types=True)
        return converted.SerializeToString()
    except ImportError:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        return convert_float_to_float16(model, keep_io_types=True, op_block_list=FP32_OPS).SerializeToString()


def onnx_input(onnx: str | Path | bytes) -> tuple[str, list[int | None]]:
    """Name and shape (None for a dynamic axis) of the model's first input."""
    import onnx as onnx_lib

    model = (onnx_lib.load_from_string(onnx) if isinstance(onnx, bytes)
             else onnx_lib.load(str(onnx), load_external_data=False))
    inp = model.graph.input[0]
    return inp.name, [d.dim_value or None for d in inp.type.tensor_type.shape.dim]


def build_config(fp16: bool, shapes: dict | None, timing_cache: str | Path | None, workspace_gib: float = 4.0):
    """polygraphy's CreateConfig: TF32 off unless fp16, FP16 flag on TensorRT 10, one profile, a timing cache."""
    from polygraphy.backend.trt import CreateConfig, Profile

    trt = require_tensorrt()
    profiles = None
    if shapes:
        prof = Profile()
        for name, (lo, opt, hi) in shapes.items():
            prof.add(name, min=lo, opt=opt, max=hi)
        profiles = [prof]
    kw = dict(tf32=False, profiles=profiles, load_timing_cache=str(timing_cache) if timing_cache else None,
              memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(workspace_gib * (1 << 30))})
    if fp16 and major_version(trt) < 11:
        kw["fp16"] = True  # TensorRT 11 raises on it: there the graph itself is fp16
    return CreateConfig(**kw)


def profile_shapes(name: str, shape: list[int | None], min_batch: int, opt_batch: int, max_batch: int
                   ) -> dict | None:
    """The optimisation profile of a dynamic-batch input, tuned at the deployment batch size (opt, clamped into
    [min, max]); None for a static input."""
    if not shape or shape[0] is not None:
        return None
    rest = tuple(shape[1:])
    opt = min(max(opt_batch, min_batch), max_batch)
    return {name: ((min_batch, *rest), (opt, *rest), (max_batch, *rest))}


def modelopt_quantize(onnx: str | Path | bytes, mode: str, calibration: np.ndarray | None) -> bytes:
    """An int8 or fp8 QDQ graph from NVIDIA Model Optimizer's ONNX post-training quantization (the way TensorRT
    10/11 take int8: explicit quantization, built strongly typed). Random calibration data when none is given
    (timing only)."""
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError:
        raise SlimError("int8/fp8 TensorRT engines need NVIDIA Model Optimizer: pip install 'nvidia-modelopt[onnx]'"
                        ) from None
    import onnx as onnx_lib

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "m.onnx", Path(tmp) / "q.onnx"
        onnx_lib.save(onnx_lib.load_from_string(onnx) if isinstance(onnx, bytes) else onnx_lib.load(str(onnx)),
                      str(src))
        if calibration is None:
            _, shape = onnx_input(onnx)
            calibration = np.random.default_rng(0).standard_normal([d or 1 for d in shape]).astype(np.float32)
        quantize(onnx_path=str(src), quantize_mode=mode, calibration_data=calibration, output_path=str(dst),
                 op_types_to_exclude=["Softmax", "LayerNormalization"])
        return dst.read_bytes()


def build_engine(onnx: str | Path | bytes, precision: str = "fp32", min_batch: int = 1, opt_batch: int = 1,
                 max_batch: int = 64, timing_cache: str | Path | None = None,
                 calibration: np.ndarray | None = None) -> bytes:
    """Parse ONNX, build and return a serialized engine (the bytes of model.plan) at fp32, fp16 or int8."""
    from polygraphy.backend.trt import EngineBytesFromNetwork, NetworkFromOnnxBytes, NetworkFromOnnxPath

    trt = require_tensorrt()
    name, shape = onnx_input(onnx)
    strongly_typed = major_version(trt) >= 11
    fp16 = precision == "fp16"
    if precision in ("int8", "fp8"):
        network = NetworkFromOnnxBytes(modelopt_quantize(onnx, precision, calibration), strongly_typed=True)
    elif fp16 and strongly_typed:
        network = NetworkFromOnnxBytes(fp16_onnx(onnx), strongly_typed=True)  # paths and bytes alike
    elif isinstance(onnx, bytes):
        network = NetworkFromOnnxBytes(onnx, strongly_typed=strongly_typed or None)
    else:  # from the file, so that external weight files are found
        network = NetworkFromOnnxPath(str(onnx), strongly_typed=strongly_typed or None)
    shapes = profile_shapes(name, shape, min_batch, opt_batch, max_batch)
    cache = timing_cache or _TIMING_CACHE
    try:
        plan = EngineBytesFromNetwork(network, config=build_config(fp16, shapes, cache if Path(cache).is_file()
                                                                   else None), save_timing_cache=str(cache))()
    except Exception as e:  # noqa: BLE001 - polygraphy reports parser/builder failures as exceptions
        raise SlimError(f"TensorRT cannot build the engine: {str(e).strip().splitlines()[0][:300]}") from None
    if plan is None:
        raise SlimError("TensorRT failed to build the engine (see the TensorRT log above)")
    return bytes(plan)


def engine_batch_range(plan: bytes) -> tuple[int, int]:
    """(min, max) batch the engine accepts: its profile's range, or the fixed batch twice."""
    from polygraphy.backend.trt import EngineFromBytes

    trt = require_tensorrt()
    engine = EngineFromBytes(plan)()
    name = next(engine.get_tensor_name(i) for i in range(engine.num_io_tensors)
                if engine.get_tensor_mode(engine.get_tensor_name(i)) == trt.TensorIOMode.INPUT)
    shape = engine.get_tensor_shape(name)
    if shape[0] != -1:
        return int(shape[0]), int(shape[0])
    lo, _, hi = engine.get_tensor_profile_shape(name, 0)
    return int(lo[0]), int(hi[0])
