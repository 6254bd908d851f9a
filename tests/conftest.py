"""Shared fixtures: tiny ViT configurations covering every supported variant, registered by name."""

from __future__ import annotations

import os
import random

import pytest
import torch

os.environ.setdefault("SLIMDEPLOY_QUIET", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # tests run in parallel processes (make test): one thread each, and in the processes they start, so that
    # they share the cores rather than fight over them
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

from slimdeploy.models import arch_of, create_model, register_model  # noqa: E402
from slimdeploy.types import BlockSpec, ModelConfig, SlimSpec  # noqa: E402

_BASE = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=3, num_heads=4, mlp_ratio=2.0)
# name -> (constructor overrides, distilled)
VARIANTS = {
    "t-cls": (dict(), False),
    "t-distilled": (dict(), True),
    "t-reg": (dict(reg_tokens=2), False),
    "t-avg": (dict(global_pool="avg", class_token=False, fc_norm=True), False),
    "t-avg-reg": (dict(global_pool="avg", reg_tokens=1), False),
    "t-layerscale": (dict(init_values=0.5, no_embed_class=True), False),
    "t-nobias": (dict(qkv_bias=False), False),
    "t-qknorm": (dict(qk_norm=True), False),
}
for _name, (_kw, _dist) in VARIANTS.items():
    register_model(_name, {**_BASE, **_kw}, distilled=_dist)
# a grayscale 10-class model that trains on synthetic data or Fashion-MNIST in seconds
register_model("t-demo", dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=3,
                              num_heads=2, mlp_ratio=2.0))


def tiny_model(name: str, seed: int = 0):
    """A tiny model with random (non-trivial) weights: biases and norms perturbed off their init."""
    torch.manual_seed(seed)
    m = create_model(ModelConfig(name))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias") or "norm" in n or "gamma" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def random_spec(model, seed: int, keep_tokens: bool = True, force: str | None = None) -> SlimSpec:
    """A random valid spec: whole heads removed, channels and MLP units dropped, tokens at several depths.

    force: 'no-heads' removes every head of block 1, 'one-channel' keeps a single qk and v channel,
    'no-mlp' removes block 1's MLP.
    """
    rng = random.Random(seed)
    a = arch_of(model)
    spec = SlimSpec.dense(ModelConfig("x"), a)
    tokens = list(range(a.num_tokens))
    for i in range(len(spec.blocks)):
        if keep_tokens and i > 0 and rng.random() < 0.7:
            patches = [t for t in tokens if t >= a.num_prefix_tokens]
            keep_n = max(1, rng.randint(len(patches) // 2, len(patches)))
            tokens = list(range(a.num_prefix_tokens)) + sorted(rng.sample(patches, keep_n))
        nh = rng.randint(1, a.num_heads)
        heads = sorted(rng.sample(range(a.num_heads), nh))
        nq, nv = rng.randint(1, a.head_dim), rng.randint(1, a.head_dim)
        if force == "one-channel":
            nq = nv = 1
        qk = [sorted(rng.sample(range(a.head_dim), nq)) for _ in heads]
        v = [sorted(rng.sample(range(a.head_dim), nv)) for _ in heads]
        mlp = sorted(rng.sample(range(a.mlp_dim), rng.randint(1, a.mlp_dim)))
        if force == "no-heads" and i == 1:
            heads, qk, v = [], [], []
        if force == "no-mlp" and i == 1:
            mlp = []
        spec.blocks[i] = BlockSpec(tokens=list(tokens), heads=heads, qk=qk, v=v, mlp=mlp)
    return spec.validate()


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    return request.param


def fmnist_available() -> bool:
    from slimdeploy.data import find_fashion_mnist
    from slimdeploy.errors import SlimError

    try:
        find_fashion_mnist()
        return True
    except SlimError:
        return False


def assert_onnx_parity(slim, path, batches=(1, 5), shape=(3, 16, 16)) -> None:
    """ONNX Runtime on the exported file matches PyTorch (max |diff| <= 1e-4, same top-1) at each batch size."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in batches:
        x = torch.randn(batch, *shape)
        with torch.no_grad():
            ref = slim(x).numpy()
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        assert np.abs(ref - got).max() <= 1e-4
        assert (ref.argmax(1) == got.argmax(1)).all()
