"""bench/bench_paper_case.py keeps running at a tiny size (2 recorded steps, 2 test samples): the
midpoint:100 row, its compute floor (matrix-product FLOPs from torch.utils.flop_counter, checked
against a product of known size) and the comparison with a same-machine official result file.
Timings are never asserted, only how they are combined."""
import json

import torch


def test_bench_paper_case_smoke(load_bench, tmp_path):
    bench = load_bench("bench_paper_case")
    official = tmp_path / "official.json"
    official.write_text(json.dumps({"rows": [{"seconds_per_test_sample": 10.0, "dtype": "float32",
                                              "test_samples": 1}],
                                    "environment": {"host": "here"}}))
    threads = torch.get_num_threads()
    try:                                           # the bench runs on one thread
        res = bench.main(["--test", "2", "--steps", "2", "--repeats", "1", "--rules",
                          "midpoint:100", "--official", str(official), "--out", ""])
    finally:
        torch.set_num_threads(threads)
    row, = res["rows"]
    assert row["rule"] == "midpoint:100" and row["nodes_per_step"] == 100.0
    floor = row["compute_floor"]
    assert floor["gemm_flops_per_test_sample"] > 0 and floor["gemm_gflops"] > 0
    assert abs(floor["seconds_per_test_sample"] - floor["gemm_flops_per_test_sample"]
               / (floor["gemm_gflops"] * 1e9)) < 1e-12
    assert res["summary"]["official_same_machine"]["seconds_per_test_sample"] == 10.0
    assert abs(row["speedup_vs_official_same_machine"]
               - 10.0 / row["seconds_per_test_sample"]) < 1e-9
    assert bench.same_machine_official("") is None
    assert bench.same_machine_official(str(tmp_path / "absent.json")) is None


def test_compute_floor_counts_matrix_product_flops(load_bench):
    bench = load_bench("bench_paper_case")
    W = torch.randn(64, 32, dtype=torch.float64)
    X = torch.randn(10, 64, dtype=torch.float64)
    floor = bench.compute_floor(lambda X_: X_ @ W, X, torch.float64, samples=5)
    assert floor["counted_on_test_samples"] == 5
    assert floor["gemm_flops_per_test_sample"] == 2 * 64 * 32        # one row of X @ W
