"""torch.ops.explaind_fast.path_kernel_reduce: C++ CPU backend against the naive float64 reference,
input checks, NaN propagation, opcheck and torch.compile tracing. Oracles and tolerances: see
explaind_fast/testing/op_cases.py."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from explaind_fast.testing.op_cases import (SHAPES, assert_within, bad_inputs, case, reference64, rounding_bound,
                        shape_id)
from explaind_fast import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_exact_on_integer_inputs(shape, dtype):
    J, w, B, offsets = case(shape, dtype, seed=11, integer=True)
    got = ops.path_kernel_reduce(J, w, B, offsets)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(got.double(), reference64(J, w, B, offsets))


@settings(max_examples=60, deadline=None)
@given(Q=st.integers(1, 4), R=st.integers(1, 24), D=st.integers(1, 700), P=st.integers(1, 20),
       G=st.integers(1, 40), kind=st.sampled_from(["even", "random"]), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from(DTYPES))
def test_random_shapes_exact(Q, R, D, P, G, kind, seed, dtype):
    J, w, B, offsets = case((Q, R, D, P, G, kind), dtype, seed=seed, integer=True)
    assert torch.equal(ops.path_kernel_reduce(J, w, B, offsets).double(), reference64(J, w, B, offsets))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_reference_within_rounding(shape, dtype):
    J, w, B, offsets = case(shape, dtype, seed=3)
    got = ops.path_kernel_reduce(J, w, B, offsets, alpha=-0.7)
    want = reference64(J, w, B, offsets, alpha=-0.7)
    assert_within(got, want, rounding_bound(J, w, B, offsets, alpha=-0.7), f"{shape} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_accumulates_into_given_out(dtype):
    J, w, B, offsets = case((3, 7, 900, 5, 9, "random"), dtype, seed=5)
    out = torch.randn(9, 7, 5, dtype=dtype)
    out_before = out.clone()
    result = ops.path_kernel_reduce(J, w, B, offsets, out=out, alpha=2.5)
    assert result.data_ptr() == out.data_ptr()  # in place, same tensor returned
    want = reference64(J, w, B, offsets, out=out_before, alpha=2.5)
    assert_within(out, want, rounding_bound(J, w, B, offsets, alpha=2.5, out=out_before), "accumulate")
    # A second call adds the same amount again.
    ops.path_kernel_reduce(J, w, B, offsets, out=out, alpha=2.5)
    want2 = reference64(J, w, B, offsets, out=want, alpha=2.5)
    assert_within(out, want2, 2 * rounding_bound(J, w, B, offsets, alpha=2.5, out=want), "accumulate twice")


def test_alpha_zero_keeps_out_and_alpha_scales_linearly():
    J, w, B, offsets = case((2, 4, 100, 3, 4, "even"), torch.float64, seed=2, integer=True)
    out = torch.full((4, 4, 3), 7.0, dtype=torch.float64)
    ops.path_kernel_reduce(J, w, B, offsets, out=out, alpha=0.0)
    assert torch.equal(out, torch.full_like(out, 7.0))
    base = ops.path_kernel_reduce(J, w, B, offsets)
    assert torch.equal(ops.path_kernel_reduce(J, w, B, offsets, alpha=-3.0), -3.0 * base)


def test_empty_groups_stay_zero_and_nonempty_do_not():
    J, w, B, _ = case((2, 3, 10, 2, 1, "even"), torch.float64, seed=4, integer=True)
    J = J.abs() + 1
    B = B.abs() + 1
    w = w.abs() + 1
    offsets = torch.tensor([0, 0, 4, 4, 4, 10, 10])
    got = ops.path_kernel_reduce(J, w, B, offsets)
    empty = torch.tensor([True, False, True, True, False, True])
    assert torch.equal(got[empty], torch.zeros_like(got[empty]))
    assert (got[~empty] > 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf_propagate(dtype):
    J, w, B, offsets = case((2, 4, 50, 3, 5, "even"), dtype, seed=8)
    J[1, 2, 13] = float("nan")   # group 1 (coordinates 10..19), row 2: every p
    B[0, 41] = float("inf")      # group 4, p 0: every row (inf·x is ±inf, or NaN with x = 0)
    got = ops.path_kernel_reduce(J, w, B, offsets)
    want = reference64(J, w, B, offsets)
    assert torch.isnan(got[1, 2]).all()
    assert not torch.isfinite(got[4, :, 0]).any()
    assert_within(got, want, rounding_bound(J, w, B, offsets), "nan/inf")
    w_nan = w.clone()
    w_nan[0] = float("nan")      # NaN weight: every entry of every nonempty group
    assert torch.isnan(ops.path_kernel_reduce(J, w_nan, B, offsets)).all()


def test_zero_sized_dimensions():
    J = torch.zeros(2, 0, 5)
    out = ops.path_kernel_reduce(J, torch.ones(2), torch.ones(3, 5), torch.tensor([0, 2, 5]))
    assert out.shape == (2, 0, 3)
    out = ops.path_kernel_reduce(torch.zeros(2, 4, 0), torch.ones(2), torch.ones(3, 0), torch.tensor([0, 0]))
    assert torch.equal(out, torch.zeros(1, 4, 3))
    # Q = 0: the quadrature sum is empty, so nothing is added (even where B is NaN).
    B = torch.full((3, 5), float("nan"))
    out = ops.path_kernel_reduce(torch.zeros(0, 4, 5), torch.ones(0), B, torch.tensor([0, 2, 5]))
    assert torch.equal(out, torch.zeros(2, 4, 3))


def test_non_contiguous_inputs():
    J, w, B, offsets = case((3, 5, 120, 4, 6, "random"), torch.float64, seed=9, integer=True)
    J_nc = J.transpose(0, 1).contiguous().transpose(0, 1)  # same values, permuted strides
    B_nc = B.t().contiguous().t()
    assert not J_nc.is_contiguous() and not B_nc.is_contiguous()
    assert torch.equal(ops.path_kernel_reduce(J_nc, w, B_nc, offsets), reference64(J, w, B, offsets))


def test_large_group_count_many_threads():
    # Enough row blocks and group runs that every thread gets several tasks.
    J, w, B, offsets = case((2, 40, 40000, 3, 300, "random"), torch.float32, seed=10, integer=True)
    assert torch.equal(ops.path_kernel_reduce(J, w, B, offsets).double(), reference64(J, w, B, offsets))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bad_inputs_raise_named_errors(dtype):
    good, cases = bad_inputs(dtype)
    for change, message in cases:
        kw = {**good, **change}
        out = kw.pop("out", None)
        with pytest.raises(RuntimeError, match=None) as info:
            ops.path_kernel_reduce(kw["J"], kw["w"], kw["B"], kw["offsets"], out=out)
        assert message in str(info.value), f"{change}: expected {message!r} in {str(info.value)!r}"


def test_registered_ops_and_opcheck():
    J, w, B, offsets = case((2, 5, 100, 3, 4, "random"), torch.float32, seed=6)
    torch.library.opcheck(torch.ops.explaind_fast.path_kernel_reduce.default, (J, w, B, offsets, 0.5))
    out = torch.randn(4, 5, 3)
    torch.library.opcheck(torch.ops.explaind_fast.path_kernel_reduce_accumulate.default,
                          (J, w, B, offsets, out, 0.5))


def test_torch_compile_traces_through_fake_impl():
    J, w, B, offsets = case((2, 5, 100, 3, 4, "random"), torch.float64, seed=7, integer=True)

    def f(J, w, B, offsets):
        out = ops.path_kernel_reduce(J, w, B, offsets, alpha=-1.0)
        return ops.path_kernel_reduce(J, w, B, offsets, out=out, alpha=3.0) * 2

    # aot_eager traces with fake tensors (the fake impl) without compiling C++: cheap on 2 cores.
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(J, w, B, offsets), 4 * reference64(J, w, B, offsets))


def test_fake_impl_shape_and_dtype():
    J = torch.empty(3, 5, 40, dtype=torch.bfloat16, device="meta")
    out = ops.path_kernel_reduce(J, torch.empty(3, device="meta"), torch.empty(7, 40, dtype=torch.bfloat16,
                                 device="meta"), torch.empty(10, dtype=torch.int64, device="meta"))
    assert out.shape == (9, 5, 7) and out.dtype == torch.float32 and out.device.type == "meta"


def test_extension_built_with_openmp():
    from explaind_fast.ops._extension import load_extension

    # Without OpenMP, at::parallel_for in the CPU kernel would run on one thread.
    assert load_extension().compiled_with_openmp()


_BASELINE_SCRIPT = r"""
import sys, torch
from explaind_fast.testing.op_cases import SHAPES, case, reference64
from explaind_fast import ops
from explaind_fast.ops._extension import load_extension
assert load_extension().cpu_kernel_isa() == "baseline", load_extension().cpu_kernel_isa()
for shape in SHAPES:
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        J, w, B, offsets = case(shape, dtype, seed=11, integer=True)
        got = ops.path_kernel_reduce(J, w, B, offsets, alpha=-2.0).double()
        assert torch.equal(got, reference64(J, w, B, offsets, alpha=-2.0)), (shape, dtype)
