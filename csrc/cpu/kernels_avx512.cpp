// AVX-512 (F, BW, VL, DQ) soft-area kernels; compiled with AVX-512 flags for this file only and
// selected at run time when the CPU supports them.
#include <immintrin.h>

#include "kernels.h"

namespace segcft {
namespace cpu {
namespace {

struct Vec512 {
  static constexpr int W = 16;
  using S = float;
  using F = __m512;
  using I = __m512i;
  using M = __mmask16;

  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  // a where x's sign bit is set, else b.
  static F select_neg(F x, F a, F b) { return _mm512_mask_blend_ps(_mm512_movepi32_mask(_mm512_castps_si512(x)), b, a); }

  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fmsub(F a, F b, F c) { return _mm512_fmsub_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }

  // exp(x) for x clamped to [-104, 104] (exp overflows to inf and underflows through the
  // subnormals to 0 exactly as 2^n scaling does); NaN in, NaN out. About 2 ulp.
  static F exp_clamped(F x) {
    const F n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    F r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
    F y = _mm512_fmadd_ps(_mm512_set1_ps(kExpPoly[5]), r, _mm512_set1_ps(kExpPoly[4]));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kExpPoly[3]));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kExpPoly[2]));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kExpPoly[1]));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kExpPoly[0]));
    return _mm512_scalef_ps(y, n);
  }
  // The second operand of max/min is returned for NaN, so NaN passes the clamps.
  static F exp(F x) {
    return exp_clamped(_mm512_min_ps(_mm512_set1_ps(104.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x)));
  }
  // exp(x) for x <= 0 or NaN (softmax after subtracting the maximum): one clamp fewer.
  static F exp_nonpos(F x) { return exp_clamped(_mm512_max_ps(_mm512_set1_ps(-104.0f), x)); }
  // 1 / x for the softmax normaliser (x in [1, C]): 14-bit estimate and one Newton step, within
  // 1 ulp of the division at a third of its cost.
  static F recip(F x) {
    const F r = _mm512_rcp14_ps(x);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(2.0f)));
  }

  static F load_s(const float* p) { return _mm512_loadu_ps(p); }
  static void store_s(float* p, F v) { _mm512_storeu_ps(p, v); }

  template <DType DT>
  static F load(const void* p) {
    if constexpr (DT == DType::Float32) {
      return _mm512_loadu_ps(p);
    } else if constexpr (DT == DType::Float16) {
      return _mm512_cvtph_ps(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
    } else {
      const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
      return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
    }
  }

  template <DType DT>
  static void store(void* p, F v) {
    if constexpr (DT == DType::Float32) {
      _mm512_storeu_ps(p, v);
    } else if constexpr (DT == DType::Float16) {
      _mm256_storeu_si256(static_cast<__m256i*>(p),
                          _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
      // Round to nearest even; NaN stays a quiet NaN.
      const __m512i u = _mm512_castps_si512(v);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      __m512i h = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
      h = _mm512_mask_mov_epi32(h, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
      _mm256_storeu_si256(static_cast<__m256i*>(p), _mm512_cvtepi32_epi16(h));
    }
  }

  // Non-temporal store of a full vector (p aligned to the vector's bytes: 64 for float32, 32 for
  // 16-bit types).
  template <DType DT>
  static void stream(void* p, F v) {
    if constexpr (DT == DType::Float32) {
      _mm512_stream_ps(static_cast<float*>(p), v);
    } else {
      alignas(32) std::uint16_t buf[W];
      store<DT>(buf, v);
      _mm256_stream_si256(static_cast<__m256i*>(p), _mm256_load_si256(reinterpret_cast<const __m256i*>(buf)));
    }
  }
  static void stream_fence() { _mm_sfence(); }
  static constexpr bool kStream = true;

  // 16 int64 ids -> int32 lanes with signed saturation (huge ids stay out of range).
  static I load_ids(const int64_t* p) {
    const __m256i lo = _mm512_cvtsepi64_epi32(_mm512_loadu_si512(p));
    const __m256i hi = _mm512_cvtsepi64_epi32(_mm512_loadu_si512(p + 8));
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  }
  // Widens [lo, hi] (int64 lanes) to the 16 ids at p.
  static void id_range(const int64_t* p, __m512i& lo, __m512i& hi) {
    const __m512i a = _mm512_loadu_si512(p), b = _mm512_loadu_si512(p + 8);
    lo = _mm512_min_epi64(lo, _mm512_min_epi64(a, b));
    hi = _mm512_max_epi64(hi, _mm512_max_epi64(a, b));
  }
  static int64_t reduce_min(__m512i v) { return _mm512_reduce_min_epi64(v); }
  static int64_t reduce_max(__m512i v) { return _mm512_reduce_max_epi64(v); }
  static __m512i set1_id(int64_t x) { return _mm512_set1_epi64(x); }
  using IdRange = __m512i;
  static constexpr bool kVecIdRange = true;
  static M eq(I ids, int r) { return _mm512_cmpeq_epi32_mask(ids, _mm512_set1_epi32(r)); }
  static M valid(I ids, int R) { return _mm512_cmplt_epu32_mask(ids, _mm512_set1_epi32(R)); }
  // load_ids saturates, so valid is exact on all 64 bits of the ids.
  using BadIds = M;
  static BadIds no_bad_ids() { return 0; }
  static BadIds flag_bad_ids(BadIds bad, const int64_t*, M ok, int) { return static_cast<M>(bad | ~ok); }
  static bool any_bad_ids(BadIds bad) { return bad != 0; }
  static M tail(int n) { return static_cast<M>((1u << n) - 1u); }
  static F mask_add(F acc, M m, F x) { return _mm512_mask_add_ps(acc, m, acc, x); }
  static F mask_fmadd(F acc, M m, F a, F b) { return _mm512_mask3_fmadd_ps(a, b, acc, m); }
  static M none() { return 0; }
  static M mor(M a, M b) { return static_cast<M>(a | b); }
  static bool any(M m) { return m != 0; }
  static F permute(I ids, F table, M ok) { return _mm512_maskz_permutexvar_ps(ok, ids, table); }
  static F gather(const float* base, I ids, M ok) {
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), ok, ids, base, 4);
  }
  // Horizontal sum in a fixed pairwise order.
  static float hsum(F v) {
    alignas(64) float a[W];
    _mm512_store_ps(a, v);
    for (int w = W / 2; w > 0; w /= 2)
      for (int i = 0; i < w; ++i) a[i] += a[i + w];
    return a[0];
  }
};

#include "kernels_impl.h"
#include "conv3x3_impl.h"

std::size_t scratch_bytes(const Problem& p) { return scratch_bytes_impl<Vec512>(p); }

}  // namespace

KernelTable avx512_kernels() {
  return {"avx512", &scratch_bytes, &forward_chunk_dispatch<Vec512>, &backward_chunk_dispatch<Vec512>,
          &gelu_chunk_impl<Vec512>,
          &conv3x3_forward_impl<Vec512>, &conv3x3_backward_impl<Vec512>,
          &gelu_pointwise_backward_impl<Vec512>,
          &pointwise_rows_impl<Vec512>,
          &pointwise_cf_forward_impl<Vec512>, &gelu_pointwise_cf_backward_impl<Vec512>,
          &latent_forward_impl<Vec512>, &latent_backward_impl<Vec512>};
}

}  // namespace cpu
}  // namespace segcft
