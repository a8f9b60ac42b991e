"""Sparse attention for the transformers models whose attention modules do not use the
``AttentionInterface``: Longformer and BigBird. :func:`slimformer.attention.sparsify` replaces
their self-attention modules with the modules here (which hold the *same* ``nn.Linear`` objects,
so no weight is copied and ``state_dict`` keys do not change); :func:`slimformer.attention.restore`
puts the original module objects back.

Longformer (``LongformerSelfAttention`` -> :class:`SparseLongformerSelfAttention`)
    HF's rule, kept exactly: a token that is neither global nor padding attends the keys within
    ``attention_window[layer] // 2`` positions on each side (``|i - j| <= w/2``) plus every global
    token (``global_attention_mask == 1``), with the ``query/key/value`` projections; a global token
    attends every non-padding key with the separate ``query_global/key_global/value_global``
    projections; padding queries output zeros. The local + attend-to-global rows run through
    :func:`slimformer.ops.sparse_attention` with ``SlidingWindow(w/2 + 1, causal=False,
    global_tokens=<that batch row's global positions>)`` (batch rows with the same global positions
    share one call; each distinct set has its own cached plan); the global rows (few) are plain
    torch, O(#global x n) per row. The kernel also computes the global rows with the local
    projections (the plan's global rows attend everything) and those are then overwritten, as HF
    does: O(#global x n) extra work, never n x n.

    ``pattern``: ``None`` or ``"model"`` = each layer's own ``config.attention_window``;
    ``SlidingWindow(w)`` = every layer uses ``|i - j| < w`` (HF's ``attention_window = 2 * (w - 1)``)
    instead; it must be bidirectional (``causal`` None or False) and have no ``global_tokens``
    (Longformer's global tokens come from ``global_attention_mask``, per batch row, and use the
    global projections). Other patterns raise.

BigBird (``BigBirdBlockSparseAttention`` / ``BigBirdSelfAttention`` -> :class:`SparseBigBirdSelfAttention`)
    Same ``query/key/value`` weights, plain softmax attention over the pattern's pairs and the
    padding mask. ``pattern``: any :class:`Pattern` (SlidingWindow, BigBird, BlockLayout; one
    pattern for every layer), or ``None`` / ``"model"`` = :class:`HFBigBirdLayout`, HF's own
    block-sparse layout per layer: blocks of ``config.block_size``, the 3-block window, the first
    and last block global, and HF's random blocks (``config.num_random_blocks`` per query block
    and head), drawn by HF's own functions with HF's seed (the layer index) exactly as HF draws
    them *in training mode*; full attention when the length is at most ``(5 + 2 r) x block_size``
    (where HF switches the model to ``original_full``).

    How HF's random blocks differ from this, and what equality holds:

    - HF training mode re-seeds numpy with the layer index on every forward, so its random blocks
      are fixed per (layer, length). ``"model"`` reproduces them: a sparsified model equals the
      unpatched HF ``block_sparse`` model *in training mode* (with dropout 0), in train and in eval
      mode alike (tested to ~1e-5).
    - HF eval mode draws no random blocks: every random slot points at block 0, whose keys then
      enter the softmax ``1 + num_random_blocks`` times (an extra weight, not a set of pairs). No
      pattern can express that; the sparsified model keeps the training-time random blocks in eval
      (the same function in both modes), so it does *not* equal HF's eval-mode block_sparse output.
    - HF's legacy plan for lengths 1024 / 3072 / 4096 can draw a random block inside the window
      (HF then counts it twice); a pattern is a set, so those lengths differ from HF too.
    - :class:`~slimformer.attention.BigBird` (our pattern) draws its random blocks with torch from
      its own ``seed``, uniformly among the blocks outside window and globals, independent of
      train/eval and of the layer; it is a different layout from HF's.
    - HF masks with an additive -10000 (block_sparse) or finfo.min (original_full); here masked
      pairs are excluded exactly. Equal in fp32 for every query that has an unmasked key.

    The model keeps choosing its mode as HF does (``block_sparse`` pads the sequence to a multiple
    of ``block_size``; a short input switches the model to ``original_full`` for good, an HF
    behaviour): the replacement module reads the padding from either mode's masks (in
    ``original_full`` mode HF builds its [B, 1, n, n] mask before the module sees it; only its
    first query row is read). A mode switch while sparsified keeps the replacement in place and
    records the module HF would have made, which :func:`restore` puts back.

Both: ``output_attentions`` raises (no attention matrix exists); attention dropout in training
mode raises unless ``sparsify(..., ignore_attention_dropout=True)`` (BigBird: only where HF applies
one, i.e. ``original_full`` mode); ``filter_fn`` leaves the modules it rejects as HF's own.
"""
from __future__ import annotations

