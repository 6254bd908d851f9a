"""The run directory: where each stage finds its inputs and leaves its artifacts (see DESIGN.md)."""

from __future__ import annotations

from pathlib import Path

from timm.models.vision_transformer import VisionTransformer

from .errors import SlimError
from .models import arch_of, create_model, load_dense, save_dense
from .types import ModelConfig, SlimSpec


class Run:
    """Paths of one run directory."""

    def __init__(self, path: str | Path):
        self.dir = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.dir / name

    @property
    def has_base(self) -> bool:
        return (self.dir / "model.json").is_file() and (self.dir / "base.safetensors").is_file()

    @property
    def has_search(self) -> bool:
        return (self.dir / "search" / "masks.safetensors").is_file()

    def spec(self) -> SlimSpec:
        p = self.dir / "spec.json"
        if not p.is_file():
            raise SlimError(f"{p} not found: run 'slimdeploy select' first (or pass --spec)")
        return SlimSpec.load(p)

    def base(self) -> tuple[VisionTransformer, ModelConfig]:
        if not self.has_base:
            raise SlimError(f"{self.dir} has no base model (model.json + base.safetensors): run 'slimdeploy train' "
                            "or pass --model/--checkpoint")
        return load_dense(self.dir)

    def ensure_base(self, model: str | None, checkpoint: str | Path | None, pretrained: bool,
                    num_classes: int | None, img_size: int | None, in_chans: int | None
                    ) -> tuple[VisionTransformer, ModelConfig]:
        """The run's base model; created from --model/--checkpoint/--pretrained on first use."""
        if self.has_base:
            m, cfg = self.base()
            if model is not None and model != cfg.name:
                raise SlimError(f"{self.dir} holds a run of {cfg.name}, not {model}: choose another run directory")
            return m, cfg
        if checkpoint is None and not pretrained:
            raise SlimError(f"{self.dir} has no base model: pass --checkpoint or --pretrained, or train one first "
                            "(slimdeploy train / slimdeploy run trains one when there is no checkpoint)")
        cfg = ModelConfig(name=model or "fmnist-vit", num_classes=num_classes, img_size=img_size, in_chans=in_chans)
        m = create_model(cfg, pretrained=pretrained, checkpoint=checkpoint)
        a = arch_of(m)
        cfg = ModelConfig(cfg.name, a.num_classes, a.img_size, a.in_chans)
        save_dense(m, cfg, self.dir)
        return m, cfg
