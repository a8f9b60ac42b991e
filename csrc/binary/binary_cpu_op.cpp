// ATen adapter of the 1-bit weight ops on CPU (binary_gemm, binary_gemm_a1): validation, fp32
// staging of x, lookup tables (W1A-fp) or packed activation bits (W1A1), threading over row tiles
// and the run-time choice of the kernel (binary_cpu.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "binary/binary_checks.h"
#include "binary/binary_cpu.h"
#include "common/cpu_features.h"

namespace slimformer {
namespace binary {
namespace {

// Tiles per thread chunk: at least ~4k slice x token steps of work, so small layers stay on one thread.
int64_t tile_grain(const Shape& s, int64_t M) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, s.Kw * M)); }

// Token rows per parallel chunk of cheap per-token work (tables, activation bits).
int64_t token_grain(const Shape& s) { return std::max<int64_t>(1, 16384 / s.K); }

at::Tensor finish(const at::Tensor& y, const at::Tensor& x, int64_t N) {
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  return y.to(x.scalar_type()).reshape(out_shape);
}

// What both ops run on: fp32 output [M, N], x as contiguous fp32 [M, K] (undefined when M == 0),
// contiguous weights and alpha, bias as fp32 (undefined without one).
struct Staged {
  int64_t M;
  at::Tensor y, x32, qw, al, b32;
};

Staged stage(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& alpha,
             const c10::optional<at::Tensor>& bias, const Shape& s) {
  Staged st;
  st.M = x.numel() / s.K;
  st.y = at::empty({st.M, s.N}, x.options().dtype(at::kFloat));
  if (st.M == 0) return st;
  st.x32 = x.reshape({st.M, s.K}).to(at::kFloat).contiguous();
  st.qw = qweight.contiguous();
  st.al = alpha.contiguous();
  if (bias.has_value()) st.b32 = bias->to(at::kFloat).contiguous();
  return st;
}

at::Tensor binary_gemm_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& alpha,
                           const c10::optional<at::Tensor>& bias, int64_t in_features) {
  constexpr const char* op = "slimformer.binary_gemm";
  const Shape s = check_inputs(op, x, qweight, alpha, bias, in_features);
  const Staged st = stage(x, qweight, alpha, bias, s);
  const int64_t M = st.M;
  if (M == 0) return finish(st.y, x, s.N);
  const at::Tensor &y = st.y, &x32 = st.x32, &qw = st.qw, &al = st.al, &b32 = st.b32;

  // Read the ISA once: set_cpu_isa may run concurrently, and tables and kernel must agree.
  const CpuIsa isa = active_cpu_isa();
  auto build = isa >= CpuIsa::kAvx512Vnni ? build_tables_avx512
               : isa >= CpuIsa::kAvx2     ? build_tables_avx2
                                          : build_tables_scalar;
  auto gemm = isa >= CpuIsa::kAvx512Vnni ? gemm_fp_avx512 : isa >= CpuIsa::kAvx2 ? gemm_fp_avx2 : gemm_fp_scalar;

  // Tables take 16 floats per 4 inputs (16x the fp32 activations): tokens go in chunks of at most
  // ~8 MiB of tables.
  const int64_t tpt = table_floats_per_token(s.Kw);
  const int64_t chunk = std::min<int64_t>(M, std::max<int64_t>(4, (int64_t{2} << 20) / tpt / 4 * 4));
  at::Tensor tables = at::empty({chunk * tpt}, x32.options());
  float* T = tables.data_ptr<float>();
  const float* xp = x32.data_ptr<float>();
  for (int64_t c0 = 0; c0 < M; c0 += chunk) {
    const int64_t mc = std::min(chunk, M - c0);
    const float* xc = xp + c0 * s.K;
    if (mc * s.K <= 16384) {
      build(xc, s.K, mc, s.K, T);
    } else {
      at::parallel_for(0, mc, token_grain(s), [&](int64_t m0, int64_t m1) {
        build(xc + m0 * s.K, s.K, m1 - m0, s.K, T + m0 * tpt);
      });
    }
    const FpArgs args{qw.data_ptr<int32_t>(), s.N, s.K, s.Kw, T, mc, al.data_ptr<float>(),
                      b32.defined() ? b32.data_ptr<float>() : nullptr, y.data_ptr<float>() + c0 * s.N, s.N};
    at::parallel_for(0, s.tiles, tile_grain(s, mc), [&](int64_t t0, int64_t t1) { gemm(args, t0, t1); });
  }
  return finish(y, x, s.N);
}

at::Tensor binary_gemm_a1_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& alpha,
                              const c10::optional<at::Tensor>& bias, const at::Tensor& act_scale,
                              const at::Tensor& act_shift, int64_t in_features) {
  constexpr const char* op = "slimformer.binary_gemm_a1";
  const Shape s = check_inputs(op, x, qweight, alpha, bias, in_features);
  check_act_param(op, "act_scale", act_scale, x.device());
  check_act_param(op, "act_shift", act_shift, x.device());
  const float scale = act_scale.reshape({}).item<float>(), shift = act_shift.reshape({}).item<float>();
  const Staged st = stage(x, qweight, alpha, bias, s);
  const int64_t M = st.M;
  if (M == 0) return finish(st.y, x, s.N);
  const at::Tensor &y = st.y, &x32 = st.x32, &qw = st.qw, &al = st.al, &b32 = st.b32;

  const CpuIsa isa = active_cpu_isa();
  auto pack = isa >= CpuIsa::kAvx512Vnni ? pack_activations_avx512
              : isa >= CpuIsa::kAvx2     ? pack_activations_avx2
                                         : pack_activations_scalar;
  // vpopcntd is an extension of its own: without it the AVX-512 level runs the AVX2 kernel.
  auto gemm = isa >= CpuIsa::kAvx512Vnni && cpu_supports_avx512vpopcntdq() ? gemm_a1_avx512
              : isa >= CpuIsa::kAvx2                                       ? gemm_a1_avx2
                                                                           : gemm_a1_scalar;

  at::Tensor abits = at::empty({M, s.Kw}, x32.options().dtype(at::kInt));
  uint32_t* ab = reinterpret_cast<uint32_t*>(abits.data_ptr<int32_t>());
  const float* xp = x32.data_ptr<float>();
  if (M * s.K <= 65536) {
    pack(xp, s.K, M, s.K, shift, ab);
  } else {
    at::parallel_for(0, M, token_grain(s), [&](int64_t m0, int64_t m1) {
      pack(xp + m0 * s.K, s.K, m1 - m0, s.K, shift, ab + m0 * s.Kw);
    });
  }
  const A1Args args{qw.data_ptr<int32_t>(), s.N, s.K, s.Kw, ab, M, al.data_ptr<float>(),
                    b32.defined() ? b32.data_ptr<float>() : nullptr, scale, shift, shift != 0.0f,
                    y.data_ptr<float>(), s.N};
  at::parallel_for(0, s.tiles, tile_grain(s, (M + 7) / 8), [&](int64_t t0, int64_t t1) { gemm(args, t0, t1); });
  return finish(y, x, s.N);
}

}  // namespace
}  // namespace binary
}  // namespace slimformer

TORCH_LIBRARY_IMPL(slimformer, CPU, m) {
  m.impl("binary_gemm", &slimformer::binary::binary_gemm_cpu);
  m.impl("binary_gemm_a1", &slimformer::binary::binary_gemm_a1_cpu);
}
