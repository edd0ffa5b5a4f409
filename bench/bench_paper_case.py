"""The paper's transformer case, per test sample, on one CPU thread: midpoint:100 against the
official ExPLAIND code (210 s per test sample at midpoint:100 with one thread) and the default
rule (quadrature="auto") against midpoint:100.

The case: the grokking model of the paper (explaind_fast.demos, preset "full": p = 113, d_model 64,
4 heads of 16, MLP 512, ReLU, 4-token inputs), 4000 training pairs, 20 full-batch AdamW steps with
the paper's hyperparameters (lr 1e-3, weight decay 4.0, betas (0.98, 0.99)), recorded once; then
``attribute(params="all", data="all", steps="each", output="logits")`` — every logit, every step —
on ``--test`` test samples with ``torch.set_num_threads(1)``, timed for each rule (``--repeats``
interleaved runs, medians). Prints seconds per test sample, the speed-up against 210 s, the
relative quadrature residual per step (max over steps) and what "auto" chose; writes
bench/results/paper_case_cpu.json (``--out``) with the environment row.

Then the compute floor of midpoint:100 on this machine (:func:`compute_floor`): the
matrix-product FLOPs per test sample counted by torch.utils.flop_counter, divided by the best
speed of one GEMM of the model's largest shape on one thread — the time no implementation of the
same evaluations can beat here, and so the largest speed-up over 210 s this machine allows.

With bench/results/official_code_cpu.json present (``python bench/bench_official_code.py`` on
the same machine; ``--official``), midpoint:100 is also compared with the official code measured
here (it runs in float32 only: the like-for-like comparison is ``--dtype float32``).

    python bench/bench_paper_case.py                       # float64, 100 test samples
    python bench/bench_paper_case.py --dtype float32

``--node-batch 16,32`` runs every rule once per value of the planner's NODE_BATCH_BYTES (in MiB),
interleaved in one process (rows "rule @ 32MiB"): the A/B of that constant.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings

import torch

from explaind_fast.testing import benchmark as bm

OFFICIAL_SECONDS_PER_SAMPLE = 210.0      # official code, midpoint:100, one thread (the issue)
TARGET_SPEEDUP = 2000.0


def record(directory: str, dtype: torch.dtype, steps: int, threads: int):
    from explaind_fast.demos.common import train_recorded
    from explaind_fast.demos.grokking import PRESETS, build
    cfg = PRESETS["full"]
    torch.set_num_threads(threads)
    data, model, opt = build(cfg, torch.device("cpu"), dtype)
    tr = train_recorded(model, opt, data.train_x, data.train_y, data.test_x, data.test_y, directory,
                        max_steps=steps, seed=cfg.seed, log=lambda s: None)
    return cfg, data, model, tr


def compute_floor(run_attribution, X, dtype, samples: int = 40) -> dict:
    """The time midpoint:100 cannot beat on this machine: the matrix-product FLOPs of one
    attribution per test sample (torch.utils.flop_counter.FlopCounterMode over a run on
    ``samples`` test samples: enough that the planner takes the path it takes for the full set)
    divided by the best throughput of one GEMM of the model's largest shape ([rows, 64] × [64,
    512], d_model × d_mlp) on one thread. Element-wise work is not counted: a lower bound."""
    from torch.utils.flop_counter import FlopCounterMode
    n = min(samples, len(X))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with FlopCounterMode(display=False) as counter:
            run_attribution(X[:n])
    flops = counter.get_total_flops() / n
    a = torch.randn(10_000, 64, dtype=dtype)
    b = torch.randn(64, 512, dtype=dtype)
    best = float("inf")
    for _ in range(7):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    gflops = 2 * a.shape[0] * a.shape[1] * b.shape[1] / best / 1e9
    return {"gemm_flops_per_test_sample": flops, "gemm_gflops": gflops,
            "gemm_shape": "[10000, 64] x [64, 512]", "counted_on_test_samples": n,
            "seconds_per_test_sample": flops / (gflops * 1e9)}


def same_machine_official(path: str):
    """The official code's midpoint:100 seconds per test sample from bench_official_code.py's
    results file (with its dtype, host and date), or None when there is none."""
    if not path:
        return None
    path = str(bm.results_path(path))
    if not os.path.exists(path):
        return None
    with open(path) as f:
        got = json.load(f)
    row = got["rows"][0]
    env = got.get("environment", {})
    return {"file": os.path.relpath(path), "seconds_per_test_sample": row["seconds_per_test_sample"],
            "dtype": row["dtype"], "test_samples": row["test_samples"],
            "host": env.get("host"), "date_utc": env.get("date_utc"),
            "load_average": env.get("load_average")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--test", type=int, default=100, help="test samples attributed")
    ap.add_argument("--steps", type=int, default=20, help="recorded full-batch steps")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--rules", default="midpoint:100,default",
                    help="comma-separated; 'default' = attribute()'s default (quadrature='auto')")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved timed runs per rule")
    ap.add_argument("--train-threads", type=int, default=None, help="threads while recording")
    ap.add_argument("--no-floor", dest="floor", action="store_false",
                    help="skip the compute floor of midpoint:100 (FLOP count and GEMM speed)")
    ap.add_argument("--official", default=os.path.join(bm.RESULTS_DIR, "official_code_cpu.json"),
                    help="results of bench_official_code.py on this machine (a bare name: "
                         "bench/results/<name>; same-machine "
                         "speed-up; '' = none; skipped when the file is absent)")
    ap.add_argument("--node-batch", default="",
                    help="comma-separated values of planner.NODE_BATCH_BYTES in MiB, "
                         "each rule run at each, interleaved (A/B); '' = the planner's")
    ap.add_argument("--out", default="paper_case_cpu.json",
                    help="results file (a bare name: bench/results/<name>); '' = none")
    args = ap.parse_args(argv)
    from explaind_fast import attribute

    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        cfg, data, model, tr = record(os.path.join(tmp, "trajectory"), dtype, args.steps,
                                      args.train_threads or torch.get_num_threads())
        traj = tr.trajectory
        bm.set_threads(1)
        env = bm.environment()
        print(bm.format_environment(env))
        X = data.test_x[:args.test]
        print(f"# paper case: p={cfg.p}, D={traj.layout.D}, {cfg.n_train} train pairs, "
              f"{traj.num_steps} full-batch AdamW steps (lr {cfg.lr}, weight decay "
              f"{cfg.weight_decay}, betas {cfg.betas}), {len(X)} test samples x {model.vocab} "
              f"logits, steps='each', {args.dtype}, 1 thread")

        def run(rule):
            kw = {} if rule == "default" else {"quadrature": rule}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")        # midpoint:100 is not exact: a certificate
                return attribute(model, traj, X, params="all", data="all", steps="each",
                                 output="logits", progress=False, **kw)

        variants = bm.node_batch_variants([r for r in args.rules.split(",") if r],
                                          [int(b) for b in args.node_batch.split(",") if b])
        rules = [name for name, _, _ in variants]
        run("midpoint:2")                                              # warm-up
        samples = {r: [] for r in rules}
        last = {}
        for _ in range(args.repeats):
            for rule, base_rule, mib in variants:
                with bm.node_batch_cap(mib), bm.measure() as m:
                    a = run(base_rule)
                samples[rule].append(m)
                last[rule] = a
        rows = []
        print("| rule | chosen | s / test sample (wall) | CPU s / sample | sys / user | "
              "speed-up vs 210 s | max step rel. residual | nodes / step |")
        print("|---|---|---|---|---|---|---|---|")
        for rule in rules:
            ms, a = samples[rule], last[rule]
            wall = statistics.median(m.wall_s for m in ms)
            cpu = statistics.median(m.user_s + m.system_s for m in ms)
            user = statistics.median(m.user_s for m in ms)
            sys_ = statistics.median(m.system_s for m in ms)
            per = wall / len(X)
            row = {"rule": rule, "chosen": a.quadrature, "wall_s": [m.wall_s for m in ms],
                   "user_s": [m.user_s for m in ms], "system_s": [m.system_s for m in ms],
                   "minor_faults": [m.minor_faults for m in ms],
                   "seconds_per_test_sample": per, "cpu_seconds_per_test_sample": cpu / len(X),
                   "speedup_vs_official": OFFICIAL_SECONDS_PER_SAMPLE / per,
                   "max_step_residual_rel": float(a.step_residual_relative.max()),
                   "reconstruction_error": float(a.reconstruction_error),
                   "nodes_per_step": float(a.evaluations["quadrature_nodes"].double().mean()),
                   "plan": {k: a.plan[k] for k in ("mode", "tangent_chunk", "eval_chunk")
                            if k in a.plan}}
            rows.append(row)
            print(f"| {rule} | {a.quadrature[:60]} | {per:.4f} | {cpu / len(X):.4f} | "
                  f"{sys_ / max(user, 1e-9):.1%} | {row['speedup_vs_official']:.0f}x | "
                  f"{row['max_step_residual_rel']:.1e} | {row['nodes_per_step']:.1f} |")
        by = {r["rule"]: r for r in rows}
        summary = {}
        if "midpoint:100" in by and args.floor:
            floor = compute_floor(lambda X_: attribute(model, traj, X_, params="all", data="all",
                                                       steps="each", output="logits",
                                                       progress=False, quadrature="midpoint:100"),
                                  X, dtype)
            by["midpoint:100"]["compute_floor"] = floor
            print(f"# midpoint:100 compute floor: {floor['gemm_flops_per_test_sample'] / 1e9:.2f} "
                  f"GFLOP of matrix products per test sample (torch.utils.flop_counter) at "
                  f"{floor['gemm_gflops'] :.1f} GFLOP/s (the best of {floor['gemm_shape']} "
                  f"matrix products on this machine, one thread): ≥ "
                  f"{floor['seconds_per_test_sample']:.3f} s per test sample, at most "
                  f"{OFFICIAL_SECONDS_PER_SAMPLE / floor['seconds_per_test_sample']:.0f}x the "
                  f"official 210 s; measured {by['midpoint:100']['seconds_per_test_sample']:.3f} s "
                  f"({floor['seconds_per_test_sample'] / by['midpoint:100']['seconds_per_test_sample']:.0%} "
                  f"of the floor's speed)")
        if "midpoint:100" in by:
            mp = by["midpoint:100"]
            summary["midpoint100_target_s_per_sample"] = OFFICIAL_SECONDS_PER_SAMPLE / TARGET_SPEEDUP
            summary["midpoint100_meets_2000x"] = mp["speedup_vs_official"] >= TARGET_SPEEDUP
            if "default" in by:
                summary["default_over_midpoint100_wall"] = (by["default"]["seconds_per_test_sample"]
                                                            / mp["seconds_per_test_sample"])
        official = same_machine_official(args.official)
        if official and "midpoint:100" in by:
            mp = by["midpoint:100"]
            mp["speedup_vs_official_same_machine"] = (official["seconds_per_test_sample"]
                                                      / mp["seconds_per_test_sample"])
            summary["official_same_machine"] = official
            summary["midpoint100_speedup_vs_official_same_machine"] = \
                mp["speedup_vs_official_same_machine"]
        for k, v in summary.items():
            print(f"# {k}: {v}")
        result = {"case": {"p": cfg.p, "D": traj.layout.D, "n_train": cfg.n_train,
                           "steps": traj.num_steps, "test_samples": len(X),
                           "outputs": model.vocab, "dtype": args.dtype, "threads": 1,
                           "official_seconds_per_sample": OFFICIAL_SECONDS_PER_SAMPLE},
                  "rows": rows, "summary": summary}
        if args.out:
            print(f"wrote {bm.write_results(args.out, result, env=env)}")
        return result


if __name__ == "__main__":
    main()
