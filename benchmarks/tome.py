"""A training-free token-merging baseline in the manner of ToMe (Bolya et al., 2023), for benchmarks only.

In every block, after attention: split the tokens into alternating sets A and B, match each token of A to its most
similar token of B (cosine of the keys, averaged over heads), and merge the r best-matched A tokens into their B
partners (size-weighted averages). Attention is proportional (log size added to the logits), as in ToMe. The
class token is never merged and stays first.

The merge is written to export: ToMe's scatter_reduce does not export to ONNX (pytorch#101535), so the sum into
the B tokens is a matmul with a one-hot assignment matrix instead. Shapes stay static (r is fixed per block).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def schedule(num_tokens: int, depth: int, merged: int, prefix: int) -> list[int]:
    """Tokens merged per block for `merged` in total, spread evenly (earlier blocks take the remainder), each
    block at most what its bipartite split allows."""
    base, extra = divmod(merged, depth)
    out, n = [], num_tokens
    for i in range(depth):
        r = min(base + (i < extra), max(0, (n - prefix) // 2))
        out.append(r)
        n -= r
    return out


def max_merged(num_tokens: int, depth: int, prefix: int) -> int:
    return sum(schedule(num_tokens, depth, 10 ** 6, prefix))


def _attention(blk, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm block's attention branch with proportional attention; also the keys averaged over heads."""
    a = blk.attn
    B, N, C = x.shape
    qkv = a.qkv(blk.norm1(x)).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = a.q_norm(q), a.k_norm(k)
    bias = size.log()[:, None, None, :, 0]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=a.scale)
    o = a.proj_drop(a.proj(o.transpose(1, 2).reshape(B, N, a.num_heads * a.head_dim)))
    return x + blk.drop_path1(blk.ls1(o)), k.mean(1)


def merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int, protect_first: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Bipartite soft matching: merge r tokens of the even positions into the odd ones."""
    B, N, C = x.shape
    metric = metric / metric.norm(dim=-1, keepdim=True)
    ma, mb = metric[:, ::2], metric[:, 1::2]
    scores = ma @ mb.transpose(-1, -2)  # (B, Na, Nb)
    if protect_first:  # the class token (position 0, in A) is never a source
        keep_first = torch.zeros(scores.shape[1], 1, dtype=scores.dtype, device=scores.device)
        keep_first[0] = -1e4
        scores = scores + keep_first
    node_max, node_idx = scores.max(-1)
    edge_idx = node_max.argsort(-1, descending=True)
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    if protect_first:
        unm_idx = unm_idx.sort(-1).values  # the class token back in front
    dst_idx = node_idx.gather(1, src_idx)
    xs = x * size
    xa, xb, sa, sb = xs[:, ::2], xs[:, 1::2], size[:, ::2], size[:, 1::2]
    nb = xb.shape[1]
    onehot = (dst_idx[..., None] == torch.arange(nb, device=x.device)).to(x.dtype)  # (B, r, Nb)
    take = onehot.transpose(1, 2)  # (B, Nb, r)
    src_x = xa.gather(1, src_idx[..., None].expand(B, r, C))
    src_s = sa.gather(1, src_idx[..., None])
    unm_x = xa.gather(1, unm_idx[..., None].expand(B, unm_idx.shape[1], C))
    unm_s = sa.gather(1, unm_idx[..., None])
    dst_x, dst_s = xb + take @ src_x, sb + take @ src_s
    new_s = torch.cat([unm_s, dst_s], 1)
    return torch.cat([unm_x, dst_x], 1) / new_s, new_s


class MergingBlocks(nn.Sequential):
    """timm blocks that merge r_i tokens after each block's attention."""

    def __init__(self, blocks, rs: list[int], protect_first: bool):
        super().__init__(*blocks)
        self.rs, self.protect_first = list(rs), protect_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = torch.ones_like(x[..., :1])
        for blk, r in zip(self, self.rs):
            x, metric = _attention(blk, x, size)
            if r > 0:
                x, size = merge(x, size, metric, r, self.protect_first)
            x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        return x


def tome(model: nn.Module, merged: int) -> nn.Module:
    """A copy of a timm VisionTransformer (class token, token pooling) that merges `merged` tokens in total."""
    if getattr(model, "cls_token", None) is None or model.global_pool != "token":
        raise ValueError("this merging baseline handles class-token models with token pooling")
    m = copy.deepcopy(model)
    n = m.patch_embed.num_patches + m.num_prefix_tokens
    rs = schedule(n, len(m.blocks), merged, m.num_prefix_tokens)
    m.blocks = MergingBlocks(list(m.blocks), rs, protect_first=True)
    return m.eval()
