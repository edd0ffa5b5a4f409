"""The train side of a step (docs/design.md §3): the training data, the recomputed batch gradients
per data partition, and the regularisation term of subsampled trajectories.

G_s[p] = Σ_{k∈B_s∩I_p} w_{s,k} ∇L_k(θ_s) (w includes the clip factor) feeds the optimizer's moment
recursion (:class:`explaind_fast.optim.MomentRecursion`); for data="all" no gradient is recomputed
(Φ_s[all] = −Δ_s − r_s, :func:`explaind_fast.optim.phi_all_from_update`).

:class:`BatchGradients` streams G_s[p] to a consumer slab by slab (consecutive parameter tensors,
:func:`explaind_fast.attribution.planner.gradient_slabs`) so that a batch never holds all its
per-sample gradients at once; :func:`partition_gradients` is the unstreamed [U, D] form (the
reference the streamed one is tested against).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, List, Optional, Tuple

import torch
from torch.func import grad

from ..allocator import malloc_trim
from ..model import FunctionalModel
from ..model import inputs as _in
from ..optim import RegRecursion, StepRecord
from .planner import SLAB_COPIES, gradient_slabs, partition_rows


class TrainSet:
    """Training inputs and targets, gathered by dataset index (pytrees batched on dim 0).

    Accepts, with n the dataset size and the rows indexed like the recorded batches:

    * a tuple (inputs, targets), each a pytree of tensors with n rows (a tensor, a tuple, a dict
      such as {"input_ids", "attention_mask"}); a list [X, Y] of two tensors too;
    * a dict batch in the Hugging Face layout with a "labels" entry: targets are
      {"labels", "attention_mask"} (the mask when present), inputs every other entry
      (:func:`explaind_fast.model.inputs.split_labels`);
    * a TensorDataset (its first two tensors), or any map-style dataset (``__len__`` and
      ``__getitem__``) whose items are (x, y) pairs or dicts with "labels"; an IndexedDataset's
      (index, ...) items are recognised by their int first element. Items are collated with
      ``torch.utils.data.default_collate`` (so they must have equal shapes).
    """

    def __init__(self, train_data, dtype, device):
        X, Y = _inputs_and_targets(train_data)
        n = _in.batch_size(X, "train_data inputs")
        m = _in.batch_size(Y, "train_data targets")
        if n != m:
            raise ValueError(f"train_data: {n} inputs but {m} targets")
        _in.check_float_dtype(X, dtype, "train_data inputs",
                              f"convert them (or pass dtype={_first_float_dtype(X)})")
        self.X, self.Y = _in.to_device(X, device), _in.to_device(Y, device)
        self.n = n

    def __len__(self):
        return self.n

    def batch(self, idx):
        """(inputs, targets) of the samples idx."""
        return _in.take(self.X, idx), _in.take(self.Y, idx)


def _first_float_dtype(X):
    return next((t.dtype for _, t in _in.tensor_leaves(X) if t.is_floating_point()), None)


_FORMS = ("train_data must be a tuple (inputs, targets) of tensors / pytrees batched on dim 0, a "
          "dict batch with 'labels', or a map-style dataset of (x, y) pairs or dicts with 'labels'")


def _inputs_and_targets(train_data):
    data = _in.normalize(train_data)
    if isinstance(data, Mapping):
        return _in.split_labels(data)
    if isinstance(data, tuple) and len(data) == 2 or (
            isinstance(data, list) and len(data) == 2 and
            all(isinstance(t, torch.Tensor) for t in data)):
        return _in.normalize(data[0]), _in.normalize(data[1])
    if isinstance(data, (torch.Tensor, tuple)):
        raise ValueError(_FORMS + f"; got a {type(data).__name__}")
    if hasattr(data, "tensors") and len(data.tensors) >= 2:
        return data.tensors[0], data.tensors[1]
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        items = [_strip_index(data[i]) for i in range(len(data))]
        if not items:
            raise ValueError("train_data is an empty dataset")
        if all(isinstance(it, Mapping) for it in items):
            return _in.split_labels(_in.collate([dict(it) for it in items]), "train_data items")
        if all(isinstance(it, (tuple, list)) and len(it) == 2 for it in items):
            return (_in.collate([it[0] for it in items], "train_data inputs"),
                    _in.collate([it[1] for it in items], "train_data targets"))
        raise ValueError(_FORMS + f"; its item 0 is {type(items[0]).__name__}"
                         + (f" of length {len(items[0])}" if hasattr(items[0], "__len__") else ""))
    raise ValueError(_FORMS + f"; got a {type(data).__name__}")


def _strip_index(item):
    """An IndexedDataset item (index, x, y) or (index, dict) without its index."""
    if isinstance(item, (tuple, list)) and isinstance(item[0], int) and \
            not isinstance(item[0], bool):
        if len(item) == 3:
            return tuple(item[1:])
        if len(item) == 2 and isinstance(item[1], Mapping):
            return item[1]
    return item


def partition_gradients(fm: FunctionalModel, theta: torch.Tensor, train: TrainSet,
                        loss_fn: Callable, rec: StepRecord, part_ids: torch.Tensor
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """G_s restricted to the partitions present in batch B_s: (present ids [U], grads [U, D]).

    The unstreamed form of :class:`BatchGradients` (what the credit strategies ran before it; kept
    as the reference of tests/attribution/test_train_side_streaming.py and
    bench/bench_train_side.py).

    One backward of the partition-restricted weighted loss per partition, or one vmapped
    per-sample gradient pass when every batch sample is its own partition (a loop over the
    samples where vmap cannot run the model, :meth:`FunctionalModel.vmap`).
    Memory: U·D + the activations of the batch (per-sample path: B·D + B·activations).
    """
    idx = rec.batch_indices.to(theta.device)
    w = rec.weights.to(device=theta.device, dtype=theta.dtype)
    pid = part_ids.to(theta.device)[idx]
    present, inv = torch.unique(pid, return_inverse=True)
    X, Y = train.batch(idx)
    if len(present) == len(idx):
        def one(th, x, y):
            return loss_fn(fm(th, _in.unsqueeze(x)), _in.unsqueeze(y)).sum()
        g = fm.vmap(grad(one), (None, 0, 0))(theta, X, Y) * w[:, None]
        out = torch.zeros(len(present), theta.shape[0], dtype=theta.dtype, device=theta.device)
        return present, out.index_add_(0, inv, g)
    th = theta.detach().requires_grad_(True)
    losses = loss_fn(fm(th, X), Y) * w
    if losses.shape != (len(idx),):
        raise ValueError(f"loss_fn must return per-sample losses of shape [{len(idx)}] "
                         f"(reduction='none'), got {tuple(losses.shape)}")
    rows = []
    for u in range(len(present)):
        sel = (inv == u)
        rows.append(torch.autograd.grad(losses[sel].sum(), th, retain_graph=u + 1 < len(present))[0])
    return present, torch.stack(rows)


class BatchGradients:
    """G_s[p] of the partitions present in batch B_s, handed to a consumer in pieces.

    ``present`` [U] are the partition ids in the batch (sorted), as in :func:`partition_gradients`.
    :meth:`stream` calls ``consume(rows, cols, block)`` with ``block`` [r, b − a] = G_s[present[rows]]
    restricted to the coordinates ``cols`` = slice(a, b) (per-sample data: one parameter tensor's
    coordinates per call; ``rows``: int64 positions in ``present``; the consumer may modify
    ``block`` in place, it is not used afterwards), and returns
    Σ_p G_s[p] [D] (the batch gradient, for the step identity). Every (row, coordinate) is handed
    over exactly once.

    * Every batch sample its own partition (data="sample"): per-sample gradients by vmap over grad
      (a loop where vmap cannot run the model, :meth:`FunctionalModel.vmap`), one *slab* of
      consecutive parameter tensors at a time, differentiating with respect to that slab only
      (the others are constants): peak ≈ 3·B·S numbers for the largest slab S instead of 3·B·D,
      one forward and partial backward pass of the batch per slab; when even one tensor's
      gradients of the whole batch exceed ``budget``, the batch's samples are taken a few at a
      time (3·n·S ≤ budget, n ≥ 1). ``slabs`` None: chosen by
      :func:`gradient_slabs` from ``budget`` (bytes; 0 = one slab, the whole θ).
    * Partitions of several samples: one backward of the partition-restricted weighted loss per
      partition, as many rows at a time as ``budget`` allows (:func:`partition_rows`).
    """

    def __init__(self, fm: FunctionalModel, theta: torch.Tensor, train: TrainSet,
                 loss_fn: Callable, rec: StepRecord, part_ids: torch.Tensor):
        self.fm, self.theta, self.loss_fn = fm, theta, loss_fn
        self.idx = rec.batch_indices.to(theta.device)
        self.w = rec.weights.to(device=theta.device, dtype=theta.dtype)
        pid = part_ids.to(theta.device)[self.idx]
        self.present, self.inv = torch.unique(pid, return_inverse=True)
        self.X, self.Y = train.batch(self.idx)
        #: the slabs of the last :meth:`stream` (coordinate ranges; [] for partition rows)
        self.slabs: List[Tuple[int, int]] = []

    @property
    def per_sample(self) -> bool:
        return len(self.present) == len(self.idx)

    def stream(self, consume: Callable, budget: int = 0,
               slabs: Optional[List[Tuple[int, int]]] = None) -> torch.Tensor:
        th = self.theta
        D = th.shape[0]
        itemsize = th.element_size()
        total = torch.zeros(D, dtype=th.dtype, device=th.device)
        if len(self.idx) == 0:               # an empty batch (a rank that owns none of it)
            self.slabs = []
            return total
        if self.per_sample:
            lay = self.fm.layout
            if slabs is None:
                slabs = gradient_slabs(lay.numels, len(self.idx), itemsize, budget)
            self.slabs = list(slabs)
            B = len(self.idx)
            for a, b in self.slabs:
                # samples per pass: all of them unless even this slab's gradients of the whole
                # batch exceed the budget (a slab is at least one tensor)
                n = B if budget <= 0 else \
                    max(1, min(B, budget // (SLAB_COPIES * itemsize * max(b - a, 1))))
                for i in range(0, B, n):
                    sl = slice(i, min(B, i + n))
                    # tensor by tensor: each tensor's gradients are their own block (one [n, S]
                    # copy of the slab would be a fresh allocation, and page faults, per pass)
                    for ta, tb, g in self._slab_grads(a, b, sl):
                        g = g.contiguous() if not g.is_contiguous() else g
                        g.mul_(self.w[sl, None])
                        if n == B:
                            torch.sum(g, 0, out=total[ta:tb])
                        else:
                            total[ta:tb] += g.sum(0)
                        consume(self.inv[sl], slice(ta, tb), g)
                        del g
            return total
        self.slabs = []
        # differentiate with respect to each parameter tensor, not the flat θ: the backward of
        # every tensor's view of a flat θ allocates a zero-filled D-length gradient
        lay = self.fm.layout
        tensors = [t.detach().requires_grad_(True) for t in lay.unflatten(th).values()]
        params = self.fm.params_from(dict(zip(lay.names, tensors)))
        out = _in.select_output(self.fm.call_with(params, self.X), self.fm.output)
        losses = self.loss_fn(out, self.Y) * self.w
        if losses.shape != (len(self.idx),):
            raise ValueError(f"loss_fn must return per-sample losses of shape [{len(self.idx)}] "
                             f"(reduction='none'), got {tuple(losses.shape)}")
        U = len(self.present)
        off = lay.offsets
        chunk = min(U, partition_rows(D, itemsize, budget))
        for a in range(0, U, chunk):
            rows = torch.empty(min(U, a + chunk) - a, D, dtype=th.dtype, device=th.device)
            for i, u in enumerate(range(a, a + len(rows))):
                grads = torch.autograd.grad(losses[self.inv == u].sum(), tensors,
                                            retain_graph=u + 1 < U, allow_unused=True)
                for k, g in enumerate(grads):
                    if g is None:                   # a tensor the loss does not reach
                        rows[i, off[k]:off[k + 1]].zero_()
                    else:
                        rows[i, off[k]:off[k + 1]].copy_(g.reshape(-1))
                del grads
            total += rows.sum(0)
            consume(torch.arange(a, a + len(rows), device=th.device), slice(0, D), rows)
        return total

    def _slab_grads(self, a: int, b: int, samples: slice = slice(None)
                    ) -> List[Tuple[int, int, torch.Tensor]]:
        """Per-sample gradients of the (unweighted) losses of the batch's ``samples`` restricted
        to θ[a:b], one block per parameter tensor of the slab: [(start, stop, [n, stop − start])]
        in layout order, covering [a, b); θ[a:b] must be a union of whole parameter tensors.
        Differentiates with respect to the slab's tensors as separate inputs (a flat slab vector
        would cost one zero-filled [B, b − a] per tensor in the backward of its slice)."""
        fm, loss_fn, lay = self.fm, self.loss_fn, self.fm.layout
        off = lay.offsets
        idx = [i for i, nm in enumerate(lay.names) if a <= off[i] and off[i + 1] <= b]
        if sum(lay.numels[i] for i in idx) != b - a:
            raise ValueError(f"slab [{a}, {b}) does not consist of whole parameter tensors")
        fixed = lay.unflatten(self.theta)
        part = {lay.names[i]: fixed[lay.names[i]] for i in idx}

        def one(part, x, y):
            out = _in.select_output(fm.call_with(fm.params_from({**fixed, **part}),
                                                 _in.unsqueeze(x)), fm.output)
            return loss_fn(out, _in.unsqueeze(y)).sum()
        X, Y = _in.take(self.X, samples), _in.take(self.Y, samples)
        g = fm.vmap(grad(one), (None, 0, 0))(part, X, Y)
        B = len(range(*samples.indices(len(self.idx))))
        return [(off[i], off[i + 1], g[lay.names[i]].reshape(B, -1)) for i in idx]


def release_freed_memory(device) -> None:
    """Hand the memory the train side has just freed back to the OS (CPU, glibc: malloc_trim).
    Its per-sample gradients come and go as many D-sized blocks that glibc keeps in its heap once
    its mmap threshold has risen; kept, they add to the next contraction's peak (measured: 552 →
    473–522 MiB for reverse mode, per-label update credit, D = 1.86M, budget 512 MiB). Once per step,
    a few ms; nothing elsewhere (other allocators, CUDA)."""
    if torch.device(device).type == "cpu":
        malloc_trim()


def subsampled_reg(traj, s: int, reg: RegRecursion, dtype, device) -> torch.Tensor:
    """Regularisation of stored interval s when checkpoint_every > 1: Σ_j r_j over its raw steps j,
    with θ̂_j linearly interpolated between θ_s and θ_{s+1} (the split over intervals is approximate
    where θ is curved; the total θ_{s+1} − θ_s = −Φ − r stays exact). Advances ``reg``."""
    if traj.rule.reg_uses_second_moment:
        raise ValueError("subsampled trajectories (checkpoint_every > 1) are supported for adamw "
                         "and sgd only: Adam-L2's decay needs the second moment of every raw step")
    raw = traj.raw_steps(s)
    a, b = traj.theta(s, dtype=dtype, device=device), traj.theta(s + 1, dtype=dtype, device=device)
    total = torch.zeros_like(a)
    for j, rec in enumerate(raw):
        th = a + (b - a) * (j / len(raw))
        total = total + reg.step(*traj.rule.reg_coefficients(rec, dtype=dtype, device=device), th)
    return total
