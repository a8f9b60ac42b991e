"""torch.ops.slimformer.gptq_gemm / gptq_dequantize on CPU against an fp64 reference.

The reference W comes from the random integer values themselves (conftest.make_gptq), not from
slimformer's unpacking, so a packing bug and a kernel bug cannot cancel out. How the CPU op tiles
the work is internal (csrc/gptq/gptq_cpu_op.cpp, gptq_cpu_avx2.cpp: rows in passes of a few,
16-column register tiles with a scalar tail for leftover columns, column blocks and per-thread
column ranges; earlier builds switched to dequantize-64x4096-tiles + GEMM above 8 rows), so the
cases cover the boundaries of all of these: M from 1 to 130 (around 4/6/8-row passes), N < 16,
N % 16 != 0 and N % 8 != 0, N over one 512-column block, and K > 4096 with a small N.
"""
from __future__ import annotations

import pytest
import torch

from slimformer import _C
from slimformer.gptq import dequantize_reference, gptq_linear_reference, pack_rows
from slimformer.ops import gptq_dequantize, gptq_gemm

# The float kernel has three implementations: scalar, AVX2 (256-bit) and AVX-512 (level avx512vnni).
FLOAT_KERNEL_ISAS = ["scalar", "avx2", "avx512vnni"]

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {F32: 1e-5, F16: 1e-2, BF16: 1e-2}


def _case(bits, K, N, gs, act, sym, fmt, lead, xdt, sdt=F16, bias=None):
    return pytest.param(
        dict(bits=bits, K=K, N=N, gs=gs, act=act, sym=sym, off=1 if fmt == "v1" else 0, lead=lead, xdt=xdt,
             sdt=sdt, bias=bias),
        id=(f"b{bits}-K{K}-N{N}-g{gs}-{'act' if act else 'seq'}-{'sym' if sym else 'asym'}-{fmt}"
            f"-M{'x'.join(map(str, lead))}-x{str(xdt)[6:]}-s{str(sdt)[6:]}-{'bias' if bias else 'nobias'}"),
    )


# A covering set rather than a cartesian product: every bits value with several group sizes,
# act-order on/off, sym/asym, v1/v2, M in {1, 2, 3, 7, 16, 33, 130} (plus 5, 6, 8, 9 around
# row-pass boundaries), three x dtypes, fp16 scales (bf16/fp32 a few times), bias/no bias,
# leading batch dims, and a group size that does not divide K and is not a multiple of 8 (100).
CASES = [
    # 4-bit
    _case(4, 576, 100, 128, False, False, "v1", (1,), F32, bias=F16),       # K=576: last group of 64
    _case(4, 576, 100, 128, True, False, "v1", (7,), F16),
    _case(4, 576, 100, 128, False, True, "v2", (33,), BF16, bias=BF16),
    _case(4, 248, 47, 100, False, False, "v1", (3,), F32, bias=F32),        # groups 100, 100, 48
    _case(4, 248, 47, 100, True, False, "v2", (16,), F32),
    _case(4, 200, 5, 64, False, False, "v1", (2,), F16),                    # N < 16: tail only
    _case(4, 200, 5, -1, True, True, "v1", (130,), F32),
    _case(4, 4160, 43, 128, False, False, "v1", (33,), F32, bias=F16),     # K > 4096, small N
    _case(4, 4160, 43, 128, True, False, "v2", (9,), BF16),
    _case(4, 96, 600, 32, False, False, "v1", (8,), F32),                  # N over one column block
    _case(4, 512, 1000, 128, False, True, "v1", (1,), F32, bias=F16),
    _case(4, 200, 48, 64, False, False, "v1", (2, 3), F16, bias=F16),      # leading batch dims
    # 3-bit
    _case(3, 96, 40, 32, False, False, "v1", (1,), F32),
    _case(3, 96, 40, 32, True, False, "v2", (3,), F16),
    _case(3, 288, 33, 64, False, True, "v1", (7,), BF16, bias=F16),       # groups 64 x 4 + 32
    _case(3, 288, 33, -1, False, False, "v2", (130,), F32, sdt=BF16),
    _case(3, 4160, 24, 128, True, False, "v1", (16,), F32),
    _case(3, 160, 17, 128, False, False, "v1", (2,), F32, sdt=F32),
    _case(3, 96, 40, 32, True, True, "v2", (3, 11), BF16),
    _case(3, 352, 70, 128, False, False, "v1", (5,), F16, sdt=F32, bias=F32),
    # 2-bit
    _case(2, 80, 24, 32, False, False, "v1", (1,), F16),                    # groups 32, 32, 16
    _case(2, 80, 24, -1, True, True, "v2", (33,), F32),
    _case(2, 336, 70, 64, False, False, "v2", (7,), BF16, sdt=BF16, bias=F16),
    _case(2, 336, 70, 128, True, False, "v1", (2,), F32, bias=F32),
    _case(2, 4160, 19, 64, False, False, "v1", (130,), F16),
    _case(2, 112, 31, 100, False, False, "v2", (2, 1, 4), F32),            # 100: not a multiple of 16
    # 8-bit
    _case(8, 52, 31, -1, False, False, "v1", (3,), F32),                   # K=52: multiple of 4 only
    _case(8, 52, 31, 32, True, False, "v2", (16,), F16),
    _case(8, 300, 100, 64, False, True, "v1", (1,), BF16, bias=F16),
    _case(8, 300, 100, 128, True, False, "v1", (130,), F32, sdt=F32),
    _case(8, 4100, 20, -1, False, False, "v2", (7,), F32),
    _case(8, 4160, 40, 128, False, False, "v1", (33,), BF16, sdt=BF16, bias=BF16),
    _case(8, 124, 18, 100, True, False, "v2", (6,), F32),
]


