// The fused path-kernel reduction:
//
//     out[g, r, p] += alpha * sum_q w[q] * sum_{i in [offsets[g], offsets[g+1])} J[q, r, i] * B[p, i]
//
// J: [Q, R, D] float32 | bfloat16 | float64, w: [Q], B: [P, D] (dtype of J), offsets: [G+1] int64
// non-decreasing from 0 to D, out: [G, R, P]. The accumulation dtype is float32 for float32/bfloat16
// inputs and float64 for float64 inputs; w and out must have the accumulation dtype. out must not
// share memory with J, w, B or offsets, nor have internal overlap.
//
// Inf/NaN (the same for every backend and the reference; stated in full in the docstring of
// explaind_fast.ops.path_kernel_reduce): IEEE evaluation in the accumulation dtype of
//     A[r, i] = sum_q w[q] J[q, r, i],   S[g, r, p] = sum_{i in g} A[r, i] B[p, i],
//     out[g, r, p] = out[g, r, p] + alpha * S[g, r, p]   (alpha rounded to the accumulation dtype),
// every sum unordered (NaN if a summand is NaN or +inf and -inf meet, else +-inf if one is). An
// empty group, and every group when Q = 0, has S = 0 exactly, so alpha = +-inf or NaN makes it NaN;
// padding never contributes. Only outcomes that hinge on rounding (overflow, cancellation to zero)
// may differ between backends.
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>

namespace explaind_fast {

// The accumulation dtype for an input dtype (float32 for float32/bfloat16, float64 for float64).
c10::ScalarType accumulation_dtype(c10::ScalarType input_dtype);

// The one input check shared by every backend. Raises c10::Error with a message that names the
// offending argument (an out overlapping an input: both). Reads the offset values (a device-to-host
// copy when they live on a GPU); the overlap test is O(1) address arithmetic.
void check_path_kernel_inputs(const at::Tensor& J, const at::Tensor& w, const at::Tensor& B,
                              const at::Tensor& offsets, const std::optional<at::Tensor>& out);

// Which compiled variant of the CPU inner loops runs: "avx2+fma" or "baseline".
const char* cpu_kernel_isa();

// CPU implementation: accumulates into out (contiguous, checked by the caller).
void path_kernel_reduce_accumulate_cpu(const at::Tensor& J, const at::Tensor& w, const at::Tensor& B,
                                       const at::Tensor& offsets, at::Tensor& out, double alpha);

}  // namespace explaind_fast
