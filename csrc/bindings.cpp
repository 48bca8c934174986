// pybind11 module segcft._C: CPU soft-area kernels over raw data pointers (no libtorch).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/area_loss.h"
#include "soft_area.h"

namespace py = pybind11;

namespace {

using segcft::cpu::LossTerms;

std::size_t out_numel(const segcft::Problem& p) {
  return static_cast<std::size_t>(p.batch * p.channels * p.region_slots());
}

// Scalars that multiply the sums or divide a difference must be finite and > 0.
void check_positive(double value, const char* name) {
  if (!(std::isfinite(value) && value > 0))
    throw std::invalid_argument(std::string(name) + " must be finite and > 0, got " + std::to_string(value));
}

void check_ptr(std::uintptr_t ptr, const char* name) {
  if (ptr == 0) throw std::invalid_argument(std::string(name) + " is null");
}

// ("regions", lo, hi) when the ids a kernel read leave [0, R), else None (also when it read none:
// the range is then (INT64_MAX, INT64_MIN)).
py::object region_error(const segcft::Problem& p, const int64_t id_range[2]) {
  if (p.regions != nullptr && (id_range[0] < 0 || id_range[1] >= p.num_regions))
    return py::make_tuple("regions", id_range[0], id_range[1]);
  return py::none();
}

// Raw sums into out, then out *= scale in the accumulation type (as a tensor times a number).
void forward_scaled(const segcft::Problem& p, void* out, int num_threads, double scale, int64_t* id_range) {
  segcft::cpu::soft_area_forward(p, out, num_threads, id_range);
  if (scale == 1.0) return;
  const std::size_t n = out_numel(p);
  if (p.dtype == segcft::DType::Float64) {
    double* o = static_cast<double*>(out);
    for (std::size_t i = 0; i < n; ++i) o[i] *= scale;
  } else {
    float* o = static_cast<float*>(out);
    const float s = static_cast<float>(scale);
    for (std::size_t i = 0; i < n; ++i) o[i] *= s;
  }
}

py::object forward(std::uintptr_t logits_ptr, int dtype, const std::vector<int64_t>& shape,
                   const std::vector<int64_t>& strides, std::uintptr_t regions_ptr,
                   const std::vector<int64_t>& region_strides, int64_t num_regions, int activation,
                   std::uintptr_t out_ptr, int num_threads, double scale) {
  const segcft::Problem p = segcft::make_problem(logits_ptr, dtype, shape, strides, regions_ptr,
                                                 region_strides, num_regions, activation);
  check_positive(scale, "scale");
  if (out_numel(p) > 0) check_ptr(out_ptr, "out_ptr");
  int64_t id_range[2];
  {
    py::gil_scoped_release release;
    forward_scaled(p, reinterpret_cast<void*>(out_ptr), num_threads, scale, id_range);
  }
  if (p.regions == nullptr) return py::none();
  return py::make_tuple(id_range[0], id_range[1]);
}

// Runs the backward kernel with grad * scale (scale 1: grad as given); id_range as the forward's.
template <class S>
void backward_scaled(segcft::Problem p, const S* grad, double scale, int num_threads, int64_t* id_range) {
  std::vector<S> scaled;
  if (scale != 1.0) {
    const std::size_t n = out_numel(p);
    scaled.resize(n);
    const S s = static_cast<S>(scale);
    for (std::size_t i = 0; i < n; ++i) scaled[i] = grad[i] * s;
    grad = scaled.data();
  }
  p.grad = grad;
  segcft::cpu::soft_area_backward(p, num_threads, id_range);
}

// Returns ("regions", lo, hi) when the map holds ids outside [0, R) (the gradient is then
// incomplete), else None.
py::object backward(std::uintptr_t logits_ptr, int dtype, const std::vector<int64_t>& shape,
                    const std::vector<int64_t>& strides, std::uintptr_t regions_ptr,
                    const std::vector<int64_t>& region_strides, int64_t num_regions, int activation,
                    std::uintptr_t grad_ptr, std::uintptr_t grad_logits_ptr, int num_threads, double scale) {
  segcft::Problem p = segcft::make_problem(logits_ptr, dtype, shape, strides, regions_ptr,
                                           region_strides, num_regions, activation);
  check_positive(scale, "scale");
  if (p.batch * p.channels * p.spatial_numel() > 0) {
    check_ptr(grad_ptr, "grad_ptr");
    check_ptr(grad_logits_ptr, "grad_logits_ptr");
  }
  p.grad_logits = reinterpret_cast<void*>(grad_logits_ptr);
  int64_t id_range[2];
  {
    py::gil_scoped_release release;
    if (p.dtype == segcft::DType::Float64) {
      backward_scaled(p, reinterpret_cast<const double*>(grad_ptr), scale, num_threads, id_range);
    } else {
      backward_scaled(p, reinterpret_cast<const float*>(grad_ptr), scale, num_threads, id_range);
    }
  }
  return region_error(p, id_range);
}

LossTerms loss_terms(const segcft::Problem& p, std::uintptr_t index_ptr, int64_t k, std::uintptr_t targets_ptr,
                     std::uintptr_t weights_ptr, std::uintptr_t scale_ptr, int penalty, double huber_delta) {
  if (penalty < 0 || penalty > 2) throw std::invalid_argument("penalty must be 0 (l1), 1 (l2) or 2 (huber)");
  if (k < 0) throw std::invalid_argument("k must be >= 0");
  check_positive(huber_delta, "huber_delta");
  if (k > 0) {
    check_ptr(index_ptr, "index_ptr");
    check_ptr(scale_ptr, "scale_ptr");
    if (p.batch > 0) {
      check_ptr(targets_ptr, "targets_ptr");
      check_ptr(weights_ptr, "weights_ptr");
    }
  }
  LossTerms t;
  t.batch = p.batch;
  t.channels = p.channels;
  t.region_slots = p.region_slots();
  t.k = k;
  t.index = reinterpret_cast<const int64_t*>(index_ptr);
  t.targets = reinterpret_cast<const void*>(targets_ptr);
  t.weights = reinterpret_cast<const void*>(weights_ptr);
  t.scale = reinterpret_cast<const void*>(scale_ptr);
  t.penalty = static_cast<segcft::cpu::Penalty>(penalty);
  t.huber_delta = huber_delta;
  return t;
}

template <class S>
py::object scale_error(const LossTerms& t) {
  const S* s = static_cast<const S*>(t.scale);
  for (int64_t k = 0; k < t.k; ++k)
    if (!(std::isfinite(s[k]) && s[k] > S(0))) return py::make_tuple("scale", k, static_cast<double>(s[k]));
  return py::none();
}

// ("index", class_lo, class_hi, region_lo, region_hi) when an index row is out of range (class
// in [0, C), region in [-1, R) and -1 without a map), ("scale", k, value) when scale[k] is not
// finite and > 0, else None. O(K): runs before any kernel.
py::object loss_input_error(const segcft::Problem& p, const LossTerms& t) {
  if (t.k > 0) {
    int64_t r[4];
    segcft::cpu::index_ranges(t, r);
    if (r[0] < 0 || r[1] >= p.channels || r[2] < -1 || r[3] >= p.num_regions)
      return py::make_tuple("index", r[0], r[1], r[2], r[3]);
  }
  return p.dtype == segcft::DType::Float64 ? scale_error<double>(t) : scale_error<float>(t);
}

// Soft areas and the loss in one call. Checks the loss inputs first (see loss_input_error) and
// returns their error tuple without touching the logits; after the kernel, ("regions", lo, hi)
// when a region id is out of [0, R) (the loss is then not computed); None when all is well.
py::object loss_forward(std::uintptr_t logits_ptr, int dtype, const std::vector<int64_t>& shape,
                        const std::vector<int64_t>& strides, std::uintptr_t regions_ptr,
                        const std::vector<int64_t>& region_strides, int64_t num_regions, int activation,
                        std::uintptr_t areas_ptr, int num_threads, double voxel_volume, std::uintptr_t index_ptr,
                        int64_t k, std::uintptr_t targets_ptr, std::uintptr_t weights_ptr, std::uintptr_t scale_ptr,
                        int penalty, double huber_delta, std::uintptr_t loss_ptr) {
  const segcft::Problem p = segcft::make_problem(logits_ptr, dtype, shape, strides, regions_ptr,
                                                 region_strides, num_regions, activation);
  const LossTerms t = loss_terms(p, index_ptr, k, targets_ptr, weights_ptr, scale_ptr, penalty, huber_delta);
  check_positive(voxel_volume, "voxel_volume");
  check_ptr(loss_ptr, "loss_ptr");
  if (out_numel(p) > 0) check_ptr(areas_ptr, "areas_ptr");
  py::object bad = loss_input_error(p, t);
  if (!bad.is_none()) return bad;
  int64_t id_range[2];
  {
    py::gil_scoped_release release;
    forward_scaled(p, reinterpret_cast<void*>(areas_ptr), num_threads, voxel_volume, id_range);
  }
  bad = region_error(p, id_range);
  if (!bad.is_none()) return bad;
  if (p.dtype == segcft::DType::Float64) {
    *reinterpret_cast<double*>(loss_ptr) =
        segcft::cpu::area_loss_value(t, reinterpret_cast<const double*>(areas_ptr));
  } else {
    *reinterpret_cast<float*>(loss_ptr) = segcft::cpu::area_loss_value(t, reinterpret_cast<const float*>(areas_ptr));
  }
  return py::none();
}

// dL/dlogits of the loss (areas as returned by loss_forward; grad_areas_ptr 0 when the areas
// output has no gradient). Returns None, or the error tuples of loss_forward (the index and scale
// before any work, the region ids after the kernel).
py::object loss_backward(std::uintptr_t logits_ptr, int dtype, const std::vector<int64_t>& shape,
                         const std::vector<int64_t>& strides, std::uintptr_t regions_ptr,
                         const std::vector<int64_t>& region_strides, int64_t num_regions, int activation,
                         std::uintptr_t grad_logits_ptr, int num_threads, double voxel_volume,
                         std::uintptr_t areas_ptr, std::uintptr_t index_ptr, int64_t k, std::uintptr_t targets_ptr,
                         std::uintptr_t weights_ptr, std::uintptr_t scale_ptr, int penalty, double huber_delta,
                         double grad_loss, std::uintptr_t grad_areas_ptr) {
  segcft::Problem p = segcft::make_problem(logits_ptr, dtype, shape, strides, regions_ptr, region_strides,
                                           num_regions, activation);
  const LossTerms t = loss_terms(p, index_ptr, k, targets_ptr, weights_ptr, scale_ptr, penalty, huber_delta);
  check_positive(voxel_volume, "voxel_volume");
  if (out_numel(p) > 0) check_ptr(areas_ptr, "areas_ptr");
  if (p.batch * p.channels * p.spatial_numel() > 0) check_ptr(grad_logits_ptr, "grad_logits_ptr");
  const py::object bad = loss_input_error(p, t);
  if (!bad.is_none()) return bad;
  p.grad_logits = reinterpret_cast<void*>(grad_logits_ptr);
  int64_t id_range[2];
  {
    py::gil_scoped_release release;
    if (p.dtype == segcft::DType::Float64) {
      const auto g = segcft::cpu::area_loss_grad(t, reinterpret_cast<const double*>(areas_ptr), grad_loss,
                                                 reinterpret_cast<const double*>(grad_areas_ptr), voxel_volume);
      p.grad = g.data();
      segcft::cpu::soft_area_backward(p, num_threads, id_range);
    } else {
      const auto g = segcft::cpu::area_loss_grad(t, reinterpret_cast<const float*>(areas_ptr), grad_loss,
                                                 reinterpret_cast<const float*>(grad_areas_ptr), voxel_volume);
      p.grad = g.data();
      segcft::cpu::soft_area_backward(p, num_threads, id_range);
    }
  }
  return region_error(p, id_range);
}

void gelu_forward(std::uintptr_t x_ptr, std::uintptr_t y_ptr, std::uintptr_t dydx_ptr, int64_t n, int num_threads) {
  if (n < 0) throw std::invalid_argument("n must be >= 0, got " + std::to_string(n));
  if (n == 0) return;
  check_ptr(x_ptr, "x_ptr");
  check_ptr(y_ptr, "y_ptr");
  check_ptr(dydx_ptr, "dydx_ptr");
  py::gil_scoped_release release;
  segcft::cpu::gelu_forward(reinterpret_cast<const float*>(x_ptr), reinterpret_cast<float*>(y_ptr),
                            reinterpret_cast<float*>(dydx_ptr), n, num_threads);
}

void check_rows_dims(const char* name, int64_t rows, int64_t c, int64_t o) {
  if (rows < 0 || c <= 0 || o <= 0) throw std::invalid_argument(std::string(name) + ": rows must be >= 0 and c, o > 0");
}

void gelu_pointwise_forward(int64_t rows, int64_t c, int64_t o, std::uintptr_t x_ptr, std::uintptr_t w_ptr,
                            std::uintptr_t b_ptr, std::uintptr_t y_ptr, std::uintptr_t d_ptr, std::uintptr_t out_ptr,
                            int num_threads) {
  check_rows_dims("gelu_pointwise_forward", rows, c, o);
  check_ptr(w_ptr, "w_ptr");
  if (rows > 0) {
    check_ptr(x_ptr, "x_ptr");
    check_ptr(y_ptr, "y_ptr");
    check_ptr(d_ptr, "d_ptr");
    check_ptr(out_ptr, "out_ptr");
  }
  py::gil_scoped_release release;
  segcft::cpu::gelu_pointwise_forward(rows, c, o, reinterpret_cast<const float*>(x_ptr),
                                      reinterpret_cast<const float*>(w_ptr), reinterpret_cast<const float*>(b_ptr),
                                      reinterpret_cast<float*>(y_ptr), reinterpret_cast<float*>(d_ptr),
                                      reinterpret_cast<float*>(out_ptr), num_threads);
}

void gelu_pointwise_backward(int64_t rows, int64_t c, int64_t o, std::uintptr_t g_ptr, std::uintptr_t y_ptr,
                             std::uintptr_t d_ptr, std::uintptr_t w_ptr, std::uintptr_t gx_ptr, std::uintptr_t dw_ptr,
                             std::uintptr_t db_ptr, int num_threads) {
  check_rows_dims("gelu_pointwise_backward", rows, c, o);
  check_ptr(w_ptr, "w_ptr");
  check_ptr(dw_ptr, "dw_ptr");
  check_ptr(db_ptr, "db_ptr");
  if (rows > 0) {
    check_ptr(g_ptr, "g_ptr");
    check_ptr(y_ptr, "y_ptr");
    check_ptr(d_ptr, "d_ptr");
    check_ptr(gx_ptr, "gx_ptr");
  }
  py::gil_scoped_release release;
  segcft::cpu::gelu_pointwise_backward(rows, c, o, reinterpret_cast<const float*>(g_ptr),
                                       reinterpret_cast<const float*>(y_ptr), reinterpret_cast<const float*>(d_ptr),
                                       reinterpret_cast<const float*>(w_ptr), reinterpret_cast<float*>(gx_ptr),
                                       reinterpret_cast<float*>(dw_ptr), reinterpret_cast<float*>(db_ptr), num_threads);
}

void check_pointwise_dims(int64_t batch, int64_t s, int64_t c, int64_t o) {
  if (batch < 0 || s < 0 || c <= 0 || o <= 0)
    throw std::invalid_argument("pointwise: batch and positions must be >= 0 and c, o > 0");
}

void pointwise_cf_forward(int64_t batch, int64_t s, int64_t c, int64_t o, std::uintptr_t y_ptr, std::uintptr_t w_ptr,
                          std::uintptr_t b_ptr, std::uintptr_t out_ptr, int num_threads) {
  check_pointwise_dims(batch, s, c, o);
  check_ptr(w_ptr, "w_ptr");
  if (batch * s > 0) {
    check_ptr(y_ptr, "y_ptr");
    check_ptr(out_ptr, "out_ptr");
  }
  py::gil_scoped_release release;
  segcft::cpu::pointwise_cf_forward(batch, s, c, o, reinterpret_cast<const float*>(y_ptr),
                                    reinterpret_cast<const float*>(w_ptr), reinterpret_cast<const float*>(b_ptr),
                                    reinterpret_cast<float*>(out_ptr), num_threads);
}

void gelu_pointwise_cf_backward(int64_t batch, int64_t s, int64_t c, int64_t o, std::uintptr_t g_ptr,
                                std::uintptr_t y_ptr, std::uintptr_t d_ptr, std::uintptr_t w_ptr, std::uintptr_t gx_ptr,
                                std::uintptr_t dw_ptr, std::uintptr_t db_ptr, int num_threads) {
  check_pointwise_dims(batch, s, c, o);
  check_ptr(w_ptr, "w_ptr");
  check_ptr(dw_ptr, "dw_ptr");
  check_ptr(db_ptr, "db_ptr");
  if (batch * s > 0) {
    check_ptr(g_ptr, "g_ptr");
    check_ptr(y_ptr, "y_ptr");
    check_ptr(d_ptr, "d_ptr");
    check_ptr(gx_ptr, "gx_ptr");
  }
  py::gil_scoped_release release;
  segcft::cpu::gelu_pointwise_cf_backward(
      batch, s, c, o, reinterpret_cast<const float*>(g_ptr), reinterpret_cast<const float*>(y_ptr),
      reinterpret_cast<const float*>(d_ptr), reinterpret_cast<const float*>(w_ptr), reinterpret_cast<float*>(gx_ptr),
      reinterpret_cast<float*>(dw_ptr), reinterpret_cast<float*>(db_ptr), num_threads);
}

const float* opt_ptr(std::uintptr_t ptr) { return reinterpret_cast<const float*>(ptr); }

void check_latent_dims(int64_t batch, int64_t rows, int64_t z, int64_t p) {
  if (batch < 0 || rows < 0 || z <= 0 || p < 2 * z)
    throw std::invalid_argument("latent: batch and rows must be >= 0, z > 0 and p >= 2 z");
}

void latent_forward(int64_t batch, int64_t rows, int64_t z, int64_t p, std::uintptr_t post_ptr,
                    std::uintptr_t prior_ptr, std::uintptr_t eps_ptr, std::uintptr_t z_ptr, std::uintptr_t feat_ptr,
                    std::uintptr_t kl_ptr, double t, int num_threads) {
  check_latent_dims(batch, rows, z, p);
  if (batch > 0) check_ptr(kl_ptr, "kl_ptr");
  if (batch * rows > 0) {
    check_ptr(post_ptr, "post_ptr");
    check_ptr(prior_ptr, "prior_ptr");
    check_ptr(eps_ptr, "eps_ptr");
    check_ptr(z_ptr, "z_ptr");
  }
  py::gil_scoped_release release;
  segcft::cpu::latent_forward(batch, rows, z, p, opt_ptr(post_ptr), opt_ptr(prior_ptr), opt_ptr(eps_ptr),
                              reinterpret_cast<float*>(z_ptr), reinterpret_cast<float*>(feat_ptr),
                              reinterpret_cast<float*>(kl_ptr), static_cast<float>(t), num_threads);
}

void latent_backward(int64_t batch, int64_t rows, int64_t z, int64_t p, std::uintptr_t post_ptr,
                     std::uintptr_t prior_ptr, std::uintptr_t eps_ptr, std::uintptr_t gz_ptr, std::uintptr_t gkl_ptr,
                     std::uintptr_t gfeat_ptr, std::uintptr_t dpost_ptr, std::uintptr_t dprior_ptr, double t,
                     int num_threads) {
  check_latent_dims(batch, rows, z, p);
  if (batch * rows > 0) {
    check_ptr(post_ptr, "post_ptr");
    check_ptr(prior_ptr, "prior_ptr");
    check_ptr(eps_ptr, "eps_ptr");
    check_ptr(dpost_ptr, "dpost_ptr");
    check_ptr(dprior_ptr, "dprior_ptr");
  }
  py::gil_scoped_release release;
  segcft::cpu::latent_backward(batch, rows, z, p, opt_ptr(post_ptr), opt_ptr(prior_ptr), opt_ptr(eps_ptr),
                               opt_ptr(gz_ptr), opt_ptr(gkl_ptr), opt_ptr(gfeat_ptr),
                               reinterpret_cast<float*>(dpost_ptr), reinterpret_cast<float*>(dprior_ptr),
                               static_cast<float>(t), num_threads);
}

void check_conv_dims(int64_t batch, int64_t ci, int64_t co, int64_t d, int64_t h, int64_t w, bool d3) {
  if (batch < 0 || ci <= 0 || co <= 0 || d < 0 || h < 0 || w < 0)
    throw std::invalid_argument("conv3x3: the batch and voxel counts must be >= 0 and ci, co > 0");
  if (!d3 && d != 1) throw std::invalid_argument("conv3x3: a 2D convolution needs d == 1");
}

bool conv3x3_forward(int64_t batch, int64_t ci, int64_t co, int64_t d, int64_t h, int64_t w, bool d3,
                     bool channels_last, std::uintptr_t x_ptr, std::uintptr_t weight_ptr, std::uintptr_t bias_ptr,
                     std::uintptr_t y_ptr, int num_threads) {
  check_conv_dims(batch, ci, co, d, h, w, d3);
  check_ptr(weight_ptr, "weight_ptr");
  if (batch * d * h * w > 0) {
    check_ptr(x_ptr, "x_ptr");
    check_ptr(y_ptr, "y_ptr");
  }
  py::gil_scoped_release release;
  return segcft::cpu::conv3x3_forward(batch, ci, co, d, h, w, d3, channels_last,
                                      reinterpret_cast<const float*>(x_ptr), reinterpret_cast<const float*>(weight_ptr),
                                      reinterpret_cast<const float*>(bias_ptr), reinterpret_cast<float*>(y_ptr),
                                      num_threads);
}

bool conv3x3_backward(int64_t batch, int64_t ci, int64_t co, int64_t d, int64_t h, int64_t w, bool d3,
                      bool channels_last, std::uintptr_t x_ptr, std::uintptr_t weight_ptr, std::uintptr_t gy_ptr,
                      std::uintptr_t gx_ptr, std::uintptr_t dw_ptr, std::uintptr_t db_ptr, int num_threads,
                      std::uintptr_t mult_ptr) {
  check_conv_dims(batch, ci, co, d, h, w, d3);
  check_ptr(weight_ptr, "weight_ptr");
  check_ptr(dw_ptr, "dw_ptr");
  check_ptr(db_ptr, "db_ptr");
  if (batch * d * h * w > 0) {
    check_ptr(x_ptr, "x_ptr");
    check_ptr(gy_ptr, "gy_ptr");
  }
  py::gil_scoped_release release;
  return segcft::cpu::conv3x3_backward(batch, ci, co, d, h, w, d3, channels_last,
                                       reinterpret_cast<const float*>(x_ptr),
                                       reinterpret_cast<const float*>(weight_ptr),
                                       reinterpret_cast<const float*>(gy_ptr), reinterpret_cast<float*>(gx_ptr),
                                       reinterpret_cast<float*>(dw_ptr), reinterpret_cast<float*>(db_ptr),
                                       num_threads, reinterpret_cast<const float*>(mult_ptr));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "segcft CPU soft-area kernels (raw pointers, shapes and element strides).";
  m.def("soft_area_forward", &forward, py::arg("logits_ptr"), py::arg("dtype"), py::arg("shape"),
        py::arg("strides"), py::arg("regions_ptr"), py::arg("region_strides"), py::arg("num_regions"),
        py::arg("activation"), py::arg("out_ptr"), py::arg("num_threads"), py::arg("scale") = 1.0,
        "Raw sums (times scale) of probabilities into contiguous float32 (B, C, max(R,1)) (float64 for dtype 3); "
        "returns (min, max) of the region ids read with a region map (None without one; "
        "(2**63 - 1, -2**63) when no id was read).");
  m.def("soft_area_backward", &backward, py::arg("logits_ptr"), py::arg("dtype"), py::arg("shape"),
        py::arg("strides"), py::arg("regions_ptr"), py::arg("region_strides"), py::arg("num_regions"),
        py::arg("activation"), py::arg("grad_ptr"), py::arg("grad_logits_ptr"), py::arg("num_threads"),
        py::arg("scale") = 1.0,
        "dL/dlogits (contiguous, logits dtype) from dL/d(raw sums) = grad * scale; returns None, or "
        "('regions', lo, hi) when the map holds ids outside [0, num_regions).");
  m.def("area_loss_forward", &loss_forward,
        "Areas (raw sums times voxel_volume) and the area loss into loss_ptr (0-dim, areas' type) in one "
        "call; targets, weights and scale contiguous in the areas' type, index contiguous int64 (K, 2). "
        "Returns None, or ('index', ...) / ('regions', lo, hi) with the ranges found when ids are out of range, "
        "or ('scale', k, value) when scale[k] is not finite and > 0.");
  m.def("area_loss_backward", &loss_backward,
        "dL/dlogits of the area loss for dL/dloss = grad_loss (plus grad_areas on the areas output, "
        "grad_areas_ptr 0 for none); returns None or the error tuples of area_loss_forward.");
  m.def("gelu_forward", &gelu_forward, py::arg("x_ptr"), py::arg("y_ptr"), py::arg("dydx_ptr"), py::arg("n"),
        py::arg("num_threads"),
        "GELU (erf form) of n contiguous float32 values into y, and its derivative into dydx, in one pass.");
  m.def("gelu_pointwise_forward", &gelu_pointwise_forward, py::arg("rows"), py::arg("c"), py::arg("o"),
        py::arg("x_ptr"), py::arg("w_ptr"), py::arg("b_ptr"), py::arg("y_ptr"), py::arg("d_ptr"), py::arg("out_ptr"),
        py::arg("num_threads"),
        "conv1x1(GELU(x), w) + b over rows channels-last positions (float32, contiguous): x [rows][c], w [o][c], "
        "b [o] (0: none) -> out [rows][o], with y = GELU(x) and d = GELU'(x) [rows][c] written for the backward; "
        "each chunk of rows is convolved while its GELU is in cache.");
  m.def("gelu_pointwise_backward", &gelu_pointwise_backward, py::arg("rows"), py::arg("c"), py::arg("o"),
        py::arg("g_ptr"), py::arg("y_ptr"), py::arg("d_ptr"), py::arg("w_ptr"), py::arg("gx_ptr"), py::arg("dw_ptr"),
        py::arg("db_ptr"), py::arg("num_threads"),
        "Backward of conv1x1(GELU(x)) over rows channels-last positions (float32, contiguous): from y = GELU(x), "
        "d = GELU'(x) [rows][c], the output gradient g [rows][o] and the weight w [o][c], the input gradient "
        "gx [rows][c], dw [o][c] and db [o] in one pass.");
  m.def("pointwise_cf_forward", &pointwise_cf_forward, py::arg("batch"), py::arg("s"), py::arg("c"), py::arg("o"),
        py::arg("y_ptr"), py::arg("w_ptr"), py::arg("b_ptr"), py::arg("out_ptr"), py::arg("num_threads"),
        "1x1 convolution of channels-first float32 images y [batch][c][s] with w [o][c] and bias b (b_ptr 0: "
        "none) into out [batch][o][s].");
  m.def("gelu_pointwise_cf_backward", &gelu_pointwise_cf_backward, py::arg("batch"), py::arg("s"), py::arg("c"),
        py::arg("o"), py::arg("g_ptr"), py::arg("y_ptr"), py::arg("d_ptr"), py::arg("w_ptr"), py::arg("gx_ptr"),
        py::arg("dw_ptr"), py::arg("db_ptr"), py::arg("num_threads"),
        "Backward of conv1x1(GELU(x)) for channels-first images: from y = GELU(x), d = GELU'(x) [batch][c][s] "
        "and g [batch][o][s], gx [batch][c][s], dw [o][c] and db [o] (summed image by image in order).");
  m.def("latent_forward", &latent_forward, py::arg("batch"), py::arg("rows"), py::arg("z"), py::arg("p"),
        py::arg("post_ptr"), py::arg("prior_ptr"), py::arg("eps_ptr"), py::arg("z_ptr"), py::arg("feat_ptr"),
        py::arg("kl_ptr"), py::arg("t"), py::arg("num_threads"),
        "Posterior sample z = q_loc + t exp(q_logscale) eps and per-image KL(q || p) of float32 channels-last "
        "rows: post [batch][rows][2z], prior [batch][rows][p] (its channels past 2z copied to feat unless "
        "feat_ptr is 0), eps and z [batch][rows][z], kl [batch].");
  m.def("latent_backward", &latent_backward, py::arg("batch"), py::arg("rows"), py::arg("z"), py::arg("p"),
        py::arg("post_ptr"), py::arg("prior_ptr"), py::arg("eps_ptr"), py::arg("gz_ptr"), py::arg("gkl_ptr"),
        py::arg("gfeat_ptr"), py::arg("dpost_ptr"), py::arg("dprior_ptr"), py::arg("t"), py::arg("num_threads"),
        "Gradients of latent_forward (gz, gkl, gfeat 0 for zero) into dpost and dprior.");
  m.def("conv3x3_forward", &conv3x3_forward, py::arg("batch"), py::arg("ci"), py::arg("co"), py::arg("d"),
        py::arg("h"), py::arg("w"), py::arg("d3"), py::arg("channels_last"), py::arg("x_ptr"), py::arg("weight_ptr"),
        py::arg("bias_ptr"), py::arg("y_ptr"), py::arg("num_threads"),
        "3x3 (d3: 3x3x3) convolution, stride 1, zero padding 1, of a float32 batch, channels-last or "
        "channels-first (d = 1 in 2D; contiguous weight [co][ci][(3)][3][3], bias_ptr 0 for none); False when "
        "(ci, co) has no kernel.");
  m.def("conv3x3_backward", &conv3x3_backward, py::arg("batch"), py::arg("ci"), py::arg("co"), py::arg("d"),
        py::arg("h"), py::arg("w"), py::arg("d3"), py::arg("channels_last"), py::arg("x_ptr"), py::arg("weight_ptr"),
        py::arg("gy_ptr"), py::arg("gx_ptr"), py::arg("dw_ptr"), py::arg("db_ptr"), py::arg("num_threads"),
        py::arg("mult_ptr") = 0,
        "Input (gx_ptr 0: skipped; multiplied by mult, laid out as x, unless mult_ptr is 0), weight and bias "
        "gradients of conv3x3_forward, summed over the batch in image order; False when (ci, co) has no kernel.");
  m.def("cpu_isa", &segcft::cpu::active_isa,
        "Instruction set the kernels use on this CPU: avx512, avx2 or scalar (SEGCFT_CPU_ISA lowers it).");
}
