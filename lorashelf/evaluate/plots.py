"""Plots for reports: method comparison bars, training loss curves, weight heatmaps.

Each function writes one PNG (matplotlib, Agg backend, no display needed) and returns
its path. Colours and ordering are fixed so two runs' pictures compare at a glance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lorashelf.evaluate.runner import EvalResult  # noqa: E402


def method_bars(results: Sequence[EvalResult], out: Path, title: str = "") -> Path:
    """Mean accuracy (higher is better) and mean gold NLL (lower is better) per method."""
    names = [r.method for r in results]
    acc = [r.mean_accuracy for r in results]
    nll = [r.mean_nll for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.6))
    for ax, vals, label, best in ((axes[0], acc, "mean accuracy (higher is better)", max),
                                  (axes[1], nll, "mean gold NLL per token (lower is better)", min)):  # fmt: skip
        colors = ["#2b8cbe" if v == best(vals) else "#a6bddb" for v in vals]
        ax.barh(range(len(names)), vals, color=colors)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_xlabel(label)
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.3f}", va="center", fontsize=8)
        ax.margins(x=0.18)
    axes[1].set_yticklabels([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def loss_curves(
    curves: Mapping[str, Sequence[float]], out: Path, title: str = "training loss"
) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for name, ys in curves.items():
        if ys:
            ax.plot(range(1, len(ys) + 1), ys, label=name, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (target tokens)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def weight_heatmap(
    rows: Sequence[str], cols: Sequence[str], values: Sequence[Sequence[float]], out: Path,
    title: str = "", cmap: str = "RdBu_r", symmetric: bool = True,
) -> Path:  # fmt: skip
    """A labelled heatmap (e.g. LoraHub weights: tasks x experts), values printed in cells."""
    import numpy as np

    arr = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(cols), 1.2 + 0.5 * len(rows)))
    vmax = float(np.abs(arr).max()) or 1.0
    kw = {"vmin": -vmax, "vmax": vmax} if symmetric else {}
    im = ax.imshow(arr, cmap=cmap, aspect="auto", **kw)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for i in range(arr.shape[0]):
        for j in range(arr.shape[1]):
            ax.text(j, i, f"{arr[i, j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
