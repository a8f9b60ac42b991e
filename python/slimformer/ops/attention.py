"""Sparse flash attention ops over a block-CSR plan.

Shapes::

    q         [B, Hq, Sq, D]    float32 / float16 / bfloat16 (last dimension contiguous)
    k, v      [B, Hkv, Sk, D]   q's dtype; Hq a multiple of Hkv (GQA / MQA)
    key_mask  [B, Sk] bool or None (False = padding key)
    plan      a :class:`slimformer.attention.BlockPlan` for (Sq, Sk)
    -> out    [B, Hq, Sq, D]    q's dtype, contiguous

Meaning: :func:`slimformer.attention.reference.sparse_attention_reference`; the kernels visit only
the plan's tiles with an online softmax, so time and memory are linear in the number of visited
tiles. Differentiable in q, k and v.
"""
from __future__ import annotations

import torch

from .gptq import _check_one_device

_ops = torch.ops.slimformer


def _plan_args(plan):
    return (plan.row_ptr, plan.col_idx, plan.col_full, plan.col_ptr, plan.row_idx, plan.row_full)


def _scalars(plan, scale):
    return (plan.block_size, plan.q_offset, plan.first_q_block, plan.window_left, plan.window_right,
            plan.causal, float(scale))


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan) -> None:
    """ValueError when the plan does not fit q and k (shapes, dtypes and devices are checked by the
    kernels' adapters)."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, S, D]; got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[2] != plan.q_len or k.shape[2] != plan.kv_len:
        raise ValueError(f"the plan is for {plan.q_len} queries over {plan.kv_len} keys; got {q.shape[2]} "
                         f"queries and {k.shape[2]} keys")
    if plan.layout_heads not in (1, q.shape[1]) or (plan.head_dependent and plan.num_heads != q.shape[1]):
        raise ValueError(f"the plan was made for {plan.num_heads} query heads ({plan.layout_heads} layouts); q has "
                         f"{q.shape[1]} heads: make it with pattern.plan(..., num_heads={q.shape[1]})")


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan, *,
                     key_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v over the pairs ``plan`` allows (and ``key_mask`` keeps); a query
    with no allowed key gives zeros. ``scale`` defaults to D**-0.5."""
    return sparse_attention_with_lse(q, k, v, plan, key_mask=key_mask, scale=scale)[0]


def sparse_attention_with_lse(q, k, v, plan, *, key_mask=None, scale=None):
    """:func:`sparse_attention` that also returns lse float32 [B, Hq, Sq] (natural log; -inf for
    a query with no allowed key). lse carries no gradient."""
    check_inputs(q, k, v, plan)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    plan = plan.to(q.device)
    return _ops.sparse_attention_fwd(q, k, v, *_plan_args(plan), plan.global_mask, key_mask, *_scalars(plan, scale))


def _fwd_fake(q, k, v, row_ptr, col_idx, col_full, col_ptr, row_idx, row_full, global_mask, key_mask, block_size,
              q_offset, first_q_block, window_left, window_right, causal, scale):
    _check_one_device(q, k, v, row_ptr, col_idx, col_full, col_ptr, row_idx, row_full, global_mask, key_mask)
    torch._check(q.dim() == 4 and k.dim() == 4, lambda: "q, k, v must be [B, H, S, D]")
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def _bwd_fake(dout, q, k, v, out, lse, row_ptr, col_idx, col_full, col_ptr, row_idx, row_full, global_mask, key_mask,
              block_size, q_offset, first_q_block, window_left, window_right, causal, scale):
    _check_one_device(dout, q, k, v, out, lse, row_ptr, col_idx, col_full, col_ptr, row_idx, row_full, global_mask,
                      key_mask)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


torch.library.register_fake("slimformer::sparse_attention_fwd")(_fwd_fake)
torch.library.register_fake("slimformer::sparse_attention_bwd")(_bwd_fake)


# -- autograd: the backward op recomputes the probabilities tile by tile from lse (flash-style), so
# nothing n x n is kept; it walks the column CSR for dK / dV.
def _setup_context(ctx, inputs, output):
    q, k, v, *csr, global_mask, key_mask = inputs[:11]
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, *csr, global_mask, key_mask)
    ctx.scalars = inputs[11:]


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *rest = ctx.saved_tensors
    dq, dk, dv = _ops.sparse_attention_bwd(dout.contiguous(), q, k, v, out, lse, *rest, *ctx.scalars)
    return (dq, dk, dv) + (None,) * 15


torch.library.register_autograd("slimformer::sparse_attention_fwd", _backward, setup_context=_setup_context)