def _random_x(lead, K, dtype):
    return torch.randn(*lead, K).to(dtype)


@pytest.mark.parametrize("isa", FLOAT_KERNEL_ISAS, indirect=True)
@pytest.mark.parametrize("c", CASES)
def test_gemm_matches_fp64_reference(c, isa, make_gptq, helpers):
    d = make_gptq(c["K"], c["N"], c["bits"], c["gs"], act_order=c["act"], sym=c["sym"], zero_offset=c["off"],
                  scale_dtype=c["sdt"], bias_dtype=c["bias"])
    x = _random_x(c["lead"], c["K"], c["xdt"])
    y = gptq_gemm(x, d.qweight, d.qzeros, d.scales, d.g_idx, c["bits"], c["off"], bias=d.bias)
    assert y.dtype == c["xdt"]
    assert y.shape == (*c["lead"], c["N"])
    ref = helpers.reference_gemm(x, d, bias=d.bias)
    err = helpers.rel_err(y, ref)
    assert err <= TOL[c["xdt"]], f"relative error {err:.3g}"


@pytest.mark.parametrize("c", CASES[::4])
def test_gemm_matches_slimformer_reference(c, make_gptq, helpers):
    """The product's fp64 reference (gptq_linear_reference) agrees with the ground truth and the op."""
    d = make_gptq(c["K"], c["N"], c["bits"], c["gs"], act_order=c["act"], sym=c["sym"], zero_offset=c["off"],
                  scale_dtype=c["sdt"], bias_dtype=c["bias"])
    x = _random_x(c["lead"], c["K"], c["xdt"])
    ref = gptq_linear_reference(x, d.qweight, d.qzeros, d.scales, d.g_idx, d.bias, c["bits"], c["off"])
    assert ref.dtype == torch.float64
    torch.testing.assert_close(ref, helpers.reference_gemm(x, d, bias=d.bias), rtol=1e-12, atol=1e-12)
    y = gptq_gemm(x, d.qweight, d.qzeros, d.scales, d.g_idx, c["bits"], c["off"], bias=d.bias)
    assert helpers.rel_err(y, ref) <= TOL[c["xdt"]]


@pytest.mark.parametrize("M", [1, 5, 6, 7, 8, 9, 12, 13])
@pytest.mark.parametrize("bits", [3, 4])
def test_gemm_row_pass_boundaries(M, bits, make_gptq, helpers):
    """Row counts around the fused kernel's row passes and the fused/tiled switch, N with a tail."""
    d = make_gptq(160, 37, bits, 64, zero_offset=1)
    x = torch.randn(M, 160)
    y = gptq_gemm(x, d.qweight, d.qzeros, d.scales, d.g_idx, bits, 1)
    assert helpers.rel_err(y, helpers.reference_gemm(x, d)) <= 1e-5


