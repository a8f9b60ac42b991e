"""GPTQ dequantize-matmul ops.

Shapes (GPTQ checkpoint layout, see :mod:`slimformer.gptq.packing`)::

    x        (..., in)                    float32 / float16 / bfloat16
    qweight  (in * bits / 32, out)        int32
    qzeros   (groups, ceil(out*bits/32))  int32
    scales   (groups, out)                float16 / bfloat16 / float32
    g_idx    (in,)                        int32, group of each input feature
    perm     (in,) or None                int32 / int64: x[..., perm] is used instead of x
    bias     (out,) or None
    -> y     (..., out)                   x's dtype
"""
from __future__ import annotations

import torch

_ops = torch.ops.slimformer


def gptq_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              g_idx: torch.Tensor, bits: int, zero_offset: int, bias: torch.Tensor | None = None,
              perm: torch.Tensor | None = None) -> torch.Tensor:
    """y = x[..., perm] @ W (+ bias), W[k, n] = scales[g, n] * (q[k, n] - z[g, n] - zero_offset).

    ``zero_offset`` is 1 for checkpoint_format "gptq" (stored zero - 1) and 0 for "gptq_v2".
    """
    return _ops.gptq_gemm(x, qweight, qzeros, scales, g_idx, perm, bias, bits, zero_offset)


def gptq_gemm_a8(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: torch.Tensor, bits: int, zero_offset: int, bias: torch.Tensor | None = None,
                 perm: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`gptq_gemm` with x quantized on the fly to int8 (CPU; integer dot products).

    Each row of x[..., perm] is cut into blocks of 32 inputs (also split where g_idx changes);
    per block x_hat = amax/127 * round(x * 127/amax). Returns x_hat @ W (+ bias), exactly as
    :func:`slimformer.gptq.reference.gptq_linear_a8_reference`. Faster than :func:`gptq_gemm`
    at every batch size on AVX2/AVX-VNNI/AVX-512 CPUs, at ~0.5% relative error vs the exact op.
    """
    return _ops.gptq_gemm_a8(x, qweight, qzeros, scales, g_idx, perm, bias, bits, zero_offset)


def gptq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                    bits: int, zero_offset: int) -> torch.Tensor:
    """The full-precision weight W (in, out) in scales' dtype."""
    return _ops.gptq_dequantize(qweight, qzeros, scales, g_idx, bits, zero_offset)


def _check_one_device(*tensors: torch.Tensor | None) -> None:
    # The fake impl doubles as the Meta kernel, which the dispatcher picks as soon as one input is
    # on "meta": a meta tensor among real ones must fail here, as it would in the real kernels.
    devices = {t.device for t in tensors if t is not None}
    torch._check(len(devices) == 1, lambda: f"slimformer.gptq: all tensors must be on one device, got {devices}")


def _gptq_gemm_fake(x, qweight, qzeros, scales, g_idx, perm, bias, bits, zero_offset):
    _check_one_device(x, qweight, qzeros, scales, g_idx, perm, bias)
    torch._check(x.shape[-1] == g_idx.shape[0], lambda: "x's last dimension must equal in_features")
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))


torch.library.register_fake("slimformer::gptq_gemm")(_gptq_gemm_fake)
torch.library.register_fake("slimformer::gptq_gemm_a8")(_gptq_gemm_fake)


@torch.library.register_fake("slimformer::gptq_dequantize")
def _gptq_dequantize_fake(qweight, qzeros, scales, g_idx, bits, zero_offset):
    _check_one_device(qweight, qzeros, scales, g_idx)
    return scales.new_empty((g_idx.shape[0], qweight.shape[1]))



def gptq_solve_block(w: torch.Tensor, hinv: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block of the GPTQ column loop (CPU; float32): w, scale, zero [rows, B], hinv [B, B]
    -> (q, err, loss[rows]). Meaning: :func:`slimformer.gptq.solver._solve_block_reference`."""
    return _ops.gptq_solve_block(w, hinv, scale, zero, bits)


@torch.library.register_fake("slimformer::gptq_solve_block")
def _gptq_solve_block_fake(w, hinv, scale, zero, bits):
    _check_one_device(w, hinv, scale, zero)
    return torch.empty_like(w), torch.empty_like(w), w.new_empty((w.shape[0],))
