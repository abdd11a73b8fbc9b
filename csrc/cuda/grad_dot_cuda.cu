// grad_dot on CUDA: checks -> contiguous -> allocate -> path and dtype choice -> launch. Kernels and the fusion
// scheme are in grad_dot_kernels.cuh; the precision policy is at the top of tile_mma.cuh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "grad_dot_kernels.cuh"
#include "host_utils.cuh"

namespace fastattr {

namespace {

using cuda::GradDotParams;

template <class Tile, typename acc_t>
void launch_tiled(const at::Tensor& x, const at::Tensor& g, const at::Tensor& w, const at::Tensor& b,
                  const at::Tensor& rows_out, int64_t n, int64_t t, cudaStream_t stream) {
  using in_t = typename Tile::in_t;
  GradDotParams<in_t, acc_t> p{cuda::typed_ptr<in_t>(x), cuda::typed_ptr<in_t>(g), cuda::typed_ptr<in_t>(w),
                               cuda::typed_ptr<in_t>(b),  rows_out.data_ptr<acc_t>(), n,
                               t,                         x.size(2),                  g.size(2)};
  const auto blocks = static_cast<unsigned int>(cuda::ceil_div(n * t, Tile::BM));
  constexpr size_t smem = sizeof(typename Tile::Smem);
  auto* kernel = &cuda::grad_dot_tiled_kernel<Tile, acc_t>;
  cuda::ensure_dynamic_smem(kernel, smem, x.get_device());
  kernel<<<blocks, Tile::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor grad_dot_cuda(const at::Tensor& x, const at::Tensor& g, const at::Tensor& target,
                         const c10::optional<at::Tensor>& target_bias) {
  auto x3 = as_3d(x, "grad_dot", "x");
  auto g3 = as_3d(g, "grad_dot", "g");
  check_grad_dot(x3, g3, target, target_bias);
  TORCH_CHECK(x3.is_cuda(), "grad_dot: the CUDA kernel got x on ", x3.device(), "; move every input to one GPU");
  const c10::cuda::CUDAGuard guard(x3.device());
  const int64_t n = x3.size(0), t = x3.size(1), d_in = x3.size(2), d_out = g3.size(2);
  const auto acc_type = score_dtype(x3.scalar_type());
  auto out = at::empty({n}, x3.options().dtype(acc_type));
  if (n == 0) return out;  // empty buffer: no launch
  if (t == 0 || d_out == 0) return out.zero_();

  auto xs = x3.contiguous(), gs = g3.contiguous(), ws = target.contiguous();
  at::Tensor bs = target_bias.has_value() ? target_bias->contiguous() : at::Tensor();
  const auto info = cuda::device_info(x3.get_device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();  // the caller's stream, never the legacy default
  const int64_t acc_bytes = acc_type == at::kDouble ? 8 : 4;
  const int64_t smem = cuda::rowwise_smem_bytes(d_in, d_out, acc_bytes);
  const bool rowwise = std::min(d_in, d_out) <= cuda::kShortMax && smem <= 48 * 1024 &&
                       !cuda::env_flag("FASTATTR_CUDA_TILED");

  if (rowwise) {
    const bool lanes_over_in = cuda::rowwise_lanes_over_in(d_in, d_out);
    const auto blocks = cuda::grid_for(n, cuda::kRowwiseThreads / cuda::kWarp, info);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs.scalar_type(), "grad_dot_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      GradDotParams<scalar_t, acc_t> p{xs.const_data_ptr<scalar_t>(), gs.const_data_ptr<scalar_t>(),
                                       ws.const_data_ptr<scalar_t>(),
                                       bs.defined() ? bs.const_data_ptr<scalar_t>() : nullptr,
                                       out.data_ptr<acc_t>(), n, t, d_in, d_out};
      cuda::grad_dot_rowwise_kernel<scalar_t, acc_t>
          <<<blocks, cuda::kRowwiseThreads, static_cast<size_t>(smem), stream>>>(p, lanes_over_in);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
  }

  // Tiled: per-row results go straight to `out` when T == 1, else to a [N*T] buffer summed per record below.
  at::Tensor rows_out = t == 1 ? out : at::empty({n * t}, out.options());
  const bool tc = cuda::use_tensor_cores(xs.scalar_type(), info);
  switch (xs.scalar_type()) {
    case at::kDouble:
      launch_tiled<cuda::SimtF64, double>(xs, gs, ws, bs, rows_out, n, t, stream);
      break;
    case at::kFloat:
      if (tc) {
        launch_tiled<cuda::WmmaTF32, float>(xs, gs, ws, bs, rows_out, n, t, stream);
      } else {
        launch_tiled<cuda::SimtF32<float>, float>(xs, gs, ws, bs, rows_out, n, t, stream);
      }
      break;
    case at::kHalf:
      if (tc) {
        launch_tiled<cuda::WmmaF16, float>(xs, gs, ws, bs, rows_out, n, t, stream);
      } else {
        launch_tiled<cuda::SimtF32<at::Half>, float>(xs, gs, ws, bs, rows_out, n, t, stream);
      }
      break;
    case at::kBFloat16:
      if (tc) {
        launch_tiled<cuda::WmmaBF16, float>(xs, gs, ws, bs, rows_out, n, t, stream);
      } else {
        launch_tiled<cuda::SimtF32<at::BFloat16>, float>(xs, gs, ws, bs, rows_out, n, t,
                                                                              stream);
      }
      break;
    default:
      TORCH_CHECK(false, "grad_dot: CUDA kernel supports float64, float32, float16 and bfloat16, got ",
                  xs.scalar_type());
  }
  if (t > 1) {
    AT_DISPATCH_FLOATING_TYPES(acc_type, "grad_dot_sum_positions", [&] {
      cuda::sum_positions_kernel<scalar_t><<<cuda::grid_for(n, 256, info, 4), 256, 0, stream>>>(
          rows_out.const_data_ptr<scalar_t>(), n, t, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return out;
}

TORCH_LIBRARY_IMPL(fastattr, CUDA, m) { m.impl("grad_dot", &grad_dot_cuda); }

}  // namespace fastattr