import math
import types
from collections import OrderedDict

import torch
from torch import nn

from .patterns import LayoutPattern, Pattern, SlidingWindow

#: model_type -> class names of the self-attention modules that get replaced
REPLACED_CLASSES: dict[str, tuple[str, ...]] = {
    "longformer": ("LongformerSelfAttention",),
    "big_bird": ("BigBirdBlockSparseAttention", "BigBirdSelfAttention"),
}
#: model_type -> class names of the replacements (found by :func:`attention_modules` once sparsified)
REPLACEMENT_CLASSES: dict[str, tuple[str, ...]] = {
    "longformer": ("SparseLongformerSelfAttention",),
    "big_bird": ("SparseBigBirdSelfAttention",),
}


def _check_runtime(module: nn.Module, kwargs: dict, dropout: float, applies_dropout: bool = True) -> None:
    from .patching import check_runtime

    check_runtime(module, kwargs, dropout if applies_dropout else 0.0,
                  module.options.get("ignore_attention_dropout", False))


# -- Longformer ------------------------------------------------------------------------------------------
_WINDOW_PATTERNS: OrderedDict = OrderedDict()   # (window, global positions) -> SlidingWindow


class SparseLongformerSelfAttention(nn.Module):
    """Drop-in for ``LongformerSelfAttention`` (same call, same 1-tuple return, same weights)."""

    def __init__(self, original: nn.Module, pattern: Pattern | None, options: dict):
        super().__init__()
        self.num_heads, self.head_dim, self.embed_dim = original.num_heads, original.head_dim, original.embed_dim
        for name in ("query", "key", "value", "query_global", "key_global", "value_global"):
            setattr(self, name, getattr(original, name))    # the same nn.Linear objects
        self.dropout = original.dropout
        self.layer_id = original.layer_id
        self.one_sided_attn_window_size = original.one_sided_attn_window_size
        self.config = original.config
        self.options = options
        self.pattern = pattern
        self.window = pattern.window if pattern is not None else original.one_sided_attn_window_size + 1
        self.train(original.training)

    def extra_repr(self) -> str:
        return f"window={self.window} (|i - j| < window), heads={self.num_heads}, head_dim={self.head_dim}"

    def _window_pattern(self, global_tokens: tuple[int, ...]) -> SlidingWindow:
        """SlidingWindow for this window and these global positions, shared by all layers (LRU of
        64 patterns, each caching its plans per length)."""
        key = (self.window, global_tokens)
        pat = _WINDOW_PATTERNS.get(key)
        if pat is None:
            pat = SlidingWindow(self.window, causal=False, global_tokens=global_tokens)
            _WINDOW_PATTERNS[key] = pat
            if len(_WINDOW_PATTERNS) > 64:
                _WINDOW_PATTERNS.popitem(last=False)
        else:
            _WINDOW_PATTERNS.move_to_end(key)
        return pat

    def forward(self, hidden_states, attention_mask=None, is_index_masked=None, is_index_global_attn=None,
                is_global_attn=None, output_attentions=False, **kwargs):
        from ..ops import attention as _ops

        _check_runtime(self, {**kwargs, "output_attentions": output_attentions}, self.dropout)
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.embed_dim:
            raise ValueError(f"hidden_states must be [batch, seq, {self.embed_dim}], got {tuple(hidden_states.shape)}")
        bsz, seq, _ = hidden_states.shape
        if attention_mask is not None and tuple(attention_mask.shape) != (bsz, seq):
            raise ValueError(f"Longformer's layer mask must be [batch, seq] = [{bsz}, {seq}] (<0 padding, 0 local, "
                             f">0 global), got {tuple(attention_mask.shape)}")
        if is_index_masked is None:
            is_index_masked = attention_mask < 0 if attention_mask is not None else None
        if is_index_global_attn is None:
            is_index_global_attn = attention_mask > 0 if attention_mask is not None else None
        h, d = self.num_heads, self.head_dim
        scale = d ** -0.5

        def heads(x):  # [B, S, E] -> [B, H, S, D]
            return x.view(x.shape[0], x.shape[1], h, d).transpose(1, 2)

        q, k, v = heads(self.query(hidden_states)), heads(self.key(hidden_states)), heads(self.value(hidden_states))
        key_mask = None
        if is_index_masked is not None and bool(is_index_masked.any()):
            key_mask = (~is_index_masked.to(torch.bool)).contiguous()
        glob = None
        if is_index_global_attn is not None and bool(is_index_global_attn.any()):
            glob = is_index_global_attn.to(torch.bool)

        # local rows + attending the global tokens: one kernel call per distinct set of global positions
        if glob is None:
            plan = self._window_pattern(()).plan(seq, num_heads=h, device=q.device)
            out = _ops.sparse_attention(q, k, v, plan, key_mask=key_mask, scale=scale)
        else:
            groups: dict[tuple[int, ...], list[int]] = {}
            for b, row in enumerate(glob.cpu()):
                groups.setdefault(tuple(row.nonzero().flatten().tolist()), []).append(b)
            parts, order = [], []
            for tokens, rows in groups.items():
                plan = self._window_pattern(tokens).plan(seq, num_heads=h, device=q.device)
                if len(rows) == bsz:
                    sel = slice(None)
                else:
                    sel = torch.tensor(rows, device=q.device)
                km = None if key_mask is None else key_mask[sel].contiguous()
                parts.append(_ops.sparse_attention(q[sel].contiguous(), k[sel].contiguous(), v[sel].contiguous(),
                                                   plan, key_mask=km, scale=scale))
                order += rows
            out = parts[0] if len(parts) == 1 else torch.cat(parts)[torch.argsort(torch.tensor(order, device=q.device))]
        out = out.transpose(1, 2)                                     # [B, S, H, D]
        if key_mask is not None:                                      # HF: padding queries output zeros
            out = out.masked_fill(~key_mask[:, :, None, None], 0.0)

        # global rows: the global projections, attending every non-padding key
        if glob is not None:
            kg, vg = self.key_global(hidden_states), self.value_global(hidden_states)
            b_idx, s_idx = glob.nonzero(as_tuple=True)
            qg_all = self.query_global(hidden_states[b_idx, s_idx])   # [N, E]
            rows_out, start = [], 0
            counts = glob.sum(1).tolist()
            for b in range(bsz):
                n = counts[b]
                if not n:
                    continue
                qg = qg_all[start:start + n].view(n, h, d).transpose(0, 1)          # [H, n, D]
                start += n
                scores = (qg * scale) @ kg[b].view(seq, h, d).permute(1, 2, 0)        # [H, n, S]
                if key_mask is not None:
                    scores = scores.masked_fill(~key_mask[b][None, None, :], torch.finfo(scores.dtype).min)
                probs = torch.softmax(scores, dim=-1, dtype=torch.float32).type_as(scores)
                rows_out.append((probs @ vg[b].view(seq, h, d).transpose(0, 1)).transpose(0, 1))  # [n, H, D]
            out = out.index_put((b_idx, s_idx), torch.cat(rows_out))
        return (out.reshape(bsz, seq, self.embed_dim),)


