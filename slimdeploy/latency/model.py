"""LatencyModel: predict(spec) -> ms from a DeviceProfile's tables.

A block with n tokens (n_prev before it), h heads of q and v channels and m MLP units costs the table lookups
  [gather(n) if n < n_prev; rank(n_prev, n) instead in attentive token mode, fuse(n_prev, n) in fused mode]
  + (rest(n) + qkv(n, h*(2q+v)) + core(n, h, q, v) + proj(n, h*v)   if h > 0, else const(n))
  + (rest(n) + mlp(n, m)                                            if m > 0, else const(n))
and the model is stem_head(tokens the last block keeps) + the blocks (the final norm, fused with the last residual
add by ONNX Runtime, costs per token: components.stem_head; older profiles hold one stem_head for all). Tables are
read linearly in tokens (they hold the fixed cost of an operator at few tokens: nothing scales to zero). A width is
padded to the profile's step (engines pad to tiles: a staircase at that step) and read linearly between two measured
widths further apart than that: the grids step by up to 128 units at large widths (deit_small's MLP above 1024), and
whole models there measured half way between their neighbours (benchmarks/protocol_checks.py mlp-widths: median
position 0.50, not the 1.0 of reading the next point up, which priced a random structure's MLP up to 12% too high).
Where the grid is coarse (from AFFINE_FROM steps on), a matmul's table (qkv, proj, mlp) is read as its least-squares
line in width at each token count: a matmul costs close to an affine function of its width, and these entries, each
a piece timed in a few ms, were the noisiest of the profiles (+8% to +34% for the same 128 units of deit_small's
MLP, in two profiles measured 11 minutes apart); on six stored profiles the line took the leave-one-out median error
of the deit_small ones from 2.7-7.2% to 1.8-2.3% (benchmarks/RESULTS.md). The attention core is factorised over its
two widths: core(n, h, q, v) = core_q(n, h, q) + core_v(n, h, v) - core_q(n, h, head_dim).
At an embedding width e below the full D, every piece but the attention core (which never touches the stream) is
scaled by its embedding table's ratio cost(e) / cost(D), read at the same tokens and width on a coarse grid (linear
in tokens, widths and e read as above): factorised, so the profile measures a few hundred more pieces, not
every table again at every e.

The sum maps to end-to-end latency by a calibration fitted on whole models measured during profiling:
  ms = scale * sum + per_attn * (blocks with heads) + per_mlp * (blocks with MLP) + per_gather * (gathers)
       + per_rank * (attentive rankings) + per_fuse * (fused rankings) + per_mb * (weight MB) + beta
which models the per-operator costs explicitly (the exported graph's extra reshapes per branch, its gathers, the
nodes of a ranking: in a whole model these cost more than the same nodes timed alone; a ranking's is measured
apart, paired with a static twin, see calibration.py), and the weights streamed from memory where they outgrow
the caches (per_mb).
A closed loop's measurements refine it further with a correction (a * ms + b), saved with the run.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from itertools import product
from pathlib import Path

import numpy as np

from ..errors import SlimError
from ..types import RANKED_TOKEN_MODES, Arch, DeviceProfile, SlimSpec
from .calibration import FEATURES, FIT, RANKING_TABLE, calibrated, fit_calibration
from .fingerprint import describe, differences
from .tables import smoothed

SHIPPED_PROFILES = Path(__file__).resolve().parent.parent.parent / "profiles"
TABLES = ("rest", "const", "gather", "qkv", "proj", "mlp", "core_q", "core_v")
MATMULS = ("qkv", "proj", "mlp")  # tables over (tokens, width) of one matmul (two for the MLP)
AFFINE_FROM = 16  # in profile steps: where the width grids turn coarse (profile.width_grid) and a matmul table is
# read as its least-squares line in width, at each token count (see the module's docstring)


def user_profiles_dir() -> Path:
    """The user's own profile folder: $SLIMDEPLOY_PROFILES, else ~/.slimdeploy/profiles."""
    return Path(os.environ.get("SLIMDEPLOY_PROFILES", "~/.slimdeploy/profiles")).expanduser()


def profile_search_path(profiles_dir: str | Path | None = None) -> list[Path]:
    first = Path(profiles_dir).expanduser() if profiles_dir else user_profiles_dir()
    return [first, SHIPPED_PROFILES]


