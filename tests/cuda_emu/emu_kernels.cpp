// Runs the fastattr CUDA kernels (csrc/cuda/*.cuh) on the host emulator (cuda_emu.h) and compares them with a
// naive float64 evaluation of the same formulas. Built and run by tests/test_cuda_emu.py; exit code 0 = all passed.
//
// What this checks without a GPU: tile indexing and masking at ragged edges, T/S > 1 position strides, the split
// plan and its merge, every reduction, the rowwise/tiled grad_dot paths, barrier placement (the wmma stand-in stores
// from lane 0 only), and that the fp16/bf16/TF32 engines compute the same sums as the fp32/fp64 ones.
#include "cuda_emu.h"
// clang-format off
#include "cuda/grad_dot_kernels.cuh"
#include "cuda/grad_sim_kernels.cuh"
// clang-format on

#include <cmath>
#include <cstdio>
#include <random>
#include <string>

using namespace fastattr::cuda;

namespace {

int g_failures = 0, g_checks = 0;
std::mt19937_64 g_rng(1234);

template <class T>
T from_double(double v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half(static_cast<float>(v));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16(static_cast<float>(v));
  } else {
    return static_cast<T>(v);
  }
}

template <class T>
double to_double(T v) {
  return static_cast<double>(as_arith(v));
}

// Values stored in T, and the same (rounded) values in double for the reference.
template <class T>
struct Buf {
  std::vector<T> v;
  std::vector<double> d;
  const T* ptr() const { return v.data(); }
};

template <class T>
Buf<T> randn(int64_t size) {
  std::normal_distribution<double> dist(0.0, 1.0);
  Buf<T> b;
  for (int64_t i = 0; i < size; ++i) {
    b.v.push_back(from_double<T>(dist(g_rng)));
    b.d.push_back(to_double(b.v.back()));
  }
  return b;
}

template <class acc_t>
void check(const std::string& name, const std::vector<acc_t>& got, const std::vector<double>& want, double rtol) {
  ++g_checks;
  double scale = 1.0, err = 0.0;
  for (double w : want) scale = std::max(scale, std::abs(w));
  size_t worst = 0;
  bool size_ok = got.size() == want.size();
  for (size_t i = 0; size_ok && i < got.size(); ++i) {
    const double e = std::abs(static_cast<double>(got[i]) - want[i]);
    if (!(e <= err)) {  // also catches NaN
      err = e;
      worst = i;
    }
  }
  const bool ok = size_ok && err <= rtol * scale;
  if (!ok) ++g_failures;
  std::printf("%s %-58s max err %.3e (scale %.3e, tol %.1e)%s\n", ok ? "ok  " : "FAIL", name.c_str(), err, scale,
              rtol * scale,
              ok || !size_ok ? "" : (" at " + std::to_string(worst) + ": got " + std::to_string(double(got[worst])) +
                                     " want " + std::to_string(want[worst]))
                                        .c_str());
}

// ------------------------------------------------------------------------------------------------ grad_dot
std::vector<double> grad_dot_ref(const std::vector<double>& x, const std::vector<double>& g,
                                 const std::vector<double>& w, const std::vector<double>* b, int64_t n, int64_t t,
                                 int64_t d_in, int64_t d_out) {
  std::vector<double> out(n, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t p = 0; p < t; ++p)
      for (int64_t o = 0; o < d_out; ++o) {
        double y = b ? (*b)[o] : 0.0;
        for (int64_t k = 0; k < d_in; ++k) y += w[o * d_in + k] * x[(i * t + p) * d_in + k];
        out[i] += g[(i * t + p) * d_out + o] * y;
      }
  return out;
}

// rowwise: the rowwise kernel (Tile unused); else the tiled kernel on the Tile engine.
template <class Tile, class in_t, class acc_t>
void run_grad_dot(const std::string& label, int64_t n, int64_t t, int64_t d_in, int64_t d_out, bool bias,
                  bool rowwise, double rtol) {
  auto x = randn<in_t>(n * t * d_in), g = randn<in_t>(n * t * d_out), w = randn<in_t>(d_out * d_in),
       b = randn<in_t>(d_out);
  std::vector<acc_t> out(n, acc_t(-777));
  GradDotParams<in_t, acc_t> p{x.ptr(), g.ptr(), w.ptr(), bias ? b.ptr() : nullptr, out.data(), n, t, d_in, d_out};
  if (rowwise) {
    const bool over_in = rowwise_lanes_over_in(d_in, d_out);
    const auto smem = rowwise_smem_bytes(d_in, d_out, sizeof(acc_t));
    emu::launch({2, 1, 1}, kRowwiseThreads, smem, [&] { grad_dot_rowwise_kernel<in_t, acc_t>(p, over_in); });
  } else if constexpr (std::is_same_v<typename Tile::in_t, in_t>) {
    std::vector<acc_t> rows(n * t, acc_t(-777));
    if (t > 1) p.out = rows.data();
    emu::launch({static_cast<unsigned>(ceil_div(n * t, Tile::BM)), 1, 1}, Tile::kThreads, sizeof(typename Tile::Smem),
                [&] { grad_dot_tiled_kernel<Tile, acc_t>(p); });
    if (t > 1) emu::launch({1, 1, 1}, 64, 0, [&] { sum_positions_kernel<acc_t>(rows.data(), n, t, out.data()); });
  }
  char name[160];
  std::snprintf(name, sizeof(name), "grad_dot %s n=%lld t=%lld %lld->%lld%s", label.c_str(), (long long)n,
                (long long)t, (long long)d_in, (long long)d_out, bias ? " +bias" : "");
  check(name, out, grad_dot_ref(x.d, g.d, w.d, bias ? &b.d : nullptr, n, t, d_in, d_out), rtol);
}

