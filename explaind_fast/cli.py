"""Command line: ``python -m explaind_fast demo grokking|digits-cnn [--full|--tiny] [--out DIR] …``.

Each demo trains a model while recording it, attributes it with explaind_fast.attribute and writes a
report directory (report.md, CSV files, PNG figures). The default size runs on a CPU in minutes
(grokking: the paper's model, data and training to grokking, with θ stored every 25 steps and 8 test
samples; its report says what it computed); ``--full`` attributes every step and all test samples
(for a GPU); ``--tiny`` is a seconds-long smoke test.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .allocator import keep_freed_memory

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m explaind_fast",
                                 description="explaind_fast: exact ExPLAIND attributions")
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="reproduce the paper's validations and write a report")
    demo.add_argument("name", choices=["grokking", "digits-cnn"], help="which demo")
    size = demo.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true",
                      help="grokking: every step stored and attributed, all 2000 test samples and "
                           "logits, Figures 4/5 (the default is already the paper's model and "
                           "training); meant for a GPU")
    size.add_argument("--tiny", action="store_true", help="a seconds-long smoke test")
    demo.add_argument("--out", default=None,
                      help="report directory (default reports/<demo>[-full|-tiny])")
    demo.add_argument("--device", default=None, help="torch device (default: cpu)")
    demo.add_argument("--dtype", default=None, choices=["float64", "float32"],
                      help="training and attribution dtype (default float64)")
    demo.add_argument("--rules", default=None,
                      help="comma-separated quadrature rules of the Table 1 analogue "
                           "(grokking default: midpoint:10,midpoint:100,gauss-legendre:8,kinks:3; "
                           "--full: midpoint:10,midpoint:100,gauss-legendre:2,4,8,16,"
                           "adaptive:1e-6,kinks:3)")
    demo.add_argument("--steps", type=int, default=None,
                      help="grokking: maximum training steps; digits-cnn: ignored")
    demo.add_argument("--p", type=int, default=None, help="grokking: the modulus")
    demo.add_argument("--test-samples", type=int, default=None,
                      help="test samples attributed (grokking; digits-cnn: Table 1 images)")
    demo.add_argument("--seed", type=int, default=None)
    demo.add_argument("--threads", type=int, default=None,
                      help="torch threads (default: torch's, the number of cores; with "
                           "OMP_WAIT_POLICY=PASSIVE, which this command sets unless you did, 2 "
                           "threads were as fast as 1 on the loaded 2-core CPU; see README)")
    demo.add_argument("--checkpoint-every", type=int, default=None,
                      help="grokking: store θ every k steps (default 25; 1 with --full/--tiny); "
                           "k > 1 skips Figures 4/5 (they need every step)")
    demo.add_argument("--memory-budget", type=float, default=None, metavar="GIB",
                      help="grokking: GiB each attribution may hold (default: the engine's 2 GiB; "
                           "Figures 4/5 take up to 80%% of the device's free memory when they need "
                           "more, and stop before training when it is not there)")
    demo.add_argument("--progress", action="store_true", help="show tqdm progress bars")
    demo.add_argument("--train-only", action="store_true",
                      help="grokking: train and record only (accuracy curves, steps to grok)")
    return ap


def _rules(text: Optional[str]):
    if text is None:
        return None
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if ":" not in part and out:           # "gauss-legendre:2,4,8" shorthand
            part = out[-1].split(":")[0] + ":" + part
        out.append(part)
    return tuple(out)


def _passive_openmp() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the user set a policy: OpenMP threads then sleep instead of
    spinning at barriers, which on a shared or small CPU made 2 threads 2.1–2.3× slower than one
    (bench/results/demo_grokking_cpu.md). OpenMP reads it once, when torch loads: only effective
    when torch is not imported yet (``python -m explaind_fast``)."""
    if "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def main(argv: Optional[List[str]] = None) -> int:
    _passive_openmp()
    keep_freed_memory()            # training's per-step activations: README, "Memory handed back"
    args = build_parser().parse_args(argv)
    if args.command != "demo":               # pragma: no cover - argparse enforces it
        return 2
    size = "full" if args.full else "tiny" if args.tiny else "cpu"
    out = args.out or os.path.join("reports", args.name + ("" if size == "cpu" else f"-{size}"))
    from . import demos
    if args.name == "grokking":
        demos.check_dependencies("matplotlib")
        from .demos import grokking
        cfg = grokking.PRESETS[size].with_overrides(
            dtype=args.dtype, rules=_rules(args.rules), max_steps=args.steps, p=args.p,
            attr_test=args.test_samples, seed=args.seed, threads=args.threads,
            checkpoint_every=args.checkpoint_every,
            memory_budget=None if args.memory_budget is None else int(args.memory_budget * 2**30))
        if args.test_samples is not None:
            cfg = cfg.with_overrides(table1_test=args.test_samples)
        if args.p is not None and args.p != grokking.PRESETS[size].p:
            total = cfg.p * (cfg.p + 1) // 2        # keep the preset's train/test proportions
            base = grokking.PRESETS[size]
            share = base.n_train / (base.p * (base.p + 1) // 2)
            n_train = max(1, min(total - 2, round(share * total)))
            cfg = cfg.with_overrides(n_train=n_train, n_test=min(base.n_test, total - n_train),
                                     name=cfg.name + f", p={cfg.p}")
        summary = grokking.run(out, cfg, device=args.device, progress=args.progress,
                               train_only=args.train_only)
    else:
        demos.check_dependencies("matplotlib", "sklearn")
        from .demos import digits_cnn
        if args.threads is not None:
            import torch
            torch.set_num_threads(args.threads)
        cfg = digits_cnn.PRESETS[size].with_overrides(
            dtype=args.dtype, rules=_rules(args.rules), attr_test=args.test_samples,
            seed=args.seed)
        summary = digits_cnn.run(out, cfg, device=args.device, progress=args.progress)
    print(f"report: {summary['report']}")
    print("reconstruction error, max |initial + kernel + reg − final| (max quadrature residual):")
    for r in summary["attribution_runs"]:
        if r["note"]:
            print(f"  {r['run']:45s} {r['note']}")
        else:
            print(f"  {r['run']:45s} {r['reconstruction_error']:.3g} "
                  f"({r['max_step_residual']:.3g})")
    return 0


if __name__ == "__main__":          # pragma: no cover
    sys.exit(main())
