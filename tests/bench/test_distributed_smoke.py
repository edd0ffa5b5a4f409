"""bench/bench_distributed.py keeps running: a tiny modular-addition run on 1 and 2 gloo ranks,
data="all" (the steps split). Timings and the speed-up are never asserted; the 2-rank kernel
equals the 1-rank kernel."""


def test_bench_distributed_smoke(load_bench):
    bench = load_bench("bench_distributed")
    r = bench.main(["--p", "5", "--d-model", "8", "--d-mlp", "8", "--train", "10", "--steps",
                    "2", "--test", "2", "--label-test", "2", "--repeats", "1",
                    "--workloads", "all"])
    row = r["workloads"]["all"]
    assert row["split"] == "steps" and row["speedup_median"] > 0
    assert abs(row["kernel_sum_2ranks"] - row["kernel_sum_1rank"]) <= \
        1e-12 * max(1.0, abs(row["kernel_sum_1rank"]))
    assert len(row["peak_extra_bytes_per_rank_2ranks"]) == 2
