"""Naive reference implementations (test oracles and benchmark baselines). Not for production use."""
import torch

__all__ = ["path_kernel_reduce_naive"]


def path_kernel_reduce_naive(J, w, B, offsets, *, out=None, alpha=1.0):
    """The path-kernel reduction the way the original research code computes it.

        out[g, r, p] += alpha * Σ_q w[q] Σ_{i ∈ [offsets[g], offsets[g+1])} J[q, r, i] * B[p, i]

    Same signature and shapes as explaind_fast.ops.path_kernel_reduce: J [Q, R, D], w [Q],
    B [P, D], offsets [G+1] int64, out [G, R, P] (created zeroed when not given). It sums the
    quadrature first (a weighted copy of J plus its sum), then materialises the full elementwise
    product as a [D, R, P] tensor and reduces it by segments (index_add over segment ids). It is
    computed in the accumulation dtype (float32 for float32/bfloat16, float64 for float64): pass
    float64 inputs to get an oracle accurate to float64 rounding.

    Special values: the semantics documented in explaind_fast.ops.path_kernel_reduce, which this
    evaluation defines (fold first, then products, then unordered sums; an empty sum, i.e. an empty
    group or Q = 0, is exactly 0 and B is not read for it; alpha is rounded to the accumulation
    dtype, then out += alpha·S entrywise, so alpha = ±inf or NaN turns S = 0 into NaN).

    Peak extra memory: Q·R·D + R·D + R·P·D + D accumulation-dtype elements (the weighted copy of J,
    the quadrature sum, the product, the segment ids), i.e. O(R·P·D) — why the fused op exists.
    Inputs are not validated beyond what torch itself checks. Differentiable with plain autograd
    (J, w, B), so it also serves as the oracle for the op's backward.
    """
    acc = torch.float64 if J.dtype == torch.float64 else torch.float32
    Q, R, D = J.shape
    P = B.shape[0]
    G = offsets.numel() - 1
    alpha = torch.tensor(alpha, dtype=acc).item()  # rounded to acc (±inf beyond its range), as the kernels do
    if Q == 0:
        reduced = torch.zeros(G, R, P, dtype=acc, device=J.device)  # empty quadrature: S = 0, B unread
    else:
        J_sum = (w.to(acc).view(Q, 1, 1) * J.to(acc)).sum(0)                   # [R, D]
        product = J_sum.t().unsqueeze(2) * B.to(acc).t().unsqueeze(1)           # [D, R, P]
        lengths = offsets[1:] - offsets[:-1]
        segment_id = torch.repeat_interleave(torch.arange(G, device=J.device), lengths, output_size=D)
        reduced = product.new_zeros(G, R, P).index_add(0, segment_id, product)
    if out is None:
        out = torch.zeros(G, R, P, dtype=acc, device=J.device)
    out.add_(reduced, alpha=alpha)
    return out
