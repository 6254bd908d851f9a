"""A prepared check of the GPU paths, for a machine with one NVIDIA GPU (or, with --cpu, the same steps on the CPU
on a tiny model, as the test suite runs it). Each step writes its results to $OUT/gpu_check.json as it ends, so a
run cut short still reports what it did.

Steps:
  1. fp32 logits on CPU and on CUDA, with TF32 on and off (slimdeploy turns it off for fp32)
  2. the torch backend's timing (the protocol, wall clock with a device sync) against CUDA events
  3. search and retrain on CUDA with bf16 autocast: finite losses; a search interrupted after its first epoch,
     then resumed, equals an uninterrupted one
  4. `profile --backend torch` on fmnist-vit (and deit_small with --deit), written to $OUT/profiles
  5. the closed loop on that profile
  6. prune, retrain (1 epoch, distillation, bf16 on CUDA), export, verify on CUDA (torch backend): parity,
     top-1, latency

    python scripts/gpu_check.py --deit              # on the GPU machine
    python scripts/gpu_check.py --cpu --tiny        # anywhere (the test suite)
    python scripts/gpu_check.py --cpu --quick       # fmnist-vit with a small profile: a dry run of the real paths

Checkpoints and exports go to --work (a temporary folder by default), so $OUT holds only the results and profiles.
It needs slimdeploy's dependencies (polygraphy and onnxslim are pure Python: on a machine with no network, install
their wheels with --no-deps) and, unless --tiny, Fashion-MNIST's idx files (SLIMDEPLOY_FMNIST_DIR names their folder).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS: dict = {"steps": {}}


def record(out: Path, step: str, **values) -> None:
    RESULTS["steps"][step] = values
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2, default=str))
    print(f"[{step}] " + json.dumps(values, default=str)[:400], flush=True)


def step(out: Path, name: str, fn) -> None:
    start = time.perf_counter()
    try:
        values = fn()
        record(out, name, ok=True, seconds=round(time.perf_counter() - start, 1), **values)
    except Exception as e:  # noqa: BLE001 - a check reports every failure and goes on
        record(out, name, ok=False, seconds=round(time.perf_counter() - start, 1), error=f"{type(e).__name__}: {e}",
               trace=traceback.format_exc()[-1500:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run every step on the CPU")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and data (the test suite)")
    ap.add_argument("--deit", action="store_true", help="also profile deit_small_patch16_224")
    ap.add_argument("--quick", action="store_true", help="a small profile (3 token points, 4 calibration models)")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    ap.add_argument("--work", default=None, help="checkpoints and exports (default: a temporary folder)")
    args = ap.parse_args()
    out = Path(args.out)
    root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="slimdeploy-gpu-check-"))
    work = root / "run"  # the interrupted search's copy goes beside it, in root/cut
    os.environ.setdefault("SLIMDEPLOY_QUIET", "1")

    from slimdeploy.models import register_model
    from slimdeploy.types import ModelConfig

    dev = "cpu" if args.cpu else "cuda"
    RESULTS.update(device=dev, torch=torch.__version__, cuda=torch.version.cuda,
                   gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                   date=time.strftime("%Y-%m-%dT%H:%M:%S"), packages=package_versions())
    if not args.cpu and not torch.cuda.is_available():
        record(out, "setup", ok=False, error="no CUDA device: run with --cpu")
        return
    name = "fmnist-vit"
    if args.tiny:
        register_model("t-check", dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32,
                                       depth=2, num_heads=2, mlp_ratio=2.0))
        name = "t-check"
    cfg = ModelConfig(name)
    quick = args.tiny or args.quick
    limits = dict(train_limit=256, val_limit=128) if args.tiny else dict(train_limit=8192, val_limit=2048)
    data_name = "synthetic" if args.tiny else "fashion-mnist"

    step(out, "1_parity_tf32", lambda: parity_tf32(cfg, dev))
    step(out, "2_timing_vs_events", lambda: timing_vs_events(cfg, dev))
    step(out, "3_train_search_bf16", lambda: train_search(cfg, dev, work, data_name, limits))
    step(out, "4_profile_torch", lambda: profile_torch(cfg, dev, out, quick))
    step(out, "5_closed_loop", lambda: closed_loop(cfg, dev, work, out))
    step(out, "6_retrain_verify", lambda: retrain_verify(cfg, dev, work, data_name, limits))
    if args.deit:  # last: the longest step, and the one a short lease can lose
        step(out, "7_profile_deit_small", lambda: profile_torch(ModelConfig("deit_small_patch16_224"), dev, out,
                                                                quick))
    if not args.work:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({k: v.get("ok") for k, v in RESULTS["steps"].items()}))


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("timm", "onnx", "onnxscript", "onnxslim", "onnxruntime", "onnxruntime-gpu", "polygraphy", "typer"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def parity_tf32(cfg, dev) -> dict:
    from slimdeploy.latency.components import nontrivial_
    from slimdeploy.models import arch_of, create_model

    torch.manual_seed(0)
    model = nontrivial_(create_model(cfg)).eval()
    a = arch_of(model)
    x = torch.randn(16, a.in_chans, a.img_size, a.img_size)
    with torch.no_grad():
        ref = model(x)
        out = {}
        for tf32 in (True, False):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            got = model.to(dev)(x.to(dev)).cpu()
            model.cpu()
            out[f"max_abs_diff_tf32_{'on' if tf32 else 'off'}"] = float((got - ref).abs().max())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if dev == "cuda":  # slimdeploy's fp32 backend turns TF32 off by itself
        from slimdeploy.latency.backends import TorchBackend

        TorchBackend(dev)
        out["backend_turns_tf32_off"] = not (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    out["fp32_parity_1e-4_with_tf32_off"] = out["max_abs_diff_tf32_off"] <= 1e-4
    return out


def timing_vs_events(cfg, dev) -> dict:
    from slimdeploy.latency.backends import TorchBackend
    from slimdeploy.latency.components import nontrivial_
    from slimdeploy.models import arch_of, create_model

    model = nontrivial_(create_model(cfg)).eval()
    a = arch_of(model)
    x = torch.randn(1, a.in_chans, a.img_size, a.img_size)
    sess = TorchBackend(dev).load_module(model)
    protocol_ms = sess.time(x.numpy()).median_ms
    out = {"protocol_ms": protocol_ms}
    if dev == "cuda":
        fn, _ = sess.timed(x.numpy())
        times = []
        for _ in range(200):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        times.sort()
        out.update(events_ms=times[len(times) // 2], protocol_over_events=protocol_ms / times[len(times) // 2])
        for mode in ("graph",):
            out[f"{mode}_ms"] = TorchBackend(dev, mode=mode).load_module(model).time(x.numpy()).median_ms
    return out


def train_search(cfg, dev, work, data_name, limits) -> dict:
    from slimdeploy.data import load_data
    from slimdeploy.masks import SearchDims
    from slimdeploy.models import arch_of, create_model, data_config
    from slimdeploy.search import SearchConfig, search_run
    from slimdeploy.train import train_run
    from slimdeploy.trainer import TrainConfig, bf16_native

    shutil.rmtree(work, ignore_errors=True)
    model = create_model(cfg)
    data = load_data(data_name, data_config(model), arch_of(model).num_classes, **limits)
    hist = train_run(work, cfg, data, TrainConfig(epochs=2, batch_size=64, seed=0), dev)
    scfg = SearchConfig(dims=SearchDims())
    tcfg = TrainConfig(epochs=2, batch_size=64, lr=5e-4, min_lr=5e-4, weight_decay=1e-3, warmup_epochs=0.0,
                       clip_grad=None, seed=0)
    full = search_run(work, data, scfg, tcfg, dev)
    # the same search interrupted after its first epoch, then resumed
    cut = work.with_name("cut")
    shutil.rmtree(cut, ignore_errors=True)
    shutil.copytree(work, cut, ignore=shutil.ignore_patterns("search", "run.json"))
    import slimdeploy.trainer as tr

    real = tr.save_torch
    calls = {"n": 0}

    def cut_after_one(*a, **kw):
        real(*a, **kw)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
    tr.save_torch = cut_after_one
    try:
        search_run(cut, data, scfg, tcfg, dev)
    except KeyboardInterrupt:
        pass
    finally:
        tr.save_torch = real
    resumed = search_run(cut, data, scfg, tcfg, dev)
    diff = max(float((full["masks"][k] - resumed["masks"][k]).abs().max()) for k in full["masks"])
    losses = [h["loss"] for h in hist + full["history"]]
    return {"train_top1": hist[-1]["top1"], "search_top1": full["history"][-1]["top1"],
            "losses_finite": all(map(math.isfinite, losses)),
            "bf16_autocast": dev == "cuda" and bf16_native(torch.device(dev)), "resume_max_mask_diff": diff}


def profile_path(out: Path, dev: str, cfg) -> Path:
    """Where step 4 writes the model's torch profile, named after the device (e.g. h200-torch-cuda-b1-fmnist-vit)."""
    gpu = "cpu" if dev == "cpu" else torch.cuda.get_device_name(0).split()[-1].lower()
    return out / "profiles" / f"{gpu}-torch-{dev}-b1-{cfg.name}.json"


