"""Analytic MACs and parameter counts of a (slim) ViT from its SlimSpec.

Convention (as in ViT-Slim's and DeiT's tables): multiply-accumulates of the patch
embedding, the linear layers, the two attention matmuls and the head; norms, GELU,
softmax and additions are not counted.
"""

from __future__ import annotations

from .types import Arch, BlockSpec, SlimSpec


def block_macs(arch: Arch, b: BlockSpec) -> int:
    """MACs of one block for one image."""
    n, d, h, q, v, m = b.num_tokens, arch.embed_dim, b.num_heads, b.qk_dim, b.v_dim, b.mlp_dim
    qkv = n * d * h * (2 * q + v)
    attn = n * n * h * q + n * n * h * v
    proj = n * h * v * d
    mlp = 2 * n * d * m
    return qkv + attn + proj + mlp


def stem_head_macs(arch: Arch) -> int:
    patch = arch.num_patches * arch.in_chans * arch.patch_size**2 * arch.embed_dim
    heads = 2 if arch.distilled else 1
    return patch + heads * arch.embed_dim * arch.num_classes


def spec_macs(spec: SlimSpec) -> int:
    """Total MACs for one image."""
    return stem_head_macs(spec.arch) + sum(block_macs(spec.arch, b) for b in spec.blocks)


def block_params(arch: Arch, b: BlockSpec) -> int:
    d, h, q, v, m = arch.embed_dim, b.num_heads, b.qk_dim, b.v_dim, b.mlp_dim
    p = 2 * 2 * d  # norm1, norm2
    if h:
        out = h * (2 * q + v)
        p += d * out + (out if arch.qkv_bias else 0)
        p += 2 * 2 * q if arch.qk_norm else 0
        p += h * v * d
    p += d  # proj bias (kept as a constant when no head is left)
    if m:
        p += d * m + m + m * d
    p += d  # fc2 bias
    p += 2 * d if arch.layer_scale else 0
    return p


def spec_params(spec: SlimSpec) -> int:
    """Parameter count of the slim model (equals count_params of the built module).

    Everything outside the blocks is unchanged by pruning, so start from the dense count
    read off the built model and swap the blocks' counts.
    """
    a = spec.arch
    dense_block = block_params(a, SlimSpec.dense(spec.source, a).blocks[0])
    return a.params - a.depth * dense_block + sum(block_params(a, b) for b in spec.blocks)
