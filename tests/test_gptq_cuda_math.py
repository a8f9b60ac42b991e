"""The CUDA GPTQ kernels' index and bit math, and a host replay of the kernels, on the CPU.

csrc/gptq/gptq_cuda_math.h and gptq_cuda_thread.h hold everything the kernels compute except launch,
barriers, atomics and the hardware fp16/bf16 conversions; slimformer._C._test_cuda_* exposes the
same functions (compiled into every build, CPU-only too). The small functions are checked against
straightforward Python; `_test_cuda_emulate_*` runs every block, warp and lane of the real launch
grid through the same per-thread code, checked against the fp64 ground truth of conftest.make_gptq.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slimformer import _C
from case_ids import gptq_case_id  # tests/case_ids.py

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CONST = _C._test_cuda_constants()
SCALE_TYPE = {F32: 0, F16: 1, BF16: 2}


def _vpu(bits):
    return 32 if bits == 3 else 32 // bits


def _wpu(bits):
    return 3 if bits == 3 else 1


# -- small functions vs Python ----------------------------------------------------------------

def test_split_range_partitions_in_order():
    for total in range(0, 41):
        for parts in range(1, 12):
            ranges = [_C._test_cuda_split_range(total, parts, i) for i in range(parts)]
            assert ranges[0][0] == 0 and ranges[-1][1] == total
            assert all(ranges[i][1] == ranges[i + 1][0] for i in range(parts - 1))
            sizes = [e - b for b, e in ranges]
            assert min(sizes) >= 0 and max(sizes) - min(sizes) <= 1
    assert _C._test_cuda_split_range(10**12 + 7, 3, 2) == (2 * (10**12 + 7) // 3 + 1, 10**12 + 7)


def test_clamp_index():
    for v, n, want in [(-5, 10, 0), (-1, 1, 0), (0, 10, 0), (9, 10, 9), (10, 10, 9), (2**40, 7, 6), (3, 7, 3)]:
        assert _C._test_cuda_clamp_index(v, n) == want


def test_vector_loads_ok():
    for N in range(1, 20):
        for address in (0, 4, 8, 12, 16, 256, 260, 2**40 + 16):
            assert _C._test_cuda_vector_loads_ok(N, address) == (N % 4 == 0 and address % 16 == 0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unit_shape_and_positions(bits):
    assert _C._test_cuda_unit_shape(bits) == (_vpu(bits), _wpu(bits))
    for u in (0, 1, 5, 1000):
        rows = [_C._test_cuda_unit_word_row(u, bits, w) for w in range(_wpu(bits))]
        assert rows == [u * _wpu(bits) + w for w in range(_wpu(bits))]
        for j in range(_vpu(bits)):
            k = _C._test_cuda_unit_value_k(u, bits, j)
            assert k == u * _vpu(bits) + j
            # Value k of the column's bit stream lies in (or straddles) words of this unit only.
            first, last = (bits * k) // 32, (bits * k + bits - 1) // 32
            assert rows[0] <= first <= last <= rows[-1]


def test_columns_tile_the_output():
    vec, block_cols, threads = CONST["vec"], CONST["block_cols"], CONST["dequant_threads"]
    for N in (1, 3, 4, 5, 127, 128, 129, 513, 1000):
        gemv = [_C._test_cuda_gemv_first_column(b, lane) + c
                for b in range(math.ceil(N / block_cols)) for lane in range(32) for c in range(vec)]
        deq = [_C._test_cuda_dequant_first_column(b, t) + c
               for b in range(math.ceil(N / (threads * vec))) for t in range(threads) for c in range(vec)]
        for cols in (gemv, deq):
            assert sorted(cols) == cols and len(set(cols)) == len(cols)
            assert [n for n in cols if n < N] == list(range(N))


def test_magic_float_is_exact():
    for q in list(range(256)) + [2**16, 2**22 + 3, 2**23 - 1]:
        assert _C._test_cuda_magic_float(q) == 2.0**23 + q


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequant_magic_bit_identical_to_plain_formula(bits):
    """(2^23 + q) - (2^23 + z) is exact, so the trick equals fp32 s * (q - z) bit for bit."""
    rng = np.random.default_rng(bits)
    scales = np.concatenate([rng.standard_normal(6).astype(np.float32),
                             np.float16(rng.random(4)).astype(np.float32),  # fp16-representable
                             np.float32([1e-30, 3.0e38, 0.0, -0.0, 2.0**-140])])
    maxq = (1 << bits) - 1
    zeros = sorted({0, 1, maxq, maxq + 1, (maxq + 1) // 2, (maxq + 1) // 2 + 1})  # + zero_offset up to 2**bits
    for s in scales:
        for z in zeros:
            for q in range(maxq + 1):
                with np.errstate(over="ignore"):
                    want = np.float32(q - z) * np.float32(s)
                got = np.float32(_C._test_cuda_dequant_magic(q, float(z), float(s)))
                assert got.tobytes() == want.tobytes(), (q, z, s)


def _plan_python(M, N, K, bits, sms):
    rows = 1 if M <= 1 else 2 if M <= 2 else 4 if M <= 4 else CONST["max_row_tile"]
    row_tiles, col_blocks = math.ceil(M / rows), math.ceil(N / CONST["block_cols"])
    want = math.ceil(sms * CONST["target_blocks_per_sm"] / (col_blocks * row_tiles))
    most = (K // _vpu(bits)) // (CONST["gemv_warps"] * math.ceil(CONST["min_k_per_warp"] / _vpu(bits)))
    return rows, row_tiles, col_blocks, max(1, min(want, most, CONST["max_grid_y"]))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_plan_gemv(bits):
    for M in range(1, 17):
        for N, K in [(1, 32), (5, 96), (128, 576), (4096, 4096), (11008, 4096), (64, 14336), (100000, 64)]:
            for sms in (1, 108, 132):
                plan = _C._test_cuda_plan_gemv(M, N, K, bits, sms)
                assert plan == _plan_python(M, N, K, bits, sms)
                rows, row_tiles, col_blocks, splits = plan
                assert rows <= CONST["max_row_tile"] and (row_tiles - 1) * rows < M <= row_tiles * rows
                assert (col_blocks - 1) * CONST["block_cols"] < N <= col_blocks * CONST["block_cols"]
                if splits > 1:  # every warp keeps at least min_k_per_warp values of k
                    slices = splits * CONST["gemv_warps"]
                    assert (K // _vpu(bits)) // slices * _vpu(bits) >= CONST["min_k_per_warp"]
    assert _C._test_cuda_plan_gemv(1, 4096, 4096, 4, 132)[3] > 1  # decode-sized layers split K
    assert _C._test_cuda_plan_gemv(1, 100000, 4096, 4, 132)[3] == 1  # wide ones need not


def test_gemv_warp_units_tile_k_in_order():
    warps = CONST["gemv_warps"]
    for units in (1, 3, 4, 17, 512, 1000):
        for splits in (1, 2, 5, 16):
            ranges = [_C._test_cuda_gemv_warp_units(units, splits, s, w) for s in range(splits) for w in range(warps)]
            flat = [u for b, e in ranges for u in range(b, e)]
            assert flat == list(range(units))


# -- host replay of the kernels ----------------------------------------------------------------

def _np_typed(t: torch.Tensor):
    """(numpy array, type tag) for a fp32 / fp16 / bf16 tensor; 16-bit types travel as raw bits."""
    if t.dtype == F32:
        return t.contiguous().numpy(), 0
    return t.contiguous().view(torch.int16).numpy(), SCALE_TYPE[t.dtype]


def emulate_gemv(x, d, perm=None, bias=None, sm_count=132, splits=None, g_idx=None):
    scales, st = _np_typed(d.scales)
    b, bt = _np_typed(bias) if bias is not None else (None, 0)
    y = _C._test_cuda_emulate_gemv(
        d.qweight.numpy(), d.qzeros.numpy(), scales, st, (d.g_idx if g_idx is None else g_idx).numpy(),
        x.float().numpy(), None if perm is None else perm.to(torch.int32).numpy(), b, bt, d.bits, d.zero_offset,
        sm_count, splits)
    return torch.from_numpy(y)


def emulate_dequantize(d, g_idx=None):
    scales, st = _np_typed(d.scales)
    W = _C._test_cuda_emulate_dequantize(d.qweight.numpy(), d.qzeros.numpy(), scales, st,
                                         (d.g_idx if g_idx is None else g_idx).numpy(), d.bits, d.zero_offset)
    return torch.from_numpy(W)


# (bits, K, N, group_size, act_order, zero_offset, scale dtype): every bits value with group sizes
# 32/128/-1, K=576 g128 (last group of 64), act-order, v1/v2, N % 4 != 0, N < 4, N over a block.
REPLAY_CASES = [
    (4, 576, 100, 128, False, 1, F16),
    (4, 576, 130, 128, True, 0, BF16),
    (4, 256, 3, 32, False, 1, F32),
    (4, 1024, 257, -1, False, 0, F16),
    (3, 576, 41, 128, False, 1, F16),
    (3, 96, 128, 32, True, 0, F16),
    (3, 1024, 6, -1, False, 1, BF16),
    (2, 576, 77, 128, True, 1, F16),
    (2, 256, 200, 32, False, 0, F32),
    (2, 1024, 1, -1, False, 1, F16),
    (8, 576, 64, 128, False, 0, BF16),
    (8, 100, 131, 32, True, 1, F16),
    (8, 1024, 9, -1, False, 1, F32),
]


@pytest.mark.parametrize("c", REPLAY_CASES, ids=gptq_case_id)
@pytest.mark.parametrize("M", [1, 3, 16])
def test_replayed_gemv_matches_fp64(c, M, make_gptq, helpers):
    bits, K, N, gs, act, off, sdt = c
    d = make_gptq(K, N, bits, gs, act_order=act, zero_offset=off, scale_dtype=sdt, bias_dtype=F16)
    x = torch.randn(M, K)
    ref = helpers.reference_gemm(x, d, bias=d.bias)
    # One split (direct stores with bias), the plan for an H100 (132 SMs; workspace path wherever K
    # allows), and more splits than warp slices have units (empty slices).
    for splits in (1, None, K):
        y = emulate_gemv(x, d, bias=d.bias, sm_count=132, splits=splits)
        assert helpers.rel_err(y, ref) <= 1e-5, f"splits={splits}"


@pytest.mark.parametrize("M", [1, 2, 5, 9])
def test_replayed_gemv_perm_and_fp32_bias(M, make_gptq, helpers):
    d = make_gptq(512, 45, 4, 64, act_order=True, bias_dtype=F32)
    x, perm = torch.randn(M, 512), torch.randperm(512)
    y = emulate_gemv(x, d, perm=perm, bias=d.bias)
    assert helpers.rel_err(y, helpers.reference_gemm(x, d, perm=perm, bias=d.bias)) <= 1e-5


def test_replayed_gemv_splits_agree(make_gptq, helpers):
    """Same sums whichever split count the SM count leads to (only the fp32 summation order differs)."""
    d = make_gptq(4096, 70, 4, 128)
    x = torch.randn(3, 4096)
    outs = [emulate_gemv(x, d, splits=s) for s in (1, 2, 3, 7, 16, 128)]
    for y in outs:
        assert helpers.rel_err(y, outs[0]) <= 1e-6


def test_replayed_kernels_clamp_bad_indices(make_gptq, helpers):
    """Out-of-range g_idx / perm read the nearest valid entry (the CUDA adapter does not sync to check)."""
    d = make_gptq(128, 21, 4, 32)
    bad_g = d.g_idx.clone()
    bad_g[:5], bad_g[-3:] = -7, 1000
    bad_perm = torch.randperm(128)
    bad_perm[3], bad_perm[9] = -2, 500
    x = torch.randn(2, 128)
    clamped_g = bad_g.clamp(0, d.G - 1)
    W = d.scales.double()[clamped_g.long()] * (d.q.double() - (d.zstored.double() + 1)[clamped_g.long()])
    ref = x.double()[:, bad_perm.clamp(0, 127)] @ W
    assert helpers.rel_err(emulate_gemv(x, d, perm=bad_perm, g_idx=bad_g), ref) <= 1e-5
    torch.testing.assert_close(emulate_dequantize(d, g_idx=bad_g).double(), W, rtol=1e-6, atol=0)


@pytest.mark.parametrize("c", REPLAY_CASES, ids=gptq_case_id)
def test_replayed_dequantize_matches_cpu_op(c, make_gptq):
    bits, K, N, gs, act, off, sdt = c
    d = make_gptq(K, N, bits, gs, act_order=act, zero_offset=off, scale_dtype=sdt)
    W = emulate_dequantize(d)
    # Both compute the single fp32 rounding of s * (q - z): identical, and exact before rounding.
    cpu = torch.ops.slimformer.gptq_dequantize(d.qweight, d.qzeros, d.scales, d.g_idx, bits, off)
    assert torch.equal(W.to(sdt), cpu)
    torch.testing.assert_close(W.double(), d.W, rtol=2e-7, atol=0)


def test_replayed_dequantize_grid_stride_past_grid_y_limit(make_gptq):
    """More units than gridDim.y allows (65535): blocks loop over units with a stride."""
    K = 4 * (CONST["max_grid_y"] + 5)  # 8-bit: 4 values per unit
    d = make_gptq(K, 3, 8, -1, scale_dtype=F32)
    torch.testing.assert_close(emulate_dequantize(d).double(), d.W, rtol=2e-7, atol=0)


def test_hooks_reject_bad_shapes(make_gptq):
    d = make_gptq(64, 8, 4, 32)
    scales, st = _np_typed(d.scales)
    x = np.zeros((2, 64), np.float32)
    args = [d.qweight.numpy(), d.qzeros.numpy(), scales, st, d.g_idx.numpy()]
    with pytest.raises(ValueError):
        _C._test_cuda_emulate_gemv(*args, np.zeros((17, 64), np.float32), None, None, 0, 4, 1, 1)
    with pytest.raises(ValueError):
        _C._test_cuda_emulate_gemv(d.qweight.numpy()[:4], *args[1:], x, None, None, 0, 4, 1, 1)
    with pytest.raises(ValueError):
        _C._test_cuda_emulate_gemv(*args, x, None, None, 0, 4, 1, 1, 0)
    with pytest.raises(ValueError):
        _C._test_cuda_emulate_dequantize(*args[:2], scales[:1], st, args[4], 4, 1)
    with pytest.raises(ValueError):
        _C._test_cuda_emulate_dequantize(*args, 5, 1)
