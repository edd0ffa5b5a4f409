"""Inf/NaN semantics of path_kernel_reduce (documented in explaind_fast.ops.path_kernel_reduce):
named cases, each on every backend (C++; Triton on CUDA or under TRITON_INTERPRET=1, with the default
work split and with split-K forced) against the naive reference, plus the explicit outcome the
documentation promises. The random version is tests/ops/test_ops_fuzz.py."""
import pytest
import torch

from explaind_fast.ops.reference import path_kernel_reduce_naive
from explaind_fast.testing.op_cases import (acc_alpha, acc_dtype, assert_within, rounding_bound, run_backend,
                                            triton_device)

inf, nan = float("inf"), float("nan")
BACKENDS = [("cpp", None),
            pytest.param("triton", None, marks=pytest.mark.skipif(triton_device() is None, reason="no Triton device")),
            pytest.param("triton", 3, marks=pytest.mark.skipif(triton_device() is None, reason="no Triton device"))]
pytestmark = [pytest.mark.parametrize("backend,split", BACKENDS, ids=["cpp", "triton", "triton-split3"]),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),  # numpy (interpreter)
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]


def check(backend, split, J, w, B, offsets, *, out=None, alpha=1.0):
    """Run the backend, compare with the float64 reference (NaN positions, inf signs, finite values
    within the rounding bound) and return the result as float64."""
    out_before = None if out is None else out.clone()
    got = run_backend(backend, J, w, B, offsets, out=out, alpha=alpha, split=split)
    a = acc_alpha(alpha, J.dtype)
    want = path_kernel_reduce_naive(J.double(), w.double(), B.double(), offsets,
                                    out=None if out_before is None else out_before.double().clone(), alpha=a)
    bound = rounding_bound(J, w, B, offsets, alpha=a if a == a else 1.0, out=out_before)
    assert_within(got, want, bound, f"{backend} split={split}")
    return got.double()