@pytest.mark.parametrize("isa", FLOAT_KERNEL_ISAS, indirect=True)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("M", [2, 40])
def test_gemm_arbitrary_g_idx(bits, M, isa, make_gptq, helpers):
    """g_idx is any map into [0, G): unsorted, with runs of one and groups that never occur."""
    K, N, G = 128, 29, 9
    g_idx = torch.randint(0, G - 2, (K,), dtype=torch.int32)  # groups 7 and 8 unused
    g_idx[:20] = 3  # one long run
    d = make_gptq(K, N, bits, g_idx=g_idx)
    d_scales = torch.cat([d.scales, torch.ones(2, N, dtype=d.scales.dtype)])
    d_qzeros = torch.cat([d.qzeros, torch.zeros(2, d.qzeros.shape[1], dtype=torch.int32)])
    x = torch.randn(M, K)
    y = gptq_gemm(x, d.qweight, d_qzeros, d_scales, d.g_idx, bits, 1)
    assert helpers.rel_err(y, helpers.reference_gemm(x, d)) <= 1e-5


@pytest.mark.parametrize("perm_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("M", [3, 20])
def test_gemm_perm_is_gathered_first(perm_dtype, M, make_gptq, helpers):
    """y = x[..., perm] @ W; act-order via (sorted weights, perm) equals the unsorted checkpoint."""
    K, N, bits, gs = 256, 50, 4, 64
    d = make_gptq(K, N, bits, gs, act_order=True, bias_dtype=F16)
    x = torch.randn(2, M, K)
    perm = torch.randperm(K).to(perm_dtype)
    y = gptq_gemm(x, d.qweight, d.qzeros, d.scales, d.g_idx, bits, 1, bias=d.bias, perm=perm)
    assert helpers.rel_err(y, helpers.reference_gemm(x, d, perm=perm, bias=d.bias)) <= 1e-5

    # The load-time act-order trick: sort K by group, gather x with the same permutation.
    order = torch.argsort(d.g_idx.long(), stable=True)
    y_sorted = gptq_gemm(x, pack_rows(d.q[order], bits), d.qzeros, d.scales, d.g_idx[order].contiguous(), bits, 1,
                         bias=d.bias, perm=order.to(perm_dtype))
    y_unsorted = gptq_gemm(x, d.qweight, d.qzeros, d.scales, d.g_idx, bits, 1, bias=d.bias)
    ref = helpers.reference_gemm(x, d, bias=d.bias)
    assert helpers.rel_err(y_sorted, ref) <= 1e-5
    assert helpers.rel_err(y_unsorted, ref) <= 1e-5


def test_gemm_noncontiguous_inputs(make_gptq, helpers):
    K, N, bits = 192, 40, 4
    d = make_gptq(K, N, bits, 64, bias_dtype=F32)
    x = torch.randn(K, 5).t()  # (5, K), non-contiguous
    big_qw = torch.zeros(d.qweight.shape[0], 2 * N, dtype=torch.int32)
    big_qw[:, ::2] = d.qweight
    big_sc = torch.zeros(d.G, 2 * N, dtype=d.scales.dtype)
    big_sc[:, 1::2] = d.scales
    qw, sc = big_qw[:, ::2], big_sc[:, 1::2]
    assert not (x.is_contiguous() or qw.is_contiguous() or sc.is_contiguous())
    y = gptq_gemm(x, qw, d.qzeros, sc, d.g_idx, bits, 1, bias=d.bias)
    assert helpers.rel_err(y, helpers.reference_gemm(x, d, bias=d.bias)) <= 1e-5


@pytest.mark.parametrize("lead", [(), (0,), (2, 0), (1,)])
def test_gemm_degenerate_leading_shapes(lead, make_gptq, helpers):
    d = make_gptq(64, 24, 4, 32, bias_dtype=F32)
    x = torch.randn(*lead, 64)
    y = gptq_gemm(x, d.qweight, d.qzeros, d.scales, d.g_idx, 4, 1, bias=d.bias)
    assert y.shape == (*lead, 24)
    if y.numel():
        assert helpers.rel_err(y, helpers.reference_gemm(x, d, bias=d.bias)) <= 1e-5


def test_torch_ops_schema_call_order(make_gptq, helpers):
    """torch.ops.slimformer.gptq_gemm takes (x, qweight, qzeros, scales, g_idx, perm, bias, bits, zero_offset)."""
    d = make_gptq(96, 20, 3, 32, zero_offset=0, bias_dtype=F32)
    x = torch.randn(4, 96)
    perm = torch.randperm(96)
    y = torch.ops.slimformer.gptq_gemm(x, d.qweight, d.qzeros, d.scales, d.g_idx, perm, d.bias, 3, 0)
    assert helpers.rel_err(y, helpers.reference_gemm(x, d, perm=perm, bias=d.bias)) <= 1e-5


# -- dequantize -------------------------------------------------------------------------------

@pytest.mark.parametrize("isa", FLOAT_KERNEL_ISAS, indirect=True)
@pytest.mark.parametrize("bits,K,N,gs,act,off,sdt", [
    (2, 80, 24, 32, False, 1, F16),
    (3, 288, 33, 64, True, 0, F16),
    (3, 4160, 21, 128, False, 1, BF16),
    (4, 576, 100, 128, False, 1, F16),
    (4, 248, 47, 100, True, 0, F32),
    (8, 52, 31, -1, False, 0, BF16),
    (8, 300, 13, 64, True, 1, F16),
])
def test_dequantize_matches_reference(bits, K, N, gs, act, off, sdt, isa, make_gptq):
    d = make_gptq(K, N, bits, gs, act_order=act, zero_offset=off, scale_dtype=sdt)
    W = gptq_dequantize(d.qweight, d.qzeros, d.scales, d.g_idx, bits, off)
    assert W.dtype == sdt and W.shape == (K, N)
    # s * (q - z) with 16-bit s is exact in fp32, so the op's W is the fp64 W rounded once.
    if sdt == F32:
        torch.testing.assert_close(W, d.W.to(sdt), rtol=2e-7, atol=0)
    else:
        assert torch.equal(W, d.W.to(sdt))
    torch.testing.assert_close(dequantize_reference(d.qweight, d.qzeros, d.scales, d.g_idx, bits, off), d.W,
                               rtol=0, atol=0)


# -- scalar vs AVX2 ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits,K,N,gs,act,sdt", [
    (2, 208, 45, 64, False, F16),
    (3, 352, 100, 128, True, F16),
    (3, 96, 600, 32, False, BF16),
    (4, 576, 77, 128, False, F16),
    (4, 248, 47, 100, True, F32),
    (8, 4100, 30, 128, False, F16),
    (8, 124, 18, 100, True, BF16),
])
@pytest.mark.parametrize("M", [1, 3, 8, 33])
def test_scalar_avx2_parity(bits, K, N, gs, act, sdt, M, isa, make_gptq, helpers):
    d = make_gptq(K, N, bits, gs, act_order=act, scale_dtype=sdt, bias_dtype=F32)
    x = torch.randn(M, K)
    outs = {}
    for name in FLOAT_KERNEL_ISAS:
        if name == "avx512vnni" and not _C.cpu_supports_avx512vnni():
            continue
        isa(name)
        outs[name] = gptq_gemm(x, d.qweight, d.qzeros, d.scales, d.g_idx, bits, 1, bias=d.bias)
        outs[name + "_w"] = gptq_dequantize(d.qweight, d.qzeros, d.scales, d.g_idx, bits, 1)
    for name in FLOAT_KERNEL_ISAS[1:]:
        if name in outs:
            assert helpers.rel_err(outs[name], outs["scalar"]) <= 1e-6, name
            assert torch.equal(outs[name + "_w"], outs["scalar_w"]), name


