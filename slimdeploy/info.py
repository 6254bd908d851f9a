"""`slimdeploy info`: a model's per-block shape, parameters, MACs and (optionally) measured latency."""

from __future__ import annotations

from pathlib import Path

from .analysis import block_macs, block_params, spec_macs, spec_params
from .latency.backends import get_backend
from .models import arch_of, resolve_model
from .types import SlimSpec


def measure_onnx_cpu_latency(model, arch, batch_size: int = 1, threads: int = 1) -> dict:
    """The model exported to ONNX and timed on ONNX Runtime CPU by the one protocol (ms)."""
    from .latency.measure import measure_models

    t = measure_models(get_backend("ort-cpu", threads=threads), {"model": model}, arch, batch_size)
    return t["model"].to_dict()


def describe(model_name, checkpoint, num_classes, img_size, in_chans, run, latency: bool, batch_size: int,
             threads: int) -> dict:
    if run is not None and (Path(run) / "spec.json").is_file() and model_name is None:
        from .slim import load_slim

        spec = SlimSpec.load(Path(run) / "spec.json")
        weights = next((Path(run) / n for n in ("slim.safetensors", "pruned.safetensors")
                        if (Path(run) / n).is_file()), None)
        model = load_slim(spec, weights)
        kind, name = "slim", spec.source.name
    else:
        model, cfg = resolve_model(model_name, checkpoint, False, num_classes, img_size, in_chans, run)
        spec = SlimSpec.dense(cfg, arch_of(model))
        kind, name = "dense", cfg.name
    a = spec.arch
    e = spec.embed_dim
    d = {"name": name, "kind": kind, "embed_dim": e, "num_tokens": a.num_tokens,
         "num_prefix_tokens": a.num_prefix_tokens, "num_classes": a.num_classes,
         "params": spec_params(spec), "macs": spec_macs(spec),
         "blocks": [{**b.widths(), "macs": block_macs(a, b, e), "params": block_params(a, b, e, kind == "slim")}
                    for b in spec.blocks]}
    if latency:
        d["latency"] = measure_onnx_cpu_latency(model, a, batch_size, threads)
    return d
