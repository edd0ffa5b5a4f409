"""Quadrature node sets on [0, 1] (docs/design.md §4).

A step's rule is a :class:`NodeSet` (t, w): float64 tensors either [Q] (nodes shared by all test
samples) or [M, Q] (per test sample; unused slots carry weight 0), optionally with soft activation
patterns for shared nodes (:class:`explaind_fast.quadrature.kinks.patterns.Patterns`: the
piecewise ops of the model are evaluated with per-(node, sample, unit) weights μ instead of their
0/1 switch, which integrates a ReLU model exactly at shared nodes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch


@dataclass
class NodeSet:
    """Quadrature nodes t and weights w on [0, 1]: float64 [Q] (shared) or [M, Q] (per sample).

    patterns: None, or (shared nodes only) soft activation patterns with ``mu`` [Q, M, U]: at
    node q, test sample m evaluates the model's piecewise ops with the weights mu[q, m]."""

    t: torch.Tensor
    w: torch.Tensor
    patterns: Optional[object] = None

    def __post_init__(self):
        self.t = torch.as_tensor(self.t, dtype=torch.float64)
        self.w = torch.as_tensor(self.w, dtype=torch.float64)
        if self.t.shape != self.w.shape or self.t.dim() not in (1, 2):
            raise ValueError(f"NodeSet: t and w must both be [Q] or [M, Q]; got t {tuple(self.t.shape)}"
                             f", w {tuple(self.w.shape)}")
        if self.patterns is not None and (self.t.dim() != 1 or
                                          self.patterns.mu.shape[0] != self.t.shape[0]):
            raise ValueError("NodeSet: patterns need shared nodes [Q] and mu [Q, M, U]")

    @property
    def per_sample(self) -> bool:
        return self.t.dim() == 2

    @property
    def num_nodes(self) -> int:
        return self.t.shape[-1]


def gauss_legendre(n: int, a: float = 0.0, b: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """n Gauss–Legendre nodes and weights on [a, b] (float64 [n])."""
    x, w = np.polynomial.legendre.leggauss(n)
    t = a + (b - a) * (x + 1.0) / 2.0
    return torch.from_numpy(t), torch.from_numpy(w * (b - a) / 2.0)


def midpoint(n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return t, torch.full((n,), 1.0 / n, dtype=torch.float64)
