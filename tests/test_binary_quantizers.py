"""Training-time binarizers: forwards are exactly the hard quantizers, backwards are the gradients of
the documented surrogates (autograd vs central finite differences of slimformer.binary.surrogate,
at points away from kinks), lazy initialisation, freezing, BinaryTrainLinear."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from slimformer.binary import BinaryTrainLinear, ElasticBinarizer, WeightBinarizer, surrogate
from slimformer.nn import BinaryLinear

EPS = 1e-6


def _away_from_kinks(x: torch.Tensor, kinks: list[float], margin: float = 0.05) -> torch.Tensor:
    """Nudge the entries of x that lie within margin of a kink."""
    for k in kinks:
        near = (x - k).abs() < margin
        x = torch.where(near, x + 2 * margin * torch.where(x >= k, 1.0, -1.0).to(x.dtype), x)
    return x


def _check_elastic_gradients(q: ElasticBinarizer, x: torch.Tensor) -> None:
    """dL/dx, dL/dscale (, dL/dshift) of L = sum(w * q(x)) against finite differences of the surrogate."""
    w = torch.randn_like(x)
    xg = x.clone().requires_grad_(True)
    out = q(xg)
    (w * out).sum().backward()
    f = surrogate(q)
    x0 = x.double()
    a0 = q.scale.detach().double()
    b0 = q.shift.detach().double() if q.shift is not None else torch.zeros((), dtype=torch.float64)
    # the surrogate at its anchor is the forward
    torch.testing.assert_close(f(x0, a0, b0, x0, a0, b0).float(), out.detach(), rtol=1e-6, atol=1e-6)
    # x: the surrogate is elementwise, so one perturbation of all entries gives every partial derivative
    fd_x = (f(x0 + EPS, a0, b0, x0, a0, b0) - f(x0 - EPS, a0, b0, x0, a0, b0)) / (2 * EPS)
    torch.testing.assert_close(xg.grad.double(), w.double() * fd_x, rtol=1e-4, atol=1e-5)
    fd_a = ((w.double() * (f(x0, a0 + EPS, b0, x0, a0, b0) - f(x0, a0 - EPS, b0, x0, a0, b0))).sum() / (2 * EPS))
    torch.testing.assert_close(q.scale.grad.double(), fd_a, rtol=1e-4, atol=1e-4)
    if q.shift is not None:
        fd_b = ((w.double() * (f(x0, a0, b0 + EPS, x0, a0, b0) - f(x0, a0, b0 - EPS, x0, a0, b0))).sum() / (2 * EPS))
        torch.testing.assert_close(q.shift.grad.double(), fd_b, rtol=1e-4, atol=1e-4)


def test_signed_forward_is_exact_and_initialises_from_first_batch():
    q = ElasticBinarizer(signed=True)
    x = torch.randn(4, 7, 16)
    x[0, 0, :3] = 0.0
    y = q(x.requires_grad_(True))
    assert float(q.scale.detach()) == pytest.approx(float(2 * x.detach().abs().mean()), rel=1e-6)
    a = q.scale.detach()
    assert torch.equal(y, torch.where(x >= 0, a, -a))  # sign(0) = +1, bit-exact in training mode
    assert bool(q.initialized)
    q(torch.randn(3) * 100)  # later batches do not re-initialise
    assert float(q.scale.detach()) == float(a)


def test_signed_with_shift_matches_w1a1_threshold_in_bf16():
    q = ElasticBinarizer(signed=True, shift=True)
    x = (torch.randn(6, 40) + 0.3).to(torch.bfloat16)
    y = q(x)
    b, a = q.shift.detach(), q.scale.detach()
    assert float(b) == pytest.approx(float(x.float().mean()), rel=1e-5)
    assert float(a) == pytest.approx(float(2 * (x.float() - b).abs().mean()), rel=1e-5)
    assert y.dtype == torch.bfloat16
    expect = torch.where(x.float() >= b, b + a, b - a).to(torch.bfloat16)  # decided in fp32 like the kernel
    assert torch.equal(y, expect)


def test_unsigned_forward_is_exact():
    q = ElasticBinarizer(signed=False)
    p = torch.softmax(torch.randn(2, 3, 5, 5) * 3, dim=-1)
    y = q(p.requires_grad_(True))
    a = q.scale.detach()
    assert float(a) == pytest.approx(float(4 * p.detach().mean()), rel=1e-6)
    assert torch.equal(y, a * torch.round(torch.clamp(p.detach() / a, 0, 1)))
    assert set(torch.unique(y.detach()).tolist()) <= {0.0, float(a)}


@pytest.mark.parametrize("kind", ["signed", "signed_shift", "unsigned"])
def test_elastic_gradients_match_surrogate(kind):
    q = ElasticBinarizer(signed=kind != "unsigned", shift=kind == "signed_shift")
    with torch.no_grad():
        q.scale.fill_(0.9)
        if q.shift is not None:
            q.shift.fill_(0.2)
        q.initialized.fill_(True)
    b = 0.2 if q.shift is not None else 0.0
    x = torch.randn(5, 33) * 1.2 + b
    if q.signed:  # kinks of the clamp at |x - b| = a; none at x = b (the code h is held constant)
        x = _away_from_kinks(x, [b - 0.9, b + 0.9])
    else:  # kinks at 0 and a
        x = _away_from_kinks(x.abs() * 0.7 - 0.1, [0.0, 0.9])
    _check_elastic_gradients(q, x)


def test_elastic_gradient_formulas():
    """The documented closed forms: d/dx = 1{|x| <= a}, d/da = sign(x) - x/a 1{|x| <= a}."""
    q = ElasticBinarizer(signed=True)
    with torch.no_grad():
        q.scale.fill_(1.0)
        q.initialized.fill_(True)
    x = torch.tensor([-2.0, -0.5, 0.0, 0.25, 1.5], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert float(q.scale.grad) == pytest.approx((-1 - 1 + 1 + 1 + 1) - (-0.5 + 0 + 0.25))


@pytest.mark.parametrize("clip", [None, 0.5])
def test_weight_binarizer_forward_equals_binary_linear_and_gradient_is_surrogate(clip):
    lin = nn.Linear(70, 19)
    wq = WeightBinarizer(clip=clip)
    w = lin.weight
    wb = wq(w)
    assert torch.equal(wb.detach(), BinaryLinear.from_linear(lin).dequantized_weight())
    g = torch.randn_like(wb)
    (wb * g).sum().backward()
    f = surrogate(wq)
    w0 = w.detach().double()
    w0 = w0 if clip is None else _away_from_kinks(w0, [-clip, clip], 0.01)
    if clip is not None:  # recompute at the nudged point
        w.grad = None
        with torch.no_grad():
            w.copy_(w0.float())
        (wq(w) * g).sum().backward()
    fd = (f(w0 + EPS) - f(w0 - EPS)) / (2 * EPS)
    torch.testing.assert_close(w.grad.double(), g.double() * fd, rtol=1e-6, atol=1e-6)


def test_weight_binarizer_bf16():
    w = torch.randn(12, 40).to(torch.bfloat16)
    lin = nn.Linear(40, 12).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(w)
    assert torch.equal(WeightBinarizer()(w), BinaryLinear.from_linear(lin).dequantized_weight().to(torch.bfloat16))


def test_freeze_turns_parameters_into_buffers():
    q = ElasticBinarizer(signed=True, shift=True)
    x = torch.randn(8, 8)
    y = q(x)
    keys = set(q.state_dict())
    q.freeze()
    assert list(q.parameters()) == [] and set(q.state_dict()) == keys
    assert torch.equal(q(x), y.detach())
    fresh = ElasticBinarizer(signed=True, shift=True)
    fresh.freeze()
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), y.detach())


def test_bad_quantizer_arguments():
    with pytest.raises(ValueError, match="only supported for signed"):
        ElasticBinarizer(signed=False, shift=True)
    with pytest.raises(ValueError, match="clip must be positive"):
        WeightBinarizer(clip=0.0)
    with pytest.raises(ValueError, match="2-D"):
        WeightBinarizer()(torch.randn(3, 4, 5))
    with pytest.raises(TypeError, match="no surrogate"):
        surrogate(nn.Linear(2, 2))


@pytest.mark.parametrize("activations", ["fp", "binary"])
def test_train_linear_matches_binary_linear(activations):
    lin = nn.Linear(50, 21)
    t = BinaryTrainLinear.from_linear(lin, activations=activations)
    assert t.weight is lin.weight and t.bias is lin.bias  # Parameters reused
    x = torch.randn(3, 5, 50)
    y = t(x)
    y.pow(2).mean().backward()
    assert lin.weight.grad is not None and lin.bias.grad is not None
    if activations == "binary":
        assert t.input_quantizer.scale.grad is not None and t.input_quantizer.shift.grad is not None
    frozen = t.to_binary_linear()
    assert frozen.activations == activations
    torch.testing.assert_close(frozen(x), y.detach(), rtol=1e-4, atol=1e-5)


def test_train_linear_from_conv1d_and_errors():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(24, 40)
    nn.init.normal_(conv.weight)
    t = BinaryTrainLinear.from_linear(conv)
    assert t.weight.shape == (24, 40)
    x = torch.randn(2, 40)
    torch.testing.assert_close(t(x), BinaryLinear.from_linear(conv)(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="expected torch.nn.Linear"):
        BinaryTrainLinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="activations must be one of"):
        BinaryTrainLinear(4, 4, activations="int8")
    with pytest.raises(RuntimeError, match="never initialised"):
        BinaryTrainLinear(40, 8, activations="binary").to_binary_linear()


@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("activations", ["fp", "binary"])
def test_train_linear_gradients_equal_the_plain_ste_formulation(activations, clip):
    """The factorised forward (kernel order) has the gradients of F.linear(q_in(x), q_w(W)) + b."""
    lin = nn.Linear(40, 13)
    t = BinaryTrainLinear.from_linear(lin, activations=activations, weight_clip=clip)
    x = torch.randn(2, 5, 40)
    with torch.no_grad():
        t(x)  # initialise the input quantizer
    g = torch.randn(2, 5, 13)
    xa = x.clone().requires_grad_(True)
    (t(xa) * g).sum().backward()
    got = [xa.grad, lin.weight.grad, lin.bias.grad] + [p.grad for p in t.input_quantizer.parameters()] \
        if t.input_quantizer is not None else [xa.grad, lin.weight.grad, lin.bias.grad]
    grads = [p.grad.clone() for p in [lin.weight, lin.bias] + list(t.parameters())[2:]]
    for p in t.parameters():
        p.grad = None
    xb = x.clone().requires_grad_(True)
    xin = t.input_quantizer(xb) if t.input_quantizer is not None else xb
    (torch.nn.functional.linear(xin, t.weight_quantizer(lin.weight), lin.bias) * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    for before, p in zip(grads, [lin.weight, lin.bias] + list(t.parameters())[2:]):
        torch.testing.assert_close(before, p.grad, rtol=1e-5, atol=1e-5)
    assert len(got) == (5 if activations == "binary" else 3)
