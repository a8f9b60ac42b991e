"""Bit-exact packing of the GPTQ checkpoint format (AutoGPTQ / GPTQModel / transformers).

A packed run is a little-endian bit stream of int32 words: value ``i`` occupies bits
``[bits*i, bits*i + bits)`` counted from bit 0 of the first word. For 2, 4 and 8 bits a value never
crosses a word; for 3 bits, values 10 and 21 of every 32 do. ``qweight`` [in*bits/32, out] packs
along in_features (dim 0); ``qzeros`` [groups, ceil(out*bits/32)] packs along out_features (dim 1).
The C++ kernels decode exactly this (csrc/gptq/gptq_format.h).
"""
from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
_U32 = 0xFFFFFFFF


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bits={bits!r}; supported: {SUPPORTED_BITS}")


def zero_offset(checkpoint_format: str) -> int:
    """What the kernels add to a stored zero point: "gptq" (v1) stores zero - 1, "gptq_v2" the zero."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"unknown checkpoint_format={checkpoint_format!r}; expected one of {CHECKPOINT_FORMATS}")
    return 1 if checkpoint_format == "gptq" else 0


def _stream_positions(count: int, bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    bit = torch.arange(count, device=device, dtype=torch.int64) * bits
    return bit // 32, bit % 32


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers [L, C] in [0, 2**bits) along dim 0 into int32 words [ceil(L*bits/32), C]."""
    check_bits(bits)
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D, got shape {tuple(values.shape)}")
    v = values.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= (1 << bits)):
        raise ValueError(f"values must lie in [0, {1 << bits}) for bits={bits}")
    length, cols = v.shape
    word, shift = _stream_positions(length, bits, v.device)
    words = torch.zeros(math.ceil(length * bits / 32), cols, dtype=torch.int64, device=v.device)
    # Bits of different values never overlap, so adding is the same as OR-ing.
    words.index_add_(0, word, (v << shift[:, None]) & _U32)
    spill = (shift + bits) > 32
    if bool(spill.any()):
        words.index_add_(0, word[spill] + 1, v[spill] >> (32 - shift[spill])[:, None])
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_rows(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 words [W, C] -> int64 values [length, C]."""
    check_bits(bits)
    if words.dtype != torch.int32 or words.dim() != 2:
        raise ValueError(f"packed words must be a 2-D int32 tensor, got {words.dtype} {tuple(words.shape)}")
    if math.ceil(length * bits / 32) > words.shape[0]:
        raise ValueError(f"{words.shape[0]} packed rows cannot hold {length} values of {bits} bits")
    w = words.to(torch.int64) & _U32
    word, shift = _stream_positions(length, bits, w.device)
    v = w[word] >> shift[:, None]
    spill = (shift + bits) > 32
    if bool(spill.any()):
        v[spill] |= w[word[spill] + 1] << (32 - shift[spill])[:, None]
    return v & ((1 << bits) - 1)


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers [R, L] along dim 1 into int32 words [R, ceil(L*bits/32)] (the qzeros layout)."""
    return pack_rows(values.t(), bits).t().contiguous()


def unpack_cols(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_cols`: int32 words [R, W] -> int64 values [R, length]."""
    return unpack_rows(words.t(), bits, length).t().contiguous()


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The integers q of w on the grid scale * (q - zero) (broadcasting; zero points are integers)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, (1 << bits) - 1)


def quantize_to_grid(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                     bits: int) -> torch.Tensor:
    """Round ``weight`` [out, in] onto the grid ``scales * (q - zeros)``; returns q [in, out] int64.

    ``scales`` and ``zeros`` are [groups, out] (zeros as real zero points, not v1's zero - 1) and
    ``g_idx`` [in] maps each input feature to its group.
    """
    check_bits(bits)
    s = scales.to(torch.float32)[g_idx.long()]  # [in, out]
    z = zeros.to(torch.float32)[g_idx.long()]
    return round_to_grid(weight.t().to(torch.float32), s, z, bits).to(torch.int64)
