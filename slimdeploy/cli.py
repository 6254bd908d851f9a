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
    epochs: Annotated[int, typer.Option(min=0, help="training epochs")] = 8,
    batch_size: Annotated[int, typer.Option(min=1, help="global batch size")] = 128,
    lr: Annotated[float, typer.Option(help="peak learning rate (AdamW)")] = 2e-3,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay")] = 0.05,
    warmup_epochs: Annotated[float, typer.Option(help="linear warm-up, in epochs")] = 0.5,
    label_smoothing: Annotated[float, typer.Option(help="label smoothing")] = 0.0,
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
    from .data import load_data
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
    b = load_data(data, data_config(dense), s.arch.num_classes, 16, 16)
    x = next(iter(__import__("torch").utils.data.DataLoader(b.val, batch_size=16, collate_fn=None)))[0]
    x = b.transform(x) if b.transform is not None else x
    _, rec = run_prune(s, dense, run, x)
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
    calibration_models: Annotated[int, typer.Option(min=1, help="whole models measured for calibration")] = 6,
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
    out.print(f"calibration on {len(cal['points'])} whole models: alpha {cal['alpha']:.3f}, beta {cal['beta']:.3f} ms, "
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


def main() -> None:
    """Console entry point: click usage errors become one line too."""
    try:
        app(standalone_mode=False)
    except click.exceptions.UsageError as e:
        typer.echo(f"error: {e.format_message()}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
