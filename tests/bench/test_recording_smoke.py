"""bench/bench_recording.py keeps running (one step of the paper-sized transformer, on the CPU),
recording does not perturb training, and the recorded steps replay. Timings are never asserted."""


def test_bench_recording_smoke(load_bench):
    bench = load_bench("bench_recording")
    r = bench.main(["--steps", "1", "--warmup", "0", "--verify"])
    assert r["D"] == 97331 and r["recorded_equals_bare"]
    # float32 trajectory: float32 rounding of θ, see tests/test_recorder.py for the bounds
    assert r["verify_max_moment_error"] < 1e-4
    # θ and v, int32 indices of the 4000-sample batch (equal weights are one number in the log),
    # plus safetensors headers and the log line: under 4 KiB of overhead
    assert r["bytes_theta_and_v"] + r["bytes_batch"] <= r["bytes_per_step"]
    assert r["bytes_per_step"] < r["bytes_theta_and_v"] + r["bytes_batch"] + 4096
    assert r["bytes_batch"] == 4000 * 4
