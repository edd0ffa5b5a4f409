"""Host side of the Triton backend of path_kernel_reduce: the work list, block sizes, autotuning
and the launch of :func:`kernels.path_kernel_reduce.path_kernel_reduce_kernel` (docs/design.md §8).

    path_kernel_reduce_triton(J, w, B, offsets, out=None, alpha=1.0, *, split=None)

is registered as the CUDA kernel of torch.ops.explaind_fast.path_kernel_reduce (:mod:`explaind_fast.ops`);
with TRITON_INTERPRET=1 set before triton is imported it also runs on CPU tensors (how CI tests it).
Importing this module imports triton; nothing here touches a GPU before the first call.
"""
import contextlib
import functools
import math

import numpy as np
import torch
import triton

from explaind_fast.kernels.path_kernel_reduce import path_kernel_reduce_kernel

from ._extension import load_extension

load_extension()  # the shared C++ input check, torch.ops.explaind_fast.path_kernel_reduce_check

__all__ = ["path_kernel_reduce_triton", "build_work_items"]


def _next_pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def _bucket(n):
    """log2 bucket of a size (autotuning key: one tuning per shape family, not per shape)."""
    return max(0, int(n)).bit_length()


def build_work_items(offsets_cpu, split):
    """Cut the groups into work items [g_begin, g_end, lo, hi] (int64 [n, 4]).

    Groups longer than `split` become ceil(len/split) chunks of one group each; runs of shorter
    groups are packed so that the groups of a pack start in the same `split`-aligned window (a pack
    spans < 2·split coordinates). Empty groups land in packs and add nothing.
    """
    off = np.asarray(offsets_cpu, dtype=np.int64)
    G = off.size - 1
    if G == 0:
        return np.zeros((0, 4), dtype=np.int64)
    lengths = np.diff(off)
    short = lengths <= split
    window = off[:-1] // split
    starts_pack = short & np.concatenate(([True], ~short[:-1] | (window[1:] != window[:-1])))
    pack_begin = np.nonzero(starts_pack)[0]
    boundaries = np.concatenate((np.nonzero(starts_pack | ~short)[0], [G]))
    pack_end = boundaries[np.searchsorted(boundaries, pack_begin, side="right")]
    packs = np.stack([pack_begin, pack_end, off[pack_begin], off[pack_end]], axis=1)

    long_groups = np.nonzero(~short)[0]
    n_chunks = -(-lengths[long_groups] // split)
    chunk_group = np.repeat(long_groups, n_chunks)
    first_chunk = np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
    chunk_lo = off[chunk_group] + (np.arange(chunk_group.size) - first_chunk) * split
    chunk_hi = np.minimum(chunk_lo + split, off[chunk_group + 1])
    chunks = np.stack([chunk_group, chunk_group + 1, chunk_lo, chunk_hi], axis=1)
    return np.ascontiguousarray(np.concatenate([packs, chunks]).astype(np.int64))


def _is_interpreted():
    """Whether @triton.jit produced an interpreted kernel (TRITON_INTERPRET=1 at import time)."""
    return type(path_kernel_reduce_kernel).__name__ == "InterpretedFunction"


# Triton interpreter compatibility (CPU only; the compiled GPU kernel is not affected).
# The interpreter runs the kernel body as Python and holds every scalar (a loaded value, an int
# argument such as Q) as a 1-element 1-D numpy array, so `range(g_begin, g_end)` calls the tensor's
# __index__. Triton 3.6's interpreter implements it as int(handle.data), which NumPy >= 2.4 rejects
# ("only 0-dimensional arrays can be converted to Python scalars"); Triton >= 3.7 uses
# int(handle.data.squeeze()) (triton-lang/triton#9171, fixed by #9172). Loop bounds read at run time
# are ordinary Triton, and rewriting the loops (e.g. as while loops) would change the compiled GPU
# code, so instead the launcher applies upstream's fix while it runs this kernel, and only where a
# probe shows that the installed interpreter needs it.
@triton.jit
def _runtime_loop_bound_probe(n):
    for _ in range(n):
        pass


@functools.lru_cache(maxsize=None)
def _interpreter_needs_index_fix():
    from triton.runtime.errors import InterpreterError

    try:
        _runtime_loop_bound_probe[(1,)](1)
    except InterpreterError as e:
        if not isinstance(e.__cause__, TypeError):
            raise
        return True
    except TypeError:  # TRITON_FRONT_END_DEBUGGING=1 re-raises the kernel's own error
        return True
    return False


@contextlib.contextmanager
def _interpreter_index_fix():
    if not _interpreter_needs_index_fix():
        yield
        return
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor  # patches tl.tensor for the duration of one launch

    def patch_tensor_fixed(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_tensor_fixed
    try:
        yield
    finally:
        interpreter._patch_lang_tensor = patch_tensor


def _interpreter_config(P, in_dtype):
    # One fixed small config: autotuning under the interpreter is pointless and slow. Larger K
    # blocks mean fewer interpreted loop iterations, which is what costs time there.
    block_p = min(16, max(2, _next_pow2(P)))
    block_k = 16 if in_dtype == torch.float64 else 64
    return dict(BLOCK_R=16, BLOCK_P=block_p, BLOCK_K=block_k)


_GPU_CONFIGS = [
    # (BLOCK_R, BLOCK_P, BLOCK_K, num_warps, num_stages)
    (64, 16, 32, 4, 3), (128, 16, 32, 4, 3), (64, 32, 32, 4, 3), (128, 32, 32, 8, 3),
    (64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (32, 16, 64, 4, 3), (64, 16, 64, 4, 3),
    (32, 16, 16, 4, 2), (64, 16, 16, 4, 2),
    # small P (broadcast-multiply-sum path) and float64
    (64, 2, 32, 4, 2), (128, 2, 32, 4, 2), (64, 4, 32, 4, 2), (64, 8, 32, 4, 2), (32, 8, 16, 4, 2),
    (16, 16, 16, 4, 2), (32, 16, 16, 4, 2),
]


def _prune_configs(configs, named_args, **kwargs):
    """Keep configs whose P block fits P and whose 3-D broadcast tile stays small (float64/small P)."""
    P = named_args["P"]
    allow_dot = kwargs.get("ALLOW_DOT", named_args.get("ALLOW_DOT", True))
    want_p = min(64, max(2, _next_pow2(P)))
    kept = []
    for c in configs:
        bp, br, bk = c.kwargs["BLOCK_P"], c.kwargs["BLOCK_R"], c.kwargs["BLOCK_K"]
        uses_dot = allow_dot and bp >= 16 and br >= 16 and bk >= 16
        if bp > want_p or (bp < want_p and bp < 16):
            continue
        if not uses_dot and br * bp * bk > 8192:
            continue
        kept.append(c)
    return kept or [triton.Config({"BLOCK_R": 16, "BLOCK_P": min(16, want_p), "BLOCK_K": 16}, num_warps=4)]


@functools.lru_cache(maxsize=None)
def _autotuned_kernel():
    # Built on the first GPU call, never at import: importing must not touch a GPU.
    configs = [triton.Config({"BLOCK_R": r, "BLOCK_P": p, "BLOCK_K": k}, num_warps=nw, num_stages=ns)
               for r, p, k, nw, ns in _GPU_CONFIGS]
    return triton.autotune(
        configs=configs,
        key=["R_BUCKET", "P_BUCKET", "LEN_BUCKET"],
        prune_configs_by={"early_config_prune": _prune_configs},
        restore_value=["out_ptr"],  # out is accumulated: every benchmark run must start from it
    )(path_kernel_reduce_kernel)


def _default_split(D, G, R, device):
    """Coordinates per work item: big enough to amortise a program, small enough to fill the GPU."""
    if device.type != "cuda":
        return 1024
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    target_items = max(1, (4 * sms) // max(1, -(-R // 64)))
    if D < 64 * G:
        # Tiny groups: a program walks its groups one by one (latency-bound), so use more, shorter
        # packs to keep more programs in flight.
        target_items *= 4
    return int(min(8192, max(64, _next_pow2(-(-D // target_items)))))


def path_kernel_reduce_triton(J, w, B, offsets, out=None, alpha=1.0, *, split=None):
    """Triton implementation of explaind_fast.ops.path_kernel_reduce (same shapes and semantics).

        out[g, r, p] += alpha * Σ_q w[q] Σ_{i ∈ [offsets[g], offsets[g+1])} J[q, r, i] * B[p, i]

    J [Q, R, D] float32 | bfloat16 | float64, w [Q] float32 (float64 for float64 J), B [P, D] (dtype
    of J), offsets [G+1] int64 (0 = offsets[0] ≤ … ≤ offsets[G] = D), out [G, R, P] contiguous,
    float32 (float64 for float64 J), created zeroed when None and accumulated in place otherwise.
    Inputs are checked by the same C++ function as the CPU backend. CUDA tensors, or CPU tensors when
    TRITON_INTERPRET=1 was set before triton was imported. `split` (coordinates per work item)
    overrides the default; tests use it to exercise split-K and packing at small sizes.

    Peak extra memory: the work list, 4·(G + D/split) int64, plus contiguous copies of J or B if
    they are not contiguous, and a [G, R, P] buffer for S when alpha is ±inf or NaN. The sum order
    depends on the config, and split-K partial sums are added with atomics, so GPU results may
    differ between runs by rounding (not more).
    """
    torch.ops.explaind_fast.path_kernel_reduce_check(J, w, B, offsets, out)
    if J.device.type == "cpu" and not _is_interpreted():
        raise RuntimeError(
            "path_kernel_reduce_triton: CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 "
            "before importing triton); explaind_fast.ops.path_kernel_reduce runs the C++ CPU kernel")
    Q, R, D = J.shape
    P = B.shape[0]
    G = offsets.numel() - 1
    acc_dtype = w.dtype
    if out is None:
        out = torch.zeros((G, R, P), dtype=acc_dtype, device=J.device)
    if G == 0 or R == 0 or P == 0:
        return out  # out has no entries
    alpha = torch.tensor(alpha, dtype=acc_dtype).item()  # rounded to acc_dtype (±inf beyond its range)
    if not math.isfinite(alpha):
        # Split-K chunks of a group each add alpha·(their partial sum), which for alpha = ±inf is not
        # alpha·S (inf·2 + inf·(-1) = NaN, but inf·1 = inf); empty sums must give alpha·0 = NaN. So
        # sum S first (alpha = 1, into zeros), then add alpha·S once, entrywise, as documented.
        S = path_kernel_reduce_triton(J, w, B, offsets, alpha=1.0, split=split)
        return out.add_(S, alpha=alpha)
    if Q == 0 or D == 0:
        return out  # every sum is empty: S = 0 adds nothing for a finite alpha
    J = J.contiguous()
    B = B.contiguous()
    w = w.contiguous()
    if split is None:
        split = _default_split(D, G, R, J.device)
    if split < 1:
        raise ValueError(f"path_kernel_reduce_triton: split must be >= 1, got {split}")
    work = torch.from_numpy(build_work_items(offsets.cpu().numpy(), split)).to(J.device)
    alpha_t = torch.tensor([alpha], dtype=acc_dtype, device=J.device)
    allow_dot = J.dtype != torch.float64
    args = (J, w, B, offsets.contiguous(), out, work, alpha_t, Q, R, P,
            J.stride(0), J.stride(1), B.stride(0), _bucket(R), _bucket(P), _bucket(D // max(G, 1)))
    n_work = work.shape[0]
    if _is_interpreted():
        cfg = _interpreter_config(P, J.dtype)
        grid = (n_work, triton.cdiv(R, cfg["BLOCK_R"]), triton.cdiv(P, cfg["BLOCK_P"]))
        with _interpreter_index_fix():
            path_kernel_reduce_kernel[grid](*args, ALLOW_DOT=allow_dot, **cfg)
    else:
        def grid(meta):
            return (n_work, triton.cdiv(R, meta["BLOCK_R"]), triton.cdiv(P, meta["BLOCK_P"]))
        _autotuned_kernel()[grid](*args, ALLOW_DOT=allow_dot)
    return out