def _longformer_pattern(pattern) -> SlidingWindow | None:
    if pattern is None or (isinstance(pattern, str) and pattern == "model"):
        return None
    if isinstance(pattern, SlidingWindow):
        if pattern.causal:
            raise ValueError(f"sparsify: Longformer attention is bidirectional; got a causal {pattern!r}")
        if pattern.global_tokens:
            raise ValueError(
                f"sparsify: Longformer's global tokens come from global_attention_mask (per batch row, with the "
                f"global projections); pass them there, not as SlidingWindow global_tokens ({pattern!r})")
        return pattern
    if isinstance(pattern, str):
        raise ValueError(f"sparsify: unknown pattern {pattern!r} for Longformer: use None / 'model' (the model's own "
                         "attention_window) or SlidingWindow(w)")
    if isinstance(pattern, Pattern):
        raise ValueError(f"sparsify: Longformer takes None / 'model' (its own attention_window) or SlidingWindow(w) "
                         f"(a window of its own); got {pattern!r}")
    raise TypeError(f"pattern must be None, 'model' or a slimformer.attention SlidingWindow for Longformer, got "
                    f"{type(pattern).__name__}")


# -- BigBird -----------------------------------------------------------------------------------------------
class HFBigBirdLayout(LayoutPattern):
    """HF BigBird's block-sparse layout for one layer, as HF draws it in training mode: blocks of
    ``block_size``; a query block attends the 3 blocks around it, the first and the last block
    (which attend everything), and ``num_random_blocks`` random blocks per head drawn by HF's own
    functions after ``np.random.seed(seed)`` (HF's seed is the layer index). Lengths are rounded up
    to whole blocks (as HF pads them); lengths of at most ``(5 + 2 r) x block_size`` attend
    everything (HF switches to ``original_full`` there). Bidirectional only."""

    causal = False

    def __init__(self, block_size: int, num_random_blocks: int, seed: int, max_seqlen: int):
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        self.block_size, self.num_random_blocks = block_size, int(num_random_blocks)
        self.seed, self.max_seqlen = int(seed), int(max_seqlen)
        self._freeze()

    def __repr__(self) -> str:
        return (f"HFBigBirdLayout(block_size={self.block_size}, num_random_blocks={self.num_random_blocks}, "
                f"seed={self.seed})")

    def layout(self, kv_len: int, num_heads: int) -> torch.Tensor:
        """bool [num_heads (1 without random blocks), nb, nb] for ``nb = ceil(kv_len / block_size)``."""
        cache = self.__dict__.setdefault("_layouts", {})
        key = (kv_len, num_heads)
        if key not in cache:
            if len(cache) > 16:
                cache.clear()
            cache[key] = self._build(kv_len, num_heads)
        return cache[key]

    def _build(self, kv_len: int, num_heads: int) -> torch.Tensor:
        import numpy as np
        from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention as HF

        bs, r = self.block_size, self.num_random_blocks
        nb = math.ceil(kv_len / bs)
        length = nb * bs
        if length <= (5 + 2 * r) * bs:
            return torch.ones(1, nb, nb, dtype=torch.bool)
        a = torch.arange(nb)
        glob = (a == 0) | (a == nb - 1)
        base = ((a[:, None] - a[None]).abs() <= 1) | glob[:, None] | glob[None]
        if r == 0:
            return base[None]
        stub = types.SimpleNamespace(training=True, _get_single_block_row_attention=HF._get_single_block_row_attention)
        state = np.random.get_state()
        try:  # HF's draw, bit for bit: the same seed, the same calls in the same order
            np.random.seed(self.seed)
            if length in (1024, 3072, 4096):
                rand = [HF._bigbird_block_rand_mask(stub, self.max_seqlen, self.max_seqlen, bs, bs, r,
                                                    last_idx=1024)[: nb - 2] for _ in range(num_heads)]
            else:
                plan_len, plan_r = HF._get_rand_attn_plan(length, bs, r)
                rand = HF._bigbird_block_rand_mask_with_head(stub, length, length, bs, bs, num_heads, plan_len, plan_r)
        finally:
            np.random.set_state(state)
        rand = torch.as_tensor(np.stack(rand), dtype=torch.long)                 # [H, nb - 2, r']
        lay = base[None].repeat(num_heads, 1, 1)
        rows = torch.arange(1, nb - 1)[None, :, None].expand_as(rand)
        heads = torch.arange(num_heads)[:, None, None].expand_as(rand)
        lay[heads, rows, rand] = True
        return lay

    def head_dependent(self) -> bool:
        return self.num_random_blocks > 0

    def _layout(self, q_len_abs, kv_len, num_heads, causal):
        return self.layout(kv_len, num_heads)

    def _make_plan(self, q_len, kv_len, q_offset, causal, num_heads):
        if self.block_size % 16:
            raise ValueError(f"HFBigBirdLayout needs block_size a multiple of 16 for the kernels, got {self.block_size}")
        return super()._make_plan(q_len, kv_len, q_offset, causal, num_heads)


