"""The two contraction orders of docs/design.md §7 for one step s.

Forward mode: Σ_q w_q J(θ_s + t_qΔ_s)·v for a batch of tangents v (B_p restricted to group g), one
batched JVP per node, all test samples at once.   Peak memory ≈ itemsize·T_c·(D + 2·M·A)
(T_c tangents per chunk, A activations per test sample).

Reverse mode: the test feature map φ_s rows [R_c, D] (R_c = m_c·K rows of m_c test samples) from
per-sample reverse-mode Jacobians, then the segment contraction out[g, r, p] = Σ_{i∈g} φ[r, i]B[p, i]
(explaind_fast.ops.path_kernel_reduce when available, else a torch fallback).
Peak memory ≈ itemsize·m_c·K·(2D + A) plus the contraction's (fallback with many groups: R_c·P·D).

Both accept shared ([Q]) and per-sample ([M, Q]) NodeSets. Per-sample nodes (and reverse mode)
evaluate rows (sample, t) at θ_s + tΔ_s with shared weights, ops affine in their parameters split
along the segment (:mod:`explaind_fast.quadrature.pathmode`): no per-row parameter vectors.
Shared nodes may carry soft activation patterns (:mod:`explaind_fast.quadrature.kinks.patterns`).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..model import TestFunction
from ..quadrature import NodeSet
from ..quadrature.pathmode import PathFunction
from .granularity import ParamGroups

_FALLBACK_LOOP_MAX_GROUPS = 64


#: forward mode, shared nodes: tangents per call are cut (down to this many) so that all nodes fit
#: in one call of the planner's eval_chunk evaluations — the primal is a small part of a JVP's
#: cost, and the call's working set grows with tangents × nodes
TANGENTS_PER_CALL = 4

#: (sample, node) rows per vmapped call of the per-sample paths, divided by the number of tangents
#: (forward mode) or outputs (reverse mode): bounds the activations held by one call
ROW_CHUNK = 1024


def _sample_ids(M: int, idx) -> torch.Tensor:
    """Global test-sample indices of the rows idx (a slice or an index tensor)."""
    return torch.arange(M)[idx] if isinstance(idx, slice) else torch.as_tensor(idx).reshape(-1)


def forward_contract(tf: TestFunction, theta_s, delta, nodes: NodeSet, tangents: torch.Tensor,
                     idx=slice(None), max_evals: Optional[int] = None) -> torch.Tensor:
    """Σ_q w_q J(θ(t_q))·v for each tangent v: [T, D] -> [T, m, K] (test samples idx).

    Shared nodes: θ(t_q) is formed once per node and all m samples are batched;
    max(1, max_evals // T) nodes per call (max_evals: JVP evaluations over all m samples per call,
    the planner's tangent_chunk; None = all nodes at once), the primal once per node for all
    tangents (:meth:`PathFunction.jvp_shared`). Soft activation patterns
    (``nodes.patterns``) are applied per (node, sample). Memory ≈ itemsize·(q_c·D + q_c·T·2·m·A).
    Per-sample nodes: every (sample, node) pair with a non-zero weight is one row (the padding of
    shorter rules is skipped), evaluated at θ_s + t Δ_s with shared weights
    (:class:`explaind_fast.quadrature.pathmode.PathFunction`: no per-row parameter vectors),
    ROW_CHUNK // T rows per call. Memory ≈ itemsize·rows·T·c·A (c ≈ 4).
    """
    m = len(_sample_ids(tf.M, idx))
    T = tangents.shape[0]
    pf = PathFunction.of(tf, theta_s, delta, nodes.patterns)
    if not nodes.per_sample:
        keep = nodes.w != 0
        t, w = nodes.t[keep].to(theta_s), nodes.w[keep].to(theta_s)
        mu = None
        if nodes.patterns is not None:
            mu = nodes.patterns.mu[keep.to(nodes.patterns.mu.device)][:, idx].to(theta_s)
        step = len(t) if max_evals is None else max(1, int(max_evals) // max(T, 1))
        acc = None
        for a in range(0, len(t), max(step, 1)):
            out = pf.jvp_shared(t[a:a + step], idx, tangents,
                                None if mu is None else mu[a:a + step])       # [T, q_c, m, K]
            out = torch.tensordot(out, w[a:a + step], dims=([1], [0]))       # [T, m, K]
            acc = out if acc is None else acc.add_(out)
        if acc is None:                                                # every weight was zero
            K = tf.values(theta_s, idx).shape[-1]
            acc = torch.zeros(T, m, K, dtype=theta_s.dtype, device=theta_s.device)
        return acc
    gid = _sample_ids(tf.M, idx)
    w_all = nodes.w[idx]
    local, q = torch.nonzero(w_all != 0, as_tuple=True)                # rows with weight
    t_rows = nodes.t[idx][local, q].to(theta_s)
    w_rows = w_all[local, q].to(theta_s)
    step = max(1, ROW_CHUNK // max(T, 1))
    acc = None
    for a in range(0, len(local), step):
        out = pf.jvp_rows(gid[local[a:a + step]], t_rows[a:a + step], tangents)   # [T, r, K]
        out = out * w_rows[a:a + step, None]
        if acc is None:
            acc = torch.zeros((T, m) + out.shape[2:], dtype=out.dtype, device=out.device)
        acc.index_add_(1, local[a:a + step].to(out.device), out)
    if acc is None:
        K = tf.values(theta_s, idx).shape[-1]
        acc = torch.zeros(T, m, K, dtype=theta_s.dtype, device=theta_s.device)
    return acc


def reverse_phi(tf: TestFunction, theta_s, delta, nodes: NodeSet, idx, max_pairs: int = 64,
                ks=slice(None)) -> torch.Tensor:
    """φ_s rows of test samples idx, outputs ks: Σ_q w_q J(θ(t_q)) as [m, K_c, D].

    The (sample, node) pairs with a non-zero weight are evaluated max_pairs at a time in one
    vmap(jacrev) call at θ_s + tΔ_s with shared weights (no per-pair parameter vectors), one
    Jacobian per parameter tensor (:meth:`PathFunction.jacobian_rows_by_tensor`), each summed
    into its samples' slice of φ in place, pair by pair. Memory ≈ itemsize·(m·K_c·D +
    max_pairs·K_c·(D + A)) (φ, the pairs' Jacobians and their activations)."""
    gid = _sample_ids(tf.M, idx)
    m = len(gid)
    if nodes.per_sample:
        t, w = nodes.t[idx], nodes.w[idx]                              # [m, Q]
    else:
        t, w = nodes.t[None].expand(m, -1), nodes.w[None].expand(m, -1)
    keep = w != 0                                                      # skip zero-weight padding
    local, q = torch.nonzero(keep, as_tuple=True)
    t, w = t[local, q].to(theta_s), w[local, q].to(theta_s)
    mu_all = None
    if nodes.patterns is not None:
        mu_all = nodes.patterns.mu[:, idx].to(theta_s)                 # [Q, m, U]
    pf = PathFunction.of(tf, theta_s, delta, nodes.patterns)
    offsets = pf.layout.offsets
    phi = None
    step = max(1, max_pairs)
    for a in range(0, len(local), step):
        si, qi = local[a:a + step], q[a:a + step]
        mu = None if mu_all is None else mu_all[qi, si]
        Js = pf.jacobian_rows_by_tensor(gid[si], t[a:a + step], ks, mu)   # {name: [c, Kc, ...]}
        c = len(si)
        if phi is None:
            kc = next(iter(Js.values())).shape[1]
            phi = torch.zeros(m, kc, theta_s.shape[0], dtype=theta_s.dtype,
                              device=theta_s.device)
        wc = w[a:a + step].tolist()
        rows = si.tolist()
        for i, J in enumerate(Js.values()):
            # pair by pair, in place into the sample's slice of φ: no copy of the (possibly
            # non-contiguous) vmap output and no [m, K_c, n] product; the weight rides as alpha,
            # and a non-finite Jacobian stays in its own sample
            part = phi[:, :, offsets[i]:offsets[i + 1]]
            for r in range(c):
                part[rows[r]].view(J.shape[1:]).add_(J[r], alpha=wc[r])
        del Js
    if phi is None:
        K = tf.values(theta_s, idx)[:, ks].shape[-1]
        phi = torch.zeros(m, K, theta_s.shape[0], dtype=theta_s.dtype, device=theta_s.device)
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


def restrict_groups(groups: ParamGroups, a: int, b: int) -> ParamGroups:
    """The groups of the coordinates [a, b) only (every group kept, possibly empty), for
    :func:`segment_contract` of a coordinate slice: the slices' outputs sum to the whole's."""
    if (a, b) == (0, int(groups.offsets[-1])):
        return groups
    ids = groups.ids[a:b]
    perm = None
    if len(ids) > 1 and bool((ids[1:] < ids[:-1]).any()):
        perm = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=groups.G)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
    return ParamGroups(stored_ids=None if perm is None else ids, names=groups.names, perm=perm,
                       offsets=offsets, keep=groups.keep, spec=groups.spec)


