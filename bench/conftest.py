"""pytest options for the benchmarks (bench/ is not collected by `pytest tests`).

    python -m pytest -q bench/bench_ops.py                 # the issue's shapes (D = 98304)
    python -m pytest -q bench/bench_ops.py --bench-quick   # D = 12288, a smoke run
    python -m pytest -q bench/bench_ops.py --bench-quick --benchmark-json bench/results/ops_pytest.json

Results: every bench script writes to bench/results/ (explaind_fast.testing.benchmark.RESULTS_DIR;
a bare file name given to --json/--out lands there). pytest-benchmark keeps its own store
(.benchmarks/, not committed) unless --benchmark-json names a file; the JSON it writes gets the
harness's environment row under "explaind_fast_environment", and each benchmark's extra_info holds
the measured peak memory (explaind_fast.testing.benchmark.peak_memory_subprocess).
"""
import pytest


def pytest_addoption(parser):
    parser.addoption("--bench-quick", action="store_true", help="small shapes (D = 12288)")


def pytest_generate_tests(metafunc):
    module = metafunc.module
    if module.__name__.endswith("bench_ops") and "case" in metafunc.fixturenames:
        cases = module.QUICK_CASES if metafunc.config.getoption("--bench-quick") else module.CASES
        metafunc.parametrize("case", cases, ids=["Q{}-R{}-D{}-P{}-G{}".format(*c) for c in cases])


@pytest.hookimpl(optionalhook=True)  # only with pytest-benchmark installed
def pytest_benchmark_update_json(config, benchmarks, output_json):
    from explaind_fast.testing.benchmark import environment

    output_json["explaind_fast_environment"] = environment()
