"""torch.ops.slimformer.gptq_gemm / gptq_dequantize on CUDA against the fp64 ground truth and the CPU op.

Paths of the CUDA adapter (csrc/gptq/gptq_cuda_op.cpp): M <= 16 runs the fused small-batch kernel
(row tiles of 1/2/4/8, K split across blocks when N is small, scalar loads when N % 4 != 0 or qweight
is not 16-byte aligned); M > 16 dequantizes W into x's dtype and calls cuBLAS. All tests are marked
``cuda`` and skip without a GPU (scripts/gpu_check.sh runs them on the GPU machine). The index math
itself is tested on the CPU in test_gptq_cuda_math.py.
"""
from __future__ import annotations

import pytest
import torch

from slimformer import _C
from slimformer.gptq import gptq_linear_reference, pack_rows
from slimformer.nn import QuantLinear
from slimformer.ops import gptq_dequantize, gptq_gemm
from case_ids import gptq_case_id  # tests/case_ids.py

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not _C.has_cuda_kernels, reason="slimformer was built without CUDA kernels"),
]

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {F32: 1e-4, F16: 1e-2, BF16: 1e-2}
CUDA = "cuda"
OP_ERRORS = (ValueError, RuntimeError)


def _to(d, device=CUDA):
    """The checkpoint tensors of a make_gptq case on `device`."""
    return dict(qweight=d.qweight.to(device), qzeros=d.qzeros.to(device), scales=d.scales.to(device),
                g_idx=d.g_idx.to(device))


def _gemm(x, w, bits, off, bias=None, perm=None):
    return gptq_gemm(x, w["qweight"], w["qzeros"], w["scales"], w["g_idx"], bits, off, bias=bias, perm=perm)


# (bits, K, N, group_size, act_order, zero_offset, scale dtype): every bits value with group sizes
# 32/128/-1, K=576 g128 (last group of 64), act-order, v1/v2, N % 4 != 0 and N < 4 (scalar loads),
# small N with large K (split-K) and N over several 128-column blocks.
CASES = [
    (4, 576, 1536, 128, False, 1, F16),
    (4, 576, 100, 128, True, 0, F16),
    (4, 4096, 64, 32, False, 1, BF16),
    (4, 1024, 259, -1, False, 0, F32),
    (3, 576, 41, 128, False, 1, F16),
    (3, 256, 512, 32, True, 0, F16),
    (3, 4096, 6, -1, False, 1, BF16),
    (2, 576, 77, 128, True, 1, F16),
    (2, 2048, 200, 32, False, 0, F32),
    (2, 1024, 1, -1, False, 1, F16),
    (8, 576, 384, 128, False, 0, BF16),
    (8, 100, 131, 32, True, 1, F16),
    (8, 4096, 9, -1, False, 1, F32),
]


@pytest.mark.parametrize("xdt", [F16, BF16, F32])
@pytest.mark.parametrize("M", [1, 3, 16, 33, 130])
@pytest.mark.parametrize("c", CASES, ids=gptq_case_id)
def test_gemm_matches_fp64_and_cpu(c, M, xdt, make_gptq, helpers):
    bits, K, N, gs, act, off, sdt = c
    d = make_gptq(K, N, bits, gs, act_order=act, zero_offset=off, scale_dtype=sdt, bias_dtype=F16)
    x = torch.randn(M, K).to(xdt)
    y = _gemm(x.to(CUDA), _to(d), bits, off, bias=d.bias.to(CUDA))
    assert y.device.type == CUDA and y.dtype == xdt and y.shape == (M, N)
    ref = helpers.reference_gemm(x, d, bias=d.bias)
    err = helpers.rel_err(y.cpu(), ref)
    assert err <= TOL[xdt], f"relative error {err:.3g}"
    if xdt == F32:
        y_cpu = gptq_gemm(x, d.qweight, d.qzeros, d.scales, d.g_idx, bits, off, bias=d.bias)
        assert helpers.rel_err(y.cpu(), y_cpu) <= TOL[F32]


@pytest.mark.parametrize("M", list(range(1, 18)))
def test_gemm_every_small_batch_row_tile(M, make_gptq, helpers):
    """Every M of the fused kernel (row tiles 1/2/4/8, one or two of them) and the switch at 17."""
    d = make_gptq(576, 203, 4, 128, bias_dtype=F32)
    x = torch.randn(M, 576)
    y = _gemm(x.to(CUDA), _to(d), 4, 1, bias=d.bias.to(CUDA))
    assert helpers.rel_err(y.cpu(), helpers.reference_gemm(x, d, bias=d.bias)) <= TOL[F32]


