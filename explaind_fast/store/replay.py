"""Replay of a stored trajectory: :func:`verify` re-derives every update from the stored state.

Uses only the store's read API and the optimizer recursions (:mod:`explaind_fast.optim`).
"""
from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from ..optim import RegRecursion, gradient_from_moments, moment_from_update


def _max(vals: List[float]) -> float:
    """max that propagates NaN (a NaN error is a failed check, never dropped); NaN if empty."""
    if not vals or any(math.isnan(v) for v in vals):
        return float("nan")
    return max(vals)


@dataclass
class VerifyReport:
    """Result of :meth:`Trajectory.verify`; lists have one entry per stored update s.

    Attributes:
        mode: how the update was replayed (see Trajectory.verify).
        theta_error: max_i |θ_{s+1} − θ'_{s+1}| (replayed from stored data), NaN if not replayable.
        moment_error: Adam-type: max_i |v_{s+1} − v'_{s+1}| / max_i v_{s+1} (the stored second
            moment against its replay from the gradient implied by the stored data); NaN otherwise.
        step_size: max_i |θ_{s+1} − θ_s|, to judge theta_error against.
        notes: anything that limits the check.
        second_moment: whether the optimizer keeps a second moment (moment_error is NaN if not).

    ``max_theta_error`` / ``max_moment_error`` are over the replayed updates (mode other than
    "not-replayable"; Adam-type for the moment) and are NaN when any of those is NaN (or when
    there are none): a NaN is never dropped from a maximum.
    """

    mode: List[str] = field(default_factory=list)
    theta_error: List[float] = field(default_factory=list)
    moment_error: List[float] = field(default_factory=list)
    step_size: List[float] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    second_moment: bool = True

    def _replayed(self, errors: List[float]) -> List[float]:
        if len(self.mode) != len(errors):   # filled by hand: every entry counts
            return list(errors)
        return [e for e, m in zip(errors, self.mode) if m != "not-replayable"]

    @property
    def max_theta_error(self) -> float:
        return _max(self._replayed(self.theta_error))

    @property
    def max_moment_error(self) -> float:
        return _max(self._replayed(self.moment_error)) if self.second_moment else float("nan")

    def __str__(self) -> str:
        n = len(self.theta_error)
        return (f"VerifyReport({n} steps: max |θ_(s+1) − replayed| = {self.max_theta_error:.3g}, "
                f"max relative second-moment error = {self.max_moment_error:.3g}"
                + ("; " + "; ".join(self.notes) if self.notes else "") + ")")


def _where(traj, i: int) -> str:
    off = traj.layout.offsets
    t = bisect.bisect_right(off, i) - 1
    return f"coordinate {i}, parameter '{traj.layout.names[t]}'"


def _check_tensor(traj, s: int, name: str, t: Optional[torch.Tensor], nonneg: bool) -> None:
    """ValueError naming the step, the field and the first bad coordinate."""
    if t is None:
        return
    bad = ~torch.isfinite(t)
    what = "non-finite"
    if nonneg:
        neg = t < 0
        if bool(neg.any()) and not bool(bad.any()):
            bad, what = neg, "negative"
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"stored step {s}: {name} has a {what} entry ({float(t[i])} at "
                         f"{_where(traj, i)})")


def _check_scalars(s: int, r) -> None:
    """lr and weight decay finite and >= 0, clip factor finite and >= 0 (ValueError naming the
    stored step, the raw step and the field)."""
    for name, values in (("lr", r.lr), ("weight_decay", r.weight_decay),
                         ("clip_factor", [r.clip_factor])):
        for g, x in enumerate(values):
            x = float(x)
            if not math.isfinite(x) or x < 0:
                group = f"[{g}] (param group {g})" if name != "clip_factor" else ""
                raise ValueError(f"stored step {s}, raw step {r.index}: {name}{group} is {x}; "
                                 "expected a finite number >= 0")


def _check_tensor_counts(traj, s: int, r, counts: List[int], adam: bool) -> None:
    """Advance each tensor's step counter by the raw step r (by one where it was active) and
    check it against the recorded per-tensor counts (ValueError naming the step and tensor)."""
    names = traj.layout.names
    inactive = set(int(t) for t in (r.inactive or ()))
    for t in range(len(names)):
        if t not in inactive:
            counts[t] += 1
    if not adam:
        return
    recorded = r.tensor_step_counts if r.tensor_step_counts is not None else \
        [r.step_count] * len(names)
    for t, (a, b) in enumerate(zip(counts, recorded)):
        if a != int(b):
            raise ValueError(f"stored step {s}: raw step {r.index} records step count {b} for "
                             f"tensor '{names[t]}', expected {a} (one more at every step where it "
                             "had a gradient)")


