"""The `slimdeploy` command line: thin typer commands over the stage functions.

Commands only parse arguments, call one stage function and print. Every user error is one line on stderr and exit
code 2; a verification that fails (parity, the accuracy guard, the latency target) prints why and exits 1.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from .defaults import PROFILE, RETRAIN, RUN, SEARCH, SELECT, TOKENS, TRAIN
from .errors import SlimError

try:  # typer >= 0.25 vendors its own click
    from typer._click import exceptions as _typer_click
except ImportError:  # pragma: no cover
    _typer_click = click.exceptions
_USAGE = (click.exceptions.UsageError, _typer_click.UsageError)
_ABORT = (click.exceptions.Abort, getattr(typer, "Abort", click.exceptions.Abort))
_EXIT = (click.exceptions.Exit, typer.Exit)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn a trained vision transformer into a smaller model that meets a latency target "
                       "on a real device: search, select, prune, retrain, export, verify.")
out = Console()

# ---- shared options --------------------------------------------------------------------------
ModelOpt = Annotated[Optional[str], typer.Option("--model", help="fmnist-vit or a timm ViT/DeiT name "
                                                 "(default: the run's model, else fmnist-vit)")]
CheckpointOpt = Annotated[Optional[Path], typer.Option("--checkpoint", help="weights: .safetensors or a torch "
                                                       "state dict (loaded with weights_only=True)")]
PretrainedOpt = Annotated[bool, typer.Option("--pretrained", help="timm hub weights (needs internet)")]
NumClassesOpt = Annotated[Optional[int], typer.Option("--num-classes", min=1, help="classifier outputs")]
TokenModeOpt = Annotated[str, typer.Option(
    help="static: the same token positions for every image; attentive: per image, the tokens the class token "
         "attends to most, at counts chosen against latency; fused: attentive, with the dropped tokens fused into "
         "one (EViT)")]
EmbedOpt = Annotated[bool, typer.Option(
    "--embed/--no-embed", help="also search the embedding width (the residual stream's channels, shared by every "
                               "block); selection then chooses it with the rest")]
WEmbedOpt = Annotated[float, typer.Option(help="L1 factor of the embedding mask")]
ImgSizeOpt = Annotated[Optional[int], typer.Option("--img-size", min=1, help="input resolution (pixels)")]
InChansOpt = Annotated[Optional[int], typer.Option("--in-chans", min=1, help="input channels")]
DataOpt = Annotated[str, typer.Option("--data", help="fashion-mnist, fashion-mnist-shifted (items anywhere on a "
                                      "56x56 canvas: use --img-size 56; fashion-mnist-shifted-N: an NxN canvas), "
                                      "synthetic, or a folder with train/ and val/ "
                                      "in ImageNet layout")]
TrainLimitOpt = Annotated[Optional[int], typer.Option("--train-limit", help="use the first N training images")]
ValLimitOpt = Annotated[Optional[int], typer.Option("--val-limit", help="use the first N evaluation images")]
TorchDeviceOpt = Annotated[str, typer.Option("--torch-device", help="where to train: auto, cpu, cuda[:N]")]
RunArg = Annotated[Path, typer.Argument(help="run directory")]
ProfilesDirOpt = Annotated[Optional[Path], typer.Option("--profiles-dir", help="look for device profiles here first "
                                                        "(default: ~/.slimdeploy/profiles), then in the shipped ones")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="'local' (this machine, measured once and "
                                                  "cached), a profile name, or a profile .json")]
TargetLatencyOpt = Annotated[Optional[str], typer.Option("--target-latency", help="5ms, 5 (ms), 500us, 0.005s, or "
                                                         "60% of the dense model's latency measured on the device")]
TargetMacsOpt = Annotated[Optional[str], typer.Option("--target-macs", help="instead of latency: e.g. 2.3G")]
TargetParamsOpt = Annotated[Optional[str], typer.Option("--target-params", help="instead of latency: e.g. 12M")]
MaxDropOpt = Annotated[Optional[float], typer.Option("--max-drop", help="fail (exit 1) when top-1 falls more than "
                                                     "this many points below the dense model's")]
PrecisionOpt = Annotated[Optional[str], typer.Option("--precision", help="fp32, int8 (ort-cpu), bf16 (torch), fp16 "
                                                     "(torch on cuda, trt), or auto (the profiled precision whose "
                                                     "best structure scores best); default: the profile's")]
CalibrationMethodOpt = Annotated[str, typer.Option("--calibration-method", help="int8 calibration: minmax, entropy "
                                                   "or percentile")]
PriorWeightOpt = Annotated[float, typer.Option("--prior-weight", min=0.0, max=1.0, help="attentive tokens: weight "
                                               "of the search's per-position importance against the attention "
                                               "when a block ranks its tokens (0: attention alone)")]
QuantImagesOpt = Annotated[int, typer.Option("--quant-images", min=1, help="training images int8 is calibrated on")]


def handle_errors(fn):
    """One line and exit 2 for user errors; a hint and exit 130 on Ctrl-C."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SlimError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: run the same command again to continue", err=True)
            raise typer.Exit(130) from None
    return wrapper


