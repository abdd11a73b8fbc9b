// Block-tile engines: C[BM x BN] += A[BM x K] . B[BN x K]^T for one thread block, where A and B are rows of two
// row-major matrices with K contiguous (x_i . x_j Gram tiles, or x . target^T). Both engines expose the same
// interface, so each kernel is written once:
//
//   Tile::Acc                      per-thread accumulator (registers)
//   Tile::Smem                     shared memory: operand slabs, unioned with `c`, the [BM][kLdc] result stash
//   Tile::zero(acc)                acc = 0
//   Tile::mma(acc, a, b, K, sm)    acc += A B^T; reads K in BK-wide slabs through sm; ends with __syncthreads
//   Tile::hadamard_add(acc, p, q)  acc += p * q elementwise (p, q, acc computed by the same threads)
//   Tile::store(acc, sm)           sm.c[r][c] = acc; the caller syncs before reading sm.c
//
// Precision policy (DESIGN.md section 10.6):
//   SimtTile  CUDA cores; operands converted to acc_t (float, or double for double inputs) when staged, products
//             and sums in acc_t. Used for float64, for float32 unless TF32 is allowed, and on GPUs older than sm_80.
//   WmmaTile  tensor cores (wmma 16x16 fragments), fp32 accumulation. fp16/bf16 operands are exact inputs (their
//             products are exact in fp32, so this loses nothing against the SIMT path); float32 operands are rounded
//             to TF32 (10-bit mantissa) when staged, used only when torch allows TF32 matmuls
//             (torch.backends.cuda.matmul.allow_tf32 / torch.set_float32_matmul_precision("high")).
#pragma once
#include "common.cuh"

namespace fastattr {
namespace cuda {

// ---------------------------------------------------------------------------------------------------------------
// CUDA-core engine. 256 threads as a 16 x 16 grid; thread (ty, tx) owns rows ty + 16 i and columns tx + 16 j
// (strided, so shared-memory reads are broadcasts or consecutive words: no bank conflicts).
template <typename scalar_t, typename acc_t, int BM_, int BN_, int BK_>
struct SimtTile {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, kThreads = 256;
  static constexpr int TM = BM / 16, TN = BN / 16, kLdc = BN + 1;
  static_assert(BM % 16 == 0 && BN % 16 == 0, "tile must be a multiple of the 16 x 16 thread grid");
  using in_t = scalar_t;
  using stash_t = acc_t;

  struct Acc {
    acc_t v[TM][TN];
  };
  union Smem {
    struct {
      acc_t a[BK][BM + 1];  // k-major, so thread rows read consecutive words
      acc_t b[BK][BN + 1];
    } op;
    acc_t c[BM][kLdc];
  };

  __device__ __forceinline__ static void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc.v[i][j] = acc_t(0);
  }

  // dst[k][r] = src(r, k0 + k), zero outside the matrix.
  template <int ROWS>
  __device__ __forceinline__ static void load_slab(acc_t (*dst)[ROWS + 1], const Operand<scalar_t>& src, int64_t k0,
                                                   int64_t K) {
    for (int e = threadIdx.x; e < ROWS * BK; e += kThreads) {
      const int r = e / BK, k = e % BK;
      acc_t v = acc_t(0);
      if (r < src.rows && k0 + k < K) v = to_acc<acc_t>(src.ptr[r * src.ld + k0 + k]);
      dst[k][r] = v;
    }
  }

  __device__ static void mma(Acc& acc, const Operand<scalar_t>& a, const Operand<scalar_t>& b, int64_t K, Smem& sm) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    for (int64_t k0 = 0; k0 < K; k0 += BK) {
      load_slab<BM>(sm.op.a, a, k0, K);
      load_slab<BN>(sm.op.b, b, k0, K);
      __syncthreads();
#pragma unroll
      for (int k = 0; k < BK; ++k) {
        acc_t ra[TM], rb[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) ra[i] = sm.op.a[k][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < TN; ++j) rb[j] = sm.op.b[k][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) acc.v[i][j] += ra[i] * rb[j];
      }
      __syncthreads();
    }
  }

  __device__ __forceinline__ static void hadamard_add(Acc& acc, const Acc& p, const Acc& q) {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc.v[i][j] += p.v[i][j] * q.v[i][j];
  }

  __device__ __forceinline__ static void store(const Acc& acc, Smem& sm) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) sm.c[ty + 16 * i][tx + 16 * j] = acc.v[i][j];
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Tensor-core engine. 8 warps as 4 (rows) x 2 (columns); each warp owns a 32 x 32 block = 2 x 2 accumulator
// fragments of 16 x 16. Operands are staged row-major with K contiguous: A as matrix_a row_major, and the B rows as
// matrix_b col_major (element (k, n) of B^T sits at b[n][k]).

struct Tf32Tag {};  // float32 operands rounded to TF32

// Element type the kernel reads from global memory (defined for every target, unlike the wmma types).
template <typename frag_t>
struct WmmaInput {
  using type = frag_t;
};
template <>
struct WmmaInput<Tf32Tag> {
  using type = float;
};

template <typename frag_t>
struct WmmaTraits;

