// grad_dot kernels: out[n] = sum_t g[n,t] . (target x[n,t] + target_bias), fused so that the [N*T, d_out] product
// y = x target^T never reaches global memory.
//
// Two shapes of work:
//   rowwise  min(d_in, d_out) <= 32 and target fits in shared memory (the first and last layers of an MLP actor:
//            8->256, 256->4). One warp per record; target staged once per block in shared memory; the short side of
//            the row (<= 32 values) staged per warp, lanes stride over the long side. No tile padding is wasted.
//   tiled    everything else. One block per BM rows of x (rows = (record, position) pairs); the block walks the
//            d_out columns in BN-wide tiles in a fixed order: Tile::mma forms y = x target^T for the tile, and the
//            epilogue folds g . (y + b) into per-row partials kept in registers. With T > 1 the per-row results go to
//            an [N*T] buffer and sum_positions_kernel adds the positions of each record in order.
// Every result is computed by one warp/thread in a fixed order: no atomics, bitwise reproducible.
#pragma once
#include "common.cuh"
#include "tile_mma.cuh"

namespace fastattr {
namespace cuda {

template <typename in_t, typename acc_t>
struct GradDotParams {
  const in_t* x;       // [N*T, d_in]
  const in_t* g;       // [N*T, d_out]
  const in_t* target;  // [d_out, d_in]
  const in_t* bias;    // [d_out] or nullptr
  acc_t* out;          // [N] (rowwise; tiled with T == 1) or [N*T] (tiled with T > 1)
  int64_t n, t, d_in, d_out;
};

// ---- rowwise ----
constexpr int kRowwiseThreads = 256;
constexpr int kShortMax = 32;  // the short side of a row lives in one warp's 32-slot buffer

// Shared memory of the rowwise kernel: target as [d_out][d_in | 1] (odd row stride: conflict-free whichever side the
// lanes stride), the bias, and one 32-slot buffer per warp.
inline int64_t rowwise_smem_bytes(int64_t d_in, int64_t d_out, int64_t acc_bytes) {
  return (d_out * (d_in | 1) + d_out + (kRowwiseThreads / kWarp) * kShortMax) * acc_bytes;
}

// Lanes stride over d_in (staging g) when d_out is the short side, else over d_out (staging x).
inline bool rowwise_lanes_over_in(int64_t d_in, int64_t d_out) {
  return d_out <= kShortMax && (d_in > kShortMax || d_in >= d_out);
}

template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kRowwiseThreads)
    grad_dot_rowwise_kernel(GradDotParams<in_t, acc_t> p, bool lanes_over_in) {
  FA_DYNAMIC_SMEM(smem_raw);
  const int d_in = static_cast<int>(p.d_in), d_out = static_cast<int>(p.d_out), ldw = d_in | 1;
  acc_t* w = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* bias = w + d_out * ldw;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  acc_t* shortv = bias + d_out + warp * kShortMax;

  for (int e = threadIdx.x; e < d_out * d_in; e += blockDim.x) w[(e / d_in) * ldw + e % d_in] = to_acc<acc_t>(p.target[e]);
  for (int o = threadIdx.x; o < d_out; o += blockDim.x) bias[o] = p.bias ? to_acc<acc_t>(p.bias[o]) : acc_t(0);
  __syncthreads();

  for (int64_t n = int64_t(blockIdx.x) * warps + warp; n < p.n; n += int64_t(gridDim.x) * warps) {
    acc_t acc = acc_t(0);
    for (int64_t t = 0; t < p.t; ++t) {
      const int64_t row = n * p.t + t;
      const in_t* x = p.x + row * p.d_in;
      const in_t* g = p.g + row * p.d_out;
      __syncwarp();  // the previous row's readers of shortv are done
      if (lanes_over_in) {  // acc += sum_i x_i sum_o g_o W[o,i]  +  sum_o g_o b_o
        if (lane < d_out) shortv[lane] = to_acc<acc_t>(g[lane]);
        __syncwarp();
        for (int i = lane; i < d_in; i += kWarp) {
          acc_t v = acc_t(0);
          for (int o = 0; o < d_out; ++o) v += shortv[o] * w[o * ldw + i];
          acc += to_acc<acc_t>(x[i]) * v;
        }
        if (lane < d_out) acc += shortv[lane] * bias[lane];
      } else {  // acc += sum_o g_o (b_o + sum_i W[o,i] x_i)
        if (lane < d_in) shortv[lane] = to_acc<acc_t>(x[lane]);
        __syncwarp();
        for (int o = lane; o < d_out; o += kWarp) {
          acc_t v = bias[o];
          for (int i = 0; i < d_in; ++i) v += w[o * ldw + i] * shortv[i];
          acc += to_acc<acc_t>(g[o]) * v;
        }
      }
    }
    acc = warp_sum(acc);
    if (lane == 0) p.out[n] = acc;
  }
}

// ---- tiled ----
template <class Tile, typename acc_t>
__global__ void __launch_bounds__(Tile::kThreads)
    grad_dot_tiled_kernel(GradDotParams<typename Tile::in_t, acc_t> p) {
  using in_t = typename Tile::in_t;
  FA_DYNAMIC_SMEM(smem_raw);  // sizeof(Tile::Smem) bytes
  auto& sm = *reinterpret_cast<typename Tile::Smem*>(smem_raw);
  constexpr int kWarps = Tile::kThreads / kWarp, kRowsPerWarp = Tile::BM / kWarps;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t rows = p.n * p.t, r0 = int64_t(blockIdx.x) * Tile::BM;
  const Operand<in_t> a{p.x + r0 * p.d_in, p.d_in, rows - r0};

  acc_t part[kRowsPerWarp];  // lane-local partial dot of block row warp + kWarps * j, over this lane's columns
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) part[j] = acc_t(0);

  for (int64_t c0 = 0; c0 < p.d_out; c0 += Tile::BN) {
    const Operand<in_t> b{p.target + c0 * p.d_in, p.d_in, p.d_out - c0};
    typename Tile::Acc y;
    Tile::zero(y);
    Tile::mma(y, a, b, p.d_in, sm);
    Tile::store(y, sm);
    __syncthreads();
    const int cols = static_cast<int>(p.d_out - c0 < Tile::BN ? p.d_out - c0 : Tile::BN);
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
      const int r = warp + kWarps * j;
      if (r0 + r < rows) {
        const in_t* g = p.g + (r0 + r) * p.d_out + c0;
        for (int c = lane; c < cols; c += kWarp) {
          acc_t v = static_cast<acc_t>(sm.c[r][c]);
          if (p.bias) v += to_acc<acc_t>(p.bias[c0 + c]);
          part[j] += to_acc<acc_t>(g[c]) * v;
        }
      }
    }
    __syncthreads();  // all warps read the stash before the next tile overwrites it (mma has no barrier if K = 0)
  }
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int r = warp + kWarps * j;
    const acc_t v = warp_sum(part[j]);
    if (lane == 0 && r0 + r < rows) p.out[r0 + r] = v;
  }
}

// out[n] = sum_t rows[n * t + k], positions added in order.
template <typename acc_t>
__global__ void sum_positions_kernel(const acc_t* rows, int64_t n, int64_t t, acc_t* out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    acc_t s = acc_t(0);
    for (int64_t k = 0; k < t; ++k) s += rows[i * t + k];
    out[i] = s;
  }
}

}  // namespace cuda
}  // namespace fastattr