def _data(model, data, train_limit, val_limit, with_train: bool = True):
    from .data import load_data
    from .models import arch_of, data_config

    return load_data(data, data_config(model), arch_of(model).num_classes, train_limit, val_limit, with_train)


def _warn(warnings) -> None:
    for w in warnings:
        typer.echo(f"warning: {w}", err=True)


# ---- train -----------------------------------------------------------------------------------
@app.command()
@handle_errors
def train(
    out_dir: Annotated[Path, typer.Option("--out", help="run directory to write")] = Path("runs/train"),
    model: ModelOpt = None, num_classes: NumClassesOpt = None, img_size: ImgSizeOpt = None,
    in_chans: InChansOpt = None,
    data: DataOpt = "fashion-mnist", train_limit: TrainLimitOpt = None, val_limit: ValLimitOpt = None,
    epochs: Annotated[int, typer.Option(min=0, help="training epochs")] = TRAIN["epochs"],
    batch_size: Annotated[int, typer.Option(min=1, help="global batch size")] = TRAIN["batch_size"],
    lr: Annotated[float, typer.Option(help="peak learning rate (AdamW)")] = TRAIN["lr"],
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay")] = TRAIN["weight_decay"],
    warmup_epochs: Annotated[float, typer.Option(help="linear warm-up, in epochs")] = TRAIN["warmup_epochs"],
    label_smoothing: Annotated[float, typer.Option(help="label smoothing")] = TRAIN["label_smoothing"],
    drop_path: Annotated[float, typer.Option(help="stochastic depth rate")] = 0.0,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    workers: Annotated[int, typer.Option(min=0, help="data loader workers")] = 0,
    torch_device: TorchDeviceOpt = "auto",
):
    """Train a dense model (for a model without a checkpoint, e.g. the embedded fmnist-vit). Resumes."""
    from .models import arch_of, create_model
    from .runs import Run
    from .train import train_run
    from .trainer import TrainConfig
    from .types import ModelConfig

    cfg = ModelConfig(name=model or "fmnist-vit", num_classes=num_classes, img_size=img_size, in_chans=in_chans)
    m = create_model(cfg)
    a = arch_of(m)
    cfg = ModelConfig(cfg.name, a.num_classes, a.img_size, a.in_chans)
    tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                       warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, seed=seed, workers=workers)
    with Run(out_dir).lock():
        history = train_run(out_dir, cfg, _data(m, data, train_limit, val_limit), tcfg, torch_device, drop_path)
    if history:
        out.print(f"trained {cfg.name}: top-1 {history[-1]['top1']:.2f}% after {len(history)} epochs -> {out_dir}")


# ---- info ------------------------------------------------------------------------------------
@app.command()
@handle_errors
def info(
    model: ModelOpt = None, checkpoint: CheckpointOpt = None, num_classes: NumClassesOpt = None,
    img_size: ImgSizeOpt = None, in_chans: InChansOpt = None,
    run: Annotated[Optional[Path], typer.Option("--run", help="a run directory (its model, or its slim model)")] = None,
    latency: Annotated[bool, typer.Option("--latency", help="measure ONNX Runtime CPU latency")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="batch size for --latency")] = 1,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads for --latency")] = 1,
    list_models: Annotated[bool, typer.Option("--list", help="list the model names --model accepts")] = False,
):
    """Per-block dimensions, parameters and MACs (and --latency) of a model or a run's slim model."""
    from .info import describe

    if list_models:
        from .models import list_model_names

        out.print("\n".join(list_model_names()))
        return
    d = describe(model, checkpoint, num_classes, img_size, in_chans, run, latency, batch_size, threads)
    table = Table(title=f"{d['name']} ({d['kind']})")
    for col in ("block", "tokens", "heads", "qk/head", "v/head", "mlp", "MMACs", "params"):
        table.add_column(col, justify="right")
    for i, b in enumerate(d["blocks"]):
        table.add_row(str(i), str(b["tokens"]), str(b["heads"]), str(b["qk"]), str(b["v"]), str(b["mlp"]),
                      f"{b['macs'] / 1e6:.1f}", f"{b['params']:,}")
    out.print(table)
    out.print(f"embed dim {d['embed_dim']}, {d['num_tokens']} tokens ({d['num_prefix_tokens']} prefix), "
              f"{d['num_classes']} classes")
    out.print(f"params {d['params'] / 1e6:.2f} M, MACs {d['macs'] / 1e9:.3f} G per image")
    if d.get("latency"):
        t = d["latency"]
        out.print(f"ONNX Runtime CPU latency (batch {batch_size}, {threads} thread(s)): median {t['median_ms']:.3f} ms "
                  f"(95% interval {t['low_ms']:.3f}-{t['high_ms']:.3f}, {t['rounds']} interleaved rounds, "
                  f"{t['calls']} calls)")


