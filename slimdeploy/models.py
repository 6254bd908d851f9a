"""Model registry: the embedded fmnist-vit and every timm VisionTransformer-family model.

Pretrained configs are data (LOCAL_MODELS); everything else is timm's. We never patch timm:
we build its models and read their shape off the built modules.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.layers import Attention, LayerScale, Mlp
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from .errors import SlimError
from .fileio import load_weights, read_json, save_weights, write_json
from .types import Arch, ModelConfig

# The embedded default: a real transformer (6 blocks, 4 heads) that trains to ~88-89% on
# Fashion-MNIST in a few minutes on 2 CPU cores (patch 7 -> 16 patch tokens + class token).
LOCAL_MODELS: dict[str, dict] = {
    "fmnist-vit": dict(
        kwargs=dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=128, depth=6,
                    num_heads=4, mlp_ratio=4.0, qkv_bias=True, class_token=True, global_pool="token"),
        # Fashion-MNIST training-set statistics.
        data=dict(input_size=(1, 28, 28), mean=(0.2860,), std=(0.3530,), interpolation="bilinear",
                  crop_pct=1.0, crop_mode="center", num_classes=10),
    ),
}

DEFAULT_MODEL = "fmnist-vit"


def register_model(name: str, kwargs: dict, data: dict | None = None, distilled: bool = False) -> None:
    """Add a local model: VisionTransformer kwargs (+ its data config) under `name`."""
    in_chans = kwargs.get("in_chans", 3)
    size = kwargs.get("img_size", 224)
    data = data or dict(input_size=(in_chans, size, size), mean=(0.5,) * in_chans, std=(0.5,) * in_chans,
                        interpolation="bilinear", crop_pct=1.0, crop_mode="center")
    LOCAL_MODELS[name] = dict(kwargs=kwargs, data=data, distilled=distilled)


def list_model_names() -> list[str]:
    """Names --model accepts: the local ones plus timm's ViT-family names."""
    timm_names = [n for n in timm.list_models() if n.startswith(("vit_", "deit"))]
    return sorted(LOCAL_MODELS) + timm_names


def create_model(cfg: ModelConfig, pretrained: bool = False, checkpoint: str | Path | None = None,
                 **overrides) -> VisionTransformer:
    """Build the dense model named by cfg, optionally with hub weights or a checkpoint.

    overrides go to the constructor (e.g. drop_path_rate for training).
    Raises SlimError for unknown or unsupported models and for checkpoints that do not fit.
    """
    kwargs = {k: v for k, v in (("num_classes", cfg.num_classes), ("img_size", cfg.img_size),
                                ("in_chans", cfg.in_chans)) if v is not None}
    kwargs.update(overrides)
    if cfg.name in LOCAL_MODELS:
        if pretrained:
            raise SlimError(f"{cfg.name} has no pretrained weights: train it (slimdeploy train) or pass --checkpoint")
        entry = LOCAL_MODELS[cfg.name]
        cls = VisionTransformerDistilled if entry.get("distilled") else VisionTransformer
        model = cls(**{**entry["kwargs"], **kwargs})
        data = dict(entry["data"])
        data["input_size"] = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
        if model.patch_embed.proj.in_channels != len(data["mean"]):
            data["mean"] = data["mean"][:1] * model.patch_embed.proj.in_channels
            data["std"] = data["std"][:1] * model.patch_embed.proj.in_channels
        model.pretrained_cfg = data
    else:
        if not timm.is_model(cfg.name):
            raise SlimError(f"unknown model '{cfg.name}': use fmnist-vit or a timm ViT name such as "
                            "deit_small_patch16_224 (slimdeploy info --list)")
        try:
            model = timm.create_model(cfg.name, pretrained=pretrained, **kwargs)
        except SlimError:
            raise
        except Exception as e:  # noqa: BLE001 - hub/network/arg errors all become one line
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SlimError(f"cannot build '{cfg.name}': {msg[:200]}") from None
    check_supported(model, cfg.name)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def check_supported(model: nn.Module, name: str = "model") -> None:
    """Refuse models whose structure the masks, the pruner or the latency model do not cover."""
    if not isinstance(model, VisionTransformer):
        raise SlimError(f"'{name}' is a {type(model).__name__}, not a timm VisionTransformer: "
                        "slimdeploy supports ViT / DeiT / DeiT-III models")
    if model.attn_pool is not None or model.global_pool not in ("token", "avg"):
        raise SlimError(f"'{name}' uses global_pool='{model.global_pool}': only 'token' and 'avg' are supported")
    if model.dynamic_img_size:
        raise SlimError(f"'{name}' uses dynamic_img_size, which is not supported")
    if model.global_pool == "avg" and getattr(model, "pool_include_prefix", False):
        raise SlimError(f"'{name}' pools over prefix tokens, which is not supported")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block:
            raise SlimError(f"'{name}' block {i} is a {type(blk).__name__}: only timm's standard Block is supported")
        if type(blk.attn) is not Attention or not isinstance(blk.attn.norm, nn.Identity) or blk.attn.gate is not None:
            raise SlimError(f"'{name}' block {i} uses an attention variant (scale norm or gate) that is not supported")
        if type(blk.mlp) is not Mlp or not isinstance(blk.mlp.norm, nn.Identity):
            raise SlimError(f"'{name}' block {i} uses an MLP variant (GLU or scale norm) that is not supported")
        if not isinstance(blk.ls1, (nn.Identity, LayerScale)):
            raise SlimError(f"'{name}' block {i} uses an unsupported layer scale")


