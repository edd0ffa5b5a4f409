"""Optimizer algebra: how AdamW, Adam (L2) and SGD-momentum update θ, one class each.

Every supported optimizer is written as two linear recursions over recorded steps s = 0..N-1
(docs/design.md §3), with per-coordinate [D] coefficient vectors returned by
:meth:`OptimizerRule.coefficients` (the recursions themselves run in :mod:`.recursion`):

    train:  E_s = decay_s ⊙ E_{s-1} + gain_s ⊙ G_s,      Φ_s = scale_s ⊙ E_s
    reg:    R_s = reg_decay_s ⊙ R_{s-1} + reg_gain_s ⊙ θ_s,   r_s = reg_scale_s ⊙ R_s

with E_{-1} = R_{-1} = 0 and G_s = Σ_{k∈B_s} w_{s,k} ∇θ L_k(θ_s) (w includes the clip factor). Then

    θ_{s+1} − θ_s = − Σ_p Φ_s[p] − r_s                       (the step identity)

    AdamW:      decay=β1, gain=1−β1, scale=α_s/((1−β1^t) d_s);   reg: decay 0, gain 1, scale α_s λ
    Adam (L2):  decay=β1, gain=1−β1, scale=α_s/((1−β1^t) d_s);   reg: decay β1, gain (1−β1)λ, scale=scale
    SGD:        decay=μ,  gain=1,    scale=α_s;                    reg: decay μ, gain λ, scale α_s

where t = step_count (torch's counter, s+1 for an uninterrupted run) and
d_s = sqrt(v_{s+1}/(1−β2^t)) + ε. Adding an optimizer is one new subclass here (and its torch class
in :mod:`.torch_optim`).

**Parameters without a gradient at a step** (an unused table, a head used on some steps, a
branch). torch's AdamW, Adam and SGD skip such a tensor entirely: no update, no weight decay, its
moments and (Adam) its own step counter untouched, so per-tensor step counts can differ. A
:class:`StepRecord` lists them in ``inactive`` (tensor indices of the layout) and carries the
per-tensor counts in ``tensor_step_counts`` when they differ from ``step_count``; the
coefficients of an inactive coordinate are then

    decay 1, gain 0, scale 0;   reg: decay 1, gain 0, scale 0   (AdamW's memoryless reg: decay 0)

so E and R carry over unchanged (torch's moments), Φ_s = r_s = 0 there and the identity holds with
Δ_s = 0. ``StepCoefficients.active`` is the [D] mask (None when every tensor is active); the
helpers of :mod:`.recursion` use it where a coefficient would be divided by (no 0/0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from ..model import ParamLayout


@dataclass
class StepRecord:
    """What the store returns for update s (θ_s → θ_{s+1}); tensors are flat [D] in layout order.

    Attributes:
        index: s.
        step_count: torch's step counter after this update (s+1 for an uninterrupted run).
        lr, weight_decay: one value per optimizer param group (α_s, λ).
        batch_indices: int64 [B] dataset indices of batch B_s.
        batch_weights: float64 [B] loss weights w_{s,k} as given to ``set_batch`` (1/|B| for a
            mean-reduced loss), *without* the clip factor.
        clip_factor: the gradient-clipping scale of this step (1.0 when not clipped).
        exp_avg_sq: v_{s+1}, the second moment *after* the update (AdamW/Adam), else None.
        exp_avg: m_{s+1} when stored (subsampled checkpoints), else None.
        inactive: layout indices of the tensors that had no gradient at this step (torch skipped
            them: no update, no decay, moments and step counter untouched); () when all active.
        tensor_step_counts: Adam-type: torch's per-tensor step counter after this step, one per
            tensor of the layout (0 for a tensor never stepped yet), when some differ from
            ``step_count``; None when all equal it.
    """

    index: int
    step_count: int
    lr: Sequence[float]
    weight_decay: Sequence[float]
    batch_indices: Optional[torch.Tensor] = None
    batch_weights: Optional[torch.Tensor] = None
    clip_factor: float = 1.0
    exp_avg_sq: Optional[torch.Tensor] = None
    exp_avg: Optional[torch.Tensor] = None
    inactive: Sequence[int] = ()
    tensor_step_counts: Optional[Sequence[int]] = None

    @property
    def weights(self) -> Optional[torch.Tensor]:
        """Effective sample weights w_{s,k}: loss weights times the clip factor."""
        if self.batch_weights is None:
            return None
        return self.batch_weights.to(torch.float64) * float(self.clip_factor)


@dataclass
class StepCoefficients:
    """Per-coordinate [D] vectors of the two recursions for one step (see module docstring).
    ``active``: bool [D], False on the coordinates of tensors torch skipped at this step (no
    gradient); None when every coordinate is active."""

    decay: torch.Tensor
    gain: torch.Tensor
    scale: torch.Tensor
    reg_decay: torch.Tensor
    reg_gain: torch.Tensor
    reg_scale: torch.Tensor
    active: Optional[torch.Tensor] = None


class OptimizerRule:
    """Base class. ``hyper`` holds one dict per param group (betas, eps, momentum, …)."""

    kind: str = ""
    #: whether torch's first-moment buffer (exp_avg / momentum_buffer) already contains the
    #: weight-decay recursion R_s (coupled decay flows through the moment)
    moment_includes_reg: bool = False
    #: whether the optimizer keeps a second moment v (Adam-type)
    has_second_moment: bool = False
    #: whether the regularisation coefficients depend on v (then they need every raw step's v)
    reg_uses_second_moment: bool = False

    def __init__(self, layout: ParamLayout, hyper: List[Dict]):
        self.layout = layout
        self.hyper = hyper

    def _vec(self, values: Sequence[float], dtype, device) -> torch.Tensor:
        return self._spread(self._per_group(values, dtype, device))

    def _per_group(self, values: Sequence[float], dtype, device) -> torch.Tensor:
        """One number per optimizer param group, [n_groups] (arithmetic on these is bit-identical
        to the same arithmetic on their [D] spread)."""
        return torch.tensor([float(v) for v in values], dtype=dtype, device=device)

    def _spread(self, per_group: torch.Tensor) -> torch.Tensor:
        """Per-coordinate [D] vector of per-group values: a read-only broadcast view (no memory)
        when every group has the same value, else a [D] tensor."""
        if bool((per_group == per_group[0]).all()):
            return per_group[:1].expand(self.layout.D)
        return self.layout.expand(per_group.tolist(), dtype=per_group.dtype,   # (exact round trip)
                                  device=per_group.device)

    def active_mask(self, rec: StepRecord, device=None) -> Optional[torch.Tensor]:
        """bool [D]: False on the coordinates of the tensors inactive at this step (None: all
        active)."""
        inactive = tuple(rec.inactive or ())
        if not inactive:
            return None
        n = len(self.layout.names)
        flags = [True] * n
        for t in inactive:
            flags[int(t)] = False
        return torch.repeat_interleave(torch.tensor(flags, device=device),
                                       torch.tensor(self.layout.numels, device=device))

    def bias_correction(self, beta: torch.Tensor, rec: StepRecord) -> torch.Tensor:
        """1 − β^t per coordinate, t = the step count (per tensor when ``rec.tensor_step_counts``
        is given: the same pow with a scalar exponent per distinct count, so that equal counts
        give bit-identical coefficients)."""
        if rec.tensor_step_counts is None:
            return 1 - torch.pow(beta, float(rec.step_count))
        counts = torch.repeat_interleave(
            torch.tensor([int(t) for t in rec.tensor_step_counts], device=beta.device),
            torch.tensor(self.layout.numels, device=beta.device))
        out = torch.empty_like(beta)
        for t in sorted({int(t) for t in rec.tensor_step_counts}):
            sel = counts == t
            out[sel] = 1 - torch.pow(beta[sel], float(t))
        return out

    @staticmethod
    def _masked(c: StepCoefficients, active: Optional[torch.Tensor],
                reg_decay_inactive: float = 1.0) -> StepCoefficients:
        """Inactive coordinates: decay 1, gain 0, scale 0; reg decay ``reg_decay_inactive`` (1 for
        a recursing regularisation, 0 for a memoryless one), gain 0, scale 0 (torch.where: a
        NaN/inf of the inactive tensor's bias correction never leaks)."""
        if active is None:
            return c
        one, zero = torch.ones_like(c.decay), torch.zeros_like(c.decay)
        return StepCoefficients(
            decay=torch.where(active, c.decay, one), gain=torch.where(active, c.gain, zero),
            scale=torch.where(active, c.scale, zero),
            reg_decay=torch.where(active, c.reg_decay, one * reg_decay_inactive),
            reg_gain=torch.where(active, c.reg_gain, zero),
            reg_scale=torch.where(active, c.reg_scale, zero), active=active)

    def coefficients(self, rec: StepRecord, dtype=torch.float64, device=None) -> StepCoefficients:
        raise NotImplementedError

    def reg_coefficients(self, rec: StepRecord, dtype=torch.float64, device=None):
        """(reg_decay, reg_gain, reg_scale) of one step; for rules whose regularisation does not
        depend on v this needs no second moment (subsampled trajectories store v sparsely)."""
        c = self.coefficients(rec, dtype=dtype, device=device)
        return c.reg_decay, c.reg_gain, c.reg_scale

    def second_moment_input(self, rec: StepRecord, G: torch.Tensor, theta_s: torch.Tensor
                            ) -> torch.Tensor:
        """The gradient torch squares into v for this step (G = Σ w ∇L, the batch gradient)."""
        return G

    def update(self, rec: StepRecord, theta_s: torch.Tensor, E_all: torch.Tensor,
               R: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
        """θ_{s+1} − θ_s = −scale ⊙ E_all − reg_scale ⊙ R (E_all, R after this step's recursion)."""
        c = self.coefficients(rec, dtype=dtype, device=theta_s.device)
        return -(c.scale * E_all) - c.reg_scale * R


class AdamWRule(OptimizerRule):
    """torch.optim.AdamW (decoupled decay), amsgrad=False, maximize=False."""

    kind = "adamw"
    has_second_moment = True

    def _adam_scale(self, rec, dtype, device):
        if rec.exp_avg_sq is None:
            raise ValueError(f"step {rec.index}: the second moment v_(s+1) is not stored; "
                             "Adam-type attribution needs it")
        b1 = self._vec([h["betas"][0] for h in self.hyper], dtype, device)
        b2 = self._vec([h["betas"][1] for h in self.hyper], dtype, device)
        eps = self._vec([h["eps"] for h in self.hyper], dtype, device)
        lr = self._vec(rec.lr, dtype, device)
        v = rec.exp_avg_sq.to(device=device, dtype=dtype)
        d = torch.sqrt(v / self.bias_correction(b2, rec)) + eps
        return b1, lr / (self.bias_correction(b1, rec) * d)

    def coefficients(self, rec, dtype=torch.float64, device=None):
        b1, scale = self._adam_scale(rec, dtype, device)
        reg_decay, reg_gain, reg_scale = self._decoupled(rec, dtype, device)
        b1g = self._per_group([h["betas"][0] for h in self.hyper], dtype, device)
        c = StepCoefficients(decay=b1, gain=self._spread(1 - b1g), scale=scale,
                             reg_decay=reg_decay, reg_gain=reg_gain, reg_scale=reg_scale)
        return self._masked(c, self.active_mask(rec, device), reg_decay_inactive=0.0)

    def _decoupled(self, rec, dtype, device):
        """(reg_decay 0, reg_gain 1, reg_scale lr·λ) per coordinate (broadcast views when
        uniform)."""
        lr = self._per_group(rec.lr, dtype, device)
        wd = self._per_group(rec.weight_decay, dtype, device)
        return (self._spread(torch.zeros_like(lr)), self._spread(torch.ones_like(lr)),
                self._spread(lr * wd))

    def reg_coefficients(self, rec, dtype=torch.float64, device=None):
        reg_decay, reg_gain, reg_scale = self._decoupled(rec, dtype, device)
        active = self.active_mask(rec, device)
        if active is not None:
            zero = torch.zeros_like(reg_scale)
            reg_gain = torch.where(active, reg_gain, zero)
            reg_scale = torch.where(active, reg_scale, zero)
        return reg_decay, reg_gain, reg_scale


class AdamL2Rule(AdamWRule):
    """torch.optim.Adam with coupled (L2) weight decay: the decay flows through the first moment.

    Exact because m is linear in g + λθ; v (nonlinear) enters only through the stored d_s.
    """

    kind = "adam"
    moment_includes_reg = True
    reg_uses_second_moment = True

    def reg_coefficients(self, rec, dtype=torch.float64, device=None):
        c = self.coefficients(rec, dtype=dtype, device=device)
        return c.reg_decay, c.reg_gain, c.reg_scale

    def second_moment_input(self, rec, G, theta_s):
        return G + self._vec(rec.weight_decay, G.dtype, G.device) * theta_s

    def coefficients(self, rec, dtype=torch.float64, device=None):
        b1, scale = self._adam_scale(rec, dtype, device)
        b1g = self._per_group([h["betas"][0] for h in self.hyper], dtype, device)
        wd = self._per_group(rec.weight_decay, dtype, device)
        c = StepCoefficients(decay=b1, gain=self._spread(1 - b1g), scale=scale,
                             reg_decay=b1, reg_gain=self._spread((1 - b1g) * wd), reg_scale=scale)
        return self._masked(c, self.active_mask(rec, device))


class SGDMomentumRule(OptimizerRule):
    """torch.optim.SGD with momentum μ, coupled weight decay, dampening 0, nesterov=False."""

    kind = "sgd"
    moment_includes_reg = True

    def coefficients(self, rec, dtype=torch.float64, device=None):
        mu = self._vec([h.get("momentum", 0.0) for h in self.hyper], dtype, device)
        lr = self._per_group(rec.lr, dtype, device)
        wd = self._vec(rec.weight_decay, dtype, device)
        gain, lr = self._spread(torch.ones_like(lr)), self._spread(lr)
        c = StepCoefficients(decay=mu, gain=gain, scale=lr,
                             reg_decay=mu, reg_gain=wd, reg_scale=lr)
        return self._masked(c, self.active_mask(rec, device))


RULES = {r.kind: r for r in (AdamWRule, AdamL2Rule, SGDMomentumRule)}


def make_rule(kind: str, layout: ParamLayout, hyper: List[Dict]) -> OptimizerRule:
    try:
        return RULES[kind](layout, hyper)
    except KeyError:
        raise ValueError(f"unknown optimizer kind '{kind}'; supported: {sorted(RULES)}") from None
