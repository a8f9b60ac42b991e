"""Pure-PyTorch references that define what the binary ops compute (fp64 accumulation).

Shapes: x (..., K) float32/float16/bfloat16; qweight int32 [ceil(N/16), ceil(K/32), 16] (layout v1,
:mod:`slimformer.binary.packing`); alpha float32 [N]; bias [N] or None -> y (..., N) in x's dtype.
"""
from __future__ import annotations

import torch

from .packing import unpack_signs


def binary_linear_reference(x: torch.Tensor, qweight: torch.Tensor, alpha: torch.Tensor,
                            bias: torch.Tensor | None, in_features: int) -> torch.Tensor:
    """W1A-fp: y = alpha * (x @ S^T) (+ bias)."""
    s = unpack_signs(qweight, alpha.shape[0], in_features).to(torch.float64)
    y = (x.to(torch.float64) @ s.t()) * alpha.to(torch.float64)
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype)


def binarize_activations_reference(x: torch.Tensor, act_shift: torch.Tensor) -> torch.Tensor:
    """t = +1 where x >= act_shift (compared in float32), else -1; float64, x's shape."""
    return torch.where(x.to(torch.float32) >= act_shift.to(torch.float32), 1.0, -1.0).to(torch.float64)


def binary_linear_a1_reference(x: torch.Tensor, qweight: torch.Tensor, alpha: torch.Tensor,
                               bias: torch.Tensor | None, act_scale: torch.Tensor, act_shift: torch.Tensor,
                               in_features: int) -> torch.Tensor:
    """W1A1: the input is binarized to act_scale * t + act_shift, t = sign(x - act_shift) with
    sign(0) = +1, so y = alpha * (act_scale * (t @ S^T) + act_shift * S.sum(1)) (+ bias)."""
    s = unpack_signs(qweight, alpha.shape[0], in_features).to(torch.float64)
    t = binarize_activations_reference(x, act_shift)
    scale, shift = float(act_scale), float(act_shift)
    y = (scale * (t @ s.t()) + shift * s.sum(1)) * alpha.to(torch.float64)
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype)
