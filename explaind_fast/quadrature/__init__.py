"""Quadrature of the path integral φ_s(x) = ∫_0^1 J(θ_s + tΔ_s) dt (docs/design.md §4).

Owns: node sets (:mod:`.nodes`), one rule object per kind with ``.nodes(step)`` and its expected
node count (:mod:`.rules`, including ``"auto"``), the adaptive rule's error control
(:mod:`.adaptive`), the kink search for piecewise models and its node rules, split into capture /
search / pieces / soft patterns (:mod:`.kinks`), and the evaluation of a model along one step's
segment for many (sample, t) rows with shared weights (:mod:`.pathmode`, also used by the
attribution's contractions).

May import: :mod:`explaind_fast.model`. Never imports: optim, store, recording, attribution, ops
(a rule sees one step's segment of the path and the model, never a trajectory or a result).
"""
from .adaptive import AdaptiveInfo, adaptive_nodes
from .nodes import NodeSet, gauss_legendre, midpoint
from .rules import (AdaptiveRule, AutoRule, CallableRule, GaussLegendreCheckedRule,
                    GaussLegendreRule, KinkRule, MidpointRule, NodeStats, PathStep, QuadratureRule,
                    parse_quadrature)

__all__ = ["NodeSet", "gauss_legendre", "midpoint", "adaptive_nodes", "AdaptiveInfo",
           "QuadratureRule", "MidpointRule", "GaussLegendreRule", "AdaptiveRule", "KinkRule",
           "GaussLegendreCheckedRule", "AutoRule", "CallableRule", "PathStep", "NodeStats",
           "parse_quadrature"]
