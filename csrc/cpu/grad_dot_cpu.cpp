// grad_dot on CPU: one block of kRows records at a time, spread over threads with parallel_blocks (parallel.h).
// Each block does one small GEMM  y = x_blk . target^T  ([rows*T, d_in] x [d_in, d_out]) in the accumulation type and
// then the row-dot  sum_t g_t . (y_t + target_bias)  while y is still in cache, so no [N, d_out] tensor is formed.
// Block boundaries are fixed (not derived from the thread count) and each block's GEMM runs on one thread, so results
// are identical for any thread count. (Contracting the wider side instead, so that y has min(d_in, d_out) columns,
// was tried: as fast at 8 -> 256, up to 1.5x slower at 8 -> 64, 64 -> 4 and 256 -> 256; MKL, one thread.)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "checks.h"
#include "parallel.h"

namespace fastattr {

namespace {
// Rows of y = x.target^T per block: ~32k values (128 KB in float) stay in L2 for the row-dot, and blocks are big
// enough that the per-GEMM call overhead (~5 us) is small. Depends only on the shape, never on the thread count.
constexpr int64_t kBlockValues = 32768;
int64_t rows_per_block(int64_t t, int64_t d_out) {
  return std::max<int64_t>(16, kBlockValues / std::max<int64_t>(1, t * d_out));
}
}

at::Tensor grad_dot_cpu(const at::Tensor& x, const at::Tensor& g, const at::Tensor& target,
                        const c10::optional<at::Tensor>& target_bias) {
  auto x3 = as_3d(x, "grad_dot", "x");
  auto g3 = as_3d(g, "grad_dot", "g");
  check_grad_dot(x3, g3, target, target_bias);
  const int64_t n = x3.size(0), t = x3.size(1), d_out = g3.size(2);
  const auto acc_type = score_dtype(x3.scalar_type());
  auto out = at::empty({n}, x3.options().dtype(acc_type));
  if (n == 0) return out;
  if (t == 0 || d_out == 0) return out.zero_();  // d_in == 0 still has the bias term

  // Everything below works in the accumulation type (float for half/bfloat16/float, double for double).
  auto xs = x3.contiguous().to(acc_type);
  auto gs = g3.contiguous().to(acc_type);
  auto target_t = target.to(acc_type).contiguous().t();  // [d_in, d_out] view: BLAS takes it as a transposed operand
  at::Tensor bias = target_bias.has_value() ? target_bias->to(acc_type).contiguous() : at::Tensor();
  const int64_t kRows = rows_per_block(t, d_out);
  const int64_t num_blocks = (n + kRows - 1) / kRows;

  AT_DISPATCH_FLOATING_TYPES(acc_type, "grad_dot_cpu", [&] {
    const int64_t row_len = t * d_out;
    parallel_blocks(num_blocks, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * kRows, r1 = std::min(n, r0 + kRows);
        auto xb = xs.slice(0, r0, r1).reshape({(r1 - r0) * t, -1});
        auto y = at::mm(xb, target_t);  // [(r1-r0)*T, d_out]; the bias is added in the row-dot (addmm is slower)
        const scalar_t* yp = y.data_ptr<scalar_t>();
        const scalar_t* gp = gs.data_ptr<scalar_t>() + r0 * row_len;
        const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
        scalar_t* op = out.data_ptr<scalar_t>();
        for (int64_t r = r0; r < r1; ++r, yp += row_len, gp += row_len) {
          // four independent partial sums: lets the compiler pipeline/vectorise without -ffast-math, and fixes the
          // summation order (deterministic whatever the thread count)
          scalar_t p0 = 0, p1 = 0, p2 = 0, p3 = 0;
          for (int64_t pos = 0; pos < t; ++pos) {
            const scalar_t* gq = gp + pos * d_out;
            const scalar_t* yq = yp + pos * d_out;
            int64_t k = 0;
            if (bp) {
              for (; k + 4 <= d_out; k += 4) {
                p0 += gq[k] * (yq[k] + bp[k]);
                p1 += gq[k + 1] * (yq[k + 1] + bp[k + 1]);
                p2 += gq[k + 2] * (yq[k + 2] + bp[k + 2]);
                p3 += gq[k + 3] * (yq[k + 3] + bp[k + 3]);
              }
              for (; k < d_out; ++k) p0 += gq[k] * (yq[k] + bp[k]);
            } else {
              for (; k + 4 <= d_out; k += 4) {
                p0 += gq[k] * yq[k];
                p1 += gq[k + 1] * yq[k + 1];
                p2 += gq[k + 2] * yq[k + 2];
                p3 += gq[k + 3] * yq[k + 3];
              }
              for (; k < d_out; ++k) p0 += gq[k] * yq[k];
            }
          }
          const scalar_t sum = (p0 + p1) + (p2 + p3);
          op[r] = sum;
        }
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(fastattr, CPU, m) { m.impl("grad_dot", &grad_dot_cpu); }

}  // namespace fastattr
