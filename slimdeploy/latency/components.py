"""The pieces of a slim block that the profile times, each exactly as the slim model computes it.

A block with n tokens, h heads of q (query/key) and v (value) channels and m MLP units runs:
  gather(n)            the token gather at its start, when it drops tokens
  rank(n_in, n)        instead of gather(n) in attentive token mode: the class token's attention row (one query
                       against the n_in incoming keys, per head, averaged), TopK and the per-image gather
  fuse(n_in, n)        instead of gather(n) in fused token mode: rank(n_in, n) with a full TopK and the dropped
                       tokens' weighted mean
  rest(n)              per present branch: LayerNorm, layer scale, residual add
  qkv(n, h*(2q+v))     Linear(D -> h*(2q+v))
  core(n, h, q, v)     split, reshape, softmax(q k^T) v, merge heads
  proj(n, h*v)         Linear(h*v -> D)
  mlp(n, m)            fc1, activation, fc2
  const(n)             a branch pruned to nothing: the residual add of its constant bias
  stem_head(n)         patch embedding, prefix tokens, position embedding; the final norm over the n tokens the
                       last block keeps, after a residual add (as the last block's), and the head

Each piece that touches the residual stream (all but core) is also timed at narrower embedding widths, on a coarse
grid (embed_grid): the latency model scales a piece by its cost at that width over its cost at the full width,
both measured on that grid.

Where a layer's weights come from depends on the whole model: a model whose weights exceed the L2 cache streams
every layer's weights from further out at each call, and at a few tokens that costs more than the arithmetic (a
lone Linear(128, 384) at 2 tokens took 3 us from a warm cache and 10 us cold, on a Xeon with 2 MB of L2). So a
piece with weights is timed twice, in context: cold, as K copies with distinct weights as large together as a
model that overflows L2 (twice its size), and warm, as copies with distinct weights half the size of L2 together
(a small model's layers come from L2, not from L1 as a lone piece's would). Each copy has its own input (so the
runtime cannot merge copies) and the cost is per copy, after the per-call overhead of a graph with the same
inputs and outputs (timed beside it) is taken off.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from ..defaults import TOKENS
from ..slim import ConstantBranch, SlimAttention, keep_top_tokens, rank_with_prior, token_scores
from ..types import Arch

MAX_COPIES = 16


@torch.no_grad()
def nontrivial_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter with small random values. Untrained models have zero biases and unit
    norms, which exporters and engines fold away: timing them would miss real work."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.02 + (1.0 if p.ndim == 1 else 0.0) * 0.1)
    return module


class Rest(nn.Module):
    """One branch's LayerNorm, layer scale and residual add: x + ls(norm(x)) (the branch's own work is timed
    separately)."""

    def __init__(self, norm: nn.Module, ls: nn.Module):
        super().__init__()
        self.norm, self.ls = copy.deepcopy(norm), copy.deepcopy(ls)

    def forward(self, x):
        return x + self.ls(self.norm(x))


class Const(nn.Module):
    """A branch pruned to nothing: x + its constant output."""

    def __init__(self, dim: int):
        super().__init__()
        self.branch = ConstantBranch(dim)

    def forward(self, x):
        return x + self.branch(x)


class Gather(nn.Module):
    """The token gather at the start of a block that drops tokens (keeps n of the incoming tokens)."""

    def __init__(self, n_in: int, n: int):
        super().__init__()
        self.register_buffer("keep", torch.arange(n_in - n, n_in), persistent=False)

    def forward(self, x):
        return x.index_select(1, self.keep)


class Rank(nn.Module):
    """Attentive mode's extra work where a block drops tokens: the scores from the incoming tokens (their first
    H * head_dim channels serve as queries and keys: the cost is the same as the ranking block's), the mix with
    the positions' prior (the search's, which attentive mode ranks with), TopK, and the gathers that keep n
    tokens per image; fused mode's (no prior) also fuses the dropped ones into the last place."""

    def __init__(self, arch: Arch, n_in: int, n: int, fuse: bool = False):
        super().__init__()
        self.heads, self.hd, self.n, self.prefix = arch.num_heads, arch.head_dim, n, arch.num_prefix_tokens
        self.how, self.fuse = ("cls" if arch.num_prefix_tokens > 0 else "mean"), fuse
        prior = None if fuse else torch.linspace(1.0, 2.0, arch.num_patches)
        self.register_buffer("prior", prior, persistent=False)

    def forward(self, x):
        B, N, _ = x.shape
        k = x[..., : self.heads * self.hd].reshape(B, N, self.heads, self.hd).transpose(1, 2)
        scores = token_scores(k, k, self.hd ** -0.5, self.how)
        if self.prior is None:
            return keep_top_tokens(x, scores, self.n, self.prefix, self.fuse)[0]
        # as a model's first ranking, which gets every patch in its place: the prior is a constant row. A later
        # ranking also gathers the prior of the positions it gets, and the kept positions for the next one: two
        # small gathers that the paired calibration (ranked twins beside static ones) prices
        P = self.prefix
        rank = rank_with_prior(scores[:, P:], self.prior[: N - P], TOKENS["prior_weight"])
        return keep_top_tokens(x, scores, self.n, P, False, rank)[0]


