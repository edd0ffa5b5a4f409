"""explaind_fast.testing.benchmark: the one timing / peak-memory / environment harness of bench/.
Only definitions and plumbing are asserted here, never how fast anything is."""
import json
import os
import statistics
import sys

import pytest
import torch

from explaind_fast.testing import benchmark as bm

LINUX_PROC = os.path.exists("/proc/self/clear_refs")


def test_summarize_is_median_and_inclusive_quintiles():
    times = [5.0, 1.0, 4.0, 2.0, 3.0]
    q = statistics.quantiles(times, n=5, method="inclusive")
    assert bm.summarize(times) == {"median_s": 3.0, "p20_s": q[0], "p80_s": q[-1], "n": 5}
    assert min(times) <= q[0] <= 3.0 <= q[-1] <= max(times)
    assert bm.summarize([0.25]) == {"median_s": 0.25, "p20_s": 0.25, "p80_s": 0.25, "n": 1}
    ms = bm.summarize([0.001, 0.003], unit="ms")
    assert ms["median_ms"] == pytest.approx(2.0) and ms["n"] == 2
    with pytest.raises(ValueError):
        bm.summarize([])


def test_time_call_counts_warmup_and_repeats():
    calls = []
    times = bm.time_call(lambda: calls.append(1), repeats=4, warmup=2)
    assert len(calls) == 6 and len(times) == 4 and all(t >= 0 for t in times)


def test_measure_reports_wall_cpu_and_faults():
    with bm.measure() as m:
        x = torch.ones(2**22)  # 16 MiB, touched: page faults
        float(x.sum())
    assert m.wall_s > 0 and m.cpu_s >= 0 and m.user_s >= 0 and m.system_s >= 0
    assert m.minor_faults >= 0 and m.max_rss_bytes > 0
    assert set(m.as_dict()) >= {"wall_s", "cpu_s", "user_s", "system_s", "minor_faults"}


@pytest.mark.skipif(not LINUX_PROC, reason="needs /proc/self/clear_refs")
def test_peak_memory_sees_a_64_mib_temporary():
    n = 64 * 2**20 // 4
    peak = bm.peak_memory(lambda: torch.ones(n).sum(), "cpu")
    assert peak["method"] == "VmHWM - VmRSS"
    assert peak["peak_extra_bytes"] >= 60 * 2**20, peak
    assert peak["peak_bytes"] >= peak["before_bytes"] + peak["peak_extra_bytes"] - 1


def _allocate_setup(mib):  # used by peak_memory_subprocess below (module-level, importable)
    return lambda: torch.ones(mib * 2**20 // 4).sum()


@pytest.mark.skipif(not LINUX_PROC, reason="needs /proc/self/clear_refs")
def test_peak_memory_subprocess_runs_the_setup_in_a_fresh_process():
    peak = bm.peak_memory_subprocess(_allocate_setup, 32, device="cpu")
    assert peak["method"] == "VmHWM - VmRSS (subprocess)"
    assert 30 * 2**20 <= peak["peak_extra_bytes"] < 256 * 2**20, peak


def test_environment_row_and_results_folder(tmp_path, monkeypatch):
    had_triton = "triton" in sys.modules
    env = bm.environment("cpu")
    assert ("triton" in sys.modules) == had_triton  # the version comes from package metadata
    for key in ("device", "torch", "triton", "python", "host", "cpu_count", "torch_threads",
                "omp_wait_policy", "load_average", "date_utc"):
        assert key in env
    assert env["torch"] == torch.__version__
    assert bm.format_environment(env).startswith("# ")
    assert bm.RESULTS_DIR.parts[-2:] == ("bench", "results")
    assert bm.results_path("x.json") == bm.RESULTS_DIR / "x.json"
    assert str(bm.results_path(tmp_path / "y.json")) == str(tmp_path / "y.json")
    path = bm.write_results(tmp_path / "sub" / "r.json", [{"a": 1}], env=env, note="n")
    data = json.loads(path.read_text())
    assert data == {"environment": env, "note": "n", "rows": [{"a": 1}]}
    data = json.loads(bm.write_results(tmp_path / "d.json", {"rows": [], "k": 2}, env=env).read_text())
    assert data["k"] == 2 and data["environment"] == env


def test_node_batch_variants_and_cap_restore_the_planner():
    from explaind_fast.attribution import planner
    assert bm.node_batch_variants(["a", "b"]) == [("a", "a", None), ("b", "b", None)]
    assert bm.node_batch_variants(["a"], [16, 32]) == [("a @ 16MiB", "a", 16),
                                                       ("a @ 32MiB", "a", 32)]
    before = planner.NODE_BATCH_BYTES
    with bm.node_batch_cap(3):
        assert planner.NODE_BATCH_BYTES == 3 << 20
    assert planner.NODE_BATCH_BYTES == before
    with bm.node_batch_cap(None):
        assert planner.NODE_BATCH_BYTES == before
    try:                                       # restored when the block raises, too
        with bm.node_batch_cap(5):
            raise RuntimeError
    except RuntimeError:
        pass
    assert planner.NODE_BATCH_BYTES == before
    cap = planner.CPU_TRAIN_PASS_BYTES
    with bm.planner_setting("CPU_TRAIN_PASS_BYTES", 7):
        assert planner.CPU_TRAIN_PASS_BYTES == 7
    assert planner.CPU_TRAIN_PASS_BYTES == cap
