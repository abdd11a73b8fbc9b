// Shared pieces of the fastattr CUDA kernels: operand views, deterministic warp reductions, the reduction over M,
// and the launch plans. The kernel headers (*.cuh) include no torch header, so tests/cuda_emu can compile them as
// host C++ and run them on CPU threads; the .cu files add the torch glue (checks, dtype dispatch, stream, guard).
#pragma once
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
// Dynamic shared memory, declared through a macro so the host emulator can supply its own buffer.
#define FA_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]

// cp.async (sm_80+): a 16-byte global -> shared copy that bypasses registers; bytes past src_bytes are zero-filled.
// Copies land after a commit + wait; the host emulator defines the same three functions with deferred copies.
__device__ __forceinline__ void fa_cp_async16(void* smem_dst, const void* gmem_src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes));
#endif
}
__device__ __forceinline__ void fa_cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void fa_cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}
#endif

// Tensor-core (wmma) kernels need sm_80+ for bf16/TF32; on older targets their bodies compile to nothing and the
// host code never launches them (see use_tensor_cores in host_utils.cuh).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define FA_HAS_TENSOR_CORES 1
#else
#define FA_HAS_TENSOR_CORES 0
#endif

namespace fastattr {
namespace cuda {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxLayers = 16;  // layers per grad_sim_reduce / grad_norm call (descriptors travel as kernel params)

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Arithmetic view of a stored element: __half / __nv_bfloat16 go through the intrinsics (torch builds with
// __CUDA_NO_HALF_CONVERSIONS__), everything else (float, double, c10::Half, c10::BFloat16) converts by itself.
template <typename T>
__host__ __device__ __forceinline__ T as_arith(T v) { return v; }
__host__ __device__ __forceinline__ float as_arith(__half v) { return __half2float(v); }
__host__ __device__ __forceinline__ float as_arith(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename acc_t, typename T>
__host__ __device__ __forceinline__ acc_t to_acc(T v) { return static_cast<acc_t>(as_arith(v)); }

// Rows of a row-major matrix: element (r, k) = ptr[r * ld + k]; rows at or past `rows` read as zero.
template <typename T>
struct Operand {
  const T* ptr;
  int64_t ld;
  int64_t rows;
};

// ---- reductions over M (codes match fastattr::Reduce in checks.h) ----
enum ReduceOp : int { kNone = 0, kSum = 1, kMean = 2, kMax = 3, kMin = 4, kCountGt = 5 };

template <typename acc_t>
__host__ __device__ inline acc_t reduce_init(int op) {
  if (op == kMax) return -std::numeric_limits<acc_t>::infinity();
  if (op == kMin) return std::numeric_limits<acc_t>::infinity();
  return acc_t(0);
}

// max/min propagate NaN like torch.amax/amin.
template <typename acc_t>
__host__ __device__ inline acc_t nan_max(acc_t a, acc_t b) { return (b > a || b != b) ? b : a; }
template <typename acc_t>
__host__ __device__ inline acc_t nan_min(acc_t a, acc_t b) { return (b < a || b != b) ? b : a; }

// Folds one similarity value v into a running state.
template <typename acc_t>
__host__ __device__ inline acc_t reduce_fold(int op, acc_t state, acc_t v, double threshold) {
  switch (op) {
    case kMax: return nan_max(state, v);
    case kMin: return nan_min(state, v);
    case kCountGt: return state + (v > static_cast<acc_t>(threshold) ? acc_t(1) : acc_t(0));  // in acc_t, as torch
    default: return state + v;
  }
}

// Merges two states (partial results over disjoint sets of targets).
template <typename acc_t>
__host__ __device__ inline acc_t reduce_combine(int op, acc_t a, acc_t b) {
  if (op == kMax) return nan_max(a, b);
  if (op == kMin) return nan_min(a, b);
  return a + b;
}

// Warp-wide sum with a fixed butterfly: the result is the same in every lane and identical from run to run.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int m = kWarp / 2; m > 0; m /= 2) v += __shfl_xor_sync(kFullMask, v, m);
  return v;
}

// Warp-wide merge of reduction states (sum, max or min), fixed butterfly; lane 0's result is deterministic.
template <typename T>
__device__ __forceinline__ T warp_combine(int op, T v) {
#pragma unroll
  for (int m = kWarp / 2; m > 0; m /= 2) v = reduce_combine(op, v, __shfl_xor_sync(kFullMask, v, m));
  return v;
}

// ---- launch plans (host side, shared with the emulator tests) ----

// grad_sim_reduce: blockIdx.x owns BM records, blockIdx.y owns a contiguous range of `tiles_per_split` BN-wide target
// tiles, walked in order. With more than one split, each block writes a partial reduction and a second kernel merges
// the splits in order. The plan depends on the shape only (not on the GPU), so results are bitwise identical on
// every device for a given build.
struct SimPlan {
  int64_t row_blocks, m_tiles, splits, tiles_per_split;
};

inline SimPlan plan_sim(int64_t n, int64_t m, int64_t bm, int64_t bn) {
  constexpr int64_t kTargetBlocks = 1024;  // a few waves on any current GPU (H100: 132 SMs)
  SimPlan p{};
  p.row_blocks = ceil_div(n, bm);
  p.m_tiles = ceil_div(m, bn);
  if (p.m_tiles == 0) return p;  // M = 0 is answered on the host without a launch
  int64_t splits = ceil_div(kTargetBlocks, p.row_blocks);
  splits = splits < 1 ? 1 : (splits > p.m_tiles ? p.m_tiles : splits);
  if (splits > 65535) splits = 65535;  // gridDim.y limit
  p.tiles_per_split = ceil_div(p.m_tiles, splits);
  p.splits = ceil_div(p.m_tiles, p.tiles_per_split);  // no empty split
  return p;
}

}  // namespace cuda
}  // namespace fastattr
