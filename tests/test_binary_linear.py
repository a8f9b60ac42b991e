"""slimformer.nn.BinaryLinear: W1A-fp and W1A1 against the fp64 references, construction from
nn.Linear / GPT-2 Conv1D, casting, state_dict, autograd of binary_gemm, bad input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from slimformer.binary import binarize_weight, unpack_signs
from slimformer.binary.reference import binary_linear_a1_reference, binary_linear_reference
from slimformer.nn import BinaryLinear

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _linear(k: int, n: int, bias: bool, dtype=torch.float32) -> nn.Linear:
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_()
        if bias:
            lin.bias.normal_()
    return lin.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m,k,n", [(1, 50, 5), (3, 64, 16), (17, 100, 33), (33, 37, 130)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_fp_activations_match_reference(dtype, m, k, n, bias):
    lin = _linear(k, n, bias, dtype)
    mod = BinaryLinear.from_linear(lin)
    x = torch.randn(m, k).to(dtype)
    y = mod(x)
    assert y.dtype == dtype and y.shape == (m, n)
    ref = binary_linear_reference(x, mod.qweight, mod.alpha, mod.bias, k)
    assert rel_err(y, ref) < TOL[dtype]
    # the packed module is BWN of the linear layer: alpha * sign(W - mean_row W)
    positive, alpha = binarize_weight(lin.weight)
    torch.testing.assert_close(mod.dequantized_weight(), torch.where(positive, alpha[:, None], -alpha[:, None]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m,k,n", [(1, 50, 5), (3, 64, 16), (17, 100, 33)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_binary_activations_match_reference(dtype, m, k, n, bias):
    lin = _linear(k, n, bias, dtype)
    mod = BinaryLinear.from_linear(lin, activations="binary", act_scale=0.7, act_shift=-0.1)
    x = torch.randn(2, m, k).to(dtype)
    y = mod(x)
    assert y.dtype == dtype and y.shape == (2, m, n)
    ref = binary_linear_a1_reference(x, mod.qweight, mod.alpha, mod.bias, mod.act_scale, mod.act_shift, k)
    assert rel_err(y, ref) < TOL[dtype]


def test_binary_activations_equal_fp_on_binarized_input():
    lin = _linear(70, 24, True)
    a, b = 0.8, 0.25
    w1a1 = BinaryLinear.from_linear(lin, activations="binary", act_scale=a, act_shift=b)
    w1 = BinaryLinear.from_linear(lin)
    x = torch.randn(5, 70)
    x[0, :10] = b  # sign(0) = +1 at the threshold
    xb = torch.where(x >= b, a + b, b - a)
    assert rel_err(w1a1(x), w1(xb)) < 1e-5


def test_from_conv1d_matches_linear():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(24, 40)  # weight [in=40, out=24]
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    lin = nn.Linear(40, 24)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    a, b = BinaryLinear.from_linear(conv), BinaryLinear.from_linear(lin)
    assert (a.in_features, a.out_features) == (40, 24)
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.alpha, b.alpha)
    x = torch.randn(3, 40)
    torch.testing.assert_close(a(x), b(x))


def test_cast_keeps_scales_fp32_and_state_dict_round_trip():
    lin = _linear(48, 20, True)
    mod = BinaryLinear.from_linear(lin, activations="binary", act_scale=0.5, act_shift=0.1)
    mod.to(torch.bfloat16)
    assert mod.alpha.dtype == mod.act_scale.dtype == mod.act_shift.dtype == torch.float32
    assert mod.bias.dtype == torch.bfloat16 and mod.qweight.dtype == torch.int32
    sd = mod.state_dict()
    assert set(sd) == {"qweight", "alpha", "bias", "act_scale", "act_shift"}
    fresh = BinaryLinear(48, 20, bias=True, activations="binary", dtype=torch.bfloat16)
    fresh.load_state_dict(sd)
    x = torch.randn(4, 48, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), mod(x))
    r = repr(mod)
    assert "in_features=48" in r and "activations='binary'" in r and "act_scale=0.5" in r


def test_fp_gradient_wrt_input_and_bias():
    lin = _linear(45, 19, True)
    mod = BinaryLinear.from_linear(lin)
    w = mod.dequantized_weight()
    x = torch.randn(2, 3, 45, requires_grad=True)
    bias = mod.bias.clone().requires_grad_(True)
    mod.bias = bias
    g = torch.randn(2, 3, 19)
    (mod(x) * g).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    b2 = bias.detach().clone().requires_grad_(True)
    ((x2 @ w.t() + b2) * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, b2.grad, rtol=1e-5, atol=1e-5)


def test_binary_gemm_opcheck():
    from slimformer.binary import pack_signs

    s = torch.rand(21, 70) > 0.5
    args = (torch.randn(3, 70), pack_signs(s), torch.rand(21) + 0.1, torch.randn(21), 70)
    torch.library.opcheck(torch.ops.slimformer.binary_gemm.default, args)
    assert torch.equal(unpack_signs(args[1], 21, 70) > 0, s)


def test_binary_activations_backward_raises():
    mod = BinaryLinear.from_linear(_linear(32, 8, True), activations="binary", act_scale=1.0)
    x = torch.randn(2, 32, requires_grad=True)
    with pytest.raises(RuntimeError, match="no gradient"):
        mod(x).sum().backward()


def test_bad_arguments():
    lin = _linear(32, 8, True)
    with pytest.raises(ValueError, match="activations must be one of"):
        BinaryLinear.from_linear(lin, activations="ternary")
    with pytest.raises(ValueError, match="needs act_scale"):
        BinaryLinear.from_linear(lin, activations="binary")
    with pytest.raises(ValueError, match="only apply to activations='binary'"):
        BinaryLinear.from_linear(lin, act_scale=1.0)
    with pytest.raises(ValueError, match="act_scale must be finite and > 0"):
        BinaryLinear.from_linear(lin, activations="binary", act_scale=0.0)
    with pytest.raises(ValueError, match="must be scalars"):
        BinaryLinear.from_linear(lin, activations="binary", act_scale=torch.ones(2))
    with pytest.raises(TypeError, match="expected torch.nn.Linear"):
        BinaryLinear.from_linear(nn.Conv2d(3, 4, 1))
    with pytest.raises(ValueError, match="must be positive"):
        BinaryLinear(0, 4)
    mod = BinaryLinear.from_linear(lin)
    with pytest.raises(ValueError, match=r"expects x \(\.\.\., 32\)"):
        mod(torch.randn(2, 31))
