"""bench/bench_figures45_floor.py: how its lower bounds are added up (from given per-step terms,
never timed here), and the fact behind its float64 training term — a run recorded in float32
cannot be attributed per sample exactly, one recorded in float64 can. Also bench_kinks_speed's
node-search timer, which splits an attribution's time at the kink search."""
import pytest

from explaind_fast.attribution.accumulator import Accumulator


def _terms(M):
    return {"forward_train_s": 1.0,
            "layers": {"decoder": {"per_sample_grads_s": 0.5, "moment_update_s": 0.25},
                       "linear 2": {"per_sample_grads_s": 2.0, "moment_update_s": 4.0}},
            "test": {M: {"test_rows_reverse_s": 0.125,
                         "contraction_s": {"decoder": 8.0, "linear 2": 16.0}}}}


def test_floors_add_up_the_terms_each_credit_needs(load_bench):
    bench = load_bench("bench_figures45_floor")
    n, M = 100, 7
    wins = bench._windows(n, 3, None)
    in_w = sum(b - a for a, b in wins)
    r = bench.floors(_terms(M), M, n, tables_s=3.0, train_step_s=0.5, layers=("decoder",))
    base = n * 0.5 + 3.0
    assert r["windows"] == wins and r["training_and_tables_s"] == base
    # update credit: per-sample moments of every step up to the last window's end
    assert r["update_credit_floor_s"] == pytest.approx(
        base + wins[-1][1] * (1.0 + 0.5 + 0.25) + in_w * (0.125 + 8.0))
    # gradient credit: test rows from the first window's start to the end, per-sample gradients
    # (no moments) in the windows only
    assert r["gradient_credit_floor_s"] == pytest.approx(
        base + (n - wins[0][0]) * 0.125 + in_w * (1.0 + 0.5 + 8.0))
    both = bench.floors(_terms(M), M, n, 3.0, 0.5, ("decoder", "linear 2"))
    assert both["update_credit_floor_s"] == pytest.approx(
        r["update_credit_floor_s"] + wins[-1][1] * 6.0 + in_w * 16.0)
    assert both["gradient_credit_floor_s"] == pytest.approx(
        r["gradient_credit_floor_s"] + in_w * (2.0 + 16.0))


def test_float32_recordings_are_not_exact_per_sample_float64_ones_are(load_bench):
    got = load_bench("bench_figures45_floor").recording_dtype_check(steps=4, n_test=2)
    f32, f64 = got["float32"], got["float64"]
    assert f64["certificate_ok"] and f64["reconstruction_error"] <= 1e-11 * f64["change_scale"]
    # float32 steps used float32 gradients: the float64 recomputation misses them by about
    # float32 rounding, far above float64's, and the certificate says so
    assert not f32["certificate_ok"]
    assert f32["reconstruction_error"] >= 1e-8 * f32["change_scale"]


def test_node_search_timer_times_the_search_and_restores_the_accumulator(load_bench):
    from explaind_fast import attribute
    from explaind_fast.testing.runs import tiny_mlp_run
    bench = load_bench("bench_kinks_speed")
    originals = (Accumulator.nodes, Accumulator.refine)
    model, traj, _, X, _, _ = tiny_mlp_run(act="relu", steps=2)
    with bench.node_search_timer() as search:
        attribute(model, traj, X[:3], quadrature="kinks:3", progress=False)
        assert Accumulator.nodes is not originals[0]
    assert (Accumulator.nodes, Accumulator.refine) == originals
    assert search[0] > 0.0
