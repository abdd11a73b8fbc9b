// grad_sim_reduce and grad_norm on CPU.
// grad_sim_reduce: threads take fixed blocks of records; each walks the M targets in fixed blocks, forms the
// per-layer Gram tiles  Kx = Xa Xb^T  and  Kg = Ga Gb^T  ([rows*T, cols*S]) with BLAS (at::mm_out into scratch that
// lives for the thread's whole range of blocks), adds their Hadamard product (summed over positions t, s) into an
// [rows, cols] tile, and folds the tile into the reduction over M before moving on. The N x M matrix is only
// allocated for reduce="none". Block sizes depend on the shape only, M is walked in a fixed order and each block's BLAS
// calls run on one thread (parallel.h), so the result is independent of the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "checks.h"
#include "parallel.h"

namespace fastattr {

namespace {
// Gram tile size in positions (rows of Xa x rows of Xb). BLAS needs tall tiles to reach its large-GEMM rate: on a Zen 4
// core (MLP 8-256-256-4, N = 4,096, M = 2,048, one thread) [32, 256] tiles ran at 1.76x the FLOP floor, [128, 256] at
// 1.17x, [256, 256] at 1.09x, [512, 256] and [256, 512] alike within the noise. [256, 256] keeps the two Gram tiles
// and the similarity tile (3 x 256 KB in float) in a 1 MB L2 and leaves 64 blocks to share out at N = 16,384.
constexpr int64_t kPosA = 256;  // record positions per block
constexpr int64_t kPosB = 256;  // target positions per block
constexpr int64_t kNormRows = 256;  // grad_norm: records per block

template <typename scalar_t>
void fold_tile(const scalar_t* tile, int64_t rows, int64_t cols, Reduce reduce, double threshold, int64_t r0,
               int64_t c0, int64_t m, scalar_t* out, bool first) {
  const auto thr = static_cast<scalar_t>(threshold);  // compared in the score dtype, as torch compares sim > threshold
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = tile + r * cols;
    if (reduce == Reduce::None) {
      std::copy(row, row + cols, out + (r0 + r) * m + c0);
      continue;
    }
    scalar_t acc = first ? (reduce == Reduce::Max   ? -std::numeric_limits<scalar_t>::infinity()
                            : reduce == Reduce::Min ? std::numeric_limits<scalar_t>::infinity()
                                                    : scalar_t(0))
                         : out[r0 + r];
    for (int64_t c = 0; c < cols; ++c) {
      switch (reduce) {
        // NaN propagates like torch.amax / amin (std::max would drop it)
        case Reduce::Max: acc = (row[c] > acc || std::isnan(row[c])) && !std::isnan(acc) ? row[c] : acc; break;
        case Reduce::Min: acc = (row[c] < acc || std::isnan(row[c])) && !std::isnan(acc) ? row[c] : acc; break;
        case Reduce::CountGt: acc += row[c] > thr ? scalar_t(1) : scalar_t(0); break;
        default: acc += row[c];
      }
    }
    out[r0 + r] = acc;
  }
}

// tile[r, c] += sum_{p < t, q < s} kx[r*t + p, c*s + q] * kg[r*t + p, c*s + q]: the Hadamard product of two Gram
// tiles [rows*t, cols*s], summed over the position pairs of each (record, target) pair, in a fixed order.
template <typename scalar_t>
void add_pooled(scalar_t* tile, const scalar_t* kx, const scalar_t* kg, int64_t rows, int64_t t, int64_t cols,
                int64_t s) {
  const int64_t width = cols * s;
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* out = tile + r * cols;
    for (int64_t p = 0; p < t; ++p) {
      const scalar_t* x = kx + (r * t + p) * width;
      const scalar_t* g = kg + (r * t + p) * width;
      for (int64_t c = 0; c < cols; ++c) {
        scalar_t acc = 0;
        for (int64_t q = 0; q < s; ++q) acc += x[c * s + q] * g[c * s + q];
        out[c] += acc;
      }
    }
  }
}

// sum_k a[k]^2 with four independent partial sums (vectorisable without -ffast-math; a fixed summation order)
template <typename scalar_t>
scalar_t sum_squares(const scalar_t* a, int64_t len) {
  scalar_t p[4] = {0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 4 <= len; k += 4) {
    for (int i = 0; i < 4; ++i) p[i] += a[k + i] * a[k + i];
  }
  for (; k < len; ++k) p[0] += a[k] * a[k];
  return (p[0] + p[1]) + (p[2] + p[3]);
}

// One layer in the accumulation type, positions flattened into rows: x [rows*T, d_in], g [rows*T, d_out].
struct Flat {
  at::Tensor x, g;
  int64_t pos;
};

Flat flatten(const at::Tensor& x, const at::Tensor& g, at::ScalarType acc_type) {
  const int64_t rows = x.size(0), pos = x.size(1);
  // explicit widths: with T = 0 positions a -1 would be ambiguous
  return {x.to(acc_type).reshape({rows * pos, x.size(2)}), g.to(acc_type).reshape({rows * pos, g.size(2)}), pos};
}
}  // namespace

