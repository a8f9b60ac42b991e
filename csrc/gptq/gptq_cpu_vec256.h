// 256-bit vector policy for the width-generic CPU kernels (gptq_cpu_gemm_simd.h,
// gptq_cpu_a8_simd.h). Include only from translation units compiled with -mavx2 -mfma -mf16c.
#pragma once
#include "gptq/gptq_cpu_simd_prelude.h"

namespace slimformer {
namespace gptq {
namespace {  // internal linkage: see gptq_cpu_simd_prelude.h

struct NoDot {};

// Dot: acc += 4-byte u8 x s8 dot products per int32 lane (only the int8-activation kernel uses it).
template <class Dot = NoDot>
struct Ymm {
  using I = __m256i;
  using F = __m256;
  static constexpr int kLanes = 8;
  static constexpr int kRegisters = 16;

  static I load(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  template <int S>
  static I srli(I v) { return _mm256_srli_epi32(v, S); }
  template <int S>
  static I slli(I v) { return _mm256_slli_epi32(v, S); }
  static I shift_right(I v, int n) { return _mm256_srl_epi32(v, _mm_cvtsi32_si128(n)); }
  static I and_(I a, I b) { return _mm256_and_si256(a, b); }
  static I or_(I a, I b) { return _mm256_or_si256(a, b); }
  static I add(I a, I b) { return _mm256_add_epi32(a, b); }
  static I set1(int32_t v) { return _mm256_set1_epi32(v); }
  static I zero() { return _mm256_setzero_si256(); }
  static I dot(I acc, I a, I b) { return Dot::dot(acc, a, b); }

  static F cvt(I v) { return _mm256_cvtepi32_ps(v); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static F load(const float* p) { return _mm256_load_ps(p); }  // 32-byte aligned
  static void store(float* p, F v) { _mm256_store_ps(p, v); }
  static F zero_f() { return _mm256_setzero_ps(); }
  // out[0:kLanes] += float(sum) * dx
  static void scale_add(float* out, I sum, float dx) {
    store(out, fmadd(cvt(sum), _mm256_set1_ps(dx), load(out)));
  }
};

}  // namespace
}  // namespace gptq
}  // namespace slimformer
