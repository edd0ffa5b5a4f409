"""Evaluating a model along the segment θ(t) = θ_s + tΔ_s, many (sample, t) rows at once, without
forming θ(t) per row (docs/design.md §4.3).

A per-sample rule puts every test sample at its own nodes t_{m,q}. Evaluating f(θ_s + t_{m,q}Δ_s)
with ``vmap`` over per-row parameter vectors gives every row its own copy of the D weights: no
weight reuse (batched GEMVs instead of one GEMM) and [rows, D] temporaries per chunk, which the
kernel has to zero page by page (the page-fault storm of the kink rule). Instead, every op that is
affine in its parameters is split along the segment,

    op(x; p_s + tΔp) = op(x; p_s) + t·(op(x; Δp) − op(x; 0)),

e.g. linear(x; W_s + tΔW, b_s + tΔb) = x W_sᵀ + b_s + t·(x ΔWᵀ + Δb): two GEMMs with shared
weights for any mix of per-row t. :class:`PathMode` does this for ``F.linear``, ``F.conv*``,
``F.embedding`` and the affine part of ``F.batch_norm`` / ``layer_norm`` / ``group_norm`` /
``instance_norm``; any other op that touches a parameter gets that one tensor materialised as
p_s + tΔp (correct for every op, only slower). It also

* computes ``F.linear`` as one GEMM over the flattened leading dims (functorch's batching rule
  for a linear with a batched weight broadcasts the weight over the samples and copies it),
* records the switching values of piecewise ops for the kink search (``capture``), and
* replaces the piecewise ops of a model by *soft activation patterns* (``patterns``): relu(z) by
  μ⊙z, leaky_relu by z⊙(μ + a(1 − μ)), abs by z⊙(2μ − 1), one μ per unit and row
  (:mod:`.kinks.patterns` explains why this integrates ReLU models exactly at shared nodes).

:class:`PathFunction` wraps a test function and one step's segment and evaluates rows in the three
shapes the engine needs: values, JVPs along a batch of tangents, and per-row Jacobians.
Evaluation order: ``vmap`` over tangents outside, ``jvp`` inside, ``vmap`` over rows innermost, so
the primal runs once for all tangents and the weights are shared by all rows; at shared nodes
with θ(t_q) formed per node, ``vmap`` over the nodes outside, then tangents, then ``jvp`` (a
tangent is then not copied per node).
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.func import jacrev, jvp, vmap
from torch.overrides import TorchFunctionMode

from ..model import inputs as _in
from ..model.layout import own_storage

# tensor-metadata queries that must see the parameter itself (never materialised)
_METADATA = frozenset({"dim", "size", "numel", "stride", "is_contiguous", "is_floating_point",
                       "element_size", "storage_offset", "ndimension", "nelement", "__len__",
                       "is_complex", "get_device", "data_ptr", "untyped_storage", "is_leaf",
                       "__hash__", "__format__", "__repr__", "__bool__", "type", "is_sparse"})
# properties that return a tensor computed from the parameter (materialised like any other op)
_TENSOR_PROPERTIES = frozenset({"T", "mT", "H", "mH", "data", "real", "imag"})

_RELU = tuple(f for f in (F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu,
                          torch.Tensor.relu_) if f is not None)
_LEAKY = tuple(f for f in (F.leaky_relu, F.leaky_relu_) if f is not None)
_ABS = tuple(f for f in (torch.abs, torch.abs_, torch.absolute, torch.Tensor.abs,
                         torch.Tensor.abs_, torch.Tensor.absolute, torch.Tensor.__abs__)
             if f is not None)
#: piecewise ops that soft activation patterns can stand in for (one switching tensor each)
SOFT_OPS = frozenset(_RELU + _LEAKY + _ABS)


class FoldMismatch(Exception):
    """Rows folded into the model's batch (per-row t as a vector) do not fit this model: an op's
    output does not keep the rows on dim 0, or a parameter is used outside a split op."""


def _arg(args, kwargs, i, name, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def flat_linear(x: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor] = None):
    """F.linear as one matmul over the flattened leading dims of x (same numbers)."""
    y = (x.reshape(-1, x.shape[-1]) @ W.t()).reshape(*x.shape[:-1], W.shape[0])
    return y if b is None else y + b


def _soft(func, args, kwargs, z, mu):
    """The soft-pattern form of piecewise op ``func`` at input z with unit weights mu."""
    if func in _RELU:
        return z * mu
    if func in _LEAKY:
        a = _arg(args, kwargs, 1, "negative_slope", 0.01)
        return z * (mu + a * (1 - mu))
    return z * (2 * mu - 1)                                              # abs


class PathMode(TorchFunctionMode):
    """Evaluates a model whose trainable parameters are given at θ_s, as if they were at
    θ_s + t·Δ_s (see the module docstring).

    delta_of: {id(parameter tensor passed to the model): its Δ tensor}; t: a scalar (python
    float or 0-d tensor, batched under vmap) or None (no path: parameters as given).
    capture: an object with ``watches(func)`` and ``observe(func, args, kwargs)``, called before
    every op it watches, with the parameters among the args taken at t (the kink search's
    switching-value recorder). patterns: (soft-pattern weights per block, [B, U_b] in the
    call's batch layout, and each block's batch dim) for the piecewise ops, in call order.
    """

    def __init__(self, delta_of: Optional[Dict[int, torch.Tensor]] = None, t=None, *,
                 capture=None, patterns: Optional[Sequence] = None, is_piecewise=None):
        super().__init__()
        self.delta_of = delta_of or {}
        self.t = t
        self.capture = capture
        self.patterns = patterns
        self.is_piecewise = is_piecewise
        self.block = 0

    # ------------------------------------------------------------------ helpers
    def tb(self, y: torch.Tensor) -> torch.Tensor:
        """t broadcast against an op's output y: a scalar as it is; a vector of per-row t (rows
        folded into the batch) along y's dim 0, which must be the rows."""
        t = self.t
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        if y.dim() == 0 or y.shape[0] != t.shape[0]:
            raise FoldMismatch(f"an op's output {tuple(y.shape)} has no row dim of {t.shape[0]}")
        return t.reshape((-1,) + (1,) * (y.dim() - 1))

    def _d(self, x):
        return self.delta_of.get(id(x)) if isinstance(x, torch.Tensor) else None

    def _at_t(self, x):
        d = self._d(x)
        if d is None:
            return x
        if isinstance(self.t, torch.Tensor) and self.t.dim() > 0:
            raise FoldMismatch("a parameter used outside a split op cannot take per-row t")
        return x + self.t * d

    def _fix(self, a):
        """a with every parameter (also inside lists and tuples) replaced by p_s + tΔp."""
        if isinstance(a, (list, tuple)):
            return type(a)(self._fix(b) for b in a)
        return self._at_t(a)

    def _materialise(self, func, args, kwargs):
        return func(*self._fix(args), **{k: self._fix(v) for k, v in kwargs.items()})

    def _touches(self, args, kwargs) -> bool:
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, torch.Tensor):
                if id(a) in self.delta_of:
                    return True
            elif isinstance(a, (list, tuple)):
                if any(isinstance(b, torch.Tensor) and id(b) in self.delta_of for b in a):
                    return True
        return False

    # ------------------------------------------------------------------ dispatch
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.capture is not None and self.capture.watches(func):
            if self.delta_of and self.t is not None and self._touches(args, kwargs):
                args, kwargs = self._fix(args), {k: self._fix(v) for k, v in kwargs.items()}
            self.capture.observe(func, args, kwargs)
        if self.patterns is not None and func in SOFT_OPS and self.is_piecewise(func, args):
            if self.block < len(self.patterns):
                mu, bdim = self.patterns[self.block]
                self.block += 1
                z = self._at_t(args[0])
                mu = mu.reshape((z.shape[bdim],) + tuple(z.movedim(bdim, 0).shape[1:]))
                return _soft(func, args, kwargs, z, mu.movedim(0, bdim).to(z.dtype))
            self.block += 1
        if self.delta_of and self.t is not None:
            handler = _SPLIT.get(func)
            if handler is not None:
                out = handler(self, args, kwargs)
                if out is not NotImplemented:
                    return out
            if self._touches(args, kwargs):
                name = getattr(func, "__name__", "")
                if name in _METADATA:
                    return func(*args, **kwargs)
                if name == "__get__":
                    prop = getattr(getattr(func, "__self__", None), "__name__", "")
                    if prop not in _TENSOR_PROPERTIES:
                        return func(*args, **kwargs)
                return self._materialise(func, args, kwargs)
        if func is F.linear:
            return flat_linear(args[0], _arg(args, kwargs, 1, "weight"),
                               _arg(args, kwargs, 2, "bias"))
        if func is F.batch_norm:
            out = _batch_norm_eval(self, args, kwargs)
            if out is not NotImplemented:
                return out
        return func(*args, **kwargs)


