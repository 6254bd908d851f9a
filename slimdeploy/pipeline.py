"""`slimdeploy run`: train (if needed) -> search -> select -> prune -> retrain -> export -> verify.

Each stage is skipped when its artifact exists, and the training stages resume from their last
epoch, so re-running the same command after a crash or Ctrl-C continues where it stopped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import dist
from .errors import SlimError
from .fileio import read_json, write_json
from .progress import log
from .runs import Run

STAGES = ("train", "search", "select", "prune", "retrain", "export", "verify")


@dataclass
class RunOptions:
    out: Path
    target_latency: str | None = "50%"
    target_macs: str | None = None
    target_params: str | None = None
    device: str | None = None
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
    batch_size: int = 128
    train_epochs: int = 7
    train_lr: float = 1e-3
    label_smoothing: float = 0.1
    search_epochs: int = 2
    search_lr: float = 5e-4
    w_attn: float = 2e-4
    w_mlp: float = 5e-5
    w_tok: float = 1e-4
    search_tokens: bool = True
    importance: str = "auto"
    verify_latency: bool = True
    rounds: int = 4
    retrain_epochs: int = 5
    retrain_lr: float = 1e-3
    distill: str = "soft"
    alpha: float = 0.7
    tau: float = 2.0
    trt: bool = False
    fp16: bool = False
    backend: str | None = None  # verify backend; default: the profile's
    seed: int = 0
    torch_device: str = "auto"
    extra: dict = field(default_factory=dict)

    def key(self) -> dict:
        """What must not change between a run and its resumption."""
        return {k: str(v) for k, v in asdict(self).items()
                if k in ("target_latency", "target_macs", "target_params", "device", "model", "data", "train_limit",
                         "val_limit", "search_epochs", "retrain_epochs", "distill", "w_attn", "w_mlp", "w_tok",
                         "importance", "seed")}


def run_pipeline(o: RunOptions) -> dict:
    """Run every stage that has not run yet; return the final report as a dict."""
    from .data import first_batch, load_data
    from .latency import LatencyModel, check_profile_fits
    from .masks import SearchDims
    from .models import ModelConfig, create_model, data_config, load_dense
    from .trainer import TrainConfig

    r = Run(o.out)
    ctx = dist.setup(o.torch_device)
    main = ctx.is_main
    record_path = r / "run.json"
    if record_path.is_file():
        prev = read_json(record_path, "run record")
        changed = {k: (prev["options"].get(k), v) for k, v in o.key().items() if prev["options"].get(k) != v}
        if changed:
            k, (was, now) = next(iter(changed.items()))
            raise SlimError(f"{o.out} was started with {k}={was}, not {now}: use another --out (or the same options)")
    elif main:
        write_json(record_path, {"options": o.key(), "stages": {}})
    lm = LatencyModel.load(o.device, o.profiles_dir) if o.device else None
    if o.target_latency and lm is None:
        raise SlimError("a latency target needs --device NAME (a device profile; see slimdeploy profile)")

    def stage(i: int, name: str, done: bool) -> bool:
        log(f"[bold]\\[{i}/{len(STAGES)}] {name}[/bold]" + (" (done, skipped)" if done else ""), main)
        return not done

    # 1. base model: given, or trained here
    if stage(1, "train", r.has_base):
        if o.checkpoint is not None or o.pretrained:
            model, cfg = r.ensure_base(o.model, o.checkpoint, o.pretrained, o.num_classes, o.img_size, o.in_chans)
        else:
            from .models import arch_of
            from .train import train_dense

            cfg = ModelConfig(o.model or "fmnist-vit", o.num_classes, o.img_size, o.in_chans)
            model = create_model(cfg)
            a = arch_of(model)
            cfg = ModelConfig(cfg.name, a.num_classes, a.img_size, a.in_chans)
            bundle = load_data(o.data, data_config(model), a.num_classes, o.train_limit, o.val_limit)
            tcfg = TrainConfig(epochs=o.train_epochs, batch_size=o.batch_size, lr=o.train_lr,
                               label_smoothing=o.label_smoothing, seed=o.seed)
            train_dense(model, cfg, bundle, tcfg, o.out, resume=True, torch_device=o.torch_device)
    model, cfg = load_dense(o.out)
    from .models import arch_of

    arch = arch_of(model)
    if lm is not None:
        check_profile_fits(lm.profile, arch)
    bundle = load_data(o.data, data_config(model), arch.num_classes, o.train_limit, o.val_limit)

    # 2. search
    if stage(2, "search", r.has_search):
        from .search import SearchConfig, search

        search(model, bundle, TrainConfig(epochs=o.search_epochs, batch_size=o.batch_size, lr=o.search_lr,
                                          min_lr=o.search_lr, weight_decay=1e-3, warmup_epochs=0.0, clip_grad=None,
                                          seed=o.seed),
               SearchConfig(o.w_attn, o.w_mlp, o.w_tok, dims=SearchDims(tokens=o.search_tokens)), o.out, resume=True,
               torch_device=o.torch_device)

    # 3. select
    if stage(3, "select", (r / "spec.json").is_file()) and main:
        from .select import parse_target, run_select
        from .types import SlimSpec

        target = parse_target(o.target_latency, o.target_macs, o.target_params, lm=lm,
                              dense=SlimSpec.dense(cfg, arch))
        run_select(o.out, target, lm, o.importance, o.verify_latency, o.rounds)
    dist.barrier()

    # 4. prune
    if stage(4, "prune", (r / "pruned.safetensors").is_file()) and main:
        from .prune import prune, searched_model

        spec = r.spec()
        x = first_batch(bundle, 16)
        prune(spec, searched_model(o.out, spec), o.out, x)
    dist.barrier()

    # 5. retrain
    if stage(5, "retrain", (r / "slim.safetensors").is_file()):
        from .retrain import DistillConfig, retrain
        from .slim import load_slim

        student = load_slim(r.spec(), r / "pruned.safetensors")
        teacher, _ = load_dense(o.out)  # the search trained `model` in place: reload the original weights
        retrain(student, teacher, bundle, TrainConfig(epochs=o.retrain_epochs, batch_size=o.batch_size,
                                                    lr=o.retrain_lr, seed=o.seed, warmup_epochs=0.2),
                DistillConfig(o.distill, o.alpha, o.tau), o.out, resume=True, torch_device=o.torch_device)

    # 6. export, 7. verify (rank 0 only: they measure latency)
    report = None
    if main:
        if stage(6, "export", (r / "model.onnx").is_file() and (not o.trt or (r / "model.plan").is_file())):
            from .export import export_run

            # a fixed batch: the latency target and the closed loop are at the profile's batch size, and
            # ONNX Runtime runs a fixed-shape graph faster than a dynamic one (measured: 7% on fmnist-vit)
            export_run(o.out, trt=o.trt, fp16=o.fp16, batch_size=lm.profile.batch_size if lm else None)
        stage(7, "verify", False)
        from .verify import verify

        backend = o.backend or ("trt" if o.trt else (lm.profile.backend if lm else "ort-cpu"))
        spec = r.spec()
        target_ms = spec.meta.get("target_value") if spec.meta.get("target") == "latency" else None
        rep = verify(o.out, bundle, backend, batch_size=lm.profile.batch_size if lm else 1,
                     threads=lm.profile.threads if lm else 1, target_ms=target_ms, device=o.device, lm=lm,
                     torch_device=o.torch_device)
        report = rep.to_dict()
    dist.barrier()
    return report