@pytest.mark.parametrize("perm_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("M", [1, 5, 16, 33])
def test_gemm_perm_bias_and_leading_dims(perm_dtype, M, make_gptq, helpers):
    K, N, bits = 512, 96, 4
    d = make_gptq(K, N, bits, 64, act_order=True, bias_dtype=BF16)
    x = torch.randn(2, M, K, dtype=F16)
    perm = torch.randperm(K).to(perm_dtype)
    y = _gemm(x.to(CUDA), _to(d), bits, 1, bias=d.bias.to(CUDA), perm=perm.to(CUDA))
    assert y.shape == (2, M, N) and y.dtype == F16
    assert helpers.rel_err(y.cpu(), helpers.reference_gemm(x, d, perm=perm, bias=d.bias)) <= TOL[F16]


@pytest.mark.parametrize("M", [1, 7, 40])
def test_gemm_float64_bias(M, make_gptq, helpers):
    d = make_gptq(256, 70, 3, 32, bias_dtype=torch.float64)
    x = torch.randn(M, 256)
    y = _gemm(x.to(CUDA), _to(d), 3, 1, bias=d.bias.to(CUDA))
    assert helpers.rel_err(y.cpu(), helpers.reference_gemm(x, d, bias=d.bias)) <= TOL[F32]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("M", [1, 4, 33])
def test_quant_linear_act_order(bits, M, helpers):
    """QuantLinear.from_linear with an act-order g_idx (sorted copy + perm) on CUDA vs the fp64 reference."""
    K, N, gs = 576, 136, 128
    lin = torch.nn.Linear(K, N)
    g_idx = torch.empty(K, dtype=torch.int32)
    g_idx[torch.randperm(K)] = (torch.arange(K) // gs).to(torch.int32)
    q = QuantLinear.from_linear(lin, bits, gs, g_idx=g_idx).to(CUDA)
    x = torch.randn(3, M, K, dtype=F16)
    y = q(x.to(CUDA))
    ref = gptq_linear_reference(x, q.qweight.cpu(), q.qzeros.cpu(), q.scales.cpu(), q.g_idx.cpu(), q.bias.cpu(),
                                bits, q.zero_offset)
    assert helpers.rel_err(y.cpu(), ref) <= TOL[F16]


def test_gemm_unaligned_qweight_uses_scalar_loads(make_gptq, helpers):
    """N % 4 == 0 but qweight starts 4 bytes into its storage: no 128-bit loads there."""
    d = make_gptq(256, 64, 4, 64)
    flat = torch.zeros(d.qweight.numel() + 1, dtype=torch.int32, device=CUDA)
    qw = flat[1:].view(d.qweight.shape)
    qw.copy_(d.qweight)
    assert qw.is_contiguous() and qw.data_ptr() % 16 != 0
    w = _to(d)
    w["qweight"] = qw
    x = torch.randn(2, 256)
    assert helpers.rel_err(_gemm(x.to(CUDA), w, 4, 1).cpu(), helpers.reference_gemm(x, d)) <= TOL[F32]


def test_gemm_matches_host_replay(make_gptq, helpers):
    """The GPU agrees with the host replay of the same kernel (test_gptq_cuda_math.py) to fp32 rounding."""
    d = make_gptq(2048, 45, 4, 128, act_order=True, bias_dtype=F32)
    x = torch.randn(5, 2048)
    y = _gemm(x.to(CUDA), _to(d), 4, 1, bias=d.bias.to(CUDA)).cpu()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    replay = _C._test_cuda_emulate_gemv(d.qweight.numpy(), d.qzeros.numpy(), d.scales.view(torch.int16).numpy(), 1,
                                        d.g_idx.numpy(), x.numpy(), None, d.bias.numpy(), 0, 4, 1, sms)
    assert helpers.rel_err(y, torch.from_numpy(replay)) <= 1e-6


def test_gemm_on_current_stream_and_device_guard(make_gptq, helpers):
    d = make_gptq(1024, 300, 4, 128)
    x = torch.randn(3, 1024)
    w = _to(d)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        xs = x.to(CUDA, non_blocking=True)
        y1 = _gemm(xs, w, 4, 1)
        y2 = _gemm(torch.cat([xs] * 20), w, 4, 1)
    stream.synchronize()
    ref = helpers.reference_gemm(x, d)
    assert helpers.rel_err(y1.cpu(), ref) <= TOL[F32]
    assert helpers.rel_err(y2.cpu()[:3], ref) <= TOL[F32]


def test_gemm_degenerate_shapes(make_gptq):
    d = make_gptq(64, 24, 4, 32)
    for lead in [(0,), (2, 0)]:
        y = _gemm(torch.randn(*lead, 64, device=CUDA), _to(d), 4, 1)
        assert y.shape == (*lead, 24)


def test_out_of_range_indices_are_clamped_not_faulting(make_gptq, helpers):
    """The CUDA op does not sync to validate g_idx / perm; bad values read the nearest valid entry."""
    d = make_gptq(128, 21, 4, 32)
    bad_g = d.g_idx.clone()
    bad_g[:5], bad_g[-3:] = -7, 1000
    bad_perm = torch.randperm(128)
    bad_perm[3], bad_perm[9] = -2, 500
    w = _to(d)
    w["g_idx"] = bad_g.to(CUDA)
    for M in (2, 40):
        x = torch.randn(M, 128)
        y = _gemm(x.to(CUDA), w, 4, 1, perm=bad_perm.to(CUDA))
        g = bad_g.clamp(0, d.G - 1).long()
        W = d.scales.double()[g] * (d.q.double() - (d.zstored.double() + 1)[g])
        assert helpers.rel_err(y.cpu(), x.double()[:, bad_perm.clamp(0, 127)] @ W) <= TOL[F32]
    gptq_dequantize(w["qweight"], w["qzeros"], w["scales"], w["g_idx"], 4, 1)
    torch.cuda.synchronize()


@pytest.mark.parametrize("c", CASES, ids=gptq_case_id)
def test_dequantize_bit_identical_to_cpu(c, make_gptq):
    bits, K, N, gs, act, off, sdt = c
    d = make_gptq(K, N, bits, gs, act_order=act, zero_offset=off, scale_dtype=sdt)
    w = _to(d)
    W = gptq_dequantize(w["qweight"], w["qzeros"], w["scales"], w["g_idx"], bits, off)
    assert W.device.type == CUDA and W.dtype == sdt and W.shape == (K, N)
    # Both round the exact fp32 s * (q - z) once to scales' dtype.
    assert torch.equal(W.cpu(), gptq_dequantize(d.qweight, d.qzeros, d.scales, d.g_idx, bits, off))


def test_opcheck(make_gptq):
    d = make_gptq(128, 40, 4, 32, bias_dtype=F16)
    w = _to(d)
    args = [(torch.randn(3, 128, dtype=F16, device=CUDA), w["qweight"], w["qzeros"], w["scales"], w["g_idx"], None,
             None, 4, 1),
            (torch.randn(2, 20, 128, device=CUDA), w["qweight"], w["qzeros"], w["scales"], w["g_idx"],
             torch.randperm(128, device=CUDA), d.bias.to(CUDA), 4, 1)]
    for a in args:
        torch.library.opcheck(torch.ops.slimformer.gptq_gemm.default, a)
    torch.library.opcheck(torch.ops.slimformer.gptq_dequantize.default,
                          (w["qweight"], w["qzeros"], w["scales"], w["g_idx"], 4, 1))


# -- bad input --------------------------------------------------------------------------------

@pytest.fixture
def good(make_gptq):
    d = make_gptq(128, 40, 4, 32, bias_dtype=F32)
    return dict(x=torch.randn(3, 128, device=CUDA), perm=None, bias=d.bias.to(CUDA), bits=4, zero_offset=1, **_to(d))


def _call(a):
    return torch.ops.slimformer.gptq_gemm(a["x"], a["qweight"], a["qzeros"], a["scales"], a["g_idx"], a["perm"],
                                          a["bias"], a["bits"], a["zero_offset"])


BAD = {
    "bits5": (lambda a: a.update(bits=5), r"unsupported bits=5"),
    "zero_offset2": (lambda a: a.update(zero_offset=2), r"zero_offset must be 1"),
    "qweight_float": (lambda a: a.update(qweight=a["qweight"].float()), r"qweight must be int32"),
    "g_idx_int64": (lambda a: a.update(g_idx=a["g_idx"].long()), r"g_idx must be int32"),
    "scales_N": (lambda a: a.update(scales=a["scales"][:, :39]), r"scales must be \[groups, 40\]"),
    "qzeros_groups": (lambda a: a.update(qzeros=a["qzeros"][:3]), r"qzeros must be \[4, 5\]"),
    "x_last_dim": (lambda a: a.update(x=torch.randn(3, 127, device=CUDA)), r"x's last dimension must be in_features=128"),
    "x_float64": (lambda a: a.update(x=a["x"].double()), r"x must be float32, float16 or bfloat16"),
    "bias_shape": (lambda a: a.update(bias=torch.randn(41, device=CUDA)), r"bias must be \[40\]"),
    "perm_length": (lambda a: a.update(perm=torch.randperm(127, device=CUDA)), r"perm must be a 1-D int32/int64"),
    "x_on_cpu": (lambda a: a.update(x=a["x"].cpu()), r"x is on cpu but the weights are on cuda"),
    "scales_on_cpu": (lambda a: a.update(scales=a["scales"].cpu()), r"one device"),
    "bias_on_cpu": (lambda a: a.update(bias=a["bias"].cpu()), r"bias is on cpu"),
    "perm_on_cpu": (lambda a: a.update(perm=torch.randperm(128)), r"perm is on cpu"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises(name, good):
    mutate, message = BAD[name]
    mutate(good)
    with pytest.raises(OP_ERRORS, match=message):
        _call(good)
    torch.cuda.synchronize()  # nothing was launched with bad arguments
