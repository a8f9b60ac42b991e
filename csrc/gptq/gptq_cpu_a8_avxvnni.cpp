// gptq_gemm_a8 with AVX-VNNI (compiled for AVX2 + FMA + F16C + AVX-VNNI inside the region below,
// see gptq_cpu_simd_prelude.h): one vpdpbusd per 4 weights x 4 activations per column,
// accumulated in int32 without intermediate saturation.
#include "gptq/gptq_cpu_simd_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
#include "gptq/gptq_cpu_a8_simd.h"
#include "gptq/gptq_cpu_vec256.h"

namespace slimformer {
namespace gptq {
namespace {

struct DotVnni {
  static inline __m256i dot(__m256i acc, __m256i a, __m256i b) { return _mm256_dpbusd_avx_epi32(acc, a, b); }
};

}  // namespace

void gemm_a8_avxvnni(const A8Args& a, int64_t n_begin, int64_t n_end) { a8::gemm<Ymm<DotVnni>>(a, n_begin, n_end); }

}  // namespace gptq
}  // namespace slimformer

#pragma GCC pop_options
