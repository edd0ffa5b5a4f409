"""pytest options for the benchmarks (bench/ is not collected by `pytest tests`).

    python -m pytest -q bench/bench_ops.py                 # the issue's shapes (D = 98304)
    python -m pytest -q bench/bench_ops.py --bench-quick   # D = 12288, a smoke run
"""


def pytest_addoption(parser):
    parser.addoption("--bench-quick", action="store_true", help="small shapes (D = 12288)")


def pytest_generate_tests(metafunc):
    if metafunc.module.__name__.endswith("bench_ops") and "case" in metafunc.fixturenames:
        from bench_ops import CASES, QUICK_CASES

        cases = QUICK_CASES if metafunc.config.getoption("--bench-quick") else CASES
        metafunc.parametrize("case", cases, ids=["Q{}-R{}-D{}-P{}-G{}".format(*c) for c in cases])