# ---- search ----------------------------------------------------------------------------------
@app.command()
@handle_errors
def search(
    run: RunArg,
    model: ModelOpt = None, checkpoint: CheckpointOpt = None, pretrained: PretrainedOpt = False,
    num_classes: NumClassesOpt = None, img_size: ImgSizeOpt = None, in_chans: InChansOpt = None,
    data: DataOpt = "fashion-mnist", train_limit: TrainLimitOpt = None, val_limit: ValLimitOpt = None,
    epochs: Annotated[int, typer.Option(min=0, help="search epochs")] = SEARCH["epochs"],
    batch_size: Annotated[int, typer.Option(min=1, help="global batch size")] = TRAIN["batch_size"],
    lr: Annotated[float, typer.Option(help="learning rate for weights and masks (AdamW)")] = SEARCH["lr"],
    weight_decay: Annotated[float, typer.Option(help="weight decay (never on masks)")] = SEARCH["weight_decay"],
    w_attn: Annotated[float, typer.Option(help="L1 factor of the attention masks")] = SEARCH["w_attn"],
    w_mlp: Annotated[float, typer.Option(help="L1 factor of the MLP masks")] = SEARCH["w_mlp"],
    w_tok: Annotated[float, typer.Option(help="L1 factor of the token masks")] = SEARCH["w_tok"],
    w_embed: WEmbedOpt = SEARCH["w_embed"],
    tokens: Annotated[bool, typer.Option("--tokens/--no-tokens", help="search tokens")] = True,
    attn: Annotated[bool, typer.Option("--attn/--no-attn", help="search heads and head channels")] = True,
    mlp: Annotated[bool, typer.Option("--mlp/--no-mlp", help="search MLP units")] = True,
    shared_qkv: Annotated[bool, typer.Option("--shared-qkv", help="one mask for q, k and v (ViT-Slim)")] = False,
    token_mode: TokenModeOpt = "static",
    embed: EmbedOpt = False,
    distill: Annotated[bool, typer.Option("--distill", help="task loss: distillation from the unmasked model")] = False,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    torch_device: TorchDeviceOpt = "auto",
):
    """Single-shot mask search (ViT-Slim) over tokens, heads, head channels, MLP units and (--embed) the embedding
    width. Resumes."""
    from .masks import SearchDims
    from .runs import Run
    from .search import SearchConfig, search_run
    from .trainer import TrainConfig

    scfg = SearchConfig(w_attn, w_mlp, w_tok, distill, dims=SearchDims(tokens, attn, mlp, shared_qkv, token_mode,
                                                                        embed), w_embed=w_embed)
    tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, min_lr=lr, weight_decay=weight_decay,
                       warmup_epochs=0.0, seed=seed, clip_grad=None)
    r = Run(run)
    with r.lock():
        m, cfg = r.ensure_base(model, checkpoint, pretrained, num_classes, img_size, in_chans)
        res = search_run(run, _data(m, data, train_limit, val_limit), scfg, tcfg, torch_device)
    if res and res["history"]:
        out.print(f"searched {cfg.name}: top-1 with soft masks {res['history'][-1]['top1']:.2f}% -> {run}/search")


