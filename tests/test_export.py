"""ONNX export of slim models: parity with PyTorch (invariant 3), real token removal (invariant 2),
tampered weights caught by verify, TensorRT where it exists."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from slimdeploy.export import export_onnx, onnx_sequence_lengths
from slimdeploy.models import arch_of
from slimdeploy.slim import build_slim
from slimdeploy.trt import tensorrt_missing_reason

from .conftest import assert_onnx_parity, random_spec, tiny_model


@pytest.mark.parametrize("variant", ["t-cls", "t-distilled", "t-avg-reg", "t-layerscale", "t-qknorm"])
def test_exported_slim_model_matches_pytorch(tmp_path, variant):
    model = tiny_model(variant)
    spec = random_spec(model, 11)
    slim = build_slim(spec, model)
    path = export_onnx(slim, tmp_path / "m.onnx", (3, 16, 16))
    assert_onnx_parity(slim, path, batches=(1, 5))  # dynamic batch axis


def test_token_pruned_graph_has_shorter_sequences(tmp_path):
    model = tiny_model("t-cls")
    a = arch_of(model)
    spec = random_spec(model, 0, force=None)
    spec.blocks[1].tokens = spec.blocks[0].tokens[: a.num_prefix_tokens + 9]
    spec.blocks[2].tokens = spec.blocks[1].tokens[: a.num_prefix_tokens + 4]
    spec.validate()
    lengths = onnx_sequence_lengths(export_onnx(build_slim(spec, model), tmp_path / "m.onnx", (3, 16, 16)))
    expected = {b.num_tokens for b in spec.blocks}
    assert set(lengths) == expected, (lengths, expected)
    assert min(lengths) == a.num_prefix_tokens + 4 < a.num_tokens


def test_fixed_batch_export(tmp_path):
    model = tiny_model("t-cls")
    path = export_onnx(build_slim(random_spec(model, 1), model), tmp_path / "m.onnx", (3, 16, 16), batch_size=3)
    dim = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_value == 3


def tamper(path) -> None:
    """Scale the largest weight matrix of an ONNX file: same graph, wrong numbers."""
    m = onnx.load(str(path))
    init = max(m.graph.initializer, key=lambda t: np.prod(t.dims))
    arr = numpy_helper.to_array(init) * 1.5
    init.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), init.name))
    onnx.save(m, str(path))


@pytest.mark.skipif(tensorrt_missing_reason() is not None,
                    reason=f"TensorRT path not exercised: {tensorrt_missing_reason()}")
@pytest.mark.parametrize("fp16", [False, True])
def test_tensorrt_engine_parity(tmp_path, fp16):
    from slimdeploy.latency.backends import TrtSession
    from slimdeploy.trt import build_engine

    model = tiny_model("t-cls")
    slim = build_slim(random_spec(model, 4), model)
    path = export_onnx(slim, tmp_path / "m.onnx", (3, 16, 16))
    sess = TrtSession(build_engine(path, fp16=fp16, max_batch=8))
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        ref = slim(x).numpy()
    got = sess.run(x.numpy())
    if fp16:
        assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.995 or np.abs(ref - got).max() < 5e-2
    else:
        assert np.abs(ref - got).max() <= 1e-4


def test_trt_missing_is_one_clear_error():
    from slimdeploy.errors import SlimError
    from slimdeploy.trt import require_tensorrt

    if tensorrt_missing_reason() is None:
        pytest.skip("TensorRT is available here")
    with pytest.raises(SlimError, match="TensorRT"):
        require_tensorrt()
