"""`slimdeploy profile`: measure a device's latency tables and calibration (see model.py for how they are read).

Factorised, never every block combination: each piece of components.py on a grid of token counts (geometric, so
the few-token region where the solver goes is dense, plus an even spread) and widths on multiples of `step`, the
attention core over (tokens, heads, q) and (tokens, heads, v); each piece that touches the residual stream again at
narrower embedding widths, on a coarse sub-grid of tokens and widths (its ratio to the full width is what the model
reads). Each table is smoothed (tables.py: single spikes removed, then an isotonic fit), which removes timing
noise without hiding steps. Then whole models (draws.py) are measured to fit the calibration
(calibration.py). Pieces are timed in a shuffled order, so that a slow phase of a shared machine is noise spread
over every table (which the monotone fits smooth) rather than a bias of one table. Partial results are saved as
they come: an interrupted profile resumes where it stopped.

`--device local` profiles are measured on first use and cached under the user's profile folder, keyed by the
machine's fingerprint, the backend, the model's shape and the batch size.
"""

from __future__ import annotations

import copy
import datetime as dt
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..defaults import PROFILE
from ..errors import SlimError
from ..fileio import read_json, write_json
from ..models import arch_of
from ..progress import log, make_progress
from ..slim import build_slim
from ..types import Arch, DeviceProfile, ModelConfig, SlimSpec
from . import components, timing
from .backends import Backend
from .calibration import RANKING_TABLE, RANKINGS, fit_calibration, pair_record
from .draws import DRAWS, random_spec, ranked_twins, solver_specs
from .fingerprint import fingerprint_key
from .measure import export_deployed, measure_loaded
from .model import (
    AFFINE_FROM,
    UNSTEADY,
    LatencyModel,
    check_profile_fits,
    fingerprint_warning,
    model_signature,
    spec_sizes,
    steadiness_warning,
    user_profiles_dir,
)
from .tables import smoothed

METHOD = 13  # bump when what a table entry or a drawn whole model means: partials of another method are discarded
GPU_WORKING_SET = 64 << 20  # beyond a GPU's L2 (40-60 MB on A100/H100/H200)
# A chunk of whole models measured wider than +-UNSTEADY (model.py) is measured again: up to REMEASURE times in a
# profile, and no more after a re-measurement that stays wide (a machine busy throughout: every chunk measured three
# times would triple the calibration's time for nothing); a profile whose whole models stay that wide is loaded with
# a warning (steadiness_warning).
REMEASURE = 3


