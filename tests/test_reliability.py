"""Reliability: no NaN in the search, the data path follows the model as built, run directories that cannot go
stale or collide, a crash at any stage resumed to the same result, bad input as one line, install conflicts."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace

import pytest
import torch

from slimdeploy.errors import SlimError
from slimdeploy.masks import MaskedViT
from slimdeploy.models import arch_of, create_model, data_config
from slimdeploy.pipeline import run_pipeline
from slimdeploy.select.target import parse_target
from slimdeploy.types import ModelConfig

from .conftest import tiny_model
from .test_cli import slimdeploy
from .test_pipeline import tiny_options

# ---- the search ----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["t-cls", "t-avg", "t-qknorm", "t-distilled"])
def test_search_is_finite_at_masks_of_exactly_zero_and_one(variant):
    model = tiny_model(variant).train()
    m = MaskedViT(model)
    with torch.no_grad():
        m.tok[:, ::2] = 0.0  # exactly removed tokens
        m.qk[0, 0] = 0.0
        m.v[1, :, :3] = 0.0
        m.mlp[2, ::3] = 0.0  # and the rest exactly 1
    a = arch_of(model)
    x = torch.randn(4, a.in_chans, a.img_size, a.img_size)
    out = m(x)
    loss = torch.nn.functional.cross_entropy(out, torch.arange(4) % a.num_classes)
    loss = loss + sum(v for v in m.l1().values())
    loss.backward()
    assert torch.isfinite(out).all() and torch.isfinite(loss)
    for name, p in m.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    for p in m.mask_params().values():  # the Taylor score the search records: |m * dL/dm|
        assert torch.isfinite((p.detach().clamp(0, 1) * p.grad).abs()).all()


# ---- the data path ---------------------------------------------------------------------------------

def test_data_follows_the_model_as_built():
    """A timm ViT built at another size and channel count gets its data at that size (timm's pretrained_cfg
    keeps the checkpoint's 224x224x3)."""
    from slimdeploy.data import first_batch, load_data

    model = create_model(ModelConfig("deit_tiny_patch16_224", num_classes=3, img_size=32, in_chans=1))
    cfg = data_config(model)
    assert cfg["input_size"] == (1, 32, 32)
    x = first_batch(load_data("synthetic", cfg, 3, 16, 16), 4)
    assert x.shape == (4, 1, 32, 32) and model.eval()(x).shape == (4, 3)


# ---- run directories -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """An uninterrupted tiny run: the reference every crashed-and-resumed run must equal."""
    root = tmp_path_factory.mktemp("rel")
    opts = tiny_options(root, "ref", train_limit=256, val_limit=64, train_epochs=2, search_epochs=2,
                        retrain_epochs=2, rounds=2, calibration_images=64, recovery_steps=4, max_drop=None)
    report = run_pipeline(opts)
    return root, opts, report


def _crash_once(monkeypatch, target: str, after: int = 0):
    """Make `module.attr` raise KeyboardInterrupt (a kill) on its call number after+1, once."""
    import importlib

    mod_name, attr = target.rsplit(".", 1)
    mod = importlib.import_module(mod_name)
    real = getattr(mod, attr)
    calls = {"n": 0}

    def crashing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == after + 1:
            raise KeyboardInterrupt(f"killed in {target}")
        return real(*a, **kw)
    monkeypatch.setattr(mod, attr, crashing)


# where each stage is killed: in the middle of its work or as it writes its artifact
CRASHES = {
    "train": ("slimdeploy.trainer.save_torch", 1),  # after epoch 1's checkpoint, at epoch 2's
    "search": ("slimdeploy.trainer.save_torch", 3),  # train's 2 epochs, then search epoch 2
    "select": ("slimdeploy.select.scoring.score", 3),
    "prune": ("slimdeploy.prune.save_weights", 0),
    "retrain": ("slimdeploy.trainer.save_torch", 5),  # train 2, search 2, then retrain epoch 1
    "export": ("slimdeploy.export.atomic_write_bytes", 0),
    "verify": ("slimdeploy.verify.write_json", 0),
}


@pytest.mark.parametrize("stage", list(CRASHES))
def test_a_kill_at_any_stage_then_a_rerun_gives_the_same_result(base_run, stage, monkeypatch, tmp_path):
    from safetensors.torch import load_file

    root, opts, ref = base_run
    o = replace(opts, out=tmp_path / "run")
    target, after = CRASHES[stage]
    with monkeypatch.context() as mp:
        _crash_once(mp, target, after)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(o)
    assert not list(o.out.rglob(".*.tmp")), "a half-written file was left behind"
    rec = json.loads((o.out / "run.json").read_text())["stages"]
    assert rec.get(stage, {}).get("status") != "done"
    report = run_pipeline(o)  # the same command again
    assert (o.out / "spec.json").read_text() == (opts.out / "spec.json").read_text()
    got, want = load_file(str(o.out / "slim.safetensors")), load_file(str(opts.out / "slim.safetensors"))
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], atol=1e-6) for k in got)
    assert report["slim"]["top1"] == ref["slim"]["top1"] and report["parity"]["passed"]


