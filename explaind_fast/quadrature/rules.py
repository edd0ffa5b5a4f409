"""Quadrature rules for the path integral φ_s(x) = ∫_0^1 J(θ_s + tΔ_s) dt (docs/design.md §4).

One rule object per kind, parsed from a spec string by :func:`parse_quadrature`:

    "auto"              (the default of attribute()) "kinks:3" when the model calls piecewise ops
                        the kink search sees, Gauss–Legendre with an error estimate otherwise
                        (:class:`AutoRule`; never the capped adaptive rule on a ReLU model).
    "midpoint:n"        nodes (i + 0.5)/n, weights 1/n (the official ExPLAIND code's rule); exact
                        for integrands of degree <= 1 only.
    "gauss-legendre:n"  n Gauss–Legendre nodes on [0, 1]; exact for degree <= 2n − 1.
    "adaptive:tol"      start from Gauss–Legendre-4 on [0, 1] and bisect the interval with the
                        largest exact local error (:func:`.adaptive.adaptive_nodes`) until the
                        summed error is under tol relative to the step's change; shared nodes.
    "kinks:n"           kink-aware (:mod:`.kinks`): soft activation patterns at shared
                        Gauss–Legendre nodes where the model allows (one piecewise layer feeding
                        affine maps; Q raised until the Δ residual is under 1e-12), else
                        Gauss–Legendre-n on every smooth piece per sample, [M, Q].
    callable            ``rule(s, theta_s, delta_s) -> NodeSet`` (custom / per-sample rules).

Every rule has ``.nodes(step)`` (a :class:`NodeSet` for a :class:`PathStep`), ``.evaluate(step)``
(the node set and what finding it cost, :class:`NodeStats`), ``expected_nodes`` (the node count the
planner budgets for) and ``text`` (the spec; for "auto" also what it chose). The checked rules
(soft-pattern kinks, checked Gauss–Legendre) know their error exactly in the Δ direction,
∫ J·Δ dt = h(f(θ_{s+1})) − h(f(θ_s)); they check it themselves (one JVP along Δ per node), or, on
a ``deferred`` step, return their first guess with ``NodeStats.refine`` and let the engine report
the φ·Δ its contraction computes anyway (no extra evaluation; a miss contracts again with more
nodes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch
from torch.func import jvp, vmap

from .adaptive import DEFAULT_ADAPTIVE_START, DEFAULT_MAX_INTERVALS, adaptive_nodes
from .nodes import NodeSet, gauss_legendre, midpoint


@dataclass
class PathStep:
    """What a rule may look at for step s: the segment θ(t) = θ_s + tΔ_s and the output functional
    along it.

    path: a :class:`explaind_fast.model.TestFunction` (``values(θ)`` -> [M, K], ``fm`` the model,
    ``X`` the test inputs, a pytree batched on dim 0, ``M`` their number); endpoints: returns
    (h(f(θ_s)), h(f(θ_{s+1}))), cached by the caller.
    deferred: the caller computes φ_s·Δ_s at the returned nodes anyway and reports it through
    ``NodeStats.refine``, so a rule that checks its residual may return its first guess unchecked.
    """

    index: int
    theta: torch.Tensor
    delta: torch.Tensor
    path: object
    endpoints: Callable[[], Tuple[torch.Tensor, torch.Tensor]]
    deferred: bool = False


@dataclass
class NodeStats:
    """What a rule spent finding one step's nodes (beyond evaluating them)."""

    jvp_nodes: int = 0          # J·Δ evaluations, each one batched JVP over the test set
    forward_passes: int = 0     # forward passes h(f(θ(t)))
    cap_hit: bool = False       # the adaptive rule stopped at its interval cap
    jd: Optional[torch.Tensor] = None   # Σ_q w_q J(θ(t_q))·Δ [M, K] at the returned nodes, when
    #                                     the rule computed it (the contraction then skips Δ)
    refine: Optional[Callable] = None   # deferred check: refine(jd) -> None when φ·Δ = jd is
    #                                     accurate enough, else the next (NodeSet, NodeStats)


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


#: node counts tried, in order, by the rules that check their residual (soft-pattern kinks, auto)
Q_LADDER = (4, 8, 12, 16, 24, 32, 48, 64)


