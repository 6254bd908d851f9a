"""Latency-aware structure selection: mask importances + a device profile -> SlimSpec.

Global across blocks and dimensions: start from the dense model and repeatedly take the cheapest
move in importance lost per millisecond saved (a width of one block down to the next width that is
strictly faster, a head fewer, fewer tokens from a block on), until the predicted latency meets
the budget. Then climb back: take any widening that still fits, best importance per ms first. A
widening that costs nothing is always taken, so every width ends at the widest point of its step
of the latency staircase ("step start": a width just past a step would cost latency for nothing).

Importance (per q/k channel, v channel, MLP unit and token-block) is in units of loss:
  taylor     |m * dL/dm| averaged over the last search epoch (default when recorded)
  magnitude  |m| * (the kind's L1 factor): at the search's equilibrium |dL/dm| equals the factor,
             so this is the Taylor score a converged search would give
A token removed at block i is gone from every later block: its cost is its summed importance there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from .analysis import block_macs, block_params, stem_head_macs
from .errors import SlimError
from .latency import LatencyModel
from .types import Arch, BlockSpec, ModelConfig, SlimSpec

_UNITS = {"ms": 1.0, "us": 1e-3, "µs": 1e-3, "s": 1e3, "": 1.0}


def parse_latency(text: str) -> tuple[str, float]:
    """'5ms', '5', '500us', '0.005s' -> ('ms', 5.0); '60%' -> ('fraction', 0.6). SlimError otherwise."""
    t = str(text).strip().lower().replace(" ", "")
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|s|%)?", t)
    if not m:
        raise SlimError(f"cannot read latency target '{text}': use e.g. 5ms, 5 (ms), 500us, 0.005s or 60%")
    value, unit = float(m.group(1)), m.group(2) or ""
    if value <= 0:
        raise SlimError(f"latency target must be positive, not '{text}'")
    if unit == "%":
        if value > 100:
            raise SlimError(f"a percentage target must be at most 100%, not '{text}'")
        return "fraction", value / 100.0
    return "ms", value * _UNITS[unit]


def parse_count(text: str, what: str) -> float:
    """'4.6G', '350M', '12k', '1e9' -> a number (MACs or parameters)."""
    t = str(text).strip().upper()
    m = re.fullmatch(r"(\d+(?:\.\d*)?(?:E\d+)?)([KMG]?)", t)
    if not m or float(m.group(1)) <= 0:
        raise SlimError(f"cannot read {what} '{text}': use e.g. 2.3G, 350M or 12k")
    return float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[m.group(2)]


# ---- importance ----------------------------------------------------------------------------------

@dataclass
class Importance:
    """Per-element importance (loss units). None for a dimension that was not searched (kept whole)."""

    qk: np.ndarray | None  # (depth, heads, head_dim)
    v: np.ndarray | None  # (depth, heads, head_dim)
    mlp: np.ndarray | None  # (depth, mlp_dim)
    tok: np.ndarray | None  # (depth, num_patches)
    mode: str = "taylor"

    @classmethod
    def from_masks(cls, masks: dict[str, torch.Tensor], factors: dict[str, float], mode: str = "auto"
                   ) -> Importance:
        if mode not in ("auto", "taylor", "magnitude"):
            raise SlimError("--importance must be auto, taylor or magnitude")
        if mode == "auto":
            mode = "taylor" if any(k.startswith("taylor.") for k in masks) else "magnitude"
        out = {}
        for kind in ("qk", "v", "mlp", "tok"):
            if kind not in masks:
                out[kind] = None
            elif mode == "taylor":
                if f"taylor.{kind}" not in masks:
                    raise SlimError("the search recorded no Taylor importance: use --importance magnitude")
                out[kind] = masks[f"taylor.{kind}"].double().numpy()
            else:
                out[kind] = masks[kind].double().abs().numpy() * factors[kind]
        return cls(mode=mode, **out)


# ---- costs ---------------------------------------------------------------------------------------

class Cost:
    """What the budget limits: block(n, h, q, v, m) + constant."""

    unit = ""

    def block(self, n: int, h: int, q: int, v: int, m: int) -> float:
        raise NotImplementedError

    constant = 0.0

    def total(self, state: list[tuple]) -> float:
        return self.constant + sum(self.block(*s) for s in state)


class LatencyCost(Cost):
    unit = "ms"

    def __init__(self, lm: LatencyModel):
        self.lm = lm
        self.constant = lm.constant_ms()
        self._cache: dict[tuple, float] = {}

    def block(self, n, h, q, v, m):
        key = (n, h, q, v, m)
        if key not in self._cache:
            self._cache[key] = self.lm.block_ms(n, h, q, v, m)
        return self._cache[key]


class MacsCost(Cost):
    unit = "MACs"

    def __init__(self, arch: Arch):
        self.arch = arch
        self.constant = float(stem_head_macs(arch))

    def block(self, n, h, q, v, m):
        return float(block_macs(self.arch, _shape_block(n, h, q, v, m)))


class ParamsCost(Cost):
    unit = "params"

    def __init__(self, arch: Arch):
        self.arch = arch
        dense = _shape_block(arch.num_tokens, arch.num_heads, arch.head_dim, arch.head_dim, arch.mlp_dim)
        self.constant = float(arch.params - arch.depth * block_params(arch, dense))

    def block(self, n, h, q, v, m):
        return float(block_params(self.arch, _shape_block(n, h, q, v, m)))


def _shape_block(n, h, q, v, m) -> BlockSpec:
    """A BlockSpec with the given sizes (indices are placeholders; only sizes matter for costs)."""
    return BlockSpec(tokens=list(range(n)), heads=list(range(h)), qk=[list(range(q))] * h, v=[list(range(v))] * h,
                     mlp=list(range(m)))


# ---- the selector --------------------------------------------------------------------------------

@dataclass
class Candidates:
    """Widths each dimension may take (ascending)."""

    heads: list[int]
    qk: list[int]
    v: list[int]
    mlp: list[int]
    tokens: list[int]  # patch-token counts


def candidates_for(arch: Arch, cost: Cost, imp: Importance, token_step: int | None = None) -> Candidates:
    """Profile grid widths (plus the full width) for latency; multiples of 8 for MACs/params."""
    if isinstance(cost, LatencyCost):
        hd = sorted(set(cost.lm.core.widths(2)) | {arch.head_dim})
        mlp = sorted(set(cost.lm.mlp.widths(1)) | {arch.mlp_dim})
    else:
        hd = sorted(set(range(8, arch.head_dim + 1, 8)) | {arch.head_dim})
        mlp = sorted(set(range(8, arch.mlp_dim + 1, 8)) | {arch.mlp_dim})
    hd = [w for w in hd if w <= arch.head_dim]
    mlp = [0] + [w for w in mlp if w <= arch.mlp_dim]
    step = token_step or max(1, round(arch.num_patches / 32))
    tokens = sorted({arch.num_patches} | set(range(step, arch.num_patches, step)))
    return Candidates(
        heads=list(range(0, arch.num_heads + 1)) if imp.qk is not None else [arch.num_heads],
        qk=hd if imp.qk is not None else [arch.head_dim],
        v=hd if imp.v is not None else [arch.head_dim],
        mlp=mlp if imp.mlp is not None else [arch.mlp_dim],
        tokens=tokens if imp.tok is not None else [arch.num_patches],
    )


@dataclass
class Selection:
    spec: SlimSpec
    cost: float  # in the cost's unit (ms for latency)
    importance: float  # kept importance
    total_importance: float
    moves: int
    log: list[dict] = field(default_factory=list)


class Selector:
    """Greedy descent + ascent over per-block (tokens, heads, q, v, mlp) against a Cost."""

    def __init__(self, arch: Arch, source: ModelConfig, imp: Importance, cost: Cost, cands: Candidates | None = None):
        self.arch, self.source, self.imp, self.cost = arch, source, imp, cost
        self.c = cands or candidates_for(arch, cost, imp)
        a = arch
        P = a.num_prefix_tokens

        def prefix_sums(x):  # sorted descending, cumulative, with a leading 0
            s = -np.sort(-x, axis=-1)
            return np.concatenate([np.zeros((*s.shape[:-1], 1)), np.cumsum(s, axis=-1)], axis=-1)

        self.P_qk = prefix_sums(imp.qk) if imp.qk is not None else None
        self.P_v = prefix_sums(imp.v) if imp.v is not None else None
        self.P_mlp = prefix_sums(imp.mlp) if imp.mlp is not None else None
        self.tok = imp.tok
        # future importance of keeping token t from block i on: ranks which tokens leave first
        self.R = np.flip(np.cumsum(np.flip(imp.tok, 0), 0), 0) if imp.tok is not None else None
        self.P = P

    # importance of a block's attention/MLP configuration
    def attn_imp(self, i: int, h: int, q: int, v: int) -> float:
        if h == 0:
            return 0.0
        per_head = (self.P_qk[i][:, q] if self.P_qk is not None else 0) + \
                   (self.P_v[i][:, v] if self.P_v is not None else 0)
        per_head = np.broadcast_to(np.asarray(per_head, dtype=float), (self.arch.num_heads,))
        return float(np.sort(per_head)[::-1][:h].sum())

    def mlp_imp(self, i: int, m: int) -> float:
        return float(self.P_mlp[i][m]) if self.P_mlp is not None else 0.0

    def total_importance(self) -> float:
        a = self.arch
        tot = sum(self.attn_imp(i, a.num_heads, a.head_dim, a.head_dim) + self.mlp_imp(i, a.mlp_dim)
                  for i in range(a.depth))
        return tot + (float(self.tok.sum()) if self.tok is not None else 0.0)

    def select(self, budget: float, log_moves: bool = False) -> Selection:
        """The structure that keeps the most importance with cost <= budget (SlimError if impossible)."""
        a = self.arch
        state = [[a.num_tokens, a.num_heads, a.head_dim, a.head_dim, a.mlp_dim] for _ in range(a.depth)]
        kept_tokens = [list(range(a.num_patches)) for _ in range(a.depth)]  # patch indices
        cost = self.cost.total(state)
        floor = self.minimum_cost()
        if budget < floor - 1e-9:
            raise SlimError(f"target {_fmt(budget, self.cost.unit)} is below the smallest this profile allows "
                            f"({_fmt(floor, self.cost.unit)})")
        log, moves = [], 0
        while cost > budget + 1e-12:
            move = self._best_move(state, kept_tokens, down=True, budget=None)
            if move is None:
                raise SlimError(f"target {_fmt(budget, self.cost.unit)} cannot be reached (best found "
                                f"{_fmt(cost, self.cost.unit)})")
            cost = self._apply(move, state, kept_tokens)
            moves += 1
            if log_moves:
                log.append({"move": move[1:3], "cost": cost})
        while True:  # climb back into the slack
            move = self._best_move(state, kept_tokens, down=False, budget=budget - cost)
            if move is None:
                break
            cost = self._apply(move, state, kept_tokens)
            moves += 1
        spec = self._spec(state, kept_tokens)
        return Selection(spec=spec, cost=cost, importance=self.kept_importance(state, kept_tokens),
                         total_importance=self.total_importance(), moves=moves, log=log)

    def minimum_cost(self) -> float:
        a, c = self.arch, self.c
        n = self.P + c.tokens[0]
        h = c.heads[0]
        return self.cost.constant + a.depth * self.cost.block(n, h, c.qk[0], c.v[0], c.mlp[0])

    def kept_importance(self, state, kept_tokens) -> float:
        tot = 0.0
        for i, (_, h, q, v, m) in enumerate(state):
            tot += self.attn_imp(i, h, q, v) + self.mlp_imp(i, m)
            if self.tok is not None:
                tot += float(self.tok[i, kept_tokens[i]].sum())
        return tot

    # ---- moves -------------------------------------------------------------------------------
    def _neighbour(self, values: list[int], current: int, down: bool) -> list[int]:
        """Candidate values below (descending) or above (ascending) current."""
        return [w for w in reversed(values) if w < current] if down else [w for w in values if w > current]

    def _best_move(self, state, kept_tokens, down: bool, budget: float | None):
        best, best_ratio = None, None
        for i in range(len(state)):
            base_cost = self.cost.block(*state[i])
            for dim in range(5):
                if dim == 0:
                    if not down or self.tok is None:
                        continue  # tokens only go down (a removed token stays removed)
                    mv = self._token_move(i, state, kept_tokens)
                    if mv is None:
                        continue
                    d_cost, d_imp, payload = mv
                else:
                    values = [None, self.c.heads, self.c.qk, self.c.v, self.c.mlp][dim]
                    payload = None
                    d_cost = d_imp = None
                    for w in self._neighbour(values, state[i][dim], down):
                        new = list(state[i])
                        new[dim] = w
                        nc = self.cost.block(*new)
                        if down and nc >= base_cost - 1e-12:
                            continue  # same step of the staircase: go further down
                        d_cost = base_cost - nc if down else nc - base_cost
                        d_imp = self._block_imp(i, state[i]) - self._block_imp(i, new)
                        if not down:
                            d_imp = -d_imp
                        payload = (dim, w)
                        break
                    if payload is None:
                        continue
                if not down and d_cost > budget + 1e-12:
                    continue
                # down: least importance lost per unit saved; up: most gained per unit spent
                ratio = d_imp / max(d_cost, 1e-15) if down else -d_imp / max(d_cost, 1e-15)
                if best_ratio is None or ratio < best_ratio - 1e-15:
                    best, best_ratio = (i, dim, payload), ratio
        return best

    def _block_imp(self, i, s) -> float:
        return self.attn_imp(i, s[1], s[2], s[3]) + self.mlp_imp(i, s[4])

    def _token_move(self, i, state, kept_tokens):
        """Remove the least important tokens of block i (and from every later block)."""
        kept = kept_tokens[i]
        smaller = [t for t in self.c.tokens if t < len(kept)]
        if not smaller:
            return None
        target = smaller[-1]
        order = sorted(kept, key=lambda t: self.R[i, t])
        drop = set(order[: len(kept) - target])
        d_imp, d_cost = 0.0, 0.0
        for j in range(i, len(state)):
            gone = [t for t in kept_tokens[j] if t in drop]
            if not gone and j > i:
                continue
            d_imp += float(self.tok[j, gone].sum())
            new = list(state[j])
            new[0] = self.P + len(kept_tokens[j]) - len(gone)
            d_cost += self.cost.block(*state[j]) - self.cost.block(*new)
        if d_cost <= 1e-12:
            return None
        return d_cost, d_imp, ("tokens", sorted(drop))

    def _apply(self, move, state, kept_tokens) -> float:
        i, dim, payload = move
        if dim == 0:
            drop = set(payload[1])
            for j in range(i, len(state)):
                kept_tokens[j] = [t for t in kept_tokens[j] if t not in drop]
                state[j][0] = self.P + len(kept_tokens[j])
        else:
            state[i][payload[0]] = payload[1]
        return self.cost.total(state)

    # ---- spec ------------------------------------------------------------------------------------
    def _spec(self, state, kept_tokens) -> SlimSpec:
        a = self.arch
        blocks = []
        for i, (_, h, q, v, m) in enumerate(state):
            tokens = list(range(self.P)) + [self.P + t for t in sorted(kept_tokens[i])]
            heads, qk, vv = [], [], []
            if h > 0:
                score = np.zeros(a.num_heads)
                if self.P_qk is not None:
                    score = score + self.P_qk[i][:, q]
                if self.P_v is not None:
                    score = score + self.P_v[i][:, v]
                heads = sorted(np.argsort(-score, kind="stable")[:h].tolist())
                qk = [_top(self.imp.qk[i, hh] if self.imp.qk is not None else None, q, a.head_dim) for hh in heads]
                vv = [_top(self.imp.v[i, hh] if self.imp.v is not None else None, v, a.head_dim) for hh in heads]
            mlp = _top(self.imp.mlp[i] if self.imp.mlp is not None else None, m, a.mlp_dim)
            blocks.append(BlockSpec(tokens=tokens, heads=heads, qk=qk, v=vv, mlp=mlp))
        return SlimSpec(source=self.source, arch=a, blocks=blocks).validate()


def _top(scores: np.ndarray | None, k: int, n: int) -> list[int]:
    if k >= n or scores is None:
        return list(range(min(k, n)))
    return sorted(np.argsort(-scores, kind="stable")[:k].tolist())


def _fmt(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:.3f} ms"
    return f"{value / 1e6:.2f} M{unit}" if value >= 1e6 else f"{value:.0f} {unit}"


# ---- ViT-Slim's rule, for comparison ------------------------------------------------------------

def fraction_spec(arch: Arch, source: ModelConfig, imp: Importance, keep_attn: float = 1.0, keep_mlp: float = 1.0,
                  keep_tokens: float = 1.0) -> SlimSpec:
    """ViT-Slim's budget: per mask kind, one global threshold keeps the top fraction of elements.

    Made valid for a dense slim model: per block, kept heads = heads with a kept q/k and v channel,
    and every kept head keeps the block's mean number of kept channels (its top ones).
    Tokens: monotone over depth (cumulative minimum of importance), then the global threshold.
    """
    for f in (keep_attn, keep_mlp, keep_tokens):
        if not 0 < f <= 1:
            raise SlimError("--keep-attn/--keep-mlp/--keep-tokens must be in (0, 1]")
    a = arch
    P = a.num_prefix_tokens

    def keep_mask(x, frac):
        flat = np.sort(x.reshape(-1))[::-1]
        thr = flat[max(1, int(round(frac * flat.size))) - 1]
        return x >= thr

    qk_keep = keep_mask(imp.qk, keep_attn) if imp.qk is not None else None
    v_keep = keep_mask(imp.v, keep_attn) if imp.v is not None else None
    mlp_keep = keep_mask(imp.mlp, keep_mlp) if imp.mlp is not None else None
    tok_keep = keep_mask(np.minimum.accumulate(imp.tok, axis=0), keep_tokens) if imp.tok is not None else None
    blocks = []
    tokens = list(range(a.num_tokens))
    for i in range(a.depth):
        if tok_keep is not None:
            keep = [t for t in tokens[P:] if tok_keep[i, t - P]]
            tokens = tokens[:P] + (keep or [tokens[P]])
        heads, qk, v = [], [], []
        qcnt = qk_keep[i].sum(1) if qk_keep is not None else np.full(a.num_heads, a.head_dim)
        vcnt = v_keep[i].sum(1) if v_keep is not None else np.full(a.num_heads, a.head_dim)
        alive = [h for h in range(a.num_heads) if qcnt[h] > 0 and vcnt[h] > 0]
        if alive:
            q = max(1, int(round(qcnt[alive].mean())))
            w = max(1, int(round(vcnt[alive].mean())))
            heads = alive
            qk = [_top(imp.qk[i, h] if imp.qk is not None else None, q, a.head_dim) for h in heads]
            v = [_top(imp.v[i, h] if imp.v is not None else None, w, a.head_dim) for h in heads]
        mlp = (np.nonzero(mlp_keep[i])[0].tolist() if mlp_keep is not None else list(range(a.mlp_dim)))
        blocks.append(BlockSpec(tokens=list(tokens), heads=heads, qk=qk, v=v, mlp=mlp))
    return SlimSpec(source=source, arch=a, blocks=blocks).validate()


def spec_importance(spec: SlimSpec, imp: Importance) -> float:
    """Importance kept by any spec (to compare selections)."""
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
    return tot
