"""The physically pruned model: a timm VisionTransformer whose blocks are replaced by SlimBlocks.

A SlimBlock has dense, smaller layers: qkv with only the kept heads and channels (q/k width may
differ from v width), proj with the kept input columns, fc1/fc2 with the kept hidden units, and a
token gather at its start when the spec drops tokens there, so the sequence really shrinks.
Everything outside the blocks (patch embedding, tokens, position embedding, norm, head) is
timm's, unchanged, unless the spec narrows the embedding width (the residual stream): then every layer
that writes to the stream keeps only the kept channels of its output, and every layer that reads it only
those of its input (narrow_embed). Rebuilt from spec.json + safetensors with `load_slim`.

In attentive token mode a block that drops tokens keeps, per image, the prefix tokens and the k patch
tokens that the class token attended to most (averaged over heads) in the last block with heads before
it; without a class token, the tokens that received the most attention on average. The count k is fixed,
so the graph stays static: TopK with a constant k, then GatherElements. The blocks then run in
RankedBlocks, which carries those scores from the block that computes them to the one that ranks by them.
With a rank prior (spec.rank_prior, from the search) the ranking mixes that attention with a per-position
importance; the patches' positions then travel with them.
Fused token mode is attentive mode where the patches a block drops are fused into one token in the last of its
places (EViT): what the dropped tokens carried stays in the sequence, at one token's cost.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import use_fused_attn
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from .errors import SlimError
from .models import create_model, load_checkpoint
from .types import RANKED_TOKEN_MODES, Arch, BlockSpec, SlimSpec


class HeadwiseLayerNorm(nn.Module):
    """LayerNorm over each head's channels with a per-head affine (H, C).

    A pruned q/k norm needs it: each kept head keeps its own channels, so the shared
    LayerNorm(head_dim) affine becomes a different slice per head.
    """

    def __init__(self, num_heads: int, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_heads, dim))
        self.bias = nn.Parameter(torch.zeros(num_heads, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, H, N, C)
        x = F.layer_norm(x, (x.shape[-1],), eps=self.eps)
        return x * self.weight[:, None, :] + self.bias[:, None, :]


class SlimAttention(nn.Module):
    """Multi-head attention with num_heads heads of qk_dim query/key and v_dim value channels."""

    def __init__(self, dim: int, num_heads: int, qk_dim: int, v_dim: int, scale: float, qkv_bias: bool = True,
                 qk_norm: bool = False, norm_eps: float = 1e-6, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads, self.qk_dim, self.v_dim, self.scale = num_heads, qk_dim, v_dim, scale
        self.qkv = nn.Linear(dim, num_heads * (2 * qk_dim + v_dim), bias=qkv_bias)
        self.q_norm = HeadwiseLayerNorm(num_heads, qk_dim, norm_eps) if qk_norm else nn.Identity()
        self.k_norm = HeadwiseLayerNorm(num_heads, qk_dim, norm_eps) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(num_heads * v_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused_attn = use_fused_attn()

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (normed) and v per head: (B, H, N, qk_dim), (B, H, N, qk_dim), (B, H, N, v_dim)."""
        B, N, _ = x.shape
        H, Q, V = self.num_heads, self.qk_dim, self.v_dim
        q, k, v = self.qkv(x).split([H * Q, H * Q, H * V], dim=-1)
        q = self.q_norm(q.reshape(B, N, H, Q).transpose(1, 2))
        k = self.k_norm(k.reshape(B, N, H, Q).transpose(1, 2))
        return q, k, v.reshape(B, N, H, V).transpose(1, 2)

    def forward(self, x: torch.Tensor, scores: str | None = None):
        """The attention output; with scores="cls" or "mean", also the token scores (B, N) a later block ranks
        by (see token_scores)."""
        B, N, _ = x.shape
        q, k, v = self.heads(x)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0,
                                               scale=self.scale)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.v_dim)
        out = self.proj_drop(self.proj(x))
        if scores is None:
            return out
        return out, token_scores(q, k, self.scale, scores)


