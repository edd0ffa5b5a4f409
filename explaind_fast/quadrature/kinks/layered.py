"""Kink search by Chebyshev interpolation, piece by piece (the default method of
:func:`.search.find_kinks`; docs/design.md §4.1).

Each test sample's [0, 1] starts as one piece (or ``cells`` equal cells). A round evaluates the
switching values of every open piece at its Chebyshev–Lobatto points (all open pieces of all
samples in one batched call, rows (sample, t) with shared weights) and interpolates every switching
function there (:mod:`.chebyshev`):

* a function whose interpolant has converged (last coefficients under ``tol`` times the block's
  scale) is smooth on the piece: its roots are the interpolant's (no further model evaluation);
* a function that has not converged and may reach zero is *unresolved*: either under-resolved
  (small tail: the piece is evaluated again at twice the points, reusing every value) or
  downstream of a kink inside the piece (a ReLU after a ReLU, a max-pool after a ReLU: only
  piecewise smooth there). The piece is then split at the roots of its converged functions and
  the sub-pieces are searched again; units downstream of a kink are smooth on each sub-piece.

A piece whose functions are all resolved is final, split at its roots. For a max (max-pool,
max over a dim) the switching functions are the differences of two candidates, and a root is kept
only where the pair is the window's maximum. The search needs no per-kink model evaluation, so its
cost is a few batched passes per round — on a model whose piecewise ops do not feed each other
(one ReLU layer) a single round of 9–33 points per sample.

Unit roots are recorded when no piece had to be split (``Kinks.unit_roots``, used by the
soft-pattern rule of :mod:`.patterns`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from . import chebyshev as ch

#: Chebyshev degrees of the nested point sets of a sample's initial piece (11, 21, 41 points)
DEFAULT_LEVELS = (10, 20, 40)
#: ... and of the sub-pieces a split creates (7, 13, 25, 49 points): shorter pieces, and
#: switching functions of conv / linear / batch-norm layers are polynomials of low degree in t
SUB_LEVELS = (6, 12, 24, 48)
#: an unresolved function whose last coefficients are below this fraction of the block's scale
#: is smooth but under-resolved: its piece gets more points before it is split
SMOOTH_TAIL = 1e-6
#: max-type windows with at most this many candidates use all candidate pairs
PAIRWISE_MAX = 16


@dataclass
class _Piece:
    m: int
    a: float
    b: float
    level: int = 0
    vals: Optional[torch.Tensor] = None      # [n+1, K] at the Lobatto points of the current level
    initial: bool = True
    ladder: Tuple[int, ...] = DEFAULT_LEVELS
    skip: int = 0                            # leading blocks resolved on an ancestor piece


@dataclass
class LayeredResult:
    breakpoints: List[torch.Tensor]
    shared_evals: int = 0
    row_evals: int = 0
    rounds: int = 0
    unconverged: int = 0
    smooth: bool = True
    unit_roots: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = None
    s0: Optional[torch.Tensor] = None
    levels_used: List[int] = field(default_factory=list)


def _far(V: torch.Tensor) -> torch.Tensor:
    """[P, n+1, F] samples of unresolved functions -> [P, F]: the samples keep one sign and stay
    away from zero by more than twice the largest change between neighbouring samples."""
    pos = (V > 0).all(1)
    neg = (V < 0).all(1)
    jump = (V[:, 1:] - V[:, :-1]).abs().amax(1)
    return (pos | neg) & (V.abs().amin(1) > 2 * jump)


def search(path, *, cells: int = 1, tol: Optional[float] = None, levels=DEFAULT_LEVELS,
           max_rounds: int = 40, merge_tol: float = 1e-12, min_piece: float = 1e-10
           ) -> LayeredResult:
    """Breakpoints of every test sample of ``path`` (a :class:`.capture._Path`)."""
    M, K = path.M, path.K
    dtype = path.theta.dtype
    eps = torch.finfo(dtype).eps
    tol = max(1e-11, 64 * eps) if tol is None else tol
    blocks = [(off, b[1], b[3], b[4]) for b, off in zip(path.blocks, path.offsets[:-1])
              if b is not None]
    res = LayeredResult(breakpoints=[])
    found: List[List[float]] = [[] for _ in range(M)]
    unit_roots = []
    open_: List[_Piece] = [_Piece(m, c / cells, (c + 1) / cells, ladder=tuple(levels))
                           for c in range(cells) for m in range(M)]
    for rnd in range(max_rounds):
        if not open_:
            break
        res.rounds = rnd + 1
        # ---- evaluate every open piece at the points of its level it does not have yet
        groups = {}
        for p in open_:
            groups.setdefault((p.ladder, p.level, p.vals is not None, p.skip), []).append(p)
        req_s, req_t, where = [], [], []
        for (ladder, lv, has, _), ps in groups.items():
            n = ladder[lv]
            a = torch.tensor([p.a for p in ps], dtype=torch.float64)
            b = torch.tensor([p.b for p in ps], dtype=torch.float64)
            pts = ch.points(a, b, n)                                   # [P, n+1]
            need = pts[:, 1::2] if has else pts
            req_s.append(torch.tensor([p.m for p in ps]).repeat_interleave(need.shape[1]))
            req_t.append(need.reshape(-1))
            where.append(((ladder, lv, has, ps[0].skip), need.shape[1]))
            per = need.shape[1]
            res.shared_evals += per * len({p.a for p in ps if p.initial})
            res.row_evals += per * sum(not p.initial for p in ps)
        S = torch.cat(req_s)
        Tt = torch.cat(req_t)
        Vall = path.values(S, Tt.to(dtype)).to(dtype) if len(S) else torch.zeros(0, K, dtype=dtype)
        nxt_open: List[_Piece] = []
        pos = 0
        for ((ladder, lv, has, skip), per), (key, ps) in zip(where, groups.items()):
            n = ladder[lv]
            P = len(ps)
            Vn = Vall[pos:pos + P * per].reshape(P, per, K)
            pos += P * per
            if has:
                V = torch.empty(P, n + 1, K, dtype=dtype)
                V[:, 0::2] = torch.stack([p.vals for p in ps])
                V[:, 1::2] = Vn
            else:
                V = Vn
            nxt_open += _analyse(ps, V, n, lv, ladder, blocks, tol, merge_tol, min_piece, found,
                                 unit_roots, res, skip)
        open_ = nxt_open
    res.unconverged += sum(1 for _ in open_)
    if open_:
        res.smooth = False
    res.breakpoints = [torch.sort(torch.tensor(f, dtype=torch.float64))[0] for f in found]
    if isinstance(res.s0, dict):
        s0 = torch.zeros(M, K, dtype=torch.bool)
        for m, v in res.s0.items():
            s0[m] = v
        res.s0 = s0
    if res.smooth and cells == 1:
        if unit_roots:
            res.unit_roots = tuple(torch.cat([u[i] for u in unit_roots]) for i in range(4))
        else:
            e = torch.zeros(0, dtype=torch.int64)
            res.unit_roots = (e, e, torch.zeros(0, dtype=torch.float64),
                              torch.zeros(0, dtype=torch.float64))
    return res


def _analyse(ps, V, n, lv, levels, blocks, tol, merge_tol, min_piece, found, unit_roots, res,
             skip=0):
    """One level group of open pieces: roots, resolution, and the pieces still open after it.
    The first ``skip`` blocks were resolved on the parent piece (every function converged, its
    roots are the parent's split points, i.e. this piece's ends): they are not analysed again."""
    P, _, K = V.shape
    dtype = V.dtype
    tiny = torch.finfo(dtype).tiny
    start = blocks[skip][0] if skip < len(blocks) else K                # first analysed value
    c = ch.coefficients(V[:, :, start:])                                # [P, n+1, K − start]
    tl = ch.tail(c)
    a = torch.tensor([p.a for p in ps], dtype=torch.float64)
    b = torch.tensor([p.b for p in ps], dtype=torch.float64)
    unresolved = torch.zeros(P, dtype=torch.bool)
    worst = torch.zeros(P, dtype=torch.float64)                         # max relative tail
    rp, rt, ru, rd = [], [], [], []                                     # piece, t, unit, dir
    open_block = torch.zeros(P, len(blocks), dtype=torch.bool)
    for bi, (off, kind, size, cand) in enumerate(blocks):
        if bi < skip:
            continue
        width = size * cand
        co = off - start
        Vb, cb, tb = V[:, :, off:off + width], c[:, :, co:co + width], tl[:, co:co + width]
        scale = Vb.abs().amax((1, 2)).clamp_min(tiny)                   # [P]
        tolb = tol * scale
        rel = (tb / scale[:, None]).to(torch.float64)
        if kind == "sign":
            conv = tb <= tolb[:, None]
            maybe = ch.may_have_root(cb.transpose(1, 2), tolb[:, None])
            open_f = (~conv) & ~_far(Vb)
            solve = conv & maybe
            open_block[:, bi] = open_f.any(1)
            unresolved |= open_block[:, bi]
            worst = torch.maximum(worst, torch.where(open_f, rel, torch.zeros_like(rel)).amax(1))
            pi, ui = torch.nonzero(solve, as_tuple=True)
            if len(pi):
                fi, x, d = ch.roots(cb[pi, :, ui])
                rp.append(pi[fi])
                rt.append(a[pi[fi]] + (b - a)[pi[fi]] * (x.to(torch.float64) + 1) / 2)
                ru.append(off + ui[fi])
                rd.append(d.to(torch.float64))
            continue
        # ---- max over candidates: pair differences
        C = Vb.reshape(P, n + 1, size, cand)
        cc = cb.reshape(P, n + 1, size, cand)
        conv_w = (tb.reshape(P, size, cand) <= tolb[:, None, None]).all(-1)     # [P, size]
        if cand > 1:
            top = C.topk(2, dim=-1)
            top_i = top.indices[..., 0]                                  # [P, n+1, size]
            gap = top.values[..., 0] - top.values[..., 1]
            jump = (gap[:, 1:] - gap[:, :-1]).abs().amax(1)
            safe = (top_i == top_i[:, :1]).all(1) & (gap.amin(1) > 2 * jump)
        else:
            safe = torch.ones(P, size, dtype=torch.bool)
        open_w = ~safe & ~conv_w
        open_block[:, bi] = open_w.any(1)
        unresolved |= open_block[:, bi]
        relw = (tb.reshape(P, size, cand) / scale[:, None, None]).amax(-1).to(torch.float64)
        worst = torch.maximum(worst, torch.where(open_w, relw, torch.zeros_like(relw)).amax(1))
        pw, ww = torch.nonzero(~safe & conv_w, as_tuple=True)
        if len(pw) == 0:
            continue
        if cand <= PAIRWISE_MAX:
            i, j = torch.triu_indices(cand, cand, offset=1)
            pw_, ww_ = pw.repeat_interleave(len(i)), ww.repeat_interleave(len(i))
            i_, j_ = i.repeat(len(pw)), j.repeat(len(pw))
        else:   # pairs (candidate on top at some sample point, any other candidate)
            seen = torch.zeros(len(pw), cand, dtype=torch.bool)
            seen.scatter_(1, top_i[pw, :, ww], True)
            r, i_ = torch.nonzero(seen, as_tuple=True)
            pw_, ww_ = pw[r].repeat_interleave(cand), ww[r].repeat_interleave(cand)
            i_ = i_.repeat_interleave(cand)
            j_ = torch.arange(cand).repeat(len(r))
            keep = i_ != j_
            pw_, ww_, i_, j_ = pw_[keep], ww_[keep], i_[keep], j_[keep]
        diff = cc[pw_, :, ww_, i_] - cc[pw_, :, ww_, j_]                # [R, n+1]
        fi, x, _ = ch.roots(diff)
        if len(fi) == 0:
            continue
        pr, wr = pw_[fi], ww_[fi]
        # keep a root only where one of the pair is the window's maximum (a change of argmax)
        cand_c = cc[pr, :, wr, :].permute(0, 2, 1).reshape(-1, n + 1)    # [R·cand, n+1]
        vals = ch.evaluate(cand_c, x.repeat_interleave(cand)).reshape(-1, cand)
        pair = torch.maximum(vals.gather(1, i_[fi, None]), vals.gather(1, j_[fi, None]))[:, 0]
        topv = vals.amax(1)
        keep = pair >= topv - 1e-9 * scale[pr]
        pr, x = pr[keep], x[keep]
        rp.append(pr)
        rt.append(a[pr] + (b - a)[pr] * (x.to(torch.float64) + 1) / 2)
        ru.append(torch.full_like(pr, -1))
        rd.append(torch.zeros(len(pr), dtype=torch.float64))
    if rp:
        rp, rt, ru, rd = torch.cat(rp), torch.cat(rt), torch.cat(ru), torch.cat(rd)
    else:
        rp = ru = torch.zeros(0, dtype=torch.int64)
        rt = rd = torch.zeros(0, dtype=torch.float64)
    order = torch.argsort(rp * 4.0 + rt)
    rp, rt, ru, rd = rp[order], rt[order], ru[order], rd[order]
    bounds = torch.searchsorted(rp, torch.arange(P + 1)).tolist()
    # the per-piece bookkeeping on python floats (one tensor op per piece costs more than the
    # arithmetic; the comparisons are the same float64 ones)
    rt_l, unresolved_l, worst_l = rt.tolist(), unresolved.tolist(), worst.tolist()
    # blocks before the first open one have all their roots among the knots (sub-pieces bisected
    # without knots have none inside): the sub-pieces need not analyse them
    done_l = (open_block.cumsum(1) == 0).sum(1).tolist()
    out: List[_Piece] = []
    for k, p in enumerate(ps):
        lo_, hi_ = bounds[k], bounds[k + 1]
        inner = [t for t in rt_l[lo_:hi_] if t - p.a > merge_tol and p.b - t > merge_tol]
        knots = []
        for t in inner:
            if not knots or t - knots[-1] > merge_tol:
                knots.append(t)
        if not unresolved_l[k]:
            _record(found[p.m], knots, merge_tol)
            if p.initial and lo_ < hi_:
                sel = slice(lo_, hi_)
                keep = (ru[sel] >= 0) & (rt[sel] - p.a > merge_tol) & (p.b - rt[sel] > merge_tol)
                unit_roots.append((torch.full((int(keep.sum()),), p.m, dtype=torch.int64),
                                   ru[sel][keep], rt[sel][keep], rd[sel][keep]))
            if p.initial and p.a == 0.0:
                _initial_signs(res, p, V[k], c[k], blocks, n)
            continue
        raise_ok = lv + 1 < len(levels)
        if raise_ok and (worst_l[k] <= SMOOTH_TAIL or not knots):
            p.level, p.vals = lv + 1, V[k]
            out.append(p)
            continue
        res.smooth = False
        if knots:
            _record(found[p.m], knots, merge_tol)
            edges = [p.a] + knots + [p.b]
        elif p.b - p.a > min_piece:
            edges = [p.a, 0.5 * (p.a + p.b), p.b]
        else:
            res.unconverged += 1
            continue
        for lo, hi in zip(edges[:-1], edges[1:]):
            if hi - lo > min_piece:
                out.append(_Piece(p.m, lo, hi, 0, None, False, SUB_LEVELS, done_l[k]))
    return out


def _record(lst: List[float], knots: List[float], merge_tol: float) -> None:
    for t in knots:
        if all(abs(t - u) > merge_tol for u in lst):
            lst.append(t)


def _initial_signs(res, p, V, c, blocks, n):
    """Sign indicator of every switching function just after t = 0 (x = −1: Lobatto index n)."""
    if res.s0 is None:
        res.s0 = {}
    v0 = V[n]
    d0 = ch.evaluate(ch.derivative(c.T), -torch.ones(c.shape[1], dtype=c.dtype))
    res.s0[p.m] = (v0 > 0) | ((v0 == 0) & (d0 > 0))
