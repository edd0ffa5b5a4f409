"""The two credit strategies (docs/design.md §7): which step a training sample's contribution is
booked at.

* :func:`update_credit` — at the update s where θ moved: forward in time, the moment recursion
  keeps one D-vector per data partition (none for data="all", where Φ_s = −Δ_s − r_s), and each
  step's contraction runs in forward or reverse mode. Peak: b·P·D for the recursion.
* :func:`gradient_credit` — at the step i whose batch produced the gradient: backward in time per
  row chunk of test samples × outputs (:class:`explaind_fast.optim.BackwardRecursion`), reverse mode,
  the batch gradients recomputed once per row chunk. Peak: b·2·m_c·K·D for the recursion.

Both agree when the step axis is summed. Both write into an :class:`Accumulator`. With per-sample
data both take the batch gradients from :class:`BatchGradients` slab by slab (:func:`stream_moments`,
:func:`stream_contract`): a batch never holds B·D per-sample gradient numbers when the planner's
train budget is smaller (docs/design.md §10).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ..optim import BackwardRecursion, MomentRecursion, RegRecursion, phi_all_from_update
from .accumulator import Accumulator
from .contraction import (forward_step, restrict_groups, reverse_phi, reverse_step, row_chunks,
                          segment_contract)
from .problem import Problem
from .train_side import BatchGradients, release_freed_memory, subsampled_reg


def stream_moments(bg: BatchGradients, moments: MomentRecursion, c, budget: int) -> torch.Tensor:
    """E[p] = decay⊙E[p] + gain⊙G_s[p] (:meth:`MomentRecursion.step`) with the batch gradients
    streamed slab by slab (:class:`BatchGradients`); returns Σ_p G_s[p]."""
    E, ids, gain = moments.E, bg.present, c.gain
    E.mul_(c.decay[None])

    def consume(rows, cols, block):
        E[:, cols].index_add_(0, ids[rows], block.mul_(gain[cols]))
    return bg.stream(consume, budget)


def stream_contract(bg: BatchGradients, H: torch.Tensor, gain: torch.Tensor, groups, budget: int,
                    sub_groups: Optional[dict] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """o[g, r, u] = Σ_{i∈g} H[r, i]·gain_i·G_s[present[u]]_i ([G, R, U], the segment contraction
    of the gradient credit) with the batch gradients streamed slab by slab, each slab contracted
    with H's columns as it arrives; returns (o, Σ_p G_s[p]). ``sub_groups`` caches the groups
    restricted to each slab."""
    sub_groups = {} if sub_groups is None else sub_groups
    o = torch.zeros(groups.G, H.shape[0], len(bg.present), dtype=H.dtype, device=H.device)

    def consume(rows, cols, block):
        key = (cols.start, cols.stop)
        if key not in sub_groups:
            sub_groups[key] = restrict_groups(groups, *key)
        o.index_add_(2, rows, segment_contract(H[:, cols], block.mul_(gain[cols]),
                                               sub_groups[key]))
    return o, bg.stream(consume, budget)


def update_credit(pb: Problem, acc: Accumulator, bar, steps: Optional[range] = None,
                  chunks=None, reduce_jd: Optional[Callable] = None,
                  check_identity: bool = True) -> None:
    """Forward in time over the N stored updates; every θ is read from the store once.

    The hooks of the splits across ranks (:mod:`.distributed`):
    ``steps``: contract only this contiguous range of updates (data="all" only, the "steps"
    split): the regularisation recursion is advanced over the updates before it, nothing else is
    computed for those. ``chunks``: reverse mode, only these row chunks of :func:`row_chunks` (the
    "rows" split); ``reduce_jd``: applied to each step's φ_s·Δ_s [M, K] before the rule's residual
    check (there: the sum over ranks of their rows); ``check_identity``: run the step-identity
    check."""
    traj, rule, P, D = pb.traj, pb.traj.rule, pb.P, pb.D
    opts = dict(dtype=pb.dtype, device=pb.device)
    moments = MomentRecursion(P, D, **opts) if pb.per_sample_data else None
    reg = RegRecursion(D, **opts)
    if chunks is not None and pb.plan.mode != "reverse":
        raise ValueError("update_credit(chunks=...) splits the rows of reverse mode only")
    first, stop = (0, pb.N) if steps is None else (steps.start, steps.stop)
    if first and pb.per_sample_data:
        raise ValueError("update_credit(steps=...) starts mid-run only for data='all' (the moment "
                         "recursion of the partitions needs every earlier step)")
    for s in range(first):                                   # R_s up to the range start
        if traj.checkpoint_every != 1:
            subsampled_reg(traj, s, reg, **opts)
        else:
            reg.step_with(rule.coefficients(traj.step(s), **opts), traj.theta(s, **opts))
    th_next = traj.theta(first, **opts)       # (θ_0 is not held by the problem: read again)
    implicit_phi = pb.plan.mode == "forward" and not pb.per_sample_data   # B[0] = −Δ_s − r_s
    # [Φ_s[1..P]; r_s]; forward mode with data="all" pushes Δ_s and r_s only: [r_s]. Every row is
    # rewritten at every step, so one buffer serves the run (resident throughout, as the floor
    # counts it): a fresh one per step is zeroed page by page each time, 3.1 GB for the 4000
    # samples of the paper's transformer (bench_sample_data_paper.py)
    B = torch.empty(1 if implicit_phi else P + 1, D, **opts)
    for s in range(first, stop):
        th = th_next
        th_next = traj.theta(s + 1, **opts)
        delta = th_next - th
        if traj.checkpoint_every != 1:
            B[-1] = subsampled_reg(traj, s, reg, **opts)
        else:
            rec = traj.step(s)
            c = rule.coefficients(rec, **opts)
            reg.step_with(c, th, out=B[-1])
        r = B[-1]
        if pb.per_sample_data:
            # the last step's contraction left freed blocks in glibc's heap: hand them back
            # before the train side runs beside the floor
            release_freed_memory(th.device)
            bg = BatchGradients(pb.fm, th, pb.train, pb.loss_fn, rec, pb.part.ids)
            G_sum = stream_moments(bg, moments, c, pb.plan.train_budget)
            release_freed_memory(th.device)
            if check_identity:
                acc.identity.step(s, c, rec, th, delta, th_next, G_sum)
            moments.phi(c, out=B[:P])
        elif not implicit_phi:
            phi_all_from_update(delta, r, out=B[0])
        nodes = acc.nodes(s, th, delta, deferred=True)
        while nodes is not None:       # a rule with a deferred residual check may ask again
            if pb.plan.mode == "forward":
                out, jd = forward_step(pb.tf, pb.groups, th, delta, nodes, B,
                                       pb.plan.tangent_chunk, jd=acc.node_jd,
                                       evals=pb.plan.eval_chunk,
                                       dependent=not pb.per_sample_data)
                acc.ev_jvp[s] += nodes.num_nodes * (pb.G * (P + 1) + 1)
            else:
                out, jd = reverse_step(pb.tf, pb.groups, th, delta, nodes, B, pb.plan, pb.K,
                                       chunks)
                acc.ev_jvp[s] += nodes.num_nodes * pb.M * pb.K
            if reduce_jd is not None:
                jd = reduce_jd(jd)
            nodes = acc.refine(s, jd)
        acc.add_update_step(s, out)
        acc.certify(s, jd)
        bar.update(1)


def gradient_credit(pb: Problem, acc: Accumulator, bar, chunks=None,
                    check_identity: bool = True, own_batch: Optional[Callable] = None,
                    reduce_batch_gradient: Optional[Callable] = None,
                    book_reg: bool = True) -> None:
    """Backward in time, one row chunk at a time: the contribution of partition p at gradient step
    i is −gain_i⊙G_i[p]·H_i, the regularisation −reg_gain_i⊙θ_i·Hreg_i. The quadrature nodes of
    each step are found with the first row chunk and reused by the others.

    The hooks of the splits across ranks (:mod:`.distributed`): ``chunks``: only these (test
    rows, outputs) chunks of :func:`row_chunks` (the "rows" split); ``check_identity``: run the
    step-identity check (with the first chunk); ``own_batch(rec)``: the step record restricted to
    the batch samples whose partitions this process books (the "partitions" split);
    ``reduce_batch_gradient``: applied to Σ_p G_s[p] of the first chunk before the identity check
    (there: the sum over ranks; called whether or not this process checks); ``book_reg``: book
    the regularisation contributions (else zeros)."""
    traj, rule, G = pb.traj, pb.traj.rule, pb.G
    opts = dict(dtype=pb.dtype, device=pb.device)
    nodes_of = {}
    sub_groups = {}                                     # coordinate slab -> its groups
    if chunks is None:
        chunks = row_chunks(pb.M, pb.K, pb.plan.sample_chunk, pb.plan.output_chunk)
    for idx, ks in chunks:
        first = not nodes_of
        recursion = BackwardRecursion()
        th_next = traj.theta(pb.N, **opts)
        for s in reversed(range(pb.N)):
            th = traj.theta(s, **opts)                         # each θ is read once per chunk
            delta = th_next - th
            th_next = th
            rec = traj.step(s)
            c = rule.coefficients(rec, **opts)
            if s not in nodes_of:
                nodes_of[s] = acc.nodes(s, th, delta)
            nodes = nodes_of[s]
            acc.ev_nodes[s] = nodes.num_nodes
            phi = reverse_phi(pb.tf, th, delta, nodes, idx, pb.plan.pair_chunk, ks)
            m, kc = phi.shape[:2]
            acc.ev_jvp[s] += nodes.num_nodes * m * kc
            rows = phi.reshape(m * kc, -1)
            H, Hreg = recursion.step(c, rows)
            batch = rec if own_batch is None else own_batch(rec)
            bg = BatchGradients(pb.fm, th, pb.train, pb.loss_fn, batch, pb.part.ids)
            o, G_sum = stream_contract(bg, H, c.gain, pb.groups, pb.plan.train_budget,
                                       sub_groups)                        # [G, m*Kc, U]
            release_freed_memory(th.device)
            if first and reduce_batch_gradient is not None:
                G_sum = reduce_batch_gradient(G_sum)
            if first and check_identity:
                acc.identity.step(s, c, rec, th, delta, th + delta, G_sum, backward=True)
            present = bg.present
            ro = segment_contract(Hreg, (c.reg_gain * th)[None], pb.groups)
            if not book_reg:
                ro.zero_()
            acc.add_gradient_step(s, present, idx, ks,
                                  o.reshape(G, m, kc, -1).permute(0, 3, 1, 2),  # [G, U, m, Kc]
                                  ro.reshape(G, m, kc))
            acc.certify(s, (rows @ delta).reshape(m, kc), idx, ks)
            del phi, rows                     # before the next step's φ: one φ at a time
            if first:
                bar.update(1)
