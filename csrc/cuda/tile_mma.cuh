// Block-tile engines: C[BM x BN] += A[BM x K] . B[BN x K]^T for one thread block, where A and B are rows of two
// row-major matrices with K contiguous (x_i . x_j Gram tiles, or x . target^T). Both engines expose the same
// interface, so each kernel is written once:
//
//   Tile::Acc                          per-thread accumulator (registers)
//   Tile::Smem                         dynamic shared memory: operand slabs, and `c`, the [BM][kLdc] result stash
//   Tile::zero(acc)                    acc = 0
//   Tile::mma(acc, a, b, K, sm)        acc += A B^T; reads K in BK-wide slabs through sm; ends with __syncthreads
//   Tile::store(acc, sm)               sm.c = acc
//   Tile::stash_zero(sm)               sm.c = 0
//   Tile::stash_add_product(sm, p, q)  sm.c += p * q elementwise (the similarity tile lives in the stash, not in
//                                      registers, so only the two Gram tiles occupy registers)
// Each thread (SIMT) or warp (wmma) owns the same stash elements in all of these, so they need no block barrier
// among themselves; the caller syncs before other threads read sm.c.
//
// Precision policy:
//   SimtTile  CUDA cores; operands converted to acc_t (float, or double for double inputs) when staged, products
//             and sums in acc_t. Used for float64, for float32 unless TF32 is allowed, and on GPUs older than sm_80.
//   WmmaTile  tensor cores (wmma 16x16 fragments), fp32 accumulation. fp16/bf16 operands are exact inputs (their
//             products are exact in fp32, so this loses nothing against the SIMT path); float32 operands are rounded
//             to TF32 (10-bit mantissa, round to nearest) in the fragments, used only when torch allows TF32 matmuls
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
  struct Smem {
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

  __device__ __forceinline__ static void store(const Acc& acc, Smem& sm) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) sm.c[ty + 16 * i][tx + 16 * j] = acc.v[i][j];
  }

  __device__ __forceinline__ static void stash_zero(Smem& sm) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) sm.c[ty + 16 * i][tx + 16 * j] = acc_t(0);
  }

  __device__ __forceinline__ static void stash_add_product(Smem& sm, const Acc& p, const Acc& q) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) sm.c[ty + 16 * i][tx + 16 * j] += p.v[i][j] * q.v[i][j];
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Tensor-core engine. 8 warps as 4 (rows) x 2 (columns); each warp owns a 32 x 32 block = 2 x 2 accumulator
// fragments of 16 x 16. Operands are staged row-major with K contiguous: A as matrix_a row_major, and the B rows as
// matrix_b col_major (element (k, n) of B^T sits at b[n][k]). Slabs arrive by cp.async through a kStages-deep ring
// of shared-memory stages, so global loads overlap the tensor-core work.

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
  static constexpr bool kRound = false;
  __device__ __forceinline__ static smem_t zero() { return __float2half(0.f); }
};
template <>
struct WmmaTraits<__nv_bfloat16> {
  using in_t = __nv_bfloat16;
  using smem_t = __nv_bfloat16;
  using wmma_t = __nv_bfloat16;
  static constexpr int kK = 16, kPad = 8;
  static constexpr bool kRound = false;
  __device__ __forceinline__ static smem_t zero() { return __float2bfloat16(0.f); }
};
template <>
struct WmmaTraits<Tf32Tag> {
  using in_t = float;
  using smem_t = float;
  using wmma_t = nvcuda::wmma::precision::tf32;
  static constexpr int kK = 8, kPad = 4;  // rows of 36 floats = 144 B
  static constexpr bool kRound = true;    // staged as fp32, rounded to TF32 in the fragments
  __device__ __forceinline__ static smem_t zero() { return 0.f; }
};
#endif

