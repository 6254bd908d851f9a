"""Mask search: the L1 term drives masks down, artifacts, resume, Taylor importance."""

from __future__ import annotations

import pytest
import torch

from slimdeploy.data import load_data
from slimdeploy.masks import SearchDims
from slimdeploy.models import data_config
from slimdeploy.search import SearchConfig, load_masks, search
from slimdeploy.trainer import Hooks, TrainConfig

from .conftest import tiny_model


def _search(tmp, w, epochs=2, resume=False, hooks_fail_at=None, dims=None):
    model = tiny_model("t-demo")
    bundle = load_data("synthetic", data_config(model), 10, 256, 64)
    tcfg = TrainConfig(epochs=epochs, batch_size=16, lr=1e-2, min_lr=1e-2, warmup_epochs=0, clip_grad=None,
                       weight_decay=1e-3, seed=0)
    scfg = SearchConfig(w_attn=w, w_mlp=w, w_tok=w, dims=dims or SearchDims())
    if hooks_fail_at is not None:
        import slimdeploy.search as s

        original = s.TaylorImportance.on_epoch_end

        def boom(self, epoch, metrics):
            original(self, epoch, metrics)
            if epoch == hooks_fail_at:
                raise KeyboardInterrupt
        s.TaylorImportance.on_epoch_end = boom
        try:
            return search(model, bundle, tcfg, scfg, tmp, resume=resume, torch_device="cpu")
        finally:
            s.TaylorImportance.on_epoch_end = original
    return search(model, bundle, tcfg, scfg, tmp, resume=resume, torch_device="cpu")


def test_l1_drives_masks_down(tmp_path):
    strong = _search(tmp_path / "a", 5e-2)["masks"]
    none = _search(tmp_path / "b", 0.0)["masks"]
    for kind in ("qk", "v", "mlp", "tok"):
        assert float(strong[kind].abs().mean()) < float(none[kind].abs().mean()) - 0.05, kind
    assert float(strong["mlp"].abs().mean()) < 0.9
    assert strong["tok"].min() >= 0 and strong["tok"].max() <= 1
    # Taylor importance recorded for every searched kind, non-negative
    for kind in ("qk", "v", "mlp", "tok"):
        assert strong[f"taylor.{kind}"].shape == strong[kind].shape
        assert (strong[f"taylor.{kind}"] >= 0).all()
    assert (tmp_path / "a" / "search" / "structure.png").stat().st_size > 1000
    masks, cfg = load_masks(tmp_path / "a")
    assert cfg["w_attn"] == 5e-2 and cfg["arch"].depth == 3


def test_search_resume_matches_uninterrupted(tmp_path):
    full = _search(tmp_path / "full", 1e-2)["masks"]
    with pytest.raises(KeyboardInterrupt):
        _search(tmp_path / "cut", 1e-2, hooks_fail_at=1)  # killed during epoch 2's bookkeeping
    assert (tmp_path / "cut" / "search" / "checkpoint.pt").is_file()
    resumed = _search(tmp_path / "cut", 1e-2, resume=True)
    assert len(resumed["history"]) == 2
    for k in full:
        assert torch.allclose(full[k], resumed["masks"][k], atol=1e-6), k


def test_dims_can_be_switched_off(tmp_path):
    res = _search(tmp_path, 1e-2, epochs=1, dims=SearchDims(tokens=False, attn=True, mlp=False, shared_qkv=True))
    masks = res["masks"]
    assert "tok" not in masks and "mlp" not in masks
    assert torch.equal(masks["qk"], masks["v"])  # ViT-Slim's shared q/k/v mask


def test_hooks_default_is_inert():
    h = Hooks()
    assert h.state() == {} and h.after_backward(None) is None
