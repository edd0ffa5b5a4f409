// Schema, input checks and the CPU implementation of explaind_fast::path_kernel_reduce.
// The CUDA implementation (a Triton kernel) registers itself from Python (explaind_fast/ops.py).
#include "path_kernel_reduce.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace explaind_fast {

namespace {

constexpr const char* kOp = "path_kernel_reduce: ";

std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

}  // namespace

c10::ScalarType accumulation_dtype(c10::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_path_kernel_inputs(const at::Tensor& J, const at::Tensor& w, const at::Tensor& B,
                              const at::Tensor& offsets, const std::optional<at::Tensor>& out) {
  // Dimensions and dtypes first: they explain most mistakes.
  TORCH_CHECK(J.dim() == 3, kOp, "J must be a 3-D tensor [Q, R, D], got shape ", shape_str(J));
  const auto in_dtype = J.scalar_type();
  TORCH_CHECK(in_dtype == at::kFloat || in_dtype == at::kBFloat16 || in_dtype == at::kDouble, kOp,
              "J must have dtype float32, bfloat16 or float64, got ", in_dtype);
  const auto acc_dtype = accumulation_dtype(in_dtype);
  const int64_t Q = J.size(0), R = J.size(1), D = J.size(2);

  TORCH_CHECK(w.dim() == 1, kOp, "w must be a 1-D tensor [Q], got shape ", shape_str(w));
  TORCH_CHECK(w.scalar_type() == acc_dtype, kOp, "w must have dtype ", acc_dtype,
              " (the accumulation dtype for J of dtype ", in_dtype, "), got ", w.scalar_type());
  TORCH_CHECK(w.size(0) == Q, kOp, "w must have length Q = J.size(0) = ", Q, ", got ", w.size(0));

  TORCH_CHECK(B.dim() == 2, kOp, "B must be a 2-D tensor [P, D], got shape ", shape_str(B));
  TORCH_CHECK(B.scalar_type() == in_dtype, kOp, "B must have the dtype of J (", in_dtype, "), got ",
              B.scalar_type());
  TORCH_CHECK(B.size(1) == D, kOp, "B.size(1) must equal D = J.size(2) = ", D, ", got ", B.size(1),
              " (J has shape ", shape_str(J), ", B has shape ", shape_str(B), ")");
  const int64_t P = B.size(0);

  TORCH_CHECK(offsets.scalar_type() == at::kLong, kOp, "offsets must have dtype int64, got ",
              offsets.scalar_type());
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() >= 1, kOp,
              "offsets must be a 1-D tensor [G+1] with at least one element, got shape ", shape_str(offsets));
  const int64_t G = offsets.numel() - 1;

  // Devices before values: reading offsets needs them to be real tensors on a known device.
  const auto device = J.device();
  const std::pair<const char*, const at::Tensor*> others[] = {{"w", &w}, {"B", &B}, {"offsets", &offsets}};
  for (const auto& [name, t] : others) {
    TORCH_CHECK(t->device() == device, kOp, name, " is on ", t->device(), " but J is on ", device,
                "; all tensors must be on the same device");
  }
  if (out.has_value()) {
    const at::Tensor& o = *out;
    TORCH_CHECK(o.device() == device, kOp, "out is on ", o.device(), " but J is on ", device,
                "; all tensors must be on the same device");
    TORCH_CHECK(o.scalar_type() == acc_dtype, kOp, "out must have dtype ", acc_dtype,
                " (the accumulation dtype for J of dtype ", in_dtype, "), got ", o.scalar_type());
    TORCH_CHECK(o.dim() == 3 && o.size(0) == G && o.size(1) == R && o.size(2) == P, kOp,
                "out must have shape [G, R, P] = [", G, ", ", R, ", ", P, "], got ", shape_str(o));
    TORCH_CHECK(o.is_contiguous(), kOp, "out must be contiguous (it is accumulated in place)");
  }

  if (device.is_meta()) return;  // no values to check
  const at::Tensor off = offsets.to(at::kCPU).contiguous();
  const int64_t* o = off.data_ptr<int64_t>();
  TORCH_CHECK(o[0] == 0, kOp, "offsets must start at 0, got ", o[0]);
  TORCH_CHECK(o[G] == D, kOp, "offsets must end at D = J.size(2) = ", D, ", got ", o[G]);
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK(o[g] <= o[g + 1], kOp, "offsets must be non-decreasing, but offsets[", g, "] = ", o[g],
                " > offsets[", g + 1, "] = ", o[g + 1]);
  }
}

