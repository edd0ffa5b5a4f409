"""Chebyshev interpolation of switching functions on a piece [a, b] and the roots of the
interpolants (the kink search's step 2, :mod:`.search`).

A switching function z(t) without a kink upstream of it in [a, b] is smooth there (analytic for
the usual layers), so its interpolant at n + 1 Chebyshev–Lobatto points converges geometrically;
the size of the last coefficients says how far it is from z. Once it is below the tolerance, the
roots of z are those of the interpolant, found without evaluating the model again. Point sets are
nested (the points of n are every other point of 2n), so raising n reuses every value.
Everything here works on batches of interpolants, float64 or the model's dtype.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Tuple

import torch


@lru_cache(maxsize=None)
def _lobatto(n: int) -> torch.Tensor:
    return torch.cos(math.pi * torch.arange(n + 1, dtype=torch.float64) / n)


@lru_cache(maxsize=None)
def _dct1(n: int) -> torch.Tensor:
    """C [n+1, n+1]: coefficients c = C @ values at the Lobatto points x_k = cos(πk/n)."""
    k = torch.arange(n + 1, dtype=torch.float64)
    C = torch.cos(math.pi * torch.outer(k, k) / n) * (2.0 / n)
    C[:, 0] /= 2
    C[:, -1] /= 2
    C[0] /= 2
    C[-1] /= 2
    return C


def lobatto(n: int, dtype=torch.float64) -> torch.Tensor:
    """The n + 1 Chebyshev–Lobatto points cos(πk/n) on [−1, 1] (descending)."""
    return _lobatto(n).to(dtype)


def points(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """t [P, n+1] of the Lobatto points on each piece [a_p, b_p] (x = −1 ↔ a, x = 1 ↔ b)."""
    x = _lobatto(n).to(a.dtype)
    return a[:, None] + (b - a)[:, None] * (x[None] + 1) / 2


def coefficients(V: torch.Tensor) -> torch.Tensor:
    """Chebyshev coefficients from values at the Lobatto points: V [P, n+1, F] -> [P, n+1, F]."""
    n = V.shape[1] - 1
    return torch.einsum("jk,pkf->pjf", _dct1(n).to(V.dtype), V)


def _tmatrix(x: torch.Tensor, n: int) -> torch.Tensor:
    """T_j(x) for j = 0..n: [len(x), n+1], as cos(j·arccos x) on [−1, 1] (one batched op instead
    of n; the error, about j·eps, is that of the three-term recurrence)."""
    theta = torch.arccos(x.clamp(-1.0, 1.0))
    return torch.cos(theta[..., None] * torch.arange(n + 1, dtype=x.dtype, device=x.device))


def derivative(c: torch.Tensor) -> torch.Tensor:
    """Coefficients of dp/dx from those of p along the last dim ([..., n+1] -> [..., n+1])."""
    n = c.shape[-1] - 1
    d = torch.zeros_like(c)
    if n == 0:
        return d
    d[..., n - 1] = 2 * n * c[..., n]
    for k in range(n - 1, 0, -1):
        nxt = d[..., k + 1] if k + 1 <= n else 0
        d[..., k - 1] = nxt + 2 * k * c[..., k]
    d[..., 0] = d[..., 0] / 2
    return d


def evaluate(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """p(x) for coefficient rows c [B, n+1] at points x [B] (Clenshaw)."""
    n = c.shape[-1] - 1
    b1 = torch.zeros_like(x)
    b2 = torch.zeros_like(x)
    for k in range(n, 0, -1):
        b1, b2 = c[:, k] + 2 * x * b1 - b2, b1
    return c[:, 0] + x * b1 - b2


def tail(c: torch.Tensor) -> torch.Tensor:
    """Size of the last two coefficients (along dim −2 of [P, n+1, F]): the interpolation error
    estimate of a converged series."""
    return c[:, -1].abs() + c[:, -2].abs()


def may_have_root(c: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """False where |c_0| − Σ_{j≥1} |c_j| > margin: the series cannot reach zero on [−1, 1]."""
    return c[..., 0].abs() - c[..., 1:].abs().sum(-1) <= margin


def hermite_extremum(z0, z1, m0, m1):
    """Extremum of the cubic Hermite fit p(0)=z0, p(1)=z1, p'(0)=m0, p'(1)=m1 (m = h·dz/dt) that
    reaches furthest towards the side opposite to ``ref`` = sign(z0) (sign(m0) where z0 = 0).
    Returns (τ ∈ (0,1), ref·p(τ), exists)."""
    a = 2 * (z0 - z1) + m0 + m1
    b = 3 * (z1 - z0) - 2 * m0 - m1
    A, B, C = 3 * a, 2 * b, m0  # p'(τ) = Aτ² + Bτ + C
    disc = B * B - 4 * A * C
    sq = torch.sqrt(torch.clamp(disc, min=0))
    # stable roots (no cancellation when A is tiny): q = −(B + sign(B)·√disc)/2, q/A and C/q
    one = torch.ones_like(A)
    q = -0.5 * (B + torch.where(B >= 0, sq, -sq))
    r1 = q / torch.where(A == 0, one, A)
    r1 = torch.where(A == 0, torch.full_like(A, float("nan")), r1)
    r2 = C / torch.where(q == 0, one, q)
    r2 = torch.where(q == 0, torch.full_like(A, float("nan")), r2)
    ref = torch.where(z0 != 0, torch.sign(z0), torch.sign(m0))
    tau = torch.full_like(z0, 0.5)
    low = torch.full_like(z0, float("inf"))
    exists = torch.zeros_like(z0, dtype=torch.bool)
    for r in (r1, r2):
        ok = (disc >= 0) & (r > 0) & (r < 1) & torch.isfinite(r)
        p = ref * (((a * r + b) * r + m0) * r + z0)
        better = ok & (p < low)
        tau = torch.where(better, r, tau)
        low = torch.where(better, p, low)
        exists = exists | ok
    return tau, low, exists


def _eval2(c: torch.Tensor, dc: torch.Tensor, x: torch.Tensor):
    """(p(x), p'(x)) for coefficient rows c, dc [B, n+1] at x [B]."""
    T = _tmatrix(x, c.shape[-1] - 1)
    return (T * c).sum(-1), (T * dc).sum(-1)


def roots(c: torch.Tensor, grid: int = 0, iters: int = 60) -> Tuple[torch.Tensor, torch.Tensor,
                                                                     torch.Tensor]:
    """All sign changes of the interpolants c [F, n+1] inside (−1, 1).

    Series that cannot reach zero (|c_0| > Σ_{j≥1} |c_j|) are skipped. A fine grid of ``grid``
    (default 4n) Chebyshev cells brackets the sign changes of the rest; cells whose cubic Hermite
    fit (values and derivatives at both ends) dips through zero are split at the dip. Each bracket
    is solved by safeguarded Newton on the series. A zero value counts as positive, so a touch
    without crossing is no root. Returns (function index [R], x [R], direction [R]: +1 where the
    function goes from negative to positive along increasing x).
    """
    F_, n1 = c.shape
    n = n1 - 1
    e = torch.zeros(0, dtype=torch.int64)
    if F_ == 0 or n == 0:
        return e, torch.zeros(0, dtype=c.dtype), torch.zeros(0, dtype=c.dtype)
    live = torch.nonzero(c[:, 0].abs() <= c[:, 1:].abs().sum(-1)).flatten()
    if len(live) == 0:
        return e, torch.zeros(0, dtype=c.dtype), torch.zeros(0, dtype=c.dtype)
    c = c[live]
    G = grid or max(8, 4 * n)
    xg = torch.cos(math.pi * torch.arange(G, -1, -1, dtype=torch.float64) / G).to(c.dtype)
    xg[0], xg[-1] = -1.0, 1.0
    Tg = _tmatrix(xg, n)                                                # [G+1, n+1]
    dc = derivative(c)
    P = Tg @ c.T                                                        # [G+1, F]
    dP = Tg @ dc.T
    pos = P >= 0
    p0, p1 = pos[:-1], pos[1:]
    g, f = torch.nonzero(p0 != p1, as_tuple=True)
    lo, hi, fl = [xg[g]], [xg[g + 1]], [f]
    # dips inside a cell without a sign change: only where the end slopes point towards zero
    # from both sides (p ≥ 0 falling then rising, or p < 0 rising then falling)
    d0, d1 = dP[:-1], dP[1:]
    cand = (p0 == p1) & ((d0 < 0) == p0) & (d0 * d1 < 0)
    gs, fs = torch.nonzero(cand, as_tuple=True)
    if len(gs):
        h = xg[gs + 1] - xg[gs]
        z0, z1 = P[gs, fs], P[gs + 1, fs]
        m0, m1 = h * d0[gs, fs], h * d1[gs, fs]
        tau, low, ok = hermite_extremum(z0, z1, m0, m1)
        sel = ok & (low < 0.1 * torch.maximum(z0.abs(), z1.abs()))
        gs, fs, tau, h = gs[sel], fs[sel], tau[sel], h[sel]
        if len(gs):
            xe = xg[gs] + h * tau
            # the extremum of the Hermite fit is near, not at, the true one: refine it by
            # Newton on p' before testing its sign
            dce, ddce = dc[fs], derivative(dc[fs])
            for _ in range(4):
                d1, d2 = _eval2(dce, ddce, xe)
                nxt = xe - d1 / torch.where(d2 == 0, torch.ones_like(d2), d2)
                inside = (nxt > xg[gs]) & (nxt < xg[gs + 1]) & (d2 != 0)
                xe = torch.where(inside, nxt, xe)
            pe = evaluate(c[fs], xe)
            flip = (pe >= 0) != pos[gs, fs]
            gs, fs, xe = gs[flip], fs[flip], xe[flip]
            lo += [xg[gs], xe]
            hi += [xe, xg[gs + 1]]
            fl += [fs, fs]
    lo, hi, fl = torch.cat(lo), torch.cat(hi), torch.cat(fl)
    if len(fl) == 0:
        return fl, lo, lo
    cf, dcf = c[fl], dc[fl]
    flo, _ = _eval2(cf, dcf, lo)
    fhi, _ = _eval2(cf, dcf, hi)
    plo = flo >= 0
    direction = torch.where(plo, -1.0, 1.0).to(c.dtype)
    # safeguarded Newton from the secant guess
    den = flo - fhi
    x = torch.where(den != 0, lo + (hi - lo) * flo / torch.where(den == 0, torch.ones_like(den),
                                                                   den), 0.5 * (lo + hi))
    x = torch.where((x > lo) & (x < hi), x, 0.5 * (lo + hi))
    eps = torch.finfo(c.dtype).eps
    active = torch.arange(len(fl))
    for _ in range(iters):
        if len(active) == 0:
            break
        xa = x[active]
        pa, da = _eval2(cf[active], dcf[active], xa)
        side = (pa >= 0) == plo[active]
        lo[active] = torch.where(side, xa, lo[active])
        hi[active] = torch.where(side, hi[active], xa)
        step = pa / torch.where(da == 0, torch.ones_like(da), da)
        newton = xa - step
        ok = (da != 0) & (newton > lo[active]) & (newton < hi[active])
        nxt = torch.where(ok, newton, 0.5 * (lo[active] + hi[active]))
        # a Newton step below the rounding of x has converged, even where rounding puts it on
        # the bracket's edge (then the edge, not the bisection point, is the root)
        tiny = (da != 0) & (step.abs() <= 4 * eps)
        done = (pa == 0) | tiny | ((hi[active] - lo[active]) <= 4 * eps)
        x[active] = torch.where(pa == 0, xa, torch.where(
            tiny, torch.minimum(torch.maximum(newton, lo[active]), hi[active]), nxt))
        active = active[~done]
    return live[fl], x, direction
