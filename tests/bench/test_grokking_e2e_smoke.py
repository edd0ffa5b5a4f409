"""bench/bench_grokking_e2e.py keeps running on the CPU at a tiny size; timings are never asserted."""


def test_e2e_bench_runs_at_tiny_size(tmp_path, load_bench):
    """bench/bench_grokking_e2e.py keeps running on the CPU (tiny preset, 2 steps); its runs
    reconstruct the final logits (Gauss–Legendre on a ReLU model is not exact: loose bound)."""
    bench = load_bench("bench_grokking_e2e")
    out = tmp_path / "e2e.json"
    res = bench.main(["--size", "tiny", "--max-steps", "2", "--rules", "gauss-legendre:2",
                      "--fine-rule", "gauss-legendre:2", "--window", "2", "--out", str(out)])
    assert out.exists() and res["steps"] == 2 and len(res["runs"]) == 3
    for row in res["runs"]:
        assert "error" not in row, row
        assert row["wall_s"] > 0 and row["peak_bytes"] > 0
        assert row["reconstruction_error"] < 1e-1, row
    assert res["runs"][0]["plan"]["mode"] in ("forward", "reverse")
