"""Stage: select the slim structure for a target. Candidates solved against the cost model, the one with the
lowest measured distillation loss kept, then (for latency targets) the closed loop on the device.

Writes spec.json (the SlimSpec, with the figures in meta), select.json (the target, every candidate with its
predicted ms and scores and which was chosen and why, every loop round, the loop's refit of the latency model,
warnings, the cost of selection), structure.png and candidates.png.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..analysis import spec_macs, spec_params
from ..defaults import SELECT, TOKENS
from ..errors import SlimError
from ..fileio import read_json, write_json
from ..latency.model import LatencyModel
from ..progress import log
from ..types import SlimSpec
from .candidates import Family, Problem, candidates
from .importance import Importance, load_importance, spec_importance
from .loop import AIM, closed_loop, dense_reference
from .scoring import Scorer, calibration_set
from .solver import Cost, LatencyCost, MacsCost, ParamsCost
from .target import Target
from .vitslim import fraction_spec

OUTPUTS = ["spec.json", "select.json"]


@dataclass
class SelectOptions:
    importance: str = "auto"
    verify_latency: bool = False
    rounds: int = SELECT["rounds"]
    calibration_images: int | None = None  # default: SELECT's, at most half the training images
    recovery_steps: int = 0
    recovery_top: int = SELECT["recovery_top"]
    tau: float = SELECT["tau"]
    precision: str | None = None  # refuse a profile of another precision (default: the profile's)
    prior_weight: float = TOKENS["prior_weight"]  # attentive mode: the positions' prior in the ranking (0: none)


def rank_candidates(problem: Problem, budget: float, scorer: Scorer, recovery_top: int, lm: LatencyModel | None
                    ) -> tuple[list[dict], int]:
    """Every candidate scored right after pruning; with recovery steps, the best `recovery_top` of them (and
    ViT-Slim's rule) scored again after a short recovery, which decides. Returns the rows and the chosen index."""
    rows = []
    for fam, spec in candidates(problem, budget):
        s = scorer(spec)
        rows.append({"family": fam.name, "kind": fam.kind, "params": list(fam.params),
                     "cost": problem.cost.of_spec(spec),
                     "predicted_ms": lm.predict(spec) if lm is not None else None, "macs": spec_macs(spec),
                     "params_count": spec_params(spec), "kept_importance": spec_importance(spec, problem.imp),
                     "loss": s["loss"], "ce": s["ce"], "agreement": s["agreement"], "widths": spec.summary(),
                     "_family": fam, "_spec": spec})
        log(f"select: {fam.name}: loss {s['loss']:.4f}, agreement {100 * s['agreement']:.1f}%")
    if not rows:
        raise SlimError("no candidate structure meets the target: raise it")
    key = "loss"
    if scorer.recovery_steps > 0:
        order = sorted(range(len(rows)), key=lambda i: rows[i]["loss"])
        vitslim = {i for i, r in enumerate(rows) if r["kind"] == "fractions" and r["params"] == [1.0, 1.0, 1.0]}
        chosen = set(order[:recovery_top]) | vitslim
        for i in sorted(chosen):
            r = scorer(rows[i]["_spec"], recovery=True)
            rows[i]["loss_after_recovery"] = r["loss"]
            rows[i]["agreement_after_recovery"] = r["agreement"]
            log(f"select: {rows[i]['family']}: loss after {scorer.recovery_steps} recovery steps {r['loss']:.4f}")
        key = "loss_after_recovery"
    best = min((i for i, r in enumerate(rows) if key in r), key=lambda i: rows[i][key])
    return rows, best


def select_run(run_dir: str | Path, target: Target, data=None, device: str | None = None,
               profiles_dir: str | Path | None = None, options: SelectOptions | None = None,
               lm: LatencyModel | None = None, measure=None) -> dict:
    """The select stage on a run directory (reads search/, writes spec.json and select.json).

    data: the DataBundle (its training images give the calibration split); lm and measure override the device
    profile and the device measurement (tests, benchmarks)."""
    from ..models import arch_of, load_dense
    from ..prune import searched_model
    from ..runs import Run

    o = options or SelectOptions()
    run_dir = Path(run_dir)
    r = Run(run_dir)
    start = time.perf_counter()
    teacher, mcfg = load_dense(run_dir)
    arch = arch_of(teacher)
    warnings: list[str] = []
    record: dict = {"target": target.to_dict(), "warnings": warnings}
    options_lms: list[LatencyModel] = []  # with --precision auto: one latency model per precision profiled
    if target.kind == "latency" and lm is None:
        from ..latency.profile import load_latency_model

        if device is None:
            raise SlimError("a latency target needs --device (a profile name, or local)")
        if o.precision == "auto":
            options_lms, warnings[:] = _auto_profiles(device, teacher, mcfg, profiles_dir)
            lm = options_lms[0]
        else:
            lm, warnings[:] = load_latency_model(device, teacher, mcfg, profiles_dir=profiles_dir,
                                                 precision=o.precision)
        for w in warnings:
            log(f"[yellow]warning:[/yellow] {w}")
    record["profile_path"] = str(lm.path) if lm is not None and lm.path else None
    inputs = r.inputs({"target": target.to_dict(), "options": o.__dict__, "data": data.key if data else None,
                           "device": device},
                          [r / "search" / "masks.safetensors", r / "search" / "weights.safetensors",
                           r / "base.safetensors"] + ([lm.path] if lm is not None and lm.path else []))
    if r.current("select", inputs, OUTPUTS):
        return {"spec": r.spec(), **read_json(r / "select.json", "select record")}
    imp, search_cfg = load_importance(run_dir, o.importance)
    imp = replace(imp, prior_weight=o.prior_weight)
    if lm is not None:  # a block that drops tokens pays the attentive ranking or the static gather
        lm = lm.for_tokens(imp.token_mode)
        options_lms = [m.for_tokens(imp.token_mode) for m in options_lms]
    dense_spec = SlimSpec.dense(mcfg, arch)
    if target.kind == "fractions":
        spec = fraction_spec(arch, mcfg, imp, *target.keep)
        record.update(note="ViT-Slim's per-kind kept fractions", chosen="fractions")
        return _write(r, inputs, spec, dense_spec, imp, target, lm, record, None)

    searched = searched_model(run_dir, dense_spec)
    if len(options_lms) > 1:  # --precision auto: the precision whose best candidate scores best decides
        lm = _choose_precision(options_lms, imp, arch, mcfg, target, dense_spec, searched, teacher, data, o, record)
        record["profile_path"] = str(lm.path)
    looping = target.kind == "latency" and o.verify_latency
    measurer, dense_ms, lm_now = None, None, lm
    if looping:  # the dense model measured now: the budget's reference, and how fast this machine runs today
        measurer = measure or _device_measurer(lm, searched, teacher, arch)
        dense_ms, deploy_ms = dense_reference(measurer, dense_spec)
        lm_now = lm.corrected(deploy_ms / lm.predict(dense_spec), 0.0)
    cost: Cost = {"macs": lambda: MacsCost(arch), "params": lambda: ParamsCost(arch),
                  "latency": lambda: LatencyCost(lm_now)}[target.kind]()
    budget = _budget(target, dense_spec, lm, dense_ms)
    record.update(budget=budget, dense_measured_ms=dense_ms)
    if budget >= cost.of_spec(dense_spec):
        log(f"select: the target ({budget:.4g} {cost.unit}) is at or above the dense model's: keeping it")
        record.update(note="target at or above the dense model: dense model kept", chosen="dense")
        return _write(r, inputs, dense_spec, dense_spec, imp, target, lm, record, None)

    if data is None:
        raise SlimError("selection scores candidates on training images: pass --data")
    n_cal = o.calibration_images or min(SELECT["calibration_images"], len(data.train_eval) // 2)
    scorer = Scorer(searched, teacher, data, calibration_set(data, teacher, n_cal), o.recovery_steps, tau=o.tau)
    problem = Problem(arch, mcfg, imp, cost)
    aim = AIM if looping else 1.0
    rows, best = rank_candidates(problem, aim * budget, scorer, o.recovery_top, lm_now)
    family: Family = rows[best]["_family"]
    spec: SlimSpec = rows[best]["_spec"]
    why = ("lowest distillation loss " + ("after recovery" if o.recovery_steps > 0 else "right after pruning")
           + f" among {len(rows)} candidates on {n_cal} calibration images")
    record.update(chosen=family.name, why=why, scoring_seconds=scorer.seconds)
    log(f"select: chosen {family.name} ({why})")
    if looping:
        def solve(model, b):
            return Problem(arch, mcfg, imp, LatencyCost(model)).solve(family, b)
        res = closed_loop(solve, lm, measurer, dense_spec, None if target.relative else target.value,
                          target.fraction, o.rounds, (dense_ms, deploy_ms))
        spec = res.spec
        record.update(measured=res.measured, rounds=res.rounds, chosen_measured=res.chosen,
                      chosen_round=res.chosen_round, refit=res.refit, met=res.met,
                      measured_ms=res.measured_ms, measured_high_ms=res.measured_high_ms, target_ms=res.target_ms)
        final = scorer(spec)
        record.update(final_loss=final["loss"], final_agreement=final["agreement"])
    record.update(candidates=[{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], chosen_index=best,
                  seconds=time.perf_counter() - start, search_seconds=_search_seconds(run_dir))
    return _write(r, inputs, spec, dense_spec, imp, target, lm, record, rows)


def _auto_profiles(device: str, teacher, mcfg, profiles_dir) -> tuple[list[LatencyModel], list[str]]:
    """The profiles --precision auto chooses among: for local, this machine at fp32 and int8 (each measured once);
    for a named device NAME, NAME and whichever of NAME-int8, NAME-bf16, NAME-fp16 exist."""
    from ..latency.model import resolve_profile
    from ..latency.profile import load_latency_model

    if device == "local":
        names = [("local", "fp32"), ("local", "int8")]
    else:
        names = [(device, None)]
        for p in ("int8", "bf16", "fp16"):
            try:
                resolve_profile(f"{device}-{p}", profiles_dir)
                names.append((f"{device}-{p}", p))
            except SlimError:
                pass
    out, warnings = [], []
    for name, precision in names:
        lm, w = load_latency_model(name, teacher, mcfg, profiles_dir=profiles_dir, precision=precision)
        out.append(lm)
        warnings += [x for x in w if x not in warnings]
    return out, warnings


def _choose_precision(lms: list[LatencyModel], imp, arch, mcfg, target: Target, dense_spec: SlimSpec, searched,
                      teacher, data, o: SelectOptions, record: dict) -> LatencyModel:
    """At each precision, the best candidate for the target on that precision's tables (a percentage of the
    dense model's predicted fp32 latency), scored as it would be deployed (int8: quantized and run in ONNX
    Runtime on the calibration split); the precision with the lowest loss is kept."""
    from .scoring import quantized_loss

    reference = next((lm for lm in lms if lm.profile.precision == "fp32"), lms[0])
    budget = (target.fraction * reference.predict(dense_spec) if target.relative else float(target.value)) * AIM
    n_cal = o.calibration_images or min(SELECT["calibration_images"], len(data.train_eval) // 2)
    scorer = Scorer(searched, teacher, data, calibration_set(data, teacher, n_cal), 0, tau=o.tau)
    results = []
    for lm in lms:
        p = lm.profile.precision
        try:
            rows, best = rank_candidates(Problem(arch, mcfg, imp, LatencyCost(lm)), budget, scorer, 0, lm)
        except SlimError:
            results.append({"precision": p, "reaches": False})
            continue
        spec = rows[best]["_spec"]
        loss = quantized_loss(spec, searched, scorer.cal, data, o.tau) if p == "int8" else rows[best]["loss"]
        results.append({"precision": p, "reaches": True, "family": rows[best]["family"], "loss": loss,
                        "predicted_ms": lm.predict(spec), "profile": str(lm.path)})
        log(f"select: --precision auto: {p}: {rows[best]['family']}, loss {loss:.4f} (as deployed)")
    reached = [r for r in results if r["reaches"]]
    if not reached:
        raise SlimError("no profiled precision reaches the target: raise it")
    best = min(reached, key=lambda r: r["loss"])
    record["precision_auto"] = {"options": results, "chosen": best["precision"]}
    log(f"select: --precision auto chose {best['precision']}")
    return next(lm for lm in lms if lm.profile.precision == best["precision"])


def _device_measurer(lm: LatencyModel, model, dense, arch):
    """Structures measured at the profile's precision, beside the dense model at fp32 on the same runtime (the
    reference a percentage target is taken of)."""
    from ..latency.backends import get_backend
    from ..latency.measure import SpecMeasurer

    p = lm.profile
    kw = dict(threads=p.threads, torch_device=p.torch_device or "auto", torch_mode=p.torch_mode or "eager")
    backend = get_backend(p.backend, precision=p.precision, **kw)
    reference = backend if p.precision == "fp32" else get_backend(p.backend, precision="fp32", **kw)
    return SpecMeasurer(backend, model, arch, p.batch_size, dense, reference)


def _budget(target: Target, dense_spec: SlimSpec, lm: LatencyModel | None, dense_ms: float | None) -> float:
    """The budget in the cost's unit: a percentage of the dense model measured on the device (in the same
    protocol) when it was measured, else of its predicted latency."""
    if not target.relative:
        return float(target.value)
    if dense_ms is not None:
        return target.fraction * dense_ms
    log("select: without --verify-latency a percentage target is taken of the dense model's predicted latency")
    return target.fraction * lm.predict(dense_spec)


def _search_seconds(run_dir: Path) -> float | None:
    p = run_dir / "search" / "history.json"
    if not p.is_file():
        return None
    return float(sum(h.get("seconds", 0.0) for h in read_json(p, "search history")))


def _write(r, inputs: dict, spec: SlimSpec, dense_spec: SlimSpec, imp: Importance, target: Target,
           lm: LatencyModel | None, record: dict, rows) -> dict:
    from ..plots import plot_candidates, plot_spec

    run_dir = r.dir
    spec.meta.update({"target": target.kind, "target_value": record.get("target_ms", target.value),
                      "target_fraction": target.fraction, "target_text": target.text,
                      "predicted_latency_ms": lm.predict(spec) if lm is not None else None,
                      "dense_predicted_latency_ms": lm.predict(dense_spec) if lm is not None else None,
                      "dense_measured_latency_ms": record.get("dense_measured_ms"),
                      "measured_latency_ms": record.get("measured_ms"), "met_target": record.get("met"),
                      "macs": spec_macs(spec), "params": spec_params(spec), "dense_macs": spec_macs(dense_spec),
                      "dense_params": spec_params(dense_spec), "importance": imp.mode,
                      "kept_importance": spec_importance(spec, imp),
                      "device": lm.profile.device if lm is not None else None,
                      "profile_path": record.get("profile_path"),
                      "profile_fingerprint": lm.profile.fingerprint if lm is not None else None,
                      "selected_by": record.get("chosen"), "warnings": record.get("warnings", [])})
    spec.save(run_dir / "spec.json")
    write_json(run_dir / "select.json", json.loads(json.dumps(record, default=str)))
    plot_spec(spec, run_dir / "structure.png", title=f"chosen structure ({target.text})")
    if rows:
        plot_candidates(record, run_dir / "candidates.png")
    r.finished("select", inputs, OUTPUTS)
    return {"spec": spec, **record}
