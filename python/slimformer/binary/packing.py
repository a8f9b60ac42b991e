"""Bit layout v1 of 1-bit weights (the C++ side: csrc/binary/binary_format.h).

A sign matrix S in {-1,+1}^[N, K] (nn.Linear orientation: N = out_features, K = in_features) is
stored as ``qweight`` int32 [ceil(N/16), ceil(K/32), 16]: bit i of element [t, w, r] is 1 iff
S[16t + r, 32w + i] = +1. Output rows come in tiles of 16 whose words for one 32-input slice are
contiguous, so kernels load one slice of 16 rows at once; within a word the lowest input is the
lowest bit. Padding (rows >= N, inputs >= K) is 0 bits. 1 bit per weight plus the fp32 alpha per
row: 32x smaller than fp32 for large K.
"""
from __future__ import annotations

import math

import torch

LAYOUT_VERSION = 1
TILE_ROWS = 16
WORD_BITS = 32


def packed_shape(out_features: int, in_features: int) -> tuple[int, int, int]:
    """Shape of ``qweight`` for an [out_features, in_features] weight."""
    if out_features <= 0 or in_features <= 0:
        raise ValueError(f"out_features and in_features must be positive, got {out_features}, {in_features}")
    return math.ceil(out_features / TILE_ROWS), math.ceil(in_features / WORD_BITS), TILE_ROWS


def pack_signs(positive: torch.Tensor) -> torch.Tensor:
    """positive: bool [N, K] (True = +1) -> qweight int32 [ceil(N/16), ceil(K/32), 16]."""
    if positive.dim() != 2:
        raise ValueError(f"expected a 2-D [out_features, in_features] sign matrix, got shape {tuple(positive.shape)}")
    N, K = positive.shape
    T, W, R = packed_shape(N, K)
    bits = torch.zeros(T * R, W * WORD_BITS, dtype=torch.int64, device=positive.device)
    bits[:N, :K] = positive.to(torch.int64)
    shifts = torch.arange(WORD_BITS, device=positive.device, dtype=torch.int64)
    words = (bits.view(T, R, W, WORD_BITS) << shifts).sum(-1)             # [T, R, W] in [0, 2^32)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.permute(0, 2, 1).contiguous()                           # [T, W, R]


def unpack_signs(qweight: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """qweight -> S float32 [out_features, in_features] with values -1.0 / +1.0."""
    check_packed(qweight, out_features, in_features)
    T, W, R = qweight.shape
    words = qweight.permute(0, 2, 1).to(torch.int64) & 0xFFFFFFFF         # [T, R, W]
    shifts = torch.arange(WORD_BITS, device=qweight.device, dtype=torch.int64)
    bits = (words.unsqueeze(-1) >> shifts) & 1                             # [T, R, W, 32]
    bits = bits.reshape(T * R, W * WORD_BITS)[:out_features, :in_features]
    return bits.to(torch.float32) * 2 - 1


def check_packed(qweight: torch.Tensor, out_features: int, in_features: int) -> None:
    """Raise ValueError unless qweight is an int32 tensor of the v1 shape for [out, in]."""
    shape = packed_shape(out_features, in_features)
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != shape:
        raise ValueError(f"qweight must be int32 {shape} for out_features={out_features}, "
                         f"in_features={in_features} (binary layout v{LAYOUT_VERSION}), got "
                         f"{qweight.dtype} {tuple(qweight.shape)}")


def binarize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BWN binarization of weight [N, K] per output row: centred c = W - mean(W),
    returns (positive = c >= 0 as bool [N, K], alpha = mean|c| as float32 [N]).
    The binary weight is alpha[:, None] * (2 * positive - 1)."""
    w = weight.detach().to(torch.float32)
    c = w - w.mean(dim=1, keepdim=True)
    return c >= 0, c.abs().mean(dim=1)