# ---------------------------------------------------------------- ops split along the segment
def _split_linear(mode, args, kwargs):
    x, W, b = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    dW, db = mode._d(W), mode._d(b)
    if dW is None and db is None:
        return NotImplemented
    if mode._d(x) is not None:
        return NotImplemented
    y = flat_linear(x, W, b)
    if dW is None:
        return y + mode.tb(y) * db
    return y + mode.tb(y) * flat_linear(x, dW, db)


def _split_conv(conv):
    def split(mode, args, kwargs):
        x, W, b = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        dW, db = mode._d(W), mode._d(b)
        if (dW is None and db is None) or mode._d(x) is not None:
            return NotImplemented
        rest, kw = args[3:], {k: v for k, v in kwargs.items() if k not in ("weight", "bias")}
        if dW is not None and _arg(args, kwargs, 6, "groups", 1) == 1:
            # one convolution with [W; ΔW] stacked on the output channels: the input is unfolded
            # once for both (float64 convolutions on CPU are im2col + GEMM)
            bb = None
            if b is not None or db is not None:
                bb = torch.cat([b if b is not None else torch.zeros_like(db),
                                db if db is not None else torch.zeros_like(b)])
            out = conv(x, torch.cat([W, dW]), bb, *rest, **kw)
            y, part = out.chunk(2, dim=out.dim() - W.dim() + 1)       # channels (unbatched: 0)
            return y + mode.tb(y) * part
        y = conv(x, W, b, *rest, **kw)
        if dW is None:
            return y + mode.tb(y) * db.reshape((1, -1) + (1,) * (y.dim() - 2))
        return y + mode.tb(y) * conv(x, dW, db, *rest, **kw)
    return split


