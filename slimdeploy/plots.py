"""PNG plots: searched structure per block, chosen structure, latency staircases, reports."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .types import Arch, SlimSpec  # noqa: E402


def _save(fig, path: str | Path) -> None:
    import io

    from .fileio import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def kept_by_global_threshold(values: torch.Tensor, keep: float) -> torch.Tensor:
    """0/1 of the same shape: the `keep` fraction of largest |values| over the whole tensor."""
    flat = values.abs().flatten()
    k = max(1, int(round(keep * flat.numel())))
    thr = flat.topk(k).values.min()
    return (values.abs() >= thr).to(torch.float32)


def plot_search_structure(masks: dict[str, torch.Tensor], arch: Arch, path: str | Path, keep: float = 0.5) -> None:
    """Per block, the fraction of each dimension kept at one global threshold per mask kind
    (ViT-Slim's budget rule at `keep`), plus each block's mean mask value."""
    kinds = [k for k in ("qk", "v", "mlp", "tok") if k in masks]
    names = {"qk": "attention q/k channels", "v": "attention v channels", "mlp": "MLP hidden units",
             "tok": "patch tokens (monotone)"}
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.6 * len(kinds), 3.2), squeeze=False)
    blocks = list(range(arch.depth))
    for ax, kind in zip(axes[0], kinds):
        m = masks[kind].float()
        if kind == "tok":
            m = torch.cummin(m, dim=0).values  # a token removed at block i stays removed
        kept = kept_by_global_threshold(m, keep).reshape(arch.depth, -1).mean(1)
        mean = m.abs().reshape(arch.depth, -1).mean(1)
        ax.bar(blocks, kept.numpy(), color="#4878cf", label=f"kept at {keep:.0%} budget")
        ax.plot(blocks, mean.numpy(), "o-", color="#d65f5f", label="mean |mask|")
        ax.set_title(names[kind], fontsize=9)
        ax.set_xlabel("block")
        ax.set_ylim(0, max(1.05, float(mean.max()) * 1.05))
        ax.set_xticks(blocks)
    axes[0][0].set_ylabel("fraction")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle("searched structure", fontsize=10)
    _save(fig, path)


def plot_spec(spec: SlimSpec, path: str | Path, title: str = "chosen structure") -> None:
    """Kept fraction per block of tokens, heads, q/k width, v width and MLP width."""
    a = spec.arch
    rows = {"tokens": [b.num_tokens / a.num_tokens for b in spec.blocks],
            "heads": [b.num_heads / a.num_heads for b in spec.blocks],
            "q/k width": [b.qk_dim / a.head_dim for b in spec.blocks],
            "v width": [b.v_dim / a.head_dim for b in spec.blocks],
            "MLP": [b.mlp_dim / a.mlp_dim for b in spec.blocks]}
    fig, ax = plt.subplots(figsize=(7, 3.2))
    n = len(rows)
    width = 0.8 / n
    for j, (name, vals) in enumerate(rows.items()):
        ax.bar([i + (j - n / 2 + 0.5) * width for i in range(a.depth)], vals, width, label=name)
    ax.set_xlabel("block")
    ax.set_ylabel("kept fraction")
    ax.set_ylim(0, 1.1)
    ax.set_xticks(range(a.depth))
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    ax.set_title(title, fontsize=10)
    _save(fig, path)
