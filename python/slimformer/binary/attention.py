"""Binarized attention (BiT) with optional BiPFT low-rank corrections, for transformers 5 models.

Route: an attention function registered with transformers' ``AttentionInterface`` under
:data:`ATTN_IMPLEMENTATION` (``"slimformer_binary"``), plus the eager mask function under the same
name with ``AttentionMaskInterface`` (without it, transformers passes ``attention_mask=None`` to
unknown implementations and causal / padding masking is silently lost). :func:`binarize` sets
``model.set_attn_implementation("slimformer_binary")``; each attention module (BertSelfAttention,
LlamaAttention, GPT2Attention, ...) gets a child :class:`BinaryAttention` named
``binary_attention`` that holds its quantizers, which the function reads from ``module``.

Per head, with Q, K, V [B, H, S, D] as the model computes them (after RoPE for Llama)::

    Qb, Kb, Vb = a_q * sign(Q), a_k * sign(K), a_v * sign(V)          (signed elastic)
    scores     = Qb Kb^T * scaling (+ BiPFT terms) + mask
    P          = softmax(scores) (float32, then the model's dtype)
    Pb         = a_p * round(clamp(P / a_p, 0, 1))                       (unsigned elastic, {0, a_p})
    out        = dropout(Pb) Vb (+ dropout(Pb) v_p for BiPFT)

BiPFT (``config.bipft``): from the hidden state h entering the attention module (captured by a
forward pre-hook), rank-1 maps per head q_p, q_m (hidden -> 1 value per query head), k_p, k_m
(hidden -> 1 value per key/value head) and v_p = (h . u_head) * w_head (hidden -> head_dim per
key/value head); ``scores += (q_m k_p^T + q_p k_m^T + q_p k_p^T) * scaling`` and
``out += Pb v_p``. q_p, k_p and w start at zero, so a freshly binarized model is plain BiT (every
correction is 0) while the gradients of all five maps are non-zero. BiPFT needs the keys' hidden
states, so it does not combine with a KV cache (``use_cache=False``) or cross-attention.

The returned attention weights (``output_attentions=True``) are ``P`` (``"soft"``, default) or
``Pb`` (``"binary"``), see :class:`~slimformer.binary.config.BinarizeConfig`. After
:func:`~slimformer.binary.freeze` the four quantizers are fixed (eval-mode) and this attention still
runs in PyTorch: its products are activation x activation, which the 1-bit weight kernels do not
cover.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.reference import repeat_kv
from .quantizers import ElasticBinarizer

ATTN_IMPLEMENTATION = "slimformer_binary"
MODULE_ATTR = "binary_attention"


class BinaryAttention(nn.Module):
    """Quantizers (and BiPFT maps) of one attention module; applied by :func:`binary_attention_forward`.

    ``query``, ``key``, ``value``: signed :class:`ElasticBinarizer`; ``probs``: unsigned.
    With ``bipft``: ``q_p``, ``q_m`` Linear(hidden, heads), ``k_p``, ``k_m`` Linear(hidden, kv_heads),
    ``v_u`` Linear(hidden, kv_heads) and ``v_w`` Parameter [kv_heads, head_dim] (v_p = v_u(h) * v_w).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, bipft: bool = False,
                 probs_output: str = "soft", device=None, dtype=None):
        super().__init__()
        self.query = ElasticBinarizer(signed=True, device=device)
        self.key = ElasticBinarizer(signed=True, device=device)
        self.value = ElasticBinarizer(signed=True, device=device)
        self.probs = ElasticBinarizer(signed=False, device=device)
        self.bipft, self.probs_output = bool(bipft), probs_output
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self._hidden = None  # set by the pre-hook for one forward
        if bipft:
            kw = dict(bias=False, device=device, dtype=dtype)
            self.q_p, self.q_m = nn.Linear(hidden_size, num_heads, **kw), nn.Linear(hidden_size, num_heads, **kw)
            self.k_p, self.k_m = nn.Linear(hidden_size, num_kv_heads, **kw), nn.Linear(hidden_size, num_kv_heads, **kw)
            self.v_u = nn.Linear(hidden_size, num_kv_heads, **kw)
            self.v_w = nn.Parameter(torch.zeros(num_kv_heads, head_dim, device=device, dtype=dtype))
            std = hidden_size ** -0.5
            for lin in (self.q_m, self.k_m, self.v_u):
                nn.init.normal_(lin.weight, std=std)
            for lin in (self.q_p, self.k_p):
                nn.init.zeros_(lin.weight)

    def freeze(self) -> None:
        """Fixed quantizers (parameters -> buffers); BiPFT maps stop requiring gradients."""
        for q in (self.query, self.key, self.value, self.probs):
            q.freeze()
        for p in self.parameters():
            p.requires_grad_(False)

    def low_rank(self, hidden: torch.Tensor):
        """BiPFT maps of hidden [B, S, hidden] -> q_p, q_m [B, H, S, 1]; k_p, k_m [B, Hkv, S, 1];
        v_p [B, Hkv, S, D]."""
        def heads(t):  # [B, S, n] -> [B, n, S, 1]
            return t.transpose(1, 2).unsqueeze(-1)

        v_p = heads(self.v_u(hidden)) * self.v_w[None, :, None, :]
        return heads(self.q_p(hidden)), heads(self.q_m(hidden)), heads(self.k_p(hidden)), heads(self.k_m(hidden)), v_p

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, bipft={self.bipft}, "
                f"probs_output={self.probs_output!r}")


