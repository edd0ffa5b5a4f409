"""Differential tests of explaind_fast.ops.path_kernel_reduce (C++ CPU backend)."""
import torch

from explaind_fast import ops, reference


def test_cpu_matches_naive_float64_smoke():
    g = torch.Generator().manual_seed(0)
    J = torch.randn(3, 5, 37, dtype=torch.float64, generator=g)
    w = torch.rand(3, dtype=torch.float64, generator=g)
    B = torch.randn(4, 37, dtype=torch.float64, generator=g)
    offsets = torch.tensor([0, 0, 10, 11, 11, 37])
    got = ops.path_kernel_reduce(J, w, B, offsets, alpha=0.5)
    want = reference.path_kernel_reduce_naive(J, w, B, offsets, alpha=0.5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