# ---- profile / predict -----------------------------------------------------------------------
@app.command()
@handle_errors
def profile(
    device: Annotated[str, typer.Option("--device", help="name of the profile (e.g. a100), or 'local' for the "
                                        "cached profile of this machine")],
    backend: Annotated[str, typer.Option(help="ort-cpu, ort-cuda, trt or torch")] = "ort-cpu",
    model: ModelOpt = None, img_size: ImgSizeOpt = None, num_classes: NumClassesOpt = None,
    in_chans: InChansOpt = None,
    batch_size: Annotated[int, typer.Option(min=1, help="deployment batch size")] = 1,
    precision: Annotated[str, typer.Option(help="fp32, int8 (ort-cpu: the pieces quantized), bf16 (torch), fp16 "
                                           "(torch on cuda, trt)")] = "fp32",
    threads: Annotated[int, typer.Option(min=1, help="CPU threads (ort-cpu, torch on cpu)")] = 1,
    step: Annotated[int, typer.Option(min=1, help="width resolution of the tables (channels)")] = PROFILE["step"],
    token_points: Annotated[int, typer.Option(min=1, help="token counts measured per table")] = PROFILE[
        "token_points"],
    calibration_models: Annotated[int, typer.Option(min=1, help="whole models measured for calibration")] = PROFILE[
        "calibration_models"],
    torch_device: TorchDeviceOpt = "auto",
    torch_mode: Annotated[str, typer.Option(help="torch backend: eager, compile (torch.compile) or graph (CUDA "
                                            "graphs)")] = "eager",
    profiles_dir: ProfilesDirOpt = None,
    out_file: Annotated[Optional[Path], typer.Option("--out", help="profile file to write")] = None,
    fold: Annotated[Optional[list[Path]], typer.Option("--fold", help="instead of measuring: refit the profile's "
                                                      "calibration with these runs' closed-loop measurements")] = None,
):
    """Measure per-layer latency tables and their calibration on this machine; write a device profile."""
    from .latency.backends import get_backend
    from .latency.model import steadiness_warning, user_profiles_dir
    from .latency.profile import fold_runs, local_profile_path, profile_device
    from .models import arch_of, resolve_model

    if fold:
        from .latency.model import resolve_profile
        from .runs import Run

        if out_file:
            path = out_file
        elif device == "local":  # the local profile the runs were selected on
            path = Path(Run(fold[0]).spec().meta.get("profile_path") or "")
            if not path.is_file():
                raise SlimError(f"{fold[0]} records no local profile: pass --out PROFILE.json")
        else:
            path = resolve_profile(device, profiles_dir)
        prof = fold_runs(path, fold)
        cal = prof.calibration
        out.print(f"profile {path}: calibration refitted on {len(cal['points'])} whole models, fit error median "
                  f"{100 * cal['fit_median_abs_error']:.1f}%, max {100 * cal['fit_max_abs_error']:.1f}%")
        return
    m, cfg = resolve_model(model, None, False, num_classes, img_size, in_chans)
    be = get_backend(backend, threads=threads, precision=precision, torch_device=torch_device, torch_mode=torch_mode)
    if out_file:
        path = out_file
    elif device == "local":
        path = local_profile_path(be, arch_of(m), batch_size, profiles_dir)
    else:
        path = (Path(profiles_dir) if profiles_dir else user_profiles_dir()) / f"{device}.json"
    prof = profile_device(device, be, m, cfg, batch_size, path, step, token_points, calibration_models)
    cal = prof.calibration
    out.print(f"profile '{device}' ({prof.hardware}, {prof.backend} {prof.backend_version}, batch {batch_size}, "
              f"{prof.precision}) in {prof.seconds:.0f} s -> {path}")
    out.print(f"calibration on {len(cal['points'])} whole models: fit error median "
              f"{100 * cal['fit_median_abs_error']:.1f}%, max {100 * cal['fit_max_abs_error']:.1f}%")
    _warn(filter(None, [steadiness_warning(prof)]))
    if cal.get("per_mb"):
        out.print(f"weights streamed from memory: {1 / cal['per_mb']:.0f} GB/s (they outgrow the caches)")
    if cal.get("pairs"):
        out.print(f"a ranking adds {1e3 * cal['per_rank']:.1f} us (attentive) and {1e3 * cal['per_fuse']:.1f} us "
                  f"(fused) to its pieces in a whole model ({len(cal['pairs'])} ranked models beside static twins)")


@app.command()
@handle_errors
def predict(
    target: Annotated[Path, typer.Argument(help="a run directory (its spec.json) or a spec.json file")],
    device: Annotated[str, typer.Option("--device", help="'local', a profile name or a profile .json")],
    profiles_dir: ProfilesDirOpt = None,
):
    """Predicted latency of a slim model (spec) on a profiled device."""
    from .analysis import spec_macs, spec_params
    from .latency.profile import load_latency_model
    from .models import create_model
    from .types import SlimSpec

    s = SlimSpec.load(target / "spec.json" if target.is_dir() else target)
    lm, warnings = load_latency_model(device, create_model(s.source), s.source, profiles_dir=profiles_dir)
    _warn(warnings)
    dense = SlimSpec.dense(s.source, s.arch)
    out.print(f"predicted latency on '{device}' ({lm.profile.backend}, batch {lm.profile.batch_size}): "
              f"{lm.predict(s):.3f} ms (dense {lm.predict(dense):.3f} ms); {spec_macs(s) / 1e6:.1f} MMACs, "
              f"{spec_params(s) / 1e6:.3f} M params")


