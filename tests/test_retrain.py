"""Retraining with distillation: the loss on known logits, improvement, exact resume."""

from __future__ import annotations

import math

import pytest
import torch

from slimdeploy.data import load_data
from slimdeploy.models import data_config
from slimdeploy.retrain import DistillConfig, distill_loss, retrain
from slimdeploy.slim import build_slim
from slimdeploy.trainer import TrainConfig

from .conftest import random_spec, tiny_model


def test_distill_loss_on_known_logits():
    s = torch.tensor([[2.0, 0.0]])
    t = torch.tensor([[0.0, 2.0]])
    y = torch.tensor([0])
    ce = math.log(1 + math.exp(-2.0))  # CE of s for class 0
    # soft, tau 1: KL(p_t || p_s) with p_t = softmax(t), p_s = softmax(s)
    pt = [1 / (1 + math.exp(2)), 1 / (1 + math.exp(-2))]
    ps = [pt[1], pt[0]]
    kl = sum(a * math.log(a / b) for a, b in zip(pt, ps))
    loss, parts = distill_loss(s, t, y, DistillConfig("soft", alpha=0.5, tau=1.0))
    assert float(parts["ce"]) == pytest.approx(ce, rel=1e-6)
    assert float(parts["kd"]) == pytest.approx(kl, rel=1e-6)
    assert float(loss) == pytest.approx(0.5 * ce + 0.5 * kl, rel=1e-6)
    # tau scales the KL term by tau^2 of the softened distributions
    loss2, parts2 = distill_loss(s, t, y, DistillConfig("soft", alpha=1.0, tau=2.0))
    pt2 = [1 / (1 + math.exp(1)), 1 / (1 + math.exp(-1))]
    kl2 = sum(a * math.log(a / b) for a, b in zip(pt2, [pt2[1], pt2[0]])) * 4
    assert float(loss2) == pytest.approx(kl2, rel=1e-6)
    # hard: CE against the teacher's argmax (class 1)
    _, parts3 = distill_loss(s, t, y, DistillConfig("hard", alpha=0.5))
    assert parts3["kd"] == pytest.approx(math.log(1 + math.exp(2.0)), rel=1e-6)
    # none: plain CE
    loss4, _ = distill_loss(s, t, y, DistillConfig("none"))
    assert float(loss4) == pytest.approx(ce, rel=1e-6)


def _setup(tmp_path, seed=0):
    """A teacher trained on the synthetic task (~80% top-1) and a heavily pruned student of it."""
    from slimdeploy.train import classification_loss
    from slimdeploy.trainer import fit

    teacher = tiny_model("t-demo", seed)
    bundle = load_data("synthetic", data_config(teacher), 10, 512, 256)
    fit(teacher, classification_loss(), bundle, TrainConfig(epochs=6, batch_size=64, lr=2e-3, seed=0),
        tmp_path / "teacher.pt", torch_device="cpu")
    student = build_slim(random_spec(teacher, 2, force="one-channel"), teacher.eval())
    return teacher.eval(), student, bundle


def test_retrain_improves_a_pruned_model(tmp_path):
    teacher, student, bundle = _setup(tmp_path)
    rec = retrain(student, teacher, bundle, TrainConfig(epochs=3, batch_size=64, lr=3e-3, seed=0),
                  DistillConfig("soft"), tmp_path, torch_device="cpu")
    assert rec["top1"] > rec["top1_before_retrain"] + 5
    assert rec["teacher_top1"] > 50
    assert (tmp_path / "slim.safetensors").is_file() and (tmp_path / "retrain.json").is_file()


def test_retrain_resume_equals_uninterrupted(tmp_path):
    teacher, student, bundle = _setup(tmp_path)
    import copy

    s_full, s_cut = copy.deepcopy(student), copy.deepcopy(student)
    tcfg = TrainConfig(epochs=2, batch_size=64, lr=2e-3, seed=0, ema_decay=0.9)
    retrain(s_full, teacher, bundle, tcfg, DistillConfig("soft"), tmp_path / "full", torch_device="cpu")
    import slimdeploy.trainer as tr

    original = tr.Hooks.on_epoch_end

    def die_after_first_epoch(self, epoch, metrics):
        if epoch == 1:
            raise KeyboardInterrupt  # killed in epoch 2, after epoch 1's checkpoint
    tr.Hooks.on_epoch_end = die_after_first_epoch
    try:
        with pytest.raises(KeyboardInterrupt):
            retrain(copy.deepcopy(s_cut), teacher, bundle, tcfg, DistillConfig("soft"), tmp_path / "cut",
                    torch_device="cpu")
    finally:
        tr.Hooks.on_epoch_end = original
    rec = retrain(s_cut, teacher, bundle, tcfg, DistillConfig("soft"), tmp_path / "cut", resume=True,
                  torch_device="cpu")
    assert len(rec["history"]) == 2
    for (k, a), b in zip(s_full.state_dict().items(), s_cut.state_dict().values()):
        assert torch.equal(a, b), k
