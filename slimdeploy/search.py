"""Stage: single-shot mask search (ViT-Slim) over tokens, heads/head channels, MLP width and embedding width.

Weights and masks train together; loss = task loss + w_attn * |qk, v masks|_1 + w_mlp * |mlp|_1
+ w_tok * |tok|_1 (+ w_embed * |embed|_1 with --embed), with the paper's factors as defaults (not divided by
the number of processes).
Besides the mask values we record a first-order (Taylor) importance |m * dL_task/dm| averaged over
the last search epoch: it is in units of loss, so it compares across mask kinds (see select.py).
An attentive search also records `taylor.pos`: how much each patch position matters in each block, on the
searched weights, which the ranking mixes with the attention (SlimSpec.rank_prior).

Writes in the run directory: search/masks.safetensors, search/weights.safetensors (the searched
model), search/history.json, search/structure.png, search/checkpoint.pt (resume).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from . import dist
from .data import DataBundle, make_loader
from .defaults import TOKENS
from .errors import SlimError
from .fileio import save_weights, write_json
from .masks import UNIT_KINDS, MaskedViT, SearchDims, fold_masks
from .progress import log
from .runs import Run
from .trainer import Hooks, TrainConfig, fit
from .types import Arch

OUTPUTS = ["search/masks.safetensors", "search/weights.safetensors"]


@dataclass
class SearchConfig:
    w_attn: float = 2e-4
    w_mlp: float = 5e-5
    w_tok: float = 1e-4
    distill: bool = False
    tau: float = 1.0
    dims: SearchDims = None  # type: ignore[assignment]
    w_embed: float = 1e-4

    def __post_init__(self):
        if self.dims is None:
            self.dims = SearchDims()
        if min(self.w_attn, self.w_mlp, self.w_tok, self.w_embed) < 0:
            raise SlimError("mask factors (--w-attn, --w-mlp, --w-tok, --w-embed) must be >= 0")
        if not (self.dims.tokens or self.dims.attn or self.dims.mlp or self.dims.embed):
            raise SlimError("nothing to search: enable at least one of tokens, attention, MLP, embedding")

    def factor(self, kind: str) -> float:
        return {"qk": self.w_attn, "v": self.w_attn, "mlp": self.w_mlp, "tok": self.w_tok, "embed": self.w_embed}[kind]


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """Soft distillation: tau^2 * KL(softmax(teacher / tau) || softmax(student / tau)), batch mean."""
    return F.kl_div(F.log_softmax(student / tau, -1), F.log_softmax(teacher / tau, -1), reduction="batchmean",
                    log_target=True) * tau * tau


class TaylorImportance(Hooks):
    """Accumulates |m * dL_task/dm| per mask element; the L1 part of the gradient is taken out."""

    def __init__(self, masked: MaskedViT, scfg: SearchConfig):
        self.masked, self.scfg = masked, scfg
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.last: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def after_backward(self, model) -> None:
        for kind, p in self.masked.mask_params().items():
            if p.grad is None:
                continue
            unit = kind in UNIT_KINDS
            value = p.clamp(0, 1) if unit else p
            l1_grad = self.scfg.factor(kind) * (torch.sign(value) if not unit else (value > 0).to(p.dtype))
            if kind == "tok" and self.masked.attentive:
                l1_grad[0] = 0.0  # block 0's rank gates are neither used nor penalised
            score = (value * (p.grad - l1_grad)).abs()
            self.sums[kind] = self.sums.get(kind, 0) + score
        self.steps += 1

    def on_epoch_end(self, epoch, metrics) -> None:
        self.last = {k: (v / max(1, self.steps)).detach().cpu() for k, v in self.sums.items()}
        self.sums, self.steps = {}, 0

    def state(self):
        return {"last": self.last}

    def load_state(self, state):
        self.last = state.get("last", {})


def _param_groups(masked: MaskedViT, weight_decay: float) -> list[dict]:
    """Weights with timm's decay rule (no decay on 1-d params and embeddings); masks without decay."""
    no_decay_names = set(getattr(masked.vit, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for n, p in masked.vit.named_parameters():
        (no_decay if p.ndim <= 1 or n in no_decay_names else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0},
            {"params": list(masked.mask_params().values()), "weight_decay": 0.0}]


def search(model: VisionTransformer, data: DataBundle, tcfg: TrainConfig, scfg: SearchConfig, run_dir: str | Path,
           resume: bool = False, torch_device: str = "auto") -> dict:
    """Run the mask search on `model` (modified in place) and write the search artifacts."""
    run_dir = Path(run_dir)
    out = run_dir / "search"
    masked = MaskedViT(model, scfg.dims)
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if scfg.distill else None

    def loss_fn(logits, x, y):
        if teacher is not None:
            with torch.no_grad():
                teacher.to(x.device)
                t = teacher(x)
            task = kd_loss(logits, t, scfg.tau)
        else:
            task = (-(y * F.log_softmax(logits, -1)).sum(-1).mean() if y.ndim == 2
                    else F.cross_entropy(logits, y))
        l1 = masked.l1()
        penalty = sum(scfg.factor(k) * v for k, v in l1.items())
        return task + penalty, {"task": task.detach(), "l1": penalty.detach()}

    hooks = TaylorImportance(masked, scfg)
    history = fit(masked, loss_fn, data, tcfg, out / "checkpoint.pt", resume=resume,
                  param_groups=_param_groups(masked, tcfg.weight_decay), hooks=hooks, desc="search",
                  torch_device=torch_device)
    masks = export_masks(masked, hooks.last)
    if dist.setup().is_main:
        if masked.attentive:
            masks["taylor.pos"] = position_importance(fold_masks(masked), data, tcfg.batch_size, torch_device)
        meta = {"config": json.dumps(config_record(scfg)),
                "arch": json.dumps(masked.arch.to_dict())}
        save_weights(masks, out / "masks.safetensors", metadata=meta)
        save_weights(masked.vit.state_dict(), out / "weights.safetensors")
        write_json(out / "history.json", history)
        from .plots import plot_search_structure

        plot_search_structure(masks, masked.arch, out / "structure.png")
    dist.barrier()
    return {"history": history, "masks": masks}


def position_importance(vit: VisionTransformer, data: DataBundle, batch_size: int, torch_device: str = "auto",
                        images: int = TOKENS["prior_images"]) -> torch.Tensor:
    """(depth, num_patches): |dL/dg| of a gate at 1 on each patch token at each block's input (cross-entropy on
    the labels), summed over about `images` training images (with the evaluation transform). First-order, like
    the masks' Taylor scores; it needs no mask of its own, so the search is unchanged."""
    log(f"search: the patch positions' importance, on {images} training images")
    device = dist.resolve_device(torch_device)
    vit = vit.to(device).eval()
    P, depth = vit.num_prefix_tokens, len(vit.blocks)
    gate = torch.ones(depth, vit.patch_embed.num_patches + P, device=device, requires_grad=True)
    total = torch.zeros(depth, gate.shape[1])
    seen = 0
    for xb, yb in make_loader(data.train_eval, data.transform, batch_size, True):
        xb, yb = xb.to(device), yb.to(device)
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(xb)))
        for i, blk in enumerate(vit.blocks):
            x = blk(x * gate[i][None, :, None])
        logits = vit.forward_head(vit.norm(x))
        loss = F.cross_entropy(logits, yb) if yb.ndim == 1 else -(yb * F.log_softmax(logits, -1)).sum(-1).mean()
        (g,) = torch.autograd.grad(loss, gate)
        total += g.abs().cpu()
        seen += xb.shape[0]
        if seen >= images:
            break
    return total[:, P:].contiguous()


