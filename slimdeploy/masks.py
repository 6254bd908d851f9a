"""Search-time masks attached to a timm VisionTransformer (ViT-Slim's idea, with real token removal).

MaskedViT holds the unmodified timm model and one learnable mask per searched dimension:
  qk   (depth, heads, head_dim)  multiplies q after q_norm: an attention logit is linear in it
  v    (depth, heads, head_dim)  multiplies v (so proj's matching input column is dead at 0)
  mlp  (depth, mlp_dim)          multiplies the hidden units after the activation
  tok  (depth, num_patches)      one value in [0, 1] per patch token per block; prefix tokens
                                 (class, distillation, register) are never masked
  embed (embed_dim,)             one value in [0, 1] per channel of the residual stream, shared by every block
All masks start at exactly 1, where the masked model computes the dense model's function.

Token masks are per position (static mode) or per rank (attentive mode): in attentive mode tok[i, j] gates,
in every image, the patch token with the j-th highest attention score from the last block with heads before
block i (the class token's attention averaged over heads; without a class token, the mean attention a token
receives). So the search learns how many tokens each block needs (a soft top-k whose L1 penalty is the same
as static mode's), and a hard 0/1 rank mask is exactly the pruned model's TopK. Block 0 has no earlier
attention to rank by: its gates stay 1.
Fused mode searches exactly as attentive mode does: the counts are learned without the fused token, which pruning
adds in the last place of each count (the dropped tokens' attention-weighted mean) and retraining then learns to
use. A relaxation with a soft fused token would carry one extra token per dropping block through the masked
model. The fused token takes the last of a count's places, so a count keeps its sequence length.

Token masks are designed so that a hard 0 is exactly removal (unlike ViT-Slim's zeroing of the
normed input): a token's keys/values are weighted by its mask inside the softmax
(logits + log m), and its residual updates are multiplied by m. At m = 0 the token contributes
no key/value and receives no update, which is what dropping it from the sequence does.

The embedding mask acts where the stream is read: every LayerNorm over the stream (each block's two, the final
norm) computes its statistics weighted by the mask and multiplies its output by it. A channel at 0 is then
read by nothing and leaves every norm's statistics, which is exactly the narrower stream of the pruned model
(the channel still exists in the masked stream, but no result depends on it). Weighting the statistics, rather
than dropping a channel from them only at exactly 0, makes removal continuous during the search, so the weights
learn the statistics they will have; the price is that soft values of kept channels cannot be folded exactly
(fold_masks folds the output scaling into the norms' affine; the statistics' weighting is lost).

With qk_norm, a hard-pruned q/k channel is also left out of the LayerNorm statistics, as the
physically pruned HeadwiseLayerNorm does. We wrap and call timm's modules; we never patch them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .models import arch_of
from .slim import check_embed_prunable, score_kind, token_scores
from .types import RANKED_TOKEN_MODES, Arch, SlimSpec

MASK_KINDS = ("qk", "v", "mlp", "tok", "embed")
UNIT_KINDS = ("tok", "embed")  # masks clamped to [0, 1] (straight-through), penalised after the clamp
TINY_MASK = 1e-30


@dataclass
class SearchDims:
    """Which dimensions are searched."""

    tokens: bool = True
    attn: bool = True
    mlp: bool = True
    shared_qkv: bool = False  # ViT-Slim's single mask on q, k and v
    token_mode: str = "static"  # static (per position) | attentive, fused (per rank, chosen per image)
    embed: bool = False  # the embedding width (the residual stream's channels, shared by every block)

    def __post_init__(self):
        from .errors import SlimError
        from .types import TOKEN_MODES

        if self.token_mode not in TOKEN_MODES:
            raise SlimError(f"--token-mode must be one of {', '.join(TOKEN_MODES)}, not '{self.token_mode}'")


def _ste_unit(z: torch.Tensor) -> torch.Tensor:
    """Value clamp(z, 0, 1), gradient 1: a token mask can come back from 0 during search."""
    return z + (z.clamp(0.0, 1.0) - z).detach()


def _masked_layernorm(x: torch.Tensor, ln: nn.LayerNorm, keep: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channels with keep=1 only (keep: heads x channels of 0/1)."""
    w = keep[None, :, None, :].to(x.dtype)
    count = w.sum(-1, keepdim=True).clamp_min(1.0)
    mean = (x * w).sum(-1, keepdim=True) / count
    var = (((x - mean) ** 2) * w).sum(-1, keepdim=True) / count
    y = (x - mean) / torch.sqrt(var + ln.eps)
    return y * ln.weight + ln.bias if ln.weight is not None else y


