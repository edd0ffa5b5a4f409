"""Triton kernels of explaind_fast (installed as the subpackage explaind_fast.kernels).

    path_kernel_reduce_triton(J, w, B, offsets, out=None, alpha=1.0, *, split=None)

is the CUDA backend of torch.ops.explaind_fast.path_kernel_reduce; with TRITON_INTERPRET=1 set before
triton is imported it also runs on CPU tensors (that is how CI tests it).
"""
from .path_kernel_reduce import path_kernel_reduce_triton

__all__ = ["path_kernel_reduce_triton"]
