"""Sparse attention patched into Hugging Face transformers 5 models, in place.

:func:`sparsify` makes every self-attention of a supported model run
:func:`slimformer.ops.sparse_attention` over a :class:`~slimformer.attention.Pattern`;
:func:`restore` puts the model's previous attention implementation back. Example (runs as is)::

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from slimformer.attention import SlidingWindow, restore, sparsify

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 300))
    sparsify(model, SlidingWindow(128))           # each token sees itself and the 127 before it
    logits = model(ids).logits                    # no 300 x 300 mask or score matrix is ever built
    out = model.generate(ids[:, :20], max_new_tokens=10, do_sample=False)   # KV cache: O(window) a token
    sparsify(model, SlidingWindow(64))            # change the pattern: call sparsify again
    restore(model)                                # the model's own attention again, bit for bit

How it routes (transformers 5 ``AttentionInterface``): an attention function and a mask function
are registered under :data:`ATTN_IMPLEMENTATION` (``"slimformer_sparse"``) and the model is switched
to it with ``model.set_attn_implementation``. The *mask function* is called once per forward by the
model's ``create_causal_mask`` / ``create_bidirectional_mask``; instead of an n x n mask it returns a
:class:`SparseMaskInfo` (the 2D padding mask as bool ``[B, kv_len]`` or None, whether the model's
mask is causal, and where the queries sit among the keys). The *attention function* reads the
pattern from the attention module (attribute :data:`PATTERN_ATTR`), asks it for a cached block
plan and calls the kernel. Nothing n x n is ever built.

Semantics:

- causal: a pattern with ``causal=None`` follows the model (decoder LMs causal, encoders
  bidirectional, as the model's own mask function says); ``True`` / ``False`` force it.
- padding: the usual 2D ``attention_mask`` (1 = keep) masks keys. A query with no allowed key
  (e.g. a left-padding position in a causal model) outputs zeros, never NaN.
- KV cache (``generate``, ``use_cache=True``): the queries sit at ``q_offset = kv_len - q_len``
  (transformers' ``cache.get_query_offset``), so one decoded token visits only the key tiles its
  window reaches: O(window) per token. For patterns whose rule for a position does not depend on
  the sequence length (:class:`SlidingWindow`, :class:`BlockLayout`) decoding equals recomputing
  the whole sequence. :class:`BigBird` places its last global block and draws its random blocks
  for the current length, so with a cache every step uses the layout of its own length.
- ``output_attentions=True`` raises: no attention matrix exists to return.
- attention dropout: the kernel has none. In training mode with attention dropout > 0 the call
  raises, unless ``sparsify(..., ignore_attention_dropout=True)`` (then it is skipped, knowingly).
- ``filter_fn(module, fqn) -> bool`` picks the attention modules that get the pattern; the others
  run full attention through the same kernel (a window covering every key).

Supported: Llama (SmolLM2), Mistral and Qwen2 (GQA, RoPE; without their own sliding window),
GPT-2, BERT and RoBERTa (self-attention; not as decoders with cross-attention), ViT. Other models
raise with this list.

Longformer and BigBird (encoders) have attention modules of their own that do not call the
``AttentionInterface``: for them :func:`sparsify` *replaces* each self-attention module with one
from :mod:`.hf_modules` holding the same weights (``restore`` puts the original objects back), and
``pattern`` may also be ``None`` / ``"model"``: the model's own sparsity (Longformer's
``attention_window`` with its ``global_attention_mask``; BigBird's block layout with HF's
training-time random blocks). See :mod:`.hf_modules` for their exact semantics (Longformer takes
only ``SlidingWindow`` otherwise; ``filter_fn`` leaves the rejected modules as HF's own).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import hf_modules as _hf
from .patterns import Pattern, SlidingWindow

ATTN_IMPLEMENTATION = "slimformer_sparse"
#: attribute of each patched attention module holding its :class:`Pattern`
PATTERN_ATTR = "slimformer_sparse_pattern"
#: attribute of the patched model: the implementation to go back to, and options
_STATE_ATTR = "_slimformer_sparse_state"

#: model_type -> names of the self-attention classes: those that call the AttentionInterface (transformers 5.x),
#: and for longformer / big_bird those that .hf_modules replaces
SUPPORTED_MODELS: dict[str, tuple[str, ...]] = {
    "llama": ("LlamaAttention",),
    "mistral": ("MistralAttention",),
    "qwen2": ("Qwen2Attention",),
    "gpt2": ("GPT2Attention",),
    "bert": ("BertSelfAttention",),
    "roberta": ("RobertaSelfAttention",),
    "vit": ("ViTAttention", "ViTSelfAttention"),
    # attention modules of their own: replaced by .hf_modules (see there)
    "longformer": _hf.REPLACED_CLASSES["longformer"],
    "big_bird": _hf.REPLACED_CLASSES["big_bird"],
}

# every key allowed: the pattern of the attention modules that filter_fn leaves dense
_FULL = SlidingWindow(1 << 30)


@dataclass(frozen=True)
class SparseMaskInfo:
    """What the mask function hands the attention function in place of an n x n mask.

    ``key_mask``: bool [B, kv_len] (False = padding key) or None (no padding); ``causal``: the
    model's mask is causal; ``q_offset``: position of the first query among the ``kv_len`` keys
    held (``kv_len - q_len`` when decoding with a cache)."""

    key_mask: torch.Tensor | None
    causal: bool
    q_offset: int
    q_len: int
    kv_len: int


# -- the functions registered with transformers ----------------------------------------------------
def sparse_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                mask_function: Callable | None = None, attention_mask: torch.Tensor | None = None,
                **kwargs) -> SparseMaskInfo:
    """transformers mask function (``AttentionMaskInterface``): returns a :class:`SparseMaskInfo`
    built from the 2D padding mask, the model's mask kind and the cache offsets, O(batch x kv_len)."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    if mask_function is causal_mask_function:
        causal = True
    elif mask_function is bidirectional_mask_function:
        causal = False
    else:
        raise NotImplementedError(
            "slimformer sparse attention: the model combined its causal/bidirectional mask with another rule "
            f"({getattr(mask_function, '__name__', mask_function)!r}: a sliding window of its own, packed sequences "
            "found in position_ids, or an extra or/and mask function). A sparse pattern replaces the model's "
            "attention pattern and takes only a padding mask: remove the model's own window "
            "(config.sliding_window = None) and pass position_ids that restart only with a new batch row, or "
            "restore() the model first")
    if isinstance(q_offset, torch.Tensor):
        q_offset = int(q_offset)
    key_mask = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"expected a 2D padding mask [batch, keys], got {tuple(attention_mask.shape)}")
        if attention_mask.shape[-1] < kv_offset + kv_length:  # static cache: slots not yet written
            attention_mask = nn.functional.pad(attention_mask, (0, kv_offset + kv_length - attention_mask.shape[-1]))
        key_mask = attention_mask[:, kv_offset: kv_offset + kv_length].to(torch.bool)
        if key_mask.shape[0] != batch_size:
            key_mask = key_mask.expand(batch_size, -1)
        if not torch.compiler.is_compiling() and bool(key_mask.all()):  # (no data-dependent branch when compiled)
            key_mask = None
        else:
            key_mask = key_mask.contiguous()
    return SparseMaskInfo(key_mask=key_mask, causal=causal, q_offset=int(q_offset) - int(kv_offset),
                          q_len=int(q_length), kv_len=int(kv_length))


