"""`slimdeploy run`: train (if needed) -> search -> select -> prune -> retrain -> export -> verify.

Each stage skips itself when its artifacts are current (same inputs, recorded in run.json), runs again when its
inputs changed (and says so), and the training stages resume from their last epoch: re-running the same command
after a crash, Ctrl-C or kill continues where it stopped. One process holds the run directory at a time.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from . import dist
from .defaults import RETRAIN, RUN, SEARCH, SELECT, TOKENS, TRAIN
from .progress import log
from .select.target import Target

STAGES = ("train", "search", "select", "prune", "retrain", "export", "quantize", "verify")


@dataclass
class RunOptions:
    out: Path
    target: Target
    device: str | None = RUN["device"]
    profiles_dir: Path | None = None
    model: str | None = None
    checkpoint: Path | None = None
    pretrained: bool = False
    num_classes: int | None = None
    img_size: int | None = None
    in_chans: int | None = None
    data: str = "fashion-mnist"
    train_limit: int | None = None
    val_limit: int | None = None
    batch_size: int = TRAIN["batch_size"]
    train_epochs: int = TRAIN["epochs"]
    train_lr: float = TRAIN["lr"]
    label_smoothing: float = TRAIN["label_smoothing"]
    search_epochs: int = SEARCH["epochs"]
    search_lr: float = SEARCH["lr"]
    w_attn: float = SEARCH["w_attn"]
    w_mlp: float = SEARCH["w_mlp"]
    w_tok: float = SEARCH["w_tok"]
    w_embed: float = SEARCH["w_embed"]
    search_tokens: bool = True
    search_embed: bool = False  # the embedding width (selection follows what the search searched)
    token_mode: str = "static"  # static | attentive (search, and so selection, pruning and export)
    importance: str = "auto"
    prior_weight: float = TOKENS["prior_weight"]  # attentive mode: the positions' prior in the ranking
    verify_latency: bool = True
    rounds: int = SELECT["rounds"]
    calibration_images: int | None = None  # default: SELECT's, at most half the training images
    recovery_steps: int | None = None  # default: SELECT's when retraining follows, else 0
    retrain_epochs: int = RETRAIN["epochs"]
    retrain_lr: float = RETRAIN["lr"]
    distill: str = RETRAIN["distill"]
    alpha: float = RETRAIN["alpha"]
    tau: float = RETRAIN["tau"]
    trt: bool = False
    precision: str | None = None  # default: the profile's (int8 adds the quantize stage)
    quant: object = None  # QuantConfig of the quantize stage (default: its defaults)
    backend: str | None = None  # verify backend; default: the profile's
    max_drop: float | None = RUN["max_drop"]
    seed: int = 0
    torch_device: str = "auto"
    measure: object = None  # replaces the device measurement of the closed loop (tests)


def run_pipeline(o: RunOptions) -> dict | None:
    """Run every stage whose artifacts are not current; return the final report as a dict (rank 0)."""
    from .data import first_batch
    from .export import export_run
    from .masks import SearchDims
    from .prune import prune_run
    from .quantize import QuantConfig, quantize_run
    from .retrain import DistillConfig, retrain_run
    from .runs import Run
    from .search import SearchConfig, search_run
    from .select.stage import SelectOptions, select_run
    from .train import train_run
    from .trainer import TrainConfig
    from .verify import verify_run

    ctx = dist.setup(o.torch_device)
    r = Run(o.out)
    with r.lock() if ctx.is_main else nullcontext():
        step = _stages(ctx.is_main)
        step("train")
        cfg, data = _base_and_data(o, r)
        _check_device(o, cfg)  # a missing or unfitting profile fails now, not after training
        if not o.checkpoint and not o.pretrained:
            train_run(o.out, cfg, data, TrainConfig(epochs=o.train_epochs, batch_size=o.batch_size, lr=o.train_lr,
                                                    label_smoothing=o.label_smoothing, seed=o.seed), o.torch_device)
        step("search")
        dims = SearchDims(tokens=o.search_tokens, token_mode=o.token_mode, embed=o.search_embed)
        search_run(o.out, data, SearchConfig(o.w_attn, o.w_mlp, o.w_tok, dims=dims, w_embed=o.w_embed),
                   TrainConfig(epochs=o.search_epochs, batch_size=o.batch_size, lr=o.search_lr, min_lr=o.search_lr,
                               weight_decay=SEARCH["weight_decay"], warmup_epochs=0.0, clip_grad=None, seed=o.seed),
                   o.torch_device)
        step("select")
        recovery = o.recovery_steps if o.recovery_steps is not None else (
            SELECT["recovery_steps"] if o.retrain_epochs > 0 else 0)
        _on_main(lambda: select_run(o.out, o.target, data, o.device, o.profiles_dir, SelectOptions(
            o.importance, o.verify_latency, o.rounds, o.calibration_images, recovery, precision=o.precision,
            prior_weight=o.prior_weight),
            measure=o.measure))
        step("prune")
        _on_main(lambda: prune_run(o.out, first_batch(data, 16)))
        step("retrain")
        retrain_run(o.out, data, TrainConfig(epochs=o.retrain_epochs, batch_size=o.batch_size, lr=o.retrain_lr,
                                             warmup_epochs=RETRAIN["warmup_epochs"], seed=o.seed),
                    DistillConfig(o.distill, o.alpha, o.tau), o.torch_device)
        step("export")
        trt, precision, batch = deployment(r, o)
        calibration = None
        if trt and precision == "int8":
            from .quantize import calibration_batches

            calibration = calibration_batches(data, (o.quant or QuantConfig()).images, batch or 1)[0][0]
        _on_main(lambda: export_run(o.out, trt=trt, precision=precision, batch_size=batch, calibration=calibration))
        step("quantize")
        if precision == "int8" and not trt:
            _on_main(lambda: quantize_run(o.out, data, o.quant))
        else:
            log(f"quantize: nothing to do at {precision}", ctx.is_main)
        step("verify")
        report = _on_main(lambda: verify_run(o.out, data, o.backend or ("trt" if o.trt else None),
                                             torch_device=o.torch_device, max_drop=o.max_drop))
    return report.to_dict() | {"passed": report.passed, "failures": report.failures()} if report else None


def _stages(main: bool):
    count = iter(range(1, len(STAGES) + 1))

    def step(name: str) -> None:
        log(f"[bold]\\[{next(count)}/{len(STAGES)}] {name}[/bold]", main)
    return step


def _on_main(fn):
    """Run fn on rank 0 only (the stages that measure latency or write one file), then wait for it."""
    out = fn() if dist.setup().is_main else None
    dist.barrier()
    return out


def _base_and_data(o: RunOptions, r):
    """The run's model config (a base model written from --checkpoint/--pretrained on first use) and its data."""
    from .data import load_data
    from .models import arch_of, create_model, data_config, read_model_config
    from .types import ModelConfig

    if r.has_base or o.checkpoint or o.pretrained:
        if dist.setup().is_main:
            r.ensure_base(o.model, o.checkpoint, o.pretrained, o.num_classes, o.img_size, o.in_chans)
        dist.barrier()
        cfg = read_model_config(o.out)
        if o.model is not None and o.model != cfg.name:
            from .errors import SlimError

            raise SlimError(f"{o.out} holds a run of {cfg.name}, not {o.model}: choose another run directory")
    else:
        cfg = ModelConfig(o.model or "fmnist-vit", o.num_classes, o.img_size, o.in_chans)
    model = create_model(cfg)
    a = arch_of(model)
    cfg = ModelConfig(cfg.name, a.num_classes, a.img_size, a.in_chans)
    return cfg, load_data(o.data, data_config(model), a.num_classes, o.train_limit, o.val_limit)


def _check_device(o: RunOptions, cfg) -> None:
    if o.target.kind != "latency" or o.device in (None, "local"):
        return
    from .latency.model import LatencyModel, check_profile_fits
    from .models import arch_of, create_model

    check_profile_fits(LatencyModel.load(o.device, o.profiles_dir).profile, arch_of(create_model(cfg)),
                       precision=None if o.precision == "auto" else o.precision)


def deployment(r, o: RunOptions) -> tuple[bool, str, int | None]:
    """How to export: what the structure was selected for (its profile's backend, precision and batch size, so
    that the exported graph is the one the closed loop measured), else the options; a dynamic batch axis
    without a profile."""
    from .types import DeviceProfile

    path = r.spec().meta.get("profile_path")
    if not (path and Path(path).is_file()):
        return o.trt, o.precision or "fp32", None
    p = DeviceProfile.load(path)
    return o.trt or p.backend == "trt", p.precision, p.batch_size
