"""Stage: `slimdeploy profile` measures per-layer latency tables on this machine.

Factorised measurements (never every block combination), on the backend that will run the model:
  rest  (tokens)                     the two LayerNorms, layer scales and residual adds of a block
  qkv   (tokens, out width)          Linear(D -> h*(2q+v))
  core  (tokens, heads, q, v)        split, reshape, softmax(q k^T) v, merge heads
  proj  (tokens, in width)           Linear(h*v -> D)
  mlp   (tokens, hidden)             fc1 + GELU + fc2
  stem_head                          patch embedding, tokens, position embedding, final norm, head
Widths are measured on multiples of `step` (8 by default) so staircases show; each table is made
monotone in width (isotonic fit), which removes timing noise without hiding steps. Then whole
models (the dense one and random slim ones of every size) are exported and measured to fit the
calibration end-to-end = beta + sum_k coef[k] * (table sum of part kind k), coef >= 0 (see
latency.py). Partial results are saved as they come: an interrupted profile resumes where it stopped.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backends import Backend, Session
from .errors import SlimError
from .fileio import read_json, write_json
from .latency import LatencyModel, model_signature
from .models import arch_of
from .progress import log, make_progress
from .slim import SlimAttention, build_slim
from .types import Arch, DeviceProfile, ModelConfig, SlimSpec


def token_grid(arch: Arch, points: int = 6) -> list[int]:
    """Token counts to measure: prefix + an even spread of patch counts, always including all."""
    p, n = arch.num_prefix_tokens, arch.num_patches
    counts = sorted({max(1, round(n * i / (points - 1))) for i in range(points)} | {n}) if points > 1 else [n]
    return [p + c for c in counts]


def width_grid(limit: int, step: int) -> list[int]:
    return list(range(step, limit + 1, step)) if limit >= step else [limit]


class _Rest(nn.Module):
    """The non-matmul part of a block: x + ls1(norm1(x)), then + ls2(norm2(.))."""

    def __init__(self, block):
        super().__init__()
        self.norm1, self.ls1, self.norm2, self.ls2 = (copy.deepcopy(block.norm1), copy.deepcopy(block.ls1),
                                                      copy.deepcopy(block.norm2), copy.deepcopy(block.ls2))

    def forward(self, x):
        x = x + self.ls1(self.norm1(x))
        return x + self.ls2(self.norm2(x))


def _core(arch: Arch, h: int, q: int, v: int) -> nn.Module:
    """SlimAttention without its two linear layers: exactly the slim model's attention core."""
    core = SlimAttention(arch.embed_dim, h, q, v, arch.head_dim ** -0.5, qk_norm=arch.qk_norm)
    core.qkv, core.proj = nn.Identity(), nn.Identity()
    return core


def _mlp(block, m: int) -> nn.Module:
    mlp = copy.deepcopy(block.mlp)
    mlp.fc1 = nn.Linear(mlp.fc1.in_features, m)
    mlp.fc2 = nn.Linear(m, mlp.fc2.out_features)
    return mlp


def _stem_head(model) -> nn.Module:
    m = copy.deepcopy(model)
    m.blocks = nn.Sequential()
    return m


@torch.no_grad()
def nontrivial_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter with small random values. Untrained models have zero biases and unit
    norms, which exporters and engines fold away: timing them would miss real work."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.02 + (1.0 if p.ndim == 1 else 0.0) * 0.1)
    return module


class _Scale(nn.Module):
    """The cheapest graph on an input: what one call costs besides the component's own work."""

    def forward(self, x):
        return x * 1.0001


class _Measurer:
    """Times component modules on a backend, caching results by key (for resume).

    A component's entry is its median time minus the time of a trivial graph on the same input
    (the per-call overhead a component inside a whole model does not pay), kept >= 2% of the total.
    """

    def __init__(self, backend: Backend, batch: int, cache: dict, save, budget_s: float):
        self.backend, self.batch, self.cache, self.save = backend, batch, cache, save
        self.per_call_s = budget_s
        self.unsaved = 0

    def time(self, key: str, module: nn.Module, shape: tuple[int, ...], subtract_overhead: bool = True) -> float:
        if key in self.cache:
            return self.cache[key][0]
        base = self.overhead(shape) if subtract_overhead else 0.0
        t = self._measure(module, shape)
        self.cache[key] = (max(t.median_ms - base, 0.02 * t.median_ms), t.spread)
        self.unsaved += 1
        if self.unsaved >= 50:
            self.save()
            self.unsaved = 0
        return self.cache[key][0]

    def overhead(self, shape: tuple[int, ...]) -> float:
        key = "overhead/" + "x".join(map(str, shape))
        if key not in self.cache:
            t = self._measure(_Scale(), shape, runs=30)
            self.cache[key] = (t.median_ms, t.spread)
        return self.cache[key][0]

    def _measure(self, module: nn.Module, shape: tuple[int, ...], runs: int = 9):
        x = torch.randn(self.batch, *shape)
        sess: Session = self.backend.load_module(nontrivial_(module).eval(), x)
        return sess.time(x.numpy(), warmup=3, min_runs=runs, min_seconds=self.per_call_s, max_runs=400)


