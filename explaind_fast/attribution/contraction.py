"""The two contraction orders of docs/design.md §7 for one step s.

Forward mode: Σ_q w_q J(θ_s + t_qΔ_s)·v for a batch of tangents v (B_p restricted to group g), one
batched JVP per node, all test samples at once.   Peak memory ≈ itemsize·T_c·(D + 2·M·A)
(T_c tangents per chunk, A activations per test sample).

Reverse mode: the test feature map φ_s rows [R_c, D] (R_c = m_c·K rows of m_c test samples) from
per-sample reverse-mode Jacobians, then the segment contraction out[g, r, p] = Σ_{i∈g} φ[r, i]B[p, i]
(explaind_fast.ops.path_kernel_reduce when available, else a torch fallback).
Peak memory ≈ itemsize·m_c·K·(2D + A) plus the contraction's (fallback with many groups: R_c·P·D).

Both accept shared ([Q]) and per-sample ([M, Q]) NodeSets: per-sample θ(t_{m,q}) = θ_s + t_{m,q}Δ_s
under vmap over samples.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.func import jacrev, jvp, vmap

from ..model import TestFunction
from ..model import inputs as _in
from ..quadrature import NodeSet
from .granularity import ParamGroups

_FALLBACK_LOOP_MAX_GROUPS = 64


def _targets_or_dummy(tf: TestFunction, idx):
    return (_in.take(tf.targets, idx), 0) if tf.targets is not None else (None, None)


def forward_contract(tf: TestFunction, theta_s, delta, nodes: NodeSet, tangents: torch.Tensor,
                     idx=slice(None), max_evals: Optional[int] = None) -> torch.Tensor:
    """Σ_q w_q J(θ(t_q))·v for each tangent v: [T, D] -> [T, m, K] (test samples idx).

    Shared nodes: (node, tangent) pairs run in one nested vmap, max(1, max_evals // T) nodes per
    call (max_evals: JVP evaluations over all m samples per call, the planner's tangent_chunk;
    None = all nodes at once), so a step costs a few calls instead of one per node.
    Memory ≈ itemsize·(q_c·D + q_c·T·2·m·A) for q_c nodes per call.
    Per-sample nodes: one call per node column, vmapped over the samples whose weight there is
    non-zero (the padding of shorter rules is skipped). Zero-weight nodes add nothing either way.
    """
    X = _in.take(tf.X, idx)
    m, T = _in.batch_size(X), tangents.shape[0]
    if not nodes.per_sample:
        keep = nodes.w != 0
        t, w = nodes.t[keep].to(theta_s), nodes.w[keep].to(theta_s)
        F = lambda th: tf.values(th, idx)                              # noqa: E731
        both = vmap(lambda th: vmap(lambda v: jvp(F, (th,), (v,))[1])(tangents))
        step = len(t) if max_evals is None else max(1, int(max_evals) // max(T, 1))
        acc = None
        for a in range(0, len(t), max(step, 1)):
            ths = theta_s[None] + t[a:a + step, None] * delta[None]    # [q_c, D]
            out = torch.tensordot(w[a:a + step], both(ths), dims=1)     # [T, m, K]
            acc = out if acc is None else acc + out
        if acc is None:                                                # every weight was zero
            K = tf.values(theta_s, idx).shape[-1]
            acc = torch.zeros(T, m, K, dtype=theta_s.dtype, device=theta_s.device)
        return acc
    tg, tg_dim = _targets_or_dummy(tf, idx)

    def per_sample(th, x, y):
        f = lambda tt: tf.single(tt, x, y)                            # noqa: E731
        return vmap(lambda v: jvp(f, (th,), (v,))[1])(tangents)         # [T, K]
    t_all = nodes.t[idx].to(theta_s)
    w_all = nodes.w[idx].to(theta_s)
    acc = None
    for q in range(nodes.num_nodes):
        live = (w_all[:, q] != 0).nonzero().flatten()                 # samples using slot q
        if len(live) == 0:
            continue
        ths = theta_s[None] + t_all[live, q, None] * delta[None]       # [l, D]
        out = tf.fm.vmap(per_sample, (0, 0, tg_dim))(
            ths, _in.take(X, live), None if tg is None else _in.take(tg, live))  # [l, T, K]
        out = w_all[live, q, None, None] * out
        if acc is None:
            acc = torch.zeros((m,) + out.shape[1:], dtype=out.dtype, device=out.device)
        acc[live] += out
    if acc is None:
        K = tf.values(theta_s, idx).shape[-1]
        acc = torch.zeros(m, T, K, dtype=theta_s.dtype, device=theta_s.device)
    return acc.transpose(0, 1)


def reverse_phi(tf: TestFunction, theta_s, delta, nodes: NodeSet, idx, max_pairs: int = 64,
                ks=slice(None)) -> torch.Tensor:
    """φ_s rows of test samples idx, outputs ks: Σ_q w_q J(θ(t_q)) as [m, K_c, D].

    The (sample, node) pairs are evaluated max_pairs at a time in one vmap(jacrev) call
    (memory ≈ max_pairs·K·(D + A) numbers)."""
    X = _in.take(tf.X, idx)
    m = _in.batch_size(X)
    if nodes.per_sample:
        t, w = nodes.t[idx], nodes.w[idx]                              # [m, Q]
    else:
        t, w = nodes.t[None].expand(m, -1), nodes.w[None].expand(m, -1)
    keep = w != 0                                                      # skip zero-weight padding
    sample = torch.arange(m)[:, None].expand_as(t)[keep]
    t, w = t[keep].to(theta_s), w[keep].to(theta_s)
    tg = None if tf.targets is None else _in.take(tf.targets, idx)
    jac = tf.fm.vmap(jacrev(lambda th, x, y: tf.single(th, x, y)[ks]),
                     (0, 0, None if tg is None else 0))
    phi = None
    for a in range(0, len(sample), max(1, max_pairs)):
        sl = slice(a, a + max(1, max_pairs))
        si = sample[sl]
        ths = theta_s[None] + t[sl, None] * delta[None]
        J = jac(ths, _in.take(X, si), None if tg is None else _in.take(tg, si))
        J = J.contiguous()                        # (vmap may return an expanded Jacobian)
        J.mul_(w[sl, None, None])                 # [c, K, D]; in place: J is fresh, c·K·D numbers
        if J.device.type == "cpu" and bool(torch.isfinite(J).all()):
            # sum the pairs into their samples with a one-hot matmul (index_add_ is slow on CPU)
            onehot = (torch.arange(m)[:, None] == si[None, :]).to(device=J.device, dtype=J.dtype)
            part = (onehot @ J.reshape(J.shape[0], -1)).reshape((m,) + J.shape[1:])
        else:   # (on CPU: 0·NaN in the matmul would spread a sample's NaN/inf to all samples)
            part = torch.zeros((m,) + J.shape[1:], dtype=J.dtype, device=J.device)
            part.index_add_(0, si.to(J.device), J)
        phi = part if phi is None else phi + part
    return phi


_OP_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def op_supports(dtype: torch.dtype) -> bool:
    """Whether explaind_fast.ops.path_kernel_reduce takes this dtype (else the torch fallback)."""
    return dtype in _OP_DTYPES


def segment_contract(phi: torch.Tensor, B: torch.Tensor, groups: ParamGroups) -> torch.Tensor:
    """out[g, r, p] = Σ_{i∈g} phi[r, i]·B[p, i]: phi [R, D], B [P, D] -> [G, R, P].

    Uses explaind_fast.ops.path_kernel_reduce on the permuted layout for the dtypes it supports
    (float32, bfloat16, float64); its input errors propagate. Other dtypes fall back to per-group
    matmuls (few groups) or one index_add over an [R, P, D] product (memory R·P·D).
    """
    G, R, P = groups.G, phi.shape[0], B.shape[0]
    perm = groups.perm
    if op_supports(phi.dtype) and B.dtype == phi.dtype:
        from ..ops import path_kernel_reduce

        Jp = phi if perm is None else phi[:, perm.to(phi.device)]
        Bp = B if perm is None else B[:, perm.to(B.device)]
        acc = torch.float64 if phi.dtype == torch.float64 else torch.float32
        w = torch.ones(1, dtype=acc, device=phi.device)
        out = path_kernel_reduce(Jp[None].contiguous(), w, Bp.contiguous(),
                                 groups.offsets.to(phi.device))
        return out if out.dtype == phi.dtype else out.to(phi.dtype)
    if G <= _FALLBACK_LOOP_MAX_GROUPS:
        Jp = phi if perm is None else phi[:, perm.to(phi.device)]
        Bp = B if perm is None else B[:, perm.to(B.device)]
        off = groups.offsets.tolist()
        return torch.stack([Jp[:, off[g]:off[g + 1]] @ Bp[:, off[g]:off[g + 1]].T for g in range(G)])
    prod = (phi[:, None, :] * B[None, :, :]).permute(2, 0, 1)          # [D, R, P]
    out = torch.zeros(G, R, P, dtype=phi.dtype, device=phi.device)
    return out.index_add_(0, groups.ids.to(phi.device), prod)


# ------------------------------------------------------------------------------ one step, all rows
def forward_step(tf: TestFunction, groups: ParamGroups, theta_s, delta, nodes: NodeSet,
                 B: torch.Tensor, chunk: int):
    """Forward mode for one step: ([G, P+1, M, K] contributions φ_s·B[p]|g before the minus sign,
    [M, K] φ_s·Δ_s for the residual). Tangents: one per (group, row of B) plus Δ_s, ``chunk`` at a
    time."""
    G, P1 = groups.G, B.shape[0]
    T = G * P1 + 1
    ids = groups.ids.to(theta_s.device)
    outs = []
    for a in range(0, T, chunk):
        t = torch.arange(a, min(T, a + chunk), device=theta_s.device)
        g, p = t // P1, t % P1
        V = B[p.clamp_max(P1 - 1)] * (ids[None, :] == g[:, None]).to(B.dtype)
        V[t == T - 1] = delta                                          # the last tangent is Δ_s
        outs.append(forward_contract(tf, theta_s, delta, nodes, V, max_evals=chunk))
    out = torch.cat(outs)                                              # [T, M, K]
    return out[:-1].reshape(G, P1, *out.shape[1:]), out[-1]


def row_chunks(M: int, K: int, sample_chunk: int, output_chunk: int):
    """(test samples, outputs) slices of the reverse-mode row chunks."""
    for a in range(0, M, sample_chunk):
        for k in range(0, K, output_chunk):
            yield slice(a, min(M, a + sample_chunk)), slice(k, min(K, k + output_chunk))


def reverse_step(tf: TestFunction, groups: ParamGroups, theta_s, delta, nodes: NodeSet,
                 B: torch.Tensor, plan, K: int):
    """Reverse mode for one step, row chunk by row chunk: same outputs as :func:`forward_step`."""
    M = tf.M
    G, P1 = groups.G, B.shape[0]
    out = torch.zeros(G, P1, M, K, dtype=theta_s.dtype, device=theta_s.device)
    jd = torch.zeros(M, K, dtype=theta_s.dtype, device=theta_s.device)
    for idx, ks in row_chunks(M, K, plan.sample_chunk, plan.output_chunk):
        phi = reverse_phi(tf, theta_s, delta, nodes, idx, plan.pair_chunk, ks)   # [m, Kc, D]
        m, kc = phi.shape[:2]
        rows = phi.reshape(m * kc, -1)
        o = segment_contract(rows, B, groups)                          # [G, m*Kc, P1]
        out[:, :, idx, ks] = o.reshape(G, m, kc, P1).permute(0, 3, 1, 2)
        jd[idx, ks] = (rows @ delta).reshape(m, kc)
    return out, jd