// ------------------------------------------------------------------------------------------------ grad_sim
struct LayerShape {
  int64_t t, s, d_in, d_out;
};

template <class T>
struct LayerData {
  Buf<T> xa, ga, xb, gb;
  LayerShape shape;
};

template <class T>
std::vector<LayerData<T>> make_layers(int64_t n, int64_t m, const std::vector<LayerShape>& shapes) {
  std::vector<LayerData<T>> layers;
  for (const auto& s : shapes) {
    layers.push_back({randn<T>(n * s.t * s.d_in), randn<T>(n * s.t * s.d_out), randn<T>(m * s.s * s.d_in),
                      randn<T>(m * s.s * s.d_out), s});
  }
  return layers;
}

template <class T>
std::vector<double> sim_ref(const std::vector<LayerData<T>>& layers, int64_t n, int64_t m) {
  std::vector<double> out(n * m, 0.0);
  for (const auto& L : layers)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j)
        for (int64_t t = 0; t < L.shape.t; ++t)
          for (int64_t s = 0; s < L.shape.s; ++s) {
            double kx = 0, kg = 0;
            for (int64_t k = 0; k < L.shape.d_in; ++k)
              kx += L.xa.d[(i * L.shape.t + t) * L.shape.d_in + k] * L.xb.d[(j * L.shape.s + s) * L.shape.d_in + k];
            for (int64_t k = 0; k < L.shape.d_out; ++k)
              kg += L.ga.d[(i * L.shape.t + t) * L.shape.d_out + k] *
                    L.gb.d[(j * L.shape.s + s) * L.shape.d_out + k];
            out[i * m + j] += kx * kg;
          }
  return out;
}

// Runs grad_sim_kernel (+ combine_splits_kernel) exactly as grad_sim_reduce_cuda.cu plans it.
template <class Tile, class acc_t>
std::vector<acc_t> run_sim(const std::vector<LayerData<typename Tile::in_t>>& layers, int64_t n, int64_t m, int reduce,
                           double threshold, int64_t* splits_used = nullptr) {
  using in_t = typename Tile::in_t;
  SimParams<in_t, acc_t> p{};
  p.num_layers = static_cast<int>(layers.size());
  for (size_t l = 0; l < layers.size(); ++l) {
    const auto& L = layers[l];
    p.layer[l] = SimLayer<in_t>{L.xa.ptr(), L.ga.ptr(), L.xb.ptr(), L.gb.ptr(),
                                L.shape.t,  L.shape.s,  L.shape.d_in, L.shape.d_out};
  }
  p.reduce = reduce;
  p.threshold = threshold;
  p.n = n;
  p.m = m;
  const auto plan = plan_sim(n, m, Tile::BM, Tile::BN);
  if (splits_used) *splits_used = plan.splits;
  p.tiles_per_split = plan.tiles_per_split;
  std::vector<acc_t> out(reduce == kNone ? n * m : n, acc_t(-777)), partial;
  if (reduce == kNone || plan.splits == 1) {
    p.out = out.data();
    p.final_write = true;
  } else {
    partial.assign(plan.splits * n, acc_t(-777));
    p.out = partial.data();
    p.final_write = false;
  }
  emu::launch({static_cast<unsigned>(plan.row_blocks), static_cast<unsigned>(plan.splits), 1}, Tile::kThreads,
              sizeof(typename Tile::Smem),
              [&] { grad_sim_kernel<Tile, acc_t>(p); });
  if (!partial.empty()) {
    emu::launch({2, 1, 1}, 64, 0,
                [&] { combine_splits_kernel<acc_t>(partial.data(), plan.splits, n, m, reduce, out.data()); });
  }
  return out;
}

