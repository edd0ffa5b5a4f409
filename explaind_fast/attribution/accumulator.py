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
    def nodes(self, s: int, theta_s: torch.Tensor, delta: torch.Tensor) -> NodeSet:
        """The quadrature rule's nodes for step s; what finding them cost is counted."""
        pb = self.problem
        step = PathStep(s, theta_s, delta, pb.tf, lambda: self.endpoints(s))
        nodes, stats = pb.rule.evaluate(step)
        self._count(s, nodes, stats)
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

    def add_gradient_step(self, s: int, present, idx, ks, kernel_part, reg_part) -> None:
        """Gradient-credit contributions of step s for the partitions ``present`` and the rows
        (idx, ks): kernel_part [G, U, m, Kc], reg_part [G, m, Kc] (before the minus sign)."""
        kw = self.kernel[self.window_of[s]]
        kw[:, present.to(kw.device), idx, ks] -= kernel_part
        self.reg[self.window_of[s], :, idx, ks] -= reg_part

    def certify(self, s: int, jd: torch.Tensor, idx=slice(None), ks=slice(None)) -> None:
        """Quadrature residual of step s for rows (idx, ks): h(f(θ_{s+1})) − h(f(θ_s)) − φ_s·Δ_s."""
        F0, F1 = self.endpoints(s)
        self.residual[s, idx, ks] = (F1 - F0)[idx, ks] - jd
        self.change[s] = (F1 - F0).abs().max()

    # ------------------------------------------------------------------ the result
    def result(self) -> Attribution:
        pb = self.problem
        final = self.values(pb.N)
        initial = pb.initial
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
        res_max = self.residual.abs().flatten(1).amax(1).to(torch.float64)
        tiny = torch.finfo(torch.float64).tiny
        res_rel = res_max / self.change.to(torch.float64).clamp_min(tiny)
        evaluations = {"quadrature_nodes": self.ev_nodes, "jvp_or_rows": self.ev_jvp,
                       "forward_passes": self.ev_fwd, "adaptive_cap_hit": self.ev_cap}
        return Attribution(kernel, reg, dims, axes, initial, final, res_max, res_rel,
                           evaluations, pb.credit, pb.plan.to_dict(), pb.rule.text)


def _drop_axes(t: torch.Tensor, dims, keep) -> torch.Tensor:
    """Squeeze (size 1) or sum every axis of ``t`` (named ``dims``) that ``keep`` does not keep."""
    for i in reversed([i for i, d in enumerate(dims) if not keep[d]]):
        t = t.squeeze(i) if t.shape[i] == 1 else t.sum(i)
    return t