class SparseBigBirdSelfAttention(nn.Module):
    """Drop-in for ``BigBirdBlockSparseAttention`` and ``BigBirdSelfAttention`` (either call form;
    returns ``(context [B, S, E], None)``), with the same query/key/value weights."""

    def __init__(self, original: nn.Module, pattern: Pattern, options: dict, attention_type: str, dropout: float):
        super().__init__()
        self.num_attention_heads = original.num_attention_heads
        self.attention_head_size = original.attention_head_size
        self.all_head_size = original.all_head_size
        self.query, self.key, self.value = original.query, original.key, original.value   # the same nn.Linear objects
        self.attention_probs_dropout_prob = float(dropout or 0.0)
        self.pattern = pattern
        self.options = options
        self.hf_attention_type = attention_type
        self.train(original.training)

    def extra_repr(self) -> str:
        return f"pattern={self.pattern!r}, hf_attention_type={self.hf_attention_type!r}"

    def forward(self, hidden_states, *args, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, cache=None, band_mask=None, from_mask=None, to_mask=None,
                from_blocked_mask=None, to_blocked_mask=None, **kwargs):
        from ..ops import attention as _ops

        _check_runtime(self, kwargs, self.attention_probs_dropout_prob,
                       applies_dropout=self.hf_attention_type == "original_full")
        if encoder_hidden_states is not None or cache is not None:
            raise NotImplementedError("slimformer sparse attention on BigBird covers encoder self-attention only "
                                      "(no cross-attention, no KV cache)")
        if args:  # block_sparse call: (band_mask, from_mask, to_mask, from_blocked_mask, to_blocked_mask)
            if len(args) > 5:
                raise TypeError(f"{type(self).__name__}.forward takes at most 5 positional masks, got {len(args)}")
            band_mask, from_mask, to_mask, from_blocked_mask, to_blocked_mask = (tuple(args) + (None,) * 5)[:5]
        bsz, seq, _ = hidden_states.shape
        key_mask = None
        if to_blocked_mask is not None:
            key_mask = to_blocked_mask.reshape(bsz, -1).to(torch.bool)
        elif attention_mask is not None:
            if attention_mask.dim() != 4 or attention_mask.shape[-1] != seq or attention_mask.shape[0] not in (1, bsz):
                raise ValueError(f"expected BigBird's [batch, 1, {seq}, {seq}] padding mask, got "
                                 f"{tuple(attention_mask.shape)}")
            row = attention_mask[:, 0, 0, :]
            key_mask = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
            key_mask = key_mask.expand(bsz, seq)
        if key_mask is not None:
            if key_mask.shape != (bsz, seq):
                raise ValueError(f"padding mask covers {tuple(key_mask.shape)}, hidden_states {bsz} x {seq}")
            key_mask = None if bool(key_mask.all()) else key_mask.contiguous()
        h, d = self.num_attention_heads, self.attention_head_size

        def heads(x):
            return x.view(bsz, seq, h, d).transpose(1, 2)

        q, k, v = heads(self.query(hidden_states)), heads(self.key(hidden_states)), heads(self.value(hidden_states))
        plan = self.pattern.plan(seq, causal=False, num_heads=h, device=q.device)
        out = _ops.sparse_attention(q, k, v, plan, key_mask=key_mask, scale=d ** -0.5)
        return out.transpose(1, 2).reshape(bsz, seq, self.all_head_size), None


