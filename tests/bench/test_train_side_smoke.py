"""bench/bench_train_side.py keeps running at a tiny size (the streamed and the current train side,
each peak in a fresh process), both paths agree, and the streamed path uses several slabs of at
most 17/16 of the largest tensor. Timings and peaks are never asserted."""


import sys


def test_bench_train_side_smoke(load_bench, tmp_path, monkeypatch):
    bench = load_bench("bench_train_side")
    monkeypatch.setitem(sys.modules, bench.__name__, bench)    # peak_memory_subprocess finds it
    res = bench.main(["--batch", "4", "--width", "16", "--depth", "2", "--rows", "2",
                    "--train-budget", "1", "--repeats", "1", "--out", str(tmp_path / "smoke.json")])
    r, = res["runs"]
    assert r["current_run"] and r["slabs"] > 1
    assert r["largest_slab"] <= r["largest_tensor"] * 17 // 16
    assert r["max_rel_diff_contraction"] < 1e-5 and r["max_rel_diff_batch_gradient"] < 1e-5
    assert (tmp_path / "smoke.json").exists()
    for p in ("current", "streamed"):
        assert r[p]["peak"]["peak_extra_bytes"] >= 0 and r[p]["time"]["n"] == 1
