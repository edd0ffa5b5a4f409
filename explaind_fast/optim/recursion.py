"""The two linear recursions of docs/design.md §3, and the step identity, as small state objects.

    train:  E_s[p] = decay_s⊙E_{s−1}[p] + gain_s⊙G_s[p],   Φ_s[p] = scale_s⊙E_s[p]      (MomentRecursion)
    reg:    R_s    = reg_decay_s⊙R_{s−1} + reg_gain_s⊙θ_s,  r_s    = reg_scale_s⊙R_s     (RegRecursion)
    identity:  θ_{s+1} − θ_s = −Σ_p Φ_s[p] − r_s

Backward in time (docs/design.md §3), per test row, with φ_i the row's test feature at step i:

    H_i = scale_i⊙φ_i + decay_{i+1}⊙H_{i+1},   Hreg_i = reg_scale_i⊙φ_i + reg_decay_{i+1}⊙Hreg_{i+1}
    Σ_s φ_s·Φ_s[p] = Σ_i gain_i⊙G_i[p]·H_i,    Σ_s φ_s·r_s = Σ_i reg_gain_i⊙θ_i·Hreg_i   (BackwardRecursion)

Everything that runs one of these recursions (the engine, the store's replay, the test oracle, the
benchmarks) uses these objects; the coefficients come from :meth:`OptimizerRule.coefficients`.
Memory: MomentRecursion P·D, RegRecursion D, BackwardRecursion 2·rows·D numbers.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .rules import StepCoefficients


class RegRecursion:
    """R_s = reg_decay⊙R_{s−1} + reg_gain⊙θ_s (R_{−1} = 0); :meth:`step` returns r_s."""

    def __init__(self, D: int, dtype=torch.float64, device=None):
        self.R = torch.zeros(D, dtype=dtype, device=device)

    def step(self, reg_decay: torch.Tensor, reg_gain: torch.Tensor, reg_scale: torch.Tensor,
             theta_s: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Advance with one step's reg coefficients (see ``StepCoefficients``); return r_s
        (written into ``out`` when given). R is updated in place (same rounding as
        reg_decay⊙R + reg_gain⊙θ_s: one D-vector less at the peak)."""
        torch.mul(reg_decay, self.R, out=self.R)
        self.R.add_(reg_gain * theta_s)
        return torch.mul(reg_scale, self.R, out=out)

    def step_with(self, c: StepCoefficients, theta_s: torch.Tensor,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.step(c.reg_decay, c.reg_gain, c.reg_scale, theta_s, out=out)


class MomentRecursion:
    """E_s[p] = decay⊙E_{s−1}[p] + gain⊙G_s[p] for P partitions, updated in place ([P, D])."""

    def __init__(self, P: int, D: int, dtype=torch.float64, device=None):
        self.E = torch.zeros(P, D, dtype=dtype, device=device)

    def step(self, c: StepCoefficients, G: torch.Tensor,
             present: Optional[torch.Tensor] = None) -> None:
        """G: [U, D] batch gradients of the partitions ``present`` ([U] ids; None = all P)."""
        self.E.mul_(c.decay[None])
        if present is None or len(present) == self.E.shape[0]:
            # every partition in the batch: present = 0..P-1 (torch.unique returns them sorted)
            self.E.addcmul_(c.gain[None], G)
        else:
            self.E[present] += c.gain[None] * G

    def phi(self, c: StepCoefficients, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Φ_s = scale⊙E_s, [P, D] (written into ``out`` when given)."""
        return torch.mul(c.scale[None], self.E, out=out)


class BackwardRecursion:
    """H and Hreg of one row chunk, run from the last step to the first (see module docstring)."""

    def __init__(self):
        self.H = self.Hreg = None
        self._decay = self._reg_decay = None

    def step(self, c: StepCoefficients, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """rows: [R, D] test features φ_i of step i (called for i = N−1, …, 0); returns (H_i,
        Hreg_i)."""
        if self.H is None:
            self.H, self.Hreg = c.scale * rows, c.reg_scale * rows
        else:           # in place: no [rows, D] temporaries (H is the caller's until next step)
            self.H.mul_(self._decay).addcmul_(c.scale, rows)
            self.Hreg.mul_(self._reg_decay).addcmul_(c.reg_scale, rows)
        self._decay, self._reg_decay = c.decay, c.reg_decay
        return self.H, self.Hreg


def phi_all_from_update(delta: torch.Tensor, r: torch.Tensor,
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Σ_p Φ_s[p] = −Δ_s − r_s (the step identity solved for the train side: data="all" needs no
    gradient)."""
    return torch.add(delta, r, out=out).neg_()       # = (−Δ_s) − r_s exactly, no −Δ_s temporary


def _inactive_fill(c: StepCoefficients, value: torch.Tensor, fill) -> torch.Tensor:
    """``value`` on the active coordinates, ``fill`` (a tensor, or 0 when None) on the inactive."""
    if c.active is None:
        return value
    if fill is None:
        fill = torch.zeros((), dtype=value.dtype, device=value.device)
    return torch.where(c.active, value, fill.to(value) if torch.is_tensor(fill) else fill)


def _safe(den: torch.Tensor, c: StepCoefficients) -> torch.Tensor:
    """A divisor with 1 on the inactive coordinates (whose quotient is replaced anyway)."""
    return den if c.active is None else torch.where(c.active, den, torch.ones_like(den))


def moment_from_update(c: StepCoefficients, delta: torch.Tensor, R: torch.Tensor,
                       E_prev: Optional[torch.Tensor] = None) -> torch.Tensor:
    """E_s = −(Δ_s + reg_scale⊙R_s)/scale (the data part of the first moment, from the identity);
    on coordinates inactive at this step E_s = E_{s−1} (``E_prev``; 0 when None)."""
    return _inactive_fill(c, -(delta + c.reg_scale * R) / _safe(c.scale, c), E_prev)


def gradient_from_moments(c: StepCoefficients, E: torch.Tensor, E_prev: torch.Tensor) -> torch.Tensor:
    """G_s = (E_s − decay⊙E_{s−1})/gain (the batch gradient implied by two consecutive moments);
    0 on inactive coordinates (torch used no gradient there)."""
    return _inactive_fill(c, (E - c.decay * E_prev) / _safe(c.gain, c), None)


def implied_moment(rule, c: StepCoefficients, delta: torch.Tensor, theta_s: torch.Tensor,
                   stored: Optional[torch.Tensor] = None,
                   m_prev: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The first moment torch holds after step s (exp_avg / momentum buffer), as the recorded update
    implies it: ``stored`` when the store has it, else solved from the step identity.

    Every supported rule's regularisation recursion is either memoryless (reg_decay = 0, R_s =
    reg_gain⊙θ_s: AdamW) or flows through the moment itself (reg_decay = decay, reg_scale = scale:
    Adam-L2, SGD), so θ_s and Δ_s suffice: m_s = −Δ_s/scale, resp. −(Δ_s + reg_scale⊙reg_gain⊙θ_s)/scale.
    Where scale = 0 (lr = 0) the update does not determine m; the recorder stores it then. On
    coordinates inactive at step s (no gradient: torch left the moment alone) m_s = ``m_prev``
    (0 when None).
    """
    if stored is not None:
        return stored.to(delta)
    if rule.moment_includes_reg:
        m = -delta / _safe(c.scale, c)
    else:
        m = -(delta + c.reg_scale * c.reg_gain * theta_s) / _safe(c.scale, c)
    return _inactive_fill(c, m, m_prev)


def implied_gradient(rule, c: StepCoefficients, m: torch.Tensor, m_prev: torch.Tensor,
                     theta_s: torch.Tensor) -> torch.Tensor:
    """The batch gradient G_s = Σ_k w_k ∇L_k(θ_s) that two consecutive first moments (from
    :func:`implied_moment`; m_prev = 0 before the first step) imply; 0 on inactive coordinates."""
    g = (m - c.decay * m_prev) / _safe(c.gain, c)
    if rule.moment_includes_reg:
        g = g - (c.reg_gain / _safe(c.gain, c)) * theta_s
    return _inactive_fill(c, g, None)


def identity_defect_parts(rule, c: StepCoefficients, G: torch.Tensor, m: torch.Tensor,
                          theta_s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The step identity residual of step s in update units, split as ρ_s = base + coef⊙m_prev:
    ρ_s = scale⊙gain⊙(G − implied_gradient(m, m_prev)) without any division (0 on inactive
    coordinates, where gain = scale = 0), with m_prev the moment after the coordinate's previous
    *active* step (0 before its first). Returns (base, coef)."""
    base = c.scale * c.gain * G.to(m) - c.scale * m
    if rule.moment_includes_reg:
        base = base + c.scale * c.reg_gain * theta_s
    return base, c.scale * c.decay
