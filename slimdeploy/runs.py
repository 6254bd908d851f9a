"""The run directory: where each stage finds its inputs and leaves its artifacts, who may write it, and whether
an artifact is still current.

- A lock (`run.lock()`): one slimdeploy process writes a run directory at a time; a second gets one clear line.
- Stage records in run.json: each stage records a hash of what it was built from (its options and the bytes of
  the artifacts it read) and what it wrote. A stage is current when its outputs exist and its inputs hash the
  same; a stage whose inputs changed (a new search after select, another target) runs again and says so, and the
  stages after it follow, because their inputs (its outputs) changed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

from timm.models.vision_transformer import VisionTransformer

from .errors import SlimError
from .fileio import read_json, write_json
from .models import arch_of, create_model, load_dense, read_model_config, save_dense
from .progress import log
from .types import ModelConfig, SlimSpec

RECORD = "run.json"
_HASHES: dict[tuple, str] = {}


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes (memoised by path, size and modification time)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()[:16]
    return _HASHES[key]




class Run:
    """Paths, lock and stage records of one run directory."""

    def __init__(self, path: str | Path):
        self.dir = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.dir / name

    # ---- lock -----------------------------------------------------------------------------------
    @contextmanager
    def lock(self):
        """Hold the run directory for this process; SlimError if another process holds it."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SlimError(f"cannot write the run directory {self.dir}: {e.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another"
                raise SlimError(f"{self.dir} is in use by another slimdeploy process (pid {other}): wait for it, "
                                "or use another run directory") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield self
        finally:
            os.close(fd)  # releases the lock

    # ---- stage records --------------------------------------------------------------------------
    def inputs(self, options: dict, files: list[Path]) -> dict:
        """What a stage is built from: a hash of its options and of each file it reads (None where missing);
        files in the run directory by their path in it, so that a copied run directory stays current."""
        opts = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:16]

        def name(p: Path) -> str:
            try:
                return str(Path(p).resolve().relative_to(self.dir.resolve()))
            except ValueError:
                return str(p)
        return {"options": opts, "files": {name(p): file_hash(Path(p)) if Path(p).is_file() else None
                                           for p in files}}

    def _records(self) -> dict:
        p = self.dir / RECORD
        if not p.is_file():
            return {}
        d = read_json(p, "run record")
        if not isinstance(d, dict) or not isinstance(d.get("stages", {}), dict):
            raise SlimError(f"{p} is not a slimdeploy run record: use another run directory")
        return d.get("stages", {})

    def record(self, stage: str) -> dict | None:
        """What run.json says of a stage, if anything."""
        return self._records().get(stage)

    def current(self, stage: str, inputs: dict, outputs: list[str]) -> bool:
        """Whether `stage` already ran on these inputs and its outputs are all there. Says so when it ran on
        other inputs (it will run again)."""
        if not all((self.dir / o).exists() for o in outputs):
            return False
        rec = self._records().get(stage)
        if rec is None or rec.get("status") != "done":  # by hand, by an earlier version, or interrupted
            log(f"{stage}: {', '.join(outputs)} has no record of its inputs: running the stage again")
            return False
        old = rec.get("inputs") or {}
        if old != inputs:
            changed = [f for f, h in inputs["files"].items() if (old.get("files") or {}).get(f) != h]
            changed += ["its options"] if old.get("options") != inputs["options"] else []
            log(f"{stage}: its inputs changed since it ran ({', '.join(changed)}): running it again")
            return False
        log(f"{stage}: done on the same inputs, skipped")
        return True

    def restart_if_changed(self, stage: str, inputs: dict, checkpoints: list[str]) -> None:
        """Before a stage runs: drop its checkpoints when they were made from other inputs (a resume would
        continue stale work), then record it as running on these inputs. Main process only under torchrun."""
        from . import dist

        if not dist.setup().is_main:
            return
        rec = self._records().get(stage)
        if rec is not None and rec.get("inputs") != inputs:
            for c in checkpoints:
                (self.dir / c).unlink(missing_ok=True)
        self._write(stage, {"inputs": inputs, "status": "running"})

    def finished(self, stage: str, inputs: dict, outputs: list[str], note: dict | None = None) -> None:
        """Record that `stage` wrote `outputs` from `inputs` (atomically rewrites run.json)."""
        self._write(stage, {"inputs": inputs, "outputs": outputs, "status": "done", **(note or {})})

    def _write(self, stage: str, rec: dict) -> None:
        p = self.dir / RECORD
        d = read_json(p, "run record") if p.is_file() else {}
        d.setdefault("stages", {})[stage] = rec
        write_json(p, d)

    # ---- artifacts ------------------------------------------------------------------------------
    @property
    def has_base(self) -> bool:
        return (self.dir / "model.json").is_file() and (self.dir / "base.safetensors").is_file()

    @property
    def has_search(self) -> bool:
        return (self.dir / "search" / "masks.safetensors").is_file()

    def spec(self) -> SlimSpec:
        p = self.dir / "spec.json"
        if not p.is_file():
            raise SlimError(f"{p} not found: run 'slimdeploy select' first (or pass --spec)")
        return SlimSpec.load(p)

    def base(self) -> tuple[VisionTransformer, ModelConfig]:
        if not self.has_base:
            raise SlimError(f"{self.dir} has no base model (model.json + base.safetensors): run 'slimdeploy train' "
                            "or pass --model/--checkpoint")
        return load_dense(self.dir)

    def ensure_base(self, model: str | None, checkpoint: str | Path | None, pretrained: bool,
                    num_classes: int | None, img_size: int | None, in_chans: int | None
                    ) -> tuple[VisionTransformer, ModelConfig]:
        """The run's base model; created from --model/--checkpoint/--pretrained on first use."""
        if self.has_base:
            name = read_model_config(self.dir).name
            if model is not None and model != name:
                raise SlimError(f"{self.dir} holds a run of {name}, not {model}: choose another run directory")
            return self.base()
        if checkpoint is None and not pretrained:
            raise SlimError(f"{self.dir} has no base model: pass --checkpoint or --pretrained, or train one first "
                            "(slimdeploy train / slimdeploy run trains one when there is no checkpoint)")
        cfg = ModelConfig(name=model or "fmnist-vit", num_classes=num_classes, img_size=img_size, in_chans=in_chans)
        m = create_model(cfg, pretrained=pretrained, checkpoint=checkpoint)
        a = arch_of(m)
        cfg = ModelConfig(cfg.name, a.num_classes, a.img_size, a.in_chans)
        save_dense(m, cfg, self.dir)
        return m, cfg
