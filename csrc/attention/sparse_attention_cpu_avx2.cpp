// AVX2 kernels of the sparse flash attention ops (inside the target region below, see
// sparse_attention_cpu_prelude.h; called only at ISA level avx2 and above). 8 query columns per
// vector; the micro-kernels hold 4 x 3 = 12 accumulators of the 16 ymm registers.
#include "attention/sparse_attention_cpu_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace slimformer::attention {
namespace {

struct Ymm {
  using F = __m256;
  static constexpr int W = 8;
  static constexpr int KQ_MR = 4, KQ_NV = 3, GM_MR = 4, GM_NV = 3;

  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }

  // Same 2^x as the AVX-512 policy (see sparse_attention_cpu_avx512.cpp).
  static F exp2(F x) {
    x = _mm256_min_ps(_mm256_max_ps(x, set1(-127.0f)), set1(127.0f));
    const F n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const F f = sub(x, n);
    F p = set1(1.535336188319500e-4f);
    p = fma(p, f, set1(1.339887440266574e-3f));
    p = fma(p, f, set1(9.618437357674640e-3f));
    p = fma(p, f, set1(5.550332471162809e-2f));
    p = fma(p, f, set1(2.402264791363012e-1f));
    p = fma(p, f, set1(6.931472028550421e-1f));
    p = fma(p, f, set1(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return mul(p, _mm256_castsi256_ps(e));
  }

  // Lane i = the sum of the lanes of a[i] (8 vectors; a transposing add tree).
  static F sum_lanes(const F* a) {
    F t[4], u[2];
    for (int i = 0; i < 4; ++i)
      t[i] = add(_mm256_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm256_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 2; ++i) {
      const __m256d x = _mm256_castps_pd(t[2 * i]), y = _mm256_castps_pd(t[2 * i + 1]);
      u[i] = add(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)), _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)));
    }
    return add(_mm256_permute2f128_ps(u[0], u[1], 0x20), _mm256_permute2f128_ps(u[0], u[1], 0x31));
  }

  static __m256i cols(int c0) {
    return _mm256_add_epi32(_mm256_set1_epi32(c0), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  // All-ones lanes where lo <= idx <= hi.
  static __m256i in_range(__m256i idx, int lo, int hi) {
    const __m256i out = _mm256_or_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(lo), idx),
                                        _mm256_cmpgt_epi32(idx, _mm256_set1_epi32(hi)));
    return _mm256_xor_si256(out, _mm256_set1_epi32(-1));
  }
  static F keep_range(F v, int c0, int lo, int hi) {
    return _mm256_blendv_ps(set1(-INFINITY), v, _mm256_castsi256_ps(in_range(cols(c0), lo, hi)));
  }
  static F keep_range_or(F v, int c0, int lo, int hi, const float* gq, int clo) {
    const __m256i idx = cols(c0);
    const __m256i g = _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(clo), idx),
                                          _mm256_castps_si256(_mm256_cmp_ps(load(gq), zero(), _CMP_GT_OQ)));
    const __m256i keep = _mm256_or_si256(in_range(idx, lo, hi), g);
    return _mm256_blendv_ps(set1(-INFINITY), v, _mm256_castsi256_ps(keep));
  }

  static void convert_f16(const uint16_t* s, int64_t n, float mul, float* dst) {
    const F m = set1(mul);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      store(dst + i, _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))), m));
    for (; i < n; ++i) dst[i] = half_bits_to_float(s[i]) * mul;
  }
};

}  // namespace
}  // namespace slimformer::attention

#include "attention/sparse_attention_cpu_impl.h"

namespace slimformer::attention {

void sparse_attention_fwd_avx2(const SparseAttentionParams& p, const SparseAttentionCpuData& d, int64_t i0, int64_t i1) {
  fwd_range<Ymm>(p, d, i0, i1);
}
void sparse_attention_dq_avx2(const SparseAttentionParams& p, const SparseAttentionCpuData& d, int64_t i0, int64_t i1) {
  dq_range<Ymm>(p, d, i0, i1);
}
void sparse_attention_dkdv_avx2(const SparseAttentionParams& p, const SparseAttentionCpuData& d, int64_t i0, int64_t i1) {
  dkdv_range<Ymm>(p, d, i0, i1);
}

}  // namespace slimformer::attention

#pragma GCC pop_options
