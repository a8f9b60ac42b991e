"""The one-layer GPTQ solver: agrees with RTN when inputs are uncorrelated, beats it on the
layer-output error when they are correlated, and its grid packs into the checkpoint format."""
from __future__ import annotations

import pytest
import torch

from slimformer.gptq import gptq_linear_reference, pack_cols, pack_rows
from slimformer.gptq import solver
from slimformer.gptq.solver import _inverse_cholesky, _solve_block_reference, quantize_layer, round_to_nearest
from slimformer.ops.gptq import gptq_solve_block


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


def test_damping_is_raised_with_a_warning_when_cholesky_fails():
    h = torch.eye(16)
    h[3, 3] = -0.05  # damping 0.01 * mean(diag) leaves it indefinite, 0.1 does not
    with pytest.warns(RuntimeWarning, match="used 0.1"):
        grid, _ = quantize_layer(torch.randn(4, 16), h, bits=4, group_size=-1)
    assert grid.q.shape == (16, 4)


def test_inverse_cholesky_matches_the_reference_construction():
    x = correlated_inputs(400, 70)
    h = hessian(x)
    damped = h + 0.01 * torch.diag(h).mean() * torch.eye(70)
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    got = _inverse_cholesky(h, 0.01, 0)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert torch.equal(got, got.triu())


def _block_case(rows: int, B: int, bits: int):
    h = hessian(correlated_inputs(4 * B + 8, B)) + 0.1 * torch.eye(B)
    hinv = _inverse_cholesky(h, 0.01, 0)
    w = torch.randn(rows, B)
    scale = (torch.rand(rows, B) + 0.5) * 4 / (1 << bits)
    zero = torch.randint(0, 1 << bits, (rows, B)).to(torch.float32)
    return w, hinv, scale, zero


@pytest.mark.parametrize("rows,B", [(1, 1), (37, 5), (300, 128), (1536, 77)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_solve_block_op_matches_the_reference(rows, B, bits):
    w, hinv, scale, zero = _block_case(rows, B, bits)
    want = _solve_block_reference(w, hinv, scale, zero, bits)
    got = gptq_solve_block(w, hinv, scale, zero, bits)
    mismatched = float((got[0] != want[0]).float().mean())
    assert mismatched <= 1e-3, mismatched  # a rounding tie may break the other way; nothing more
    if mismatched == 0:
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=1e-6)


def test_solve_block_op_leaves_its_inputs_alone_and_passes_opcheck():
    w, hinv, scale, zero = _block_case(20, 16, 4)
    before = [t.clone() for t in (w, hinv, scale, zero)]
    gptq_solve_block(w, hinv, scale, zero, 4)
    assert all(torch.equal(a, b) for a, b in zip(before, (w, hinv, scale, zero)))
    torch.library.opcheck(torch.ops.slimformer.gptq_solve_block.default, (w, hinv, scale, zero, 4))


@pytest.mark.parametrize("act_order,static,group_size", [(False, False, 32), (True, False, 48), (True, True, 32),
                                                          (False, False, -1)])
def test_quantize_layer_with_the_op_equals_the_reference_loop(monkeypatch, act_order, static, group_size):
    w = torch.randn(50, 160)  # 160 columns: two blocks of 128 and 32, groups starting mid-block
    h = hessian(correlated_inputs(600, 160))
    got, loss = quantize_layer(w, h, 3, group_size, act_order=act_order, static_groups=static)
    monkeypatch.setattr(solver.ops, "gptq_solve_block", solver._solve_block_reference)
    want, want_loss = quantize_layer(w, h, 3, group_size, act_order=act_order, static_groups=static)
    assert float((got.q != want.q).float().mean()) <= 1e-3
    assert torch.equal(got.g_idx, want.g_idx)
    torch.testing.assert_close(got.scales, want.scales, rtol=1e-3, atol=1e-6)
    assert loss == pytest.approx(want_loss, rel=1e-3)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: (a[0].double(),) + a[1:], "float32"),
    (lambda a: (a[0], a[1][:-1]) + a[2:], "hinv must be"),
    (lambda a: a[:2] + (a[2][:, :-1],) + a[3:], "scale and zero"),
    (lambda a: a[:4] + (5,), "unsupported bits=5"),
])
def test_solve_block_op_rejects_bad_input(mutate, match):
    w, hinv, scale, zero = _block_case(6, 8, 4)
    with pytest.raises(ValueError, match=match):
        gptq_solve_block(*mutate((w, hinv, scale, zero, 4)))


@pytest.mark.parametrize("sym", [True, False])
def test_clipping_search_lowers_the_weight_error(sym):
    w = torch.randn(64, 96)
    w[:, 7] *= 8  # an outlier column: min/max wastes most of the grid on it
    plain = round_to_nearest(w, 3, 32, sym=sym, min_zero=1)
    searched = round_to_nearest(w, 3, 32, sym=sym, min_zero=1, mse=2.4)
    err = lambda g: float(((g.dequantize() - w).abs() ** 2.4).sum())  # noqa: E731
    assert err(searched) < 0.97 * err(plain)
    assert int(searched.zeros.min()) >= 1  # still storable in format "gptq"
    grid, _ = quantize_layer(w, hessian(correlated_inputs(256, 96)), 3, 32, sym=sym, mse=2.4)
    assert torch.isfinite(grid.dequantize()).all()
