"""BinaryLinear: an inference ``nn.Linear`` with 1-bit weights (BWN) and fp or 1-bit inputs."""
from __future__ import annotations

import torch
from torch import nn

from ..blocks import conv1d_type
from ..binary.packing import LAYOUT_VERSION, binarize_weight, check_packed, pack_signs, packed_shape, unpack_signs
from ..ops.binary import binary_gemm, binary_gemm_a1

ACTIVATIONS = ("fp", "binary")
_FP32_BUFFERS = ("alpha", "act_scale", "act_shift")


def _linear_weight_and_bias(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight as [out, in], bias or None) of an nn.Linear or a transformers Conv1D."""
    Conv1D = conv1d_type()
    if Conv1D is not None and isinstance(linear, Conv1D):
        return linear.weight.t().contiguous(), linear.bias  # reductions in the same order as nn.Linear
    if isinstance(linear, nn.Linear):
        return linear.weight, linear.bias
    raise TypeError(f"expected torch.nn.Linear or transformers Conv1D, got {type(linear).__name__}")


def _check_activations(activations: str) -> None:
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")


class BinaryLinear(nn.Module):
    """y = x @ W^T + b with W = alpha[:, None] * S, S in {-1, +1}, stored 1 bit per weight.

    Buffers:

    - ``qweight`` int32 (ceil(out/16), ceil(in/32), 16): the signs, layout v1
      (:mod:`slimformer.binary.packing`)
    - ``alpha``   float32 (out,): per-output-row scale
    - ``bias``    (out,) in the model's dtype, when ``bias=True``
    - ``act_scale``, ``act_shift`` float32 0-dim, only when ``activations="binary"``

    ``activations`` (fixed at construction, part of the module's structure):

    - ``"fp"`` (W1A-fp): :func:`slimformer.ops.binary_gemm` on x as given.
    - ``"binary"`` (W1A1): x is binarized to ``act_scale * sign(x - act_shift) + act_shift``
      (sign(0) = +1) and multiplied with popcounts (:func:`slimformer.ops.binary_gemm_a1`).

    x: (..., in_features) float32 / float16 / bfloat16 -> (..., out_features) in x's dtype.
    W1A-fp has a gradient with respect to x (and bias); W1A1 has none (backward raises).
    ``alpha``, ``act_scale`` and ``act_shift`` stay float32 when the module is cast
    (``model.to(torch.bfloat16)``); only their device follows.

    Example::

        lin = torch.nn.Linear(384, 1536)
        b = BinaryLinear.from_linear(lin)                    # BWN: alpha * sign(W - mean_row W)
        y = b(torch.randn(2, 7, 384))                        # (2, 7, 1536)
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activations: str = "fp",
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        _check_activations(activations)
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        self.in_features, self.out_features, self.activations = int(in_features), int(out_features), activations
        self.register_buffer("qweight", torch.zeros(packed_shape(out_features, in_features), dtype=torch.int32,
                                                    device=device))
        self.register_buffer("alpha", torch.zeros(out_features, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        if activations == "binary":
            self.register_buffer("act_scale", torch.ones((), dtype=torch.float32, device=device))
            self.register_buffer("act_shift", torch.zeros((), dtype=torch.float32, device=device))
        else:
            self.act_scale = self.act_shift = None

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Module, activations: str = "fp", act_scale: float | torch.Tensor | None = None,
                    act_shift: float | torch.Tensor | None = None) -> "BinaryLinear":
        """Binarize an ``nn.Linear`` (or transformers ``Conv1D``, weight stored [in, out]) with BWN.

        ``activations="binary"`` needs ``act_scale`` (> 0; the learned input scale) and takes
        ``act_shift`` (default 0); passing either with ``"fp"`` raises.
        """
        _check_activations(activations)
        weight, bias = _linear_weight_and_bias(linear)
        if activations == "fp" and (act_scale is not None or act_shift is not None):
            raise ValueError("act_scale / act_shift only apply to activations='binary'")
        if activations == "binary" and act_scale is None:
            raise ValueError("activations='binary' needs act_scale (the input scale a of a * sign(x - b) + b; "
                             "slimformer.binary.freeze takes it from a trained model)")
        out_features, in_features = weight.shape
        positive, alpha = binarize_weight(weight)
        return cls.from_signs(positive, alpha, bias, activations=activations, act_scale=act_scale,
                              act_shift=act_shift, in_features=in_features, out_features=out_features)

    @classmethod
    def from_signs(cls, positive: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None = None,
                   activations: str = "fp", act_scale=None, act_shift=None, in_features: int | None = None,
                   out_features: int | None = None) -> "BinaryLinear":
        """From signs ``positive`` bool [out, in] (True = +1) and ``alpha`` [out] (any float dtype)."""
        _check_activations(activations)
        if positive.dim() != 2 or positive.dtype != torch.bool:
            raise ValueError(f"positive must be a bool [out, in] tensor, got {positive.dtype} {tuple(positive.shape)}")
        out_features, in_features = positive.shape
        if alpha.shape != (out_features,):
            raise ValueError(f"alpha must be ({out_features},), got {tuple(alpha.shape)}")
        if bias is not None and bias.shape != (out_features,):
            raise ValueError(f"bias must be ({out_features},), got {tuple(bias.shape)}")
        dtype = bias.dtype if bias is not None else torch.float32
        mod = cls(in_features, out_features, bias=bias is not None, activations=activations,
                  device=positive.device, dtype=dtype)
        mod.qweight = pack_signs(positive)
        mod.alpha = alpha.detach().to(device=positive.device, dtype=torch.float32).clone()
        if bias is not None:
            mod.bias = bias.detach().to(positive.device).clone()
        if activations == "binary":
            scale = torch.as_tensor(act_scale, dtype=torch.float32).detach().to(positive.device).clone()
            shift = torch.as_tensor(0.0 if act_shift is None else act_shift, dtype=torch.float32)
            shift = shift.detach().to(positive.device).clone()
            if scale.dim() != 0 or shift.dim() != 0:
                raise ValueError(f"act_scale and act_shift must be scalars, got shapes {tuple(scale.shape)}, "
                                 f"{tuple(shift.shape)}")
            if not (bool(torch.isfinite(scale)) and float(scale) > 0 and bool(torch.isfinite(shift))):
                raise ValueError(f"act_scale must be finite and > 0 and act_shift finite, got {float(scale)}, "
                                 f"{float(shift)}")
            mod.act_scale, mod.act_shift = scale, shift
        return mod

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"BinaryLinear expects x (..., {self.in_features}), got {tuple(x.shape)}")
        if self.activations == "fp":
            return binary_gemm(x, self.qweight, self.alpha, self.in_features, self.bias)
        return binary_gemm_a1(x, self.qweight, self.alpha, self.act_scale, self.act_shift, self.in_features,
                              self.bias)

    def dequantized_weight(self) -> torch.Tensor:
        """W = alpha[:, None] * S as float32 [out_features, in_features]."""
        check_packed(self.qweight, self.out_features, self.in_features)
        return unpack_signs(self.qweight, self.out_features, self.in_features) * self.alpha[:, None]

    def _apply(self, fn, recurse=True):
        # model.to(dtype) must not round the fp32 scales; only their device may change.
        kept = {name: getattr(self, name) for name in _FP32_BUFFERS if getattr(self, name, None) is not None}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            now = getattr(self, name)
            if now.dtype != torch.float32:
                setattr(self, name, before.to(now.device))
        return self

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
             f"activations={self.activations!r}, layout=v{LAYOUT_VERSION}")
        if self.activations == "binary":
            s += f", act_scale={float(self.act_scale):.4g}, act_shift={float(self.act_shift):.4g}"
        return s
