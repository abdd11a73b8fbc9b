// Host-side helpers shared by the .cu files: device queries, the tensor-core policy, grid sizes.
// Torch-dependent (unlike the kernel headers), so the host emulator never includes it.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>
#include <unordered_map>
#include <utility>

#include "common.cuh"

namespace fastattr {
namespace cuda {

struct DeviceInfo {
  int sms = 1;
  int major = 0;
  int code_arch = 0;  // the virtual arch (__CUDA_ARCH__ / 10) of the code this build runs on the device
};

// Empty kernel whose attributes tell which code the driver picked for the device: a build whose newest arch is below
// sm_80 runs (PTX-JIT) code without the tensor-core bodies even on an sm_80+ GPU.
template <int = 0>
__global__ void arch_probe_kernel() {}

// Queried once per device and cached, so calls inside a CUDA-graph capture make no CUDA API call.
inline DeviceInfo device_info(int device) {
  static std::mutex mutex;
  static std::unordered_map<int, DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  DeviceInfo info;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, device));
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, arch_probe_kernel<>));
  info.code_arch = attr.ptxVersion;
  cache.emplace(device, info);
  return info;
}

inline bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, "1") == 0;
}

// Tensor cores (wmma) for fp16/bf16 always, and for fp32 only when torch allows TF32 matmuls, on sm_80+ with code
// built for sm_80+ (else the wmma bodies are stubs). FASTATTR_CUDA_SIMT=1 forces the CUDA-core engine (tests and
// benchmarks use it to cover that path).
inline bool use_tensor_cores(at::ScalarType dtype, const DeviceInfo& info) {
  if (info.major < 8 || info.code_arch < 80 || env_flag("FASTATTR_CUDA_SIMT")) return false;
  if (dtype == at::kHalf || dtype == at::kBFloat16) return true;
  return dtype == at::kFloat && at::globalContext().allowTF32CuBLAS();
}

// Grid for a grid-stride kernel: enough blocks to cover `work`, at most `per_sm` per multiprocessor.
inline unsigned int grid_for(int64_t work, int items_per_block, const DeviceInfo& info, int per_sm = 8) {
  int64_t blocks = ceil_div(work, items_per_block);
  const int64_t cap = static_cast<int64_t>(info.sms) * per_sm;
  if (blocks > cap) blocks = cap;
  return static_cast<unsigned int>(blocks < 1 ? 1 : blocks);
}

// Lets `kernel` take more than the default 48 KB of dynamic shared memory (set once per kernel and device).
template <typename Kernel>
void ensure_dynamic_smem(Kernel* kernel, size_t bytes, int device) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mutex;
  static std::set<std::pair<const void*, int>> done;
  std::lock_guard<std::mutex> lock(mutex);
  const std::pair<const void*, int> key{reinterpret_cast<const void*>(kernel), device};
  if (done.count(key)) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  done.insert(key);
}

template <typename T>
const T* typed_ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const T*>(t.const_data_ptr()) : nullptr;
}

}  // namespace cuda
}  // namespace fastattr
