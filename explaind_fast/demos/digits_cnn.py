"""Digits-CNN demo: the paper's CNN validations (Table 1 and Section 4.1 pruning) on scikit-learn's
8×8 digits (shipped with scikit-learn: no download at run time).

    python -m explaind_fast demo digits-cnn           # CPU size
    python -m explaind_fast demo digits-cnn --full    # larger: all test images attributed

Two recorded runs of :class:`DigitsCNN` (two conv blocks, two linear layers): SGD with momentum and
coupled weight decay (Corollary 3.2) and AdamW (Theorem 3.1, the paper's MNIST settings β = (0.7,
0.9), λ = 0.1, lr 0.01). For each run the report has

* the Table 1 analogue (reconstruction accuracy / KL / max |logit error| / evaluations / time per
  quadrature rule), and
* the Section 4.1 analogue: keep the top-c parameters by kernel importance
  Ψ̄_S(θ) = Σ_x Σ_j |Σ_s contribution of θ| (per-parameter attribution, steps and data summed) vs
  global magnitude pruning |θ_N|, the output layer never pruned, at 70/80/90/95/99% sparsity: test
  accuracy and KL(unpruned ‖ pruned). The magnitude baseline is one-shot (no retraining), unlike
  Li et al. (2017) in the paper. Importance is computed on a scoring split of the held-out images
  and pruning is evaluated on the remaining, disjoint evaluation split.

Sign convention: contributions to the *change*, final = initial + kernel.sum() + reg.sum(); the
paper's ψ is minus this (importance takes |·| so the sign does not matter there).
"""
from __future__ import annotations

import copy
import os
import platform
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from .common import (ConfigOverrides, TABLE1_RULES, accuracy, run_reconstruction_table,
                     train_recorded)
from .data import digits_data
from .models import DigitsCNN
from .plots import plot_pruning, plot_table1, plot_training
from .report import (ReportWriter, kl_divergence, markdown_table, pruning_mask, write_csv)

__all__ = ["DigitsConfig", "PRESETS", "run", "prune_and_evaluate", "SPARSITIES"]

SPARSITIES = (0.7, 0.8, 0.9, 0.95, 0.99)


@dataclass
class DigitsConfig(ConfigOverrides):
    name: str
    n_train: int = 1200
    n_test: int = 597
    score_samples: int = 64           # held-out images used to compute Ψ̄ (the rest evaluate)
    attr_test: int = 16               # images of the Table 1 analogue
    channels1: int = 8
    channels2: int = 16
    hidden: int = 32
    batch_size: int = 128
    epochs_sgd: int = 3
    epochs_adamw: int = 3
    sgd_lr: float = 0.3
    sgd_momentum: float = 0.9
    sgd_weight_decay: float = 5e-3
    adamw_lr: float = 0.02
    adamw_betas: Tuple[float, float] = (0.7, 0.9)
    adamw_weight_decay: float = 0.1
    dtype: str = "float64"
    rules: Tuple[str, ...] = TABLE1_RULES
    importance_rule: str = "kinks:2"       # exact on this CNN (cubic per piece; bench_kinks)
    sparsities: Tuple[float, ...] = SPARSITIES
    seed: int = 0
    note: str = ""


PRESETS: Dict[str, DigitsConfig] = {
    "cpu": DigitsConfig(
        name="CPU size",
        note="scikit-learn digits (8×8, 1797 images), 1200 train / 597 held out (64 score Ψ̄, "
             "533 evaluate pruning), 3 epochs of batch 128 per run (30 steps), 16 images in "
             "Table 1, AdamW lr 0.02 (paper 0.01); the paper's CNN validation used 5120 MNIST "
             "images (28×28), 1024 test images and one epoch of batch 256."),
    "full": DigitsConfig(
        name="full", attr_test=597, score_samples=297, batch_size=64, epochs_sgd=8,
        epochs_adamw=5, sgd_lr=0.15, adamw_lr=0.01,
        note="all 597 held-out images attributed in Table 1 (297 score Ψ̄, 300 evaluate "
             "pruning), batch 64, 8 SGD / 5 AdamW epochs."),
    "tiny": DigitsConfig(
        name="tiny (smoke test)", n_train=96, n_test=40, score_samples=8, attr_test=8,
        channels1=2, channels2=4, hidden=8, batch_size=32, epochs_sgd=1, epochs_adamw=1,
        rules=("gauss-legendre:2", "kinks:2"), importance_rule="gauss-legendre:2",
        note="Tiny smoke-test size; accuracies mean nothing."),
}