// The reductions of the kernel's own [N, M] output, in double: the reduce epilogue must match them.
std::vector<double> reduce_rows(const std::vector<double>& sim, int64_t n, int64_t m, int reduce, double threshold) {
  std::vector<double> out(n);
  for (int64_t i = 0; i < n; ++i) {
    double acc = reduce == kMax ? -INFINITY : reduce == kMin ? INFINITY : 0.0;
    for (int64_t j = 0; j < m; ++j) {
      const double v = sim[i * m + j];
      if (reduce == kMax) acc = std::max(acc, v);
      else if (reduce == kMin) acc = std::min(acc, v);
      else if (reduce == kCountGt) acc += v > threshold ? 1.0 : 0.0;
      else acc += v;
    }
    out[i] = reduce == kMean ? acc / m : acc;
  }
  return out;
}

template <class Tile, class acc_t>
void test_sim(const std::string& label, int64_t n, int64_t m, const std::vector<LayerShape>& shapes, double rtol,
              const std::vector<int>& reductions = {kSum, kMean, kMax, kMin, kCountGt}) {
  using in_t = typename Tile::in_t;
  auto layers = make_layers<in_t>(n, m, shapes);
  int64_t splits = 0;
  const auto full = run_sim<Tile, acc_t>(layers, n, m, kNone, 0.0);
  const auto want = sim_ref(layers, n, m);
  char name[160];
  std::snprintf(name, sizeof(name), "grad_sim %s n=%lld m=%lld layers=%zu none", label.c_str(), (long long)n,
                (long long)m, shapes.size());
  check(name, full, want, rtol);
  std::vector<double> full_d(full.begin(), full.end());
  const double threshold = 0.25 * want[want.size() / 2];
  const char* names[] = {"none", "sum", "mean", "max", "min", "count_gt"};
  for (int r : reductions) {
    const auto got = run_sim<Tile, acc_t>(layers, n, m, r, threshold, &splits);
    std::snprintf(name, sizeof(name), "grad_sim %s n=%lld m=%lld %s (splits=%lld)", label.c_str(), (long long)n,
                  (long long)m, names[r], (long long)splits);
    // max/min/count are exact functions of the [N, M] output; sum/mean differ only by summation order.
    const double tol = (r == kSum || r == kMean) ? rtol : 0.0;
    check(name, got, reduce_rows(full_d, n, m, r, threshold), tol);
  }
}

// ------------------------------------------------------------------------------------------------ grad_norm
template <class in_t, class acc_t>
void test_norm(int64_t n, const std::vector<LayerShape>& shapes, double rtol) {
  auto layers = make_layers<in_t>(n, 1, shapes);
  NormParams<in_t, acc_t> p{};
  p.num_layers = static_cast<int>(layers.size());
  for (size_t l = 0; l < layers.size(); ++l)
    p.layer[l] = NormLayer<in_t>{layers[l].xa.ptr(), layers[l].ga.ptr(), shapes[l].t, shapes[l].d_in,
                                 shapes[l].d_out};
  std::vector<acc_t> out(n, acc_t(-777));
  p.n = n;
  p.out = out.data();
  emu::launch({2, 1, 1}, kNormThreads, 0, [&] { grad_norm_kernel<in_t, acc_t>(p); });
  std::vector<double> want(n, 0.0);
  for (const auto& L : layers)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t t = 0; t < L.shape.t; ++t)
        for (int64_t s = 0; s < L.shape.t; ++s) {
          double dx = 0, dg = 0;
          for (int64_t k = 0; k < L.shape.d_in; ++k)
            dx += L.xa.d[(i * L.shape.t + t) * L.shape.d_in + k] * L.xa.d[(i * L.shape.t + s) * L.shape.d_in + k];
          for (int64_t k = 0; k < L.shape.d_out; ++k)
            dg += L.ga.d[(i * L.shape.t + t) * L.shape.d_out + k] * L.ga.d[(i * L.shape.t + s) * L.shape.d_out + k];
          want[i] += dx * dg;
        }
  char name[160];
  std::snprintf(name, sizeof(name), "grad_norm n=%lld layers=%zu (%zu-byte inputs)", (long long)n, shapes.size(),
                sizeof(in_t));
  check(name, out, want, rtol);
}

}  // namespace

