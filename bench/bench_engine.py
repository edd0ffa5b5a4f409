"""End-to-end engine benchmark on the CPU: the paper's modular-addition transformer shape.

Short full-batch AdamW trajectory (recorded with TrajectoryRecorder), layer × step granularity, all
logits, data="all". Compares forward mode, reverse mode and a naive reference that materialises the
per-step slice of the contribution tensor [M, O, D] from full Jacobians at each node (what the
official code does) and sums it per layer. Prints time and reconstruction error of each, and the
largest disagreement with the naive sums.

    python bench/bench_engine.py --steps 3 --test 4 --act gelu --rule gauss-legendre:4
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch
import torch.nn.functional as F

from explaind_fast import Trajectory, TrajectoryRecorder, attribute
from explaind_fast.attribution.granularity import parse_params
from explaind_fast.demos.data import modular_addition_data
from explaind_fast.demos.models import ModularAdditionTransformer
from explaind_fast.model import FunctionalModel
from explaind_fast.optim import RegRecursion
from explaind_fast.quadrature import parse_quadrature


def train(args, dtype):
    torch.manual_seed(0)
    data = modular_addition_data(p=args.p, n_train=args.train, n_test=max(args.test, 16))
    model = ModularAdditionTransformer(p=args.p, act=args.act).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0, betas=(0.98, 0.99))
    directory = tempfile.mkdtemp(prefix="bench_engine_")
    X, Y = data.train_x, data.train_y
    with TrajectoryRecorder(model, opt, directory, dataset_size=X.shape[0], fsync=False) as rec:
        for _ in range(args.steps):
            rec.set_batch(torch.arange(X.shape[0]))
            opt.zero_grad()
            F.cross_entropy(model(X), Y).backward()
            opt.step()
    return model, Trajectory.load(directory), data.test_x[:args.test]


def naive_layers(model, traj, Xte, rule, dtype):
    """Per step: full Jacobian [M, O, D] per node, the elementwise [M, O, D] contribution slice,
    then per-layer sums. Returns kernel [N, G, M, O], reg [N, G, M, O], initial, final."""
    layout = traj.layout
    groups = parse_params("module", layout)
    fm = FunctionalModel(model, layout)

    def f(theta):
        return fm(theta, Xte)

    nodes = parse_quadrature(rule).nodes()
    N = traj.num_steps
    recursion = RegRecursion(layout.D, dtype)
    kern, reg = [], []
    for s in range(N):
        th, th1 = traj.theta(s, dtype=dtype), traj.theta(s + 1, dtype=dtype)
        delta = th1 - th
        c = traj.rule.coefficients(traj.step(s), dtype=dtype)
        r = recursion.step_with(c, th)
        Phi = -delta - r
        phi = 0
        for t, w in zip(nodes.t.tolist(), nodes.w.tolist()):
            phi = phi + w * torch.autograd.functional.jacobian(f, th + t * delta)
        ck, cr = -phi * Phi, -phi * r                      # [M, O, D] slices of the full tensor
        G = groups.G
        kern.append(torch.zeros(G, *ck.shape[:2], dtype=dtype).index_add_(
            0, groups.ids, ck.permute(2, 0, 1)))
        reg.append(torch.zeros(G, *cr.shape[:2], dtype=dtype).index_add_(
            0, groups.ids, cr.permute(2, 0, 1)))
    with torch.no_grad():
        return torch.stack(kern), torch.stack(reg), f(traj.theta(0, dtype=dtype)), \
            f(traj.theta(N, dtype=dtype))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--p", type=int, default=113)
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--test", type=int, default=4)
    ap.add_argument("--act", default="gelu")
    ap.add_argument("--rule", default="gauss-legendre:4")
    ap.add_argument("--dtype", default="float64")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--modes", default="forward,reverse", help="comma-separated engine modes")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, traj, Xte = train(args, dtype)
    print(f"# {platform.node()} torch {torch.__version__} threads {torch.get_num_threads()} "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(f"# modular-addition transformer p={args.p} act={args.act} D={traj.layout.D} "
          f"N={traj.num_steps} M={Xte.shape[0]} O={args.p + 2} rule={args.rule} {args.dtype}")
    results = {}
    for mode in args.modes.split(","):
        t0 = time.perf_counter()
        a = attribute(model, traj, Xte, params="module", steps="each", output="logits",
                      quadrature=args.rule, mode=mode, progress=False)
        dt = time.perf_counter() - t0
        results[mode] = a
        est = a.plan["estimates"][mode]
        print(f"{mode:8s} {dt:8.2f} s  reconstruction {a.reconstruction_error:.2e}  "
              f"max step residual {float(a.step_residual_relative.max()):.2e} (rel)  "
              f"est. peak {est['peak_bytes'] / 2**20:.0f} MiB  "
              f"nodes/step {a.evaluations['quadrature_nodes'].float().mean():.0f}")
    if not args.skip_naive:
        t0 = time.perf_counter()
        k, r, init, fin = naive_layers(model, traj, Xte, args.rule, dtype)
        dt = time.perf_counter() - t0
        rec = float((init + k.sum((0, 1)) + r.sum((0, 1)) - fin).abs().max())
        diff = max((float((results[m].kernel - k).abs().max()) for m in results), default=0.0)
        print(f"naive    {dt:8.2f} s  reconstruction {rec:.2e}  "
              f"max |engine − naive| {diff:.2e}  (slice [M, O, D] = "
              f"{Xte.shape[0] * (args.p + 2) * traj.layout.D * 8 / 2**20:.0f} MiB per step)")
    if {"forward", "reverse"} <= set(results):
        fr = results["forward"].kernel - results["reverse"].kernel
        print(f"max |forward − reverse| {float(fr.abs().max()):.2e}")


if __name__ == "__main__":
    main()