def test_a_second_process_on_the_same_run_directory_gets_one_line(base_run):
    from slimdeploy.runs import Run

    root, opts, _ = base_run
    with Run(opts.out).lock():
        r = slimdeploy("prune", str(opts.out))
    assert r.returncode == 2 and "in use by another slimdeploy process" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_new_search_invalidates_what_was_built_from_the_old_one(base_run, tmp_path, capsys):
    """`slimdeploy search` again with other factors, then `select`: select notices, and so does prune."""
    from slimdeploy.data import load_data
    from slimdeploy.masks import SearchDims
    from slimdeploy.prune import prune_run
    from slimdeploy.runs import file_hash
    from slimdeploy.search import SearchConfig, search_run
    from slimdeploy.select.stage import SelectOptions, select_run
    from slimdeploy.trainer import TrainConfig

    root, opts, _ = base_run
    run = tmp_path / "run"
    shutil.copytree(opts.out, run)
    model = create_model(ModelConfig("t-demo"))
    data = load_data("synthetic", data_config(model), 10, 256, 64)
    search_run(run, data, SearchConfig(5e-2, 5e-2, 5e-2, dims=SearchDims()),
               TrainConfig(epochs=1, batch_size=64, lr=1e-2, min_lr=1e-2, warmup_epochs=0, clip_grad=None))
    capsys.readouterr()
    os.environ["SLIMDEPLOY_QUIET"] = "0"
    try:
        select_run(run, opts.target, data, "tiny-cpu", root, SelectOptions(verify_latency=True, calibration_images=64),
                   measure=opts.measure)
        prune_run(run)
    finally:
        os.environ["SLIMDEPLOY_QUIET"] = "1"
    err = capsys.readouterr().err
    assert "select: its inputs changed since it ran (search/masks.safetensors, search/weights.safetensors" in err
    stages = json.loads((run / "run.json").read_text())["stages"]
    assert stages["select"]["inputs"]["files"]["search/masks.safetensors"] == file_hash(
        run / "search" / "masks.safetensors")
    assert "prune: its inputs changed" in err and "search/weights.safetensors" in err.split("prune:")[1]
    assert stages["prune"]["inputs"]["files"]["spec.json"] == file_hash(run / "spec.json")


# ---- bad input: one line, exit 2, nothing overwritten ----------------------------------------------

def _one_line(r, needle):
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert needle in lines[0], lines[0]


