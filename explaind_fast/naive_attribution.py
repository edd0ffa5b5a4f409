"""The full-tensor reference: materialise every contribution C[s, i, k, m, j] for a tiny model.

Only for tests (D ≈ 100–300, n ≈ 16 training samples, N ≈ 5 steps, M·K ≈ 12 rows). It shares no
contraction code with the engine: per-sample gradients and Jacobians come from
torch.autograd.functional.jacobian, the E recursion is run per training sample, and the
gradient-step credit is built from explicit products of decay coefficients (a double loop over
gradient step i and update step s ≥ i).

Sign convention: contributions to the change, final = initial + C.sum() + Creg.sum() (the paper's ψ
is minus this). Memory: N·D·n·M·K float64 numbers for each of the two credits.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch.func import functional_call

from .quadrature import NodeSet


class NaiveTensor:
    """C, Cg: [N, D, n, M, K] (update-step / gradient-step credit); Creg, Creg_g: [N, D, M, K]."""

    def __init__(self, C, Cg, Creg, Creg_g, initial, final):
        self.C, self.Cg, self.Creg, self.Creg_g = C, Cg, Creg, Creg_g
        self.initial, self.final = initial, final

    def reduce(self, windows: Sequence[Tuple[int, int]], group_ids: torch.Tensor, G: int,
               part_ids: Optional[torch.Tensor], P: int, credit: str = "update"):
        """Sum to kernel [S, G, P, M, K] and reg [S, G, M, K] (part_ids None: P = 1, all data)."""
        C, R = (self.C, self.Creg) if credit == "update" else (self.Cg, self.Creg_g)
        N, D, n, M, K = C.shape
        S = len(windows)
        kern = torch.zeros(S, G, P, M, K, dtype=C.dtype)
        reg = torch.zeros(S, G, M, K, dtype=C.dtype)
        pid = torch.zeros(n, dtype=torch.int64) if part_ids is None else part_ids
        for w, (a, b) in enumerate(windows):
            cw = C[a:b].sum(0)                                       # [D, n, M, K]
            cw = torch.zeros(D, P, M, K, dtype=C.dtype).index_add_(1, pid, cw)
            kern[w] = torch.zeros(G, P, M, K, dtype=C.dtype).index_add_(0, group_ids, cw)
            reg[w] = torch.zeros(G, M, K, dtype=C.dtype).index_add_(0, group_ids, R[a:b].sum(0))
        return kern, reg


def naive_tensor(model, traj, test_inputs, h: Callable, test_targets, train_X, train_Y,
                 loss_fn: Callable, nodes: Callable[[int], NodeSet]) -> NaiveTensor:
    """Materialise all contributions. ``nodes(s)`` gives step s's quadrature rule ([Q] or [M, Q]).

    h(outputs, targets) -> [M, K]; loss_fn(outputs, targets) -> per-sample losses [B].
    """
    layout, rule = traj.layout, traj.rule
    names = set(layout.names)
    base = {k: v for k, v in list(model.named_parameters()) + list(model.named_buffers())
            if k not in names}

    def f(theta, X):
        return functional_call(model, {**base, **layout.unflatten(theta)}, (X,))

    def H(theta, X, tgt):
        return h(f(theta, X), tgt)

    N, D = traj.num_steps, layout.D
    n = train_X.shape[0]
    M = test_inputs.shape[0]
    theta0 = traj.theta(0, dtype=torch.float64)
    K = H(theta0, test_inputs, test_targets).shape[1]
    jac = torch.autograd.functional.jacobian

    phis, scales, decays, gains, Gks = [], [], [], [], []
    reg_scales, reg_decays, reg_gains, thetas = [], [], [], []
    C = torch.zeros(N, D, n, M, K, dtype=torch.float64)
    Creg = torch.zeros(N, D, M, K, dtype=torch.float64)
    E = torch.zeros(n, D, dtype=torch.float64)
    Rv = torch.zeros(D, dtype=torch.float64)
    for s in range(N):
        th, th1 = traj.theta(s, dtype=torch.float64), traj.theta(s + 1, dtype=torch.float64)
        delta = th1 - th
        ns = nodes(s)
        phi = torch.zeros(M, K, D, dtype=torch.float64)
        for q in range(ns.num_nodes):
            if ns.per_sample:
                for m in range(M):
                    tg = None if test_targets is None else test_targets[m:m + 1]
                    J = jac(lambda t: H(t, test_inputs[m:m + 1], tg), th + float(ns.t[m, q]) * delta)
                    phi[m] += float(ns.w[m, q]) * J[0]
            else:
                J = jac(lambda t: H(t, test_inputs, test_targets), th + float(ns.t[q]) * delta)
                phi += float(ns.w[q]) * J
        rec = traj.step(s)
        c = rule.coefficients(rec, dtype=torch.float64)
        idx = rec.batch_indices
        g = jac(lambda t: loss_fn(f(t, train_X[idx]), train_Y[idx]), th)     # [B, D]
        Gk = torch.zeros(n, D, dtype=torch.float64)
        Gk.index_add_(0, idx, rec.weights[:, None] * g)
        E = c.decay * E + c.gain * Gk
        Phi = c.scale * E                                                     # [n, D]
        C[s] = -torch.einsum("mkd,nd->dnmk", phi, Phi)
        Rv = c.reg_decay * Rv + c.reg_gain * th
        Creg[s] = -torch.einsum("mkd,d->dmk", phi, c.reg_scale * Rv)
        phis.append(phi), scales.append(c.scale), decays.append(c.decay), gains.append(c.gain)
        Gks.append(Gk), reg_scales.append(c.reg_scale), reg_decays.append(c.reg_decay)
        reg_gains.append(c.reg_gain), thetas.append(th)

    # gradient-step credit: the gradient of step i reaches update s >= i with weight
    # scale_s ⊙ Π_{j=i+1..s} decay_j ⊙ gain_i
    Cg = torch.zeros_like(C)
    Creg_g = torch.zeros_like(Creg)
    for i in range(N):
        prod = torch.ones(D, dtype=torch.float64)
        rprod = torch.ones(D, dtype=torch.float64)
        for s in range(i, N):
            if s > i:
                prod = prod * decays[s]
                rprod = rprod * reg_decays[s]
            a = scales[s] * prod * gains[i]
            Cg[i] -= torch.einsum("mkd,nd->dnmk", phis[s], a * Gks[i])
            Creg_g[i] -= torch.einsum("mkd,d->dmk", phis[s], reg_scales[s] * rprod * reg_gains[i]
                                      * thetas[i])
    with torch.no_grad():
        initial = H(theta0, test_inputs, test_targets)
        final = H(traj.theta(N, dtype=torch.float64), test_inputs, test_targets)
    return NaiveTensor(C, Cg, Creg, Creg_g, initial, final)