def _bigbird_pattern(pattern, config, seed: int) -> Pattern:
    if pattern is None or (isinstance(pattern, str) and pattern == "model"):
        if config.block_size % 16:
            raise ValueError(f"sparsify: BigBird's own layout needs config.block_size a multiple of 16 (the kernels' "
                             f"tile granule), got {config.block_size}; pass a Pattern instead")
        return HFBigBirdLayout(config.block_size, config.num_random_blocks, seed, config.max_position_embeddings)
    if isinstance(pattern, str):
        raise ValueError(f"sparsify: unknown pattern {pattern!r} for BigBird: use None / 'model' (HF's own layout) "
                         "or a Pattern")
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be None, 'model' or a slimformer.attention Pattern (SlidingWindow, BigBird, "
                        f"BlockLayout), got {type(pattern).__name__}")
    return pattern


# -- install / remove ------------------------------------------------------------------------------------------
def check_pattern(model_type: str, pattern, config) -> None:
    """Raise (ValueError / TypeError) for a pattern this model type does not take, before any change."""
    if model_type == "longformer":
        _longformer_pattern(pattern)
    else:
        _bigbird_pattern(pattern, config, 0)


_ENTRY_ATTR = "_slimformer_sparse_entry"


def _bigbird_set_attention_type(self: nn.Module, value: str, layer_idx=None):
    """Bound to a ``BigBirdAttention`` instance while sparsified (a bound method, so that
    ``copy.deepcopy`` of the model rebinds it): HF's own ``set_attention_type`` runs on the original
    module (so ``restore`` gets back what HF would have now); the sparse module stays in place and
    learns the new mode."""
    entry = self.__dict__[_ENTRY_ATTR]
    ours = self.self
    self.self = entry["original"]
    try:
        type(self).set_attention_type(self, value, layer_idx=layer_idx)
        entry["original"] = self.self
    finally:
        self.self = ours
    ours.hf_attention_type = self.attention_type