def _check_tolerance(dtype) -> float:
    """Relative Δ-direction residual a checked rule accepts (float64: 1e-12)."""
    return max(1e-12, 1e3 * torch.finfo(dtype).eps)


def _residual_ok(jd, F0, F1, tol) -> Tuple[bool, float]:
    """Whether φ·Δ = jd reproduces h(f(θ_{s+1})) − h(f(θ_s)) to tol relative to the step's
    change (or to rounding of the outputs); also the relative residual."""
    change = (F1 - F0).to(jd)
    res = change - jd
    fin = torch.isfinite(res)
    if not bool(fin.any()):
        return True, 0.0
    r = float(res[fin].abs().max())
    scale = float(change[fin].abs().max())
    floor = 1e3 * torch.finfo(jd.dtype).eps * max(1.0, float(torch.cat(
        [F0[torch.isfinite(F0)].abs().flatten(), F1[torch.isfinite(F1)].abs().flatten(),
         torch.zeros(1, dtype=F0.dtype)]).max()))
    return r <= max(tol * scale, floor), r / max(scale, torch.finfo(torch.float64).tiny)


def _next_start(Q: int, rel: float, tol: float, floor: int = 8) -> int:
    """The next step's first Q: this step's, or one rung lower when this one passed with a wide
    margin (steps usually shrink during training; a failed rung costs Q JVPs along Δ)."""
    i = Q_LADDER.index(Q)
    if rel <= 1e-2 * tol and i > 0 and Q_LADDER[i - 1] >= floor:
        return Q_LADDER[i - 1]
    return Q


def _ladder(rule, step, pf, make, fallback=None):
    """Run the Q ladder of a checked rule from ``rule._q``: ``make(Q)`` -> (NodeSet, mu or None).
    Checked here (one JVP along Δ per node) or, for a deferred step, by the caller through
    ``NodeStats.refine`` with the φ·Δ its contraction computes anyway. Past the last rung:
    ``fallback()`` -> (NodeSet, NodeStats), or the last rung's nodes."""
    dtype = step.theta.dtype
    tol = rule.check_tol if rule.check_tol is not None else _check_tolerance(dtype)
    F0, F1 = step.endpoints()
    rungs = [q for q in Q_LADDER if q >= rule._q] or [Q_LADDER[-1]]

    def accept(Q, rel):
        rule._q = _next_start(Q, rel, tol, floor=rule.floor)
        rule.q_used.append(Q)

    if step.deferred:
        def attempt(i):
            Q = rungs[i]
            ns, _ = make(Q)

            def refine(jd):
                ok, rel = _residual_ok(jd, F0, F1, tol)
                if ok or (i + 1 == len(rungs) and fallback is None):
                    accept(Q, rel)
                    return None
                if i + 1 < len(rungs):
                    return attempt(i + 1)
                rule._q = rule.floor
                return fallback()
            return ns, NodeStats(refine=refine)
        return attempt(0)
    tried = 0
    for i, Q in enumerate(rungs):
        ns, mu = make(Q)
        jd = _checked_jd(pf, ns.t, ns.w, mu)
        tried += Q
        ok, rel = _residual_ok(jd, F0, F1, tol)
        if ok or (i + 1 == len(rungs) and fallback is None):
            accept(Q, rel)
            return ns, NodeStats(jvp_nodes=tried, jd=jd)
    rule._q = rule.floor
    return fallback()


def _checked_jd(pf, t, w, mu=None, chunk: int = 16):
    """Σ_q w_q J(θ(t_q))·Δ [M, K] at shared nodes (soft patterns mu [Q, M, U] or None)."""
    dtype = pf.theta_s.dtype
    acc = None
    for a in range(0, len(t), chunk):
        g = pf.jvp_shared(t[a:a + chunk].to(dtype), slice(None), pf.delta[None],
                          None if mu is None else mu[a:a + chunk])[0]          # [q, M, K]
        part = torch.tensordot(w[a:a + chunk].to(dtype), g, dims=1)
        acc = part if acc is None else acc + part
    return acc