at::Tensor grad_sim_reduce_cpu(at::TensorList xa, at::TensorList ga, at::TensorList xb, at::TensorList gb,
                               c10::string_view reduce_str, double threshold) {
  const Reduce reduce = parse_reduce(std::string(reduce_str));
  auto L = check_sim_lists(xa, ga, xb, gb, "grad_sim_reduce");
  const int64_t n = L.n, m = L.m;
  const auto acc_type = score_dtype(L.xa[0].scalar_type());
  bool done = false;
  at::Tensor out = sim_output(L, reduce, done);
  if (done) return out;
  std::vector<Flat> a, b;
  int64_t max_t = 1, max_s = 1;
  for (size_t l = 0; l < L.xa.size(); ++l) {
    a.push_back(flatten(L.xa[l], L.ga[l], acc_type));
    b.push_back(flatten(L.xb[l], L.gb[l], acc_type));
    max_t = std::max(max_t, a.back().pos);
    max_s = std::max(max_s, b.back().pos);
  }
  // records and targets per block: a Gram tile holds at most [kPosA, kPosB] positions (more only when one record
  // alone has more positions)
  const int64_t rows_a = std::max<int64_t>(1, kPosA / max_t), cols_b = std::max<int64_t>(1, kPosB / max_s);
  const int64_t gram_size = std::min(rows_a, n) * max_t * std::min(cols_b, m) * max_s;  // scratch per thread
  const int64_t blocks_a = (n + rows_a - 1) / rows_a;

  AT_DISPATCH_FLOATING_TYPES(acc_type, "grad_sim_reduce_cpu", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    parallel_blocks(blocks_a, [&](int64_t b0, int64_t b1) {
      auto opts = out.options();
      at::Tensor kx_buf = at::empty({gram_size}, opts), kg_buf = at::empty({gram_size}, opts);
      at::Tensor tile_buf = at::empty({std::min(rows_a, n) * std::min(cols_b, m)}, opts);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * rows_a, ra = std::min(n, r0 + rows_a) - r0;
        for (int64_t c0 = 0; c0 < m; c0 += cols_b) {
          const int64_t cb = std::min(m, c0 + cols_b) - c0;
          at::Tensor tile = tile_buf.narrow(0, 0, ra * cb).view({ra, cb});
          bool empty = true;  // nothing written to the tile yet
          for (size_t l = 0; l < a.size(); ++l) {
            const int64_t t = a[l].pos, s = b[l].pos;
            if (t == 0 || s == 0) continue;  // a layer with no positions adds nothing
            at::Tensor kx = kx_buf.narrow(0, 0, ra * t * cb * s).view({ra * t, cb * s});
            at::Tensor kg = kg_buf.narrow(0, 0, ra * t * cb * s).view({ra * t, cb * s});
            at::mm_out(kx, a[l].x.narrow(0, r0 * t, ra * t), b[l].x.narrow(0, c0 * s, cb * s).t());
            at::mm_out(kg, a[l].g.narrow(0, r0 * t, ra * t), b[l].g.narrow(0, c0 * s, cb * s).t());
            if (t == 1 && s == 1) {  // ATen's vectorised elementwise kernels
              if (empty) {
                at::mul_out(tile, kx, kg);
              } else {
                tile.addcmul_(kx, kg);
              }
            } else {
              if (empty) tile.zero_();
              add_pooled<scalar_t>(tile.data_ptr<scalar_t>(), kx.data_ptr<scalar_t>(), kg.data_ptr<scalar_t>(), ra,
                                   t, cb, s);
            }
            empty = false;
          }
          if (empty) tile.zero_();
          fold_tile<scalar_t>(tile.data_ptr<scalar_t>(), ra, cb, reduce, threshold, r0, c0, m, op, c0 == 0);
        }
      }
    });
  });
  if (reduce == Reduce::Mean) out.div_(static_cast<double>(m));
  return out;
}

at::Tensor grad_norm_cpu(at::TensorList x, at::TensorList g) {
  auto L = check_sim_lists(x, g, x, g, "grad_norm");
  const int64_t n = L.n;
  const auto acc_type = score_dtype(L.xa[0].scalar_type());
  auto out = at::zeros({n}, L.xa[0].options().dtype(acc_type));
  if (n == 0) return out;
  const int64_t blocks = (n + kNormRows - 1) / kNormRows;
  AT_DISPATCH_FLOATING_TYPES(acc_type, "grad_norm_cpu", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    parallel_blocks(blocks, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * kNormRows, r1 = std::min(n, r0 + kNormRows);
        for (size_t l = 0; l < L.xa.size(); ++l) {
          auto xl = L.xa[l].slice(0, r0, r1).to(acc_type), gl = L.ga[l].slice(0, r0, r1).to(acc_type);
          const int64_t d_in = xl.size(2), d_out = gl.size(2);
          if (xl.size(1) == 1) {  // ||x||^2 ||g||^2, in one pass over the rows
            const scalar_t* xp = xl.data_ptr<scalar_t>();
            const scalar_t* gp = gl.data_ptr<scalar_t>();
            for (int64_t r = 0; r < r1 - r0; ++r) {
              op[r0 + r] += sum_squares(xp + r * d_in, d_in) * sum_squares(gp + r * d_out, d_out);
            }
          } else {  // <X X^T, G G^T>_F per record
            out.slice(0, r0, r1).add_(
                at::bmm(xl, xl.transpose(1, 2)).mul_(at::bmm(gl, gl.transpose(1, 2))).sum({1, 2}));
          }
        }
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(fastattr, CPU, m) {
  m.impl("grad_sim_reduce", &grad_sim_reduce_cpu);
  m.impl("grad_norm", &grad_norm_cpu);
}

}  // namespace fastattr
