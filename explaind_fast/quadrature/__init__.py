"""Quadrature of the path integral φ_s(x) = ∫_0^1 J(θ_s + tΔ_s) dt (docs/design.md §4).

Owns: node sets (:mod:`.nodes`), one rule object per kind with ``.nodes(step)`` and its expected
node count (:mod:`.rules`), the adaptive rule's error control (:mod:`.adaptive`) and the kink
search for piecewise models, split into capture / search / pieces (:mod:`.kinks`).

May import: :mod:`explaind_fast.model`. Never imports: optim, store, recording, attribution, ops
(a rule sees one step's segment of the path and the model, never a trajectory or a result).
"""
from .adaptive import AdaptiveInfo, adaptive_nodes
from .nodes import NodeSet, gauss_legendre, midpoint
from .rules import (AdaptiveRule, CallableRule, GaussLegendreRule, KinkRule, MidpointRule, NodeStats,
                    PathStep, QuadratureRule, parse_quadrature)

__all__ = ["NodeSet", "gauss_legendre", "midpoint", "adaptive_nodes", "AdaptiveInfo",
           "QuadratureRule", "MidpointRule", "GaussLegendreRule", "AdaptiveRule", "KinkRule",
           "CallableRule", "PathStep", "NodeStats", "parse_quadrature"]
