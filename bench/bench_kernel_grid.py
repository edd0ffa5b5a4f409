"""path_kernel_reduce over the shape grid of the GPU-performance issue, against three baselines.

    python bench/bench_kernel_grid.py                      # CUDA if present, else the CPU grid
    python bench/bench_kernel_grid.py --device cpu --quick # a few tiny shapes (what CI runs)
    python bench/bench_kernel_grid.py --out <device>.json  # → bench/results/<device>.json

For every (G, R, D, P) and input dtype it times
    fused     explaind_fast.ops.path_kernel_reduce (Triton on CUDA, the C++ kernel on CPU)
    naive     explaind_fast.ops.reference.path_kernel_reduce_naive (materialises R·P·D; skipped when
              that would not fit the memory cap)
    loop      a Python loop of torch.matmul per group (after one quadrature sum)
    gemm      one torch.matmul [R, K] @ [K, P] with K = D·(1 + Q/P), i.e. the same FLOPs as the fused
              op (2·R·D·P for the product + 2·Q·R·D for the quadrature fold): the practical ceiling
and reports the median time with p20/p80 spread (CUDA events on GPU, perf_counter on CPU), the
achieved TFLOP/s, the fraction of the same-FLOP GEMM's throughput, the speed-up over the loop, and
the peak memory on CUDA (torch.cuda.max_memory_allocated, measured in a separate run). Shapes whose
J tensor would not fit in a quarter of the device memory are listed as skipped with the reason.
Timing, peak memory and the environment row: explaind_fast.testing.benchmark.
"""
from __future__ import annotations

import argparse

import torch

from explaind_fast.testing import benchmark as bm

GPU_GRID = dict(G=[1, 6, 768, 4096, 65536], R=[256, 4096], D=[10**5, 10**7], P=[1, 16, 1024])
CPU_GRID = dict(G=[1, 6, 768], R=[64], D=[98304], P=[1, 16])
QUICK_GRID = dict(G=[1, 6, 96], R=[8], D=[3000], P=[1, 4])
Q_NODES = 4  # Gauss–Legendre 4: the engine's usual rule on smooth models


def _timed(fn, repeats, warmup, device):
    return bm.summarize(bm.time_call(fn, repeats=repeats, warmup=warmup, device=device))


def _peak_bytes(fn, device):
    """Peak tensor memory of one call on CUDA (beyond what is allocated before); None on the CPU,
    where an in-process RSS figure at these sizes would mostly measure the allocator."""
    if device.type != "cuda":
        return None
    return bm.peak_memory(fn, device)["peak_extra_bytes"]


def _offsets(G, D, device):
    # near-equal segments (the long-segment and the tiny-segment families both arise this way)
    return torch.div(torch.arange(G + 1, device=device) * D, G, rounding_mode="floor").to(torch.int64)


