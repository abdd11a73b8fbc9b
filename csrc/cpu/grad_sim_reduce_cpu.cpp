// grad_sim_reduce and grad_norm on CPU.
// grad_sim_reduce: threads take fixed blocks of kRowsA records; each walks the M targets in fixed blocks of kRowsB,
// forms the per-layer Gram tiles  Kx = Xa Xb^T  and  Kg = Ga Gb^T  ([rows*T, cols*S]) with at::mm, adds their
// Hadamard product (summed over positions t, s) into an [rows, cols] tile, and folds the tile into the reduction
// over M before moving on. The N x M matrix is only allocated for reduce="none". Fixed blocks and a fixed order over
// M make the result independent of the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "checks.h"

namespace fastattr {

namespace {
constexpr int64_t kRowsA = 32;   // records per block
constexpr int64_t kRowsB = 256;  // targets per block: the [kRowsA, kRowsB] tile and two Gram tiles stay in L2

template <typename scalar_t>
void fold_tile(const at::Tensor& tile, Reduce reduce, double threshold, int64_t r0, int64_t c0, int64_t m,
               scalar_t* out, bool first) {
  const int64_t rows = tile.size(0), cols = tile.size(1);
  const scalar_t* tp = tile.data_ptr<scalar_t>();
  const auto thr = static_cast<scalar_t>(threshold);  // compared in the score dtype, as torch compares sim > threshold
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = tp + r * cols;
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

// Sum over positions of the Hadamard product of two Gram tiles: [ra*T, cb*S] -> [ra, cb].
at::Tensor hadamard_pool(const at::Tensor& kx, const at::Tensor& kg, int64_t ra, int64_t t, int64_t cb, int64_t s) {
  auto h = kx.mul(kg);
  if (t == 1 && s == 1) return h;
  return h.view({ra, t, cb, s}).sum({1, 3});
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
  std::vector<at::Tensor> xa_c, ga_c, xb_t, gb_t;
  for (size_t l = 0; l < L.xa.size(); ++l) {
    xa_c.push_back(L.xa[l].to(acc_type));
    ga_c.push_back(L.ga[l].to(acc_type));
    xb_t.push_back(L.xb[l].to(acc_type));
    gb_t.push_back(L.gb[l].to(acc_type));
  }
  const int64_t blocks_a = (n + kRowsA - 1) / kRowsA;

  AT_DISPATCH_FLOATING_TYPES(acc_type, "grad_sim_reduce_cpu", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, blocks_a, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * kRowsA, r1 = std::min(n, r0 + kRowsA), ra = r1 - r0;
        for (int64_t c0 = 0; c0 < m; c0 += kRowsB) {
          const int64_t c1 = std::min(m, c0 + kRowsB), cb = c1 - c0;
          at::Tensor tile;
          for (size_t l = 0; l < xa_c.size(); ++l) {
            const int64_t t = xa_c[l].size(1), s = xb_t[l].size(1);
            // explicit widths: with T = 0 or S = 0 positions a -1 would be ambiguous (the layer then adds 0)
            auto x_a = xa_c[l].slice(0, r0, r1).reshape({ra * t, xa_c[l].size(2)});
            auto g_a = ga_c[l].slice(0, r0, r1).reshape({ra * t, ga_c[l].size(2)});
            auto x_b = xb_t[l].slice(0, c0, c1).reshape({cb * s, xb_t[l].size(2)});
            auto g_b = gb_t[l].slice(0, c0, c1).reshape({cb * s, gb_t[l].size(2)});
            auto h = hadamard_pool(at::mm(x_a, x_b.t()), at::mm(g_a, g_b.t()), ra, t, cb, s);
            tile = tile.defined() ? tile.add_(h) : h.contiguous();
          }
          fold_tile<scalar_t>(tile, reduce, threshold, r0, c0, m, op, c0 == 0);
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
  const int64_t blocks = (n + kRowsB - 1) / kRowsB;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRowsB, r1 = std::min(n, r0 + kRowsB);
      auto acc = out.slice(0, r0, r1);
      for (size_t l = 0; l < L.xa.size(); ++l) {
        auto xl = L.xa[l].slice(0, r0, r1).to(acc_type), gl = L.ga[l].slice(0, r0, r1).to(acc_type);
        if (xl.size(1) == 1) {  // ||x||^2 ||g||^2
          acc.add_(xl.square().sum({1, 2}).mul_(gl.square().sum({1, 2})));
        } else {  // <X X^T, G G^T>_F per record
          acc.add_(at::bmm(xl, xl.transpose(1, 2)).mul_(at::bmm(gl, gl.transpose(1, 2))).sum({1, 2}));
        }
      }
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(fastattr, CPU, m) {
  m.impl("grad_sim_reduce", &grad_sim_reduce_cpu);
  m.impl("grad_norm", &grad_norm_cpu);
}

}  // namespace fastattr
