// Argument checks shared by the CPU and CUDA kernels. Messages name the op and the offending sizes.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace fastattr {

// Views a 2-D [N, d] tensor as [N, 1, d]; a 3-D [N, T, d] tensor is returned as is.
inline at::Tensor as_3d(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2 || t.dim() == 3, op, ": ", name, " must be [N, d] or [N, T, d], got ", t.sizes());
  return t.dim() == 2 ? t.unsqueeze(1) : t;
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ",
              t.scalar_type());
}

// Scores accumulate in double for double inputs and in float otherwise.
inline at::ScalarType score_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// x: [N, T, d_in], g: [N, T, d_out] after as_3d.
inline void check_layer_pair(const at::Tensor& x, const at::Tensor& g, const char* op, const std::string& where) {
  const char* sep = where.empty() ? "" : " ";
  TORCH_CHECK(x.size(0) == g.size(0), op, ": ", where, sep, "x and g disagree on N: ", x.size(0), " vs ", g.size(0));
  TORCH_CHECK(x.size(1) == g.size(1), op, ": ", where, sep, "x and g disagree on T: ", x.size(1), " vs ", g.size(1));
  TORCH_CHECK(x.scalar_type() == g.scalar_type(), op, ": ", where, sep, "x and g dtypes differ: ", x.scalar_type(),
              " vs ", g.scalar_type());
  TORCH_CHECK(x.device() == g.device(), op, ": ", where, sep, "x and g are on different devices");
}

inline void check_grad_dot(const at::Tensor& x3, const at::Tensor& g3, const at::Tensor& target,
                           const c10::optional<at::Tensor>& target_bias) {
  check_float(x3, "grad_dot", "x");
  check_layer_pair(x3, g3, "grad_dot", "");
  TORCH_CHECK(target.dim() == 2 && target.size(0) == g3.size(2) && target.size(1) == x3.size(2),
              "grad_dot: target must be [d_out, d_in] = [", g3.size(2), ", ", x3.size(2), "], got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == x3.scalar_type(), "grad_dot: target dtype ", target.scalar_type(),
              " differs from x dtype ", x3.scalar_type());
  TORCH_CHECK(target.device() == x3.device(), "grad_dot: target and x are on different devices");
  if (target_bias.has_value()) {
    const auto& b = *target_bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == g3.size(2), "grad_dot: target_bias must be [d_out] = [", g3.size(2),
                "], got ", b.sizes());
    TORCH_CHECK(b.scalar_type() == x3.scalar_type(), "grad_dot: target_bias dtype differs from x dtype");
    TORCH_CHECK(b.device() == x3.device(), "grad_dot: target_bias and x are on different devices");
  }
}

// Checks the four layer lists of grad_sim_reduce / grad_norm and returns them as contiguous 3-D tensors.
struct LayerLists {
  std::vector<at::Tensor> xa, ga, xb, gb;
  int64_t n = 0, m = 0;
};