# ------------------------------------------------------------------------------ one step, all rows
def group_ids(groups: ParamGroups, device) -> Optional[torch.Tensor]:
    """The coordinate → group map :func:`group_tangent` needs: None for contiguous groups (it
    copies slices), else int64 [D] on ``device``."""
    return None if groups.perm is None else groups.ids.to(device)


def group_tangent(out: torch.Tensor, v: torch.Tensor, groups: ParamGroups, g: int,
                  ids: Optional[torch.Tensor]) -> None:
    """out[:] = v restricted to group g (zero elsewhere; g < 0: all of v), written in place: no
    [D] temporaries. ``ids`` from :func:`group_ids`."""
    if g < 0:
        out.copy_(v)
    elif ids is None:                          # contiguous groups: copy the slice, no mask
        a, b = int(groups.offsets[g]), int(groups.offsets[g + 1])
        out[:a] = 0
        out[b:] = 0
        out[a:b] = v[a:b]
    else:
        torch.where(ids == g, v, torch.zeros((), dtype=out.dtype, device=out.device), out=out)


def forward_step(tf: TestFunction, groups: ParamGroups, theta_s, delta, nodes: NodeSet,
                 B: torch.Tensor, chunk: int, jd: Optional[torch.Tensor] = None,
                 evals: Optional[int] = None, dependent: Optional[bool] = None):
    """Forward mode for one step: ([G, P+1, M, K] contributions φ_s·B[p]|g before the minus sign,
    [M, K] φ_s·Δ_s for the residual). Tangents: one per (group, row of B) plus Δ_s, ``chunk`` at a
    time. With data="all" (B = [−Δ_s − r_s; r_s], as built by phi_all_from_update) the tangents are
    Δ_s|g and r_s|g (φ·B[0]|g = −φ·Δ_s|g − φ·r_s|g, φ·Δ_s = Σ_g φ·Δ_s|g): 2G instead of 2G + 1.
    jd: φ_s·Δ_s [M, K] when the quadrature rule has already computed it at these nodes (Δ_s then
    needs no tangent of its own). evals: tangent × node evaluations per call (the planner's
    eval_chunk; default ``chunk``, one node per call). dependent: whether B is
    [−Δ_s − r_s; r_s] (None: compared here, at the cost of two D-vectors); with dependent=True
    B may be [r_s] alone (the first row is never pushed)."""
    G, P1 = groups.G, B.shape[0]
    ids = group_ids(groups, theta_s.device)
    if dependent is None:
        dependent = P1 == 2 and bool(torch.equal(B[0], torch.sub(-delta, B[1])))
    implicit = bool(dependent) and P1 == 1
    if implicit:
        P1 = 2
    dependent = dependent and P1 == 2

    def vec(v):                                                        # rows 0..P1-1: B, P1: Δ
        return delta if v == P1 else B[v - 1 if implicit else v]
    if dependent:                     # (vector, group): r|g for every g, Δ|g unless jd covers G = 1
        recipe = [(1, g) for g in range(G)] + ([] if (jd is not None and G == 1) else
                                               [(P1, g) for g in range(G)])
    else:
        recipe = [(p, g) for g in range(G) for p in range(P1)] + ([] if jd is not None else
                                                                  [(P1, -1)])
    T = len(recipe)
    outs = []
    if evals and not nodes.per_sample:        # all nodes per call, fewer tangents (each
        q = int((nodes.w != 0).sum())           # tangent also costs D-sized parameter tangents:
        chunk = min(chunk, max(TANGENTS_PER_CALL, evals // max(2 * q, 1)))   # half the budget)
    for a in range(0, T, chunk):
        # row by row: one [T_c, D] buffer, no [T_c, D] temporaries (masks, gathers) per step
        V = torch.empty(min(T, a + chunk) - a, B.shape[1], dtype=B.dtype, device=B.device)
        for i, (v, g) in enumerate(recipe[a:a + chunk]):
            group_tangent(V[i], vec(v), groups, g, ids)
        outs.append(forward_contract(tf, theta_s, delta, nodes, V,
                                     max_evals=max(chunk, evals or 0)))
    out = torch.cat(outs) if outs else None                            # [T, M, K]
    if dependent:
        Jr = out[:G]                                                   # [G, M, K]
        Jd = out[G:] if len(recipe) > G else None
        jd_ = jd if jd is not None else Jd.sum(0)
        Jd = Jd if Jd is not None else jd[None]                        # G == 1
        res = torch.stack([-Jd - Jr, Jr], dim=1)                       # [G, 2, M, K]
        return res, jd_
    if jd is not None:
        return out.reshape(G, P1, *out.shape[1:]), jd
    return out[:-1].reshape(G, P1, *out.shape[1:]), out[-1]


def row_chunks(M: int, K: int, sample_chunk: int, output_chunk: int):
    """(test samples, outputs) slices of the reverse-mode row chunks."""
    for a in range(0, M, sample_chunk):
        for k in range(0, K, output_chunk):
            yield slice(a, min(M, a + sample_chunk)), slice(k, min(K, k + output_chunk))


def reverse_step(tf: TestFunction, groups: ParamGroups, theta_s, delta, nodes: NodeSet,
                 B: torch.Tensor, plan, K: int, chunks=None):
    """Reverse mode for one step, row chunk by row chunk: same outputs as :func:`forward_step`.
    ``chunks``: only these (test samples, outputs) chunks of :func:`row_chunks` (the rows of the
    others stay zero in ``out`` and ``jd``)."""
    M = tf.M
    G, P1 = groups.G, B.shape[0]
    out = torch.zeros(G, P1, M, K, dtype=theta_s.dtype, device=theta_s.device)
    jd = torch.zeros(M, K, dtype=theta_s.dtype, device=theta_s.device)
    if chunks is None:
        chunks = row_chunks(M, K, plan.sample_chunk, plan.output_chunk)
    for idx, ks in chunks:
        phi = reverse_phi(tf, theta_s, delta, nodes, idx, plan.pair_chunk, ks)   # [m, Kc, D]
        m, kc = phi.shape[:2]
        rows = phi.reshape(m * kc, -1)
        o = segment_contract(rows, B, groups)                          # [G, m*Kc, P1]
        out[:, :, idx, ks] = o.reshape(G, m, kc, P1).permute(0, 3, 1, 2)
        jd[idx, ks] = (rows @ delta).reshape(m, kc)
        del phi, rows                         # before the next chunk's φ: one φ at a time
    return out, jd