template <typename frag_t, int STAGES = 3>
struct WmmaTile {
  static constexpr int BM = 128, BN = 64, BK = 32, kThreads = 256, kLdc = BN + 4, kStages = STAGES;
  using acc_t = float;
  using stash_t = float;
  using in_t = typename WmmaInput<frag_t>::type;

#if FA_HAS_TENSOR_CORES
  using Traits = WmmaTraits<frag_t>;
  using smem_t = typename Traits::smem_t;
  static constexpr int kK = Traits::kK, kLds = BK + Traits::kPad;
  static constexpr int kChunk = 16 / static_cast<int>(sizeof(smem_t)), kChunksPerRow = BK / kChunk;
  using AccFrag = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, kK, float>;
  using AFrag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, kK, typename Traits::wmma_t,
                                       nvcuda::wmma::row_major>;
  using BFrag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, kK, typename Traits::wmma_t,
                                       nvcuda::wmma::col_major>;

  struct Acc {
    AccFrag f[2][2];
  };
  struct Stage {  // one BK-wide slab of both operands; rows of 80 B (fp16/bf16) or 144 B (fp32): 16 B aligned
    smem_t a[BM][kLds];
    smem_t b[BN][kLds];
  };
  struct Smem {
    Stage stage[kStages];  // kStages-deep ring: slabs s+1 .. s+kStages-1 load while slab s is multiplied
    float c[BM][kLdc];     // rows of 272 B: every 16 x 16 fragment origin is 32 B aligned
  };

  __device__ __forceinline__ static void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc.f[i][j], 0.f);
  }

  // cp.async needs 16-byte aligned sources: the base pointer and every row start.
  __device__ __forceinline__ static bool async_ok(const Operand<in_t>& src) {
    return reinterpret_cast<uintptr_t>(src.ptr) % 16 == 0 && (src.ld * sizeof(in_t)) % 16 == 0;
  }

  // dst[r][k] = src(r, k0 + k), zero outside the matrix: 16-byte cp.async chunks (zero-filled past the edge) when
  // the rows are aligned, else element by element.
  template <int ROWS>
  __device__ __forceinline__ static void issue_slab(smem_t (*dst)[kLds], const Operand<in_t>& src, int64_t k0,
                                                    int64_t K, bool async) {
    if (async) {
      for (int e = threadIdx.x; e < ROWS * kChunksPerRow; e += kThreads) {
        const int r = e / kChunksPerRow, c = (e % kChunksPerRow) * kChunk;
        const int64_t k = k0 + c;
        const int valid = (r < src.rows && k < K) ? static_cast<int>(K - k < kChunk ? K - k : kChunk) : 0;
        fa_cp_async16(&dst[r][c], valid > 0 ? src.ptr + r * src.ld + k : src.ptr,
                      valid * static_cast<int>(sizeof(in_t)));
      }
    } else {
      for (int e = threadIdx.x; e < ROWS * BK; e += kThreads) {
        const int r = e / BK, k = e % BK;
        dst[r][k] = (r < src.rows && k0 + k < K) ? src.ptr[r * src.ld + k0 + k] : Traits::zero();
      }
    }
  }

  template <class Frag>
  __device__ __forceinline__ static void round_operand(Frag& f) {
    if constexpr (Traits::kRound) {
#pragma unroll
      for (int e = 0; e < f.num_elements; ++e) f.x[e] = nvcuda::wmma::__float_to_tf32(f.x[e]);
    }
  }

  // Multistage main loop: one __syncthreads per slab; the stage refilled at step s is the one multiplied at step
  // s - 1, which every warp has left once it passes step s's barrier.
  __device__ static void mma(Acc& acc, const Operand<in_t>& a, const Operand<in_t>& b, int64_t K, Smem& sm) {
    const int warp = threadIdx.x / kWarp, wm = warp / 2, wn = warp % 2;
    const bool a_async = async_ok(a), b_async = async_ok(b);
    const int64_t slabs = ceil_div(K, BK);
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < slabs) {
        issue_slab<BM>(sm.stage[s].a, a, s * BK, K, a_async);
        issue_slab<BN>(sm.stage[s].b, b, s * BK, K, b_async);
      }
      fa_cp_async_commit();  // one group per slab, empty or not, so the wait count below stays fixed
    }
    for (int64_t s = 0; s < slabs; ++s) {
      fa_cp_async_wait<kStages - 2>();  // this thread's copies of slab s have landed
      __syncthreads();                  // everyone's have, and everyone is done with slab s - 1
      const int64_t next = s + kStages - 1;
      if (next < slabs) {
        Stage& st = sm.stage[next % kStages];
        issue_slab<BM>(st.a, a, next * BK, K, a_async);
        issue_slab<BN>(st.b, b, next * BK, K, b_async);
      }
      fa_cp_async_commit();
      const Stage& cur = sm.stage[s % kStages];
#pragma unroll
      for (int kk = 0; kk < BK; kk += kK) {
        AFrag fa[2];
        BFrag fb[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          nvcuda::wmma::load_matrix_sync(fa[i], &cur.a[wm * 32 + 16 * i][kk], kLds);
          round_operand(fa[i]);
        }
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          nvcuda::wmma::load_matrix_sync(fb[j], &cur.b[wn * 32 + 16 * j][kk], kLds);
          round_operand(fb[j]);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) nvcuda::wmma::mma_sync(acc.f[i][j], fa[i], fb[j], acc.f[i][j]);
      }
    }
    fa_cp_async_wait<0>();  // only empty groups can remain
    __syncthreads();        // shared memory is the caller's again
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

  __device__ __forceinline__ static void stash_zero(Smem& sm) {
    const int warp = threadIdx.x / kWarp, wm = warp / 2, wn = warp % 2;
    AccFrag z;
    nvcuda::wmma::fill_fragment(z, 0.f);
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(&sm.c[wm * 32 + 16 * i][wn * 32 + 16 * j], z, kLdc,
                                        nvcuda::wmma::mem_row_major);
    __syncwarp();  // the warp's next stash_add_product loads what its lanes stored
  }

  // The warp's own 32 x 32 block of the stash, one fragment at a time: load, add p * q, store. p, q and the loaded
  // fragment have the same shape, so element e is the same (row, column) in all three.
  __device__ __forceinline__ static void stash_add_product(Smem& sm, const Acc& p, const Acc& q) {
    const int warp = threadIdx.x / kWarp, wm = warp / 2, wn = warp % 2;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        float* c = &sm.c[wm * 32 + 16 * i][wn * 32 + 16 * j];
        AccFrag s;
        nvcuda::wmma::load_matrix_sync(s, c, kLdc, nvcuda::wmma::mem_row_major);
#pragma unroll
        for (int e = 0; e < s.num_elements; ++e) s.x[e] += p.f[i][j].x[e] * q.f[i][j].x[e];
        nvcuda::wmma::store_matrix_sync(c, s, kLdc, nvcuda::wmma::mem_row_major);
      }
    __syncwarp();
  }