@pytest.mark.parametrize("M", [1, 3, 13])
def test_thread_count_does_not_change_result(M, make_gptq, helpers):
    """Column ranges split across threads: 1 thread and several agree (and match the reference)."""
    d = make_gptq(256, 1000, 4, 64, act_order=True)
    x = torch.randn(M, 256)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, max(2, threads), 3):
            torch.set_num_threads(n)
            outs.append(gptq_gemm(x, d.qweight, d.qzeros, d.scales, d.g_idx, 4, 1))
    finally:
        torch.set_num_threads(threads)
    for y in outs:
        assert helpers.rel_err(y, outs[0]) <= 1e-6
        assert helpers.rel_err(y, helpers.reference_gemm(x, d)) <= 1e-5


def test_isa_switch_and_restore(isa):
    assert _C.active_cpu_isa() in ("scalar", "avx2", "avxvnni", "avx512vnni")
    assert isa("scalar") == "scalar"
    assert _C.active_cpu_isa() == "scalar"
    best = next(name for name, ok in [("avx512vnni", _C.cpu_supports_avx512vnni()),
                                      ("avxvnni", _C.cpu_supports_avxvnni()),
                                      ("avx2", _C.cpu_supports_avx2()), ("scalar", True)] if ok)
    assert isa("auto") == best
    with pytest.raises(ValueError, match="scalar, avx2, avxvnni, avx512vnni or auto"):
        _C.set_cpu_isa("avx512")
    if not _C.cpu_supports_avx2():
        with pytest.raises(ValueError):
            _C.set_cpu_isa("avx2")


