// pybind11 module segcft._C: CPU soft-area kernels over raw data pointers (no libtorch).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "soft_area.h"

namespace py = pybind11;

namespace {

py::object forward(std::uintptr_t logits_ptr, int dtype, const std::vector<int64_t>& shape,
                   const std::vector<int64_t>& strides, std::uintptr_t regions_ptr,
                   const std::vector<int64_t>& region_strides, int64_t num_regions, int activation,
                   std::uintptr_t out_ptr, int num_threads) {
  const segcft::Problem p = segcft::make_problem(logits_ptr, dtype, shape, strides, regions_ptr,
                                                 region_strides, num_regions, activation);
  int64_t id_range[2];
  {
    py::gil_scoped_release release;
    segcft::cpu::soft_area_forward(p, reinterpret_cast<void*>(out_ptr), num_threads, id_range);
  }
  if (p.regions == nullptr) return py::none();
  return py::make_tuple(id_range[0], id_range[1]);
}

void backward(std::uintptr_t logits_ptr, int dtype, const std::vector<int64_t>& shape,
              const std::vector<int64_t>& strides, std::uintptr_t regions_ptr,
              const std::vector<int64_t>& region_strides, int64_t num_regions, int activation,
              std::uintptr_t grad_ptr, std::uintptr_t grad_logits_ptr, int num_threads) {
  segcft::Problem p = segcft::make_problem(logits_ptr, dtype, shape, strides, regions_ptr,
                                           region_strides, num_regions, activation);
  p.grad = reinterpret_cast<const void*>(grad_ptr);
  p.grad_logits = reinterpret_cast<void*>(grad_logits_ptr);
  py::gil_scoped_release release;
  segcft::cpu::soft_area_backward(p, num_threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "segcft CPU soft-area kernels (raw pointers, shapes and element strides).";
  m.def("soft_area_forward", &forward, py::arg("logits_ptr"), py::arg("dtype"), py::arg("shape"),
        py::arg("strides"), py::arg("regions_ptr"), py::arg("region_strides"), py::arg("num_regions"),
        py::arg("activation"), py::arg("out_ptr"), py::arg("num_threads"),
        "Raw sums of probabilities into contiguous float32 (B, C, max(R,1)) (float64 for dtype 3); "
        "returns (min, max) of the region ids read with a region map (None without one; "
        "(2**63 - 1, -2**63) when no id was read).");
  m.def("soft_area_backward", &backward, py::arg("logits_ptr"), py::arg("dtype"), py::arg("shape"),
        py::arg("strides"), py::arg("regions_ptr"), py::arg("region_strides"), py::arg("num_regions"),
        py::arg("activation"), py::arg("grad_ptr"), py::arg("grad_logits_ptr"), py::arg("num_threads"),
        "dL/dlogits (contiguous, logits dtype) from dL/d(raw sums).");
  m.def("cpu_isa", &segcft::cpu::active_isa,
        "Instruction set the kernels use on this CPU: avx512, avx2 or scalar (SEGCFT_CPU_ISA lowers it).");
}
