"""LatencyModel: predict(spec) -> ms from a DeviceProfile's per-layer tables.

A block costs rest(n) + qkv(n, h*(2q+v)) + core(n, h, q, v) + proj(n, h*v) + mlp(n, m), with n
its token count, h heads of q (query/key) and v (value) channels, m MLP units. Widths are read
as a staircase (a width between two measured widths costs what the next measured one costs:
engines pad to tiles), token counts are interpolated linearly. The sum over blocks plus the stem
and head is mapped to end-to-end latency by alpha * sum + beta, fitted on whole models measured
during profiling (it absorbs per-call overhead and effects between layers).
"""

from __future__ import annotations

import os
from bisect import bisect_left
from pathlib import Path

import numpy as np

from .errors import SlimError
from .types import Arch, DeviceProfile, SlimSpec

PART_KINDS = ("rest", "qkv", "core", "proj", "mlp")
CAL_GROUPS = {"rest": "rest", "qkv": "attn", "core": "attn", "proj": "attn", "mlp": "mlp"}
SHIPPED_PROFILES = Path(__file__).resolve().parent.parent / "profiles"


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
                    f" (known: {', '.join(known) or 'none'}; make one with: slimdeploy profile --device {device})")


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
        diffs.append(f"precision {profile.precision} (profile) vs {precision}")
    if diffs:
        raise SlimError(f"profile '{profile.device}' does not fit: " + "; ".join(diffs)
                        + " (measure one: slimdeploy profile --device NAME --model ...)")


class Table:
    """A measured table: interpolated in its first axis (tokens), a staircase in the others."""

    def __init__(self, d: dict):
        self.axes: list[str] = d["axes"]
        self.grid: list[list[int]] = [list(map(int, d["grid"][a])) for a in self.axes]
        self.ms = np.asarray(d["ms"], dtype=np.float64)

    def _stair(self, axis: int, w: int) -> int:
        """Index of the first grid width >= w (clamped to the largest)."""
        g = self.grid[axis]
        return min(bisect_left(g, w), len(g) - 1)

    def __call__(self, n: float, *widths: int) -> float:
        """ms at n tokens: the per-token cost ms/n is interpolated linearly in n, which is exact for
        a*n + b*n^2 (linear layers and the attention core); widths read as a staircase."""
        idx = tuple(self._stair(i + 1, w) for i, w in enumerate(widths))
        g = self.grid[0]
        if len(g) == 1 or n <= g[0]:
            return float(self.ms[(0, *idx)] * n / g[0])
        j = min(bisect_left(g, n), len(g) - 1)
        lo, hi = g[j - 1], g[j]
        t = (n - lo) / (hi - lo)  # > 1 above the grid: linear extrapolation of the per-token cost
        per_token = (1 - t) * self.ms[(j - 1, *idx)] / lo + t * self.ms[(j, *idx)] / hi
        return float(per_token * n)

    def widths(self, axis: int) -> list[int]:
        return self.grid[axis]


class LatencyModel:
    """predict(spec) -> ms on the profile's device, backend, precision and batch size."""

    def __init__(self, profile: DeviceProfile):
        self.profile = profile
        t = profile.tables
        self.rest, self.qkv, self.core = Table(t["rest"]), Table(t["qkv"]), Table(t["core"])
        self.proj, self.mlp = Table(t["proj"]), Table(t["mlp"])
        self.stem = float(t["stem_head"]["ms"])
        cal = profile.calibration or {}
        alpha = float(cal.get("alpha", 1.0))
        self.coef = {k: float(cal.get("coef", {}).get(CAL_GROUPS[k], alpha)) for k in PART_KINDS}
        self.beta = float(cal.get("beta", 0.0))

    @classmethod
    def load(cls, device: str, profiles_dir: str | Path | None = None) -> LatencyModel:
        return cls(DeviceProfile.load(resolve_profile(device, profiles_dir)))

    def block_parts(self, n: int, h: int, q: int, v: int, m: int) -> dict[str, float]:
        """Table lookups (uncalibrated ms) of one block's parts."""
        parts = {"rest": self.rest(n), "qkv": 0.0, "core": 0.0, "proj": 0.0, "mlp": 0.0}
        if h > 0:
            parts.update(qkv=self.qkv(n, h * (2 * q + v)), core=self.core(n, h, q, v), proj=self.proj(n, h * v))
        if m > 0:
            parts["mlp"] = self.mlp(n, m)
        return parts

    def block_ms(self, n: int, h: int, q: int, v: int, m: int) -> float:
        """Calibrated latency contribution of one block (ms)."""
        return sum(self.coef[k] * val for k, val in self.block_parts(n, h, q, v, m).items())

    def raw_parts(self, spec: SlimSpec) -> dict[str, float]:
        """Per calibration group, the sum of table lookups over the blocks (the calibration's regressors)."""
        tot = dict.fromkeys(sorted(set(CAL_GROUPS.values())), 0.0)
        for b in spec.blocks:
            for k, val in self.block_parts(b.num_tokens, b.num_heads, b.qk_dim, b.v_dim, b.mlp_dim).items():
                tot[CAL_GROUPS[k]] += val
        return tot

    def constant_ms(self) -> float:
        """What does not depend on the structure: beta (stem and head are constant, so they live in beta)."""
        return self.beta

    def predict(self, spec: SlimSpec) -> float:
        """Predicted end-to-end latency of the slim model in ms."""
        return self.constant_ms() + sum(self.block_ms(b.num_tokens, b.num_heads, b.qk_dim, b.v_dim, b.mlp_dim)
                                        for b in spec.blocks)

    def breakdown(self, spec: SlimSpec) -> list[dict]:
        """Calibrated ms per part, per block."""
        return [{k: self.coef[k] * v for k, v in self.block_parts(b.num_tokens, b.num_heads, b.qk_dim, b.v_dim,
                                                                  b.mlp_dim).items()} for b in spec.blocks]
