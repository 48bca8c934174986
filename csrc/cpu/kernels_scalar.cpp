// Portable soft-area kernels (one lane): the path on aarch64 and other CPUs, on x86-64 CPUs
// without AVX2, and for float64 logits everywhere.
#include <cmath>
#include <cstring>

#include "kernels.h"

namespace segcft {
namespace cpu {
namespace {

inline float bits_to_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline std::uint32_t float_to_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    const float v = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -v : v;
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (mant << 13));
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// Round to nearest even, overflow to infinity, NaN stays NaN.
inline std::uint16_t float_to_half(float f) {
  std::uint32_t x = float_to_bits(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0u);
  if (x >= 0x477ff000u) return sign | 0x7c00u;
  if (x < 0x38800000u) {
    const float scaled = bits_to_float(x) * 16777216.0f;
    return sign | static_cast<std::uint16_t>(std::nearbyint(scaled));
  }
  const std::uint32_t odd = (x >> 13) & 1u;
  x += 0xc8000fffu + odd;
  return sign | static_cast<std::uint16_t>(x >> 13);
}

inline float bf16_to_float(std::uint16_t h) { return bits_to_float(static_cast<std::uint32_t>(h) << 16); }

inline std::uint16_t float_to_bf16(float f) {
  if (std::isnan(f)) return 0x7fc0u;
  const std::uint32_t u = float_to_bits(f);
  return static_cast<std::uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// exp with the same clamps, range reduction and polynomial as the AVX-512 path, so the paths
// agree to rounding (ldexp scales through the subnormals like scalef).
inline float exp_poly(float x) {
  if (std::isnan(x)) return x;
  x = x > 104.0f ? 104.0f : x;
  x = x < -104.0f ? -104.0f : x;
  const float n = std::nearbyint(x * kLog2e);
  float r = std::fma(-n, kLn2Hi, x);
  r = std::fma(-n, kLn2Lo, r);
  float y = std::fma(kExpPoly[5], r, kExpPoly[4]);
  y = std::fma(y, r, kExpPoly[3]);
  y = std::fma(y, r, kExpPoly[2]);
  y = std::fma(y, r, kExpPoly[1]);
  y = std::fma(y, r, kExpPoly[0]);
  return std::ldexp(y, static_cast<int>(n));
}

template <class Scalar>
struct Vec1 {
  static constexpr int W = 1;
  using S = Scalar;
  using F = Scalar;
  using I = int64_t;
  using M = bool;

  static F zero() { return F(0); }
  static F set1(F x) { return x; }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F div(F a, F b) { return a / b; }
  static F recip(F x) { return F(1) / x; }
  static F max(F a, F b) { return (std::isnan(a) || a >= b) ? a : b; }
  static F select_neg(F x, F a, F b) { return std::signbit(x) ? a : b; }
  static F exp(F x) {
    if constexpr (sizeof(F) == sizeof(double)) {
      return std::exp(x);
    } else {
      return exp_poly(x);
    }
  }
  static F exp_nonpos(F x) { return exp(x); }
  // Unfused (this file has no FMA flags; a libm fma call per element would be slow).
  static F fmadd(F a, F b, F c) { return a * b + c; }
  static F fmsub(F a, F b, F c) { return a * b - c; }
  static F fnmadd(F a, F b, F c) { return c - a * b; }
  static F load_s(const S* p) { return *p; }
  static void store_s(S* p, F v) { *p = v; }

  template <DType DT>
  static F load(const void* p) {
    if constexpr (DT == DType::Float32) {
      return static_cast<F>(*static_cast<const float*>(p));
    } else if constexpr (DT == DType::Float64) {
      return static_cast<F>(*static_cast<const double*>(p));
    } else if constexpr (DT == DType::Float16) {
      return static_cast<F>(half_to_float(*static_cast<const std::uint16_t*>(p)));
    } else {
      return static_cast<F>(bf16_to_float(*static_cast<const std::uint16_t*>(p)));
    }
  }

  template <DType DT>
  static void store(void* p, F v) {
    if constexpr (DT == DType::Float32) {
      *static_cast<float*>(p) = static_cast<float>(v);
    } else if constexpr (DT == DType::Float64) {
      *static_cast<double*>(p) = static_cast<double>(v);
    } else if constexpr (DT == DType::Float16) {
      *static_cast<std::uint16_t*>(p) = float_to_half(static_cast<float>(v));
    } else {
      *static_cast<std::uint16_t*>(p) = float_to_bf16(static_cast<float>(v));
    }
  }

  static I load_ids(const int64_t* p) { return *p; }
  template <DType DT>
  static void stream(void* p, F v) {
    store<DT>(p, v);
  }
  static void stream_fence() {}
  static constexpr bool kStream = false;
  using IdRange = int64_t;
  static int64_t set1_id(int64_t x) { return x; }
  static constexpr bool kVecIdRange = false;
  static M eq(I id, int r) { return id == r; }
  static M valid(I id, int R) { return static_cast<uint64_t>(id) < static_cast<uint64_t>(R); }
  using BadIds = bool;
  static BadIds no_bad_ids() { return false; }
  static BadIds flag_bad_ids(BadIds bad, const int64_t*, M ok, int) { return bad || !ok; }  // valid is exact
  static bool any_bad_ids(BadIds bad) { return bad; }
  static M tail(int n) { return n > 0; }
  static F mask_add(F acc, M m, F x) { return m ? acc + x : acc; }
  static F mask_fmadd(F acc, M m, F a, F b) { return m ? a * b + acc : acc; }
  static F permute(I, F table, M ok) { return ok ? table : F(0); }
  static F gather(const S* base, I id, M ok) { return ok ? base[id] : F(0); }
  static F hsum(F v) { return v; }
};

#include "kernels_impl.h"
#include "conv3x3_impl.h"

using VecF = Vec1<float>;
using VecD = Vec1<double>;

std::size_t scratch_bytes(const Problem& p) {
  return p.dtype == DType::Float64 ? scratch_bytes_impl<VecD>(p) : scratch_bytes_impl<VecF>(p);
}

void forward_chunk(const Problem& p, int64_t b, int64_t begin, int64_t end, double* partial, int64_t* id_range,
                   void* scratch) {
  if (p.dtype == DType::Float64)
    return forward_chunk_impl<VecD, DType::Float64, 0>(p, b, begin, end, partial, id_range, scratch);
  forward_chunk_dispatch<VecF>(p, b, begin, end, partial, id_range, scratch);
}

void backward_chunk(const Problem& p, int64_t b, int64_t begin, int64_t end, int64_t* id_range, void* scratch) {
  if (p.dtype == DType::Float64)
    return backward_chunk_impl<VecD, DType::Float64, 0>(p, b, begin, end, id_range, scratch);
  backward_chunk_dispatch<VecF>(p, b, begin, end, id_range, scratch);
}

}  // namespace

KernelTable scalar_kernels() {
  return {"scalar", &scratch_bytes, &forward_chunk, &backward_chunk, &gelu_chunk_impl<VecF>,
          &conv3x3_forward_impl<VecF>, &conv3x3_backward_impl<VecF>,
          &gelu_pointwise_backward_impl<VecF>,
          &pointwise_rows_impl<VecF>,
          &pointwise_cf_forward_impl<VecF>, &gelu_pointwise_cf_backward_impl<VecF>,
          &latent_forward_impl<VecF>, &latent_backward_impl<VecF>};
}

}  // namespace cpu
}  // namespace segcft
