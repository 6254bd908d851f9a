"""Plot measured latency staircases of one block from a device profile (raw medians and the monotone table).

    .venv/bin/python benchmarks/staircase_plot.py --device xeon-2c-ort1t-b1-deit_small
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from slimdeploy.latency.model import resolve_profile  # noqa: E402
from slimdeploy.types import DeviceProfile  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", required=True)
    ap.add_argument("--profiles-dir", default=None)
    args = ap.parse_args()
    p = DeviceProfile.load(resolve_profile(args.device, args.profiles_dir))
    t = p.tables
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    n_idx = -1  # all tokens
    n = t["mlp"]["grid"]["tokens"][n_idx]
    for ax, name, axis, title in ((axes[0], "mlp", "hidden", "MLP (fc1+GELU+fc2) vs hidden width"),
                                  (axes[1], "qkv", "out", "qkv Linear vs output width")):
        g = t[name]["grid"][axis]
        raw = np.asarray(t[name].get("raw_ms", t[name]["ms"]))[n_idx]
        ax.plot(g, raw * 1e3, ".", ms=3, color="#999999", label="measured median (cold)")
        ax.step(g, np.asarray(t[name]["ms"])[n_idx] * 1e3, where="pre", color="#4878cf", label="table (monotone)")
        if t.get("warm"):
            ax.step(g, np.asarray(t["warm"][name]["ms"])[n_idx] * 1e3, where="pre", color="#d65f5f",
                    label="table, warm cache")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("width (channels)")
        ax.set_ylabel("latency (us)")
        ax.legend(fontsize=7)
    core = t["core_q"]
    g = core["grid"]["qk"]
    H = len(core["grid"]["heads"])
    raw = np.asarray(core.get("raw_ms", core["ms"]))[n_idx, H - 1]
    axes[2].plot(g, raw * 1e3, "o", color="#999999", label="measured median (v at full width)")
    axes[2].step(g, np.asarray(core["ms"])[n_idx, H - 1] * 1e3, where="pre", color="#4878cf", label="table")
    axes[2].set_title(f"attention core, {H} heads, vs q/k width", fontsize=9)
    axes[2].set_xlabel("head width (channels)")
    axes[2].set_ylabel("latency (us)")
    axes[2].legend(fontsize=7)
    fig.suptitle(f"{p.device}: {p.hardware}, {p.backend} {p.backend_version}, batch {p.batch_size}, "
                 f"{n} tokens", fontsize=10)
    out = Path(f"benchmarks/results/staircase_{args.device}.png")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(out)


if __name__ == "__main__":
    main()
