"""Microbenchmarks of explaind_fast.ops.path_kernel_reduce against the naive reference and a Python
loop of torch.matmul per group: time and *measured* peak memory, on the CPU always and on CUDA when
present.

    python bench/bench_ops.py              # prints a table (the README's main command for now)
    python bench/bench_ops.py --quick      # D = 12288 instead of 98304 (a smoke run)
    python bench/bench_ops.py --json ops_cpu.json   # also writes bench/results/ops_cpu.json
    python -m pytest -q bench/bench_ops.py # the same cases as pytest-benchmark tests (--bench-quick)

Measured with explaind_fast.testing.benchmark (the harness every bench script uses):
peak memory is the memory the call itself needs on top of its inputs, measured in a fresh
subprocess (peak_memory_subprocess):
  CPU   RSS high-water mark (VmHWM, reset through /proc/self/clear_refs after the inputs exist)
        minus the RSS before the call;
  CUDA  torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the memory before.
The output tensor is allocated by the call and so is counted. Times (time_call, summarize) are the
median and p20/p80 of --repeats runs after a warm-up run: perf_counter on the CPU, CUDA events
(synchronized) on CUDA. Every table and JSON file carries the environment row.
"""
import argparse
import functools

import torch

from explaind_fast import ops
from explaind_fast.ops.reference import path_kernel_reduce_naive
from explaind_fast.testing import benchmark as bm

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


def _memory_setup(impl, case, device):
    """Child side of the peak-memory measurement: inputs, a warm-up on tiny inputs (kernels and
    libraries loaded), then the call to measure."""
    inputs = make_inputs(tuple(case), device)
    IMPLS[impl](*make_inputs((2, 4, 64, 2, 2), device))
    return functools.partial(IMPLS[impl], *inputs)


def peak_memory(impl, case, device):
    """Measured peak extra memory of one call, in a fresh subprocess (so earlier runs don't count)."""
    return bm.peak_memory_subprocess(_memory_setup, impl, list(case), device, device=device)


def run_case(impl, case, device, repeats):
    call = functools.partial(IMPLS[impl], *make_inputs(case, device))
    times = bm.time_call(call, repeats=repeats, warmup=1, device=device)
    del call  # frees the inputs before the subprocess allocates its own
    mem = peak_memory(impl, case, device)
    stats = bm.summarize(times)
    Q, R, D, P, G = case
    return {"impl": impl, "device": device, "device_name": bm.device_name(device), "Q": Q, "R": R,
            "D": D, "P": P, "G": G, "median_s": stats["median_s"], "p20_s": stats["p20_s"],
            "p80_s": stats["p80_s"], "n": stats["n"], "J_read_GBps": Q * R * D * 4 / stats["median_s"] / 1e9,
            "peak_extra_bytes": mem["peak_extra_bytes"], "method": mem["method"],
            ("rss_before_bytes" if device == "cpu" else "allocated_before_bytes"): mem["before_bytes"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small D (smoke run)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--impls", default="fused,naive,matmul_loop")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", help="also write the rows (with the environment row) to this "
                                       "file; a bare file name goes to bench/results/")
    args = parser.parse_args(argv)
    bm.set_threads(args.threads)
    cases = QUICK_CASES if args.quick else CASES
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    print("# explaind_fast path_kernel_reduce, float32")
    header = (f"{'device':<6} {'Q':>2} {'R':>4} {'D':>6} {'P':>3} {'G':>6} {'impl':<12} {'median s':>9} "
              f"{'p20-p80 s':>15} {'peak MiB':>9} {'vs naive':>14}")
    for device in devices:
        print(bm.format_environment(bm.environment(device)))
        print(header)
        for case in cases:
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
        print(f"wrote {bm.write_results(args.json, rows, device=devices[-1])}")
    return rows


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
            bm.sync(device)

        benchmark.pedantic(call, rounds=3, iterations=1, warmup_rounds=1)
        benchmark.extra_info.update(device_name=bm.device_name(device), **peak_memory(impl, case, device))


if __name__ == "__main__":
    main()
