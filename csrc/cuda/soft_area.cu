// CUDA soft-area kernels: per-class (and per-region) sums of softmax/sigmoid probabilities and
// their gradient (docs/method.md section 4). Probabilities are recomputed in registers, never stored.
//
// Forward (deterministic two-pass reduction):
//   pass 1  grid (blocks per image, batch, class chunks), 32..256 threads. Each block owns a
//           contiguous voxel range of one image; each warp walks it in tiles of 32*V voxels
//           (V = 16 bytes / element size on the vectorised path, 1 otherwise). A thread keeps
//           the probabilities of its current region in registers and, when a lane's region
//           changes, the warp reduces the lanes' sums with shuffles into a per-warp shared
//           slot (single writer). At the end the warps' slots are summed in warp order and
//           written to a float32 workspace [out index][block].
//   pass 2  one warp per output element sums its row of the workspace in a fixed order.
//   A single block per (image, chunk) writes the output directly and skips pass 2.
// Backward is elementwise: each warp handles a tile of 32*V voxels of one image.
#include "soft_area_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace segcft::cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;
constexpr int kMaxThreads = 256;
// One resident block suffices to keep enough 16-byte loads in flight; asking for more makes
// ptxas cap registers and spill the per-class arrays of the C <= 16 paths.
constexpr int kMinBlocks = 1;
constexpr int kMaxSpatialDims = 3;
constexpr int kMaxRegisterClasses = 16;  // larger C: forward in chunks, backward in loops
constexpr int kWaves = 8;                // forward blocks per resident slot (load balance)
constexpr int kMinTilesPerBlock = 4;     // forward tiles per block before adding blocks
constexpr std::int64_t kMaxVoxels = (std::int64_t{1} << 30) + (std::int64_t{1} << 29);
constexpr std::size_t kDefaultSharedBytes = 48 * 1024;
constexpr std::uint64_t kPoolReleaseThreshold = std::uint64_t{64} << 20;

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("segcft._C_cuda: ") + what + " failed: " +
                             cudaGetErrorName(status) + ": " + cudaGetErrorString(status));
  }
}

// Spatial layout after dropping size-1 dims and merging dims that are contiguous with respect
// to each other in both the logits and the region map (outermost first).
struct Layout {
  int nd;
  int size[kMaxSpatialDims];
  long long xs[kMaxSpatialDims];  // logits element strides
  long long rs[kMaxSpatialDims];  // region element strides
  long long xb, xc, rb;           // logits batch/class strides, region batch stride
  int n;                          // voxels per image
};

// ----------------------------------------------------------------------------------------------
// Element access
// ----------------------------------------------------------------------------------------------

template <typename T>
struct Pack {
  static constexpr int kSize = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte load
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ unsigned get_word(const uint4& u, int i) {
  return i == 0 ? u.x : i == 1 ? u.y : i == 2 ? u.z : u.w;
}

__device__ __forceinline__ void set_word(uint4& u, int i, unsigned w) {
  if (i == 0) {
    u.x = w;
  } else if (i == 1) {
    u.y = w;
  } else if (i == 2) {
    u.z = w;
  } else {
    u.w = w;
  }
}

// Raw bits of element v of a 16-byte pack (v is a compile-time constant after unrolling).
template <typename T>
__device__ __forceinline__ unsigned pack_bits(const uint4& u, int v) {
  if constexpr (sizeof(T) == 4) {
    return get_word(u, v);
  } else {
    return (get_word(u, v >> 1) >> (16 * (v & 1))) & 0xffffu;
  }
}

template <typename T>
__device__ __forceinline__ void pack_set_bits(uint4& u, int v, unsigned bits) {
  if constexpr (sizeof(T) == 4) {
    set_word(u, v, bits);
  } else {
    const int shift = 16 * (v & 1);
    const unsigned w = get_word(u, v >> 1);
    set_word(u, v >> 1, (w & ~(0xffffu << shift)) | ((bits & 0xffffu) << shift));
  }
}

template <typename T>
__device__ __forceinline__ float bits_to_float(unsigned bits) {
  if constexpr (std::is_same_v<T, float>) {
    return __uint_as_float(bits);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
  } else {
    return __uint_as_float(bits << 16);
  }
}

template <typename T>
__device__ __forceinline__ unsigned float_to_bits(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return __float_as_uint(v);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half_as_ushort(__float2half_rn(v));
  } else {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
}

template <typename T>
__device__ __forceinline__ unsigned load_bits(const T* p) {
  if constexpr (sizeof(T) == 4) {
    return __ldg(reinterpret_cast<const unsigned*>(p));
  } else {
    return __ldg(reinterpret_cast<const unsigned short*>(p));
  }
}

template <typename T>
__device__ __forceinline__ void store_bits(T* p, unsigned bits) {
  if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<unsigned*>(p) = bits;
  } else {
    *reinterpret_cast<unsigned short*>(p) = static_cast<unsigned short>(bits);
  }
}

// Loads `count` (<= kSize) consecutive elements; one 16-byte load when the pack is full (the
// caller guarantees 16-byte alignment then), element loads for a tail. Missing elements are 0.
template <typename T>
__device__ __forceinline__ uint4 load_pack(const T* p, int count) {
  constexpr int V = Pack<T>::kSize;
  if (count >= V) return __ldg(reinterpret_cast<const uint4*>(p));
  uint4 u = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
  for (int v = 0; v < V; ++v) {
    if (v < count) pack_set_bits<T>(u, v, load_bits(p + v));
  }
  return u;
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const uint4& u, int count) {
  constexpr int V = Pack<T>::kSize;
  if (count >= V) {
    *reinterpret_cast<uint4*>(p) = u;
    return;
  }
#pragma unroll
  for (int v = 0; v < V; ++v) {
    if (v < count) store_bits(p + v, pack_bits<T>(u, v));
  }
}

