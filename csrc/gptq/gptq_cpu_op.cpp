// ATen adapter of the GPTQ ops on CPU: validation, fp32 staging of x, segments of g_idx, and
// threading over column blocks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/cpu_features.h"
#include "gptq/gptq_checks.h"
#include "gptq/gptq_cpu.h"
#include "gptq/gptq_cpu_a8.h"

namespace slimformer {
namespace gptq {
namespace {

// One kernel serves every batch size. Rows go through it in passes of up to 6 (AVX2) or 8
// (AVX-512); with several passes it narrows its column blocks so their packed weights stay in L2
// between passes, i.e. the large-batch path dequantizes L2-resident tiles in registers and
// multiplies. Measured on the dev machine (2-vCPU Zen 5 VM, 4096x11008 int4 g128, the AVX2 kernel)
// it beat dequantizing 64-column fp32 tiles and calling MKL's sgemm at every batch size (M=16:
// 7.6 vs 15.0 ms, M=256: 110 vs 117 ms), so that path was removed.
// Threads get equal contiguous column ranges in units of the widest register tile (32 columns).
constexpr int64_t kColumnUnit = 32;
constexpr int64_t kMinUnitsPerThread = 4;

void check_g_idx_range(const at::Tensor& g_idx, int64_t G) {
  const int32_t* g = g_idx.data_ptr<int32_t>();
  for (int64_t k = 0; k < g_idx.size(0); ++k) {
    TORCH_CHECK_VALUE(g[k] >= 0 && g[k] < G, "slimformer.gptq: g_idx[", k, "]=", g[k],
                      " is out of range for ", G, " groups (scales has ", G, " rows)");
  }
}

Weights make_weights(const at::Tensor& qweight, const at::Tensor& qzeros, const at::Tensor& scales,
                     const at::Tensor& g_idx, const GptqShape& s, int64_t bits, int64_t zero_offset) {
  return Weights{qweight.data_ptr<int32_t>(), qzeros.data_ptr<int32_t>(), scales.data_ptr(),
                 g_idx.data_ptr<int32_t>(), scale_type_of(scales), s.K, s.N, s.G, qzeros.size(1),
                 static_cast<int>(bits), static_cast<int>(zero_offset)};
}

// Each op reads the active ISA once (set_cpu_isa may run concurrently in another thread) and
// passes it down, so one call never mixes the set-up of one implementation with another's kernel.
void dequantize_tile(CpuIsa isa, const Weights& w, int64_t k0, int64_t k1, int64_t n0, int64_t n1,
                     float* out, int64_t ld) {
  if (isa >= CpuIsa::kAvx2) {
    dequantize_avx2(w, k0, k1, n0, n1, out, ld);
  } else {
    dequantize_scalar(w, k0, k1, n0, n1, out, ld);
  }
}

// Maximal runs of k with one group.
std::vector<Segment> segments_of(const Weights& w) {
  std::vector<Segment> segs;
  for (int64_t k = 0; k < w.K; ++k) {
    if (segs.empty() || segs.back().group != w.g_idx[k]) {
      segs.push_back({k, k + 1, w.g_idx[k]});
    } else {
      segs.back().k_end = k + 1;
    }
  }
  return segs;
}

// Runs kernel(n_begin, n_end) on equal contiguous column ranges, one per thread.
template <class F>
void parallel_columns(int64_t N, const F& kernel) {
  const int64_t units = (N + kColumnUnit - 1) / kColumnUnit;
  at::parallel_for(0, units, kMinUnitsPerThread, [&](int64_t u0, int64_t u1) {
    kernel(u0 * kColumnUnit, std::min(N, u1 * kColumnUnit));
  });
}

void gemm_float(CpuIsa isa, const Weights& w, const std::vector<Segment>& segs, const float* x, int64_t M,
                float* y) {
  const int64_t K = w.K, nseg = static_cast<int64_t>(segs.size());
  std::vector<float> xsum(M * nseg);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t s = 0; s < nseg; ++s) {
      float acc = 0.f;
      for (int64_t k = segs[s].k_begin; k < segs[s].k_end; ++k) acc += x[m * K + k];
      xsum[m * nseg + s] = acc;
    }
  }
  const bool avx2 = isa >= CpuIsa::kAvx2, avx512 = isa >= CpuIsa::kAvx512Vnni;
  std::vector<float> x_prescaled;
  if (avx2) {
    x_prescaled.resize(M * K);
    prescale_x_avx2(w.bits, x, M, K, x_prescaled.data());
  }
  const GemmArgs args{w, x, x_prescaled.data(), xsum.data(), segs.data(), nseg, M, y};
  parallel_columns(w.N, [&](int64_t n0, int64_t n1) {
    if (avx512) {
      gemm_avx512(args, n0, n1);
    } else if (avx2) {
      gemm_avx2(args, n0, n1);
    } else {
      gemm_scalar(args, n0, n1);
    }
  });
}

void gemm_int8_activations(CpuIsa isa, const Weights& w, const std::vector<Segment>& segs, const float* x,
                           int64_t M, float* y) {
  const int64_t nseg = static_cast<int64_t>(segs.size());
  A8Activations act;
  prepare_a8(x, M, w.K, w.bits, segs.data(), nseg, act);
  const bool vnni = isa >= CpuIsa::kAvxVnni;  // vpdpbusd: 256-bit, or 512-bit at kAvx512Vnni
  // The SIMD integer kernels need byte-aligned values (no 3-bit) and, without VNNI, 2 or 4 bits
  // (vpmaddubsw's int16 sums would saturate with 8-bit weights). Otherwise the same quantized
  // activations go through the float kernel: identical semantics, no integer speed-up.
  const bool simd = isa >= CpuIsa::kAvx2 && a8_supported_bits(w.bits) && (vnni || w.bits != 8);
  if (isa == CpuIsa::kScalar || simd) {
    const A8Args args{w, segs.data(), nseg, &act, y};
    parallel_columns(w.N, [&](int64_t n0, int64_t n1) {
      if (!simd) {
        gemm_a8_scalar(args, n0, n1);
      } else if (isa >= CpuIsa::kAvx512Vnni) {
        gemm_a8_avx512vnni(args, n0, n1);
      } else if (vnni) {
        gemm_a8_avxvnni(args, n0, n1);
      } else {
        gemm_a8_avx2(args, n0, n1);
      }
    });
  } else {
    std::vector<float> x_hat(M * w.K);
    dequantize_a8(act, segs.data(), nseg, w.K, x_hat.data());
    gemm_float(isa, w, segs, x_hat.data(), M, y);
  }
}

// Shared by gptq_gemm and gptq_gemm_a8: validation, x staged as contiguous fp32 [M, K] in kernel k
// order (perm applied), bias, output dtype and shape.
template <class Gemm>
at::Tensor run_gemm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                    const at::Tensor& scales, const at::Tensor& g_idx, const c10::optional<at::Tensor>& perm,
                    const c10::optional<at::Tensor>& bias, int64_t bits, int64_t zero_offset, const Gemm& gemm) {
  const GptqShape s = check_weights(qweight, qzeros, scales, g_idx, bits, zero_offset);
  check_activations(x, perm, bias, s, qweight.device());
  const at::Tensor qw = qweight.contiguous(), qz = qzeros.contiguous(), sc = scales.contiguous(),
                   gi = g_idx.contiguous();
  check_g_idx_range(gi, s.G);

  const int64_t M = x.numel() / s.K;
  at::Tensor x32 = x.reshape({M, s.K});
  if (perm.has_value()) {
    const at::Tensor p = perm->to(at::kLong);
    const int64_t lo = p.numel() ? p.min().item<int64_t>() : 0, hi = p.numel() ? p.max().item<int64_t>() : 0;
    TORCH_CHECK_VALUE(lo >= 0 && hi < s.K, "slimformer.gptq: perm values must lie in [0, ", s.K, "), got [",
                      lo, ", ", hi, "]");
    x32 = x32.index_select(1, p);
  }
  x32 = x32.to(at::kFloat).contiguous();

  at::Tensor y = at::empty({M, s.N}, x32.options());
  if (M > 0) {
    const Weights w = make_weights(qw, qz, sc, gi, s, bits, zero_offset);
    gemm(active_cpu_isa(), w, segments_of(w), x32.data_ptr<float>(), M, y.data_ptr<float>());
  }
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = s.N;
  return y.to(x.scalar_type()).reshape(out_shape);
}

