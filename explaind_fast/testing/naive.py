"""The full-tensor reference: materialise every contribution C[s, i, k, m, j] for a tiny model.

Only for tests (D ≈ 100–300, n ≈ 16 training samples, N ≈ 5 steps, M·K ≈ 12 rows). It shares no
contraction code with the engine: per-sample gradients and Jacobians come from
torch.autograd.functional.jacobian, the optimizer's forward recursions (:mod:`explaind_fast.optim`)
run per training sample, and the gradient-step credit is built from explicit products of decay
coefficients (a double loop over gradient step i and update step s ≥ i), not from the backward
recursion the engine uses.

Contributions to the change (docs/design.md §1): final = initial + C.sum() + Creg.sum().
Memory: N·D·n·M·K float64 numbers for each of the two credits.

Also here: :func:`per_sample_grads` and :func:`step_identity_errors`, the per-sample step-identity
check of a recorded run from recomputed float64 gradients (the recorder tests' oracle).
"""
from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from ..model import FunctionalModel
from ..optim import MomentRecursion, RegRecursion
from ..quadrature import NodeSet


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
    f = FunctionalModel(model, layout)

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
    moments = MomentRecursion(n, D)                  # one E per training sample
    reg = RegRecursion(D)
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
        moments.step(c, Gk)
        Phi = moments.phi(c)                                                  # [n, D]
        C[s] = -torch.einsum("mkd,nd->dnmk", phi, Phi)
        Creg[s] = -torch.einsum("mkd,d->dmk", phi, reg.step_with(c, th))
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


def per_sample_grads(model, theta, layout, X, Y):
    """[B, D] float64 gradients of the per-sample cross-entropy at flat θ (recomputed in float64
    whatever the recording dtype, so the comparison sees only the recording's own rounding)."""
    model64 = copy.deepcopy(model).double()
    params = layout.unflatten(theta.to(torch.float64))

    def loss(p, x, y):
        return F.cross_entropy(functional_call(model64, p, (x[None],)), y[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, X.double(), Y)
    return torch.cat([g[n].reshape(X.shape[0], -1) for n in layout.names], dim=1)


def step_identity_errors(traj, model, X, Y, num_partitions=3):
    """Per stored update s: max_i |(θ_{s+1} − θ_s) + Σ_p Φ_s[p] + r_s| and max_i |Δ_s|, with the
    train side built from recomputed per-sample gradients partitioned by label, the recorded batch
    and weights (incl. clip factor) and the optimizer recursions."""
    f64, D = torch.float64, traj.layout.D
    rule = traj.rule
    moments = MomentRecursion(num_partitions, D)
    reg = RegRecursion(D)
    errors, steps, thetas = [], [], []
    for s in range(traj.num_steps):
        rec = traj.step(s)
        theta_s, theta_next = traj.theta(s, f64), traj.theta(s + 1, f64)
        c = rule.coefficients(rec, dtype=f64)
        idx = rec.batch_indices
        g = per_sample_grads(model, theta_s, traj.layout, X[idx], Y[idx]) * rec.weights[:, None]
        G = torch.zeros(num_partitions, D, dtype=f64).index_add_(0, Y[idx], g)
        moments.step(c, G)
        phi, r = moments.phi(c), reg.step_with(c, theta_s)
        delta = theta_next - theta_s
        errors.append(float((delta + phi.sum(0) + r).abs().max()))
        steps.append(float(delta.abs().max()))
        thetas.append(float(theta_next.abs().max()))
    return errors, steps, thetas


def check_path_function(pf, tf, theta, delta, sample, t, V, tq, tol=1e-12,
                        jacobians: bool = False) -> None:
    """Assert that a :class:`~explaind_fast.quadrature.pathmode.PathFunction` evaluates like the
    model at materialised parameters θ + tΔ: values and JVPs of the rows (sample[r], t[r]), JVPs
    at the shared nodes ``tq`` (split and unsplit), and, with ``jacobians``, the per-row
    Jacobians. ``tol`` relative to each quantity's largest entry (the two sides evaluate the same
    products in a different order: rounding only)."""
    from torch.func import jacrev, jvp

    def close(got, ref, what):
        err = float((got - ref).abs().max())
        assert err <= tol * max(float(ref.abs().max()), 1e-300), (what, err)

    def single(th, r):
        return tf.single(th, tf.X[sample[r]], None)
    rows = range(len(sample))
    close(pf.values(sample, t), torch.stack([single(theta + t[r] * delta, r) for r in rows]),
          "values")
    close(pf.jvp_rows(sample, t, V),
          torch.stack([torch.stack([jvp(lambda a: single(a, r), (theta + t[r] * delta,),
                                        (v,))[1] for r in rows]) for v in V]), "jvp_rows")
    if jacobians:
        close(pf.jacobian_rows(sample, t),
              torch.stack([jacrev(lambda a: single(a, r))(theta + t[r] * delta) for r in rows]),
              "jacobian_rows")
    shared = torch.stack([torch.stack([jvp(tf.values, (theta + q * delta,), (v,))[1]
                                       for q in tq]) for v in V])
    for split in (False, True):
        close(pf.jvp_shared(tq, slice(None), V, split=split), shared, f"jvp_shared split={split}")
