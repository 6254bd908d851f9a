"""Run by torchrun in tests: one small search or retrain; every rank saves what it ended with."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("SLIMDEPLOY_QUIET", "1")

from safetensors.torch import save_file  # noqa: E402

from slimdeploy.data import load_data  # noqa: E402
from slimdeploy.models import data_config  # noqa: E402
from slimdeploy.trainer import TrainConfig  # noqa: E402
from tests.conftest import random_spec, tiny_model  # noqa: E402  (registers the tiny models)


def main(mode: str, out: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    model = tiny_model("t-demo", seed=0)
    bundle = load_data("synthetic", data_config(model), 10, 256, 64)
    tcfg = TrainConfig(epochs=1, batch_size=32, lr=1e-3, seed=0)
    if mode == "search":
        from slimdeploy.search import SearchConfig, search

        res = search(model, bundle, tcfg, SearchConfig(w_attn=1e-2, w_mlp=1e-2, w_tok=1e-2), out, torch_device="cpu")
        state = res["masks"]
    else:
        from slimdeploy.retrain import DistillConfig, retrain
        from slimdeploy.slim import build_slim

        student = build_slim(random_spec(model, 1), model)
        retrain(student, model, bundle, tcfg, DistillConfig(), out, torch_device="cpu")
        state = student.state_dict()
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(Path(out) / f"rank{rank}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
