// Soft area / soft volume kernels: shared declarations and conventions.
//
// Tensors cross from Python as raw data pointers plus shapes and element strides, so the
// extension neither includes nor links libtorch.
//
// Conventions (CPU module segcft._C and CUDA module segcft._C_cuda alike):
//   logits        (B, C, *S), 1 to 3 spatial axes S, any element strides, dtype DType.
//   regions       optional int64 map (B, *S), any element strides, ids in [0, R).
//   out           contiguous (B, C, max(R, 1)) raw sums of probabilities, float32 (float64 for
//                 float64 logits on the CPU); zero-initialised by the kernel.
//   grad          contiguous (B, C, max(R, 1)) dL/d(raw sum), same float type as out.
//   grad_logits   contiguous (B, C, *S), same dtype as the logits.
// Softmax backward: dL/dl[b,k,s] = p[b,k,s] (g[b,k,r(s)] - sum_c p[b,c,s] g[b,c,r(s)]);
// sigmoid backward: dL/dl[b,k,s] = g[b,k,r(s)] p (1 - p).
// Forward sums are accumulated in the compute precision inside fixed chunks of the flattened
// spatial axes and combined in chunk order, so results are bitwise identical for any number of
// threads. Region ids outside [0, R) are never used to index memory: both CPU kernels report the
// smallest and largest id they read, and the bindings reject a map with ids outside [0, R).
//
// The bindings check every argument they can see (ranks, signs, codes, scalars, region and index
// ranges); they cannot see the size of the memory behind a pointer, so the shapes and strides
// must describe the tensors the pointers come from (segcft/ops/_custom.py checks that).
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace segcft {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };
enum class Activation : int { Softmax = 0, Sigmoid = 1 };

constexpr int kMaxSpatialDims = 3;
// Largest region count R: the kernels keep C x R accumulators per worker and chunk, so an absurd
// R (a stray label value) must be refused rather than allocated.
constexpr int64_t kMaxRegions = 4096;

// One soft-area problem with its spatial axes padded in front to three (size 1, stride 0).
struct Problem {
  const void* logits = nullptr;
  DType dtype = DType::Float32;
  int64_t batch = 0;
  int64_t channels = 0;
  int64_t size[kMaxSpatialDims] = {1, 1, 1};
  int64_t stride_b = 0;
  int64_t stride_c = 0;
  int64_t stride_s[kMaxSpatialDims] = {0, 0, 0};
  const int64_t* regions = nullptr;  // nullptr: no region map
  int64_t region_stride_b = 0;
  int64_t region_stride_s[kMaxSpatialDims] = {0, 0, 0};
  int64_t num_regions = 0;  // R; 0 means no region map
  Activation activation = Activation::Softmax;
  const void* grad = nullptr;  // backward: (B, C, max(R,1)) float32 / float64
  void* grad_logits = nullptr;  // backward: contiguous (B, C, *S), logits dtype

  int64_t spatial_numel() const { return size[0] * size[1] * size[2]; }
  int64_t region_slots() const { return num_regions > 0 ? num_regions : 1; }
};

// Builds a Problem from the binding arguments (shape [B, C, *S], element strides of the logits,
// region strides [b, *s]) and throws std::invalid_argument (ValueError in Python) when they are
// inconsistent. Spatial axes are padded in front to three.
inline Problem make_problem(std::uintptr_t logits_ptr, int dtype, const std::vector<int64_t>& shape,
                            const std::vector<int64_t>& strides, std::uintptr_t regions_ptr,
                            const std::vector<int64_t>& region_strides, int64_t num_regions,
                            int activation) {
  if (shape.size() < 3 || shape.size() > 2 + kMaxSpatialDims)
    throw std::invalid_argument("shape must be [B, C, *S] with 1 to 3 spatial axes, got " +
                                std::to_string(shape.size()) + " entries");
  if (strides.size() != shape.size())
    throw std::invalid_argument("strides must have one entry per axis of shape");
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] < 0) throw std::invalid_argument("shape entries must be >= 0");
    if (strides[i] < 0) throw std::invalid_argument("strides must be >= 0");
  }
  if (dtype < 0 || dtype > 3) throw std::invalid_argument("dtype must be 0 (float32), 1 (float16), 2 (bfloat16) or 3 (float64)");
  if (activation != 0 && activation != 1)
    throw std::invalid_argument("activation must be 0 (softmax) or 1 (sigmoid)");
  if (num_regions < 0 || num_regions > kMaxRegions)
    throw std::invalid_argument("num_regions must be in [0, " + std::to_string(kMaxRegions) + "], got " +
                                std::to_string(num_regions));
  if ((regions_ptr != 0) != (num_regions > 0))
    throw std::invalid_argument("regions_ptr must be set exactly when num_regions > 0");
  const size_t nd = shape.size() - 2;
  if (regions_ptr != 0 && region_strides.size() != nd + 1)
    throw std::invalid_argument("region_strides must be [b, *s] with one entry per spatial axis plus one");
  for (const int64_t s : region_strides)
    if (s < 0) throw std::invalid_argument("region_strides must be >= 0");
  if (std::find(shape.begin(), shape.end(), int64_t(0)) == shape.end()) {
    int64_t numel = 1;
    for (const int64_t n : shape) {
      if (numel > INT64_MAX / n) throw std::invalid_argument("shape has 2^63 elements or more");
      numel *= n;
    }
    if (logits_ptr == 0) throw std::invalid_argument("logits_ptr is null");
  }
  Problem p;
  p.logits = reinterpret_cast<const void*>(logits_ptr);
  p.dtype = static_cast<DType>(dtype);
  p.batch = shape[0];
  p.channels = shape[1];
  p.stride_b = strides[0];
  p.stride_c = strides[1];
  const size_t pad = kMaxSpatialDims - nd;
  for (size_t i = 0; i < nd; ++i) {
    p.size[pad + i] = shape[2 + i];
    p.stride_s[pad + i] = strides[2 + i];
  }
  if (regions_ptr != 0) {
    p.regions = reinterpret_cast<const int64_t*>(regions_ptr);
    p.region_stride_b = region_strides[0];
    for (size_t i = 0; i < nd; ++i) p.region_stride_s[pad + i] = region_strides[1 + i];
  }
  p.num_regions = num_regions;
  p.activation = static_cast<Activation>(activation);
  return p;
}

