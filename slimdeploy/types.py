"""The shared, serialisable types: ModelConfig, Arch, BlockSpec, SlimSpec, DeviceProfile, Report.

Everything here is plain data (JSON in, JSON out, versioned by `schema`), so that a
slim model, a device profile and a report can be read without this package's code
and without unpickling anything.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import SlimError
from .fileio import read_json, write_json

SPEC_SCHEMA = 3  # 2: token_mode (schema 1 specs load as static); 3: embed (older specs keep every channel)
TOKEN_MODES = ("static", "attentive", "fused")
RANKED_TOKEN_MODES = ("attentive", "fused")  # tokens chosen per image by attention: a block's tokens are a count
PROFILE_SCHEMA = 2
REPORT_SCHEMA = 2


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,), "list": (list,)}


def _type_ok(value: Any, annotation: str) -> bool:
    """Whether a JSON value fits a field's annotation (int, float, str, bool, list[...], dict[...], X | None)."""
    for alt in annotation.split("|"):
        base = alt.strip().split("[")[0]
        if base == "None" and value is None:
            return True
        types = _TYPES.get(base)
        if types is None:  # a type this checker does not know (Any, nested dataclasses): their own checks apply
            return True
        if isinstance(value, types) and not (base in ("int", "float") and isinstance(value, bool)):
            return True
    return False


def _from_dict(cls, d: dict[str, Any], what: str):
    """Build a dataclass from a dict, with a clear error for missing or unknown keys and wrong value types."""
    if not isinstance(d, dict):
        raise SlimError(f"{what}: expected a JSON object")
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise SlimError(f"{what}: unknown keys {sorted(unknown)}")
    for f in fields(cls):
        if f.name in d and not _type_ok(d[f.name], str(f.type)):
            raise SlimError(f"{what}: '{f.name}' must be {f.type}, not {type(d[f.name]).__name__}")
    try:
        return cls(**d)
    except TypeError as e:
        raise SlimError(f"{what}: {e}") from None


@dataclass
class ModelConfig:
    """How to rebuild the dense source model: a registry name plus the constructor arguments we own."""

    name: str
    num_classes: int | None = None
    img_size: int | None = None
    in_chans: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, d, "model config")


@dataclass
class Arch:
    """Shape facts of a ViT, read off the built model (never guessed from its name)."""

    embed_dim: int
    depth: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    num_tokens: int  # including prefix tokens
    num_prefix_tokens: int
    patch_size: int
    img_size: int
    in_chans: int
    num_classes: int
    global_pool: str
    qkv_bias: bool
    qk_norm: bool
    layer_scale: bool
    distilled: bool
    params: int  # dense parameter count, read off the built model

    @property
    def num_patches(self) -> int:
        return self.num_tokens - self.num_prefix_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Arch:
        a = _from_dict(cls, d, "architecture")
        sizes = [getattr(a, f.name) for f in fields(a) if str(f.type) == "int"]
        if any(v < 0 or v > 10**9 for v in sizes) or min(a.depth, a.num_heads, a.head_dim, a.embed_dim,
                                                            a.num_tokens) < 1 \
                or not 0 <= a.num_prefix_tokens < a.num_tokens or a.num_tokens > 10**6:
            raise SlimError("architecture: sizes out of range (a corrupted spec?)")
        return a


@dataclass
class BlockSpec:
    """What one transformer block keeps.

    tokens: absolute positions (in the dense model's sequence, prefix tokens first) of the
        tokens this block computes on; a token left out here is gone for this and every
        later block.
    heads: kept head indices; qk[i] / v[i] are the kept channels of heads[i]. Every kept head
        keeps the same number of q/k channels and the same number of v channels, so each
        projection stays one dense matmul.
    mlp: kept hidden units of the MLP.
    """

    tokens: list[int]
    heads: list[int]
    qk: list[list[int]]
    v: list[list[int]]
    mlp: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    @property
    def qk_dim(self) -> int:
        return len(self.qk[0]) if self.qk else 0

    @property
    def v_dim(self) -> int:
        return len(self.v[0]) if self.v else 0

    @property
    def mlp_dim(self) -> int:
        return len(self.mlp)

    def widths(self) -> dict[str, int]:
        return {"tokens": self.num_tokens, "heads": self.num_heads, "qk": self.qk_dim, "v": self.v_dim,
                "mlp": self.mlp_dim}


