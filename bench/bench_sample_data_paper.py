"""Per-sample attribution at the paper's size on the CPU: the ``--full`` grokking demo's Figures 4/5
call (explaind_fast.demos.grokking) over a few recorded steps, with the planner's CPU cap on the
train side's passes (``planner.CPU_TRAIN_PASS_BYTES``) and without it, interleaved.

Setting: the paper's transformer (p = 113, D = 97,331), 4000 training pairs, full-batch AdamW
recorded in float64 for ``--steps`` steps; ``attribute(params={"decoder", "linear 2"},
data="sample", steps="each", quadrature="kinks:3", output=ones, credit="update")`` on ``--test``
test samples (``--data label``: per label instead, 113 partitions, one backward each) in float64
with the demo's memory budget (80% of the free memory, demos.common.device_memory_budget), one
thread. Each variant runs ``--repeats`` times (A B A B); wall, user and system time and minor
page faults of each call (benchmark.measure), and the reconstruction error.
``python -m explaind_fast`` calls keep_freed_memory(); so does this bench unless
``--glibc-default``.

    python bench/bench_sample_data_paper.py        # writes bench/results/sample_data_paper_cpu.json
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings

import torch

from explaind_fast import attribute, keep_freed_memory
from explaind_fast.attribution import planner
from explaind_fast.demos.common import device_memory_budget, train_recorded
from explaind_fast.demos.grokking import PRESETS, build
from explaind_fast.testing import benchmark as bm


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--test", type=int, default=4)
    ap.add_argument("--data", default="sample", choices=["sample", "label"],
                    help="per training sample (the demo's call) or per label (113 partitions)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--glibc-default", action="store_true",
                    help="leave glibc's malloc thresholds as they are")
    ap.add_argument("--out", default="sample_data_paper_cpu.json",
                    help="results file (a bare name: bench/results/<name>); '' = none")
    args = ap.parse_args(argv)
    kept = False if args.glibc_default else keep_freed_memory()
    bm.set_threads(args.threads)
    env = bm.environment("cpu")
    print(bm.format_environment(env))
    cfg = PRESETS["full"].with_overrides(max_steps=args.steps, stop_at_test_acc=None)
    data, model, opt = build(cfg, "cpu", torch.float64)
    ones = torch.ones(1, model.vocab, dtype=torch.float64)
    budget = device_memory_budget("cpu")
    variants = [(f"capped ({planner.CPU_TRAIN_PASS_BYTES >> 20} MiB passes)",
                 planner.CPU_TRAIN_PASS_BYTES), ("uncapped (budget / TRAIN_SHARE)", 1 << 62)]
    got = {name: [] for name, _ in variants}
    errors = {}
    with tempfile.TemporaryDirectory() as d:
        tr = train_recorded(model, opt, data.train_x, data.train_y, data.test_x, data.test_y, d,
                            max_steps=args.steps, log=lambda s: None)
        for _ in range(args.repeats):
            for name, cap in variants:
                with bm.planner_setting("CPU_TRAIN_PASS_BYTES", cap), bm.measure() as m, \
                        warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)    # vmap fallback notices
                    a = attribute(model, tr.trajectory, data.test_x[:args.test],
                                  train_data=(data.train_x, data.train_y),
                                  params={"decoder": ["decoder.*"],
                                          "linear 2": ["mlp.linear2.*"]},
                                  data=args.data, steps="each", quadrature="kinks:3", output=ones,
                                  credit="update", dtype=torch.float64, progress=False,
                                  memory_budget=budget)
                got[name].append(m)
                errors[name] = float(a.reconstruction_error)
                plan = a.plan
                print(f"  {name}: wall {m.wall_s:.1f} s, user {m.user_s:.1f} s, sys "
                      f"{m.system_s:.1f} s, {m.minor_faults} minor faults; train passes of "
                      f"{plan['train_budget'] / 2**20:.0f} MiB", flush=True)
    rows = []
    print(f"\n{args.steps} steps, {cfg.n_train} training samples (data={args.data!r}), "
          f"{args.test} test samples, "
          f"budget {budget / 2**30:.1f} GiB, keep_freed_memory {kept}")
    print("| variant | wall s | user s | sys s | sys/user | minor faults | reconstruction |")
    print("|---|---|---|---|---|---|---|")
    for name, _ in variants:
        ms = got[name]
        med = lambda f: statistics.median(f(m) for m in ms)            # noqa: E731
        row = {"variant": name, "wall_s": med(lambda m: m.wall_s),
               "user_s": med(lambda m: m.user_s),
               "system_s": med(lambda m: m.system_s),
               "minor_faults": med(lambda m: m.minor_faults),
               "wall_all_s": [m.wall_s for m in ms], "reconstruction_error": errors[name]}
        rows.append(row)
        print(f"| {name} | {row['wall_s']:.1f} | {row['user_s']:.1f} | {row['system_s']:.1f} | "
              f"{row['system_s'] / max(row['user_s'], 1e-9):.0%} | {row['minor_faults']:.0f} | "
              f"{row['reconstruction_error']:.1e} |")
    if args.out:
        path = bm.write_results(args.out, rows, env=env, steps=args.steps, test=args.test,
                                data=args.data,
                                budget=budget, keep_freed_memory=kept)
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
