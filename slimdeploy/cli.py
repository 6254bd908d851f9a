"""The `slimdeploy` command line: thin typer commands over the stage functions.

Commands only parse arguments, call one stage function and print. Every user error is one
line on stderr and exit code 2.
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
ImgSizeOpt = Annotated[Optional[int], typer.Option("--img-size", min=1, help="input resolution (pixels)")]
InChansOpt = Annotated[Optional[int], typer.Option("--in-chans", min=1, help="input channels")]
DataOpt = Annotated[str, typer.Option("--data", help="fashion-mnist, synthetic, or a folder with train/ "
                                      "and val/ in ImageNet layout")]
TrainLimitOpt = Annotated[Optional[int], typer.Option("--train-limit", help="use the first N training images")]
ValLimitOpt = Annotated[Optional[int], typer.Option("--val-limit", help="use the first N evaluation images")]
TorchDeviceOpt = Annotated[str, typer.Option("--torch-device", help="where to train: auto, cpu, cuda[:N]")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="continue from the stage's last checkpoint")]


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
            typer.echo("interrupted: run the same command with --resume to continue", err=True)
            raise typer.Exit(130) from None
    return wrapper


def _data_cfg_and_classes(model):
    from .models import arch_of, data_config

    return data_config(model), arch_of(model).num_classes


# ---- train -----------------------------------------------------------------------------------
@app.command()
@handle_errors
def train(
    out_dir: Annotated[Path, typer.Option("--out", help="run directory to write")] = Path("runs/train"),
    model: ModelOpt = None, checkpoint: CheckpointOpt = None, pretrained: PretrainedOpt = False,
    num_classes: NumClassesOpt = None, img_size: ImgSizeOpt = None, in_chans: InChansOpt = None,
    data: DataOpt = "fashion-mnist", train_limit: TrainLimitOpt = None, val_limit: ValLimitOpt = None,
    epochs: Annotated[int, typer.Option(min=0, help="training epochs")] = 7,
    batch_size: Annotated[int, typer.Option(min=1, help="global batch size")] = 128,
    lr: Annotated[float, typer.Option(help="peak learning rate (AdamW)")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay")] = 0.05,
    warmup_epochs: Annotated[float, typer.Option(help="linear warm-up, in epochs")] = 0.5,
    label_smoothing: Annotated[float, typer.Option(help="label smoothing")] = 0.1,
    drop_path: Annotated[float, typer.Option(help="stochastic depth rate")] = 0.0,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    workers: Annotated[int, typer.Option(min=0, help="data loader workers")] = 0,
    torch_device: TorchDeviceOpt = "auto", resume: ResumeOpt = False,
):
    """Train a dense model (for a model without a checkpoint, e.g. the embedded fmnist-vit)."""
    from .data import load_data
    from .models import create_model
    from .train import train_dense
    from .trainer import TrainConfig
    from .types import ModelConfig

    if (out_dir / "base.safetensors").exists() and not resume:
        raise SlimError(f"{out_dir} already holds a trained model: choose another --out or pass --resume")
    cfg = ModelConfig(name=model or "fmnist-vit", num_classes=num_classes, img_size=img_size, in_chans=in_chans)
    m = create_model(cfg, pretrained=pretrained, checkpoint=checkpoint, drop_path_rate=drop_path)
    from .models import arch_of

    a = arch_of(m)
    cfg = ModelConfig(cfg.name, a.num_classes, a.img_size, a.in_chans)
    dcfg, classes = _data_cfg_and_classes(m)
    bundle = load_data(data, dcfg, classes, train_limit, val_limit)
    tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                       warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, seed=seed, workers=workers)
    history = train_dense(m, cfg, bundle, tcfg, out_dir, resume=resume, torch_device=torch_device)
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
                  f"(p10 {t['p10_ms']:.3f}, p90 {t['p90_ms']:.3f}, {t['runs']} runs)")


RunArg = Annotated[Path, typer.Argument(help="run directory")]
ProfilesDirOpt = Annotated[Optional[Path], typer.Option("--profiles-dir", help="look for device profiles here first "
                                                        "(default: ~/.slimdeploy/profiles), then in the shipped ones")]


def _bundle(model, data, train_limit, val_limit):
    from .data import load_data

    dcfg, classes = _data_cfg_and_classes(model)
    return load_data(data, dcfg, classes, train_limit, val_limit)


# ---- search ----------------------------------------------------------------------------------
@app.command()
@handle_errors
def search(
    run: RunArg,
    model: ModelOpt = None, checkpoint: CheckpointOpt = None, pretrained: PretrainedOpt = False,
    num_classes: NumClassesOpt = None, img_size: ImgSizeOpt = None, in_chans: InChansOpt = None,
    data: DataOpt = "fashion-mnist", train_limit: TrainLimitOpt = None, val_limit: ValLimitOpt = None,
    epochs: Annotated[int, typer.Option(min=0, help="search epochs")] = 3,
    batch_size: Annotated[int, typer.Option(min=1, help="global batch size")] = 128,
    lr: Annotated[float, typer.Option(help="learning rate for weights and masks (AdamW)")] = 5e-4,
    weight_decay: Annotated[float, typer.Option(help="weight decay (never on masks)")] = 1e-3,
    w_attn: Annotated[float, typer.Option(help="L1 factor of the attention masks")] = 2e-4,
    w_mlp: Annotated[float, typer.Option(help="L1 factor of the MLP masks")] = 5e-5,
    w_tok: Annotated[float, typer.Option(help="L1 factor of the token masks")] = 1e-4,
    tokens: Annotated[bool, typer.Option("--tokens/--no-tokens", help="search tokens")] = True,
    attn: Annotated[bool, typer.Option("--attn/--no-attn", help="search heads and head channels")] = True,
    mlp: Annotated[bool, typer.Option("--mlp/--no-mlp", help="search MLP units")] = True,
    shared_qkv: Annotated[bool, typer.Option("--shared-qkv", help="one mask for q, k and v (ViT-Slim)")] = False,
    distill: Annotated[bool, typer.Option("--distill", help="task loss: distillation from the unmasked model")] = False,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    torch_device: TorchDeviceOpt = "auto", resume: ResumeOpt = False,
):
    """Single-shot mask search (ViT-Slim) over tokens, heads, head channels and MLP units."""
    from .masks import SearchDims
    from .runs import Run
    from .search import SearchConfig
    from .search import search as run_search
    from .trainer import TrainConfig

    r = Run(run)
    if r.has_search and not resume:
        raise SlimError(f"{run} already holds a search: pass --resume or choose another run directory")
    m, cfg = r.ensure_base(model, checkpoint, pretrained, num_classes, img_size, in_chans)
    scfg = SearchConfig(w_attn, w_mlp, w_tok, distill, dims=SearchDims(tokens, attn, mlp, shared_qkv))
    tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, min_lr=lr, weight_decay=weight_decay,
                       warmup_epochs=0.0, seed=seed, clip_grad=None)
    res = run_search(m, _bundle(m, data, train_limit, val_limit), tcfg, scfg, run, resume, torch_device)
    if res["history"]:
        out.print(f"searched {cfg.name}: top-1 with soft masks {res['history'][-1]['top1']:.2f}% -> {run}/search")


# ---- prune -----------------------------------------------------------------------------------
@app.command()
@handle_errors
def prune(
    run: RunArg,
    spec: Annotated[Optional[Path], typer.Option("--spec", help="spec.json (default: RUN/spec.json)")] = None,
    checkpoint: CheckpointOpt = None,
    weights: Annotated[str, typer.Option(help="prune the 'searched' weights (masks folded) or the 'base' ones")
                       ] = "auto",
    data: DataOpt = "synthetic",
):
    """Slice the dense weights into a smaller dense model for a SlimSpec and check it is equivalent."""
    from .data import first_batch, load_data
    from .models import create_model, data_config
    from .prune import prune as run_prune
    from .prune import searched_model
    from .runs import Run
    from .types import SlimSpec

    r = Run(run)
    s = SlimSpec.load(spec) if spec else r.spec()
    if weights not in ("auto", "searched", "base"):
        raise SlimError("--weights must be auto, searched or base")
    if checkpoint is not None:
        dense = create_model(s.source, checkpoint=checkpoint)
    elif weights == "searched" or (weights == "auto" and r.has_search):
        dense = searched_model(run, s)
    else:
        dense, _ = r.base()
    b = load_data(data, data_config(dense), s.arch.num_classes, val_limit=16, with_train=False)
    _, rec = run_prune(s, dense, run, first_batch(b, 16))
    out.print(f"pruned: {rec['params'] / 1e6:.3f} M params (dense {rec['dense_params'] / 1e6:.3f} M), "
              f"{rec['macs'] / 1e6:.1f} MMACs; max abs diff vs masked model {rec['max_abs_diff']:.2e} -> {run}")


# ---- profile ---------------------------------------------------------------------------------
@app.command()
@handle_errors
def profile(
    device: Annotated[str, typer.Option("--device", help="name of the profile (e.g. a100, or the CPU you run on)")],
    backend: Annotated[str, typer.Option(help="ort-cpu, ort-cuda, trt or torch")] = "ort-cpu",
    model: ModelOpt = None, img_size: ImgSizeOpt = None, num_classes: NumClassesOpt = None,
    in_chans: InChansOpt = None,
    batch_size: Annotated[int, typer.Option(min=1, help="deployment batch size")] = 1,
    precision: Annotated[str, typer.Option(help="fp32 or fp16")] = "fp32",
    threads: Annotated[int, typer.Option(min=1, help="CPU threads (ort-cpu, torch on cpu)")] = 1,
    step: Annotated[int, typer.Option(min=1, help="width resolution of the tables (channels)")] = 8,
    token_points: Annotated[int, typer.Option(min=1, help="token counts measured per table")] = 6,
    calibration_models: Annotated[int, typer.Option(min=1, help="whole models measured for calibration")] = 16,
    torch_device: TorchDeviceOpt = "auto",
    profiles_dir: ProfilesDirOpt = None,
    out_file: Annotated[Optional[Path], typer.Option("--out", help="profile file to write")] = None,
):
    """Measure per-layer latency tables on this machine and write a device profile."""
    from .backends import get_backend
    from .latency import user_profiles_dir
    from .models import resolve_model
    from .profile import profile_device

    m, cfg = resolve_model(model, None, False, num_classes, img_size, in_chans)
    be = get_backend(backend, threads=threads, precision=precision, torch_device=torch_device)
    path = out_file or (Path(profiles_dir) if profiles_dir else user_profiles_dir()) / f"{device}.json"
    prof = profile_device(device, be, m, cfg, batch_size, path, step, token_points, calibration_models)
    for w in prof.warnings:
        typer.echo(f"warning: {w}", err=True)
    cal = prof.calibration
    out.print(f"profile '{device}' ({prof.hardware}, {prof.backend} {prof.backend_version}, batch {batch_size}, "
              f"{prof.precision}) in {prof.seconds:.0f} s -> {path}")
    coef = ", ".join(f"{k} {v:.2f}" for k, v in cal["coef"].items())
    out.print(f"calibration on {len(cal['points'])} whole models: coef {coef}; beta {cal['beta']:.3f} ms; "
              f"median fit error {100 * cal['fit_median_abs_error']:.1f}%")


# ---- predict ---------------------------------------------------------------------------------
@app.command()
@handle_errors
def predict(
    target: Annotated[Path, typer.Argument(help="a run directory (its spec.json) or a spec.json file")],
    device: Annotated[str, typer.Option("--device", help="device profile name")],
    profiles_dir: ProfilesDirOpt = None,
    batch_size: Annotated[Optional[int], typer.Option(help="deployment batch size (checked against the profile)")
                          ] = None,
):
    """Predicted latency of a slim model (spec) on a profiled device."""
    from .analysis import spec_macs, spec_params
    from .latency import LatencyModel, check_profile_fits
    from .types import SlimSpec

    spec_path = target / "spec.json" if target.is_dir() else target
    s = SlimSpec.load(spec_path)
    lm = LatencyModel.load(device, profiles_dir)
    check_profile_fits(lm.profile, s.arch, batch_size)
    dense = SlimSpec.dense(s.source, s.arch)
    out.print(f"predicted latency on '{device}' ({lm.profile.backend}, batch {lm.profile.batch_size}): "
              f"{lm.predict(s):.3f} ms (dense {lm.predict(dense):.3f} ms); {spec_macs(s) / 1e6:.1f} MMACs, "
              f"{spec_params(s) / 1e6:.3f} M params")


# ---- select ----------------------------------------------------------------------------------
TargetLatencyOpt = Annotated[Optional[str], typer.Option("--target-latency", help="5ms, 5 (ms), 500us, 0.005s, "
                                                         "or 60% of the dense model's predicted latency")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="device profile name (slimdeploy profile)")]


@app.command()
@handle_errors
def select(
    run: RunArg,
    target_latency: TargetLatencyOpt = None,
    target_macs: Annotated[Optional[str], typer.Option("--target-macs", help="e.g. 2.3G")] = None,
    target_params: Annotated[Optional[str], typer.Option("--target-params", help="e.g. 12M")] = None,
    keep_attn: Annotated[Optional[float], typer.Option(help="ViT-Slim rule: kept fraction of attention channels")
                         ] = None,
    keep_mlp: Annotated[Optional[float], typer.Option(help="ViT-Slim rule: kept fraction of MLP units")] = None,
    keep_tokens: Annotated[Optional[float], typer.Option(help="ViT-Slim rule: kept fraction of tokens")] = None,
    device: DeviceOpt = None, profiles_dir: ProfilesDirOpt = None,
    importance: Annotated[str, typer.Option(help="auto, taylor or magnitude")] = "auto",
    verify_latency: Annotated[bool, typer.Option("--verify-latency/--no-verify-latency",
                                                 help="closed loop: prune, export and measure each choice")] = False,
    rounds: Annotated[int, typer.Option(min=1, help="closed-loop rounds at most")] = 4,
):
    """Choose the slim structure that keeps the most importance within a target."""
    from .latency import LatencyModel
    from .models import arch_of, load_dense
    from .select import parse_target, run_select
    from .types import SlimSpec

    lm = LatencyModel.load(device, profiles_dir) if device else None
    dense, cfg = load_dense(run)
    target = parse_target(target_latency, target_macs, target_params, (keep_attn, keep_mlp, keep_tokens), lm,
                          SlimSpec.dense(cfg, arch_of(dense)))
    res = run_select(run, target, lm, importance, verify_latency, rounds)
    s = res["spec"]
    msg = f"selected: {s.meta['macs'] / 1e6:.1f} MMACs, {s.meta['params'] / 1e6:.3f} M params"
    if res["predicted_ms"] is not None:
        msg += f", predicted {res['predicted_ms']:.3f} ms"
    if res.get("measured_ms") is not None:
        msg += f", measured {res['measured_ms']:.3f} ms"
    out.print(msg + f" -> {run}/spec.json")


# ---- retrain ---------------------------------------------------------------------------------
@app.command()
@handle_errors
def retrain(
    run: RunArg,
    data: DataOpt = "fashion-mnist", train_limit: TrainLimitOpt = None, val_limit: ValLimitOpt = None,
    epochs: Annotated[int, typer.Option(min=0, help="retraining epochs")] = 5,
    batch_size: Annotated[int, typer.Option(min=1, help="global batch size")] = 128,
    lr: Annotated[float, typer.Option(help="peak learning rate (AdamW, cosine)")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="weight decay")] = 0.05,
    distill: Annotated[str, typer.Option(help="soft, hard or none")] = "soft",
    alpha: Annotated[float, typer.Option(help="weight of the distillation term")] = 0.7,
    tau: Annotated[float, typer.Option(help="distillation temperature")] = 2.0,
    label_smoothing: Annotated[float, typer.Option(help="label smoothing")] = 0.0,
    mixup: Annotated[float, typer.Option(help="mixup alpha (0 = off)")] = 0.0,
    cutmix: Annotated[float, typer.Option(help="cutmix alpha (0 = off)")] = 0.0,
    ema: Annotated[Optional[float], typer.Option(help="EMA decay of the weights (off by default)")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    torch_device: TorchDeviceOpt = "auto", resume: ResumeOpt = False,
):
    """Retrain the pruned model with distillation from the dense model."""
    from .data import load_data
    from .models import data_config
    from .retrain import DistillConfig
    from .retrain import retrain as run_retrain
    from .runs import Run
    from .slim import load_slim
    from .trainer import TrainConfig

    r = Run(run)
    if (r / "slim.safetensors").is_file() and not resume:
        raise SlimError(f"{run}/slim.safetensors exists: pass --resume or remove it to retrain again")
    teacher, _ = r.base()
    student = load_slim(r.spec(), r / "pruned.safetensors")
    bundle = load_data(data, data_config(teacher), r.spec().arch.num_classes, train_limit, val_limit)
    tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_epochs=0.2,
                       label_smoothing=label_smoothing, mixup=mixup, cutmix=cutmix, ema_decay=ema, seed=seed)
    rec = run_retrain(student, teacher, bundle, tcfg, DistillConfig(distill, alpha, tau), run, resume, torch_device)
    out.print(f"retrained: top-1 {rec['top1_before_retrain']:.2f}% -> {rec['top1']:.2f}% "
              f"(teacher {rec['teacher_top1']:.2f}%) -> {run}/slim.safetensors")


# ---- export / verify -------------------------------------------------------------------------
@app.command()
@handle_errors
def export(
    run: RunArg,
    trt: Annotated[bool, typer.Option("--trt", help="also build a TensorRT engine (model.plan)")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="FP16 TensorRT engine")] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset")] = 20,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="fixed batch size (default: dynamic)")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="largest batch of the TensorRT profile")] = 64,
):
    """Export the slim model to ONNX (and TensorRT with --trt)."""
    from .export import export_run

    rec = export_run(run, trt, fp16, opset, batch_size, max_batch)
    out.print(f"exported {rec['onnx']} ({rec['onnx_bytes'] / 1e6:.2f} MB, sequence lengths "
              f"{sorted(set(rec['sequence_lengths']), reverse=True)})" + (f" and {rec['plan']}" if trt else ""))


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
    torch_device: TorchDeviceOpt = "auto",
):
    """Check parity and accuracy of the deployed model, measure latency, write report.json/.md/.png."""
    from .data import load_data
    from .latency import LatencyModel
    from .models import data_config, load_dense
    from .runs import Run
    from .verify import verify as run_verify

    r = Run(run)
    spec = r.spec()
    dev = device or spec.meta.get("device")
    lm = LatencyModel.load(dev, profiles_dir) if dev else None
    dense, _ = load_dense(run)
    bundle = load_data(data, data_config(dense), spec.arch.num_classes, val_limit=val_limit, with_train=False)
    target = spec.meta.get("target_value") if spec.meta.get("target") == "latency" else None
    rep = run_verify(run, bundle, backend or (lm.profile.backend if lm else "ort-cpu"),
                     batch_size or (lm.profile.batch_size if lm else 1),
                     threads or (lm.profile.threads if lm else 1), target, dev, lm, torch_device)
    _print_report(rep.to_dict())
    if not rep.parity.passed:
        typer.echo(f"error: parity failed on {rep.backend}: max abs diff {rep.parity.max_abs_diff:.3g}, "
                   f"top-1 agreement {100 * rep.parity.top1_agreement:.2f}% ({rep.extra['parity_rule']})", err=True)
        raise typer.Exit(1)


def _print_report(d: dict) -> None:
    t = Table(title=f"{d['model']} on {d['device']} ({d['backend']}, batch {d['batch_size']})")
    for col in ("", "dense", "slim"):
        t.add_column(col, justify="right")

    def f(v, fmt):
        return "n/a" if v is None or v != v else format(v, fmt)
    dn, sl = d["dense"], d["slim"]
    t.add_row("latency measured (ms)", f(dn["latency_ms"], ".3f"), f(sl["latency_ms"], ".3f"))
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


# ---- run ---------------------------------------------------------------------------------------
@app.command()
@handle_errors
def run(
    out_dir: Annotated[Path, typer.Option("--out", help="run directory")] = Path("runs/demo"),
    target_latency: TargetLatencyOpt = "50%",
    target_macs: Annotated[Optional[str], typer.Option("--target-macs", help="instead of latency: e.g. 2.3G")] = None,
    target_params: Annotated[Optional[str], typer.Option("--target-params", help="instead of latency: e.g. 12M")
                             ] = None,
    device: DeviceOpt = "epyc-2c-ort1t-b1-fmnist-vit", profiles_dir: ProfilesDirOpt = None,
    model: ModelOpt = None, checkpoint: CheckpointOpt = None, pretrained: PretrainedOpt = False,
    num_classes: NumClassesOpt = None, img_size: ImgSizeOpt = None, in_chans: InChansOpt = None,
    data: DataOpt = "fashion-mnist", train_limit: TrainLimitOpt = None, val_limit: ValLimitOpt = None,
    batch_size: Annotated[int, typer.Option(min=1, help="training batch size")] = 128,
    train_epochs: Annotated[int, typer.Option(min=0, help="dense training epochs (no checkpoint only)")] = 7,
    search_epochs: Annotated[int, typer.Option(min=0, help="mask search epochs")] = 2,
    retrain_epochs: Annotated[int, typer.Option(min=0, help="retraining epochs")] = 5,
    w_attn: Annotated[float, typer.Option(help="L1 factor of the attention masks")] = 2e-4,
    w_mlp: Annotated[float, typer.Option(help="L1 factor of the MLP masks")] = 5e-5,
    w_tok: Annotated[float, typer.Option(help="L1 factor of the token masks")] = 1e-4,
    importance: Annotated[str, typer.Option(help="auto, taylor or magnitude")] = "auto",
    verify_latency: Annotated[bool, typer.Option("--verify-latency/--no-verify-latency",
                                                 help="closed loop on the profile's backend")] = True,
    distill: Annotated[str, typer.Option(help="soft, hard or none")] = "soft",
    trt: Annotated[bool, typer.Option("--trt", help="export and verify a TensorRT engine")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="FP16 TensorRT engine")] = False,
    backend: Annotated[Optional[str], typer.Option(help="verify backend (default: the profile's)")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    torch_device: TorchDeviceOpt = "auto",
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="continue a run directory that exists")
                      ] = True,
):
    """The whole pipeline: train (if needed), search, select, prune, retrain, export, verify."""
    from .pipeline import RunOptions, run_pipeline

    if out_dir.exists() and any(out_dir.iterdir()) and not resume:
        raise SlimError(f"{out_dir} exists and is not empty: choose another --out or pass --resume")
    if target_macs or target_params:
        target_latency = None
    elif target_latency is not None:
        from .selector import parse_latency

        parse_latency(target_latency)  # a typo fails now, not after an hour of training
    opts = RunOptions(out=out_dir, target_latency=target_latency, target_macs=target_macs, target_params=target_params,
                      device=device, profiles_dir=profiles_dir, model=model, checkpoint=checkpoint,
                      pretrained=pretrained, num_classes=num_classes, img_size=img_size, in_chans=in_chans, data=data,
                      train_limit=train_limit, val_limit=val_limit, batch_size=batch_size, train_epochs=train_epochs,
                      search_epochs=search_epochs, retrain_epochs=retrain_epochs, w_attn=w_attn, w_mlp=w_mlp,
                      w_tok=w_tok, importance=importance, verify_latency=verify_latency, distill=distill, trt=trt,
                      fp16=fp16, backend=backend, seed=seed, torch_device=torch_device)
    report = run_pipeline(opts)
    if report is not None:
        _print_report(report)
        if not report["parity"]["passed"]:
            typer.echo("error: parity failed: see report.md", err=True)
            raise typer.Exit(1)


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