# -- torch.library.opcheck --------------------------------------------------------------------

def _opcheck_cases(make_gptq):
    d4 = make_gptq(128, 40, 4, 32, bias_dtype=F16)
    d3 = make_gptq(96, 20, 3, -1, act_order=True, zero_offset=0, scale_dtype=BF16)
    d8 = make_gptq(64, 9, 8, 32, act_order=True, scale_dtype=F32, bias_dtype=F32)
    gemm = [
        (torch.randn(3, 128, dtype=F16), d4.qweight, d4.qzeros, d4.scales, d4.g_idx, None, None, 4, 1),
        (torch.randn(2, 5, 128), d4.qweight, d4.qzeros, d4.scales, d4.g_idx, torch.randperm(128), d4.bias, 4, 1),
        (torch.randn(2, 7, 96, dtype=BF16), d3.qweight, d3.qzeros, d3.scales, d3.g_idx, None, None, 3, 0),
        (torch.randn(12, 64), d8.qweight, d8.qzeros, d8.scales, d8.g_idx,
         torch.randperm(64).to(torch.int32), d8.bias, 8, 1),
    ]
    deq = [(d.qweight, d.qzeros, d.scales, d.g_idx, d.bits, d.zero_offset) for d in (d4, d3, d8)]
    return gemm, deq


def test_opcheck_gptq_gemm(make_gptq):
    gemm, _ = _opcheck_cases(make_gptq)
    for args in gemm:
        torch.library.opcheck(torch.ops.slimformer.gptq_gemm.default, args)


def test_opcheck_gptq_dequantize(make_gptq):
    _, deq = _opcheck_cases(make_gptq)
    for args in deq:
        torch.library.opcheck(torch.ops.slimformer.gptq_dequantize.default, args)


# -- bad input --------------------------------------------------------------------------------

OP_ERRORS = (ValueError, RuntimeError)  # TORCH_CHECK_VALUE -> ValueError; torch._check -> RuntimeError


@pytest.fixture
def good(make_gptq):
    """A valid 4-bit case (K=128, N=40, 4 groups) whose tensors the error tests corrupt one at a time."""
    d = make_gptq(128, 40, 4, 32, bias_dtype=F32)
    return dict(x=torch.randn(3, 128), qweight=d.qweight, qzeros=d.qzeros, scales=d.scales, g_idx=d.g_idx,
                perm=None, bias=d.bias, bits=4, zero_offset=1)


def _call(a):
    return torch.ops.slimformer.gptq_gemm(a["x"], a["qweight"], a["qzeros"], a["scales"], a["g_idx"], a["perm"],
                                          a["bias"], a["bits"], a["zero_offset"])


def _deq(a):
    return torch.ops.slimformer.gptq_dequantize(a["qweight"], a["qzeros"], a["scales"], a["g_idx"], a["bits"],
                                                a["zero_offset"])


