"""The train side of a step (docs/design.md §3): the training data, the recomputed batch gradients
per data partition, and the regularisation term of subsampled trajectories.

G_s[p] = Σ_{k∈B_s∩I_p} w_{s,k} ∇L_k(θ_s) (w includes the clip factor) feeds the optimizer's moment
recursion (:class:`explaind_fast.optim.MomentRecursion`); for data="all" no gradient is recomputed
(Φ_s[all] = −Δ_s − r_s, :func:`explaind_fast.optim.phi_all_from_update`).
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch.func import grad, vmap

from ..model import FunctionalModel
from ..optim import RegRecursion, StepRecord


class TrainSet:
    """Training inputs and targets, gathered by dataset index.

    Accepts a pair (X, Y) of tensors, a TensorDataset, or any sized dataset whose items start with
    (x, y) (an IndexedDataset's (index, x, y) items are recognised by their int first element).
    """

    def __init__(self, train_data, dtype, device):
        if isinstance(train_data, (tuple, list)) and len(train_data) == 2 and \
                all(isinstance(t, torch.Tensor) for t in train_data):
            X, Y = train_data
        elif hasattr(train_data, "tensors") and len(train_data.tensors) >= 2:
            X, Y = train_data.tensors[:2]
        elif hasattr(train_data, "__len__") and hasattr(train_data, "__getitem__"):
            items = [train_data[i] for i in range(len(train_data))]
            if items and len(items[0]) == 3 and isinstance(items[0][0], int):
                items = [it[1:] for it in items]
            X = torch.stack([torch.as_tensor(it[0]) for it in items])
            Y = torch.stack([torch.as_tensor(it[1]) for it in items])
        else:
            raise ValueError("train_data must be a pair (X, Y) of tensors or a dataset of (x, y)")
        if X.shape[0] != Y.shape[0]:
            raise ValueError(f"train_data: {X.shape[0]} inputs but {Y.shape[0]} targets")
        if X.is_floating_point() and X.dtype != dtype:
            raise ValueError(f"train_data inputs have dtype {X.dtype}, but the attribution runs in "
                             f"{dtype}; convert them (or pass dtype={X.dtype})")
        self.X, self.Y = X.to(device), Y.to(device)

    def __len__(self):
        return self.X.shape[0]


def partition_gradients(fm: FunctionalModel, theta: torch.Tensor, train: TrainSet,
                        loss_fn: Callable, rec: StepRecord, part_ids: torch.Tensor
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """G_s restricted to the partitions present in batch B_s: (present ids [U], grads [U, D]).

    One backward of the partition-restricted weighted loss per partition, or one vmapped
    per-sample gradient pass when every batch sample is its own partition.
    Memory: U·D + the activations of the batch (per-sample path: B·D + B·activations).
    """
    idx = rec.batch_indices.to(theta.device)
    w = rec.weights.to(device=theta.device, dtype=theta.dtype)
    pid = part_ids.to(theta.device)[idx]
    present, inv = torch.unique(pid, return_inverse=True)
    X, Y = train.X[idx], train.Y[idx]
    if len(present) == len(idx):
        def one(th, x, y):
            return loss_fn(fm(th, x[None]), y[None]).sum()
        g = vmap(grad(one), in_dims=(None, 0, 0))(theta, X, Y) * w[:, None]
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
