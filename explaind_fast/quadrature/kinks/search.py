"""Kink search, steps 2–4: bracket, polish and verify the breakpoints of each test sample.

:func:`find_kinks` returns a :class:`Kinks` (sorted breakpoints in (0, 1) per sample); the method
is described in :mod:`explaind_fast.quadrature.kinks`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from ...model import ParamLayout
from .capture import _Path
from .chebyshev import hermite_extremum as _hermite_extremum

@dataclass
class Kinks:
    """Breakpoints of the path integrand of one step, per test sample.

    Attributes:
        breakpoints: list of M sorted float64 tensors, the kinks strictly inside (0, 1).
        num_switches: switching units per sample K (max candidates counted individually).
        shared_evals: batched forward-mode passes over all M samples (the bracketing grid).
        row_evals: single-sample forward-mode passes (probes and Newton polishing).
        unseen: piecewise ops the rule cannot see (their kinks are *not* in ``breakpoints``;
            the quadrature residual will show the error they cause).
        unconverged: breakpoints whose Newton/bisection did not reach ``tol_t``.
        unverified: kinks found in the last allowed verification round (their pieces were not
            re-scanned).
        rounds: ("chebyshev") search rounds (batched evaluations of the open pieces).
        smooth: ("chebyshev") every switching function was smooth on all of [0, 1] (no piecewise
            op feeds another within this step): the unit roots below are complete.
        unit_roots: (sample [R], switching unit [R], t [R], direction [R] = +1 where the unit's
            switching function goes from negative to positive) for sign switches, when smooth.
        s0: bool [M, K], switching function > 0 just after t = 0 (when smooth).
    """

    breakpoints: List[torch.Tensor]
    num_switches: int
    shared_evals: int
    row_evals: int
    unseen: List[str] = field(default_factory=list)
    unconverged: int = 0
    unverified: int = 0
    rounds: int = 0
    smooth: bool = False
    unit_roots: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = None
    s0: Optional[torch.Tensor] = None

    @property
    def pieces(self) -> torch.Tensor:
        """Number of smooth pieces per sample, int64 [M]."""
        return torch.tensor([len(b) + 1 for b in self.breakpoints], dtype=torch.int64)


#: max-type ops with at most this many candidates per window use all candidate pairs as switching
#: functions (a superset of the argmax changes, filtered at the root); larger ones use
#: differences to the argmax at the cell start (may miss a maximum that changes hands twice).
PAIRWISE_MAX_CANDIDATES = 16


def _switch_rows(path: _Path, z0, z1):
    """Switching functions of one grid cell [lo, hi] as index rows: z = V[i1] − V[i2] (V[K] = 0).

    Returns [M, R] int64 tensors (i1, i2, window start, window size) and a bool mask of the rows
    worth searching; window size 0 for sign switches. For a max, (window start, size) locate its
    candidates in V, so that a root is kept only where one of the pair is the window's maximum (a
    real change of the argmax). A window whose argmax is the same at lo and hi only needs the
    pairs with that argmax (it can only change hands and back through a dip of one of them).
    """
    M, K = z0.shape
    rows = []
    for b, off in zip(path.blocks, path.offsets[:-1]):
        if b is None:
            continue
        _, kind, _, size, cand = b
        if kind == "sign":
            i1 = off + torch.arange(size).expand(M, size)
            i2 = torch.full_like(i1, K)
            wb, ws = torch.full_like(i1, -1), torch.zeros_like(i1)
            keep = torch.ones_like(i1, dtype=torch.bool)
        else:
            a0 = z0[:, off:off + size * cand].reshape(M, size, cand).argmax(-1, keepdim=True)
            a1 = z1[:, off:off + size * cand].reshape(M, size, cand).argmax(-1, keepdim=True)
            base = off + torch.arange(size)[None, :, None] * cand  # [1, size, 1]
            if cand <= PAIRWISE_MAX_CANDIDATES:
                pi, pj = torch.triu_indices(cand, cand, offset=1)
                i1 = (base + pi).expand(M, size, len(pi)).reshape(M, -1)
                i2 = (base + pj).expand(M, size, len(pj)).reshape(M, -1)
                wb = base.expand(M, size, len(pi)).reshape(M, -1)
                keep = ((a0 != a1) | (pi == a0) | (pj == a0)).reshape(M, -1)
            else:
                i1 = (base + a0).expand(M, size, cand).reshape(M, -1)
                i2 = (base + torch.arange(cand)).expand(M, size, cand).reshape(M, -1)
                wb = base.expand(M, size, cand).reshape(M, -1)
                keep = torch.ones_like(i1, dtype=torch.bool)
            ws = torch.full_like(wb, cand)
        rows.append((i1, i2, wb, ws, keep))
    if not rows:
        e = torch.zeros(M, 0, dtype=torch.int64)
        return e, e, e, e, e.bool()
    return tuple(torch.cat([r[k] for r in rows], 1) for k in range(5))


def _gather(V, i):
    """V[m, i[m, j]] with a trailing zero slot (index K)."""
    Vp = torch.cat([V, torch.zeros(V.shape[0], 1, dtype=V.dtype)], dim=1)
    return Vp.gather(1, i)


def _hermite_root(z0, z1, m0, m1, iters: int = 4):
    """Root τ of the cubic Hermite fit in a sign-change cell (safeguarded Newton from the secant)."""
    a = 2 * (z0 - z1) + m0 + m1
    b = 3 * (z1 - z0) - 2 * m0 - m1
    tau = z0 / (z0 - z1)
    for _ in range(iters):
        p = ((a * tau + b) * tau + m0) * tau + z0
        dp = (3 * a * tau + 2 * b) * tau + m0
        nxt = tau - p / torch.where(dp == 0, torch.ones_like(dp), dp)
        tau = torch.where((dp != 0) & (nxt > 0) & (nxt < 1), nxt, tau)
    return tau


def find_kinks(model: torch.nn.Module, layout: ParamLayout, theta_s: torch.Tensor,
               delta_s: torch.Tensor, test_inputs, *, activations=None,
               grid: Optional[int] = None,
               tol_t: float = 1e-14, max_iter: int = 60, verify: bool = True,
               max_rounds: int = 20, side: float = 1e-11, merge_tol: float = 1e-12,
               chunk_elems: int = 1 << 24, warn: bool = True, method: str = "chebyshev",
               tol: Optional[float] = None) -> Kinks:
    """Breakpoints t ∈ (0, 1) of t ↦ J(θ_s + tΔ_s) for each test sample (see module docstring).

    Args:
        model: the model; evaluated functionally (:class:`explaind_fast.model.FunctionalModel`)
            at the trainable parameters θ_s + tΔ_s (``layout`` order) and its own frozen
            parameters and buffers (cast to θ's dtype; the kink rules of attribute() search
            with the engine's FunctionalModel, the trajectory's recorded buffers included). Put
            it in eval mode (dropout would make the path random).
        layout: flat parameter layout of θ.
        theta_s, delta_s: flat [D] tensors, θ_s and Δ_s = θ_{s+1} − θ_s.
        test_inputs: any input pytree batched on dim 0 (:mod:`explaind_fast.model.inputs`: a
            tensor -> model(x), a tuple -> model(*x), a dict -> model(**x)).
        activations: extra piecewise ops: nn.Module instances or classes (kink where an element of
            the module's first input crosses 0), torch callables (kink at 0 of the first arg),
            or pairs (module_or_callable, switch) with switch(*args) -> tensor(s) whose sign
            changes mark the kinks.
        method: "chebyshev" (default): Chebyshev interpolation of the switching functions piece by
            piece, roots from the interpolants (:mod:`.layered`; a few batched passes per round,
            no per-kink evaluation); "bracket": the shared grid, Hermite dip test, Newton polish
            per kink and verification rounds described in the package docstring.
        tol: ("chebyshev") convergence tolerance of the interpolants, relative to each switching
            block's scale (default max(1e-11, 64·eps)).
        grid: "bracket": cells of the shared bracketing grid (grid + 1 batched forward-mode
            passes); "chebyshev": initial cells per sample (1 is enough: pieces split themselves).
        tol_t: ("bracket") absolute tolerance on each breakpoint.
        verify: re-scan the pieces of every grid cell that holds kinks (needed when piecewise
            ops feed each other, e.g. ReLU after ReLU: a downstream unit's switching function is
            then only piecewise smooth in its cell). Costs two single-sample passes per kink.
        max_rounds: bound on verification rounds (kinks found in the last one count in
            ``Kinks.unverified``). side: offset of the one-sided values inside each piece.
        merge_tol: kinks closer than this are one.
        chunk_elems: bound on rows × (D + K) floats held by one vmapped polishing chunk.
        warn: emit a warning naming piecewise ops the rule cannot see.
    """
    if grid is not None and grid < 1:
        raise ValueError(f"grid must be ≥ 1 cell, got {grid}")
    if method not in ("chebyshev", "bracket"):
        raise ValueError(f"method must be 'chebyshev' or 'bracket', got {method!r}")
    path = _Path(model, layout, theta_s, delta_s, test_inputs, activations, chunk_elems)
    if path.unseen and warn:
        warnings.warn("kink quadrature: the model uses piecewise ops whose breakpoints it cannot "
                      f"find: {', '.join(path.unseen)}; the quadrature residual will show their "
                      "error", stacklevel=2)
    return search_path(path, grid=grid, tol_t=tol_t, max_iter=max_iter, verify=verify,
                       max_rounds=max_rounds, side=side, merge_tol=merge_tol, method=method,
                       tol=tol)


def search_path(path: _Path, *, grid: Optional[int] = None, tol_t: float = 1e-14,
                max_iter: int = 60, verify: bool = True, max_rounds: int = 20,
                side: float = 1e-11, merge_tol: float = 1e-12, method: str = "chebyshev",
                tol: Optional[float] = None) -> Kinks:
    """:func:`find_kinks` on a prepared path evaluator (same options)."""
    if path.K == 0:
        e = torch.zeros(0, dtype=torch.int64)
        return Kinks(breakpoints=[torch.zeros(0, dtype=torch.float64) for _ in range(path.M)],
                     num_switches=0, shared_evals=0, row_evals=0, unseen=list(path.unseen),
                     smooth=True, unit_roots=(e, e, torch.zeros(0, dtype=torch.float64),
                                              torch.zeros(0, dtype=torch.float64)),
                     s0=torch.zeros(path.M, 0, dtype=torch.bool))
    if method == "chebyshev":
        return _chebyshev(path, grid or 1, tol, max(max_rounds, 40), merge_tol)
    grid = grid or 4
    M, K = path.M, path.K
    dtype = path.theta.dtype
    found: List[List[torch.Tensor]] = [[] for _ in range(M)]
    kinks = Kinks(breakpoints=[], num_switches=K, shared_evals=0, row_evals=0,
                  unseen=list(path.unseen))
    if K == 0:
        kinks.breakpoints = [torch.zeros(0, dtype=torch.float64) for _ in range(M)]
        return kinks

    ts = torch.linspace(0, 1, grid + 1, dtype=torch.float64)
    Z, DZ = zip(*(path.shared(float(t)) for t in ts))
    cells = torch.arange(grid).repeat_interleave(M)          # interval rows: cell-major
    sample = torch.arange(M).repeat(grid)
    hits, brackets, probes = _scan(
        path, sample, ts[cells], ts[cells + 1], torch.cat(Z[:-1]), torch.cat(DZ[:-1]),
        torch.cat(Z[1:]), torch.cat(DZ[1:]), interior_lo=cells > 0)
    roots, bad = _resolve(path, brackets, probes, tol_t, max_iter, dtype)
    kinks.unconverged += bad
    for m, t in hits + roots:
        found[m].append(t)
    if verify:
        # a switching function downstream of a kink is only piecewise smooth in its grid cell, so
        # the Hermite dip test is not trusted there: re-scan every piece between the knots of
        # each cell that holds kinks, with one-sided values just inside the piece, until no piece
        # reveals a new kink. Cells without kinks are smooth for every unit and need no second look.
        cache: Dict[Tuple[int, float], Tuple[torch.Tensor, torch.Tensor]] = {}
        new = roots + hits
        for _ in range(max_rounds):
            if not new:
                break
            todo = sorted({(m, min(int(t * grid), grid - 1)) for m, t in new})
            pieces = []
            for m, c in todo:
                lo_c, hi_c = float(ts[c]), float(ts[c + 1])
                inner = sorted(t for t in found[m] if lo_c < t < hi_c)
                knots = [lo_c] + inner + [hi_c]
                for a_, b_ in zip(knots[:-1], knots[1:]):
                    if b_ - a_ > 4 * side:
                        pieces.append((m, c, a_, b_, a_ != lo_c, b_ != hi_c))
            need = sorted({(m, a_ + side) for m, _, a_, _, sa, _ in pieces if sa} |
                          {(m, b_ - side) for m, _, _, b_, _, sb in pieces if sb})
            need = [key for key in need if key not in cache]
            if need:
                V, DV = path.rows(torch.tensor([k[0] for k in need]),
                                  torch.tensor([k[1] for k in need], dtype=dtype))
                for r, key in enumerate(need):
                    cache[key] = (V[r], DV[r])
            if not pieces:
                break

            def end(m, c, t, shift, inside):
                if inside:
                    return (t + shift,) + cache[(m, t + shift)]
                return (t, Z[round(t * grid)][m], DZ[round(t * grid)][m])
            L = [end(m, c, a_, side, sa) for m, c, a_, _, sa, _ in pieces]
            R = [end(m, c, b_, -side, sb) for m, c, _, b_, _, sb in pieces]
            smp = torch.tensor([p[0] for p in pieces])
            hits2, brackets2, probes2 = _scan(
                path, smp, torch.tensor([x[0] for x in L], dtype=torch.float64),
                torch.tensor([x[0] for x in R], dtype=torch.float64),
                torch.stack([x[1] for x in L]), torch.stack([x[2] for x in L]),
                torch.stack([x[1] for x in R]), torch.stack([x[2] for x in R]),
                interior_lo=torch.tensor([p[4] or p[1] > 0 for p in pieces]))
            roots2, bad = _resolve(path, brackets2, probes2, tol_t, max_iter, dtype)
            kinks.unconverged += bad
            new = []
            for m, t in hits2 + roots2:
                if all(abs(t - u) > merge_tol for u in found[m]):
                    found[m].append(t)
                    new.append((m, t))
        else:
            if new:
                kinks.unverified = len(new)
    kinks.breakpoints = [torch.sort(torch.tensor(f, dtype=torch.float64))[0] for f in found]
    kinks.shared_evals, kinks.row_evals = path.shared_evals, path.row_evals
    return kinks


def _chebyshev(path, cells, tol, max_rounds, merge_tol) -> Kinks:
    from .layered import search
    r = search(path, cells=cells, tol=tol, max_rounds=max_rounds, merge_tol=merge_tol)
    return Kinks(breakpoints=r.breakpoints, num_switches=path.K, shared_evals=r.shared_evals,
                 row_evals=r.row_evals, unseen=list(path.unseen), unconverged=r.unconverged,
                 rounds=r.rounds, smooth=r.smooth, unit_roots=r.unit_roots, s0=r.s0)


def _scan(path, sample, lo, hi, Vlo, DVlo, Vhi, DVhi, interior_lo):
    """Find what crosses zero inside intervals (sample[i], lo[i], hi[i]) from the values and
    t-derivatives [I, K] of all switching functions at both ends.

    Returns (hits, brackets, probes): hits are (sample, t) of exact zeros with a sign change at
    an interval start marked ``interior_lo``; brackets are sign changes to polish; probes are
    Hermite-flagged dips (or crossings right after an exact zero) to evaluate once.
    """
    h = (hi - lo).to(Vlo.dtype)[:, None]
    i1, i2, wb, ws, keep = _switch_rows(path, Vlo, Vhi)
    z0 = _gather(Vlo, i1) - _gather(Vlo, i2)
    z1 = _gather(Vhi, i1) - _gather(Vhi, i2)
    m0 = h * (_gather(DVlo, i1) - _gather(DVlo, i2))
    m1 = h * (_gather(DVhi, i1) - _gather(DVhi, i2))
    hits = []
    at_knot = keep & interior_lo[:, None] & (z0 == 0) & (m0 != 0)
    for r in torch.nonzero(at_knot.any(1)).flatten().tolist():
        hits.append((int(sample[r]), float(lo[r])))
    cross = keep & (z0 * z1 < 0)
    # the Hermite fit stays within (|m0 − Δz| + |m1 − Δz|)/4 of the chord, Δz = z1 − z0: only rows
    # that this bound lets come near zero can dip, so the cubic is solved for those alone
    dz = z1 - z0
    slack = ((m0 - dz).abs() + (m1 - dz).abs()) / 4
    scale = torch.maximum(z0.abs(), z1.abs())
    maybe = keep & ~cross & (torch.minimum(z0.abs(), z1.abs()) - slack < 0.1 * scale)
    r, k = torch.nonzero(maybe, as_tuple=True)
    a0, a1, b0, b1 = z0[r, k], z1[r, k], m0[r, k], m1[r, k]
    tau_d, low, has_ext = _hermite_extremum(a0, a1, b0, b1)
    dip = ((a0 * a1 > 0) & has_ext & (low < 0.1 * scale[r, k])) | ((a0 == 0) & (b0 * a1 < 0))
    r, k, tau_d = r[dip], k[dip], tau_d[dip]
    span = (hi - lo)[r]
    probes = (sample[r], i1[r, k], i2[r, k], wb[r, k], ws[r, k], lo[r], hi[r], z0[r, k],
              z1[r, k], lo[r] + span * tau_d.to(torch.float64))
    r, k = torch.nonzero(cross, as_tuple=True)
    tau_r = _hermite_root(z0[r, k], z1[r, k], m0[r, k], m1[r, k])
    span = (hi - lo)[r]
    brackets = [(sample[r], i1[r, k], i2[r, k], wb[r, k], ws[r, k], lo[r], hi[r], z0[r, k],
                 lo[r] + span * tau_r.to(torch.float64))]
    return hits, brackets, probes


def _resolve(path, brackets, probes, tol_t, max_iter, dtype):
    """Evaluate the probes, then polish all brackets. Returns ([(sample, t)], unconverged)."""
    hits = []
    dm, pi1, pi2, pwb, pws, lo, hi, z0p, z1p, tp = probes
    if len(dm):
        V, DV = path.rows(dm, tp.to(dtype))
        zp = (_gather(V, pi1[:, None]) - _gather(V, pi2[:, None]))[:, 0].to(z0p.dtype)
        dzp = (_gather(DV, pi1[:, None]) - _gather(DV, pi2[:, None]))[:, 0]
        crossing_here = (zp == 0) & (dzp != 0)  # zp = 0 with zero slope is a touch: no kink
        hits += [(m, t) for m, t in zip(dm[crossing_here].tolist(), tp[crossing_here].tolist())]
        for a_t, b_t, za, zb in ((lo, tp, z0p, zp), (tp, hi, zp, z1p)):
            f = torch.nonzero(za * zb < 0).flatten()
            guess = a_t[f] + (b_t[f] - a_t[f]) * (za[f] / (za[f] - zb[f])).to(torch.float64)
            brackets.append((dm[f], pi1[f], pi2[f], pwb[f], pws[f], a_t[f], b_t[f], za[f], guess))
    s, i1, i2, wb, ws, lo, hi, zlo, t = (torch.cat(parts) for parts in zip(*brackets))
    if len(s) == 0:
        return hits, 0
    t = torch.where((t > lo) & (t < hi), t, 0.5 * (lo + hi))
    final, done, real = _polish(path, s, i1, i2, wb, ws, lo.clone(), hi.clone(), torch.sign(zlo),
                                t, tol_t, max_iter, dtype)
    return hits + list(zip(s[real].tolist(), final[real].tolist())), int((~done).sum())


def _polish(path, s, i1, i2, wb, ws, lo, hi, slo, t, tol_t, max_iter, dtype):
    """Safeguarded Newton on z(t) = V[i1] − V[i2] inside [lo, hi] (z has sign slo at lo).

    Returns (breakpoint, converged, real): ``real`` is False for a crossing of two candidates of
    a max neither of which is the window's maximum there (no change of the argmax, no kink).
    """
    final = t.clone()
    done = torch.zeros(len(s), dtype=torch.bool)
    real = torch.ones(len(s), dtype=torch.bool)
    cmax = int(ws.max()) if len(ws) else 0
    active = torch.arange(len(s))
    for _ in range(max_iter):
        if len(active) == 0:
            break
        V, DV = path.rows(s[active], t[active].to(dtype))
        ia, ib = i1[active, None], i2[active, None]
        z = (_gather(V, ia) - _gather(V, ib))[:, 0].to(torch.float64)
        dz = (_gather(DV, ia) - _gather(DV, ib))[:, 0].to(torch.float64)
        ta = t[active]
        same = torch.sign(z) == slo[active]
        lo[active] = torch.where(same & (z != 0), ta, lo[active])
        hi[active] = torch.where(~same & (z != 0), ta, hi[active])
        step = z / torch.where(dz == 0, torch.ones_like(dz), dz)
        newton = ta - step
        ok = (dz != 0) & (newton > lo[active]) & (newton < hi[active])
        nxt = torch.where(ok, newton, 0.5 * (lo[active] + hi[active]))
        # a Newton step below tol_t has converged even if rounding puts it on the bracket's edge
        tiny = (dz != 0) & (step.abs() <= tol_t)
        conv = (z == 0) | tiny | ((hi[active] - lo[active]) <= tol_t)
        final[active] = torch.where(z == 0, ta, torch.where(
            tiny, torch.minimum(torch.maximum(newton, lo[active]), hi[active]), nxt))
        done[active] = conv
        if cmax:  # at convergence, is one of the pair the maximum of its window?
            win = ws[active] > 0
            idx = wb[active, None] + torch.arange(cmax)
            valid = win[:, None] & (torch.arange(cmax) < ws[active, None])
            C = _gather(V, torch.where(valid, idx, V.shape[1])).to(torch.float64)
            top = torch.where(valid, C, torch.full_like(C, -float("inf"))).amax(1)
            pair = torch.maximum(_gather(V, ia), _gather(V, ib))[:, 0].to(torch.float64)
            tie = 1e-10 * torch.clamp(top.abs(), min=1.0)
            real[active] = torch.where(win & conv, pair >= top - tie, real[active])
        t[active] = nxt
        active = active[~conv]
    return final, done, real
