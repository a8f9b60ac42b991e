"""Pure-PyTorch references that define the sparse attention ops' meaning (O(n^2) memory: tests only).

Shapes::

    q        [B, Hq, Sq, D]      key, value [B, Hkv, Sk, D]   (Hq a multiple of Hkv: GQA / MQA)
    allowed  bool [Hl, Sq, Sk]   Hl = 1 or Hq (a pattern's dense_mask, causal included)
    key_mask bool [B, Sk] or None (False = padding key, never attended)
    -> out [B, Hq, Sq, D] float64, lse [B, Hq, Sq] float64 (log-sum-exp of the scaled scores over
       the allowed keys; -inf, with out = 0, for a query that may attend no key)
"""
from __future__ import annotations

import torch

from .patterns import BlockPlan


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, Hkv * groups, S, D], each key/value head repeated for its query heads."""
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def full_mask(allowed: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """allowed [Hl, Sq, Sk] and key_mask [B, Sk] -> bool [B, Hl, Sq, Sk]."""
    mask = allowed[None]
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :].to(torch.bool)
    return mask


def sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                               key_mask: torch.Tensor | None = None, scale: float | None = None):
    """softmax(q k^T * scale, over the allowed keys) v, in float64. Returns (out, lse)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    q64, k64, v64 = q.double(), repeat_kv(k.double(), groups), repeat_kv(v.double(), groups)
    mask = full_mask(allowed.to(q.device), key_mask)
    scores = (q64 @ k64.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = probs @ v64
    return out, lse


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                     key_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """The same attention done the plain PyTorch way in q's dtype (explicit mask, float softmax):
    the baseline whose rounding error the kernels must stay within 2x of. Fully masked rows -> 0."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    mask = full_mask(allowed.to(q.device), key_mask)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
    return probs @ v


def plan_dense_mask(plan: BlockPlan, num_heads: int = 1) -> torch.Tensor:
    """Expand a :class:`BlockPlan` back into bool [layout_heads, q_len, kv_len] by the kernels' rule
    (full tiles wholly allowed, partial tiles by window / global tokens, then causal): tests check it
    equals the pattern's :meth:`~slimformer.attention.Pattern.dense_mask`."""
    bs, off = plan.block_size, plan.q_offset
    out = torch.zeros(plan.layout_heads, plan.q_len, plan.kv_len, dtype=torch.bool)
    g = None if plan.global_mask is None else plan.global_mask.cpu().bool()
    row_ptr, col_idx, col_full = plan.row_ptr.cpu(), plan.col_idx.cpu(), plan.col_full.cpu()
    for h in range(plan.layout_heads):
        for r in range(plan.num_q_blocks):
            t = r + plan.first_q_block
            p_lo, p_hi = max(t * bs, off), min((t + 1) * bs, off + plan.q_len)
            p = torch.arange(p_lo, p_hi)[:, None]
            for e in range(int(row_ptr[h, r]), int(row_ptr[h, r + 1])):
                c = int(col_idx[e])
                j = torch.arange(c * bs, min((c + 1) * bs, plan.kv_len))[None, :]
                if col_full[e]:
                    ok = torch.ones(p.shape[0], j.shape[1], dtype=torch.bool)
                else:
                    ok = torch.zeros(p.shape[0], j.shape[1], dtype=torch.bool)
                    if plan.window_left >= 0:
                        ok |= ((j - p) >= -plan.window_left) & ((j - p) <= plan.window_right)
                    if g is not None:
                        ok |= g[p] | g[j]
                if plan.causal:
                    ok &= j <= p
                out[h, p_lo - off: p_hi - off, j[0, 0]: j[0, -1] + 1] |= ok
    return out
