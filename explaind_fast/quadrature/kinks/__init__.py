"""Kink-aware quadrature: exact path integrals for ReLU / max-pool / piecewise models.

The test feature map of step s is φ_s(x) = ∫_0^1 J(θ_s + tΔ_s) dt (docs/design.md §4.1). On a model with
piecewise operations (ReLU, abs, hardtanh, clamp, maximum, max-pool …) the integrand jumps wherever
one of the operation's *switching functions* z(t) (a pre-activation, or the difference between two
candidates of a max) changes sign along the path θ(t) = θ_s + tΔ_s. Between those breakpoints the
integrand is smooth, so Gauss–Legendre on each piece converges geometrically instead of like 1/n.

For every test sample this module finds the breakpoints t ∈ (0, 1):

1. **Capture.** The model is evaluated functionally under a ``TorchFunctionMode`` that records the
   switching functions of every piecewise torch call (``F.relu``, ``nn.ReLU``, ``torch.abs``,
   ``clamp``, ``maximum``, ``F.max_pool2d`` …; see :data:`SWITCHES`). Ops that are piecewise but that
   this rule cannot handle (``sign``, ``round``, ``topk`` …) are reported in ``Kinks.unseen`` and with
   a warning; users declare their own with ``activations=``.
2. **Bracket.** z and dz/dt (forward mode, ``torch.func.jvp``) are evaluated for all samples at once
   on a shared grid of ``grid + 1`` points. A sign change in a cell brackets a crossing; a cubic
   Hermite fit of (z, dz/dt) flags cells where z may dip through zero and come back, which are
   probed with one extra evaluation.
3. **Polish.** Each bracket is refined by safeguarded Newton iterations (falls back to bisection),
   evaluating that sample at its own t (``vmap`` over per-row parameters θ_s + tΔ_s), to
   ``tol_t`` (1e-14 by default) in t. For a max (max-pool, torch.max over a dim) every pair of
   candidates of a window is a switching function, and a root is kept only where one of the pair
   is the window's maximum (a real change of the argmax).
4. **Verify.** Downstream of a kink a switching function is only piecewise smooth inside its grid
   cell (ReLU after ReLU, max-pool after conv+ReLU), where the dip test is not trustworthy. Every
   cell holding kinks is re-scanned piece by piece, with one-sided values just inside each piece,
   until no piece reveals a new kink. Cells without kinks are smooth for every unit.

Only breakpoints strictly inside (0, 1) split the interval; ones closer than ``merge_tol`` are merged.
A unit that touches zero without crossing creates no breakpoint (the integrand is continuous there).
Switching functions are continuous in t even when upstream units switch (compositions of continuous
maps), so brackets always hold a root.

Known limits (the quadrature residual certifies every step and shows them): a dip through zero
that the cubic Hermite fit of a kink-free cell does not flag (its depth below the fit's error);
kinks closer than ``side`` (1e-11) to another kink; max-type ops with more than
:data:`PAIRWISE_MAX_CANDIDATES` candidates use differences to the cell-start argmax only.

Cost: ``grid + 1`` batched forward-mode passes over the M samples, plus about one to two
single-sample forward-mode passes per breakpoint to polish it and two to verify its pieces
(measured 2–4 per breakpoint, bench/bench_kinks.py). Peak memory: (grid + 1)·M·K floats for the
switching values (K = switching values per sample, e.g. MLP width, or candidates of all max-pool
windows) plus ``chunk_elems`` floats for the per-row parameter vectors θ_s + tΔ_s of the vmapped
single-sample passes.

Modules: :mod:`.capture` (step 1 and the path evaluator), :mod:`.search` (steps 2–4),
:mod:`.pieces` (the per-piece Gauss–Legendre rule and the forward-only residual check).
"""
from .capture import SWITCHES, UNSUPPORTED
from .pieces import TAPER_RHO, kink_nodes, nodes_from_breakpoints, nodes_per_piece, \
    quadrature_residual
from .search import PAIRWISE_MAX_CANDIDATES, Kinks, find_kinks

__all__ = ["kink_nodes", "find_kinks", "nodes_from_breakpoints", "nodes_per_piece",
           "quadrature_residual", "Kinks", "SWITCHES", "UNSUPPORTED", "TAPER_RHO",
           "PAIRWISE_MAX_CANDIDATES"]
