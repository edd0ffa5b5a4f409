"""The accumulator: owns the result buffers and the per-step certificates of one attribution.

    kernel [S, G, P, M, K]   reg [S, G, M, K]   residual [N, M, K]   change [N]
    evaluation counters [N] (quadrature nodes, JVP/Jacobian rows, forward passes, adaptive cap hits)

Credit strategies (:mod:`.credit`) subtract their contributions into the buffers (contributions to
the *change* of the output, docs/design.md §1), record each step's quadrature residual, and
:meth:`Accumulator.result` squeezes or sums the axes the user did not keep into an
:class:`Attribution`. Memory: the buffers above, b·(S·G·(P+1)·M·K + N·M·K) bytes, plus one [M, K]
output per state θ_s evaluated (kept to share endpoints between steps).
"""
from __future__ import annotations

import torch

from ..quadrature import NodeSet, NodeStats, PathStep
from . import certificate
from .problem import Problem
from .result import Attribution

KERNEL_DIMS = ("step", "param", "data", "test", "output")
REG_DIMS = ("step", "param", "test", "output")


class Accumulator:
    def __init__(self, problem: Problem):
        pb = self.problem = problem
        S, G, P, M, K, N = pb.S, pb.G, pb.P, pb.M, pb.K, pb.N
        opts = dict(dtype=pb.dtype, device=pb.device)
        self.kernel = torch.zeros(S, G, P, M, K, **opts)
        self.reg = torch.zeros(S, G, M, K, **opts)
        self.residual = torch.zeros(N, M, K, **opts)
        self.change = torch.zeros(N, **opts)          # on device: no per-step host sync
        self.mass = torch.zeros(M, K, **opts)         # Σ |contribution| per row (certificate scale)
        self.identity = certificate.IdentityCheck(pb.traj.rule, N, pb.dtype, pb.traj.dtype) \
            if pb.per_sample_data else None
        self.ev_nodes = torch.zeros(N, dtype=torch.int64)
        self.ev_jvp = torch.zeros(N, dtype=torch.int64)
        self.ev_fwd = torch.zeros(N, dtype=torch.int64)
        self.ev_cap = torch.zeros(N, dtype=torch.bool)
        self.window_of = pb.windows.window_of(N)
        self._values = [None] * (N + 1)
        self._values[0] = pb.initial

    # ------------------------------------------------------------------ outputs along the run
    def values(self, s: int) -> torch.Tensor:
        """h(f(θ_s)) [M, K], evaluated once per state (counted as a forward pass of step s)."""
        if self._values[s] is None:
            pb = self.problem
            with torch.no_grad():
                self._values[s] = pb.tf.values(pb.traj.theta(s, dtype=pb.dtype, device=pb.device))
            self.ev_fwd[min(s, pb.N - 1)] += 1
        return self._values[s]

    def endpoints(self, s: int):
        return self.values(s), self.values(s + 1)

    # ------------------------------------------------------------------ quadrature
    def nodes(self, s: int, theta_s: torch.Tensor, delta: torch.Tensor,
              deferred: bool = False) -> NodeSet:
        """The quadrature rule's nodes for step s; what finding them cost is counted.
        ``deferred``: the caller will report φ_s·Δ_s at these nodes to :meth:`refine` (a rule
        that checks its residual may then return its first guess unchecked)."""
        pb = self.problem
        step = PathStep(s, theta_s, delta, pb.tf, lambda: self.endpoints(s), deferred)
        nodes, stats = pb.rule.evaluate(step)
        self._count(s, nodes, stats)
        self.node_jd = stats.jd        # φ_s·Δ_s at these nodes when the rule computed it
        self._refine = stats.refine
        return nodes

    def refine(self, s: int, jd: torch.Tensor):
        """After a deferred :meth:`nodes`: None when φ_s·Δ_s = jd satisfies the rule, else the
        rule's next NodeSet for step s (contract again with it)."""
        refine, self._refine = getattr(self, "_refine", None), None
        if refine is None:
            return None
        out = refine(jd)
        if out is None:
            return None
        nodes, stats = out
        self._count(s, nodes, stats)
        self.node_jd, self._refine = stats.jd, stats.refine
        return nodes

    def _count(self, s: int, nodes: NodeSet, stats: NodeStats) -> None:
        self.ev_nodes[s] = nodes.num_nodes
        self.ev_jvp[s] += stats.jvp_nodes
        self.ev_fwd[s] += stats.forward_passes
        self.ev_cap[s] = stats.cap_hit

    # ------------------------------------------------------------------ contributions
    def add_update_step(self, s: int, out: torch.Tensor) -> None:
        """out [G, P+1, M, K] = φ_s·[Φ_s[1..P]; r_s] per group (before the minus sign)."""
        P = self.problem.P
        w = self.window_of[s]
        self.kernel[w] -= out[:, :P]
        self.reg[w] -= out[:, P]
        self.mass += out.abs().sum((0, 1))

    def add_gradient_step(self, s: int, present, idx, ks, kernel_part, reg_part) -> None:
        """Gradient-credit contributions of step s for the partitions ``present`` and the rows
        (idx, ks): kernel_part [G, U, m, Kc], reg_part [G, m, Kc] (before the minus sign)."""
        kw = self.kernel[self.window_of[s]]
        kw[:, present.to(kw.device), idx, ks] -= kernel_part
        self.reg[self.window_of[s], :, idx, ks] -= reg_part
        self.mass[idx, ks] += kernel_part.abs().sum((0, 1)) + reg_part.abs().sum(0)

    def certify(self, s: int, jd: torch.Tensor, idx=slice(None), ks=slice(None)) -> None:
        """Quadrature residual of step s for rows (idx, ks): h(f(θ_{s+1})) − h(f(θ_s)) − φ_s·Δ_s."""
        F0, F1 = self.endpoints(s)
        self.residual[s, idx, ks] = (F1 - F0)[idx, ks] - jd
        self.change[s] = _finite_max((F1 - F0).abs())

    # ------------------------------------------------------------------ the result
    def result(self, strict: bool = False) -> Attribution:
        """The Attribution, after its certificate (:mod:`.certificate`) has been checked: a failed
        check warns (raises under ``strict``)."""
        pb = self.problem
        final = self.values(pb.N)
        initial = pb.initial
        cert = self._certificate(final)
        keep = {"step": pb.windows.keep, "param": pb.groups.keep, "data": pb.part.keep,
                "test": True, "output": pb.out_spec.keep}
        kernel = _drop_axes(self.kernel, KERNEL_DIMS, keep)
        reg = _drop_axes(self.reg, REG_DIMS, keep)
        dims = tuple(d for d in KERNEL_DIMS if keep[d])
        if not pb.out_spec.keep:
            initial, final = initial[:, 0], final[:, 0]
        out_labels = pb.out_spec.labels if pb.out_spec.labels is not None else list(range(pb.K))
        axes = {"step": pb.windows.labels, "param": pb.groups.names, "data": pb.part.labels,
                "test": list(range(pb.M)), "output": out_labels}
        axes = {k: v for k, v in axes.items() if keep[k]}
        res_max, res_rel = self._residuals()
        evaluations = {"quadrature_nodes": self.ev_nodes, "jvp_or_rows": self.ev_jvp,
                       "forward_passes": self.ev_fwd, "adaptive_cap_hit": self.ev_cap}
        identity = self.identity.relative if self.identity is not None else \
            torch.full((pb.N,), float("nan"), dtype=torch.float64)
        out = Attribution(kernel, reg, dims, axes, initial, final, res_max, res_rel,
                          evaluations, pb.credit, pb.plan.to_dict(), pb.rule.text,
                          step_identity=identity, certificate=cert.to_dict())
        certificate.report(cert, strict)
        return out

    def _residuals(self):
        """Per step: max over (finite) rows of |residual|, and that over the step's change."""
        res_max = _finite_max(self.residual.abs().flatten(1), dim=1).to(torch.float64)
        tiny = torch.finfo(torch.float64).tiny
        return res_max, res_max / self.change.to(torch.float64).clamp_min(tiny)

    def _certificate(self, final) -> "certificate.Certificate":
        pb = self.problem
        cert = certificate.Certificate()
        if self.identity is not None:
            self.identity.close()
            cert.identity_failed_steps = sorted(self.identity.failed)
            cert.identity_tolerance_rel = certificate.IDENTITY_REL.get(pb.dtype, 5e-2)
            if self.identity.failed:
                worst = float(self.identity.relative.nan_to_num(float("inf")).max())
                cert.problems.append(
                    "the recomputed training gradients do not reproduce the recorded updates "
                    f"(step identity) at steps {certificate._steps_text(cert.identity_failed_steps)}, "
                    f"relative defect up to {worst:.3g}")
        certificate.finish(cert, kernel_rows=self.kernel.sum((0, 1, 2)), reg_rows=self.reg.sum((0, 1)),
                           initial=pb.initial, final=final, residual_sum=self.residual.sum(0),
                           mass=self.mass, step_residual_rel=self._residuals()[1], dtype=pb.dtype,
                           rule_tolerance=float(getattr(pb.rule, "tol", 0.0)))
        if cert.identity_failed_steps or any("do not add up" in p for p in cert.problems):
            cert.causes = certificate.likely_causes(pb.model, pb.per_sample_data,
                                                    bool(cert.identity_failed_steps))
        return cert


def _finite_max(t: torch.Tensor, dim=None) -> torch.Tensor:
    """max over finite entries (0 where none): a NaN row must not hide the other rows' values."""
    t = torch.where(torch.isfinite(t), t, torch.zeros((), dtype=t.dtype, device=t.device))
    return t.max() if dim is None else t.amax(dim)


def _drop_axes(t: torch.Tensor, dims, keep) -> torch.Tensor:
    """Squeeze (size 1) or sum every axis of ``t`` (named ``dims``) that ``keep`` does not keep."""
    for i in reversed([i for i, d in enumerate(dims) if not keep[d]]):
        t = t.squeeze(i) if t.shape[i] == 1 else t.sum(i)
    return t
