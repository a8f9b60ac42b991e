"""Token merging ops: fused bipartite matching and the size-weighted merge.

Shapes::

    metric  [B, N, C]  float32 / float16 / bfloat16 (any strides; copied contiguous if needed)
    sizes   [B, N]     float32, >= 0 (0 = padding)
    roles   [B, N]     int8: 0 source (A), 1 destination (B), 2 keep (protected)
    x       [B, N, D]  float32 / float16 / bfloat16
    slot    [B, N]     int64 in [0, n_out)

Meaning: :mod:`slimformer.tome.reference`. The match kernel keeps one running max/argmax per
source and never stores the N x N similarity matrix; the merge accumulates in float32.
"""
from __future__ import annotations

import torch

from ..tome.reference import Match, check_match_inputs, merge_weights
from .gptq import _check_one_device

_ops = torch.ops.slimformer


def tome_match(metric: torch.Tensor, sizes: torch.Tensor, roles: torch.Tensor, r: int) -> Match:
    """Merge the r best-matching sources of every row into their most similar destination.

    Returns :class:`~slimformer.tome.reference.Match` (slot, dst, score); ``slot`` numbers the N - r
    surviving tokens in their original order. ValueError when a row has fewer than r sources or no
    destination."""
    check_match_inputs(metric, sizes, roles, r)
    return Match(*_ops.tome_match(metric.contiguous(), sizes.contiguous(), roles.contiguous(), int(r)))


def tome_merge(x: torch.Tensor, sizes: torch.Tensor, slot: torch.Tensor, n_out: int):
    """(out [B, n_out, D], out_sizes float32 [B, n_out]): the size-weighted mean of the tokens sent to
    each slot. Differentiable in x."""
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, D]; got shape {tuple(x.shape)}")
    return _ops.tome_merge(x.contiguous(), sizes.contiguous(), slot.contiguous(), int(n_out))


def _match_fake(metric, sizes, roles, r):
    _check_one_device(metric, sizes, roles)
    torch._check(metric.dim() == 3, lambda: "metric must be [B, N, C]")
    B, N = metric.shape[:2]
    return (metric.new_empty((B, N), dtype=torch.int64), metric.new_empty((B, N), dtype=torch.int64),
            metric.new_empty((B, N), dtype=torch.float32))


def _merge_fake(x, sizes, slot, n_out):
    _check_one_device(x, sizes, slot)
    torch._check(x.dim() == 3, lambda: "x must be [B, N, D]")
    B, _, D = x.shape
    return x.new_empty((B, n_out, D)), x.new_empty((B, n_out), dtype=torch.float32)


torch.library.register_fake("slimformer::tome_match")(_match_fake)
torch.library.register_fake("slimformer::tome_merge")(_merge_fake)


# -- autograd of the merge: d out[o] / d x[i] = w_i for slot[i] = o, a gather of the output gradient.
def _merge_setup_context(ctx, inputs, output):
    _, sizes, slot, _ = inputs
    _, out_sizes = output
    ctx.mark_non_differentiable(out_sizes)
    ctx.save_for_backward(sizes, slot, out_sizes)


def _merge_backward(ctx, grad_out, _grad_sizes):
    sizes, slot, out_sizes = ctx.saved_tensors
    w, _ = merge_weights(sizes, slot, out_sizes.shape[1])
    grad_x = grad_out.gather(1, slot[..., None].expand(*slot.shape, grad_out.shape[-1])) * w[..., None].to(grad_out.dtype)
    return grad_x, None, None, None


torch.library.register_autograd("slimformer::tome_merge", _merge_backward, setup_context=_merge_setup_context)
