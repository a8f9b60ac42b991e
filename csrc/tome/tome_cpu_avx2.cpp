// AVX2 kernels of the token merging ops (inside the target region below, see tome_cpu.h; called
// only at ISA level avx2 and above). 8 lanes; the match micro-kernel holds 4 sources x 2 vectors =
// 8 accumulators (two FMA pipes x 4 cycles of latency on Zen 3).
#include "tome/tome_cpu.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace slimformer::tome {
namespace {

struct Ymm {
  using F = __m256;
  using I = __m256i;
  static constexpr int W = 8;
  static constexpr int MR = 4, NV = 2, MV = 8;

  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  // dst[c * ldd + i] = src[i * lds + c], an 8 x 8 block.
  static void transpose(const float* src, int64_t lds, float* dst, int64_t ldd) {
    F t[8], u[8];
    for (int i = 0; i < 4; ++i) {
      const F a = load(src + 2 * i * lds), b = load(src + (2 * i + 1) * lds);
      t[2 * i] = _mm256_unpacklo_ps(a, b);
      t[2 * i + 1] = _mm256_unpackhi_ps(a, b);
    }
    for (int g = 0; g < 2; ++g) {  // u[4g + m], 128-bit lane k: column 4k + m of rows 4g .. 4g + 3
      u[4 * g + 0] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], _MM_SHUFFLE(1, 0, 1, 0));
      u[4 * g + 1] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], _MM_SHUFFLE(3, 2, 3, 2));
      u[4 * g + 2] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], _MM_SHUFFLE(1, 0, 1, 0));
      u[4 * g + 3] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int m = 0; m < 4; ++m) {
      store(dst + m * ldd, _mm256_permute2f128_ps(u[m], u[4 + m], 0x20));
      store(dst + (4 + m) * ldd, _mm256_permute2f128_ps(u[m], u[4 + m], 0x31));
    }
  }
  static I iota(int32_t base) {
    return _mm256_add_epi32(_mm256_set1_epi32(base), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static void store_i(int32_t* p, I v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  static void argmax_update(F v, I col, F& best, I& idx) {
    const F gt = _mm256_cmp_ps(v, best, _CMP_GT_OQ);
    best = _mm256_blendv_ps(best, v, gt);
    idx = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(idx), _mm256_castsi256_ps(col), gt));
  }
  static void reduce_argmax(F best, I idx, float& v, int32_t& j) {
    F m = _mm256_max_ps(best, _mm256_permute2f128_ps(best, best, 1));
    m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, _MM_SHUFFLE(1, 0, 3, 2)));
    m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, _MM_SHUFFLE(2, 3, 0, 1)));  // every lane: the max
    const __m256i eq = _mm256_castps_si256(_mm256_cmp_ps(best, m, _CMP_EQ_OQ));
    __m256i k = _mm256_blendv_epi8(_mm256_set1_epi32(INT32_MAX), idx, eq);
    k = _mm256_min_epi32(k, _mm256_permute2x128_si256(k, k, 1));
    k = _mm256_min_epi32(k, _mm256_shuffle_epi32(k, _MM_SHUFFLE(1, 0, 3, 2)));
    k = _mm256_min_epi32(k, _mm256_shuffle_epi32(k, _MM_SHUFFLE(2, 3, 0, 1)));
    v = _mm256_cvtss_f32(m);
    j = _mm256_cvtsi256_si32(k);
  }
  static F load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static F load_bf16(const uint16_t* p) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
  }
  static void store_f16(uint16_t* p, F v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // Round to nearest even; NaN stays a quiet NaN.
  static void store_bf16(uint16_t* p, F v) {
    const __m256i x = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(x, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(0x40)), nan);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
  }
};

}  // namespace
}  // namespace slimformer::tome

#include "tome/tome_cpu_impl.h"

namespace slimformer::tome {

void tome_match_sources_avx2(const TomeMatchParams& p, int64_t i0, int64_t i1) { match_items<Ymm>(p, i0, i1); }
void tome_merge_avx2(const TomeMergeParams& p, int64_t i0, int64_t i1) { merge_items<Ymm>(p, i0, i1); }

}  // namespace slimformer::tome

#pragma GCC pop_options
