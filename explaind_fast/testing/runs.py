"""Recorded tiny training runs for the tests and benchmarks: one loop, two presets.

* :func:`train_tiny`, :func:`tiny_mlp_run`, :func:`tiny_transformer_run` — the engine tests'
  runs (TinyMLP / TinyTransformer, two param groups, StepLR, clipping), recorded for real or
  replayed into a :class:`MemoryTrajectory` from torch's own optimizer state;
* :func:`record_run` — the recorder and store tests' run (SmallMLP, shuffled mini-batches,
  AdamW / Adam / SGD with two param groups, norm clipping).

Both record through :func:`train_recorded`.
"""
from __future__ import annotations

import tempfile
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import ParamLayout
from ..optim import StepRecord, make_rule
from ..recording import TrajectoryRecorder, indexed_loader
from ..store import Trajectory
from .models import (DT, N_SAMPLES, TinyMLP, TinyTransformer, mlp_data, small_data, small_model,
                     token_data)


def per_sample_cross_entropy(out, y):
    return F.cross_entropy(out, y, reduction="none")


def train_recorded(model, opt, directory, X, Y, batches, *, loss=F.cross_entropy, clip=None,
                   scheduler=None, **recorder_kw) -> None:
    """The one recorded training loop: for each index tensor of ``batches``, set_batch (mean
    weights), backward of ``loss(model(X[idx]), Y[idx])`` (a scalar), optional
    ``recorder.clip_grad_norm_(clip)``, the optimizer step and the scheduler step."""
    with TrajectoryRecorder(model, opt, directory, **recorder_kw) as rec:
        for idx in batches:
            rec.set_batch(idx)
            opt.zero_grad()
            loss(model(X[idx]), Y[idx]).backward()
            if clip is not None:
                rec.clip_grad_norm_(clip)
            opt.step()
            if scheduler is not None:
                scheduler.step()


class MemoryTrajectory:
    """In-memory trajectory with the read API of explaind_fast.trajectory.Trajectory."""

    def __init__(self, layout, kind, hyper, thetas, records, dataset_size):
        self.layout = layout
        self.optimizer_kind = kind
        self.hyper = hyper
        self.rule = make_rule(kind, layout, hyper)
        self._thetas = thetas
        self.dtype = thetas[0].dtype          # the storage dtype of θ
        self._records = records
        self.dataset_size = dataset_size
        self.checkpoint_every = 1

    @property
    def num_steps(self) -> int:
        return len(self._records)

    def theta(self, s, dtype=None, device=None):
        t = self._thetas[s]
        return t.to(dtype=dtype or t.dtype, device=device)

    def step(self, s) -> StepRecord:
        return self._records[s]

    def raw_steps(self, s) -> List[StepRecord]:
        r = self._records[s]
        return [StepRecord(index=r.index, step_count=r.step_count, lr=r.lr,
                           weight_decay=r.weight_decay, batch_indices=r.batch_indices,
                           batch_weights=r.batch_weights, clip_factor=r.clip_factor)]


def tiny_optimizer(model, kind: str, two_groups: bool = True):
    params = list(model.parameters())
    if two_groups:
        groups = [{"params": params[:2], "lr": 0.05, "weight_decay": 0.1},
                  {"params": params[2:], "lr": 0.02, "weight_decay": 0.01}]
    else:
        groups = [{"params": params, "lr": 0.05, "weight_decay": 0.05}]
    if kind == "adamw":
        return torch.optim.AdamW(groups, betas=(0.9, 0.99), eps=1e-8)
    if kind == "adam":
        return torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-8)
    if kind == "sgd":
        return torch.optim.SGD(groups, momentum=0.9)
    raise ValueError(kind)


def hyper_of(opt, kind):
    if kind in ("adamw", "adam"):
        return [{"betas": tuple(g["betas"]), "eps": g["eps"]} for g in opt.param_groups]
    return [{"momentum": g["momentum"], "dampening": g["dampening"]} for g in opt.param_groups]


