// ATen adapter of the 1-bit weight ops on CPU (binary_gemm, binary_gemm_a1): validation, fp32
// staging of x, lookup tables (W1A-fp) or packed activation bits (W1A1), threading over row tiles
// and the run-time choice of the kernel (binary_cpu.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "binary/binary_cpu.h"
#include "common/cpu_features.h"

namespace slimformer {
namespace binary {
namespace {

struct Shape {
  int64_t N, K, Kw, tiles;
};

// Checks shared by both ops; `op` names the op in every message.
Shape check_inputs(const char* op, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& alpha,
                   const c10::optional<at::Tensor>& bias, int64_t in_features) {
  TORCH_CHECK_VALUE(in_features > 0, op, ": in_features must be positive, got ", in_features);
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                        x.scalar_type() == at::kBFloat16,
                    op, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == in_features, op, ": x's last dimension must be in_features=",
                    in_features, ", got x of shape ", x.sizes());
  TORCH_CHECK_VALUE(alpha.scalar_type() == at::kFloat && alpha.dim() == 1 && alpha.size(0) > 0, op,
                    ": alpha must be a non-empty 1-D float32 tensor [out_features], got ", alpha.scalar_type(),
                    " of shape ", alpha.sizes());
  const int64_t N = alpha.size(0), K = in_features;
  const Shape s{N, K, words_per_row(K), row_tiles(N)};
  TORCH_CHECK_VALUE(qweight.scalar_type() == at::kInt, op, ": qweight must be int32, got ", qweight.scalar_type());
  TORCH_CHECK_VALUE(qweight.dim() == 3 && qweight.size(0) == s.tiles && qweight.size(1) == s.Kw &&
                        qweight.size(2) == kTileRows,
                    op, ": qweight must have shape (", s.tiles, ", ", s.Kw, ", ", kTileRows,
                    ") = (ceil(out_features/16), ceil(in_features/32), 16) for out_features=", N,
                    " (alpha's length) and in_features=", K, ", got ", qweight.sizes());
  const auto dev = x.device();
  TORCH_CHECK_VALUE(qweight.device() == dev && alpha.device() == dev, op,
                    ": x, qweight and alpha must be on one device, got ", dev, ", ", qweight.device(), ", ",
                    alpha.device());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape (", N,
                      ") = (out_features,), got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->is_floating_point(), op, ": bias must be floating point, got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device() == dev, op, ": bias is on ", bias->device(), " but x is on ", dev);
  }
  return s;
}

float scalar_param(const char* op, const char* name, const at::Tensor& t, const at::Device& dev) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat && t.numel() == 1, op, ": ", name,
                    " must be a float32 tensor with one element (0-dim), got ", t.scalar_type(), " of shape ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.device() == dev, op, ": ", name, " is on ", t.device(), " but x is on ", dev);
  return t.reshape({}).item<float>();
}

// Tiles per thread chunk: at least ~4k slice x token steps of work, so small layers stay on one thread.
int64_t tile_grain(const Shape& s, int64_t M) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, s.Kw * M)); }

// Token rows per parallel chunk of cheap per-token work (tables, activation bits).
int64_t token_grain(const Shape& s) { return std::max<int64_t>(1, 16384 / s.K); }

at::Tensor finish(const at::Tensor& y, const at::Tensor& x, int64_t N) {
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  return y.to(x.scalar_type()).reshape(out_shape);
}

at::Tensor binary_gemm_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& alpha,
                           const c10::optional<at::Tensor>& bias, int64_t in_features) {
  constexpr const char* op = "slimformer.binary_gemm";
  const Shape s = check_inputs(op, x, qweight, alpha, bias, in_features);
  const int64_t M = x.numel() / s.K;
  at::Tensor y = at::empty({M, s.N}, x.options().dtype(at::kFloat));
  if (M == 0) return finish(y, x, s.N);
  const at::Tensor x32 = x.reshape({M, s.K}).to(at::kFloat).contiguous();
  const at::Tensor qw = qweight.contiguous(), al = alpha.contiguous();
  at::Tensor b32;
  if (bias.has_value()) b32 = bias->to(at::kFloat).contiguous();

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
  const float scale = scalar_param(op, "act_scale", act_scale, x.device());
  const float shift = scalar_param(op, "act_shift", act_shift, x.device());
  const int64_t M = x.numel() / s.K;
  at::Tensor y = at::empty({M, s.N}, x.options().dtype(at::kFloat));
  if (M == 0) return finish(y, x, s.N);
  const at::Tensor x32 = x.reshape({M, s.K}).to(at::kFloat).contiguous();
  const at::Tensor qw = qweight.contiguous(), al = alpha.contiguous();
  at::Tensor b32;
  if (bias.has_value()) b32 = bias->to(at::kFloat).contiguous();

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
