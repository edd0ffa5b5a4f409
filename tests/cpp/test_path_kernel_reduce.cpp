// C++ test of the op library (no Python): the dispatcher op against a naive triple loop in double,
// accumulation into out, bfloat16, the shared input check's messages (overlapping out included),
// the Inf/NaN semantics of empty sums and alpha, and the accumulate op's autograd refusal. Run by ctest.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "path_kernel_reduce.h"

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s\n", what.c_str());
    ++failures;
  }
}

// out[g, r, p] = alpha * sum_q w[q] sum_{i in g} J[q, r, i] B[p, i], naive loops in double.
at::Tensor naive(const at::Tensor& J, const at::Tensor& w, const at::Tensor& B, const at::Tensor& off, double alpha) {
  auto Jd = J.to(at::kDouble), wd = w.to(at::kDouble), Bd = B.to(at::kDouble);
  const int64_t Q = J.size(0), R = J.size(1), P = B.size(0), G = off.numel() - 1;
  auto out = at::zeros({G, R, P}, at::kDouble);
  auto o = off.accessor<int64_t, 1>();
  auto j = Jd.accessor<double, 3>();
  auto b = Bd.accessor<double, 2>();
  auto wa = wd.accessor<double, 1>();
  auto res = out.accessor<double, 3>();
  for (int64_t g = 0; g < G; ++g)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t p = 0; p < P; ++p) {
        double s = 0;
        for (int64_t q = 0; q < Q; ++q)
          for (int64_t i = o[g]; i < o[g + 1]; ++i) s += wa[q] * j[q][r][i] * b[p][i];
        res[g][r][p] = alpha * s;
      }
  return out;
}

at::Tensor offsets_of(std::vector<int64_t> values) { return at::tensor(values, at::kLong); }

