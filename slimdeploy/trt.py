"""TensorRT engine building, thin and written against the documented API (TensorRT 10 and 11).

TensorRT 10 takes BuilderFlag.FP16. TensorRT 11 removed weak typing: every network is strongly
typed, so FP16 means converting the ONNX graph to FP16 first (FP32 inputs/outputs kept).
Nothing here can run without TensorRT and a CUDA GPU; callers get one clear line instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import SlimError

INSTALL_HINT = ("TensorRT is not installed: pip install 'slimdeploy[trt]' "
                "--extra-index-url https://pypi.nvidia.com (needs an NVIDIA GPU and driver)")


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


def fp16_onnx(onnx_path: str | Path) -> bytes:
    """The ONNX model converted to FP16 with FP32 inputs/outputs (TensorRT 11's way to FP16)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(onnx_path))
    return convert_float_to_float16(model, keep_io_types=True).SerializeToString()


def build_engine(onnx: str | Path | bytes, fp16: bool = False, min_batch: int = 1, opt_batch: int = 1,
                 max_batch: int = 64, workspace_gib: float = 4.0) -> bytes:
    """Parse ONNX, build and return a serialized engine (the bytes of model.plan)."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in 10+; strongly typed in 11
    parser = trt.OnnxParser(network, logger)
    if fp16 and major_version(trt) >= 11 and not isinstance(onnx, bytes):
        ok = parser.parse(fp16_onnx(onnx))
    elif isinstance(onnx, bytes):
        ok = parser.parse(onnx)
    else:  # from the file, so that external weight files are found
        ok = parser.parse_from_file(str(onnx))
    if not ok:
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SlimError(f"TensorRT cannot parse the ONNX model: {errors[:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16 and major_version(trt) < 11:
        config.set_flag(trt.BuilderFlag.FP16)
    inp = network.get_input(0)
    if inp.shape[0] == -1:  # dynamic batch axis
        profile = builder.create_optimization_profile()
        rest = tuple(inp.shape[1:])
        profile.set_shape(inp.name, (min_batch, *rest), (opt_batch, *rest), (max_batch, *rest))
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise SlimError("TensorRT failed to build the engine (see the TensorRT log above)")
    return bytes(plan)
