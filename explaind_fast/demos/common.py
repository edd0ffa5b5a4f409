"""Shared machinery of the demos: a recorded training loop and the Table 1 reconstruction runs.

Everything here uses only the public API: :class:`explaind_fast.TrajectoryRecorder` to record,
:class:`explaind_fast.Trajectory` to read back and :func:`explaind_fast.attribute` to attribute.
Sign convention of all attributions: contributions to the *change* of the output,
final = initial + kernel.sum() + reg.sum(); the paper's ψ is minus this.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .report import evaluations_total, reconstructed_outputs, reconstruction_metrics

__all__ = ["ConfigOverrides", "TrainResult", "train_recorded", "run_reconstruction_table",
           "TABLE1_RULES", "fresh_directory", "accuracy"]

#: The Table 1 rows (paper: 10 and 100 midpoints; plus Gauss–Legendre, adaptive and kinks).
TABLE1_RULES = ("midpoint:10", "midpoint:100", "gauss-legendre:2", "gauss-legendre:4",
                "gauss-legendre:8", "gauss-legendre:16", "adaptive:1e-6", "kinks:3")


class ConfigOverrides:
    """Mixin for the demos' config dataclasses: a copy with the given non-None fields replaced."""

    def with_overrides(self, **kw):
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None})


@dataclass
class TrainResult:
    """A finished recorded run.

    history: one dict per state θ_s, s = 0..N (step, train_loss, train_acc, test_acc);
    wall_s: training + recording time in seconds.
    """

    model: torch.nn.Module
    trajectory: object
    history: List[Dict[str, float]]
    wall_s: float
    directory: str

    @property
    def num_steps(self) -> int:
        return self.trajectory.num_steps


