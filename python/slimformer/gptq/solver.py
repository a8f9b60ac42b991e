"""The GPTQ solver for one linear layer (Frantar et al., 2022; reference: IST-DASLab/gptq).

Given the layer weight W [out, in] and the Hessian of its inputs H = 2/n * sum x x^T [in, in], GPTQ
quantizes W column by column and spreads each column's rounding error over the columns not yet
quantized, weighted by the inverse Hessian, so the layer output (not the weight) stays close.
:func:`round_to_nearest` is the baseline on the same grid, without error feedback.

Both return a :class:`GridWeights` whose integers, scales, zero points and g_idx pack straight into
a GPTQ checkpoint (``slimformer.nn.QuantLinear``); model-level calibration lives elsewhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .packing import check_bits, round_to_grid


@dataclass
class GridWeights:
    """A quantized weight: W[k, n] ~= scales[g, n] * (q[k, n] - zeros[g, n]) with g = g_idx[k].

    q [in, out] int64 in [0, 2**bits); scales [groups, out] fp32; zeros [groups, out] int64 (real
    zero points, not v1's zero - 1); g_idx [in] int32.
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """W [out, in] in fp32."""
        g = self.g_idx.long()
        return (self.scales[g] * (self.q.to(torch.float32) - self.zeros[g].to(torch.float32))).t()


def minmax_grid(lo: torch.Tensor, hi: torch.Tensor, bits: int, sym: bool,
                min_zero: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest grid for value ranges [lo, hi] (any shape): scale fp32, zero point int64.

    The range is widened to include 0. Symmetric grids put the zero point mid-range. Scales are
    floored at fp16's smallest normal number (checkpoints store them in fp16; a smaller one would
    round to 0). Zero points are clamped to [min_zero, 2**bits - 1]: format "gptq" (v1) stores
    zero - 1 and cannot hold 0, so such ranges lose their lowest grid step instead.
    """
    maxq = (1 << bits) - 1
    lo, hi = lo.to(torch.float32).clamp(max=0), hi.to(torch.float32).clamp(min=0)
    floor = torch.finfo(torch.float16).tiny
    if sym:
        scale = (2 * torch.maximum(lo.abs(), hi) / maxq).clamp(min=floor)
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        scale = ((hi - lo) / maxq).clamp(min=floor)
        zero = torch.round(-lo / scale).clamp(min_zero, maxq)
    return scale, zero.to(torch.int64)


def row_grid(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """minmax_grid of each row of w [rows, cols]: scale, zero [rows]."""
    return minmax_grid(w.min(dim=1).values, w.max(dim=1).values, bits, sym)


def round_to_nearest(weight: torch.Tensor, bits: int, group_size: int = 128, sym: bool = True) -> GridWeights:
    """RTN: each group of input columns gets a min/max grid per output row; no error feedback."""
    check_bits(bits)
    w = weight.detach().to(torch.float32)
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    groups = math.ceil(in_f / gs)
    q = torch.empty(in_f, out_f, dtype=torch.int64, device=w.device)
    scales = torch.empty(groups, out_f, device=w.device)
    zeros = torch.empty(groups, out_f, dtype=torch.int64, device=w.device)
    for g in range(groups):
        cols = slice(g * gs, min(in_f, (g + 1) * gs))
        scale, zero = row_grid(w[:, cols], bits, sym)
        q[cols] = round_to_grid(w[:, cols], scale[:, None], zero[:, None], bits).t().to(torch.int64)
        scales[g], zeros[g] = scale, zero
    g_idx = (torch.arange(in_f, device=w.device) // gs).to(torch.int32)
    return GridWeights(q, scales, zeros, g_idx)


def quantize_layer(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int = 128,
                   sym: bool = True, act_order: bool = False, damp_percent: float = 0.01,
                   static_groups: bool = False, block_size: int = 128,
                   max_damp_retries: int = 6) -> tuple[GridWeights, float]:
    """Quantize weight [out, in] with GPTQ given the input Hessian [in, in] (fp32 on W's device).

    Follows the paper's reference: dead inputs (H_ii = 0) get H_ii = 1 and zero weight; damping
    ``damp_percent * mean(diag H)``, multiplied by 10 and retried when the Cholesky factorisation
    fails; act-order visits inputs by decreasing H_ii; groups take their grid when their first
    (visited) column comes up, or all up front with ``static_groups``; lazy updates in blocks.
    Returns the quantized weight and the loss sum((w - q)^2 / Hinv_ii^2) / 2.
    """
    check_bits(bits)
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(torch.float32).clone()
    out_f, in_f = w.shape
    if h.shape != (in_f, in_f):
        raise ValueError(f"hessian must be ({in_f}, {in_f}) for a weight of shape {tuple(w.shape)}, got {tuple(h.shape)}")
    gs = in_f if group_size == -1 else group_size
    if gs <= 0:
        raise ValueError(f"group_size must be positive or -1, got {group_size}")

    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    static = None
    if static_groups:  # grids from the original columns, group by group in input order
        static = [row_grid(w[:, g:g + gs], bits, sym) for g in range(0, in_f, gs)]

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_cholesky(h, damp_percent, max_damp_retries)

    q = torch.zeros_like(w)
    scale = zero = None
    scales_by_col = torch.empty(in_f, out_f, device=w.device)
    zeros_by_col = torch.empty(in_f, out_f, device=w.device)
    loss = torch.zeros((), device=w.device)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = i1 + i  # position in visiting order
            orig = int(perm[col]) if perm is not None else col
            if static is not None:
                scale, zero = static[orig // gs]
            elif col % gs == 0:
                # The group's grid from the columns as updated so far (the current block's updates
                # live in w1, as in the reference implementation).
                scale, zero = row_grid(w[:, col:col + gs], bits, sym)
            wc, d = w1[:, i], hinv1[i, i]
            qc = round_to_grid(wc, scale, zero, bits)
            deq = scale * (qc - zero)
            q[:, col] = qc
            scales_by_col[col], zeros_by_col[col] = scale, zero
            loss += ((wc - deq) ** 2).sum() / d**2 / 2
            e = (wc - deq) / d
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    # Back to input order; one group per grid in visiting order (static: per input group).
    if perm is not None:
        inv = torch.argsort(perm)
        q, scales_by_col, zeros_by_col = q[:, inv], scales_by_col[inv], zeros_by_col[inv]
        visit_group = (torch.arange(in_f, device=w.device) // gs)[inv]
    else:
        visit_group = torch.arange(in_f, device=w.device) // gs
    g_idx = (torch.arange(in_f, device=w.device) // gs) if static is not None else visit_group
    groups = math.ceil(in_f / gs)
    scales = torch.empty(groups, out_f, device=w.device)
    zeros = torch.empty(groups, out_f, dtype=torch.int64, device=w.device)
    scales[g_idx] = scales_by_col
    zeros[g_idx] = zeros_by_col.to(torch.int64)
    grid = GridWeights(q.t().contiguous().to(torch.int64), scales, zeros, g_idx.to(torch.int32))
    return grid, float(loss)


def _inverse_cholesky(h: torch.Tensor, damp_percent: float, retries: int) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after damping; retries with 10x the damping on failure."""
    mean_diag = torch.mean(torch.diag(h))
    damp = damp_percent
    for _ in range(retries + 1):
        hd = h + damp * mean_diag * torch.eye(h.shape[0], device=h.device)
        lower, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper
        damp *= 10
    raise ValueError(f"GPTQ: the Hessian is not positive definite even with damp_percent={damp / 10:g}; "
                     "use more (or more varied) calibration data")
