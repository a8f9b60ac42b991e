"""BinaryTrainLinear: the training-time form of a binarized linear layer (fp weights + STE)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .packing import binarize_weight
from .quantizers import ElasticBinarizer, WeightBinarizer

ACTIVATIONS = ("fp", "binary")


class _WeightGrad(torch.autograd.Function):
    """Identity on y; backward adds dL/dWq = g^T x_q (the gradient of y = x_q @ Wq^T w.r.t. Wq),
    which the weight STE (in Wq's graph) passes on to the latent weight."""

    @staticmethod
    def forward(ctx, y, wq, xq):
        ctx.save_for_backward(xq)
        ctx.wq_dtype = wq.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        (xq,) = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1]).to(torch.float32)
        grad_w = (g2.t() @ xq.reshape(-1, xq.shape[-1]).to(torch.float32)).to(ctx.wq_dtype)
        return g, grad_w, None


class BinaryTrainLinear(nn.Module):
    """y = q_in(x) @ q_w(W)^T + b with straight-through gradients to W, b and the input quantizer.

    - ``weight`` Parameter [out_features, in_features] (nn.Linear orientation, also for GPT-2's
      Conv1D), ``bias`` Parameter [out_features] or None: the latent full-precision weights.
    - ``weight_quantizer``: :class:`~slimformer.binary.quantizers.WeightBinarizer` (BWN,
      ``alpha * sign(W - mean_row W)``, identity STE or clipped).
    - ``input_quantizer``: for ``activations="binary"`` a signed
      :class:`~slimformer.binary.quantizers.ElasticBinarizer` with learnable scale and shift
      (``b + a * sign(x - b)``), else None.

    x: (..., in_features) -> (..., out_features), x's dtype. The forward computes exactly the
    binarized layer; :meth:`to_binary_linear` packs it into an inference
    :class:`slimformer.nn.BinaryLinear` computing the same function (up to float rounding).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activations: str = "fp",
                 weight_clip: float | None = None, device=None, dtype=None):
        super().__init__()
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
        self.in_features, self.out_features, self.activations = in_features, out_features, activations
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self.weight_quantizer = WeightBinarizer(weight_clip)
        self.input_quantizer = (ElasticBinarizer(signed=True, shift=True, device=device)
                                if activations == "binary" else None)

    @classmethod
    def from_linear(cls, linear: nn.Module, activations: str = "fp", weight_clip: float | None = None
                    ) -> "BinaryTrainLinear":
        """From an nn.Linear (its weight and bias Parameters are reused, not copied) or a
        transformers Conv1D (weight transposed into a new Parameter)."""
        from ..blocks import conv1d_type

        Conv1D = conv1d_type()
        if Conv1D is not None and isinstance(linear, Conv1D):
            weight = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=linear.weight.requires_grad)
        elif isinstance(linear, nn.Linear):
            weight = linear.weight
        else:
            raise TypeError(f"expected torch.nn.Linear or transformers Conv1D, got {type(linear).__name__}")
        out_features, in_features = weight.shape
        mod = cls(in_features, out_features, bias=linear.bias is not None, activations=activations,
                  weight_clip=weight_clip, device="meta")
        mod.weight = weight
        mod.bias = linear.bias
        if mod.input_quantizer is not None:
            mod.input_quantizer = ElasticBinarizer(signed=True, shift=True, device=weight.device)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in the factorised order of the inference kernels, so that a frozen model
        # reproduces the training model's signs downstream (W1A1 outputs are often exact ties
        # such as 0, whose sign a different rounding order would flip):
        #   fp:     y = alpha * (x @ S^T) + bias
        #   binary: y = alpha * (a * (u @ S^T) + b * S.sum(1)) + bias,  u = sign(x - b) (exact integers)
        # Gradients: x, a, b through these expressions (with the input STE in u); W through the
        # weight STE as if y = x_q @ (alpha S)^T (identity or clipped), see _WeightGrad.
        positive, alpha = binarize_weight(self.weight)
        wq = self.weight_quantizer(self.weight)               # alpha * S with the weight STE
        if self.input_quantizer is None:
            s = torch.where(positive, 1.0, -1.0).to(x.dtype)
            y = (x @ s.t()).to(torch.float32) * alpha
            xq = x.detach()
        else:
            q = self.input_quantizer
            u = q.code(x)                                     # +-1, float32, STE attached
            s = torch.where(positive, 1.0, -1.0)
            a, b = q.scale.to(torch.float32), q.shift.to(torch.float32)
            y = alpha * (a * (u @ s.t()) + b * s.sum(1))
            xq = (b + a * u).detach()
        if self.bias is not None:
            y = y + self.bias.to(torch.float32)
        y = y.to(x.dtype)
        if torch.is_grad_enabled() and wq.requires_grad:
            y = _WeightGrad.apply(y, wq, xq)
        return y

    def to_binary_linear(self, allow_uninitialized: bool = False):
        """The packed inference layer (:class:`slimformer.nn.BinaryLinear`) with the same weights
        and input quantizer values. Raises if the input quantizer was never run on data, unless
        ``allow_uninitialized`` (e.g. to build a module that load_state_dict fills afterwards)."""
        from ..nn.binary_linear import BinaryLinear

        positive, alpha = binarize_weight(self.weight)
        bias = None if self.bias is None else self.bias.detach()
        kw = {}
        if self.input_quantizer is not None:
            q = self.input_quantizer
            if not bool(q.initialized) and not allow_uninitialized:
                raise RuntimeError("the input quantizer of this BinaryTrainLinear was never initialised: run at least "
                                   "one forward pass on data before freezing (its scale comes from the first batch)")
            kw = dict(act_scale=q.scale.detach(), act_shift=q.shift.detach())
        return BinaryLinear.from_signs(positive, alpha, bias, activations=self.activations, **kw)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"activations={self.activations!r}")