def core(arch: Arch, h: int, q: int, v: int) -> nn.Module:
    """SlimAttention without its two linear layers: exactly the slim model's attention core."""
    c = SlimAttention(arch.embed_dim, h, q, v, arch.head_dim ** -0.5, qk_norm=arch.qk_norm)
    c.qkv, c.proj = nn.Identity(), nn.Identity()
    return c


def mlp(block, m: int) -> nn.Module:
    out = copy.deepcopy(block.mlp)
    out.fc1 = nn.Linear(out.fc1.in_features, m, bias=block.mlp.fc1.bias is not None)
    out.fc2 = nn.Linear(m, out.fc2.out_features, bias=block.mlp.fc2.bias is not None)
    return out


class FinalTokens(nn.Module):
    """What reaches a model's final norm: the n tokens its last block keeps (None: all), after that block's
    residual add."""

    def __init__(self, n: int | None):
        super().__init__()
        self.register_buffer("keep", None if n is None else torch.arange(n), persistent=False)

    def forward(self, x):
        if self.keep is not None:
            x = x.index_select(1, self.keep)
        return x + x


def stem_head(model, embed: int | None = None, tokens: int | None = None) -> nn.Module:
    """The model without its blocks, its final norm fed `tokens` tokens (default: all) after a residual add.

    Why the add: ONNX Runtime fuses the last block's residual add into the final LayerNorm
    (SkipLayerNormalization), and that fused kernel costs per token what the blocks' unfused norms do not. On a
    Zen 5 EPYC (fmnist-vit, ORT 1 thread) it took 6.5 us at 1 token and 14.9 us at 17, against 6.5-7.9 us unfused;
    a stem timed with no blocks fused its position-embedding add instead, always at every token, and so priced a
    model whose last block keeps one token 8 us slow (8% of a 0.3x model). With the add in front the fusion is
    where the model has it; fewer tokens than all are gathered first (well under a microsecond)."""
    from ..slim import narrow_embed

    m = copy.deepcopy(model)
    m.blocks = nn.Sequential()  # before narrowing: narrow_embed narrows every block it finds
    if embed is not None and embed < m.embed_dim:
        narrow_embed(m, list(range(embed)))
    every = model.patch_embed.num_patches + model.num_prefix_tokens
    m.blocks = nn.Sequential(FinalTokens(tokens if tokens and tokens < every else None))
    return m


def embed_grid(dim: int, step: int) -> list[int]:
    """Embedding widths the profile measures: eighths of the full width from a quarter up (multiples of step)."""
    out = {max(step, int(round(dim * f / 8 / step)) * step) for f in range(2, 8)}
    return sorted(w for w in out if w < dim) + [dim]


def narrow_scale(ls: nn.Module, e: int) -> nn.Module:
    """A layer scale over the first e channels (Identity stays)."""
    out = copy.deepcopy(ls)
    if hasattr(out, "gamma"):
        out.gamma = nn.Parameter(out.gamma.data[:e].clone())
    return out