at::Tensor gptq_gemm_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                         const at::Tensor& scales, const at::Tensor& g_idx,
                         const c10::optional<at::Tensor>& perm, const c10::optional<at::Tensor>& bias,
                         int64_t bits, int64_t zero_offset) {
  return run_gemm(x, qweight, qzeros, scales, g_idx, perm, bias, bits, zero_offset, gemm_float);
}

at::Tensor gptq_gemm_a8_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                            const at::Tensor& scales, const at::Tensor& g_idx,
                            const c10::optional<at::Tensor>& perm, const c10::optional<at::Tensor>& bias,
                            int64_t bits, int64_t zero_offset) {
  return run_gemm(x, qweight, qzeros, scales, g_idx, perm, bias, bits, zero_offset, gemm_int8_activations);
}

at::Tensor gptq_dequantize_cpu(const at::Tensor& qweight, const at::Tensor& qzeros, const at::Tensor& scales,
                               const at::Tensor& g_idx, int64_t bits, int64_t zero_offset) {
  const GptqShape s = check_weights(qweight, qzeros, scales, g_idx, bits, zero_offset);
  const at::Tensor qw = qweight.contiguous(), qz = qzeros.contiguous(), sc = scales.contiguous(),
                   gi = g_idx.contiguous();
  check_g_idx_range(gi, s.G);
  at::Tensor out = at::empty({s.K, s.N}, sc.options().dtype(at::kFloat));
  const Weights w = make_weights(qw, qz, sc, gi, s, bits, zero_offset);
  float* o = out.data_ptr<float>();
  const CpuIsa isa = active_cpu_isa();
  at::parallel_for(0, s.K, 64, [&](int64_t k0, int64_t k1) {
    dequantize_tile(isa, w, k0, k1, 0, s.N, o + k0 * s.N, s.N);
  });
  return out.to(scales.scalar_type());
}

}  // namespace
}  // namespace gptq
}  // namespace slimformer

TORCH_LIBRARY_IMPL(slimformer, CPU, m) {
  m.impl("gptq_gemm", &slimformer::gptq::gptq_gemm_cpu);
  m.impl("gptq_gemm_a8", &slimformer::gptq::gptq_gemm_a8_cpu);
  m.impl("gptq_dequantize", &slimformer::gptq::gptq_dequantize_cpu);
}
