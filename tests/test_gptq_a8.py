"""gptq_gemm_a8: GPTQ matmul with activations quantized on the fly to int8 (CPU).

The op's meaning is gptq_linear_a8_reference (x quantized per row and per block of 32 inputs split
at group changes, then an exact fp64 matmul); every ISA must match it to fp32 rounding, and it must
stay close to the exact op."""
from __future__ import annotations

import pytest
import torch

from slimformer import _C
from slimformer.gptq import gptq_linear_a8_reference, quantize_activations_a8
from slimformer.nn import QuantLinear
from slimformer.ops import gptq_gemm, gptq_gemm_a8

ISAS = ["scalar", "avx2", "avxvnni", "avx512vnni"]
SUPPORTED = {"scalar": lambda: True, "avx2": _C.cpu_supports_avx2, "avxvnni": _C.cpu_supports_avxvnni,
             "avx512vnni": _C.cpu_supports_avx512vnni}

CASES = [  # K, N, bits, group_size, M, act_order, zero_offset
    (576, 1536, 4, 128, 1, False, 1),   # SmolLM2: last group of 64
    (576, 200, 4, 128, 7, True, 0),
    (256, 96, 2, 32, 3, False, 1),
    (384, 43, 2, 100, 5, False, 0),     # group not a multiple of 32, N tail
    (256, 64, 8, 64, 2, False, 1),      # 8-bit: VNNI kernel, float fallback on plain AVX2
    (160, 40, 8, -1, 9, True, 1),
    (288, 77, 3, 32, 4, False, 1),      # 3-bit: same rule through the float kernel
    (4160, 24, 4, -1, 16, False, 1),
    (1024, 130, 4, 128, 33, True, 1),
    (512, 1000, 4, 128, 12, False, 1),  # 512-bit kernel: 8-row pass + 4-row pass, 8-column tail
]


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("K,N,bits,gs,M,act_order,zo", CASES)
def test_matches_reference(isa, make_gptq, helpers, K, N, bits, gs, M, act_order, zo):
    d = make_gptq(K, N, bits, gs, act_order=act_order, zero_offset=zo, bias_dtype=torch.float16)
    x = torch.randn(M, K)
    perm = torch.randperm(K).to(torch.int32) if act_order else None
    y = gptq_gemm_a8(x, d.qweight, d.qzeros, d.scales, d.g_idx, bits, zo, d.bias, perm=perm)
    ref = gptq_linear_a8_reference(x, d.qweight, d.qzeros, d.scales, d.g_idx, d.bias, bits, zo, perm=perm)
    assert helpers.rel_err(y, ref) <= 1e-5
    # ... and close to the exact op: int8 activations cost well under 2% here.
    exact = helpers.reference_gemm(x, d, perm=perm, bias=d.bias)
    assert helpers.rel_err(y, exact) <= 2e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_and_leading_dims(make_gptq, helpers, dtype):
    d = make_gptq(512, 72, 4, 128)
    x = torch.randn(2, 3, 512).to(dtype)
    y = gptq_gemm_a8(x, d.qweight, d.qzeros, d.scales, d.g_idx, 4, 1)
    assert y.dtype == dtype and y.shape == (2, 3, 72)
    ref = gptq_linear_a8_reference(x.float(), d.qweight, d.qzeros, d.scales, d.g_idx, None, 4, 1)
    assert helpers.rel_err(y, ref) <= 1e-2


def test_isas_agree(make_gptq, helpers, isa):
    d = make_gptq(1024, 300, 4, 128, act_order=True)
    x = torch.randn(6, 1024)
    outs = {}
    for name in ISAS:
        if not SUPPORTED[name]():
            continue
        isa(name)
        outs[name] = gptq_gemm_a8(x, d.qweight, d.qzeros, d.scales, d.g_idx, 4, 1)
    for name, y in outs.items():
        assert helpers.rel_err(y, outs["scalar"]) <= 1e-6, name