def prune_and_evaluate(model: torch.nn.Module, layout, scores: Dict[str, torch.Tensor],
                       prunable: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                       sparsities=SPARSITIES) -> List[Dict[str, float]]:
    """For each scoring method and sparsity: zero the lowest-scoring prunable coordinates of θ_N
    (:func:`pruning_mask`) and evaluate on (x, y): test accuracy and KL(unpruned ‖ pruned)."""
    theta = layout.flatten_model(model)
    with torch.no_grad():
        ref = model(x)
    rows = [{"method": "unpruned", "sparsity": 0.0, "test_acc": accuracy(ref, y), "kl": 0.0}]
    pruned = copy.deepcopy(model)
    params = dict(pruned.named_parameters())
    for method, sc in scores.items():
        for sp in sparsities:
            keep = pruning_mask(sc, prunable, sp)
            with torch.no_grad():
                for name, t in layout.unflatten(theta * keep).items():
                    params[name].copy_(t)
                out = pruned(x)
            rows.append({"method": method, "sparsity": sp, "test_acc": accuracy(out, y),
                         "kl": kl_divergence(ref, out),
                         "kept_prunable": int((keep & prunable).sum())})
    return rows


def _one_run(kind: str, cfg: DigitsConfig, data, out_dir: str, rep: ReportWriter, dtype, dev,
             progress: bool, log) -> Dict[str, object]:
    from explaind_fast import attribute

    torch.manual_seed(cfg.seed)
    model = DigitsCNN(channels1=cfg.channels1, channels2=cfg.channels2,
                      hidden=cfg.hidden).to(dev, dtype)
    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.sgd_lr, momentum=cfg.sgd_momentum,
                              weight_decay=cfg.sgd_weight_decay)
        epochs, desc = cfg.epochs_sgd, (f"SGD lr {cfg.sgd_lr}, momentum {cfg.sgd_momentum}, "
                                        f"coupled weight decay {cfg.sgd_weight_decay}")
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.adamw_lr, betas=cfg.adamw_betas,
                                weight_decay=cfg.adamw_weight_decay)
        epochs, desc = cfg.epochs_adamw, (f"AdamW lr {cfg.adamw_lr}, betas {cfg.adamw_betas}, "
                                          f"weight decay {cfg.adamw_weight_decay}")
    tx, ty = data.train_x.to(dev, dtype), data.train_y.to(dev)
    hx, hy = data.test_x.to(dev, dtype), data.test_y.to(dev)
    steps = epochs * (-(-cfg.n_train // cfg.batch_size))
    log(f"[digits-cnn] {kind}: {desc}, batch {cfg.batch_size}, {epochs} epochs ({steps} steps)")
    tr = train_recorded(model, opt, tx, ty, hx, hy, os.path.join(out_dir, f"trajectory_{kind}"),
                        max_steps=steps, batch_size=cfg.batch_size, seed=cfg.seed, log=log,
                        log_every=max(steps // 4, 1))
    model.eval()
    log(f"[digits-cnn] {kind}: {tr.num_steps} steps in {tr.wall_s:.1f} s; final test acc "
        f"{tr.history[-1]['test_acc']:.3f}")
    write_csv(os.path.join(out_dir, f"training_{kind}.csv"), tr.history)
    plot_training(os.path.join(out_dir, f"training_{kind}.png"), tr.history,
                  title=f"digits CNN, {kind}")
    common = dict(dtype=dtype, device=dev, progress=progress)

    # Table 1 analogue
    ax = hx[:cfg.attr_test]
    log(f"[digits-cnn] {kind}: Table 1 analogue on {ax.shape[0]} held-out images")
    rows = run_reconstruction_table(model, tr.trajectory, ax, cfg.rules, log=log, **common)
    for r in rows:
        if r.get("note"):
            rep.add_run(f"{kind} table1 {r['rule']}", note=r["note"])
        else:
            rep.add_run(f"{kind} table1 {r['rule']}", reconstruction_error=r["reconstruction_error"],
                        max_residual=r["max_step_residual"],
                        max_residual_rel=r["max_step_residual_rel"], wall_s=r["wall_s"])
    write_csv(os.path.join(out_dir, f"table1_{kind}.csv"), rows)
    ok = [r for r in rows if not r.get("note")]
    eval_key = next((k for k in ok[0] if k.startswith("evals_")), None) if ok else None
    if ok:
        plot_table1(os.path.join(out_dir, f"table1_{kind}.png"), rows, eval_key,
                    title=f"digits CNN ({kind}, {tr.num_steps} steps)")

    # Section 4.1 analogue: per-parameter kernel importance on the scoring split
    sx = hx[:cfg.score_samples]
    ex, ey = hx[cfg.score_samples:], hy[cfg.score_samples:]
    log(f"[digits-cnn] {kind}: per-parameter importance Ψ̄_S(θ) on {sx.shape[0]} images "
        f"({cfg.importance_rule})")
    t0 = time.perf_counter()
    a = attribute(model, tr.trajectory, sx, params="parameter", data="all", steps="all",
                  quadrature=cfg.importance_rule, output="logits", **common)
    wall = time.perf_counter() - t0
    rep.add_run(f"{kind} per-parameter importance {cfg.importance_rule}", a, wall_s=wall)
    layout = tr.trajectory.layout
    psi = a.importance(keep=("param",)).double().cpu()                    # [D]
    names = [n for n, k in zip(layout.names, layout.numels) for _ in range(k)]
    prunable = torch.tensor([not n.startswith("linear2.") for n in names])
    theta = layout.flatten_model(model).double().cpu()
    scores = {"kernel importance Ψ̄": psi, "magnitude |θ|": theta.abs()}
    prow = prune_and_evaluate(model.cpu(), layout, scores, prunable, ex.cpu(), ey.cpu(),
                              cfg.sparsities)
    model.to(dev)
    for r in prow:
        r["run"] = kind
    write_csv(os.path.join(out_dir, f"pruning_{kind}.csv"), prow)
    plot_pruning(os.path.join(out_dir, f"pruning_{kind}.png"),
                 [r for r in prow if r["method"] != "unpruned"],
                 title=f"digits CNN ({kind}): pruning by Ψ̄ vs magnitude (output layer kept); "
                       f"unpruned acc {prow[0]['test_acc']:.3f}")
    return {"kind": kind, "desc": desc, "steps": tr.num_steps, "train_wall_s": tr.wall_s,
            "final_test_acc": tr.history[-1]["test_acc"], "table1": rows, "eval_key": eval_key,
            "pruning": prow, "D": layout.D}


def run(out_dir: str, config: DigitsConfig, *, device: Optional[str] = None,
        progress: bool = False, log=print) -> Dict[str, object]:
    """Both runs (SGD-momentum, AdamW), their Table 1 and pruning analogues, report in out_dir."""
    t_start, cpu_start = time.perf_counter(), time.process_time()
    cfg = config
    dtype = getattr(torch, cfg.dtype)
    dev = torch.device(device or "cpu")
    os.makedirs(out_dir, exist_ok=True)
    if cfg.score_samples >= cfg.n_test:
        raise ValueError(f"score_samples ({cfg.score_samples}) must leave held-out images for "
                         f"evaluation (n_test = {cfg.n_test})")
    data = digits_data(cfg.n_train, cfg.n_test, seed=cfg.seed, dtype=dtype)
    rep = ReportWriter(out_dir, "ExPLAIND digits-CNN demo (SGD-momentum and AdamW)")
    results = [_one_run(k, cfg, data, out_dir, rep, dtype, dev, progress, log)
               for k in ("sgd", "adamw")]
    wall = time.perf_counter() - t_start
    r0 = results[0]
    rep.header += [
        f"**Size: {cfg.name}.** {cfg.note}",
        "",
        f"- model: DigitsCNN (conv {cfg.channels1} → pool → ReLU → conv {cfg.channels2} → pool → "
        f"ReLU → linear {cfg.hidden} → ReLU → linear 10), D = {r0['D']} parameters",
        f"- data: {cfg.n_train} train / {cfg.n_test} held-out digits (seed {cfg.seed}); Table 1 on "
        f"{min(cfg.attr_test, cfg.n_test)} held-out images, Ψ̄ on {cfg.score_samples}, pruning "
        f"evaluated on the other {cfg.n_test - cfg.score_samples}",
    ] + [f"- run {r['kind']}: {r['desc']}, batch {cfg.batch_size}, {r['steps']} recorded steps "
         f"(every step), {r['train_wall_s']:.1f} s; final held-out accuracy "
         f"{r['final_test_acc']:.3f}" for r in results] + [
        f"- dtype {cfg.dtype}; device {dev} ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads); torch {torch.__version__}",
        f"- wall time: total {wall:.1f} s; process CPU time {time.process_time() - cpu_start:.1f} s;"
        f" load average at the end {os.getloadavg()[0]:.1f} (the machine may be shared)",
    ]
    for r in results:
        cols = ["rule", "accuracy", "kl", "max_abs_error", "max_step_residual_rel"] + \
            ([r["eval_key"]] if r["eval_key"] else []) + ["wall_s", "note"]
        rep.section(f"## Table 1 analogue, {r['kind']} run\n\n"
                    "Accuracy = argmax agreement of initial + kernel + reg with the real final "
                    "model; KL(softmax(final) ‖ softmax(reconstruction)); max |logit error|; worst "
                    "per-step quadrature residual relative to the step's change.\n\n"
                    + markdown_table(r["table1"], cols)
                    + f"\n\n![table1](table1_{r['kind']}.png)\n")
        rep.section(f"## Section 4.1 analogue (pruning), {r['kind']} run\n\n"
                    + markdown_table(r["pruning"], ["method", "sparsity", "test_acc", "kl"])
                    + f"\n\n![pruning](pruning_{r['kind']}.png)\n")
    path = rep.write()
    log(f"[digits-cnn] report: {path}  (total {wall:.1f} s)")
    return {"report": path, "runs": results, "wall_s": wall,
            "reconstruction_errors": [x["reconstruction_error"] for x in rep.runs],
            "attribution_runs": rep.runs}
