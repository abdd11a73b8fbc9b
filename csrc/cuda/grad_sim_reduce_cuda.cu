// grad_sim_reduce and grad_norm on CUDA: checks -> contiguous -> allocate -> engine and dtype choice -> launch.
// Kernels and the fusion scheme are in grad_sim_kernels.cuh; the precision policy is at the top of tile_mma.cuh.
// Cosine similarity needs no kernel of its own: scale xa[l] (or ga[l]) rows by 1/sqrt(grad_norm) for every layer,
// and xb/gb rows likewise, then call grad_sim_reduce.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

#include "checks.h"
#include "grad_sim_kernels.cuh"
#include "host_utils.cuh"

namespace fastattr {

namespace {

static_assert(static_cast<int>(Reduce::None) == cuda::kNone && static_cast<int>(Reduce::Sum) == cuda::kSum &&
                  static_cast<int>(Reduce::Mean) == cuda::kMean && static_cast<int>(Reduce::Max) == cuda::kMax &&
                  static_cast<int>(Reduce::Min) == cuda::kMin && static_cast<int>(Reduce::CountGt) == cuda::kCountGt,
              "fastattr::Reduce and cuda::ReduceOp must agree");

// Layers [l0, l1) of one grad_sim_reduce call, reduced over M into `out` ([N, M] or [N]).
template <class Tile, typename acc_t>
void launch_sim(const LayerLists& L, size_t l0, size_t l1, Reduce reduce, double threshold, const at::Tensor& out,
                const cuda::DeviceInfo& info, cudaStream_t stream) {
  using in_t = typename Tile::in_t;
  cuda::SimParams<in_t, acc_t> p{};
  p.num_layers = static_cast<int>(l1 - l0);
  for (size_t l = l0; l < l1; ++l) {
    p.layer[l - l0] = cuda::SimLayer<in_t>{cuda::typed_ptr<in_t>(L.xa[l]), cuda::typed_ptr<in_t>(L.ga[l]),
                                           cuda::typed_ptr<in_t>(L.xb[l]), cuda::typed_ptr<in_t>(L.gb[l]),
                                           L.xa[l].size(1),                L.xb[l].size(1),
                                           L.xa[l].size(2),                L.ga[l].size(2)};
  }
  p.reduce = static_cast<int>(reduce);
  p.threshold = threshold;
  p.n = L.n;
  p.m = L.m;
  const auto plan = cuda::plan_sim(L.n, L.m, Tile::BM, Tile::BN);
  p.tiles_per_split = plan.tiles_per_split;
  at::Tensor partial;
  if (reduce == Reduce::None || plan.splits == 1) {
    p.out = out.data_ptr<acc_t>();
    p.final_write = true;
  } else {
    partial = at::empty({plan.splits, L.n}, out.options());
    p.out = partial.data_ptr<acc_t>();
    p.final_write = false;
  }
  const dim3 grid(static_cast<unsigned int>(plan.row_blocks), static_cast<unsigned int>(plan.splits));
  constexpr size_t smem = sizeof(typename Tile::Smem);
  auto* kernel = &cuda::grad_sim_kernel<Tile, acc_t>;
  cuda::ensure_dynamic_smem(kernel, smem, L.xa[0].get_device());
  kernel<<<grid, Tile::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (partial.defined()) {
    cuda::combine_splits_kernel<acc_t><<<cuda::grid_for(L.n, 256, info, 4), 256, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), plan.splits, L.n, L.m, p.reduce, out.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void launch_sim_dtype(const LayerLists& L, size_t l0, size_t l1, Reduce reduce, double threshold,
                      const at::Tensor& out, const cuda::DeviceInfo& info, cudaStream_t stream) {
  const auto dtype = L.xa[0].scalar_type();
  const bool tc = cuda::use_tensor_cores(dtype, info);
  switch (dtype) {
    case at::kDouble:
      launch_sim<cuda::SimtF64, double>(L, l0, l1, reduce, threshold, out, info, stream);
      break;
    case at::kFloat:
      if (tc) {
        launch_sim<cuda::WmmaTF32, float>(L, l0, l1, reduce, threshold, out, info, stream);
      } else {
        launch_sim<cuda::SimtF32<float>, float>(L, l0, l1, reduce, threshold, out, info, stream);
      }
      break;
    case at::kHalf:
      if (tc) {
        launch_sim<cuda::WmmaF16, float>(L, l0, l1, reduce, threshold, out, info, stream);
      } else {
        launch_sim<cuda::SimtF32<at::Half>, float>(L, l0, l1, reduce, threshold, out, info,
                                                                       stream);
      }
      break;
    case at::kBFloat16:
      if (tc) {
        launch_sim<cuda::WmmaBF16, float>(L, l0, l1, reduce, threshold, out, info, stream);
      } else {
        launch_sim<cuda::SimtF32<at::BFloat16>, float>(L, l0, l1, reduce, threshold, out, info,
                                                                           stream);
      }
      break;
    default:
      TORCH_CHECK(false, "grad_sim_reduce: CUDA kernel supports float64, float32, float16 and bfloat16, got ", dtype);
  }
}

}  // namespace

at::Tensor grad_sim_reduce_cuda(at::TensorList xa, at::TensorList ga, at::TensorList xb, at::TensorList gb,
                                c10::string_view reduce_str, double threshold) {
  const Reduce reduce = parse_reduce(std::string(reduce_str));
  auto L = check_sim_lists(xa, ga, xb, gb, "grad_sim_reduce");
  TORCH_CHECK(L.xa[0].is_cuda(), "grad_sim_reduce: the CUDA kernel got xa[0] on ", L.xa[0].device(),
              "; move every input to one GPU");
  const c10::cuda::CUDAGuard guard(L.xa[0].device());
  const int64_t n = L.n, m = L.m;
  const auto acc_type = score_dtype(L.xa[0].scalar_type());
  bool done = false;
  at::Tensor out = sim_output(L, reduce, done);
  if (done) return out;
  const size_t layers = L.xa.size();
  const bool additive = reduce == Reduce::None || reduce == Reduce::Sum || reduce == Reduce::Mean;
  TORCH_CHECK(layers <= static_cast<size_t>(cuda::kMaxLayers) || additive, "grad_sim_reduce: reduce='",
              reduce_name(reduce), "' takes at most ", cuda::kMaxLayers, " layers per call on CUDA, got ", layers,
              "; concatenate small layers or reduce in chunks of layers with reduce='none'");
  const auto info = cuda::device_info(L.xa[0].get_device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // none/sum/mean are additive over layers: more than kMaxLayers layers run in chunks added in order.
  at::Tensor chunk_out;
  for (size_t l0 = 0; l0 < layers; l0 += cuda::kMaxLayers) {
    const size_t l1 = std::min(layers, l0 + static_cast<size_t>(cuda::kMaxLayers));
    if (l0 == 0) {
      launch_sim_dtype(L, l0, l1, reduce, threshold, out, info, stream);
    } else {
      if (!chunk_out.defined()) chunk_out = at::empty_like(out);
      launch_sim_dtype(L, l0, l1, reduce, threshold, chunk_out, info, stream);
      out.add_(chunk_out);
    }
  }
  return out;
}

at::Tensor grad_norm_cuda(at::TensorList x, at::TensorList g) {
  auto L = check_sim_lists(x, g, x, g, "grad_norm");
  TORCH_CHECK(L.xa[0].is_cuda(), "grad_norm: the CUDA kernel got x[0] on ", L.xa[0].device(),
              "; move every input to one GPU");
  const c10::cuda::CUDAGuard guard(L.xa[0].device());
  const int64_t n = L.n;
  const auto acc_type = score_dtype(L.xa[0].scalar_type());
  auto out = at::empty({n}, L.xa[0].options().dtype(acc_type));
  if (n == 0) return out;
  const auto info = cuda::device_info(L.xa[0].get_device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const size_t layers = L.xa.size();
  at::Tensor chunk_out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, L.xa[0].scalar_type(), "grad_norm_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (size_t l0 = 0; l0 < layers; l0 += cuda::kMaxLayers) {  // additive over layers: chunks added in order
      const size_t l1 = std::min(layers, l0 + static_cast<size_t>(cuda::kMaxLayers));
      if (l0 > 0 && !chunk_out.defined()) chunk_out = at::empty_like(out);
      const at::Tensor& dst = l0 == 0 ? out : chunk_out;
      cuda::NormParams<scalar_t, acc_t> p{};
      p.num_layers = static_cast<int>(l1 - l0);
      for (size_t l = l0; l < l1; ++l) {
        p.layer[l - l0] = cuda::NormLayer<scalar_t>{L.xa[l].const_data_ptr<scalar_t>(),
                                                    L.ga[l].const_data_ptr<scalar_t>(), L.xa[l].size(1),
                                                    L.xa[l].size(2), L.ga[l].size(2)};
      }
      p.n = n;
      p.out = dst.data_ptr<acc_t>();
      cuda::grad_norm_kernel<scalar_t, acc_t>
          <<<cuda::grid_for(n, cuda::kNormThreads / cuda::kWarp, info), cuda::kNormThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (l0 > 0) out.add_(chunk_out);
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(fastattr, CUDA, m) {
  m.impl("grad_sim_reduce", &grad_sim_reduce_cuda);
  m.impl("grad_norm", &grad_norm_cuda);
}

}  // namespace fastattr
