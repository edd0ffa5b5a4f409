"""The model evaluated at a flat θ: the one place that calls ``torch.func.functional_call``.

    FunctionalModel(model, layout, dtype, device, output)(θ [D], inputs) -> f_θ(inputs)
    TestFunction(fm, X, targets, h).values(θ, idx) -> h(f_θ(X[idx]), targets[idx])   [m, K]

Inputs follow the calling convention of :mod:`.inputs` (a tensor x -> model(x), a tuple ->
model(*x), a dict -> model(**x), every tensor batched on dim 0) and the output tensor is selected
from what the model returns (tensor, tuple or ModelOutput; ``output="logits"`` by default).
Frozen parameters and buffers are taken from the module (floating ones cast to ``dtype``), buffers
from ``buffers`` instead where given (a trajectory's recorded buffers, by canonical name); the
trainable ones come from θ through :meth:`ParamLayout.unflatten` (views, no copy). A
torch.compile'd module is evaluated through its plain module (:func:`.inputs.unwrap_compiled`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional

import torch
from torch.func import functional_call

from . import inputs as _in
from .layout import ParamLayout


class FunctionalModel:
    """f(θ, inputs): the model evaluated with the flat trainable vector θ (frozen params and
    buffers taken from the model, cast to ``dtype``; ``dtype=None`` keeps them as they are), its
    output reduced to one tensor by :func:`.inputs.select_output` (``output=None``: the raw
    output).

    ``vectorize``: whether per-sample functions run under ``torch.func.vmap`` (:meth:`vmap`); it is
    switched off, with the reason in ``loop_reason``, the first time vmap refuses the model's
    data-dependent control flow (a Hugging Face attention-mask check), and they loop instead.
    """

    def __init__(self, model: torch.nn.Module, layout: ParamLayout, dtype=None, device=None,
                 output: _in.OutputKey = "logits", buffers: Optional[Dict[str, torch.Tensor]] = None):
        model = _in.unwrap_compiled(model)
        _in.check_output_key(output)
        self.model, self.layout, self.output = model, layout, output
        trainable = set(layout.names)
        self.base = {}
        self.actual = {}          # layout (canonical) name -> the module's own parameter name
        buffer_names = {k for k, _ in model.named_buffers()}
        for k, v in list(model.named_parameters()) + list(model.named_buffers()):
            c = _in.canonical_name(k)
            if c in trainable:
                self.actual[c] = k
                continue
            if buffers is not None and k in buffer_names and c in buffers:
                v = buffers[c]
            v = v.detach()
            if device is not None:
                v = v.to(device)
            self.base[k] = v.to(dtype) if (dtype is not None and v.is_floating_point()) else v
        self.vectorize = True
        self.loop_reason = ""
        #: torch.compile'd submodules inside the (unwrapped) model
        self.compiled = any(type(m).__name__ == "OptimizedModule" for m in model.modules())

    def params(self, theta: torch.Tensor) -> dict:
        """{name: tensor} of every parameter and buffer with the trainable ones taken from θ."""
        return self.params_from(self.layout.unflatten(theta))

    def params_from(self, flat: dict) -> dict:
        """{name: tensor} of every parameter and buffer with the trainable ones the tensors of
        ``flat`` themselves ({layout (canonical) name: tensor}, e.g. ``layout.unflatten(θ)``),
        under the module's own names (a caller may recognise them by identity, as
        :class:`explaind_fast.quadrature.pathmode.PathMode` does)."""
        return {**self.base, **{self.actual.get(k, k): v for k, v in flat.items()}}

    def call_with(self, params: dict, inputs):
        """The model's own output with the parameters and buffers ``params`` (see
        :meth:`params_from`) on ``inputs`` (the calling convention of :mod:`.inputs`)."""
        args, kwargs = _in.call_args(inputs)
        return functional_call(self.model, params, args, kwargs)

    def eager(self):
        """Context manager: torch.compile'd submodules run their plain forward
        (``torch.compiler.set_stance("force_eager")``), so that a TorchFunctionMode around a call
        (:class:`explaind_fast.quadrature.pathmode.PathMode`) sees and may replace every op
        (dynamo would trace the mode's handlers instead); a no-op for a model without them."""
        stance = getattr(torch.compiler, "set_stance", None)
        if not self.compiled or stance is None:
            return contextlib.nullcontext()
        return stance("force_eager")

    def raw(self, theta: torch.Tensor, inputs):
        """The model's own output (tensor, tuple or ModelOutput) at θ."""
        return self.call_with(self.params(theta), inputs)

    def __call__(self, theta: torch.Tensor, *inputs):
        """f_θ(inputs) -> the selected output tensor. One argument is the input pytree; several
        are positional inputs (``fm(θ, a, b)`` == ``fm(θ, (a, b))``)."""
        x = inputs[0] if len(inputs) == 1 else tuple(inputs)
        return _in.select_output(self.raw(theta, x), self.output)

    def vmap(self, fn: Callable, in_dims: tuple) -> Callable:
        """vmap(fn, in_dims) over dim 0 of the per-sample arguments (0 for a batched pytree, None
        for a shared argument), or a loop over the samples where vmap cannot run this model
        (:func:`.inputs.map_samples`)."""
        def remember(err):
            self.vectorize = False
            self.loop_reason = str(err).split("\n")[0][:200]
        return _in.map_samples(fn, in_dims, loop=not self.vectorize, on_fallback=remember)


class TestFunction:
    """h(f(θ, X[idx]), targets[idx]) -> [m, K] for the test set, row-wise in the samples.
    X and targets are pytrees batched on dim 0 (targets may be None)."""

    __test__ = False  # not a pytest class

    def __init__(self, fm: FunctionalModel, X, targets, h: Callable):
        self.fm, self.X, self.targets, self.h = fm, _in.normalize(X), \
            (None if targets is None else _in.normalize(targets)), h
        self.M = _in.batch_size(self.X)

    def rows(self, idx):
        """(inputs, targets) of the test samples idx (targets None when there are none)."""
        return _in.take(self.X, idx), (None if self.targets is None else
                                       _in.take(self.targets, idx))

    def values(self, theta, idx=slice(None)):
        x, tg = self.rows(idx)
        return self.h(self.fm(theta, x), tg)

    def single(self, theta, x, tg):
        """h(f(θ, x[None]), tg[None])[0]: one sample, for vmap over samples."""
        return self.h(self.fm(theta, _in.unsqueeze(x)), None if tg is None else _in.unsqueeze(tg))[0]