# ---- select ----------------------------------------------------------------------------------
@app.command()
@handle_errors
def select(
    run: RunArg,
    target_latency: TargetLatencyOpt = None, target_macs: TargetMacsOpt = None, target_params: TargetParamsOpt = None,
    keep_attn: Annotated[Optional[float], typer.Option(help="ViT-Slim rule: kept fraction of attention channels")
                         ] = None,
    keep_mlp: Annotated[Optional[float], typer.Option(help="ViT-Slim rule: kept fraction of MLP units")] = None,
    keep_tokens: Annotated[Optional[float], typer.Option(help="ViT-Slim rule: kept fraction of tokens")] = None,
    keep_embed: Annotated[Optional[float], typer.Option(help="kept fraction of the embedding width (with the ViT-Slim "
                                                        "rule; needs a search with --embed)")] = None,
    device: DeviceOpt = None, profiles_dir: ProfilesDirOpt = None,
    data: DataOpt = "fashion-mnist", train_limit: TrainLimitOpt = None,
    importance: Annotated[str, typer.Option(help="auto, taylor or magnitude (order within each kind)")] = "auto",
    verify_latency: Annotated[bool, typer.Option("--verify-latency/--no-verify-latency",
                                                 help="closed loop: prune, export and measure on the device")] = False,
    rounds: Annotated[int, typer.Option(min=1, help="closed-loop rounds at most")] = SELECT["rounds"],
    calibration_images: Annotated[Optional[int], typer.Option(min=1, help="training images the candidates are "
                                                              "scored on (default: 2048, at most half of them)")
                                  ] = None,
    recovery_steps: Annotated[int, typer.Option(min=0, help="distillation steps before scoring (for a model that "
                                                "will be retrained); 0: score right after pruning")] = 0,
    precision: PrecisionOpt = None,
    prior_weight: PriorWeightOpt = TOKENS["prior_weight"],
):
    """Choose the slim structure for a target: candidates solved against the cost model, scored by their
    distillation loss on training images, checked on the device with --verify-latency."""
    from .models import load_dense
    from .runs import Run
    from .select.stage import SelectOptions, select_run
    from .select.target import parse_target

    target = parse_target(target_latency, target_macs, target_params, (keep_attn, keep_mlp, keep_tokens, keep_embed))
    with Run(run).lock():
        dense, _ = load_dense(run)
        bundle = _data(dense, data, train_limit, None) if target.kind != "fractions" else None
        res = select_run(run, target, bundle, device, profiles_dir,
                         SelectOptions(importance, verify_latency, rounds, calibration_images, recovery_steps,
                                       precision=precision, prior_weight=prior_weight))
    s = res["spec"]
    _warn(res.get("warnings", []))
    msg = f"selected ({res.get('chosen')}): {s.meta['macs'] / 1e6:.1f} MMACs, {s.meta['params'] / 1e6:.3f} M params"
    if s.meta.get("predicted_latency_ms") is not None:
        msg += f", predicted {s.meta['predicted_latency_ms']:.3f} ms"
    if res.get("measured_ms") is not None:
        msg += f", measured {res['measured_ms']:.3f} ms ({'meets' if res['met'] else 'MISSES'} {res['target_ms']:.3f})"
    out.print(msg + f" -> {run}/spec.json")


# ---- prune / retrain -------------------------------------------------------------------------
@app.command()
@handle_errors
def prune(
    run: RunArg,
    checkpoint: CheckpointOpt = None,
    weights: Annotated[str, typer.Option(help="prune the 'searched' weights (masks folded) or the 'base' ones")
                       ] = "auto",
):
    """Slice the weights into a smaller dense model for RUN/spec.json and check it is equivalent."""
    from .prune import prune_run
    from .runs import Run

    with Run(run).lock():
        rec = prune_run(run, weights=weights, checkpoint=checkpoint)
    if rec is not None:
        out.print(f"pruned: {rec['params'] / 1e6:.3f} M params (dense {rec['dense_params'] / 1e6:.3f} M), "
                  f"{rec['macs'] / 1e6:.1f} MMACs; max abs diff vs masked model {rec['max_abs_diff']:.2e} -> {run}")