def install(model: nn.Module, model_type: str, modules: list[tuple[str, nn.Module]], pattern, filter_fn,
            options: dict) -> list[dict]:
    """Replace the chosen modules (``modules`` are HF's originals); returns the restore records."""
    records = []
    for fqn, original in modules:
        if filter_fn is not None and not bool(filter_fn(original, fqn)):
            continue
        parent_name, _, name = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if model_type == "longformer":
            new = SparseLongformerSelfAttention(original, _longformer_pattern(pattern), options)
        else:
            seed = getattr(parent, "seed", None)
            seed = getattr(original, "seed", None) if seed is None else seed
            new = SparseBigBirdSelfAttention(original, _bigbird_pattern(pattern, model.config, int(seed or 0)),
                                             options, getattr(parent, "attention_type", model.config.attention_type),
                                             model.config.attention_probs_dropout_prob)
        entry = {"parent": parent, "name": name, "original": original, "module": new}
        setattr(parent, name, new)
        if model_type == "big_bird" and hasattr(parent, "set_attention_type"):
            parent.__dict__[_ENTRY_ATTR] = entry
            parent.__dict__["set_attention_type"] = types.MethodType(_bigbird_set_attention_type, parent)
        records.append(entry)
    return records


def uninstall(records: list[dict]) -> None:
    """Put the original modules back (their training flag follows the replacement's)."""
    for entry in reversed(records):
        parent, name, original, ours = entry["parent"], entry["name"], entry["original"], entry["module"]
        parent.__dict__.pop("set_attention_type", None)
        parent.__dict__.pop(_ENTRY_ATTR, None)
        original.train(ours.training)
        if getattr(parent, name) is ours:
            setattr(parent, name, original)


def originals(records: list[dict]) -> dict[int, nn.Module]:
    """id(replacement) -> original module, to list a sparsified model's HF modules."""
    return {id(e["module"]): e["original"] for e in records}


__all__ = ["HFBigBirdLayout", "REPLACED_CLASSES", "SparseBigBirdSelfAttention", "SparseLongformerSelfAttention",
           "check_pattern", "install", "uninstall"]