def bench_shape(G, R, D, P, dtype, device, repeats, mem_cap_bytes, backend="op", warmup=2):
    from explaind_fast.ops.reference import path_kernel_reduce_naive

    if backend == "triton":  # the Triton launcher directly (on CPU tensors: TRITON_INTERPRET=1)
        from explaind_fast.ops.triton_launcher import path_kernel_reduce_triton as path_kernel_reduce
    else:
        from explaind_fast.ops import path_kernel_reduce

    Q = Q_NODES
    esize = torch.tensor([], dtype=dtype).element_size()
    row = {"G": G, "R": R, "D": D, "P": P, "Q": Q, "dtype": str(dtype).replace("torch.", "")}
    j_bytes = Q * R * D * esize
    if j_bytes + P * D * esize > mem_cap_bytes:
        row["skipped"] = f"J needs {j_bytes / 2**30:.1f} GiB, over the cap of {mem_cap_bytes / 2**30:.1f} GiB"
        return row
    if G > D:
        row["skipped"] = "G > D"
        return row
    gen = torch.Generator(device="cpu").manual_seed(0)
    J = torch.randn(Q, R, D, generator=gen).to(device=device, dtype=dtype)
    B = torch.randn(P, D, generator=gen).to(device=device, dtype=dtype)
    w = torch.full((Q,), 1.0 / Q, device=device)
    off = _offsets(G, D, device)
    flops = 2.0 * R * D * P + 2.0 * Q * R * D
    results = {}

    fused = lambda: path_kernel_reduce(J, w, B, off)
    results["fused"] = _timed(fused, repeats, warmup, device)
    results["fused"]["peak_bytes"] = _peak_bytes(fused, device)

    K = int(D * (1 + Q / P))
    if R * K * esize <= mem_cap_bytes:
        A = torch.randn(R, K, generator=gen).to(device=device, dtype=dtype)
        Bt = torch.randn(K, P, generator=gen).to(device=device, dtype=dtype)
        results["gemm"] = _timed(lambda: A @ Bt, repeats, warmup, device)
        del A, Bt

    bounds = off.tolist()

    def loop():
        J_sum = torch.einsum("q,qrd->rd", w.to(dtype), J)
        out = torch.empty(G, R, P, device=device, dtype=torch.float32)
        for g in range(G):
            out[g] = (J_sum[:, bounds[g]:bounds[g + 1]] @ B[:, bounds[g]:bounds[g + 1]].t()).float()
        return out

    loop_repeats = max(1, min(repeats, int(2e4 // max(G, 1))))  # 65536 tiny matmuls per call
    results["loop"] = _timed(loop, loop_repeats, min(warmup, 1), device)
    results["loop"]["peak_bytes"] = _peak_bytes(loop, device)

    naive_bytes = R * P * D * 4 + Q * R * D * 4
    if naive_bytes <= mem_cap_bytes:
        naive = lambda: path_kernel_reduce_naive(J, w, B, off)
        results["naive"] = _timed(naive, max(1, repeats // 3), min(warmup, 1), device)
        results["naive"]["peak_bytes"] = _peak_bytes(naive, device)
        ref = naive()
    else:
        results["naive"] = {"skipped": f"needs {naive_bytes / 2**30:.1f} GiB"}
        ref = loop()
    got = fused()
    scale = ref.abs().max().item() or 1.0
    row["max_rel_diff_vs_baseline"] = (got - ref).abs().max().item() / scale

    t = results["fused"]["median_s"]
    row["fused_tflops"] = flops / t / 1e12
    if "gemm" in results:
        row["gemm_tflops"] = flops / results["gemm"]["median_s"] / 1e12
        row["fraction_of_gemm"] = results["gemm"]["median_s"] / t
    row["speedup_vs_loop"] = results["loop"]["median_s"] / t
    if "median_s" in results["naive"]:
        row["speedup_vs_naive"] = results["naive"]["median_s"] / t
    row["timings"] = results
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="a few tiny shapes (CI smoke run)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--backend", choices=["op", "triton"], default="op",
                    help="op: torch.ops dispatch (Triton on CUDA, C++ on CPU); triton: the Triton "
                         "launcher directly (on the CPU only under TRITON_INTERPRET=1)")
    ap.add_argument("--out", default=None,
                    help="write the JSON results here (a bare file name: bench/results/<name>)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    grid = QUICK_GRID if args.quick else (GPU_GRID if device.type == "cuda" else CPU_GRID)
    repeats = args.repeats or (3 if args.quick else (20 if device.type == "cuda" else 5))
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 8 * 2**30
    cap = total // 4
    env = bm.environment(device)
    print(bm.format_environment(env))
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for D in grid["D"]:
            for R in grid["R"]:
                for P in grid["P"]:
                    for G in grid["G"]:
                        row = bench_shape(G, R, D, P, dtype, device, repeats, cap, args.backend,
                                          warmup=0 if args.quick else 2)
                        rows.append(row)
                        if "skipped" in row:
                            print(f"G={G:6d} R={R:5d} D={D:9d} P={P:5d} {row['dtype']:9s} skipped: {row['skipped']}")
                            continue
                        tm = row["timings"]
                        print(f"G={G:6d} R={R:5d} D={D:9d} P={P:5d} {row['dtype']:9s} "
                              f"fused {tm['fused']['median_s'] * 1e3:9.3f} ms  "
                              f"{row['fused_tflops']:7.3f} TFLOP/s  "
                              f"of-gemm {row.get('fraction_of_gemm', float('nan')):5.2f}  "
                              f"x-loop {row['speedup_vs_loop']:7.1f}  "
                              f"x-naive {row.get('speedup_vs_naive', float('nan')):6.1f}", flush=True)
    result = {"environment": env, "backend": args.backend, "quadrature_nodes": Q_NODES,
              "memory_cap_bytes": cap, "rows": rows}
    if args.out:
        print(f"wrote {bm.write_results(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