@app.command()
@handle_errors
def retrain(
    run: RunArg,
    data: DataOpt = "fashion-mnist", train_limit: TrainLimitOpt = None, val_limit: ValLimitOpt = None,
    epochs: Annotated[int, typer.Option(min=0, help="retraining epochs")] = RETRAIN["epochs"],
    batch_size: Annotated[int, typer.Option(min=1, help="global batch size")] = TRAIN["batch_size"],
    lr: Annotated[float, typer.Option(help="peak learning rate (AdamW, cosine)")] = RETRAIN["lr"],
    weight_decay: Annotated[float, typer.Option(help="weight decay")] = TRAIN["weight_decay"],
    distill: Annotated[str, typer.Option(help="soft, hard or none")] = RETRAIN["distill"],
    alpha: Annotated[float, typer.Option(help="weight of the distillation term")] = RETRAIN["alpha"],
    tau: Annotated[float, typer.Option(help="distillation temperature")] = RETRAIN["tau"],
    label_smoothing: Annotated[float, typer.Option(help="label smoothing")] = 0.0,
    mixup: Annotated[float, typer.Option(help="mixup alpha (0 = off)")] = 0.0,
    cutmix: Annotated[float, typer.Option(help="cutmix alpha (0 = off)")] = 0.0,
    ema: Annotated[Optional[float], typer.Option(help="EMA decay of the weights (off by default)")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    torch_device: TorchDeviceOpt = "auto",
):
    """Retrain the pruned model with distillation from the dense model. Resumes."""
    from .retrain import DistillConfig, retrain_run
    from .runs import Run
    from .trainer import TrainConfig

    r = Run(run)
    tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                       warmup_epochs=RETRAIN["warmup_epochs"], label_smoothing=label_smoothing, mixup=mixup,
                       cutmix=cutmix, ema_decay=ema, seed=seed)
    with r.lock():
        teacher, _ = r.base()
        rec = retrain_run(run, _data(teacher, data, train_limit, val_limit), tcfg, DistillConfig(distill, alpha, tau),
                          torch_device)
    if rec is not None:
        out.print(f"retrained: top-1 {rec['top1_before_retrain']:.2f}% -> {rec['top1']:.2f}% "
                  f"(teacher {rec['teacher_top1']:.2f}%) -> {run}/slim.safetensors")


# ---- export / verify -------------------------------------------------------------------------
@app.command()
@handle_errors
def export(
    run: RunArg,
    trt: Annotated[bool, typer.Option("--trt", help="also build a TensorRT engine (model.plan)")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="FP16 TensorRT engine (= --precision fp16)")] = False,
    precision: Annotated[str, typer.Option(help="TensorRT engine precision: fp32, fp16 or int8 (ONNX stays "
                                           "fp32; int8 ONNX: slimdeploy quantize)")] = "fp32",
    opset: Annotated[int, typer.Option(help="ONNX opset")] = 20,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="fixed batch size (default: dynamic)")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="largest batch of the TensorRT profile")] = 64,
):
    """Export the slim model to ONNX (and TensorRT with --trt)."""
    from .export import export_run
    from .runs import Run

    with Run(run).lock():
        rec = export_run(run, trt, "fp16" if fp16 else precision, opset, batch_size, max_batch)
    out.print(f"exported {rec['onnx']} ({rec['onnx_bytes'] / 1e6:.2f} MB, sequence lengths "
              f"{sorted(set(rec['sequence_lengths']), reverse=True)})" + (f" and {rec['plan']}" if trt else ""))


@app.command()
@handle_errors
def quantize(
    run: RunArg,
    data: DataOpt = "fashion-mnist", train_limit: TrainLimitOpt = None,
    calibration_method: CalibrationMethodOpt = "minmax",
    quant_images: QuantImagesOpt = 512,
    keep_fp32: Annotated[str, typer.Option(help="op types kept in fp32, comma-separated ('head': the classifier)")
                         ] = "Softmax,LayerNormalization,head",
):
    """Quantize RUN/model.onnx to int8 (ONNX Runtime static QDQ, per-channel weights), calibrated on training
    images: RUN/model.int8.onnx and RUN/quantize.json."""
    from .models import load_dense
    from .quantize import QuantConfig, quantize_run
    from .runs import Run

    cfg = QuantConfig(calibration_method, quant_images, [k for k in keep_fp32.split(",") if k]).check()
    with Run(run).lock():
        dense, _ = load_dense(run)
        rec = quantize_run(run, _data(dense, data, train_limit, None), cfg)
    out.print(f"quantized {run}/model.int8.onnx ({rec['method']}, {rec['images']} calibration images, "
              f"{rec['nodes_kept_fp32']} nodes kept in fp32)")


