"""The fused path-kernel reduction op, ``torch.ops.explaind_fast.path_kernel_reduce`` (docs/design.md §8).

    out[g, r, p] += alpha * sum_q w[q] * sum_{i in [offsets[g], offsets[g+1])} J[q, r, i] * B[p, i]

In the engine, J holds the per-row gradients J(θ_s + t_q Δ_s) at the quadrature nodes, w the
quadrature weights, B the train-side D-vectors (Φ_s per partition, r_s) and offsets the parameter
groups, so out[g, r, p] = φ_s(x)·B[p] restricted to group g. The op computes exactly this formula and
knows nothing of signs, models, files or steps: tensors and offsets only.

Backends (one schema, defined in C++ in csrc/):
    CPU    C++ kernel (csrc/path_kernel_reduce.cpp), parallel over (group run, row block).
    CUDA   Triton kernel (kernels/, launched by :mod:`.triton_launcher`), registered below.
    Meta   the fake implementations below, so torch.compile can trace the op.
    Autograd  the backward formula of the functional op, registered below (plain torch ops); the
           accumulating op refuses inputs that require grad (in C++, csrc/path_kernel_reduce.cpp).

This subpackage owns the op, its Triton launcher (:mod:`.triton_launcher`), its naive reference
(:mod:`.reference`) and the one place that loads the compiled extension (:mod:`._extension`).
May import: :mod:`explaind_fast.kernels` (from the launcher, on the first CUDA call). Never imports: any other
explaind_fast subpackage.
"""
import torch

from ._extension import load_extension

load_extension()  # defines torch.ops.explaind_fast.* (raises one clear error if not built)

__all__ = ["path_kernel_reduce", "accumulation_dtype"]

