"""Gradients through the GPTQ ops: dx = dy @ W^T (through perm), dbias; weights are constants.
gptq_gemm_a8 uses the straight-through estimator (same gradient as the exact op)."""
from __future__ import annotations

import pytest
import torch

from slimformer.nn import QuantLinear
from slimformer.ops import gptq_gemm, gptq_gemm_a8


@pytest.mark.parametrize("op", [gptq_gemm, gptq_gemm_a8], ids=["exact", "a8"])
@pytest.mark.parametrize("act_order", [False, True])
def test_input_and_bias_gradients(op, act_order, make_gptq, helpers):
    d = make_gptq(192, 40, 4, 64, act_order=act_order, bias_dtype=torch.float32)
    perm = torch.randperm(192) if act_order else None
    x = torch.randn(2, 3, 192, requires_grad=True)
    bias = d.bias.clone().requires_grad_(True)
    y = op(x, d.qweight, d.qzeros, d.scales, d.g_idx, 4, 1, bias, perm=perm)
    dy = torch.randn_like(y)
    y.backward(dy)
    dx_perm = dy.double() @ d.W.t()
    expected = dx_perm if perm is None else torch.zeros_like(dx_perm).index_add_(-1, perm, dx_perm)
    assert helpers.rel_err(x.grad, expected) <= 1e-5
    assert helpers.rel_err(bias.grad, dy.double().sum((0, 1))) <= 1e-6


def test_quant_linear_backward_reaches_earlier_layers():
    lin = torch.nn.Linear(64, 32)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), QuantLinear.from_linear(lin, 4, 32))
    model(torch.randn(5, 16)).sum().backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


def test_opcheck_with_gradients(make_gptq):
    d = make_gptq(128, 24, 4, 32, bias_dtype=torch.float32)
    for op in (torch.ops.slimformer.gptq_gemm.default, torch.ops.slimformer.gptq_gemm_a8.default):
        args = (torch.randn(3, 128, requires_grad=True), d.qweight, d.qzeros, d.scales, d.g_idx, None,
                d.bias.clone().requires_grad_(True), 4, 1)
        torch.library.opcheck(op, args)
