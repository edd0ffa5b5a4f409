"""Kink search, step 1: capture the switching functions of a model's piecewise ops along θ(t).

An extractor maps a torch call (args, kwargs) to a list of (kind, tensor): ("sign", z), kinks where
an element of z crosses zero; ("argmax", C), C[..., c] the candidates of a max, kinks where the
argmax changes. :class:`_Capture` records them for every call of :data:`SWITCHES` (it observes
the ops of a :class:`explaind_fast.quadrature.pathmode.PathMode`); :class:`_Path` evaluates all of
them, with or without their t-derivatives, along θ(t) = θ_s + tΔ_s for the search (:mod:`.search`),
for many (sample, t) rows at once with shared weights. Overview: :mod:`explaind_fast.quadrature.kinks`.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.func import jvp, vmap

from ...model import FunctionalModel, ParamLayout
from ...model import inputs as _in
from ..pathmode import PathMode

# An extractor maps a torch call (args, kwargs) to a list of (kind, tensor):
#   ("sign", z)      kinks where an element of z crosses zero; z has the batch dim of the call.
#   ("argmax", C)    C[..., c] are the candidates of a max; kinks where the argmax changes.

def _arg(args, kwargs, i, name, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _is_float_tensor(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _at_zero(args, kwargs):
    return [("sign", args[0])]


def _relu6(args, kwargs):
    return [("sign", args[0]), ("sign", args[0] - 6.0)]


def _clamp(args, kwargs):
    x = args[0]
    lo = _arg(args, kwargs, 1, "min")
    hi = _arg(args, kwargs, 2, "max")
    return [("sign", x - b) for b in (lo, hi) if b is not None]


def _clamp_min(args, kwargs):
    return [("sign", args[0] - _arg(args, kwargs, 1, "min"))]


def _clamp_max(args, kwargs):
    return [("sign", args[0] - _arg(args, kwargs, 1, "max"))]


def _binary_diff(args, kwargs):
    a, b = args[0], _arg(args, kwargs, 1, "other")
    if not (_is_float_tensor(a) or _is_float_tensor(b)):
        return []
    return [("sign", a - b)]


def _max_or_min(args, kwargs):
    """torch.max/min: elementwise with a tensor `other`, or a reduction over `dim`."""
    other = _arg(args, kwargs, 1, "other")
    if isinstance(other, torch.Tensor):
        return _binary_diff(args, kwargs)
    dim = _arg(args, kwargs, 1, "dim")
    if dim is None:
        raise _Unsupported("full reduction (mixes the samples of the batch)")
    return _reduction_candidates(args[0], dim)


def _amax(args, kwargs):
    dim = _arg(args, kwargs, 1, "dim", ())
    if dim is None or dim == () or dim == []:
        raise _Unsupported("full reduction (mixes the samples of the batch)")
    return _reduction_candidates(args[0], dim)


def _reduction_candidates(x, dim):
    dims = [dim] if isinstance(dim, int) else list(dim)
    dims = sorted(d % x.dim() for d in dims)
    if 0 in dims:
        raise _Unsupported("reduction over dim 0 (the batch dimension)")
    rest = [d for d in range(x.dim()) if d not in dims]
    c = x.permute(rest + dims)
    return [("argmax", c.reshape(*c.shape[:len(rest)], -1))]


class _Unsupported(Exception):
    """Raised by an extractor when this call of a piecewise op cannot be handled."""


def _pool_windows(x, nd, kernel_size, stride, padding, dilation, ceil_mode):
    """Candidates [*lead, *out_spatial, prod(kernel)] of a max-pool (padding counts as -inf)."""
    def tup(v, default=None):
        if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
            v = default
        return tuple(v) if isinstance(v, (list, tuple)) else (v,) * nd
    k = tup(kernel_size)
    s = tup(stride, kernel_size)
    p = tup(padding if padding is not None else 0)
    d = tup(dilation if dilation is not None else 1)
    if ceil_mode:
        raise _Unsupported("max-pool with ceil_mode=True")
    if any(pi > 0 for pi in p):
        pad = []
        for pi in reversed(p):
            pad += [pi, pi]
        x = F.pad(x, pad, value=float("-inf"))
    lead = x.dim() - nd
    for i in range(nd):
        span = (k[i] - 1) * d[i] + 1
        x = x.unfold(lead + i, span, s[i])
        if d[i] > 1:
            x = x[..., ::d[i]]
    # x: [*lead, *out, k0, k1, ...] -> candidates last
    return x.reshape(*x.shape[:lead + nd], -1)


def _max_pool(nd):
    def extract(args, kwargs):
        x = args[0]
        names = ["kernel_size", "stride", "padding", "dilation", "ceil_mode"]
        vals = [_arg(args, kwargs, i + 1, n) for i, n in enumerate(names)]
        return [("argmax", _pool_windows(x, nd, vals[0], vals[1], vals[2], vals[3],
                                         bool(vals[4])))]
    return extract


def _adaptive_max_pool(nd):
    def extract(args, kwargs):
        x = args[0]
        out = _arg(args, kwargs, 1, "output_size")
        out = tuple(out) if isinstance(out, (list, tuple)) else (out,) * nd
        size = x.shape[-nd:]
        out = tuple(size[i] if o is None else o for i, o in enumerate(out))
        if any(size[i] % out[i] for i in range(nd)):
            raise _Unsupported("adaptive max-pool whose input size is not a multiple of its output")
        k = tuple(size[i] // out[i] for i in range(nd))
        return [("argmax", _pool_windows(x, nd, k, k, 0, 1, False))]
    return extract


def _hardtanh(args, kwargs):
    lo = _arg(args, kwargs, 1, "min_val", -1.0)
    hi = _arg(args, kwargs, 2, "max_val", 1.0)
    return [("sign", args[0] - lo), ("sign", args[0] - hi)]


def _pm(value_of):
    def extract(args, kwargs):
        v = value_of(args, kwargs)
        return [("sign", args[0] - v), ("sign", args[0] + v)]
    return extract


def _threshold(args, kwargs):
    return [("sign", args[0] - _arg(args, kwargs, 1, "threshold"))]


def _collect(*names_and_fns):
    table = {}
    for owner, names, fn in names_and_fns:
        for n in names:
            f = getattr(owner, n, None)
            if f is not None:
                table[f] = fn
    return table


T = torch.Tensor
#: torch callable -> extractor of its switching functions (see module docstring).
SWITCHES: Dict[Callable, Callable] = _collect(
    (F, ["relu", "relu_", "leaky_relu", "leaky_relu_", "elu", "elu_", "celu", "celu_", "selu",
         "selu_", "prelu", "rrelu", "rrelu_"], _at_zero),
    (torch, ["relu", "relu_", "abs", "abs_", "absolute", "prelu", "rrelu", "selu", "celu"],
     _at_zero),
    (T, ["relu", "relu_", "abs", "abs_", "absolute", "__abs__", "prelu"], _at_zero),
    (F, ["relu6"], _relu6),
    (F, ["hardtanh", "hardtanh_"], _hardtanh),
    (F, ["hardswish", "hardsigmoid"], _pm(lambda a, k: 3.0)),
    (F, ["softshrink", "hardshrink"], _pm(lambda a, k: _arg(a, k, 1, "lambd", 0.5))),
    (F, ["threshold", "threshold_"], _threshold),
    (torch, ["clamp", "clip", "clamp_"], _clamp),
    (T, ["clamp", "clip", "clamp_", "clip_"], _clamp),
    (torch, ["clamp_min"], _clamp_min), (T, ["clamp_min", "clamp_min_"], _clamp_min),
    (torch, ["clamp_max"], _clamp_max), (T, ["clamp_max", "clamp_max_"], _clamp_max),
    (torch, ["maximum", "minimum", "fmax", "fmin"], _binary_diff),
    (T, ["maximum", "minimum", "fmax", "fmin"], _binary_diff),
    (torch, ["gt", "ge", "lt", "le", "greater", "greater_equal", "less", "less_equal"],
     _binary_diff),
    (T, ["gt", "ge", "lt", "le", "__gt__", "__ge__", "__lt__", "__le__"], _binary_diff),
    (torch, ["max", "min"], _max_or_min), (T, ["max", "min"], _max_or_min),
    (torch, ["amax", "amin"], _amax), (T, ["amax", "amin"], _amax),
    (F, ["max_pool1d", "max_pool1d_with_indices"], _max_pool(1)),
    (F, ["max_pool2d", "max_pool2d_with_indices"], _max_pool(2)),
    (F, ["max_pool3d", "max_pool3d_with_indices"], _max_pool(3)),
    (F, ["adaptive_max_pool1d", "adaptive_max_pool1d_with_indices"], _adaptive_max_pool(1)),
    (F, ["adaptive_max_pool2d", "adaptive_max_pool2d_with_indices"], _adaptive_max_pool(2)),
    (F, ["adaptive_max_pool3d", "adaptive_max_pool3d_with_indices"], _adaptive_max_pool(3)),
)

#: Piecewise torch callables whose breakpoints this rule cannot find (reported, never silently).
UNSUPPORTED = _collect(
    (torch, ["sign", "sgn", "round", "floor", "ceil", "trunc", "frac", "fmod", "remainder",
             "sort", "argsort", "topk", "kthvalue", "median", "nanmedian", "mode", "cummax",
             "cummin", "heaviside", "bucketize", "searchsorted", "argmax", "argmin"], None),
    (T, ["sign", "sgn", "round", "floor", "ceil", "trunc", "frac", "fmod", "remainder", "sort",
         "argsort", "topk", "kthvalue", "median", "nanmedian", "mode", "cummax", "cummin",
         "heaviside", "argmax", "argmin", "__mod__", "__floordiv__"], None),
    (F, ["max_unpool1d", "max_unpool2d", "max_unpool3d", "fractional_max_pool2d",
         "fractional_max_pool3d", "gumbel_softmax"], None),
)


def _name(func) -> str:
    q = getattr(func, "__qualname__", None)
    if q and "<locals>" in q:                # F.max_pool2d is a boolean_dispatch wrapper
        q = None
    return q or getattr(func, "__name__", None) or repr(func)


class _Done(Exception):
    """Raised by :class:`_Capture` once it has recorded every switching function of the model
    (the rest of the forward pass is not needed)."""


class _Capture:
    """Records the switching functions of every piecewise torch call it observes (used by
    :class:`explaind_fast.quadrature.pathmode.PathMode`, which calls :meth:`observe` before every op
    of the model)."""

    def __init__(self, extra: Dict[Callable, Callable]):
        self.extra = extra
        self.switches: List[Tuple[str, str, torch.Tensor]] = []  # (op name, kind, tensor)
        self.funcs: List[Callable] = []                           # the torch callable of each
        self.unseen: List[str] = []
        self.stop_after = None                                    # raise _Done at this count

    def _check_done(self):
        if self.stop_after is not None and len(self.switches) >= self.stop_after:
            raise _Done

    def watches(self, func) -> bool:
        return func in self.extra or func in SWITCHES or func in UNSUPPORTED

    def observe(self, func, args, kwargs) -> None:
        extractor = self.extra.get(func) or SWITCHES.get(func)
        if extractor is not None and any(_is_float_tensor(a) for a in args[:2]):
            try:
                for kind, z in extractor(args, kwargs):
                    if isinstance(z, torch.Tensor) and z.is_floating_point():
                        self.switches.append((_name(func), kind, z))
                        self.funcs.append(func)
            except _Unsupported as why:
                self.unseen.append(f"{_name(func)} ({why})")
            self._check_done()
        elif func in UNSUPPORTED and args and _is_float_tensor(args[0]):
            self.unseen.append(_name(func))


def _module_switches(activations) -> Tuple[Dict[Callable, Callable], List]:
    """Split user declarations into torch-callable extractors and module hooks."""
    funcs: Dict[Callable, Callable] = {}
    modules = []
    for item in activations or ():
        target, switch = (item if isinstance(item, tuple) else (item, None))
        if isinstance(target, torch.nn.Module) or (isinstance(target, type) and
                                                   issubclass(target, torch.nn.Module)):
            modules.append((target, switch))
        elif callable(target):
            funcs[target] = ((lambda a, k, sw=switch: [("sign", z) for z in _as_list(sw(*a, **k))])
                             if switch is not None else _at_zero)
        else:
            raise TypeError(f"activations: expected an nn.Module, a module class or a torch "
                            f"callable (optionally paired with a switch function), got {item!r}")
    return funcs, modules


def _as_list(z):
    return list(z) if isinstance(z, (list, tuple)) else [z]


# ============================================================================ the path evaluator
class _Path:
    """Evaluates the switching functions of a model along θ(t) = θ_s + tΔ_s.

    Every evaluation returns, per sample, one flat vector of all switching values (sign switches
    and max candidates concatenated in call order); ``self.blocks`` describes that vector.
    """

    def __init__(self, model, layout: ParamLayout, theta, delta, inputs, activations,
                 chunk_elems: int, like: "Optional[_Path]" = None,
                 fm: Optional[FunctionalModel] = None):
        if theta.dim() != 1 or theta.shape[0] != layout.D:
            raise ValueError(f"theta_s must be a flat [D={layout.D}] vector, got "
                             f"{tuple(theta.shape)}")
        if delta.shape != theta.shape:
            raise ValueError(f"delta_s must have theta_s's shape {tuple(theta.shape)}, got "
                             f"{tuple(delta.shape)}")
        if not theta.is_floating_point():
            raise ValueError("theta_s must be a floating-point tensor")
        self.model, self.layout = model, layout
        self.theta, self.delta = theta, delta.to(theta.dtype)
        # any input pytree batched on dim 0 (explaind_fast.model.inputs): a tensor, a tuple of
        # positional tensors, a dict of keyword tensors
        self.inputs = _in.normalize(inputs)
        self.M = _in.batch_size(self.inputs, "test_inputs")
        # fm: the engine's functional model (frozen parameters and buffers, the trajectory's
        # recorded buffers included; canonical -> actual names; vmap or a loop over samples)
        self.fm = fm if fm is not None else FunctionalModel(model, layout, dtype=theta.dtype,
                                                            output=None)
        self.model = self.fm.model
        self.dparams = layout.unflatten(self.delta)
        self.funcs, self.modules = _module_switches(activations)
        self.chunk_elems = chunk_elems
        self.unseen: List[str] = []
        self.shared_evals = 0
        self.row_evals = 0
        if like is not None and like.model is self.model and like.M == self.M:
            # the same model and test inputs at another step: the call layout is the same
            for k in ("unseen", "n_switches", "blocks", "block_funcs", "offsets", "K"):
                setattr(self, k, copy.copy(getattr(like, k)))
        else:
            self._layout_probe()

    # --- raw capture -------------------------------------------------------------------------
    def _capture(self, t, inputs):
        """Run the model at θ_s + tΔ_s (t: a scalar, possibly dual or batched) on ``inputs`` and
        record its switching functions. θ(t) is never formed: ops affine in their parameters are
        split along the segment (:class:`explaind_fast.quadrature.pathmode.PathMode`)."""
        rec = _Capture(self.funcs)
        handles = []
        for target, switch in self.modules:
            def pre_hook(mod, args, switch=switch):
                zs = switch(*args) if switch is not None else args[0]
                for z in _as_list(zs):
                    rec.switches.append((type(mod).__name__, "sign", z))
                    rec.funcs.append(type(mod))
                rec._check_done()
            for mod in self.model.modules():
                if mod is target or (isinstance(target, type) and isinstance(mod, target)):
                    handles.append(mod.register_forward_pre_hook(pre_hook))
        ps = self.layout.unflatten(self.theta)
        delta_of = {id(ps[k]): self.dparams[k] for k in ps}
        rec.stop_after = getattr(self, "n_switches", None)
        try:
            with self.fm.eager(), PathMode(delta_of, t, capture=rec):
                self.fm.call_with(self.fm.params_from(ps), inputs)
        except _Done:
            pass                  # every switching function is recorded: the rest is not needed
        finally:
            for h in handles:
                h.remove()
        return rec

    def _layout_probe(self):
        """Find each switch's batch dimension (the one that grows from 1 to 2 samples)."""
        mode1 = self._capture(torch.zeros((), dtype=self.theta.dtype),
                              _in.take(self.inputs, slice(0, 1)))
        self.unseen = sorted(set(mode1.unseen))
        shapes1 = [tuple(z.shape) for _, _, z in mode1.switches]
        if self.M >= 2:
            mode2 = self._capture(torch.zeros((), dtype=self.theta.dtype),
                                  _in.take(self.inputs, slice(0, 2)))
            shapes2 = [tuple(z.shape) for _, _, z in mode2.switches]
            if len(shapes2) != len(shapes1):
                raise RuntimeError("the model calls a different number of piecewise ops for 1 "
                                   "and 2 samples; kink detection needs a fixed call sequence")
        else:
            shapes2 = None
        self.n_switches = len(mode1.switches)    # later captures stop after the last one
        self.blocks = []  # (name, kind, batch dim, per-sample size, candidates)
        self.block_funcs = list(mode1.funcs)
        dropped = []
        for i, (name, kind, z) in enumerate(mode1.switches):
            s1 = shapes1[i]
            if shapes2 is None:
                bdim = 0 if len(s1) > 0 and s1[0] == 1 else None
            else:
                diff = [d for d in range(len(s1)) if s1[d] != shapes2[i][d]]
                bdim = diff[0] if len(diff) == 1 and s1[diff[0]] == 1 and shapes2[i][diff[0]] == 2 \
                    else None
            if bdim is None or (kind == "argmax" and bdim == len(s1) - 1):
                dropped.append(name)
                self.blocks.append(None)
                continue
            cand = s1[-1] if kind == "argmax" else 1
            size = math.prod(s1) // cand
            self.blocks.append((name, kind, bdim, size, cand))
        if dropped:
            self.unseen += sorted({f"{n} (not batched over the samples)" for n in dropped})
        self.offsets = [0]
        for b in self.blocks:
            self.offsets.append(self.offsets[-1] + (0 if b is None else b[3] * b[4]))
        self.K = self.offsets[-1]

    def _flat(self, switches, B):
        """Concatenate the captured switches into [B, K] (candidates of a max kept adjacent)."""
        if len(switches) != len(self.blocks):
            raise RuntimeError("the model called a different sequence of piecewise ops than "
                               "at the first evaluation; kink detection needs a fixed sequence")
        parts = []
        for (_, _, z), b in zip(switches, self.blocks):
            if b is None:
                continue
            parts.append(z.movedim(b[2], 0).reshape(B, -1))
        if not parts:
            return torch.zeros(B, 0, dtype=self.theta.dtype, device=self.theta.device)
        return torch.cat(parts, dim=1)

    # --- evaluations -------------------------------------------------------------------------
    def shared(self, t: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """Values and t-derivatives [M, K] of all switching functions at a shared t."""
        def f(tt):
            return self._flat(self._capture(tt, self.inputs).switches, self.M)
        t0 = torch.tensor(float(t), dtype=self.theta.dtype, device=self.theta.device)
        z, dz = jvp(f, (t0,), (torch.ones_like(t0),))
        self.shared_evals += 1
        return z.cpu(), dz.cpu()  # the search itself runs on the CPU (M·K values, small)

    def _row_chunk(self) -> int:
        """Rows per vmapped call: bounded by chunk_elems switching values (no per-row parameter
        vectors exist, so a row costs its activations only)."""
        return max(1, min(4096, self.chunk_elems // max(1, 8 * self.K)))

    def rows(self, sample: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Values and t-derivatives [R, K] of all switching functions of sample[r] at t[r]."""
        R = sample.shape[0]
        out_z, out_dz = [], []
        step = self._row_chunk()

        def one(tt, x):
            def f(t1):
                return self._flat(self._capture(t1, _in.unsqueeze(x)).switches, 1)[0]
            return jvp(f, (tt,), (torch.ones_like(tt),))

        for a in range(0, R, step):
            xs = _in.take(self.inputs, sample[a:a + step])
            z, dz = self.fm.vmap(one, (0, 0))(
                t[a:a + step].to(dtype=self.theta.dtype, device=self.theta.device), xs)
            out_z.append(z.cpu())
            out_dz.append(dz.cpu())
        self.row_evals += R
        if not out_z:
            empty = torch.zeros(0, self.K, dtype=self.theta.dtype)
            return empty, empty
        return torch.cat(out_z), torch.cat(out_dz)

    def values(self, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Values [R, K] of all switching functions of sample[r] at t[r] (no derivatives)."""
        R = sample.shape[0]
        outs = []
        step = self._row_chunk()

        def one(tt, x):
            return self._flat(self._capture(tt, _in.unsqueeze(x)).switches, 1)[0]

        with torch.no_grad():
            for a in range(0, R, step):
                xs = _in.take(self.inputs, sample[a:a + step])
                outs.append(self.fm.vmap(one, (0, 0))(
                    t[a:a + step].to(dtype=self.theta.dtype, device=self.theta.device),
                    xs).cpu())
        if not outs:
            return torch.zeros(0, self.K, dtype=self.theta.dtype)
        return torch.cat(outs)

    def values_shared(self, ts: torch.Tensor) -> torch.Tensor:
        """Values [q, M, K] of all switching functions at shared points ts [q], all samples."""
        def at(tt):
            return self._flat(self._capture(tt, self.inputs).switches, self.M)
        outs = []
        step = max(1, self._row_chunk() // max(1, self.M))
        with torch.no_grad():
            for a in range(0, len(ts), step):
                outs.append(vmap(at)(ts[a:a + step].to(dtype=self.theta.dtype,
                                                      device=self.theta.device)).cpu())
        return torch.cat(outs) if outs else torch.zeros(0, self.M, self.K, dtype=self.theta.dtype)
