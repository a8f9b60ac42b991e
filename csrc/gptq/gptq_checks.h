// Input validation shared by the CPU and CUDA adapters of the GPTQ ops. Every failure is a
// c10::Error (a Python RuntimeError/ValueError) that names the offending tensor, shape or dtype.
#pragma once
#include <ATen/ATen.h>

#include <numeric>

#include "gptq/gptq_format.h"

namespace slimformer {
namespace gptq {

struct GptqShape {
  int64_t K, N, G;
};

inline ScaleType scale_type_of(const at::Tensor& scales) {
  switch (scales.scalar_type()) {
    case at::kHalf: return ScaleType::kFloat16;
    case at::kBFloat16: return ScaleType::kBFloat16;
    default: return ScaleType::kFloat32;
  }
}

inline GptqShape check_weights(const at::Tensor& qweight, const at::Tensor& qzeros,
                               const at::Tensor& scales, const at::Tensor& g_idx, int64_t bits,
                               int64_t zero_offset) {
  TORCH_CHECK_VALUE(bits == 2 || bits == 3 || bits == 4 || bits == 8,
                    "slimformer.gptq: unsupported bits=", bits, " (supported: 2, 3, 4, 8)");
  TORCH_CHECK_VALUE(zero_offset == 0 || zero_offset == 1, "slimformer.gptq: zero_offset must be 1 "
                    "(checkpoint_format 'gptq') or 0 ('gptq_v2'), got ", zero_offset);
  TORCH_CHECK_VALUE(qweight.scalar_type() == at::kInt, "slimformer.gptq: qweight must be int32, got ",
                    qweight.scalar_type());
  TORCH_CHECK_VALUE(qzeros.scalar_type() == at::kInt, "slimformer.gptq: qzeros must be int32, got ",
                    qzeros.scalar_type());
  TORCH_CHECK_VALUE(g_idx.scalar_type() == at::kInt, "slimformer.gptq: g_idx must be int32, got ",
                    g_idx.scalar_type());
  TORCH_CHECK_VALUE(scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kBFloat16 ||
                        scales.scalar_type() == at::kFloat,
                    "slimformer.gptq: scales must be float16, bfloat16 or float32, got ",
                    scales.scalar_type());
  TORCH_CHECK_VALUE(qweight.dim() == 2, "slimformer.gptq: qweight must be 2-D [in*bits/32, out], got shape ",
                    qweight.sizes());
  TORCH_CHECK_VALUE(g_idx.dim() == 1, "slimformer.gptq: g_idx must be 1-D [in_features], got shape ",
                    g_idx.sizes());
  const int64_t K = g_idx.size(0);
  const int64_t N = qweight.size(1);
  TORCH_CHECK_VALUE(K > 0 && (K * bits) % 32 == 0, "slimformer.gptq: in_features=", K,
                    " must be a positive multiple of ", 32 / std::gcd<int64_t>(32, bits), " for bits=",
                    bits, " (qweight packs 32/bits values per int32 along in_features)");
  TORCH_CHECK_VALUE(qweight.size(0) == K * bits / 32, "slimformer.gptq: qweight has ", qweight.size(0),
                    " rows but in_features=", K, " (from g_idx) with bits=", bits, " needs ",
                    K * bits / 32);
  TORCH_CHECK_VALUE(scales.dim() == 2 && scales.size(1) == N, "slimformer.gptq: scales must be [groups, ",
                    N, "] to match qweight's out_features, got shape ", scales.sizes());
  const int64_t G = scales.size(0);
  TORCH_CHECK_VALUE(G > 0, "slimformer.gptq: scales has no groups");
  TORCH_CHECK_VALUE(qzeros.dim() == 2 && qzeros.size(0) == G && qzeros.size(1) == qzeros_words(N, bits),
                    "slimformer.gptq: qzeros must be [", G, ", ", qzeros_words(N, bits),
                    "] (groups, out_features*bits/32), got shape ", qzeros.sizes());
  const auto dev = qweight.device();
  TORCH_CHECK_VALUE(qzeros.device() == dev && scales.device() == dev && g_idx.device() == dev,
                    "slimformer.gptq: qweight, qzeros, scales and g_idx must be on one device, got ",
                    qweight.device(), ", ", qzeros.device(), ", ", scales.device(), ", ", g_idx.device());
  return {K, N, G};
}

inline void check_activations(const at::Tensor& x, const c10::optional<at::Tensor>& perm,
                              const c10::optional<at::Tensor>& bias, const GptqShape& s,
                              const at::Device& dev) {
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                        x.scalar_type() == at::kBFloat16,
                    "slimformer.gptq: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == s.K, "slimformer.gptq: x's last dimension must be in_features=",
                    s.K, ", got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.device() == dev, "slimformer.gptq: x is on ", x.device(), " but the weights are on ", dev);
  if (perm.has_value()) {
    TORCH_CHECK_VALUE(perm->dim() == 1 && perm->size(0) == s.K &&
                          (perm->scalar_type() == at::kInt || perm->scalar_type() == at::kLong),
                      "slimformer.gptq: perm must be a 1-D int32/int64 tensor of length ", s.K, ", got ",
                      perm->scalar_type(), " ", perm->sizes());
    TORCH_CHECK_VALUE(perm->device() == dev, "slimformer.gptq: perm is on ", perm->device(),
                      " but the weights are on ", dev);
  }
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == s.N, "slimformer.gptq: bias must be [", s.N,
                      "], got shape ", bias->sizes());
    TORCH_CHECK_VALUE(bias->is_floating_point(), "slimformer.gptq: bias must be floating point, got ",
                      bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device() == dev, "slimformer.gptq: bias is on ", bias->device(),
                      " but the weights are on ", dev);
  }
}

}  // namespace gptq
}  // namespace slimformer