def _attentions_requested(kwargs: dict) -> bool:
    if kwargs.get("output_attentions"):
        return True
    try:  # transformers 5 records attention weights with hooks while this context variable is set
        from transformers.utils.output_capturing import _active_collector
        return "attentions" in (_active_collector.get() or {})
    except (ImportError, AttributeError, LookupError):  # pragma: no cover (other transformers versions)
        return False


def check_runtime(module: nn.Module, kwargs: dict, dropout: float, ignore_dropout: bool) -> None:
    """What the sparse kernels cannot do raises instead of being skipped silently: attention
    weights (``output_attentions``) and attention dropout in training."""
    if _attentions_requested(kwargs):
        raise NotImplementedError(
            "output_attentions=True is not available with slimformer sparse attention: the kernel never forms "
            "the attention matrix. restore(model) (or use a dense copy) to inspect attention weights")
    if module.training and dropout and dropout > 0 and not ignore_dropout:
        raise NotImplementedError(
            f"attention dropout {dropout} in training mode: slimformer sparse attention has no attention dropout. "
            "Set the model's attention dropout to 0 (config.attention_dropout / attention_probs_dropout_prob / "
            "attn_pdrop and the attention modules' dropout), call model.eval(), or sparsify(..., "
            "ignore_attention_dropout=True) to train without it")


