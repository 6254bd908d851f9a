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
    (ViT-Slim's budget rule at `keep`), plus each block's mean mask value; with an embedding search, its channels'
    mask values sorted (one stream for every block)."""
    kinds = [k for k in ("qk", "v", "mlp", "tok") if k in masks]
    names = {"qk": "attention q/k channels", "v": "attention v channels", "mlp": "MLP hidden units",
             "tok": "patch tokens (monotone)"}
    panels = len(kinds) + ("embed" in masks)
    fig, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 3.2), squeeze=False)
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
    if "embed" in masks:
        ax = axes[0][-1]
        ax.plot(masks["embed"].float().sort(descending=True).values.numpy(), color="#4878cf")
        ax.set_title("embedding channels (all blocks)", fontsize=9)
        ax.set_xlabel("channel, by mask value")
        ax.set_ylabel("mask value")
        ax.set_ylim(0, 1.05)
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


def plot_report(report, path: str | Path) -> None:
    """Dense vs slim: measured (and predicted) latency, and top-1."""
    d, s = report.dense, report.slim
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(7.5, 3.2))
    names = ["dense", "slim"]
    ax1.bar(names, [d.latency_ms, s.latency_ms], color=["#999999", "#4878cf"], label="measured")
    if d.predicted_latency_ms is not None and s.predicted_latency_ms is not None:
        ax1.plot(names, [d.predicted_latency_ms, s.predicted_latency_ms], "D", color="#d65f5f", label="predicted")
    if report.target_latency_ms:
        ax1.axhline(report.target_latency_ms, ls="--", color="k", lw=1, label="target")
    ax1.set_ylabel(f"latency (ms), batch {report.batch_size}")
    ax1.set_title(f"{report.backend}", fontsize=9)
    ax1.legend(fontsize=7)
    tops = [d.top1 or 0.0, s.top1 or 0.0]
    ax2.bar(names, tops, color=["#999999", "#4878cf"])
    if s.top1_before_retrain is not None:
        ax2.plot(["slim"], [s.top1_before_retrain], "v", color="#d65f5f", label="before retraining")
        ax2.legend(fontsize=7, loc="lower right")
    ax2.set_ylim(max(0.0, min(tops + [s.top1_before_retrain or 100]) - 10), 100)
    ax2.set_ylabel("top-1 (%)")
    fig.suptitle(f"{report.model}: {report.extra.get('speedup') or 0:.2f}x faster", fontsize=10)
    _save(fig, path)


def plot_candidates(record: dict, path: str | Path) -> None:
    """The candidates of a selection: predicted cost against distillation loss, the chosen one marked."""
    rows = record["candidates"]
    key = "loss_after_recovery" if any("loss_after_recovery" in r for r in rows) else "loss"
    colors = {"greedy": "#4878cf", "channels": "#6acc65", "fractions": "#d65f5f", "one-count": "#ee854a",
              "uniform": "#956cb4"}
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for kind, color in colors.items():
        pts = [(r["cost"], r["loss"]) for r in rows if r["kind"] == kind]
        if pts:
            ax.scatter(*zip(*pts), color=color, label=kind, s=22)
    rec = [(r["cost"], r[key]) for r in rows if key != "loss" and key in r]
    if rec:
        ax.scatter(*zip(*rec), facecolors="none", edgecolors="k", s=40, label="after recovery")
    best = rows[record["chosen_index"]]
    ax.scatter([best["cost"]], [best[key]], marker="*", color="k", s=140, label="chosen", zorder=5)
    ax.set_xlabel("predicted cost (ms)" if best.get("predicted_ms") is not None else "cost")
    ax.set_ylabel("distillation loss (calibration split)")
    ax.set_title(f"candidates: {len(rows)} structures for one budget", fontsize=10)
    ax.legend(fontsize=7)
    _save(fig, path)