def isotonic(values: np.ndarray) -> np.ndarray:
    """Least-squares non-decreasing fit (pool adjacent violators) along the last axis."""
    out = np.array(values, dtype=np.float64)
    flat = out.reshape(-1, out.shape[-1])
    for row in flat:
        blocks = [[float(v), 1] for v in row]
        merged: list[list[float]] = []
        for b in blocks:
            merged.append(b)
            while len(merged) > 1 and merged[-2][0] > merged[-1][0]:
                v2, n2 = merged.pop()
                v1, n1 = merged.pop()
                merged.append([(v1 * n1 + v2 * n2) / (n1 + n2), n1 + n2])
        row[:] = np.concatenate([[v] * int(n) for v, n in merged])
    return out


def random_spec(arch: Arch, source: ModelConfig, rng: random.Random, step: int = 8, min_keep: float = 0.15,
                size: float | None = None) -> SlimSpec:
    """A random slim structure of overall size `size` (default: random in [min_keep, 1]), with per block
    and dimension kept fractions around it (tokens dropped at some blocks, monotone)."""
    spec = SlimSpec.dense(source, arch)
    size = rng.uniform(min_keep, 1.0) if size is None else size
    tokens = list(range(arch.num_tokens))

    def width(full: int) -> int:
        w = full * min(1.0, max(0.05, size * rng.uniform(0.7, 1.3)))
        return max(1, min(full, int(round(w / step)) * step if full >= step else int(round(w))))

    for b in spec.blocks:
        if rng.random() < 0.4:
            patches = [t for t in tokens if t >= arch.num_prefix_tokens]
            keep = max(1, int(round(len(patches) * rng.uniform(max(0.3, size), 1.0))))
            tokens = tokens[:arch.num_prefix_tokens] + sorted(rng.sample(patches, keep))
        h = max(1, min(arch.num_heads, int(round(arch.num_heads * size * rng.uniform(0.7, 1.3)))))
        q, v, m = width(arch.head_dim), width(arch.head_dim), width(arch.mlp_dim)
        heads = sorted(rng.sample(range(arch.num_heads), h))
        b.tokens, b.heads = list(tokens), heads
        b.qk = [list(range(q)) for _ in heads]
        b.v = [list(range(v)) for _ in heads]
        b.mlp = list(range(m))
    return spec.validate()


def measure_model(backend: Backend, model: nn.Module, arch: Arch, batch: int, seconds: float = 1.0) -> dict:
    """End-to-end latency of a whole model on the backend, exported as the deployment exports it.

    The model should have trained or nontrivial_ weights (see nontrivial_)."""
    x = torch.randn(batch, arch.in_chans, arch.img_size, arch.img_size)
    if backend.name == "torch":
        sess = backend.load_module(model.eval(), x)
    else:
        from .export import export_onnx

        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(model, Path(tmp) / "m.onnx", (arch.in_chans, arch.img_size, arch.img_size), batch)
            sess = backend.load_onnx(path)
    return sess.time(x.numpy(), warmup=10, min_runs=30, min_seconds=seconds, repeats=5).to_dict()