namespace {

// Row block and chunk sizes of the CPU kernel. A task owns kRowBlock rows of J and a run of whole
// groups, so no two tasks write the same out entry (no atomics, deterministic). The folded tile
// A = sum_q w_q J[q, rows, chunk] (kRowBlock x kChunk accumulators, 8 KiB in float32) and the
// matching B chunk stay in L1/L2 while they are multiplied, so J is read from memory exactly once.
constexpr int64_t kRowBlock = 8;
constexpr int64_t kChunk = 256;
// A task spans about this many coordinates (several tiny groups, or one long group).
constexpr int64_t kTaskSpan = 16384;

template <typename acc_t>
inline acc_t dot(const acc_t* __restrict a, const acc_t* __restrict b, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename in_t, typename acc_t>
inline void fold_rows(const in_t* __restrict J, const acc_t* __restrict w, int64_t Q, int64_t RD,
                      int64_t n, acc_t* __restrict A) {
  // A[0:n] = sum_q w[q] * J[q * RD + 0:n], in the accumulation dtype, q in order.
  const acc_t w0 = w[0];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) A[i] = w0 * static_cast<acc_t>(J[i]);
  for (int64_t q = 1; q < Q; ++q) {
    const acc_t wq = w[q];
    const in_t* Jq = J + q * RD;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) A[i] += wq * static_cast<acc_t>(Jq[i]);
  }
}

template <typename in_t, typename acc_t>
void accumulate_impl(const at::Tensor& J, const at::Tensor& w, const at::Tensor& B,
                     const at::Tensor& offsets, at::Tensor& out, double alpha) {
  const int64_t Q = J.size(0), R = J.size(1), D = J.size(2), P = B.size(0);
  const int64_t G = offsets.numel() - 1;
  if (G == 0 || R == 0 || P == 0) return;
  const in_t* Jp = J.data_ptr<in_t>();
  const in_t* Bp = B.data_ptr<in_t>();
  const acc_t* wp = w.data_ptr<acc_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  acc_t* outp = out.data_ptr<acc_t>();
  const acc_t alpha_acc = static_cast<acc_t>(alpha);
  const int64_t RD = R * D;

  // Group runs: consecutive groups whose span reaches kTaskSpan (a long group is a run by itself).
  std::vector<int64_t> run_start{0};
  for (int64_t g = 0; g < G; ++g) {
    if (off[g + 1] - off[run_start.back()] >= kTaskSpan && g + 1 < G) run_start.push_back(g + 1);
  }
  run_start.push_back(G);
  const int64_t n_runs = static_cast<int64_t>(run_start.size()) - 1;
  const int64_t n_row_blocks = (R + kRowBlock - 1) / kRowBlock;

  at::parallel_for(0, n_runs * n_row_blocks, 1, [&](int64_t task_begin, int64_t task_end) {
    std::vector<acc_t> A(kRowBlock * kChunk);                          // folded J tile
    std::vector<acc_t> Bconv(std::is_same_v<in_t, acc_t> ? 0 : P * kChunk);  // upcast B chunk
    std::vector<acc_t> acc(kRowBlock * P);                             // current group's sums
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t run = task / n_row_blocks, rb = task % n_row_blocks;
      const int64_t r0 = rb * kRowBlock, nr = std::min(kRowBlock, R - r0);
      const int64_t g_first = run_start[run], g_last = run_start[run + 1];
      int64_t g = g_first;
      while (g < g_last && off[g] == off[g + 1]) ++g;  // empty groups contribute nothing
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t c0 = off[g_first]; c0 < off[g_last]; c0 += kChunk) {
        const int64_t n = std::min(kChunk, off[g_last] - c0);
        for (int64_t rr = 0; rr < nr; ++rr) {
          fold_rows<in_t, acc_t>(Jp + (r0 + rr) * D + c0, wp, Q, RD, n, A.data() + rr * kChunk);
        }
        const acc_t* Bchunk;  // row p of the chunk starts at Bchunk + p * b_stride
        int64_t b_stride;
        if constexpr (std::is_same_v<in_t, acc_t>) {
          Bchunk = Bp + c0;
          b_stride = D;
        } else {
          for (int64_t p = 0; p < P; ++p) {
            const in_t* src = Bp + p * D + c0;
            acc_t* dst = Bconv.data() + p * kChunk;
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
          }
          Bchunk = Bconv.data();
          b_stride = kChunk;
        }
        // Every group overlapping this chunk: add its piece, flush it when it ends here.
        while (g < g_last && off[g] < c0 + n) {
          const int64_t lo = std::max(off[g], c0) - c0, hi = std::min(off[g + 1], c0 + n) - c0;
          for (int64_t rr = 0; rr < nr; ++rr) {
            const acc_t* a = A.data() + rr * kChunk + lo;
            for (int64_t p = 0; p < P; ++p) acc[rr * P + p] += dot(a, Bchunk + p * b_stride + lo, hi - lo);
          }
          if (off[g + 1] > c0 + n) break;  // group continues in the next chunk
          acc_t* dst = outp + (g * R + r0) * P;
          for (int64_t k = 0; k < nr * P; ++k) dst[k] += alpha_acc * acc[k];
          std::fill(acc.begin(), acc.end(), acc_t(0));
          ++g;
          while (g < g_last && off[g] == off[g + 1]) ++g;
        }
      }
    }
  });
}

}  // namespace

