"""Pictures: sample grids and loss curves (matplotlib, no display needed)."""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:  # scripts and tests draw to files; notebooks keep their inline backend
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .logs import compare  # noqa: E402


def grid_array(images: torch.Tensor, nrow: int = 10, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> one grid in [0, 1]: (rows*(H+pad), nrow*(W+pad)) for greyscale (C = 1), with a
    last axis of 3 for colour (C = 3, RGB); the padding is white."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).numpy()
    colour = x.shape[1] == 3
    x = x.transpose(0, 2, 3, 1) if colour else x[:, 0]
    n, h, w = x.shape[:3]
    rows = (n + nrow - 1) // nrow
    out = np.ones((rows * (h + pad) + pad, nrow * (w + pad) + pad, *x.shape[3:]), dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, nrow)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = x[i]
    return out


def sample_grid(images: torch.Tensor, path: str | Path | None = None, nrow: int = 10, title: str | None = None):
    """A grid of samples (greyscale or RGB), one row per class when images are ordered class by class."""
    fig, ax = plt.subplots(figsize=(nrow * 0.6, (len(images) + nrow - 1) // nrow * 0.6 + (0.4 if title else 0)))
    ax.imshow(grid_array(images, nrow), cmap="gray", vmin=0, vmax=1)     # (a colour grid ignores cmap)
    ax.axis("off")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _finish(fig, path)


def loss_curve(logs: dict[str, list[dict]], path: str | Path | None = None, smooth: int = 20, title: str = "training loss"):
    """One or more JSONL logs (label -> rows): raw loss faint, moving average bold."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, rows in logs.items():
        steps = np.array([r["step"] for r in rows])
        loss = np.array([r["loss"] for r in rows])
        line, = ax.plot(steps, loss, alpha=0.25, lw=0.8)
        if len(loss) >= smooth > 1:
            k = np.ones(smooth) / smooth
            ax.plot(steps[smooth - 1:], np.convolve(loss, k, mode="valid"), color=line.get_color(), lw=1.8,
                    label=f"{label} (mean of {smooth})")
        else:
            line.set_label(label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _finish(fig, path)


def _finish(fig, path):
    if path is None:
        return fig
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def parity_curves(a: list[dict], b: list[dict], path: str | Path | None = None, names=("A", "B")):
    """What a parity check compares: both runs' loss (left) and gradient norm before clipping (right) on top, the
    relative difference of each (log scale) below."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    for col, key in enumerate(("loss", "grad_norm")):
        rows = compare(a, b, key)
        steps = [r["step"] for r in rows]
        top, bottom = axes[0, col], axes[1, col]
        top.plot(steps, [r["a"] for r in rows], lw=2.5, alpha=0.6, label=names[0])
        top.plot(steps, [r["b"] for r in rows], "--", lw=1.2, label=names[1])
        top.set_ylabel("loss" if key == "loss" else "gradient norm (before clipping)")
        top.legend()
        top.grid(alpha=0.3)
        bottom.semilogy(steps, [max(r["rel"], 1e-12) for r in rows], ".-", color="C3")
        bottom.set_ylabel("relative diff")
        bottom.set_xlabel("optimizer step")
        bottom.grid(alpha=0.3)
    fig.tight_layout()
    return _finish(fig, path)


def collective_diagrams(results: dict[int, dict], names, path: str | Path | None = None):
    """Who holds what before and after each collective: one row per rank, one cell per element.
    Cells are coloured by the rank that contributed them (tens digit); sums are grey."""
    world = len(results)
    fig, axes = plt.subplots(len(names), 2, figsize=(9, 1.15 * world * len(names) / 2 + 1),
                             gridspec_kw={"width_ratios": [1, world]})
    cmap = plt.get_cmap("tab10")
    for row, name in enumerate(names):
        for col, key in enumerate(("before", name)):
            ax = axes[row, col]
            for r in range(world):
                vals = results[r][key]
                for j, v in enumerate(vals):
                    summed = key != "before" and name in ("all_reduce", "reduce_scatter")
                    owner = None if summed else int(v) // 10
                    color = cmap(owner) if owner is not None else (0.8, 0.8, 0.8)
                    ax.add_patch(plt.Rectangle((j, world - 1 - r), 0.95, 0.9, color=color, alpha=0.55))
                    ax.text(j + 0.47, world - 1 - r + 0.45, f"{v:g}", ha="center", va="center", fontsize=7)
            ax.set_xlim(0, world * world if key == name else world)
            ax.set_ylim(0, world)
            ax.set_yticks([r + 0.45 for r in range(world)], [f"rank {world - 1 - r}" for r in range(world)],
                          fontsize=7)
            ax.set_xticks([])
            for sp in ax.spines.values():
                sp.set_visible(False)
            ax.set_title("before" if key == "before" else f"after {name}", fontsize=9, loc="left")
    fig.tight_layout()
    return _finish(fig, path)


def quality_curve(points: list[dict], path: str | Path | None = None, acc_goal: float = 0.99, fid_goal: float = 3.0):
    """Sample accuracy and feature FID (as a multiple of its real-vs-real floor) against training seconds."""
    sec = [p["seconds"] for p in points]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.plot(sec, [100 * p["accuracy"] for p in points], "o-", color="C0", label="sample accuracy")
    ax.plot(sec, [100 * p["min_class_accuracy"] for p in points], "o--", color="C0", alpha=0.5,
            label="worst class")
    ax.axhline(100 * acc_goal, color="C0", lw=0.8, ls=":")
    ax.set_xlabel("seconds of training (compilation included)")
    ax.set_ylabel("accuracy (%)", color="C0")
    ax.set_ylim(max(0, min(100 * p["min_class_accuracy"] for p in points) - 5), 100.5)
    ax2 = ax.twinx()
    ax2.plot(sec, [p["fid"] / p["fid_floor"] for p in points], "s-", color="C3", label="FID / floor")
    ax2.axhline(fid_goal, color="C3", lw=0.8, ls=":")
    ax2.set_yscale("log")
    ax2.set_ylabel("feature FID / real-vs-real floor", color="C3")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [h.get_label() for h in lines], loc="center right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _finish(fig, path)