#if FA_HAS_TENSOR_CORES
template <>
struct WmmaTraits<__half> {
  using in_t = __half;
  using smem_t = __half;
  using wmma_t = __half;
  static constexpr int kK = 16, kPad = 8;  // rows of 40 halves = 80 B: 16 B aligned, conflict-free fragment loads
  __device__ __forceinline__ static smem_t zero() { return __float2half(0.f); }
  __device__ __forceinline__ static smem_t convert(in_t v) { return v; }
};
template <>
struct WmmaTraits<__nv_bfloat16> {
  using in_t = __nv_bfloat16;
  using smem_t = __nv_bfloat16;
  using wmma_t = __nv_bfloat16;
  static constexpr int kK = 16, kPad = 8;
  __device__ __forceinline__ static smem_t zero() { return __float2bfloat16(0.f); }
  __device__ __forceinline__ static smem_t convert(in_t v) { return v; }
};
template <>
struct WmmaTraits<Tf32Tag> {
  using in_t = float;
  using smem_t = float;
  using wmma_t = nvcuda::wmma::precision::tf32;
  static constexpr int kK = 8, kPad = 4;  // rows of 36 floats = 144 B
  __device__ __forceinline__ static smem_t zero() { return 0.f; }
  __device__ __forceinline__ static smem_t convert(in_t v) { return nvcuda::wmma::__float_to_tf32(v); }
};
#endif

template <typename frag_t>
struct WmmaTile {
  static constexpr int BM = 128, BN = 64, BK = 32, kThreads = 256, kLdc = BN + 4;
  using acc_t = float;
  using stash_t = float;
  using in_t = typename WmmaInput<frag_t>::type;

#if FA_HAS_TENSOR_CORES
  using Traits = WmmaTraits<frag_t>;
  using smem_t = typename Traits::smem_t;
  static constexpr int kK = Traits::kK, kLds = BK + Traits::kPad;
  using AccFrag = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, kK, float>;
  using AFrag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, kK, typename Traits::wmma_t,
                                       nvcuda::wmma::row_major>;
  using BFrag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, kK, typename Traits::wmma_t,
                                       nvcuda::wmma::col_major>;

  struct Acc {
    AccFrag f[2][2];
  };
  union Smem {
    struct {
      smem_t a[BM][kLds];
      smem_t b[BN][kLds];
    } op;
    float c[BM][kLdc];  // rows of 272 B: every 16 x 16 fragment origin is 32 B aligned
  };

  __device__ __forceinline__ static void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc.f[i][j], 0.f);
  }

  template <int ROWS>
  __device__ __forceinline__ static void load_slab(smem_t (*dst)[kLds], const Operand<in_t>& src, int64_t k0,
                                                   int64_t K) {
    for (int e = threadIdx.x; e < ROWS * BK; e += kThreads) {
      const int r = e / BK, k = e % BK;
      smem_t v = Traits::zero();
      if (r < src.rows && k0 + k < K) v = Traits::convert(src.ptr[r * src.ld + k0 + k]);
      dst[r][k] = v;
    }
  }

  __device__ static void mma(Acc& acc, const Operand<in_t>& a, const Operand<in_t>& b, int64_t K, Smem& sm) {
    const int warp = threadIdx.x / kWarp, wm = warp / 2, wn = warp % 2;
    for (int64_t k0 = 0; k0 < K; k0 += BK) {
      load_slab<BM>(sm.op.a, a, k0, K);
      load_slab<BN>(sm.op.b, b, k0, K);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; kk += kK) {
        AFrag fa[2];
        BFrag fb[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) nvcuda::wmma::load_matrix_sync(fa[i], &sm.op.a[wm * 32 + 16 * i][kk], kLds);
#pragma unroll
        for (int j = 0; j < 2; ++j) nvcuda::wmma::load_matrix_sync(fb[j], &sm.op.b[wn * 32 + 16 * j][kk], kLds);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) nvcuda::wmma::mma_sync(acc.f[i][j], fa[i], fb[j], acc.f[i][j]);
      }
      __syncthreads();
    }
  }

  // p, q and acc are accumulator fragments of the same shape, so element e means the same (row, column) in all three.
  __device__ __forceinline__ static void hadamard_add(Acc& acc, const Acc& p, const Acc& q) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < acc.f[i][j].num_elements; ++e) acc.f[i][j].x[e] += p.f[i][j].x[e] * q.f[i][j].x[e];
  }

  __device__ __forceinline__ static void store(const Acc& acc, Smem& sm) {
    const int warp = threadIdx.x / kWarp, wm = warp / 2, wn = warp % 2;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(&sm.c[wm * 32 + 16 * i][wn * 32 + 16 * j], acc.f[i][j], kLdc,
                                        nvcuda::wmma::mem_row_major);
  }
#else
  // Pre-sm_80 device pass: same interface, never launched (the host checks the compute capability first).
  struct Acc {};
  union Smem {
    float c[1][kLdc];
  };
  __device__ static void zero(Acc&) {}
  __device__ static void mma(Acc&, const Operand<in_t>&, const Operand<in_t>&, int64_t, Smem&) { __trap(); }
  __device__ static void hadamard_add(Acc&, const Acc&, const Acc&) {}
  __device__ static void store(const Acc&, Smem&) {}
#endif
};

}  // namespace cuda
}  // namespace fastattr