def profile_device(device: str, backend: Backend, model: nn.Module, source: ModelConfig, batch_size: int,
                   out: str | Path, step: int = 8, token_points: int = 6, calibration_models: int = 16,
                   per_call_s: float = 0.03, seed: int = 0) -> DeviceProfile:
    """Measure the tables and calibration for `model`'s shape on `backend`; write the profile to `out`."""
    if step < 1 or token_points < 1 or batch_size < 1:
        raise SlimError("--step, --token-points and --batch-size must be >= 1")
    arch = arch_of(model)
    out = Path(out)
    partial = out.with_name(f".{out.stem}.partial.json")
    settings = {"backend": backend.describe(), "batch": batch_size, "step": step, "tokens": token_points,
                "model": model_signature(arch), "calibration_models": calibration_models}
    cache: dict = {}
    if partial.is_file():
        saved = read_json(partial, "partial profile")
        if saved.get("settings") == settings:
            cache = {k: tuple(v) for k, v in saved["cache"].items()}
            log(f"profile: resuming with {len(cache)} measurements already done")

    def save():
        write_json(partial, {"settings": settings, "cache": cache})

    t_start = time.perf_counter()
    meas = _Measurer(backend, batch_size, cache, save, per_call_s)
    model = nontrivial_(copy.deepcopy(model).cpu())
    blk = model.blocks[0]
    D, H, hd, M = arch.embed_dim, arch.num_heads, arch.head_dim, arch.mlp_dim
    ns = token_grid(arch, token_points)
    hs = list(range(1, H + 1))
    hd_grid = width_grid(hd, step)
    qkv_grid = width_grid(3 * H * hd, step)
    proj_grid = width_grid(H * hd, step)
    mlp_grid = width_grid(M, step)
    jobs = ([("rest", n) for n in ns] + [("qkv", n, w) for n in ns for w in qkv_grid]
            + [("proj", n, w) for n in ns for w in proj_grid] + [("mlp", n, m) for n in ns for m in mlp_grid]
            + [("core", n, h, q, v) for n in ns for h in hs for q in hd_grid for v in hd_grid] + [("stem_head",)])
    rng = random.Random(seed)
    # calibration models of evenly spread sizes, so that small and large models are both covered
    k = max(0, calibration_models - 1)
    sizes = [0.1 + 0.9 * i / max(1, k - 1) for i in range(k)]
    cal_specs = [SlimSpec.dense(source, arch)] + [random_spec(arch, source, rng, step, size=f) for f in sizes]
    with make_progress() as progress:
        task = progress.add_task("profile", total=len(jobs) + len(cal_specs), info=backend.name)
        for job in jobs:
            kind, *dims = job
            key = "/".join(map(str, job))
            if kind == "rest":
                meas.time(key, _Rest(blk), (dims[0], D))
            elif kind == "qkv":
                meas.time(key, nn.Linear(D, dims[1], bias=arch.qkv_bias), (dims[0], D))
            elif kind == "proj":
                meas.time(key, nn.Linear(dims[1], D), (dims[0], dims[1]))
            elif kind == "mlp":
                meas.time(key, _mlp(blk, dims[1]), (dims[0], D))
            elif kind == "core":
                n, h, q, v = dims
                meas.time(key, _core(arch, h, q, v), (n, h * (2 * q + v)))
            else:
                meas.time(key, _stem_head(model), (arch.in_chans, arch.img_size, arch.img_size),
                          subtract_overhead=False)
            progress.update(task, advance=1, info=f"{backend.name} {kind} {dims}")
        tables = _assemble(cache, ns, hs, hd_grid, qkv_grid, proj_grid, mlp_grid)
        raw_model = LatencyModel(_profile(device, backend, batch_size, arch, tables, {}, "", 0.0))
        points = []
        for i, spec in enumerate(cal_specs):
            key = f"calibration/{i}"
            if key not in cache:
                slim = build_slim(spec, model)
                t = measure_model(backend, slim, arch, batch_size)
                cache[key] = (t["median_ms"], t["spread"])
                save()
            points.append({"parts": raw_model.raw_parts(spec), "measured_ms": cache[key][0], "spread": cache[key][1]})
            progress.update(task, advance=1, info=f"{backend.name} whole model {i + 1}/{len(cal_specs)}")
    calibration = fit_calibration(points)
    warnings = []
    detected = backend.hardware().lower()
    if not any(tok in detected for tok in device.lower().replace("_", "-").split("-") if len(tok) >= 3):
        warnings.append(f"device name '{device}' does not name the detected hardware '{backend.hardware()}'")
    prof = _profile(device, backend, batch_size, arch, tables, calibration,
                    " ".join(shlex.quote(a) for a in ["slimdeploy", *sys.argv[1:]]),
                    time.perf_counter() - t_start + float(cache.get("_seconds", (0.0,))[0]), warnings)
    prof.model["step"] = step
    prof.measurements = sum(1 for k in cache if not k.startswith("calibration/"))
    prof.save(out)
    partial.unlink(missing_ok=True)
    return prof


def _profile(device, backend, batch, arch, tables, calibration, command, seconds, warnings=()):
    return DeviceProfile(device=device, hardware=backend.hardware(), backend=backend.name,
                         backend_version=backend.version(), precision=backend.precision, batch_size=batch,
                         threads=getattr(backend, "threads", None), model=model_signature(arch), tables=tables,
                         calibration=calibration,
                         created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                         command=command, seconds=round(seconds, 1), warnings=list(warnings))


