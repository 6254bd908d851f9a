"""Candidate structures for one budget: several ways to spend it, each solved against the cost model.

The solver needs an exchange rate between kinds (how much a token is worth against an MLP unit), and the
search's first-order scores do not give one that holds (removing tokens compounds over depth). So a family is a
rule that turns a budget into a structure, and the families span the exchange rates:
  greedy       the solver with kind weights (attention, MLP, tokens) on a small grid
  channels     the solver with tokens kept (channel-only extreme)
  fractions    ViT-Slim's per-kind kept fractions along a direction (how fast each kind is dropped), the size
               solved to the budget; the equal-fractions direction is ViT-Slim's own rule and is always there
  uniform      the same widths in every block, all tokens, solved to the budget
  one-count    ranked token modes only: the fractions rule with one token count in every block that drops
               tokens. The image's own ranking already changes which tokens go in each block; on the shifted set
               this shape scored a lower distillation loss than every tapering family at 0.3x (0.353 against
               0.422) and kept more MLP units for the same latency (benchmarks/RESULTS.md), so the measured
               scoring gets both shapes
When the search searched the embedding width, it is one more kind, added to the families above (which keep it
whole, so that searching it never takes a candidate away): the greedy families again with its weight x1 (the MLP's),
the channel families with x0.25, x1 and x4, and three fraction directions that drop it.
Which family wins is measured (scoring.py); the closed loop then re-solves that family at refined budgets.
Within a kind, which head, channel, unit or token goes first always comes from the search.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SlimError
from ..types import RANKED_TOKEN_MODES, Arch, ModelConfig, SlimSpec
from .importance import Importance
from .solver import Cost, Selector, StructureBuilder
from .vitslim import fraction_spec, solve_scalar, uniform_spec

# greedy kind weights (attention, MLP, tokens); MLP is the reference
GREEDY_WEIGHTS = [(a, 1.0, t) for a in (0.25, 1.0, 4.0) for t in (0.25, 1.0, 4.0, 16.0)]
CHANNEL_WEIGHTS = [(0.25, 1.0), (1.0, 1.0), (4.0, 1.0)]
# fraction directions: how fast (attention, MLP, tokens) are dropped, relative to each other
FRACTION_DIRECTIONS = [(1.0, 1.0, 1.0), (1.0, 1.0, 0.0), (0.5, 1.0, 0.0), (0.25, 1.0, 0.0), (0.5, 1.0, 0.25),
                       (0.25, 1.0, 0.5), (1.0, 0.5, 0.5), (0.0, 1.0, 0.0)]
# one token count per block (ranked modes): the token-dropping directions above
ONE_COUNT_DIRECTIONS = [d for d in FRACTION_DIRECTIONS if d[2] > 0]
# with the embedding searched: its weight in the greedy/channel families, and fraction directions that drop it
EMBED_WEIGHTS = (0.25, 1.0, 4.0)
EMBED_DIRECTIONS = [(1.0, 1.0, 0.0, 1.0), (0.5, 1.0, 0.0, 0.5), (0.25, 1.0, 0.0, 0.25)]
MIN_KEEP = 0.01


@dataclass(frozen=True)
class Family:
    """A rule that turns a budget into a structure."""

    kind: str  # greedy | channels | fractions | one-count | uniform
    params: tuple = ()  # greedy: attn, mlp, tokens[, embed] weights; channels: attn, mlp[, embed]; fractions: rates
    # of attn, mlp, tokens[, embed] (no embed entry: the embedding is kept whole); one-count: rates as fractions

    @property
    def name(self) -> str:
        p = self.params
        if self.kind in ("greedy", "channels"):
            tok = 3 if self.kind == "greedy" else 2
            return (f"{self.kind} (attn x{p[0]:g}, mlp x{p[1]:g}" + (f", tokens x{p[2]:g}" if tok == 3 else "")
                    + (f", embed x{p[tok]:g}" if len(p) > tok else "") + ")")
        if self.kind in ("fractions", "one-count"):
            if self.kind == "one-count":
                rule = "one token count per block"
            else:
                rule = "ViT-Slim's equal fractions" if p == (1.0, 1.0, 1.0) else "ViT-Slim fractions"
            return (f"{rule} (drop rates attn {p[0]:g}, mlp {p[1]:g}, tokens {p[2]:g}"
                    + (f", embed {p[3]:g}" if len(p) > 3 else "") + ")")
        return "uniform widths"


@dataclass
class Problem:
    """What every family solves against."""

    arch: Arch
    source: ModelConfig
    imp: Importance
    cost: Cost

    def builder(self, imp: Importance) -> StructureBuilder:
        return StructureBuilder(self.arch, self.source, imp)

    def solve(self, family: Family, budget: float) -> SlimSpec | None:
        """The family's structure for the budget, or None where it cannot meet it."""
        imp = self.imp
        try:
            if family.kind in ("greedy", "channels"):
                p = family.params
                tok = 3 if family.kind == "greedy" else 2
                w = imp.weighted(attn=p[0], mlp=p[1], tok=p[2] if tok == 3 else 1.0,
                                 embed=p[tok] if len(p) > tok else 1.0)
                if family.kind == "channels":
                    w.tok = None  # tokens are not a dimension here: all kept
                if len(p) == tok:
                    w.embed = None  # the embedding is kept whole
                return Selector(self.arch, self.source, w, self.cost).select(budget).spec
            if family.kind in ("fractions", "one-count"):
                da, dm, dt, de = (*family.params, 0.0)[:4]

                def make(u: float) -> SlimSpec:
                    def keep(d):
                        return max(MIN_KEEP, 1.0 - (1.0 - u) * d)
                    return fraction_spec(self.arch, self.source, imp, keep(da), keep(dm), keep(dt), keep(de),
                                         one_count=family.kind == "one-count")
                found = solve_scalar(make, self.cost, budget)
                return None if found is None else found[1]
            if family.kind == "uniform":
                builder = self.builder(imp)
                found = solve_scalar(lambda u: uniform_spec(builder, u), self.cost, budget)
                return None if found is None else found[1]
        except SlimError:
            return None
        raise ValueError(family.kind)


