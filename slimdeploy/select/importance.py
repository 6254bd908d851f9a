"""Per-element importance from the search: which head, channel, unit and token to keep within each kind.

  taylor     |m * dL/dm| averaged over the last search epoch (default when recorded)
  magnitude  |m| * (the kind's L1 factor): at the search's equilibrium |dL/dm| equals the factor

These order elements within a kind well. Across kinds they are not comparable: nothing calibrates how much one
token is worth against one MLP unit, and removing a token from block i on is a compounding change that a
first-order score underrates. So the exchange rate between kinds is measured (candidates.py, scoring.py), and
`weighted` lets the solver try several.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..defaults import TOKENS
from ..errors import SlimError
from ..types import RANKED_TOKEN_MODES, SlimSpec

KINDS = ("qk", "v", "mlp", "tok", "embed")


@dataclass
class Importance:
    """Per-element importance (loss units). None for a dimension that was not searched (kept whole)."""

    qk: np.ndarray | None  # (depth, heads, head_dim)
    v: np.ndarray | None  # (depth, heads, head_dim)
    mlp: np.ndarray | None  # (depth, mlp_dim)
    tok: np.ndarray | None  # (depth, num_patches): per position (static) or per rank (attentive)
    mode: str = "taylor"
    token_mode: str = "static"
    embed: np.ndarray | None = None  # (embed_dim,): the residual stream's channels, shared by every block
    pos: np.ndarray | None = None  # (depth, num_patches): attentive search, each patch position's importance
    prior_weight: float = TOKENS["prior_weight"]  # of `pos` in attentive mode's ranking (0: attention alone)

    def __post_init__(self):
        if self.token_mode in RANKED_TOKEN_MODES and self.tok is not None:
            # a block keeps the top-k ranks, never a gap: order each block's rank importances (highest rank
            # first, strictly), so that every solver drops the last ranks first and keeps a count
            s = -np.sort(-self.tok, axis=1)
            self.tok = s + np.linspace(1e-12, 0.0, s.shape[1])[None, :] * max(1.0, float(np.abs(s).max()))

    @classmethod
    def from_masks(cls, masks: dict[str, torch.Tensor], factors: dict[str, float], mode: str = "auto"
                   ) -> Importance:
        if mode not in ("auto", "taylor", "magnitude"):
            raise SlimError("--importance must be auto, taylor or magnitude")
        if mode == "auto":
            mode = "taylor" if any(k.startswith("taylor.") for k in masks) else "magnitude"
        out = {}
        for kind in KINDS:
            if kind not in masks:
                out[kind] = None
            elif mode == "taylor":
                if f"taylor.{kind}" not in masks:
                    raise SlimError("the search recorded no Taylor importance: use --importance magnitude")
                out[kind] = masks[f"taylor.{kind}"].double().numpy()
            else:
                out[kind] = masks[kind].double().abs().numpy() * factors[kind]
            if out[kind] is not None and not np.isfinite(out[kind]).all():
                raise SlimError(f"the search's {kind} importance holds NaN or inf: re-run the search")
        return cls(mode=mode, **out)

    def weighted(self, attn: float = 1.0, mlp: float = 1.0, tok: float = 1.0, embed: float = 1.0) -> Importance:
        """The same importances with each kind scaled (an exchange rate between kinds to try)."""
        def scale(x, w):
            return None if x is None else x * w
        return replace(self, qk=scale(self.qk, attn), v=scale(self.v, attn), mlp=scale(self.mlp, mlp),
                       tok=scale(self.tok, tok), embed=scale(self.embed, embed))

    def ranking(self) -> dict:
        """SlimSpec fields for attentive mode's ranking: the positions' prior, each block's importance of a patch
        position from that block on (what a token dropped there loses), shifted so that the least is about 0,
        per block summing to 1. Empty (attention alone) outside attentive mode, without a recorded `pos` (a
        search made before it was recorded), or at weight 0."""
        if self.token_mode != "attentive" or self.pos is None or self.prior_weight <= 0:
            return {}
        R = np.flip(np.cumsum(np.flip(self.pos, 0), 0), 0)
        R = R - R.min(1, keepdims=True) + 1e-6
        R = R / R.sum(1, keepdims=True)
        return {"rank_prior": [[float(f"{v:.6g}") for v in row] for row in R], "prior_weight": self.prior_weight}

    @property
    def first_token_block(self) -> int:
        """The first block that may drop tokens (attentive mode ranks by an earlier block's attention)."""
        return 1 if self.token_mode in RANKED_TOKEN_MODES else 0


def load_importance(run_dir: str | Path, mode: str = "auto") -> tuple[Importance, dict]:
    """The importance a run's search recorded, with the search's config."""
    from ..search import load_masks

    masks, cfg = load_masks(run_dir)
    factors = {"qk": cfg.get("w_attn", 2e-4), "v": cfg.get("w_attn", 2e-4), "mlp": cfg.get("w_mlp", 5e-5),
               "tok": cfg.get("w_tok", 1e-4), "embed": cfg.get("w_embed", 1e-4)}
    imp = Importance.from_masks(masks, factors, mode)
    pos = masks["taylor.pos"].double().numpy() if "taylor.pos" in masks else None
    return replace(imp, token_mode=(cfg.get("dims") or {}).get("token_mode", "static"), pos=pos), cfg


def spec_importance(spec: SlimSpec, imp: Importance) -> float:
    """Summed importance a spec keeps (the first-order objective; reported, not trusted across kinds)."""
    P = spec.arch.num_prefix_tokens
    tot = 0.0
    for i, b in enumerate(spec.blocks):
        for h, cs in zip(b.heads, b.qk):
            tot += float(imp.qk[i, h, cs].sum()) if imp.qk is not None else 0.0
        for h, cs in zip(b.heads, b.v):
            tot += float(imp.v[i, h, cs].sum()) if imp.v is not None else 0.0
        tot += float(imp.mlp[i, b.mlp].sum()) if imp.mlp is not None else 0.0
        if imp.tok is not None:
            tot += float(imp.tok[i, [t - P for t in b.tokens if t >= P]].sum())
    if imp.embed is not None:
        tot += float(imp.embed[spec.embed].sum())
    return tot
