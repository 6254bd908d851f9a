"""Whole models timed as they are deployed: exported the way `slimdeploy export` does, loaded on the backend,
and measured together by the one protocol (interleaved rounds), so ratios between them are paired."""

from __future__ import annotations

import copy
import multiprocessing
import os
import pickle
import tempfile
from collections.abc import Callable
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


def close_all(sessions) -> None:
    for group in sessions.values() if isinstance(sessions, dict) else [sessions]:
        for s in group if isinstance(group, list) else [group]:
            s.close()


def measure_sessions(sessions: dict[str, Session | list[Session]], arch: Arch, batch: int,
                     protocol: timing.Protocol = timing.MODEL) -> dict[str, timing.Measurement]:
    x = example_input(arch, batch)
    return timing.measure({name: [s.timed(x) for s in group] if isinstance(group, list) else group.timed(x)
                           for name, group in sessions.items()}, protocol)


def export_deployed(model: nn.Module, specs: dict[str, SlimSpec | None], arch: Arch, batch: int,
                    folder: str | Path, done=None) -> dict[str, Path]:
    """`model` pruned to each spec (None: the dense model) exported as `slimdeploy export` does into `folder`,
    by the export workers (one per core, at most 4): the dynamo exporter and onnxslim are single-threaded
    Python and take 5-7 s for a deit_small, so a profile's 40 whole models spent most of their time exporting.
    Nothing may be timed meanwhile: the exports use every core. done(name) is called as each file is written."""
    from ..slim import build_slim

    models = {name: model if spec is None else build_slim(spec, model) for name, spec in specs.items()}
    return _export_all(models, {name: Path(folder) / f"{i}.onnx" for i, name in enumerate(specs)}, arch, batch,
                       done)


def export_first(backend: Backend, models: dict[str, nn.Module], arch: Arch, batch: int, folder: str | Path
                 ) -> dict[str, Path]:
    """Every model exported as deployed into `folder` before any is loaded, by the export workers (nothing for
    the torch backend).

    An export in the measuring process leaves its memory in another state for each model loaded after it. The
    same dense model loaded first and last in one chunk, six slim models between (fmnist-vit, a 2-core EPYC,
    benchmarks/protocol_checks.py load-order): last / first 0.969 at the median with each model exported then
    loaded in turn (12 of 12 chunks under 0.99), 0.979 with every export in this process before the loads (9 of
    12), 0.985 with them in a worker (6 of 8), 0.993 loading files exported once by workers (2 of 8); 1.000 with
    the worker exports and the sessions loaded round robin (load_round_robin; 3 of 8, on a noisier machine)."""
    if backend.name == "torch":
        return {}
    return _export_all(models, {name: Path(folder) / f"{name.replace('/', '_')}.onnx" for name in models}, arch,
                       batch)


_WORKERS: list[ProcessPoolExecutor] = []


def _workers() -> ProcessPoolExecutor:
    """Processes that export for this one (one per core, at most 4): spawned on first use (a few seconds,
    paid once per process), then kept."""
    if not _WORKERS:
        ctx = multiprocessing.get_context("spawn")  # a forked torch can deadlock in its thread pools
        _WORKERS.append(ProcessPoolExecutor(min(4, os.cpu_count() or 1), mp_context=ctx,
                                            initializer=torch.set_num_threads, initargs=(1,)))
    return _WORKERS[0]


def _export_all(models: dict[str, nn.Module], paths: dict[str, Path], arch: Arch, batch: int, done=None
                ) -> dict[str, Path]:
    """Export each model to its path in the workers; where they cannot run (a script without a main guard,
    which spawn re-runs; a model that does not pickle), in this process, with one line that says so."""
    shape = (arch.in_chans, arch.img_size, arch.img_size)
    left = dict(paths)
    try:
        futures = {name: _workers().submit(_export_module, _on_cpu(models[name]), path, shape, batch)
                   for name, path in paths.items()}
        for name, f in futures.items():
            f.result()
            del left[name]
            if done:
                done(name)
    except (BrokenProcessPool, pickle.PicklingError, TypeError, AttributeError) as e:
        if _WORKERS:
            _WORKERS.pop().shutdown(wait=False, cancel_futures=True)
        log(f"export: the export workers failed ({type(e).__name__}); exporting the {len(left)} models left in "
            "this process")
        for name, path in left.items():
            _export_module(models[name], path, shape, batch)
            if done:
                done(name)
    return dict(paths)