def device_memory_budget(device, fraction: float = 0.8) -> Optional[int]:
    """``fraction`` of the memory free on ``device`` now, in bytes (CUDA: torch.cuda.mem_get_info;
    CPU: MemAvailable of /proc/meminfo), or None where it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(fraction * torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(fraction * int(line.split()[1]) * 1024)
        except OSError:
            return None
    return None


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float((logits.argmax(-1) == targets).double().mean()) if targets.numel() else float("nan")


def fresh_directory(path: str) -> str:
    """Create ``path`` for a new trajectory; an old trajectory there (one with a manifest.json)
    from an earlier demo run is removed, anything else there is refused."""
    if os.path.isdir(path) and os.listdir(path):
        if not os.path.exists(os.path.join(path, "manifest.json")):
            raise FileExistsError(f"'{path}' exists, is not empty and holds no trajectory; "
                                  "refusing to delete it — choose another --out directory")
        shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)
    return path


def train_recorded(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   train_x: torch.Tensor, train_y: torch.Tensor,
                   test_x: torch.Tensor, test_y: torch.Tensor, directory: str, *,
                   max_steps: int, batch_size: Optional[int] = None, seed: int = 0,
                   stop: Optional[Callable[[Dict[str, float]], bool]] = None,
                   eval_every: int = 1, log: Callable[[str], None] = print,
                   log_every: int = 100, checkpoint_every: int = 1) -> TrainResult:
    """Train with mean cross-entropy while a TrajectoryRecorder writes every update to ``directory``.

    Mini-batches (``batch_size`` < len(train)) are seeded reshuffles per epoch; ``None`` is full
    batch. Before update s the model is evaluated at θ_s (test accuracy every ``eval_every`` steps;
    train loss/accuracy come from the training forward pass). ``stop(entry)`` is asked at every
    evaluated θ_s and ends the run there (the paper stops the transformer when test accuracy reaches
    100%). ``checkpoint_every`` = k > 1 stores θ after every k-th update only (the recorder's
    subsampled trajectories: exact for data="all" attributions of each stored k-step segment; no
    per-sample data). Returns the model at θ_N, the loaded Trajectory and the history.
    """
    from explaind_fast import Trajectory, TrajectoryRecorder

    n = train_x.shape[0]
    bs = n if batch_size is None else min(int(batch_size), n)
    gen = torch.Generator().manual_seed(seed)
    fresh_directory(directory)
    history: List[Dict[str, float]] = []
    order, pos = torch.arange(n), n
    t0 = time.perf_counter()
    rec = TrajectoryRecorder(model, optimizer, directory, checkpoint_every=checkpoint_every,
                             dataset_size=n, fsync=False)
    try:
        for s in range(max_steps + 1):
            entry: Dict[str, float] = {"step": s}
            if s % eval_every == 0 or s == max_steps:
                with torch.no_grad():
                    entry["test_acc"] = accuracy(model(test_x), test_y)
            if s == max_steps:
                break
            if pos + bs > n:                    # new epoch (full batch: the same batch each step)
                order = torch.randperm(n, generator=gen) if bs < n else torch.arange(n)
                pos = 0
            idx = order[pos:pos + bs]
            pos += bs
            rec.set_batch(idx)                  # mean-reduced loss: weights 1/|B|
            optimizer.zero_grad(set_to_none=True)
            out = model(train_x[idx])
            loss = F.cross_entropy(out, train_y[idx])
            entry["train_loss"] = float(loss.detach())
            entry["train_acc"] = accuracy(out.detach(), train_y[idx])
            history.append(entry)
            if s % log_every == 0:
                log(f"  step {s:5d}  loss {entry['train_loss']:.4f}  train acc "
                    f"{entry['train_acc']:.3f}  test acc {entry.get('test_acc', float('nan')):.3f}")
            if stop is not None and "test_acc" in entry and stop(entry):
                history.pop()
                break
            loss.backward()
            optimizer.step()
    finally:
        rec.close()
    with torch.no_grad():                       # the final state θ_N
        out = model(train_x)
        entry.update(train_loss=float(F.cross_entropy(out, train_y)),
                     train_acc=accuracy(out, train_y), test_acc=accuracy(model(test_x), test_y))
    history.append(entry)
    wall = time.perf_counter() - t0
    traj = Trajectory.load(directory)
    return TrainResult(model, traj, history, wall, directory)


def run_reconstruction_table(model: torch.nn.Module, trajectory, test_x: torch.Tensor,
                             rules: Sequence[str], *, log: Callable[[str], None] = print,
                             given: Optional[Dict[str, Tuple[object, float]]] = None,
                             **attribute_kwargs) -> List[Dict[str, object]]:
    """The Table 1 analogue: one ``attribute(params="all", data="all", steps="all")`` run per
    quadrature rule, compared with the real final model on ``test_x``.

    Each row: rule, accuracy (argmax agreement of initial + kernel + reg with the final model), kl
    (mean KL(softmax(final) ‖ softmax(reconstruction))), max_abs_error (max |logit error|),
    max_step_residual (max over steps of the quadrature residual) and its relative version,
    evaluations (JVP / Jacobian-row evaluations and forward passes, summed over steps), wall_s,
    and note (the error message when a rule is not available).

    ``given`` maps a rule to an (Attribution, wall seconds) already computed on the same test
    samples at another granularity (steps or params kept): its reconstruction is the same sum, so
    it is not recomputed; its wall time and evaluation counts are that run's (``from_run`` says
    which; empty for rows computed here).
    """
    from explaind_fast import AttributionWarning, attribute

    rows = []
    for rule in rules:
        t0 = time.perf_counter()
        if given and rule in given:
            attr, wall = given[rule]
            rows.append(_table_row(rule, attr, wall, from_run=f"the run keeping {attr.dims}"))
            _log_row(log, rows[-1])
            continue
        try:
            with warnings.catch_warnings():   # inexact rules are the point of this table: their
                warnings.simplefilter("ignore", AttributionWarning)   # certificate is a column
                attr = attribute(model, trajectory, test_x, params="all", data="all", steps="all",
                                 quadrature=rule, output="logits", **attribute_kwargs)
        except Exception as e:  # a rule that is not available is reported, not hidden
            rows.append({"rule": rule, "note": f"not available: {type(e).__name__}: {e}"})
            log(f"  {rule:18s} not available: {type(e).__name__}: {e}")
            continue
        rows.append(_table_row(rule, attr, time.perf_counter() - t0))
        _log_row(log, rows[-1])
    return rows


def _log_row(log, row):
    log(f"  {row['rule']:18s} acc {row['accuracy']:.4f}  KL {row['kl']:.2e}  max|err| "
        f"{row['max_abs_error']:.2e}  {row['wall_s']:6.1f} s"
        + (f" (from {row['from_run']})" if row["from_run"] else ""))


def _table_row(rule, attr, wall, from_run=""):
    recon = reconstructed_outputs(attr)
    return {"rule": rule, **reconstruction_metrics(recon, attr.final),
            "reconstruction_error": float(attr.reconstruction_error),
            "max_step_residual": float(attr.step_residual.abs().max()),
            "max_step_residual_rel": float(attr.step_residual_relative.abs().max()),
            **evaluations_total(attr), "wall_s": wall,
            "certificate": "; ".join(attr.certificate.get("problems", [])) or "ok",
            "from_run": from_run, "note": ""}