def test_good_case_runs(good):
    assert _call(good).shape == (3, 40)
    assert _deq(good).shape == (128, 40)


BAD_WEIGHTS = {
    "bits5": (lambda a: a.update(bits=5), r"unsupported bits=5"),
    "bits1": (lambda a: a.update(bits=1), r"unsupported bits=1"),
    "zero_offset2": (lambda a: a.update(zero_offset=2), r"zero_offset must be 1"),
    "qweight_float": (lambda a: a.update(qweight=a["qweight"].float()), r"qweight must be int32.*Float"),
    "qweight_int64": (lambda a: a.update(qweight=a["qweight"].long()), r"qweight must be int32"),
    "qzeros_int16": (lambda a: a.update(qzeros=a["qzeros"].to(torch.int16)), r"qzeros must be int32"),
    "g_idx_int64": (lambda a: a.update(g_idx=a["g_idx"].long()), r"g_idx must be int32"),
    "scales_int": (lambda a: a.update(scales=a["scales"].to(torch.int32)), r"scales must be float16, bfloat16 or float32"),
    "scales_float64": (lambda a: a.update(scales=a["scales"].double()), r"scales must be float16, bfloat16 or float32"),
    "qweight_1d": (lambda a: a.update(qweight=a["qweight"].reshape(-1)), r"qweight must be 2-D"),
    "g_idx_2d": (lambda a: a.update(g_idx=a["g_idx"].reshape(4, 32)), r"g_idx must be 1-D"),
    # in_features (from g_idx) not a multiple of 8 for 4 bits
    "K_not_multiple": (lambda a: a.update(g_idx=a["g_idx"][:124].contiguous()), r"in_features=124 must be a positive multiple of 8"),
    "K_mismatch": (lambda a: a.update(g_idx=torch.cat([a["g_idx"], a["g_idx"][:8]])), r"qweight has 16 rows but in_features=136"),
    "qweight_rows": (lambda a: a.update(qweight=a["qweight"][:15]), r"qweight has 15 rows"),
    "scales_N": (lambda a: a.update(scales=a["scales"][:, :39]), r"scales must be \[groups, 40\].*\[4, 39\]"),
    "scales_1d": (lambda a: a.update(scales=a["scales"][0]), r"scales must be \[groups, 40\]"),
    "scales_no_groups": (lambda a: a.update(scales=a["scales"][:0], qzeros=a["qzeros"][:0]), r"scales has no groups"),
    "qzeros_groups": (lambda a: a.update(qzeros=a["qzeros"][:3]), r"qzeros must be \[4, 5\].*\[3, 5\]"),
    "qzeros_words": (lambda a: a.update(qzeros=torch.zeros(4, 6, dtype=torch.int32)), r"qzeros must be \[4, 5\]"),
    "g_idx_too_big": (lambda a: a["g_idx"].__setitem__(17, 4), r"g_idx\[17\]=4 is out of range for 4 groups"),
    "g_idx_negative": (lambda a: a["g_idx"].__setitem__(0, -1), r"g_idx\[0\]=-1 is out of range"),
}


@pytest.mark.parametrize("name", list(BAD_WEIGHTS))
@pytest.mark.parametrize("op", ["gemm", "dequantize"])
def test_bad_weights_raise(name, op, good):
    mutate, message = BAD_WEIGHTS[name]
    mutate(good)
    with pytest.raises(OP_ERRORS, match=message):
        (_call if op == "gemm" else _deq)(good)


