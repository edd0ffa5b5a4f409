"""Fresh pages (minor page faults) of a training-like alloc/free loop under glibc's malloc settings:
none, :func:`explaind_fast.keep_freed_memory`, and the two environment variables alone and
together — the figures of README, "Memory handed back to the kernel".

The loop (:data:`LOOP`, run in a fresh process per setting): 3 warm-up steps, then 20 steps that
each make two 48 MB float64 tensors and their sum and free all three, as a full-batch training
step makes and frees its activations; faults counted by ``resource.getrusage`` over the 20 steps.
tests/demos/test_demos.py runs the same loop.

    python bench/bench_malloc_faults.py                    # writes bench/results/malloc_faults_cpu.json
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from explaind_fast.allocator import MALLOC_ENV
from explaind_fast.testing import benchmark as bm

LOOP = """
import resource, sys, torch
from explaind_fast import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "1" else False
def step():
    a = torch.ones(6_000_000, dtype=torch.float64)
    b = torch.ones(6_000_000, dtype=torch.float64)
    c = a + b
    del a, b, c
for _ in range(3):
    step()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(int(applied), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""

MMAP_64MIB, TRIM_256MIB = str(64 << 20), str(256 << 20)
SETTINGS = [("none", False, {}),
            ("keep_freed_memory()", True, {}),
            ("MALLOC_TRIM_THRESHOLD_ alone", False, {"MALLOC_TRIM_THRESHOLD_": TRIM_256MIB}),
            ("MALLOC_MMAP_THRESHOLD_ alone", False, {"MALLOC_MMAP_THRESHOLD_": MMAP_64MIB}),
            ("both variables", False, {"MALLOC_MMAP_THRESHOLD_": MMAP_64MIB,
                                       "MALLOC_TRIM_THRESHOLD_": TRIM_256MIB})]


def run(keep: bool, env_extra=None):
    """(whether keep_freed_memory() applied, minor faults of the 20 steps) in a fresh process
    whose environment has no malloc setting but ``env_extra``."""
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    out = subprocess.run([sys.executable, "-c", LOOP, "1" if keep else "0"],
                         env={**env, **(env_extra or {})}, capture_output=True, text=True,
                         check=True).stdout.split()
    return bool(int(out[0])), int(out[1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="malloc_faults_cpu.json",
                    help="results file (a bare name: bench/results/<name>); '' = none")
    args = ap.parse_args(argv)
    env = bm.environment()
    print(bm.format_environment(env))
    print("| setting | applied | minor faults (20 steps) |\n|---|---|---|")
    rows = []
    for name, keep, extra in SETTINGS:
        applied, faults = run(keep, extra)
        rows.append({"setting": name, "environment": extra, "applied": applied,
                     "minor_faults": faults})
        print(f"| {name} | {applied} | {faults} |", flush=True)
    if args.out:
        print(f"wrote {bm.write_results(args.out, rows, env=env)}")
    return rows


if __name__ == "__main__":
    main()