std::string error_of(const at::Tensor& J, const at::Tensor& w, const at::Tensor& B, const at::Tensor& off,
                     const std::optional<at::Tensor>& out = std::nullopt) {
  try {
    explaind_fast::check_path_kernel_inputs(J, w, B, off, out);
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

}  // namespace

int main() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("explaind_fast::path_kernel_reduce", "")
                .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  auto acc_op = c10::Dispatcher::singleton()
                    .findSchemaOrThrow("explaind_fast::path_kernel_reduce_accumulate", "")
                    .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                at::Tensor, double)>();
  at::manual_seed(0);
  // Integer-valued inputs: every partial sum is exact, so results must match exactly.
  const int64_t Q = 3, R = 11, D = 1031, P = 5;
  auto J = at::randint(-3, 4, {Q, R, D}, at::kDouble);
  auto w = at::randint(-2, 3, {Q}, at::kDouble);
  auto B = at::randint(-3, 4, {P, D}, at::kDouble);
  const std::vector<at::Tensor> offsets_cases = {
      offsets_of({0, D}), at::arange(D + 1, at::kLong), offsets_of({0, 0, 5, 5, 600, 601, D})};
  for (const auto& off : offsets_cases) {
    auto want = naive(J, w, B, off, -2.0);
    expect(at::equal(op.call(J, w, B, off, -2.0), want), "float64 exact, G = " + std::to_string(off.numel() - 1));
    expect(at::equal(op.call(J.to(at::kFloat), w.to(at::kFloat), B.to(at::kFloat), off, -2.0).to(at::kDouble), want),
           "float32 exact");
    expect(at::equal(op.call(J.to(at::kBFloat16), w.to(at::kFloat), B.to(at::kBFloat16), off, -2.0).to(at::kDouble),
                     want),
           "bfloat16 exact");
    auto out = at::ones(std::vector<int64_t>{off.numel() - 1, R, P}, at::kDouble);
    acc_op.call(J, w, B, off, out, -2.0);
    expect(at::equal(out, want + 1), "accumulate into out");
  }
  // Messages name the problem.
  auto off = offsets_of({0, 4, D});
  expect(error_of(J, w, B, offsets_of({3, D})).find("offsets must start at 0, got 3") != std::string::npos,
         "offsets start message");
  expect(error_of(J, w, B.narrow(1, 0, D - 1), off).find("B.size(1) must equal D") != std::string::npos,
         "D mismatch message");
  expect(error_of(J, w.narrow(0, 0, 2), B, off).find("w must have length Q") != std::string::npos,
         "w length message");
  // NaN propagates.
  auto Jn = J.clone();
  Jn.index_put_({1, 2, 3}, NAN);
  auto res = op.call(Jn, w, B, off, 1.0);
  expect(at::isnan(res.select(0, 0).select(0, 2)).all().item().toBool(), "NaN propagates to its group and row");
  expect(at::isfinite(res.select(0, 1)).all().item().toBool(), "NaN stays in its group");

  // out must not share memory with an input, nor with itself (it is accumulated in place).
  {
    const int64_t G = 2;
    auto off2 = offsets_of({0, 4, D});
    auto base = at::zeros({Q * R * D + G * R * P + 64}, at::kDouble);
    auto Jv = base.narrow(0, 0, Q * R * D).view({Q, R, D}).copy_(J);
    auto out_on_J = base.narrow(0, 5, G * R * P).view({G, R, P});  // inside J's memory
    auto out_tail = base.narrow(0, Q * R * D - 3, G * R * P).view({G, R, P});  // partial: J's last 3
    auto out_free = base.narrow(0, Q * R * D, G * R * P).view({G, R, P});  // same storage, disjoint
    expect(contains(error_of(Jv, w, B, off2, out_on_J), "out overlaps J in memory"), "out inside J refused");
    expect(contains(error_of(Jv, w, B, off2, out_tail), "out overlaps J in memory"), "partial overlap refused");
    expect(contains(error_of(J, w, B, off2, B.view(-1).narrow(0, 0, G * R * P).view({G, R, P})),
                    "out overlaps B in memory"), "out on B refused");
    auto off_mem = at::zeros({G * R * P}, at::kLong);
    auto off_in_mem = off_mem.narrow(0, 0, 3).copy_(off2);
    expect(contains(error_of(J, w, B, off_in_mem, off_mem.view(at::kDouble).view({G, R, P})),
                    "out overlaps offsets in memory"), "out on offsets (another dtype) refused");
    expect(contains(error_of(J, w, B, off2, at::zeros({1, R, P}, at::kDouble).expand({G, R, P})),
                    "out has internal overlap"), "expanded out refused");
    bool raised = false;
    try {
      acc_op.call(Jv, w, B, off2, out_on_J, 1.0);
    } catch (const c10::Error&) {
      raised = true;
    }
    expect(raised, "the accumulate op refuses an overlapping out");
    acc_op.call(Jv, w, B, off2, out_free, 1.0);
    expect(at::equal(out_free, naive(J, w, B, off2, 1.0)), "disjoint views of one storage: right result");
  }

  // Inf/NaN semantics: S = 0 for empty groups and Q = 0, out += alpha * S (alpha = NaN/inf: NaN there).
  {
    auto off_e = offsets_of({0, 0, 5, 5, D});
    auto res = op.call(J, w, B, off_e, NAN);
    expect(at::isnan(res).all().item().toBool(), "alpha = NaN: NaN everywhere, empty groups included");
    res = op.call(J.narrow(0, 0, 0), w.narrow(0, 0, 0), B, off_e, INFINITY);
    expect(at::isnan(res).all().item().toBool(), "Q = 0, alpha = inf: inf * 0 = NaN");
    res = op.call(J.narrow(0, 0, 0), w.narrow(0, 0, 0), at::full({P, D}, NAN, at::kDouble), off_e, 1.0);
    expect(at::equal(res, at::zeros_like(res)), "Q = 0: B is not read");
    auto Jf = at::ones({1, 1, 4}, at::kFloat), wf = at::ones({1}, at::kFloat), Bf = at::ones({1, 4}, at::kFloat);
    res = op.call(Jf, wf, Bf, offsets_of({0, 4}), 1e300);
    expect(std::isinf(res.item<float>()) && res.item<float>() > 0, "alpha beyond float32: +inf");
    wf.fill_(INFINITY);
    res = op.call(Jf, wf, Bf, offsets_of({0, 0, 4}), 1.0);
    expect(res[0].item<float>() == 0 && std::isinf(res[1].item<float>()), "w = inf: empty group 0, other +inf");
  }

  // Autograd: the accumulating form refuses inputs that require grad, and bumps out's version.
  {
    auto off2 = offsets_of({0, 4, D});
    auto out = at::zeros({2, R, P}, at::kDouble);
    const auto version = out._version();
    acc_op.call(J, w, B, off2, out, 1.0);
    expect(out._version() == version + 1, "the accumulate op bumps the version of out");
    auto Jg = J.clone().set_requires_grad(true);
    std::string message;
    try {
      acc_op.call(Jg, w, B, off2, out, 1.0);
    } catch (const c10::Error& e) {
      message = e.what_without_backtrace();
    }
    expect(contains(message, "not differentiable") && contains(message, "J requires grad"),
           "accumulate refuses J that requires grad: " + message);
  }

  if (failures == 0) std::printf("test_path_kernel_reduce: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
