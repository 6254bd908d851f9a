"""Targets, parsed once at the command line (a typo fails in the first second, not after the search).

--target-latency 5ms | 5 | 500us | 0.005s   absolute, in ms
--target-latency 60%                       60% of the dense model's latency measured on the device, in the same
                                           protocol and interleaved with the candidates (resolved by the stage)
--target-macs 2.3G, --target-params 12M    counts
--keep-attn/--keep-mlp/--keep-tokens       ViT-Slim's per-kind kept fractions (and --keep-embed, the embedding's)
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from ..errors import SlimError

_UNITS = {"ms": 1.0, "us": 1e-3, "µs": 1e-3, "s": 1e3, "": 1.0}
KINDS = ("latency", "macs", "params", "fractions")


def parse_latency(text: str) -> tuple[str, float]:
    """'5ms', '5', '500us', '0.005s' -> ('ms', 5.0); '60%' -> ('fraction', 0.6). SlimError otherwise."""
    t = str(text).strip().lower().replace(" ", "")
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|s|%)?", t)
    if not m:
        raise SlimError(f"cannot read latency target '{text}': use e.g. 5ms, 5 (ms), 500us, 0.005s or 60%")
    value, unit = float(m.group(1)), m.group(2) or ""
    if value <= 0:
        raise SlimError(f"latency target must be positive, not '{text}'")
    if unit == "%":
        if value > 100:
            raise SlimError(f"a percentage target must be at most 100%, not '{text}'")
        return "fraction", value / 100.0
    return "ms", value * _UNITS[unit]


def parse_count(text: str, what: str) -> float:
    """'4.6G', '350M', '12k', '1e9' -> a number (MACs or parameters). SlimError otherwise."""
    t = str(text).strip().upper()
    m = re.fullmatch(r"(\d+(?:\.\d*)?(?:E\d+)?)([KMG]?)", t)
    if not m or float(m.group(1)) <= 0:
        raise SlimError(f"cannot read {what} '{text}': use e.g. 2.3G, 350M or 12k")
    return float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[m.group(2)]


@dataclass
class Target:
    """What the structure must meet. For latency: `value` in ms, or `fraction` of the measured dense latency
    (then `value` is filled in by the stage once the dense model is measured)."""

    kind: str
    value: float | None = None
    fraction: float | None = None
    keep: tuple[float, ...] | None = None  # ViT-Slim's (attn, mlp, tokens, embed) kept fractions
    text: str = ""

    @property
    def relative(self) -> bool:
        return self.kind == "latency" and self.fraction is not None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Target:
        d = dict(d)
        if d.get("keep") is not None:
            d["keep"] = (*d["keep"], 1.0)[:4]  # recorded before the embedding: kept whole
        return cls(**d)


def parse_target(latency: str | None = None, macs: str | None = None, params: str | None = None,
                 keep: tuple[float | None, ...] = (None, None, None, None)) -> Target:
    """Exactly one target from the command line's options (keep: attn, mlp, tokens[, embed] fractions)."""
    given = [x is not None for x in (latency, macs, params)] + [any(k is not None for k in keep)]
    if sum(given) != 1:
        raise SlimError("give exactly one target: --target-latency, --target-macs, --target-params or "
                        "--keep-attn/--keep-mlp/--keep-tokens/--keep-embed")
    if latency is not None:
        kind, v = parse_latency(latency)
        if kind == "fraction":
            return Target("latency", fraction=v, text=latency)
        return Target("latency", value=v, text=latency)
    if macs is not None:
        return Target("macs", parse_count(macs, "MACs target"), text=macs)
    if params is not None:
        return Target("params", parse_count(params, "parameter target"), text=params)
    ka, km, kt, ke = (1.0 if k is None else float(k) for k in (*keep, None)[:4])
    for f in (ka, km, kt, ke):
        if not 0 < f <= 1:
            raise SlimError("--keep-attn/--keep-mlp/--keep-tokens/--keep-embed must be in (0, 1]")
    return Target("fractions", keep=(ka, km, kt, ke), text=f"attn {ka}, mlp {km}, tokens {kt}"
                  + (f", embed {ke}" if ke < 1 else ""))
