// grad_sim_reduce and grad_norm kernels.
//
// grad_sim_kernel: S[n, m] = sum_l sum_{t,s} (xa[l][n,t] . xb[l][m,s]) (ga[l][n,t] . gb[l][m,s]), reduced over m.
//   Grid (row blocks, splits): block (bx, by) owns records [bx*BM, bx*BM + BM) and the target tiles
//   [by*tiles_per_split, ...) of width BN, walked in order. Per target tile, for every layer and position pair, two
//   Gram tiles Kx = Xa Xb^T and Kg = Ga Gb^T come out of Tile::mma and their Hadamard product is added to the
//   similarity tile, which lives in the shared-memory stash. The finished tile goes to the epilogue: written
//   out for reduce="none", else folded into lane-local running states (lanes own fixed columns), so the N x M
//   matrix never reaches global memory. After the last tile each row's lane states are merged by a fixed butterfly;
//   with several splits, combine_splits_kernel then merges the per-split partials in split order.
// grad_norm_kernel: one warp per record, sum_l sum_{t,s} (x_t . x_s)(g_t . g_s) with warp reductions (T = 1 is
//   ||x||^2 ||g||^2).
// No atomics anywhere: the same inputs give bitwise identical results on every run.
#pragma once
#include "common.cuh"
#include "tile_mma.cuh"

namespace fastattr {
namespace cuda {

template <typename T>
struct SimLayer {
  const T* xa;  // [N*T, d_in]
  const T* ga;  // [N*T, d_out]
  const T* xb;  // [M*S, d_in]
  const T* gb;  // [M*S, d_out]
  int64_t t, s, d_in, d_out;
};

template <typename in_t, typename acc_t>
struct SimParams {
  SimLayer<in_t> layer[kMaxLayers];
  int num_layers;
  int reduce;  // ReduceOp
  double threshold;
  int64_t n, m, tiles_per_split;
  acc_t* out;        // [N, M] for kNone; else [N] when final, or the partials [splits, N]
  bool final_write;  // one split: write the finished [N] result (mean divided by M)
};

template <class Tile, typename acc_t>
__global__ void __launch_bounds__(Tile::kThreads) grad_sim_kernel(SimParams<typename Tile::in_t, acc_t> p) {
  using in_t = typename Tile::in_t;
  FA_DYNAMIC_SMEM(smem_raw);  // sizeof(Tile::Smem) bytes
  auto& sm = *reinterpret_cast<typename Tile::Smem*>(smem_raw);
  constexpr int kWarps = Tile::kThreads / kWarp, kRowsPerWarp = Tile::BM / kWarps;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t n0 = int64_t(blockIdx.x) * Tile::BM;
  const int64_t m_tiles = ceil_div(p.m, Tile::BN);
  const int64_t tile_begin = int64_t(blockIdx.y) * p.tiles_per_split;
  const int64_t tile_end = tile_begin + p.tiles_per_split < m_tiles ? tile_begin + p.tiles_per_split : m_tiles;

  acc_t state[kRowsPerWarp];  // running reduction of block row warp + kWarps * j over this lane's columns
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) state[j] = reduce_init<acc_t>(p.reduce);

  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t m0 = tile * Tile::BN;
    typename Tile::Acc kx, kg;
    Tile::stash_zero(sm);  // the similarity tile accumulates in the stash (the previous tile's readers are done)
    for (int l = 0; l < p.num_layers; ++l) {
      const in_t *xa = p.layer[l].xa, *ga = p.layer[l].ga, *xb = p.layer[l].xb, *gb = p.layer[l].gb;
      const int64_t T = p.layer[l].t, S = p.layer[l].s, d_in = p.layer[l].d_in, d_out = p.layer[l].d_out;
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t s = 0; s < S; ++s) {
          // Position t of records n0.. and position s of targets m0..: rows strided by T (resp. S) positions.
          Tile::zero(kx);
          Tile::mma(kx, Operand<in_t>{xa + (n0 * T + t) * d_in, T * d_in, p.n - n0},
                    Operand<in_t>{xb + (m0 * S + s) * d_in, S * d_in, p.m - m0}, d_in, sm);
          Tile::zero(kg);
          Tile::mma(kg, Operand<in_t>{ga + (n0 * T + t) * d_out, T * d_out, p.n - n0},
                    Operand<in_t>{gb + (m0 * S + s) * d_out, S * d_out, p.m - m0}, d_out, sm);
          Tile::stash_add_product(sm, kx, kg);
        }
      }
    }
    __syncthreads();  // the finished tile is visible to every warp
    const int cols = static_cast<int>(p.m - m0 < Tile::BN ? p.m - m0 : Tile::BN);
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
      const int r = warp + kWarps * j;
      if (n0 + r >= p.n) continue;
      if (p.reduce == kNone) {
        acc_t* dst = p.out + (n0 + r) * p.m + m0;
        for (int c = lane; c < cols; c += kWarp) dst[c] = static_cast<acc_t>(sm.c[r][c]);
      } else {
        for (int c = lane; c < cols; c += kWarp)
          state[j] = reduce_fold<acc_t>(p.reduce, state[j], static_cast<acc_t>(sm.c[r][c]), p.threshold);
      }
    }
    __syncthreads();  // all warps read the stash before the next tile overwrites it (mma has no barrier if K = 0)
  }

  if (p.reduce == kNone) return;
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int64_t n = n0 + warp + kWarps * j;
    acc_t v = warp_combine(p.reduce, state[j]);
    if (lane != 0 || n >= p.n) continue;
    if (p.final_write) {
      p.out[n] = p.reduce == kMean ? v / static_cast<acc_t>(p.m) : v;
    } else {
      p.out[int64_t(blockIdx.y) * p.n + n] = v;
    }
  }
}

