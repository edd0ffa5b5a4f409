"""Quadrature rules for the path integral φ_s(x) = ∫_0^1 J(θ_s + tΔ_s) dt (docs/design.md §4).

One rule object per kind, parsed from a spec string by :func:`parse_quadrature`:

    "midpoint:n"        nodes (i + 0.5)/n, weights 1/n (the official ExPLAIND code's rule); exact
                        for integrands of degree <= 1 only.
    "gauss-legendre:n"  n Gauss–Legendre nodes on [0, 1]; exact for degree <= 2n − 1.
    "adaptive:tol"      start from Gauss–Legendre-4 on [0, 1] and bisect the interval with the
                        largest exact local error (:func:`.adaptive.adaptive_nodes`) until the
                        summed error is under tol relative to the step's change; shared nodes.
    "kinks:n"           per-sample ReLU-kink splitting (:mod:`.kinks`), n nodes per smooth piece,
                        [M, Q].
    callable            ``rule(s, theta_s, delta_s) -> NodeSet`` (custom / per-sample rules).

Every rule has ``.nodes(step)`` (a :class:`NodeSet` for a :class:`PathStep`), ``.evaluate(step)``
(the node set and what finding it cost, :class:`NodeStats`), ``expected_nodes`` (the node count the
planner budgets for) and ``text`` (the spec).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch
from torch.func import jvp, vmap

from .adaptive import DEFAULT_ADAPTIVE_START, DEFAULT_MAX_INTERVALS, adaptive_nodes
from .kinks import kink_nodes
from .nodes import NodeSet, gauss_legendre, midpoint


@dataclass
class PathStep:
    """What a rule may look at for step s: the segment θ(t) = θ_s + tΔ_s and the output functional
    along it.

    path: a :class:`explaind_fast.model.TestFunction` (``values(θ)`` -> [M, K], ``fm`` the model,
    ``X`` the test inputs, a pytree batched on dim 0, ``M`` their number); endpoints: returns (h(f(θ_s)), h(f(θ_{s+1}))), cached by the caller.
    """

    index: int
    theta: torch.Tensor
    delta: torch.Tensor
    path: object
    endpoints: Callable[[], Tuple[torch.Tensor, torch.Tensor]]


@dataclass
class NodeStats:
    """What a rule spent finding one step's nodes (beyond evaluating them)."""

    jvp_nodes: int = 0          # J·Δ evaluations, each one batched JVP over the test set
    forward_passes: int = 0     # forward passes h(f(θ(t)))
    cap_hit: bool = False       # the adaptive rule stopped at its interval cap


class QuadratureRule:
    """Base class: ``evaluate(step) -> (NodeSet, NodeStats)``."""

    kind: str = ""
    #: node count per step the planner budgets for
    expected_nodes: int = 8

    def __init__(self, text: str):
        self.text = text

    def evaluate(self, step: PathStep) -> Tuple[NodeSet, NodeStats]:
        raise NotImplementedError

    def nodes(self, step: Optional[PathStep] = None) -> NodeSet:
        return self.evaluate(step)[0]

    def __repr__(self):
        return f"{type(self).__name__}({self.text!r})"


class _FixedRule(QuadratureRule):
    def __init__(self, text: str, n: int):
        super().__init__(text)
        self.n = self.expected_nodes = n
        self._nodes = NodeSet(*self._make(n))

    def evaluate(self, step=None):
        return self._nodes, NodeStats()


class MidpointRule(_FixedRule):
    kind = "midpoint"
    _make = staticmethod(midpoint)


class GaussLegendreRule(_FixedRule):
    kind = "gauss-legendre"
    _make = staticmethod(gauss_legendre)


class AdaptiveRule(QuadratureRule):
    kind = "adaptive"

    def __init__(self, text: str, tol: float, n: int = DEFAULT_ADAPTIVE_START,
                 max_intervals: int = DEFAULT_MAX_INTERVALS):
        super().__init__(text)
        self.tol, self.n, self.max_intervals = tol, n, max_intervals

    def evaluate(self, step):
        tf, th, delta = step.path, step.theta, step.delta

        def F(t):
            with torch.no_grad():
                return tf.values(th + t * delta)

        def Gd(ts):
            ths = th[None] + ts.to(th)[:, None] * delta[None]
            return vmap(lambda x: jvp(tf.values, (x,), (delta,))[1])(ths)     # [Q, M, K]
        F0, F1 = step.endpoints()
        ns, info = adaptive_nodes(F, Gd, self.tol, n=self.n, max_intervals=self.max_intervals,
                                  F0=F0, F1=F1)
        return ns, NodeStats(info.jvp_nodes, info.forward_passes, info.cap_hit)


class KinkRule(QuadratureRule):
    kind = "kinks"

    def __init__(self, text: str, n: int):
        super().__init__(text)
        self.n = self.expected_nodes = n

    def evaluate(self, step):
        fm = step.path.fm
        ns = kink_nodes(fm.model, fm.layout, step.theta, step.delta, step.path.X, self.n)
        return ns, NodeStats()


class CallableRule(QuadratureRule):
    kind = "callable"

    def __init__(self, fn: Callable):
        super().__init__(getattr(fn, "__name__", "callable"))
        self.fn = fn

    def evaluate(self, step):
        ns = self.fn(step.index, step.theta, step.delta)
        if not isinstance(ns, NodeSet):
            raise ValueError("a quadrature callable must return a NodeSet")
        M = step.path.M
        if ns.per_sample and ns.t.shape[0] != M:
            raise ValueError(f"per-sample NodeSet has {ns.t.shape[0]} rows for {M} test inputs")
        return ns, NodeStats()


def parse_quadrature(spec: Union[str, Callable, QuadratureRule],
                     max_intervals: int = DEFAULT_MAX_INTERVALS) -> QuadratureRule:
    """Parse "midpoint:n" | "gauss-legendre:n" (or "gl:n") | "adaptive:tol" | "kinks:n" |
    callable(s, theta_s, delta_s) -> NodeSet into a rule object (a rule object passes through).
    ``max_intervals``: the adaptive rule's cap on intervals per step."""
    if isinstance(spec, QuadratureRule):
        return spec
    if callable(spec):
        return CallableRule(spec)
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"quadrature spec {spec!r}: expected 'midpoint:n', 'gauss-legendre:n', "
                         "'adaptive:tol', 'kinks:n' or a callable(s, theta_s, delta_s) -> NodeSet")
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    try:
        if kind in ("midpoint", "gauss-legendre", "gl", "kinks"):
            n = int(arg)
            if n < 1:
                raise ValueError
            cls = {"midpoint": MidpointRule, "gauss-legendre": GaussLegendreRule,
                   "gl": GaussLegendreRule, "kinks": KinkRule}[kind]
            return cls(spec, n)
        if kind == "adaptive":
            tol = float(arg)
            if not tol > 0:
                raise ValueError
            return AdaptiveRule(spec, tol, DEFAULT_ADAPTIVE_START, max_intervals)
    except ValueError:
        raise ValueError(f"quadrature spec {spec!r}: bad argument '{arg}' (a positive integer "
                         "node count, or a positive tolerance for adaptive)") from None
    raise ValueError(f"quadrature spec {spec!r}: unknown rule '{kind}'; use midpoint, "
                     "gauss-legendre, adaptive or kinks")