def _on_cpu(model: nn.Module) -> nn.Module:
    """The model as a worker gets it: on the CPU (a CUDA tensor would make the worker start CUDA)."""
    if all(p.device.type == "cpu" for p in model.parameters()):
        return model
    return copy.deepcopy(model).cpu()


def _export_module(model: nn.Module, path: Path, shape: tuple[int, int, int], batch: int) -> Path:
    from ..export import export_onnx

    return export_onnx(model, path, shape, batch)


Loader = tuple[Callable[[], Session], int]  # (load one session, how many)


def load_round_robin(loaders: dict[str, Loader]) -> dict[str, list[Session]]:
    """Every model's first session, then every model's second, and so on: where a session's memory lands depends
    on what was loaded before it (the same model loaded last in a chunk ran ~1.5% faster than loaded first, on a
    2-core EPYC), so no model may have all its sessions loaded first or last."""
    sessions: dict[str, list[Session]] = {name: [] for name in loaders}
    try:
        for c in range(max((n for _, n in loaders.values()), default=0)):
            for name, (load, n) in loaders.items():
                if c < n:
                    sessions[name].append(load())
    except BaseException:
        close_all(sessions)
        raise
    return sessions


def session_loader(backend: Backend, model: nn.Module | None, arch: Arch, batch: int, onnx: str | Path | None,
                   copies: int) -> Loader:
    """How to load a model as deployed: sessions of its exported file, or the module on the torch backend."""
    if backend.name == "torch":
        return (lambda: backend.load_module(model.eval(), torch.as_tensor(example_input(arch, batch)))), 1
    if onnx is None:
        raise ValueError("an exported file is needed for a session on " + backend.name)
    return (lambda: backend.load_onnx(Path(onnx))), copies


def measure_loaders(loaders: dict[str, Loader], arch: Arch, batch: int, protocol: timing.Protocol = timing.MODEL
                    ) -> dict[str, timing.Measurement]:
    """Load every model's sessions round robin in the order given, time them together, and close them."""
    sessions = load_round_robin(loaders)
    try:
        return measure_sessions(sessions, arch, batch, protocol)
    finally:
        close_all(sessions)


def measure_loaded(models: dict[str, tuple[Backend, nn.Module | None, Path | None]], arch: Arch, batch: int,
                   protocol: timing.Protocol = timing.MODEL) -> dict[str, timing.Measurement]:
    """Load each (backend, module, exported file) as `protocol.sessions` sessions, round robin in the order
    given, and time them together; the module is needed only where there is no file (the torch backend)."""
    return measure_loaders({name: session_loader(backend, m, arch, batch, onnx, protocol.sessions)
                            for name, (backend, m, onnx) in models.items()}, arch, batch, protocol)


def measure_models(backend: Backend, models: dict[str, nn.Module], arch: Arch, batch: int,
                   protocol: timing.Protocol = timing.MODEL) -> dict[str, timing.Measurement]:
    """Export and time the models together (interleaved); the models need trained or nontrivial_ weights."""
    with tempfile.TemporaryDirectory() as tmp:
        files = export_first(backend, models, arch, batch, tmp)
        return measure_loaded({k: (backend, m, files.get(k)) for k, m in models.items()}, arch, batch, protocol)


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

    @property
    def one_precision(self) -> bool:
        """The dense reference and the deployed dense structure are two readings of one model (select.loop)."""
        return self.reference.precision == self.backend.precision

    def __call__(self, specs: list, long: bool = False) -> tuple[timing.Measurement, list[timing.Measurement]]:
        from ..slim import build_slim

        slims = {str(i): build_slim(s, self.model) for i, s in enumerate(specs)}
        with tempfile.TemporaryDirectory() as tmp:
            files = {**export_first(self.backend, slims, self.arch, self.batch, tmp),
                     **export_first(self.reference, {"dense": self.dense_model}, self.arch, self.batch, tmp)}
            # the structures first, then the dense model, round robin: as verify loads them
            models = {**{k: (self.backend, m, files.get(k)) for k, m in slims.items()},
                      "dense": (self.reference, self.dense_model, files.get("dense"))}
            t = measure_loaded(models, self.arch, self.batch, timing.MODEL_LONG if long else timing.MODEL)
        return t["dense"], [t[str(i)] for i in range(len(specs))]
