"""Soft activation patterns: a ReLU model integrated exactly at shared nodes (docs/design.md §4.1).

Take a model whose piecewise ops (relu, leaky_relu, abs) do not feed one another and whose output
is affine in their outputs given everything upstream — a transformer or MLP with one ReLU layer
followed by linear maps, residual additions and the unembedding. Write each op through its switch
s_j(t) = 1[z_j(t) > 0] (relu(z) = s·z). Then the output, and its JVP along any tangent v, are affine
in the switches:

    g(t) = J(θ(t))·v = a(t) + Σ_j s_j(t) b_j(t),

with a and every b_j smooth in t (they are the model with the switch held at 0 or 1). Interpolate
a and b_j at the Gauss–Legendre nodes t_q of [0, 1] (Lagrange basis ℓ_q) and integrate:

    ∫_0^1 g dt = Σ_q w_q a(t_q) + Σ_j Σ_q b_j(t_q) ∫_{s_j = 1} ℓ_q dt = Σ_q w_q g(t_q; μ_q)

where g(t; μ) is the model with switch j replaced by the weight μ_{q,j} = (1/w_q) ∫_{s_j=1} ℓ_q dt
(affinity in the switches moves the sum inside). So every test sample is evaluated at the same Q
nodes — the price of a fixed rule, batched GEMMs with shared weights — and the kinks only change
the per-(node, sample, unit) weights μ, computed from the units' roots (the kink search gives them
without further model evaluations when no piecewise op feeds another, :mod:`.layered`). The result
is exact up to the interpolation error of the smooth parts a, b_j, which converges geometrically
in Q; the rule checks it in the Δ direction, where ∫ g = h(f(θ_{s+1})) − h(f(θ_s)) exactly, and
raises Q until the step's relative residual is under its tolerance.

Whether the output is affine in the switches is tested numerically once per model
(:func:`affine_in_patterns`: g at the mean of two random soft patterns against the mean of g); a
downstream nonlinearity or a piecewise op feeding another fails it and the rule falls back to
Gauss–Legendre nodes on every smooth piece per sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..nodes import gauss_legendre
from ..pathmode import SOFT_OPS


@dataclass
class Patterns:
    """Soft activation patterns of a shared rule: ``mu`` [Q, M, U] (U = switching units of all
    blocks, in call order), ``blocks`` = [(offset, size, batch dim)] per piecewise call."""

    mu: torch.Tensor
    blocks: List[Tuple[int, int, int]]

    @staticmethod
    def is_piecewise(func, args) -> bool:
        return func in SOFT_OPS and any(isinstance(a, torch.Tensor) and a.is_floating_point()
                                        for a in args[:2])


def pattern_blocks(path) -> Optional[List[Tuple[int, int, int]]]:
    """[(offset, size, batch dim)] of a :class:`.capture._Path` whose every switching block can take a
    soft pattern (relu / leaky_relu / abs, batched over the samples, no user-declared switches),
    else None."""
    if path.unseen or path.modules or path.funcs:
        return None
    out = []
    for b, off, f in zip(path.blocks, path.offsets[:-1], path.block_funcs):
        if b is None or f not in SOFT_OPS or b[1] != "sign":
            return None
        out.append((off, b[3], b[2]))
    return out


@lru_cache(maxsize=None)
def _gl_lagrange(Q: int):
    """GL nodes x_q on [−1, 1], weights w̃_q, and P_k(x_q) for k < Q (float64 numpy)."""
    x, w = np.polynomial.legendre.leggauss(Q)
    P = np.polynomial.legendre.legvander(x, Q - 1)                     # [Q, Q]: P_k(x_q)
    return x, w, P


def lagrange_cumulative(tau: torch.Tensor, Q: int) -> torch.Tensor:
    """C[r, q] = ∫_0^{τ_r} ℓ_q(t) dt for the Lagrange basis ℓ_q of the Q Gauss–Legendre nodes of
    [0, 1] (float64 [R, Q]). ℓ_q = Σ_k w̃_q (2k+1)/2 P_k(x_q) P_k(x) (x = 2t − 1, discrete
    orthogonality of the GL rule), integrated with ∫_{−1}^X P_k = (P_{k+1} − P_{k−1})(X)/(2k+1)."""
    x, w, P = _gl_lagrange(Q)
    X = (2 * tau.to(torch.float64).numpy() - 1).clip(-1.0, 1.0)
    V = np.polynomial.legendre.legvander(X, Q)                         # [R, Q+1]: P_k(X)
    I = np.empty((len(X), Q))
    I[:, 0] = X + 1
    if Q > 1:
        I[:, 1:] = V[:, 2:Q + 1] - V[:, 0:Q - 1]                        # (2k+1)·∫P_k, k ≥ 1
    # C = ½ Σ_k w̃_q (2k+1)/2 P_k(x_q) ∫P_k = ¼ Σ_k w̃_q P_k(x_q) I_k (the 2k+1 cancels; k = 0: ½·(X+1))
    C = 0.25 * I @ (P * w[:, None]).T
    return torch.from_numpy(C)


def soft_masks(kinks, Q: int, dtype=torch.float64) -> Tuple[torch.Tensor, torch.Tensor,
                                                              torch.Tensor]:
    """(t [Q], w [Q], mu [Q, M, U]) of the soft-pattern rule from a smooth search's unit roots:
    mu_{q,m,j} = s0_{m,j} + Σ_roots σ (1 − C_q(r)/w_q), σ = ±1 the switch's jump at root r."""
    t, w = gauss_legendre(Q)
    s0 = kinks.s0.to(torch.float64)                                    # [M, U]
    mu = s0[None].repeat(Q, 1, 1)
    m, j, r, d = kinks.unit_roots
    if len(r):
        C = lagrange_cumulative(r, Q)                                  # [R, Q]
        contrib = d[:, None] * (1 - C / w[None, :])                    # [R, Q]
        flat = mu.view(Q, -1)
        flat.index_add_(1, m * mu.shape[2] + j, contrib.T.contiguous())
    return t, w, mu.to(dtype)


