"""Numbers and files of the demo reports: reconstruction metrics, pruning masks, CSV and Markdown.

Pure functions on tensors (tested in tests/test_demos.py); no model or trajectory knowledge here.
Sign convention of the attributions these read: contributions to the *change* of the output,
final = initial + kernel.sum() + reg.sum(); the paper's ψ is minus this.
"""
from __future__ import annotations

import csv
import math
import os
from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["kl_divergence", "reconstruction_metrics", "reconstructed_outputs", "evaluations_total",
           "pruning_mask", "write_csv", "markdown_table", "ReportWriter"]


def kl_divergence(ref_logits: torch.Tensor, other_logits: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(ref) ‖ softmax(other)), in nats. Inputs [M, O]."""
    if ref_logits.shape != other_logits.shape:
        raise ValueError(f"kl_divergence: shapes differ, {tuple(ref_logits.shape)} vs "
                         f"{tuple(other_logits.shape)}")
    lp = torch.log_softmax(ref_logits.double(), -1)
    lq = torch.log_softmax(other_logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean().clamp_min(0.0))


def reconstruction_metrics(reconstructed: torch.Tensor, final: torch.Tensor) -> Dict[str, float]:
    """accuracy: argmax agreement of the reconstruction with the real final model; kl:
    KL(softmax(final) ‖ softmax(reconstruction)) averaged over samples; max_abs_error: max |logit
    difference|. Inputs [M, O] logits."""
    if reconstructed.shape != final.shape or reconstructed.dim() != 2:
        raise ValueError(f"reconstruction_metrics: expected two [M, O] tensors, got "
                         f"{tuple(reconstructed.shape)} and {tuple(final.shape)}")
    return {"accuracy": float((reconstructed.argmax(-1) == final.argmax(-1)).double().mean()),
            "kl": kl_divergence(final, reconstructed),
            "max_abs_error": float((reconstructed.double() - final.double()).abs().max())}


def reconstructed_outputs(attr) -> torch.Tensor:
    """initial + kernel + reg summed over every axis but test and output: [M, O]."""
    def total(t, dims):
        idx = [i for i, d in enumerate(dims) if d not in ("test", "output")]
        return t.sum(idx) if idx else t
    return attr.initial + total(attr.kernel, attr.dims) + total(attr.reg, attr.reg_dims)


def evaluations_total(attr) -> Dict[str, int]:
    """The per-step evaluation counters of an Attribution, summed over steps."""
    return {f"evals_{k}": int(torch.as_tensor(v).sum()) for k, v in attr.evaluations.items()}


def pruning_mask(scores: torch.Tensor, prunable: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask [D] (bool) that zeroes the lowest-scoring ``sparsity`` fraction of the prunable
    coordinates; non-prunable coordinates (the output layer in the paper's Section 4.1) are always
    kept. Exactly round((1 − sparsity)·#prunable) prunable coordinates survive; ties go to the lower
    index (stable sort), so the mask is deterministic."""
    if scores.shape != prunable.shape or scores.dim() != 1:
        raise ValueError(f"pruning_mask: scores {tuple(scores.shape)} and prunable "
                         f"{tuple(prunable.shape)} must be the same [D] shape")
    if prunable.dtype != torch.bool:
        raise ValueError(f"pruning_mask: prunable must be a bool mask, got {prunable.dtype}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"pruning_mask: sparsity must be in [0, 1), got {sparsity}")
    if bool(torch.isnan(scores[prunable]).any()):
        raise ValueError("pruning_mask: scores contain NaN")
    idx = torch.nonzero(prunable).flatten()
    n_keep = int(round((1.0 - sparsity) * idx.numel()))
    order = torch.sort(-scores[idx].double(), stable=True).indices
    keep = ~prunable.clone()
    keep[idx[order[:n_keep]]] = True
    return keep


def write_csv(path: str, rows: Sequence[Dict[str, object]], columns: Optional[List[str]] = None
              ) -> str:
    """Rows of dicts to CSV (columns: the union of keys in first-seen order unless given)."""
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in columns})
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if v == 0.0:
            return "0"
        if abs(v) >= 1e4 or abs(v) < 1e-3:
            return f"{v:.2e}"
        return f"{v:.4g}"
    return str(v)


def markdown_table(rows: Sequence[Dict[str, object]], columns: Sequence[str],
                   headers: Optional[Sequence[str]] = None) -> str:
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


class ReportWriter:
    """Collects the report: header lines (sizes, dtype, device, wall time, the reconstruction error
    and quadrature residual of every attribution run) go first, then sections with tables/figures."""

    def __init__(self, out_dir: str, title: str):
        self.out_dir = out_dir
        os.makedirs(out_dir, exist_ok=True)
        self.title = title
        self.header: List[str] = []
        self.details: List[str] = []      # written after the runs table
        self.runs: List[Dict[str, object]] = []
        self.sections: List[str] = []

    def add_run(self, name: str, attr=None, *, reconstruction_error: float = float("nan"),
                max_residual: float = float("nan"), max_residual_rel: float = float("nan"),
                wall_s: float = float("nan"), note: str = "") -> None:
        """Register one attribution run for the report's first lines."""
        if attr is not None:
            reconstruction_error = float(attr.reconstruction_error)
            max_residual = float(attr.step_residual.abs().max())
            max_residual_rel = float(attr.step_residual_relative.abs().max())
        self.runs.append({"run": name, "reconstruction_error": reconstruction_error,
                          "max_step_residual": max_residual,
                          "max_step_residual_rel": max_residual_rel, "wall_s": wall_s,
                          "note": note})

    def section(self, text: str) -> None:
        self.sections.append(text.strip() + "\n")

    def write(self) -> str:
        lines = [f"# {self.title}", ""] + self.header + [
            "", "Reconstruction error (max |initial + kernel + reg − final| over test samples and "
            "outputs) and max quadrature residual of every attribution run:", "",
            markdown_table(self.runs, ["run", "reconstruction_error", "max_step_residual",
                                       "max_step_residual_rel", "wall_s", "note"],
                           ["run", "reconstruction error", "max residual", "max residual (rel.)",
                            "wall s", "note"]), ""] + (self.details + [""] if self.details else [])
        text = "\n".join(lines) + "\n" + "\n".join(self.sections)
        path = os.path.join(self.out_dir, "report.md")
        with open(path, "w") as f:
            f.write(text)
        write_csv(os.path.join(self.out_dir, "runs.csv"), self.runs)
        return path