__device__ __forceinline__ int region_index(long long value, int num_regions) {
  return (value >= 0 && value < num_regions) ? static_cast<int>(value) : -1;
}

// Region indices of V consecutive voxels (linear layout); -1 for voxels past `count`.
template <int V>
__device__ __forceinline__ void load_regions(const long long* p, long long stride, int count,
                                             bool vector_ok, int num_regions, int (&out)[V]) {
  if constexpr (V % 2 == 0) {
    if (vector_ok && count >= V) {
#pragma unroll
      for (int k = 0; k < V / 2; ++k) {
        const longlong2 q = __ldg(reinterpret_cast<const longlong2*>(p) + k);
        out[2 * k] = region_index(q.x, num_regions);
        out[2 * k + 1] = region_index(q.y, num_regions);
      }
      return;
    }
  }
#pragma unroll
  for (int v = 0; v < V; ++v) {
    out[v] = v < count ? region_index(__ldg(p + v * stride), num_regions) : -1;
  }
}

// Element offsets of flat voxel index s in the logits and the region map.
__device__ __forceinline__ void spatial_offsets(const Layout& L, int s, long long& xo,
                                                long long& ro) {
  unsigned rem = static_cast<unsigned>(s);
  xo = 0;
  ro = 0;
#pragma unroll
  for (int d = kMaxSpatialDims - 1; d >= 1; --d) {
    if (d < L.nd) {
      const unsigned size = static_cast<unsigned>(L.size[d]);
      const unsigned q = rem / size;
      const unsigned i = rem - q * size;
      xo += static_cast<long long>(i) * L.xs[d];
      ro += static_cast<long long>(i) * L.rs[d];
      rem = q;
    }
  }
  xo += static_cast<long long>(rem) * L.xs[0];
  ro += static_cast<long long>(rem) * L.rs[0];
}

// ----------------------------------------------------------------------------------------------
// Maths
// ----------------------------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

__device__ __forceinline__ float sigmoid(float x) { return __frcp_rn(1.0f + __expf(-x)); }

// In place: logits of classes [0, cc) -> probabilities (softmax over them, or sigmoid).
template <int CMAX, bool SIGMOID>
__device__ __forceinline__ void probabilities(float (&x)[CMAX], int cc) {
  if constexpr (SIGMOID) {
#pragma unroll
    for (int c = 0; c < CMAX; ++c) {
      if (c < cc) x[c] = sigmoid(x[c]);
    }
  } else {
    float m = -INFINITY;
#pragma unroll
    for (int c = 0; c < CMAX; ++c) {
      if (c < cc) m = fmaxf(m, x[c]);
    }
    float sum = 0.0f;
#pragma unroll
    for (int c = 0; c < CMAX; ++c) {
      if (c < cc) {
        x[c] = __expf(x[c] - m);
        sum += x[c];
      }
    }
    const float inv = __frcp_rn(sum);
#pragma unroll
    for (int c = 0; c < CMAX; ++c) {
      if (c < cc) x[c] *= inv;
    }
  }
}

// In place: logits -> dL/dlogits of one voxel in region r (r < 0: outside every region).
template <int CMAX, bool SIGMOID>
__device__ __forceinline__ void voxel_gradient(float (&x)[CMAX], int cc, int r,
                                               const float* __restrict__ g, int rr) {
  if (r < 0) {
#pragma unroll
    for (int c = 0; c < CMAX; ++c) x[c] = 0.0f;
    return;
  }
  float gc[CMAX];
#pragma unroll
  for (int c = 0; c < CMAX; ++c) gc[c] = c < cc ? __ldg(g + c * rr + r) : 0.0f;
  probabilities<CMAX, SIGMOID>(x, cc);
  if constexpr (SIGMOID) {
#pragma unroll
    for (int c = 0; c < CMAX; ++c) {
      if (c < cc) x[c] = gc[c] * x[c] * (1.0f - x[c]);
    }
  } else {
    float dot = 0.0f;
#pragma unroll
    for (int c = 0; c < CMAX; ++c) {
      if (c < cc) dot += x[c] * gc[c];
    }
#pragma unroll
    for (int c = 0; c < CMAX; ++c) {
      if (c < cc) x[c] = x[c] * (gc[c] - dot);
    }
  }
}

// Warp-collective: moves the register sums of the lanes in `pending` into the warp's shared
// slot [region][class], one distinct region at a time, and clears them. Lane 0 is the only
// writer of the slot, so the result does not depend on scheduling.
template <int CMAX>
__device__ __forceinline__ void flush(unsigned pending, int cur, float (&acc)[CMAX], int cc,
                                      float* slot, int lane) {
  while (pending != 0u) {
    const int leader = __ffs(pending) - 1;
    const int r = __shfl_sync(kFullMask, cur, leader);
    const bool mine = ((pending >> lane) & 1u) != 0u && cur == r;
    pending &= ~__ballot_sync(kFullMask, mine);
#pragma unroll
    for (int c = 0; c < CMAX; ++c) {
      if (c < cc) {
        const float total = warp_sum(mine ? acc[c] : 0.0f);
        if (lane == 0) slot[r * cc + c] += total;
        if (mine) acc[c] = 0.0f;
      }
    }
  }
}

