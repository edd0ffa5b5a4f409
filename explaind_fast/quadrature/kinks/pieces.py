"""Kink-aware nodes: Gauss–Legendre on every smooth piece between breakpoints, and the
forward-only quadrature residual that certifies a rule (docs/design.md §4.1).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch.func import jvp

from ...model import FunctionalModel, ParamLayout
from ...model import inputs as _in
from ..nodes import NodeSet, gauss_legendre
from .search import find_kinks

def _pieces(breaks: torch.Tensor, merge_tol: float) -> torch.Tensor:
    """Piece boundaries 0 = b_0 < … < b_P = 1 from sorted breakpoints (close ones merged)."""
    keep = [0.0]
    for b in breaks.tolist():
        if b - keep[-1] > merge_tol and 1.0 - b > merge_tol:
            keep.append(b)
    keep.append(1.0)
    return torch.tensor(keep, dtype=torch.float64)


#: default analyticity scale of the per-piece node taper (see nodes_from_breakpoints); the
#: measured value on the ReLU transformer is about 0.01 (GL-1 error ≈ ρ², GL-2 ≈ ρ⁴), so 0.1 is
#: conservative by an order of magnitude.
TAPER_RHO = 0.1


def nodes_per_piece(length: torch.Tensor, n: int, rho: Optional[float]) -> torch.Tensor:
    """Gauss–Legendre order m for pieces of the given lengths, int64.

    Error model: m nodes on a piece of length L err ≈ L·(ρL)^{2m} (geometric convergence for an
    integrand analytic in a ρ-scaled neighbourhood), n nodes on [0, 1] err ≈ ρ^{2n}. The smallest m
    with L^{2m+1}ρ^{2m} ≤ ρ^{2n} is m = ⌈(2n ln ρ − ln L) / (2 ln(ρL))⌉, clamped to [1, n].
    ``rho=None`` gives n everywhere.
    """
    if rho is None:
        return torch.full(length.shape, n, dtype=torch.int64)
    L = length.clamp(min=1e-300, max=1.0)
    lr = math.log(rho)
    m = torch.ceil((2 * n * lr - torch.log(L)) / (2 * (lr + torch.log(L))) - 1e-9)
    return m.clamp(1, n).to(torch.int64)


def _piece_rule(edges: torch.Tensor, n: int, rho: Optional[float]):
    L = edges[1:] - edges[:-1]
    orders = nodes_per_piece(L, n, rho)
    ts, ws = [], []
    for m in sorted(set(orders.tolist())):
        tq, wq = gauss_legendre(m)
        sel = orders == m
        ts.append((edges[:-1][sel, None] + L[sel, None] * tq).reshape(-1))
        ws.append((L[sel, None] * wq).reshape(-1))
    t, w = torch.cat(ts), torch.cat(ws)
    order = torch.argsort(t)
    return t[order], w[order]


def nodes_from_breakpoints(breakpoints: Sequence[torch.Tensor], n: int, *, common: bool = False,
                           merge_tol: float = 1e-12, taper: Optional[float] = None) -> NodeSet:
    """Composite Gauss–Legendre rule: n nodes on each piece between consecutive breakpoints.

    Per sample (``common=False``): t, w of shape [M, Q] with Q = the most nodes of any sample;
    samples with fewer are padded with weight-0 nodes at t = 0.5. ``common=True``: one shared rule
    [Q] on the union of all samples' breakpoints (exact for every sample, more nodes each).
    ``taper=ρ``: fewer nodes on short pieces (:func:`nodes_per_piece`), None: n on every piece.
    """
    if n < 1:
        raise ValueError(f"kinks:n needs n ≥ 1 Gauss–Legendre nodes per piece, got {n}")
    if common:
        allb = torch.sort(torch.cat([b.to(torch.float64) for b in breakpoints]))[0] \
            if len(breakpoints) else torch.zeros(0, dtype=torch.float64)
        return NodeSet(*_piece_rule(_pieces(allb, merge_tol), n, taper))
    rules = [_piece_rule(_pieces(b.to(torch.float64), merge_tol), n, taper) for b in breakpoints]
    Q = max((len(r[0]) for r in rules), default=n)
    t = torch.full((len(rules), Q), 0.5, dtype=torch.float64)
    w = torch.zeros((len(rules), Q), dtype=torch.float64)
    for m, (tm, wm) in enumerate(rules):
        t[m, :len(tm)] = tm
        w[m, :len(wm)] = wm
    return NodeSet(t=t, w=w)


def kink_nodes(model: torch.nn.Module, layout: ParamLayout, theta_s: torch.Tensor,
               delta_s: torch.Tensor, test_inputs, n: int, *, activations=None,
               common: bool = False, taper: Optional[float] = None, **search) -> NodeSet:
    """Kink-aware quadrature nodes for step s: Gauss–Legendre-n on each smooth piece per sample.

    Returns NodeSet with t, w float64 [M, Q] (per sample, zero-padded; ``common=True``: shared
    [Q]), n nodes on every piece: exact to rounding for integrands that are polynomials of degree
    ≤ 2n−1 on each piece, geometrically convergent on smooth pieces. ``taper=ρ`` (e.g.
    :data:`TAPER_RHO`) gives short pieces fewer nodes (:func:`nodes_per_piece`): cheaper, but
    only as accurate as its error model (not exact on strongly curved polynomial pieces). ``search`` goes to :func:`find_kinks`
    (grid, tol_t, chunk_elems, warn). Cost and memory: see :func:`find_kinks`.
    """
    kinks = find_kinks(model, layout, theta_s, delta_s, test_inputs, activations=activations,
                       **search)
    return nodes_from_breakpoints(kinks.breakpoints, n, common=common, taper=taper)


def quadrature_residual(model: torch.nn.Module, layout: ParamLayout, theta_s: torch.Tensor,
                        delta_s: torch.Tensor, test_inputs, nodes: NodeSet, *,
                        chunk_elems: int = 1 << 24, model_output="logits"
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Residual of a rule on the path integral, with forward passes only (docs/design.md §4).

    residual = f(θ_s + Δ_s)(x) − f(θ_s)(x) − Σ_q w_q J(θ_s + t_q Δ_s)·Δ_s, per sample and output,
    where J·Δ_s = d/dt f(θ_s + tΔ_s) is one forward-mode pass. ``nodes``: [Q] shared or [M, Q].
    Returns (residual, change) float tensors [M, *out] in θ's dtype; zero-weight padding nodes
    are skipped. Peak memory ≈ chunk_elems floats for the per-row parameter vectors.
    ``test_inputs``: any input pytree batched on dim 0 (a tensor, a tuple of positional tensors,
    a dict of keyword tensors; :mod:`explaind_fast.model.inputs`); ``model_output`` selects the
    output tensor (default "logits": a tensor itself, a ModelOutput's logits, a tuple's first).
    """
    inputs = _in.normalize(test_inputs)
    M = _in.batch_size(inputs, "test_inputs")
    fm = FunctionalModel(model, layout, dtype=theta_s.dtype, output=model_output)
    delta_s = delta_s.to(theta_s.dtype)

    def f(t, xs):
        return fm(theta_s + t * delta_s, xs)

    zero = torch.zeros((), dtype=theta_s.dtype)
    change = f(zero + 1, inputs) - f(zero, inputs)
    t, w = nodes.t, nodes.w
    if t.dim() == 1:
        t, w = t.expand(M, -1), w.expand(M, -1)
    sample, q = torch.nonzero(w != 0, as_tuple=True)

    def one(tt, x):
        return jvp(lambda t1: f(t1, _in.unsqueeze(x))[0], (tt,), (torch.ones_like(tt),))[1]

    step = max(1, chunk_elems // max(1, layout.D))
    integral = torch.zeros_like(change)
    for a in range(0, len(sample), step):
        sm, qq = sample[a:a + step], q[a:a + step]
        dev = theta_s.device
        g = fm.vmap(one, (0, 0))(t[sm, qq].to(dtype=theta_s.dtype, device=dev),
                                 _in.take(inputs, sm))
        wq = w[sm, qq].to(dtype=g.dtype, device=dev).reshape(-1, *([1] * (g.dim() - 1)))
        integral.index_add_(0, sm.to(dev), wq * g)
    return change - integral, change