@app.command()
@handle_errors
def verify(
    run: RunArg,
    backend: Annotated[Optional[str], typer.Option(help="ort-cpu, ort-cuda, trt or torch (default: the "
                                                   "profile's, else ort-cpu)")] = None,
    device: DeviceOpt = None, profiles_dir: ProfilesDirOpt = None,
    data: DataOpt = "fashion-mnist", val_limit: ValLimitOpt = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="batch size for latency (default: the "
                                                      "profile's, else 1)")] = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads (default: the profile's, else 1)")
                       ] = None,
    max_drop: MaxDropOpt = None,
    max_quant_drop: Annotated[float, typer.Option("--max-quant-drop", help="int8/bf16: fail (exit 1) when top-1 "
                                                  "falls more than this many points below the fp32 twin's")] = 1.0,
    torch_device: TorchDeviceOpt = "auto",
):
    """Check parity and accuracy of the deployed model, measure latency, write report.json/.md/.png."""
    from .models import load_dense
    from .runs import Run
    from .verify import verify_run

    with Run(run).lock():
        dense, _ = load_dense(run)
        rep = verify_run(run, _data(dense, data, None, val_limit, with_train=False), backend, device, profiles_dir,
                         batch_size, threads, torch_device, max_drop, max_quant_drop=max_quant_drop)
    _finish(rep.to_dict() | {"passed": rep.passed, "failures": rep.failures()})


def _finish(d: dict) -> None:
    """Print the report; exit 1 with the reasons when verification failed."""
    from .verify import drop_words  # loaded already: the report comes from verify
    t = Table(title=f"{d['model']} on {d['device']} ({d['backend']}, batch {d['batch_size']})")
    for col in ("", "dense", "slim"):
        t.add_column(col, justify="right")

    def f(v, fmt):
        return "n/a" if v is None or v != v else format(v, fmt)
    dn, sl = d["dense"], d["slim"]
    t.add_row("latency measured (ms)", f(dn["latency_ms"], ".3f"), f(sl["latency_ms"], ".3f"))
    t.add_row("95% interval (ms)", f"{f(dn['latency_low_ms'], '.3f')}-{f(dn['latency_high_ms'], '.3f')}",
              f"{f(sl['latency_low_ms'], '.3f')}-{f(sl['latency_high_ms'], '.3f')}")
    t.add_row("latency predicted (ms)", f(dn.get("predicted_latency_ms"), ".3f"), f(sl["predicted_latency_ms"], ".3f"))
    t.add_row("MACs (M)", f(dn["macs"] / 1e6, ".2f"), f(sl["macs"] / 1e6, ".2f"))
    t.add_row("params (M)", f(dn["params"] / 1e6, ".3f"), f(sl["params"] / 1e6, ".3f"))
    t.add_row("top-1 (%)", f(dn["top1"], ".2f"), f(sl["top1"], ".2f"))
    t.add_row("top-1 before retraining (%)", "", f(sl["top1_before_retrain"], ".2f"))
    p = d["parity"]
    t.add_row("parity", "", f"{'PASS' if p['passed'] else 'FAIL'} (max |diff| {p['max_abs_diff']:.1e}, "
                            f"agreement {100 * p['top1_agreement']:.2f}%)")
    met = d["met_target"]
    t.add_row("target (ms)", "", f"{f(d['target_latency_ms'], '.3f')} "
                                 f"({'met' if met else 'NOT met' if met is False else '-'})")
    out.print(t)
    drop = d["accuracy"].get("drop")
    if drop is not None:
        out.print(f"[bold]top-1 {f(sl['top1'], '.2f')}% vs dense {f(dn['top1'], '.2f')}%: {drop_words(drop)}[/bold]")
    _warn(d.get("warnings", []))
    if d["failures"]:
        for why in d["failures"]:
            typer.echo(f"error: {why}", err=True)
        raise typer.Exit(1)


