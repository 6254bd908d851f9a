"""Physical pruning on ONNX Runtime CPU: (a) no overhead from pruning, (b) speed-up vs MAC reduction.

(a) A slim model with a uniform structure against a natively defined timm model of identical
    dimensions (heads, head width, MLP width): same latency expected (ratio slim / native).
(b) For several deit_small structures with hardware-friendly widths, the speed-up over the dense
    model divided by the MAC reduction (1.0 = latency falls as fast as MACs).
Models are measured alternately in rounds and medians are compared.

    .venv/bin/python benchmarks/prune_overhead.py --batch-sizes 1 16
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import torch
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer

from slimdeploy.analysis import spec_macs
from slimdeploy.latency import timing
from slimdeploy.latency.backends import get_backend
from slimdeploy.latency.components import nontrivial_
from slimdeploy.latency.measure import measure_models
from slimdeploy.models import arch_of, create_model
from slimdeploy.slim import build_slim
from slimdeploy.types import BlockSpec, ModelConfig, SlimSpec


def uniform_spec(cfg, arch, heads, width, mlp, keep_tokens=None) -> SlimSpec:
    spec = SlimSpec.dense(cfg, arch)
    tokens = list(range(arch.num_tokens))
    for i in range(len(spec.blocks)):
        if keep_tokens and i in keep_tokens:
            tokens = tokens[: arch.num_prefix_tokens + keep_tokens[i]]
        spec.blocks[i] = BlockSpec(tokens=list(tokens), heads=list(range(heads)),
                                   qk=[list(range(width))] * heads, v=[list(range(width))] * heads,
                                   mlp=list(range(mlp)))
    return spec.validate()


def time_models(models: dict, batch: int, rounds: int = 7) -> dict:
    """Latency (ms) of each model on ORT CPU (1 thread), measured together by the one protocol."""
    arch = arch_of(next(iter(models.values())))
    proto = timing.Protocol(warmup_s=0.5, rounds=rounds, round_s=0.3, min_calls=3)
    t = measure_models(get_backend("ort-cpu", threads=1), models, arch, batch, proto)
    return {k: v.median_ms for k, v in t.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    args = ap.parse_args()
    cfg = ModelConfig("deit_small_patch16_224")
    dense = nontrivial_(create_model(cfg)).eval()
    a = arch_of(dense)
    results = {"date": dt.datetime.now().isoformat(timespec="seconds"), "overhead": [], "speedup": []}

    # (a) slim vs native, identical dimensions
    heads, width, mlp = 4, 64, 1024
    class NarrowHeads(Attention):  # timm wants a class here, not a partial
        def __init__(self, dim, num_heads=8, **kw):
            super().__init__(dim, num_heads, attn_head_dim=width, **kw)

    native = nontrivial_(VisionTransformer(img_size=224, patch_size=16, num_classes=1000, embed_dim=384, depth=12,
                                           num_heads=heads, mlp_ratio=mlp / 384, attn_layer=NarrowHeads)).eval()
    slim = build_slim(uniform_spec(cfg, a, heads, width, mlp), dense)
    for batch in args.batch_sizes:
        t = time_models({"slim": slim, "native": native}, batch)
        row = {"batch": batch, "slim_ms": t["slim"], "native_ms": t["native"], "ratio": t["slim"] / t["native"]}
        results["overhead"].append(row)
        print(json.dumps(row), flush=True)

    # (b) speed-up vs MAC reduction
    specs = {
        "uniform 50% (3 heads, mlp 768)": uniform_spec(cfg, a, 3, 64, 768),
        "heads 4, width 48, mlp 1024": uniform_spec(cfg, a, 4, 48, 1024),
        "width 32 (6 heads), mlp 768": uniform_spec(cfg, a, 6, 32, 768),
        "tokens 196->128 at block 4, ->64 at block 8": uniform_spec(cfg, a, 6, 64, 1536, {4: 128, 8: 64}),
        "3 heads, mlp 768, tokens ->128 at block 6": uniform_spec(cfg, a, 3, 64, 768, {6: 128}),
    }
    dense_macs = spec_macs(SlimSpec.dense(cfg, a))
    for batch in args.batch_sizes:
        models = {"dense": dense, **{k: build_slim(s, dense) for k, s in specs.items()}}
        t = time_models(models, batch)
        for k, s in specs.items():
            speedup = t["dense"] / t[k]
            mac_red = dense_macs / spec_macs(s)
            row = {"batch": batch, "spec": k, "dense_ms": t["dense"], "slim_ms": t[k], "speedup": speedup,
                   "mac_reduction": mac_red, "efficiency": speedup / mac_red}
            results["speedup"].append(row)
            print(json.dumps(row), flush=True)
    out = Path("benchmarks/results/prune_overhead.json")
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
