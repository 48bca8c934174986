// AVX2 + FMA + F16C soft-area kernels; compiled with those flags for this file only and
// selected at run time when the CPU supports them.
#include <immintrin.h>

#include "kernels.h"

namespace segcft {
namespace cpu {
namespace {

struct Vec256 {
  static constexpr int W = 8;
  using S = float;
  using F = __m256;
  using I = __m256i;
  using M = __m256;  // all-ones / all-zeros lanes

  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  // a where x's sign bit is set, else b.
  static F select_neg(F x, F a, F b) { return _mm256_blendv_ps(b, a, x); }
  static F recip(F x) { return _mm256_div_ps(_mm256_set1_ps(1.0f), x); }

  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fmsub(F a, F b, F c) { return _mm256_fmsub_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }

  // exp(x) for x clamped to [-87.33654, 88] (normal results only: no subnormal scaling without
  // AVX-512's scalef, so the smallest result is about 1.2e-38 instead of 0); NaN in, NaN out.
  // About 2 ulp.
  static F exp_clamped(F x) {
    const F n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    F r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
    F y = _mm256_fmadd_ps(_mm256_set1_ps(kExpPoly[5]), r, _mm256_set1_ps(kExpPoly[4]));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpPoly[3]));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpPoly[2]));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpPoly[1]));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpPoly[0]));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  }
  // The second operand of max/min is returned for NaN, so NaN passes the clamps.
  static F exp(F x) {
    return exp_clamped(_mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-87.33654f), x)));
  }
  static F exp_nonpos(F x) { return exp_clamped(_mm256_max_ps(_mm256_set1_ps(-87.33654f), x)); }

  static F load_s(const float* p) { return _mm256_loadu_ps(p); }
  static void store_s(float* p, F v) { _mm256_storeu_ps(p, v); }

  template <DType DT>
  static F load(const void* p) {
    if constexpr (DT == DType::Float32) {
      return _mm256_loadu_ps(static_cast<const float*>(p));
    } else if constexpr (DT == DType::Float16) {
      return _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(p)));
    } else {
      const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
      return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
    }
  }

  template <DType DT>
  static void store(void* p, F v) {
    if constexpr (DT == DType::Float32) {
      _mm256_storeu_ps(static_cast<float*>(p), v);
    } else if constexpr (DT == DType::Float16) {
      _mm_storeu_si128(static_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
      // Round to nearest even; NaN stays a quiet NaN.
      const __m256i u = _mm256_castps_si256(v);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      __m256i h = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
      const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      h = _mm256_blendv_epi8(h, _mm256_set1_epi32(0x7fc0), nan);
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08);
      _mm_storeu_si128(static_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
    }
  }

  // 8 int64 ids -> int32 lanes (low halves; callers validate the range, this never reads
  // out of bounds).
  static I load_ids(const int64_t* p) {
    const __m256i sel = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    const __m256i a = _mm256_permutevar8x32_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), sel);
    const __m256i b = _mm256_permutevar8x32_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 4)), sel);
    return _mm256_permute2x128_si256(a, b, 0x20);
  }
  template <DType DT>
  static void stream(void* p, F v) {
    store<DT>(p, v);
  }
  static void stream_fence() {}
  static constexpr bool kStream = false;
  using IdRange = int64_t;
  static int64_t set1_id(int64_t x) { return x; }
  static constexpr bool kVecIdRange = false;
  static M eq(I ids, int r) { return _mm256_castsi256_ps(_mm256_cmpeq_epi32(ids, _mm256_set1_epi32(r))); }
  static M valid(I ids, int R) {
    const __m256i ge0 = _mm256_cmpgt_epi32(ids, _mm256_set1_epi32(-1));
    const __m256i ltR = _mm256_cmpgt_epi32(_mm256_set1_epi32(R), ids);
    return _mm256_castsi256_ps(_mm256_and_si256(ge0, ltR));
  }
  // load_ids keeps the low 32 bits of each id, so valid may pass 2^32 + r: the 8 ids at p are
  // compared on all 64 bits (lanes with id < 0 or id >= R set).
  using BadIds = __m256i;
  static BadIds no_bad_ids() { return _mm256_setzero_si256(); }
  static BadIds flag_bad_ids(BadIds bad, const int64_t* p, M, int R) {
    const __m256i lo = _mm256_set1_epi64x(-1), hi = _mm256_set1_epi64x(R);
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 4));
    const __m256i ok = _mm256_and_si256(_mm256_and_si256(_mm256_cmpgt_epi64(a, lo), _mm256_cmpgt_epi64(hi, a)),
                                        _mm256_and_si256(_mm256_cmpgt_epi64(b, lo), _mm256_cmpgt_epi64(hi, b)));
    return _mm256_or_si256(bad, _mm256_xor_si256(ok, _mm256_set1_epi64x(-1)));
  }
  static bool any_bad_ids(BadIds bad) { return !_mm256_testz_si256(bad, bad); }
  static M tail(int n) {
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
  }
  static F mask_add(F acc, M m, F x) { return _mm256_add_ps(acc, _mm256_and_ps(m, x)); }
  static F mask_fmadd(F acc, M m, F a, F b) { return _mm256_add_ps(acc, _mm256_and_ps(m, _mm256_mul_ps(a, b))); }
  static F permute(I ids, F table, M ok) { return _mm256_and_ps(ok, _mm256_permutevar8x32_ps(table, ids)); }
  static F gather(const float* base, I ids, M ok) {
    return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), base, ids, ok, 4);
  }
  // Horizontal sum in a fixed pairwise order.
  static float hsum(F v) {
    alignas(32) float a[W];
    _mm256_store_ps(a, v);
    for (int w = W / 2; w > 0; w /= 2)
      for (int i = 0; i < w; ++i) a[i] += a[i + w];
    return a[0];
  }
};

#include "kernels_impl.h"
#include "conv3x3_impl.h"

std::size_t scratch_bytes(const Problem& p) { return scratch_bytes_impl<Vec256>(p); }

}  // namespace

KernelTable avx2_kernels() {
  return {"avx2", &scratch_bytes, &forward_chunk_dispatch<Vec256>, &backward_chunk_dispatch<Vec256>,
          &gelu_chunk_impl<Vec256>,
          &conv3x3_forward_impl<Vec256>, &conv3x3_backward_impl<Vec256>,
          &gelu_pointwise_backward_impl<Vec256>,
          &pointwise_rows_impl<Vec256>,
          &pointwise_cf_forward_impl<Vec256>, &gelu_pointwise_cf_backward_impl<Vec256>,
          &latent_forward_impl<Vec256>, &latent_backward_impl<Vec256>};
}

}  // namespace cpu
}  // namespace segcft