def sparse_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """transformers attention function: query [B, Hq, Sq, D], key/value [B, Hkv, Sk, D] (GQA: Hq a
    multiple of Hkv), ``attention_mask`` a :class:`SparseMaskInfo` -> (out [B, Sq, Hq, D], None)."""
    from ..ops import attention as _ops

    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError(
            f"{type(module).__name__} has a sliding window of its own ({kwargs['sliding_window']}); a sparse pattern "
            "replaces the model's pattern: set config.sliding_window = None and use SlidingWindow(w) instead")
    state = getattr(module, "_slimformer_sparse_options", None) or {}
    check_runtime(module, kwargs, dropout, state.get("ignore_attention_dropout", False))
    q_len, kv_len = query.shape[2], key.shape[2]
    if isinstance(attention_mask, SparseMaskInfo):
        info = attention_mask
        if (info.q_len, info.kv_len) != (q_len, kv_len):
            raise ValueError(f"the mask was made for {info.q_len} queries over {info.kv_len} keys; "
                             f"{type(module).__name__} has {q_len} queries over {kv_len} keys")
        causal, q_offset, key_mask = info.causal, info.q_offset, info.key_mask
    elif attention_mask is None:
        # no mask function ran (e.g. a cache type that skips masks): the module says whether it is causal
        causal, q_offset, key_mask = bool(getattr(module, "is_causal", False)), kv_len - q_len, None
    else:
        raise ValueError(
            "slimformer sparse attention takes a 2D padding mask [batch, keys] (1 = keep); got a ready-made "
            f"{type(attention_mask).__name__} of shape {tuple(getattr(attention_mask, 'shape', ()))}, which would "
            "be n x n. Express the rule as a pattern (BlockLayout, SlidingWindow(global_tokens=...)) instead")
    pattern = getattr(module, PATTERN_ATTR, None)
    if pattern is None:
        pattern = _FULL
    if key_mask is not None and key_mask.device != query.device:
        key_mask = key_mask.to(query.device)
    plan = pattern.plan(q_len, kv_len, causal=causal, q_offset=q_offset, num_heads=query.shape[1],
                        device=query.device)
    out = _ops.sparse_attention(query, key, value, plan, key_mask=key_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _keep_padding_mask(*, attention_mask=None, **kwargs):
    """Stands in for ``model.create_masks_for_generate`` while sparsified (see :func:`sparsify`)."""
    return attention_mask


def register() -> str:
    """Register the attention and mask functions with transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, sparse_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sparse_mask)
    return ATTN_IMPLEMENTATION


# -- patching ------------------------------------------------------------------------------------------
def _unsupported(model: nn.Module, why: str) -> ValueError:
    names = ", ".join(sorted(set(SUPPORTED_MODELS) - set(_hf.REPLACED_CLASSES)))
    replaced = ", ".join(sorted(_hf.REPLACED_CLASSES))
    return ValueError(f"sparsify: {type(model).__name__} {why}. Supported model types: {names} (transformers 5 "
                      f"models whose attention goes through AttentionInterface), and {replaced} (their attention "
                      "modules replaced)")


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (fqn, module) self-attention modules of a supported model that the pattern applies to."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise _unsupported(model, "is not a transformers PreTrainedModel")
    if model_type not in SUPPORTED_MODELS:
        raise _unsupported(model, f"(model_type {model_type!r}) is not supported")
    if getattr(config, "add_cross_attention", False) or getattr(config, "is_encoder_decoder", False):
        raise _unsupported(model, "has cross-attention, which sparse patterns do not cover")
    if model_type in _hf.REPLACED_CLASSES and getattr(config, "is_decoder", False):
        raise _unsupported(model, f"is a {model_type} decoder; its sparse attention covers the encoder only")
    if getattr(config, "sliding_window", None) is not None and (
            model_type == "mistral" or "sliding_attention" in (getattr(config, "layer_types", None) or ())):
        raise ValueError(
            f"sparsify: this {model_type} model has a sliding window of its own (config.sliding_window = "
            f"{config.sliding_window}) and a cache that drops old keys; a sparse pattern replaces the model's "
            "pattern. Set model.config.sliding_window = None (Qwen2: build it with use_sliding_window=False) and "
            f"pass SlidingWindow({config.sliding_window}) to keep the same window")
    names = SUPPORTED_MODELS[model_type] + _hf.REPLACEMENT_CLASSES.get(model_type, ())
    mods = [(fqn, m) for fqn, m in model.named_modules() if type(m).__name__ in names]
    if not mods:
        raise _unsupported(model, f"has no {'/'.join(names)} module (a transformers version this code does not know?)")
    return mods


def sparsify(model: nn.Module, pattern: Pattern | str | None, *,
             filter_fn: Callable[[nn.Module, str], bool] | None = None,
             ignore_attention_dropout: bool = False) -> nn.Module:
    """Run ``model``'s self-attention through the sparse kernel with ``pattern``, in place; returns it.

    ``filter_fn(module, fqn)`` chooses the attention modules that get ``pattern`` (default all); the
    rest run full attention with the same kernel (Longformer / BigBird: the rest keep HF's own
    modules). Calling it again on a sparsified model changes the pattern (the implementation to
    restore stays the original one). Raises ValueError for an unsupported model and TypeError for a
    non-pattern. Longformer / BigBird also take ``None`` / ``"model"`` (see :mod:`.hf_modules`)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _hf.REPLACED_CLASSES and hasattr(model, "set_attn_implementation"):
        return _sparsify_replacing(model, model_type, pattern, filter_fn, ignore_attention_dropout)
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a slimformer.attention Pattern (SlidingWindow, BigBird, BlockLayout), "
                        f"got {type(pattern).__name__}")
    mods = attention_modules(model)
    register()
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        state = {"previous": model.config._attn_implementation}
    options = {"ignore_attention_dropout": bool(ignore_attention_dropout)}
    for fqn, m in mods:
        chosen = filter_fn is None or bool(filter_fn(m, fqn))
        setattr(m, PATTERN_ATTR, pattern if chosen else None)
        m._slimformer_sparse_options = options
    # generate() with a compileable (static) cache precomputes each step's mask and passes the result
    # back in as attention_mask, where transformers accepts only tensors: keep the 2D padding mask
    # instead, so the model's own mask call reaches sparse_mask with the cache's offsets.
    model.__dict__["create_masks_for_generate"] = _keep_padding_mask
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise RuntimeError(f"{type(model).__name__} refused attn_implementation {ATTN_IMPLEMENTATION!r}")
    setattr(model, _STATE_ATTR, state)
    return model