def test_quantization_rule_by_hand():
    # One block of 32 split by a group change at k=20, then a block of 8: three scales.
    g_idx = torch.tensor([0] * 20 + [1] * 20, dtype=torch.int32)
    x = torch.zeros(1, 40)
    x[0, 3], x[0, 5] = 2.0, -0.5        # block [0, 20): amax 2
    x[0, 25], x[0, 30] = 0.1, 0.0501    # block [20, 32): amax 0.1
    x[0, 35] = -4.0                      # block [32, 40): amax 4
    x_hat = quantize_activations_a8(x, g_idx)[0]
    assert x_hat[3] == pytest.approx(2.0) and x_hat[35] == pytest.approx(-4.0)
    assert x_hat[5] == pytest.approx(2.0 / 127 * round(-0.5 * 127 / 2.0))
    assert x_hat[30] == pytest.approx(0.1 / 127 * round(0.0501 * 127 / 0.1))
    assert torch.count_nonzero(x_hat) == 5


def test_zero_rows_and_empty_batch(make_gptq):
    d = make_gptq(256, 32, 4, 64)
    y = gptq_gemm_a8(torch.zeros(3, 256), d.qweight, d.qzeros, d.scales, d.g_idx, 4, 1)
    assert torch.equal(y, torch.zeros(3, 32))
    assert gptq_gemm_a8(torch.zeros(0, 256), d.qweight, d.qzeros, d.scales, d.g_idx, 4, 1).shape == (0, 32)


def test_opcheck(make_gptq):
    d = make_gptq(256, 40, 4, 64, bias_dtype=torch.float32)
    args = (torch.randn(3, 256), d.qweight, d.qzeros, d.scales, d.g_idx, None, d.bias, 4, 1)
    torch.library.opcheck(torch.ops.slimformer.gptq_gemm_a8.default, args)


def test_bad_input_errors(make_gptq):
    d = make_gptq(256, 40, 4, 64)
    with pytest.raises(ValueError, match="unsupported bits=5"):
        gptq_gemm_a8(torch.randn(1, 256), d.qweight, d.qzeros, d.scales, d.g_idx, 5, 1)
    with pytest.raises(ValueError, match="last dimension"):
        gptq_gemm_a8(torch.randn(1, 255), d.qweight, d.qzeros, d.scales, d.g_idx, 4, 1)


def test_quant_linear_flag(helpers):
    lin = torch.nn.Linear(576, 100)
    q = QuantLinear.from_linear(lin, 4, 128)
    x = torch.randn(4, 576)
    exact = q(x)
    q.int8_activations = True
    assert "int8_activations=True" in q.extra_repr()
    y = q(x)
    ref = gptq_linear_a8_reference(x, q.qweight, q.qzeros, q.scales, q.g_idx, q.bias, 4, q.zero_offset)
    assert helpers.rel_err(y, ref) <= 1e-5
    assert 0 < helpers.rel_err(y, exact) <= 2e-2
    compiled = torch.compile(q, fullgraph=True)
    assert helpers.rel_err(compiled(x), y) <= 1e-6
    assert torch.equal(gptq_gemm(x, q.qweight, q.qzeros, q.scales, q.g_idx, 4, q.zero_offset, q.bias), exact)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_non_finite_and_tiny_blocks_follow_the_rule(isa, make_gptq):
    d = make_gptq(128, 48, 4, 64)
    x = torch.randn(4, 128)
    x[0, 5] = float("nan")       # block [0, 32) of row 0 is poisoned
    x[1, 40] = float("inf")      # block [32, 64) of row 1
    x[2, 64:96] = 1e-38          # 127 / amax overflows: the block counts as zero
    y = gptq_gemm_a8(x, d.qweight, d.qzeros, d.scales, d.g_idx, 4, 1)
    ref = gptq_linear_a8_reference(x, d.qweight, d.qzeros, d.scales, d.g_idx, None, 4, 1)
    assert torch.isnan(y[0]).all() and torch.isnan(y[1]).all()
    assert torch.isnan(ref[0]).all() and torch.isnan(ref[1]).all()
    assert torch.isfinite(y[2:]).all()
    torch.testing.assert_close(y[2:].double(), ref[2:], rtol=1e-5, atol=1e-5)
    x_hat = quantize_activations_a8(x, d.g_idx)
    assert torch.equal(x_hat[2, 64:96], torch.zeros(32, dtype=torch.float64))
