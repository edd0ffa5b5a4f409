"""Replay of a stored trajectory: :func:`verify` re-derives every update from the stored state.

Uses only the store's read API and the optimizer recursions (:mod:`explaind_fast.optim`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from ..optim import RegRecursion, gradient_from_moments, moment_from_update


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
    """

    mode: List[str] = field(default_factory=list)
    theta_error: List[float] = field(default_factory=list)
    moment_error: List[float] = field(default_factory=list)
    step_size: List[float] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def max_theta_error(self) -> float:
        vals = [e for e in self.theta_error if not math.isnan(e)]
        return max(vals) if vals else float("nan")

    @property
    def max_moment_error(self) -> float:
        vals = [e for e in self.moment_error if not math.isnan(e)]
        return max(vals) if vals else float("nan")

    def __str__(self) -> str:
        n = len(self.theta_error)
        return (f"VerifyReport({n} steps: max |θ_(s+1) − replayed| = {self.max_theta_error:.3g}, "
                f"max relative second-moment error = {self.max_moment_error:.3g}"
                + ("; " + "; ".join(self.notes) if self.notes else "") + ")")


def verify(traj, model: Optional[torch.nn.Module] = None) -> VerifyReport:
    """Replay every stored update from the stored state; per-step errors in a VerifyReport.

    Checks all checksums, and the model's parameter names, shapes and order when ``model`` is
    given (ValueError naming the parameter on mismatch). Then, in float64, with the recursions
    of :mod:`explaind_fast.optim.recursion` (E_s the data part of the first moment, R_s the decay part):

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
    report = VerifyReport()
    f64 = torch.float64
    rule, D = traj.rule, traj.layout.D
    adam = rule.has_second_moment
    replayable = traj.checkpoint_every == 1
    if not replayable:
        report.notes.append("checkpoint_every > 1: intermediate states not stored, updates "
                            "not replayable (checksums, finiteness and counters checked)")
    if adam:
        b2 = traj.layout.expand([h["betas"][1] for h in traj.hyper])
    reg = RegRecursion(D, f64)
    E_prev = torch.zeros(D, dtype=f64)
    v_prev = torch.zeros(D, dtype=f64)
    expected_count = None
    theta_next = traj.theta(0, dtype=f64)
    for s in range(traj.num_steps):
        rec = traj.step(s)
        theta_s, theta_next = theta_next, traj.theta(s + 1, dtype=f64)
        for name, t in (("θ", theta_next), ("exp_avg_sq", rec.exp_avg_sq),
                        ("exp_avg", rec.exp_avg)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(f"stored step {s}: {name} has non-finite entries")
        for r in traj.raw_steps(s):
            if expected_count is not None and r.step_count != expected_count:
                raise ValueError(f"stored step {s}: raw step {r.index} has step count "
                                 f"{r.step_count}, expected {expected_count}")
            expected_count = r.step_count + 1
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
            E = moment_from_update(c, delta, R)
            report.mode.append("derived-m")
        if adam:
            G = gradient_from_moments(c, E, E_prev)
            u = rule.second_moment_input(rec, G, theta_s)
            v = rec.exp_avg_sq.to(f64)
            v_replay = b2 * v_prev + (1 - b2) * u * u
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
