// ATen adapter of the GPTQ ops on CPU: validation, fp32 staging of x, threading, and the choice
// between the fused small-batch kernel and dequantize-tiles-then-GEMM for large batches.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/cpu_features.h"
#include "gptq/gptq_checks.h"
#include "gptq/gptq_cpu.h"

namespace slimformer {
namespace gptq {
namespace {

// Up to this many rows the fused kernel wins: it reads the packed weights once per 4 rows and
// never materialises fp32 weights. Past it, MKL/oneDNN's fp32 GEMM on dequantized tiles is
// faster (benchmarks/bench_gptq.py measures the crossover).
constexpr int64_t kFusedMaxRows = 1 << 30;
constexpr int64_t kFusedColumnBlock = 512;  // columns per task in the fused path
constexpr int64_t kTileCols = 64;           // columns per dequantized tile in the GEMM path
constexpr int64_t kTileRows = 4096;         // k per dequantized tile (64 x 4096 fp32 = 1 MiB)

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

void dequantize_tile(const Weights& w, int64_t k0, int64_t k1, int64_t n0, int64_t n1, float* out,
                     int64_t ld) {
  if (active_cpu_isa() == CpuIsa::kAvx2) {
    dequantize_avx2(w, k0, k1, n0, n1, out, ld);
  } else {
    dequantize_scalar(w, k0, k1, n0, n1, out, ld);
  }
}

void gemm_fused(const Weights& w, const at::Tensor& x32, float* y) {
  const int64_t M = x32.size(0), K = w.K;
  // Segments: maximal runs of k with one group.
  std::vector<Segment> segs;
  for (int64_t k = 0; k < K; ++k) {
    if (segs.empty() || segs.back().group != w.g_idx[k]) {
      segs.push_back({k, k + 1, w.g_idx[k]});
    } else {
      segs.back().k_end = k + 1;
    }
  }
  const int64_t nseg = static_cast<int64_t>(segs.size());
  const float* x = x32.data_ptr<float>();
  std::vector<float> xsum(M * nseg);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t s = 0; s < nseg; ++s) {
      float acc = 0.f;
      for (int64_t k = segs[s].k_begin; k < segs[s].k_end; ++k) acc += x[m * K + k];
      xsum[m * nseg + s] = acc;
    }
  }
  const bool avx2 = active_cpu_isa() == CpuIsa::kAvx2;
  std::vector<float> x_prescaled;
  if (avx2) {
    x_prescaled.resize(M * K);
    prescale_x_avx2(w.bits, x, M, K, x_prescaled.data());
  }
  const GemvArgs args{w, x, x_prescaled.data(), xsum.data(), segs.data(), nseg, M, y};
  const int64_t nblocks = (w.N + kFusedColumnBlock - 1) / kFusedColumnBlock;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * kFusedColumnBlock, n1 = std::min(w.N, b1 * kFusedColumnBlock);
    if (avx2) {
      gemv_avx2(args, n0, n1);
    } else {
      gemv_scalar(args, n0, n1);
    }
  });
}

void gemm_dequant_tiles(const Weights& w, const at::Tensor& x32, at::Tensor& y) {
  const int64_t M = x32.size(0);
  const int64_t ntiles = (w.N + kTileCols - 1) / kTileCols;
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(std::min(w.K, kTileRows) * kTileCols);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kTileCols, n1 = std::min(w.N, n0 + kTileCols), nb = n1 - n0;
      at::Tensor acc = at::empty({M, nb}, x32.options());
      for (int64_t k0 = 0; k0 < w.K; k0 += kTileRows) {
        const int64_t k1 = std::min(w.K, k0 + kTileRows);
        dequantize_tile(w, k0, k1, n0, n1, buf.data(), nb);
        const at::Tensor wt = at::from_blob(buf.data(), {k1 - k0, nb}, x32.options());
        const at::Tensor xk = x32.narrow(1, k0, k1 - k0);
        if (k0 == 0) {
          at::mm_out(acc, xk, wt);
        } else {
          acc.addmm_(xk, wt);
        }
      }
      y.narrow(1, n0, nb).copy_(acc);
    }
  });
}

at::Tensor gptq_gemm_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                         const at::Tensor& scales, const at::Tensor& g_idx,
                         const c10::optional<at::Tensor>& perm, const c10::optional<at::Tensor>& bias,
                         int64_t bits, int64_t zero_offset) {
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
    if (M <= kFusedMaxRows) {
      gemm_fused(w, x32, y.data_ptr<float>());
    } else {
      gemm_dequant_tiles(w, x32, y);
    }
  }
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = s.N;
  return y.to(x.scalar_type()).reshape(out_shape);
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
  at::parallel_for(0, s.K, 64, [&](int64_t k0, int64_t k1) {
    dequantize_tile(w, k0, k1, 0, s.N, o + k0 * s.N, s.N);
  });
  return out.to(scales.scalar_type());
}

}  // namespace
}  // namespace gptq
}  // namespace slimformer

TORCH_LIBRARY_IMPL(slimformer, CPU, m) {
  m.impl("gptq_gemm", &slimformer::gptq::gptq_gemm_cpu);
  m.impl("gptq_dequantize", &slimformer::gptq::gptq_dequantize_cpu);
}
