"""GPTQ checkpoint packing: bit-exact with AutoGPTQ's packing loops, round trips, and the C++ bit math.

``autogptq_pack_qweight`` / ``autogptq_pack_qzeros`` below transcribe AutoGPTQ's ``QuantLinear.pack``
loops (numpy uint32, OR-ing shifted values), written independently of slimformer.gptq.packing.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slimformer import _C
from slimformer.gptq import (
    CHECKPOINT_FORMATS,
    SUPPORTED_BITS,
    dequantize_reference,
    pack_cols,
    pack_rows,
    quantize_to_grid,
    unpack_cols,
    unpack_rows,
    zero_offset,
)

VPU = {2: 16, 3: 32, 4: 8, 8: 4}  # values per unit
WPU = {2: 1, 3: 3, 4: 1, 8: 1}    # int32 words per unit


# -- independent AutoGPTQ packing -------------------------------------------------------------

def _autogptq_pack_along_first(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's qweight loop: uint32 values [L, C] (L a multiple of 32 / gcd(32, bits)) -> [L*bits/32, C]."""
    intweight = intweight.astype(np.uint32)
    # AutoGPTQ writes `shape[0] // 32 * bits` (it requires in_features % 32 == 0); same for those.
    qweight = np.zeros((intweight.shape[0] * bits // 32, intweight.shape[1]), dtype=np.uint32)
    i = 0
    row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + (32 // bits)):
                qweight[row] |= intweight[j] << np.uint32(bits * (j - i))
            i += 32 // bits
            row += 1
        elif bits == 3:
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << np.uint32(3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << np.uint32(30)
            row += 1
            qweight[row] |= (intweight[i] >> np.uint32(2)) & np.uint32(1)
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << np.uint32(3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << np.uint32(31)
            row += 1
            qweight[row] |= (intweight[i] >> np.uint32(1)) & np.uint32(0x3)
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << np.uint32(3 * (j - i) + 2)
            i += 10
            row += 1
        else:
            raise NotImplementedError(bits)
    return qweight


def autogptq_pack_qweight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q [in, out] int -> qweight int32 [in*bits/32, out] (AutoGPTQ: in is a multiple of the unit)."""
    packed = _autogptq_pack_along_first(q.numpy().astype(np.uint32), bits)
    return torch.from_numpy(packed.view(np.int32).copy())


def autogptq_pack_qzeros(zeros_stored: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored zeros [G, out] -> qzeros int32 [G, ceil(out*bits/32)].

    AutoGPTQ's loop packs along columns and needs out to be a multiple of the unit; for other
    widths the columns are padded with zeros to a whole unit and the stream is cut to
    ceil(out*bits/32) words (the natural continuation of the format, which slimformer uses).
    """
    G, n = zeros_stored.shape
    vpu = VPU[bits]
    padded = np.zeros((G, math.ceil(n / vpu) * vpu), dtype=np.uint32)
    padded[:, :n] = zeros_stored.numpy()
    packed = _autogptq_pack_along_first(padded.T.copy(), bits).T
    return torch.from_numpy(np.ascontiguousarray(packed[:, : math.ceil(n * bits / 32)]).view(np.int32))


def naive_unpack(words: np.ndarray, bits: int, count: int) -> list[int]:
    """Value i of a little-endian bit stream of uint32 words, bit by bit (pure Python)."""
    words = [int(w) & 0xFFFFFFFF for w in words]
    out = []
    for i in range(count):
        v = 0
        for b in range(bits):
            pos = bits * i + b
            v |= ((words[pos // 32] >> (pos % 32)) & 1) << b
        out.append(v)
    return out


def _rand_values(shape, bits):
    return torch.randint(0, 1 << bits, shape, dtype=torch.int64)


# -- hand-computed vectors (pin the layout itself) --------------------------------------------

def _i32(u: int) -> int:
    return u - (1 << 32) if u >= 1 << 31 else u


@pytest.mark.parametrize("bits,values,words", [
    (4, list(range(8)), [0x76543210]),
    (8, [0x01, 0x23, 0x45, 0xFE], [0xFE452301]),
    (2, [3, 0, 1, 2] + [0] * 12, [0b10010011]),
    (2, [0] * 15 + [3], [0xC0000000]),
    # 3-bit: v10 = 0b111 spans bits 30-31 of word 0 and bit 0 of word 1
    (3, [0] * 10 + [7] + [0] * 21, [0xC0000000, 0x1, 0x0]),
    # v21 = 0b101: low bit at bit 31 of word 1, bits 1-2 at bits 0-1 of word 2
    (3, [0] * 21 + [5] + [0] * 10, [0x0, 0x80000000, 0x2]),
    (3, [1] * 32, [0x49249249, 0x92492492, 0x24924924]),
    (3, [0] * 31 + [7], [0, 0, 0xE0000000]),
])
def test_pack_known_vectors(bits, values, words):
    expected = torch.tensor([[_i32(w)] for w in words], dtype=torch.int32)
    v = torch.tensor(values, dtype=torch.int64)[:, None]
    assert torch.equal(pack_rows(v, bits), expected)
    assert torch.equal(autogptq_pack_qweight(v, bits), expected)
    assert torch.equal(pack_cols(v.t(), bits), expected.t())
    assert unpack_rows(expected, bits, len(values))[:, 0].tolist() == values


def test_3bit_all_ones_vector_is_consistent():
    # 32 values of 1: bit 3*i set for every i -> word0 bits 0,3,..,30; word1 bits 1,4,..,31; word2 bits 2,5,..,29
    w = [sum(1 << (3 * i - 32 * k) for i in range(32) if 0 <= 3 * i - 32 * k < 32) for k in range(3)]
    assert w == [0x49249249, 0x92492492, 0x24924924]
    assert pack_rows(torch.ones(32, 1, dtype=torch.int64), 3)[:, 0].tolist() == [_i32(x) for x in w]


# -- bit-exact with AutoGPTQ on random data ---------------------------------------------------

@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("units,N", [(1, 1), (3, 7), (5, 64), (18, 45)])
def test_pack_rows_matches_autogptq_qweight(bits, units, N):
    K = units * VPU[bits]
    q = _rand_values((K, N), bits)
    packed = pack_rows(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (K * bits // 32, N)
    assert torch.equal(packed, autogptq_pack_qweight(q, bits))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("G,N", [(1, 32), (4, 64), (3, 5), (2, 33), (7, 100), (1, 1)])
def test_pack_cols_matches_autogptq_qzeros(bits, G, N):
    z = _rand_values((G, N), bits)
    packed = pack_cols(z, bits)
    assert packed.dtype == torch.int32 and packed.shape == (G, math.ceil(N * bits / 32))
    assert packed.is_contiguous()
    assert torch.equal(packed, autogptq_pack_qzeros(z, bits))


def test_symmetric_v1_qzeros_word():
    """Symmetric 4-bit GPTQ (v1) stores zero 8 as 7: every qzeros word is 0x77777777."""
    z = torch.full((3, 24), 7, dtype=torch.int64)
    assert torch.equal(pack_cols(z, 4), torch.full((3, 3), 0x77777777, dtype=torch.int32))


# -- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("L,C", [(1, 3), (13, 5), (32, 2), (77, 9), (256, 33)])
def test_round_trip(bits, L, C):
    v = _rand_values((L, C), bits)
    rows = pack_rows(v, bits)
    assert rows.shape == (math.ceil(L * bits / 32), C)
    assert torch.equal(unpack_rows(rows, bits, L), v)
    cols = pack_cols(v.t(), bits)
    assert cols.shape == (C, math.ceil(L * bits / 32))
    assert torch.equal(unpack_cols(cols, bits, L), v.t())
    # padding bits past the last value are zero
    total = rows.shape[0] * 32 // bits
    assert int(unpack_rows(rows, bits, total)[L:].abs().sum()) == 0


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_unpack_matches_naive_bit_stream(bits):
    words = torch.randint(-(2**31), 2**31, (9, 4), dtype=torch.int64).to(torch.int32)
    L = 9 * 32 // bits
    got = unpack_rows(words, bits, L)
    for c in range(4):
        assert got[:, c].tolist() == naive_unpack(words[:, c].numpy(), bits, L)
    got_cols = unpack_cols(words.t().contiguous(), bits, L)
    assert torch.equal(got_cols, got.t())


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_extreme_values(bits):
    maxq = (1 << bits) - 1
    for fill in (0, maxq):
        v = torch.full((VPU[bits] * 2, 3), fill, dtype=torch.int64)
        packed = pack_rows(v, bits)
        assert torch.equal(packed, autogptq_pack_qweight(v, bits))
        assert torch.equal(unpack_rows(packed, bits, v.shape[0]), v)
    if bits in (2, 4, 8):  # all-ones words are -1 as int32
        assert torch.equal(pack_rows(torch.full((VPU[bits], 1), maxq), bits), torch.full((1, 1), -1, dtype=torch.int32))


# -- errors -----------------------------------------------------------------------------------

def test_packing_errors():
    with pytest.raises(ValueError, match="unsupported bits=5"):
        pack_rows(torch.zeros(8, 2, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match="unsupported bits=5"):
        unpack_rows(torch.zeros(8, 2, dtype=torch.int32), 5, 8)
    with pytest.raises(ValueError, match=r"values must lie in \[0, 16\)"):
        pack_rows(torch.full((8, 2), 16), 4)
    with pytest.raises(ValueError, match=r"values must lie in \[0, 16\)"):
        pack_cols(torch.full((2, 8), -1), 4)
    with pytest.raises(ValueError, match="must be 2-D"):
        pack_rows(torch.zeros(8, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="int32"):
        unpack_rows(torch.zeros(1, 2, dtype=torch.int64), 4, 8)
    with pytest.raises(ValueError, match="cannot hold 9 values"):
        unpack_rows(torch.zeros(1, 2, dtype=torch.int32), 4, 9)


def test_zero_offset():
    assert CHECKPOINT_FORMATS == ("gptq", "gptq_v2")
    assert zero_offset("gptq") == 1
    assert zero_offset("gptq_v2") == 0
    with pytest.raises(ValueError, match="unknown checkpoint_format='marlin'"):
        zero_offset("marlin")


# -- quantize_to_grid and the fp64 reference --------------------------------------------------

@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_quantize_to_grid_recovers_grid_points(bits):
    K, N, gs = 96, 10, 32
    g_idx = torch.randperm(K).to(torch.int32) % (K // gs)
    scales = (torch.rand(K // gs, N) + 0.5).to(torch.float16)
    zeros = torch.randint(0, 1 << bits, (K // gs, N))
    q = _rand_values((K, N), bits)
    w = (scales.double()[g_idx.long()] * (q - zeros[g_idx.long()])).t()  # [out, in], exactly on the grid
    assert torch.equal(quantize_to_grid(w, scales, zeros, g_idx, bits), q)
    # off-grid values round to nearest and clamp to [0, maxq]
    w_out = w + 1e6
    assert int(quantize_to_grid(w_out, scales, zeros, g_idx, bits).min()) == (1 << bits) - 1
    nudged = w + 0.3 * scales.double()[g_idx.long()].t()
    assert torch.equal(quantize_to_grid(nudged, scales, zeros, g_idx, bits), q.clamp(max=(1 << bits) - 1))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("off", [0, 1])
def test_dequantize_reference_formula(bits, off, make_gptq):
    d = make_gptq(VPU[bits] * 12, 23, bits, 32, act_order=True, zero_offset=off)
    W = dequantize_reference(d.qweight, d.qzeros, d.scales, d.g_idx, bits, off)
    assert W.dtype == torch.float64 and W.shape == (d.K, d.N)
    # element-wise from the bit stream, pure Python, for a few entries
    qz_words = d.qzeros.numpy()
    qw_words = d.qweight.numpy()
    for k, n in [(0, 0), (d.K - 1, d.N - 1), (d.K // 2, 7), (VPU[bits] + 1, 3)]:
        g = int(d.g_idx[k])
        qv = naive_unpack(qw_words[:, n], bits, k + 1)[k]
        zv = naive_unpack(qz_words[g], bits, n + 1)[n] + off
        assert W[k, n].item() == float(d.scales[g, n]) * (qv - zv)
    assert torch.equal(W, d.W)


# -- C++ bit math shared with the CUDA kernels (test hooks in slimformer._C) -----------------

@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_cpp_unpack_stream_matches_unpack_rows(bits):
    W_rows, C = 12, 7
    words = torch.randint(-(2**31), 2**31, (W_rows, C), dtype=torch.int64).to(torch.int32)
    L = W_rows * 32 // bits
    expect = unpack_rows(words, bits, L)
    flat = words.numpy().reshape(-1)
    for c in range(C):
        got = _C._test_unpack_stream(np.ascontiguousarray(flat[c:]), C, bits, L)
        assert got.tolist() == expect[:, c].tolist()
    # qzeros layout: stride 1 along a row
    zeros = words.t().contiguous()
    expect_cols = unpack_cols(zeros, bits, L)
    for r in range(C):
        got = _C._test_unpack_stream(zeros[r].numpy(), 1, bits, L)
        assert got.tolist() == expect_cols[r].tolist()
    # partial stream (count not a multiple of the unit)
    got = _C._test_unpack_stream(zeros[0].numpy(), 1, bits, 5)
    assert got.tolist() == expect_cols[0, :5].tolist()


def test_cpp_unpack_stream_errors():
    words = np.zeros(4, dtype=np.int32)
    with pytest.raises(ValueError, match="unsupported bits"):
        _C._test_unpack_stream(words, 1, 5, 4)
    with pytest.raises(ValueError, match="too short"):
        _C._test_unpack_stream(words, 1, 4, 33)
    with pytest.raises(ValueError, match="stride"):
        _C._test_unpack_stream(words, 0, 4, 8)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_cpp_unpack_unit_matches_unpack_rows(bits):
    rng = np.random.default_rng(bits)
    for _ in range(20):
        w = [int(x) for x in rng.integers(0, 2**32, size=3, dtype=np.uint64)]
        unit = torch.tensor([[_i32(x)] for x in w[: WPU[bits]]], dtype=torch.int32)
        expect = unpack_rows(unit, bits, VPU[bits])[:, 0].tolist()
        got = [_C._test_unpack_unit(w[0], w[1], w[2], bits, j) for j in range(VPU[bits])]
        assert got == expect
        assert got == naive_unpack(np.array(w[: WPU[bits]]), bits, VPU[bits])
    with pytest.raises(ValueError):
        _C._test_unpack_unit(0, 0, 0, bits, VPU[bits])
    with pytest.raises(ValueError):
        _C._test_unpack_unit(0, 0, 0, 5, 0)


def _check_all_16bit_patterns(convert, dtype):
    patterns = torch.arange(65536, dtype=torch.int32).to(torch.int16)  # wraps to the int16 bit patterns
    expect = patterns.view(dtype).float()
    got = torch.tensor([convert(int(b)) for b in range(65536)], dtype=torch.float32)
    nan = torch.isnan(expect)
    assert torch.equal(torch.isnan(got), nan)
    # bit-exact for everything else, so +0/-0, infinities and subnormals are checked too
    assert torch.equal(got[~nan].view(torch.int32), expect[~nan].view(torch.int32))
    # sign of NaNs is kept
    assert torch.equal(torch.signbit(got[nan]), torch.signbit(expect[nan]))


def test_cpp_half_bits_to_float_all_patterns():
    _check_all_16bit_patterns(_C._test_half_bits_to_float, torch.float16)


def test_cpp_bf16_bits_to_float_all_patterns():
    _check_all_16bit_patterns(_C._test_bf16_bits_to_float, torch.bfloat16)