def families(imp: Importance) -> list[Family]:
    """Every family that applies to what the search searched (no token families without token masks, no embedding
    families without the embedding mask); ViT-Slim's own rule first, so that it is always among the candidates."""
    out: list[Family] = [Family("fractions", (1.0, 1.0, 1.0))]
    if imp.tok is not None:
        out += [Family("greedy", w) for w in GREEDY_WEIGHTS]
    out += [Family("channels", w) for w in CHANNEL_WEIGHTS]
    dirs = FRACTION_DIRECTIONS if imp.tok is not None else [d for d in FRACTION_DIRECTIONS if d[2] == 0.0]
    out += [Family("fractions", d) for d in dirs if d != (1.0, 1.0, 1.0)]
    if imp.tok is not None and imp.token_mode in RANKED_TOKEN_MODES:
        out += [Family("one-count", d) for d in ONE_COUNT_DIRECTIONS]
    out.append(Family("uniform"))
    if imp.embed is not None:
        if imp.tok is not None:
            out += [Family("greedy", (*w, 1.0)) for w in GREEDY_WEIGHTS]
        out += [Family("channels", (*w, e)) for w in CHANNEL_WEIGHTS for e in EMBED_WEIGHTS]
        out += [Family("fractions", d) for d in EMBED_DIRECTIONS]
    return out


def candidates(problem: Problem, budget: float) -> list[tuple[Family, SlimSpec]]:
    """Each family's structure for the budget (families that cannot meet it are left out), duplicates merged
    (the first family that produced a structure keeps it)."""
    out, seen = [], set()
    for fam in families(problem.imp):
        spec = problem.solve(fam, budget)
        if spec is None:
            continue
        key = repr([spec.embed] + [(b.tokens, b.heads, b.qk, b.v, b.mlp) for b in spec.blocks])
        if key in seen:
            continue
        seen.add(key)
        out.append((fam, spec))
    return out
