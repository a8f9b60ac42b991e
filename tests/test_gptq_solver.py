"""The one-layer GPTQ solver: agrees with RTN when inputs are uncorrelated, beats it on the
layer-output error when they are correlated, and its grid packs into the checkpoint format."""
from __future__ import annotations

import pytest
import torch

from slimformer.gptq import gptq_linear_reference, pack_cols, pack_rows
from slimformer.gptq.solver import quantize_layer, round_to_nearest


def correlated_inputs(n: int, in_f: int) -> torch.Tensor:
    """Calibration inputs with strongly correlated features and a few large-magnitude ones."""
    z = torch.randn(n, in_f)
    x = z @ (torch.eye(in_f) + 0.5 * torch.randn(in_f, in_f) / in_f**0.5)
    x[:, :4] *= 8
    return x


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.t() @ x / x.shape[0]


def output_error(weight: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    d = weight - w_hat
    return float(torch.trace(d @ h @ d.t()))


def test_identity_hessian_gives_round_to_nearest():
    w = torch.randn(24, 96)
    grid, _ = quantize_layer(w, torch.eye(96), bits=4, group_size=32, sym=True)
    rtn = round_to_nearest(w, bits=4, group_size=32, sym=True)
    assert torch.equal(grid.q, rtn.q)
    assert torch.allclose(grid.scales, rtn.scales) and torch.equal(grid.zeros, rtn.zeros)


@pytest.mark.parametrize("bits,group_size,sym,act_order,static", [
    (4, 32, True, False, False),
    (4, -1, False, True, False),
    (3, 32, True, True, False),
    (3, 32, False, True, True),
    (2, 16, False, False, False),
])
def test_beats_round_to_nearest_on_the_layer_output(bits, group_size, sym, act_order, static):
    w = torch.randn(48, 128)
    h = hessian(correlated_inputs(512, 128))
    grid, loss = quantize_layer(w, h, bits, group_size, sym=sym, act_order=act_order, static_groups=static)
    rtn = round_to_nearest(w, bits, group_size, sym=sym)
    err_gptq, err_rtn = output_error(w, grid.dequantize(), h), output_error(w, rtn.dequantize(), h)
    assert err_gptq < 0.9 * err_rtn, (err_gptq, err_rtn)
    assert loss > 0
    maxq = (1 << bits) - 1
    assert int(grid.q.min()) >= 0 and int(grid.q.max()) <= maxq


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("zero_offset", [1, 0])
def test_grid_packs_into_the_checkpoint_format(act_order, zero_offset):
    w = torch.randn(40, 96)
    grid, _ = quantize_layer(w, hessian(correlated_inputs(256, 96)), bits=4, group_size=32, sym=True, act_order=act_order)
    counts = torch.bincount(grid.g_idx.long())
    assert torch.equal(counts, torch.full((3,), 32))
    assert act_order == bool((grid.g_idx[1:] < grid.g_idx[:-1]).any())
    qweight, qzeros = pack_rows(grid.q, 4), pack_cols(grid.zeros - zero_offset, 4)
    x = torch.randn(5, 96)
    y = gptq_linear_reference(x, qweight, qzeros, grid.scales, grid.g_idx, None, 4, zero_offset)
    torch.testing.assert_close(y, x.double() @ grid.dequantize().double().t(), rtol=1e-6, atol=1e-6)


def test_dead_inputs_are_zeroed():
    w = torch.randn(8, 64)
    x = correlated_inputs(128, 64)
    x[:, 5] = 0
    grid, _ = quantize_layer(w, hessian(x), bits=8, group_size=-1)
    assert torch.allclose(grid.dequantize()[:, 5], torch.zeros(8), atol=float(grid.scales.max()))


def test_bad_hessian_raises_clearly():
    with pytest.raises(ValueError, match="not positive definite"):
        quantize_layer(torch.randn(4, 16), -torch.eye(16), bits=4, group_size=-1)
    with pytest.raises(ValueError, match="hessian must be"):
        quantize_layer(torch.randn(4, 16), torch.eye(8), bits=4)
