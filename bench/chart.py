"""A PNG of the latency distributions: one panel per operation, one box per target."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: the bench runs on servers
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

from bench.core import OPS

COLORS = {"floor": "#999999", "kernel": "#4c72b0", "containerfs": "#dd8452"}


def _minor_label(value: float, _pos: int) -> str:
    """Label the 2s and 5s between decades, so narrow ranges still read."""
    return f"{value:g}" if f"{value:e}"[0] in "25" else ""


def draw(results: dict, png: Path) -> None:
    """Box plots (whiskers at p1 and p99) of every op's samples, log scale in microseconds."""
    ops = results["ops"]["ops"]
    names = [op for op in OPS if any(op in per_op for per_op in ops.values())]
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 4.2), squeeze=False)
    for ax, op in zip(axes[0], names, strict=True):
        labels, data, colors = [], [], []
        for target, per_op in ops.items():
            samples = per_op.get(op, {}).get("samples_us")
            if samples:
                labels.append(target.replace("containerfs", "cfs"))
                data.append(samples)
                colors.append(COLORS.get(target, "#55a868"))
        box = ax.boxplot(data, whis=(1, 99), showfliers=False, patch_artist=True)
        for patch, color in zip(box["boxes"], colors, strict=True):
            patch.set_facecolor(color)
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label))
        ax.set_title(op, fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0][0].set_ylabel("latency (us), whiskers p1-p99")
    m = results["machine"]
    title = f"containerfs bench: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, {m['date']}"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
