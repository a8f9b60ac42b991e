// gptq_gemm_a8 with AVX2 integer dot products, compiled for AVX2 + FMA + F16C inside the region
// below (see gptq_cpu_simd_prelude.h).
#include "gptq/gptq_cpu_simd_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include "gptq/gptq_cpu_a8_simd.h"
#include "gptq/gptq_cpu_vec256.h"

namespace slimformer {
namespace gptq {
namespace {

// u8 x s8 products summed in pairs to int16, then pairs of int16 to int32. The int16 step cannot
// saturate for 2- and 4-bit weights (2 * 15 * 127 < 32767); 8-bit weights would, so the adapter
// never sends them here.
struct DotMaddubs {
  static inline __m256i dot(__m256i acc, __m256i a, __m256i b) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
  }
};

}  // namespace

void gemm_a8_avx2(const A8Args& a, int64_t n_begin, int64_t n_end) { a8::gemm<Ymm<DotMaddubs>>(a, n_begin, n_end); }

}  // namespace gptq
}  // namespace slimformer

#pragma GCC pop_options