def verify(traj, model: Optional[torch.nn.Module] = None) -> VerifyReport:
    """Replay every stored update from the stored state; per-step errors in a VerifyReport.

    Checks all checksums, and the model's parameter names, shapes and order when ``model`` is given
    (ValueError naming the parameter on mismatch); that every stored θ and first moment is finite,
    every stored second moment finite and >= 0, every learning rate, weight decay and clip factor
    finite and >= 0, and the step counters 1, 2, 3, ... (and, Adam-type, each tensor's own counter
    advancing by one exactly at the steps where it had a gradient) (ValueError naming the stored
    step, the field and the first bad coordinate, param group or tensor). Tensors without a
    gradient at a step (``inactive``) are replayed as torch treats them: no update, moments
    unchanged. Then, in float64, with the recursions of
    :mod:`explaind_fast.optim.recursion` (E_s the data part of the first moment, R_s the decay
    part):

    * mode "stored-m" (first moment stored, k = 1): E_s from the stored moment, the
      gradient G_s = (E_s − decay·E_{s−1})/gain, v'_{s+1} = β2 v_s + (1−β2) u_s² with
      u = G (AdamW) or G + λθ_s (Adam-L2), θ'_{s+1} = θ_s − scale'·E_s − r'_s with scale'
      from v'. An honest replay: a wrong lr, β, ε, weight decay or a corrupted v shows in
      theta_error.
    * mode "derived-m" (the default k = 1 recording): E_s is derived from the step identity
      (E_s = −(Δ_s + r_s)/scale_s), then as above. θ' then matches by construction, and
      moment_error carries the check: a wrong lr, β, ε, weight decay or a corrupted v makes
      the implied gradient inconsistent with the stored v. For SGD nothing stored is redundant
      with θ in this mode, so only checksums, finiteness and step counters are checked.
    * checkpoint_every > 1: intermediate states are not stored, so updates cannot be replayed;
      checksums, finiteness and step counters are checked and the errors are NaN.

    Rounding: the implied gradient carries θ_{s+1}'s rounding (eps·|θ|) relative to the step
    (|Δ|), amplified by 1/(1−β1), so expect moment_error up to about eps·|θ|/|Δ|/(1−β1):
    ≲ 1e-12 for float64 runs with ordinary steps, ≲ 1e-4 for float32 runs; theta_error up
    to a few eps·|θ| plus that times |Δ| (tests/recording/test_recorder.py states the bounds). A
    wrong lr, β, ε or weight decay shows as errors orders of magnitude above.
    Peak memory: about 8 float64 [D] vectors.
    """
    if model is not None:
        traj.layout.check_model(model)
    traj.check()
    f64 = torch.float64
    rule, D = traj.rule, traj.layout.D
    adam = rule.has_second_moment
    report = VerifyReport(second_moment=adam)
    replayable = traj.checkpoint_every == 1
    if not replayable:
        report.notes.append("checkpoint_every > 1: intermediate states not stored, updates "
                            "not replayable (checksums, finiteness and counters checked)")
    if adam:
        b2 = traj.layout.expand([h["betas"][1] for h in traj.hyper])
    reg = RegRecursion(D, f64)
    E_prev = torch.zeros(D, dtype=f64)
    v_prev = torch.zeros(D, dtype=f64)
    expected_count = 1   # a recording starts from a fresh optimizer
    tensor_counts = [0] * len(traj.layout.names)   # Adam-type: each tensor's own counter
    theta_next = traj.theta(0, dtype=f64)
    _check_tensor(traj, 0, "θ_0", theta_next, nonneg=False)
    for s in range(traj.num_steps):
        rec = traj.step(s)
        for r in traj.raw_steps(s):
            _check_scalars(s, r)
            if r.step_count != expected_count:
                raise ValueError(f"stored step {s}: raw step {r.index} has step count "
                                 f"{r.step_count}, expected {expected_count}")
            expected_count = r.step_count + 1
            _check_tensor_counts(traj, s, r, tensor_counts, adam)
        theta_s, theta_next = theta_next, traj.theta(s + 1, dtype=f64)
        _check_tensor(traj, s, f"θ_{s + 1}", theta_next, nonneg=False)
        _check_tensor(traj, s, f"exp_avg_sq (v_{s + 1})", rec.exp_avg_sq, nonneg=True)
        _check_tensor(traj, s, "exp_avg", rec.exp_avg, nonneg=False)
        if adam and rec.exp_avg_sq is None:
            raise ValueError(f"stored step {s}: exp_avg_sq (v_{s + 1}) is not stored")
        delta = theta_next - theta_s
        report.step_size.append(float(delta.abs().max()) if D else 0.0)
        if not replayable:
            report.mode.append("not-replayable")
            report.theta_error.append(float("nan"))
            report.moment_error.append(float("nan"))
            continue
        c = rule.coefficients(rec, dtype=f64)
        reg.step_with(c, theta_s)
        R = reg.R
        if rec.exp_avg is not None:
            m = rec.exp_avg.to(f64)
            E = m - R if rule.moment_includes_reg else m
            report.mode.append("stored-m")
        else:
            E = moment_from_update(c, delta, R, E_prev)
            report.mode.append("derived-m")
        if adam:
            G = gradient_from_moments(c, E, E_prev)
            u = rule.second_moment_input(rec, G, theta_s)
            v = rec.exp_avg_sq.to(f64)
            v_replay = b2 * v_prev + (1 - b2) * u * u
            if c.active is not None:         # torch leaves v of a skipped tensor alone
                v_replay = torch.where(c.active, v_replay, v_prev)
            c_replay = rule.coefficients(dataclasses.replace(rec, exp_avg_sq=v_replay),
                                         dtype=f64)
            replay = theta_s - c_replay.scale * E - c_replay.reg_scale * R
            vmax = float(v.abs().max())
            report.moment_error.append(float((v - v_replay).abs().max()) / vmax
                                       if vmax > 0 else float((v - v_replay).abs().max()))
            v_prev = v
        else:
            replay = theta_s - c.scale * E - c.reg_scale * R
            report.moment_error.append(float("nan"))
        report.theta_error.append(float((theta_next - replay).abs().max()) if D else 0.0)
        E_prev = E
    if not adam and "derived-m" in report.mode:
        report.notes.append("SGD without a stored momentum buffer: the replay is exact by "
                            "construction; only checksums, finiteness and counters are checked")
    return report
