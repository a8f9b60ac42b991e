// Torch-free CPU kernels for y = x @ W with W in GPTQ checkpoint layout (see gptq_format.h).
// The ATen adapter (gptq_cpu_op.cpp) validates inputs, converts x to fp32, splits the columns
// across threads and picks the scalar or AVX2 implementation at run time.
#pragma once
#include <stdint.h>

#include "gptq/gptq_format.h"

namespace slimformer {
namespace gptq {

// A maximal run of consecutive k with the same group index. Sequential checkpoints have one
// segment per group; act-order checkpoints (unsorted g_idx) have many short ones, which is why
// QuantLinear permutes K once at load time so that groups become contiguous again.
struct Segment {
  int64_t k_begin;
  int64_t k_end;
  int64_t group;
};

struct Weights {
  const int32_t* qweight;  // [K*bits/32, N]
  const int32_t* qzeros;   // [G, zeros_stride]
  const void* scales;      // [G, N]
  const int32_t* g_idx;    // [K]
  ScaleType scale_type;
  int64_t K, N, G, zeros_stride;
  int bits;
  int zero_offset;  // 1: "gptq" (v1), 0: "gptq_v2"
};

// gptq_gemm: accumulate x[m, k] * q(k, n) per segment in fp32, then fold scale and zero point
// once per segment: y[m, n] += s[g, n] * (acc - z[g, n] * sum_{k in seg} x[m, k]).
struct GemmArgs {
  Weights w;
  const float* x;     // [M, K] contiguous
  const float* x_prescaled;  // [M, K]: x through prescale_x_avx2 (SIMD paths only)
  const float* xsum;  // [M, nseg]: sum of x[m, k] over each segment
  const Segment* segs;
  int64_t nseg, M;
  float* y;  // [M, N] contiguous; columns [n_begin, n_end) are overwritten
};

// gptq_dequantize: W[k_begin:k_end, n_begin:n_end] into out (row stride ld) as fp32.
void dequantize_scalar(const Weights& w, int64_t k_begin, int64_t k_end, int64_t n_begin,
                       int64_t n_end, float* out, int64_t ld);
void gemm_scalar(const GemmArgs& a, int64_t n_begin, int64_t n_end);

// AVX2+FMA+F16C versions; callers check active_cpu_isa() first.
void dequantize_avx2(const Weights& w, int64_t k_begin, int64_t k_end, int64_t n_begin,
                     int64_t n_end, float* out, int64_t ld);
// gemm_avx2 reads some packed values in place (scaled by a power of two); its x must be
// prescaled by this function (powers of two down to 2^-28: exact unless |x| < ~1e-29, where the
// scaled value turns subnormal). xsum stays the sum of the unscaled x.
void prescale_x_avx2(int bits, const float* x, int64_t M, int64_t K, float* out);
void gemm_avx2(const GemmArgs& a, int64_t n_begin, int64_t n_end);
// The same kernel at 512 bits (x prescaled as for AVX2); callers check AVX-512 first.
void gemm_avx512(const GemmArgs& a, int64_t n_begin, int64_t n_end);

}  // namespace gptq
}  // namespace slimformer
