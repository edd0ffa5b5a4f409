"""bench/bench_memory_budget.py must keep running (a small MLP, one budget, two paths): its rows
carry the planner's estimate and a measured peak from a fresh process. The figures themselves are
the benchmark's output (bench/results/memory_budget_cpu.json), never asserted here."""
import math
import sys


def test_memory_budget_bench_measures_and_estimates(load_bench, monkeypatch):
    bench = load_bench("bench_memory_budget")
    # peak_memory_subprocess re-imports the setup function's module by file path from sys.modules
    monkeypatch.setitem(sys.modules, bench.__name__, bench)
    rows = bench.run(quick=True, budgets=[64], cases=["reverse data=all", "kinks"])
    assert [r["case"] for r in rows] == ["reverse data=all", "kinks forward data=all"]
    for r in rows:
        assert r["mode"] in r["case"]
        assert r["estimate_bytes"] > 0 and r["measured_bytes"] >= 0
        assert math.isfinite(r["measured_over_estimate"])
        assert "subprocess" in r["method"]


def test_memory_budget_bench_reports_a_refused_budget(load_bench):
    bench = load_bench("bench_memory_budget")
    # update credit keeps P·D numbers: 10 labels × 1.86M float32 params > 64 MiB, refused up front
    rows = bench.run(quick=False, budgets=[64], cases=["forward data=label"])
    assert len(rows) == 1 and "is below the minimum" in rows[0]["refused"]
    assert "Update-step credit keeps one D-vector per data partition" in rows[0]["refused"]