inline LayerLists check_sim_lists(at::TensorList xa, at::TensorList ga, at::TensorList xb, at::TensorList gb,
                                  const char* op) {
  TORCH_CHECK(!xa.empty(), op, ": needs at least one layer");
  TORCH_CHECK(xa.size() == ga.size() && xa.size() == xb.size() && xa.size() == gb.size(), op,
              ": xa, ga, xb, gb must have one entry per layer, got ", xa.size(), ", ", ga.size(), ", ", xb.size(),
              ", ", gb.size());
  LayerLists out;
  for (size_t l = 0; l < xa.size(); ++l) {
    const std::string where = "layer " + std::to_string(l) + ":";
    auto x_a = as_3d(xa[l], op, "xa").contiguous(), g_a = as_3d(ga[l], op, "ga").contiguous();
    auto x_b = as_3d(xb[l], op, "xb").contiguous(), g_b = as_3d(gb[l], op, "gb").contiguous();
    check_float(x_a, op, "xa");
    check_layer_pair(x_a, g_a, op, where + " (a side)");
    check_layer_pair(x_b, g_b, op, where + " (b side)");
    TORCH_CHECK(x_a.size(2) == x_b.size(2), op, ": ", where, " xa and xb disagree on d_in: ", x_a.size(2), " vs ",
                x_b.size(2));
    TORCH_CHECK(g_a.size(2) == g_b.size(2), op, ": ", where, " ga and gb disagree on d_out: ", g_a.size(2), " vs ",
                g_b.size(2));
    TORCH_CHECK(x_a.scalar_type() == x_b.scalar_type() && x_a.device() == x_b.device(), op, ": ", where,
                " a and b sides differ in dtype or device");
    if (l == 0) {
      out.n = x_a.size(0);
      out.m = x_b.size(0);
    } else {
      TORCH_CHECK(x_a.size(0) == out.n, op, ": ", where, " has N=", x_a.size(0), " but layer 0 has N=", out.n);
      TORCH_CHECK(x_b.size(0) == out.m, op, ": ", where, " has M=", x_b.size(0), " but layer 0 has M=", out.m);
      TORCH_CHECK(x_a.scalar_type() == out.xa[0].scalar_type() && x_a.device() == out.xa[0].device(), op, ": ",
                  where, " dtype or device differs from layer 0");
    }
    out.xa.push_back(x_a);
    out.ga.push_back(g_a);
    out.xb.push_back(x_b);
    out.gb.push_back(g_b);
  }
  return out;
}

enum class Reduce { None, Sum, Mean, Max, Min, CountGt };

inline Reduce parse_reduce(const std::string& reduce) {
  if (reduce == "none") return Reduce::None;
  if (reduce == "sum") return Reduce::Sum;
  if (reduce == "mean") return Reduce::Mean;
  if (reduce == "max") return Reduce::Max;
  if (reduce == "min") return Reduce::Min;
  if (reduce == "count_gt") return Reduce::CountGt;
  TORCH_CHECK(false, "grad_sim_reduce: reduce must be one of none, sum, mean, max, min, count_gt; got '", reduce, "'");
}

inline const char* reduce_name(Reduce r) {
  switch (r) {
    case Reduce::None: return "none";
    case Reduce::Sum: return "sum";
    case Reduce::Mean: return "mean";
    case Reduce::Max: return "max";
    case Reduce::Min: return "min";
    default: return "count_gt";
  }
}

// grad_sim_reduce's output, [N, M] for reduce='none' and [N] otherwise, in the accumulation dtype. Sets `done` when
// there is nothing to compute (N = 0 or M = 0) and `out` is already the answer: a reduction over no targets is 0 for
// sum and count_gt, and undefined (an error) for mean, max and min.
inline at::Tensor sim_output(const LayerLists& L, Reduce reduce, bool& done) {
  const int64_t n = L.n, m = L.m;
  auto opts = L.xa[0].options().dtype(score_dtype(L.xa[0].scalar_type()));
  at::Tensor out = reduce == Reduce::None ? at::empty({n, m}, opts) : at::empty({n}, opts);
  done = n == 0 || m == 0;
  // a float32 count stops growing at 2^24: refuse rather than return a wrong count
  TORCH_CHECK(reduce != Reduce::CountGt || opts.dtype() == at::kDouble || m <= (int64_t{1} << 24),
              "grad_sim_reduce: reduce='count_gt' over M=", m, " > 2^24 targets needs float64 inputs (a float32 count "
              "is exact only up to 2^24)");
  if (m == 0 && reduce != Reduce::None) {
    TORCH_CHECK(reduce == Reduce::Sum || reduce == Reduce::CountGt, "grad_sim_reduce: reduce='", reduce_name(reduce),
                "' over M=0 targets is undefined");
    out.zero_();
  }
  return out;
}

}  // namespace fastattr
