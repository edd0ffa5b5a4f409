"""Fixtures shared by the test suite (tests/<stage>/ mirrors explaind_fast/<stage>/).

Models, recorded runs and oracles live in :mod:`explaind_fast.testing` (also used by bench/);
this file only adds what needs pytest: loading a bench/ script as a module, and the skip for
Triton tests that need the interpreter.
"""
import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def load_bench():
    """load_bench("bench_recording") -> the module bench/bench_recording.py (not on sys.path)."""
    def load(name):
        spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "bench", name + ".py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


@pytest.fixture
def triton_interpreter():
    """Skip unless the Triton kernels run on CPU tensors (TRITON_INTERPRET=1 before import)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton launcher runs on CPU tensors only under TRITON_INTERPRET=1")
