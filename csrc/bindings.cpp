// The Python module explaind_fast._C. Importing it runs the static TORCH_LIBRARY registrations in
// path_kernel_reduce.cpp; the functions here only describe how the extension was built.
#include <torch/extension.h>

#include "path_kernel_reduce.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "explaind_fast._C: registers torch.ops.explaind_fast.* (schema, checks, CPU kernel)";
  m.def("compiled_with_openmp", []() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  }, "Whether the CPU kernel was compiled with OpenMP (parallel over groups and row blocks).");
  m.def("cpu_kernel_isa", &explaind_fast::cpu_kernel_isa,
        "The CPU inner loops in use: 'avx2+fma' or 'baseline' (EXPLAIND_FAST_CPU_BASELINE=1 forces it).");
}
