"""Stage: select the slim structure for a target, with a closed measurement loop.

Target: latency (ms, or a fraction of the dense model's predicted latency), MACs, parameters, or
ViT-Slim's per-kind kept fractions. With verify_latency, each round prunes, exports and measures
the chosen model on the profile's backend; if the measurement misses the target window
[0.9, 1.0] x target, the internal budget is rescaled by target / measured and the selection runs
again (a bounded number of rounds). Every round is recorded in select.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from timm.models.vision_transformer import VisionTransformer

from .analysis import spec_macs, spec_params
from .errors import SlimError
from .fileio import write_json
from .latency import LatencyModel, check_profile_fits
from .progress import log
from .selector import (
    Importance,
    LatencyCost,
    MacsCost,
    ParamsCost,
    Selector,
    fraction_spec,
    parse_count,
    parse_latency,
    spec_importance,
)
from .types import SlimSpec

WINDOW = (0.9, 1.0)  # accepted measured / target
AIM = 0.96  # where the closed loop aims inside the window


@dataclass
class Target:
    kind: str  # latency | macs | params | fractions
    value: float | None = None  # ms, MACs or params
    fractions: tuple[float, float, float] | None = None
    text: str = ""


def parse_target(latency: str | None = None, macs: str | None = None, params: str | None = None,
                 keep: tuple[float | None, float | None, float | None] = (None, None, None),
                 lm: LatencyModel | None = None, dense: SlimSpec | None = None) -> Target:
    given = [x is not None for x in (latency, macs, params)] + [any(k is not None for k in keep)]
    if sum(given) != 1:
        raise SlimError("give exactly one target: --target-latency, --target-macs, --target-params or "
                        "--keep-attn/--keep-mlp/--keep-tokens")
    if latency is not None:
        kind, v = parse_latency(latency)
        if kind == "fraction":
            if lm is None or dense is None:
                raise SlimError("a percentage target needs a device profile")
            v = v * lm.predict(dense)
        return Target("latency", v, text=latency)
    if macs is not None:
        return Target("macs", parse_count(macs, "MACs target"), text=macs)
    if params is not None:
        return Target("params", parse_count(params, "parameter target"), text=params)
    ka, km, kt = (1.0 if k is None else k for k in keep)
    return Target("fractions", fractions=(ka, km, kt), text=f"attn {ka}, mlp {km}, tokens {kt}")


def measure_spec(spec: SlimSpec, dense: VisionTransformer, lm: LatencyModel, backend=None) -> dict:
    """Prune dense to spec, export as deployed, and time on the profile's backend (ms)."""
    from .backends import get_backend
    from .profile import measure_model
    from .slim import build_slim

    p = lm.profile
    backend = backend or get_backend(p.backend, threads=p.threads, precision=p.precision)
    return measure_model(backend, build_slim(spec, dense), spec.arch, p.batch_size)