def _split_embedding(mode, args, kwargs):
    idx, W = args[0], _arg(args, kwargs, 1, "weight")
    dW = mode._d(W)
    if dW is None or _arg(args, kwargs, 3, "max_norm") is not None:
        return NotImplemented
    rest, kw = args[2:], {k: v for k, v in kwargs.items() if k != "weight"}
    y = F.embedding(idx, W, *rest, **kw)
    return y + mode.tb(y) * F.embedding(idx, dW, *rest, **kw)


def _split_norm(norm, w_pos, b_pos, channel_dim):
    """Norms affine in (weight, bias): norm(x; γ, β) = x̂·γ + β."""
    def split(mode, args, kwargs):
        args = list(args)
        w = _arg(args, kwargs, w_pos, "weight")
        b = _arg(args, kwargs, b_pos, "bias")
        dw, db = mode._d(w), mode._d(b)
        if (dw is None and db is None) or mode._d(args[0]) is not None:
            return NotImplemented

        def call(wv, bv):
            a, kw = list(args), dict(kwargs)
            for pos, name, v in ((w_pos, "weight", wv), (b_pos, "bias", bv)):
                if len(a) > pos:
                    a[pos] = v
                else:
                    kw[name] = v
            return norm(*a, **kw)
        y = norm(*args, **kwargs)
        if dw is not None:
            part = call(dw, db)                                    # x̂·Δγ (+ Δβ)
        else:
            part = None
        if db is not None and dw is None:
            shape = [1] * y.dim()
            if channel_dim is None:                                # trailing normalized dims
                part = db.expand(y.shape)
            else:
                shape[channel_dim] = -1
                part = db.reshape(shape).expand(y.shape)
        return y + mode.tb(y) * part
    return split


_SPLIT: Dict[Callable, Callable] = {F.linear: _split_linear, F.embedding: _split_embedding}
for _conv in (F.conv1d, F.conv2d, F.conv3d):
    _SPLIT[_conv] = _split_conv(_conv)
_split_batch_norm_train = _split_norm(F.batch_norm, 3, 4, 1)


