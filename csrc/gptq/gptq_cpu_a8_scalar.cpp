// Activation quantization for gptq_gemm_a8 and its scalar kernel (the fallback and the parity
// reference of the SIMD kernels). The rule is documented in gptq_cpu_a8.h.
#include <algorithm>
#include <cmath>
#include <limits>

#include "gptq/gptq_cpu_a8.h"

namespace slimformer {
namespace gptq {
namespace {

int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Round half to even for |v| < 2^22, like nearbyint in the default FP mode but inlined: adding
// 1.5 * 2^23 pushes the fraction bits out of the mantissa, and IEEE addition rounds to even.
// (No -ffast-math anywhere in the build, so the compiler keeps the two operations.)
inline float round_half_even(float v) {
  constexpr float kMagic = 12582912.f;
  return (v + kMagic) - kMagic;
}

}  // namespace

bool a8_supported_bits(int bits) { return bits == 2 || bits == 4 || bits == 8; }

void prepare_a8(const float* x, int64_t M, int64_t K, int bits, const Segment* segs, int64_t nseg,
                A8Activations& out) {
  const int vpw = 32 / bits, passes = a8_supported_bits(bits) ? a8_passes(bits) : 1;
  out.M = M;
  out.seg_unit_slot.assign(nseg + 1, 0);
  out.seg_block_slot.assign(nseg + 1, 0);
  for (int64_t s = 0; s < nseg; ++s) {
    out.seg_unit_slot[s + 1] = out.seg_unit_slot[s] + div_up(segs[s].k_end, vpw) - segs[s].k_begin / vpw;
    out.seg_block_slot[s + 1] =
        out.seg_block_slot[s] + div_up(segs[s].k_end, kA8Block) - segs[s].k_begin / kA8Block;
  }
  out.unit_slots = out.seg_unit_slot[nseg];
  out.block_slots = out.seg_block_slot[nseg];
  out.xq.assign(M * K, 0);
  // Dot-order words only for the integer kernels' widths (2/4/8 bits).
  out.xq_units.assign(a8_supported_bits(bits) ? M * out.unit_slots * passes : 0, 0);
  out.dx.assign(M * out.block_slots, 0.f);
  out.xsum.assign(M * nseg, 0.f);

  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    int8_t* qr = out.xq.data() + m * K;
    for (int64_t s = 0; s < nseg; ++s) {
      const Segment seg = segs[s];
      const int64_t b_first = seg.k_begin / kA8Block;
      float xsum = 0.f;
      for (int64_t b = b_first; b * kA8Block < seg.k_end; ++b) {
        const int64_t k0 = std::max(b * kA8Block, seg.k_begin), k1 = std::min((b + 1) * kA8Block, seg.k_end);
        // NaN-propagating max: a NaN or inf anywhere poisons the block (below).
        float amax = 0.f;
        for (int64_t k = k0; k < k1; ++k) {
          const float v = std::fabs(xr[k]);
          if (!(v <= amax) && amax == amax) amax = v;
        }
        const float inv = 127.f / amax;
        const bool finite = std::isfinite(amax);
        const bool quantize = finite && amax > 0.f && std::isfinite(inv);  // else all of xq is 0
        int64_t isum = 0;
        for (int64_t k = k0; k < k1; ++k) {
          const float r = quantize ? round_half_even(xr[k] * inv) : 0.f;  // |r| <= 127.5
          qr[k] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, r)));
          isum += qr[k];
        }
        // Non-finite input: dx = NaN makes the block's contribution NaN, as in x_hat @ W.
        const float dx = !finite ? std::numeric_limits<float>::quiet_NaN() : (quantize ? amax / 127.f : 0.f);
        out.dx[m * out.block_slots + out.seg_block_slot[s] + (b - b_first)] = dx;
        xsum += dx * static_cast<float>(isum);
      }
      out.xsum[m * nseg + s] = xsum;
      if (!a8_supported_bits(bits)) continue;
      // Dot-order bytes of every word overlapping the segment (values outside it stay 0).
      const int64_t u_first = seg.k_begin / vpw;
      for (int64_t u = u_first; u * vpw < seg.k_end; ++u) {
        uint8_t* bytes = reinterpret_cast<uint8_t*>(
            out.xq_units.data() + (m * out.unit_slots + out.seg_unit_slot[s] + (u - u_first)) * passes);
        for (int j = 0; j < vpw; ++j) {
          const int64_t k = u * vpw + j;
          if (k < seg.k_begin || k >= seg.k_end) continue;
          // value j sits in byte j / passes of the word, in pass j % passes
          bytes[(j % passes) * 4 + j / passes] = static_cast<uint8_t>(qr[k]);
        }
      }
    }
  }
}

void dequantize_a8(const A8Activations& act, const Segment* segs, int64_t nseg, int64_t K, float* x_hat) {
  for (int64_t m = 0; m < act.M; ++m) {
    for (int64_t s = 0; s < nseg; ++s) {
      const int64_t b_first = segs[s].k_begin / kA8Block;
      const float* dx = act.dx.data() + m * act.block_slots + act.seg_block_slot[s];
      for (int64_t k = segs[s].k_begin; k < segs[s].k_end; ++k)
        x_hat[m * K + k] = dx[k / kA8Block - b_first] * static_cast<float>(act.xq[m * K + k]);
    }
  }
}

void gemm_a8_scalar(const A8Args& a, int64_t n_begin, int64_t n_end) {
  const Weights& w = a.w;
  const A8Activations& act = *a.act;
  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int64_t m = 0; m < act.M; ++m) a.y[m * w.N + n] = 0.f;
    for (int64_t s = 0; s < a.nseg; ++s) {
      const Segment seg = a.segs[s];
      const float scale = load_scale(w.scales, w.scale_type, seg.group * w.N + n);
      const float zero = zero_point(w.qzeros + seg.group * w.zeros_stride, n, w.bits, w.zero_offset);
      const int64_t b_first = seg.k_begin / kA8Block;
      for (int64_t m = 0; m < act.M; ++m) {
        const int8_t* q = act.xq.data() + m * w.K;
        const float* dx = act.dx.data() + m * act.block_slots + act.seg_block_slot[s];
        float acc = 0.f;
        for (int64_t b = b_first; b * kA8Block < seg.k_end; ++b) {
          const int64_t k0 = std::max(b * kA8Block, seg.k_begin), k1 = std::min((b + 1) * kA8Block, seg.k_end);
          int32_t dot = 0;
          for (int64_t k = k0; k < k1; ++k)
            dot += q[k] * static_cast<int32_t>(unpack_stream(w.qweight + n, w.N, w.bits, k));
          acc += static_cast<float>(dot) * dx[b - b_first];
        }
        a.y[m * w.N + n] += scale * (acc - zero * act.xsum[m * a.nseg + s]);
      }
    }
  }
}

}  // namespace gptq
}  // namespace slimformer
