// A small host emulator of the CUDA execution model: just enough to run fastattr's kernel headers
// (csrc/cuda/*_kernels.cuh, tile_mma.cuh) on CPU threads, so their indexing, masking, synchronisation and reduction
// logic can be tested on a machine without a GPU.
//
//   * one std::thread per CUDA thread; the blocks of a launch run one after another, so a function-local `static`
//     stands in for __shared__ (one block's shared memory at a time);
//   * __syncthreads / __syncwarp are std::barrier waits; __shfl_xor_sync goes through a per-warp exchange slot;
//   * nvcuda::wmma is functional, not bit-exact: every lane holds the whole 16x16 tile and does the whole product
//     (fp32 accumulation), and store_matrix_sync writes from lane 0 only, so a missing barrier after a store shows
//     up as stale reads. Element-wise fragment code (num_elements, x[e]) stays valid because all fragments of one
//     shape share one layout, as on the GPU.
//
// It does not model timing, memory coalescing, bank conflicts, occupancy, or the fragment layout of real hardware;
// tests/test_cuda_ops.py on a GPU remains the authority.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <array>
#include <barrier>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

// ---- CUDA keywords (cuda_fp16.h's host_defines gave them attribute meanings; plain C++ here) ----
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

struct BlockState {
  std::unique_ptr<std::barrier<>> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<std::array<std::array<unsigned char, 8>, 32>> slots;  // [warp][lane] shuffle exchange
  std::vector<unsigned char> dynamic_smem;
};

inline thread_local Dim3 tl_thread, tl_block;
inline Dim3 g_grid, g_block;
inline BlockState* g_state = nullptr;

inline unsigned char* dynamic_smem() { return g_state->dynamic_smem.data(); }

// Runs kernel() for every thread of every block of a 1-D block shape.
template <class F>
void launch(Dim3 grid, unsigned threads, size_t dynamic_smem_bytes, F&& kernel) {
  if (threads % 32 != 0) std::abort();  // fastattr kernels use whole warps
  g_grid = grid;
  g_block = Dim3{threads, 1, 1};
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      BlockState st;
      st.block_barrier = std::make_unique<std::barrier<>>(threads);
      for (unsigned w = 0; w < threads / 32; ++w) st.warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
      st.slots.resize(threads / 32);
      st.dynamic_smem.assign(dynamic_smem_bytes + 16, 0xAB);  // garbage, like real shared memory
      g_state = &st;
      std::vector<std::thread> pool;
      pool.reserve(threads);
      for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          tl_thread = Dim3{t, 0, 0};
          tl_block = Dim3{bx, by, 0};
          kernel();
        });
      }
      for (auto& th : pool) th.join();  // (a thread left with uncommitted or unwaited cp.async copies loses them)
      g_state = nullptr;
    }
  }
}

}  // namespace emu

#define threadIdx (::emu::tl_thread)
#define blockIdx (::emu::tl_block)
#define blockDim (::emu::g_block)
#define gridDim (::emu::g_grid)
#define FA_DYNAMIC_SMEM(name) unsigned char* name = ::emu::dynamic_smem()

inline void __syncthreads() { emu::g_state->block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::g_state->warp_barriers[emu::tl_thread.x / 32]->arrive_and_wait(); }
[[noreturn]] inline void __trap() { std::abort(); }

// cp.async: copies are queued per thread and performed only when a wait retires their group (as late as the
// hardware may), so a read of a stage before its wait sees stale data and fails the test.
namespace emu {
struct PendingCopy {
  void* dst;
  const void* src;
  int bytes;
};
inline thread_local std::vector<PendingCopy> tl_open_group;
inline thread_local std::vector<std::vector<PendingCopy>> tl_groups;
}  // namespace emu

inline void fa_cp_async16(void* smem_dst, const void* gmem_src, int src_bytes) {
  if (src_bytes < 0 || src_bytes > 16) std::abort();
  emu::tl_open_group.push_back({smem_dst, gmem_src, src_bytes});
}
inline void fa_cp_async_commit() {
  emu::tl_groups.push_back(std::move(emu::tl_open_group));
  emu::tl_open_group.clear();
}
template <int N>
void fa_cp_async_wait() {
  while (emu::tl_groups.size() > static_cast<size_t>(N)) {
    for (const auto& c : emu::tl_groups.front()) {
      std::memcpy(c.dst, c.src, c.bytes);
      std::memset(static_cast<char*>(c.dst) + c.bytes, 0, 16 - c.bytes);
    }
    emu::tl_groups.erase(emu::tl_groups.begin());
  }
}

template <class T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  const unsigned warp = emu::tl_thread.x / 32, lane = emu::tl_thread.x % 32;
  auto& slots = emu::g_state->slots[warp];
  std::memcpy(slots[lane].data(), &v, sizeof(T));
  __syncwarp();
  T r;
  std::memcpy(&r, slots[lane ^ static_cast<unsigned>(lane_mask)].data(), sizeof(T));
  __syncwarp();
  return r;
}

// ---- functional nvcuda::wmma ----
namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
namespace precision {
struct tf32 {};
}
enum layout_t { mem_row_major, mem_col_major };

// Round to TF32 (10 mantissa bits), to nearest with ties away from zero, like cvt.rna.tf32.f32.
inline float __float_to_tf32(float in) {
  uint32_t u;
  std::memcpy(&u, &in, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
  float out;
  std::memcpy(&out, &u, 4);
  return out;
}

template <class T>
struct storage {
  using type = T;
};
template <>
struct storage<precision::tf32> {
  using type = float;
};

inline float to_f(float v) { return v; }
inline float to_f(__half v) { return __half2float(v); }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  typename storage<T>::type x[num_elements];
};

template <class Use, int M, int N, int K, class T, class Layout, class P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* ptr, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] = std::is_same_v<Layout, col_major> ? ptr[c * ldm + r] : ptr[r * ldm + c];
}

template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* ptr, unsigned ldm, layout_t layout) {
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.x[r * N + c] = layout == mem_row_major ? ptr[r * ldm + c] : ptr[c * ldm + r];
}

template <int M, int N, int K, class T>
void fill_fragment(fragment<accumulator, M, N, K, T>& f, float v) {
  for (auto& e : f.x) e = v;
}

template <int M, int N, int K, class TA, class LA, class TB, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];
      for (int k = 0; k < K; ++k) s += to_f(a.x[i * K + k]) * to_f(b.x[k * N + j]);
      out[i * N + j] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}

template <int M, int N, int K>
void store_matrix_sync(float* ptr, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  if (emu::tl_thread.x % 32 != 0) return;  // lane 0 writes; readers must sync first, as on the GPU
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) {
      if (layout == mem_row_major) {
        ptr[r * ldm + c] = f.x[r * N + c];
      } else {
        ptr[c * ldm + r] = f.x[r * N + c];
      }
    }
}
}  // namespace wmma
}  // namespace nvcuda
