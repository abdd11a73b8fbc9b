// The only TORCH_LIBRARY block: every fastattr schema lives here. Kernels register themselves in cpu/ and cuda/.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#ifdef WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace fastattr {

// CUDA runtime version the extension was compiled against (e.g. 13000), or -1 in a CPU-only build.
int64_t cuda_version() {
#ifdef WITH_CUDA
  return CUDART_VERSION;
#else
  return -1;
#endif
}

TORCH_LIBRARY(fastattr, m) {
  // Per-record <sum_t g_t x_t^T, target> + <sum_t g_t, target_bias>.
  // x: [N, d_in] or [N, T, d_in], g: [N, d_out] or [N, T, d_out], target: [d_out, d_in], target_bias: [d_out].
  // -> [N], float64 for float64 inputs, else float32.
  m.def("grad_dot(Tensor x, Tensor g, Tensor target, Tensor? target_bias) -> Tensor");
  // Pairwise per-sample-gradient similarity summed over layers l:
  //   S[n, m] = sum_l sum_{t,s} (xa[l][n,t] . xb[l][m,s]) * (ga[l][n,t] . gb[l][m,s]),
  // then reduced over m: "none" -> [N, M]; "sum" | "mean" | "max" | "min" | "count_gt" (S > threshold) -> [N].
  m.def("grad_sim_reduce(Tensor[] xa, Tensor[] ga, Tensor[] xb, Tensor[] gb, str reduce, float threshold=0.) -> Tensor");
  // Squared per-sample gradient norm summed over layers: sum_l sum_{t,s} (x[l][n,t].x[l][n,s]) (g[l][n,t].g[l][n,s]).
  m.def("grad_norm(Tensor[] x, Tensor[] g) -> Tensor");
  m.def("cuda_version() -> int");
}

TORCH_LIBRARY_IMPL(fastattr, CompositeExplicitAutograd, m) { m.impl("cuda_version", &cuda_version); }

// Scoring ops are forward-only (they read detached activations and output gradients): fastattr/ops.py registers
// an autograd formula whose backward is a clear error, so a graph through them never silently drops a gradient.

}  // namespace fastattr

// An importable, empty module: `from fastattr import _C` loads the .so, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
