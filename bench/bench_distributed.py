"""Scaling of explaind_fast.attribute across ranks on the CPU: 1 rank vs W ranks (gloo, one thread
each), on a modular-addition transformer (explaind_fast.demos) trained full-batch with AdamW.

Two workloads:
  all    data="all", params="module", steps="each" (layer × step), a fixed Gauss–Legendre rule:
         the "steps" split (each rank a contiguous step range, no collective until the end).
  label  data="label" (one partition per class), steps="all": gradient credit in reverse mode;
         with the default sizes the batch gradients (one backward of the full batch per class)
         cost more than the Jacobian rows, so the "partitions" split (each rank every test row,
         the gradients and contributions of its classes).

Each rank is a fresh spawned process (explaind_fast.testing.ranks.run_ranks: gloo on a FileStore,
OMP_NUM_THREADS=1 and torch.set_num_threads(1)) that loads the recorded trajectory, meets the
others at a barrier and times one attribute() call (wall; peak RSS above the RSS before the call,
explaind_fast.testing.benchmark.track_peak). 1 and W ranks alternate ``--repeats`` times, so that
the speed-up (median wall of 1 rank / median of the slowest of W ranks) is measured under the same
load; the environment row records the load average. On a shared machine the wall times follow the
load: ``speedup_cpu_median`` divides CPU seconds instead (1 rank / the busiest of W), the
speed-up with a free core per rank. Results: --out (a bare name goes to
bench/results/).

    python bench/bench_distributed.py --out distributed_cpu.json
    python bench/bench_distributed.py --p 7 --steps 2 --test 2 --repeats 1      # a smoke run
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch
import torch.nn.functional as F

from explaind_fast import Trajectory, TrajectoryRecorder
from explaind_fast.demos.data import modular_addition_data
from explaind_fast.demos.models import ModularAdditionTransformer
from explaind_fast.testing import benchmark as bm
from explaind_fast.testing.ranks import run_ranks

MODEL = "explaind_fast.demos.models:ModularAdditionTransformer"


def record(args, directory):
    """Train and record the run; write the test and train tensors; return (model kwargs, D)."""
    torch.manual_seed(0)
    mkw = dict(p=args.p, d_model=args.d_model, n_heads=4, d_head=args.d_model // 4,
               d_mlp=args.d_mlp, act="gelu")
    data = modular_addition_data(p=args.p, n_train=args.train,
                                 n_test=max(args.test, args.label_test, 4))
    model = ModularAdditionTransformer(**mkw).to(torch.float64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98))
    X, Y = data.train_x, data.train_y
    traj_dir = os.path.join(directory, "traj")
    with TrajectoryRecorder(model, opt, traj_dir, dataset_size=X.shape[0], fsync=False) as rec:
        for _ in range(args.steps):
            rec.set_batch(torch.arange(X.shape[0]))
            opt.zero_grad()
            F.cross_entropy(model(X), Y).backward()
            opt.step()
    for name, m in (("data.pt", args.test), ("data_label.pt", args.label_test)):
        torch.save({"test_inputs": data.test_x[:m], "test_targets": data.test_y[:m],
                    "train_data": (X, Y)}, os.path.join(directory, name))
    return mkw, Trajectory.load(traj_dir).layout.D


WORKLOADS = {
    "all": dict(data="all", params="module", steps="each"),
    "label": dict(data="label", steps="all"),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--p", type=int, default=31)
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--d-mlp", type=int, default=128)
    ap.add_argument("--train", type=int, default=160)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--test", type=int, default=32)
    ap.add_argument("--label-test", type=int, default=8, help="test samples of the label workload")
    ap.add_argument("--rule", default="gauss-legendre:4")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workloads", default="all,label")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    env = bm.environment("cpu")
    print(bm.format_environment(env))
    result = {"config": vars(args), "workloads": {}}
    with tempfile.TemporaryDirectory(prefix="bench_distributed_") as tmp:
        mkw, D = record(args, tmp)
        result["D"] = D
        for name in args.workloads.split(","):
            data = os.path.join(tmp, "data_label.pt" if name == "label" else "data.pt")
            job = {"model": (MODEL, mkw), "dtype": "float64",
                   "trajectory": os.path.join(tmp, "traj"), "data": data,
                   "kw": dict(WORKLOADS[name], quadrature=args.rule)}
            runs = {1: [], args.world: []}
            for _ in range(args.repeats):
                for world in (1, args.world):
                    got = run_ranks("explaind_fast.testing.ranks:timed_attribute", world, (job,),
                                    timeout=args.timeout, threads=1)
                    for r, g in enumerate(got):
                        if "error" in g:
                            raise RuntimeError(f"{name}, {world} ranks, rank {r}: {g['error']}")
                    runs[world].append([g["value"] for g in got])
            one = [run[0]["wall_s"] for run in runs[1]]
            many = [max(x["wall_s"] for x in run) for run in runs[args.world]]
            cpu_one = [run[0]["cpu_s"] for run in runs[1]]
            cpu_many = [max(x["cpu_s"] for x in run) for run in runs[args.world]]
            first = runs[args.world][0][0]
            row = {"workload": job["kw"], "split": first.get("split"), "mode": first.get("mode"),
                   "credit": first.get("credit"), "kernel_shape": first.get("kernel_shape"),
                   "wall_1rank_s": one, f"wall_{args.world}ranks_s": many,
                   "speedup_median": statistics.median(one) / statistics.median(many),
                   "speedup_per_repeat": [a / b for a, b in zip(one, many)],
                   # CPU seconds of the busiest rank: the speed-up with a free core per rank
                   "cpu_1rank_s": cpu_one, f"cpu_busiest_of_{args.world}ranks_s": cpu_many,
                   "speedup_cpu_median": statistics.median(cpu_one) / statistics.median(cpu_many),
                   "peak_extra_bytes_1rank": max(run[0]["peak_extra_bytes"] for run in runs[1]),
                   f"peak_extra_bytes_per_rank_{args.world}ranks": [
                       max(run[r]["peak_extra_bytes"] for run in runs[args.world])
                       for r in range(args.world)],
                   "kernel_sum_1rank": runs[1][0][0]["kernel_sum"],
                   f"kernel_sum_{args.world}ranks": first["kernel_sum"],
                   "reconstruction_error": first["reconstruction_error"]}
            result["workloads"][name] = row
            print(f"{name:6s} split={row['split']:6s} 1 rank {statistics.median(one):7.2f} s  "
                  f"{args.world} ranks {statistics.median(many):7.2f} s  speed-up "
                  f"{row['speedup_median']:.2f}× (CPU time of the busiest rank: "
                  f"{row['speedup_cpu_median']:.2f}×)  peak/rank "
                  f"{row[f'peak_extra_bytes_per_rank_{args.world}ranks']} B "
                  f"(1 rank {row['peak_extra_bytes_1rank']} B)")
    result["load_after"] = os.getloadavg()
    if args.out:
        print(f"wrote {bm.write_results(args.out, result, env=env)}")
    return result


if __name__ == "__main__":
    main()