def profile_torch(cfg, dev, out, quick) -> dict:
    from slimdeploy.latency.backends import TorchBackend
    from slimdeploy.latency.profile import profile_device
    from slimdeploy.models import create_model

    path = profile_path(out, dev, cfg)
    name = path.stem
    kw = dict(token_points=3, calibration_models=4, step=8) if quick else {}
    p = profile_device(name, TorchBackend(dev, threads=None), create_model(cfg), cfg, 1, path, **kw)
    cal = p.calibration
    return {"profile": str(path), "profile_seconds": p.seconds, "measurements": p.measurements,
            "fit_median_abs_error": cal["fit_median_abs_error"], "fit_max_abs_error": cal["fit_max_abs_error"],
            "torch_device": p.torch_device}


def closed_loop(cfg, dev, work, out) -> dict:
    from slimdeploy.data import load_data
    from slimdeploy.models import arch_of, data_config, load_dense
    from slimdeploy.select.stage import SelectOptions, select_run
    from slimdeploy.select.target import parse_target

    profile = profile_path(out, dev, cfg)

    model, _ = load_dense(work)
    data = load_data("synthetic", data_config(model), arch_of(model).num_classes, 256, 64)
    res = select_run(work, parse_target("60%"), data, str(profile),
                     options=SelectOptions(verify_latency=True, calibration_images=64))
    return {"chosen": res.get("chosen"), "rounds": [{k: r[k] for k in ("y", "y_high", "measured_ms", "predicted_ms")}
                                                    for r in res.get("measured", [])],
            "met": res.get("met")}


