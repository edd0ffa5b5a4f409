"""Kink-aware quadrature: exact path integrals for ReLU / max-pool / piecewise models.

The test feature map of step s is φ_s(x) = ∫_0^1 J(θ_s + tΔ_s) dt (docs/design.md §4.1). On a model with
piecewise operations (ReLU, abs, hardtanh, clamp, maximum, max-pool …) the integrand jumps wherever
one of the operation's *switching functions* z(t) (a pre-activation, or the difference between two
candidates of a max) changes sign along the path θ(t) = θ_s + tΔ_s. Between those breakpoints the
integrand is smooth, so Gauss–Legendre on each piece converges geometrically instead of like 1/n.

For every test sample this module finds the breakpoints t ∈ (0, 1):

1. **Capture.** The model is evaluated functionally under a ``TorchFunctionMode``
   (:class:`explaind_fast.quadrature.pathmode.PathMode`) that records the switching functions of
   every piecewise torch call (``F.relu``, ``nn.ReLU``, ``torch.abs``, ``clamp``, ``maximum``,
   ``F.max_pool2d`` …; see :data:`SWITCHES`) and stops the forward pass after the last one. Ops
   that are piecewise but that this rule cannot handle (``sign``, ``round``, ``topk`` …) are
   reported in ``Kinks.unseen`` and with a warning; users declare their own with ``activations=``.
   Rows (sample, t) are evaluated with shared weights, the ops affine in their parameters split
   along the segment: no per-row parameter vectors θ_s + tΔ_s.
2. **Search** (``method="chebyshev"``, the default, :mod:`.layered`). Each sample's [0, 1] is one
   piece; a round evaluates every open piece at its Chebyshev–Lobatto points (all samples and
   pieces in one batched call) and interpolates every switching function. A converged interpolant
   (last coefficients under ``tol`` of the block's scale) is smooth on the piece: its roots are
   taken from the interpolant (:mod:`.chebyshev`: fine-grid brackets, a cubic Hermite dip test,
   safeguarded Newton on the series), with no further model evaluation. A function that has not
   converged is either under-resolved (the piece gets twice the points, every value reused) or
   downstream of a kink inside the piece (ReLU after ReLU, max-pool after conv + ReLU): the piece
   is split at the roots found and its sub-pieces are searched again. For a max (max-pool,
   torch.max over a dim) the switching functions are differences of two candidates, and a root is
   kept only where the pair is the window's maximum (a real change of the argmax).
   ``method="bracket"``: the earlier search — a shared grid of ``grid + 1`` forward-mode passes, a
   Hermite dip test, Newton polishing per kink at its own t and verification rounds per cell.
3. **Nodes** (:mod:`.pieces`, :mod:`.patterns`). Gauss–Legendre-n on every smooth piece per sample
   (an [M, Q] NodeSet), or — when the piecewise ops do not feed one another and the output is
   affine in their switches (one ReLU layer followed by linear maps: the grokking transformer) —
   soft activation patterns at shared nodes: every sample at the same Q Gauss–Legendre nodes, the
   switch of each unit replaced by its integral against the node's Lagrange basis polynomial
   over the unit's on-set (exact up to the interpolation error of the smooth parts, checked in the
   Δ direction; :class:`explaind_fast.quadrature.rules.KinkRule` chooses).

Only breakpoints strictly inside (0, 1) split the interval; ones closer than ``merge_tol`` are merged.
A unit that touches zero without crossing creates no breakpoint (the integrand is continuous there).
Switching functions are continuous in t even when upstream units switch (compositions of continuous
maps), so a sign change always holds a root.

Known limits (the quadrature residual certifies every step and shows them): a dip through zero
narrower than the fine grid of an interpolant that its Hermite test does not flag; kinks closer
than ``merge_tol`` (1e-12) to another; max-type ops with more than 16 candidates pair only the
candidates that are on top at some sample point with the others.

Cost (Chebyshev search): on a model with one piecewise layer, one round of 11–41 batched forward
passes (values only) over the M samples per step; with stacked piecewise layers, one round per
layer of the chain, each evaluating 7–25 points on every piece still open. Peak memory: the
switching values of one round, points × pieces × K floats (K = switching values per sample).
Measured in bench/bench_kinks_speed.py (and bench/bench_kinks.py for accuracy).

Modules: :mod:`.capture` (step 1 and the path evaluator), :mod:`.search` (step 2: the entry
point and the bracket method), :mod:`.layered` and :mod:`.chebyshev` (the Chebyshev search),
:mod:`.pieces` (the per-piece Gauss–Legendre rule and the forward-only residual check),
:mod:`.patterns` (soft activation patterns at shared nodes).
"""
from .capture import SWITCHES, UNSUPPORTED
from .pieces import TAPER_RHO, kink_nodes, nodes_from_breakpoints, nodes_per_piece, \
    quadrature_residual
from .search import PAIRWISE_MAX_CANDIDATES, Kinks, find_kinks

__all__ = ["kink_nodes", "find_kinks", "nodes_from_breakpoints", "nodes_per_piece",
           "quadrature_residual", "Kinks", "SWITCHES", "UNSUPPORTED", "TAPER_RHO",
           "PAIRWISE_MAX_CANDIDATES"]
