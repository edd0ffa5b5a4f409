"""Triton kernels of explaind_fast (installed as the subpackage explaind_fast.kernels)."""
