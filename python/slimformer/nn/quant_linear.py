"""QuantLinear: a GPTQ-quantized ``nn.Linear`` whose buffers are the checkpoint tensors."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..gptq.packing import check_bits, pack_cols, pack_rows, quantize_to_grid, unpack_rows, zero_offset
from ..gptq.solver import minmax_grid
from ..ops.gptq import gptq_gemm, gptq_gemm_a8


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W stored in GPTQ checkpoint layout (bits 2/3/4/8).

    Buffers (exactly the checkpoint tensors, filled by ``load_state_dict``):

    - ``qweight`` int32 (in_features * bits / 32, out_features)
    - ``qzeros``  int32 (groups, ceil(out_features * bits / 32))
    - ``scales``  float16 (groups, out_features)
    - ``g_idx``   int32 (in_features,)
    - ``bias``    float16 (out_features,) when ``bias=True``

    ``group_size=-1`` means one group per row. Checkpoints with act-order (an unsorted ``g_idx``)
    are supported: at load time the module permutes in_features once so that groups are
    contiguous for the kernels (an extra packed copy of the weight; the checkpoint tensors stay the
    source of truth and are what ``state_dict`` returns).

    ``int8_activations`` (a plain attribute, default False) makes CPU forwards quantize x on the fly
    to int8 per 32 inputs and use integer dot products (:func:`slimformer.ops.gptq_gemm_a8`):
    faster at every batch size, ~0.5% relative output error on top of the weight quantization.
    CUDA forwards ignore it.

    Example::

        lin = torch.nn.Linear(576, 1536)
        q = QuantLinear.from_linear(lin, bits=4, group_size=128)   # round-to-nearest grid
        y = q(torch.randn(2, 7, 576))                               # (2, 7, 1536)
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = True,
                 checkpoint_format: str = "gptq", device=None, dtype: torch.dtype = torch.float16,
                 int8_activations: bool = False):
        super().__init__()
        self.int8_activations = int8_activations
        check_bits(bits)
        self.zero_offset = zero_offset(checkpoint_format)
        need = 32 // math.gcd(32, bits)
        if in_features <= 0 or in_features % need:
            raise ValueError(f"in_features={in_features} must be a positive multiple of {need} for bits={bits}")
        if out_features <= 0:
            raise ValueError(f"out_features must be positive, got {out_features}")
        if group_size != -1 and group_size <= 0:
            raise ValueError(f"group_size must be positive or -1 (one group per row), got {group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.checkpoint_format = bits, group_size, checkpoint_format
        gs = in_features if group_size == -1 else group_size
        groups = math.ceil(in_features / gs)
        kw = dict(device=device)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32, **kw))
        self.register_buffer("qzeros", torch.zeros(groups, math.ceil(out_features * bits / 32), dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=dtype, **kw))
        self.register_buffer("g_idx", (torch.arange(in_features, dtype=torch.int32, **kw) // gs).to(torch.int32))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw))
        else:
            self.bias = None
        # Kernel-side view of the weight: equal to the checkpoint tensors unless g_idx is unsorted.
        self.register_buffer("_perm", None, persistent=False)
        self.register_buffer("_qweight_sorted", None, persistent=False)
        self.register_buffer("_g_idx_sorted", None, persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module.post_init())

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int, scales: torch.Tensor | None = None,
                    zeros: torch.Tensor | None = None, g_idx: torch.Tensor | None = None,
                    checkpoint_format: str = "gptq", sym: bool = False) -> "QuantLinear":
        """Quantize ``linear`` onto a given grid (or a round-to-nearest min/max grid when omitted).

        ``scales`` and ``zeros`` are (groups, out_features), zeros as real zero points in
        [0, 2**bits) (not v1's zero - 1); ``g_idx`` (in_features,) maps inputs to groups and
        defaults to sequential groups of ``group_size``.
        """
        w = linear.weight.detach()
        out_features, in_features = w.shape
        mod = cls(in_features, out_features, bits, group_size, bias=linear.bias is not None,
                  checkpoint_format=checkpoint_format, device=w.device)
        if g_idx is None:
            g_idx = mod.g_idx
        g_idx = g_idx.to(device=w.device, dtype=torch.int32)
        if scales is None or zeros is None:
            scales, zeros = _minmax_grid(w, g_idx, mod.scales.shape[0], bits, sym, min_zero=mod.zero_offset)
        _check_grid_shapes(scales, zeros, out_features)  # before rounding onto them
        scales = scales.to(torch.float16)  # the checkpoint precision, before rounding onto the grid
        q = quantize_to_grid(w, scales, zeros, g_idx, bits)
        return cls.from_grid(q, scales, zeros, g_idx, bits, group_size, linear.bias, checkpoint_format)

    @classmethod
    def from_grid(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                  bits: int, group_size: int, bias: torch.Tensor | None = None,
                  checkpoint_format: str = "gptq") -> "QuantLinear":
        """Pack already-quantized integers (e.g. the GPTQ solver's): q [in, out] in [0, 2**bits),
        scales and zeros [groups, out] (real zero points), g_idx [in], bias [out] or None."""
        in_features, out_features = q.shape
        mod = cls(in_features, out_features, bits, group_size, bias=bias is not None,
                  checkpoint_format=checkpoint_format, device=q.device)
        _check_grid_shapes(scales, zeros, out_features)
        zeros = zeros.to(torch.int64)
        stored = zeros - mod.zero_offset
        if int(stored.min()) < 0 or int(zeros.max()) >= (1 << bits):
            raise ValueError(f"zeros must lie in [{mod.zero_offset}, {1 << bits}) for bits={bits} and "
                             f"checkpoint_format={checkpoint_format!r}")
        if int(q.min()) < 0 or int(q.max()) >= (1 << bits):
            raise ValueError(f"q must lie in [0, {1 << bits}) for bits={bits}")
        mod.qweight = pack_rows(q.to(torch.int64), bits)
        mod.qzeros = pack_cols(stored, bits)
        mod.scales = scales.to(torch.float16).contiguous()
        mod.g_idx = g_idx.to(device=q.device, dtype=torch.int32).contiguous()
        if bias is not None:
            mod.bias = bias.detach().to(device=q.device, dtype=torch.float16).clone()
        mod.post_init()
        return mod

    def post_init(self) -> None:
        """Validate the checkpoint tensors and derive the kernel layout; call after editing buffers."""
        groups = self.scales.shape[0]
        if self.g_idx.shape != (self.in_features,):
            raise ValueError(f"g_idx must be ({self.in_features},), got {tuple(self.g_idx.shape)}")
        g = self.g_idx
        if g.numel() and (int(g.min()) < 0 or int(g.max()) >= groups):
            raise ValueError(f"g_idx values must lie in [0, {groups}) (scales has {groups} groups), got "
                             f"[{int(g.min())}, {int(g.max())}]")
        if bool((g[1:] >= g[:-1]).all()):
            self._perm = self._qweight_sorted = self._g_idx_sorted = None
            return
        perm = torch.argsort(g.long(), stable=True)
        q = unpack_rows(self.qweight, self.bits, self.in_features)
        self._perm = perm.to(torch.int32)
        self._qweight_sorted = pack_rows(q[perm], self.bits)
        self._g_idx_sorted = g[perm].contiguous()

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = gptq_gemm_a8 if self.int8_activations and x.device.type == "cpu" else gptq_gemm
        if self._perm is None:
            return op(x, self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.zero_offset, self.bias)
        return op(x, self._qweight_sorted, self.qzeros, self.scales, self._g_idx_sorted, self.bits,
                  self.zero_offset, self.bias, perm=self._perm)

    def _apply(self, fn, recurse=True):
        # Keep the checkpoint's scale values when the model is cast (model.to(torch.bfloat16)):
        # only their device may change; the kernels read fp16/bf16/fp32 scales and return x's dtype.
        scales = self.scales
        super()._apply(fn, recurse)
        if self.scales.dtype != scales.dtype:
            self.scales = scales.to(self.scales.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, "
                f"checkpoint_format={self.checkpoint_format!r}, act_order={self._perm is not None}"
                + (", int8_activations=True" if self.int8_activations else ""))


def _check_grid_shapes(scales: torch.Tensor, zeros: torch.Tensor, out_features: int) -> None:
    groups = scales.shape[0]
    if scales.shape != (groups, out_features) or zeros.shape != (groups, out_features):
        raise ValueError(f"scales and zeros must both be (groups, {out_features}), got "
                         f"{tuple(scales.shape)} and {tuple(zeros.shape)}")


def _minmax_grid(w: torch.Tensor, g_idx: torch.Tensor, groups: int, bits: int, sym: bool, min_zero: int = 0):
    """Round-to-nearest grid per (group, output) for weight [out, in] (see minmax_grid)."""
    wt = w.t().to(torch.float32)  # [in, out]
    index = g_idx.long()[:, None].expand_as(wt)
    empty = torch.zeros(groups, wt.shape[1], device=w.device)
    lo = empty.scatter_reduce(0, index, wt, "amin", include_self=False)
    hi = empty.scatter_reduce(0, index, wt, "amax", include_self=False)
    return minmax_grid(lo, hi, bits, sym, min_zero)
