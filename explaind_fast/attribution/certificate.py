"""Certificates that act: the checks every attribution runs on its own result (docs/design.md §9).

Three checks, each with a tolerance by dtype (below) and a warning naming the steps concerned and
the likely causes; ``attribute(..., strict=True)`` raises :class:`CertificateError` instead.

1. **Step identity** (per-sample data only; data="all" satisfies it by construction). The
   recomputed batch gradient of every step, Σ_p G_s[p], must be the gradient the recorded update
   implies (:func:`explaind_fast.optim.implied_gradient`). Its defect in update units,
   ρ_s = scale_s ⊙ gain_s ⊙ (Σ_p G_s[p] − G_s^implied), is the step identity residual
   Δ_s + Σ_p Φ_s[p] + r_s of step s with every earlier step taken as recorded (so one bad step
   is named alone, not with every step after it). It is computed without dividing by gain or
   scale (:func:`explaind_fast.optim.identity_defect_parts`): on the coordinates of a tensor
   without a gradient at step s (gain = scale = 0) it is 0, and the moment a later step starts
   from is the one after the tensor's last active step. Tolerance, per coordinate:

       |ρ_s| ≤ 16·eps_store·(max|θ_{s+1}| + κ_s·max|θ_s|) + IDENTITY_REL[dtype]·max|Δ_s|

   The first term is the storage rounding of θ (Δ_s and Δ_{s−1} are differences of stored
   values; κ_s = max decay_s·scale_s/scale_{s'} carries Δ_{s'}'s rounding into step s, s' the
   coordinate's previous active step), the
   second the recomputation in the attribution dtype (a different summation order than the
   training step's: measured ≤ 1.7e-13 relative in float64 and ≤ 7.7e-5 in float32 on the test
   models, tests/attribution/test_certificates.py; IDENTITY_REL leaves a margin of 5000× resp.
   25×, while a wrong loss, BatchNorm statistics, another branch or bfloat16 autocast give 1e-2
   to 1 — bfloat16 autocast at least 1.06e-2 at every step of the test runs).
2. **Reconstruction.** initial + Σ kernel + Σ reg − final equals −Σ_s residual_s (the quadrature
   residuals) up to rounding whatever the rule; its defect beyond that,
   max |initial + Σkernel + Σreg − final + Σ_s residual_s|, must stay under
   RECONSTRUCTION_EPS·eps·scale, scale = max over rows of |initial| + |final| + Σ|contributions|
   (every term is rounded once per dot product of the contraction; measured about 1 eps relative
   to the scale in float32 and 0.2 eps in float64 on the test runs; 1000·eps leaves
   a wide margin for long runs and large dot products, while the silent failures it catches are
   1e-3 to 1 relative).
3. **Quadrature.** The rule's relative residual per step (h(f(θ_{s+1})) − h(f(θ_s)) − φ_s·Δ_s over
   the step's change) must be under max(1e-6, 1e4·eps) (an ``adaptive:tol`` rule is held to its
   own tol where that is larger): exact rules reach rounding (1e-13 in float64), fixed rules on
   ReLU models leave 1e-4 to 1e-2.

Non-finite outputs (a NaN test input, an overflowing model) are reported per row: they never
leak into other rows, and they make the certificate fail for their rows only.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ..optim import identity_defect_parts, implied_moment

#: relative step-identity tolerance by attribution dtype (see the module docstring)
IDENTITY_REL = {torch.float64: 1e-9, torch.float32: 2e-3, torch.bfloat16: 5e-2,
                torch.float16: 5e-2}
#: reconstruction defect tolerance in units of eps(dtype) × scale
RECONSTRUCTION_EPS = 1000.0


def quadrature_tolerance(dtype: torch.dtype) -> float:
    return max(1e-6, 1e4 * torch.finfo(dtype).eps)


class AttributionWarning(UserWarning):
    """A certificate of :func:`explaind_fast.attribute` failed: the numbers may be wrong."""


class CertificateError(ValueError):
    """Raised instead of :class:`AttributionWarning` under ``strict=True``."""


@dataclass
class Certificate:
    """What the checks found (kept on the result as ``Attribution.certificate``)."""

    reconstruction_defect: float = 0.0
    reconstruction_scale: float = 0.0
    reconstruction_tolerance: float = 0.0
    identity_tolerance_rel: float = float("nan")
    quadrature_tolerance: float = 0.0
    identity_failed_steps: List[int] = field(default_factory=list)
    quadrature_failed_steps: List[int] = field(default_factory=list)
    nonfinite_rows: List[int] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    causes: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> Dict:
        return dict(self.__dict__)


def identity_tolerance(delta: torch.Tensor, theta_s: torch.Tensor, theta_next: torch.Tensor,
                       kappa: float, dtype: torch.dtype, store_dtype: torch.dtype) -> float:
    """The per-coordinate bound of check 1 for one step (see the module docstring)."""
    eps_store = torch.finfo(store_dtype).eps
    return (16 * eps_store * (float(theta_next.abs().max()) + kappa * float(theta_s.abs().max()))
            + IDENTITY_REL.get(dtype, 5e-2) * float(delta.abs().max()))


def _steps_text(steps: List[int]) -> str:
    shown = ", ".join(str(s) for s in steps[:8])
    return shown + (f" … ({len(steps)} steps)" if len(steps) > 8 else "")


def likely_causes(model: nn.Module, per_sample_data: bool, identity_failed: bool,
                  forward_conditions: Optional[Dict] = None) -> List[str]:
    """The causes worth naming for a failed identity or reconstruction check, most likely first:
    what the model (and, where recorded, the training forward passes) shows, then generic ones."""
    causes = []
    fc = forward_conditions or {}
    bn = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    drop = [n for n, m in model.named_modules()
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    if fc.get("train_mode_batchnorm") or bn:
        which = fc.get("train_mode_batchnorm") or bn
        seen = "ran in train mode during training" if fc.get("train_mode_batchnorm") else \
            "may have run in train mode during training"
        causes.append(f"BatchNorm ({', '.join(which[:3])}) {seen}: batch statistics mix the samples "
                      "of a batch, so gradients recomputed per sample or in eval mode differ; "
                      "train with the BatchNorm layers in eval mode (or without BatchNorm)")
    if fc.get("dropout") or drop:
        causes.append(f"dropout ({', '.join((fc.get('dropout') or drop)[:3])}) was active during "
                      "training: its random masks cannot be replayed")
    if fc.get("autocast"):
        causes.append(f"training ran under autocast({fc['autocast']}): the recorded gradients were "
                      "computed in lower precision than the attribution recomputes them")
    if identity_failed or per_sample_data:
        causes.append("loss_fn differs from the training loss (the reduction, label shift, "
                      "ignored tokens, or the sample weights given to set_batch)")
        causes.append("autocast or a lower precision during training than in the attribution")
    causes.append("the model's forward differs from the one trained (another branch, another "
                  "mode, different inputs or buffers)")
    return causes


def report(cert: Certificate, strict: bool) -> None:
    """Warn (or raise under strict) when a check failed; the message names steps and causes."""
    if cert.ok:
        return
    msg = ("explaind_fast.attribute: the result did not pass its certificate: "
           + "; ".join(cert.problems))
    if cert.causes:
        msg += ". Likely causes: " + " | ".join(cert.causes)
    if strict:
        raise CertificateError(msg)
    warnings.warn(msg, AttributionWarning, stacklevel=3)


def finish(cert: Certificate, *, kernel_rows: torch.Tensor, reg_rows: torch.Tensor,
           initial: torch.Tensor, final: torch.Tensor, residual_sum: torch.Tensor,
           mass: torch.Tensor, step_residual_rel: torch.Tensor, dtype: torch.dtype,
           rule_tolerance: float = 0.0) -> Certificate:
    """Checks 2 and 3 from the result's row sums ([M, K] each) and per-step residuals.
    ``rule_tolerance``: the accuracy the user asked of the rule (adaptive:tol), which replaces
    QUADRATURE_REL when it is larger."""
    eps = torch.finfo(dtype).eps
    defect = (initial + kernel_rows + reg_rows - final + residual_sum).abs()
    finite = torch.isfinite(defect).all(1) & torch.isfinite(initial).all(1) & \
        torch.isfinite(final).all(1)
    cert.nonfinite_rows = [int(i) for i in torch.nonzero(~finite).flatten().tolist()]
    scale_rows = (initial.abs() + final.abs() + mass).amax(1)
    if bool(finite.any()):
        cert.reconstruction_defect = float(defect[finite].max())
        cert.reconstruction_scale = float(scale_rows[finite].max())
    cert.reconstruction_tolerance = RECONSTRUCTION_EPS * eps * max(cert.reconstruction_scale,
                                                                   torch.finfo(dtype).tiny)
    if cert.nonfinite_rows:
        cert.problems.append(f"test rows {_steps_text(cert.nonfinite_rows)} have non-finite "
                             "values (a NaN/inf test input or an overflowing model); other rows "
                             "are unaffected")
    if cert.reconstruction_defect > cert.reconstruction_tolerance or \
            math.isnan(cert.reconstruction_defect):
        cert.problems.append(
            f"the contributions do not add up: |initial + kernel + reg − final + Σ quadrature "
            f"residuals| = {cert.reconstruction_defect:.3g} > {cert.reconstruction_tolerance:.3g} "
            f"(scale {cert.reconstruction_scale:.3g})")
    cert.quadrature_tolerance = max(quadrature_tolerance(dtype), rule_tolerance)
    bad = torch.nonzero(~(step_residual_rel <= cert.quadrature_tolerance)).flatten().tolist()
    cert.quadrature_failed_steps = [int(s) for s in bad]
    if bad:
        worst = float(step_residual_rel[torch.isfinite(step_residual_rel)].max()) \
            if bool(torch.isfinite(step_residual_rel).any()) else float("nan")
        cert.problems.append(
            f"the quadrature rule is not exact at steps {_steps_text(cert.quadrature_failed_steps)} "
            f"(relative residual up to {worst:.3g} > {cert.quadrature_tolerance:.3g}): the split "
            "over steps, parameters and data carries that error; use quadrature='auto' "
            "(kink-aware on piecewise models, Gauss–Legendre with an error estimate otherwise)")
    return cert


class IdentityCheck:
    """Check 1 for one run, step by step, in either time direction.

    Forward (update credit): call :meth:`step` for s = 0..N−1. Backward (gradient credit): call it
    for s = N−1..0 and then :meth:`close`. ``G_sum`` is Σ_p G_s[p], the recomputed batch gradient
    (weights applied).

    The defect of step s is ρ_s = base_s + coef_s⊙m_prev (:func:`explaind_fast.optim.identity_defect_parts`,
    no division: 0 on the coordinates of tensors without a gradient at s), where m_prev is the
    implied moment after the coordinate's previous *active* step (torch leaves the moment of a
    skipped tensor alone). Forward, the last active moment per coordinate is carried along.
    Backward, each coordinate waits for the moment of its previous active step: its partial
    defect (base, coef, step) is kept until an earlier step where it is active supplies m (or the
    run's start, m = 0). Memory: 2 D-vectors (forward) or 2 (backward; 3 once some tensor skipped a
    step: a per-coordinate step map).
    """

    def __init__(self, rule, N: int, dtype: torch.dtype, store_dtype: torch.dtype):
        self.rule, self.dtype, self.store_dtype = rule, dtype, store_dtype
        self.relative = torch.full((N,), float("nan"), dtype=torch.float64)
        self.failed: List[int] = []
        self._err = torch.zeros(N, dtype=torch.float64)     # max |ρ_s| found so far
        self._kappa = torch.zeros(N, dtype=torch.float64)
        self._sizes: Dict[int, tuple] = {}                   # s -> (max|Δ|, max|θ_s|, max|θ_s+1|)
        self._m = self._scale = None                          # forward: last active m, scale
        self._wait = None                                     # backward: (base, coef, step)
        self._closed = False

    def step(self, s, c, rec, theta_s, delta, theta_next, G_sum, backward: bool = False) -> None:
        self._sizes[s] = (float(delta.abs().max()) if delta.numel() else 0.0,
                          float(theta_s.abs().max()) if theta_s.numel() else 0.0,
                          float(theta_next.abs().max()) if theta_next.numel() else 0.0)
        if backward:
            m = implied_moment(self.rule, c, delta, theta_s, rec.exp_avg)
            self._backward(s, c, m, theta_s, G_sum)
            return
        m_prev = self._m if self._m is not None else torch.zeros_like(delta)
        m = implied_moment(self.rule, c, delta, theta_s, rec.exp_avg, m_prev=m_prev)
        base, coef = identity_defect_parts(self.rule, c, G_sum, m, theta_s)
        rho = base + coef * m_prev
        self._err[s] = float(rho.abs().max()) if rho.numel() else 0.0
        if self._scale is not None:
            self._kappa[s] = self._ratio_max(coef, self._scale)
        self._m = m
        if c.active is None:
            self._scale = c.scale
        else:
            last = self._scale if self._scale is not None else torch.zeros_like(c.scale)
            self._scale = torch.where(c.active, c.scale, last)
        self._finish(s)

    def _backward(self, s, c, m, theta_s, G_sum) -> None:
        base, coef = identity_defect_parts(self.rule, c, G_sum, m, theta_s)
        if c.active is None and (self._wait is None or isinstance(self._wait[2], int)):
            # every coordinate active here and waiting for the same step (the common case): the
            # whole waiting defect resolves with m, in place, no [D] step map (memory: the
            # waiting base and coef, 2 D-vectors, instead of 3 and the masks)
            if self._wait is not None:
                wbase, wcoef, wstep = self._wait
                kappa = torch.tensor(self._ratio_max(wcoef, c.scale), dtype=torch.float64)
                rho = wcoef.mul_(m).add_(wbase).abs_().max().to("cpu", torch.float64)
                self._err[wstep] = torch.maximum(self._err[wstep], rho)
                self._kappa[wstep] = torch.maximum(self._kappa[wstep], kappa)
                del wbase, wcoef
            self._wait = (base, coef, s)
            return
        if self._wait is not None and isinstance(self._wait[2], int):     # to a per-coordinate map
            wbase, wcoef, wstep = self._wait
            self._wait = (wbase, wcoef, torch.full(wbase.shape, wstep, dtype=torch.int64,
                                                   device=wbase.device))
        active = c.active if c.active is not None else torch.ones_like(base, dtype=torch.bool)
        if self._wait is not None:
            wbase, wcoef, wstep = self._wait
            resolve = active & (wstep >= 0)
            if bool(resolve.any()):
                rho = (wbase + wcoef * m).abs()
                steps = wstep[resolve]
                self._err.scatter_reduce_(0, steps.cpu(), rho[resolve].to("cpu", torch.float64),
                                          "amax")
                ratio = (wcoef / torch.where(c.scale == 0, torch.ones_like(c.scale), c.scale)).abs()
                self._kappa.scatter_reduce_(0, steps.cpu(), ratio[resolve].to("cpu", torch.float64),
                                            "amax")
            wbase = torch.where(active, base, wbase)
            wcoef = torch.where(active, coef, wcoef)
            wstep = torch.where(active, torch.full_like(wstep, s), wstep)
        else:
            wbase, wcoef = base, coef
            wstep = torch.where(active, torch.full(base.shape, s, dtype=torch.int64,
                                                   device=base.device),
                                torch.full(base.shape, -1, dtype=torch.int64, device=base.device))
        self._wait = (wbase, wcoef, wstep)

    @staticmethod
    def _ratio_max(coef, scale_prev) -> float:
        """max |coef / scale_prev| (scale 0 counts as 1)."""
        ratio = coef / torch.where(scale_prev == 0, torch.ones_like(scale_prev), scale_prev)
        return float(ratio.abs_().max()) if ratio.numel() else 0.0

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._wait is not None:      # coordinates whose first active step is the run's first
            wbase, _, wstep = self._wait
            if isinstance(wstep, int):  # every coordinate waits for the same step
                if wbase.numel():
                    self._err[wstep] = torch.maximum(self._err[wstep],
                                                     wbase.abs().max().to("cpu", torch.float64))
            else:
                sel = wstep >= 0
                if bool(sel.any()):
                    self._err.scatter_reduce_(0, wstep[sel].cpu(),
                                              wbase[sel].abs().to("cpu", torch.float64), "amax")
            self._wait = None
            for s in sorted(self._sizes):
                self._finish(s)

    def _finish(self, s) -> None:
        size, th, th_next = self._sizes[s]
        err = float(self._err[s])
        eps_store = torch.finfo(self.store_dtype).eps
        tol = 16 * eps_store * (th_next + float(self._kappa[s]) * th) + \
            IDENTITY_REL.get(self.dtype, 5e-2) * size
        self.relative[s] = err / size if size > 0 else (0.0 if err == 0 else float("inf"))
        if not err <= tol:
            self.failed.append(int(s))
