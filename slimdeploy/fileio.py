"""Atomic writes and safe weight loading (no pickles from users' files)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import SlimError


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """A temp file beside `path` to write, renamed onto it when the block ends. A crash leaves the old file or
    the new one, never half of one; a write that fails (read-only folder, full disk) is one SlimError line."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise SlimError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write data to path atomically (see atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise SlimError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SlimError(f"{what} {path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None


def save_weights(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save a state dict as safetensors, atomically (tensors made contiguous and unshared)."""
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)


def save_torch(obj: Any, path: str | Path) -> None:
    """torch.save of plain tensors/numbers/dicts (our own checkpoints), atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | Path, what: str = "checkpoint") -> Any:
    """torch.load with weights_only=True: never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise SlimError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SlimError(f"cannot read {what} {path}: {first[:200]}") from None


def load_weights(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Load a state dict from safetensors, or from a torch file with weights_only=True.

    timm/DeiT checkpoints that wrap the state dict under 'model', 'state_dict' or
    'state_dict_ema' are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise SlimError(f"{what} not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise SlimError(f"cannot read {what} {path}: {str(e).splitlines()[0][:200]}") from None
    obj = load_torch(path, what)
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SlimError(f"{what} {path} does not hold a state dict of tensors")
    # DDP / torch.compile prefixes
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}