def retrain_verify(cfg, dev, work, data_name, limits) -> dict:
    from slimdeploy.data import load_data
    from slimdeploy.export import export_run
    from slimdeploy.models import arch_of, data_config, load_dense
    from slimdeploy.prune import prune_run
    from slimdeploy.retrain import DistillConfig, retrain_run
    from slimdeploy.trainer import TrainConfig
    from slimdeploy.verify import verify_run

    model, _ = load_dense(work)
    data = load_data(data_name, data_config(model), arch_of(model).num_classes, **limits)
    prune_run(work)
    rec = retrain_run(work, data, TrainConfig(epochs=1, batch_size=64, seed=0), DistillConfig(), dev)
    losses = [h["loss"] for h in rec["history"]]
    export_run(work, batch_size=1)
    rep = verify_run(work, data, backend="torch", torch_device=dev)
    return {"retrain_top1_before": rec["top1_before_retrain"], "retrain_top1": rec["top1"],
            "retrain_losses_finite": all(map(math.isfinite, losses)),
            "parity_passed": rep.parity.passed, "max_abs_diff": rep.parity.max_abs_diff,
            "top1": rep.slim.top1, "dense_top1": rep.dense.top1, "slim_ms": rep.slim.latency_ms,
            "dense_ms": rep.dense.latency_ms, "met_target": rep.met_target,
            "reference_device": rep.extra["reference_device"]}


if __name__ == "__main__":
    main()