def affine_in_patterns(pf, blocks, theta_dtype, seed: int = 0) -> Tuple[bool, float]:
    """Whether g(θ(½); μ) = J(θ_s + ½Δ_s; μ)·v (and the output) is affine in the soft patterns μ:
    g at the mean of two random patterns against the mean of g (random tangent v). Returns
    (affine, relative defect)."""
    gen = torch.Generator().manual_seed(seed)
    M = pf.M
    U = sum(size for _, size, _ in blocks)
    mu_a = torch.rand(1, M, U, generator=gen, dtype=torch.float64).to(theta_dtype)
    mu_b = torch.rand(1, M, U, generator=gen, dtype=torch.float64).to(theta_dtype)
    v = torch.randn(1, pf.theta_s.shape[0], generator=gen, dtype=torch.float64).to(theta_dtype)
    v = torch.cat([v, pf.delta[None]])
    t = torch.tensor([0.5], dtype=theta_dtype)
    ga = pf.jvp_shared(t, slice(None), v, mu_a)
    gb = pf.jvp_shared(t, slice(None), v, mu_b)
    gm = pf.jvp_shared(t, slice(None), v, (mu_a + mu_b) / 2)
    with torch.no_grad():
        fa = pf._call(pf.theta_s + 0.5 * pf.delta, None, pf.X, pf.targets, mu_a[0],
                      along_path=False)
        fb = pf._call(pf.theta_s + 0.5 * pf.delta, None, pf.X, pf.targets, mu_b[0],
                      along_path=False)
        fm = pf._call(pf.theta_s + 0.5 * pf.delta, None, pf.X, pf.targets,
                      (mu_a[0] + mu_b[0]) / 2, along_path=False)
    defect = max(float((gm - (ga + gb) / 2).abs().max()), float((fm - (fa + fb) / 2).abs().max()))
    scale = max(float(ga.abs().max()), float(gb.abs().max()), float(fa.abs().max()),
                float(fb.abs().max()), torch.finfo(theta_dtype).tiny)
    rel = defect / scale
    return rel <= 1e4 * torch.finfo(theta_dtype).eps, rel
