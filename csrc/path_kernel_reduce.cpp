// Schema, input checks and the CPU implementation of explaind_fast::path_kernel_reduce.
// The CUDA implementation (a Triton kernel) registers itself from Python (explaind_fast/ops.py).
#include "path_kernel_reduce.h"

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <cstdint>
#include <limits>
#include <vector>

namespace explaind_fast {

namespace {

constexpr const char* kOp = "path_kernel_reduce: ";

std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

// The bytes [begin, end) that a strided tensor's elements lie in (first to last element, whatever
// lies between them). Empty (begin == end) for a tensor without elements or without data.
struct ByteSpan {
  uintptr_t begin = 0, end = 0;
};

ByteSpan byte_span(const at::Tensor& t) {
  if (t.numel() == 0 || !t.has_storage() || t.const_data_ptr() == nullptr) return {};
  int64_t lo = 0, hi = 0;  // element offsets of the first and the last element from the data pointer
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t extent = (t.size(d) - 1) * t.stride(d);
    (extent < 0 ? lo : hi) += extent;
  }
  const auto base = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const auto item = static_cast<int64_t>(t.element_size());
  return {base + static_cast<uintptr_t>(lo * item), base + static_cast<uintptr_t>((hi + 1) * item)};
}

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

  // Dense (strided) tensors only: the kernels and the overlap test below read raw memory.
  const std::pair<const char*, const at::Tensor*> all[] = {{"J", &J}, {"w", &w}, {"B", &B}, {"offsets", &offsets}};
  for (const auto& [name, t] : all) {
    TORCH_CHECK(t->layout() == at::kStrided, kOp, name, " must be a dense (strided) tensor, got layout ",
                t->layout());
  }
  TORCH_CHECK(!out.has_value() || out->layout() == at::kStrided, kOp,
              "out must be a dense (strided) tensor, got layout ", out->layout());

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
    TORCH_CHECK(at::has_internal_overlap(o) != at::MemOverlap::Yes, kOp,
                "out has internal overlap (several of its elements share memory, e.g. an expanded or "
                "stride-0 tensor); it is accumulated in place, so it must own each of its elements");
    TORCH_CHECK(o.is_contiguous(), kOp, "out must be contiguous (it is accumulated in place)");
  }

  if (device.is_meta()) return;  // no memory and no values to check

  // out is written while J, w, B and offsets are read: refuse any sharing of memory. The test is on
  // raw addresses, so it covers views of one storage (full or partial overlap, other dtypes) and
  // distinct storages over the same memory alike; O(1), no data read. A strided input whose span
  // merely encloses out (interleaved, no common element) is refused too: clone it.
  if (out.has_value()) {
    const ByteSpan o = byte_span(*out);
    const std::pair<const char*, const at::Tensor*> inputs[] = {
        {"J", &J}, {"w", &w}, {"B", &B}, {"offsets", &offsets}};
    for (const auto& [name, t] : inputs) {
      const ByteSpan s = byte_span(*t);
      TORCH_CHECK(o.begin == o.end || s.begin == s.end || s.end <= o.begin || o.end <= s.begin, kOp,
                  "out overlaps ", name, " in memory (out is accumulated in place while ", name,
                  " is read, so the result would be wrong); pass an out that shares no memory with ", name,
                  " (e.g. a fresh tensor, or ", name, ".clone())");
    }
  }

  // Values.
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

// The CPU kernel. A task owns a block of rows and a run of whole groups, so no two tasks write the
// same out entry (no atomics, deterministic for a given thread count). Per chunk of coordinates the
// task folds the quadrature, A = sum_q w_q J[q, rows, chunk], into a scratch tile that stays in
// cache while it is multiplied with B, so J is read from memory exactly once. Two layouts:
//
//  * long groups (mean length >= kShortGroupMeanLength): 8 rows x 256 coordinates (8 KiB in
//    float32, L1), one contiguous dot product per (row, p) and group piece;
//  * short groups (e.g. one coordinate per group): up to 512 rows x 64 coordinates, transposed to
//    [coordinate][row], then per coordinate and p one AXPY over the rows into a [p][row]
//    accumulator. Inner loops stay long and vectorised however short the groups are, and each
//    group's out[g] block (rows x P, contiguous) is written in one sweep.
constexpr int64_t kLongChunk = 256;
constexpr int64_t kLongRowBlock = 8;
constexpr int64_t kShortChunk = 64;
constexpr int64_t kShortRowBlock = 512;
constexpr int64_t kShortGroupMeanLength = 64;
// A run of groups spans about this many coordinates (capped so every thread gets several tasks).
constexpr int64_t kMaxTaskSpan = 16384;

}  // namespace

