"""Training-time binarizers with straight-through gradients (BiT / BWN).

Every quantizer here has a forward that is *exactly* the hard quantizer (bit for bit what the
frozen inference path computes) and a backward that is the gradient of a documented smooth
*surrogate*. The LSQ/BiT pattern makes that explicit::

    q = scale * (h + (c - c.detach()))      # forward: scale * h exactly (c - c.detach() == 0)

where ``h`` is the hard code (detached) and ``c`` a clamp whose gradient is the surrogate's.

=====================  =======================================  ==================================
quantizer              forward                                  surrogate (what the backward differentiates)
=====================  =======================================  ==================================
ElasticBinarizer       a * sign(x)          (sign(0) = +1)      a*h + a*clamp(x/a, -1, 1) - a*c0
(signed)               d/dx = 1{|x| <= a},  d/da = h - x/a * 1{|x| <= a}
ElasticBinarizer       b + a * sign(x - b)                      same on x - b, plus b
(signed, shift=True)   d/db = 1{|x - b| > a}
ElasticBinarizer       a * round(clamp(x/a, 0, 1))  ({0, a})    a*r + a*clamp(x/a, 0, 1) - a*c0
(unsigned)             d/dx = 1{0 <= x <= a},  d/da = r - x/a * 1{0 <= x <= a}
WeightBinarizer        alpha * sign(W - mean_row W) (BWN,       W (identity STE) or clamp(W, -clip, clip)
                       alpha = mean_row |W - mean_row W|)
=====================  =======================================  ==================================

(h, r, c0 are the hard code and the clamp value at the point of evaluation, held constant; the
indicator boundaries are where the clamp is flat, i.e. kinks.) :func:`surrogate` returns these
functions so that tests can compare autograd with finite differences.

Scales are per tensor (0-dim), initialised lazily from the first batch the quantizer sees (GUIDE /
BiT): a = 2 * mean|x - b| (signed), a = 4 * mean|x| (unsigned); the shift b starts at mean(x).
Codes are decided in float32 (``x.float() >= b``) exactly as the W1A1 kernel decides them, so a
bf16 model trains with the same signs its frozen copy uses.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .packing import binarize_weight

__all__ = ["ElasticBinarizer", "WeightBinarizer", "surrogate"]


class ElasticBinarizer(nn.Module):
    """Elastic binarization of activations x (any shape, float dtype) with a learnable scale.

    - ``signed=True``: ``a * sign(x)`` (``sign(0) = +1``); with ``shift=True`` ``b + a * sign(x - b)``
      with a learnable shift b (the W1A1 input quantizer of a linear layer).
    - ``signed=False``: ``a * round(clamp(x / a, 0, 1))`` in {0, a} (attention probabilities).

    Parameters ``scale`` (and ``shift``) are float32 0-dim tensors; the buffer ``initialized``
    records whether they were set from data. The first forward (training or eval) with
    ``initialized == False`` sets them from that batch (see the module docstring). After
    :meth:`freeze` the parameters become buffers and the forward drops the STE bookkeeping.
    Output: x's shape and dtype.
    """

    def __init__(self, signed: bool = True, shift: bool = False, device=None):
        super().__init__()
        if shift and not signed:
            raise ValueError("shift=True is only supported for signed binarizers")
        self.signed, self.has_shift, self.frozen = bool(signed), bool(shift), False
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float32, device=device))
        if shift:
            self.shift = nn.Parameter(torch.zeros((), dtype=torch.float32, device=device))
        else:
            self.shift = None
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=device))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set scale (and shift) from a batch x (see the module docstring)."""
        xf = x.detach().to(torch.float32)
        if self.signed:
            b = xf.mean() if self.has_shift else xf.new_zeros(())
            a = 2 * (xf - b).abs().mean()
            if self.has_shift:
                self.shift.copy_(b)
        else:
            a = 4 * xf.abs().mean()
        if not bool(torch.isfinite(a)) or float(a) <= 0:  # an all-zero (or broken) first batch
            a = torch.ones_like(a)
        self.scale.copy_(a)
        self.initialized.fill_(True)

    def code(self, x: torch.Tensor) -> torch.Tensor:
        """Signed only: the +-1 code u of x as float32 with the STE attached, so that the forward
        is ``shift + scale * u`` (u equals sign(x - shift) exactly; its gradient w.r.t. x, scale and
        shift is that of clamp((x - shift) / scale, -1, 1))."""
        if not self.signed:
            raise ValueError("code() is defined for signed binarizers only")
        if not self.frozen and not bool(self.initialized):  # frozen ones are initialised (freeze checks):
            self.initialize(x)                               # no data-dependent branch under torch.compile
        xf = x.to(torch.float32)
        b = self.shift.to(torch.float32) if self.shift is not None else None
        h = torch.where(xf >= (b if b is not None else 0.0), 1.0, -1.0)
        if self.frozen or not torch.is_grad_enabled():
            return h
        z = xf - b if b is not None else xf
        c = torch.clamp(z / self.scale.to(torch.float32), -1.0, 1.0)
        return h + (c - c.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.frozen and not bool(self.initialized):
            self.initialize(x)
        a = self.scale.to(torch.float32)
        if self.signed:
            q = a * self.code(x)
            if self.shift is not None:
                q = q + self.shift.to(torch.float32)
        else:
            xf = x.to(torch.float32)
            r = torch.round(torch.clamp(xf / a, 0.0, 1.0)).detach()
            if self.frozen or not torch.is_grad_enabled():
                q = a * r
            else:
                c = torch.clamp(xf / a, 0.0, 1.0)
                q = a * (r + (c - c.detach()))
        return q.to(x.dtype)

    def freeze(self) -> None:
        """Fixed eval-mode quantizer: parameters become buffers (same state_dict names)."""
        if self.frozen:
            return
        for name in ("scale", "shift"):
            p = getattr(self, name)
            if isinstance(p, nn.Parameter):
                delattr(self, name)
                self.register_buffer(name, p.detach().clone())
        self.frozen = True

    def extra_repr(self) -> str:
        kind = "signed" if self.signed else "unsigned"
        return (f"{kind}, shift={self.has_shift}, scale={float(self.scale.detach()):.4g}"
                + (f", shift_value={float(self.shift.detach()):.4g}" if self.shift is not None else "")
                + ("" if bool(self.initialized) else " (not initialized)") + (", frozen" if self.frozen else ""))


class WeightBinarizer(nn.Module):
    """BWN weight binarization with an identity straight-through gradient.

    weight [out, in] (float) -> ``alpha[:, None] * sign(W - mean_row W)`` in W's dtype, with
    ``alpha = mean_row |W - mean_row W|`` computed in float32 and ``sign(0) = +1``: exactly
    ``BinaryLinear.from_linear(...).dequantized_weight()`` (before the cast to W's dtype).
    Backward: d/dW = 1, or ``1{|W| <= clip}`` when ``clip`` is set (surrogate ``clamp(W, -clip, clip)``).
    No gradient flows through alpha (it is a statistic of W, recomputed every step).
    """

    def __init__(self, clip: float | None = None):
        super().__init__()
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be positive or None, got {clip}")
        self.clip = clip

    @staticmethod
    def binarize(weight: torch.Tensor) -> torch.Tensor:
        """The hard BWN weight (float32), no gradient."""
        positive, alpha = binarize_weight(weight)
        return torch.where(positive, alpha[:, None], -alpha[:, None])

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D [out_features, in_features] weight, got shape {tuple(weight.shape)}")
        wb = self.binarize(weight).to(weight.dtype)
        if not torch.is_grad_enabled() or not weight.requires_grad:
            return wb
        g = weight if self.clip is None else torch.clamp(weight, -self.clip, self.clip)
        return wb + (g - g.detach())

    def extra_repr(self) -> str:
        return f"clip={self.clip}"


# -- surrogates ----------------------------------------------------------------------------------
def _signed_surrogate(x, scale, shift, x0, scale0, shift0):
    z0 = x0 - shift0
    h0 = torch.where(z0 >= 0, 1.0, -1.0).to(x.dtype)
    c0 = torch.clamp(z0 / scale0, -1.0, 1.0)
    return shift + scale * h0 + scale * torch.clamp((x - shift) / scale, -1.0, 1.0) - scale * c0


def _unsigned_surrogate(x, scale, shift, x0, scale0, shift0):
    r0 = torch.round(torch.clamp(x0 / scale0, 0.0, 1.0))
    c0 = torch.clamp(x0 / scale0, 0.0, 1.0)
    return scale * r0 + scale * torch.clamp(x / scale, 0.0, 1.0) - scale * c0


def surrogate(quantizer: nn.Module) -> Callable[..., torch.Tensor]:
    """The smooth function whose gradient a quantizer's backward returns.

    ElasticBinarizer: ``f(x, scale, shift, x0, scale0, shift0)`` (shift a 0-dim tensor, 0 when the
    quantizer has none); the hard codes are taken at the anchor (x0, scale0, shift0), so
    ``f(x0, scale0, shift0, x0, scale0, shift0)`` equals the forward and its gradient at the anchor
    equals autograd's through the quantizer. WeightBinarizer: ``f(W)`` = W or clamp(W, -clip, clip)
    (its forward differs from f by a constant per step: the gradient is what is shared).
    """
    if isinstance(quantizer, ElasticBinarizer):
        return _signed_surrogate if quantizer.signed else _unsigned_surrogate
    if isinstance(quantizer, WeightBinarizer):
        clip = quantizer.clip
        return (lambda w: w) if clip is None else (lambda w: torch.clamp(w, -clip, clip))
    raise TypeError(f"no surrogate for {type(quantizer).__name__}")
