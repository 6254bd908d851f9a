"""Invariant 1 (mask/prune equivalence) and invariant 2 (token removal is real)."""

from __future__ import annotations

import pytest
import torch

from slimdeploy.masks import MaskedViT, SearchDims, hard_twin
from slimdeploy.models import arch_of
from slimdeploy.slim import build_slim
from slimdeploy.types import ModelConfig, SlimSpec

from .conftest import random_spec, tiny_model


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def test_all_ones_masks_equal_the_original(variant):
    model = tiny_model(variant)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        out = MaskedViT(model).eval()(x)
    # masks at exactly 1: same function (fp32 rounding only: fused vs masked attention kernels)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), float((out - ref).abs().max())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("force", [None, "no-heads", "one-channel", "no-mlp"])
def test_hard_masks_equal_pruned_model(variant, seed, force):
    model = tiny_model(variant, seed)
    spec = random_spec(model, seed, force=force)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        masked = hard_twin(model, spec)(x)
        pruned = build_slim(spec, model)(x)
    assert pruned.shape == masked.shape
    assert _rel_err(pruned, masked) <= 1e-4


def test_dense_spec_prunes_to_the_same_model(variant):
    model = tiny_model(variant)
    spec = SlimSpec.dense(ModelConfig(variant), arch_of(model))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert _rel_err(build_slim(spec, model)(x), model(x)) <= 1e-5


def test_token_mask_zero_is_physical_removal():
    """A masked-out token changes nothing for the others: same outputs as running on the token subset."""
    model = tiny_model("t-cls")
    a = arch_of(model)
    spec = SlimSpec.dense(ModelConfig("t-cls"), a)
    kept = [0, 1, 3, 4, 8, 9, 15, 16]  # class token + 7 patches, removed from block 0 on
    for b in spec.blocks:
        b.tokens = kept
    x = torch.randn(2, 3, 16, 16)
    masked = hard_twin(model, spec, SearchDims(tokens=True, attn=False, mlp=False))
    with torch.no_grad():
        # run timm's own blocks on the token subset
        seq = model.norm_pre(model._pos_embed(model.patch_embed(x)))[:, kept]
        ref = model.forward_head(model.norm(model.blocks(seq)))
        out = masked(x)
        # perturbing a removed token's pixels must not move the output
        x2 = x.clone()
        x2[:, :, 0:4, 4:8] += 5.0  # patch 1 -> token 2, which is removed
        out2 = masked(x2)
    assert _rel_err(out, ref) <= 1e-5
    assert torch.allclose(out, out2, atol=1e-6)


def test_vit_slim_zeroing_is_not_removal():
    """Why we do not copy ViT-Slim's token mask: zeroing the normed input still leaks through keys."""
    model = tiny_model("t-cls")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        blk = model.blocks[0]
        seq = model._pos_embed(model.patch_embed(x))
        keep = torch.ones(seq.shape[1])
        keep[2] = 0.0
        zeroed = seq + blk.attn(blk.norm1(seq) * keep[None, :, None])
        removed = seq[:, [i for i in range(seq.shape[1]) if i != 2]]
        removed = removed + blk.attn(blk.norm1(removed))
    # the class token sees the zeroed token's bias-only key/value: outputs differ
    assert (zeroed[:, 0] - removed[:, 0]).abs().max() > 1e-4


def test_shared_qkv_mask_option_equivalence():
    model = tiny_model("t-cls")
    spec = random_spec(model, 5)
    for b in spec.blocks:  # shared masks need the same channels for q/k and v
        b.v = [list(c) for c in b.qk]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        masked = hard_twin(model, spec, SearchDims(shared_qkv=True))(x)
        pruned = build_slim(spec, model)(x)
    assert _rel_err(pruned, masked) <= 1e-4