def token_scores(q: torch.Tensor, k: torch.Tensor, scale: float, how: str, bias: torch.Tensor | None = None,
                 head_weight: torch.Tensor | None = None, query_weight: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N) attention each token receives, averaged over heads: from the class token's query ("cls": only
    its row is computed, next to the fused attention), or from every query ("mean", models without a class
    token). bias, head_weight and query_weight serve the search's masked model (absent tokens and heads)."""
    if how == "cls":
        q = q[:, :, :1]
    p = ((q * scale) @ k.transpose(-2, -1) + (0 if bias is None else bias)).softmax(-1)  # (B, H, Nq, N)
    if how == "cls":
        p = p[:, :, 0]
    elif query_weight is None:
        p = p.mean(2)
    else:
        w = query_weight[:, None, :, None]
        p = (p * w).sum(2) / w.sum(2).clamp_min(1e-12)
    if head_weight is None:
        return p.mean(1)
    return (p * head_weight[None, :, None]).sum(1) / head_weight.sum().clamp_min(1e-12)


def score_kind(vit: VisionTransformer) -> str:
    """How a model's tokens are ranked: by the class token's attention, or (no class token) the mean received."""
    return "cls" if vit.num_prefix_tokens > 0 and vit.cls_token is not None else "mean"


def keep_top_tokens(x: torch.Tensor, scores: torch.Tensor, keep: int, prefix: int, fuse: bool = False,
                    rank: torch.Tensor | None = None, pos: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x (B, N, C) reduced to the prefix tokens and the keep - prefix best-ranked others, per image; the
    scores of the kept tokens and their patch positions with it (the incoming ones are `pos` (B, N - prefix), or
    every patch in order when None; None in fused mode). The patches are ranked by `rank` (B, N - prefix), by
    default their scores. Static shapes: TopK with a constant k, GatherElements.

    fuse (EViT): the last of the keep places holds the tokens dropped, fused into one: their mean weighted by
    their scores, with the sum of their scores as its own (the attention it stands for, if it is ranked again).
    TopK then sorts every patch (k = N - prefix, still constant) and the dropped ones are a fixed slice of it."""
    B, N, C = x.shape
    if not fuse and keep == prefix:  # no patch token left
        return x[:, :prefix], scores[:, :prefix], torch.zeros(B, 0, dtype=torch.long, device=x.device)
    top = keep - prefix - int(fuse)
    order = (scores[:, prefix:] if rank is None else rank).topk(N - prefix if fuse else top, dim=1).indices
    kept_pos = None if fuse else order[:, :top] if pos is None else pos.gather(1, order[:, :top])
    order = order + prefix
    idx = order[:, :top]
    if prefix:
        idx = torch.cat([torch.arange(prefix, device=x.device).expand(B, prefix), idx], 1)
    out, out_scores = x.gather(1, idx.unsqueeze(-1).expand(B, idx.shape[1], C)), scores.gather(1, idx)
    if not fuse:
        return out, out_scores, kept_pos
    gone = order[:, top:]
    s = scores.gather(1, gone)  # (B, dropped)
    w = s / s.sum(1, keepdim=True).clamp_min(1e-12)
    fused = (x.gather(1, gone.unsqueeze(-1).expand(B, gone.shape[1], C)) * w.unsqueeze(-1)).sum(1, keepdim=True)
    return torch.cat([out, fused], 1), torch.cat([out_scores, s.sum(1, keepdim=True)], 1), None


def rank_with_prior(attention: torch.Tensor, prior: torch.Tensor, weight: float) -> torch.Tensor:
    """What the patches are ranked by: (1 - w) x attention / its sum + w x prior / its sum, over the patches ranked
    (attention (B, n); the prior of their positions, (B, n), or at a model's first ranking the block's row (n,)).
    Computed as attention + prior x w / (1 - w) x sum(attention) / sum(prior), which is that times a positive
    number per image, so TopK keeps the same patches, in fewer nodes: each node costs about a microsecond on a CPU
    at these sizes, and at the first ranking the prior's sum is a constant that the export folds away."""
    if weight >= 1:
        return prior.expand_as(attention)
    return attention + prior * (weight / (1 - weight) / prior.sum(-1, keepdim=True)) * attention.sum(1, keepdim=True)


class ConstantBranch(nn.Module):
    """A branch pruned to nothing (no head / no MLP unit) still adds its output bias."""

    def __init__(self, dim: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand_as(x)


class SlimBlock(nn.Module):
    """timm's Block with pruned attention/MLP and an optional token gather at its start."""

    def __init__(self, dense: Block, attn: nn.Module, mlp: nn.Module, keep: list[int] | None):
        super().__init__()
        # keep: positions (in the incoming sequence) of the tokens this block keeps (static mode)
        self.register_buffer("keep", torch.tensor(keep, dtype=torch.long) if keep is not None else None,
                             persistent=False)
        # attentive mode (set by build_slim): how many tokens to keep by the incoming scores, and whether
        # (cls / mean) this block's attention computes the scores a later block ranks by
        self.rank_keep: int | None = None
        self.prefix, self.scores, self.fuse = 0, None, False
        # with a rank prior (spec.rank_prior): the importance of each patch position when this block ranks
        self.register_buffer("prior", None, persistent=False)
        self.prior_weight = 0.0
        self.norm1, self.ls1, self.drop_path1 = dense.norm1, dense.ls1, dense.drop_path1
        self.norm2, self.ls2, self.drop_path2 = dense.norm2, dense.ls2, dense.drop_path2
        self.attn, self.mlp = attn, mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.keep is not None:
            x = x.index_select(1, self.keep)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x

    def forward_ranked(self, x: torch.Tensor, scores: torch.Tensor | None, pos: torch.Tensor | None = None):
        """Attentive mode: (x, scores, the patches' positions: None until a block has ranked) in and out."""
        if self.rank_keep is not None:
            rank = None
            if self.prior is not None:  # before the first ranking (pos None) every patch is in its place
                rank = rank_with_prior(scores[:, self.prefix:], self.prior if pos is None else self.prior[pos],
                                       self.prior_weight)
            x, scores, pos = keep_top_tokens(x, scores, self.rank_keep, self.prefix, self.fuse, rank, pos)
        if self.scores is not None:
            o, scores = self.attn(self.norm1(x), scores=self.scores)
        else:
            o = self.attn(self.norm1(x))
        x = x + self.drop_path1(self.ls1(o))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, scores, pos


class RankedBlocks(nn.Sequential):
    """The blocks of an attentive-mode slim model: they pass the token scores along with the tokens, and the
    patches' positions when a block ranks with a prior."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores, pos = None, None
        for blk in self:
            x, scores, pos = blk.forward_ranked(x, scores, pos)
        return x


def attention_rows(arch: Arch, b: BlockSpec) -> tuple[list[int], list[int], list[int]]:
    """Rows of the dense qkv weight that the slim q, k and v keep (dense layout [q | k | v], by head)."""
    A, hd = arch.num_heads * arch.head_dim, arch.head_dim
    q = [h * hd + c for h, cs in zip(b.heads, b.qk) for c in cs]
    v = [h * hd + c for h, cs in zip(b.heads, b.v) for c in cs]
    return q, [A + r for r in q], [2 * A + r for r in v]


def _keep_positions(prev: list[int], tokens: list[int]) -> list[int] | None:
    if tokens == prev:
        return None
    where = {t: i for i, t in enumerate(prev)}
    return [where[t] for t in tokens]


@torch.no_grad()
def slim_block(arch: Arch, dense: Block, b: BlockSpec, keep: list[int] | None, copy_weights: bool) -> SlimBlock:
    """Build one SlimBlock; with copy_weights, slice the dense block's weights into it."""
    da, dm = dense.attn, dense.mlp
    dense = copy.deepcopy(dense) if copy_weights else dense
    if b.num_heads:
        qk_norm = not isinstance(da.q_norm, nn.Identity)
        eps = da.q_norm.eps if qk_norm else 1e-6
        attn = SlimAttention(arch.embed_dim, b.num_heads, b.qk_dim, b.v_dim, da.scale, da.qkv.bias is not None,
                             qk_norm, eps, da.attn_drop.p, da.proj_drop.p)
        if copy_weights:
            q, k, v = attention_rows(arch, b)
            rows = torch.tensor(q + k + v)
            attn.qkv.weight.copy_(da.qkv.weight[rows])
            if da.qkv.bias is not None:
                attn.qkv.bias.copy_(da.qkv.bias[rows])
            cols = torch.tensor(v) - 2 * arch.num_heads * arch.head_dim
            attn.proj.weight.copy_(da.proj.weight[:, cols])
            _copy_bias(attn.proj.bias, da.proj.bias)
            if qk_norm:
                ch = torch.tensor(b.qk)  # (heads, qk_dim)
                for slim_n, dense_n in ((attn.q_norm, da.q_norm), (attn.k_norm, da.k_norm)):
                    slim_n.weight.copy_(dense_n.weight[ch])
                    slim_n.bias.copy_(dense_n.bias[ch])
    else:
        attn = ConstantBranch(arch.embed_dim)
        if copy_weights:
            _copy_bias(attn.bias, da.proj.bias)
    if b.mlp_dim:
        mlp = copy.deepcopy(dm) if copy_weights else dm
        units = torch.tensor(b.mlp)
        fc1 = nn.Linear(dm.fc1.in_features, b.mlp_dim, bias=dm.fc1.bias is not None)
        fc2 = nn.Linear(b.mlp_dim, dm.fc2.out_features, bias=dm.fc2.bias is not None)
        if copy_weights:
            fc1.weight.copy_(dm.fc1.weight[units])
            if dm.fc1.bias is not None:
                fc1.bias.copy_(dm.fc1.bias[units])
            fc2.weight.copy_(dm.fc2.weight[:, units])
            if dm.fc2.bias is not None:
                fc2.bias.copy_(dm.fc2.bias)
        mlp.fc1, mlp.fc2 = fc1, fc2
    else:
        mlp = ConstantBranch(arch.embed_dim)
        if copy_weights:
            _copy_bias(mlp.bias, dm.fc2.bias)
    return SlimBlock(dense, attn, mlp, keep)


def _copy_bias(dst: torch.Tensor, src: torch.Tensor | None) -> None:
    if src is None:
        dst.zero_()
    else:
        dst.copy_(src)


def build_slim(spec: SlimSpec, dense: VisionTransformer | None = None) -> VisionTransformer:
    """The slim model of `spec`. With `dense`, its weights are sliced in (dense is not modified);
    without, the structure is built with untrained weights (to load a checkpoint into)."""
    spec.validate()
    copy_weights = dense is not None
    model = copy.deepcopy(dense) if dense is not None else create_model(spec.source)
    if spec.token_mode in RANKED_TOKEN_MODES:
        model.blocks = _ranked_blocks(spec, model, copy_weights)
    else:
        prev = list(range(spec.arch.num_tokens))
        blocks = []
        for i, b in enumerate(spec.blocks):
            blocks.append(slim_block(spec.arch, model.blocks[i], b, _keep_positions(prev, b.tokens), copy_weights))
            prev = b.tokens
        model.blocks = nn.Sequential(*blocks)
    if spec.embed_dim < spec.arch.embed_dim:
        narrow_embed(model, spec.embed)
    return model.eval()


@torch.no_grad()
def narrow_embed(model: VisionTransformer, keep: list[int]) -> None:
    """Keep only the residual-stream channels `keep`, in place: the writers (patch embedding, prefix tokens,
    position embedding, each branch's output projection and constant) keep those output rows, the readers (every
    LayerNorm over the stream, qkv, fc1, the heads) those inputs; layer scales follow their channels."""
    idx = torch.tensor(keep, dtype=torch.long)
    check_embed_prunable(model)
    pe = model.patch_embed
    pe.proj = _conv_out(pe.proj, idx)
    for name in ("cls_token", "reg_token", "dist_token", "pos_embed"):
        p = getattr(model, name, None)
        if isinstance(p, nn.Parameter):
            setattr(model, name, nn.Parameter(p.data[..., idx].clone()))
    for blk in model.blocks:
        blk.norm1, blk.norm2 = norm_slice(blk.norm1, idx), norm_slice(blk.norm2, idx)
        for ls in (blk.ls1, blk.ls2):
            if hasattr(ls, "gamma"):
                ls.gamma = nn.Parameter(ls.gamma.data[idx].clone())
        for branch, reader, writer in ((blk.attn, "qkv", "proj"), (blk.mlp, "fc1", "fc2")):
            if isinstance(branch, ConstantBranch):
                branch.bias = nn.Parameter(branch.bias.data[idx].clone())
                continue
            setattr(branch, reader, _linear_slice(getattr(branch, reader), cols=idx))
            setattr(branch, writer, _linear_slice(getattr(branch, writer), rows=idx))
    model.norm, model.fc_norm = norm_slice(model.norm, idx), norm_slice(model.fc_norm, idx)
    for name in ("head", "head_dist"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            setattr(model, name, _linear_slice(head, cols=idx))
    model.embed_dim = model.num_features = len(keep)
    if hasattr(model, "head_hidden_size"):
        model.head_hidden_size = len(keep)


def check_embed_prunable(model: VisionTransformer) -> None:
    """Refuse a model whose stream is normalised where it is written (a norm inside the patch embedding, or a
    pre-norm): removing channels there changes the other channels' values, so a channel is not removable alone."""
    if not isinstance(model.patch_embed.norm, nn.Identity) or not isinstance(model.norm_pre, nn.Identity):
        raise SlimError("this model normalises its embedding before the blocks (patch-embedding norm or pre-norm): "
                        "its embedding width cannot be pruned channel by channel; search with --no-embed")


def _linear_slice(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = lin.weight.data
    w = w if rows is None else w[rows]
    w = w if cols is None else w[:, cols]
    out = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None)
    out.weight.data.copy_(w)
    if lin.bias is not None:
        out.bias.data.copy_(lin.bias.data if rows is None else lin.bias.data[rows])
    return out


def _conv_out(conv: nn.Conv2d, idx: torch.Tensor) -> nn.Conv2d:
    out = nn.Conv2d(conv.in_channels, len(idx), conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None)
    out.weight.data.copy_(conv.weight.data[idx])
    if conv.bias is not None:
        out.bias.data.copy_(conv.bias.data[idx])
    return out


def norm_slice(norm: nn.Module, idx: torch.Tensor) -> nn.Module:
    if isinstance(norm, nn.Identity):
        return norm
    if not isinstance(norm, nn.LayerNorm):
        raise SlimError(f"a {type(norm).__name__} over the embedding cannot be narrowed (LayerNorm only)")
    out = nn.LayerNorm(len(idx), eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                       bias=norm.bias is not None)
    if norm.elementwise_affine:
        out.weight.data.copy_(norm.weight.data[idx])
        if norm.bias is not None:
            out.bias.data.copy_(norm.bias.data[idx])
    return out


def scoring_blocks(spec: SlimSpec) -> set[int]:
    """Attentive mode: the blocks whose attention ranks tokens for a later block (the last block with heads
    before each block that drops tokens)."""
    out, last_heads, prev = set(), None, spec.arch.num_tokens
    for i, b in enumerate(spec.blocks):
        if b.num_tokens < prev:
            out.add(last_heads)
        if b.num_heads:
            last_heads = i
        prev = b.num_tokens
    return out


def _ranked_blocks(spec: SlimSpec, model: VisionTransformer, copy_weights: bool) -> RankedBlocks:
    a = spec.arch
    how = score_kind(model)
    scorers = scoring_blocks(spec)
    blocks, prev = [], a.num_tokens
    for i, b in enumerate(spec.blocks):
        blk = slim_block(a, model.blocks[i], b, None, copy_weights)
        blk.rank_keep = b.num_tokens if b.num_tokens < prev else None
        blk.prefix, blk.scores = a.num_prefix_tokens, how if i in scorers else None
        blk.fuse = spec.token_mode == "fused"
        if spec.rank_prior is not None and blk.rank_keep is not None:
            blk.prior = torch.tensor(spec.rank_prior[i], dtype=torch.float32)
            blk.prior_weight = float(spec.prior_weight)
        blocks.append(blk)
        prev = b.num_tokens
    return RankedBlocks(*blocks)


def load_slim(spec: SlimSpec | str | Path, weights: str | Path | None) -> VisionTransformer:
    """Rebuild a slim model from its spec (object or spec.json path) and safetensors weights."""
    if not isinstance(spec, SlimSpec):
        spec = SlimSpec.load(spec)
    model = build_slim(spec)
    if weights is not None:
        load_checkpoint(model, weights)
    return model.eval()