namespace cpu {

// Writes raw sums (B, C, max(R,1)) to out (float64 for Float64 logits, float32 otherwise). With
// a region map and id_range set, also writes the smallest and largest region id the kernel read
// to id_range[0], id_range[1] (INT64_MAX, INT64_MIN when it read none), so callers can validate
// the map without a second pass over it.
void soft_area_forward(const Problem& p, void* out, int num_threads, int64_t* id_range = nullptr);
// Writes dL/dlogits for grad = dL/d(raw sums) into p.grad_logits; with a region map and id_range
// set, also the range of the region ids read (as soft_area_forward). Out-of-range ids get a zero
// gradient; the caller rejects the result.
void soft_area_backward(const Problem& p, int num_threads, int64_t* id_range = nullptr);
// y = GELU(x) (exact, erf form) and dydx = GELU'(x) for n contiguous float32 values.
void gelu_forward(const float* x, float* y, float* dydx, int64_t n, int num_threads);

// 3x3 convolution (3x3x3 when d3), stride 1, zero padding 1, of a float32 batch x
// [batch][d][h][w][ci] (channels_last) or [batch][ci][d][h][w] (d = 1 in 2D) with weight
// [co][ci][(3)][3][3] and bias [co] (may be null) into y, laid out as x. Returns false (and writes
// nothing) when the channel counts have no kernel (conv3x3_supported).
bool conv3x3_forward(int64_t batch, int64_t ci, int64_t co, int64_t d, int64_t h, int64_t w, bool d3,
                     bool channels_last, const float* x, const float* weight, const float* bias, float* y,
                     int num_threads);
// Gradients of conv3x3_forward for the output gradient gy (laid out as y): gx (skipped when null;
// multiplied element by element by mult, laid out as x, when mult is set: the derivative of an
// activation before the convolution), dw [co][ci][(3)][3][3] and db [co], the batch summed image by
// image in order (the same values for any thread count).
bool conv3x3_backward(int64_t batch, int64_t ci, int64_t co, int64_t d, int64_t h, int64_t w, bool d3,
                      bool channels_last, const float* x, const float* weight, const float* gy, float* gx, float* dw,
                      float* db, int num_threads, const float* mult = nullptr);
// out = conv1x1(GELU(x), w) + b (weight w [O][C], b [O] or null) over `rows` channels-last
// positions x [rows][C] -> out [rows][O], with y = GELU(x) and d = GELU'(x) [rows][C] written for
// the backward; each chunk of rows is convolved while its GELU is in cache.
void gelu_pointwise_forward(int64_t rows, int64_t C, int64_t O, const float* x, const float* w, const float* b,
                            float* y, float* d, float* out, int num_threads);
// Its backward from y, d and the output gradient g [rows][O]: the input gradient gx [rows][C], the
// weight gradient dw [O][C] and the bias gradient db [O], in one pass over the tensors; the sums
// run over fixed chunks of rows in order (the same values for any thread count).
void gelu_pointwise_backward(int64_t rows, int64_t C, int64_t O, const float* g, const float* y, const float* d,
                             const float* w, float* gx, float* dw, float* db, int num_threads);
// The same two for channels-first images [batch][C or O][S]: pointwise_cf_forward writes
// out = b + conv1x1(y, w) (b may be null); gelu_pointwise_cf_backward the gradients of
// conv1x1(GELU(x)) from y = GELU(x), d = GELU'(x) and g, the weight and bias gradients summed
// image by image in order.
void pointwise_cf_forward(int64_t batch, int64_t S, int64_t C, int64_t O, const float* y, const float* w,
                          const float* b, float* out, int num_threads);
void gelu_pointwise_cf_backward(int64_t batch, int64_t S, int64_t C, int64_t O, const float* g, const float* y,
                                const float* d, const float* w, float* gx, float* dw, float* db, int num_threads);
// The HVAE's posterior sample and KL for `batch` images of `rows` channels-last positions each:
// post [batch][rows][2Z] = (q_loc | q_logscale), prior [batch][rows][P] starting with (p_loc |
// p_logscale), eps [batch][rows][Z]: z = q_loc + t exp(q_logscale) eps into z [batch][rows][Z],
// each image's KL(q || p) summed over its positions in order into kl [batch], and prior's other
// P - 2Z channels copied into feat [batch][rows][P - 2Z] when feat is set.
void latent_forward(int64_t batch, int64_t rows, int64_t Z, int64_t P, const float* post, const float* prior,
                    const float* eps, float* z, float* feat, float* kl, float t, int num_threads);
// Gradients of latent_forward from dL/dz gz, dL/dkl gkl [batch] and dL/dfeat gfeat (each may be
// null: zero): dpost laid out as post, dprior as prior (its other channels take gfeat).
void latent_backward(int64_t batch, int64_t rows, int64_t Z, int64_t P, const float* post, const float* prior,
                     const float* eps, const float* gz, const float* gkl, const float* gfeat, float* dpost,
                     float* dprior, float t, int num_threads);
// Name of the instruction set the CPU kernels use on this machine: "avx512", "avx2" or "scalar".
const char* active_isa();

}  // namespace cpu
}  // namespace segcft
