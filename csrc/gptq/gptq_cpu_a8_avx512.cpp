// gptq_gemm_a8 with AVX-512 VNNI (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni plus
// the AVX2 flags for the shared 256-bit helpers): 512-bit vpdpbusd, 32 columns per register tile
// and up to 8 rows per pass (32 zmm registers). On cores with full-width AVX-512 (Zen 5, Intel
// server parts) this doubles the integer throughput of the 256-bit kernels.
#include "gptq/gptq_cpu_a8_simd.h"

namespace slimformer {
namespace gptq {
namespace {

struct Zmm {
  using I = __m512i;
  static constexpr int kLanes = 16;
  static constexpr int kMaxRows = 8;  // 16 accumulators + 6 working registers of 32
  static I load(const int32_t* p) { return _mm512_loadu_si512(p); }
  static I shift_right(I v, int n) { return _mm512_srl_epi32(v, _mm_cvtsi32_si128(n)); }
  static I and_(I a, I b) { return _mm512_and_si512(a, b); }
  static I add(I a, I b) { return _mm512_add_epi32(a, b); }
  static I set1(int32_t v) { return _mm512_set1_epi32(v); }
  static I zero() { return _mm512_setzero_si512(); }
  static I dot(I acc, I a, I b) { return _mm512_dpbusd_epi32(acc, a, b); }
  static void scale_add(float* out, I sum, float dx) {
    _mm512_store_ps(out, _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(dx), _mm512_load_ps(out)));
  }
};

}  // namespace

void gemm_a8_avx512vnni(const A8Args& a, int64_t n_begin, int64_t n_end) { a8::gemm<Zmm>(a, n_begin, n_end); }

}  // namespace gptq
}  // namespace slimformer