// The innermost loops (csrc/cpu_loops.h) are compiled twice on x86-64, for AVX2+FMA and for the
// baseline, and chosen at run time: AVX2+FMA runs the kernel about 1.4x faster than the SSE2
// baseline, and the extension still runs on any x86-64 CPU.
namespace loops_base {
#include "cpu_loops.h"
}  // namespace loops_base
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace loops_avx2 {
#include "cpu_loops.h"
}  // namespace loops_avx2
#pragma GCC pop_options
// EXPLAIND_FAST_CPU_BASELINE=1 forces the baseline loops (so tests can cover them on AVX2 machines).
bool detect_avx2_fma() {
  __builtin_cpu_init();  // we may run from a static initializer, before libgcc's own
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         std::getenv("EXPLAIND_FAST_CPU_BASELINE") == nullptr;
}
const bool kUseAvx2 = detect_avx2_fma();
#define EXPLAIND_FAST_LOOP(name, ...) (kUseAvx2 ? loops_avx2::name(__VA_ARGS__) : loops_base::name(__VA_ARGS__))
#else
#define EXPLAIND_FAST_LOOP(name, ...) loops_base::name(__VA_ARGS__)
const bool kUseAvx2 = false;
#endif

const char* cpu_kernel_isa() { return kUseAvx2 ? "avx2+fma" : "baseline"; }

namespace {

inline void fold_row(const float* J, const float* w, int64_t Q, int64_t RD, int64_t n, float* A) {
  EXPLAIND_FAST_LOOP(fold_row_f32, J, w, Q, RD, n, A);
}
inline void fold_row(const uint16_t* J, const float* w, int64_t Q, int64_t RD, int64_t n, float* A) {
  EXPLAIND_FAST_LOOP(fold_row_bf16, J, w, Q, RD, n, A);
}
inline void fold_row(const double* J, const double* w, int64_t Q, int64_t RD, int64_t n, double* A) {
  EXPLAIND_FAST_LOOP(fold_row_f64, J, w, Q, RD, n, A);
}
inline float dot(const float* a, const float* b, int64_t n) { return EXPLAIND_FAST_LOOP(dot_f32, a, b, n); }
inline double dot(const double* a, const double* b, int64_t n) { return EXPLAIND_FAST_LOOP(dot_f64, a, b, n); }
inline void axpy(float b, const float* x, float* y, int64_t n) { EXPLAIND_FAST_LOOP(axpy_f32, b, x, y, n); }
inline void axpy(double b, const double* x, double* y, int64_t n) { EXPLAIND_FAST_LOOP(axpy_f64, b, x, y, n); }
inline float to_acc(uint16_t bits) { return loops_base::to_acc(bits); }
inline float to_acc(float x) { return x; }
inline double to_acc(double x) { return x; }

// The element type the kernel reads: bfloat16 as its raw bits.
template <typename in_t>
using raw_t = std::conditional_t<std::is_same_v<in_t, c10::BFloat16>, uint16_t, in_t>;

template <typename in_t, typename acc_t>
struct Problem {
  const in_t* J;  // in_t: float, double, or uint16_t (bfloat16 bits)
  const acc_t* w;
  const in_t* B;
  const int64_t* off;
  acc_t* out;
  int64_t Q, R, D, P;
  acc_t alpha;

  int64_t next_nonempty(int64_t g, int64_t g_last) const {
    while (g < g_last && off[g] == off[g + 1]) ++g;
    return g;
  }

