// pybind11 module segcft._C_cuda: the CUDA soft-area kernels over raw device pointers.
//
// Same signatures as segcft._C plus a trailing `stream` (the integer cudaStream_t of the
// caller, e.g. torch.cuda.current_stream(device).cuda_stream). CUDA failures raise
// RuntimeError with the CUDA error string; invalid arguments raise ValueError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "cuda/soft_area_cuda.h"

namespace py = pybind11;

namespace {

segcft::cuda::SoftAreaArgs make_args(std::uintptr_t logits_ptr, int dtype,
                                     std::vector<std::int64_t> shape,
                                     std::vector<std::int64_t> strides,
                                     std::uintptr_t regions_ptr,
                                     std::vector<std::int64_t> region_strides,
                                     std::int64_t num_regions, int activation,
                                     std::uintptr_t stream) {
  segcft::cuda::SoftAreaArgs args;
  args.logits = logits_ptr;
  args.dtype = dtype;
  args.shape = std::move(shape);
  args.strides = std::move(strides);
  args.regions = regions_ptr;
  args.region_strides = std::move(region_strides);
  args.num_regions = num_regions;
  args.activation = activation;
  args.stream = stream;
  return args;
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "CUDA soft-area kernels of segcft (raw device pointers, no libtorch).";

  m.def(
      "soft_area_forward",
      [](std::uintptr_t logits_ptr, int dtype, std::vector<std::int64_t> shape,
         std::vector<std::int64_t> strides, std::uintptr_t regions_ptr,
         std::vector<std::int64_t> region_strides, std::int64_t num_regions, int activation,
         std::uintptr_t out_ptr, std::uintptr_t stream) {
        segcft::cuda::soft_area_forward(
            make_args(logits_ptr, dtype, std::move(shape), std::move(strides), regions_ptr,
                      std::move(region_strides), num_regions, activation, stream),
            out_ptr);
      },
      py::arg("logits_ptr"), py::arg("dtype"), py::arg("shape"), py::arg("strides"),
      py::arg("regions_ptr"), py::arg("region_strides"), py::arg("num_regions"),
      py::arg("activation"), py::arg("out_ptr"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      "Raw per-class (per-region) sums of probabilities into a float32 contiguous "
      "(B, C, max(R, 1)) buffer, enqueued on `stream`; deterministic.");

  m.def(
      "soft_area_backward",
      [](std::uintptr_t logits_ptr, int dtype, std::vector<std::int64_t> shape,
         std::vector<std::int64_t> strides, std::uintptr_t regions_ptr,
         std::vector<std::int64_t> region_strides, std::int64_t num_regions, int activation,
         std::uintptr_t grad_ptr, std::uintptr_t grad_logits_ptr, std::uintptr_t stream) {
        segcft::cuda::soft_area_backward(
            make_args(logits_ptr, dtype, std::move(shape), std::move(strides), regions_ptr,
                      std::move(region_strides), num_regions, activation, stream),
            grad_ptr, grad_logits_ptr);
      },
      py::arg("logits_ptr"), py::arg("dtype"), py::arg("shape"), py::arg("strides"),
      py::arg("regions_ptr"), py::arg("region_strides"), py::arg("num_regions"),
      py::arg("activation"), py::arg("grad_ptr"), py::arg("grad_logits_ptr"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      "dL/dlogits into a contiguous (B, C, *S) buffer of the logits dtype from a float32 "
      "contiguous (B, C, max(R, 1)) gradient of the raw sums, enqueued on `stream`.");
}