class KinkRule(QuadratureRule):
    """Kink-aware rule (docs/design.md §4.1): the kink search of :mod:`.kinks`, then

    * soft activation patterns at shared Gauss–Legendre nodes (:mod:`.kinks.patterns`) when the
      model's piecewise ops do not feed one another and its output is affine in their switches
      (a ReLU MLP or transformer block): the price of a fixed rule; Q is raised along
      :data:`Q_LADDER` until the Δ-direction residual is under ``tol`` (float64: 1e-12);
    * otherwise Gauss–Legendre-n on every smooth piece of every test sample (per-sample nodes).

    ``counts`` records how many steps used each; ``text`` stays the spec.
    """

    kind = "kinks"
    #: numbers one call of the search's switching-value capture may hold (the planner's
    #: ``search_elems``, set by the engine from memory_budget)
    search_elems = 1 << 24

    def __init__(self, text: str, n: int, activations=None, soft: bool = True,
                 check_tol: Optional[float] = None):
        super().__init__(text)
        self.n = self.expected_nodes = n
        self.activations = activations
        self.soft = soft
        self.check_tol = check_tol
        self.counts = {"soft": 0, "pieces": 0}
        self.q_used: list = []
        self._affine = {}
        self.floor = 8
        self._q = max(8, 2 * n + 2)
        self._path = None

    def _search(self, step):
        from .kinks.capture import _Path
        from .kinks.search import search_path
        fm = step.path.fm
        like = self._path if (self._path is not None and self._path.inputs is step.path.X
                              and self._path.fm is fm
                              and self._path.theta.dtype == step.theta.dtype) else None
        path = _Path(fm.model, fm.layout, step.theta, step.delta, step.path.X, self.activations,
                     self.search_elems, like=like, fm=fm)
        self._path = path
        if path.unseen and not getattr(self, "_warned", False):
            import warnings
            warnings.warn("kink quadrature: the model uses piecewise ops whose breakpoints it "
                          f"cannot find: {', '.join(path.unseen)}; the quadrature residual will "
                          "show their error", stacklevel=3)
            self._warned = True
        return path, search_path(path)

    def _soft_rule(self, step, path, kinks):
        from .kinks.patterns import Patterns, affine_in_patterns, pattern_blocks, soft_masks
        from .pathmode import PathFunction
        blocks = pattern_blocks(path)
        if blocks is None or not kinks.smooth or kinks.unit_roots is None:
            return None
        tf = step.path
        dtype = step.theta.dtype
        pf = PathFunction.of(tf, step.theta, step.delta, Patterns(None, blocks))
        key = id(tf.fm.model)
        if key not in self._affine:
            self._affine[key] = affine_in_patterns(pf, blocks, dtype)[0]
        if not self._affine[key]:
            return None

        def make(Q):
            t, w, mu = soft_masks(kinks, Q, dtype)
            return NodeSet(t, w, Patterns(mu, blocks)), mu

        def fallback():
            self.counts["soft"] -= 1
            self.counts["pieces"] += 1
            return self._pieces(kinks)
        self.counts["soft"] += 1
        return _ladder(self, step, pf, make, fallback)

    def _pieces(self, kinks):
        from .kinks import nodes_from_breakpoints
        return nodes_from_breakpoints(kinks.breakpoints, self.n), NodeStats()

    def evaluate(self, step):
        path, kinks = self._search(step)
        if self.soft:
            out = self._soft_rule(step, path, kinks)
            if out is not None:
                return out
        self.counts["pieces"] += 1
        return self._pieces(kinks)

    def describe(self) -> str:
        """What the rule did over the steps it evaluated."""
        parts = []
        if self.counts["soft"]:
            qs = sorted(set(self.q_used))
            parts.append(f"{self.counts['soft']} steps soft activation patterns at shared "
                         f"Gauss–Legendre nodes (Q {qs[0]}–{qs[-1]})" if len(qs) > 1 else
                         f"{self.counts['soft']} steps soft activation patterns at shared "
                         f"Gauss–Legendre nodes (Q {qs[0]})")
        if self.counts["pieces"]:
            parts.append(f"{self.counts['pieces']} steps Gauss–Legendre-{self.n} on every smooth "
                         "piece per sample")
        return "; ".join(parts)


