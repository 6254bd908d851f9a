"""A synthetic device profile with a known staircase, and synthetic importances."""

from __future__ import annotations

import math

import numpy as np

from slimdeploy.latency.components import embed_grid
from slimdeploy.latency.model import model_signature
from slimdeploy.latency.profile import token_grid, width_grid
from slimdeploy.select.importance import Importance
from slimdeploy.types import Arch, DeviceProfile


def staircase_profile(arch: Arch, tile: int = 32, step: int = 8, batch: int = 1, fixed: float = 0.0,
                      embed: bool = True) -> DeviceProfile:
    """Latency = tokens x ceil(width / tile) per matmul (plus `fixed` per piece): flat within a tile, a jump at
    each tile. Every piece on the stream costs in proportion to the embedding width (embedding tables on a coarse
    grid, without `embed`: none, as in a profile measured before them)."""
    ns = token_grid(arch, 6)
    hd = width_grid(arch.head_dim, step)
    hs = list(range(1, arch.num_heads + 1))
    qkv_g, proj_g, mlp_g = width_grid(3 * arch.num_heads * arch.head_dim, step), \
        width_grid(arch.num_heads * arch.head_dim, step), width_grid(arch.mlp_dim, step)
    t = lambda w: math.ceil(w / tile)  # noqa: E731
    D = arch.embed_dim
    tables = {
        "rest": {"axes": ["tokens"], "grid": {"tokens": ns}, "ms": [fixed + 1e-3 * n for n in ns]},
        "const": {"axes": ["tokens"], "grid": {"tokens": ns}, "ms": [fixed + 1e-4 * n for n in ns]},
        "gather": {"axes": ["tokens"], "grid": {"tokens": ns}, "ms": [fixed + 1e-4 * n for n in ns]},
        # rankings over (tokens in, tokens kept): scoring and TopK cost with what comes in, the gather with what stays
        "rank": {"axes": ["tokens", "kept"], "grid": {"tokens": ns, "kept": ns},
                 "ms": [[2 * fixed + 5e-4 + 2e-4 * n_in + 1e-4 * min(n, n_in) for n in ns] for n_in in ns]},
        "fuse": {"axes": ["tokens", "kept"], "grid": {"tokens": ns, "kept": ns},
                 "ms": [[2 * fixed + 7e-4 + 3e-4 * n_in + 1e-4 * min(n, n_in) for n in ns] for n_in in ns]},
        "qkv": {"axes": ["tokens", "out"], "grid": {"tokens": ns, "out": qkv_g},
                "ms": [[fixed + 1e-4 * n * D / 32 * t(w) for w in qkv_g] for n in ns]},
        "proj": {"axes": ["tokens", "in"], "grid": {"tokens": ns, "in": proj_g},
                 "ms": [[fixed + 1e-4 * n * D / 32 * t(w) for w in proj_g] for n in ns]},
        "mlp": {"axes": ["tokens", "hidden"], "grid": {"tokens": ns, "hidden": mlp_g},
                "ms": [[fixed + 2e-4 * n * D / 32 * t(m) for m in mlp_g] for n in ns]},
        "core_q": {"axes": ["tokens", "heads", "qk"], "grid": {"tokens": ns, "heads": hs, "qk": hd},
                   "ms": [[[fixed + 1e-5 * n * n * h * (t(q) + t(arch.head_dim)) for q in hd] for h in hs]
                          for n in ns]},
        "core_v": {"axes": ["tokens", "heads", "v"], "grid": {"tokens": ns, "heads": hs, "v": hd},
                   "ms": [[[fixed + 1e-5 * n * n * h * (t(arch.head_dim) + t(v)) for v in hd] for h in hs]
                          for n in ns]},
        "stem_head": {"ms": 0.05},
    }
    if embed:
        E = embed_grid(D, step)
        nc = [ns[0], ns[len(ns) // 2], ns[-1]]

        def coarse(g):
            return sorted({g[0], g[len(g) // 2], g[-1]})
        for name in ("rest", "const", "gather"):
            full = tables[name]["ms"]
            tables[f"embed.{name}"] = {"axes": ["tokens", "embed"], "grid": {"tokens": nc, "embed": E},
                                       "ms": [[full[ns.index(n)] * e / D for e in E] for n in nc]}
        for name, ax, coef in (("qkv", "out", 1e-4), ("proj", "in", 1e-4), ("mlp", "hidden", 2e-4)):
            g = coarse(tables[name]["grid"][ax])
            tables[f"embed.{name}"] = {"axes": ["tokens", ax, "embed"], "grid": {"tokens": nc, ax: g, "embed": E},
                                       "ms": [[[fixed + coef * n * e / 32 * t(w) for e in E] for w in g] for n in nc]}
        tables["embed.stem_head"] = {"axes": ["embed"], "grid": {"embed": E}, "ms": [0.05 * e / D for e in E]}
    return DeviceProfile(device="synthetic", hardware="none", backend="synthetic", backend_version="0",
                         precision="fp32", batch_size=batch, threads=None, model=model_signature(arch),
                         tables=tables, calibration={"beta": 0.01})


def wide_arch(name: str = "t-wide") -> Arch:
    """A wider tiny model (64 channels, 4 blocks, 4 heads, 256 MLP units, 64 patches), registered as `name`."""
    from slimdeploy.models import arch_of, register_model

    from .conftest import tiny_model

    register_model(name, dict(img_size=32, patch_size=4, in_chans=3, num_classes=5, embed_dim=64, depth=4, num_heads=4,
                              mlp_ratio=4.0))
    return arch_of(tiny_model(name))


def synthetic_importance(arch: Arch, seed: int = 0, tokens: bool = True) -> Importance:
    rng = np.random.default_rng(seed)
    depth_scale = np.linspace(1.5, 0.5, arch.depth)[:, None]  # deep blocks matter less (as ViT-Slim finds)
    return Importance(
        qk=rng.exponential(1.0, (arch.depth, arch.num_heads, arch.head_dim)) * depth_scale[:, :, None] * 1e-3,
        v=rng.exponential(1.0, (arch.depth, arch.num_heads, arch.head_dim)) * depth_scale[:, :, None] * 1e-3,
        mlp=rng.exponential(1.0, (arch.depth, arch.mlp_dim)) * depth_scale * 2e-4,
        tok=(rng.exponential(1.0, (arch.depth, arch.num_patches)) * depth_scale * 2e-3) if tokens else None,
    )
