"""Attribution across ranks (docs/design.md §13): every rank of a torch.distributed job calls
:func:`explaind_fast.attribute` with the same arguments, the work is split, and the full
:class:`Attribution` is put together on the rank(s) that ask for it (``gather_to``).

    context(distributed, gather_to, group) -> Context | None       (None: run single-process)
    attribute_across_ranks(ctx, make_problem, ...) -> Attribution | None

Every rank prepares the same :class:`Problem` (same plan, same chunk sizes, same quadrature rule)
and then takes a share of it, chosen by :func:`choose_split`:

* ``"steps"`` — data="all", update credit, a quadrature rule without state between steps
  (midpoint, gauss-legendre, adaptive, a callable): rank r contracts the contiguous step range
  [N·r/W, N·(r+1)/W); the regularisation recursion R_s is replayed from 0 to its start (one
  θ read and a few D-vector operations per earlier step) and Φ_s = −Δ_s − r_s needs nothing else.
  No collective until the end.
* ``"rows"`` — reverse mode (either credit; gradient credit when the Jacobian rows dominate):
  every rank walks every step and finds its quadrature nodes (the rule sees the same numbers on
  every rank, so a rule that carries state from step to step — "auto", "kinks", the checked
  Gauss–Legendre — chooses the same nodes as in one process),
  and computes the test rows (sample × output chunks of the plan, re-cut to at least W chunks) of
  its share, round robin. Update credit: the [M, K] φ_s·Δ_s is summed over ranks each step (the
  rule's deferred residual check needs all rows); the training gradients are recomputed on every
  rank. Gradient credit: the batch gradients are recomputed once per row chunk anyway (one
  process does the same), so a rank recomputes them for its chunks only.
* ``"partitions"`` — gradient credit when recomputing the batch gradients costs more than the
  Jacobian rows of a step (|B|·min(P, |B|) sample backward passes against
  JACOBIAN_ROW_COST·Q·M·K rows): every rank
  computes every test row (the same φ rows and backward recursion as one process) and the
  gradients and contributions of its partitions p ≡ r (mod W) only, rank 0 the regularisation;
  Σ_p G_s[p] is summed over ranks for the step identity.
* ``"tangents"`` — forward mode otherwise: every rank walks every step and finds the nodes; the
  JVP tangents (group × row of B = [Φ_s[1..P]; r_s], plus Δ_s) are shared out. With per-sample
  data the data partitions are split: rank r owns partitions p ≡ r (mod W), recomputes the
  gradients of the batch samples in them only, keeps their moment recursion E_s[p] only and
  pushes their tangents; the tangents of r_s and Δ_s go round robin. The batch gradient Σ_p G_s[p]
  (for the step-identity certificate) and φ_s·Δ_s are summed over ranks each step.

The "steps", "rows" and "partitions" splits run :mod:`.credit`'s loops through their hooks
(a step range, a subset of row chunks with φ_s·Δ_s summed over ranks, a batch restricted to this
rank's partitions); "tangents" keeps its own loop (it splits the moment recursion itself).

At the end every rank exchanges an ok/error status (all_gather_object); if any rank failed, every
rank raises :class:`DistributedAttributionError` naming the failed ranks (the error is the
original exception, re-raised, when every rank failed with the same message: a bad argument).
Inside the loops of "rows" and "tangents", each per-step sum is preceded by a one-number flag
all_reduce, so that a rank that raises mid-run makes the others leave their loop at their next
collective; a rank that dies is noticed through the process group's timeout. Then the buffers of
the accumulator are summed (each entry is owned by one rank, or — for the kernel windows that span
several ranks' steps — added in a different order than in one process: ≤ 1e-15 relative in
float64) onto ``gather_to``, and that rank builds the Attribution and checks its certificate.

Collectives use the process group's device: CUDA tensors (the current device) for NCCL, CPU
tensors otherwise; with NCCL call ``torch.cuda.set_device(local_rank)`` before attribute.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..optim import MomentRecursion, RegRecursion
from .accumulator import Accumulator
from .contraction import (TANGENTS_PER_CALL, forward_contract, group_ids, group_tangent,
                          row_chunks)
from .credit import gradient_credit, stream_moments, update_credit
from .train_side import BatchGradients, release_freed_memory, subsampled_reg

#: quadrature rules whose nodes for step s depend on step s only (a step range may start anywhere)
STEP_LOCAL_RULES = ("midpoint", "gauss-legendre", "adaptive", "callable")


class DistributedAttributionError(RuntimeError):
    """A rank of a distributed attribution failed (or a collective timed out); raised on every
    rank. ``failed`` maps the failed ranks (in the process group) to their error text."""

    def __init__(self, message: str, failed: Optional[dict] = None):
        super().__init__(message)
        self.failed = dict(failed or {})


class _PeerFailed(Exception):
    """Another rank raised the failure flag: leave the loop and exchange statuses."""


class _CommFailed(Exception):
    """A collective itself failed (timeout, dead peer): no further collective is attempted."""


@dataclass
class Context:
    """Where this rank stands: rank and world size in ``group``, who receives the result, the
    device collectives use."""

    rank: int
    world: int
    group: object
    gather_to: object            # "all" or a rank of the group
    device: torch.device
    backend: str

    @property
    def receives(self) -> bool:
        return self.gather_to == "all" or self.gather_to == self.rank

    def global_rank(self, r: int) -> int:
        import torch.distributed as dist
        return r if self.group is None else dist.get_global_rank(self.group, r)

    # ------------------------------------------------------------------ collectives
    def _call(self, fn, *args, **kw):
        try:
            return fn(*args, group=self.group, **kw)
        except Exception as e:            # gloo/NCCL errors, timeouts: RuntimeError, DistError …
            raise _CommFailed(f"{type(e).__name__}: {e}") from e

    def flag(self, failed: bool) -> None:
        """One-number all_reduce (max): raises _PeerFailed when some other rank raised it."""
        import torch.distributed as dist
        t = torch.tensor([1.0 if failed else 0.0], device=self.device)
        self._call(dist.all_reduce, t, op=dist.ReduceOp.MAX)
        if not failed and float(t) > 0:
            raise _PeerFailed()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (after the failure flag), on the collective device."""
        import torch.distributed as dist
        self.flag(False)
        c = t.to(self.device)
        self._call(dist.all_reduce, c, op=dist.ReduceOp.SUM)
        if c is not t:
            t.copy_(c)
        return t

    def reduce_to_receivers(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of ``t``, landing on gather_to (every rank when "all")."""
        import torch.distributed as dist
        c = t.to(self.device)
        if c is t:
            c = c.clone()
        if self.gather_to == "all":
            self._call(dist.all_reduce, c, op=dist.ReduceOp.SUM)
        else:
            self._call(dist.reduce, c, dst=self.global_rank(self.gather_to), op=dist.ReduceOp.SUM)
        return c.to(t.device)

    def gather_objects(self, obj) -> list:
        import torch.distributed as dist
        out = [None] * self.world
        self._call(dist.all_gather_object, out, obj)
        return out


def context(distributed, gather_to=0, group=None) -> Optional[Context]:
    """The Context of this rank, or None when the attribution runs in one process:
    distributed=False, or "auto" without an initialized process group of more than one rank."""
    if distributed is False or distributed is None:
        return None
    if distributed not in ("auto", True):
        raise ValueError(f"distributed={distributed!r}: expected 'auto', True or False")
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        if distributed is True:
            raise ValueError("distributed=True needs an initialized torch.distributed process "
                             "group (torchrun and dist.init_process_group)")
        return None
    world = dist.get_world_size(group)
    if world <= 1:
        return None
    rank = dist.get_rank(group)
    if not (gather_to == "all" or (isinstance(gather_to, int) and not isinstance(gather_to, bool)
                                   and 0 <= gather_to < world)):
        raise ValueError(f"gather_to={gather_to!r}: expected a rank in [0, {world}) or 'all'")
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return Context(rank=rank, world=world, group=group, gather_to=gather_to, device=device,
                   backend=backend)


def choose_split(pb) -> str:
    """"steps", "rows", "partitions" or "tangents" (module docstring)."""
    if pb.credit == "update" and not pb.per_sample_data and pb.rule.kind in STEP_LOCAL_RULES:
        return "steps"
    if pb.credit == "gradient" and _gradients_dominate(pb):
        return "partitions"
    if pb.plan.mode == "reverse":
        return "rows"
    return "tangents"


#: cost of one Jacobian row (one sample's vmapped reverse pass for one output at one node) in
#: units of one sample's share of a batched backward pass: measured ≈ 100 on the CPU
#: (bench_distributed's transformer: 1056 rows 3.9 s, 31 backwards of a 160-sample batch 0.19 s)
JACOBIAN_ROW_COST = 64


def _gradients_dominate(pb) -> bool:
    """Gradient credit: whether recomputing the batch gradients costs more than the Jacobian rows
    of a step — |B|·min(U, |B|) sample backward passes (one backward of the batch per partition U
    present; one vmapped pass when every sample is its own partition) against
    JACOBIAN_ROW_COST·Q·M·K. The environment variable EXPLAIND_DIST_SPLIT=rows|partitions
    overrides the choice (experiments, tests)."""
    forced = os.environ.get("EXPLAIND_DIST_SPLIT", "").strip().lower()
    if forced in ("rows", "partitions"):
        return forced == "partitions"
    B = len(pb.traj.step(0).batch_indices)
    U = 1 if pb.P == len(pb.train) else min(pb.P, B)
    return B * U > JACOBIAN_ROW_COST * max(1, pb.rule.expected_nodes) * pb.M * pb.K


# ---------------------------------------------------------------------------------- the driver
def attribute_across_ranks(ctx: Context, make_problem: Callable, *, progress: Callable,
                           strict: bool,
                           translate: Callable, finish_plan: Callable):
    """Prepare on every rank, run this rank's share, exchange statuses, sum the buffers onto
    gather_to and build the Attribution there (None on the other ranks).

    make_problem() -> Problem; progress(N, enabled) -> bar; translate(pb, error) -> the exception
    to raise for an error of the credit loop (engine's forward-AD message); finish_plan(pb)."""
    pb = acc = None
    error = None
    split = ""
    try:
        pb = make_problem()
        acc = Accumulator(pb)
    except Exception as e:                                      # validation errors included
        error = e
    _check_statuses(ctx, error, "preparing the attribution")
    split = choose_split(pb)
    bar = progress(pb.N, ctx.rank == 0)
    try:
        try:
            {"steps": _run_steps, "rows": _run_rows, "tangents": _run_tangents,
             "partitions": _run_partitions}[split](ctx, pb, acc, bar)
        except (_PeerFailed, _CommFailed):
            raise
        except Exception as e:
            error = translate(pb, e)
            ctx.flag(True)                        # the others leave their loop at their next sync
        else:
            ctx.flag(False)                       # nobody failed after the last sync
    except _PeerFailed:
        pass
    except _CommFailed as e:
        raise DistributedAttributionError(
            f"rank {ctx.rank}: a collective failed during the attribution ({e}); another rank "
            "probably died or timed out", {ctx.rank: str(e)}) from e.__cause__
    finally:
        bar.close()
    extras = None
    if error is None:
        try:
            finish_plan(pb)
            extras = _extras(ctx, pb, acc)
        except Exception as e:
            error = e
    statuses = _check_statuses(ctx, error, "the attribution", extras)
    try:
        _gather(ctx, pb, acc, split, statuses[0])
    except _CommFailed as e:
        raise DistributedAttributionError(
            f"rank {ctx.rank}: gathering the result failed ({e})",
            {ctx.rank: str(e)}) from e.__cause__
    if not ctx.receives:
        return None
    out = acc.result(strict=strict)
    out.distributed = {"world_size": ctx.world, "split": split, "gather_to": ctx.gather_to,
                       "backend": ctx.backend}
    return out


def _check_statuses(ctx: Context, error, stage: str, extras=None) -> list:
    """all_gather_object of (error text or None, extras); raise on every rank when one failed."""
    mine = None if error is None else f"{type(error).__name__}: {error}"
    try:
        got = ctx.gather_objects((mine, extras))
    except _CommFailed as e:
        raise DistributedAttributionError(
            f"rank {ctx.rank}: the status exchange after {stage} failed ({e}); another rank "
            "probably died or timed out", {ctx.rank: str(e)}) from (error or e.__cause__)
    failed = {r: m for r, (m, _) in enumerate(got) if m is not None}
    if failed:
        if error is not None and len(failed) == ctx.world and len(set(failed.values())) == 1:
            raise error                       # the same error everywhere: a bad argument
        text = "; ".join(f"rank {r}: {m}" for r, m in sorted(failed.items()))
        raise DistributedAttributionError(
            f"{stage} failed on rank{'s' if len(failed) > 1 else ''} "
            f"{', '.join(str(r) for r in sorted(failed))} of {ctx.world}: {text}",
            failed) from error
    return [x for _, x in got]


class _IdentityResult:
    """The step-identity check as computed on rank 0, for the receiving ranks."""

    def __init__(self, relative, failed):
        self.relative, self.failed = relative, list(failed)

    def close(self):
        pass


def _extras(ctx: Context, pb, acc):
    """What rank 0 ships with its status: the step-identity result (per-sample data)."""
    if ctx.rank != 0 or acc.identity is None:
        return None
    acc.identity.close()
    return {"identity": (acc.identity.relative.cpu(), sorted(acc.identity.failed))}


def _gather(ctx: Context, pb, acc: Accumulator, split: str, extras0) -> None:
    """Sum the accumulator's buffers onto the receiving ranks. Every rank has zeroed what it does
    not own (see the _run_* functions), so each entry is either owned by one rank or a partial
    sum."""
    for name in ("kernel", "reg", "residual", "change", "mass"):
        setattr(acc, name, ctx.reduce_to_receivers(getattr(acc, name)))
    for name in ("ev_nodes", "ev_jvp", "ev_fwd"):
        setattr(acc, name, ctx.reduce_to_receivers(getattr(acc, name)))
    acc.ev_cap = ctx.reduce_to_receivers(acc.ev_cap.to(torch.int64)) > 0
    if not ctx.receives:
        return
    if acc.identity is not None:
        rel, failed = extras0["identity"]
        acc.identity = _IdentityResult(rel, failed)
    if acc._values[pb.N] is None:                # h(f(θ_N)): the same numbers, not counted again
        with torch.no_grad():
            acc._values[pb.N] = pb.tf.values(pb.traj.theta(pb.N, dtype=pb.dtype,
                                                           device=pb.device))


def _keep_counters(acc: Accumulator, owned: torch.Tensor) -> None:
    """Zero the per-step counters and step buffers of the steps this rank does not own."""
    off = ~owned
    for t in (acc.ev_nodes, acc.ev_jvp, acc.ev_fwd, acc.ev_cap):
        t[off] = 0
    acc.residual[off.to(acc.residual.device)] = 0
    acc.change[off.to(acc.change.device)] = 0


def _owned_range(N: int, ctx: Context):
    return N * ctx.rank // ctx.world, N * (ctx.rank + 1) // ctx.world


# ---------------------------------------------------------------------------------- "steps"
def _run_steps(ctx: Context, pb, acc: Accumulator, bar) -> None:
    """data="all", update credit, step-local rule: the step range of this rank (credit.py's
    loop over that range; the regularisation recursion rebuilt up to its start)."""
    a, b = _owned_range(pb.N, ctx)
    update_credit(pb, acc, bar, steps=range(a, b))
    owned = torch.zeros(pb.N, dtype=torch.bool)
    owned[a:b] = True
    _keep_counters(acc, owned)


# ---------------------------------------------------------------------------------- "rows"
def share_row_chunks(M: int, K: int, sample_chunk: int, output_chunk: int, world: int) -> list:
    """The plan's (samples, outputs) row chunks, re-cut until there are at least ``world`` of them
    where the rows allow (smaller sample chunks first, then output chunks)."""
    sc, oc = sample_chunk, output_chunk
    chunks = list(row_chunks(M, K, sc, oc))
    if len(chunks) < world:
        sc = max(1, min(sc, math.ceil(M / world)))
        chunks = list(row_chunks(M, K, sc, oc))
    if len(chunks) < world:
        per = math.ceil(world / len(chunks))
        oc = max(1, min(oc, math.ceil(oc / per)))
        chunks = list(row_chunks(M, K, sc, oc))
    return chunks


def _run_rows(ctx: Context, pb, acc: Accumulator, bar) -> None:
    chunks = share_row_chunks(pb.M, pb.K, pb.plan.sample_chunk, pb.plan.output_chunk, ctx.world)
    mine = chunks[ctx.rank::ctx.world]
    if pb.credit == "gradient":
        _rows_gradient(ctx, pb, acc, bar, mine)
    else:
        _rows_update(ctx, pb, acc, bar, mine)


def _rows_update(ctx: Context, pb, acc: Accumulator, bar, mine) -> None:
    """Reverse mode, update credit: credit.py's loop over every step on every rank, this rank's
    row chunks; φ_s·Δ_s summed over the ranks before the rule's residual check (disjoint rows:
    exact, the same on every rank); rank 0 runs the identity check and keeps the counters."""
    update_credit(pb, acc, bar, chunks=mine, reduce_jd=ctx.sum_, check_identity=ctx.rank == 0)
    _keep_counters(acc, torch.full((pb.N,), ctx.rank == 0))


def _rows_gradient(ctx: Context, pb, acc: Accumulator, bar, mine) -> None:
    """Gradient credit: credit.py's loop over this rank's row chunks; rank 0 (which holds chunk 0)
    runs the identity check and keeps the node search's counters, every rank its rows' count."""
    gradient_credit(pb, acc, bar, chunks=mine, check_identity=ctx.rank == 0)
    if ctx.rank != 0:       # node search, forward passes and the step change: rank 0's
        rows = sum(len(torch.arange(pb.M)[idx]) * len(range(pb.K)[ks]) for idx, ks in mine)
        nodes = acc.ev_nodes.clone()
        for t in (acc.ev_nodes, acc.ev_jvp, acc.ev_fwd, acc.ev_cap):
            t.zero_()
        acc.change.zero_()
        acc.ev_jvp += nodes * rows          # Jacobian rows: num_nodes[s] per row of its chunks


# ---------------------------------------------------------------------------------- "partitions"
def _run_partitions(ctx: Context, pb, acc: Accumulator, bar) -> None:
    """Gradient credit when the batch gradients dominate: credit.py's loop on every rank over
    every row chunk of the plan (the same φ rows and backward recursion as one process), the
    batch gradients and contributions of the partitions p ≡ rank (mod W) only; the
    regularisation on rank 0; Σ_p G_s[p] summed over ranks for rank 0's step identity."""
    me, W = ctx.rank, ctx.world
    owned = torch.zeros(pb.P, dtype=torch.bool)
    owned[me::W] = True
    part_ids = pb.part.ids.cpu()
    gradient_credit(pb, acc, bar, check_identity=me == 0,
                    own_batch=lambda rec: _own_batch(rec, part_ids, owned),
                    reduce_batch_gradient=ctx.sum_, book_reg=me == 0)
    if me != 0:             # the rows, the nodes, the residuals: the same on every rank
        _keep_counters(acc, torch.zeros(pb.N, dtype=torch.bool))


# ---------------------------------------------------------------------------------- "tangents"
def _own_batch(rec, part_ids: torch.Tensor, owned: torch.Tensor):
    """The step record restricted to the batch samples whose partition this rank owns."""
    keep = owned[part_ids[rec.batch_indices]]
    if bool(keep.all()):
        return rec
    return dataclasses.replace(rec, batch_indices=rec.batch_indices[keep],
                               batch_weights=rec.batch_weights[keep])


def _run_tangents(ctx: Context, pb, acc: Accumulator, bar) -> None:
    """Forward mode, update credit: every step on every rank, this rank's tangents."""
    traj, rule, P, D, G = pb.traj, pb.traj.rule, pb.P, pb.D, pb.G
    opts = dict(dtype=pb.dtype, device=pb.device)
    W, me = ctx.world, ctx.rank
    reg = RegRecursion(D, **opts)
    if pb.per_sample_data:
        own_parts = torch.arange(me, P, W)
        owned = torch.zeros(P, dtype=torch.bool)
        owned[own_parts] = True
        local_of = torch.full((P,), -1, dtype=torch.int64)
        local_of[own_parts] = torch.arange(len(own_parts))
        part_ids = pb.part.ids.cpu()
        local_ids = local_of[part_ids]              # sample -> row of this rank's moments
        moments = MomentRecursion(len(own_parts), D, **opts)
        Phi = torch.empty(len(own_parts), D, **opts)
    th_next = traj.theta(0, **opts)
    for s in range(pb.N):
        th = th_next
        th_next = traj.theta(s + 1, **opts)
        delta = th_next - th
        if traj.checkpoint_every != 1:
            r = subsampled_reg(traj, s, reg, **opts)
        else:
            rec = traj.step(s)
            c = rule.coefficients(rec, **opts)
            r = reg.step_with(c, th)
        # tangents: (vector, group or -1, [(g, p, sign) of res] , adds to φ·Δ)
        if pb.per_sample_data:
            bg = BatchGradients(pb.fm, th, pb.train, pb.loss_fn,
                                _own_batch(rec, part_ids, owned), local_ids)
            g_sum = ctx.sum_(stream_moments(bg, moments, c, pb.plan.train_budget))  # all ranks
            release_freed_memory(th.device)
            if me == 0:
                acc.identity.step(s, c, rec, th, delta, th_next, g_sum)
            moments.phi(c, out=Phi)
            vecs = [(Phi[i], g, [(g, int(p), 1.0)], False)
                    for g in range(G) for i, p in enumerate(own_parts.tolist())]
            shared = [(r, g, [(g, P, 1.0)], False) for g in range(G)]
        else:
            vecs, shared = [], []
        nodes = acc.nodes(s, th, delta, deferred=True)
        while nodes is not None:
            jd_given = acc.node_jd
            if pb.per_sample_data:   # own partitions' tangents; r|g and Δ round robin
                extra = shared + ([(delta, -1, [], True)] if jd_given is None else [])
                tangents = vecs + extra[me::W]
            else:                    # B = [−Δ − r; r]: the tangents r|g, Δ|g of group g ≡ rank
                tangents = []
                for g in range(me, G, W):
                    tangents.append((r, g, [(g, 0, -1.0), (g, 1, 1.0)], False))
                    if jd_given is None or G > 1:      # −φ·Δ|g into Φ's row, φ·Δ = Σ_g φ·Δ|g
                        tangents.append((delta, g, [(g, 0, -1.0)], jd_given is None))
            out, jd_part = _share_forward(pb, th, delta, nodes, tangents)
            if jd_given is not None:
                jd = jd_given
                if not pb.per_sample_data and G == 1 and me == 0:
                    out[0, 0] -= jd                # Φ = −Δ − r: −φ·Δ from the rule's φ·Δ
            else:
                jd = ctx.sum_(jd_part)
            acc.ev_jvp[s] += nodes.num_nodes * (G * (P + 1) + 1)
            nodes = acc.refine(s, jd)
        acc.add_update_step(s, out)
        acc.certify(s, jd)
        bar.update(1)
    _keep_counters(acc, torch.full((pb.N,), me == 0))
    if me != 0:
        acc.residual.zero_()
        acc.change.zero_()


def _share_forward(pb, theta_s, delta, nodes, tangents):
    """This rank's tangents of one step: ([G, P+1, M, K] partial contributions φ_s·B[p]|g, the
    partial φ_s·Δ_s [M, K]); tangents are (vector [D], group or −1, [(g, p, sign)], adds to φ·Δ),
    pushed ``tangent_chunk`` at a time as contraction.forward_step does."""
    G, P1, M, K = pb.G, pb.P + 1, pb.M, pb.K
    opts = dict(dtype=theta_s.dtype, device=theta_s.device)
    res = torch.zeros(G, P1, M, K, **opts)
    jd = torch.zeros(M, K, **opts)
    ids = group_ids(pb.groups, theta_s.device)
    chunk, evals = pb.plan.tangent_chunk, pb.plan.eval_chunk
    if evals and not nodes.per_sample:
        q = int((nodes.w != 0).sum())
        chunk = min(chunk, max(TANGENTS_PER_CALL, evals // max(2 * q, 1)))
    for a in range(0, len(tangents), chunk):
        part = tangents[a:a + chunk]
        V = torch.empty(len(part), theta_s.shape[0], **opts)
        for i, (v, g, _, _) in enumerate(part):
            group_tangent(V[i], v, pb.groups, g, ids)
        out = forward_contract(pb.tf, theta_s, delta, nodes, V,
                               max_evals=max(chunk, evals or 0))               # [T_c, M, K]
        for i, (_, _, targets, to_jd) in enumerate(part):
            for g, p, sign in targets:
                if sign > 0:
                    res[g, p] += out[i]
                else:
                    res[g, p] -= out[i]
            if to_jd:
                jd += out[i]
    return res, jd
