"""Whole models timed as they are deployed: exported the way `slimdeploy export` does, loaded on the backend,
and measured together by the one protocol (interleaved rounds), so ratios between them are paired."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..progress import log
from ..types import Arch, SlimSpec
from . import timing
from .backends import Backend, Session


def example_input(arch: Arch, batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, arch.in_chans, arch.img_size, arch.img_size),
                                                       dtype=np.float32)


def deployed_session(backend: Backend, model: nn.Module, arch: Arch, batch: int, onnx: str | Path | None = None,
                     copies: int = timing.MODEL.sessions) -> list[Session]:
    """Sessions (`copies`, loaded apart) of the model as deployed: the given ONNX file, else an export at the
    fixed batch size."""
    if backend.name == "torch":
        return [backend.load_module(model.eval(), torch.as_tensor(example_input(arch, batch)))]
    if onnx is not None:
        return [backend.load_onnx(Path(onnx)) for _ in range(copies)]
    from ..export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "m.onnx", (arch.in_chans, arch.img_size, arch.img_size), batch)
        return [backend.load_onnx(path) for _ in range(copies)]


def export_deployed(model: nn.Module, specs: dict[str, SlimSpec | None], arch: Arch, batch: int,
                    folder: str | Path, workers: int | None = None, done=None) -> dict[str, Path]:
    """Export `model` pruned to each spec (None: the dense model) as `slimdeploy export` does, into `folder`, in
    up to `workers` processes (default: one per core, at most 4): the dynamo exporter and onnxslim are
    single-threaded Python and take 5-7 s for a deit_small, so a profile's 40 whole models spent most of their
    time exporting. Nothing may be timed meanwhile: the exports use every core. done(name) is called as each
    file is written."""
    folder = Path(folder)
    jobs = {name: folder / f"{i}.onnx" for i, name in enumerate(specs)}
    workers = max(1, min(workers or min(4, os.cpu_count() or 1), len(jobs)))
    left = dict(jobs)
    if workers > 1:
        ctx = multiprocessing.get_context("spawn")  # a forked torch can deadlock in its thread pools
        try:
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_exporter,
                                     initargs=(model, arch, batch, 1)) as pool:
                futures = {name: pool.submit(_export_one, specs[name], path) for name, path in jobs.items()}
                for name, f in futures.items():
                    f.result()
                    del left[name]
                    if done:
                        done(name)
        except BrokenProcessPool:  # e.g. a script without `if __name__ == "__main__":`, which spawn re-runs
            log(f"export: worker processes failed to start; exporting the {len(left)} models left in this "
                "process (slower)")
    if left:
        _init_exporter(model, arch, batch, threads=None)
        for name, path in left.items():
            _export_one(specs[name], path)
            if done:
                done(name)
    return jobs


_EXPORTER: dict = {}


def _init_exporter(model: nn.Module, arch: Arch, batch: int, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    _EXPORTER.update(model=model.eval(), arch=arch, batch=batch)


def _export_one(spec: SlimSpec | None, path: Path) -> None:
    from ..export import export_onnx
    from ..slim import build_slim

    model, arch = _EXPORTER["model"], _EXPORTER["arch"]
    export_onnx(model if spec is None else build_slim(spec, model), path,
                (arch.in_chans, arch.img_size, arch.img_size), _EXPORTER["batch"])


def close_all(sessions) -> None:
    for group in sessions.values() if isinstance(sessions, dict) else [sessions]:
        for s in group if isinstance(group, list) else [group]:
            s.close()


def measure_sessions(sessions: dict[str, Session | list[Session]], arch: Arch, batch: int,
                     protocol: timing.Protocol = timing.MODEL) -> dict[str, timing.Measurement]:
    x = example_input(arch, batch)
    return timing.measure({name: [s.timed(x) for s in group] if isinstance(group, list) else group.timed(x)
                           for name, group in sessions.items()}, protocol)


def export_first(backend: Backend, models: dict[str, nn.Module], arch: Arch, batch: int, folder: str | Path
                 ) -> dict[str, Path]:
    """Every model exported as deployed into `folder` before any is loaded, by a worker process kept for the
    life of this one (nothing for the torch backend).

    An export in the measuring process leaves its memory in another state for each model loaded after it. The
    same dense model loaded first and last in one chunk, six slim models between (fmnist-vit, a 2-core EPYC,
    benchmarks/protocol_checks.py load-order): last / first 0.969 at the median with each model exported then
    loaded in turn (12 of 12 chunks under 0.99), 0.979 with every export in this process before the loads (9 of
    12), 0.993 with the exports in worker processes (2 of 8). Where a worker cannot run (a script without a main
    guard, a model that does not pickle), the exports run here, with one line that says so."""
    if backend.name == "torch":
        return {}
    folder = Path(folder)
    shape = (arch.in_chans, arch.img_size, arch.img_size)
    jobs = {name: folder / f"{name.replace('/', '_')}.onnx" for name in models}
    try:
        futures = {name: _worker().submit(_export_module, models[name], path, shape, batch)
                   for name, path in jobs.items()}
        for f in futures.values():
            f.result()
    except (BrokenProcessPool, pickle.PicklingError, TypeError, AttributeError) as e:
        _drop_worker()
        log(f"export: the export worker failed ({type(e).__name__}); exporting in this process")
        for name, path in jobs.items():
            _export_module(models[name], path, shape, batch)
    return jobs


_WORKER: list[ProcessPoolExecutor] = []


def _worker() -> ProcessPoolExecutor:
    """One process that exports for this one: spawned on first use (a few seconds), then kept."""
    if not _WORKER:
        ctx = multiprocessing.get_context("spawn")
        _WORKER.append(ProcessPoolExecutor(1, mp_context=ctx, initializer=torch.set_num_threads, initargs=(1,)))
    return _WORKER[0]


def _drop_worker() -> None:
    if _WORKER:
        _WORKER.pop().shutdown(wait=False, cancel_futures=True)


def _export_module(model: nn.Module, path: Path, shape: tuple[int, int, int], batch: int) -> Path:
    from ..export import export_onnx

    return export_onnx(model, path, shape, batch)


def measure_models(backend: Backend, models: dict[str, nn.Module], arch: Arch, batch: int,
                   protocol: timing.Protocol = timing.MODEL) -> dict[str, timing.Measurement]:
    """Export and time the models together (interleaved); the models need trained or nontrivial_ weights."""
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = export_first(backend, models, arch, batch, tmp)
        try:
            for name, m in models.items():
                sessions[name] = deployed_session(backend, m, arch, batch, onnx=files.get(name),
                                                  copies=protocol.sessions)
            return measure_sessions(sessions, arch, batch, protocol)
        finally:
            close_all(sessions)


class SpecMeasurer:
    """Measures structures pruned from `model`, each call interleaved with the dense model (on the `reference`
    backend: fp32 when structures are measured at int8): the closed loop's and the benchmarks' measurement.

    Every call exports the dense model and loads fresh sessions of it, as verify does, every export before any
    load (export_first): where a session's memory lands moves a small model's latency by several percent, and it
    depends on what the process did before loading (measured on a 2-core Xeon: dense sessions loaded from a file
    kept since the start of the loop gave slim/dense ratios 4-7% under verify's, every time). The dense
    reference is the dense model itself, not the searched weights: weight values can change latency on a CPU
    (masks searched to near zero leave denormal weights, which run slower)."""

    def __init__(self, backend: Backend, model: nn.Module, arch: Arch, batch: int, dense: nn.Module | None = None,
                 reference: Backend | None = None):
        self.backend, self.model, self.arch, self.batch = backend, model.eval(), arch, batch
        self.reference = reference or backend
        self.dense_model = (dense if dense is not None else model).eval()

    def __call__(self, specs: list, long: bool = False) -> tuple[timing.Measurement, list[timing.Measurement]]:
        from ..slim import build_slim

        slims = {str(i): build_slim(s, self.model) for i, s in enumerate(specs)}
        sessions = {}
        with tempfile.TemporaryDirectory() as tmp:
            files = {**export_first(self.backend, slims, self.arch, self.batch, tmp),
                     **export_first(self.reference, {"dense": self.dense_model}, self.arch, self.batch, tmp)}
            try:  # the structures first, then the dense model: the order in which verify loads them
                for name, m in [*slims.items(), ("dense", self.dense_model)]:
                    backend = self.reference if name == "dense" else self.backend
                    sessions[name] = deployed_session(backend, m, self.arch, self.batch, onnx=files.get(name))
                t = measure_sessions(sessions, self.arch, self.batch, timing.MODEL_LONG if long else timing.MODEL)
            finally:
                close_all(sessions)
        return t["dense"], [t[str(i)] for i in range(len(specs))]
