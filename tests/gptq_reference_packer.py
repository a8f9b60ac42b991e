"""An independent reference for the GPTQ checkpoint format, written from its description only.

Nothing here uses slimformer: tests use it to produce checkpoint tensors the way AutoGPTQ /
GPTQModel / optimum would, and to dequantize them, so that slimformer's loader is checked against a
second implementation rather than against itself.

The format (GUIDE.md section 7): ``qweight`` int32 [in*bits/32, out] packs along in_features,
``qzeros`` int32 [G, ceil(out*bits/32)] packs along out_features, ``scales`` fp16 [G, out],
``g_idx`` int32 [in]. A packed run is one little-endian bit stream: value i occupies bits
[bits*i, bits*i + bits) of the stream, bit b of the stream being bit b % 32 of word b // 32 (so for
3 bits, values 10 and 21 of every 32 straddle two words). W[k, n] = scales[g, n] * (q[k, n] - z[g, n])
with g = g_idx[k]; format "gptq" (v1) stores z - 1, "gptq_v2" stores z.

Packing goes through arbitrary-precision Python ints (one stream per column): slow but obviously
right, and fast enough for the tiny models of the tests.
"""
from __future__ import annotations

import math

import numpy as np

MASK32 = 0xFFFFFFFF


def stored_zero_offset(checkpoint_format: str) -> int:
    """What is subtracted from the real zero point before storing it."""
    return {"gptq": 1, "gptq_v2": 0}[checkpoint_format]


def pack_along_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Integers [L, C] in [0, 2**bits) -> int32 words [ceil(L*bits/32), C]; column c is one bit stream."""
    values = np.asarray(values)
    length, cols = values.shape
    assert values.min() >= 0 and values.max() < 2**bits
    nwords = math.ceil(length * bits / 32)
    out = np.zeros((nwords, cols), dtype=np.uint32)
    for c in range(cols):
        stream = 0
        for i in range(length):
            stream |= int(values[i, c]) << (bits * i)
        for w in range(nwords):
            out[w, c] = (stream >> (32 * w)) & MASK32
    return out.view(np.int32)


def unpack_along_rows(words: np.ndarray, bits: int, length: int) -> np.ndarray:
    """Inverse of :func:`pack_along_rows`: int32 words [W, C] -> int64 values [length, C]."""
    words = np.asarray(words, dtype=np.int32).view(np.uint32)
    out = np.zeros((length, words.shape[1]), dtype=np.int64)
    for c in range(words.shape[1]):
        stream = 0
        for w in range(words.shape[0]):
            stream |= int(words[w, c]) << (32 * w)
        for i in range(length):
            out[i, c] = (stream >> (bits * i)) & (2**bits - 1)
    return out


def quantize(weight: np.ndarray, bits: int, group_size: int, sym: bool, desc_act: bool,
             checkpoint_format: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Round-to-nearest GPTQ tensors for a Linear weight [out, in] (the grids AutoGPTQ's quantizer uses).

    With ``desc_act`` the inputs are visited in a random order (standing in for act-order's
    argsort of the Hessian diagonal) and grouped in that order, so ``g_idx`` is unsorted.
    Returns qweight, qzeros (int32), scales (float16) and g_idx (int32).
    """
    out_features, in_features = weight.shape
    maxq = 2**bits - 1
    gs = in_features if group_size == -1 else group_size
    groups = math.ceil(in_features / gs)
    order = rng.permutation(in_features) if desc_act else np.arange(in_features)
    g_idx = np.empty(in_features, dtype=np.int32)
    g_idx[order] = np.arange(in_features) // gs  # the j-th visited input lands in group j // gs

    w = weight.T.astype(np.float64)  # [in, out]
    scales = np.zeros((groups, out_features), dtype=np.float16)
    zeros = np.zeros((groups, out_features), dtype=np.int64)
    offset = stored_zero_offset(checkpoint_format)
    for g in range(groups):
        rows = w[g_idx == g]
        lo = np.minimum(rows.min(axis=0), 0.0)
        hi = np.maximum(rows.max(axis=0), 0.0)
        if sym:
            amax = np.maximum(-lo, hi)
            scale = 2 * amax / maxq
            zero = np.full(out_features, (maxq + 1) // 2)
        else:
            scale = (hi - lo) / maxq
            zero = np.round(-lo / np.where(scale == 0, 1, scale))
        scale = np.where(scale == 0, 1.0, scale).astype(np.float16)  # the checkpoint keeps fp16 scales
        scales[g] = scale
        # v1 cannot store a zero point of 0 (it would be -1), so such rows use 1.
        zeros[g] = np.clip(zero, offset, maxq).astype(np.int64)
    s = scales.astype(np.float64)[g_idx]
    q = np.clip(np.round(w / s) + zeros[g_idx], 0, maxq).astype(np.int64)
    return {
        "qweight": pack_along_rows(q, bits),
        "qzeros": pack_along_rows((zeros - offset).T, bits).T.copy(),
        "scales": scales,
        "g_idx": g_idx,
    }


def dequantize(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray, bits: int,
               checkpoint_format: str) -> np.ndarray:
    """W [in, out] in float64 from checkpoint tensors."""
    in_features, out_features = len(g_idx), qweight.shape[1]
    q = unpack_along_rows(qweight, bits, in_features)
    z = unpack_along_rows(np.ascontiguousarray(qzeros.T), bits, out_features).T + stored_zero_offset(checkpoint_format)
    g = np.asarray(g_idx, dtype=np.int64)
    return scales.astype(np.float64)[g] * (q - z[g])
