// Portable kernels of the sparse flash attention ops: the algorithm of sparse_attention_cpu_impl.h
// with one-lane "vectors" and the same 2^x polynomial as the SIMD policies, so all ISAs agree to
// rounding (only the summation grouping and FMA contraction differ).
#include "attention/sparse_attention_cpu_prelude.h"

namespace slimformer::attention {
namespace {

struct Scalar1 {
  using F = float;
  static constexpr int W = 1;
  static constexpr int KQ_MR = 4, KQ_NV = 4, GM_MR = 4, GM_NV = 4;

  static F zero() { return 0.0f; }
  static F set1(float x) { return x; }
  static F load(const float* p) { return *p; }
  static void store(float* p, F v) { *p = v; }
  static F fma(F a, F b, F c) { return a * b + c; }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F max(F a, F b) { return a > b ? a : b; }

  static F exp2(F x) {
    x = std::min(std::max(x, -127.0f), 127.0f);  // NaN -> -127 as vmaxps does
    const float n = std::nearbyint(x);
    const float f = x - n;
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
    float s;
    std::memcpy(&s, &bits, 4);
    return p * s;
  }

  static F sum_lanes(const F* a) { return a[0]; }
  static F keep_range(F v, int c0, int lo, int hi) { return c0 >= lo && c0 <= hi ? v : -INFINITY; }
  static F keep_range_or(F v, int c0, int lo, int hi, const float* gq, int clo) {
    return (c0 >= lo && c0 <= hi) || (*gq > 0.0f && c0 >= clo) ? v : -INFINITY;
  }
  static void convert_f16(const uint16_t* s, int64_t n, float mul, float* dst) {
    for (int64_t i = 0; i < n; ++i) dst[i] = half_bits_to_float(s[i]) * mul;
  }
};

}  // namespace
}  // namespace slimformer::attention

#include "attention/sparse_attention_cpu_impl.h"

namespace slimformer::attention {

void sparse_attention_fwd_scalar(const SparseAttentionParams& p, const SparseAttentionCpuData& d, int64_t i0, int64_t i1) {
  fwd_range<Scalar1>(p, d, i0, i1);
}
void sparse_attention_dq_scalar(const SparseAttentionParams& p, const SparseAttentionCpuData& d, int64_t i0, int64_t i1) {
  dq_range<Scalar1>(p, d, i0, i1);
}
void sparse_attention_dkdv_scalar(const SparseAttentionParams& p, const SparseAttentionCpuData& d, int64_t i0,
                                  int64_t i1) {
  dkdv_range<Scalar1>(p, d, i0, i1);
}

}  // namespace slimformer::attention
