"""Figures of the demo reports (matplotlib, Agg backend: no display needed).

Each function takes plain tensors/lists and writes one PNG; it returns the path.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

__all__ = ["plot_figure3a", "plot_matrices", "plot_pruning", "plot_table1", "plot_training"]

_DPI = 90


def _save(fig, path: str, **margins) -> str:
    """Save with fixed margins (``fig.subplots_adjust(**margins)``): tight_layout draws the figure
    once more just to measure it, which doubled the plotting time of the demos on a loaded CPU."""
    fig.subplots_adjust(**{"left": 0.12, "right": 0.96, "bottom": 0.16, "top": 0.88, **margins})
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def _accuracy_axes(ax, history: Sequence[Dict[str, float]]):
    steps = [h["step"] for h in history if "train_acc" in h]
    ax.plot(steps, [h["train_acc"] for h in history if "train_acc" in h], label="train")
    st = [h["step"] for h in history if "test_acc" in h]
    ax.plot(st, [h["test_acc"] for h in history if "test_acc" in h], label="test")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.legend(loc="lower right", fontsize=8)


def plot_training(path: str, history: Sequence[Dict[str, float]], title: str = "") -> str:
    """Train/test accuracy over steps."""
    fig, ax = plt.subplots(figsize=(5, 3))
    _accuracy_axes(ax, history)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_figure3a(path: str, history: Sequence[Dict[str, float]], window_starts: Sequence[int],
                  kernel_total: torch.Tensor, reg_total: torch.Tensor, layer_names: Sequence[str],
                  layer_importance: torch.Tensor, layer_difference: torch.Tensor,
                  title: str = "") -> str:
    """The paper's Figure 3a: accuracy; Ψ̄_s(Θ) and Ψ̄^reg_s(Θ); per-layer Ψ̄_s(Θ_layer) and
    D_s(Θ_layer) over steps. kernel_total, reg_total: [S]; layer_*: [S, G]."""
    x = list(window_starts)
    fig, axes = plt.subplots(2, 2, figsize=(10, 6))
    _accuracy_axes(axes[0, 0], history)
    axes[0, 0].set_title("accuracy", fontsize=9)
    ax = axes[1, 0]
    ax.plot(x, kernel_total.tolist(), label="kernel  Ψ̄_s(Θ)")
    ax.plot(x, reg_total.tolist(), label="regularisation  Ψ̄^reg_s(Θ)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    ax.set_title("kernel vs regularisation importance", fontsize=9)
    for g, name in enumerate(layer_names):
        axes[0, 1].plot(x, layer_importance[:, g].tolist(), label=name)
        axes[1, 1].plot(x, layer_difference[:, g].tolist(), label=name)
    axes[0, 1].set_yscale("log")
    axes[0, 1].set_title("per-layer kernel importance Ψ̄_s(Θ_layer)", fontsize=9)
    axes[0, 1].legend(fontsize=7, ncol=2)
    axes[1, 1].set_yscale("symlog", linthresh=max(float(layer_difference.abs().max()) * 1e-3, 1e-12))
    axes[1, 1].set_title("per-layer difference D_s(Θ_layer) (paper sign)", fontsize=9)
    axes[1, 1].set_xlabel("step")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, left=0.07, right=0.98, bottom=0.09, top=0.9, wspace=0.25,
                 hspace=0.35)


def plot_matrices(path: str, mats: Sequence[Tuple[str, torch.Tensor]], xlabel: str, ylabel: str,
                  symmetric: bool = True, title: str = "") -> str:
    """A row of heat maps (e.g. test × train influence per step window, or similarity matrices).
    symmetric: diverging colours centred at 0 with limits at the 99.5th percentile of |values|."""
    fig, axes = plt.subplots(1, len(mats), figsize=(3.6 * len(mats), 3.4), squeeze=False)
    for ax, (name, m) in zip(axes[0], mats):
        m = m.double()
        if symmetric:
            lim = float(torch.quantile(m.abs().flatten()[:1_000_000], 0.995)) or 1.0
            im = ax.imshow(m.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto",
                           interpolation="nearest")
        else:
            im = ax.imshow(m.numpy(), cmap="viridis", aspect="auto", interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, left=0.3 / len(mats) + 0.02, right=0.93, bottom=0.15, top=0.82,
                 wspace=0.6)


def plot_pruning(path: str, rows: Sequence[Dict[str, float]], title: str = "") -> str:
    """Test accuracy and KL to the unpruned model vs sparsity, one line per method."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        sp = [100 * r["sparsity"] for r in rs]
        axes[0].plot(sp, [r["test_acc"] for r in rs], marker="o", label=method)
        axes[1].plot(sp, [max(r["kl"], 1e-12) for r in rs], marker="o", label=method)
    axes[0].set_ylabel("test accuracy")
    axes[1].set_ylabel("KL(unpruned ‖ pruned)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("sparsity of the prunable parameters (%)")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, left=0.08, right=0.98, wspace=0.25, top=0.86)


def plot_table1(path: str, rows: Sequence[Dict[str, object]], eval_key: str,
                title: str = "") -> str:
    """Max |logit error| of the reconstruction vs the evaluations each quadrature rule spent."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for r in rows:
        if r.get("note"):
            continue
        x, y = max(float(r[eval_key]), 1.0), max(float(r["max_abs_error"]), 1e-17)
        ax.scatter([x], [y])
        ax.annotate(str(r["rule"]), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"evaluations ({eval_key})")
    ax.set_ylabel("max |reconstructed − real logit|")
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path, left=0.15, right=0.84, top=0.9, bottom=0.14)   # room for labels
