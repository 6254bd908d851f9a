"""torchrun with 2 CPU processes (gloo): search and retrain end identical on both ranks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")


def _torchrun(mode: str, out: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER),
           mode, str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("mode", ["search", "retrain"])
def test_two_ranks_end_identical(tmp_path, mode):
    _torchrun(mode, tmp_path)
    a, b = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if mode == "search":
        # the masks moved (the search did something) and rank 0 wrote the artifacts
        assert float(a["mlp"].mean()) < 1.0
        assert (tmp_path / "search" / "masks.safetensors").is_file()
    else:
        assert (tmp_path / "slim.safetensors").is_file()
