"""ONNX export of (slim) models, graph clean-up with onnxslim, and the TensorRT engine.

Export uses torch.onnx's dynamo exporter with a dynamic batch axis (or a fixed batch size),
weights inline for models under 1.5 GB. Small component graphs for profiling use the faster
TorchScript exporter (`onnx_bytes`).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import SlimError
from .fileio import atomic_write_bytes

MAX_INLINE_BYTES = 1_500_000_000


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and deprecation chatter; keep the user's terminal clean."""
    with warnings.catch_warnings(), open(os.devnull, "w") as devnull, \
            contextlib.redirect_stdout(devnull):
        warnings.simplefilter("ignore")
        yield


def onnx_bytes(module: nn.Module, example: torch.Tensor, opset: int = 17) -> bytes:
    """Fast export of a small module (TorchScript exporter), fixed shapes. For profiling graphs."""
    f = io.BytesIO()
    with _quiet(), torch.no_grad():
        torch.onnx.export(module.eval(), (example,), f, dynamo=False, opset_version=opset,
                          input_names=["x"], output_names=["y"], do_constant_folding=True)
    return f.getvalue()


def export_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, int, int], batch_size: int | None = None,
                opset: int = 20, max_batch: int = 4096, slim: bool = True) -> Path:
    """Export model to ONNX at path (atomically). batch_size=None -> dynamic batch axis.

    input_shape is (channels, height, width). Returns the path.
    """
    import onnx

    if opset < 17:
        raise SlimError("--opset must be >= 17 (LayerNormalization)")
    path = Path(path)
    model = model.eval().cpu()
    # size-1 dims get specialised by torch.export, so trace a dynamic batch with 2 images
    example = torch.randn(batch_size or 2, *input_shape)
    dynamic = None if batch_size else {"x": {0: torch.export.Dim("batch", min=1, max=max_batch)}}
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=dynamic,
                                        opset_version=opset, input_names=["x"], output_names=["logits"],
                                        optimize=True, verify=False)
        proto = program.model_proto
    except Exception as e:  # noqa: BLE001 - the exporter raises many types
        raise SlimError(f"ONNX export failed: {str(e).strip().splitlines()[0][:300]}") from None
    if slim:
        import onnxslim

        with _quiet():
            proto = onnxslim.slim(proto)
    if proto.ByteSize() < MAX_INLINE_BYTES:
        atomic_write_bytes(path, proto.SerializeToString())
    else:
        tmp = path.with_name(f".{path.name}.tmp")
        onnx.save(proto, str(tmp), save_as_external_data=True, location=path.name + ".data")
        os.replace(tmp, path)
    return path


def write_trt_engine(onnx_path: str | Path, plan_path: str | Path, fp16: bool, max_batch: int = 64) -> Path:
    """Build a TensorRT engine from the ONNX file and write it atomically."""
    from .trt import build_engine

    plan = build_engine(onnx_path, fp16=fp16, max_batch=max_batch)
    atomic_write_bytes(plan_path, plan)
    return Path(plan_path)