def _batch_norm_eval(mode, args, kwargs):
    """Batch norm with running statistics (eval mode) as the affine map it is:
    (x − mean)·rsqrt(var + eps)·γ + β, elementwise (torch.batch_norm's batching rule under vmap and
    forward AD costs several times more), split along the segment like any affine op."""
    x = args[0]
    names = ["running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"]
    v = {n: _arg(args, kwargs, i + 1, n) for i, n in enumerate(names)}
    if v["training"] or v["running_mean"] is None or v["running_var"] is None or \
            mode._d(x) is not None or mode._d(v["running_mean"]) is not None or \
            mode._d(v["running_var"]) is not None:
        if mode.delta_of and mode.t is not None:
            return _split_batch_norm_train(mode, args, kwargs)
        return NotImplemented
    shape = (1, -1) + (1,) * (x.dim() - 2)
    eps = 1e-5 if v["eps"] is None else v["eps"]
    r = torch.rsqrt(v["running_var"] + eps).reshape(shape)
    w, b = v["weight"], v["bias"]
    path = mode.delta_of and mode.t is not None
    dw, db = (mode._d(w), mode._d(b)) if path else (None, None)
    # (x − mean)·A + B with the per-channel A = r·(γ + tΔγ), B = β + tΔβ formed first (small,
    # per row where t is): three passes over the activations instead of one per term
    A = r if w is None else r * w.reshape(shape)
    B = None if b is None else b.reshape(shape)
    if dw is not None or db is not None:
        tt = mode.tb(x)
        if dw is not None:
            A = A + tt * (r * dw.reshape(shape))
        if db is not None:
            B = tt * db.reshape(shape) if B is None else B + tt * db.reshape(shape)
    y = (x - v["running_mean"].reshape(shape)) * A
    if B is not None:
        y = y + B
    return y.contiguous()


_SPLIT[F.batch_norm] = _batch_norm_eval
_SPLIT[F.instance_norm] = _split_norm(F.instance_norm, 3, 4, 1)
_SPLIT[F.group_norm] = _split_norm(F.group_norm, 2, 3, 1)
_SPLIT[F.layer_norm] = _split_norm(F.layer_norm, 2, 3, None)


#: models on which folding (node, sample) rows into the batch was checked (model -> bool)
_FOLD_OK: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

#: shared nodes: below this many test samples per call the ops are split along the segment
#: (no θ(t_q) rows, no per-node copies of the tangents; costs a second GEMM per linear), above it
#: θ(t_q) is formed once per node (one GEMM per linear for all samples)
SPLIT_BELOW_SAMPLES = 32


def _repeat(tree, q: int):
    """Every tensor leaf repeated q times along dim 0 (row = copy·m + sample); other leaves kept."""
    return pytree.tree_map(lambda x: x.repeat((q,) + (1,) * (x.dim() - 1))
                           if isinstance(x, torch.Tensor) else x, tree)