def _assemble(cache, ns, hs, hd_grid, qkv_grid, proj_grid, mlp_grid) -> dict:
    def get(*key):
        return cache["/".join(map(str, key))]

    def table(axes, grid, fn, shape):
        raw = np.zeros(shape)
        spread = np.zeros(shape)
        for idx in np.ndindex(*shape):
            raw[idx], spread[idx] = fn(*idx)
        ms = raw
        if len(axes) > 1:  # monotone in every width axis
            for ax in range(1, len(axes)):
                ms = np.moveaxis(isotonic(np.moveaxis(ms, ax, -1)), -1, ax)
        return {"axes": axes, "grid": grid, "ms": np.round(ms, 5).tolist(), "raw_ms": np.round(raw, 5).tolist(),
                "spread": np.round(spread, 3).tolist()}

    return {
        "rest": table(["tokens"], {"tokens": ns}, lambda i: get("rest", ns[i]), (len(ns),)),
        "qkv": table(["tokens", "out"], {"tokens": ns, "out": qkv_grid}, lambda i, j: get("qkv", ns[i], qkv_grid[j]),
                     (len(ns), len(qkv_grid))),
        "proj": table(["tokens", "in"], {"tokens": ns, "in": proj_grid},
                      lambda i, j: get("proj", ns[i], proj_grid[j]), (len(ns), len(proj_grid))),
        "mlp": table(["tokens", "hidden"], {"tokens": ns, "hidden": mlp_grid},
                     lambda i, j: get("mlp", ns[i], mlp_grid[j]), (len(ns), len(mlp_grid))),
        "core": table(["tokens", "heads", "qk", "v"], {"tokens": ns, "heads": hs, "qk": hd_grid, "v": hd_grid},
                      lambda i, a, b, c: get("core", ns[i], hs[a], hd_grid[b], hd_grid[c]),
                      (len(ns), len(hs), len(hd_grid), len(hd_grid))),
        "stem_head": {"ms": round(get("stem_head")[0], 5), "spread": round(get("stem_head")[1], 3)},
    }


def fit_calibration(points: list[dict]) -> dict:
    """Fit measured = beta + sum_k coef[k] * parts[k] with coef >= 0, minimising relative errors
    (rows weighted by 1 / measured: a 1 ms miss matters more on a 10 ms model than on a 100 ms one).

    With fewer points than unknowns, one shared coefficient for every kind (alpha) is fitted.
    """
    kinds = sorted(points[0]["parts"])
    X = np.array([[p["parts"][k] for k in kinds] for p in points], dtype=np.float64)
    y = np.array([p["measured_ms"] for p in points], dtype=np.float64)
    w = 1.0 / y
    if len(points) >= len(kinds) + 3:
        coef, beta = _nnls_with_intercept(X, y, w)
    else:
        total = X.sum(1, keepdims=True)
        c, beta = (_nnls_with_intercept(total, y, w) if len(points) >= 2
                   else (np.array([y.sum() / total.sum()]), 0.0))
        coef = np.repeat(c, len(kinds))
    pred = X @ coef + beta
    err = np.abs(pred - y) / y
    return {"coef": {k: float(c) for k, c in zip(kinds, coef)}, "beta": float(beta), "points": points,
            "fit_median_abs_error": float(np.median(err)), "fit_max_abs_error": float(err.max())}


def _nnls_with_intercept(X: np.ndarray, y: np.ndarray, w: np.ndarray | None = None, iters: int = 20000
                         ) -> tuple[np.ndarray, float]:
    """min sum_i w_i^2 (X_i c + b - y_i)^2 with c >= 0 and b free (projected coordinate descent)."""
    w = np.ones_like(y) if w is None else w
    # the intercept is profiled out: weighted centring
    ww = w ** 2 / (w ** 2).sum()
    xm, ym = ww @ X, ww @ y
    Xc, yc = (X - xm) * w[:, None], (y - ym) * w
    scale = np.sqrt((Xc ** 2).sum(0))
    scale[scale == 0] = 1.0
    A = Xc / scale
    c = np.linalg.lstsq(A, yc, rcond=None)[0].clip(min=0)
    G, g = A.T @ A, A.T @ yc
    for _ in range(iters):
        prev = c.copy()
        for j in range(len(c)):
            if G[j, j] > 0:
                c[j] = max(0.0, c[j] + (g[j] - G[j] @ c) / G[j, j])
        if np.abs(c - prev).max() < 1e-12:
            break
    coef = c / scale
    return coef, float(ym - xm @ coef)


def load_profile_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