# ---- run ---------------------------------------------------------------------------------------
@app.command()
@handle_errors
def run(
    out_dir: Annotated[Path, typer.Option("--out", help="run directory")] = Path("runs/demo"),
    target_latency: TargetLatencyOpt = RUN["target_latency"], target_macs: TargetMacsOpt = None,
    target_params: TargetParamsOpt = None,
    device: DeviceOpt = RUN["device"], profiles_dir: ProfilesDirOpt = None,
    model: ModelOpt = None, checkpoint: CheckpointOpt = None, pretrained: PretrainedOpt = False,
    num_classes: NumClassesOpt = None, img_size: ImgSizeOpt = None, in_chans: InChansOpt = None,
    data: DataOpt = "fashion-mnist", train_limit: TrainLimitOpt = None, val_limit: ValLimitOpt = None,
    batch_size: Annotated[int, typer.Option(min=1, help="training batch size")] = TRAIN["batch_size"],
    train_epochs: Annotated[int, typer.Option(min=0, help="dense training epochs (no checkpoint only)")
                            ] = TRAIN["epochs"],
    search_epochs: Annotated[int, typer.Option(min=0, help="mask search epochs")] = SEARCH["epochs"],
    retrain_epochs: Annotated[int, typer.Option(min=0, help="retraining epochs (0: deploy the pruned model; "
                                                "candidates are then scored right after pruning)")] = RETRAIN["epochs"],
    w_attn: Annotated[float, typer.Option(help="L1 factor of the attention masks")] = SEARCH["w_attn"],
    w_mlp: Annotated[float, typer.Option(help="L1 factor of the MLP masks")] = SEARCH["w_mlp"],
    w_tok: Annotated[float, typer.Option(help="L1 factor of the token masks")] = SEARCH["w_tok"],
    w_embed: WEmbedOpt = SEARCH["w_embed"],
    token_mode: TokenModeOpt = "static",
    embed: EmbedOpt = False,
    importance: Annotated[str, typer.Option(help="auto, taylor or magnitude")] = "auto",
    prior_weight: PriorWeightOpt = TOKENS["prior_weight"],
    verify_latency: Annotated[bool, typer.Option("--verify-latency/--no-verify-latency",
                                                 help="closed loop on the profile's backend")] = True,
    recovery_steps: Annotated[Optional[int], typer.Option(min=0, help="distillation steps before candidates are "
                                                          "scored (default: 200 when retraining follows)")] = None,
    calibration_images: Annotated[Optional[int], typer.Option(min=1, help="training images the candidates are "
                                                              "scored on (default: 2048, at most half of them)")
                                  ] = None,
    distill: Annotated[str, typer.Option(help="soft, hard or none")] = RETRAIN["distill"],
    trt: Annotated[bool, typer.Option("--trt", help="export and verify a TensorRT engine")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="FP16 TensorRT engine (= --precision fp16)")] = False,
    precision: PrecisionOpt = None,
    calibration_method: CalibrationMethodOpt = "minmax",
    quant_images: QuantImagesOpt = 512,
    backend: Annotated[Optional[str], typer.Option(help="verify backend (default: the profile's)")] = None,
    max_drop: MaxDropOpt = RUN["max_drop"],
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    torch_device: TorchDeviceOpt = "auto",
):
    """The whole pipeline: train (if needed), search, select, prune, retrain, export, verify. Re-running it
    continues where it stopped; a stage whose inputs changed runs again."""
    from .pipeline import RunOptions, run_pipeline
    from .quantize import QuantConfig
    from .select.target import parse_target

    if target_macs or target_params:
        target_latency = None
    target = parse_target(target_latency, target_macs, target_params)  # a typo fails now, not after an hour
    opts = RunOptions(out=out_dir, target=target, device=device, profiles_dir=profiles_dir, model=model,
                      checkpoint=checkpoint, pretrained=pretrained, num_classes=num_classes, img_size=img_size,
                      in_chans=in_chans, data=data, train_limit=train_limit, val_limit=val_limit,
                      batch_size=batch_size, train_epochs=train_epochs, search_epochs=search_epochs,
                      retrain_epochs=retrain_epochs, w_attn=w_attn, w_mlp=w_mlp, w_tok=w_tok, token_mode=token_mode,
                      w_embed=w_embed, search_embed=embed, importance=importance, prior_weight=prior_weight,
                      verify_latency=verify_latency, recovery_steps=recovery_steps,
                      calibration_images=calibration_images, distill=distill, trt=trt,
                      precision="fp16" if fp16 else precision, backend=backend, max_drop=max_drop, seed=seed,
                      torch_device=torch_device, quant=QuantConfig(calibration_method, quant_images).check())
    report = run_pipeline(opts)
    if report is not None:
        _finish(report)


# ---- doctor ------------------------------------------------------------------------------------
@app.command()
@handle_errors
def doctor():
    """Which runtimes, execution providers and devices are usable here, and the fix for each that is not."""
    from .doctor import run_checks

    table = Table(title="slimdeploy doctor")
    for col in ("", "status", "detail"):
        table.add_column(col)
    checks = run_checks()
    for c in checks:
        table.add_row(c.name, "[green]ok[/green]" if c.ok else "[red]no[/red]",
                      c.detail + (f"\n[bold]fix:[/bold] {c.fix}" if c.fix else ""))
    out.print(table)


def main() -> None:
    """Console entry point: click usage errors become one line too."""
    try:
        rv = app(standalone_mode=False)  # returns the exit code of typer.Exit
    except _USAGE as e:
        if e.format_message():  # empty when no command was given: the help was shown
            typer.echo(f"error: {e.format_message()}", err=True)
        sys.exit(2)
    except _ABORT:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except _EXIT as e:
        sys.exit(e.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