def _stream_norm(norm: nn.Module, x: torch.Tensor, e: torch.Tensor | None) -> torch.Tensor:
    """A LayerNorm reading the residual stream under the embedding mask e (channels, in [0, 1]): statistics
    weighted by e, output multiplied by e. At e = 1 it is the LayerNorm; at a 0/1 mask, the LayerNorm of the
    narrower stream with the 0 channels set to 0."""
    if e is None or isinstance(norm, nn.Identity):
        return norm(x)
    w = e.to(x.dtype)
    total = w.sum().clamp_min(1e-12)
    mean = (x * w).sum(-1, keepdim=True) / total
    var = (((x - mean) ** 2) * w).sum(-1, keepdim=True) / total
    y = (x - mean) * torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        y = y * norm.weight
    if norm.bias is not None:
        y = y + norm.bias
    return y * w


class MaskedViT(nn.Module):
    """A timm VisionTransformer with search masks; `vit` keeps timm's own parameter names."""

    def __init__(self, vit: VisionTransformer, dims: SearchDims | None = None):
        super().__init__()
        self.vit = vit
        self.dims = dims or SearchDims()
        self.arch: Arch = arch_of(vit)
        a = self.arch
        if self.dims.attn:
            self.qk = nn.Parameter(torch.ones(a.depth, a.num_heads, a.head_dim))
            self.v = None if self.dims.shared_qkv else nn.Parameter(torch.ones(a.depth, a.num_heads, a.head_dim))
        else:
            self.qk = self.v = None
        self.mlp = nn.Parameter(torch.ones(a.depth, a.mlp_dim)) if self.dims.mlp else None
        self.tok = nn.Parameter(torch.ones(a.depth, a.num_patches)) if self.dims.tokens else None
        if self.dims.embed:
            check_embed_prunable(vit)
        self.embed = nn.Parameter(torch.ones(a.embed_dim)) if self.dims.embed else None

    # ---- masks ---------------------------------------------------------------------------------
    def mask_params(self) -> dict[str, nn.Parameter]:
        return {k: getattr(self, k) for k in MASK_KINDS if getattr(self, k, None) is not None}

    def v_mask(self) -> torch.Tensor | None:
        return self.qk if self.dims.shared_qkv else self.v

    def token_values(self) -> torch.Tensor | None:
        """(depth, num_tokens) mask values in [0, 1]; prefix tokens fixed at 1."""
        if self.tok is None:
            return None
        prefix = torch.ones(self.arch.depth, self.arch.num_prefix_tokens, device=self.tok.device, dtype=self.tok.dtype)
        return torch.cat([prefix, _ste_unit(self.tok)], dim=1)

    def embed_values(self) -> torch.Tensor | None:
        """(embed_dim,) embedding mask values in [0, 1]."""
        return None if self.embed is None else _ste_unit(self.embed)

    @torch.no_grad()
    def set_hard(self, spec: SlimSpec) -> MaskedViT:
        """Set every mask to the spec's 0/1 values (the masked twin of the pruned model)."""
        a = self.arch
        for i, b in enumerate(spec.blocks):
            if self.qk is not None:
                self.qk[i].copy_(_channel_mask(a, b.heads, b.qk))
            if self.v is not None:
                self.v[i].copy_(_channel_mask(a, b.heads, b.v))
            if self.mlp is not None:
                m = torch.zeros(a.mlp_dim)
                m[b.mlp] = 1.0
                self.mlp[i].copy_(m)
            if self.tok is not None:
                t = torch.zeros(a.num_tokens)
                t[b.tokens] = 1.0
                self.tok[i].copy_(t[a.num_prefix_tokens:])
        if self.embed is not None:
            self.embed.zero_()
            self.embed[spec.embed] = 1.0
        return self

    def l1(self) -> dict[str, torch.Tensor]:
        """Sum of |mask| per kind (token masks after clamping to [0, 1]; block 0's rank gates, which are not
        used, left out)."""
        out = {k: p.abs().sum() for k, p in self.mask_params().items() if k not in UNIT_KINDS}
        if self.tok is not None:
            tok = self.tok[1:] if self.attentive else self.tok
            out["tok"] = _ste_unit(tok).abs().sum()
        if self.embed is not None:
            out["embed"] = self.embed_values().sum()
        return out

    @property
    def attentive(self) -> bool:
        return self.tok is not None and self.dims.token_mode in RANKED_TOKEN_MODES

    def _rank_gate(self, values: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor | None:
        """(B, N) gates of attentive mode: prefix tokens 1, the patch of rank j gets values[P + j]."""
        if scores is None:
            return None
        P = self.arch.num_prefix_tokens
        rank = (-scores[:, P:]).argsort(1).argsort(1)
        gate = values[P:][rank]
        return torch.cat([gate.new_ones(gate.shape[0], P), gate], 1)

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit.patch_embed(x)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        tok = self.token_values()
        e = self.embed_values()
        vmask = self.v_mask()
        how = score_kind(vit)
        scores, gate = None, None
        for i, blk in enumerate(vit.blocks):
            if self.attentive:
                gate = self._rank_gate(tok[i], scores) if i > 0 else None
            elif tok is not None:
                gate = tok[i][None]
            x, s = self._block(blk, x, None if self.qk is None else self.qk[i], None if vmask is None else vmask[i],
                               None if self.mlp is None else self.mlp[i], gate, how if self.attentive else None, e)
            scores = scores if s is None else s
        x = _stream_norm(vit.norm, x, e)
        if e is not None and isinstance(vit.norm, nn.Identity) and isinstance(vit.fc_norm, nn.Identity):
            x = x * e  # no final norm: the head reads the stream itself
        avg = vit.global_pool == "avg"
        if (avg and gate is not None) or (e is not None and not isinstance(vit.fc_norm, nn.Identity)):
            P = vit.num_prefix_tokens
            if not avg:
                pooled = x[:, 0]
            elif gate is None:
                pooled = x[:, P:].mean(1)
            else:  # average over the tokens still present after the last block, as the pruned model does
                w = gate[:, P:, None]
                pooled = (x[:, P:] * w).sum(1) / w.sum(1).clamp_min(1e-12)
            return vit.head(vit.head_drop(_stream_norm(vit.fc_norm, pooled, e)))
        return vit.forward_head(x)

    def _block(self, blk, x, qk, v, mlp, tok, scores=None, e=None):
        """One block under masks; tok: (1 or B, N) token gates or None. With scores (cls / mean), also the
        token scores its attention gives (None when every head is masked: such a block ranks nothing)."""
        B, N, _ = x.shape
        a = blk.attn
        H, hd = a.num_heads, a.head_dim
        A = H * hd
        qk_norm = isinstance(a.q_norm, nn.LayerNorm)
        # Channel masks multiply the rows of the weights that produce those channels, which is the
        # same function as multiplying the activations but touches (out x in) numbers, not
        # (batch x tokens x out): the search step stays close to a plain training step.
        w, b = a.qkv.weight, a.qkv.bias
        if v is not None or (qk is not None and not qk_norm):
            ones = w.new_ones(A)
            rows = torch.cat([qk.reshape(-1) if qk is not None and not qk_norm else ones, ones,
                              v.reshape(-1) if v is not None else ones])
            w, b = w * rows[:, None], (b * rows if b is not None else None)
        qkv = F.linear(_stream_norm(blk.norm1, x, e), w, b)
        q, k, val = qkv.reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
        if qk_norm and qk is not None:
            if bool((qk == 0).any()):  # hard-pruned channels leave the norm's statistics
                keep = (qk != 0).to(q.dtype)
                q, k = _masked_layernorm(q, a.q_norm, keep), _masked_layernorm(k, a.k_norm, keep)
            else:
                q, k = a.q_norm(q), a.k_norm(k)
            q = q * qk[None, :, None, :]  # after the norm: it cannot be folded into the weights
        else:
            q, k = a.q_norm(q), a.k_norm(k)
        bias = None
        if tok is not None:
            # log m weights a token's key/value inside the softmax. At m = 0 exactly, log would be -inf, and its
            # backward inf * 0 = NaN; clamped at TINY_MASK the token's weight is e^-69 of a kept one's: removal to
            # fp32 precision, and a finite (zero) gradient through the attention
            bias = torch.log(tok.clamp_min(TINY_MASK)).to(q.dtype)[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, val, attn_mask=bias, scale=a.scale,
                                           dropout_p=a.attn_drop.p if self.training else 0.0)
        s = None
        if scores is not None:
            alive = (qk != 0).any(-1).to(q.dtype) if qk is not None else None
            if alive is None or bool(alive.any()):
                s = token_scores(q, k, a.scale, scores, bias, alive, None if tok is None else tok.expand(B, N))
        o = a.proj_drop(a.proj(o.transpose(1, 2).reshape(B, N, A)))
        gate = None if tok is None else tok[:, :, None]
        upd = blk.drop_path1(blk.ls1(o))
        x = x + (upd if gate is None else upd * gate)
        m = blk.mlp
        # m.norm is Identity (checked): the mask commutes
        h = m.norm(m.drop1(m.act(m.fc1(_stream_norm(blk.norm2, x, e)))))
        w2 = m.fc2.weight if mlp is None else m.fc2.weight * mlp[None, :]
        upd = blk.drop_path2(blk.ls2(m.drop2(F.linear(h, w2, m.fc2.bias))))
        return x + (upd if gate is None else upd * gate), s


def _channel_mask(a: Arch, heads: list[int], channels: list[list[int]]) -> torch.Tensor:
    m = torch.zeros(a.num_heads, a.head_dim)
    for h, cs in zip(heads, channels):
        m[h, cs] = 1.0
    return m


@torch.no_grad()
def fold_masks(masked: MaskedViT) -> VisionTransformer:
    """The timm model with the kept channels' learned mask values folded into its weights.

    Searched weights were trained with soft masks (e.g. 0.7) on the kept channels; folding them
    into qkv/q_norm and fc2 keeps that function when the masks are then set hard to 1.
    Token masks gate residual updates and cannot be folded; kept tokens become 1.
    """
    import copy

    vit = copy.deepcopy(masked.vit).cpu()
    a = masked.arch
    A = a.num_heads * a.head_dim
    vmask = masked.v_mask()
    for i, blk in enumerate(vit.blocks):
        attn = blk.attn
        if masked.qk is not None:
            qk = masked.qk[i].detach().cpu().reshape(-1)
            if isinstance(attn.q_norm, nn.LayerNorm):
                # per-channel scale after the norm: only a shared (per-channel, all-head) scale folds;
                # a per-head scale stays as a mask, so leave q alone here
                pass
            else:
                attn.qkv.weight[:A] *= qk[:, None]
                if attn.qkv.bias is not None:
                    attn.qkv.bias[:A] *= qk
        if vmask is not None:
            vm = vmask[i].detach().cpu().reshape(-1)
            attn.qkv.weight[2 * A:] *= vm[:, None]
            if attn.qkv.bias is not None:
                attn.qkv.bias[2 * A:] *= vm
        if masked.mlp is not None:
            blk.mlp.fc2.weight *= masked.mlp[i].detach().cpu()[None, :]
    if masked.embed is not None:
        # the output scaling of every norm over the stream folds into its affine; the weighting of its
        # statistics by soft values cannot (see the module's docstring)
        e = masked.embed_values().detach().cpu()
        for norm in [n for blk in vit.blocks for n in (blk.norm1, blk.norm2)] + [vit.norm, vit.fc_norm]:
            if isinstance(norm, nn.LayerNorm) and norm.weight is not None:
                norm.weight *= e
                if norm.bias is not None:
                    norm.bias *= e
    return vit


def hard_twin(vit: VisionTransformer, spec: SlimSpec, dims: SearchDims | None = None) -> MaskedViT:
    """A MaskedViT over vit with the spec's 0/1 masks: the reference the pruned model must match."""
    dims = dims or SearchDims(token_mode=spec.token_mode, embed=spec.embed_dim < spec.arch.embed_dim)
    return MaskedViT(vit, dims).set_hard(spec).eval()