@dataclass
class SlimSpec:
    """The structure of a slim model: per-block kept tokens, heads, head channels and MLP units.

    embed: the kept channels of the residual stream (the embedding width), shared by every block: the patch
    embedding, position embedding, prefix tokens, every block's input and output projections, the norms and the
    head keep these channels only. Every channel by default.

    token_mode says which tokens a block keeps:
      static     the positions in `tokens`, the same for every image;
      attentive  the len(tokens) tokens (prefix tokens and the patches the class token attended to most in the
                 last block with heads before it), chosen per image; `tokens` is then range(count): only the
                 count is structure. The first block keeps every token (there is no earlier attention to rank by).
      fused      attentive, and (like EViT) the patches a block drops are not lost: they are fused into one token,
                 their mean weighted by the same attention scores, which takes the last of the len(tokens) places.

    rank_prior (attentive mode only; None: attention alone): per block, a non-negative importance of each patch
    position (depth x num_patches) from the search. A block that drops tokens then ranks them by
    (1 - prior_weight) x the attention + prior_weight x the prior of the token's position, each normalised over
    the patches it ranks. The positions ride along with the tokens, so every ranking knows them.
    """

    source: ModelConfig
    arch: Arch
    blocks: list[BlockSpec]
    meta: dict[str, Any] = field(default_factory=dict)  # predicted latency, MACs, params, target, ...
    schema: int = SPEC_SCHEMA
    token_mode: str = "static"
    embed: list[int] | None = None
    rank_prior: list[list[float]] | None = None
    prior_weight: float = 0.0

    def __post_init__(self):
        if self.embed is None:
            self.embed = list(range(self.arch.embed_dim))

    @property
    def embed_dim(self) -> int:
        return len(self.embed)

    @classmethod
    def dense(cls, source: ModelConfig, arch: Arch) -> SlimSpec:
        """The spec that keeps everything (the dense model)."""
        hd = list(range(arch.head_dim))
        block = BlockSpec(
            tokens=list(range(arch.num_tokens)),
            heads=list(range(arch.num_heads)),
            qk=[list(hd) for _ in range(arch.num_heads)],
            v=[list(hd) for _ in range(arch.num_heads)],
            mlp=list(range(arch.mlp_dim)),
        )
        return cls(source=source, arch=arch,
                   blocks=[BlockSpec(**{k: _copy(v) for k, v in asdict(block).items()}) for _ in range(arch.depth)])

    def validate(self) -> SlimSpec:
        """Check every structural rule; raise SlimError naming the first broken one."""
        a = self.arch
        if self.schema != SPEC_SCHEMA:
            raise SlimError(f"spec schema {self.schema} is not supported (expected {SPEC_SCHEMA})")
        if len(self.blocks) != a.depth:
            raise SlimError(f"spec has {len(self.blocks)} blocks but the model has {a.depth}")
        if self.token_mode not in TOKEN_MODES:
            raise SlimError(f"spec token_mode '{self.token_mode}' is not one of {', '.join(TOKEN_MODES)}")
        _check_index_list(self.embed, a.embed_dim, "spec embed channels")
        if not self.embed:
            raise SlimError("spec keeps no embedding channel")
        prev = set(range(a.num_tokens))
        prefix = set(range(a.num_prefix_tokens))
        for i, b in enumerate(self.blocks):
            where = f"spec block {i}"
            _check_index_list(b.tokens, a.num_tokens, f"{where} tokens")
            if not prefix <= set(b.tokens):
                raise SlimError(f"{where}: prefix tokens (class/distillation/register) must be kept")
            if not set(b.tokens) <= prev:
                raise SlimError(f"{where}: keeps a token that an earlier block removed (tokens must be monotone)")
            if len(b.tokens) == 0:
                raise SlimError(f"{where}: keeps no token")
            prev = set(b.tokens)
            _check_index_list(b.heads, a.num_heads, f"{where} heads")
            if not isinstance(b.qk, list) or not isinstance(b.v, list) \
                    or not all(isinstance(c, list) for c in [*b.qk, *b.v]):
                raise SlimError(f"{where}: qk and v must be lists of channel lists")
            if len(b.qk) != len(b.heads) or len(b.v) != len(b.heads):
                raise SlimError(f"{where}: qk and v need one channel list per kept head")
            for name, lists in (("qk", b.qk), ("v", b.v)):
                sizes = {len(c) for c in lists}
                if len(sizes) > 1:
                    raise SlimError(f"{where}: every kept head must keep the same number of {name} channels")
                if sizes == {0}:
                    raise SlimError(f"{where}: a kept head keeps no {name} channel (drop the head instead)")
                for c in lists:
                    _check_index_list(c, a.head_dim, f"{where} {name} channels")
            _check_index_list(b.mlp, a.mlp_dim, f"{where} mlp units")
        if self.token_mode in RANKED_TOKEN_MODES:
            self._validate_attentive()
        if self.rank_prior is not None:
            self._validate_prior()
        elif self.prior_weight:
            raise SlimError("spec: prior_weight without a rank_prior (set both, or neither)")
        return self

    def _validate_prior(self) -> None:
        a, p = self.arch, self.rank_prior
        if self.token_mode != "attentive":
            raise SlimError(f"spec: a rank_prior serves attentive token mode only, not {self.token_mode}")
        if not isinstance(p, list) or len(p) != a.depth or not all(
                isinstance(r, list) and len(r) == a.num_patches for r in p):
            raise SlimError(f"spec: rank_prior must be {a.depth} rows of {a.num_patches} numbers (one per patch)")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for r in p for v in r) \
                or not all(sum(r) > 0 for r in p):
            raise SlimError("spec: rank_prior holds a negative or non-finite number, or a row of zeros")
        if not isinstance(self.prior_weight, (int, float)) or not 0 < self.prior_weight <= 1:
            raise SlimError(f"spec: prior_weight must be in (0, 1] with a rank_prior, not {self.prior_weight}")

    def _validate_attentive(self) -> None:
        a = self.arch
        ranked = False  # whether a block with heads came before: its attention ranks the tokens
        prev = a.num_tokens
        for i, b in enumerate(self.blocks):
            n = b.num_tokens
            if b.tokens != list(range(n)):
                raise SlimError(f"spec block {i}: {self.token_mode} tokens are a count (tokens = range(n)), not "
                                "positions")
            if n < prev and not ranked:
                raise SlimError(f"spec block {i}: drops tokens in {self.token_mode} mode, but no earlier block has "
                                "heads whose attention ranks them (the first block keeps every token)")
            if n < prev and self.token_mode == "fused" and n <= a.num_prefix_tokens:
                raise SlimError(f"spec block {i}: in fused mode a block that drops tokens keeps at least one place "
                                "after the prefix tokens, for the fused token")
            ranked = ranked or b.num_heads > 0
            prev = n

    def in_mode(self, token_mode: str) -> SlimSpec:
        """The same structure in `token_mode`, ranking (where it ranks) by attention alone: without a rank prior.
        Into a ranked mode, each block's tokens become its count (range(n)); into static mode, a ranked spec's
        counts are read as the first n positions."""
        blocks = self.blocks
        if token_mode in RANKED_TOKEN_MODES:
            blocks = [replace(b, tokens=list(range(b.num_tokens))) for b in blocks]
        return replace(self, token_mode=token_mode, blocks=blocks, rank_prior=None, prior_weight=0.0).validate()

    def token_counts(self) -> list[int]:
        return [b.num_tokens for b in self.blocks]

    def to_dict(self) -> dict[str, Any]:
        return {"schema": self.schema, "source": self.source.to_dict(), "arch": self.arch.to_dict(),
                "token_mode": self.token_mode, "embed": list(self.embed), "blocks": [asdict(b) for b in self.blocks],
                **({"rank_prior": self.rank_prior, "prior_weight": self.prior_weight} if self.rank_prior else {}),
                "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SlimSpec:
        if not isinstance(d, dict) or "blocks" not in d or "arch" not in d or "source" not in d:
            raise SlimError("spec: expected an object with 'source', 'arch' and 'blocks'")
        unknown = set(d) - {"schema", "source", "arch", "blocks", "meta", "token_mode", "embed", "rank_prior",
                            "prior_weight"}
        if unknown:
            raise SlimError(f"spec: unknown keys {sorted(unknown)}")
        if not isinstance(d["blocks"], list) or not isinstance(d.get("meta", {}), dict):
            raise SlimError("spec: 'blocks' must be a list and 'meta' an object")
        schema = d.get("schema", SPEC_SCHEMA)
        if schema in (1, 2):  # 1: before token modes (every spec static); 2: before embed (every channel kept)
            for key in ("token_mode", "embed")[schema - 1:]:
                if key in d:
                    raise SlimError(f"spec: schema {schema} has no '{key}' (a corrupted spec?)")
            schema = SPEC_SCHEMA
        if not isinstance(d.get("token_mode", "static"), str):
            raise SlimError("spec: 'token_mode' must be a string")
        if "embed" in d and not isinstance(d["embed"], list):
            raise SlimError("spec: 'embed' must be a list of channel indices")
        blocks = [_from_dict(BlockSpec, b, f"spec block {i}") for i, b in enumerate(d["blocks"])]
        return cls(source=ModelConfig.from_dict(d["source"]), arch=Arch.from_dict(d["arch"]), blocks=blocks,
                   meta=d.get("meta", {}), schema=schema, token_mode=d.get("token_mode", "static"),
                   embed=d.get("embed"), rank_prior=d.get("rank_prior"),
                   prior_weight=d.get("prior_weight", 0.0)).validate()

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> SlimSpec:
        return cls.from_dict(read_json(path, "spec"))

    def summary(self) -> list[dict[str, int]]:
        """Per-block widths (each with the embedding width, which all blocks share)."""
        return [{**b.widths(), "embed": self.embed_dim} for b in self.blocks]


def _copy(v):
    return [list(x) for x in v] if v and isinstance(v[0], list) else list(v)


def _check_index_list(idx: list[int], n: int, what: str) -> None:
    if not isinstance(idx, list):
        raise SlimError(f"{what}: expected a list of indices")
    if any((not isinstance(i, int)) or isinstance(i, bool) or i < 0 or i >= n for i in idx):
        raise SlimError(f"{what}: indices must be integers in [0, {n})")
    if any(a >= b for a, b in zip(idx, idx[1:])):
        raise SlimError(f"{what}: indices must be sorted and unique")


@dataclass
class DeviceProfile:
    """Per-layer latency tables measured on one device, backend, precision and batch size.

    tables maps a piece name to {"axes": [axis names], "grid": {axis: [values]}, "ms": nested list, smoothed,
    "raw_ms": as measured; the model reads raw_ms smoothed as latency/tables.py does now}; calibration holds the
    fit of end-to-end latency against the tables (see latency/model.py) with the whole models it was measured on.
    fingerprint names the machine the tables hold for (latency/fingerprint.py).
    """

    device: str
    hardware: str
    backend: str
    backend_version: str
    precision: str
    batch_size: int
    threads: int | None
    model: dict[str, Any]  # the shape the tables are for (embed_dim, num_tokens, img_size, ...)
    tables: dict[str, Any]
    calibration: dict[str, Any] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    torch_device: str | None = None  # where a torch-backend profile ran (cpu, cuda:0)
    torch_mode: str | None = None  # how: eager, compile or graph (CUDA graphs)
    created: str = ""
    command: str = ""
    seconds: float = 0.0
    measurements: int = 0  # timed graphs behind the tables
    warnings: list[str] = field(default_factory=list)
    draws: int = 1  # how the calibration's whole models were drawn (latency/draws.py DRAWS)
    schema: int = PROFILE_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceProfile:
        if isinstance(d, dict) and d.get("schema", PROFILE_SCHEMA) != PROFILE_SCHEMA:
            raise SlimError(f"device profile schema {d.get('schema')} is not supported (expected {PROFILE_SCHEMA}): "
                            "re-measure it with slimdeploy profile, or use --device local")
        return _from_dict(cls, d, "device profile")

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> DeviceProfile:
        return cls.from_dict(read_json(path, "device profile"))


@dataclass
class ModelFigures:
    latency_ms: float  # median of round medians (latency/timing.py)
    macs: int
    params: int
    top1: float | None
    latency_low_ms: float | None = None  # its 95% interval
    latency_high_ms: float | None = None
    predicted_latency_ms: float | None = None
    top1_before_retrain: float | None = None


@dataclass
class Parity:
    backend: str
    max_abs_diff: float
    top1_agreement: float
    passed: bool
    samples: int


@dataclass
class Report:
    """The verified result of a run (report.json); every figure measured or computed in the run."""

    model: str
    device: str
    backend: str
    batch_size: int
    target_latency_ms: float | None
    dense: ModelFigures
    slim: ModelFigures
    parity: Parity
    met_target: bool | None  # decided on the 95% interval: its upper end within the target
    accuracy: dict[str, Any] = field(default_factory=dict)  # drop from dense, the --max-drop guard, passed
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    schema: int = REPORT_SCHEMA

    @property
    def passed(self) -> bool:
        """Parity holds, the accuracy guard holds and the target (if any) is met."""
        return self.parity.passed and self.accuracy.get("passed", True) and self.met_target is not False

    def failures(self) -> list[str]:
        out = []
        if not self.parity.passed:
            out.append(f"parity failed on {self.backend}: max abs diff {self.parity.max_abs_diff:.3g}, top-1 "
                       f"agreement {100 * self.parity.top1_agreement:.2f}% ({self.extra.get('parity_rule')})")
        a, q = self.accuracy, self.accuracy.get("quantized") or {}
        if a.get("max_drop") is not None and a["drop"] > a["max_drop"]:
            out.append(f"top-1 fell {a['drop']:.2f} points below the dense model's, more than --max-drop "
                       f"{a['max_drop']:g}")
        if q and not q["passed"]:
            out.append(f"the {self.extra.get('precision')} model's top-1 is {q['drop']:.2f} points below its fp32 "
                       f"twin's, more than {q['max_drop']:g} (agreement {100 * q['agreement']:.1f}%)")
        if self.met_target is False:
            out.append(f"latency target not met on this machine: {self.slim.latency_ms:.3f} ms measured (95% interval "
                       f"up to {self.slim.latency_high_ms:.3f} ms) against {self.target_latency_ms:.3f} ms")
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # schema keys that must exist even when None
        d["slim"].setdefault("predicted_latency_ms", None)
        d["slim"].setdefault("top1_before_retrain", None)
        return d