def resolve_profile(device: str, profiles_dir: str | Path | None = None) -> Path:
    """The profile file for --device NAME (or NAME as a path to a .json file)."""
    if device.endswith(".json") and Path(device).expanduser().is_file():
        return Path(device).expanduser()
    for d in profile_search_path(profiles_dir):
        p = d / f"{device}.json"
        if p.is_file():
            return p
    known = sorted({p.stem for d in profile_search_path(profiles_dir) if d.is_dir() for p in d.glob("*.json")
                    if not p.name.startswith(".")})
    where = ", ".join(str(d) for d in profile_search_path(profiles_dir))
    raise SlimError(f"no profile for device '{device}' in {where}"
                    f" (known: {', '.join(known) or 'none'}; use --device local to measure this machine, or "
                    f"make one with: slimdeploy profile --device {device})")


def model_signature(arch: Arch) -> dict:
    """The shape facts a profile's tables depend on."""
    return {"embed_dim": arch.embed_dim, "num_tokens": arch.num_tokens, "num_prefix_tokens": arch.num_prefix_tokens,
            "num_heads": arch.num_heads, "head_dim": arch.head_dim, "mlp_dim": arch.mlp_dim, "depth": arch.depth,
            "img_size": arch.img_size, "patch_size": arch.patch_size, "in_chans": arch.in_chans,
            "qkv_bias": arch.qkv_bias, "qk_norm": arch.qk_norm, "layer_scale": arch.layer_scale,
            "num_classes": arch.num_classes}


def check_profile_fits(profile: DeviceProfile, arch: Arch, batch_size: int | None = None,
                       precision: str | None = None) -> None:
    """Refuse a profile measured for another model shape, batch size or precision, saying what differs."""
    want = model_signature(arch)
    diffs = [f"{k} {profile.model.get(k)} (profile) vs {v} (model)" for k, v in want.items()
             if k in profile.model and profile.model[k] != v and k != "num_classes"]
    if batch_size is not None and batch_size != profile.batch_size:
        diffs.append(f"batch size {profile.batch_size} (profile) vs {batch_size}")
    if precision is not None and precision != profile.precision:
        raise SlimError(f"profile '{profile.device}' was measured at {profile.precision}, not {precision}: a width "
                        f"staircase at one precision does not hold at another; measure one with slimdeploy profile "
                        f"--precision {precision} (or --device local --precision {precision})")
    if diffs:
        raise SlimError(f"profile '{profile.device}' does not fit: " + "; ".join(diffs)
                        + " (measure one: slimdeploy profile --device NAME --model ..., or use --device local)")


def fingerprint_warning(profile: DeviceProfile, here: dict) -> str | None:
    """A warning naming both machines when the profile was measured on another one, else None."""
    diff = differences(profile.fingerprint, here)
    if not diff:
        return None
    return (f"profile '{profile.device}' was measured on {describe(profile.fingerprint)}, but this machine is "
            f"{describe(here)} (differs in {', '.join(diff)}): its predictions do not hold here; measure this "
            "machine with --device local")


UNSTEADY = 0.05  # a median 95% interval of the calibration's ratios wider than +-5%: measured in a busy phase


def busy_measurement(profile: DeviceProfile) -> str | None:
    """How a profile's whole models were measured on a busy machine ("whole models +-9%, calibration fit 7% median
    error": their ratios to dense with a median 95% interval wider than +-UNSTEADY; +-1..4% on a quiet 2-core EPYC
    or Xeon), else None."""
    points = (profile.calibration or {}).get("points") or []
    widths = [p["halfwidth"] for p in points[1:] if p.get("halfwidth") is not None]
    width = float(np.median(widths)) if widths else 0.0
    if width <= UNSTEADY:
        return None
    fit = (profile.calibration or {}).get("fit_median_abs_error")
    return f"whole models +-{width:.0%}" + (f", calibration fit {fit:.0%} median error" if fit is not None else "")


def steadiness_warning(profile: DeviceProfile) -> str | None:
    """A warning when the profile was measured on a busy machine (busy_measurement), else None."""
    busy = busy_measurement(profile)
    return busy and (f"profile '{profile.device}' was measured on a busy machine ({busy}): its predictions are that"
                     f" much less certain; measure it again when the machine is quiet (slimdeploy profile --device"
                     f" {profile.device})")


