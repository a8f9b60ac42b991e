// Scalar reference implementations of the CPU kernels: the fallback on CPUs without AVX2 and the
// other half of the scalar-vs-AVX2 parity tests. Same loop structure and fp32 accumulation
// order as the AVX2 kernels, so the two agree to rounding.
#include "gptq/gptq_cpu.h"

namespace slimformer {
namespace gptq {

void dequantize_scalar(const Weights& w, int64_t k_begin, int64_t k_end, int64_t n_begin,
                       int64_t n_end, float* out, int64_t ld) {
  for (int64_t k = k_begin; k < k_end; ++k) {
    const int64_t g = w.g_idx[k];
    const int32_t* zrow = w.qzeros + g * w.zeros_stride;
    float* o = out + (k - k_begin) * ld;
    for (int64_t n = n_begin; n < n_end; ++n) {
      const float q = static_cast<float>(unpack_stream(w.qweight + n, w.N, w.bits, k));
      const float s = load_scale(w.scales, w.scale_type, g * w.N + n);
      o[n - n_begin] = s * (q - zero_point(zrow, n, w.bits, w.zero_offset));
    }
  }
}

void gemm_scalar(const GemmArgs& a, int64_t n_begin, int64_t n_end) {
  const Weights& w = a.w;
  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int64_t m = 0; m < a.M; ++m) a.y[m * w.N + n] = 0.f;
    for (int64_t s = 0; s < a.nseg; ++s) {
      const Segment seg = a.segs[s];
      const float scale = load_scale(w.scales, w.scale_type, seg.group * w.N + n);
      const float zero = zero_point(w.qzeros + seg.group * w.zeros_stride, n, w.bits, w.zero_offset);
      for (int64_t m = 0; m < a.M; ++m) {
        const float* x = a.x + m * w.K;
        float acc = 0.f;
        for (int64_t k = seg.k_begin; k < seg.k_end; ++k)
          acc += x[k] * static_cast<float>(unpack_stream(w.qweight + n, w.N, w.bits, k));
        a.y[m * w.N + n] += scale * (acc - zero * a.xsum[m * a.nseg + s]);
      }
    }
  }
}

}  // namespace gptq
}  // namespace slimformer
