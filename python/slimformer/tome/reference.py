"""Pure-PyTorch reference of token merging: bipartite soft matching and the size-weighted merge.

These functions define what the kernels (:func:`slimformer.ops.tome_match`,
:func:`slimformer.ops.tome_merge`) compute; the kernels are tested against them. They materialise
the full similarity matrix (in float64), the kernels never do.

Shapes::

    metric  [B, N, C]  float32 / float16 / bfloat16   one vector per token (ToMe: keys averaged over heads)
    sizes   [B, N]     float32 >= 0                   tokens each token stands for; 0 marks padding
    roles   [B, N]     int8                           ROLE_SOURCE (set A), ROLE_DESTINATION (set B), ROLE_KEEP
    slot    [B, N]     int64                          output token each input token goes to

Matching (ToMe's bipartite soft matching, extended with roles and padding):

* metric rows are L2-normalised (norm clamped at NORM_EPS); similarity is the cosine.
* Every source token i picks its most similar *real* destination (role DESTINATION, size > 0);
  ties go to the lowest index. ``score[i]`` is that cosine. A source of size 0 (padding) scores
  SCORE_PADDING (below every cosine) and a source with no real destination (or only NaN
  similarities) scores SCORE_NO_DESTINATION and goes to the first destination of its row.
  Non-source tokens have score -inf and dst -1.
* The r sources with the highest score merge (ties: lower index first); every other token survives.
  Real tokens therefore merge before padding, and a padded row merges its real tokens exactly as
  it would alone.
* Survivors keep their order: the k-th surviving token of a row is output token k, and a merged
  source goes to its destination's slot.

Merging: out[o] = sum_{slot[i] = o} w_i x_i with w_i = s_i / S_o (S_o = sum of the sizes sent to o),
or 1 / count_o when S_o = 0 (only padding reached o); out_sizes[o] = S_o.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

ROLE_SOURCE, ROLE_DESTINATION, ROLE_KEEP = 0, 1, 2
SCORE_PADDING = -2.0
SCORE_NO_DESTINATION = -3.0
NORM_EPS = 1e-12


class Match(NamedTuple):
    """slot int64 [B, N]; dst int64 [B, N] (-1 for non-sources); score float32 [B, N] (-inf for non-sources)."""
    slot: torch.Tensor
    dst: torch.Tensor
    score: torch.Tensor


def check_match_inputs(metric: torch.Tensor, sizes: torch.Tensor, roles: torch.Tensor, r: int) -> None:
    """ValueError naming the problem, for the reference and the op wrappers alike."""
    if metric.dim() != 3:
        raise ValueError(f"metric must be [B, N, C]; got shape {tuple(metric.shape)}")
    B, N, _ = metric.shape
    if tuple(sizes.shape) != (B, N) or tuple(roles.shape) != (B, N):
        raise ValueError(f"sizes and roles must be [B, N] = [{B}, {N}]; got {tuple(sizes.shape)} and "
                         f"{tuple(roles.shape)}")
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")


def match_reference(metric: torch.Tensor, sizes: torch.Tensor, roles: torch.Tensor, r: int) -> Match:
    check_match_inputs(metric, sizes, roles, r)
    B, N, _ = metric.shape
    dev = metric.device
    is_src, is_dst = roles == ROLE_SOURCE, roles == ROLE_DESTINATION
    if r > 0:
        short = int((is_src.sum(1) < r).sum())
        if short or not bool(is_dst.any(1).all()):
            raise ValueError(f"every row needs at least r = {r} source tokens and one destination token "
                             f"({short} rows have fewer sources)")
    cos = _cosines(metric)
    real = sizes > 0
    allowed = (is_dst & real)[:, None, :] & ~cos.isnan()
    best, arg = cos.masked_fill(~allowed, float("-inf")).max(dim=-1)  # first maximal index on ties
    none = best == float("-inf")
    first_dst = is_dst.to(torch.int8).argmax(dim=1, keepdim=True).expand(B, N)
    dst = torch.where(none, first_dst, arg)
    score = torch.where(none, torch.full_like(best, SCORE_NO_DESTINATION), best)
    score = torch.where(real, score, torch.full_like(score, SCORE_PADDING))
    score = torch.where(is_src, score, torch.full_like(score, float("-inf"))).float()
    dst = torch.where(is_src, dst, torch.full_like(dst, -1))

    # Stable descending sort: equal scores keep ascending index order.
    order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :r]
    keep = torch.ones(B, N, dtype=torch.bool, device=dev)
    keep.scatter_(1, order, False)
    survivor_slot = keep.long().cumsum(1) - 1
    slot = torch.where(keep, survivor_slot, survivor_slot.gather(1, dst.clamp_min(0)))
    return Match(slot, dst, score)


def _cosines(metric: torch.Tensor) -> torch.Tensor:
    """float64 [B, N, N] cosines. Equal metric rows give bit-equal cosines (a matmul may round a
    row's dot products differently depending on its position, which would break ties arbitrarily):
    cosines are taken between the distinct rows of each batch row, then expanded."""
    m = metric.double()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    out = []
    for row in m:
        distinct, inverse = torch.unique(row, dim=0, return_inverse=True)
        cos = distinct @ distinct.T
        out.append(cos[inverse][:, inverse])
    return torch.stack(out) if out else m.new_zeros(0, m.shape[1], m.shape[1])


def merge_weights(sizes: torch.Tensor, slot: torch.Tensor, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(w [B, N], S [B, n_out]) in sizes' dtype: each input's weight in its slot (s_i / S_o, or
    1 / count_o when S_o = 0) and each slot's total size."""
    S = torch.zeros(sizes.shape[0], n_out, dtype=sizes.dtype, device=sizes.device).scatter_add_(1, slot, sizes)
    count = torch.zeros_like(S).scatter_add_(1, slot, torch.ones_like(sizes))
    S_i, count_i = S.gather(1, slot), count.gather(1, slot)
    return torch.where(S_i > 0, sizes / S_i.where(S_i > 0, torch.ones_like(S_i)), 1.0 / count_i), S


def merge_reference(x: torch.Tensor, sizes: torch.Tensor, slot: torch.Tensor, n_out: int):
    """(out [B, n_out, D] in x's dtype, out_sizes float32 [B, n_out]), accumulated in float64."""
    B, N, D = x.shape
    w, S = merge_weights(sizes.double(), slot, n_out)
    out = torch.zeros(B, n_out, D, dtype=torch.float64, device=x.device)
    out.scatter_add_(1, slot[..., None].expand(B, N, D), x.double() * w[..., None])
    return out.to(x.dtype), S.float()


def unmerge(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Dense tokens back from merged ones: x [B, n, D], source int64 [B, N0] (the merged token each
    original token ended in) -> [B, N0, D]. Every original token gets its merged token's value, so a
    mean over original tokens equals the size-weighted mean over merged tokens."""
    return x.gather(1, source[..., None].expand(*source.shape, x.shape[-1]))


def alternate_roles(batch: int, n: int, protected: torch.Tensor | None = None, device=None,
                    offset: torch.Tensor | None = None) -> torch.Tensor:
    """ToMe's split: even positions are sources (A), odd positions destinations (B), counted from
    ``offset`` (int64 [B], e.g. each row's first real token under left padding; default 0);
    ``protected`` (bool [B, n] or [n]) tokens get ROLE_KEEP."""
    pos = torch.arange(n, device=device).expand(batch, n)
    if offset is not None:
        pos = pos - offset.to(device)[:, None]
    roles = (pos % 2).to(torch.int8)
    if protected is not None:
        roles = roles.masked_fill(protected.to(device).expand(batch, n), ROLE_KEEP)
    return roles
