// AVX-512 kernels of the token merging ops (inside the target region below, see tome_cpu.h; called
// only at ISA level avx512vnni). 16 lanes; the match micro-kernel holds 6 sources x 4 vectors = 24
// accumulators + 4 destination loads + 1 broadcast of the 32 zmm registers.
#include "tome/tome_cpu.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")

namespace slimformer::tome {
namespace {

struct Zmm {
  using F = __m512;
  using I = __m512i;
  static constexpr int W = 16;
  static constexpr int MR = 6, NV = 4, MV = 8;

  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  // dst[c * ldd + i] = src[i * lds + c], a 16 x 16 block (64 shuffles).
  static void transpose(const float* src, int64_t lds, float* dst, int64_t ldd) {
    F t[16], u[16], v[16];
    for (int i = 0; i < 8; ++i) {
      const F a = load(src + 2 * i * lds), b = load(src + (2 * i + 1) * lds);
      t[2 * i] = _mm512_unpacklo_ps(a, b);
      t[2 * i + 1] = _mm512_unpackhi_ps(a, b);
    }
    for (int g = 0; g < 4; ++g) {  // u[4g + m], 128-bit lane k: column 4k + m of rows 4g .. 4g + 3
      u[4 * g + 0] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], _MM_SHUFFLE(1, 0, 1, 0));
      u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], _MM_SHUFFLE(3, 2, 3, 2));
      u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], _MM_SHUFFLE(1, 0, 1, 0));
      u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int h = 0; h < 2; ++h)  // v[8h + m]: columns m, 8 + m; v[8h + 4 + m]: 4 + m, 12 + m (rows 8h ..)
      for (int m = 0; m < 4; ++m) {
        v[8 * h + m] = _mm512_shuffle_f32x4(u[8 * h + m], u[8 * h + 4 + m], 0x88);
        v[8 * h + 4 + m] = _mm512_shuffle_f32x4(u[8 * h + m], u[8 * h + 4 + m], 0xDD);
      }
    for (int m = 0; m < 4; ++m) {
      store(dst + m * ldd, _mm512_shuffle_f32x4(v[m], v[8 + m], 0x88));
      store(dst + (8 + m) * ldd, _mm512_shuffle_f32x4(v[m], v[8 + m], 0xDD));
      store(dst + (4 + m) * ldd, _mm512_shuffle_f32x4(v[4 + m], v[12 + m], 0x88));
      store(dst + (12 + m) * ldd, _mm512_shuffle_f32x4(v[4 + m], v[12 + m], 0xDD));
    }
  }
  static I iota(int32_t base) {
    return _mm512_add_epi32(_mm512_set1_epi32(base),
                            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  }
  static void store_i(int32_t* p, I v) { _mm512_storeu_si512(p, v); }
  static void argmax_update(F v, I col, F& best, I& idx) {
    const __mmask16 gt = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
    best = _mm512_mask_blend_ps(gt, best, v);
    idx = _mm512_mask_blend_epi32(gt, idx, col);
  }
  static void reduce_argmax(F best, I idx, float& v, int32_t& j) {
    v = _mm512_reduce_max_ps(best);
    j = _mm512_mask_reduce_min_epi32(_mm512_cmp_ps_mask(best, set1(v), _CMP_EQ_OQ), idx);
  }
  static F load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static F load_bf16(const uint16_t* p) {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  }
  static void store_f16(uint16_t* p, F v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // Round to nearest even; NaN stays a quiet NaN.
  static void store_bf16(uint16_t* p, F v) {
    const __m512i x = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(x, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_blend_epi32(nan, r, _mm512_or_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(0x40)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
};

}  // namespace
}  // namespace slimformer::tome

#include "tome/tome_cpu_impl.h"

namespace slimformer::tome {

void tome_match_sources_avx512(const TomeMatchParams& p, int64_t i0, int64_t i1) { match_items<Zmm>(p, i0, i1); }
void tome_merge_avx512(const TomeMergeParams& p, int64_t i0, int64_t i1) { merge_items<Zmm>(p, i0, i1); }

}  // namespace slimformer::tome

#pragma GCC pop_options
