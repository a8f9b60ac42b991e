"""Zero-TPrune's token importance: weighted PageRank on the attention graph."""
from __future__ import annotations

import torch

from .reference import ROLE_DESTINATION, ROLE_KEEP, ROLE_SOURCE


def token_importance(attn: torch.Tensor, sizes: torch.Tensor | None = None, iters: int = 30) -> torch.Tensor:
    """Importance s [B, N] float32 of every token from attention probabilities ``attn`` [B, H, N, N]
    (rows sum to 1): s <- mean_h(A_h)^T s, iterated from the uniform distribution over real tokens
    (size > 0). A token is important when important tokens attend to it. Each step keeps sum(s) = 1."""
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn must be [B, H, N, N]; got {tuple(attn.shape)}")
    graph = attn.float().mean(1)  # [B, N, N]
    B, N, _ = graph.shape
    real = torch.ones(B, N, device=attn.device) if sizes is None else (sizes > 0).float()
    s = real / real.sum(1, keepdim=True).clamp_min(1.0)
    for _ in range(iters):
        s = torch.bmm(s.unsqueeze(1), graph).squeeze(1)
        s = s / s.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return s


def importance_roles(importance: torch.Tensor, protected: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Roles int8 [B, N] for importance-guided merging: in each row, the padding (size 0) and the
    (real - protected) // 2 least important real unprotected tokens are sources (ties: lower index
    first), the other unprotected tokens destinations, protected tokens kept. A padded row thus gets
    the roles it would get alone."""
    real = sizes > 0
    key = importance.float().masked_fill(~real, float("-inf")).masked_fill(protected, float("inf"))
    order = torch.sort(key, dim=1, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    num_real_free = (real & ~protected).sum(1)
    num_sources = (~real & ~protected).sum(1) + num_real_free // 2
    roles = torch.where(rank < num_sources[:, None], ROLE_SOURCE, ROLE_DESTINATION).to(torch.int8)
    return roles.masked_fill_(protected, ROLE_KEEP)
