// Input validation shared by the CPU and CUDA adapters of the binary ops. Every failure is a
// c10::Error (a Python ValueError) that names the op and the offending tensor, shape, dtype or device.
#pragma once
#include <ATen/ATen.h>

#include "binary/binary_format.h"

namespace slimformer {
namespace binary {

struct Shape {
  int64_t N, K, Kw, tiles;  // out_features, in_features, words per row, 16-row tiles
};

// x (..., K) float, qweight int32 (ceil(N/16), ceil(K/32), 16), alpha float32 (N,), bias (N,) or
// None, all on x's device. `max_in_features` bounds K (the CUDA epilogue converts exact integer
// dot products to fp32, so it needs K < 2^24).
inline Shape check_inputs(const char* op, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& alpha,
                          const c10::optional<at::Tensor>& bias, int64_t in_features,
                          int64_t max_in_features = INT64_MAX) {
  TORCH_CHECK_VALUE(in_features > 0 && in_features < max_in_features, op,
                    ": in_features must be positive", max_in_features < INT64_MAX ? " and below 2^24" : "",
                    ", got ", in_features);
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

// act_scale / act_shift: float32 with one element, on x's device.
inline void check_act_param(const char* op, const char* name, const at::Tensor& t, const at::Device& dev) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat && t.numel() == 1, op, ": ", name,
                    " must be a float32 tensor with one element (0-dim), got ", t.scalar_type(), " of shape ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.device() == dev, op, ": ", name, " is on ", t.device(), " but x is on ", dev);
}

}  // namespace binary
}  // namespace slimformer
