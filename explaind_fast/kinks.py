"""Kink-aware quadrature: exact path integrals for ReLU / max-pool / piecewise models.

The test feature map of step s is φ_s(x) = ∫_0^1 J(θ_s + tΔ_s) dt (DESIGN.md §2). On a model with
piecewise operations (ReLU, abs, hardtanh, clamp, maximum, max-pool …) the integrand jumps wherever
one of the operation's *switching functions* z(t) (a pre-activation, or the difference between two
candidates of a max) changes sign along the path θ(t) = θ_s + tΔ_s. Between those breakpoints the
integrand is smooth, so Gauss–Legendre on each piece converges geometrically instead of like 1/n.

For every test sample this module finds the breakpoints t ∈ (0, 1):

1. **Capture.** The model is evaluated functionally under a ``TorchFunctionMode`` that records the
   switching functions of every piecewise torch call (``F.relu``, ``nn.ReLU``, ``torch.abs``,
   ``clamp``, ``maximum``, ``F.max_pool2d`` …; see :data:`SWITCHES`). Ops that are piecewise but that
   this rule cannot handle (``sign``, ``round``, ``topk`` …) are reported in ``Kinks.unseen`` and with
   a warning; users declare their own with ``activations=``.
2. **Bracket.** z and dz/dt (forward mode, ``torch.func.jvp``) are evaluated for all samples at once
   on a shared grid of ``grid + 1`` points. A sign change in a cell brackets a crossing; a cubic
   Hermite fit of (z, dz/dt) flags cells where z may dip through zero and come back, which are
   probed with one extra evaluation.
3. **Polish.** Each bracket is refined by safeguarded Newton iterations (falls back to bisection),
   evaluating that sample at its own t (``vmap`` over per-row parameters θ_s + tΔ_s), to
   ``tol_t`` (1e-14 by default) in t. For a max (max-pool, torch.max over a dim) every pair of
   candidates of a window is a switching function, and a root is kept only where one of the pair
   is the window's maximum (a real change of the argmax).
4. **Verify.** Downstream of a kink a switching function is only piecewise smooth inside its grid
   cell (ReLU after ReLU, max-pool after conv+ReLU), where the dip test is not trustworthy. Every
   cell holding kinks is re-scanned piece by piece, with one-sided values just inside each piece,
   until no piece reveals a new kink. Cells without kinks are smooth for every unit.

Only breakpoints strictly inside (0, 1) split the interval; ones closer than ``merge_tol`` are merged.
A unit that touches zero without crossing creates no breakpoint (the integrand is continuous there).
Switching functions are continuous in t even when upstream units switch (compositions of continuous
maps), so brackets always hold a root.

Known limits (the quadrature residual certifies every step and shows them): a dip through zero
that the cubic Hermite fit of a kink-free cell does not flag (its depth below the fit's error);
kinks closer than ``side`` (1e-11) to another kink; max-type ops with more than
:data:`PAIRWISE_MAX_CANDIDATES` candidates use differences to the cell-start argmax only.

Cost: ``grid + 1`` batched forward-mode passes over the M samples, plus about one to two
single-sample forward-mode passes per breakpoint to polish it and two to verify its pieces
(measured 2–4 per breakpoint, bench/bench_kinks.py). Peak memory: (grid + 1)·M·K floats for the
switching values (K = switching values per sample, e.g. MLP width, or candidates of all max-pool
windows) plus ``chunk_elems`` floats for the per-row parameter vectors θ_s + tΔ_s of the vmapped
single-sample passes.

Sign convention (of the quantities these nodes integrate): contributions to the *change*,
final = initial + kernel.sum() + reg.sum(); the paper's ψ is minus this.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp, vmap
from torch.overrides import TorchFunctionMode

from .layout import ParamLayout

from .quadrature import NodeSet, gauss_legendre

__all__ = ["kink_nodes", "find_kinks", "nodes_from_breakpoints", "quadrature_residual", "Kinks",
           "SWITCHES", "UNSUPPORTED"]


# ============================================================================ switching functions
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
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))


class _Capture(TorchFunctionMode):
    """Records the switching functions of every piecewise torch call made under it."""

    def __init__(self, extra: Dict[Callable, Callable]):
        super().__init__()
        self.extra = extra
        self.switches: List[Tuple[str, str, torch.Tensor]] = []  # (op name, kind, tensor)
        self.unseen: List[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        extractor = self.extra.get(func) or SWITCHES.get(func)
        if extractor is not None and any(_is_float_tensor(a) for a in args[:2]):
            try:
                for kind, z in extractor(args, kwargs):
                    if isinstance(z, torch.Tensor) and z.is_floating_point():
                        self.switches.append((_name(func), kind, z))
            except _Unsupported as why:
                self.unseen.append(f"{_name(func)} ({why})")
        elif func in UNSUPPORTED and args and _is_float_tensor(args[0]):
            self.unseen.append(_name(func))
        return func(*args, **kwargs)


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
                 chunk_elems: int):
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
        self.inputs = tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
        if not self.inputs or not all(isinstance(x, torch.Tensor) for x in self.inputs):
            raise ValueError("test_inputs must be a tensor or a tuple of tensors")
        self.M = self.inputs[0].shape[0]
        if any(x.shape[0] != self.M for x in self.inputs):
            raise ValueError("all test input tensors must share their leading (sample) dimension")
        trainable = set(layout.names)
        self.fixed = {}
        for n, p in list(model.named_parameters()) + list(model.named_buffers()):
            if n not in trainable:
                self.fixed[n] = (p.detach().to(theta.dtype) if p.is_floating_point()
                                 else p.detach())
        self.funcs, self.modules = _module_switches(activations)
        self.chunk_elems = chunk_elems
        self.unseen: List[str] = []
        self.shared_evals = 0
        self.row_evals = 0
        self._layout_probe()

    # --- raw capture -------------------------------------------------------------------------
    def _capture(self, t, inputs):
        params = self.layout.unflatten(self.theta + t * self.delta)
        mode = _Capture(self.funcs)
        handles = []
        for target, switch in self.modules:
            def pre_hook(mod, args, switch=switch):
                zs = switch(*args) if switch is not None else args[0]
                for z in _as_list(zs):
                    mode.switches.append((type(mod).__name__, "sign", z))
            for mod in self.model.modules():
                if mod is target or (isinstance(target, type) and isinstance(mod, target)):
                    handles.append(mod.register_forward_pre_hook(pre_hook))
        try:
            with mode:
                functional_call(self.model, {**self.fixed, **params}, inputs)
        finally:
            for h in handles:
                h.remove()
        return mode

    def _layout_probe(self):
        """Find each switch's batch dimension (the one that grows from 1 to 2 samples)."""
        mode1 = self._capture(torch.zeros((), dtype=self.theta.dtype),
                              tuple(x[:1] for x in self.inputs))
        self.unseen = sorted(set(mode1.unseen))
        shapes1 = [tuple(z.shape) for _, _, z in mode1.switches]
        if self.M >= 2:
            mode2 = self._capture(torch.zeros((), dtype=self.theta.dtype),
                                  tuple(x[:2] for x in self.inputs))
            shapes2 = [tuple(z.shape) for _, _, z in mode2.switches]
            if len(shapes2) != len(shapes1):
                raise RuntimeError("the model calls a different number of piecewise ops for 1 "
                                   "and 2 samples; kink detection needs a fixed call sequence")
        else:
            shapes2 = None
        self.blocks = []  # (name, kind, batch dim, per-sample size, candidates)
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

    def rows(self, sample: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Values and t-derivatives [R, K] of all switching functions of sample[r] at t[r]."""
        R = sample.shape[0]
        out_z, out_dz = [], []
        step = max(1, self.chunk_elems // max(1, self.layout.D + self.K))

        def one(tt, *xs):
            def f(t1):
                return self._flat(self._capture(t1, tuple(x[None] for x in xs)).switches, 1)[0]
            return jvp(f, (tt,), (torch.ones_like(tt),))

        for a in range(0, R, step):
            idx = sample[a:a + step]
            xs = tuple(x[idx.to(x.device)] for x in self.inputs)
            z, dz = vmap(one)(t[a:a + step].to(dtype=self.theta.dtype, device=self.theta.device),
                              *xs)
            out_z.append(z.cpu())
            out_dz.append(dz.cpu())
        self.row_evals += R
        if not out_z:
            empty = torch.zeros(0, self.K, dtype=self.theta.dtype)
            return empty, empty
        return torch.cat(out_z), torch.cat(out_dz)


# ============================================================================ breakpoint search
@dataclass
class Kinks:
    """Breakpoints of the path integrand of one step, per test sample.

    Attributes:
        breakpoints: list of M sorted float64 tensors, the kinks strictly inside (0, 1).
        num_switches: switching units per sample K (max candidates counted individually).
        shared_evals: batched forward-mode passes over all M samples (the bracketing grid).
        row_evals: single-sample forward-mode passes (probes and Newton polishing).
        unseen: piecewise ops the rule cannot see (their kinks are *not* in ``breakpoints``;
            the quadrature residual will show the error they cause).
        unconverged: breakpoints whose Newton/bisection did not reach ``tol_t``.
        unverified: kinks found in the last allowed verification round (their pieces were not
            re-scanned).
    """

    breakpoints: List[torch.Tensor]
    num_switches: int
    shared_evals: int
    row_evals: int
    unseen: List[str] = field(default_factory=list)
    unconverged: int = 0
    unverified: int = 0

    @property
    def pieces(self) -> torch.Tensor:
        """Number of smooth pieces per sample, int64 [M]."""
        return torch.tensor([len(b) + 1 for b in self.breakpoints], dtype=torch.int64)


#: max-type ops with at most this many candidates per window use all candidate pairs as switching
#: functions (a superset of the argmax changes, filtered at the root); larger ones use
#: differences to the argmax at the cell start (may miss a maximum that changes hands twice).
PAIRWISE_MAX_CANDIDATES = 16


def _switch_rows(path: _Path, z0, z1):
    """Switching functions of one grid cell [lo, hi] as index rows: z = V[i1] − V[i2] (V[K] = 0).

    Returns [M, R] int64 tensors (i1, i2, window start, window size) and a bool mask of the rows
    worth searching; window size 0 for sign switches. For a max, (window start, size) locate its
    candidates in V, so that a root is kept only where one of the pair is the window's maximum (a
    real change of the argmax). A window whose argmax is the same at lo and hi only needs the
    pairs with that argmax (it can only change hands and back through a dip of one of them).
    """
    M, K = z0.shape
    rows = []
    for b, off in zip(path.blocks, path.offsets[:-1]):
        if b is None:
            continue
        _, kind, _, size, cand = b
        if kind == "sign":
            i1 = off + torch.arange(size).expand(M, size)
            i2 = torch.full_like(i1, K)
            wb, ws = torch.full_like(i1, -1), torch.zeros_like(i1)
            keep = torch.ones_like(i1, dtype=torch.bool)
        else:
            a0 = z0[:, off:off + size * cand].reshape(M, size, cand).argmax(-1, keepdim=True)
            a1 = z1[:, off:off + size * cand].reshape(M, size, cand).argmax(-1, keepdim=True)
            base = off + torch.arange(size)[None, :, None] * cand  # [1, size, 1]
            if cand <= PAIRWISE_MAX_CANDIDATES:
                pi, pj = torch.triu_indices(cand, cand, offset=1)
                i1 = (base + pi).expand(M, size, len(pi)).reshape(M, -1)
                i2 = (base + pj).expand(M, size, len(pj)).reshape(M, -1)
                wb = base.expand(M, size, len(pi)).reshape(M, -1)
                keep = ((a0 != a1) | (pi == a0) | (pj == a0)).reshape(M, -1)
            else:
                i1 = (base + a0).expand(M, size, cand).reshape(M, -1)
                i2 = (base + torch.arange(cand)).expand(M, size, cand).reshape(M, -1)
                wb = base.expand(M, size, cand).reshape(M, -1)
                keep = torch.ones_like(i1, dtype=torch.bool)
            ws = torch.full_like(wb, cand)
        rows.append((i1, i2, wb, ws, keep))
    if not rows:
        e = torch.zeros(M, 0, dtype=torch.int64)
        return e, e, e, e, e.bool()
    return tuple(torch.cat([r[k] for r in rows], 1) for k in range(5))


def _gather(V, i):
    """V[m, i[m, j]] with a trailing zero slot (index K)."""
    Vp = torch.cat([V, torch.zeros(V.shape[0], 1, dtype=V.dtype)], dim=1)
    return Vp.gather(1, i)


def _hermite_extremum(z0, z1, m0, m1):
    """Extremum of the cubic Hermite fit p(0)=z0, p(1)=z1, p'(0)=m0, p'(1)=m1 (m = h·dz/dt) that
    reaches furthest towards the side opposite to ``ref`` = sign(z0) (sign(m0) where z0 = 0).
    Returns (τ ∈ (0,1), ref·p(τ), exists)."""
    a = 2 * (z0 - z1) + m0 + m1
    b = 3 * (z1 - z0) - 2 * m0 - m1
    A, B, C = 3 * a, 2 * b, m0  # p'(τ) = Aτ² + Bτ + C
    disc = B * B - 4 * A * C
    sq = torch.sqrt(torch.clamp(disc, min=0))
    # stable roots (no cancellation when A is tiny): q = −(B + sign(B)·√disc)/2, q/A and C/q
    one = torch.ones_like(A)
    q = -0.5 * (B + torch.where(B >= 0, sq, -sq))
    r1 = q / torch.where(A == 0, one, A)
    r1 = torch.where(A == 0, torch.full_like(A, float("nan")), r1)
    r2 = C / torch.where(q == 0, one, q)
    r2 = torch.where(q == 0, torch.full_like(A, float("nan")), r2)
    ref = torch.where(z0 != 0, torch.sign(z0), torch.sign(m0))
    tau = torch.full_like(z0, 0.5)
    low = torch.full_like(z0, float("inf"))
    exists = torch.zeros_like(z0, dtype=torch.bool)
    for r in (r1, r2):
        ok = (disc >= 0) & (r > 0) & (r < 1) & torch.isfinite(r)
        p = ref * (((a * r + b) * r + m0) * r + z0)
        better = ok & (p < low)
        tau = torch.where(better, r, tau)
        low = torch.where(better, p, low)
        exists = exists | ok
    return tau, low, exists


def _hermite_root(z0, z1, m0, m1, iters: int = 4):
    """Root τ of the cubic Hermite fit in a sign-change cell (safeguarded Newton from the secant)."""
    a = 2 * (z0 - z1) + m0 + m1
    b = 3 * (z1 - z0) - 2 * m0 - m1
    tau = z0 / (z0 - z1)
    for _ in range(iters):
        p = ((a * tau + b) * tau + m0) * tau + z0
        dp = (3 * a * tau + 2 * b) * tau + m0
        nxt = tau - p / torch.where(dp == 0, torch.ones_like(dp), dp)
        tau = torch.where((dp != 0) & (nxt > 0) & (nxt < 1), nxt, tau)
    return tau


def find_kinks(model: torch.nn.Module, layout: ParamLayout, theta_s: torch.Tensor,
               delta_s: torch.Tensor, test_inputs, *, activations=None, grid: int = 4,
               tol_t: float = 1e-14, max_iter: int = 60, verify: bool = True,
               max_rounds: int = 20, side: float = 1e-11, merge_tol: float = 1e-12,
               chunk_elems: int = 1 << 24, warn: bool = True) -> Kinks:
    """Breakpoints t ∈ (0, 1) of t ↦ J(θ_s + tΔ_s) for each test sample (see module docstring).

    Args:
        model: the model; evaluated functionally with torch.func.functional_call at the trainable
            parameters θ_s + tΔ_s (``layout`` order) and its own frozen parameters and buffers
            (cast to θ's dtype). Put it in eval mode (dropout would make the path random).
        layout: flat parameter layout of θ.
        theta_s, delta_s: flat [D] tensors, θ_s and Δ_s = θ_{s+1} − θ_s.
        test_inputs: tensor [M, ...] or tuple of tensors with leading dim M (the model's args).
        activations: extra piecewise ops: nn.Module instances or classes (kink where an element of
            the module's first input crosses 0), torch callables (kink at 0 of the first arg),
            or pairs (module_or_callable, switch) with switch(*args) -> tensor(s) whose sign
            changes mark the kinks.
        grid: cells of the shared bracketing grid (grid + 1 batched forward-mode passes).
        tol_t: absolute tolerance on each breakpoint.
        verify: re-scan the pieces of every grid cell that holds kinks (needed when piecewise
            ops feed each other, e.g. ReLU after ReLU: a downstream unit's switching function is
            then only piecewise smooth in its cell). Costs two single-sample passes per kink.
        max_rounds: bound on verification rounds (kinks found in the last one count in
            ``Kinks.unverified``). side: offset of the one-sided values inside each piece.
        merge_tol: kinks closer than this are one.
        chunk_elems: bound on rows × (D + K) floats held by one vmapped polishing chunk.
        warn: emit a warning naming piecewise ops the rule cannot see.
    """
    if grid < 1:
        raise ValueError(f"grid must be ≥ 1 cell, got {grid}")
    path = _Path(model, layout, theta_s, delta_s, test_inputs, activations, chunk_elems)
    if path.unseen and warn:
        warnings.warn("kink quadrature: the model uses piecewise ops whose breakpoints it cannot "
                      f"find: {', '.join(path.unseen)}; the quadrature residual will show their "
                      "error", stacklevel=2)
    M, K = path.M, path.K
    dtype = theta_s.dtype
    found: List[List[torch.Tensor]] = [[] for _ in range(M)]
    kinks = Kinks(breakpoints=[], num_switches=K, shared_evals=0, row_evals=0,
                  unseen=list(path.unseen))
    if K == 0:
        kinks.breakpoints = [torch.zeros(0, dtype=torch.float64) for _ in range(M)]
        return kinks

    ts = torch.linspace(0, 1, grid + 1, dtype=torch.float64)
    Z, DZ = zip(*(path.shared(float(t)) for t in ts))
    cells = torch.arange(grid).repeat_interleave(M)          # interval rows: cell-major
    sample = torch.arange(M).repeat(grid)
    hits, brackets, probes = _scan(
        path, sample, ts[cells], ts[cells + 1], torch.cat(Z[:-1]), torch.cat(DZ[:-1]),
        torch.cat(Z[1:]), torch.cat(DZ[1:]), interior_lo=cells > 0)
    roots, bad = _resolve(path, brackets, probes, tol_t, max_iter, dtype)
    kinks.unconverged += bad
    for m, t in hits + roots:
        found[m].append(t)
    if verify:
        # a switching function downstream of a kink is only piecewise smooth in its grid cell, so
        # the Hermite dip test is not trusted there: re-scan every piece between the knots of
        # each cell that holds kinks, with one-sided values just inside the piece, until no piece
        # reveals a new kink. Cells without kinks are smooth for every unit and need no second look.
        cache: Dict[Tuple[int, float], Tuple[torch.Tensor, torch.Tensor]] = {}
        new = roots + hits
        for _ in range(max_rounds):
            if not new:
                break
            todo = sorted({(m, min(int(t * grid), grid - 1)) for m, t in new})
            pieces = []
            for m, c in todo:
                lo_c, hi_c = float(ts[c]), float(ts[c + 1])
                inner = sorted(t for t in found[m] if lo_c < t < hi_c)
                knots = [lo_c] + inner + [hi_c]
                for a_, b_ in zip(knots[:-1], knots[1:]):
                    if b_ - a_ > 4 * side:
                        pieces.append((m, c, a_, b_, a_ != lo_c, b_ != hi_c))
            need = sorted({(m, a_ + side) for m, _, a_, _, sa, _ in pieces if sa} |
                          {(m, b_ - side) for m, _, _, b_, _, sb in pieces if sb})
            need = [key for key in need if key not in cache]
            if need:
                V, DV = path.rows(torch.tensor([k[0] for k in need]),
                                  torch.tensor([k[1] for k in need], dtype=dtype))
                for r, key in enumerate(need):
                    cache[key] = (V[r], DV[r])
            if not pieces:
                break

            def end(m, c, t, shift, inside):
                if inside:
                    return (t + shift,) + cache[(m, t + shift)]
                return (t, Z[round(t * grid)][m], DZ[round(t * grid)][m])
            L = [end(m, c, a_, side, sa) for m, c, a_, _, sa, _ in pieces]
            R = [end(m, c, b_, -side, sb) for m, c, _, b_, _, sb in pieces]
            smp = torch.tensor([p[0] for p in pieces])
            hits2, brackets2, probes2 = _scan(
                path, smp, torch.tensor([x[0] for x in L], dtype=torch.float64),
                torch.tensor([x[0] for x in R], dtype=torch.float64),
                torch.stack([x[1] for x in L]), torch.stack([x[2] for x in L]),
                torch.stack([x[1] for x in R]), torch.stack([x[2] for x in R]),
                interior_lo=torch.tensor([p[4] or p[1] > 0 for p in pieces]))
            roots2, bad = _resolve(path, brackets2, probes2, tol_t, max_iter, dtype)
            kinks.unconverged += bad
            new = []
            for m, t in hits2 + roots2:
                if all(abs(t - u) > merge_tol for u in found[m]):
                    found[m].append(t)
                    new.append((m, t))
        else:
            if new:
                kinks.unverified = len(new)
    kinks.breakpoints = [torch.sort(torch.tensor(f, dtype=torch.float64))[0] for f in found]
    kinks.shared_evals, kinks.row_evals = path.shared_evals, path.row_evals
    return kinks


def _scan(path, sample, lo, hi, Vlo, DVlo, Vhi, DVhi, interior_lo):
    """Find what crosses zero inside intervals (sample[i], lo[i], hi[i]) from the values and
    t-derivatives [I, K] of all switching functions at both ends.

    Returns (hits, brackets, probes): hits are (sample, t) of exact zeros with a sign change at
    an interval start marked ``interior_lo``; brackets are sign changes to polish; probes are
    Hermite-flagged dips (or crossings right after an exact zero) to evaluate once.
    """
    h = (hi - lo).to(Vlo.dtype)[:, None]
    i1, i2, wb, ws, keep = _switch_rows(path, Vlo, Vhi)
    z0 = _gather(Vlo, i1) - _gather(Vlo, i2)
    z1 = _gather(Vhi, i1) - _gather(Vhi, i2)
    m0 = h * (_gather(DVlo, i1) - _gather(DVlo, i2))
    m1 = h * (_gather(DVhi, i1) - _gather(DVhi, i2))
    hits = []
    at_knot = keep & interior_lo[:, None] & (z0 == 0) & (m0 != 0)
    for r in torch.nonzero(at_knot.any(1)).flatten().tolist():
        hits.append((int(sample[r]), float(lo[r])))
    cross = keep & (z0 * z1 < 0)
    # the Hermite fit stays within (|m0 − Δz| + |m1 − Δz|)/4 of the chord, Δz = z1 − z0: only rows
    # that this bound lets come near zero can dip, so the cubic is solved for those alone
    dz = z1 - z0
    slack = ((m0 - dz).abs() + (m1 - dz).abs()) / 4
    scale = torch.maximum(z0.abs(), z1.abs())
    maybe = keep & ~cross & (torch.minimum(z0.abs(), z1.abs()) - slack < 0.1 * scale)
    r, k = torch.nonzero(maybe, as_tuple=True)
    a0, a1, b0, b1 = z0[r, k], z1[r, k], m0[r, k], m1[r, k]
    tau_d, low, has_ext = _hermite_extremum(a0, a1, b0, b1)
    dip = ((a0 * a1 > 0) & has_ext & (low < 0.1 * scale[r, k])) | ((a0 == 0) & (b0 * a1 < 0))
    r, k, tau_d = r[dip], k[dip], tau_d[dip]
    span = (hi - lo)[r]
    probes = (sample[r], i1[r, k], i2[r, k], wb[r, k], ws[r, k], lo[r], hi[r], z0[r, k],
              z1[r, k], lo[r] + span * tau_d.to(torch.float64))
    r, k = torch.nonzero(cross, as_tuple=True)
    tau_r = _hermite_root(z0[r, k], z1[r, k], m0[r, k], m1[r, k])
    span = (hi - lo)[r]
    brackets = [(sample[r], i1[r, k], i2[r, k], wb[r, k], ws[r, k], lo[r], hi[r], z0[r, k],
                 lo[r] + span * tau_r.to(torch.float64))]
    return hits, brackets, probes


def _resolve(path, brackets, probes, tol_t, max_iter, dtype):
    """Evaluate the probes, then polish all brackets. Returns ([(sample, t)], unconverged)."""
    hits = []
    dm, pi1, pi2, pwb, pws, lo, hi, z0p, z1p, tp = probes
    if len(dm):
        V, DV = path.rows(dm, tp.to(dtype))
        zp = (_gather(V, pi1[:, None]) - _gather(V, pi2[:, None]))[:, 0].to(z0p.dtype)
        dzp = (_gather(DV, pi1[:, None]) - _gather(DV, pi2[:, None]))[:, 0]
        crossing_here = (zp == 0) & (dzp != 0)  # zp = 0 with zero slope is a touch: no kink
        hits += [(m, t) for m, t in zip(dm[crossing_here].tolist(), tp[crossing_here].tolist())]
        for a_t, b_t, za, zb in ((lo, tp, z0p, zp), (tp, hi, zp, z1p)):
            f = torch.nonzero(za * zb < 0).flatten()
            guess = a_t[f] + (b_t[f] - a_t[f]) * (za[f] / (za[f] - zb[f])).to(torch.float64)
            brackets.append((dm[f], pi1[f], pi2[f], pwb[f], pws[f], a_t[f], b_t[f], za[f], guess))
    s, i1, i2, wb, ws, lo, hi, zlo, t = (torch.cat(parts) for parts in zip(*brackets))
    if len(s) == 0:
        return hits, 0
    t = torch.where((t > lo) & (t < hi), t, 0.5 * (lo + hi))
    final, done, real = _polish(path, s, i1, i2, wb, ws, lo.clone(), hi.clone(), torch.sign(zlo),
                                t, tol_t, max_iter, dtype)
    return hits + list(zip(s[real].tolist(), final[real].tolist())), int((~done).sum())


def _polish(path, s, i1, i2, wb, ws, lo, hi, slo, t, tol_t, max_iter, dtype):
    """Safeguarded Newton on z(t) = V[i1] − V[i2] inside [lo, hi] (z has sign slo at lo).

    Returns (breakpoint, converged, real): ``real`` is False for a crossing of two candidates of
    a max neither of which is the window's maximum there (no change of the argmax, no kink).
    """
    final = t.clone()
    done = torch.zeros(len(s), dtype=torch.bool)
    real = torch.ones(len(s), dtype=torch.bool)
    cmax = int(ws.max()) if len(ws) else 0
    active = torch.arange(len(s))
    for _ in range(max_iter):
        if len(active) == 0:
            break
        V, DV = path.rows(s[active], t[active].to(dtype))
        ia, ib = i1[active, None], i2[active, None]
        z = (_gather(V, ia) - _gather(V, ib))[:, 0].to(torch.float64)
        dz = (_gather(DV, ia) - _gather(DV, ib))[:, 0].to(torch.float64)
        ta = t[active]
        same = torch.sign(z) == slo[active]
        lo[active] = torch.where(same & (z != 0), ta, lo[active])
        hi[active] = torch.where(~same & (z != 0), ta, hi[active])
        step = z / torch.where(dz == 0, torch.ones_like(dz), dz)
        newton = ta - step
        ok = (dz != 0) & (newton > lo[active]) & (newton < hi[active])
        nxt = torch.where(ok, newton, 0.5 * (lo[active] + hi[active]))
        # a Newton step below tol_t has converged even if rounding puts it on the bracket's edge
        tiny = (dz != 0) & (step.abs() <= tol_t)
        conv = (z == 0) | tiny | ((hi[active] - lo[active]) <= tol_t)
        final[active] = torch.where(z == 0, ta, torch.where(
            tiny, torch.minimum(torch.maximum(newton, lo[active]), hi[active]), nxt))
        done[active] = conv
        if cmax:  # at convergence, is one of the pair the maximum of its window?
            win = ws[active] > 0
            idx = wb[active, None] + torch.arange(cmax)
            valid = win[:, None] & (torch.arange(cmax) < ws[active, None])
            C = _gather(V, torch.where(valid, idx, V.shape[1])).to(torch.float64)
            top = torch.where(valid, C, torch.full_like(C, -float("inf"))).amax(1)
            pair = torch.maximum(_gather(V, ia), _gather(V, ib))[:, 0].to(torch.float64)
            tie = 1e-10 * torch.clamp(top.abs(), min=1.0)
            real[active] = torch.where(win & conv, pair >= top - tie, real[active])
        t[active] = nxt
        active = active[~conv]
    return final, done, real


# ============================================================================ nodes
def _pieces(breaks: torch.Tensor, merge_tol: float) -> torch.Tensor:
    """Piece boundaries 0 = b_0 < … < b_P = 1 from sorted breakpoints (close ones merged)."""
    keep = [0.0]
    for b in breaks.tolist():
        if b - keep[-1] > merge_tol and 1.0 - b > merge_tol:
            keep.append(b)
    keep.append(1.0)
    return torch.tensor(keep, dtype=torch.float64)


#: default analyticity scale of the per-piece node taper (see nodes_from_breakpoints); the
#: measured value on the ReLU transformer is about 0.01 (GL-1 error ≈ ρ², GL-2 ≈ ρ⁴), so 0.1 is
#: conservative by an order of magnitude.
TAPER_RHO = 0.1


def nodes_per_piece(length: torch.Tensor, n: int, rho: Optional[float]) -> torch.Tensor:
    """Gauss–Legendre order m for pieces of the given lengths, int64.

    Error model: m nodes on a piece of length L err ≈ L·(ρL)^{2m} (geometric convergence for an
    integrand analytic in a ρ-scaled neighbourhood), n nodes on [0, 1] err ≈ ρ^{2n}. The smallest m
    with L^{2m+1}ρ^{2m} ≤ ρ^{2n} is m = ⌈(2n ln ρ − ln L) / (2 ln(ρL))⌉, clamped to [1, n].
    ``rho=None`` gives n everywhere.
    """
    if rho is None:
        return torch.full(length.shape, n, dtype=torch.int64)
    L = length.clamp(min=1e-300, max=1.0)
    lr = math.log(rho)
    m = torch.ceil((2 * n * lr - torch.log(L)) / (2 * (lr + torch.log(L))) - 1e-9)
    return m.clamp(1, n).to(torch.int64)


def _piece_rule(edges: torch.Tensor, n: int, rho: Optional[float]):
    L = edges[1:] - edges[:-1]
    orders = nodes_per_piece(L, n, rho)
    ts, ws = [], []
    for m in sorted(set(orders.tolist())):
        tq, wq = gauss_legendre(m)
        sel = orders == m
        ts.append((edges[:-1][sel, None] + L[sel, None] * tq).reshape(-1))
        ws.append((L[sel, None] * wq).reshape(-1))
    t, w = torch.cat(ts), torch.cat(ws)
    order = torch.argsort(t)
    return t[order], w[order]


def nodes_from_breakpoints(breakpoints: Sequence[torch.Tensor], n: int, *, common: bool = False,
                           merge_tol: float = 1e-12, taper: Optional[float] = None) -> NodeSet:
    """Composite Gauss–Legendre rule: n nodes on each piece between consecutive breakpoints.

    Per sample (``common=False``): t, w of shape [M, Q] with Q = the most nodes of any sample;
    samples with fewer are padded with weight-0 nodes at t = 0.5. ``common=True``: one shared rule
    [Q] on the union of all samples' breakpoints (exact for every sample, more nodes each).
    ``taper=ρ``: fewer nodes on short pieces (:func:`nodes_per_piece`), None: n on every piece.
    """
    if n < 1:
        raise ValueError(f"kinks:n needs n ≥ 1 Gauss–Legendre nodes per piece, got {n}")
    if common:
        allb = torch.sort(torch.cat([b.to(torch.float64) for b in breakpoints]))[0] \
            if len(breakpoints) else torch.zeros(0, dtype=torch.float64)
        return NodeSet(*_piece_rule(_pieces(allb, merge_tol), n, taper))
    rules = [_piece_rule(_pieces(b.to(torch.float64), merge_tol), n, taper) for b in breakpoints]
    Q = max((len(r[0]) for r in rules), default=n)
    t = torch.full((len(rules), Q), 0.5, dtype=torch.float64)
    w = torch.zeros((len(rules), Q), dtype=torch.float64)
    for m, (tm, wm) in enumerate(rules):
        t[m, :len(tm)] = tm
        w[m, :len(wm)] = wm
    return NodeSet(t=t, w=w)


def kink_nodes(model: torch.nn.Module, layout: ParamLayout, theta_s: torch.Tensor,
               delta_s: torch.Tensor, test_inputs, n: int, *, activations=None,
               common: bool = False, taper: Optional[float] = None, **search) -> NodeSet:
    """Kink-aware quadrature nodes for step s: Gauss–Legendre-n on each smooth piece per sample.

    Returns NodeSet with t, w float64 [M, Q] (per sample, zero-padded; ``common=True``: shared
    [Q]), n nodes on every piece: exact to rounding for integrands that are polynomials of degree
    ≤ 2n−1 on each piece, geometrically convergent on smooth pieces. ``taper=ρ`` (e.g.
    :data:`TAPER_RHO`) gives short pieces fewer nodes (:func:`nodes_per_piece`): cheaper, but
    only as accurate as its error model (not exact on strongly curved polynomial pieces). ``search`` goes to :func:`find_kinks`
    (grid, tol_t, chunk_elems, warn). Cost and memory: see :func:`find_kinks`.
    """
    kinks = find_kinks(model, layout, theta_s, delta_s, test_inputs, activations=activations,
                       **search)
    return nodes_from_breakpoints(kinks.breakpoints, n, common=common, taper=taper)


def quadrature_residual(model: torch.nn.Module, layout: ParamLayout, theta_s: torch.Tensor,
                        delta_s: torch.Tensor, test_inputs, nodes: NodeSet, *,
                        chunk_elems: int = 1 << 24) -> Tuple[torch.Tensor, torch.Tensor]:
    """Residual of a rule on the path integral, with forward passes only (DESIGN.md §2).

    residual = f(θ_s + Δ_s)(x) − f(θ_s)(x) − Σ_q w_q J(θ_s + t_q Δ_s)·Δ_s, per sample and output,
    where J·Δ_s = d/dt f(θ_s + tΔ_s) is one forward-mode pass. ``nodes``: [Q] shared or [M, Q].
    Returns (residual, change) float tensors [M, *out] in θ's dtype; zero-weight padding nodes
    are skipped. Peak memory ≈ chunk_elems floats for the per-row parameter vectors.
    """
    inputs = tuple(test_inputs) if isinstance(test_inputs, (list, tuple)) else (test_inputs,)
    M = inputs[0].shape[0]
    trainable = set(layout.names)
    fixed = {n: (p.detach().to(theta_s.dtype) if p.is_floating_point() else p.detach())
             for n, p in list(model.named_parameters()) + list(model.named_buffers())
             if n not in trainable}
    delta_s = delta_s.to(theta_s.dtype)

    def f(t, xs):
        return functional_call(model, {**fixed, **layout.unflatten(theta_s + t * delta_s)}, xs)

    zero = torch.zeros((), dtype=theta_s.dtype)
    change = f(zero + 1, inputs) - f(zero, inputs)
    t, w = nodes.t, nodes.w
    if t.dim() == 1:
        t, w = t.expand(M, -1), w.expand(M, -1)
    sample, q = torch.nonzero(w != 0, as_tuple=True)

    def one(tt, *xs):
        return jvp(lambda t1: f(t1, tuple(x[None] for x in xs))[0], (tt,), (torch.ones_like(tt),))[1]

    step = max(1, chunk_elems // max(1, layout.D))
    integral = torch.zeros_like(change)
    for a in range(0, len(sample), step):
        sm, qq = sample[a:a + step], q[a:a + step]
        dev = theta_s.device
        g = vmap(one)(t[sm, qq].to(dtype=theta_s.dtype, device=dev),
                      *(x[sm.to(x.device)] for x in inputs))
        wq = w[sm, qq].to(dtype=g.dtype, device=dev).reshape(-1, *([1] * (g.dim() - 1)))
        integral.index_add_(0, sm.to(dev), wq * g)
    return change - integral, change
