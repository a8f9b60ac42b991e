// AVX-512 kernels of the sparse flash attention ops (inside the target region below, see
// sparse_attention_cpu_prelude.h; called only at ISA level avx512vnni). 16 query columns per
// vector; the score and product micro-kernels hold 6 x 4 = 24 accumulators in zmm registers.
#include "attention/sparse_attention_cpu_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")

namespace slimformer::attention {
namespace {

struct Zmm {
  using F = __m512;
  static constexpr int W = 16;
  // 6 rows x 4 vectors: 24 accumulators + 4 column loads + 1 broadcast of the 32 registers.
  static constexpr int KQ_MR = 6, KQ_NV = 4, GM_MR = 6, GM_NV = 4;

  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }

  // 2^x: x = n + f with n = round(x), |f| <= 1/2; 2^f by Cephes' exp2f polynomial (~1 ulp), 2^n by
  // building the exponent field. x is clamped to [-127, 127]; n = -127 gives a zero exponent field,
  // so every x <= -126.5 (masked scores: -inf) yields exactly 0.
  static F exp2(F x) {
    x = _mm512_min_ps(_mm512_max_ps(x, set1(-127.0f)), set1(127.0f));
    const F n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const F f = sub(x, n);
    F p = set1(1.535336188319500e-4f);
    p = fma(p, f, set1(1.339887440266574e-3f));
    p = fma(p, f, set1(9.618437357674640e-3f));
    p = fma(p, f, set1(5.550332471162809e-2f));
    p = fma(p, f, set1(2.402264791363012e-1f));
    p = fma(p, f, set1(6.931472028550421e-1f));
    p = fma(p, f, set1(1.0f));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return mul(p, _mm512_castsi512_ps(e));
  }

  // Lane i = the sum of the lanes of a[i] (16 vectors; a transposing add tree, 45 operations).
  static F sum_lanes(const F* a) {
    F t[8], u[4], w[2];
    for (int i = 0; i < 8; ++i)
      t[i] = add(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {
      const __m512d x = _mm512_castps_pd(t[2 * i]), y = _mm512_castps_pd(t[2 * i + 1]);
      u[i] = add(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; ++i)
      w[i] = add(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                 _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return add(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
               _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
  }

  static __m512i cols(int c0) {
    return _mm512_add_epi32(_mm512_set1_epi32(c0), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  }
  static __mmask16 in_range(__m512i idx, int lo, int hi) {
    return _mm512_cmpge_epi32_mask(idx, _mm512_set1_epi32(lo)) & _mm512_cmple_epi32_mask(idx, _mm512_set1_epi32(hi));
  }
  static F keep_range(F v, int c0, int lo, int hi) {
    return _mm512_mask_blend_ps(in_range(cols(c0), lo, hi), set1(-INFINITY), v);
  }
  static F keep_range_or(F v, int c0, int lo, int hi, const float* gq, int clo) {
    const __m512i idx = cols(c0);
    const __mmask16 g = _mm512_cmp_ps_mask(load(gq), zero(), _CMP_GT_OQ) &
                        _mm512_cmpge_epi32_mask(idx, _mm512_set1_epi32(clo));
    return _mm512_mask_blend_ps(in_range(idx, lo, hi) | g, set1(-INFINITY), v);
  }

  static void convert_f16(const uint16_t* s, int64_t n, float mul, float* dst) {
    const F m = set1(mul);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
      store(dst + i, _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))), m));
    if (i < n) {
      const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1u);
      _mm512_mask_storeu_ps(dst + i, k, _mm512_mul_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, s + i)), m));
    }
  }
};

}  // namespace
}  // namespace slimformer::attention

#include "attention/sparse_attention_cpu_impl.h"

namespace slimformer::attention {

void sparse_attention_fwd_avx512(const SparseAttentionParams& p, const SparseAttentionCpuData& d, int64_t i0, int64_t i1) {
  fwd_range<Zmm>(p, d, i0, i1);
}
void sparse_attention_dq_avx512(const SparseAttentionParams& p, const SparseAttentionCpuData& d, int64_t i0, int64_t i1) {
  dq_range<Zmm>(p, d, i0, i1);
}
void sparse_attention_dkdv_avx512(const SparseAttentionParams& p, const SparseAttentionCpuData& d, int64_t i0,
                                  int64_t i1) {
  dkdv_range<Zmm>(p, d, i0, i1);
}

}  // namespace slimformer::attention

#pragma GCC pop_options