int main(int argc, char** argv) {
  // argv[1]: nothing = everything; "quick" = every kernel and engine on smaller shapes; or one of grad_dot,
  // grad_sim, grad_norm.
  const std::string only = argc > 1 ? argv[1] : "";
  const bool quick = only == "quick", all = only.empty() || quick;
  using SimtF = SimtF32<float>;  // the engines grad_dot_cuda.cu / grad_sim_reduce_cuda.cu launch
  using SimtD = SimtF64;
  using SimtH = SimtF32<__half>;
  using WmmaH = WmmaF16;
  using WmmaB = WmmaBF16;
  using WmmaT = WmmaTF32;
  constexpr double kF = 2e-5, kD = 1e-12, kTf32 = 3e-3;  // relative to the largest |reference| value

  if (all || only == "grad_dot") {
    // rowwise: lanes over d_in (d_out short), lanes over d_out (d_in short), T > 1, d_in = 0, odd widths
    run_grad_dot<SimtF, float, float>("rowwise", 37, 1, 70, 5, true, true, kF);
    run_grad_dot<SimtF, float, float>("rowwise", 19, 3, 7, 70, true, true, kF);
    run_grad_dot<SimtF, double, double>("rowwise", 21, 2, 33, 32, false, true, kD);
    run_grad_dot<SimtF, float, float>("rowwise", 5, 1, 0, 9, true, true, kF);
    run_grad_dot<SimtF, __half, float>("rowwise", 40, 1, 8, 64, true, true, kF);
    // tiled: ragged rows/columns/K, several column tiles, T > 1 through sum_positions
    run_grad_dot<SimtF, float, float>("tiled simt-f32", 150, 1, 70, 100, true, false, kF);
    run_grad_dot<SimtF, float, float>("tiled simt-f32", 45, 3, 17, 65, false, false, kF);
    run_grad_dot<SimtD, double, double>("tiled simt-f64", 70, 1, 9, 130, true, false, kD);
    run_grad_dot<SimtH, __half, float>("tiled simt-f16", 130, 1, 40, 33, true, false, kF);
    run_grad_dot<WmmaH, __half, float>("tiled wmma-f16", 150, 1, 70, 100, true, false, kF);
    run_grad_dot<WmmaB, __nv_bfloat16, float>("tiled wmma-bf16", 45, 3, 17, 65, true, false, kF);
    run_grad_dot<WmmaT, float, float>("tiled wmma-tf32", 130, 1, 40, 70, false, false, kTf32);
    // 16-byte aligned rows: the cp.async path, 7 slabs through the 3-stage ring; T = 2 with a partial chunk
    run_grad_dot<WmmaH, __half, float>("tiled wmma-f16", 70, 1, 200, 48, true, false, kF);
    run_grad_dot<WmmaB, __nv_bfloat16, float>("tiled wmma-bf16", 33, 2, 4, 40, false, false, kF);
    run_grad_dot<WmmaT, float, float>("tiled wmma-tf32", 20, 1, 132, 36, true, false, kTf32);
  }
  if (quick) {  // one block row per engine, two target tiles (so two splits and the merge), T, S > 1 once
    const std::vector<LayerShape> mlp = {{1, 1, 8, 40}, {1, 1, 40, 3}};
    test_sim<SimtF, float>("simt-f32", 20, 130, {{2, 3, 9, 5}, {1, 1, 20, 17}}, kF);
    test_sim<SimtD, double>("simt-f64", 33, 65, mlp, kD, {kMin});
    test_sim<WmmaH, float>("wmma-f16", 40, 70, mlp, kF, {kMean, kMax});
    test_sim<WmmaB, float>("wmma-bf16", 9, 40, mlp, kF, {kCountGt});
    test_sim<WmmaT, float>("wmma-tf32", 17, 66, mlp, kTf32, {kSum});
    test_sim<WmmaH, float>("wmma-f16", 20, 70, {{2, 2, 4, 12}, {1, 1, 104, 8}}, kF, {kMax});  // cp.async, partial chunks
  } else if (all || only == "grad_sim") {
    const std::vector<LayerShape> mlp = {{1, 1, 8, 40}, {1, 1, 40, 3}};
    const std::vector<LayerShape> seq = {{2, 3, 9, 5}, {1, 1, 20, 17}};
    test_sim<SimtF, float>("simt-f32", 150, 70, mlp, kF);   // 2 row blocks x 2 target tiles, split in two
    test_sim<SimtF, float>("simt-f32", 20, 130, seq, kF);   // T, S > 1; 3 target tiles
    test_sim<SimtD, double>("simt-f64", 70, 65, mlp, kD);
    test_sim<SimtH, float>("simt-f16", 33, 40, mlp, kF);    // one tile: final write
    test_sim<WmmaH, float>("wmma-f16", 150, 70, mlp, kF);
    test_sim<WmmaB, float>("wmma-bf16", 20, 70, seq, kF);
    test_sim<WmmaT, float>("wmma-tf32", 130, 40, mlp, kTf32);
  }
  if (all || only == "grad_norm") {
    test_norm<float, float>(37, {{1, 1, 70, 5}, {3, 3, 8, 40}}, kF);
    test_norm<double, double>(9, {{2, 2, 33, 1}}, kD);
    test_norm<__half, float>(20, {{1, 1, 64, 64}}, kF);
  }
  std::printf("%d/%d checks passed\n", g_checks - g_failures, g_checks);
  return g_failures == 0 ? 0 : 1;
}
