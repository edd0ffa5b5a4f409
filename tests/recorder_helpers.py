"""Shared helpers of the recorder/trajectory tests: a tiny model, a recorded training loop, and the
per-sample step-identity check (DESIGN.md §2) from recorded data plus recomputed gradients."""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from explaind_fast.data import indexed_loader
from explaind_fast.recorder import TrajectoryRecorder

N_SAMPLES, N_CLASSES = 24, 3


class SmallMLP(nn.Module):
    """4 -> 6 -> 3 tanh MLP (D = 51), optionally with a frozen input embedding."""

    def __init__(self, frozen_embed: bool = False):
        super().__init__()
        self.embed = nn.Linear(4, 4, bias=False)
        self.embed.weight.requires_grad_(not frozen_embed)
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, N_CLASSES)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(self.embed(x))))


def data(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N_SAMPLES, 4, generator=g).to(dtype)
    Y = torch.randint(0, N_CLASSES, (N_SAMPLES,), generator=g)
    return X, Y


def make_model(dtype=torch.float64, seed=0, frozen_embed=False):
    torch.manual_seed(seed)
    return SmallMLP(frozen_embed).to(dtype)


def make_optimizer(model, kind, **opt_kw):
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
    X, Y = data(dtype, seed)
    model = make_model(dtype, seed, frozen_embed)
    opt = make_optimizer(model, kind, **(opt_kw or {}))
    if warmup:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, t / 3))
    else:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)
    loader = indexed_loader((X, Y), batch_size=batch_size, shuffle=batch_size is not None,
                            generator=torch.Generator().manual_seed(seed + 1))
    with TrajectoryRecorder(model, opt, directory, checkpoint_every, dataset_size=N_SAMPLES,
                            **rec_kw) as rec:
        for _ in range(epochs):
            for idx, x, y in loader:
                rec.set_batch(idx)
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                if clip is not None:
                    rec.clip_grad_norm_(clip)
                opt.step()
                sched.step()
    return model, opt


def per_sample_grads(model, theta, layout, X, Y):
    """[B, D] float64 gradients of the per-sample cross-entropy at flat θ (recomputed in float64
    whatever the recording dtype, so the comparison sees only the recording's own rounding)."""
    model64 = copy.deepcopy(model).double()
    params = layout.unflatten(theta.to(torch.float64))

    def loss(p, x, y):
        return F.cross_entropy(functional_call(model64, p, (x[None],)), y[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, X.double(), Y)
    return torch.cat([g[n].reshape(X.shape[0], -1) for n in layout.names], dim=1)


def step_identity_errors(traj, model, X, Y, num_partitions=N_CLASSES):
    """Per stored update s: max_i |(θ_{s+1} − θ_s) + Σ_p Φ_s[p] + r_s| and max_i |Δ_s|, with the
    train side built from recomputed per-sample gradients partitioned by label, the recorded batch
    and weights (incl. clip factor) and the optim_rules recursions."""
    f64, D = torch.float64, traj.layout.D
    rule = traj.rule
    E = torch.zeros(num_partitions, D, dtype=f64)
    R = torch.zeros(D, dtype=f64)
    errors, steps, thetas = [], [], []
    for s in range(traj.num_steps):
        rec = traj.step(s)
        theta_s, theta_next = traj.theta(s, f64), traj.theta(s + 1, f64)
        c = rule.coefficients(rec, dtype=f64)
        idx = rec.batch_indices
        g = per_sample_grads(model, theta_s, traj.layout, X[idx], Y[idx]) * rec.weights[:, None]
        G = torch.zeros(num_partitions, D, dtype=f64).index_add_(0, Y[idx], g)
        E = c.decay * E + c.gain * G
        R = c.reg_decay * R + c.reg_gain * theta_s
        phi, r = c.scale * E, c.reg_scale * R
        delta = theta_next - theta_s
        errors.append(float((delta + phi.sum(0) + r).abs().max()))
        steps.append(float(delta.abs().max()))
        thetas.append(float(theta_next.abs().max()))
    return errors, steps, thetas
