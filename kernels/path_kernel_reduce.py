"""Triton kernel of the fused path-kernel reduction (the CUDA backend of
torch.ops.explaind_fast.path_kernel_reduce; also runs on CPU tensors under TRITON_INTERPRET=1).
Device code only: the work list, block sizes, autotuning and the launch are in
explaind_fast/ops/triton_launcher.py; this file imports nothing of explaind_fast.

    out[g, r, p] += alpha * Σ_q w[q] Σ_{i ∈ [offsets[g], offsets[g+1])} J[q, r, i] * B[p, i]

Per group this is a GEMM (R × len_g) @ (len_g × P) whose left operand Σ_q w_q J[q] is folded on the
fly in the accumulation dtype and never written to memory. The work is cut into *work items* on the
host so that one launch handles any G:

  * a long group (len_g > split) is split into chunks of `split` coordinates (split-K), one work item
    per chunk, whose partial sums are added into out with atomics;
  * runs of short groups are packed into one work item spanning about `split` coordinates; the
    program loops over its groups, so thousands of tiny groups cost a few programs, not thousands.

Grid: (work item, R tile, P tile). J is read once per P tile (once in total when P ≤ BLOCK_P).

Special values follow the op's documented semantics (explaind_fast.ops.path_kernel_reduce): padding
lanes never contribute (the folded tile is zeroed outside the group) and an empty group adds alpha·0.
The launcher passes a finite alpha only (for ±inf or NaN it sums S with alpha = 1, then adds alpha·S
itself), so adding alpha·(partial sum) per split-K chunk keeps the semantics.
"""
import triton
import triton.language as tl

__all__ = ["path_kernel_reduce_kernel"]


@triton.jit
def path_kernel_reduce_kernel(
    J_ptr, w_ptr, B_ptr, offsets_ptr, out_ptr, work_ptr, alpha_ptr,
    Q, R, P,
    stride_jq, stride_jr, stride_bp,
    R_BUCKET, P_BUCKET, LEN_BUCKET,  # autotuning keys only
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, ALLOW_DOT: tl.constexpr,
):
    acc_dtype = w_ptr.dtype.element_ty  # float32, or float64 for float64 inputs
    # int64 ids: G·R·P and Q·R·D overflow int32 at realistic sizes.
    work = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(2).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    row_mask = rows < R
    col_mask = cols < P
    # Work item: groups [g_begin, g_end), each restricted to the coordinates [lo, hi).
    g_begin = tl.load(work_ptr + 4 * work)
    g_end = tl.load(work_ptr + 4 * work + 1)
    lo = tl.load(work_ptr + 4 * work + 2)
    hi = tl.load(work_ptr + 4 * work + 3)
    alpha = tl.load(alpha_ptr)
    for g in range(g_begin, g_end):
        start = tl.maximum(tl.load(offsets_ptr + g), lo)
        end = tl.minimum(tl.load(offsets_ptr + g + 1), hi)
        acc = tl.zeros([BLOCK_R, BLOCK_P], dtype=acc_dtype)
        for k0 in range(start, end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < end
            j_mask = row_mask[:, None] & k_mask[None, :]
            j_ptrs = J_ptr + rows[:, None] * stride_jr + ks[None, :]
            # Quadrature sum folded into the load, accumulated in acc_dtype (bf16 is upcast here).
            a = tl.zeros([BLOCK_R, BLOCK_K], dtype=acc_dtype)
            for q in range(Q):
                w_q = tl.load(w_ptr + q)
                a += w_q * tl.load(j_ptrs, mask=j_mask, other=0.0).to(acc_dtype)
                j_ptrs += stride_jq
            # Padding coordinates (ks >= end) must add exactly nothing: there a = w_q·0, which is NaN
            # when some w_q is ±inf or NaN, and NaN·(b's padding 0) would reach every valid entry.
            a = tl.where(k_mask[None, :], a, 0.0)
            b = tl.load(B_ptr + cols[:, None] * stride_bp + ks[None, :],
                        mask=col_mask[:, None] & k_mask[None, :], other=0.0).to(acc_dtype)
            if ALLOW_DOT and BLOCK_P >= 16 and BLOCK_R >= 16 and BLOCK_K >= 16:
                # "ieee": the default TF32 would round the inputs to 10 mantissa bits.
                acc += tl.dot(a, tl.trans(b), input_precision="ieee")
            else:
                # Small P (tl.dot needs every block ≥ 16) and float64: broadcast-multiply-sum.
                acc += tl.sum(a[:, None, :] * b[None, :, :], axis=2)
        out_ptrs = out_ptr + g * R * P + rows[:, None] * P + cols[None, :]
        # Atomic: split-K chunks of one group add into the same out entries.
        tl.atomic_add(out_ptrs, alpha * acc, mask=row_mask[:, None] & col_mask[None, :])
