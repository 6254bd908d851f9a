"""The command line: help for every command; bad input gives one line, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = ["train", "info", "search", "prune", "profile", "predict", "select", "retrain", "export", "quantize",
            "verify", "run", "doctor"]


def slimdeploy(*args: str, cwd: Path | None = None, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "SLIMDEPLOY_QUIET": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "slimdeploy", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def test_help_lists_every_command():
    r = slimdeploy("--help")
    assert r.returncode == 0
    for c in COMMANDS:
        assert c in r.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    r = slimdeploy(command, "--help")
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout


# Runs each argument list through the console entry point in one Python process, so that a table of bad inputs pays
# for importing torch once, not once a case. What escapes main() is printed as Python would, traceback and all.
_MANY = """
import contextlib, io, json, sys, traceback
from slimdeploy.cli import main
out = []
for args in json.loads(sys.argv[1]):
    so, se, rc = io.StringIO(), io.StringIO(), 0
    sys.argv = ["slimdeploy", *args]
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        try:
            main()
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            rc = 1
    out.append([rc, so.getvalue(), se.getvalue()])
print(json.dumps(out))
"""


def slimdeploy_many(*cases: list[str]) -> list[subprocess.CompletedProcess]:
    import json
    import os

    env = {**os.environ, "SLIMDEPLOY_QUIET": "1"}
    r = subprocess.run([sys.executable, "-c", _MANY, json.dumps([list(c) for c in cases])], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [subprocess.CompletedProcess(list(args), rc, so, se)
            for args, (rc, so, se) in zip(cases, json.loads(r.stdout.strip().splitlines()[-1]))]


def _one_line_error(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert needle in lines[0], lines[0]


def test_bad_inputs(tmp_path):
    bad_ckpt = tmp_path / "bad.safetensors"
    bad_ckpt.write_bytes(b"garbage")
    cases = [
        (["info", "--model", "no_such_vit"], "unknown model"),
        (["info", "--model", "resnet18"], "not a timm VisionTransformer"),
        (["info", "--checkpoint", str(tmp_path / "nope.safetensors")], "not found"),
        (["info", "--checkpoint", str(bad_ckpt)], "cannot read"),
        (["info", "--model", "fmnist-vit", "--num-classes", "3", "--checkpoint", str(bad_ckpt)], "cannot read"),
        (["train", "--out", str(tmp_path / "r"), "--data", str(tmp_path / "no_data")], "dataset not found"),
        (["train", "--out", str(tmp_path / "r"), "--epochs", "abc"], "valid integer"),
        (["train", "--out", str(tmp_path / "r"), "--epochs", "-1"], "--epochs"),
        (["train", "--out", str(tmp_path / "r"), "--train-limit", "0"], "--train-limit"),
        (["select", str(tmp_path / "r"), "--target-latency", "fast"], "cannot read latency target"),
        (["select", str(tmp_path / "r"), "--target-macs", "12x"], "cannot read MACs target"),
        (["select", str(tmp_path / "r"), "--keep-embed", "1.5"], "--keep-embed must be in (0, 1]"),
        (["search", str(tmp_path / "r"), "--embed", "--w-embed", "-1"], "--w-embed) must be >= 0"),
        (["select", str(tmp_path / "r"), "--target-latency", "5ms"], "not found"),
        (["predict", str(tmp_path / "none.json"), "--device", "x"], "not found"),
        (["run", "--out", str(tmp_path / "r2"), "--target-latency", "soon"], "cannot read latency target"),
        (["run", "--out", str(tmp_path / "r2"), "--target-macs", "12x"], "cannot read MACs target"),
        (["run", "--out", str(tmp_path / "r2"), "--device", "no-such-device"], "no profile for device"),
    ]
    for r, (_, needle) in zip(slimdeploy_many(*(args for args, _ in cases)), cases):
        _one_line_error(r, needle)
    # and one of them as its own process, so that the entry point's exit code is the process's
    _one_line_error(slimdeploy(*cases[0][0]), cases[0][1])


def test_mismatching_checkpoint(tmp_path):
    import torch
    from safetensors.torch import save_file

    from slimdeploy.models import create_model
    from slimdeploy.types import ModelConfig

    m = create_model(ModelConfig("fmnist-vit", num_classes=3))
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, tmp_path / "w.safetensors")
    _one_line_error(slimdeploy("info", "--checkpoint", str(tmp_path / "w.safetensors")), "does not match")
    assert torch.is_tensor(next(iter(m.state_dict().values())))


def test_dataset_missing_gives_one_line(tmp_path):
    from .conftest import fmnist_available

    if fmnist_available():  # checked first: else the command below trains a whole epoch before the skip
        pytest.skip("the system copy of Fashion-MNIST is installed, so it is found")
    r = slimdeploy("train", "--out", str(tmp_path / "r"), "--epochs", "1",
                   env_extra={"SLIMDEPLOY_FMNIST_DIR": str(tmp_path), "HOME": str(tmp_path)})
    _one_line_error(r, "Fashion-MNIST not found")