void path_kernel_reduce_accumulate_cpu(const at::Tensor& J, const at::Tensor& w, const at::Tensor& B,
                                       const at::Tensor& offsets, at::Tensor& out, double alpha) {
  const at::Tensor Jc = J.contiguous(), wc = w.contiguous(), Bc = B.contiguous();
  const at::Tensor offc = offsets.contiguous();
  switch (J.scalar_type()) {
    case at::kFloat: accumulate_impl<float, float>(Jc, wc, Bc, offc, out, alpha); break;
    case at::kBFloat16: accumulate_impl<c10::BFloat16, float>(Jc, wc, Bc, offc, out, alpha); break;
    case at::kDouble: accumulate_impl<double, double>(Jc, wc, Bc, offc, out, alpha); break;
    default: TORCH_CHECK(false, kOp, "unsupported dtype ", J.scalar_type());
  }
}

namespace {

at::Tensor path_kernel_reduce_cpu(const at::Tensor& J, const at::Tensor& w, const at::Tensor& B,
                                  const at::Tensor& offsets, double alpha) {
  check_path_kernel_inputs(J, w, B, offsets, std::nullopt);
  at::Tensor out = at::zeros({offsets.numel() - 1, J.size(1), B.size(0)},
                             J.options().dtype(accumulation_dtype(J.scalar_type())));
  path_kernel_reduce_accumulate_cpu(J, w, B, offsets, out, alpha);
  return out;
}

void path_kernel_reduce_accumulate_cpu_op(const at::Tensor& J, const at::Tensor& w, const at::Tensor& B,
                                          const at::Tensor& offsets, at::Tensor out, double alpha) {
  check_path_kernel_inputs(J, w, B, offsets, out);
  path_kernel_reduce_accumulate_cpu(J, w, B, offsets, out, alpha);
}

void path_kernel_reduce_check_op(const at::Tensor& J, const at::Tensor& w, const at::Tensor& B,
                                 const at::Tensor& offsets, const std::optional<at::Tensor>& out) {
  check_path_kernel_inputs(J, w, B, offsets, out);
}

}  // namespace

TORCH_LIBRARY(explaind_fast, m) {
  // Fake (meta) implementations live in explaind_fast/ops.py; point torch at that module.
  m.set_python_module("explaind_fast.ops");
  m.def("path_kernel_reduce(Tensor J, Tensor w, Tensor B, Tensor offsets, float alpha=1.0) -> Tensor");
  m.def(
      "path_kernel_reduce_accumulate(Tensor J, Tensor w, Tensor B, Tensor offsets, Tensor(a!) out, "
      "float alpha=1.0) -> ()");
  m.def("path_kernel_reduce_check(Tensor J, Tensor w, Tensor B, Tensor offsets, Tensor? out=None) -> ()");
}

TORCH_LIBRARY_IMPL(explaind_fast, CPU, m) {
  m.impl("path_kernel_reduce", &path_kernel_reduce_cpu);
  m.impl("path_kernel_reduce_accumulate", &path_kernel_reduce_accumulate_cpu_op);
}

// The check is device-agnostic (it copies offsets to the host), so one kernel serves every backend.
TORCH_LIBRARY_IMPL(explaind_fast, CompositeExplicitAutograd, m) {
  m.impl("path_kernel_reduce_check", &path_kernel_reduce_check_op);
}

}  // namespace explaind_fast
