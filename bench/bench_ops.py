"""Microbenchmarks of explaind_fast.ops.path_kernel_reduce against the naive reference and a Python
loop of torch.matmul per group: time and *measured* peak memory, on the CPU always and on CUDA when
present.

    python bench/bench_ops.py              # prints a table (the README's main command for now)
    python bench/bench_ops.py --quick      # D = 12288 instead of 98304 (a smoke run)
    python -m pytest -q bench/bench_ops.py # the same cases as pytest-benchmark tests (--bench-quick)

Peak memory is the memory the call itself needs on top of its inputs:
  CPU   measured in a fresh subprocess: RSS high-water mark (VmHWM, reset through
        /proc/self/clear_refs after the inputs exist) minus the RSS before the call;
  CUDA  torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the memory before.
The output tensor is allocated by the call and so is counted. Times are medians of several runs
(p20/p80 given) after a warm-up run, with torch.cuda.synchronize() inside the timed region on CUDA.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from explaind_fast import ops
from explaind_fast.ops.reference import path_kernel_reduce_naive

# (Q, R, D, P, G): the shapes. G groups of equal length (D = 98304 = 768·128).
CASES = [(8, 256, 98304, 16, 1), (8, 256, 98304, 16, 6), (8, 256, 98304, 16, 768), (8, 256, 98304, 1, 98304)]
QUICK_CASES = [(8, 256, 12288, 16, 1), (8, 256, 12288, 16, 768), (8, 256, 12288, 1, 12288)]


def matmul_loop(J, w, B, offsets, *, out=None, alpha=1.0):
    """Quadrature sum once (an [R, D] tensor), then one torch.matmul per group (the usual
    hand-written alternative). Peak extra memory: R·D + G·R·P accumulation-dtype elements."""
    acc = torch.float64 if J.dtype == torch.float64 else torch.float32
    J_sum = torch.tensordot(w.to(acc), J.to(acc), dims=1)  # [R, D]
    B = B.to(acc)
    G = offsets.numel() - 1
    if out is None:
        out = torch.zeros(G, J.shape[1], B.shape[0], dtype=acc, device=J.device)
    bounds = offsets.tolist()
    for g in range(G):
        a, b = bounds[g], bounds[g + 1]
        out[g].add_(torch.matmul(J_sum[:, a:b], B[:, a:b].t()), alpha=alpha)
    return out


IMPLS = {"fused": ops.path_kernel_reduce, "naive": path_kernel_reduce_naive, "matmul_loop": matmul_loop}


def make_inputs(case, device, dtype=torch.float32, seed=0):
    Q, R, D, P, G = case
    gen = torch.Generator(device=device).manual_seed(seed)
    J = torch.randn(Q, R, D, generator=gen, device=device, dtype=dtype)
    w = torch.rand(Q, generator=gen, device=device, dtype=torch.float32)
    B = torch.randn(P, D, generator=gen, device=device, dtype=dtype)
    offsets = torch.linspace(0, D, G + 1, device=device).round().long()
    return J, w, B, offsets


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_impl(impl, inputs, device, repeats=5, warmup=1):
    """Seconds of each run (after warm-up runs)."""
    fn = IMPLS[impl]
    for _ in range(warmup):
        fn(*inputs)
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*inputs)
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _proc_status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _memory_child(impl, case, device):
    """Runs in a fresh process: peak bytes of one call beyond the inputs (see module docstring)."""
    inputs = make_inputs(case, device)
    IMPLS[impl](*make_inputs((2, 4, 64, 2, 2), device))  # load kernels/libraries before measuring
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        IMPLS[impl](*inputs)
        torch.cuda.synchronize()
        return {"peak_extra_bytes": torch.cuda.max_memory_allocated() - before,
                "method": "torch.cuda.max_memory_allocated"}
    before = _proc_status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    IMPLS[impl](*inputs)
    return {"peak_extra_bytes": _proc_status_bytes("VmHWM") - before, "method": "VmHWM - VmRSS (subprocess)",
            "rss_before_bytes": before}


def peak_memory(impl, case, device):
    """Measured peak extra memory of one call, in a fresh subprocess (so earlier runs don't count)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", impl, json.dumps(list(case)), device]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement of {impl} {case} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def device_name(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def run_case(impl, case, device, repeats):
    inputs = make_inputs(case, device)
    times = time_impl(impl, inputs, device, repeats=repeats)
    del inputs
    mem = peak_memory(impl, case, device)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    Q, R, D, P, G = case
    return {"impl": impl, "device": device, "device_name": device_name(device), "Q": Q, "R": R, "D": D, "P": P,
            "G": G, "median_s": statistics.median(times), "p20_s": q[0], "p80_s": q[-1],
            "J_read_GBps": Q * R * D * 4 / statistics.median(times) / 1e9, **mem}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small D (smoke run)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--impls", default="fused,naive,matmul_loop")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--memory-child", nargs=3, metavar=("IMPL", "CASE", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        impl, case, device = args.memory_child
        print(json.dumps(_memory_child(impl, tuple(json.loads(case)), device)))
        return
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    print(f"# explaind_fast path_kernel_reduce, torch {torch.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, float32")
    header = (f"{'device':<6} {'Q':>2} {'R':>4} {'D':>6} {'P':>3} {'G':>6} {'impl':<12} {'median s':>9} "
              f"{'p20-p80 s':>15} {'peak MiB':>9} {'vs naive':>14}")
    for device in devices:
        print(f"# {device}: {device_name(device)}")
        print(header)
        for case in (QUICK_CASES if args.quick else CASES):
            case_rows = {impl: run_case(impl, case, device, args.repeats) for impl in args.impls.split(",")}
            for impl, row in case_rows.items():
                naive = case_rows.get("naive")
                ratio = ""
                if naive is not None and impl != "naive":
                    ratio = (f"{naive['median_s'] / row['median_s']:.1f}x,"
                             f"{naive['peak_extra_bytes'] / max(row['peak_extra_bytes'], 1):.0f}x mem")
                Q, R, D, P, G = case
                print(f"{device:<6} {Q:>2} {R:>4} {D:>6} {P:>3} {G:>6} {impl:<12} {row['median_s']:>9.3f} "
                      f"{row['p20_s']:>7.3f}-{row['p80_s']:<7.3f} {row['peak_extra_bytes'] / 2**20:>9.1f} "
                      f"{ratio:>14}", flush=True)
                rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


# ---------------------------------------------------------------- pytest-benchmark entry points
try:
    import pytest
except ImportError:  # the script does not need pytest
    pytest = None

if pytest is not None:
    _DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                     reason="no CUDA device"))]

    @pytest.mark.parametrize("device", _DEVICES)
    @pytest.mark.parametrize("impl", list(IMPLS))
    def test_path_kernel_reduce(benchmark, impl, case, device):  # `case`: bench/conftest.py
        inputs = make_inputs(case, device)

        def call():
            IMPLS[impl](*inputs)
            _sync(device)

        benchmark.pedantic(call, rounds=3, iterations=1, warmup_rounds=1)
        benchmark.extra_info.update(device_name=device_name(device), **peak_memory(impl, case, device))


if __name__ == "__main__":
    main()
