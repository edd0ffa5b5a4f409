"""Quadrature rules for the path integral φ_s(x) = ∫_0^1 J(θ_s + tΔ_s) dt (DESIGN.md §2).

A step's rule is a :class:`NodeSet` (t, w) on [0, 1]: float64 tensors either [Q] (nodes shared by
all test samples) or [M, Q] (per test sample; unused slots carry weight 0). Spec strings:

    "midpoint:n"        nodes (i + 0.5)/n, weights 1/n (the official ExPLAIND code's rule); exact
                        for integrands of degree <= 1 only.
    "gauss-legendre:n"  n Gauss–Legendre nodes on [0, 1]; exact for degree <= 2n − 1.
    "adaptive:tol"      start from Gauss–Legendre-4 on [0, 1] and bisect the interval with the
                        largest exact local error (see :func:`adaptive_nodes`) until the summed
                        error is under tol relative to the step's change; shared nodes over the
                        test batch.
    "kinks:n"           per-sample ReLU-kink splitting (explaind_fast.kinks.kink_nodes), [M, Q].

A callable ``rule(s, theta_s, delta_s) -> NodeSet`` is accepted too (custom / per-sample rules).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple, Union

import numpy as np
import torch

DEFAULT_ADAPTIVE_START = 4
DEFAULT_MAX_INTERVALS = 64


@dataclass
class NodeSet:
    """Quadrature nodes t and weights w on [0, 1]: float64 [Q] (shared) or [M, Q] (per sample)."""

    t: torch.Tensor
    w: torch.Tensor

    def __post_init__(self):
        self.t = torch.as_tensor(self.t, dtype=torch.float64)
        self.w = torch.as_tensor(self.w, dtype=torch.float64)
        if self.t.shape != self.w.shape or self.t.dim() not in (1, 2):
            raise ValueError(f"NodeSet: t and w must both be [Q] or [M, Q]; got t {tuple(self.t.shape)}"
                             f", w {tuple(self.w.shape)}")

    @property
    def per_sample(self) -> bool:
        return self.t.dim() == 2

    @property
    def num_nodes(self) -> int:
        return self.t.shape[-1]


@dataclass
class QuadratureSpec:
    """A parsed quadrature spec. kind in {midpoint, gauss-legendre, adaptive, kinks, callable}."""

    kind: str
    n: int = 0
    tol: float = 0.0
    fn: Optional[Callable] = None
    text: str = ""


def gauss_legendre(n: int, a: float = 0.0, b: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """n Gauss–Legendre nodes and weights on [a, b] (float64 [n])."""
    x, w = np.polynomial.legendre.leggauss(n)
    t = a + (b - a) * (x + 1.0) / 2.0
    return torch.from_numpy(t), torch.from_numpy(w * (b - a) / 2.0)


def midpoint(n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return t, torch.full((n,), 1.0 / n, dtype=torch.float64)


def parse_quadrature(spec: Union[str, Callable]) -> QuadratureSpec:
    """Parse "midpoint:n" | "gauss-legendre:n" | "adaptive:tol" | "kinks:n" | callable."""
    if callable(spec):
        return QuadratureSpec("callable", fn=spec, text=getattr(spec, "__name__", "callable"))
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
            return QuadratureSpec("gauss-legendre" if kind == "gl" else kind, n=n, text=spec)
        if kind == "adaptive":
            tol = float(arg)
            if not tol > 0:
                raise ValueError
            return QuadratureSpec("adaptive", n=DEFAULT_ADAPTIVE_START, tol=tol, text=spec)
    except ValueError:
        raise ValueError(f"quadrature spec {spec!r}: bad argument '{arg}' (a positive integer "
                         "node count, or a positive tolerance for adaptive)") from None
    raise ValueError(f"quadrature spec {spec!r}: unknown rule '{kind}'; use midpoint, "
                     "gauss-legendre, adaptive or kinks")


def fixed_nodes(q: QuadratureSpec) -> NodeSet:
    if q.kind == "midpoint":
        return NodeSet(*midpoint(q.n))
    if q.kind == "gauss-legendre":
        return NodeSet(*gauss_legendre(q.n))
    raise ValueError(f"rule '{q.kind}' has no fixed nodes")


def kink_nodeset(q: QuadratureSpec, model, layout, theta_s, delta_s, test_inputs) -> NodeSet:
    """Dispatch "kinks:n" to explaind_fast.kinks.kink_nodes (imported lazily)."""
    try:
        from .kinks import kink_nodes
    except ImportError as e:
        raise ValueError("quadrature 'kinks:n' needs explaind_fast.kinks, which is not "
                         f"available ({e})") from None
    ns = kink_nodes(model, layout, theta_s, delta_s, test_inputs, q.n)
    if not isinstance(ns, NodeSet):
        ns = NodeSet(ns.t, ns.w)
    return ns


@dataclass
class AdaptiveInfo:
    """What the adaptive rule spent on one step and how well it did."""

    intervals: List[Tuple[float, float]] = field(default_factory=list)
    jvp_nodes: int = 0          # node evaluations of J·Δ (each one batched JVP over the test set)
    forward_passes: int = 0     # endpoint evaluations of h(f(θ(t)))
    cap_hit: bool = False       # True when max_intervals stopped the refinement
    relative_error: float = 0.0  # max over rows of |Σ interval errors| / step change


def adaptive_nodes(F: Callable[[float], torch.Tensor], G: Callable[[torch.Tensor], torch.Tensor],
                   tol: float, n: int = DEFAULT_ADAPTIVE_START,
                   max_intervals: int = DEFAULT_MAX_INTERVALS,
                   F0: Optional[torch.Tensor] = None, F1: Optional[torch.Tensor] = None
                   ) -> Tuple[NodeSet, AdaptiveInfo]:
    """Adaptive composite Gauss–Legendre-n on [0, 1] with an *exact* local error.

    F(t) -> [R] values h(f(θ_s + tΔ_s)) (forward passes); G(ts [Q]) -> [Q, R] values of
    g(t) = J(θ_s + tΔ_s)·Δ_s (JVPs). Since ∫_a^b g = F(b) − F(a) exactly, the error of GL-n on [a, b]
    is known: err = F(b) − F(a) − GL_n[g; a, b]. The interval with the largest max_r |err_r| is
    bisected until Σ_intervals max_r |err_r| <= tol·scale, scale = max_r |F(1) − F(0)| floored at
    1e3·eps·max(1, |F|), or until there are max_intervals intervals (reported as cap_hit). The
    final rule's residual is then <= tol relative to the step's change, kinks included.
    Returns the shared NodeSet of all accepted intervals' nodes and an :class:`AdaptiveInfo`.
    Memory: O(Q·R) per evaluation.
    """
    info = AdaptiveInfo()
    cache = {}

    def Fc(t: float) -> torch.Tensor:
        if t == 0.0 and F0 is not None:
            return F0
        if t == 1.0 and F1 is not None:
            return F1
        if t not in cache:
            cache[t] = F(t).reshape(-1).to(torch.float64)
            info.forward_passes += 1
        return cache[t]

    x, wx = gauss_legendre(n)

    def evaluate(a: float, b: float):
        ts = a + (b - a) * x
        g = G(ts).reshape(len(ts), -1).to(torch.float64)
        info.jvp_nodes += len(ts)
        approx = ((b - a) * wx)[:, None].mul(g).sum(0)
        err = Fc(b).reshape(-1) - Fc(a).reshape(-1) - approx
        return float(err.abs().max()) if err.numel() else 0.0, err

    f0, f1 = Fc(0.0).reshape(-1), Fc(1.0).reshape(-1)
    eps = torch.finfo(torch.float64).eps
    floor = 1e3 * eps * max(1.0, float(torch.cat([f0, f1]).abs().max()) if f0.numel() else 1.0)
    scale = max(float((f1 - f0).abs().max()) if f0.numel() else 0.0, floor)

    # Global strategy: bisect the interval with the largest error until the sum of the
    # intervals' max errors is under tol·scale. (A per-interval test err <= tol·(b−a)·scale never
    # passes across a jump of the integrand — a ReLU switching — since GL's error there is O(b−a).)
    e, vec = evaluate(0.0, 1.0)
    items = [(e, 0.0, 1.0, vec)]
    while sum(item[0] for item in items) > tol * scale:
        if len(items) + 1 > max_intervals:
            info.cap_hit = True
            break
        worst = max(range(len(items)), key=lambda i: items[i][0])
        _, a, b, _ = items.pop(worst)
        m = 0.5 * (a + b)
        for lo, hi in ((a, m), (m, b)):
            e2, v2 = evaluate(lo, hi)
            items.append((e2, lo, hi, v2))
    done = [(a, b, v) for _, a, b, v in items]
    done.sort(key=lambda item: item[0])
    info.intervals = [(a, b) for a, b, _ in done]
    total = torch.stack([v for _, _, v in done]).sum(0) if done else torch.zeros(1)
    info.relative_error = float(total.abs().max()) / scale if total.numel() else 0.0
    ts = torch.cat([a + (b - a) * x for a, b, _ in done])
    ws = torch.cat([(b - a) * wx for a, b, _ in done])
    return NodeSet(ts, ws), info