def build(kind: str, arch: Arch, block, dims: tuple, embed: int | None = None) -> tuple[nn.Module, tuple[int, ...]]:
    """The module of one piece and its input shape (without the batch axis), at embedding width `embed` (default:
    the model's)."""
    D = embed or arch.embed_dim
    n = dims[0] if dims else None
    if kind == "rest":
        if D == arch.embed_dim:
            return Rest(block.norm1, block.ls1), (n, D)
        from ..slim import norm_slice

        return Rest(norm_slice(block.norm1, torch.arange(D)), narrow_scale(block.ls1, D)), (n, D)
    if kind == "const":
        return Const(D), (n, D)
    if kind == "gather":
        return Gather(dims[1], n), (dims[1], D)
    if kind in ("rank", "fuse"):
        return Rank(arch, dims[1], n, fuse=kind == "fuse"), (dims[1], D)
    if kind == "qkv":
        return nn.Linear(D, dims[1], bias=arch.qkv_bias), (n, D)
    if kind == "proj":
        return nn.Linear(dims[1], D), (n, dims[1])
    if kind == "mlp":
        out = mlp(block, dims[1])
        if D != arch.embed_dim:
            out.fc1 = nn.Linear(D, dims[1], bias=out.fc1.bias is not None)
            out.fc2 = nn.Linear(dims[1], D, bias=out.fc2.bias is not None)
        return out, (n, D)
    if kind == "core":
        _, h, q, v = dims
        return core(arch, h, q, v), (n, h * (2 * q + v))
    raise ValueError(kind)


def weight_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


WARM_COPIES = 8  # copies of a piece without weights


def copies_for(module: nn.Module, working_set: int) -> int:
    """How many distinct copies make the weights as large as `working_set` bytes (1 .. MAX_COPIES)."""
    return max(1, min(MAX_COPIES, math.ceil(working_set / max(1, weight_bytes(module)))))


def replicate(onnx_model: bytes, k: int, seed: int = 0) -> bytes:
    """The graph repeated K times side by side, copy i on its own input and output and with its own float
    weights (re-drawn, so no runtime shares them). Exporting one copy and repeating it in ONNX is 10x faster
    than exporting K."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(onnx_model)
    g = model.graph
    weights = {t.name for t in g.initializer}
    rng = np.random.default_rng(seed)
    nodes, inits, inputs, outputs = [], [], [], []
    for i in range(k):
        def rename(name: str, i: int = i) -> str:
            return f"{name}.c{i}" if name else name

        for n in g.node:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            c.name = rename(n.name)
            c.input[:] = [rename(x) for x in n.input]
            c.output[:] = [rename(x) for x in n.output]
            nodes.append(c)
        for t in g.initializer:
            arr = numpy_helper.to_array(t)
            if i > 0 and arr.dtype.kind == "f" and arr.size > 1:  # new values: no runtime may share them
                arr = (arr + rng.standard_normal(arr.shape) * 1e-3).astype(arr.dtype)
            inits.append(numpy_helper.from_array(arr, rename(t.name)))
        for src, dst in ((g.input, inputs), (g.output, outputs)):
            for v in src:
                if v.name in weights:
                    continue
                c = onnx.ValueInfoProto()
                c.CopyFrom(v)
                c.name = rename(v.name)
                dst.append(c)
    del g.node[:], g.initializer[:], g.input[:], g.output[:], g.value_info[:]
    g.node.extend(nodes)
    g.initializer.extend(inits)
    g.input.extend(inputs)
    g.output.extend(outputs)
    return model.SerializeToString()


class Copies(nn.Module):
    """K distinct copies of a module as one torch module, copy i on input i (for backends that run torch)."""

    def __init__(self, module: nn.Module, k: int, seed: int = 0):
        super().__init__()
        self.copies = nn.ModuleList(nontrivial_(copy.deepcopy(module), seed + i) for i in range(k))

    def forward(self, *xs):
        return tuple(m(x) for m, x in zip(self.copies, xs))


class Base(nn.Module):
    """The per-call overhead of a graph's input and output (one trivial operator): repeated like a piece."""

    def forward(self, x):
        return x * 1.0001


def l2_bytes() -> int:
    """The L2 cache of one core (Linux sysfs), 2 MB where unknown."""
    from pathlib import Path

    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (idx / "level").read_text().strip() == "2":
                size = (idx / "size").read_text().strip().upper()
                mult = {"K": 1 << 10, "M": 1 << 20}.get(size[-1], 1)
                return int(size.rstrip("KM")) * mult
        except (OSError, ValueError):
            continue
    return 2 << 20
