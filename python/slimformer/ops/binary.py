"""1-bit weight ops (binary transformers).

Shapes (layout v1, :mod:`slimformer.binary.packing`)::

    x          (..., K)                          float32 / float16 / bfloat16
    qweight    (ceil(N/16), ceil(K/32), 16)      int32, 1 bit per weight (bit set = +1)
    alpha      (N,)                              float32, per-output-row scale
    bias       (N,) or None                      any float dtype
    act_scale  ()                                float32 (W1A1 only)
    act_shift  ()                                float32 (W1A1 only)
    -> y       (..., N)                          x's dtype

Meaning: :mod:`slimformer.binary.reference`. Accumulation is fp32 (W1A-fp) or exact integer
popcounts (W1A1); K needs no alignment (pad bits are zero).
"""
from __future__ import annotations

import torch

from .gptq import _check_one_device

_ops = torch.ops.slimformer


def binary_gemm(x: torch.Tensor, qweight: torch.Tensor, alpha: torch.Tensor, in_features: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """W1A-fp: y = alpha * (x @ S^T) (+ bias): a sum of the inputs whose weight bit is set minus
    the sum of the others, per output row, times alpha."""
    return _ops.binary_gemm(x, qweight, alpha, bias, in_features)


def binary_gemm_a1(x: torch.Tensor, qweight: torch.Tensor, alpha: torch.Tensor, act_scale: torch.Tensor,
                   act_shift: torch.Tensor, in_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """W1A1: x is binarized to act_scale * sign(x - act_shift) + act_shift (sign(0) = +1) and
    multiplied with popcounts: y = alpha * (act_scale * (K - 2 popcount(t XOR s)) + act_shift * S.sum(1))."""
    return _ops.binary_gemm_a1(x, qweight, alpha, bias, act_scale, act_shift, in_features)


def _binary_gemm_fake(x, qweight, alpha, bias, in_features):
    _check_one_device(x, qweight, alpha, bias)
    torch._check(x.shape[-1] == in_features, lambda: "x's last dimension must equal in_features")
    return x.new_empty((*x.shape[:-1], alpha.shape[0]))


def _binary_gemm_a1_fake(x, qweight, alpha, bias, act_scale, act_shift, in_features):
    _check_one_device(x, qweight, alpha, bias, act_scale, act_shift)
    return _binary_gemm_fake(x, qweight, alpha, bias, in_features)


torch.library.register_fake("slimformer::binary_gemm")(_binary_gemm_fake)
torch.library.register_fake("slimformer::binary_gemm_a1")(_binary_gemm_a1_fake)


# -- autograd -------------------------------------------------------------------------------------
# W1A-fp: y = alpha * (x @ S^T) + bias  ->  grad_x = (grad * alpha) @ S, grad_bias = sum(grad).
# The weights (qweight, alpha) are constants of an inference module: no gradient. W1A1 binarizes
# x (a sign), whose gradient is zero almost everywhere: its backward raises rather than return zeros
# silently; train with slimformer.binary.BinaryTrainLinear (straight-through estimators) instead.
def _binary_gemm_setup_context(ctx, inputs, output):
    x, qweight, alpha, bias, in_features = inputs
    ctx.save_for_backward(qweight, alpha)
    ctx.in_features = in_features
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _binary_gemm_backward(ctx, grad):
    from ..binary.packing import unpack_signs

    qweight, alpha = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        s = unpack_signs(qweight, alpha.shape[0], ctx.in_features)          # [N, K] float32
        grad_x = ((grad.to(torch.float32) * alpha) @ s).to(ctx.x_dtype)
    if ctx.needs_input_grad[3]:
        grad_bias = grad.to(torch.float32).reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, grad_bias, None


def _binary_gemm_a1_setup_context(ctx, inputs, output):
    pass


def _binary_gemm_a1_backward(ctx, grad):
    raise RuntimeError("slimformer::binary_gemm_a1 (W1A1 BinaryLinear) has no gradient: its input is binarized "
                       "with sign(). Train with slimformer.binary.BinaryTrainLinear (straight-through "
                       "estimators, slimformer.binary.binarize) and freeze afterwards.")


torch.library.register_autograd("slimformer::binary_gemm", _binary_gemm_backward,
                                setup_context=_binary_gemm_setup_context)
torch.library.register_autograd("slimformer::binary_gemm_a1", _binary_gemm_a1_backward,
                                setup_context=_binary_gemm_a1_setup_context)