def select_structure(imp: Importance, dense_spec: SlimSpec, target: Target, lm: LatencyModel | None = None,
                     dense_model: VisionTransformer | None = None, verify_latency: bool = False,
                     rounds: int = 4, measure=None) -> dict:
    """Choose the spec. Returns {"spec", "rounds", "kept_importance", ...}; SlimError if unreachable.

    measure(spec) -> {"median_ms", ...} overrides the real measurement (tests, benchmarks).
    """
    arch, source = dense_spec.arch, dense_spec.source
    if target.kind == "fractions":
        spec = fraction_spec(arch, source, imp, *target.fractions)
        return _result(spec, imp, lm, [], note="ViT-Slim per-kind kept fractions")
    if target.kind == "macs":
        return _result(Selector(arch, source, imp, MacsCost(arch)).select(target.value).spec, imp, lm, [])
    if target.kind == "params":
        return _result(Selector(arch, source, imp, ParamsCost(arch)).select(target.value).spec, imp, lm, [])
    if lm is None:
        raise SlimError("a latency target needs --device (a measured device profile)")
    dense_ms = lm.predict(dense_spec)
    if target.value >= dense_ms:
        log(f"select: target {target.value:.3f} ms is at or above the dense model's predicted {dense_ms:.3f} ms: "
            "keeping the dense model")
        return _result(dense_spec, imp, lm, [], note="target above dense latency: dense model kept")
    selector = Selector(arch, source, imp, LatencyCost(lm))
    floor = selector.minimum_cost()
    if target.value < floor:
        raise SlimError(f"target {target.value:.3f} ms is below the smallest latency this profile allows "
                        f"({floor:.3f} ms)")
    # with measurements to come, aim inside the accepted window rather than at its edge: the
    # prediction is off by a few percent either way, and an aim at the edge misses half the time
    budget = max(floor, target.value * (AIM if verify_latency else 1.0))
    history, best = [], None
    n_rounds = max(1, rounds) if verify_latency else 1
    for r in range(n_rounds):
        sel = selector.select(budget)
        row = {"round": r + 1, "budget_ms": budget, "predicted_ms": sel.cost, "kept_importance": sel.importance}
        if verify_latency:
            if measure is None and dense_model is None:
                raise SlimError("the closed loop needs the dense model to prune and measure")
            t = measure(sel.spec) if measure is not None else measure_spec(sel.spec, dense_model, lm)
            row.update(measured_ms=t["median_ms"], measured_spread=t.get("spread"))
            ratio = t["median_ms"] / target.value
            row["measured_over_target"] = ratio
            log(f"select: round {r + 1}: predicted {sel.cost:.3f} ms, measured {t['median_ms']:.3f} ms "
                f"({100 * ratio:.0f}% of target)")
            if ratio <= WINDOW[1] and (best is None or sel.importance > best[1].importance):
                best = (row, sel)
            history.append(row)
            if WINDOW[0] <= ratio <= WINDOW[1]:
                break
            # rescale by the measured error; never ask for less than the profile allows
            budget = max(floor, budget * AIM * target.value / t["median_ms"])
        else:
            history.append(row)
            best = (row, sel)
    if best is None:  # no round met the target: keep the last, say so
        best = (history[-1], sel)
    row, sel = best
    return _result(sel.spec, imp, lm, history, chosen_round=row["round"], measured_ms=row.get("measured_ms"))


def _result(spec: SlimSpec, imp: Importance, lm: LatencyModel | None, rounds: list[dict], **extra) -> dict:
    return {"spec": spec, "rounds": rounds, "kept_importance": spec_importance(spec, imp),
            "predicted_ms": lm.predict(spec) if lm is not None else None, **extra}


def run_select(run_dir: str | Path, target: Target, lm: LatencyModel | None, importance: str = "auto",
               verify_latency: bool = False, rounds: int = 4, weights: str = "auto") -> dict:
    """The select stage on a run directory: reads search/masks, writes spec.json, select.json, structure.png."""
    from .models import arch_of, load_dense
    from .plots import plot_spec
    from .search import load_masks

    run_dir = Path(run_dir)
    masks, cfg = load_masks(run_dir)
    factors = {"qk": cfg.get("w_attn", 2e-4), "v": cfg.get("w_attn", 2e-4), "mlp": cfg.get("w_mlp", 5e-5),
               "tok": cfg.get("w_tok", 1e-4)}
    imp = Importance.from_masks(masks, factors, importance)
    dense_model, mcfg = load_dense(run_dir)
    arch = arch_of(dense_model)
    if lm is not None:
        check_profile_fits(lm.profile, arch)
    dense_spec = SlimSpec.dense(mcfg, arch)
    measured_model = dense_model
    if verify_latency and weights != "base" and (run_dir / "search" / "weights.safetensors").is_file():
        from .prune import searched_model

        measured_model = searched_model(run_dir, dense_spec)
    res = select_structure(imp, dense_spec, target, lm, measured_model, verify_latency, rounds)
    spec: SlimSpec = res["spec"]
    spec.meta.update({"target": target.kind, "target_value": target.value, "target_text": target.text,
                      "predicted_latency_ms": res["predicted_ms"], "macs": spec_macs(spec),
                      "params": spec_params(spec), "dense_macs": spec_macs(dense_spec),
                      "dense_params": spec_params(dense_spec), "importance": imp.mode,
                      "kept_importance": res["kept_importance"],
                      "total_importance": spec_importance(dense_spec, imp),
                      "device": lm.profile.device if lm else None,
                      "dense_predicted_latency_ms": lm.predict(dense_spec) if lm else None,
                      "measured_latency_ms": res.get("measured_ms")})
    spec.save(run_dir / "spec.json")
    write_json(run_dir / "select.json", {"target": target.__dict__, "rounds": res["rounds"],
                                         "chosen_round": res.get("chosen_round"), "note": res.get("note"),
                                         "meta": spec.meta})
    plot_spec(spec, run_dir / "structure.png", title=f"chosen structure ({target.text})")
    return res