def test_bad_artifacts_are_one_clear_line(base_run, tmp_path):
    root, opts, _ = base_run
    run = tmp_path / "run"
    shutil.copytree(opts.out, run)
    spec = json.loads((run / "spec.json").read_text())

    (run / "spec.json").write_text("{broken")
    _one_line(slimdeploy("prune", str(run)), "not valid JSON")
    bad = json.loads(json.dumps(spec))
    bad["blocks"][0]["mlp"] = [0, 10_000]
    (run / "spec.json").write_text(json.dumps(bad))
    _one_line(slimdeploy("prune", str(run)), "indices must be integers in [0,")
    bad = json.loads(json.dumps(spec))
    bad["blocks"][1]["surprise"] = 1
    (run / "spec.json").write_text(json.dumps(bad))
    _one_line(slimdeploy("prune", str(run)), "unknown keys")
    (run / "spec.json").write_text(json.dumps(spec))

    (run / "select.json").write_text("[1, 2")
    _one_line(slimdeploy("profile", "--device", "local", "--fold", str(run), "--out", str(root / "tiny-cpu.json")),
              "not valid JSON")

    # (t-demo is registered in this process only: what needs the model is checked here, not in a subprocess)
    from safetensors.torch import save_file

    from slimdeploy.latency.model import LatencyModel
    from slimdeploy.select.stage import select_run

    masks = run / "search" / "masks.safetensors"
    save_file({"qk": torch.ones(2, 2, 2), "mlp": torch.ones(3, 4)}, str(masks))
    with pytest.raises(SlimError, match="the masks are from another model; run the search again"):
        select_run(run, parse_target(macs="1M"))
    save_file({"qk": torch.full((3, 2, 16), float("nan"))}, str(masks))
    with pytest.raises(SlimError, match="NaN or inf"):
        select_run(run, parse_target(macs="1M"))

    prof = json.loads((root / "tiny-cpu.json").read_text())
    for bad in (float("nan"), -1.0):
        prof["tables"]["mlp"]["ms"][0][0] = bad
        (tmp_path / "bad.json").write_text(json.dumps(prof))
        with pytest.raises(SlimError, match="NaN or negative entries: re-measure"):
            LatencyModel.load(str(tmp_path / "bad.json"))

    (run / "report.json").write_text("nope")  # verify rewrites its own report; it never reads one
    _one_line(slimdeploy("run", "--out", str(run), "--model", "fmnist-vit", "--data", "synthetic"),
              "holds a run of t-demo, not fmnist-vit")


def test_an_unwritable_out_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        # root ignores permissions: there, a folder that cannot exist (under a file) stands in
        out = ro / "run" if not os.access(ro, os.W_OK) else tmp_path / "a-file" / "run"
        (tmp_path / "a-file").write_text("")
        _one_line(slimdeploy("train", "--out", str(out), "--data", "synthetic", "--epochs", "1"), "cannot write")
    finally:
        ro.chmod(0o700)


def test_a_full_disk_is_one_line_and_leaves_the_old_file(tmp_path, monkeypatch):
    import errno

    from slimdeploy.fileio import save_weights, write_json

    write_json(tmp_path / "a.json", {"v": 1})

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(SlimError, match="cannot write .*a.json: No space left on device"):
        write_json(tmp_path / "a.json", {"v": 2})
    with pytest.raises(SlimError, match="No space left on device"):
        save_weights({"w": torch.ones(3)}, tmp_path / "w.safetensors")
    monkeypatch.undo()
    assert json.loads((tmp_path / "a.json").read_text()) == {"v": 1}
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "w.safetensors").exists()


# ---- installs --------------------------------------------------------------------------------------

