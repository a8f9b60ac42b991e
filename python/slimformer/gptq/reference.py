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


A8_BLOCK = 32  # inputs per activation scale in gptq_gemm_a8


def quantize_activations_a8(x: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """x_hat of gptq_gemm_a8 for x (..., in) already in kernel order (perm applied), in fp64.

    Blocks are [32b, 32b + 32) intersected with runs of equal g_idx; per block and row,
    xq = round_half_even(x * (127 / amax)) computed in fp32, x_hat = (amax / 127) * xq. A block
    with amax = 0 or 127 / amax overflowing is all zeros; a block holding NaN or inf is all NaN.
    """
    k = g_idx.shape[0]
    x32 = x.reshape(-1, k).to(torch.float32)
    pos = torch.arange(k, device=x.device)
    g = g_idx.to(torch.int64)
    new_block = torch.ones(k, dtype=torch.bool, device=x.device)
    new_block[1:] = ((pos[1:] // A8_BLOCK) != (pos[:-1] // A8_BLOCK)) | (g[1:] != g[:-1])
    block = torch.cumsum(new_block.to(torch.int64), 0) - 1
    index = block.expand_as(x32)
    amax = torch.zeros(x32.shape[0], int(block[-1]) + 1, dtype=torch.float32, device=x.device)
    amax = amax.scatter_reduce(1, index, x32.abs(), "amax", include_self=True)  # propagates NaN
    a = amax.gather(1, index)
    inv = torch.tensor(127.0, dtype=torch.float32) / a
    finite = torch.isfinite(a)
    quantize = finite & (a > 0) & torch.isfinite(inv)
    xq = torch.where(quantize, torch.round(x32 * inv).clamp(-127, 127), torch.zeros_like(x32))
    dx = torch.where(finite, torch.where(quantize, a / 127.0, torch.zeros_like(a)), torch.full_like(a, float("nan")))
    x_hat = dx.to(torch.float64) * xq.to(torch.float64)
    return x_hat.reshape(x.shape)


def gptq_linear_a8_reference(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                             g_idx: torch.Tensor, bias: torch.Tensor | None, bits: int, zero_offset: int,
                             perm: torch.Tensor | None = None) -> torch.Tensor:
    """What gptq_gemm_a8 computes, in fp64: quantize_activations_a8(x[..., perm]) @ W (+ bias)."""
    if perm is not None:
        x = x[..., perm.long()]
    x_hat = quantize_activations_a8(x, g_idx)
    return gptq_linear_reference(x_hat, qweight, qzeros, scales, g_idx, bias, bits, zero_offset)
