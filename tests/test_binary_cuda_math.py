"""The CUDA binary kernels' bit and index math, and host replays of the kernels, on the CPU.

csrc/binary/binary_cuda_math.h holds everything the kernels compute except launches, barriers,
shuffles, ballots, atomics and the hardware fp16/bf16 conversions; slimformer._C._test_binary_cuda_*
exposes the same functions (compiled into every build, CPU-only too). Small functions are checked
against straightforward Python; ``_test_binary_cuda_emulate_*`` runs every block, warp and lane of the
real launch grid through the same per-thread code, checked against slimformer.binary.reference.
"""
from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch

from slimformer import _C
from slimformer.binary import pack_signs, packed_shape
from slimformer.binary.reference import (binarize_activations_reference, binary_linear_a1_reference,
                                         binary_linear_reference)

CONST = _C._test_binary_cuda_constants()
MS = [1, 3, 17, 33, 130]
KS = [1, 31, 33, 100, 576, 1000]
NS = [1, 15, 17, 33, 100]


def _f32(v: float) -> float:
    return struct.unpack("<f", struct.pack("<f", v))[0]


def _bits(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0]


def _case(M, K, N, bias=True):
    pos = torch.rand(N, K) < 0.5
    qw = pack_signs(pos)
    alpha = torch.rand(N) + 0.25
    b = torch.randn(N) if bias else None
    x = torch.randn(M, K)
    return qw, alpha, b, x


def _np(t):
    return None if t is None else t.numpy()


def rel_err(y, ref):
    y, ref = torch.as_tensor(y).double(), torch.as_tensor(ref).double()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-300))


# -- per-element math ---------------------------------------------------------------------------

def test_sign_mask_and_signed_input_flip_exactly_the_sign_bit():
    rng = np.random.default_rng(0)
    specials = [0.0, -0.0, 1.5, -2.25, float("inf"), float("-inf"), 1e-45, -3.4e38]
    for _ in range(200):
        word = int(rng.integers(0, 2**32))
        i = int(rng.integers(0, 32))
        bit = (word >> i) & 1
        assert _C._test_binary_cuda_sign_mask(word, i) == (0 if bit else 0x80000000)
        for x in specials + [float(rng.standard_normal())]:
            got = _C._test_binary_cuda_signed_input(x, word, i)
            want_bits = _bits(x) ^ (0 if bit else 0x80000000)
            assert _bits(got) == want_bits
            assert got == (_f32(x) if bit else -_f32(x))
    nan = _C._test_binary_cuda_signed_input(float("nan"), 0, 5)
    assert math.isnan(nan)


def test_sign_of_bit():
    for word in (0, 0xFFFFFFFF, 0x80000001, 0x12345678):
        for i in range(32):
            assert _C._test_binary_cuda_sign_of_bit(word, i) == (1.0 if (word >> i) & 1 else -1.0)


def test_act_bit_matches_reference_rule():
    xs = torch.tensor([-1.0, -0.0, 0.0, 0.25, 0.2499, 3.0, float("nan"), float("inf"), float("-inf")])
    for shift in (0.0, 0.25, -0.5):
        ref = binarize_activations_reference(xs, torch.tensor(shift)) > 0
        for x, want in zip(xs.tolist(), ref.tolist()):
            assert _C._test_binary_cuda_act_bit(x, shift, True) == want
            assert _C._test_binary_cuda_act_bit(x, shift, False) is False  # pad lanes are 0 bits


@pytest.mark.parametrize("n_valid", [0, 1, 7, 31, 32])
def test_pack_word_is_the_ballot_of_act_bit(n_valid):
    x = torch.randn(32)
    x[::5] = 0.3  # == shift: +1
    shift = 0.3
    word = _C._test_binary_cuda_pack_word(x.numpy(), n_valid, shift)
    want = sum(1 << i for i in range(n_valid) if float(x[i]) >= shift)
    assert word == want


def test_pack_valid():
    for K in (1, 31, 32, 33, 100):
        words = math.ceil(K / 32)
        assert sum(_C._test_binary_cuda_pack_valid(w, K) for w in range(words)) == K
        assert all(_C._test_binary_cuda_pack_valid(w, K) == 32 for w in range(words - 1))


