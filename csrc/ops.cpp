// The Python module rlgaf_fast._C. The kernels register themselves as torch operators in their
// own files (TORCH_LIBRARY_FRAGMENT(rlgaf_fast_cpu / rlgaf_fast_cuda, ...)), so importing this
// module is what makes torch.ops.rlgaf_fast_cpu.* and torch.ops.rlgaf_fast_cuda.* exist.
#include <torch/extension.h>

#ifdef _OPENMP
#include <omp.h>
#endif

static bool built_with_cuda() {
#ifdef RLGAF_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

static int num_threads() { return at::get_num_threads(); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("built_with_cuda", &built_with_cuda, "whether the CUDA kernels were compiled in");
  m.def("num_threads", &num_threads, "intra-op threads the CPU kernels use");
}
