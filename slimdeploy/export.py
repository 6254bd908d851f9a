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


def onnx_bytes(module: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...], opset: int = 17) -> bytes:
    """Fast export of a small module (TorchScript exporter), fixed shapes, one or several inputs. For profiling."""
    examples = example if isinstance(example, tuple) else (example,)
    f = io.BytesIO()
    with _quiet(), torch.no_grad():
        torch.onnx.export(module.eval(), examples, f, dynamo=False, opset_version=opset,
                          input_names=[f"x{i}" for i in range(len(examples))], do_constant_folding=True)
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
        proto = _slimmed(proto)
    if proto.ByteSize() < MAX_INLINE_BYTES:
        atomic_write_bytes(path, proto.SerializeToString())
    else:
        tmp = path.with_name(f".{path.name}.tmp")
        onnx.save(proto, str(tmp), save_as_external_data=True, location=path.name + ".data")
        os.replace(tmp, path)
    return path


def _slimmed(proto):
    """The graph simplified by onnxslim, or as exported where onnxslim returns a graph that is not valid ONNX (seen
    with onnxslim 0.1.98 on a ranked-token model whose scoring block keeps one head of one query channel: a node
    left before the one that makes its input)."""
    import onnx
    import onnxslim

    with _quiet():
        slimmed = onnxslim.slim(proto)
    if slimmed.ByteSize() >= MAX_INLINE_BYTES:  # the checker needs a file past 2 GB; such graphs are plain
        return slimmed
    try:
        onnx.checker.check_model(slimmed)
    except onnx.checker.ValidationError as e:
        from .progress import log

        log(f"export: onnxslim made an invalid graph ({str(e).splitlines()[0][:120]}); writing the graph as "
            "exported instead")
        return proto
    return slimmed


def write_trt_engine(onnx_path: str | Path, plan_path: str | Path, precision: str, opt_batch: int = 1,
                     max_batch: int = 64, calibration=None) -> Path:
    """Build a TensorRT engine from the ONNX file (tuned at the deployment batch size) and write it atomically."""
    from .trt import build_engine

    plan = build_engine(onnx_path, precision=precision, opt_batch=opt_batch, max_batch=max_batch,
                        calibration=calibration)
    atomic_write_bytes(plan_path, plan)
    return Path(plan_path)


def slim_of_run(run_dir: str | Path):
    """The run's final model: slim.safetensors (retrained), else pruned.safetensors, with spec.json."""
    from .slim import load_slim
    from .types import SlimSpec

    run_dir = Path(run_dir)
    spec = SlimSpec.load(run_dir / "spec.json") if (run_dir / "spec.json").is_file() else None
    if spec is None:
        raise SlimError(f"{run_dir}/spec.json not found: run select and prune first")
    for stem in ("slim", "pruned"):
        if (run_dir / f"{stem}.safetensors").is_file():
            return load_slim(spec, run_dir / f"{stem}.safetensors"), spec, stem
    raise SlimError(f"{run_dir} has no slim.safetensors or pruned.safetensors: run prune (and retrain) first")


def export_run(run_dir: str | Path, trt: bool = False, precision: str = "fp32", opset: int = 20,
               batch_size: int | None = None, max_batch: int = 64, calibration=None) -> dict:
    """The export stage: RUN/model.onnx (fp32; int8 ONNX comes from the quantize stage), + RUN/model.plan at
    `precision` with trt (int8 calibrated on `calibration` images). Skipped when current. Returns export.json."""
    from .fileio import read_json, write_json
    from .runs import Run

    run_dir = Path(run_dir)
    if precision in ("fp16", "bf16") and not trt:
        raise SlimError(f"--precision {precision} applies to the TensorRT engine: add --trt (ONNX stays fp32; int8 "
                        "ONNX comes from slimdeploy quantize)")
    if trt:  # fail before the slow export when TensorRT cannot run here
        from .trt import require_tensorrt

        require_tensorrt()
    r = Run(run_dir)
    weights = [r / "slim.safetensors"] if (r / "slim.safetensors").is_file() else [r / "pruned.safetensors"]
    inputs = r.inputs({"trt": trt, "precision": precision, "opset": opset, "batch_size": batch_size,
                           "max_batch": max_batch}, [r / "spec.json", *weights])
    outputs = ["model.onnx", "export.json"] + (["model.plan"] if trt else [])
    if r.current("export", inputs, outputs):
        return read_json(r / "export.json", "export record")
    model, spec, stem = slim_of_run(run_dir)
    a = spec.arch
    onnx_path = export_onnx(model, run_dir / "model.onnx", (a.in_chans, a.img_size, a.img_size), batch_size, opset)
    record = {"onnx": str(onnx_path), "opset": opset, "batch_size": batch_size, "dynamic_batch": batch_size is None,
              "weights": f"{stem}.safetensors", "onnx_bytes": onnx_path.stat().st_size,
              "sequence_lengths": onnx_sequence_lengths(onnx_path)}
    if trt:
        plan = write_trt_engine(onnx_path, run_dir / "model.plan", precision, opt_batch=batch_size or 1,
                                max_batch=batch_size or max_batch, calibration=calibration)
        record.update(plan=str(plan), precision=precision, max_batch=batch_size or max_batch)
    write_json(run_dir / "export.json", record)
    r.finished("export", inputs, outputs)
    return record


def onnx_sequence_lengths(path: str | Path) -> list[int]:
    """Token counts seen by the LayerNormalization nodes of an exported model (with shape inference):
    proof that pruned tokens left the sequence."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    shapes = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    lengths = []
    for node in model.graph.node:
        if node.op_type == "LayerNormalization":
            dims = shapes.get(node.input[0])
            if dims and len(dims) == 3 and dims[1] is not None:
                lengths.append(dims[1])
    return lengths