// Adds one voxel's probabilities to the thread's sums; `region` < 0 skips the voxel. Must be
// reached by all lanes of the warp together (it may flush collectively).
template <int CMAX, bool REGIONS>
__device__ __forceinline__ void accumulate(const float (&p)[CMAX], int cc, int region,
                                           float (&acc)[CMAX], int& cur, float* slot, int lane) {
  if constexpr (REGIONS) {
    const bool change = region >= 0 && region != cur;
    const unsigned need = __ballot_sync(kFullMask, change && cur >= 0);
    if (need != 0u) flush<CMAX>(need, cur, acc, cc, slot, lane);
    if (change) cur = region;
  }
  if (region >= 0) {
#pragma unroll
    for (int c = 0; c < CMAX; ++c) {
      if (c < cc) acc[c] += p[c];
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Kernels
// ----------------------------------------------------------------------------------------------

// Pass 1 of the forward. partial[((b * C + c) * RR + r) * gridDim.x + block].
template <typename T, int CMAX, bool VEC, bool SIGMOID, bool REGIONS>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
    forward_kernel(const T* __restrict__ logits, const long long* __restrict__ regions,
                   const Layout L, int batch, int classes, int num_regions, bool region_vector,
                   int per_block, float* __restrict__ partial) {
  constexpr int V = VEC ? Pack<T>::kSize : 1;
  extern __shared__ float warp_sums[];
  const int lane = threadIdx.x & (kWarp - 1);
  const int warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  const int c0 = blockIdx.z * CMAX;
  const int cc = min(CMAX, classes - c0);
  const bool chunked = cc < classes;
  const int rr = REGIONS ? num_regions : 1;
  const int slot_size = rr * cc;
  float* slot = warp_sums + warp * slot_size;
  const long long start_ll = static_cast<long long>(blockIdx.x) * per_block;
  const int start = static_cast<int>(start_ll);
  const int end = static_cast<int>(min(static_cast<long long>(L.n), start_ll + per_block));

  for (int b = blockIdx.y; b < batch; b += gridDim.y) {
    for (int i = threadIdx.x; i < nwarps * slot_size; i += blockDim.x) warp_sums[i] = 0.0f;
    __syncthreads();
    const T* xb = logits + b * L.xb;
    const long long* rb = REGIONS ? regions + b * L.rb : nullptr;
    float acc[CMAX];
#pragma unroll
    for (int c = 0; c < CMAX; ++c) acc[c] = 0.0f;
    int cur = -1;

    for (int base = start + warp * kWarp * V; base < end; base += nwarps * kWarp * V) {
      if constexpr (VEC) {
        const int s0 = base + lane * V;
        const int count = max(0, min(V, end - s0));
        uint4 raw[CMAX];
#pragma unroll
        for (int c = 0; c < CMAX; ++c) {
          raw[c] = (c < cc && count > 0) ? load_pack<T>(xb + (c0 + c) * L.xc + s0, count)
                                         : make_uint4(0u, 0u, 0u, 0u);
        }
        int reg[V];
        if constexpr (REGIONS) {
          load_regions<V>(rb + s0 * L.rs[0], L.rs[0], count, region_vector, num_regions, reg);
        } else {
#pragma unroll
          for (int v = 0; v < V; ++v) reg[v] = v < count ? 0 : -1;
        }
#pragma unroll
        for (int v = 0; v < V; ++v) {
          float p[CMAX];
#pragma unroll
          for (int c = 0; c < CMAX; ++c) p[c] = bits_to_float<T>(pack_bits<T>(raw[c], v));
          probabilities<CMAX, SIGMOID>(p, cc);
          accumulate<CMAX, REGIONS>(p, cc, reg[v], acc, cur, slot, lane);
        }
      } else {
        const int s = base + lane;
        const bool valid = s < end;
        long long xo = 0;
        long long ro = 0;
        if (valid) spatial_offsets(L, s, xo, ro);
        const T* xv = xb + xo;
        float p[CMAX];
        if (!SIGMOID && chunked) {
          // Softmax normaliser over all classes; this block sums only classes [c0, c0 + cc).
          float m = -INFINITY;
          float sum = 0.0f;
          if (valid) {
            for (int c = 0; c < classes; ++c) m = fmaxf(m, to_float(__ldg(xv + c * L.xc)));
            for (int c = 0; c < classes; ++c) sum += __expf(to_float(__ldg(xv + c * L.xc)) - m);
          }
          const float inv = __frcp_rn(sum);
#pragma unroll
          for (int c = 0; c < CMAX; ++c) {
            p[c] = (valid && c < cc) ? __expf(to_float(__ldg(xv + (c0 + c) * L.xc)) - m) * inv
                                     : 0.0f;
          }
        } else {
#pragma unroll
          for (int c = 0; c < CMAX; ++c) {
            p[c] = (valid && c < cc) ? to_float(__ldg(xv + (c0 + c) * L.xc)) : 0.0f;
          }
          probabilities<CMAX, SIGMOID>(p, cc);
        }
        int reg = valid ? 0 : -1;
        if constexpr (REGIONS) {
          if (valid) reg = region_index(__ldg(rb + ro), num_regions);
        }
        accumulate<CMAX, REGIONS>(p, cc, reg, acc, cur, slot, lane);
      }
    }

    if constexpr (REGIONS) {
      const unsigned need = __ballot_sync(kFullMask, cur >= 0);
      if (need != 0u) flush<CMAX>(need, cur, acc, cc, slot, lane);
    } else {
#pragma unroll
      for (int c = 0; c < CMAX; ++c) {
        if (c < cc) {
          const float total = warp_sum(acc[c]);
          if (lane == 0) slot[c] += total;
        }
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < slot_size; i += blockDim.x) {
      float total = 0.0f;
      for (int w = 0; w < nwarps; ++w) total += warp_sums[w * slot_size + i];
      const int r = i / cc;
      const int c = i - r * cc;
      const long long o = (static_cast<long long>(b) * classes + c0 + c) * rr + r;
      partial[o * gridDim.x + blockIdx.x] = total;
    }
    __syncthreads();
  }
}

// Pass 2 of the forward: out[o] = sum_k partial[o * nblk + k] in a fixed order.
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
    reduce_partials_kernel(const float* __restrict__ partial, float* __restrict__ out,
                           long long nout, int nblk) {
  const int lane = threadIdx.x & (kWarp - 1);
  const long long first = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const long long step = static_cast<long long>(gridDim.x) * blockDim.x / kWarp;
  for (long long o = first; o < nout; o += step) {
    const float* row = partial + o * nblk;
    float total = 0.0f;
    for (int k = lane; k < nblk; k += kWarp) total += row[k];
    total = warp_sum(total);
    if (lane == 0) out[o] = total;
  }
}

// Backward for C <= kMaxRegisterClasses: each warp handles 32 * V voxels of one image.
template <typename T, int CMAX, bool VEC, bool SIGMOID, bool REGIONS>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
    backward_kernel(const T* __restrict__ logits, const long long* __restrict__ regions,
                    const Layout L, int batch, int classes, int num_regions, bool region_vector,
                    const float* __restrict__ grad, T* __restrict__ grad_logits) {
  constexpr int V = VEC ? Pack<T>::kSize : 1;
  const int lane = threadIdx.x & (kWarp - 1);
  const long long first = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const long long step = static_cast<long long>(gridDim.x) * blockDim.x / kWarp;
  const long long tiles = (static_cast<long long>(L.n) + kWarp * V - 1) / (kWarp * V);
  const long long items = tiles * batch;
  const int rr = REGIONS ? num_regions : 1;
  const int cc = classes;

  for (long long item = first; item < items; item += step) {
    const int b = static_cast<int>(item / tiles);
    const int base = static_cast<int>((item - b * tiles) * (kWarp * V));
    const T* xb = logits + b * L.xb;
    T* gb = grad_logits + static_cast<long long>(b) * classes * L.n;
    const float* g = grad + static_cast<long long>(b) * classes * rr;
    if constexpr (VEC) {
      const int s0 = base + lane * V;
      const int count = max(0, min(V, L.n - s0));
      if (count == 0) continue;
      uint4 raw[CMAX];
#pragma unroll
      for (int c = 0; c < CMAX; ++c) {
        raw[c] = c < cc ? load_pack<T>(xb + c * L.xc + s0, count) : make_uint4(0u, 0u, 0u, 0u);
      }
      int reg[V];
      if constexpr (REGIONS) {
        load_regions<V>(regions + b * L.rb + s0 * L.rs[0], L.rs[0], count, region_vector,
                        num_regions, reg);
      } else {
#pragma unroll
        for (int v = 0; v < V; ++v) reg[v] = 0;
      }
#pragma unroll
      for (int v = 0; v < V; ++v) {
        float x[CMAX];
#pragma unroll
        for (int c = 0; c < CMAX; ++c) x[c] = bits_to_float<T>(pack_bits<T>(raw[c], v));
        voxel_gradient<CMAX, SIGMOID>(x, cc, reg[v], g, rr);
        // The input bits of voxel v are no longer needed: reuse them for the output.
#pragma unroll
        for (int c = 0; c < CMAX; ++c) pack_set_bits<T>(raw[c], v, float_to_bits<T>(x[c]));
      }
#pragma unroll
      for (int c = 0; c < CMAX; ++c) {
        if (c < cc) store_pack<T>(gb + static_cast<long long>(c) * L.n + s0, raw[c], count);
      }
    } else {
      const int s = base + lane;
      if (s >= L.n) continue;
      long long xo = 0;
      long long ro = 0;
      spatial_offsets(L, s, xo, ro);
      const T* xv = xb + xo;
      float x[CMAX];
#pragma unroll
      for (int c = 0; c < CMAX; ++c) x[c] = c < cc ? to_float(__ldg(xv + c * L.xc)) : 0.0f;
      int reg = 0;
      if constexpr (REGIONS) reg = region_index(__ldg(regions + b * L.rb + ro), num_regions);
      voxel_gradient<CMAX, SIGMOID>(x, cc, reg, g, rr);
#pragma unroll
      for (int c = 0; c < CMAX; ++c) {
        if (c < cc) gb[static_cast<long long>(c) * L.n + s] = from_float<T>(x[c]);
      }
    }
  }
}

// Backward for any C: per-voxel loops over the classes (re-reads hit the L1 cache).
template <typename T, bool SIGMOID, bool REGIONS>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks)
    backward_loop_kernel(const T* __restrict__ logits, const long long* __restrict__ regions,
                         const Layout L, int batch, int classes, int num_regions,
                         const float* __restrict__ grad, T* __restrict__ grad_logits) {
  const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const long long step = static_cast<long long>(gridDim.x) * blockDim.x;
  const long long total = static_cast<long long>(batch) * L.n;
  const int rr = REGIONS ? num_regions : 1;
  for (long long i = first; i < total; i += step) {
    const int b = static_cast<int>(i / L.n);
    const int s = static_cast<int>(i - static_cast<long long>(b) * L.n);
    long long xo = 0;
    long long ro = 0;
    spatial_offsets(L, s, xo, ro);
    const T* xv = logits + b * L.xb + xo;
    T* out = grad_logits + static_cast<long long>(b) * classes * L.n + s;
    int r = 0;
    if constexpr (REGIONS) r = region_index(__ldg(regions + b * L.rb + ro), num_regions);
    if (r < 0) {
      for (int c = 0; c < classes; ++c) out[static_cast<long long>(c) * L.n] = from_float<T>(0.0f);
      continue;
    }
    const float* g = grad + static_cast<long long>(b) * classes * rr + r;
    if constexpr (SIGMOID) {
      for (int c = 0; c < classes; ++c) {
        const float p = sigmoid(to_float(__ldg(xv + c * L.xc)));
        out[static_cast<long long>(c) * L.n] = from_float<T>(__ldg(g + c * rr) * p * (1.0f - p));
      }
    } else {
      float m = -INFINITY;
      for (int c = 0; c < classes; ++c) m = fmaxf(m, to_float(__ldg(xv + c * L.xc)));
      float sum = 0.0f;
      float dot = 0.0f;
      for (int c = 0; c < classes; ++c) {
        const float e = __expf(to_float(__ldg(xv + c * L.xc)) - m);
        sum += e;
        dot += e * __ldg(g + c * rr);
      }
      const float inv = __frcp_rn(sum);
      dot *= inv;
      for (int c = 0; c < classes; ++c) {
        const float p = __expf(to_float(__ldg(xv + c * L.xc)) - m) * inv;
        out[static_cast<long long>(c) * L.n] = from_float<T>(p * (__ldg(g + c * rr) - dot));
      }
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Host side
// ----------------------------------------------------------------------------------------------

struct DeviceInfo {
  int sms = 0;
  std::size_t shared_optin = 0;
  cudaMemPool_t pool = nullptr;
};

// Per-device properties and a private stream-ordered memory pool for the forward workspace
// (kept across calls up to kPoolReleaseThreshold so repeated calls do not hit the driver).
const DeviceInfo& device_info(int device) {
  static std::mutex mutex;
  static std::vector<std::unique_ptr<DeviceInfo>> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  if (static_cast<std::size_t>(device) >= cache.size()) cache.resize(device + 1);
  if (!cache[device]) {
    auto info = std::make_unique<DeviceInfo>();
    check_cuda(cudaDeviceGetAttribute(&info->sms, cudaDevAttrMultiProcessorCount, device),
               "cudaDeviceGetAttribute(MultiProcessorCount)");
    int optin = 0;
    check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
               "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
    info->shared_optin = static_cast<std::size_t>(std::max(optin, 0));
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.handleTypes = cudaMemHandleTypeNone;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    check_cuda(cudaMemPoolCreate(&info->pool, &props), "cudaMemPoolCreate");
    std::uint64_t threshold = kPoolReleaseThreshold;
    check_cuda(cudaMemPoolSetAttribute(info->pool, cudaMemPoolAttrReleaseThreshold, &threshold),
               "cudaMemPoolSetAttribute(ReleaseThreshold)");
    cache[device] = std::move(info);
  }
  return *cache[device];
}

// The device of a CUDA allocation; invalid_argument for host (or unknown) memory, which a kernel
// could not read without faulting and poisoning the context.
int pointer_device(const void* ptr, const char* name) {
  cudaPointerAttributes attributes{};
  check_cuda(cudaPointerGetAttributes(&attributes, ptr), "cudaPointerGetAttributes");
  if (attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged) {
    throw std::invalid_argument(std::string("segcft._C_cuda: ") + name +
                                " does not point to CUDA device memory");
  }
  return attributes.device;
}

void expect_same_device(const void* ptr, const char* name, int device) {
  const int found = pointer_device(ptr, name);
  if (found != device) {
    throw std::invalid_argument(std::string("segcft._C_cuda: ") + name + " is on device " +
                                std::to_string(found) + ", expected device " +
                                std::to_string(device));
  }
}

// Makes the device holding `ptr` current for the scope of a call.
class DeviceGuard {
 public:
  DeviceGuard(std::uintptr_t ptr, const char* name) {
    device_ = pointer_device(reinterpret_cast<const void*>(ptr), name);
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (device_ != previous_) check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  ~DeviceGuard() {
    if (device_ != previous_) cudaSetDevice(previous_);
  }
  int device() const { return device_; }

 private:
  int previous_ = 0;
  int device_ = 0;
};

// Stream-ordered scratch buffer, returned to the pool on the same stream.
class Workspace {
 public:
  Workspace(std::size_t bytes, cudaMemPool_t pool, cudaStream_t stream) : stream_(stream) {
    check_cuda(cudaMallocFromPoolAsync(&ptr_, bytes, pool, stream), "cudaMallocFromPoolAsync");
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  ~Workspace() {
    if (ptr_ != nullptr) cudaFreeAsync(ptr_, stream_);
  }
  float* data() const { return static_cast<float*>(ptr_); }
  void release() {
    void* ptr = ptr_;
    ptr_ = nullptr;
    check_cuda(cudaFreeAsync(ptr, stream_), "cudaFreeAsync");
  }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

struct Problem {
  int batch = 0;
  int classes = 0;
  int num_regions = 0;  // 0: no region map
  std::int64_t voxels = 0;
  Layout layout{};
  const void* logits = nullptr;
  const long long* regions = nullptr;
  bool sigmoid = false;
  cudaStream_t stream = nullptr;
};

[[noreturn]] void bad_argument(const std::string& message) {
  throw std::invalid_argument("segcft._C_cuda: " + message);
}

Problem prepare(const SoftAreaArgs& args) {
  if (args.dtype < 0 || args.dtype > 2) {
    bad_argument("dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                 std::to_string(args.dtype));
  }
  const std::size_t rank = args.shape.size();
  if (rank < 3 || rank > 2 + kMaxSpatialDims) {
    bad_argument("shape must be [B, C, *S] with 1 to 3 spatial dims, got " +
                 std::to_string(rank) + " dims");
  }
  if (args.strides.size() != rank) {
    bad_argument("strides must have one entry per dim of shape (" + std::to_string(rank) +
                 "), got " + std::to_string(args.strides.size()));
  }
  if (args.activation != 0 && args.activation != 1) {
    bad_argument("activation must be 0 (softmax) or 1 (sigmoid), got " +
                 std::to_string(args.activation));
  }
  if (args.num_regions < 0 || args.num_regions > kMaxRegions) {
    bad_argument("num_regions must be in [0, " + std::to_string(kMaxRegions) + "], got " +
                 std::to_string(args.num_regions));
  }
  const int nd = static_cast<int>(rank) - 2;
  const bool has_regions = args.num_regions > 0;
  if (has_regions && args.region_strides.size() != static_cast<std::size_t>(1 + nd)) {
    bad_argument("region_strides must have " + std::to_string(1 + nd) + " entries, got " +
                 std::to_string(args.region_strides.size()));
  }
  for (std::size_t d = 0; d < rank; ++d) {
    if (args.shape[d] < 0) bad_argument("shape entries must be >= 0");
    if (args.strides[d] < 0) bad_argument("strides must be >= 0");
  }
  if (has_regions) {
    for (const std::int64_t s : args.region_strides) {
      if (s < 0) bad_argument("region_strides must be >= 0");
    }
  }
  if (args.shape[0] > INT_MAX || args.shape[1] > INT_MAX) {
    bad_argument("batch and class counts must be below 2^31");
  }
  std::int64_t voxels = 1;
  for (int d = 0; d < nd; ++d) {
    voxels *= args.shape[2 + d];
    if (voxels > kMaxVoxels) {
      bad_argument("at most " + std::to_string(kMaxVoxels) + " voxels per image are supported");
    }
  }

  Problem p;
  p.batch = static_cast<int>(args.shape[0]);
  p.classes = static_cast<int>(args.shape[1]);
  p.num_regions = static_cast<int>(args.num_regions);
  p.voxels = voxels;
  p.sigmoid = args.activation == 1;
  p.stream = reinterpret_cast<cudaStream_t>(args.stream);
  p.logits = reinterpret_cast<const void*>(args.logits);
  p.regions = has_regions ? reinterpret_cast<const long long*>(args.regions) : nullptr;
  if (p.batch > 0 && p.classes > 0 && voxels > 0) {
    if (args.logits == 0) bad_argument("logits_ptr is null");
    if (has_regions && args.regions == 0) bad_argument("regions_ptr is null but num_regions > 0");
  }

  // Merge spatial dims (innermost first) that are mutually contiguous in logits and regions.
  struct Dim {
    std::int64_t size, xs, rs;
  };
  std::vector<Dim> dims;
  for (int d = nd - 1; d >= 0; --d) {
    const std::int64_t size = args.shape[2 + d];
    if (size == 1) continue;
    const std::int64_t xs = args.strides[2 + d];
    const std::int64_t rs = has_regions ? args.region_strides[1 + d] : 0;
    if (!dims.empty() && xs == dims.back().xs * dims.back().size &&
        rs == dims.back().rs * dims.back().size) {
      dims.back().size *= size;
    } else {
      dims.push_back({size, xs, rs});
    }
  }
  if (dims.empty()) dims.push_back({voxels, 1, 1});
  Layout& L = p.layout;
  L.nd = static_cast<int>(dims.size());
  for (int d = 0; d < kMaxSpatialDims; ++d) {
    L.size[d] = 1;
    L.xs[d] = 0;
    L.rs[d] = 0;
  }
  for (int d = 0; d < L.nd; ++d) {
    const Dim& dim = dims[L.nd - 1 - d];
    L.size[d] = static_cast<int>(dim.size);
    L.xs[d] = dim.xs;
    L.rs[d] = dim.rs;
  }
  // Strides of size-1 batch/class dims are irrelevant; zero them so they never block the
  // vectorised path.
  L.xb = p.batch > 1 ? args.strides[0] : 0;
  L.xc = p.classes > 1 ? args.strides[1] : 0;
  L.rb = (has_regions && p.batch > 1) ? args.region_strides[0] : 0;
  L.n = static_cast<int>(voxels);
  return p;
}

void expect_inputs_on(const Problem& p, int device) {
  expect_same_device(p.logits, "logits_ptr", device);
  if (p.regions != nullptr) expect_same_device(p.regions, "regions_ptr", device);
}

bool aligned16(const void* ptr) { return (reinterpret_cast<std::uintptr_t>(ptr) & 15u) == 0u; }

// Whether the logits can be read with 16-byte loads along the (single, unit-stride) voxel axis.
bool logits_vectorisable(const Problem& p, int elements_per_pack) {
  const Layout& L = p.layout;
  return p.classes <= kMaxRegisterClasses && L.nd == 1 && L.xs[0] == 1 && aligned16(p.logits) &&
         L.xb % elements_per_pack == 0 && L.xc % elements_per_pack == 0;
}

bool regions_vectorisable(const Problem& p) {
  const Layout& L = p.layout;
  return p.num_regions > 0 && L.nd == 1 && L.rs[0] == 1 && aligned16(p.regions) && L.rb % 2 == 0;
}

template <typename F>
void with_dtype(int dtype, F&& f) {
  if (dtype == 0) {
    f(static_cast<float*>(nullptr));
  } else if (dtype == 1) {
    f(static_cast<__half*>(nullptr));
  } else {
    f(static_cast<__nv_bfloat16*>(nullptr));
  }
}

template <typename F>
void with_bool(bool value, F&& f) {
  if (value) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Register-array size for C classes (C > 16 is processed in chunks of 16).
template <typename F>
void with_class_bound(int classes, F&& f) {
  if (classes <= 2) {
    f(std::integral_constant<int, 2>{});
  } else if (classes <= 4) {
    f(std::integral_constant<int, 4>{});
  } else if (classes <= 8) {
    f(std::integral_constant<int, 8>{});
  } else {
    f(std::integral_constant<int, kMaxRegisterClasses>{});
  }
}

int max_active_blocks(const void* kernel, int threads, std::size_t shared) {
  int blocks = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, shared),
             "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  return std::max(blocks, 1);
}

template <typename T, int CMAX, bool VEC, bool SIGMOID, bool REGIONS>
void launch_forward(const Problem& p, bool region_vector, float* out, const DeviceInfo& dev) {
  const auto kernel = forward_kernel<T, CMAX, VEC, SIGMOID, REGIONS>;
  constexpr int V = VEC ? Pack<T>::kSize : 1;
  const int cc = std::min(CMAX, p.classes);
  const int chunks = (p.classes + CMAX - 1) / CMAX;
  const int rr = REGIONS ? p.num_regions : 1;
  const std::size_t slot_bytes = static_cast<std::size_t>(rr) * cc * sizeof(float);
  int threads = kMaxThreads;
  while (threads > kWarp && static_cast<std::size_t>(threads / kWarp) * slot_bytes > dev.shared_optin) {
    threads /= 2;
  }
  const std::size_t shared = static_cast<std::size_t>(threads / kWarp) * slot_bytes;
  if (shared > dev.shared_optin) {
    bad_argument("num_regions * classes (" + std::to_string(rr) + " * " + std::to_string(cc) +
                 " per class chunk) needs " + std::to_string(shared) +
                 " bytes of shared memory; this device allows " +
                 std::to_string(dev.shared_optin));
  }
  if (shared > kDefaultSharedBytes) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(shared)),
               "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  }
  const int active = max_active_blocks(reinterpret_cast<const void*>(kernel), threads, shared);

  const int grid_y = std::min(p.batch, 65535);
  const std::int64_t groups = static_cast<std::int64_t>(grid_y) * chunks;
  const std::int64_t tile = static_cast<std::int64_t>(threads) * V;
  const std::int64_t target = static_cast<std::int64_t>(dev.sms) * active * kWaves;
  std::int64_t nblk = std::max<std::int64_t>(1, target / groups);
  nblk = std::min(nblk, std::max<std::int64_t>(1, p.voxels / (kMinTilesPerBlock * tile)));
  const std::int64_t warp_tile = static_cast<std::int64_t>(kWarp) * V;
  std::int64_t per_block = (p.voxels + nblk - 1) / nblk;
  per_block = (per_block + warp_tile - 1) / warp_tile * warp_tile;
  nblk = (p.voxels + per_block - 1) / per_block;

  const std::int64_t nout = static_cast<std::int64_t>(p.batch) * p.classes * rr;
  std::unique_ptr<Workspace> workspace;
  float* partial = out;
  if (nblk > 1) {
    workspace = std::make_unique<Workspace>(static_cast<std::size_t>(nout * nblk) * sizeof(float),
                                            dev.pool, p.stream);
    partial = workspace->data();
  }
  const dim3 grid(static_cast<unsigned>(nblk), static_cast<unsigned>(grid_y),
                  static_cast<unsigned>(chunks));
  kernel<<<grid, threads, shared, p.stream>>>(static_cast<const T*>(p.logits), p.regions,
                                              p.layout, p.batch, p.classes, p.num_regions,
                                              region_vector, static_cast<int>(per_block), partial);
  check_cuda(cudaGetLastError(), "soft_area forward kernel launch");
  if (workspace) {
    const int reduce_threads = kMaxThreads;
    const std::int64_t warps_per_block = reduce_threads / kWarp;
    const std::int64_t blocks = std::min<std::int64_t>(
        (nout + warps_per_block - 1) / warps_per_block, static_cast<std::int64_t>(dev.sms) * 16);
    reduce_partials_kernel<<<static_cast<unsigned>(blocks), reduce_threads, 0, p.stream>>>(
        partial, out, nout, static_cast<int>(nblk));
    check_cuda(cudaGetLastError(), "soft_area reduction kernel launch");
    workspace->release();
  }
}

template <typename T, int CMAX, bool VEC, bool SIGMOID, bool REGIONS>
void launch_backward(const Problem& p, bool region_vector, const float* grad, T* grad_logits,
                     const DeviceInfo& dev) {
  const auto kernel = backward_kernel<T, CMAX, VEC, SIGMOID, REGIONS>;
  constexpr int V = VEC ? Pack<T>::kSize : 1;
  const int threads = kMaxThreads;
  const int active = max_active_blocks(reinterpret_cast<const void*>(kernel), threads, 0);
  const std::int64_t tiles = (p.voxels + kWarp * V - 1) / (kWarp * V);
  const std::int64_t warps = tiles * p.batch;
  const std::int64_t needed = (warps + threads / kWarp - 1) / (threads / kWarp);
  const std::int64_t blocks = std::min(needed, static_cast<std::int64_t>(dev.sms) * active);
  kernel<<<static_cast<unsigned>(blocks), threads, 0, p.stream>>>(
      static_cast<const T*>(p.logits), p.regions, p.layout, p.batch, p.classes, p.num_regions,
      region_vector, grad, grad_logits);
  check_cuda(cudaGetLastError(), "soft_area backward kernel launch");
}

template <typename T, bool SIGMOID, bool REGIONS>
void launch_backward_loop(const Problem& p, const float* grad, T* grad_logits,
                          const DeviceInfo& dev) {
  const auto kernel = backward_loop_kernel<T, SIGMOID, REGIONS>;
  const int threads = kMaxThreads;
  const int active = max_active_blocks(reinterpret_cast<const void*>(kernel), threads, 0);
  const std::int64_t total = static_cast<std::int64_t>(p.batch) * p.voxels;
  const std::int64_t blocks =
      std::min((total + threads - 1) / threads, static_cast<std::int64_t>(dev.sms) * active);
  kernel<<<static_cast<unsigned>(blocks), threads, 0, p.stream>>>(
      static_cast<const T*>(p.logits), p.regions, p.layout, p.batch, p.classes, p.num_regions,
      grad, grad_logits);
  check_cuda(cudaGetLastError(), "soft_area backward kernel launch");
}

}  // namespace

void soft_area_forward(const SoftAreaArgs& args, std::uintptr_t out) {
  const Problem p = prepare(args);
  const std::int64_t rr = std::max(p.num_regions, 1);
  const std::int64_t nout = static_cast<std::int64_t>(p.batch) * p.classes * rr;
  if (nout == 0) return;
  if (out == 0) bad_argument("out_ptr is null");
  const DeviceGuard guard(out, "out_ptr");
  float* out_ptr = reinterpret_cast<float*>(out);
  if (p.voxels == 0) {
    check_cuda(cudaMemsetAsync(out_ptr, 0, static_cast<std::size_t>(nout) * sizeof(float),
                               p.stream),
               "cudaMemsetAsync");
    return;
  }
  expect_inputs_on(p, guard.device());
  const DeviceInfo& dev = device_info(guard.device());
  const bool region_vector = regions_vectorisable(p);
  with_dtype(args.dtype, [&](auto* type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    const bool vec = logits_vectorisable(p, Pack<T>::kSize);
    with_class_bound(p.classes, [&](auto cmax) {
      with_bool(vec, [&](auto vec_tag) {
        with_bool(p.sigmoid, [&](auto sigmoid_tag) {
          with_bool(p.num_regions > 0, [&](auto regions_tag) {
            launch_forward<T, decltype(cmax)::value, decltype(vec_tag)::value,
                           decltype(sigmoid_tag)::value, decltype(regions_tag)::value>(
                p, region_vector, out_ptr, dev);
          });
        });
      });
    });
  });
}

void soft_area_backward(const SoftAreaArgs& args, std::uintptr_t grad,
                        std::uintptr_t grad_logits) {
  const Problem p = prepare(args);
  const std::int64_t numel = static_cast<std::int64_t>(p.batch) * p.classes * p.voxels;
  if (numel == 0) return;
  if (grad == 0) bad_argument("grad_ptr is null");
  if (grad_logits == 0) bad_argument("grad_logits_ptr is null");
  const DeviceGuard guard(grad_logits, "grad_logits_ptr");
  expect_inputs_on(p, guard.device());
  expect_same_device(reinterpret_cast<const void*>(grad), "grad_ptr", guard.device());
  const DeviceInfo& dev = device_info(guard.device());
  const bool region_vector = regions_vectorisable(p);
  const float* g = reinterpret_cast<const float*>(grad);
  with_dtype(args.dtype, [&](auto* type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    T* out = reinterpret_cast<T*>(grad_logits);
    with_bool(p.sigmoid, [&](auto sigmoid_tag) {
      with_bool(p.num_regions > 0, [&](auto regions_tag) {
        constexpr bool kSigmoid = decltype(sigmoid_tag)::value;
        constexpr bool kRegions = decltype(regions_tag)::value;
        if (p.classes > kMaxRegisterClasses) {
          launch_backward_loop<T, kSigmoid, kRegions>(p, g, out, dev);
          return;
        }
        const bool vec = logits_vectorisable(p, Pack<T>::kSize) && aligned16(out) &&
                         p.voxels % Pack<T>::kSize == 0;
        with_class_bound(p.classes, [&](auto cmax) {
          with_bool(vec, [&](auto vec_tag) {
            launch_backward<T, decltype(cmax)::value, decltype(vec_tag)::value, kSigmoid,
                            kRegions>(p, region_vector, g, out, dev);
          });
        });
      });
    });
  });
}

}  // namespace segcft::cuda
