// Interface between the CPU dispatcher (soft_area_cpu.cpp) and the per-instruction-set kernels.
// Each kernel translation unit is compiled with its own flags and exports one table; the
// dispatcher picks a table at run time from the CPU's features.
#pragma once

#include <cstddef>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../soft_area.h"

namespace segcft {
namespace cpu {

// Spatial positions per chunk of the flattened spatial axes. Fixed (never derived from the
// thread count) so that forward sums are identical for any number of threads.
constexpr int64_t kChunk = 4096;
// Gradients of at least this many bytes are written with non-temporal stores where available.
constexpr std::size_t kStreamBytes = std::size_t(4) << 20;
// Region counts up to this use per-region masked vector accumulators; above it, a scalar scatter.
constexpr int64_t kVecRegions = 8;

// exp(r) ~ sum_k kExpPoly[k] r^k on [-ln2/2, ln2/2] (degree-5 minimax in relative error; with the
// two-constant range reduction below, exp of a float32 to within about 2 ulp). Shared by every
// instruction set so all paths round alike.
constexpr float kExpPoly[6] = {0x1p+0f, 0x1.fffff6p-1f, 0x1.fffdc4p-2f, 0x1.555a6ep-3f, 0x1.573ad0p-5f, 0x1.0fa7d8p-7f};
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;      // ln 2 = kLn2Hi + kLn2Lo; n * kLn2Hi is exact
constexpr float kLn2Lo = -2.12194440e-4f;

// Standard normal CDF by Abramowitz & Stegun 7.1.26 (as erfc(a) = P(t) exp(-a^2), t = 1 / (1 + p a),
// absolute error under 1.5e-7 in erf): the exp it needs is also the normal density, so GELU and
// its derivative cost one exp together.
constexpr float kErfP = 0.3275911f;
constexpr float kErfA[5] = {0.254829592f, -0.284496736f, 1.421413741f, -1.453152027f, 1.061405429f};
constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
// Elements per chunk of the element-wise kernels (fixed, so results never depend on threads).
constexpr int64_t kElementChunk = 16384;

// A 3x3 (2D) or 3x3x3 (3D, d3) convolution, stride 1, zero padding 1, of one float32 image of
// d x h x w voxels (d = 1 in 2D), ci input and co output channels, channels-last ([d][h][w][c])
// or channels-first ([c][d][h][w]) in and out (conv3x3_impl.h).
struct Conv3x3 {
  int64_t ci, co, d, h, w;
  bool d3, channels_last;
};
// Channel counts the kernels are built for (ci == co): where they beat oneDNN.
inline bool conv3x3_supported(int64_t ci, int64_t co) { return ci == co && (ci == 2 || ci == 4 || ci == 8); }
// Floats per row of a padded channel plane: room for w + 2 columns and for two 16-lane loads
// that start at any column below w.
inline int64_t conv3x3_row_stride(int64_t w) { return (w + 31) / 32 * 32 + 16; }
// Bytes of scratch one worker needs for one image, forward or backward.
inline std::size_t conv3x3_scratch_bytes(const Conv3x3& g) {
  const int64_t slabs = g.d + (g.d3 ? 2 : 0);
  return sizeof(float) * static_cast<std::size_t>((2 * g.ci + g.co) * slabs * (g.h + 2) * conv3x3_row_stride(g.w));
}

struct KernelTable {
  const char* name;
  // Bytes of 64-byte-aligned scratch one worker needs for problem p.
  std::size_t (*scratch_bytes)(const Problem& p);
  // Raw sums over flattened spatial positions [begin, end) of batch item b into
  // partial[c * max(R,1) + r] (overwritten); with a region map, also the smallest and largest
  // region id of the range into id_range[0], id_range[1] (overwritten).
  void (*forward_chunk)(const Problem& p, int64_t b, int64_t begin, int64_t end, double* partial,
                        int64_t* id_range, void* scratch);
  // dL/dlogits over flattened spatial positions [begin, end) of batch item b; with a region map,
  // also the smallest and largest region id read into id_range[0], id_range[1] (overwritten).
  void (*backward_chunk)(const Problem& p, int64_t b, int64_t begin, int64_t end, int64_t* id_range,
                         void* scratch);
  // y = GELU(x) = x Phi(x) and dydx = Phi(x) + x phi(x) for n float32 values.
  void (*gelu_chunk)(const float* x, float* y, float* dydx, int64_t n);
  // y = conv3x3(x, wt) + bias (3x3x3 when g.d3) for one image (bias may be null); false for
  // unsupported channels.
  bool (*conv3x3_forward)(const Conv3x3& g, const float* x, const float* wt, const float* bias, float* y,
                          void* scratch);
  // For one image and output gradient gy: the input gradient into gx (skipped when null) and this
  // image's weight and bias gradients into dw [co][ci][(3)][3][3] and db [co] (overwritten).
  bool (*conv3x3_backward)(const Conv3x3& g, const float* x, const float* wt, const float* gy, float* gx,
                           float* dw, float* db, void* scratch);
  // Backward of out = conv1x1(GELU(x)) over `rows` channels-last rows (one position's channels
  // each), from y = GELU(x) and d = GELU'(x) [rows][C], the output gradient g [rows][O] and the
  // weight w [O][C]: gx[m][c] = d[m][c] sum_o g[m][o] w[o][c], and this range's weight and bias
  // gradients dw[o][c] = sum_m g[m][o] y[m][c], db[o] = sum_m g[m][o] (overwritten, rows in order).
  void (*gelu_pointwise_backward)(const float* g, const float* y, const float* d, const float* w, float* gx,
                                  float* dw, float* db, int64_t rows, int64_t C, int64_t O);
  // Channels-last 1x1 convolution of `rows` rows: out[m][o] = bias[o] + sum_c y[m][c] wt[c][o], the
  // weight transposed into wt [C][OP] and the bias into bias [OP], zero-padded to OP outputs (a
  // multiple of 16).
  void (*pointwise_rows)(const float* y, const float* wt, const float* bias, float* out, int64_t rows, int64_t C,
                         int64_t O, int64_t OP);
  // Channels-first 1x1 convolution of one image: out[o][s] = b[o] + sum_c w[o][c] y[c][s] over S
  // positions (b may be null).
  void (*pointwise_cf_forward)(const float* y, const float* w, const float* b, float* out, int64_t S, int64_t C,
                               int64_t O);
  // Backward of out = conv1x1(GELU(x)) for one channels-first image: gx[c][s] = d[c][s] sum_o
  // w[o][c] g[o][s], and the image's dw[o][c] = sum_s g[o][s] y[c][s], db[o] = sum_s g[o][s]
  // (overwritten; positions summed in a fixed order).
  void (*gelu_pointwise_cf_backward)(const float* g, const float* y, const float* d, const float* w, float* gx,
                                     float* dw, float* db, int64_t S, int64_t C, int64_t O);
  // The HVAE's posterior sample and KL for one image of `rows` channels-last positions (see
  // latent_forward in soft_area.h); returns the image's KL, summed over its positions in order.
  double (*latent_forward)(const float* post, const float* prior, const float* eps, float* z, float* feat,
                           int64_t rows, int64_t Z, int64_t P, float t);
  // Its gradients for one image (see latent_backward in soft_area.h).
  void (*latent_backward)(const float* post, const float* prior, const float* eps, const float* gz, float gk,
                          const float* gfeat, float* dpost, float* dprior, int64_t rows, int64_t Z, int64_t P,
                          float t);
};

// Rows per fixed chunk of gelu_pointwise_backward: partial weight gradients are summed in chunk
// order, so the result does not depend on the thread count.
constexpr int64_t kPointwiseRows = 256;

KernelTable scalar_kernels();
#if defined(SEGCFT_HAVE_X86_KERNELS)
KernelTable avx2_kernels();
KernelTable avx512_kernels();
#endif

}  // namespace cpu
}  // namespace segcft
