// Host interface of the CUDA soft-area kernels (docs/method.md section 4).
//
// Tensors cross as raw device pointers, shapes and element strides, so neither this header nor
// the kernels depend on libtorch. All work is enqueued on the caller's stream.
#pragma once

#include <cstdint>
#include <vector>

namespace segcft::cuda {

/// Largest region count R (the same bound as the CPU kernels, csrc/soft_area.h): the forward keeps
/// C x R partial sums per block, so a stray label value must be refused rather than allocated.
constexpr std::int64_t kMaxRegions = 4096;

/// Description of the logits (and optional region map) shared by forward and backward.
struct SoftAreaArgs {
  std::uintptr_t logits = 0;                 // device pointer to (B, C, *S) logits
  int dtype = 0;                             // 0 float32, 1 float16, 2 bfloat16
  std::vector<std::int64_t> shape;           // [B, C, *S] with 1-3 spatial dims
  std::vector<std::int64_t> strides;         // element strides of the logits, same length
  std::uintptr_t regions = 0;                // device pointer to an int64 (B, *S) map, or 0
  std::vector<std::int64_t> region_strides;  // element strides of the map [b, *s]
  std::int64_t num_regions = 0;              // 0 means no region map
  int activation = 0;                        // 0 softmax over C, 1 sigmoid per class
  std::uintptr_t stream = 0;                 // cudaStream_t of the caller
};

/// Writes out[b, c, r] = sum over voxels s of region r of p[b, c, s] into a float32,
/// contiguous (B, C, max(R, 1)) buffer; deterministic (fixed-order two-pass reduction).
/// Voxels whose region value lies outside [0, R) contribute nothing.
void soft_area_forward(const SoftAreaArgs& args, std::uintptr_t out);

/// Writes dL/dlogits into a contiguous (B, C, *S) buffer of the logits dtype, given
/// grad = dL/d(out) as a float32 contiguous (B, C, max(R, 1)) buffer.
void soft_area_backward(const SoftAreaArgs& args, std::uintptr_t grad, std::uintptr_t grad_logits);

}  // namespace segcft::cuda
