// The innermost loops of the CPU kernel, over raw arrays. Included twice by path_kernel_reduce.cpp:
// once compiled for AVX2+FMA (inside #pragma GCC target) and once for the baseline, each in its own
// namespace, and chosen at run time. No includes here: everything it uses is included before.
// (No include guard on purpose.)

// bfloat16 arrives as its raw bits; the upcast is a 16-bit shift, written here so that it vectorises.
inline float to_acc(uint16_t bits) {
  const uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &widened, sizeof f);
  return f;
}
inline float to_acc(float x) { return x; }
inline double to_acc(double x) { return x; }

// A[0:n] = sum_q w[q] * J[q * RD + 0:n], q in order, in the accumulation dtype acc_t.
template <typename in_t, typename acc_t>
inline void fold_row(const in_t* __restrict J, const acc_t* __restrict w, int64_t Q, int64_t RD, int64_t n,
                     acc_t* __restrict A) {
  const acc_t w0 = w[0];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) A[i] = w0 * to_acc(J[i]);
  for (int64_t q = 1; q < Q; ++q) {
    const acc_t wq = w[q];
    const in_t* Jq = J + q * RD;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) A[i] += wq * to_acc(Jq[i]);
  }
}

// sum_i a[i] * b[i]; the simd reduction keeps one partial sum per vector lane.
template <typename acc_t>
inline acc_t dot(const acc_t* __restrict a, const acc_t* __restrict b, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y[0:n] += b * x[0:n]
template <typename acc_t>
inline void axpy(acc_t b, const acc_t* __restrict x, acc_t* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += b * x[i];
}

// Explicit non-template entry points, so that the code is generated here, under this region's
// target options, and not at some later point of instantiation.
inline void fold_row_f32(const float* J, const float* w, int64_t Q, int64_t RD, int64_t n, float* A) {
  fold_row(J, w, Q, RD, n, A);
}
inline void fold_row_bf16(const uint16_t* J, const float* w, int64_t Q, int64_t RD, int64_t n, float* A) {
  fold_row(J, w, Q, RD, n, A);
}
inline void fold_row_f64(const double* J, const double* w, int64_t Q, int64_t RD, int64_t n, double* A) {
  fold_row(J, w, Q, RD, n, A);
}
inline float dot_f32(const float* a, const float* b, int64_t n) { return dot(a, b, n); }
inline double dot_f64(const double* a, const double* b, int64_t n) { return dot(a, b, n); }
inline void axpy_f32(float b, const float* x, float* y, int64_t n) { axpy(b, x, y, n); }
inline void axpy_f64(double b, const double* x, double* y, int64_t n) { axpy(b, x, y, n); }