# =============================================================================== row evaluation
class PathFunction:
    """One step's segment θ_s + tΔ_s of a test function h(f(θ, x), y), evaluated on rows
    (sample index, t) with shared weights.

    fm: a :class:`explaind_fast.model.FunctionalModel` (its parameters and buffers, recorded
    buffers included, its output selection ``fm.output``, its vmap-or-loop :meth:`vmap`); X: the
    test inputs, a pytree batched on dim 0 (:mod:`explaind_fast.model.inputs`: a tensor is called
    as model(x), a tuple as model(*x), a dict as model(**x)); targets: a pytree batched on dim 0,
    or None; h(outputs, targets) -> [B, K]. patterns: optional soft-pattern description (an object
    with ``blocks`` = [(offset, size, bdim)] and ``is_piecewise(func, args)``) used when a
    call passes ``mu``.

    Rows are evaluated under ``fm.vmap``, which loops over them where vmap refuses the model's
    data-dependent control flow (a Hugging Face attention-mask check), like every other
    per-sample function of the engine.
    """

    def __init__(self, fm, X, targets, h, theta_s: torch.Tensor, delta: torch.Tensor,
                 patterns=None):
        self.fm, self.h = fm, h
        self.X = _in.normalize(X)
        self.targets = None if targets is None else _in.normalize(targets)
        self.M = _in.batch_size(self.X, "test_inputs")
        # θ_s is the primal of every JVP here: it must own its storage (own_storage)
        self.theta_s, self.delta = own_storage(theta_s), delta.to(theta_s.dtype)
        self.layout = fm.layout
        self.dparams = self.layout.unflatten(self.delta)
        self.patterns = patterns

    @classmethod
    def of(cls, tf, theta_s, delta, patterns=None) -> "PathFunction":
        """From a :class:`explaind_fast.model.TestFunction`."""
        return cls(tf.fm, tf.X, tf.targets, tf.h, theta_s, delta, patterns)

    # ------------------------------------------------------------------ one call of the model
    def _call(self, theta, t, inputs, tg, mu=None, capture=None, along_path=True):
        """h(f(θ + tΔ, inputs), tg) with the affine ops split along the segment (``inputs``: one
        input pytree, called by the convention of :mod:`explaind_fast.model.inputs`; the output
        tensor selected by ``fm.output``)."""
        ps = theta if isinstance(theta, dict) else self.layout.unflatten(theta)
        delta_of = {id(ps[k]): self.dparams[k] for k in ps} if along_path else None
        pats = None
        if mu is not None:
            pats = [(mu[..., off:off + size], bdim) for off, size, bdim in self.patterns.blocks]
        mode = PathMode(delta_of, t if along_path else None, capture=capture, patterns=pats,
                        is_piecewise=None if self.patterns is None else self.patterns.is_piecewise)
        with self.fm.eager(), mode:
            out = self.fm.call_with(self.fm.params_from(ps), inputs)
        out = _in.select_output(out, self.fm.output)
        return out if self.h is None else self.h(out, tg)

    def _single(self, theta, t, x, tg, mu=None, capture=None):
        y = self._call(theta, t, _in.unsqueeze(x), None if tg is None else _in.unsqueeze(tg),
                       None if mu is None else mu[None], capture)
        return y[0]

    def _rows_args(self, sample):
        x = _in.take(self.X, sample)
        tg = None if self.targets is None else _in.take(self.targets, sample)
        return x, tg

    def _count(self, idx) -> int:
        """Number of test samples selected by idx (a slice or an index tensor)."""
        if isinstance(idx, slice):
            return len(range(*idx.indices(self.M)))
        return int(torch.as_tensor(idx).numel())

    def _vmap_rows(self, fn, tg, mu):
        """fn(t, x, tg, mu) over rows: vmap, or a loop where the model refuses vmap."""
        return self.fm.vmap(fn, (0, 0, None if tg is None else 0, None if mu is None else 0))

    # ------------------------------------------------------------------ rows (sample, t)
    def values(self, sample: torch.Tensor, t: torch.Tensor, mu=None, chunk: int = 256):
        """h(f(θ_s + t_r Δ_s, x_{sample_r})) for every row: [R, K] (no gradients)."""
        outs = []
        with torch.no_grad():
            for a in range(0, len(sample), chunk):
                x, tg = self._rows_args(sample[a:a + chunk])
                tt = t[a:a + chunk].to(self.theta_s)
                m = None if mu is None else mu[a:a + chunk]
                outs.append(self._vmap_rows(
                    lambda t1, x1, y1, m1: self._single(self.theta_s, t1, x1, y1, m1),
                    tg, m)(tt, x, tg, m))
        return torch.cat(outs) if outs else None

    def jvp_rows(self, sample: torch.Tensor, t: torch.Tensor, tangents: torch.Tensor, mu=None):
        """J(θ_s + t_r Δ_s; x_{sample_r})·v for every row r and tangent v: [T, R, K]."""
        x, tg = self._rows_args(sample)
        tt = t.to(self.theta_s)

        def rows(theta):
            return self._vmap_rows(lambda t1, x1, y1, m1: self._single(theta, t1, x1, y1, m1),
                                   tg, mu)(tt, x, tg, mu)
        return vmap(lambda v: jvp(rows, (self.theta_s,), (v,))[1])(tangents)

    def jacobian_rows(self, sample: torch.Tensor, t: torch.Tensor, ks=slice(None), mu=None):
        """Per-row Jacobians J(θ_s + t_r Δ_s; x_{sample_r})[ks]: [R, K_c, D] (the per-tensor
        Jacobians of :meth:`jacobian_rows_by_tensor`, concatenated in layout order)."""
        J = self.jacobian_rows_by_tensor(sample, t, ks, mu)
        R = len(sample)
        return torch.cat([j.reshape(R, j.shape[1], -1) for j in J.values()], dim=-1)

    def jacobian_rows_by_tensor(self, sample: torch.Tensor, t: torch.Tensor, ks=slice(None),
                                mu=None):
        """The same Jacobians per parameter tensor, {name: [R, K_c, *shape]} (layout order):
        one copy of R·K_c·D numbers, where the flat [R, K_c, D] Jacobian costs four (the
        backward of each tensor's view of the flat θ allocates a full-length gradient)."""
        x, tg = self._rows_args(sample)
        tt = t.to(self.theta_s)
        ps = self.layout.unflatten(self.theta_s)

        def one(t1, x1, y1, m1):
            return jacrev(lambda p: self._single(p, t1, x1, y1, m1)[ks])(ps)
        return self._vmap_rows(one, tg, mu)(tt, x, tg, mu)

    # ------------------------------------------------------------------ shared nodes
    def jvp_shared(self, t: torch.Tensor, idx, tangents: torch.Tensor, mu=None, split=None):
        """J(θ_s + t_q Δ_s; X[idx])·v for shared nodes t [q], the samples batched: [T, q, m, K].
        mu: [q, m, U] soft patterns or None. split: evaluate along the segment without forming
        θ(t_q) (default: below SPLIT_BELOW_SAMPLES samples), else θ(t_q) once per node. Split
        evaluation folds the (node, sample) rows into the model's batch with a per-row t where
        the model allows it (checked once per model against the vmap-over-nodes evaluation:
        every parameter used by a split op, every split op keeping the rows on dim 0), so that
        no tangent is copied per node."""
        if split is None:        # few samples: GEMMs are small, per-node [q, D] rows dominate
            split = self._count(idx) < SPLIT_BELOW_SAMPLES
        if split and self._fold_ok():
            try:
                return self._jvp_folded(t, idx, tangents, mu)
            except FoldMismatch:
                pass
        return self._jvp_nodes(t, idx, tangents, mu, split)

    def _jvp_folded(self, t, idx, tangents, mu=None):
        m, q = self._count(idx), len(t)
        Xr = _repeat(_in.take(self.X, idx), q)                        # row = node·m + sample
        tg = None if self.targets is None else _repeat(_in.take(self.targets, idx), q)
        tr = t.to(self.theta_s).repeat_interleave(m)
        mur = None if mu is None else mu.reshape(q * m, -1)

        def rows(theta):
            return self._call(theta, tr, Xr, tg, mur)
        out = vmap(lambda v: jvp(rows, (self.theta_s,), (v,))[1])(tangents)   # [T, q·m, K]
        return out.reshape(out.shape[0], q, m, *out.shape[2:])

    def _fold_ok(self) -> bool:
        key = self.fm.model
        ok = _FOLD_OK.get(key)
        if ok is None:
            ok = self._fold_probe()
            _FOLD_OK[key] = ok
        return ok

    def _fold_probe(self) -> bool:
        """Folded and vmap-over-nodes evaluation agree on 2 nodes × 2 samples, random tangent
        (and random soft patterns where the rule has them)."""
        gen = torch.Generator().manual_seed(0)
        m = min(2, self.M)
        idx = slice(0, m)
        t = torch.tensor([0.3, 0.7], dtype=self.theta_s.dtype)
        v = torch.randn(1, self.theta_s.shape[0], generator=gen, dtype=self.theta_s.dtype)
        mu = None
        if self.patterns is not None:
            U = sum(size for _, size, _ in self.patterns.blocks)
            mu = torch.rand(2, m, U, generator=gen, dtype=torch.float64).to(self.theta_s)
        try:
            a = self._jvp_folded(t, idx, v, mu)
        except (FoldMismatch, RuntimeError):
            return False
        b = self._jvp_nodes(t, idx, v, mu, True)
        tol = 1e3 * torch.finfo(self.theta_s.dtype).eps
        return bool(((a - b).abs() <= tol * (1 + b.abs().max())).all())

    def _jvp_nodes(self, t, idx, tangents, mu, split):
        X = _in.take(self.X, idx)
        tg = None if self.targets is None else _in.take(self.targets, idx)
        tt = t.to(self.theta_s)
        delta = self.delta

        mu_dim = None if mu is None else 0
        if not split:
            # θ(t_q) once per node, vmap over the nodes *outside* the JVP: a tangent then stays
            # unbatched over the nodes, so x_q·dWᵀ is one GEMM over all (node, sample) rows
            # instead of a batched GEMM with dW copied per node (paper case, midpoint:100: float32
            # 1.16× faster, float64 unchanged within noise; bench/results/paper_case_node_order_ab.txt)
            thetas = self.theta_s[None] + tt[:, None] * delta[None]               # [q, D]

            def node(theta_q, m1):
                def f(theta):
                    return self._call(theta, None, X, tg, m1, along_path=False)
                return vmap(lambda v: jvp(f, (theta_q,), (v,))[1])(tangents)     # [T, m, K]
            return vmap(node, in_dims=(0, mu_dim))(thetas, mu).transpose(0, 1)   # [T, q, m, K]

        def nodes(theta):                 # the samples are the model's batch: no loop needed
            def at(t1, m1):
                return self._call(theta, t1, X, tg, m1)
            return vmap(at, in_dims=(0, mu_dim))(tt, mu)
        return vmap(lambda v: jvp(nodes, (self.theta_s,), (v,))[1])(tangents)