def arch_of(model: VisionTransformer) -> Arch:
    """Read the shape of a (supported) ViT off its modules."""
    blk = model.blocks[0]
    img = model.patch_embed.img_size
    return Arch(
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=blk.attn.num_heads,
        head_dim=blk.attn.head_dim,
        mlp_dim=blk.mlp.fc1.out_features,
        num_tokens=model.patch_embed.num_patches + model.num_prefix_tokens,
        num_prefix_tokens=model.num_prefix_tokens,
        patch_size=model.patch_embed.patch_size[0],
        img_size=img[0] if isinstance(img, (tuple, list)) else int(img),
        in_chans=model.patch_embed.proj.in_channels,
        num_classes=model.num_classes,
        global_pool=model.global_pool,
        qkv_bias=blk.attn.qkv.bias is not None,
        qk_norm=not isinstance(blk.attn.q_norm, nn.Identity),
        layer_scale=isinstance(blk.ls1, LayerScale),
        distilled=hasattr(model, "head_dist"),
        params=count_params(model),
    )


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load weights into model, with one clear line when they do not fit."""
    state = load_weights(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches (e.g. {k}: checkpoint {tuple(state[k].shape)} "
                         f"vs model {tuple(own[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise SlimError(f"checkpoint {path} does not match the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def data_config(model: nn.Module) -> dict:
    """The data config of the model as built (input size and channels as constructed, mean, std, interpolation,
    crop): timm's resolve_data_config reads the checkpoint's pretrained_cfg, whose input size timm never updates
    for --img-size / --in-chans."""
    import logging

    from timm.data.model_config import resolve_input_data_config

    timm_log = logging.getLogger("timm.data.model_config")
    level = timm_log.level
    timm_log.setLevel(logging.ERROR)  # it notes that it averaged the mean/std for other channel counts
    try:
        return resolve_input_data_config(model)
    finally:
        timm_log.setLevel(level)


# ---- run-directory model files: model.json + <name>.safetensors --------------------------------

def save_dense(model: VisionTransformer, cfg: ModelConfig, run_dir: str | Path, stem: str = "base") -> None:
    run_dir = Path(run_dir)
    save_weights(model.state_dict(), run_dir / f"{stem}.safetensors")
    write_json(run_dir / "model.json", {"schema": 1, "config": cfg.to_dict(), "arch": arch_of(model).to_dict(),
                                        "timm_version": timm.__version__})


def read_model_config(run_dir: str | Path) -> ModelConfig:
    d = read_json(Path(run_dir) / "model.json", "model description")
    return ModelConfig.from_dict(d.get("config", {}))


def load_dense(run_dir: str | Path, stem: str = "base") -> tuple[VisionTransformer, ModelConfig]:
    """Rebuild the dense model of a run directory from model.json + <stem>.safetensors."""
    cfg = read_model_config(run_dir)
    model = create_model(cfg, checkpoint=Path(run_dir) / f"{stem}.safetensors")
    return model, cfg


def resolve_model(model: str | None, checkpoint: str | None, pretrained: bool, num_classes: int | None,
                  img_size: int | None, in_chans: int | None, run_dir: str | Path | None = None,
                  ) -> tuple[VisionTransformer, ModelConfig]:
    """The model a command works on: a run directory's base model, or --model/--checkpoint/--pretrained."""
    if run_dir is not None and (Path(run_dir) / "model.json").is_file() and model is None:
        return load_dense(run_dir)
    cfg = ModelConfig(name=model or DEFAULT_MODEL, num_classes=num_classes, img_size=img_size, in_chans=in_chans)
    m = create_model(cfg, pretrained=pretrained, checkpoint=checkpoint)
    # record the resolved values so the model can be rebuilt without the hub config
    a = arch_of(m)
    cfg = ModelConfig(name=cfg.name, num_classes=a.num_classes, img_size=a.img_size, in_chans=a.in_chans)
    return m, cfg


@torch.no_grad()
def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
