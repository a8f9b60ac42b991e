"""Pure-PyTorch references that define what the GPTQ kernels compute (fp64 by default)."""
from __future__ import annotations

import torch

from .packing import unpack_cols, unpack_rows


def dequantize_reference(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                         g_idx: torch.Tensor, bits: int, zero_offset: int,
                         dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """W [in, out] with W[k, n] = scales[g, n] * (q[k, n] - (z[g, n] + zero_offset)), g = g_idx[k]."""
    in_features, out_features = g_idx.shape[0], qweight.shape[1]
    q = unpack_rows(qweight, bits, in_features).to(dtype)
    z = unpack_cols(qzeros, bits, out_features).to(dtype) + zero_offset
    g = g_idx.long()
    return scales.to(dtype)[g] * (q - z[g])


def gptq_linear_reference(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                          g_idx: torch.Tensor, bias: torch.Tensor | None, bits: int, zero_offset: int,
                          dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """y = x @ W (+ bias) computed in ``dtype`` (returned in ``dtype``)."""
    w = dequantize_reference(qweight, qzeros, scales, g_idx, bits, zero_offset, dtype)
    y = x.to(dtype) @ w
    return y + bias.to(dtype) if bias is not None else y
