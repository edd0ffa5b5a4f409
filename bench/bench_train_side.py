"""The train side of one step with per-sample data: unstreamed [B, D] per-sample gradients vs
streamed slab by slab (issue 14; explaind_fast.attribution.train_side.BatchGradients).

Setting: an MLP (in 256, ``--depth`` hidden layers of ``--width``, 10 classes; the defaults give
D = 5,520,394 in 22 tensors, the largest 589,824), batches of ``--batch`` samples (a comma list,
default 64,256), float32 on the CPU, gradient credit's
consumer: the segment contraction o[g, r, u] = Σ_{i∈g} H[r, i]·gain_i·G[u]_i of R = ``--rows`` test
rows H [R, D] with the per-tensor parameter groups (params="tensor").

* current:   ``partition_gradients`` ([U, D] of vmap(grad) per-sample gradients, B·D numbers
             several times over) then one segment_contract — the code gradient_credit ran before;
* one_slab:  ``credit.stream_contract`` without a budget: the whole θ as one slab (BatchGradients'
             per-tensor differentiation, [B, D] at once): separates its speed from the slabs';
* streamed:  ``credit.stream_contract`` — per-sample gradients one slab of consecutive parameter
             tensors at a time (the planner's slabs for ``--train-budget`` bytes, default
             memory_budget / TRAIN_SHARE = 512 MiB), each slab contracted as it arrives.

Peak memory: the extra resident memory of one call, each path in a fresh process
(explaind_fast.testing.benchmark.peak_memory_subprocess: VmHWM − VmRSS). Time: ``--repeats`` calls
per path in this process, the paths alternated (ABC ABC…) so that a shared machine's drift hits
them alike; median and p20/p80 (benchmark.summarize). The streamed and current outputs are
compared (max relative difference, float32 rounding). The current (one_slab) path is skipped when
its estimated peak (4·B·D, 3·B·D numbers) exceeds ``--max-current-gb`` or 80% of MemAvailable, and
said so in the result.

    python bench/bench_train_side.py [--batch 64,256 --width 768 --depth 10] [--out train_side_cpu.json]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn as nn
import torch.nn.functional as F

from explaind_fast.attribution import planner
from explaind_fast.attribution.contraction import segment_contract
from explaind_fast.attribution.credit import stream_contract
from explaind_fast.attribution.granularity import parse_params
from explaind_fast.attribution.train_side import BatchGradients, TrainSet, partition_gradients
from explaind_fast.demos.common import device_memory_budget
from explaind_fast.model import FunctionalModel, ParamLayout
from explaind_fast.optim import StepRecord
from explaind_fast.testing import benchmark as bm

D_IN, CLASSES = 256, 10


def ce(o, y):
    return F.cross_entropy(o, y, reduction="none")


class Case:
    """Model, batch, test rows and the two calls."""

    def __init__(self, batch, width, depth, rows, dtype, train_budget, seed=0):
        torch.manual_seed(seed)
        dims = [D_IN] + [width] * depth
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        model = nn.Sequential(*layers, nn.Linear(dims[-1], CLASSES)).to(dtype)
        self.layout = ParamLayout.from_model(model)
        D = self.layout.D
        self.fm = FunctionalModel(model, self.layout, dtype, torch.device("cpu"))
        self.theta = self.layout.flatten_model(model, dtype)
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(batch, D_IN, generator=g, dtype=dtype)
        Y = torch.randint(0, CLASSES, (batch,), generator=g)
        self.train = TrainSet((X, Y), dtype, torch.device("cpu"))
        self.rec = StepRecord(index=0, step_count=1, lr=[1e-3], weight_decay=[0.0],
                              batch_indices=torch.arange(batch),
                              batch_weights=torch.full((batch,), 1.0 / batch, dtype=torch.float64))
        self.part = torch.arange(batch)                   # data="sample"
        self.H = torch.randn(rows, D, generator=g, dtype=dtype)
        self.gain = torch.rand(D, generator=g, dtype=dtype)
        self.groups = parse_params("tensor", self.layout)
        self.train_budget = train_budget
        self.slabs = planner.gradient_slabs(self.layout.numels, batch, dtype.itemsize,
                                            train_budget)
        self.sub = {}
        #: a 2-sample step for warming up (one-time allocations and initialisation)
        self.warm = StepRecord(index=0, step_count=1, lr=[1e-3], weight_decay=[0.0],
                               batch_indices=torch.arange(2),
                               batch_weights=torch.full((2,), 0.5, dtype=torch.float64))

    def current(self, rec=None):
        rec = rec or self.rec
        present, Gp = partition_gradients(self.fm, self.theta, self.train, ce, rec, self.part)
        o = segment_contract(self.H, self.gain[None] * Gp, self.groups)
        return o, Gp.sum(0)

    def streamed(self, rec=None):
        bg = BatchGradients(self.fm, self.theta, self.train, ce, rec or self.rec, self.part)
        return stream_contract(bg, self.H, self.gain, self.groups, self.train_budget, self.sub)

    def one_slab(self, rec=None):
        """BatchGradients without a budget: the whole θ as one slab ([B, D] at once)."""
        bg = BatchGradients(self.fm, self.theta, self.train, ce, rec or self.rec, self.part)
        return stream_contract(bg, self.H, self.gain, self.groups, 0, self.sub)


def setup(path, cfg):
    """Build the case, return the call of ``path`` ("current" or "streamed")."""
    case = Case(**cfg)
    getattr(case, path)(case.warm)
    return getattr(case, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", default="64,256", help="batch sizes, comma-separated")
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--depth", type=int, default=10)
    ap.add_argument("--rows", type=int, default=8, help="test rows R of H [R, D]")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--train-budget", type=int,
                    default=planner.DEFAULT_BUDGET // planner.TRAIN_SHARE,
                    help="bytes the streamed per-sample gradients may hold (the plan's train_budget)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-current-gb", type=float, default=16.0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", default=None,
                    help="write the JSON result here (a bare file name: bench/results/<name>)")
    args = ap.parse_args(argv)
    bm.set_threads(args.threads)
    env = bm.environment()
    runs = [one_batch(args, int(B)) for B in str(args.batch).split(",")]
    result = {"environment": env, "dtype": args.dtype, "runs": runs}
    if args.out:
        print(f"wrote {bm.write_results(args.out, result)}")
    print("\n" + bm.format_environment(env))
    print("| batch | path | slabs (largest) | peak extra RSS (GiB) | time median (p20–p80) s |")
    print("|---|---|---|---|---|")
    for r in runs:
        for p in ("current", "one_slab", "streamed"):
            if p not in r:
                est = r["current_estimate_bytes"] * (3 if p == "one_slab" else 4) // 4
                print(f"| {r['batch']} | {p} | skipped: ≈ {est / 2**30:.1f} "
                      f"GiB estimated, {r['mem_available_bytes'] / 2**30:.1f} GiB available | | |")
                continue
            q = r[p]["time"]
            sl = "1 (D)" if p != "streamed" else f"{r['slabs']} ({r['largest_slab']:,})"
            print(f"| {r['batch']} | {p} | {sl} | {r[p]['peak']['peak_extra_bytes'] / 2**30:.2f} | "
                  f"{q['median_s']:.2f} ({q['p20_s']:.2f}–{q['p80_s']:.2f}) |")
    return result


def one_batch(args, batch):
    dtype = getattr(torch, args.dtype)
    cfg = dict(batch=batch, width=args.width, depth=args.depth, rows=args.rows, dtype=dtype,
               train_budget=args.train_budget)
    case = Case(**cfg)
    D, B, b = case.layout.D, batch, dtype.itemsize
    est_current = 4 * B * D * b            # measured ≈ 3.7 B·D numbers at B = 64
    avail = device_memory_budget("cpu", fraction=1.0) or 0
    run_current = est_current <= min(args.max_current_gb * 2 ** 30, 0.8 * avail)
    result = {"D": D, "batch": B, "rows": args.rows,
              "largest_tensor": max(case.layout.numels), "tensors": len(case.layout.names),
              "train_budget": args.train_budget, "slabs": len(case.slabs),
              "largest_slab": max(bb - a for a, bb in case.slabs),
              "B_times_D_bytes": B * D * b, "mem_available_bytes": avail,
              "current_estimate_bytes": est_current, "current_run": run_current,
              "load_average_at_start": bm.environment()["load_average"]}
    jcfg = {k: (args.dtype if k == "dtype" else v) for k, v in cfg.items()}
    run_one = 3 * B * D * b <= min(args.max_current_gb * 2 ** 30, 0.8 * avail)
    result["one_slab_run"] = run_one
    paths = ["streamed"] + (["one_slab"] if run_one else []) + (["current"] if run_current else [])
    for p in paths:
        result[p] = {"peak": bm.peak_memory_subprocess(setup_json, p, json.dumps(jcfg))}
    times = {p: [] for p in paths}
    outs = {}
    for p in paths:
        getattr(case, p)(case.warm)
    for i in range(args.repeats):
        for p in paths:
            with bm.measure() as m:
                out = getattr(case, p)()
            times[p].append(m.wall_s)
            outs[p] = out
            del out
    for p in paths:
        result[p]["time"] = bm.summarize(times[p])
    if run_current:
        (o1, t1), (o2, t2) = outs["streamed"], outs["current"]
        result["max_rel_diff_contraction"] = float((o1 - o2).abs().max() / o2.abs().max())
        result["max_rel_diff_batch_gradient"] = float((t1 - t2).abs().max() / t2.abs().max())
        result["peak_ratio_current_over_streamed"] = (
            result["current"]["peak"]["peak_extra_bytes"] /
            max(result["streamed"]["peak"]["peak_extra_bytes"], 1))
        result["time_ratio_streamed_over_current"] = (
            result["streamed"]["time"]["median_s"] / result["current"]["time"]["median_s"])
    print(json.dumps(result, indent=1), flush=True)
    return result


def setup_json(path, cfg_json):
    cfg = json.loads(cfg_json)
    cfg["dtype"] = getattr(torch, cfg["dtype"])
    return setup(path, cfg)


if __name__ == "__main__":
    main()