def config_record(scfg: SearchConfig) -> dict:
    """The search's config as recorded; without the embedding's keys when it is not searched, so that a search
    made before the embedding could be searched stays current."""
    d = {**asdict(scfg), "dims": asdict(scfg.dims)}
    if not scfg.dims.embed:
        del d["w_embed"], d["dims"]["embed"]
    return d


def search_run(run_dir: str | Path, data: DataBundle, scfg: SearchConfig, tcfg: TrainConfig,
               torch_device: str = "auto") -> dict | None:
    """The search stage on a run directory's base model: skipped when current, resumed when interrupted."""
    r = Run(run_dir)
    inputs = r.inputs({"search": config_record(scfg), "train": asdict(tcfg), "data": data.key},
                          [r / "base.safetensors"])
    if r.current("search", inputs, OUTPUTS):
        return None
    model, _ = r.base()
    r.restart_if_changed("search", inputs, ["search/checkpoint.pt"])
    res = search(model, data, tcfg, scfg, run_dir, resume=True, torch_device=torch_device)
    if dist.setup().is_main:
        r.finished("search", inputs, OUTPUTS)
    return res


@torch.no_grad()
def export_masks(masked: MaskedViT, taylor: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mask values (tokens and embedding clamped to [0, 1]) and Taylor scores, as a flat dict of CPU tensors."""
    out = {}
    for kind, p in masked.mask_params().items():
        out[kind] = (p.clamp(0, 1) if kind in UNIT_KINDS else p).detach().cpu().clone()
        if kind in taylor:
            out[f"taylor.{kind}"] = taylor[kind].clone()
    if masked.dims.shared_qkv and "qk" in out:
        out["v"] = out["qk"].clone()
        if "taylor.qk" in out:
            out["taylor.v"] = out["taylor.qk"].clone()
    return out


def mask_shapes(a: Arch) -> dict[str, tuple[int, ...]]:
    return {"qk": (a.depth, a.num_heads, a.head_dim), "v": (a.depth, a.num_heads, a.head_dim),
            "mlp": (a.depth, a.mlp_dim), "tok": (a.depth, a.num_patches), "embed": (a.embed_dim,),
            "pos": (a.depth, a.num_patches)}


def load_masks(run_dir: str | Path, arch: Arch | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The masks a search wrote, with its config; checked against `arch` (default: the run's model)."""
    from safetensors import SafetensorError, safe_open

    from .models import read_model_config

    path = Path(run_dir) / "search" / "masks.safetensors"
    if not path.is_file():
        raise SlimError(f"{path} not found: run 'slimdeploy search' first")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        cfg = json.loads(meta.get("config", "{}"))
        cfg["arch"] = Arch.from_dict(json.loads(meta["arch"])) if "arch" in meta else None
        masks = load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise SlimError(f"cannot read {path}: {str(e).splitlines()[0][:200]}: run the search again") from None
    if arch is None and (Path(run_dir) / "model.json").is_file():
        from .models import arch_of, create_model

        arch = arch_of(create_model(read_model_config(run_dir)))
    if arch is not None:
        want = mask_shapes(arch)
        for kind, t in masks.items():
            base = kind.removeprefix("taylor.")
            if base in want and tuple(t.shape) != want[base]:
                raise SlimError(f"{path}: {kind} has shape {tuple(t.shape)}, but this run's model needs "
                                f"{want[base]}: the masks are from another model; run the search again")
            if not torch.isfinite(t).all():
                raise SlimError(f"{path}: {kind} holds NaN or inf: run the search again")
    return masks, cfg
