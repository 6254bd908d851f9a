"""Stage: quantization, an explicit and recorded calibration. model.onnx (fp32) -> model.int8.onnx.

ONNX Runtime static QDQ quantization: per-channel int8 weights, uint8 activations, calibrated on a split of the
training images (never the images verify reports on) by min-max, entropy or percentile. The layers kept in
higher precision are options: by default Softmax and LayerNormalization (their ranges are where int8 loses
accuracy) and the classifier head. What was done is written to quantize.json.

Timing-only quantization (profiling pieces, closed-loop candidates) uses the same settings with random
calibration data: the kernels an int8 graph runs, and so its latency, do not depend on the scales.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import SlimError

METHODS = ("minmax", "entropy", "percentile")


@dataclass
class QuantConfig:
    method: str = "minmax"
    images: int = 512  # calibration images
    keep_fp32: list[str] = field(default_factory=lambda: ["Softmax", "LayerNormalization", "head"])
    per_channel: bool = True

    def check(self) -> QuantConfig:
        if self.method not in METHODS:
            raise SlimError(f"--calibration-method must be one of {', '.join(METHODS)}, not '{self.method}'")
        if self.images < 1:
            raise SlimError("--calibration-images must be >= 1")
        return self


class _Reader:
    """onnxruntime's CalibrationDataReader over arrays: one feed per batch (every input gets its array)."""

    def __init__(self, names: list[str], batches: list[list[np.ndarray]]):
        self.feeds = iter([dict(zip(names, b)) for b in batches])

    def get_next(self):
        return next(self.feeds, None)

    def rewind(self):  # pragma: no cover - only entropy/percentile calibrators rewind, and they restart the reader
        pass


def _excluded(model, keep: list[str]) -> list[str]:
    """Names of the nodes kept in fp32: nodes of the listed op types, and with "head" the last MatMul/Gemm."""
    names = [n.name for n in model.graph.node if n.op_type in keep]
    if "head" in keep:
        last = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]
        if last:
            names.append(last[-1].name)
    return names


def quantize_onnx(src: str | Path | bytes, dst: str | Path, calib: list[list[np.ndarray]], cfg: QuantConfig
                  ) -> dict:
    """Quantize an fp32 ONNX graph (path or bytes) to QDQ int8 at dst. calib: batches, each a list with one array
    per graph input. Returns the record of what was done."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load_from_string(src) if isinstance(src, bytes) else onnx.load(str(src))
    for node_i, node in enumerate(model.graph.node):  # the quantizer excludes nodes by name: every node needs one
        if not node.name:
            node.name = f"node_{node_i}"
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[cfg.method]
    with tempfile.TemporaryDirectory() as tmp:
        # onnxruntime's tools are given paths: handed a ModelProto they write it with external data they then
        # cannot read back (onnxruntime 1.32)
        src_path, pre = Path(tmp) / "named.onnx", Path(tmp) / "pre.onnx"
        onnx.save(model, str(src_path))
        try:  # shape inference and graph clean-up before quantizing, as onnxruntime recommends
            quant_pre_process(str(src_path), str(pre), skip_symbolic_shape=True)
            model, src_path = onnx.load(str(pre)), pre
        except Exception:  # noqa: BLE001 - an optimisation only: quantize the graph as it is
            pass
        excluded = _excluded(model, cfg.keep_fp32)
        try:
            quantize_static(str(src_path), str(dst), _Reader(names, calib), quant_format=QuantFormat.QDQ,
                            per_channel=cfg.per_channel, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=method, nodes_to_exclude=excluded,
                            calibration_providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - the quantizer raises many types
            raise SlimError(f"quantization failed: {str(e).strip().splitlines()[0][:200]}") from None
    return {**asdict(cfg), "nodes_kept_fp32": len(excluded), "format": "QDQ", "weights": "int8 per-channel"
            if cfg.per_channel else "int8 per-tensor", "activations": "uint8"}


def quantize_for_timing(src: str | Path | bytes, dst: str | Path) -> None:
    """Quantized as deployed, calibrated on random data: for timing only."""
    import onnx

    model = onnx.load_from_string(src) if isinstance(src, bytes) else onnx.load(str(src))
    init = {t.name for t in model.graph.initializer}
    shapes = [[d.dim_value or 1 for d in i.type.tensor_type.shape.dim] for i in model.graph.input if i.name not in init]
    rng = np.random.default_rng(0)
    calib = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(2)]
    quantize_onnx(model.SerializeToString(), dst, calib, QuantConfig())


def calibration_batches(data, n: int, batch: int, seed: int = 1) -> list[list[np.ndarray]]:
    """n training images (seeded; never the eval split), in batches of the exported graph's size."""
    import torch

    from .data import training_images

    x, _ = training_images(data, n, seed)
    if len(x) % batch:  # a fixed-batch graph: the last batch is filled up with its first images
        x = torch.cat([x, x[: batch - len(x) % batch]])
    return [[x[i:i + batch].numpy()] for i in range(0, len(x), batch)]


OUTPUTS = ["model.int8.onnx", "quantize.json"]


def quantize_run(run_dir: str | Path, data, cfg: QuantConfig | None = None) -> dict | None:
    """The quantize stage: RUN/model.onnx -> RUN/model.int8.onnx calibrated on training images; skipped when
    current. Returns quantize.json."""
    import onnx

    from .fileio import read_json, write_json
    from .runs import Run

    cfg = (cfg or QuantConfig()).check()
    r = Run(run_dir)
    if not (r / "model.onnx").is_file():
        raise SlimError(f"{r / 'model.onnx'} not found: run 'slimdeploy export {run_dir}' first")
    inputs = r.inputs({"quantize": asdict(cfg), "data": data.key}, [r / "model.onnx"])
    if r.current("quantize", inputs, OUTPUTS):
        return read_json(r / "quantize.json", "quantize record")
    graph = onnx.load(str(r / "model.onnx"), load_external_data=False).graph
    batch = graph.input[0].type.tensor_type.shape.dim[0].dim_value or 16
    tmp = r / ".model.int8.onnx.partial"
    try:
        record = quantize_onnx(r / "model.onnx", tmp, calibration_batches(data, cfg.images, batch), cfg)
        tmp.replace(r / "model.int8.onnx")
    finally:
        tmp.unlink(missing_ok=True)
    record.update(data=data.key, calibration="training images, seed 1 (the eval split is never used)")
    write_json(r / "quantize.json", record)
    r.finished("quantize", inputs, OUTPUTS)
    return record