def test_epilogues_are_single_fmas():
    for s, a, b in [(3.0, 0.1, 0.7), (-1e7, 1e-3, 5.0), (0.0, 2.0, -1.0)]:
        got = _C._test_binary_cuda_gemv_epilogue(s, a, b)
        assert got == _f32(float(np.float64(_f32(a)) * np.float64(_f32(s)) + np.float64(_f32(b))))
    for K, pc, rpc in [(1, 0, 1), (100, 37, 60), (1000, 500, 0), (33, 33, 33)]:
        scale, shift, alpha, bias = 0.5, -0.25, 1.5, 0.125  # all exact: result exact
        got = _C._test_binary_cuda_a1_epilogue(K, pc, rpc, alpha, scale, shift, bias)
        dot, rowsum = K - 2 * pc, 2 * rpc - K
        assert got == alpha * (scale * dot + shift * rowsum) + bias


# -- gemv geometry --------------------------------------------------------------------------------

def test_split_range_partitions_in_order():
    for total in range(0, 40):
        for parts in range(1, 10):
            r = [_C._test_binary_cuda_split_range(total, parts, i) for i in range(parts)]
            assert r[0][0] == 0 and r[-1][1] == total
            assert all(r[i][1] == r[i + 1][0] for i in range(parts - 1))
            sizes = [e - b for b, e in r]
            assert max(sizes) - min(sizes) <= 1