def ones(Q, R, D, P, dtype=torch.float32):
    return torch.ones(Q, R, D, dtype=dtype), torch.ones(Q, dtype=acc_dtype(dtype)), torch.ones(P, D, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_infinite_weight_gives_inf_not_nan_from_padding(backend, split, dtype):
    # D = 37, R = 5, P = 3: every block has padding lanes, where w = inf meets padded zeros.
    J, w, B = ones(2, 5, 37, 3, dtype)
    w[0] = inf
    B[1] = -1
    got = check(backend, split, J, w, B, torch.tensor([0, 10, 10, 37]))
    assert torch.equal(got[[0, 2]][:, :, [0, 2]], torch.full((2, 5, 2), inf, dtype=torch.float64))
    assert torch.equal(got[[0, 2]][:, :, 1], torch.full((2, 5), -inf, dtype=torch.float64))
    assert torch.equal(got[1], torch.zeros(5, 3, dtype=torch.float64))  # empty group: S = 0


@pytest.mark.parametrize("alpha", [nan, inf, -inf], ids=str)
def test_nonfinite_alpha_makes_empty_groups_nan(backend, split, alpha):
    J, w, B = ones(2, 3, 12, 2)
    offsets = torch.tensor([0, 0, 5, 5, 12, 12])
    got = check(backend, split, J, w, B, offsets, alpha=alpha)
    empty = torch.tensor([True, False, True, False, True])
    assert torch.isnan(got[empty]).all()  # alpha·0
    if alpha == alpha:
        assert torch.equal(got[~empty], torch.full_like(got[~empty], alpha))  # alpha·(S > 0)
    else:
        assert torch.isnan(got).all()


def test_infinite_alpha_is_applied_to_the_whole_sum(backend, split):
    # S = 2+2+2-1-1-1 = 3 > 0 over one group that split-K cuts into chunks of 3 coordinates with
    # partial sums of both signs: inf·3 = inf, not inf·6 + inf·(-3) = NaN.
    J = torch.tensor([[[2.0, 2, 2, -1, -1, -1]]])
    got = check(backend, split, J, torch.ones(1), torch.ones(1, 6), torch.tensor([0, 6]), alpha=inf)
    assert got.item() == inf


def test_alpha_zero_gives_nan_only_where_the_sum_is_not_finite(backend, split):
    J, w, B = ones(1, 2, 6, 2)
    B[0, 4] = inf
    out = torch.full((2, 2, 2), 7.0)
    got = check(backend, split, J, w, B, torch.tensor([0, 3, 6]), out=out, alpha=0.0)
    assert torch.isnan(got[1, :, 0]).all()
    got[1, :, 0] = 7.0
    assert torch.equal(got, torch.full_like(got, 7.0))


@pytest.mark.parametrize("alpha", [1.0, inf, nan], ids=str)
def test_empty_quadrature_and_empty_coordinates(backend, split, alpha):
    # Q = 0 (B not read: NaN there does not matter) and D = 0: every S is 0, so out += alpha·0.
    for J, w, B, offsets in [(torch.zeros(0, 2, 5), torch.ones(0), torch.full((3, 5), nan), torch.tensor([0, 2, 5])),
                             (torch.zeros(2, 2, 0), torch.ones(2), torch.ones(3, 0), torch.tensor([0, 0, 0]))]:
        got = check(backend, split, J, w, B, offsets, alpha=alpha)
        if alpha == 1.0:
            assert torch.equal(got, torch.zeros(2, 2, 3, dtype=torch.float64))
        else:
            assert torch.isnan(got).all()


def test_alpha_beyond_float32_range_is_infinite(backend, split):
    J, w, B = ones(1, 1, 4, 3)
    B[1] = -1
    B[2, :2] = -1  # S = +4, -4, 0
    got = check(backend, split, J, w, B, torch.tensor([0, 4]), alpha=1e300)
    assert got[0, 0, 0] == inf and got[0, 0, 1] == -inf and torch.isnan(got[0, 0, 2])
    got64 = check(backend, split, J.double(), w.double(), B.double(), torch.tensor([0, 4]), alpha=1e300)
    assert torch.equal(got64[0, 0], torch.tensor([4e300, -4e300, 0.0], dtype=torch.float64))


def test_inf_times_zero_and_opposite_infinities(backend, split):
    # Coordinates 0-2 group 0, 3-5 group 1, 6-8 group 2; rows r = 0..3, P = 2.
    J, w, B = ones(2, 4, 9, 2)
    w[1] = 0.0
    J[1, 0, 1] = inf          # w = 0 times J = inf: NaN for row 0 of group 0
    J[:, 1, 4] = 0.0          # A[1, 4] = 0 ...
    B[0, 4] = inf             # ... facing B = inf: NaN for row 1, p 0 of group 1; A = 2 elsewhere: +inf
    J[0, 2, 6] = inf          # A[2, 6] = +inf,
    J[0, 2, 7] = -inf         # A[2, 7] = -inf in the same group: NaN for row 2 of group 2
    J[0, 3, 8] = inf
    B[1, 8] = 0.0             # A = inf facing B = 0: NaN for row 3, p 1 of group 2; p 0 gets +inf
    got = check(backend, split, J, w, B, torch.tensor([0, 3, 6, 9]))
    assert torch.isnan(got[0, 0]).all() and torch.isfinite(got[0, 1:]).all()
    assert torch.isnan(got[1, 1, 0]) and (got[1, [0, 2, 3], 0] == inf).all() and torch.isfinite(got[1, :, 1]).all()
    assert torch.isnan(got[2, 2]).all() and got[2, 3, 0] == inf and torch.isnan(got[2, 3, 1])


def test_special_values_already_in_out(backend, split):
    J, w, B = ones(1, 1, 2, 4)
    B[3] = -inf
    out = torch.tensor([[[inf, -inf, nan, inf]]])
    got = check(backend, split, J, w, B, torch.tensor([0, 2]), out=out)
    assert got[0, 0, 0] == inf and got[0, 0, 1] == -inf and torch.isnan(got[0, 0, 2:]).all()  # inf + -inf = NaN
