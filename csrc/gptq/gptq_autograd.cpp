// Autograd for gptq_gemm and gptq_gemm_a8 (every backend): gradients for x and bias; the quantized
// weights are constants. In C++ rather than torch.library.register_autograd because a Python
// autograd kernel runs on every call, gradients or not, and cost 5-60 us per call (measured on
// 1536x576 at batch 1), more than the kernel itself on small layers.
//
// dx = dy @ W^T, scattered back through perm when x was permuted; for gptq_gemm_a8 this is the
// straight-through estimator (the rounding of x to int8 is treated as the identity).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace slimformer {
namespace gptq {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using GemmSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const c10::optional<at::Tensor>&,
                                 const c10::optional<at::Tensor>&, int64_t, int64_t);
using DequantizeSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       int64_t, int64_t);

template <bool kInt8Activations>
struct GemmFunction : public torch::autograd::Function<GemmFunction<kInt8Activations>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& qweight,
                            const at::Tensor& qzeros, const at::Tensor& scales, const at::Tensor& g_idx,
                            const c10::optional<at::Tensor>& perm, const c10::optional<at::Tensor>& bias,
                            int64_t bits, int64_t zero_offset) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow(kInt8Activations ? "slimformer::gptq_gemm_a8" : "slimformer::gptq_gemm", "")
                               .typed<GemmSignature>();
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({qweight, qzeros, scales, g_idx});
    if (perm.has_value()) ctx->saved_data["perm"] = *perm;  // an input: no reference cycle
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["zero_offset"] = zero_offset;
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["bias_dtype"] = static_cast<int64_t>(bias.has_value() ? bias->scalar_type() : at::kFloat);
    return op.call(x, qweight, qzeros, scales, g_idx, perm, bias, bits, zero_offset);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto dequantize = c10::Dispatcher::singleton()
                                       .findSchemaOrThrow("slimformer::gptq_dequantize", "")
                                       .typed<DequantizeSignature>();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad = grads[0];
    at::Tensor grad_x, grad_bias;
    if (ctx->needs_input_grad(0)) {
      // fp32 scales give W in fp32 (W in the checkpoint's fp16 would round the gradient).
      const at::Tensor w = dequantize.call(saved[0], saved[1], saved[2].to(at::kFloat), saved[3],
                                           ctx->saved_data["bits"].toInt(), ctx->saved_data["zero_offset"].toInt());
      grad_x = at::matmul(grad, w.to(grad.scalar_type()).t());
      if (ctx->saved_data.count("perm") > 0) {
        const at::Tensor perm = ctx->saved_data["perm"].toTensor().to(at::kLong);
        grad_x = at::zeros_like(grad_x).index_add_(-1, perm, grad_x);
      }
    }
    // needs_input_grad counts tensor inputs only: x, the four weight tensors, perm if given, bias.
    const bool has_perm = ctx->saved_data.count("perm") > 0;
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(has_perm ? 6 : 5)) {
      const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt());
      grad_bias = grad.reshape({-1, grad.size(-1)}).sum(0).to(dtype);
    }
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), grad_bias,
            at::Tensor(), at::Tensor()};
  }
};

template <bool kInt8Activations>
at::Tensor gemm_autograd(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                         const at::Tensor& scales, const at::Tensor& g_idx, const c10::optional<at::Tensor>& perm,
                         const c10::optional<at::Tensor>& bias, int64_t bits, int64_t zero_offset) {
  return GemmFunction<kInt8Activations>::apply(x, qweight, qzeros, scales, g_idx, perm, bias, bits, zero_offset);
}

}  // namespace
}  // namespace gptq
}  // namespace slimformer

TORCH_LIBRARY_IMPL(slimformer, Autograd, m) {
  m.impl("gptq_gemm", &slimformer::gptq::gemm_autograd<false>);
  m.impl("gptq_gemm_a8", &slimformer::gptq::gemm_autograd<true>);
}