def test_x_smem_layout_is_injective_aligned_and_conflict_free():
    chunk_inputs = CONST["chunk_words"] * 32
    slots = {_C._test_binary_cuda_x_smem_index(m, i) for m in range(CONST["max_token_tile"])
             for i in range(chunk_inputs)}
    assert len(slots) == CONST["max_token_tile"] * chunk_inputs
    assert max(slots) < CONST["max_token_tile"] * CONST["x_token_stride"]
    for w in range(CONST["chunk_words"]):
        assert _C._test_binary_cuda_x_smem_index(0, 32 * w) % 4 == 0  # float4 reads
    # The two half-warps read float4 j of words 2p and 2p+1: their 4-bank groups differ.
    for p in range(CONST["chunk_words"] // 2):
        for j in range(8):
            b0 = _C._test_binary_cuda_x_smem_index(0, 32 * (2 * p) + 4 * j) % 32
            b1 = _C._test_binary_cuda_x_smem_index(0, 32 * (2 * p + 1) + 4 * j) % 32
            assert {b0 // 4} != {b1 // 4}


def test_stage_source_covers_chunk_with_zero_padding():
    M, K = 3, 100
    for c0 in (0, 2):
        for e in range(4 * CONST["chunk_words"] * 32):
            m, i = divmod(e, CONST["chunk_words"] * 32)
            k = 32 * c0 + i
            want = m * K + k if (m < M and k < K) else -1
            assert _C._test_binary_cuda_stage_source(e, 0, c0, M, K) == want
        assert _C._test_binary_cuda_stage_source(5, 2, 0, M, K) == 2 * K + 5
        assert _C._test_binary_cuda_stage_source(5, 3, 0, M, K) == -1


def test_gemv_lanes_cover_each_chunk_word_and_row_once_coalesced():
    seen = set()
    for warp in range(CONST["gemv_warps"]):
        for s in range(CONST["gemv_steps"]):
            addrs = []
            for lane in range(32):
                r, h = _C._test_binary_cuda_lane_row_half(lane)
                lw = _C._test_binary_cuda_gemv_local_word(warp, s, lane)
                seen.add((lw, r))
                addrs.append(lw * 16 + r)  # element offset within a tile's [words, 16] block
            # one warp-wide load: 32 consecutive int32 (128 contiguous bytes), 128-byte aligned
            assert sorted(addrs) == list(range(min(addrs), min(addrs) + 32)) and min(addrs) % 32 == 0
    assert seen == {(w, r) for w in range(CONST["chunk_words"]) for r in range(16)}


def test_plan_gemv():
    for M in (1, 2, 3, 4, 5, 8, 9, 64):
        for N in (1, 100, 4096):
            for K in (1, 576, 4096, 100000):
                tm, tb, tiles, splits = _C._test_binary_cuda_plan_gemv(M, N, K, 132)
                assert tm == (1 if M <= 1 else 2 if M <= 2 else 4 if M <= 4 else 8)
                assert tb == math.ceil(M / tm) and tiles == math.ceil(N / 16)
                words = math.ceil(K / 32)
                assert 1 <= splits <= max(1, words // CONST["chunk_words"])
                assert splits <= 65535


# -- W1A1 geometry --------------------------------------------------------------------------------

def test_a1_weight_staging_is_a_bijection_onto_the_slots():
    tiles, words = 6, 40  # group 1 has tiles 4, 5 (6, 7 are past the end); chunk 1 has words 32..39
    n = CONST["a1_tile_group"] * CONST["a1_chunk_words"] * 16
    slots = [_C._test_binary_cuda_a1_weight_slot(e) for e in range(n)]
    assert sorted(slots) == list(range(n))
    qw = np.arange(tiles * words * 16).reshape(tiles, words, 16)
    for group, c0 in [(0, 0), (1, 32)]:
        for e in range(n):
            src = _C._test_binary_cuda_a1_weight_source(e, group, c0, tiles, words)
            slot = slots[e]
            wl, row = divmod(slot, CONST["a1_rows"])
            t, r = group * CONST["a1_tile_group"] + row // 16, row % 16
            w = c0 + wl
            if t < tiles and w < words:
                assert src == qw[t, w, r]
            else:
                assert src == -1
    # coalesced: consecutive entries of one tile read consecutive elements
    srcs = [_C._test_binary_cuda_a1_weight_source(e, 0, 0, tiles, words) for e in range(512)]
    assert srcs == list(range(512))


def test_a1_act_staging():
    M, words = 40, 35
    n = CONST["a1_tokens"] * CONST["a1_chunk_words"]
    slots = [_C._test_binary_cuda_a1_act_slot(e) for e in range(n)]
    assert len(set(slots)) == n and max(slots) < CONST["a1_tokens"] * CONST["a_word_stride"]
    for m0, c0 in [(0, 0), (32, 32)]:
        for e in range(n):
            m, w = m0 + e // 32, c0 + e % 32
            want = m * words + w if (m < M and w < words) else -1
            assert _C._test_binary_cuda_a1_act_source(e, m0, c0, M, words) == want


def test_a1_threads_cover_the_tile_once():
    cover = set()
    for t in range(CONST["a1_threads"]):
        tx, ty = _C._test_binary_cuda_a1_thread(t)
        cover |= {(4 * ty + j, 4 * tx + i) for j in range(4) for i in range(4)}
    assert cover == {(m, n) for m in range(CONST["a1_tokens"]) for n in range(CONST["a1_rows"])}


# -- host replays of whole kernels vs the fp64 reference ------------------------------------------

@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("N", NS)
def test_emulate_unpack_equals_unpack_signs(K, N):
    from slimformer.binary import unpack_signs
    qw, _, _, _ = _case(1, K, N)
    got = _C._test_binary_cuda_emulate_unpack(qw.numpy(), N, K)
    assert torch.equal(torch.from_numpy(got), unpack_signs(qw, N, K))


@pytest.mark.parametrize("K", KS)
def test_emulate_pack_matches_reference_bits(K):
    M = 5
    x = torch.randn(M, K)
    x[:, ::7] = 0.1
    shift = 0.1
    got = _C._test_binary_cuda_emulate_pack(x.numpy(), shift).astype(np.int64)
    t = binarize_activations_reference(x, torch.tensor(shift)) > 0
    words = math.ceil(K / 32)
    bits = torch.zeros(M, words * 32, dtype=torch.int64)
    bits[:, :K] = t.long()
    want = (bits.view(M, words, 32) << torch.arange(32)).sum(-1)
    assert np.array_equal(got, want.numpy())


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("N", [1, 17, 100])
def test_emulate_gemv_matches_reference(M, K, N):
    qw, alpha, b, x = _case(M, K, N, bias=N != 17)
    ref = binary_linear_reference(x, qw, alpha, b, K)
    got = _C._test_binary_cuda_emulate_gemv(_np(qw), _np(alpha), _np(b), _np(x), K, 132)
    assert rel_err(got, ref) <= 1e-5


@pytest.mark.parametrize("splits", [2, 3, 7])
def test_emulate_gemv_split_k_matches_one_split(splits):
    M, K, N = 5, 32 * 32 * 7 + 13, 33
    qw, alpha, b, x = _case(M, K, N)
    one = _C._test_binary_cuda_emulate_gemv(_np(qw), _np(alpha), _np(b), _np(x), K, 1, splits=1)
    many = _C._test_binary_cuda_emulate_gemv(_np(qw), _np(alpha), _np(b), _np(x), K, 1, splits=splits)
    ref = binary_linear_reference(x, qw, alpha, b, K)
    assert rel_err(one, ref) <= 1e-5 and rel_err(many, ref) <= 1e-5


def test_emulate_gemv_more_splits_than_words():
    """Splits past the last word are empty and add nothing."""
    M, K, N = 2, 40, 20
    qw, alpha, b, x = _case(M, K, N)
    got = _C._test_binary_cuda_emulate_gemv(_np(qw), _np(alpha), _np(b), _np(x), K, 1, splits=5)
    assert rel_err(got, binary_linear_reference(x, qw, alpha, b, K)) <= 1e-5


def test_emulate_gemv_fp16_inputs():
    M, K, N = 3, 576, 100
    qw, alpha, b, x = _case(M, K, N)
    x = x.half()
    got = _C._test_binary_cuda_emulate_gemv(_np(qw), _np(alpha), _np(b), x.float().numpy(), K, 132)
    ref = binary_linear_reference(x, qw, alpha, b, K)
    assert rel_err(torch.from_numpy(got).half(), ref) <= 1e-2


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("N", NS)
def test_emulate_gemm_a1_matches_reference(M, K, N):
    qw, alpha, b, x = _case(M, K, N, bias=(M + N) % 2 == 0)
    scale, shift = torch.tensor(0.75), torch.tensor(0.125)
    x[:, ::9] = 0.125  # exactly at the shift: +1
    ref = binary_linear_a1_reference(x, qw, alpha, b, scale, shift, K)
    got = _C._test_binary_cuda_emulate_gemm_a1(_np(qw), _np(alpha), _np(b), _np(x), 0.75, 0.125, K)
    assert rel_err(got, ref) <= 1e-6


def test_emulate_gemm_a1_integer_results_are_exact():
    """alpha = scale = 1, shift = 0, no bias: y is the integer dot product, exactly."""
    M, K, N = 33, 1000, 100
    qw, _, _, x = _case(M, K, N)
    alpha = torch.ones(N)
    got = _C._test_binary_cuda_emulate_gemm_a1(_np(qw), _np(alpha), None, _np(x), 1.0, 0.0, K)
    ref = binary_linear_a1_reference(x, qw, alpha, None, torch.tensor(1.0), torch.tensor(0.0), K)
    assert torch.equal(torch.from_numpy(got), ref)


def test_emulate_large_square():
    M, K, N = 4, 4096, 4096
    qw, alpha, b, x = _case(M, K, N)
    got = _C._test_binary_cuda_emulate_gemv(_np(qw), _np(alpha), _np(b), _np(x), K, 132)
    assert rel_err(got, binary_linear_reference(x, qw, alpha, b, K)) <= 1e-5


def test_hooks_reject_bad_shapes():
    qw, alpha, b, x = _case(2, 64, 20)
    with pytest.raises(ValueError):
        _C._test_binary_cuda_emulate_gemv(_np(qw), _np(alpha), None, _np(x), 65, 1)
    with pytest.raises(ValueError):
        _C._test_binary_cuda_emulate_gemm_a1(_np(qw)[:1], _np(alpha), None, _np(x), 1.0, 0.0, 64)
    assert packed_shape(20, 64) == tuple(qw.shape)