class GaussLegendreCheckedRule(QuadratureRule):
    """Gauss–Legendre with an error estimate: Q raised along :data:`Q_LADDER` (from the previous
    step's Q) until the Δ-direction residual — known exactly from the step's two endpoints — is
    under ``tol`` (float64: 1e-12); the last rung (64) is returned if none is. The rule for
    smooth models (geometric convergence in Q)."""

    kind = "gauss-legendre-checked"

    def __init__(self, text: str = "gauss-legendre(checked)", check_tol: Optional[float] = None,
                 start: int = 4):
        super().__init__(text)
        self.check_tol = check_tol
        self.expected_nodes = 8
        self._q = self.floor = start
        self.q_used: list = []

    def evaluate(self, step):
        from .pathmode import PathFunction
        pf = PathFunction.of(step.path, step.theta, step.delta)

        def make(Q):
            return NodeSet(*gauss_legendre(Q)), None
        return _ladder(self, step, pf, make)

    def describe(self) -> str:
        qs = sorted(set(self.q_used))
        if not qs:
            return "Gauss–Legendre with an error estimate"
        span = f"{qs[0]}" if len(qs) == 1 else f"{qs[0]}–{qs[-1]}"
        return f"gauss-legendre:{span} (Q raised until the Δ residual is under its tolerance)"


class AutoRule(QuadratureRule):
    """quadrature="auto": the kink-aware rule (:class:`KinkRule`, n = 3) when the model has
    piecewise operations the kink search sees, Gauss–Legendre with an error estimate
    (:class:`GaussLegendreCheckedRule`) otherwise — never the capped adaptive rule. The choice is
    made at the first step from the ops the model calls on the test inputs; ``text`` says what was
    chosen (``Attribution.quadrature``), the per-step residual is ``Attribution.step_residual``."""

    kind = "auto"
    search_elems = KinkRule.search_elems          # handed to the kink-aware rule it chooses

    def __init__(self, text: str = "auto", activations=None):
        super().__init__(text)
        self.activations = activations
        self.expected_nodes = 8
        self.chosen: Optional[QuadratureRule] = None
        self.why = ""

    def _choose(self, step):
        from .kinks.capture import _Path
        fm = step.path.fm
        probe = _Path(fm.model, fm.layout, step.theta, step.delta, step.path.X, self.activations,
                      self.search_elems, fm=fm)
        if probe.K > 0:
            ops = sorted({b[0] for b in probe.blocks if b is not None})
            self.chosen = KinkRule("kinks:3", 3, activations=self.activations)
            self.chosen.search_elems = self.search_elems
            self.why = f"piecewise ops {', '.join(ops)}"
        else:
            self.chosen = GaussLegendreCheckedRule()
            self.why = ("no piecewise ops the kink search sees" if not probe.unseen else
                        f"piecewise ops the kink search cannot see: {', '.join(probe.unseen)}")

    def evaluate(self, step):
        if self.chosen is None:
            self._choose(step)
        return self.chosen.evaluate(step)

    @property
    def text(self) -> str:
        if self.chosen is None:
            return "auto"
        return f"auto → {self.chosen.text} ({self.why}): {self.chosen.describe()}"

    @text.setter
    def text(self, value):
        pass


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
    """Parse "auto" | "midpoint:n" | "gauss-legendre:n" (or "gl:n") | "adaptive:tol" | "kinks:n" |
    callable(s, theta_s, delta_s) -> NodeSet into a rule object (a rule object passes through).
    ``max_intervals``: the adaptive rule's cap on intervals per step."""
    if isinstance(spec, QuadratureRule):
        return spec
    if callable(spec):
        return CallableRule(spec)
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        return AutoRule()
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"quadrature spec {spec!r}: expected 'auto', 'midpoint:n', "
                         "'gauss-legendre:n', 'adaptive:tol', 'kinks:n' or a callable(s, theta_s, "
                         "delta_s) -> NodeSet")
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
    raise ValueError(f"quadrature spec {spec!r}: unknown rule '{kind}'; use auto, midpoint, "
                     "gauss-legendre, adaptive or kinks")