  // Rows [r0, r0 + nr), groups [g_first, g_last): dot-product layout for long groups.
  void long_task(int64_t r0, int64_t nr, int64_t g_first, int64_t g_last) const {
    std::vector<acc_t> A(kLongRowBlock * kLongChunk);
    std::vector<acc_t> Bconv(std::is_same_v<in_t, acc_t> ? 0 : P * kLongChunk);  // upcast bf16 chunk
    std::vector<acc_t> acc(kLongRowBlock * P, acc_t(0));                    // [row][p] of group g
    int64_t g = next_nonempty(g_first, g_last);
    for (int64_t c0 = off[g_first]; c0 < off[g_last]; c0 += kLongChunk) {
      const int64_t n = std::min(kLongChunk, off[g_last] - c0);
      for (int64_t rr = 0; rr < nr; ++rr) fold_row(J + (r0 + rr) * D + c0, w, Q, R * D, n, &A[rr * kLongChunk]);
      const acc_t* Bc;  // row p of the chunk starts at Bc + p * b_stride
      int64_t b_stride;
      if constexpr (std::is_same_v<in_t, acc_t>) {
        Bc = B + c0;
        b_stride = D;
      } else {
        for (int64_t p = 0; p < P; ++p)
          for (int64_t i = 0; i < n; ++i) Bconv[p * kLongChunk + i] = to_acc(B[p * D + c0 + i]);
        Bc = Bconv.data();
        b_stride = kLongChunk;
      }
      // Every group overlapping this chunk: add its piece; flush it to out when it ends here.
      while (g < g_last && off[g] < c0 + n) {
        const int64_t lo = std::max(off[g], c0) - c0, hi = std::min(off[g + 1], c0 + n) - c0;
        for (int64_t rr = 0; rr < nr; ++rr)
          for (int64_t p = 0; p < P; ++p) acc[rr * P + p] += dot(&A[rr * kLongChunk + lo], Bc + p * b_stride + lo, hi - lo);
        if (off[g + 1] > c0 + n) break;  // the group continues in the next chunk
        acc_t* dst = out + (g * R + r0) * P;
        for (int64_t k = 0; k < nr * P; ++k) dst[k] += alpha * acc[k];
        std::fill(acc.begin(), acc.end(), acc_t(0));
        g = next_nonempty(g + 1, g_last);
      }
    }
  }

  // Rows [r0, r0 + nr), groups [g_first, g_last): AXPY layout for short groups.
  void short_task(int64_t r0, int64_t nr, int64_t g_first, int64_t g_last) const {
    std::vector<acc_t> A(nr * kShortChunk);   // [row][coordinate]
    std::vector<acc_t> At(kShortChunk * nr);  // [coordinate][row]
    std::vector<acc_t> acc(P * nr, acc_t(0));  // [p][row] of group g
    int64_t g = next_nonempty(g_first, g_last);
    for (int64_t c0 = off[g_first]; c0 < off[g_last]; c0 += kShortChunk) {
      const int64_t n = std::min(kShortChunk, off[g_last] - c0);
      for (int64_t rr = 0; rr < nr; ++rr) fold_row(J + (r0 + rr) * D + c0, w, Q, R * D, n, &A[rr * kShortChunk]);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t rr = 0; rr < nr; ++rr) At[i * nr + rr] = A[rr * kShortChunk + i];
      while (g < g_last && off[g] < c0 + n) {
        const int64_t lo = std::max(off[g], c0) - c0, hi = std::min(off[g + 1], c0 + n) - c0;
        for (int64_t i = lo; i < hi; ++i) {
          const acc_t* a = &At[i * nr];
          for (int64_t p = 0; p < P; ++p) axpy(to_acc(B[p * D + c0 + i]), a, &acc[p * nr], nr);
        }
        if (off[g + 1] > c0 + n) break;
        acc_t* dst = out + (g * R + r0) * P;
        for (int64_t rr = 0; rr < nr; ++rr)
          for (int64_t p = 0; p < P; ++p) dst[rr * P + p] += alpha * acc[p * nr + rr];
        std::fill(acc.begin(), acc.end(), acc_t(0));
        g = next_nonempty(g + 1, g_last);
      }
    }
  }
};

// alpha rounded to the accumulation dtype as IEEE conversion does (beyond its range: ±inf), without
// relying on an out-of-range static_cast (undefined behaviour in C++).
template <typename acc_t>
acc_t round_alpha(double alpha) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return alpha;
  } else {
    // The midpoint between FLT_MAX and 2^128: from there on, round-to-nearest-even gives inf.
    constexpr double kOverflow = 0x1.ffffffp127;
    if (std::isfinite(alpha) && std::abs(alpha) >= kOverflow) {
      return alpha > 0 ? std::numeric_limits<float>::infinity() : -std::numeric_limits<float>::infinity();
    }
    return static_cast<float>(alpha);
  }
}