def affine_in_width(ms: np.ndarray, widths: list[int], start: int) -> np.ndarray:
    """A (tokens, width) table with its entries at widths >= start replaced, at each token count, by their
    least-squares line in width (kept >= 0); unchanged with fewer than three such widths."""
    w = np.asarray(widths, dtype=np.float64)
    sel = w >= start
    if sel.sum() < 3:
        return ms
    out = ms.copy()
    A = np.stack([np.ones(int(sel.sum())), w[sel]], axis=1)
    coef, *_ = np.linalg.lstsq(A, ms[:, sel].T, rcond=None)  # one line per token count
    out[:, sel] = np.maximum((A @ coef).T, 0.0)
    return out


COUNT_AXES = ("kept", "heads")  # counted, not padded to a tile: tokens a ranking keeps, heads


class Table:
    """A measured table: linear in its first axis (tokens); in the others, linear between the grid points around
    the value, a width padded to `tile` first (see the module's docstring), a count (COUNT_AXES) as it is."""

    def __init__(self, d: dict, tile: int = 8, affine_from: int | None = None):
        self.axes: list[str] = d["axes"]
        self.grid: list[list[int]] = [list(map(int, d["grid"][a])) for a in self.axes]
        # read from the measurements where the profile kept them: a profile made before tables.py's smoothing
        # changed reads the same as one made since (its calibration is fitted again: calibration.FIT)
        self.ms = smoothed(d["raw_ms"]) if "raw_ms" in d else np.asarray(d["ms"], dtype=np.float64)
        self.tiles = [1 if a in COUNT_AXES else max(1, tile) for a in self.axes]
        if self.ms.shape != tuple(len(g) for g in self.grid):
            raise SlimError(f"profile table over {self.axes} has shape {self.ms.shape}, not its grid's")
        if not np.isfinite(self.ms).all() or (self.ms < 0).any():
            raise SlimError(f"profile table over {self.axes} holds NaN or negative entries: re-measure the profile")
        if affine_from is not None and len(self.axes) == 2:
            self.ms = affine_in_width(self.ms, self.grid[1], affine_from)

    def at_width(self, axis: int, w: int) -> list[tuple[int, float]]:
        """Grid indices and weights that read w on axis `axis` (a width or a count): w padded to the axis's tile (not
        past the next grid point), then linear between its two neighbours; clamped to the grid's ends."""
        g, tile = self.grid[axis], self.tiles[axis]
        j = bisect_left(g, w)
        if j == 0 or j == len(g):
            return [(min(j, len(g) - 1), 1.0)]
        w = min(g[j], -(-w // tile) * tile)
        u = (w - g[j - 1]) / (g[j] - g[j - 1])
        return [(j, 1.0)] if u >= 1.0 else [(j - 1, 1.0 - u), (j, u)]

    def __call__(self, n: float, *widths: int) -> float:
        g = self.grid[0]
        if len(g) == 1:
            tokens = [(0, 1.0)]
        else:
            j = min(max(bisect_left(g, n), 1), len(g) - 1)
            t = (n - g[j - 1]) / (g[j] - g[j - 1])  # outside the grid: linear extrapolation from the nearest two
            tokens = [(j - 1, 1.0 - t), (j, t)]
        total = 0.0
        for corner in product(tokens, *(self.at_width(i + 1, w) for i, w in enumerate(widths))):
            weight = 1.0
            for _, u in corner:
                weight *= u
            if weight:
                total += weight * float(self.ms[tuple(i for i, _ in corner)])
        return max(0.0, total)

    def widths(self, axis: int) -> list[int]:
        return self.grid[axis]


BYTES_PER_PARAM = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}


class LatencyModel:
    """predict(spec) -> ms on the profile's device, backend, precision and batch size."""

    def __init__(self, profile: DeviceProfile, correction: tuple[float, float] = (1.0, 0.0),
                 path: Path | None = None, token_mode: str = "static", refit: bool = True):
        self.profile, self.path = profile, path  # path: the file it was read from
        self.token_mode = token_mode  # of the sizes predict_sizes is given (a spec says its own)
        t = profile.tables
        missing = [k for k in (*TABLES, "stem_head") if k not in t]
        if missing:
            raise SlimError(f"profile '{profile.device}' lacks the tables {missing}: re-measure it")
        tile = int(profile.model.get("step", 8))
        affine = {k: AFFINE_FROM * tile for k in MATMULS}
        self.tables = {k: Table(t[k], tile, affine.get(k)) for k in TABLES}
        self.embed_tables = {k.removeprefix("embed."): Table(v, tile) for k, v in t.items() if k.startswith("embed.")}
        if token_mode in RANKED_TOKEN_MODES:
            table = RANKING_TABLE[token_mode]
            if table not in t:
                raise SlimError(f"profile '{profile.device}' has no table of {token_mode} token ranking (measured "
                                "since this version): re-measure it with slimdeploy profile, or use --device local")
            self.tables["gather"] = Table(t[table], tile)  # a dropping block pays the ranking (and fusing) instead
        self.warm = {k: Table(v, tile, affine.get(k)) for k, v in (t.get("warm") or {}).items()}
        stem = t["stem_head"]  # over the tokens the last block keeps; one value in profiles made before
        self.stem: Table | float = Table(stem, tile) if "axes" in stem else float(stem["ms"])
        self._ratios: dict[tuple, float] = {}
        self.head_dim = int(profile.model["head_dim"])
        self.embed_dim = int(profile.model["embed_dim"])
        self.bytes_per_param = BYTES_PER_PARAM.get(profile.precision, 4)
        self._raw: dict[tuple, tuple[float, float, float]] = {}
        if refit:
            self._refit_calibration()
        self.cal = {k: v for k, v in (profile.calibration or {}).items() if k not in ("points", "pairs")}
        self.correction = correction  # (a, b): measured = a * prediction + b, from a closed loop

    @classmethod
    def load(cls, device: str, profiles_dir: str | Path | None = None) -> LatencyModel:
        path = resolve_profile(device, profiles_dir)
        return cls(DeviceProfile.load(path), path=path.resolve())

    def corrected(self, a: float, b: float) -> LatencyModel:
        """The same tables with measured = a * prediction + b applied (a closed loop's refit)."""
        return LatencyModel(self.profile, (a, b), self.path, self.token_mode)

    def for_tokens(self, token_mode: str) -> LatencyModel:
        """The same model for sizes of another token mode."""
        if token_mode == self.token_mode:
            return self
        return LatencyModel(self.profile, self.correction, self.path, token_mode)

    def _refit_calibration(self) -> None:
        """A calibration made by an older version of the fit is fitted again, in memory, from its points, their
        features read again from their widths by these tables (the paired twins' with them); nothing is measured
        again, and `slimdeploy profile --fold` writes a refitted calibration to the file."""
        cal = self.profile.calibration or {}
        if not cal.get("points") or cal.get("fit") == FIT:
            return
        n_tokens, by_mode, points = int(self.profile.model["num_tokens"]), {}, []
        for p in cal["points"]:
            sizes = point_sizes(p)
            if sizes is not None:
                old = p.get("features") or {}
                # closed-loop points folded before they kept their token mode and embedding width: from the counts
                # and the weight bytes their features were computed with
                mode = p.get("token_mode") or next((m for m, k in RANKING_TABLE.items() if old.get(k)), "static")
                embed = sizes[1]
                if embed is None and old.get("bytes"):
                    per_width = sum(self.block_bytes(h, q, v, m, 1) for _, h, q, v, m in sizes[0])  # bytes at e = 1
                    embed = round(old["bytes"] / per_width) if per_width else None
                if mode not in by_mode:
                    by_mode[mode] = LatencyModel(self.profile, path=self.path, token_mode=mode, refit=False)
                p = {**p, "features": by_mode[mode].features(sizes[0], n_tokens, embed)}
            points.append(p)
        pairs = cal.get("pairs") or []
        twins = [i for i, p in enumerate(points[:-1]) if p.get("ranked_twin")]  # each followed by its static twin
        if len(twins) == len(pairs):
            pairs = [{**pair, "ranked": points[i]["features"], "static": points[i + 1]["features"]}
                     for pair, i in zip(pairs, twins)]
        self.profile.calibration = fit_calibration(points, pairs)

    # ---- embedding width -------------------------------------------------------------------------
    def embed_widths(self) -> list[int]:
        """The embedding widths the profile measured (SlimError when it has none)."""
        if "stem_head" not in self.embed_tables:
            raise SlimError(f"profile '{self.profile.device}' has no embedding-width tables (measured since this "
                            "version): re-measure it with slimdeploy profile, or use --device local")
        return self.embed_tables["stem_head"].widths(0)

    def embed_ratio(self, piece: str, e: int, n: float = 0, *widths: int) -> float:
        """cost(e) / cost(D) of a piece at these tokens and widths (1 at the full width)."""
        if e >= self.embed_dim:
            return 1.0
        key = (piece, e, n, widths)
        if key not in self._ratios:
            self.embed_widths()  # the clear error when the tables are missing
            t = self.embed_tables[piece]
            if piece == "stem_head":
                full, at = t.ms[-1], sum(u * t.ms[i] for i, u in t.at_width(0, e))
            else:
                full, at = t(n, *widths, self.embed_dim), t(n, *widths, e)
            self._ratios[key] = float(at / full) if full > 0 else 1.0
        return self._ratios[key]

    # ---- pieces --------------------------------------------------------------------------------
    def core(self, n: int, h: int, q: int, v: int) -> float:
        cq, cv = self.tables["core_q"], self.tables["core_v"]
        return max(0.0, cq(n, h, q) + cv(n, h, v) - cq(n, h, self.head_dim))

    def block_parts(self, n_prev: int, n: int, h: int, q: int, v: int, m: int, warm: bool = False,
                    e: int | None = None) -> dict[str, float]:
        """Table lookups (uncalibrated ms) of one block's parts, from the cold (or warm) tables, at embedding
        width e (default: the full width)."""
        t = self.tables
        w = self.warm if warm and self.warm else t
        e = e or self.embed_dim

        def r(piece, *widths):
            return self.embed_ratio(piece, e, n, *widths)
        parts = {"gather": self.drop(n_prev, n) * r("gather") if n < n_prev else 0.0}
        if h > 0:
            out = h * (2 * q + v)
            parts.update(attn_rest=t["rest"](n) * r("rest"), qkv=w["qkv"](n, out) * r("qkv", out),
                         core=self.core(n, h, q, v), proj=w["proj"](n, h * v) * r("proj", h * v))
        else:
            parts["attn_const"] = t["const"](n) * r("const")
        if m > 0:
            parts.update(mlp_rest=t["rest"](n) * r("rest"), mlp=w["mlp"](n, m) * r("mlp", m))
        else:
            parts["mlp_const"] = t["const"](n) * r("const")
        return parts

    def drop(self, n_prev: int, n: int) -> float:
        """Uncalibrated ms of dropping from n_prev to n tokens: the gather, or in a ranked token mode the ranking
        (over the tokens it gets, where the profile measured that: since this version)."""
        t = self.tables["gather"]
        return t(n_prev, n) if len(t.axes) == 2 else t(n)

    def block_raw(self, n_prev: int, n: int, h: int, q: int, v: int, m: int, e: int | None = None
                  ) -> tuple[float, float, float]:
        """(pieces without weights, weighted pieces cold, weighted pieces warm) of one block, uncalibrated ms."""
        key = (n_prev if n < n_prev else None, n, h, q, v, m, e)
        if key not in self._raw:
            cold = self.block_parts(n_prev, n, h, q, v, m, e=e)
            warm = self.block_parts(n_prev, n, h, q, v, m, warm=True, e=e)
            weighted = [k for k in ("qkv", "proj", "mlp") if k in cold]
            shared = sum(v for k, v in cold.items() if k not in weighted)
            self._raw[key] = (shared, sum(cold[k] for k in weighted), sum(warm[k] for k in weighted))
        return self._raw[key]

    def block_bytes(self, h: int, q: int, v: int, m: int, e: int | None = None) -> float:
        """Bytes of a block's linear weights: what a call streams through the caches."""
        return self.bytes_per_param * (e or self.embed_dim) * (h * (2 * q + v) + h * v + 2 * m)

    def stem_head(self, n_last: int) -> float:
        """Uncalibrated ms of the stem and head, the final norm over the n_last tokens of the last block."""
        return self.stem if isinstance(self.stem, float) else self.stem(n_last)

    # ---- whole models --------------------------------------------------------------------------
    def features(self, sizes: list[tuple[int, int, int, int, int]], num_tokens: int, embed: int | None = None
                 ) -> dict[str, float]:
        """The calibration's regressors for per-block sizes (n, h, q, v, m): the table sums split into what a
        block costs at its fewest tokens (fixed: operator and weight-streaming costs) and what its tokens add,
        each for the pieces without weights (shared) and the weighted pieces cold and warm; the weight bytes; and
        the structural counts; at embedding width `embed` (default: the full width)."""
        e = embed if embed and embed < self.embed_dim else None
        out = dict.fromkeys(FEATURES, 0.0)
        n_last = sizes[-1][0] if sizes else num_tokens
        out["fixed_shared"] = self.stem_head(n_last) * (self.embed_ratio("stem_head", e) if e else 1.0)
        prev, few = num_tokens, int(self.profile.model["num_prefix_tokens"]) + 1
        for n, h, q, v, m in sizes:
            full = self.block_raw(prev, n, h, q, v, m, e)
            # the same block at its fewest tokens, dropping tokens exactly when it does: a block that keeps what it
            # gets must not pay a gather (or a ranking) in its fixed part that its token part then takes back
            few_n = min(n, few)
            fixed = self.block_raw(prev if n < prev else few_n, few_n, h, q, v, m, e)
            for i, part in enumerate(("shared", "cold", "warm")):
                out[f"fixed_{part}"] += fixed[i]
                out[f"tok_{part}"] += full[i] - fixed[i]
            out["bytes"] += self.block_bytes(h, q, v, m, e)
            out["attn"] += h > 0
            out["mlp"] += m > 0
            out["gather"] += n < prev
            if self.token_mode in RANKING_TABLE:
                out[RANKING_TABLE[self.token_mode]] += n < prev
            prev = n
        return out

    def from_features(self, f: dict[str, float]) -> float:
        a, b = self.correction
        return a * calibrated(f, self.cal, bool(self.warm)) + b

    def predict_sizes(self, sizes: list[tuple[int, int, int, int, int]], embed: int | None = None) -> float:
        """Predicted ms of a model with these per-block sizes (n incl. prefix, heads, q, v, MLP units) at this
        embedding width (default: the full width)."""
        return self.from_features(self.features(sizes, int(self.profile.model["num_tokens"]), embed))

    def dense_sizes(self) -> list[tuple[int, int, int, int, int]]:
        """The dense model's per-block sizes, from the profile's model signature (for rows stored as sizes, which
        are compared as ratios to it)."""
        a = self.profile.model
        return [(a["num_tokens"], a["num_heads"], a["head_dim"], a["head_dim"], a["mlp_dim"])] * a["depth"]

    def predict(self, spec: SlimSpec) -> float:
        """Predicted end-to-end latency of the slim model in ms."""
        return self.for_tokens(spec.token_mode).predict_sizes(spec_sizes(spec), spec.embed_dim)

    def breakdown(self, spec: SlimSpec) -> list[dict]:
        """Uncalibrated (cold) ms per part, per block."""
        out, prev, lm = [], spec.arch.num_tokens, self.for_tokens(spec.token_mode)
        for n, h, q, v, m in spec_sizes(spec):
            out.append(lm.block_parts(prev, n, h, q, v, m, e=spec.embed_dim))
            prev = n
        return out


def point_sizes(point: dict) -> tuple[list[tuple[int, int, int, int, int]], int | None] | None:
    """A calibration point's per-block sizes (n, h, q, v, m) and embedding width, read from its widths (a spec's
    summary, or a closed loop's sizes), else None."""
    w = point.get("widths")
    if not w:
        return None
    if isinstance(w[0], dict):
        return [(b["tokens"], b["heads"], b["qk"], b["v"], b["mlp"]) for b in w], w[0].get("embed")
    return [tuple(b) for b in w], point.get("embed")


def spec_sizes(spec: SlimSpec) -> list[tuple[int, int, int, int, int]]:
    return [(b.num_tokens, b.num_heads, b.qk_dim, b.v_dim, b.mlp_dim) for b in spec.blocks]