def test_doctor_catches_both_onnxruntime_packages(monkeypatch):
    from slimdeploy import doctor

    monkeypatch.setattr(doctor, "_version", lambda d: {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.32.0"}.get(d))
    (check,) = doctor.check_onnxruntime()
    assert not check.ok and "both onnxruntime" in check.detail and "pip uninstall" in check.fix
    monkeypatch.setattr(doctor, "_version", lambda d: None)
    (check,) = doctor.check_onnxruntime()
    assert not check.ok and "slimdeploy[cpu]" in check.fix


def test_doctor_names_a_cached_profile_measured_on_a_busy_machine(tmp_path, monkeypatch):
    from slimdeploy import doctor
    from slimdeploy.latency.backends import get_backend
    from slimdeploy.latency.calibration import FIT
    from slimdeploy.latency.fingerprint import fingerprint_key

    from .synthetic import staircase_profile

    monkeypatch.setenv("SLIMDEPLOY_PROFILES", str(tmp_path))
    key = fingerprint_key(get_backend("ort-cpu").fingerprint())
    prof = staircase_profile(arch_of(tiny_model("t-cls")))
    for name, hw in (("quiet", 0.02), ("busy", 0.15)):
        prof.calibration = {"points": [{"features": {}, "measured_ms": 1.0, "halfwidth": 0.0}]
                            + [{"features": {}, "measured_ms": 0.5, "halfwidth": hw}] * 3, "fit": FIT}
        prof.save(tmp_path / f"local-ort-cpu-{key}-{name}-b1.json")
    (tmp_path / f"local-ort-cpu-{key}-broken-b1.json").write_text("{not json")  # refused where it is used
    checks = doctor.check_profiles()
    assert checks[0].ok and "busy" in checks[0].detail and "quiet" in checks[0].detail
    (busy,) = checks[1:]
    assert not busy.ok and busy.name == f"profile local-ort-cpu-{key}-busy-b1.json"
    assert "busy machine" in busy.detail and "+-15%" in busy.detail and "delete" in busy.fix


def test_doctor_runs_here():
    r = slimdeploy("doctor")
    assert r.returncode == 0 and "onnxruntime" in r.stdout and "tensorrt" in r.stdout


def test_the_extras_cannot_install_both_onnxruntimes():
    from pathlib import Path

    import tomllib

    meta = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("onnxruntime") for d in meta["dependencies"])
    extras = meta["optional-dependencies"]
    assert extras["cpu"] == ["onnxruntime>=1.20"] and extras["gpu"] == ["onnxruntime-gpu>=1.20"]
    assert not any("onnxruntime" in d for d in extras["trt"] + extras["dev"] + extras["bench"])
    assert "torch-pruning" not in " ".join(meta["dependencies"])  # a benchmark baseline, never a dependency


# ---- progress in a log file --------------------------------------------------------------------------

def test_progress_in_a_log_file_is_a_line_a_minute_with_eta_and_a_last_line(capsys):
    from slimdeploy.progress import LineProgress

    now = [100.0]
    with LineProgress(every_s=60, clock=lambda: now[0]) as p:
        task = p.add_task("train", total=1000, completed=200, info="")  # resumed: 200 done before this process
        for _ in range(40):  # 10 steps a 15 s: 4 steps a minute
            now[0] += 15
            p.update(task, advance=10, info="epoch 2/5")
        now[0] += 15
        p.update(task, advance=10)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 11  # one a minute for 10 minutes, then the last one
    assert lines[0] == "train: 240/1000 (24%) 1m00s, eta 19m00s  epoch 2/5"  # 40 steps a minute, 760 to go
    assert lines[9] == "train: 600/1000 (60%) 10m00s, eta 10m00s  epoch 2/5"
    assert lines[10] == "train: 610/1000 (61%) 10m15s  epoch 2/5"
    with LineProgress(every_s=60, clock=lambda: now[0]) as p:
        task = p.add_task("profile", total=5)
        now[0] += 60
        p.update(task, advance=5)
        now[0] += 60
        p.update(task, info="still")  # only the text changed: no line
    assert capsys.readouterr().err == "profile: 5/5 (100%) 1m00s\n"  # printed once: nothing moved after it


def test_progress_is_lines_in_a_pipe_a_bar_on_a_terminal_and_nothing_when_quiet(monkeypatch):
    from rich.progress import Progress

    from slimdeploy import progress

    monkeypatch.delenv("SLIMDEPLOY_QUIET", raising=False)  # conftest quiets the suite
    assert isinstance(progress.make_progress(), progress.LineProgress)  # pytest captures stderr: not a terminal
    assert isinstance(progress.make_progress(enabled=False), Progress)  # off rank 0: rich's, disabled
    monkeypatch.setattr(progress.console, "_force_terminal", True)
    assert isinstance(progress.make_progress(), Progress)
    monkeypatch.setattr(progress.console, "_force_terminal", False)
    monkeypatch.setenv("SLIMDEPLOY_QUIET", "1")
    assert progress.make_progress().disable
