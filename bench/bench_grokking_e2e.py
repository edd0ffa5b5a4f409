"""End-to-end grokking decomposition: wall time, peak memory and the planner's choice per run.

    python bench/bench_grokking_e2e.py --size cpu --max-steps 6   # the demo's default preset: the
                                                                  # paper's size (every step here)
    python bench/bench_grokking_e2e.py --size full --device cuda  # the paper's size, on a GPU
    python bench/bench_grokking_e2e.py --size tiny                # smoke run (seconds)

Trains the paper's modular-addition transformer (explaind_fast.demos, grokking presets) while
recording, then times, on the recorded trajectory:

    layers×steps   params = the paper's six layers, steps="each", data="all", all logits, with each
                   rule in --rules (default: the engine's default, auto, then kinks:8 and
                   midpoint:100)
    parameters     params="parameter", steps="all", data="all": per-parameter importance over the
                   whole run (the pruning ranking), on --param-test test samples
    decoder window the decoder's train × test matrix (data="sample", output summed) for one window of
                   --window steps (paper: 50) in the middle of the run

For each: wall and CPU time, peak memory during the run (explaind_fast.testing.benchmark.track_peak:
torch.cuda.max_memory_allocated on CUDA; on the CPU the RSS high-water mark, reset before each run
through /proc/self/clear_refs; "peak_bytes" is the absolute peak, "peak_extra_bytes" the part above
what the process held before the run), the planner's mode and estimates, the reconstruction error and
the worst relative quadrature residual. Writes JSON with --out (a bare file name: bench/results/),
with the environment row (device, versions, threads, OMP_WAIT_POLICY, load average, date).
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch

from explaind_fast.testing import benchmark as bm


def _timed(name, fn, device, log):
    with bm.track_peak(device) as peak, bm.measure(device) as m:
        attr = fn()
    wall = m.wall_s
    row = {"run": name, "wall_s": wall, "cpu_s": m.cpu_s, "system_s": m.system_s,
           "minor_faults": m.minor_faults, "peak_bytes": peak["peak_bytes"],
           "peak_extra_bytes": peak["peak_extra_bytes"], "peak_method": peak["method"],
           "reconstruction_error": float(attr.reconstruction_error),
           "max_step_residual_rel": float(attr.step_residual_relative.max()),
           "plan": _plan_summary(attr), "evaluations": _jsonable(getattr(attr, "evaluations", None))}
    log(f"{name:40s} {wall:9.2f} s  peak {row['peak_bytes'] / 2**20:9.1f} MiB  "
        f"recon {row['reconstruction_error']:.2e}  plan {row['plan'].get('mode')}")
    return row, attr


def _plan_summary(attr):
    plan = getattr(attr, "plan", None)
    if plan is None:
        return {}
    if isinstance(plan, dict):
        return _jsonable(plan)
    return _jsonable({k: v for k, v in vars(plan).items() if not k.startswith("_")})


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    return str(x)


def main(argv=None):
    from explaind_fast import attribute
    from explaind_fast.demos.common import train_recorded
    from explaind_fast.demos.grokking import PRESETS, build
    from explaind_fast.demos.models import TRANSFORMER_LAYERS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: the preset's (float64 on the CPU)")
    ap.add_argument("--rules", default="auto,kinks:8,midpoint:100")
    ap.add_argument("--test", type=int, default=None, help="test samples (default: the preset's)")
    ap.add_argument("--param-test", type=int, default=8,
                    help="test samples of the per-parameter run (its result is D·M·O numbers)")
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--fine-rule", default="kinks:8",
                    help="quadrature of the per-parameter and per-sample runs")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = ap.parse_args(argv)
    bm.set_threads(args.threads)

    cfg = PRESETS[args.size].with_overrides(max_steps=args.max_steps, dtype=args.dtype)
    device = torch.device(args.device)
    dtype = getattr(torch, cfg.dtype)
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(bm.format_environment(bm.environment(device)))

    data, model, opt = build(cfg, device, dtype)
    tx, ty = data.train_x.to(device), data.train_y.to(device)
    vx, vy = data.test_x.to(device), data.test_y.to(device)
    stop = None
    if cfg.stop_at_test_acc is not None:
        stop = lambda e: e["test_acc"] >= cfg.stop_at_test_acc and e["train_acc"] >= 1.0  # noqa
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tr = train_recorded(model, opt, tx, ty, vx, vy, os.path.join(tmp, "trajectory"),
                            max_steps=cfg.max_steps, seed=cfg.seed, stop=stop, log=log,
                            log_every=500)
        traj, N = tr.trajectory, tr.num_steps
        M = min(args.test or cfg.attr_test, cfg.n_test)
        log(f"trained {N} steps in {tr.wall_s:.1f} s; final test acc {tr.history[-1]['test_acc']:.3f}; "
            f"attributing {M} test samples × {model.vocab} logits on {device} ({cfg.dtype})")
        common = dict(dtype=dtype, device=device, progress=False)
        for rule in [r for r in args.rules.split(",") if r]:
            try:
                row, _ = _timed(f"layers×steps {rule}", lambda: attribute(
                    model, traj, vx[:M], params=TRANSFORMER_LAYERS, data="all", steps="each",
                    quadrature=rule, output="logits", **common), device, log)
            except Exception as exc:  # a rule that is not available is reported, not fatal
                row = {"run": f"layers×steps {rule}", "error": f"{type(exc).__name__}: {exc}"}
                log(f"layers×steps {rule}: {row['error']}")
            rows.append(row)
        Mp = min(args.param_test, M)
        row, _ = _timed(f"parameters×all-steps ({Mp} test)", lambda: attribute(
            model, traj, vx[:Mp], params="parameter", data="all", steps="all",
            quadrature=args.fine_rule, output="logits", **common), device, log)
        rows.append(row)
        a = max(0, N // 2 - args.window // 2)
        b = min(N, a + args.window)
        ones = torch.ones(1, model.vocab, dtype=dtype, device=device)
        row, _ = _timed(f"decoder train×test steps {a}-{b}", lambda: attribute(
            model, traj, vx[:M], train_data=(tx, ty), params={"decoder": ["decoder.*"]},
            data="sample", steps=[a, b], quadrature=args.fine_rule, output=ones,
            credit="update", **common), device, log)
        rows.append(row)

    result = {
        # a shared CPU distorts timings: torch's default OpenMP spin-waiting was measured 50×
        # slower on a 2-core machine at load 10 (bench/results/cpu_e2e.md); the environment row
        # records the conditions (load average, OMP_WAIT_POLICY, threads)
        "environment": bm.environment(device),
        "size": args.size, "p": cfg.p, "n_train": cfg.n_train, "test_samples": M,
        "steps": N, "dtype": cfg.dtype, "training_wall_s": tr.wall_s, "runs": rows,
    }
    if args.out:
        log(f"wrote {bm.write_results(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