def train_tiny(model: nn.Module, X, Y, *, kind: str = "adamw", steps: int = 5, batch_size: int = 6,
               clip: Optional[float] = 1.0, two_groups: bool = True, seed: int = 1,
               loss_fn=None, record: str = "real", checkpoint_every: int = 1):
    """Train ``model`` in place for ``steps`` updates and return its trajectory.

    Mini-batches drawn without replacement per step, mean cross-entropy (weights 1/|B|), a StepLR
    scheduler (lr × 0.7 every 2 steps), optional global-norm gradient clipping. record="real"
    records with explaind_fast's TrajectoryRecorder (:func:`train_recorded`) into a temporary
    directory and returns Trajectory.load of it; record="memory" returns a MemoryTrajectory built
    from torch's own optimizer state (an independent check of the recorder).
    """
    loss_fn = loss_fn or per_sample_cross_entropy
    opt = tiny_optimizer(model, kind, two_groups)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)
    g = torch.Generator().manual_seed(seed)
    n = X.shape[0]
    if record == "real":
        batches = [torch.randperm(n, generator=g)[:batch_size] for _ in range(steps)]
        directory = tempfile.mkdtemp(prefix="explaind_tiny_")
        train_recorded(model, opt, directory, X, Y, batches,
                       loss=lambda out, y: loss_fn(out, y).mean(), clip=clip, scheduler=sched,
                       checkpoint_every=checkpoint_every, dataset_size=n, fsync=False)
        return Trajectory.load(directory)
    layout = ParamLayout.from_model(model, opt)
    thetas = [layout.flatten_model(model).clone()]
    records = []
    for s in range(steps):
        idx = torch.randperm(n, generator=g)[:batch_size]
        w = torch.full((len(idx),), 1.0 / len(idx), dtype=DT)
        opt.zero_grad()
        loss = (loss_fn(model(X[idx]), Y[idx]) * w).sum()
        loss.backward()
        factor = 1.0
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            factor = float(torch.clamp(clip / (norm + 1e-6), max=1.0))
        lr = [gr["lr"] for gr in opt.param_groups]
        wd = [gr["weight_decay"] for gr in opt.param_groups]
        opt.step()
        sched.step()
        v = None
        if kind in ("adamw", "adam"):
            params = dict(model.named_parameters())
            v = layout.flatten([opt.state[params[nm]]["exp_avg_sq"] for nm in layout.names])
        records.append(StepRecord(index=s, step_count=s + 1, lr=lr, weight_decay=wd,
                                  batch_indices=idx.clone(), batch_weights=w,
                                  clip_factor=factor, exp_avg_sq=v))
        thetas.append(layout.flatten_model(model).clone())
    return MemoryTrajectory(layout, kind, hyper_of(opt, kind), thetas, records, n)


def tiny_mlp_run(act="tanh", kind="adamw", steps=5, seed=0, **kw):
    torch.manual_seed(seed)
    model = TinyMLP(act).to(DT)
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    Xtr, Ytr, Xte, Yte = mlp_data(seed=seed)
    traj = train_tiny(model, Xtr, Ytr, kind=kind, steps=steps, **kw)
    return model, traj, (Xtr, Ytr), Xte, Yte, theta0


def tiny_transformer_run(act="gelu", kind="adamw", steps=4, seed=0, **kw):
    torch.manual_seed(seed)
    model = TinyTransformer(act=act).to(DT)
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    Xtr, Ytr, Xte, Yte = token_data(seed=seed)
    traj = train_tiny(model, Xtr, Ytr, kind=kind, steps=steps, **kw)
    return model, traj, (Xtr, Ytr), Xte, Yte, theta0


def small_optimizer(model, kind, **opt_kw):
    """Two param groups with different lr and weight decay."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    g0 = [p for p in trainable if p is not model.fc2.weight and p is not model.fc2.bias]
    g1 = [model.fc2.weight, model.fc2.bias]
    if kind == "sgd":
        mom1 = opt_kw.pop("momentum1", 0.9)
        groups = [{"params": g0, "lr": 0.1, "weight_decay": 0.05, "momentum": 0.9},
                  {"params": g1, "lr": 0.05, "weight_decay": 0.01, "momentum": mom1}]
        return torch.optim.SGD(groups, **opt_kw)
    groups = [{"params": g0, "lr": 0.02, "weight_decay": 0.1},
              {"params": g1, "lr": 0.01, "weight_decay": 0.02}]
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    return cls(groups, betas=(0.9, 0.98), eps=1e-8, **opt_kw)


def record_run(directory, kind="adamw", dtype=torch.float64, batch_size: Optional[int] = 8,
               epochs=2, clip: Optional[float] = 0.3, checkpoint_every=1, seed=0,
               frozen_embed=False, warmup=False, opt_kw=None, **rec_kw):
    """Train SmallMLP with a recorder attached: mean cross-entropy, shuffled mini-batches
    (batch_size=None: full batch), StepLR (or a linear warmup from lr 0), norm clipping.
    Returns (model, optimizer)."""
    X, Y = small_data(dtype, seed)
    model = small_model(dtype, seed, frozen_embed)
    opt = small_optimizer(model, kind, **(opt_kw or {}))
    if warmup:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, t / 3))
    else:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)
    loader = indexed_loader((X, Y), batch_size=batch_size, shuffle=batch_size is not None,
                            generator=torch.Generator().manual_seed(seed + 1))
    batches = (idx for _ in range(epochs) for idx, _, _ in loader)
    train_recorded(model, opt, directory, X, Y, batches, loss=F.cross_entropy, clip=clip,
                   scheduler=sched, checkpoint_every=checkpoint_every, dataset_size=N_SAMPLES,
                   **rec_kw)
    return model, opt