print("ok")
"""


def test_baseline_cpu_loops_exact():
    """The non-AVX2 inner loops (used on CPUs without AVX2/FMA), forced in a subprocess."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, EXPLAIND_FAST_CPU_BASELINE="1")
    proc = subprocess.run([sys.executable, "-c", _BASELINE_SCRIPT, os.path.dirname(__file__)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@_CUDA
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_backend_exact_and_opcheck(dtype):
    """The op on CUDA tensors dispatches to the Triton kernel (registered from explaind_fast.ops)."""
    for shape in SHAPES:
        J, w, B, offsets = case(shape, dtype, seed=11, integer=True)
        got = ops.path_kernel_reduce(J.cuda(), w.cuda(), B.cuda(), offsets.cuda(), alpha=-2.0)
        assert got.is_cuda and torch.equal(got.cpu().double(), reference64(J, w, B, offsets, alpha=-2.0))
    J, w, B, offsets = (t.cuda() for t in case((2, 5, 100, 3, 4, "random"), dtype, seed=6))
    torch.library.opcheck(torch.ops.explaind_fast.path_kernel_reduce.default, (J, w, B, offsets, 0.5))
    out = torch.zeros(4, 5, 3, dtype=w.dtype, device="cuda")
    torch.library.opcheck(torch.ops.explaind_fast.path_kernel_reduce_accumulate.default,
                          (J, w, B, offsets, out, 0.5))