template <typename in_t, typename acc_t>
void accumulate_impl(const at::Tensor& J, const at::Tensor& w, const at::Tensor& B,
                     const at::Tensor& offsets, at::Tensor& out, double alpha_in) {
  const int64_t Q = J.size(0), R = J.size(1), D = J.size(2), P = B.size(0);
  const int64_t G = offsets.numel() - 1;
  if (G == 0 || R == 0 || P == 0) return;  // out has no entries
  const acc_t alpha = round_alpha<acc_t>(alpha_in);
  const int64_t* off = offsets.data_ptr<int64_t>();
  acc_t* out_data = out.data_ptr<acc_t>();
  // Entries whose sum S is empty (an empty group, or every group when Q = 0) get out += alpha * 0:
  // nothing when alpha is finite, NaN when alpha is ±inf or NaN (the documented semantics). The
  // kernel below skips empty groups, so this O(G) pass (O(G·R·P) writes) runs only for such alpha.
  if (!std::isfinite(alpha)) {
    for (int64_t g = 0; g < G; ++g) {
      if (Q > 0 && off[g] < off[g + 1]) continue;
      acc_t* dst = out_data + g * R * P;
      for (int64_t k = 0; k < R * P; ++k) dst[k] += alpha * acc_t(0);
    }
  }
  if (Q == 0 || D == 0) return;  // every sum is empty (handled above)
  const Problem<raw_t<in_t>, acc_t> prob{reinterpret_cast<const raw_t<in_t>*>(J.data_ptr<in_t>()),
                                         w.data_ptr<acc_t>(),
                                         reinterpret_cast<const raw_t<in_t>*>(B.data_ptr<in_t>()),
                                         off, out_data, Q, R, D, P, alpha};
  const bool short_groups = D < kShortGroupMeanLength * G;
  const int64_t row_block = short_groups ? std::min(R, kShortRowBlock) : kLongRowBlock;
  const int64_t n_row_blocks = (R + row_block - 1) / row_block;
  // Runs of consecutive groups spanning about task_span coordinates (a long group is a run itself).
  const int64_t threads = at::get_num_threads();
  const int64_t task_span = std::max(
      kLongChunk, std::min(kMaxTaskSpan, D * n_row_blocks / std::max<int64_t>(1, 8 * threads)));
  std::vector<int64_t> run_start{0};
  for (int64_t g = 0; g + 1 < G; ++g) {
    if (off[g + 1] - off[run_start.back()] >= task_span) run_start.push_back(g + 1);
  }
  run_start.push_back(G);
  const int64_t n_runs = static_cast<int64_t>(run_start.size()) - 1;

  at::parallel_for(0, n_runs * n_row_blocks, 1, [&](int64_t task_begin, int64_t task_end) {
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t run = task / n_row_blocks, rb = task % n_row_blocks;
      const int64_t r0 = rb * row_block, nr = std::min(row_block, R - r0);
      if (short_groups) {
        prob.short_task(r0, nr, run_start[run], run_start[run + 1]);
      } else {
        prob.long_task(r0, nr, run_start[run], run_start[run + 1]);
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

// Autograd kernel of the accumulate op. It adds into out in place and has no derivative formula,
// so instead of autograd's default (a warning, then silently no gradient) it refuses inputs that
// require grad, with a pointer to the differentiable functional form. Otherwise it runs the
// backend kernel and bumps out's version counter, as in-place ops do (so autograd notices if a
// tensor saved for backward is overwritten).
void path_kernel_reduce_accumulate_autograd(c10::DispatchKeySet keys, const at::Tensor& J, const at::Tensor& w,
                                            const at::Tensor& B, const at::Tensor& offsets, at::Tensor out,
                                            double alpha) {
  if (at::GradMode::is_enabled()) {
    const std::pair<const char*, const at::Tensor*> args[] = {{"J", &J}, {"w", &w}, {"B", &B}, {"out", &out}};
    for (const auto& [name, t] : args) {
      TORCH_CHECK(!t->requires_grad(), kOp, "the accumulating form (out=..., op path_kernel_reduce_accumulate) "
                  "is not differentiable: it adds into out in place, but ", name, " requires grad. Use the "
                  "functional form, out + path_kernel_reduce(J, w, B, offsets, alpha=alpha) without out=, which "
                  "has a backward formula, or call it on detached tensors or under torch.no_grad()");
    }
  }
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("explaind_fast::path_kernel_reduce_accumulate", "")
                             .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, at::Tensor, double)>();
  op.redispatch(keys & c10::after_autograd_keyset, J, w, B, offsets, out, alpha);
  if (!out.is_inference()) out.unsafeGetTensorImpl()->bump_version();
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

// Every backend: the accumulate op refuses autograd (the functional op's backward formula is
// registered from Python, explaind_fast/ops/__init__.py).
TORCH_LIBRARY_IMPL(explaind_fast, Autograd, m) {
  m.impl("path_kernel_reduce_accumulate", &path_kernel_reduce_accumulate_autograd);
}

// The check is device-agnostic (it copies offsets to the host), so one kernel serves every backend.
TORCH_LIBRARY_IMPL(explaind_fast, CompositeExplicitAutograd, m) {
  m.impl("path_kernel_reduce_check", &path_kernel_reduce_check_op);
}

}  // namespace explaind_fast
