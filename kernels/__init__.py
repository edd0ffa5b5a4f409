"""Triton kernels of explaind_fast (installed as the subpackage explaind_fast.kernels).

    path_kernel_reduce_kernel   the @triton.jit kernel of path_kernel_reduce (device code only)

Launched by explaind_fast.ops.triton_launcher.path_kernel_reduce_triton, the CUDA backend of
torch.ops.explaind_fast.path_kernel_reduce. Kernels know tensors only: nothing here imports
explaind_fast (a contract in .importlinter).
"""
from .path_kernel_reduce import path_kernel_reduce_kernel

__all__ = ["path_kernel_reduce_kernel"]
