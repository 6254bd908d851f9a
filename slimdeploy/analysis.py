"""Analytic MACs and parameter counts of a (slim) ViT from its SlimSpec.

Convention (as in ViT-Slim's and DeiT's tables): multiply-accumulates of the patch
embedding, the linear layers, the two attention matmuls and the head; norms, GELU,
softmax and additions are not counted.
"""

from __future__ import annotations

from .types import Arch, BlockSpec, ModelConfig, SlimSpec


def block_macs(arch: Arch, b: BlockSpec, embed: int | None = None) -> int:
    """MACs of one block for one image (at embedding width `embed`, default the dense one)."""
    n, d, h, q, v, m = b.num_tokens, embed or arch.embed_dim, b.num_heads, b.qk_dim, b.v_dim, b.mlp_dim
    qkv = n * d * h * (2 * q + v)
    attn = n * n * h * q + n * n * h * v
    proj = n * h * v * d
    mlp = 2 * n * d * m
    return qkv + attn + proj + mlp


def stem_head_macs(arch: Arch, embed: int | None = None) -> int:
    d = embed or arch.embed_dim
    patch = arch.num_patches * arch.in_chans * arch.patch_size**2 * d
    heads = 2 if arch.distilled else 1
    return patch + heads * d * arch.num_classes


def spec_macs(spec: SlimSpec) -> int:
    """Total MACs for one image."""
    e = spec.embed_dim
    return stem_head_macs(spec.arch, e) + sum(block_macs(spec.arch, b, e) for b in spec.blocks)


def block_params(arch: Arch, b: BlockSpec, embed: int | None = None, slim: bool = True) -> int:
    """Parameters of one block: of a slim block (its q/k norms hold an affine per head), or with slim=False of a
    dense timm block (one q/k norm affine shared by every head)."""
    d, h, q, v, m = embed or arch.embed_dim, b.num_heads, b.qk_dim, b.v_dim, b.mlp_dim
    p = 2 * 2 * d  # norm1, norm2
    if h:
        out = h * (2 * q + v)
        p += d * out + (out if arch.qkv_bias else 0)
        p += 2 * 2 * q * (h if slim else 1) if arch.qk_norm else 0
        p += h * v * d
    p += d  # proj bias (kept as a constant when no head is left)
    if m:
        p += d * m + m + m * d
    p += d  # fc2 bias
    p += 2 * d if arch.layer_scale else 0
    return p


def spec_params(spec: SlimSpec) -> int:
    """Parameter count of the slim model (equals count_params of the built module).

    Everything outside the blocks changes only with the embedding width, in proportion to it (patch embedding,
    prefix tokens, position embedding, final norm, the heads' weights) except for the heads' biases; so start
    from the dense count read off the built model and swap the blocks' counts.
    """
    return params_at(spec.arch, spec.embed_dim, spec.blocks)


def params_at(a: Arch, embed: int, blocks: list[BlockSpec]) -> int:
    """Parameter count of a slim model with these blocks at this embedding width."""
    dense_block = block_params(a, SlimSpec.dense(ModelConfig("x"), a).blocks[0], slim=False)
    outside = a.params - a.depth * dense_block
    head_bias = a.num_classes * (2 if a.distilled else 1)
    outside = (outside - head_bias) * embed // a.embed_dim + head_bias
    return outside + sum(block_params(a, b, embed) for b in blocks)