def capture_hidden_pre_hook(module: nn.Module, args, kwargs):
    """Forward pre-hook (with_kwargs) on an attention module: keep the hidden state it receives for
    the BiPFT maps (first positional argument or ``hidden_states=``)."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    getattr(module, MODULE_ATTR)._hidden = hidden
    return None


def binary_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None,
                             dropout: float = 0.0, **kwargs):
    """transformers attention function: query [B, H, S, D], key/value [B, Hkv, T, D], additive
    float mask [B, 1, S, T] or None -> (out [B, S, H, D], weights [B, H, S, T]).

    Modules without a ``binary_attention`` child (e.g. cross-attention, or attention left alone)
    get plain eager attention."""
    quant: BinaryAttention | None = getattr(module, MODULE_ATTR, None)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    groups = heads // kv_heads
    hidden = None
    if quant is not None:
        hidden, quant._hidden = quant._hidden, None
        query, key, value = quant.query(query), quant.key(key), quant.value(value)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    v_p = None
    if quant is not None and quant.bipft:
        if hidden is None or hidden.shape[1] != query.shape[2] or key.shape[2] != query.shape[2]:
            raise NotImplementedError(
                "BiPFT needs the hidden states of all keys: it supports self-attention without a KV cache only "
                "(pass use_cache=False)")
        q_p, q_m, k_p, k_m, v_p = quant.low_rank(hidden.to(quant.v_w.dtype))
        k_p, k_m, v_p = repeat_kv(k_p, groups), repeat_kv(k_m, groups), repeat_kv(v_p, groups)
        extra = q_m @ k_p.transpose(2, 3) + q_p @ k_m.transpose(2, 3) + q_p @ k_p.transpose(2, 3)
        scores = scores + (extra * scaling).to(scores.dtype)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    used = quant.probs(probs) if quant is not None else probs
    dropped = F.dropout(used, p=dropout, training=module.training)
    out = torch.matmul(dropped, value)
    if v_p is not None:
        out = out + torch.matmul(dropped, v_p.to(out.dtype))
    out = out.transpose(1, 2).contiguous()
    returned = used if quant is not None and quant.probs_output == "binary" else probs
    return out, returned


def register() -> str:
    """Register the attention and mask functions with transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, binary_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)
    return ATTN_IMPLEMENTATION