def _sparsify_replacing(model: nn.Module, model_type: str, pattern, filter_fn, ignore_attention_dropout: bool):
    """Longformer / BigBird: swap their self-attention modules for those of :mod:`.hf_modules`."""
    _hf.check_pattern(model_type, pattern, model.config)
    mods = attention_modules(model)
    state = getattr(model, _STATE_ATTR, None)
    if state is not None:        # changing the pattern: back to HF's modules first
        originals = _hf.originals(state["replaced"])
        mods = [(fqn, originals.get(id(m), m)) for fqn, m in mods]
        _hf.uninstall(state["replaced"])
        delattr(model, _STATE_ATTR)
    options = {"ignore_attention_dropout": bool(ignore_attention_dropout)}
    records = _hf.install(model, model_type, mods, pattern, filter_fn, options)
    setattr(model, _STATE_ATTR, {"previous": None, "replaced": records})
    return model


def is_sparsified(model: nn.Module) -> bool:
    """True between :func:`sparsify` and :func:`restore`."""
    return getattr(model, _STATE_ATTR, None) is not None


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`sparsify`: the previous attention implementation, no per-module state. In place;
    a model that is not sparsified is returned unchanged."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return model
    if "replaced" in state:      # Longformer / BigBird: the original module objects go back
        _hf.uninstall(state["replaced"])
        delattr(model, _STATE_ATTR)
        return model
    model.__dict__.pop("create_masks_for_generate", None)
    for m in model.modules():
        for attr in (PATTERN_ATTR, "_slimformer_sparse_options"):
            if attr in m.__dict__:
                delattr(m, attr)
    model.set_attn_implementation(state["previous"])
    delattr(model, _STATE_ATTR)
    return model
