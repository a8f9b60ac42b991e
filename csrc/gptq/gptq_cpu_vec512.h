// 512-bit vector policy for the width-generic CPU kernels. Include only from translation units
// inside a `#pragma GCC target` region with avx512f, avx512bw, avx512vl and avx512vnni.
#pragma once
#include "gptq/gptq_cpu_simd_prelude.h"

namespace slimformer {
namespace gptq {
namespace {  // internal linkage: see gptq_cpu_simd_prelude.h

struct Zmm {
  using I = __m512i;
  using F = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kRegisters = 32;

  static I load(const int32_t* p) { return _mm512_loadu_si512(p); }
  template <int S>
  static I srli(I v) { return _mm512_srli_epi32(v, S); }
  template <int S>
  static I slli(I v) { return _mm512_slli_epi32(v, S); }
  static I shift_right(I v, int n) { return _mm512_srl_epi32(v, _mm_cvtsi32_si128(n)); }
  static I and_(I a, I b) { return _mm512_and_si512(a, b); }
  static I or_(I a, I b) { return _mm512_or_si512(a, b); }
  static I add(I a, I b) { return _mm512_add_epi32(a, b); }
  static I set1(int32_t v) { return _mm512_set1_epi32(v); }
  static I zero() { return _mm512_setzero_si512(); }
  static I dot(I acc, I a, I b) { return _mm512_dpbusd_epi32(acc, a, b); }  // AVX-512 VNNI

  static F cvt(I v) { return _mm512_cvtepi32_ps(v); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static F load(const float* p) { return _mm512_load_ps(p); }  // 64-byte aligned
  static void store(float* p, F v) { _mm512_store_ps(p, v); }
  static F zero_f() { return _mm512_setzero_ps(); }
  static void scale_add(float* out, I sum, float dx) {
    store(out, fmadd(cvt(sum), _mm512_set1_ps(dx), load(out)));
  }
};

}  // namespace
}  // namespace gptq
}  // namespace slimformer
