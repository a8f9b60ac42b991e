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
import warnings
from dataclasses import dataclass

import torch

from ..ops import gptq as ops
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
    round to 0) and rounded to fp16 values, so integers are chosen for the scale that is stored.
    Zero points are clamped to [min_zero, 2**bits - 1]: format "gptq" (v1) stores zero - 1 and
    cannot hold 0, so such ranges lose their lowest grid step instead.
    """
    maxq = (1 << bits) - 1
    lo, hi = lo.to(torch.float32).clamp(max=0), hi.to(torch.float32).clamp(min=0)
    floor = torch.finfo(torch.float16).tiny
    if sym:
        scale = _fp16_values((2 * torch.maximum(lo.abs(), hi) / maxq).clamp(min=floor))
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        scale = _fp16_values(((hi - lo) / maxq).clamp(min=floor))
        zero = torch.round(-lo / scale).clamp(min_zero, maxq)
    return scale, zero.to(torch.int64)


def _fp16_values(scale: torch.Tensor) -> torch.Tensor:
    return scale.clamp(max=torch.finfo(torch.float16).max).to(torch.float16).to(torch.float32)


# The clipping search of the GPTQ reference (Quantizer.find_params with mse=True): candidate ranges
# shrink the min/max range by 1%, 2%, ... up to 80%.
_MSE_SHRINKS = 1 - torch.arange(80, dtype=torch.float32) / 100
_MSE_CHUNK = 16


def row_grid(w: torch.Tensor, bits: int, sym: bool, min_zero: int = 0,
             mse: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of each row of w [rows, cols]: scale, zero [rows].

    ``mse=0``: the min/max grid. ``mse=p > 0``: the clipped range among shrinks 1.00, 0.99, ...,
    0.21 of [min, max] that minimises sum |w - dequant(quant(w))|^p per row (the reference uses
    p = 2.4); clipping a few outliers buys a finer grid for the rest.
    """
    lo, hi = w.min(dim=1).values, w.max(dim=1).values
    if not mse:
        return minmax_grid(lo, hi, bits, sym, min_zero)
    shrinks = _MSE_SHRINKS.to(w.device)[:, None]
    scale, zero = minmax_grid(shrinks * lo, shrinks * hi, bits, sym, min_zero)  # [shrinks, rows]
    w = w.to(torch.float32)
    errors = []
    for c in range(0, len(shrinks), _MSE_CHUNK):
        s, z = scale[c:c + _MSE_CHUNK, :, None], zero[c:c + _MSE_CHUNK, :, None].to(torch.float32)
        deq = s * (round_to_grid(w[None], s, z, bits) - z)
        errors.append((deq - w[None]).abs_().pow_(mse).sum(-1))
    best = torch.cat(errors).argmin(0)  # the first (widest) range among equals, as the reference
    rows = torch.arange(w.shape[0], device=w.device)
    return scale[best, rows], zero[best, rows]


