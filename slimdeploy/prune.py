"""Stage: physical pruning. SlimSpec + dense (or searched) weights -> a dense, smaller model.

The pruned model is checked against its masked twin (the same weights with the spec's masks set
hard to 0/1) on a batch; pruning refuses to write a model that differs beyond tolerance. A fused-mode model, or
one that ranks with the positions' prior, is checked as its attentive twin ranking by attention (the masks have no
fused token and no prior).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

from .analysis import spec_macs, spec_params
from .errors import SlimError
from .fileio import save_weights, write_json
from .masks import MaskedViT, SearchDims, fold_masks, hard_twin
from .models import count_params, create_model
from .slim import build_slim
from .types import SlimSpec

TOLERANCE = 1e-4  # max abs diff relative to the output scale (invariant 1)


def searched_model(run_dir: str | Path, spec: SlimSpec) -> VisionTransformer:
    """The searched weights with the kept channels' mask values folded in."""
    from safetensors.torch import load_file

    from .search import load_masks

    run_dir = Path(run_dir)
    masks, cfg = load_masks(run_dir)
    dims = SearchDims(**cfg.get("dims", {})) if cfg.get("dims") else SearchDims()
    vit = create_model(spec.source)
    vit.load_state_dict(load_file(str(run_dir / "search" / "weights.safetensors")))
    masked = MaskedViT(vit, dims)
    with torch.no_grad():
        for kind, p in masked.mask_params().items():
            p.copy_(masks[kind])
    return fold_masks(masked)


def equivalence(dense: VisionTransformer, slim: VisionTransformer, spec: SlimSpec, x: torch.Tensor) -> dict:
    """Max abs difference between the pruned model and the hard-masked dense model on x."""
    with torch.no_grad():
        ref = hard_twin(dense, spec)(x)
        got = slim.eval()(x)
    diff = float((got - ref).abs().max())
    scale = float(ref.abs().max().clamp_min(1e-6))
    return {"max_abs_diff": diff, "output_scale": scale, "relative": diff / scale, "samples": int(x.shape[0]),
            "tolerance": TOLERANCE, "passed": diff / scale <= TOLERANCE}


def prune(spec: SlimSpec, dense: VisionTransformer, out_dir: str | Path, x: torch.Tensor,
          stem: str = "pruned") -> tuple[VisionTransformer, dict]:
    """Build the slim model of spec from dense, verify it, write <stem>.safetensors + prune.json."""
    out_dir = Path(out_dir)
    dense = dense.cpu().eval()
    slim = build_slim(spec, dense)
    if spec.token_mode == "fused" or spec.rank_prior is not None:
        # the masks have no fused token and rank by attention alone (fused mode and the positions' prior search
        # as attentive mode does): what they prove is every kept head, channel, unit and rank, on the attentive
        # twin that ranks by attention; the fusion and the prior are tested on their own
        twin = spec.in_mode("attentive")
        check = {**equivalence(dense, build_slim(twin, dense), twin, x),
                 "checked_as": "attentive twin" + ("" if spec.rank_prior is None else ", ranking by attention")}
    else:
        check = equivalence(dense, slim, spec, x)
    params = count_params(slim)
    record = {**check, "params": params, "params_analytic": spec_params(spec), "macs": spec_macs(spec),
              "dense_params": spec.arch.params}
    if not check["passed"]:
        raise SlimError(f"pruned model differs from its masked twin: max abs diff {check['max_abs_diff']:.3g} "
                        f"({check['relative']:.3g} of the output scale > {TOLERANCE}); nothing written")
    save_weights(slim.state_dict(), out_dir / f"{stem}.safetensors",
                 metadata={"spec": json.dumps(spec.to_dict())})
    write_json(out_dir / "prune.json", record)
    return slim, record


OUTPUTS = ["pruned.safetensors", "prune.json"]


def prune_run(run_dir: str | Path, x: torch.Tensor | None = None, weights: str = "auto",
              checkpoint: str | Path | None = None) -> dict | None:
    """The prune stage: spec.json + the searched weights (masks folded; `weights='base'` for the dense ones, or a
    checkpoint) -> pruned.safetensors. x: images to check the equivalence on (16 random ones by default)."""
    from .runs import Run

    if weights not in ("auto", "searched", "base"):
        raise SlimError("--weights must be auto, searched or base")
    r = Run(run_dir)
    spec = r.spec()
    use_search = checkpoint is None and (weights == "searched" or (weights == "auto" and r.has_search))
    files = [r / "spec.json", r / "base.safetensors"] + ([r / "search" / "weights.safetensors",
                                                          r / "search" / "masks.safetensors"] if use_search else [])
    inputs = r.inputs({"weights": weights, "checkpoint": str(checkpoint) if checkpoint else None}, files
                          + ([Path(checkpoint)] if checkpoint else []))
    if r.current("prune", inputs, OUTPUTS):
        return None
    if checkpoint is not None:
        dense = create_model(spec.source, checkpoint=checkpoint)
    elif use_search:
        dense = searched_model(run_dir, spec)
    else:
        dense, _ = r.base()
    a = spec.arch
    if x is None:
        x = torch.randn(16, a.in_chans, a.img_size, a.img_size, generator=torch.Generator().manual_seed(0))
    _, record = prune(spec, dense, run_dir, x)
    r.finished("prune", inputs, OUTPUTS)
    return record
