"""The model evaluated at a flat θ: the one place that calls ``torch.func.functional_call``.

    FunctionalModel(model, layout, dtype, device)(θ [D], X) -> f_θ(X)
    TestFunction(fm, X, targets, h).values(θ, idx) -> h(f_θ(X[idx]), targets[idx])   [m, K]

Frozen parameters and buffers are taken from the module (floating ones cast to ``dtype``); the
trainable ones come from θ through :meth:`ParamLayout.unflatten` (views, no copy).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.func import functional_call

from .layout import ParamLayout


class FunctionalModel:
    """f(θ, X): the model evaluated with the flat trainable vector θ (frozen params and buffers
    taken from the model, cast to ``dtype``). ``dtype=None`` keeps them as they are."""

    def __init__(self, model: torch.nn.Module, layout: ParamLayout, dtype=None, device=None):
        self.model, self.layout = model, layout
        trainable = set(layout.names)
        self.base = {}
        for k, v in list(model.named_parameters()) + list(model.named_buffers()):
            if k in trainable:
                continue
            v = v.detach()
            if device is not None:
                v = v.to(device)
            self.base[k] = v.to(dtype) if (dtype is not None and v.is_floating_point()) else v

    def params(self, theta: torch.Tensor) -> dict:
        """{name: tensor} of every parameter and buffer with the trainable ones taken from θ."""
        return {**self.base, **self.layout.unflatten(theta)}

    def __call__(self, theta: torch.Tensor, *inputs):
        return functional_call(self.model, self.params(theta), inputs)


class TestFunction:
    """h(f(θ, X[idx]), targets[idx]) -> [m, K] for the test set, row-wise in the samples."""

    __test__ = False  # not a pytest class

    def __init__(self, fm: FunctionalModel, X: torch.Tensor, targets: Optional[torch.Tensor],
                 h: Callable):
        self.fm, self.X, self.targets, self.h = fm, X, targets, h

    def values(self, theta, idx=slice(None)):
        tg = None if self.targets is None else self.targets[idx]
        return self.h(self.fm(theta, self.X[idx]), tg)

    def single(self, theta, x, tg):
        """h(f(θ, x[None]), tg[None])[0]: one sample, for vmap over samples."""
        return self.h(self.fm(theta, x[None]), None if tg is None else tg[None])[0]