def round_to_nearest(weight: torch.Tensor, bits: int, group_size: int = 128, sym: bool = True,
                     min_zero: int = 0, mse: float = 0.0) -> GridWeights:
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
        scale, zero = row_grid(w[:, cols], bits, sym, min_zero, mse)
        q[cols] = round_to_grid(w[:, cols], scale[:, None], zero[:, None], bits).t().to(torch.int64)
        scales[g], zeros[g] = scale, zero
    g_idx = (torch.arange(in_f, device=w.device) // gs).to(torch.int32)
    return GridWeights(q, scales, zeros, g_idx)


def quantize_layer(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int = 128,
                   sym: bool = True, act_order: bool = False, damp_percent: float = 0.01,
                   static_groups: bool = False, block_size: int = 128,
                   max_damp_retries: int = 6, min_zero: int = 0, mse: float = 0.0) -> tuple[GridWeights, float]:
    """Quantize weight [out, in] with GPTQ given the input Hessian [in, in] (fp32 on W's device).

    Follows the paper's reference: dead inputs (H_ii = 0) get H_ii = 1 and zero weight; damping
    ``damp_percent * mean(diag H)``, multiplied by 10 and retried when the Cholesky factorisation
    fails; act-order visits inputs by decreasing H_ii; groups take their grid when their first
    (visited) column comes up, or all up front with ``static_groups``; lazy updates in blocks.
    ``min_zero=1`` keeps zero points storable in format "gptq" (v1); ``mse > 0`` searches each group's
    clipping range (:func:`row_grid`). Returns the quantized weight
    and the loss sum((w - q)^2 / Hinv_ii^2) / 2.
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
        grids = [row_grid(w[:, g:g + gs], bits, sym, min_zero, mse) for g in range(0, in_f, gs)]
        static = (torch.stack([g[0] for g in grids]), torch.stack([g[1] for g in grids]))  # [groups, out]

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_cholesky(h, damp_percent, max_damp_retries)
    order = perm if perm is not None else torch.arange(in_f, device=w.device)
    solve_block = ops.gptq_solve_block if w.device.type == "cpu" else _solve_block_reference

    q = torch.zeros_like(w)
    scales_by_col = torch.empty(in_f, out_f, device=w.device)
    zeros_by_col = torch.empty(in_f, out_f, device=w.device)
    loss = torch.zeros((), device=w.device)
    grid = None
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        if static is not None:
            group = order[i1:i2] // gs
            col_scale, col_zero = static[0][group].t(), static[1][group].t().to(torch.float32)
        else:
            col_scale, col_zero, grid = _block_grids(w, i1, i2, gs, grid, bits, sym, min_zero, mse)
        q1, err1, row_loss = solve_block(w[:, i1:i2], hinv[i1:i2, i1:i2], col_scale.contiguous(),
                                         col_zero.contiguous(), bits)
        q[:, i1:i2] = q1
        scales_by_col[i1:i2], zeros_by_col[i1:i2] = col_scale.t(), col_zero.t()
        loss += row_loss.sum()
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]  # the lazy update of the columns after the block

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


def _block_grids(w: torch.Tensor, i1: int, i2: int, gs: int, grid, bits: int, sym: bool, min_zero: int,
                 mse: float):
    """Per-column grids [out, i2 - i1] for visiting positions i1..i2-1, and the grid in force at i2.

    A group takes its grid when its first column comes up, from the columns as they stand at the
    start of the block (the block's own updates are not seen, as in the reference implementation);
    ``grid`` is the one carried over from the previous block.
    """
    scales, zeros = [], []
    col = i1
    while col < i2:
        if col % gs == 0:
            grid = row_grid(w[:, col:col + gs], bits, sym, min_zero, mse)
        end = min(i2, (col // gs + 1) * gs)
        scales.append(grid[0][:, None].expand(-1, end - col))
        zeros.append(grid[1][:, None].expand(-1, end - col))
        col = end
    return torch.cat(scales, 1), torch.cat(zeros, 1).to(torch.float32), grid


def _solve_block_reference(w: torch.Tensor, hinv: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                           bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GPTQ column loop over one block, in PyTorch: the meaning of ``gptq_solve_block``.

    w, scale, zero [rows, B] (zero points as floats), hinv [B, B] upper Cholesky factor of H^-1.
    Returns the integers q and the scaled errors err [rows, B], and each row's loss [rows].
    """
    w = w.clone()
    q, err = torch.empty_like(w), torch.empty_like(w)
    loss = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    for i in range(w.shape[1]):
        d = hinv[i, i]
        q[:, i] = round_to_grid(w[:, i], scale[:, i], zero[:, i], bits)
        diff = w[:, i] - scale[:, i] * (q[:, i] - zero[:, i])
        err[:, i] = diff / d
        loss += diff.double() ** 2 / float(d) ** 2 / 2
        w[:, i + 1:] -= err[:, i, None] * hinv[i, i + 1:][None, :]
    return q, err, loss.to(torch.float32)


def _inverse_cholesky(h: torch.Tensor, damp_percent: float, retries: int) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U) after damping; retries with 10x the damping
    when the factorisation fails.

    With J the order-reversing permutation and L the lower Cholesky factor of J H J,
    U = J L^-1 J: upper-triangular with a positive diagonal and U^T U = J (J H J)^-1 J = H^-1. One
    factorisation and one triangular inverse, where the reference factorises, inverts and
    factorises again.
    """
    n = h.shape[0]
    mean_diag = torch.mean(torch.diag(h))
    eye = torch.eye(n, device=h.device, dtype=h.dtype)
    damp = damp_percent
    for _ in range(retries + 1):
        reversed_h = (h + damp * mean_diag * eye).flip(0, 1)
        lower, info = torch.linalg.cholesky_ex(reversed_h)
        if int(info) == 0:
            if damp != damp_percent:
                warnings.warn(f"GPTQ: the damped Hessian was not positive definite at damp_percent="
                              f"{damp_percent:g}; used {damp:g}", RuntimeWarning, stacklevel=3)
            return torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1).contiguous()
        damp *= 10
    raise ValueError(f"GPTQ: the Hessian is not positive definite even with damp_percent={damp / 10:g}; "
                     "use more (or more varied) calibration data")