def token_grid(arch: Arch, points: int = 10) -> list[int]:
    """Token counts to measure (prefix included): a geometric spread of patch counts from 1 (dense where the
    solver goes) joined with an even spread (the quadratic attention core at many tokens), always all; and the
    prefix tokens alone, which a block keeps where the solver drops every patch (the 0.3x picks of fmnist-vit keep
    the class token alone in most blocks). Read by extrapolation from 2 and 3 tokens, one token cost twice what it
    does: on a Zen 5 EPYC a pick measured 0.044 x dense faster with 1 token than with 2 in its last five blocks,
    where the tables said 0.020, and was priced 7.7% slow."""
    p, n = arch.num_prefix_tokens, arch.num_patches
    if points <= 1 or n == 1:
        return [p + n]
    k = max(2, (points + 1) // 2)
    geo = {max(1, round(n ** (i / (k - 1)))) for i in range(k)}
    lin = {max(1, round(n * i / (points - k))) for i in range(1, points - k + 1)} if points > k else set()
    return ([p] if p else []) + [p + c for c in sorted(geo | lin | {n})]


def width_grid(limit: int, step: int) -> list[int]:
    """Widths to measure: multiples of `step` up to AFFINE_FROM (16) steps, then of 2 steps up to 32 more, and so
    on (a resolution of 1/16 to 1/8 of the width), always ending at `limit`. The model reads the matmul tables as
    lines where this grid turns coarse, so both take the turn from the same constant."""
    out, w, s = [], step, step
    while w <= limit:
        out.append(w)
        if w >= AFFINE_FROM * s:
            s *= 2
        w += s
    return out if out and out[-1] == limit else [*out, limit]


class PieceTimer:
    """Times pieces in context (see components.py): cold and warm (distinct copies, 2x L2 and L2/2 of weights),
    each interleaved with the per-call overhead of a graph of as many inputs and outputs; a cost is per copy.
    Results are cached by key (for resume)."""

    def __init__(self, backend: Backend, batch: int, working_set: int, warm: bool, cache: dict, save):
        self.backend, self.batch, self.working_set, self.warm = backend, batch, working_set, warm
        self.cache, self.save = cache, save
        self.bases: dict[tuple, object] = {}
        self.unsaved = 0

    def _load(self, module: nn.Module, shape: tuple[int, ...], k: int):
        """A session of K copies of the module (one export, repeated in ONNX)."""
        from ..export import onnx_bytes

        if self.backend.name == "torch":
            xs = tuple(torch.randn(self.batch, *shape) for _ in range(k))
            return self.backend.load_module(components.Copies(module, k), xs)
        one = onnx_bytes(components.nontrivial_(copy.deepcopy(module)).eval(), torch.randn(self.batch, *shape))
        return self.backend.load_onnx(components.replicate(one, k))

    def _base(self, shape: tuple[int, ...], k: int):
        if (shape, k) not in self.bases:
            self.bases[shape, k] = self._load(components.Base(), shape, k)
        return self.bases[shape, k]

    def time(self, key: str, module: nn.Module, shape: tuple[int, ...]) -> None:
        if key in self.cache:
            return
        weighted = components.weight_bytes(module) > 4 * 1024  # more than norms and biases
        k_cold = components.copies_for(module, self.working_set) if weighted else components.WARM_COPIES
        k_warm = components.copies_for(module, self.working_set // 4) if weighted else components.WARM_COPIES
        xs = tuple(np.random.default_rng(i).standard_normal((self.batch, *shape), dtype=np.float32)
                   for i in range(max(k_cold, k_warm)))
        runs = {"cold": (self._load(module, shape, k_cold), k_cold),
                "base_cold": (self._base(shape, k_cold), k_cold)}
        if weighted and self.warm:
            runs["warm"] = (self._load(module, shape, k_warm), k_warm)
            runs["base_warm"] = (self._base(shape, k_warm), k_warm)
        t = timing.measure({name: s.timed(xs[:k]) for name, (s, k) in runs.items()}, timing.COMPONENT)
        cold = max(0.0, (t["cold"].median_ms - t["base_cold"].median_ms) / k_cold)
        warm = max(0.0, (t["warm"].median_ms - t["base_warm"].median_ms) / k_warm) if "warm" in t else cold
        self.cache[key] = (cold, warm, t["cold"].rel_halfwidth)
        for name in ("cold", "warm"):
            if name in runs:
                runs[name][0].close()
        self._count()

    def whole(self, key: str, module: nn.Module, shape: tuple[int, ...]) -> None:
        """A module timed alone, per-call overhead included (the stem and head: a model pays it once)."""
        if key not in self.cache:
            x = torch.randn(self.batch, *shape)
            with self.backend.load_module(components.nontrivial_(module).eval(), x) as s:
                t = s.time(x.numpy(), timing.COMPONENT)
            self.cache[key] = (t.median_ms, t.median_ms, t.rel_halfwidth)
            self._count()

    def _count(self):
        self.unsaved += 1
        if self.unsaved >= 50:
            self.save()
            self.unsaved = 0


def _coarse(values: list[int]) -> list[int]:
    """First, middle and last: the sub-grid the embedding tables are measured on."""
    return sorted({values[0], values[len(values) // 2], values[-1]})


EMBED_PIECES = {"rest": [], "const": [], "gather": [], "qkv": ["out"], "proj": ["in"], "mlp": ["hidden"]}


def jobs_for(arch: Arch, step: int, token_points: int) -> tuple[list[tuple], dict]:
    """Every piece to time, and the grids of the tables."""
    H, hd = arch.num_heads, arch.head_dim
    grids = {"tokens": token_grid(arch, token_points), "heads": list(range(1, H + 1)), "hd": width_grid(hd, step),
             "qkv": width_grid(3 * H * hd, step), "proj": width_grid(H * hd, step),
             "mlp": width_grid(arch.mlp_dim, step), "embed": components.embed_grid(arch.embed_dim, step)}
    for k in ("tokens", "qkv", "proj", "mlp"):
        grids[f"{k}_coarse"] = _coarse(grids[k])
    ns, nc, E = grids["tokens"], grids["tokens_coarse"], grids["embed"]
    embed_jobs = ([(f"embed.{k}", n, e) for k in ("rest", "const", "gather") for n in nc for e in E]
                  + [(f"embed.{k}", n, w, e) for k in ("qkv", "proj", "mlp") for n in nc
                     for w in grids[f"{k}_coarse"] for e in E] + [("embed.stem_head", e) for e in E])
    jobs = ([("rest", n) for n in ns] + [("const", n) for n in ns] + [("gather", n) for n in ns]
            + [(k, n_in, n) for k in RANKINGS for n_in in nc[1:] for n in ns if arch.num_prefix_tokens < n < n_in]
            + [("qkv", n, w) for n in ns for w in grids["qkv"]] + [("proj", n, w) for n in ns for w in grids["proj"]]
            + [("mlp", n, m) for n in ns for m in grids["mlp"]]
            + [("core_q", n, h, q) for n in ns for h in grids["heads"] for q in grids["hd"]]
            + [("core_v", n, h, v) for n in ns for h in grids["heads"] for v in grids["hd"]]
            + [("stem_head", n) for n in ns]
            + embed_jobs)
    return jobs, grids


def run_job(timer: PieceTimer, job: tuple, arch: Arch, model) -> None:
    kind, *dims = job
    key = "/".join(map(str, job))
    blk = model.blocks[0]
    if kind.startswith("embed."):
        kind, e = kind.removeprefix("embed."), dims[-1]
        if kind == "stem_head":
            timer.whole(key, components.stem_head(model, e), (arch.in_chans, arch.img_size, arch.img_size))
        else:
            timer.time(key, *components.build(kind, arch, blk, (dims[0], arch.num_tokens) if kind == "gather"
                                              else tuple(dims[:-1]), embed=e))
    elif kind == "stem_head":  # at the tokens the last block keeps
        timer.whole(key, components.stem_head(model, tokens=dims[0]), (arch.in_chans, arch.img_size, arch.img_size))
    elif kind == "gather":
        timer.time(key, *components.build(kind, arch, blk, (dims[0], arch.num_tokens)))
    elif kind in RANKINGS:  # (tokens in, tokens kept)
        timer.time(key, *components.build(kind, arch, blk, (dims[1], dims[0])))
    elif kind in ("core_q", "core_v"):
        n, h, w = dims
        q, v = (w, arch.head_dim) if kind == "core_q" else (arch.head_dim, w)
        timer.time(key, *components.build("core", arch, blk, (n, h, q, v)))
    else:
        timer.time(key, *components.build(kind, arch, blk, tuple(dims)))


def as_table(axes: list[str], grid: dict[str, list[int]], raw: np.ndarray) -> dict:
    """A profile table: its axes and grid, the measurements smoothed (tables.py: what the model reads) and as
    measured."""
    return {"axes": axes, "grid": grid, "ms": np.round(smoothed(raw), 6).tolist(), "raw_ms": np.round(raw, 6).tolist()}


def assemble(cache: dict, grids: dict, with_warm: bool, prefix: int) -> dict:
    """The tables from the cached measurements (smoothed; the raw medians kept beside); `warm` holds the
    warm-cache tables of the pieces with weights, when measured."""
    def table(name, axes, keys, which=0):
        shape = tuple(len(grids[a]) for a in keys)
        raw = np.zeros(shape)
        for idx in np.ndindex(*shape):
            raw[idx] = cache["/".join(map(str, (name, *(grids[a][i] for a, i in zip(keys, idx)))))][which]
        return as_table(axes, {ax: grids[k] for ax, k in zip(axes, keys)}, raw)

    def ranking_table(name):
        """Over (tokens in, tokens kept): linear in what is ranked (on the coarse token grid: scoring and TopK grow
        smoothly with it; the full grid squared took DeiT-S's profile to 628 s against 528 s), and linear in what is
        kept. A ranking keeps fewer than it gets; where the grid asks for more, the entry is that of the most it can
        keep (the row of the fewest tokens in, which keeps nothing, is the next row's). Keeping the prefix alone
        (no patch to rank) is priced as keeping one patch: an upper bound, not measured."""
        ns, nin = grids["tokens"], grids["tokens_coarse"]
        raw = np.full((len(nin), len(ns)), np.nan)
        for i, n_in in enumerate(nin):
            timed = [j for j, n in enumerate(ns) if prefix < n < n_in]  # what jobs_for times: a missing one raises
            if timed:
                raw[i, timed] = [cache[f"{name}/{n_in}/{ns[j]}"][0] for j in timed]
                raw[i, :timed[0]] = raw[i, timed[0]]  # the prefix alone (nothing ranked): as keeping one patch
                raw[i, timed[-1] + 1:] = raw[i, timed[-1]]  # more than it gets: the most it can keep
        for i in reversed(range(len(nin))):  # a row that keeps nothing it ranks: the next row's
            if np.isnan(raw[i]).all():
                raw[i] = raw[i + 1] if i + 1 < len(nin) else 0.0
        out = as_table(["tokens", "kept"], {"tokens": nin, "kept": ns}, raw)
        return {**out, "with_prior": True} if name == RANKING_TABLE["attentive"] else out

    embed = {f"embed.{k}": table(f"embed.{k}", ["tokens", *axes, "embed"],
                                 ["tokens_coarse", *[f"{k}_coarse" for _ in axes], "embed"])
             for k, axes in EMBED_PIECES.items()}
    stem = np.array([cache[f"embed.stem_head/{e}"][0] for e in grids["embed"]])
    embed["embed.stem_head"] = as_table(["embed"], {"embed": grids["embed"]}, stem)
    warm = {"qkv": table("qkv", ["tokens", "out"], ["tokens", "qkv"], 1),
            "proj": table("proj", ["tokens", "in"], ["tokens", "proj"], 1),
            "mlp": table("mlp", ["tokens", "hidden"], ["tokens", "mlp"], 1)}
    return {"warm": warm if with_warm else {},
        "rest": table("rest", ["tokens"], ["tokens"]),
        "const": table("const", ["tokens"], ["tokens"]),
        "gather": table("gather", ["tokens"], ["tokens"]),
        **{k: ranking_table(k) for k in RANKINGS},
        "qkv": table("qkv", ["tokens", "out"], ["tokens", "qkv"]),
        "proj": table("proj", ["tokens", "in"], ["tokens", "proj"]),
        "mlp": table("mlp", ["tokens", "hidden"], ["tokens", "mlp"]),
        "core_q": table("core_q", ["tokens", "heads", "qk"], ["tokens", "heads", "hd"]),
        "core_v": table("core_v", ["tokens", "heads", "v"], ["tokens", "heads", "hd"]),
        "stem_head": table("stem_head", ["tokens"], ["tokens"]),
        **embed,
    }


class WholeModels:
    """The calibration's whole models, measured beside the dense model (cached as they come, like the pieces).

    Each is exported as deployed; all the exports run first, in parallel processes (measure.export_deployed),
    then the chunks are timed from the files, nothing else running: exporting one chunk after another took
    more than half of a deit_small profile (about 6 s a model, with the dense model again in every chunk)."""

    def __init__(self, backend: Backend, model: nn.Module, arch: Arch, batch: int, cache: dict, save, advance):
        self.backend, self.model, self.arch, self.batch = backend, model, arch, batch
        self.cache, self.save, self.advance = cache, save, advance
        self.files: dict[str, Path] = {}
        self.remeasures = REMEASURE  # left in this profile

    def _export(self, models: dict[str, SlimSpec], folder: Path) -> None:
        """Every model still to be measured, and the dense model, exported into `folder` (ONNX backends)."""
        if self.backend.name == "torch" or not models:
            return
        self.advance(0, f"exporting {len(models) + 1} whole models")
        start = time.perf_counter()
        self.files = export_deployed(self.model, {"dense": None, **models}, self.arch, self.batch, folder)
        log(f"profile: {len(self.files)} whole models exported in {time.perf_counter() - start:.0f} s")

    def _measure(self, models: dict[str, SlimSpec], protocol: timing.Protocol) -> dict[str, timing.Measurement]:
        def module(k):  # built only where there is no exported file (the torch backend)
            if k in self.files:
                return None
            return self.model if k == "dense" else build_slim(models[k], self.model)
        # loaded in the order the models were given, the dense model first, as measure_models does
        return measure_loaded({k: (self.backend, module(k), self.files.get(k)) for k in ["dense", *models]},
                              self.arch, self.batch, protocol)

    def _measure_chunk(self, chunk: dict[str, SlimSpec]) -> None:
        """Each model's ratio to dense into the cache. A chunk whose intervals came out wide (a busy phase of the
        machine: on a 2-core EPYC one chunk of a profile read +-14..21% while the others read +-1..4%, and the
        fit's leave-one-out error on its models reached 14%) is measured again while the profile has
        re-measurements left (see REMEASURE), and each model keeps its narrowest measurement."""
        retried = False
        while True:
            t = self._measure(chunk, timing.CALIBRATION)
            for k in chunk:
                r = timing.ratio(t[k], t["dense"])
                if k not in self.cache or r.rel_halfwidth < self.cache[k][1]:
                    self.cache[k] = (r.median_ms, r.rel_halfwidth, t["dense"].median_ms)
            wide = float(np.median([self.cache[k][1] for k in chunk]))
            if wide <= UNSTEADY:
                return
            if retried or not self.remeasures:  # busy throughout: more would only cost time
                self.remeasures = 0
                return
            log(f"profile: whole models measured +-{wide:.0%} (median 95% interval; the machine is busy?): "
                "measuring them again")
            self.remeasures -= 1
            retried = True

    def points(self, raw: LatencyModel, specs: list[SlimSpec], drawn: list[str],
               twins: list[tuple[SlimSpec, SlimSpec]]) -> tuple[list[dict], list[dict]]:
        """Calibration points of the specs (the first is the dense model; drawn: what each is, "dense", "random" or
        "solver") and of the twins ("twin"), and the twins' pairs."""
        cache = self.cache
        # in chunks, each with the dense model: a shared machine's speed drifts by ~6% over minutes, so each
        # model is recorded as its ratio to dense (paired rounds) times one dense reference
        chunks = [{f"calibration/{i}": s for i, s in enumerate(specs[start:start + 7], start)}
                  for start in range(1, len(specs), 7)]
        # ranked twins beside their static twins, four pairs a chunk (the profile's default count, so one dense
        # measurement), by the whole-model protocol: the difference (a few percent of the model) must stand out
        # of the noise
        pair_chunks = [{f"pair/{j}": pair for j, pair in enumerate(twins[start:start + 4], start)}
                       for start in range(0, len(twins), 4)]
        todo = {k: s for c in chunks if not all(k in cache for k in c) for k, s in c.items()}
        todo |= {f"{k}/{kind}": s for c in pair_chunks if not all(k in cache for k in c)
                 for k, pair in c.items() for kind, s in zip(("ranked", "static"), pair)}
        with tempfile.TemporaryDirectory(prefix="slimdeploy-profile-") as folder:
            self._export(todo, Path(folder))
            start = time.perf_counter()
            for chunk in chunks:
                if not all(k in cache for k in chunk):
                    self._measure_chunk(chunk)
                    self.save()
                self.advance(len(chunk), "whole models")
            for chunk in pair_chunks:
                if not all(k in cache for k in chunk):
                    t = self._measure({f"{k}/{kind}": s for k, pair in chunk.items()
                                       for kind, s in zip(("ranked", "static"), pair)}, timing.MODEL)
                    for k in chunk:
                        r = timing.ratio(t[f"{k}/ranked"], t["dense"])
                        s = timing.ratio(t[f"{k}/static"], t["dense"])
                        paired = timing.ratio(t[f"{k}/ranked"], t[f"{k}/static"])
                        cache[k] = (r.median_ms, r.rel_halfwidth, s.median_ms, s.rel_halfwidth, paired.median_ms,
                                    t["dense"].median_ms)
                    self.save()
                self.advance(2 * len(chunk), "ranked twins")
            if todo:
                log(f"profile: whole models timed in {time.perf_counter() - start:.0f} s")
        measured = [k for k in cache if k.startswith(("calibration/", "pair/"))]
        dense_ref = float(np.median([cache[k][-1] for k in measured]))

        def point(s: SlimSpec, over_dense: float, halfwidth: float, kind: str = "twin") -> dict:
            return {"features": raw.for_tokens(s.token_mode).features(spec_sizes(s), self.arch.num_tokens,
                                                                      s.embed_dim),
                    "measured_ms": over_dense * dense_ref, "halfwidth": halfwidth, "widths": s.summary(),
                    "token_mode": s.token_mode, "drawn": kind}
        points = [point(s, *(cache[f"calibration/{i}"][:2] if i else (1.0, 0.0)), kind)
                  for i, (s, kind) in enumerate(zip(specs, drawn, strict=True))]
        pairs = []
        for j, (ranked, static) in enumerate(twins):
            r, r_hw, s, s_hw, paired, _ = cache[f"pair/{j}"]
            points += [{**point(ranked, r, r_hw), "ranked_twin": True}, point(static, s, s_hw)]
            pairs.append(pair_record(points[-2]["features"], points[-1]["features"], ranked.token_mode,
                                     s * dense_ref, paired))
        return points, pairs


def profile_device(device: str, backend: Backend, model: nn.Module, source: ModelConfig, batch_size: int,
                   out: str | Path, step: int = PROFILE["step"], token_points: int = PROFILE["token_points"],
                   calibration_models: int = PROFILE["calibration_models"], seed: int = 0) -> DeviceProfile:
    """Measure the tables and calibration for `model`'s shape on `backend`; write the profile to `out`."""
    if step < 1 or token_points < 1 or batch_size < 1 or calibration_models < 1:
        raise SlimError("--step, --token-points, --batch-size and --calibration-models must be >= 1")
    arch = arch_of(model)
    out = Path(out)
    partial = out.with_name(f".{out.stem}.partial.json")
    model = components.nontrivial_(copy.deepcopy(model).cpu().eval())
    gpu = backend.fingerprint().get("kind") == "gpu"
    l2 = components.l2_bytes()
    working_set = GPU_WORKING_SET if gpu else 2 * l2
    # warm tables only where a slim model can fit in L2 (never for DeiT-S's 85 MB of block weights)
    warm = not gpu and sum(components.weight_bytes(b) for b in model.blocks) < 16 * l2
    settings = {"method": METHOD, "backend": backend.describe(), "batch": batch_size, "step": step,
                "tokens": token_points, "model": model_signature(arch), "calibration_models": calibration_models,
                "seed": seed, "working_set": working_set, "warm": warm}
    cache: dict = {}
    elapsed_before = 0.0
    if partial.is_file():
        saved = read_json(partial, "partial profile")
        if saved.get("settings") == settings:
            cache = {k: tuple(v) for k, v in saved["cache"].items()}
            elapsed_before = float(saved.get("seconds", 0.0))
            log(f"profile: resuming with {len(cache)} measurements already done")
    t_start = time.perf_counter()

    def save():
        write_json(partial, {"settings": settings, "cache": cache,
                             "seconds": elapsed_before + time.perf_counter() - t_start})

    timer = PieceTimer(backend, batch_size, working_set, warm, cache, save)
    jobs, grids = jobs_for(arch, step, token_points)
    random.Random(seed).shuffle(jobs)  # drift of the machine's speed spreads over every table as noise
    # random structures and the solver's picks, in the share defaults.PROFILE gives (draws.py says why)
    n_random = round(calibration_models * PROFILE["random_share"])
    n_ranked = max(2, calibration_models // 10)
    with make_progress() as progress:
        task = progress.add_task("profile", total=len(jobs) + calibration_models + 2 * n_ranked, info=backend.name)
        start = time.perf_counter()
        for job in jobs:
            run_job(timer, job, arch, model)
            progress.update(task, advance=1, info=f"{backend.name} {job[0]} {job[1:]}")
        save()
        log(f"profile: {len(jobs)} pieces in {time.perf_counter() - start:.0f} s")
        tables = assemble(cache, grids, warm, arch.num_prefix_tokens)
        raw = LatencyModel(_profile(device, backend, batch_size, arch, tables, {}, "", 0.0, step))
        rng = random.Random(seed)
        specs = [SlimSpec.dense(source, arch)]
        specs += [random_spec(arch, source, rng, step, size=0.1 + 0.9 * i / max(1, n_random - 1),
                              embed_widths=grids["embed"])
                  for i in range(n_random)]
        specs += solver_specs(raw, arch, source, calibration_models - len(specs), seed)
        drawn = ["dense"] + ["random"] * n_random + ["solver"] * (len(specs) - 1 - n_random)
        # twins of what selection picks in the ranked modes first (few tokens, every channel), then of the static
        # picks: where selection goes (an early ranking from every token, in a 0.3x structure of the shifted set,
        # cost twice what later and smaller ones do)
        ranked = solver_specs(raw, arch, source, 2 * n_ranked, seed, ranked=True)  # some keep every token
        twins = ranked_twins(ranked + specs[1 + n_random:] + specs[1:1 + n_random], n_ranked)
        progress.update(task, total=len(jobs) + len(specs) + 2 * len(twins), advance=1)  # the dense model: below
        whole = WholeModels(backend, model, arch, batch_size, cache, save, lambda n, info: progress.update(
            task, advance=n, info=f"{backend.name} {info}"))
        points, pairs = whole.points(raw, specs, drawn, twins)
    prof = _profile(device, backend, batch_size, arch, tables, fit_calibration(points, pairs),
                    " ".join(shlex.quote(a) for a in ["slimdeploy", *sys.argv[1:]]),
                    elapsed_before + time.perf_counter() - t_start, step)
    prof.measurements = len(cache)
    prof.save(out)
    partial.unlink(missing_ok=True)
    return prof


def _profile(device, backend, batch, arch, tables, calibration, command, seconds, step: int) -> DeviceProfile:
    return DeviceProfile(device=device, hardware=backend.hardware(), backend=backend.name,
                         backend_version=backend.version(), precision=backend.precision, batch_size=batch,
                         threads=backend.threads, model={**model_signature(arch), "step": step}, tables=tables,
                         calibration=calibration, fingerprint=backend.fingerprint(),
                         torch_device=str(getattr(backend, "device", "")) if backend.name == "torch" else None,
                         torch_mode=getattr(backend, "mode", None) if backend.name == "torch" else None,
                         created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                         command=command, seconds=round(seconds, 1), draws=DRAWS)


# ---- resolving --device ----------------------------------------------------------------------------

def local_profile_path(backend: Backend, arch: Arch, batch: int, profiles_dir: str | Path | None = None) -> Path:
    """Where the cached local profile of this machine, backend, precision, model shape and batch size lives."""
    folder = Path(profiles_dir).expanduser() if profiles_dir else user_profiles_dir()
    shape = fingerprint_key(model_signature(arch))
    precision = "" if backend.precision == "fp32" else f"-{backend.precision}"
    return folder / f"local-{backend.name}-{fingerprint_key(backend.fingerprint())}-{shape}-b{batch}{precision}.json"


def is_current(prof: DeviceProfile) -> bool:
    """Whether a cached profile has every table and calibration term this version prices with: the rankings over
    the tokens they get (attentive ones with the positions' prior), the embedding widths, the per-ranking costs
    measured on paired twins, whole models drawn as draws.py does now, the head over the tokens it gets, and
    tables down to the prefix tokens alone."""
    t = prof.tables
    return (all(len(t.get(k, {}).get("axes", [])) == 2 for k in RANKINGS) and "embed.qkv" in t
            and "pairs" in (prof.calibration or {}) and t[RANKING_TABLE["attentive"]].get("with_prior", False)
            and prof.draws >= DRAWS and "axes" in t.get("stem_head", {})
            and t["rest"]["grid"]["tokens"][0] <= max(1, int(prof.model.get("num_prefix_tokens", 0))))


def load_latency_model(device: str, model: nn.Module, source: ModelConfig, backend: Backend | None = None,
                       batch_size: int = 1, profiles_dir: str | Path | None = None, precision: str | None = None
                       ) -> tuple[LatencyModel, list[str]]:
    """The latency model for --device: 'local' measures this machine once (cached), a name or path loads a
    profile (refused when it was measured at another precision than `precision`). Returns it with warnings (a
    profile measured on another machine says so)."""
    from .backends import get_backend

    arch = arch_of(model)
    if device == "local":
        backend = backend or get_backend("ort-cpu", precision=precision or "fp32")
        path = local_profile_path(backend, arch, batch_size, profiles_dir)
        cached = DeviceProfile.load(path) if path.is_file() else None
        stale = cached is not None and not is_current(cached)
        if stale:  # kept until the new one is written
            log(f"the cached profile {path} predates the ranking tables over the tokens they get (or with the "
                "positions' prior), the embedding tables, the calibration of rankings, a calibration drawn mostly "
                "from the solver's picks, the head timed at the tokens it gets or the tables at the prefix tokens "
                "alone: measuring this machine again")
        if stale or not path.is_file():
            log(f"profiling this machine for {source.name} on {backend.name} (once; cached in {path})")
            profile_device("local", backend, model, source, batch_size, path)
        lm = LatencyModel(DeviceProfile.load(path), path=path.resolve())
    else:
        lm = LatencyModel.load(device, profiles_dir)
        check_profile_fits(lm.profile, arch, precision=precision)
    p = lm.profile
    busy = steadiness_warning(p)
    try:
        here = (backend or get_backend(p.backend, threads=p.threads, precision=p.precision,
                                       torch_device=p.torch_device or "auto",
                                       torch_mode=p.torch_mode or "eager")).fingerprint()
    except SlimError as e:  # the profile's backend cannot run here: nothing to compare with
        return lm, [f"profile '{p.device}' is for {p.backend}, which cannot run here ({e}): its predictions "
                    "cannot be checked on this machine", *filter(None, [busy])]
    return lm, [w for w in (fingerprint_warning(p, here), busy) if w]


def fold_runs(profile_path: str | Path, run_dirs: list[str | Path]) -> DeviceProfile:
    """Fold closed-loop measurements of runs (their select.json) back into a profile (see fold_rounds)."""
    from ..fileio import read_json

    rounds = [{**row, "from": str(run)} for run in run_dirs
              for row in read_json(Path(run) / "select.json", "select record").get("rounds") or [] if "sizes" in row]
    return fold_rounds(profile_path, rounds)


def fold_rounds(profile_path: str | Path, rounds: list[dict]) -> DeviceProfile:
    """Closed-loop rounds join the profile's calibration points (as their measured ratio to dense, times the
    profile's dense latency) and the calibration is fitted again (the tables stay). The loop measures exactly
    where selection goes, so the next selection on this machine starts from a model that has seen it. The
    profile file is rewritten atomically."""
    if not rounds:
        raise SlimError("no closed-loop measurements to fold in: run select with --verify-latency first")
    path = Path(profile_path)
    prof = DeviceProfile.load(path)
    lm = LatencyModel(prof)
    n_tokens = int(prof.model["num_tokens"])
    points = list(prof.calibration.get("points", []))
    if not points:
        raise SlimError(f"profile {path} has no calibration points to fold into")
    dense_ref = points[0]["measured_ms"]  # the dense model; every point is its ratio to dense times this
    for row in rounds:
        mode, embed = row.get("token_mode", "static"), row.get("embed")
        points.append({"features": lm.for_tokens(mode).features([tuple(s) for s in row["sizes"]], n_tokens, embed),
                       "measured_ms": row["over_dense"] * dense_ref, "halfwidth": row.get("y_halfwidth"),
                       "widths": row["sizes"], "embed": embed, "token_mode": mode,
                       "from": row.get("from", "closed loop")})
    prof.calibration = fit_calibration(points, prof.calibration.get("pairs"))
    prof.warnings = [*prof.warnings, f"calibration refitted with {len(rounds)} closed-loop measurements"]
    prof.save(path)
    return prof
