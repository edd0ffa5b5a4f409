"""Tiny float64 models and a helper that trains and records them (shared by the engine tests).

``train_tiny`` runs a real torch.optim loop (param groups, scheduler, clipping, mini-batches) and
returns an in-memory object with the Trajectory read API (explaind_fast/trajectory.py contract):
layout, optimizer_kind, rule, hyper, num_steps, checkpoint_every, dataset_size, theta(s), step(s),
raw_steps(s). ``record_real`` uses the real TrajectoryRecorder when it is available.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from explaind_fast.layout import ParamLayout
from explaind_fast.optim_rules import StepRecord, make_rule

DT = torch.float64


class TinyMLP(nn.Module):
    """5 -> 12 -> 12 -> 3 MLP (D = 267)."""

    def __init__(self, act: str = "tanh", d_in: int = 5, hidden: int = 12, d_out: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, d_out)
        self.act = {"tanh": torch.tanh, "gelu": F.gelu, "relu": F.relu}[act]

    def forward(self, x):
        return self.out(self.act(self.fc2(self.act(self.fc1(x)))))


class TinyTransformer(nn.Module):
    """One attention block over 2 tokens from a vocabulary of 5, GELU MLP, predicting 5 classes."""

    def __init__(self, vocab: int = 5, d: int = 6, mlp: int = 8, act: str = "gelu"):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, mlp)
        self.fc2 = nn.Linear(mlp, d)
        self.unembed = nn.Linear(d, vocab)
        self.act = {"gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh}[act]

    def forward(self, tokens):
        x = self.embed(tokens)                                   # [B, T, d]
        att = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / math.sqrt(x.shape[-1]), -1)
        x = x + att @ self.v(x)
        x = x + self.fc2(self.act(self.fc1(self.ln(x))))
        return self.unembed(x[:, -1])


def mlp_data(n: int = 16, m: int = 4, d_in: int = 5, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n + m, d_in, generator=g, dtype=DT)
    Y = torch.randint(0, classes, (n + m,), generator=g)
    return X[:n], Y[:n], X[n:], Y[n:]


def token_data(n: int = 16, m: int = 4, vocab: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, vocab, (n + m, 2), generator=g)
    Y = (X[:, 0] + X[:, 1]) % vocab
    return X[:n], Y[:n], X[n:], Y[n:]


class MemoryTrajectory:
    """In-memory trajectory with the read API of explaind_fast.trajectory.Trajectory."""

    def __init__(self, layout, kind, hyper, thetas, records, dataset_size):
        self.layout = layout
        self.optimizer_kind = kind
        self.hyper = hyper
        self.rule = make_rule(kind, layout, hyper)
        self._thetas = thetas
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


def make_optimizer(model, kind: str, two_groups: bool = True):
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
    records with explaind_fast's TrajectoryRecorder into a temporary directory and returns
    Trajectory.load of it; record="memory" returns an in-test MemoryTrajectory.
    """
    if record == "real":
        return _train_recorded(model, X, Y, kind=kind, steps=steps, batch_size=batch_size,
                               clip=clip, two_groups=two_groups, seed=seed, loss_fn=loss_fn,
                               checkpoint_every=checkpoint_every)
    loss_fn = loss_fn or (lambda out, y: F.cross_entropy(out, y, reduction="none"))
    opt = make_optimizer(model, kind, two_groups)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)
    layout = ParamLayout.from_model(model, opt)
    g = torch.Generator().manual_seed(seed)
    n = X.shape[0]
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


def _train_recorded(model, X, Y, *, kind, steps, batch_size, clip, two_groups, seed, loss_fn,
                    checkpoint_every):
    import tempfile
    from explaind_fast.recorder import TrajectoryRecorder
    from explaind_fast.trajectory import Trajectory
    loss_fn = loss_fn or (lambda out, y: F.cross_entropy(out, y, reduction="none"))
    opt = make_optimizer(model, kind, two_groups)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)
    g = torch.Generator().manual_seed(seed)
    n = X.shape[0]
    directory = tempfile.mkdtemp(prefix="explaind_tiny_")
    with TrajectoryRecorder(model, opt, directory, checkpoint_every, dataset_size=n,
                            fsync=False) as rec:
        for s in range(steps):
            idx = torch.randperm(n, generator=g)[:batch_size]
            rec.set_batch(idx)
            opt.zero_grad()
            loss_fn(model(X[idx]), Y[idx]).mean().backward()
            if clip is not None:
                rec.clip_grad_norm_(clip)
            opt.step()
            sched.step()
    return Trajectory.load(directory)
