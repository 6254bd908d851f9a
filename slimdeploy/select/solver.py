"""The solver: the structure that keeps the most (weighted) importance within a budget.

Global across blocks and dimensions: start from the dense model and repeatedly take the cheapest move in
importance lost per unit of cost saved (a width of one block down to the next width that is strictly cheaper, a
head fewer, fewer tokens from a block on down to the next count that is strictly cheaper, the embedding width of
every block down a step), until the cost meets the budget. Then climb back: take any widening
that still fits, best importance per unit first. A widening that costs nothing is always taken. Under a latency
cost the widths are the profile's grid widths, where its tables were measured: the model reads a width between
two of them linearly (model.py), and the solver keeps to measured points rather than to interpolated ones: the
climb-back already spends all but 0.04-0.2% of a budget on them (medians), and finer widths kept no more importance
(benchmarks/solver_widths.py).

Costs: latency (the profile's model, with the gather a block pays when it drops tokens), MACs or parameters.
Within a kind, which head, channel, unit or token goes first comes from the search's importance; across kinds
the solver takes the importances as given, and candidates.py varies their exchange rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..analysis import block_macs, params_at, stem_head_macs
from ..errors import SlimError
from ..latency.model import LatencyModel, spec_sizes
from ..types import RANKED_TOKEN_MODES, Arch, BlockSpec, ModelConfig, SlimSpec
from .importance import Importance

# per block: [tokens incl. prefix, heads, q/k width, v width, MLP units]
State = list[list[int]]


class Cost:
    """What the budget limits, as a function of the whole structure (latency is not a sum of independent
    blocks: a block pays a gather when it drops tokens, and how cold the weights run depends on all of them)."""

    unit = ""

    def total(self, state: State, num_tokens: int, embed: int) -> float:
        """The cost of per-block sizes at embedding width `embed`."""
        raise NotImplementedError

    def of_spec(self, spec: SlimSpec) -> float:
        return self.total(spec_sizes(spec), spec.arch.num_tokens, spec.embed_dim)


class LatencyCost(Cost):
    unit = "ms"

    def __init__(self, lm: LatencyModel):
        self.lm = lm

    def total(self, state, num_tokens, embed):
        return self.lm.predict_sizes([tuple(s) for s in state], embed)


class MacsCost(Cost):
    unit = "MACs"

    def __init__(self, arch: Arch):
        self.arch = arch

    def total(self, state, num_tokens, embed):
        return float(stem_head_macs(self.arch, embed) + sum(block_macs(self.arch, shape_block(*s), embed)
                                                             for s in state))


class ParamsCost(Cost):
    unit = "params"

    def __init__(self, arch: Arch):
        self.arch = arch

    def total(self, state, num_tokens, embed):
        return float(params_at(self.arch, embed, [shape_block(*s) for s in state]))


def shape_block(n, h, q, v, m) -> BlockSpec:
    """A BlockSpec with the given sizes (indices are placeholders; only sizes matter for costs)."""
    return BlockSpec(tokens=list(range(n)), heads=list(range(h)), qk=[list(range(q))] * h, v=[list(range(v))] * h,
                     mlp=list(range(m)))


@dataclass
class Widths:
    """Values each dimension may take (ascending)."""

    heads: list[int]
    qk: list[int]
    v: list[int]
    mlp: list[int]
    tokens: list[int]  # patch-token counts
    embed: list[int]  # embedding widths


def widths_for(arch: Arch, cost: Cost, imp: Importance, token_step: int | None = None) -> Widths:
    """Profile grid widths (plus the full width) for latency; multiples of 8 for MACs/params."""
    D = arch.embed_dim
    if isinstance(cost, LatencyCost):
        hd = sorted(set(cost.lm.tables["core_q"].widths(2)) | {arch.head_dim})  # (tokens, heads, qk)
        mlp = sorted(set(cost.lm.tables["mlp"].widths(1)) | {arch.mlp_dim})
        embed = cost.lm.embed_widths() if imp.embed is not None else [D]
    else:
        hd = sorted(set(range(8, arch.head_dim + 1, 8)) | {arch.head_dim})
        mlp = sorted(set(range(8, arch.mlp_dim + 1, 8)) | {arch.mlp_dim})
        embed = sorted(set(range(8, D + 1, 8)) | {D}) if imp.embed is not None else [D]
    hd = [w for w in hd if w <= arch.head_dim]
    mlp = [0] + [w for w in mlp if w <= arch.mlp_dim]
    step = token_step or max(1, round(arch.num_patches / 32))
    tokens = sorted({arch.num_patches} | set(range(step, arch.num_patches, step)))
    return Widths(
        heads=list(range(0, arch.num_heads + 1)) if imp.qk is not None else [arch.num_heads],
        qk=hd if imp.qk is not None else [arch.head_dim],
        v=hd if imp.v is not None else [arch.head_dim],
        mlp=mlp if imp.mlp is not None else [arch.mlp_dim],
        tokens=tokens if imp.tok is not None else [arch.num_patches],
        embed=embed,
    )


def _prefix_sums(x: np.ndarray) -> np.ndarray:
    """Sorted descending along the last axis, cumulative, with a leading 0: P[..., k] = best k kept."""
    s = -np.sort(-x, axis=-1)
    return np.concatenate([np.zeros((*s.shape[:-1], 1)), np.cumsum(s, axis=-1)], axis=-1)


class StructureBuilder:
    """Turns per-block sizes into a SlimSpec, choosing within each kind by importance."""

    def __init__(self, arch: Arch, source: ModelConfig, imp: Importance):
        self.arch, self.source, self.imp = arch, source, imp
        self.P = arch.num_prefix_tokens
        self.P_qk = _prefix_sums(imp.qk) if imp.qk is not None else None
        self.P_v = _prefix_sums(imp.v) if imp.v is not None else None
        self.P_mlp = _prefix_sums(imp.mlp) if imp.mlp is not None else None
        self.P_embed = _prefix_sums(imp.embed) if imp.embed is not None else None
        # future importance of keeping token t from block i on: which tokens leave first
        self.R = np.flip(np.cumsum(np.flip(imp.tok, 0), 0), 0) if imp.tok is not None else None

    def head_scores(self, i: int, q: int, v: int) -> np.ndarray:
        score = np.zeros(self.arch.num_heads)
        if self.P_qk is not None:
            score = score + self.P_qk[i][:, q]
        if self.P_v is not None:
            score = score + self.P_v[i][:, v]
        return score

    def attn_imp(self, i: int, h: int, q: int, v: int) -> float:
        return 0.0 if h == 0 else float(np.sort(self.head_scores(i, q, v))[::-1][:h].sum())

    def mlp_imp(self, i: int, m: int) -> float:
        return float(self.P_mlp[i][m]) if self.P_mlp is not None else 0.0

    def embed_imp(self, e: int) -> float:
        return float(self.P_embed[e]) if self.P_embed is not None else 0.0

    def drop_order(self, i: int, kept: list[int]) -> list[int]:
        """Kept patch tokens of block i, least important (from block i on) first."""
        return sorted(kept, key=lambda t: self.R[i, t]) if self.R is not None else list(kept)

    def tokens_for_counts(self, counts: list[int]) -> list[list[int]]:
        """Kept patch indices per block for non-increasing patch counts."""
        kept = list(range(self.arch.num_patches))
        out = []
        for i, c in enumerate(counts):
            if c < len(kept):
                gone = set(self.drop_order(i, kept)[: len(kept) - c])
                kept = [t for t in kept if t not in gone]
            out.append(list(kept))
        return out

    def spec(self, state: State, kept_tokens: list[list[int]], embed: int | None = None) -> SlimSpec:
        a, imp = self.arch, self.imp
        blocks = []
        for i, (_, h, q, v, m) in enumerate(state):
            tokens = list(range(self.P)) + [self.P + t for t in sorted(kept_tokens[i])]
            if imp.token_mode in RANKED_TOKEN_MODES:  # the top ranks: a count
                tokens = list(range(len(tokens)))
            heads, qk, vv = [], [], []
            if h > 0:
                heads = sorted(np.argsort(-self.head_scores(i, q, v), kind="stable")[:h].tolist())
                qk = [top(imp.qk[i, hh] if imp.qk is not None else None, q, a.head_dim) for hh in heads]
                vv = [top(imp.v[i, hh] if imp.v is not None else None, v, a.head_dim) for hh in heads]
            mlp = top(imp.mlp[i] if imp.mlp is not None else None, m, a.mlp_dim)
            blocks.append(BlockSpec(tokens=tokens, heads=heads, qk=qk, v=vv, mlp=mlp))
        kept = top(imp.embed, embed or a.embed_dim, a.embed_dim)
        return SlimSpec(source=self.source, arch=a, blocks=blocks, token_mode=imp.token_mode, embed=kept,
                        **imp.ranking()).validate()


@dataclass
class Selection:
    spec: SlimSpec
    cost: float  # in the cost's unit (ms for latency)
    importance: float  # kept (weighted) importance
    moves: int


class Selector:
    """Greedy descent + ascent over per-block (tokens, heads, q, v, mlp) and the embedding width against a Cost."""

    def __init__(self, arch: Arch, source: ModelConfig, imp: Importance, cost: Cost, widths: Widths | None = None):
        self.arch, self.imp, self.cost = arch, imp, cost
        self.c = widths or widths_for(arch, cost, imp)
        self.b = StructureBuilder(arch, source, imp)
        self.P = arch.num_prefix_tokens
        self.embed = arch.embed_dim  # the current embedding width, shared by every block

    def total(self, state: State, embed: int | None = None) -> float:
        return self.cost.total(state, self.arch.num_tokens, embed or self.embed)

    def dense_state(self) -> State:
        a = self.arch
        return [[a.num_tokens, a.num_heads, a.head_dim, a.head_dim, a.mlp_dim] for _ in range(a.depth)]

    def minimum_cost(self) -> float:
        """The cost of the smallest structure this selector may build (every dimension at its least, tokens
        from the first block that may drop them; in a ranked token mode with some block's heads to rank by)."""
        c, a = self.c, self.arch
        state = [[self.P + c.tokens[0] if i >= self.imp.first_token_block else a.num_tokens, c.heads[0], c.qk[0],
                  c.v[0], c.mlp[0]] for i in range(a.depth)]
        options = [state]
        if not self.ranks_every_drop(state):  # keep every token, or one head in block 0 to rank the drops
            one_head = [list(s) for s in state]
            one_head[0][1] = min(h for h in c.heads if h > 0)
            options = [[[a.num_tokens, *s[1:]] for s in state], one_head]
        return min(self.total(s, c.embed[0]) for s in options)

    def ranks_every_drop(self, state: State) -> bool:
        """In a ranked token mode, every block that drops tokens needs an earlier block with heads: its
        attention ranks them (SlimSpec refuses the structure otherwise). Always true in static mode."""
        if self.imp.token_mode not in RANKED_TOKEN_MODES:
            return True
        ranked, prev = False, self.arch.num_tokens
        for n, h, *_ in state:
            if n < prev and not ranked:
                return False
            ranked, prev = ranked or h > 0, n
        return True

    def select(self, budget: float) -> Selection:
        """The structure that keeps the most importance with cost <= budget (SlimError if impossible).

        In a ranked token mode the descent is path-dependent: once block 0 has lost its heads, block 1 can no
        longer drop tokens, and a greedy descent that took that step may stall above a budget it could have met
        by ranking with one of them. So it runs twice there, with block 0's last head free and kept, and the
        structure keeping more importance wins."""
        if self.imp.token_mode not in RANKED_TOKEN_MODES or self.imp.tok is None or self.c.heads[0] > 0:
            return self._select(budget, keep_first_head=False)
        found, error = [], None
        for keep in (False, True):
            try:
                found.append(self._select(budget, keep_first_head=keep))
            except SlimError as e:
                error = e
        if not found:
            raise error
        return max(found, key=lambda r: r.importance)

    def _select(self, budget: float, keep_first_head: bool) -> Selection:
        a = self.arch
        state = self.dense_state()
        self.embed = a.embed_dim
        kept_tokens = [list(range(a.num_patches)) for _ in range(a.depth)]
        cost = self.total(state)
        floor = self.minimum_cost()
        if budget < floor - 1e-9:
            raise SlimError(f"target {_fmt(budget, self.cost.unit)} is below the smallest this profile allows "
                            f"({_fmt(floor, self.cost.unit)})")
        moves = 0
        while cost > budget + 1e-12:
            move = self._best_move(state, kept_tokens, down=True, slack=None, keep_first_head=keep_first_head)
            if move is None:
                raise SlimError(f"target {_fmt(budget, self.cost.unit)} cannot be reached (best found "
                                f"{_fmt(cost, self.cost.unit)})")
            cost = self._apply(move, state, kept_tokens)
            moves += 1
        while True:  # climb back into the slack
            move = self._best_move(state, kept_tokens, down=False, slack=budget - cost)
            if move is None:
                break
            cost = self._apply(move, state, kept_tokens)
            moves += 1
        return Selection(spec=self.b.spec(state, kept_tokens, self.embed), cost=cost,
                         importance=self.kept_importance(state, kept_tokens), moves=moves)

    def kept_importance(self, state: State, kept_tokens) -> float:
        tot = self.b.embed_imp(self.embed)
        for i, (_, h, q, v, m) in enumerate(state):
            tot += self.b.attn_imp(i, h, q, v) + self.b.mlp_imp(i, m)
            if self.imp.tok is not None:
                tot += float(self.imp.tok[i, kept_tokens[i]].sum())
        return tot

    # ---- moves -------------------------------------------------------------------------------
    def _block_imp(self, i, s) -> float:
        return self.b.attn_imp(i, s[1], s[2], s[3]) + self.b.mlp_imp(i, s[4])

    def _embed_move(self, state, base_cost: float, down: bool):
        """The embedding width one step down (to the next strictly cheaper) or up: (cost change, importance
        change, payload), or None."""
        for w in ([w for w in reversed(self.c.embed) if w < self.embed] if down
                  else [w for w in self.c.embed if w > self.embed]):
            nc = self.total(state, w)
            if down and nc >= base_cost - 1e-12:
                continue
            d_imp = self.b.embed_imp(self.embed) - self.b.embed_imp(w)
            return (base_cost - nc, d_imp, ("embed", w)) if down else (nc - base_cost, -d_imp, ("embed", w))
        return None

    def _best_move(self, state, kept_tokens, down: bool, slack: float | None, keep_first_head: bool = False):
        best, best_ratio = None, None
        base_cost = self.total(state)
        if len(self.c.embed) > 1:
            mv = self._embed_move(state, base_cost, down)
            if mv is not None and (down or mv[0] <= slack + 1e-12):
                d_cost, d_imp, payload = mv
                best = (None, "embed", payload)
                best_ratio = d_imp / max(d_cost, 1e-15) if down else -d_imp / max(d_cost, 1e-15)
        for i in range(len(state)):
            for dim in range(5):
                if dim == 0:
                    if not down or self.imp.tok is None:
                        continue  # tokens only go down (a removed token stays removed)
                    mv = self._token_move(i, state, kept_tokens, base_cost)
                    if mv is None:
                        continue
                    d_cost, d_imp, payload = mv
                else:
                    values = [None, self.c.heads, self.c.qk, self.c.v, self.c.mlp][dim]
                    payload = d_cost = d_imp = None
                    for w in ([w for w in reversed(values) if w < state[i][dim]] if down
                              else [w for w in values if w > state[i][dim]]):
                        new = list(state[i])
                        new[dim] = w
                        if dim == 1 and w == 0 and ((i == 0 and keep_first_head)
                                                    or not self.ranks_every_drop(state[:i] + [new] + state[i + 1:])):
                            continue  # the last heads that rank a later block's drops stay
                        nc = self.total(state[:i] + [new] + state[i + 1:])
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
                if not down and d_cost > slack + 1e-12:
                    continue
                # down: least importance lost per unit saved; up: most gained per unit spent
                ratio = d_imp / max(d_cost, 1e-15) if down else -d_imp / max(d_cost, 1e-15)
                if best_ratio is None or ratio < best_ratio - 1e-15:
                    best, best_ratio = (i, dim, payload), ratio
        return best

    def _token_move(self, i, state, kept_tokens, base_cost: float):
        """Remove the least important tokens of block i (and from every later block), down to the next count
        that is strictly cheaper: the first drop at a block pays its gather (a ranking in ranked modes), which a
        few tokens fewer may not repay."""
        kept = kept_tokens[i]
        if i < self.imp.first_token_block:
            return None
        order = self.b.drop_order(i, kept)
        for count in reversed([t for t in self.c.tokens if t < len(kept)]):
            drop = set(order[: len(kept) - count])
            new_state = [list(s) for s in state]
            d_imp = 0.0
            for j in range(i, len(state)):
                gone = [t for t in kept_tokens[j] if t in drop]
                d_imp += float(self.imp.tok[j, gone].sum())
                new_state[j][0] = self.P + len(kept_tokens[j]) - len(gone)
            if not self.ranks_every_drop(new_state):
                return None  # no earlier block's attention ranks block i's tokens, at any count
            d_cost = base_cost - self.total(new_state)
            if d_cost > 1e-12:
                return d_cost, d_imp, ("tokens", sorted(drop))
        return None

    def _apply(self, move, state, kept_tokens) -> float:
        i, dim, payload = move
        if dim == "embed":
            self.embed = payload[1]
        elif dim == 0:
            drop = set(payload[1])
            for j in range(i, len(state)):
                kept_tokens[j] = [t for t in kept_tokens[j] if t not in drop]
                state[j][0] = self.P + len(kept_tokens[j])
        else:
            state[i][payload[0]] = payload[1]
        return self.total(state)


def top(scores: np.ndarray | None, k: int, n: int) -> list[int]:
    """Indices of the k largest scores, sorted (the first k without scores)."""
    if k >= n or scores is None:
        return list(range(min(k, n)))
    return sorted(np.argsort(-scores, kind="stable")[:k].tolist())


def _fmt(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:.3f} ms"
    return f"{value / 1e6:.2f} M{unit}" if value >= 1e6 else f"{value:.0f} {unit}"
