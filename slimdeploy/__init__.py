"""slimdeploy: turn a trained vision transformer into a smaller model that meets a latency target.

Python API (each pipeline stage is a plain function; the CLI is a thin layer over them):
    slimdeploy.load(run_dir)                      -> the slim (or pruned) model of a run
    slimdeploy.load(spec_json, weights)           -> a slim model from spec.json + safetensors
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def load(path: str | Path, weights: str | Path | None = None):
    """Rebuild a slim model with one call: from a run directory (spec.json + slim.safetensors, else
    pruned.safetensors), or from a spec.json path and a safetensors file. No pickles are read."""
    from .errors import SlimError
    from .slim import load_slim

    path = Path(path)
    if path.is_dir():
        spec = path / "spec.json"
        if weights is None:
            weights = next((path / n for n in ("slim.safetensors", "pruned.safetensors") if (path / n).is_file()),
                           None)
            if weights is None:
                raise SlimError(f"{path} has no slim.safetensors or pruned.safetensors")
        return load_slim(spec, weights)
    return load_slim(path, weights)