_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def accumulation_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for float32 and bfloat16 inputs."""
    return torch.float64 if input_dtype == torch.float64 else torch.float32


def path_kernel_reduce(J, w, B, offsets, *, out=None, alpha=1.0):
    """Fused quadrature sum, train×test product and segment reduction.

        out[g, r, p] += alpha * Σ_q w[q] Σ_{i ∈ [offsets[g], offsets[g+1])} J[q, r, i] * B[p, i]

    Args:
        J: [Q, R, D] float32 | bfloat16 | float64 (Q quadrature nodes, R rows, D coordinates).
        w: [Q] quadrature weights, float32 (float64 when J is float64).
        B: [P, D], dtype of J.
        offsets: [G+1] int64, non-decreasing from 0 to D; group g is the coordinate range
            [offsets[g], offsets[g+1]) (empty groups allowed: their sum is 0).
        out: optional [G, R, P] contiguous tensor of the accumulation dtype (float32, or float64
            for float64 inputs), accumulated in place. Created zeroed when not given. It must not
            share memory with J, w, B or offsets, nor have internal overlap (RuntimeError).
        alpha: scalar factor applied to the sum (before it is added to out).

    Returns:
        out, [G, R, P]. bfloat16 inputs are read as bfloat16 and accumulated in float32.

    Inf and NaN (the same on every backend and in the reference, explaind_fast.ops.reference):
        every entry is the IEEE evaluation, in the accumulation dtype, of

            A[r, i]    = Σ_q w[q] · J[q, r, i]                          (the quadrature fold)
            S[g, r, p] = Σ_{i ∈ [offsets[g], offsets[g+1])} A[r, i] · B[p, i]
            out[g, r, p] ← out[g, r, p] + alpha · S[g, r, p]

        with alpha first rounded to the accumulation dtype (±inf beyond its range), and every Σ an
        unordered sum: NaN if a summand is NaN or if +inf and −inf both occur, else ±inf if a summand
        is ±inf. So a NaN or ±inf in J, w or B reaches exactly the entries whose terms it enters, as
        ±inf or as NaN (inf·0 = NaN: J = inf with w = 0, A = ±inf facing B = 0, ...), and:
          * an empty group has S = 0 exactly, and so has every group when Q = 0 (B is not read);
          * padding never contributes (w = inf does not turn padded zeros into NaN);
          * alpha multiplies every S, zeros included: alpha = NaN makes every entry NaN, alpha = ±inf
            makes entries with S = 0 NaN (empty groups too), alpha = 0 makes entries with S = ±inf
            or NaN NaN, and leaves the others as they were.
        Only what hinges on rounding is backend-dependent: finite values (see below), and ±inf
        versus NaN where finite intermediates overflow, or where an A[r, i] facing B[p, i] = ±inf
        (or an S under alpha = ±inf) is zero under one rounding and not under another
        (cancellation, underflow). bfloat16 subnormal inputs may be read as zero (the Triton
        interpreter does; an error of at most |alpha|·2^-126·Σ|w|·Σ(|J| + |B|) per entry).

    Autograd: differentiable in J, w and B (not offsets, alpha) when out is not given, with
    dJ[q, r, i] = alpha·w[q]·H[r, i], dw[q] = alpha·Σ_{r,i} J[q, r, i]·H[r, i] and
    dB[p, i] = alpha·Σ_r A[r, i]·grad[g(i), r, p], where H[r, i] = Σ_p grad[g(i), r, p]·B[p, i]
    and g(i) is the group of coordinate i (plain torch ops in the accumulation dtype; extra memory
    a few [Q, R, D] and [R, D] tensors plus a gather of grad in chunks of ≤ 2^22 elements). With
    out=... the op adds in place and is not differentiable: inputs that require grad raise
    RuntimeError (use ``out + path_kernel_reduce(J, w, B, offsets, alpha=alpha)``).

    All tensors must be on one device. Every backend checks its inputs with the same C++ function
    and raises RuntimeError naming the offending argument.

    Peak extra memory (besides the inputs and out): CPU, per thread at most
    128·min(R, 512) + P·(min(R, 512) + 256) accumulation-dtype scalars of scratch; CUDA, a work
    list of 4·(number of work items ≤ G + D/split) int64 (plus a [G, R, P] buffer when alpha is
    ±inf or NaN). Non-contiguous J or B are copied once (Q·R·D resp. P·D elements).
    The sum order differs between backends, so results agree to rounding, not bitwise; the CUDA
    backend adds split-K partial sums with atomics, so repeated GPU runs may differ by rounding.
    """
    if out is None:
        return torch.ops.explaind_fast.path_kernel_reduce(J, w, B, offsets, float(alpha))
    torch.ops.explaind_fast.path_kernel_reduce_accumulate(J, w, B, offsets, out, float(alpha))
    return out


def _check_metadata(J, w, B, offsets, out):
    """Shape/dtype/device checks that need no data (for tracing); the real backends run the full
    C++ check (csrc/path_kernel_reduce.cpp), which also checks the offset values."""
    op = "path_kernel_reduce: "
    torch._check(J.dim() == 3, lambda: f"{op}J must be a 3-D tensor [Q, R, D], got shape {list(J.shape)}")
    torch._check(J.dtype in _INPUT_DTYPES,
                 lambda: f"{op}J must have dtype float32, bfloat16 or float64, got {J.dtype}")
    acc = accumulation_dtype(J.dtype)
    torch._check(w.dim() == 1 and w.dtype == acc,
                 lambda: f"{op}w must be a 1-D tensor of dtype {acc}, got {w.dtype} {list(w.shape)}")
    torch._check(w.shape[0] == J.shape[0], lambda: f"{op}w must have length Q = J.size(0)")
    torch._check(B.dim() == 2 and B.dtype == J.dtype,
                 lambda: f"{op}B must be a 2-D tensor [P, D] of the dtype of J, got {B.dtype}")
    torch._check(B.shape[1] == J.shape[2], lambda: f"{op}B.size(1) must equal D = J.size(2)")
    torch._check(offsets.dim() == 1 and offsets.dtype == torch.int64,
                 lambda: f"{op}offsets must be a 1-D int64 tensor, got {offsets.dtype}")
    for name, t in (("w", w), ("B", B), ("offsets", offsets), ("out", out)):
        if t is not None:
            torch._check(t.device == J.device, lambda: f"{op}{name} is on {t.device} but J is on "
                         f"{J.device}; all tensors must be on the same device")
    if out is not None:
        shape = [offsets.shape[0] - 1, J.shape[1], B.shape[0]]
        torch._check(out.dtype == acc and list(out.shape) == shape,
                     lambda: f"{op}out must have shape {shape} and dtype {acc}")


@torch.library.register_fake("explaind_fast::path_kernel_reduce")
def _path_kernel_reduce_fake(J, w, B, offsets, alpha=1.0):
    _check_metadata(J, w, B, offsets, None)
    return J.new_empty((offsets.shape[0] - 1, J.shape[1], B.shape[0]), dtype=accumulation_dtype(J.dtype))


@torch.library.register_fake("explaind_fast::path_kernel_reduce_accumulate")
def _path_kernel_reduce_accumulate_fake(J, w, B, offsets, out, alpha=1.0):
    _check_metadata(J, w, B, offsets, out)


@torch.library.register_kernel("explaind_fast::path_kernel_reduce", "cuda")
def _path_kernel_reduce_cuda(J, w, B, offsets, alpha=1.0):
    from .triton_launcher import path_kernel_reduce_triton  # triton is imported on first use

    return path_kernel_reduce_triton(J, w, B, offsets, alpha=alpha)


@torch.library.register_kernel("explaind_fast::path_kernel_reduce_accumulate", "cuda")
def _path_kernel_reduce_accumulate_cuda(J, w, B, offsets, out, alpha=1.0):
    from .triton_launcher import path_kernel_reduce_triton

    path_kernel_reduce_triton(J, w, B, offsets, out=out, alpha=alpha)


# ----------------------------------------------------------------------------------- autograd
# Coordinates per chunk of the backward: bounds its [chunk, R, P] gather of grad to ~2^22 elements.
_BACKWARD_CHUNK_ELEMENTS = 1 << 22


def _path_kernel_reduce_vjp(J, w, B, offsets, grad, alpha, need_J, need_w, need_B):
    """Gradients of out = alpha·S (see path_kernel_reduce) for the output gradient `grad` [G, R, P]:

        H[r, i]  = Σ_p grad[g(i), r, p] · B[p, i]          dJ[q, r, i] = alpha·w[q]·H[r, i]
        A[r, i]  = Σ_q w[q] · J[q, r, i]                   dw[q]       = alpha·Σ_{r,i} J[q, r, i]·H[r, i]
                                                           dB[p, i]    = alpha·Σ_r A[r, i]·grad[g(i), r, p]

    in the accumulation dtype, in chunks of coordinates (a gather of grad rows per chunk), with
    differentiable torch ops (so double backward works too). Returns (dJ, dw, dB), None where not needed.
    """
    acc = w.dtype
    Q, R, D = J.shape
    P = B.shape[0]
    G = offsets.shape[0] - 1
    grad = grad.to(acc) * alpha  # alpha rounds to acc as in the forward
    segment = torch.repeat_interleave(torch.arange(G, device=J.device), offsets[1:] - offsets[:-1],
                                      output_size=D)
    Jacc, Bacc = J.to(acc), B.to(acc)
    A = (w.view(Q, 1, 1) * Jacc).sum(0) if need_B else None  # [R, D]
    step = max(1, _BACKWARD_CHUNK_ELEMENTS // max(1, R * P))
    H_parts, dB_parts = [], []
    for i0 in range(0, D, step):
        i1 = min(D, i0 + step)
        grad_i = grad.index_select(0, segment[i0:i1])  # [c, R, P]: each coordinate's group row
        if need_J or need_w:
            H_parts.append(torch.einsum("crp,pc->rc", grad_i, Bacc[:, i0:i1]))
        if need_B:
            dB_parts.append(torch.einsum("crp,rc->pc", grad_i, A[:, i0:i1]))
    dJ = dw = dB = None
    if need_J or need_w:
        H = torch.cat(H_parts, dim=1) if H_parts else grad.new_zeros(R, D)
        if need_J:
            dJ = (w.view(Q, 1, 1) * H.unsqueeze(0)).to(J.dtype)
        if need_w:
            dw = torch.einsum("qrd,rd->q", Jacc, H)
    if need_B:
        dB = (torch.cat(dB_parts, dim=1) if dB_parts else grad.new_zeros(P, D)).to(B.dtype)
    return dJ, dw, dB


def _path_kernel_reduce_setup_context(ctx, inputs, output):
    J, w, B, offsets, alpha = inputs
    ctx.save_for_backward(J, w, B, offsets)
    ctx.alpha = alpha


def _path_kernel_reduce_backward(ctx, grad):
    J, w, B, offsets = ctx.saved_tensors
    need_J, need_w, need_B = ctx.needs_input_grad[:3]
    dJ, dw, dB = _path_kernel_reduce_vjp(J, w, B, offsets, grad, ctx.alpha, need_J, need_w, need_B)
    return dJ, dw, dB, None, None


torch.library.register_autograd("explaind_fast::path_kernel_reduce", _path_kernel_reduce_backward,
                                setup_context=_path_kernel_reduce_setup_context)
