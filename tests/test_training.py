"""Dense training: learning happens, checkpoints are atomic, a killed run resumes from its epoch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from slimdeploy.data import BatchTransform, load_data, read_idx
from slimdeploy.errors import SlimError
from slimdeploy.models import create_model, data_config
from slimdeploy.train import train_dense
from slimdeploy.trainer import TrainConfig
from slimdeploy.types import ModelConfig

from .conftest import fmnist_available

needs_fmnist = pytest.mark.skipif(not fmnist_available(), reason="Fashion-MNIST not installed (run make setup)")


@needs_fmnist
def test_short_training_beats_chance_on_fashion_mnist(tmp_path):
    cfg = ModelConfig("fmnist-vit")
    model = create_model(cfg)
    bundle = load_data("fashion-mnist", data_config(model), 10, 3000, 1000)
    hist = train_dense(model, cfg, bundle, TrainConfig(epochs=2, batch_size=64, lr=2e-3), tmp_path,
                       torch_device="cpu")
    assert hist[-1]["top1"] > 50  # chance is 10%
    assert (tmp_path / "base.safetensors").is_file() and (tmp_path / "model.json").is_file()
    from slimdeploy.models import load_dense

    again, _ = load_dense(tmp_path)
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in model.parameters())


def test_killed_training_resumes_from_its_last_epoch(tmp_path):
    """kill -9 during epoch 2, then the same command again: continues from epoch 2, not from scratch."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "slimdeploy", "train", "--out", str(out), "--data", "synthetic",
            "--train-limit", "4000", "--val-limit", "100", "--epochs", "3", "--batch-size", "32", "--torch-device",
            "cpu"]
    env = {**os.environ, "SLIMDEPLOY_QUIET": "1"}
    p = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt = out / "train" / "checkpoint.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    assert ckpt.exists(), p.communicate()[1][-2000:]
    time.sleep(0.5)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "base.safetensors").exists()  # nothing half-written
    r = subprocess.run(args, env={**env, "SLIMDEPLOY_QUIET": "0"}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "resuming after epoch" in r.stderr
    hist = json.loads((out / "train" / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    # the same command once more: current, nothing retrained or overwritten
    before = (out / "base.safetensors").stat().st_mtime_ns
    again = subprocess.run(args, env={**env, "SLIMDEPLOY_QUIET": "0"}, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "skipped" in again.stderr
    assert (out / "base.safetensors").stat().st_mtime_ns == before


def test_idx_reader_and_transform(tmp_path):
    import gzip
    import struct

    import torch

    data = bytes(range(2 * 3 * 4))
    with gzip.open(tmp_path / "x-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 2, 3, 4) + data)
    t = read_idx(tmp_path / "x-idx3-ubyte.gz")
    assert t.shape == (2, 3, 4) and int(t[1, 2, 3]) == 23
    (tmp_path / "bad").write_bytes(b"\x00\x00\x08\x03\x00")
    with pytest.raises(SlimError):
        read_idx(tmp_path / "bad")
    tf = BatchTransform(3, 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = tf(torch.full((2, 1, 4, 4), 255, dtype=torch.uint8))
    assert x.shape == (2, 3, 8, 8) and torch.allclose(x, torch.full_like(x, 2.0))


def test_class_count_mismatch_is_refused():
    model = create_model(ModelConfig("fmnist-vit", num_classes=5))
    if not fmnist_available():
        pytest.skip("Fashion-MNIST not installed")
    with pytest.raises(SlimError, match="has 10 classes but the model has 5"):
        load_data("fashion-mnist", data_config(model), 5)