// out[i] = merge over splits (in order) of partial[split, i]; mean divides by M.
template <typename acc_t>
__global__ void combine_splits_kernel(const acc_t* partial, int64_t splits, int64_t n, int64_t m, int reduce,
                                      acc_t* out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    acc_t v = partial[i];
    for (int64_t s = 1; s < splits; ++s) v = reduce_combine(reduce, v, partial[s * n + i]);
    out[i] = reduce == kMean ? v / static_cast<acc_t>(m) : v;
  }
}

// ---- grad_norm ----
template <typename T>
struct NormLayer {
  const T* x;  // [N*T, d_in]
  const T* g;  // [N*T, d_out]
  int64_t t, d_in, d_out;
};

template <typename in_t, typename acc_t>
struct NormParams {
  NormLayer<in_t> layer[kMaxLayers];
  int num_layers;
  int64_t n;
  acc_t* out;  // [N]
};

constexpr int kNormThreads = 256;

template <typename acc_t, typename in_t>
__device__ __forceinline__ acc_t warp_dot(const in_t* a, const in_t* b, int64_t d, int lane) {
  acc_t s = acc_t(0);
  for (int64_t i = lane; i < d; i += kWarp) s += to_acc<acc_t>(a[i]) * to_acc<acc_t>(b[i]);
  return warp_sum(s);
}

template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kNormThreads) grad_norm_kernel(NormParams<in_t, acc_t> p) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  for (int64_t n = int64_t(blockIdx.x) * warps + warp; n < p.n; n += int64_t(gridDim.x) * warps) {
    acc_t total = acc_t(0);
    for (int l = 0; l < p.num_layers; ++l) {
      const in_t *x = p.layer[l].x, *g = p.layer[l].g;
      const int64_t T = p.layer[l].t, d_in = p.layer[l].d_in, d_out = p.layer[l].d_out;
      for (int64_t t = 0; t < T; ++t) {
        const in_t *xt = x + (n * T + t) * d_in, *gt = g + (n * T + t) * d_out;
        for (int64_t s = t; s < T; ++s) {  // the Gram matrices are symmetric: off-diagonal pairs count twice
          const in_t *xs = x + (n * T + s) * d_in, *gs = g + (n * T + s) * d_out;
          const acc_t dx = warp_dot<acc_t>(xt, xs, d_in, lane), dg = warp_dot<acc_t>(gt, gs, d_out, lane);
          total += (s == t ? acc_t(1) : acc_t(2)) * dx * dg;
        }
      }
    }
    if (lane == 0) p.out[n] = total;
  }
}

}  // namespace cuda
}  // namespace fastattr
