// pybind11 module segcft._C: CPU soft-area kernels over raw data pointers (no libtorch).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "cpu/area_loss.h"
#include "soft_area.h"

namespace py = pybind11;

namespace {

using segcft::cpu::LossTerms;

std::size_t out_numel(const segcft::Problem& p) {
  return static_cast<std::size_t>(p.batch * p.channels * p.region_slots());
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
  int64_t id_range[2];
  {
    py::gil_scoped_release release;
    forward_scaled(p, reinterpret_cast<void*>(out_ptr), num_threads, scale, id_range);
  }
  if (p.regions == nullptr) return py::none();
  return py::make_tuple(id_range[0], id_range[1]);
}

// Runs the backward kernel with grad * scale (scale 1: grad as given).
template <class S>
void backward_scaled(segcft::Problem p, const S* grad, double scale, int num_threads) {
  std::vector<S> scaled;
  if (scale != 1.0) {
    const std::size_t n = out_numel(p);
    scaled.resize(n);
    const S s = static_cast<S>(scale);
    for (std::size_t i = 0; i < n; ++i) scaled[i] = grad[i] * s;
    grad = scaled.data();
  }
  p.grad = grad;
  segcft::cpu::soft_area_backward(p, num_threads);
}

void backward(std::uintptr_t logits_ptr, int dtype, const std::vector<int64_t>& shape,
              const std::vector<int64_t>& strides, std::uintptr_t regions_ptr,
              const std::vector<int64_t>& region_strides, int64_t num_regions, int activation,
              std::uintptr_t grad_ptr, std::uintptr_t grad_logits_ptr, int num_threads, double scale) {
  segcft::Problem p = segcft::make_problem(logits_ptr, dtype, shape, strides, regions_ptr,
                                           region_strides, num_regions, activation);
  p.grad_logits = reinterpret_cast<void*>(grad_logits_ptr);
  py::gil_scoped_release release;
  if (p.dtype == segcft::DType::Float64) {
    backward_scaled(p, reinterpret_cast<const double*>(grad_ptr), scale, num_threads);
  } else {
    backward_scaled(p, reinterpret_cast<const float*>(grad_ptr), scale, num_threads);
  }
}

LossTerms loss_terms(const segcft::Problem& p, std::uintptr_t index_ptr, int64_t k, std::uintptr_t targets_ptr,
                     std::uintptr_t weights_ptr, std::uintptr_t scale_ptr, int penalty, double huber_delta) {
  if (penalty < 0 || penalty > 2) throw std::invalid_argument("penalty must be 0 (l1), 1 (l2) or 2 (huber)");
  if (k < 0) throw std::invalid_argument("k must be >= 0");
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

// Soft areas and the loss in one call. Checks the index rows first (class in [0, C), region in
// [-1, R)) and returns ("index", class_lo, class_hi, region_lo, region_hi) without touching the
// logits when one is out of range; after the kernel, ("regions", lo, hi) when a region id is out
// of [0, R) (the loss is then not computed); None when all is well.
py::object loss_forward(std::uintptr_t logits_ptr, int dtype, const std::vector<int64_t>& shape,
                        const std::vector<int64_t>& strides, std::uintptr_t regions_ptr,
                        const std::vector<int64_t>& region_strides, int64_t num_regions, int activation,
                        std::uintptr_t areas_ptr, int num_threads, double voxel_volume, std::uintptr_t index_ptr,
                        int64_t k, std::uintptr_t targets_ptr, std::uintptr_t weights_ptr, std::uintptr_t scale_ptr,
                        int penalty, double huber_delta, std::uintptr_t loss_ptr) {
  const segcft::Problem p = segcft::make_problem(logits_ptr, dtype, shape, strides, regions_ptr,
                                                 region_strides, num_regions, activation);
  const LossTerms t = loss_terms(p, index_ptr, k, targets_ptr, weights_ptr, scale_ptr, penalty, huber_delta);
  if (k > 0) {
    int64_t r[4];
    segcft::cpu::index_ranges(t, r);
    if (r[0] < 0 || r[1] >= p.channels || r[2] < -1 || r[3] >= num_regions)
      return py::make_tuple("index", r[0], r[1], r[2], r[3]);
  }
  int64_t id_range[2];
  {
    py::gil_scoped_release release;
    forward_scaled(p, reinterpret_cast<void*>(areas_ptr), num_threads, voxel_volume, id_range);
  }
  if (p.regions != nullptr && p.batch * p.spatial_numel() > 0 && (id_range[0] < 0 || id_range[1] >= num_regions))
    return py::make_tuple("regions", id_range[0], id_range[1]);
  if (p.dtype == segcft::DType::Float64) {
    *reinterpret_cast<double*>(loss_ptr) =
        segcft::cpu::area_loss_value(t, reinterpret_cast<const double*>(areas_ptr));
  } else {
    *reinterpret_cast<float*>(loss_ptr) = segcft::cpu::area_loss_value(t, reinterpret_cast<const float*>(areas_ptr));
  }
  return py::none();
}

// dL/dlogits of the loss (areas as returned by loss_forward; grad_areas_ptr 0 when the areas
// output has no gradient).
void loss_backward(std::uintptr_t logits_ptr, int dtype, const std::vector<int64_t>& shape,
                   const std::vector<int64_t>& strides, std::uintptr_t regions_ptr,
                   const std::vector<int64_t>& region_strides, int64_t num_regions, int activation,
                   std::uintptr_t grad_logits_ptr, int num_threads, double voxel_volume, std::uintptr_t areas_ptr,
                   std::uintptr_t index_ptr, int64_t k, std::uintptr_t targets_ptr, std::uintptr_t weights_ptr,
                   std::uintptr_t scale_ptr, int penalty, double huber_delta, double grad_loss,
                   std::uintptr_t grad_areas_ptr) {
  segcft::Problem p = segcft::make_problem(logits_ptr, dtype, shape, strides, regions_ptr, region_strides,
                                           num_regions, activation);
  const LossTerms t = loss_terms(p, index_ptr, k, targets_ptr, weights_ptr, scale_ptr, penalty, huber_delta);
  p.grad_logits = reinterpret_cast<void*>(grad_logits_ptr);
  py::gil_scoped_release release;
  if (p.dtype == segcft::DType::Float64) {
    const auto g = segcft::cpu::area_loss_grad(t, reinterpret_cast<const double*>(areas_ptr), grad_loss,
                                               reinterpret_cast<const double*>(grad_areas_ptr), voxel_volume);
    p.grad = g.data();
    segcft::cpu::soft_area_backward(p, num_threads);
  } else {
    const auto g = segcft::cpu::area_loss_grad(t, reinterpret_cast<const float*>(areas_ptr), grad_loss,
                                               reinterpret_cast<const float*>(grad_areas_ptr), voxel_volume);
    p.grad = g.data();
    segcft::cpu::soft_area_backward(p, num_threads);
  }
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
        py::arg("scale") = 1.0, "dL/dlogits (contiguous, logits dtype) from dL/d(raw sums) = grad * scale.");
  m.def("area_loss_forward", &loss_forward,
        "Areas (raw sums times voxel_volume) and the area loss into loss_ptr (0-dim, areas' type) in one "
        "call; targets, weights and scale contiguous in the areas' type, index contiguous int64 (K, 2). "
        "Returns None, or ('index', ...) / ('regions', lo, hi) with the ranges found when ids are out of range.");
  m.def("area_loss_backward", &loss_backward,
        "dL/dlogits of the area loss for dL/dloss = grad_loss (plus grad_areas on the areas output, "
        "grad_areas_ptr 0 for none).");
  m.def("cpu_isa", &segcft::cpu::active_isa,
        "Instruction set the kernels use on this CPU: avx512, avx2 or scalar (SEGCFT_CPU_ISA lowers it).");
}