#else
  // Pre-sm_80 device pass: same interface, never launched (use_tensor_cores checks the device and the code's arch).
  struct Acc {};
  struct Smem {
    float c[1][kLdc];
  };
  __device__ static void zero(Acc&) {}
  __device__ static void mma(Acc&, const Operand<in_t>&, const Operand<in_t>&, int64_t, Smem&) { __trap(); }
  __device__ static void store(const Acc&, Smem&) {}
  __device__ static void stash_zero(Smem&) {}
  __device__ static void stash_add_product(Smem&, const Acc&, const Acc&) {}
#endif
};

// The engines the .cu files launch (and the emulator tests run). Dynamic shared memory: SIMT 45 KB (fp32/fp16/bf16)
// and 41 KB (fp64); wmma 79 KB (fp16/bf16, 3 stages) and 88 KB (TF32, 2 stages: under the 99 KB opt-in limit of
// sm_86/89/120).
template <typename scalar_t>
using SimtF32 = SimtTile<scalar_t, float, 128, 64, 16>;  // float, and fp16/bf16 on GPUs older than sm_80
using SimtF64 = SimtTile<double, double, 64, 64, 8>;
using WmmaF16 = WmmaTile<__half, 3>;
using WmmaBF16 = WmmaTile<__nv_bfloat16, 3>;
using WmmaTF32 = WmmaTile<Tf32Tag, 2>;

}  // namespace cuda
}  // namespace fastattr
