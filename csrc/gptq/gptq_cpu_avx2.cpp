// AVX2 + FMA + F16C CPU kernels: the float gptq_gemm kernel at 256 bits, x prescaling, and
// dequantization. Compiled for that target inside the region below (see gptq_cpu_simd_prelude.h);
// the adapter only calls in after checking the CPU at run time.
#include "gptq/gptq_cpu_simd_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include "gptq/gptq_cpu_gemm_simd.h"
#include "gptq/gptq_cpu_simd.h"
#include "gptq/gptq_cpu_vec256.h"

namespace slimformer {
namespace gptq {
namespace {

template <int BITS>
void prescale(const float* x, int64_t M, int64_t K, float* out) {
  constexpr int VPU = vpu(BITS);
  float factor[VPU];
  for (int j = 0; j < VPU; ++j) factor[j] = 1.0f / static_cast<float>(1u << fp::fold_shift(BITS, j));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) out[m * K + k] = x[m * K + k] * factor[k % VPU];
}

}  // namespace

void prescale_x_avx2(int bits, const float* x, int64_t M, int64_t K, float* out) {
  switch (bits) {
    case 2: return prescale<2>(x, M, K, out);
    case 3: return prescale<3>(x, M, K, out);
    case 4: return prescale<4>(x, M, K, out);
    default: return prescale<8>(x, M, K, out);
  }
}

void gemm_avx2(const GemmArgs& a, int64_t n_begin, int64_t n_end) { fp::gemm<Ymm<>>(a, n_begin, n_end); }

void dequantize_avx2(const Weights& w, int64_t k_begin, int64_t k_end, int64_t n_begin,
                     int64_t n_end, float* out, int64_t ld) {
  const int64_t n_vec_end = n_begin + (n_end - n_begin) / 8 * 8;
  const __m256i mask = _mm256_set1_epi32(static_cast<int>(value_mask(w.bits)));
  for (int64_t n = n_begin; n < n_vec_end; n += 8) {
    int64_t g_cached = -1;
    __m256 sv = _mm256_setzero_ps(), zv = _mm256_setzero_ps();
    for (int64_t k = k_begin; k < k_end; ++k) {
      const int64_t g = w.g_idx[k];
      if (g != g_cached) {  // sorted g_idx: once per group
        sv = load_scales8(w, g, n);
        zv = load_zeros8(w, g, n);
        g_cached = g;
      }
      const int64_t bit = static_cast<int64_t>(w.bits) * k;
      const int sh = static_cast<int>(bit & 31);
      const int32_t* row = w.qweight + (bit >> 5) * w.N + n;
      __m256i v = _mm256_srl_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row)),
                                   _mm_cvtsi32_si128(sh));
      if (sh + w.bits > 32) {
        const __m256i nx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + w.N));
        v = _mm256_or_si256(v, _mm256_sll_epi32(nx, _mm_cvtsi32_si128(32 - sh)));
      }
      const __m256 q = _mm256_cvtepi32_ps(_mm256_and_si256(v, mask));
      _mm256_storeu_ps(out + (k - k_begin) * ld + (n - n_begin), _mm256_mul_ps(sv, _mm256_sub_ps(q, zv)));
    }
  }
  if (n_vec_end < n_end) {
    // Leftover columns: scalar, written at their offset inside `out`.
    dequantize_scalar(w, k_begin, k_end, n_vec_end, n_end, out + (n_vec_end - n_begin), ld);
  }
}

}  // namespace gptq
}  // namespace slimformer

#pragma GCC pop_options
