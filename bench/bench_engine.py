"""End-to-end engine benchmark on the CPU: the paper's modular-addition transformer shape.

Short full-batch AdamW trajectory (recorded with TrajectoryRecorder), layer × step granularity, all
logits, data="all". Compares forward mode, reverse mode and a naive reference that materialises the
per-step slice of the contribution tensor [M, O, D] from full Jacobians at each node (what the
official code does) and sums it per layer. Prints time and reconstruction error of each, and the
largest disagreement with the naive sums. Timing and the environment row:
explaind_fast.testing.benchmark; --out writes JSON (a bare file name: bench/results/<name>).

    python bench/bench_engine.py --steps 3 --test 4 --act gelu --rule gauss-legendre:4
"""
from __future__ import annotations

import argparse
import tempfile

import torch
import torch.nn.functional as F

from explaind_fast import Trajectory, TrajectoryRecorder, attribute
from explaind_fast.attribution.granularity import parse_params
from explaind_fast.demos.data import modular_addition_data
from explaind_fast.demos.models import ModularAdditionTransformer
from explaind_fast.model import FunctionalModel
from explaind_fast.optim import RegRecursion
from explaind_fast.quadrature import parse_quadrature
from explaind_fast.testing import benchmark as bm


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


def main(argv=None):
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
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", default=None,
                    help="write the rows as JSON here (a bare file name: bench/results/<name>)")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    bm.set_threads(args.threads)
    model, traj, Xte = train(args, dtype)
    env = bm.environment()
    print(bm.format_environment(env))
    print(f"# modular-addition transformer p={args.p} act={args.act} D={traj.layout.D} "
          f"N={traj.num_steps} M={Xte.shape[0]} O={args.p + 2} rule={args.rule} {args.dtype}")
    results, rows = {}, []
    for mode in args.modes.split(","):
        with bm.measure() as m:
            a = attribute(model, traj, Xte, params="module", steps="each", output="logits",
                          quadrature=args.rule, mode=mode, progress=False)
        results[mode] = a
        est = a.plan["estimates"][mode]
        row = {"run": mode, "wall_s": m.wall_s, "cpu_s": m.cpu_s,
               "reconstruction_error": float(a.reconstruction_error),
               "max_step_residual_rel": float(a.step_residual_relative.max()),
               "estimated_peak_bytes": est["peak_bytes"],
               "nodes_per_step": float(a.evaluations["quadrature_nodes"].float().mean())}
        rows.append(row)
        print(f"{mode:8s} {m.wall_s:8.2f} s  reconstruction {row['reconstruction_error']:.2e}  "
              f"max step residual {row['max_step_residual_rel']:.2e} (rel)  "
              f"est. peak {est['peak_bytes'] / 2**20:.0f} MiB  "
              f"nodes/step {row['nodes_per_step']:.0f}")
    if not args.skip_naive:
        with bm.measure() as m:
            k, r, init, fin = naive_layers(model, traj, Xte, args.rule, dtype)
        rec = float((init + k.sum((0, 1)) + r.sum((0, 1)) - fin).abs().max())
        diff = max((float((results[mode].kernel - k).abs().max()) for mode in results), default=0.0)
        rows.append({"run": "naive", "wall_s": m.wall_s, "cpu_s": m.cpu_s, "reconstruction_error": rec,
                     "max_abs_diff_engine_naive": diff})
        print(f"naive    {m.wall_s:8.2f} s  reconstruction {rec:.2e}  "
              f"max |engine − naive| {diff:.2e}  (slice [M, O, D] = "
              f"{Xte.shape[0] * (args.p + 2) * traj.layout.D * 8 / 2**20:.0f} MiB per step)")
    result = {"environment": env, "p": args.p, "act": args.act, "D": traj.layout.D,
              "steps": traj.num_steps, "test_samples": Xte.shape[0], "rule": args.rule,
              "dtype": args.dtype, "rows": rows}
    if {"forward", "reverse"} <= set(results):
        fr = results["forward"].kernel - results["reverse"].kernel
        result["max_abs_diff_forward_reverse"] = float(fr.abs().max())
        print(f"max |forward − reverse| {result['max_abs_diff_forward_reverse']:.2e}")
    if args.out:
        print(f"wrote {bm.write_results(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