BAD_ACTIVATIONS = {
    "x_int": (lambda a: a.update(x=a["x"].to(torch.int32)), r"x must be float32, float16 or bfloat16.*Int"),
    "x_float64": (lambda a: a.update(x=a["x"].double()), r"x must be float32, float16 or bfloat16"),
    "x_last_dim": (lambda a: a.update(x=torch.randn(3, 127)), r"x's last dimension must be in_features=128"),
    "x_0d": (lambda a: a.update(x=torch.tensor(1.0)), r"x's last dimension must be in_features=128"),
    "bias_shape": (lambda a: a.update(bias=torch.randn(41)), r"bias must be \[40\]"),
    "bias_2d": (lambda a: a.update(bias=torch.randn(1, 40)), r"bias must be \[40\]"),
    "bias_int": (lambda a: a.update(bias=torch.zeros(40, dtype=torch.int32)), r"bias must be floating point"),
    "perm_length": (lambda a: a.update(perm=torch.randperm(127)), r"perm must be a 1-D int32/int64 tensor of length 128"),
    "perm_float": (lambda a: a.update(perm=torch.randperm(128).float()), r"perm must be a 1-D int32/int64 tensor"),
    "perm_2d": (lambda a: a.update(perm=torch.randperm(128).reshape(2, 64)), r"perm must be a 1-D"),
    "perm_too_big": (lambda a: a.update(perm=torch.arange(1, 129)), r"perm values must lie in \[0, 128\)"),
    "perm_negative": (lambda a: a.update(perm=torch.arange(-1, 127, dtype=torch.int32)), r"perm values must lie in \[0, 128\)"),
}


@pytest.mark.parametrize("name", list(BAD_ACTIVATIONS))
def test_bad_activations_raise(name, good):
    mutate, message = BAD_ACTIVATIONS[name]
    mutate(good)
    with pytest.raises(OP_ERRORS, match=message):
        _call(good)


def test_bad_input_through_python_wrapper(good):
    """slimformer.ops.gptq_gemm surfaces the same errors."""
    with pytest.raises(OP_ERRORS, match="x's last dimension"):
        gptq_gemm(torch.randn(2, 64), good["qweight"], good["qzeros"], good["scales"], good["g_idx"], 4, 1)
    with pytest.raises(OP_ERRORS, match="unsupported bits=5"):
        gptq_dequantize(good["qweight"], good["qzeros"], good["scales"], good["g_idx"], 5, 1)


# Devices: this machine has no second real device. A 'meta' tensor mixed with CPU tensors is the
# only way to reach the device checks here; the CUDA tests cover cuda-vs-cpu mixes.
@pytest.mark.parametrize("which", ["qzeros", "scales", "g_idx", "bias"])
def test_mixed_meta_device_raises(which, good):
    good[which] = good[which].to("meta")
    with pytest.raises(OP_ERRORS, match="device|meta"):
        _call(good)


def test_meta_x_with_cpu_weights_does_not_compute_on_cpu(good):
    """x on meta: whatever the op does, it must not hand back a CPU tensor."""
    good["x"] = good["x"].to("meta")
    try:
        y = _call(good)
    except OP_ERRORS as e:
        assert "device" in str(e) or "meta" in str(e)
    else:
        assert y.device.type == "meta"


def test_all_meta_inputs_give_shapes(good):
    """Every tensor on meta: the fake impls return the right shapes and dtypes without computing."""
    meta = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in good.items()}
    meta["x"] = torch.empty(2, 3, 128, device="meta", dtype=BF16)
    y = _call(meta)
    assert y.device.type == "meta" and y.shape == (2, 3, 40) and y.dtype == BF16
    w = _deq(meta)
    assert w.device.type == "meta" and w.shape == (128, 40) and w.dtype == good["scales"].dtype


def test_isa_switch_from_another_thread_is_safe(make_gptq, isa):
    """Each call reads the ISA once: toggling it concurrently never mixes two implementations."""
    import threading
    import time

    levels = [name for name, ok in [("scalar", True), ("avx2", _C.cpu_supports_avx2()),
                                    ("avx512vnni", _C.cpu_supports_avx512vnni())] if ok]
    if len(levels) < 2:
        pytest.skip("needs two CPU ISA levels")
    d = make_gptq(64, 64, 4, 64)
    x = torch.randn(1, 64)
    ref = None
    stop = threading.Event()

    def toggle():
        while not stop.is_set():
            for name in levels:
                _C.set_cpu_isa(name)

    thread = threading.Thread(target=toggle)
    thread.start()
    deadline = time.monotonic() + 1.0  # a bounded smoke test; before the fix this crashed in ~0.1 s
    try:
        while time.monotonic() < deadline:
            y = gptq_gemm(x, d.qweight, d.qzeros, d.scales, d.g_idx, 4, 1)
            ref = y if ref is None else ref
            assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    finally:
        stop.set()
        thread.join()
