"""The GPU-performance benchmark must keep running on the CPU (tiny shapes): CI runs it here.

Only correctness is asserted (each row's fused result against its baseline); timings are printed by
the benchmark itself and never asserted.
"""
import pytest


# fp32: both sides accumulate in fp32 over at most Q·D = 12000 terms of unit-variance products,
# so relative differences are ~sqrt(12000)·6e-8 ≈ 7e-6 at worst; bf16 inputs are identical on both
# sides (each accumulates in fp32), so the same bound holds.
@pytest.mark.parametrize("backend", ["op", "triton"])
def test_kernel_grid_runs_on_cpu_and_agrees_with_baseline(backend, tmp_path, load_bench, request):
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")
    bench = load_bench("bench_kernel_grid")
    out = tmp_path / "grid.json"
    dtypes = "float32,bfloat16" if backend == "op" else "float32"  # the interpreter is slow
    result = bench.main(["--device", "cpu", "--quick", "--repeats", "1", "--backend", backend,
                         "--dtypes", dtypes, "--out", str(out)])
    assert out.exists()
    rows = [r for r in result["rows"] if "skipped" not in r]
    assert len(rows) == 6 * len(dtypes.split(","))
    for row in rows:
        assert row["max_rel_diff_vs_baseline"] < 2e-5, row
        assert row["timings"]["fused"]["median_s"] > 0
