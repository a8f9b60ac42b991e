"""Token merging patched into Hugging Face encoders, in place.

Every layer of the encoder stack gets a forward that runs the layer's own modules in its own
order and, between attention and MLP, merges ``r`` tokens:

    x = x + attention(norm1(x), bias)         (post-LN models: x = attention(x, bias), norms inside)
    metric = keys of norm1(x) averaged over heads
    x, sizes = merge(x, sizes, match(metric, sizes, roles, r))
    x = x + mlp(norm2(x))

``sizes`` (how many input tokens each token stands for) drives proportional attention (log s added
to the attention logits) and size-weighted merging. Padding is a size of 0: such keys get a bias of
-inf-like, padding merges only after every real token that can, and a padded row merges exactly as it
would alone. With ``unmerge`` the stack's output is expanded back to the input tokens, so heads,
masks and mean pooling see the usual shape (a mean over input tokens is the size-weighted mean over
merged tokens). Intermediate hidden states (``output_hidden_states=True``) are the merged tokens
of each layer, so they shrink layer by layer.

The per-forward state lives in ``model.tome``: one forward at a time per patched model (no
concurrent calls from several threads), and no gradient checkpointing (it would replay layers on
merged tokens; it raises).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .importance import importance_roles, token_importance
from .reference import ROLE_SOURCE, alternate_roles, unmerge
from .schedule import parse_r, token_counts

MODES = ("tome", "zero-tprune")


@dataclass(frozen=True)
class _Family:
    """Where a layer keeps its pieces. Pre-LN: x + drop(scale(attn(norm1(x)))), then the same with
    norm2 and mlp. Post-LN (BERT): the attention module adds and normalises; ``feed_forward_chunk``
    does the MLP."""
    name: str
    protect: tuple[int, ...]
    pre_norm: bool = True
    norm1: str = ""
    attn: str = "attention"
    scale1: str | None = None
    drop1: str | None = None
    norm2: str = ""
    mlp: str = "mlp"
    scale2: str | None = None
    drop2: str | None = None


_VIT = dict(norm1="layernorm_before", drop1="dropout", norm2="layernorm_after", drop2="dropout")
_BERT = _Family("bert", (0,), pre_norm=False)
_FAMILIES = {
    "ViTLayer": _Family("vit", (0,), **_VIT),
    "DeiTLayer": _Family("deit", (0, 1), **_VIT),  # CLS and distillation tokens
    "CLIPEncoderLayer": _Family("clip-vision", (0,), norm1="layer_norm1", attn="self_attn", norm2="layer_norm2"),
    "Dinov2Layer": _Family("dinov2", (0,), norm1="norm1", scale1="layer_scale1", drop1="drop_path", norm2="norm2",
                           scale2="layer_scale2", drop2="drop_path"),
    "BertLayer": _BERT, "RobertaLayer": _BERT, "XLMRobertaLayer": _BERT, "ElectraLayer": _BERT,
    "CamembertLayer": _BERT,
}
SUPPORTED_MODELS = ("ViT", "DeiT", "CLIP (vision tower)", "Dinov2", "BERT", "RoBERTa", "XLM-RoBERTa", "ELECTRA",
                    "CamemBERT")


class ToMeState:
    """Token merging settings of a patched model (``model.tome``) and what the last forward did.

    Settings (plain attributes; change them between calls):
      r            int, per-layer list, or (r, inflect) schedule (:func:`slimformer.tome.parse_r`)
      prop_attn    add log(size) to the attention logits (proportional attention)
      protect      token positions (of the input) that never merge; None = the architecture's
                   (CLS; DeiT: CLS and distillation token)
      mode         "tome" (alternate source/destination split) or "zero-tprune" (the less important
                   half by attention-graph PageRank are the sources; needs attention probabilities,
                   so it runs the model's eager attention)
      unmerge      expand the stack's output back to the input tokens
      importance_iters  PageRank iterations of "zero-tprune"
    After a forward: ``sizes`` float32 [B, n_out], ``source`` int64 [B, N] (output token each input
    token ended in; None when nothing merged), ``tokens_per_layer`` (tokens entering each layer, then
    leaving the stack).
    """

    def __init__(self, model: nn.Module, family: _Family, layers: Sequence[nn.Module], *, r, prop_attn, protect,
                 mode, unmerge, importance_iters):
        self.r = r
        self.prop_attn = prop_attn
        self.protect = protect
        self.mode = mode
        self.unmerge = unmerge
        self.importance_iters = importance_iters
        self.family = family.name
        self.num_layers = len(layers)
        self.sizes: torch.Tensor | None = None
        self.source: torch.Tensor | None = None
        self.tokens_per_layer: list[int] = []
        self._family = family
        self._model = model
        self._layers = list(layers)
        self._original_attn: str | None = None
        self._counts: list[int] = []
        self._protect: tuple[int, ...] = ()
        self._active = False

    def __repr__(self) -> str:
        return (f"ToMeState(family={self.family!r}, r={self.r!r}, prop_attn={self.prop_attn}, mode={self.mode!r}, "
                f"protect={self.protect!r}, unmerge={self.unmerge}, layers={self.num_layers})")

    # -- per forward -------------------------------------------------------------------------------
    def begin(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
        """Called by the first layer: validates the settings against this input and resets the
        per-forward state. Returns whether anything merges (otherwise the original forwards run)."""
        if self.mode not in MODES:
            raise ValueError(f"model.tome.mode must be one of {MODES}, got {self.mode!r}")
        if any(getattr(layer, "gradient_checkpointing", False) and layer.training for layer in self._layers):
            raise ValueError("token merging cannot run under gradient checkpointing: the recomputed layers would "
                             "see merged tokens; call model.gradient_checkpointing_disable()")
        counts = parse_r(self.num_layers, self.r)
        B, n = x.shape[:2]
        protect = self._family.protect if self.protect is None else tuple(int(p) for p in self.protect)
        bad = [p for p in protect if not 0 <= p < n]
        if bad:
            raise ValueError(f"protected token positions {bad} are outside the {n} input tokens")
        protect = tuple(sorted(set(protect)))
        self._exact = not isinstance(self.r, (numbers.Integral, tuple))
        counts = _fit_schedule(counts, n, len(protect), self._exact)
        self._counts, self._protect, self._n0 = counts, protect, n
        self.tokens_per_layer = token_counts(n, counts)
        self.source = self.sizes = None
        self._padded = False
        if not any(counts):
            self._use_attention(eager=False)
            return False
        if attention_mask is not None:
            self.sizes = _key_padding_sizes(attention_mask, B, n)
            self._padded = self.sizes is not None
        # Protected positions count from each row's first real token, so that left padding changes
        # nothing (a padded row merges as it would alone).
        where = torch.tensor(protect, dtype=torch.long, device=x.device).expand(B, -1)
        if self._padded:
            where = (where + _first_real(self.sizes)[:, None]).clamp_max(n - 1)
        self._protect_at = where
        self._use_attention(eager=self.mode == "zero-tprune")
        return True

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """[B, 1, 1, n] added to the attention logits: log(size) with proportional attention, else 0;
        size-0 (padding) keys get the dtype's lowest value. None when it would be all zeros."""
        if self.sizes is None or not (self.prop_attn or self._padded):
            return None
        s = self.sizes
        low = torch.finfo(dtype).min
        bias = torch.where(s > 0, s.log() if self.prop_attn else torch.zeros_like(s), torch.full_like(s, low))
        return bias.to(dtype)[:, None, None, :]

    def merge(self, layer: nn.Module, x: torch.Tensor, attn_input: torch.Tensor, attn_probs, index: int):
        r = self._counts[index]
        if r == 0:
            return x
        B, n, _ = x.shape
        sizes = self.sizes if self.sizes is not None else x.new_ones(B, n, dtype=torch.float32)
        with torch.no_grad():
            metric = _key_metric(layer._tome_key, layer._tome_heads, attn_input)
            where = self._protect_at if self.source is None else self.source.gather(1, self._protect_at)
            protected = torch.zeros(B, n, dtype=torch.bool, device=x.device).scatter_(1, where, True)
            if self.mode == "tome":
                offset = _first_real(sizes) if self._padded else None
                roles = alternate_roles(B, n, protected, device=x.device, offset=offset)
            else:
                if attn_probs is None:
                    raise RuntimeError("zero-tprune needs attention probabilities; the attention module returned none")
                importance = token_importance(attn_probs, sizes, self.importance_iters)
                roles = importance_roles(importance, protected, sizes)
            r = self._fit_layer(r, roles, index, n)
            slot = ops.tome_match(metric, sizes, roles, r).slot
        x, self.sizes = ops.tome_merge(x, sizes, slot, n - r)
        self.source = slot if self.source is None else slot.gather(1, self.source)
        return x

    def _fit_layer(self, r: int, roles: torch.Tensor, index: int, n: int) -> int:
        """r against the sources this layer really has (protected tokens among them, padding):
        clamped for int / (r, inflect) schedules after the first layer, else ValueError."""
        available = int((roles == ROLE_SOURCE).sum(1).min())
        if r > available:
            if self._exact or index == 0:
                raise ValueError(f"r = {r} at layer {index} is larger than possible: {n} tokens with protected "
                                 f"positions {self._protect} give only {available} tokens that can merge")
            r = available
            self._counts[index] = r
            self.tokens_per_layer = token_counts(self._n0, self._counts)
        return r

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        if self.unmerge and self.source is not None:
            return unmerge(x, self.source)
        return x

    # -- attention implementation ----------------------------------------------------------------
    def _use_attention(self, eager: bool) -> None:
        config = getattr(self._model, "config", None)
        current = getattr(config, "_attn_implementation", None)
        if eager and current != "eager":
            if not hasattr(self._model, "set_attn_implementation"):
                raise ValueError("zero-tprune switches the model to eager attention; apply token merging to the "
                                 f"transformers model itself, not to a {type(self._model).__name__}")
            self._original_attn = self._original_attn or current
            self._model.set_attn_implementation("eager")
        elif not eager and self._original_attn is not None:
            self._model.set_attn_implementation(self._original_attn)
            self._original_attn = None


def _fit_schedule(counts: list[int], n: int, num_protected: int, exact: bool) -> list[int]:
    """Per-layer counts that fit: a layer with t tokens can merge at most (t - protected) // 2. An int
    or (r, inflect) schedule is clamped to that from the second layer on (ToMe's rule: r = 16 on
    ViT-B/16 merges only 10 at the last layer); an explicit per-layer list, or a first layer asking
    for more than possible, raises ValueError."""
    fitted, t = [], n
    for i, c in enumerate(counts):
        limit = max((t - num_protected) // 2, 0)
        if c > limit and (exact or i == 0):
            raise ValueError(f"r = {c} at layer {i} is larger than possible: {t} tokens with {num_protected} "
                             f"protected can merge at most {limit} (schedule {counts} from {n} tokens)")
        fitted.append(min(c, limit))
        t -= fitted[-1]
    return fitted


def _key_padding_sizes(mask: torch.Tensor, batch: int, n: int) -> torch.Tensor | None:
    """float32 [B, n]: 1 for real keys, 0 for padding, from the mask the encoder hands its layers
    (2D, or a 4D bool / additive mask); None when nothing is padded. A 4D mask must be a padding mask
    (every query sees the same keys, additive values 0 or the dtype's minimum): token merging keeps
    only a per-key size, so anything else raises instead of being silently approximated."""
    if mask.dim() == 4:
        keep4 = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        keep = keep4.any(dim=2).all(dim=1)  # [b, n]: visible to some query (of every head)
        pure = torch.equal(keep4, keep[:, None, None, :].expand_as(keep4))
        if pure and mask.dtype != torch.bool:
            pure = bool((mask.masked_fill(~keep4, 0) == 0).all())
        if not pure:
            raise ValueError("token merging supports padding masks only (every query sees the same keys, additive "
                             "values 0 or the minimum); this attention mask differs between queries or carries biases")
    elif mask.dim() == 2:
        keep = mask.bool()
    else:
        raise ValueError(f"token merging needs a padding mask [B, N] or [B, 1, N, N]; got {tuple(mask.shape)}")
    if keep.shape[-1] != n or keep.shape[0] not in (1, batch):
        raise ValueError(f"attention mask of shape {tuple(mask.shape)} does not fit {batch} x {n} tokens")
    keep = keep.expand(batch, n)
    return None if bool(keep.all()) else keep.float()


def _first_real(sizes: torch.Tensor) -> torch.Tensor:
    """int64 [B]: index of each row's first token of size > 0 (0 for a row of padding only)."""
    return (sizes > 0).to(torch.int8).argmax(dim=1)


def _key_metric(key: nn.Linear, heads: int, h: torch.Tensor) -> torch.Tensor:
    """Keys averaged over heads, [B, n, head_dim], as one small linear whose weight is the head
    average of the key projection (averaged at every call: hidden^2 reads, against B * n * hidden^2
    multiply-adds for the projection itself)."""
    w_avg = key.weight.detach().view(heads, -1, key.in_features).mean(0)
    b_avg = None if key.bias is None else key.bias.detach().view(heads, -1).mean(0)
    return F.linear(h, w_avg, b_avg)


# -- the patched layer forward ---------------------------------------------------------------------
def _tome_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    state: ToMeState = self._tome_state
    index = self._tome_index
    if index == 0:
        state._active = state.begin(hidden_states, attention_mask)
    if not state._active:
        return self._tome_original_class.forward(self, hidden_states, attention_mask, *args, **kwargs)
    fam = state._family
    bias = state.attention_bias(hidden_states.dtype)
    x = hidden_states
    if fam.pre_norm:
        h = getattr(self, fam.norm1)(x)
        a, probs = getattr(self, fam.attn)(h, attention_mask=bias, **kwargs)
        for name in (fam.scale1, fam.drop1):
            if name:
                a = getattr(self, name)(a)
        x, attn_input = x + a, h
    else:
        x, probs = self.attention(x, bias, **kwargs)
        attn_input = hidden_states
    x = state.merge(self, x, attn_input, probs, index)
    if fam.pre_norm:
        m = getattr(self, fam.mlp)(getattr(self, fam.norm2)(x))
        for name in (fam.scale2, fam.drop2):
            if name:
                m = getattr(self, name)(m)
        x = x + m
    else:
        from transformers.pytorch_utils import apply_chunking_to_forward

        x = apply_chunking_to_forward(self.feed_forward_chunk, self.chunk_size_feed_forward, self.seq_len_dim, x)
    if index == state.num_layers - 1:
        x = state.finish(x)
    return x


_CLASSES: dict[type, type] = {}


def _tome_class(cls: type) -> type:
    """ToMe<Layer>, a subclass whose forward merges and which names the class it replaces; registered
    in this module so that a patched model still pickles."""
    if cls not in _CLASSES:
        name = f"ToMe{cls.__name__}"
        _CLASSES[cls] = globals()[name] = type(name, (cls,), {"forward": _tome_forward, "_tome_original_class": cls,
                                                             "__module__": __name__, "__qualname__": name})
    return _CLASSES[cls]


# -- apply / remove --------------------------------------------------------------------------------
def _find_stack(model: nn.Module) -> tuple[_Family, nn.ModuleList]:
    if is_applied(model):
        raise ValueError("token merging is already applied to this model; call slimformer.tome.remove(model) first")
    stacks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and type(mod[0]).__name__ in _FAMILIES:
            cls_name = type(mod[0]).__name__
            if cls_name == "CLIPEncoderLayer" and "text" in name:
                continue  # CLIP's text tower is causal: token merging is for the vision tower
            stacks.append((_FAMILIES[cls_name], mod))
    if not stacks:
        raise ValueError(f"token merging supports {', '.join(SUPPORTED_MODELS)} encoders; found no supported layer "
                         f"stack in {type(model).__name__}")
    if len(stacks) > 1:
        raise ValueError(f"{type(model).__name__} has {len(stacks)} supported layer stacks; apply token merging to "
                         "the sub-model that holds one encoder")
    return stacks[0]


def _check_layer(layer: nn.Module, fam: _Family) -> tuple[nn.Linear, int]:
    """The layer's key projection and head count; ValueError when the layer is not laid out as
    expected (another transformers version) or is a decoder layer."""
    if getattr(layer, "is_decoder", False) or getattr(layer, "add_cross_attention", False):
        raise ValueError(f"{type(layer).__name__} is a decoder layer; token merging is for encoders")
    names = [fam.attn, fam.mlp] if fam.pre_norm else ["attention", "feed_forward_chunk"]
    if fam.pre_norm:
        names += [n for n in (fam.norm1, fam.norm2, fam.scale1, fam.scale2, fam.drop1, fam.drop2) if n]
    missing = [n for n in names if not hasattr(layer, n)]
    attn = getattr(layer, fam.attn, None)
    key = None
    if attn is not None:
        key = next((m for n, m in attn.named_modules() if n.split(".")[-1] in ("k_proj", "key")
                    and isinstance(m, nn.Linear)), None)
    if missing or key is None:
        raise ValueError(f"{type(layer).__name__} is not laid out as slimformer expects (missing "
                         f"{missing or ['a key projection']}); this transformers version is not supported")
    config = getattr(attn, "config", None) or getattr(getattr(attn, "self", None), "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if not heads or key.out_features % heads:
        raise ValueError(f"cannot tell the head count of {type(layer).__name__}")
    return key, heads


def apply(model: nn.Module, r: int | Sequence[int] | tuple[int, float] = 0, *, prop_attn: bool = True,
          protect: Sequence[int] | None = None, mode: str = "tome", unmerge: bool = True,
          importance_iters: int = 30) -> nn.Module:
    """Patch token merging into ``model`` (in place) and return it; settings live in ``model.tome``
    (:class:`ToMeState`). r = 0 everywhere leaves the outputs bit-identical to the unpatched model.

    Example::

        model = ViTForImageClassification(config).eval()
        slimformer.tome.apply(model, r=16)
        logits = model(pixel_values).logits
        model.tome.r = 8          # takes effect at the next call
        slimformer.tome.remove(model)
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if any("BackboneMixin" in (c.__name__ for c in type(m).__mro__) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} is a backbone: it reads intermediate hidden states as feature maps, "
                         "which token merging shortens; apply it to the encoder model instead")
    if mode == "zero-tprune" and not hasattr(model, "set_attn_implementation"):
        raise ValueError("zero-tprune switches the model to eager attention; apply token merging to the "
                         f"transformers model itself, not to a {type(model).__name__}")
    fam, stack = _find_stack(model)
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in (None, "sdpa", "eager"):
        raise ValueError(f"token merging adds a bias to the attention logits, which the {impl!r} attention cannot "
                         "take; use model.set_attn_implementation('sdpa') (or 'eager') first")
    checked = [_check_layer(layer, fam) for layer in stack]
    parse_r(len(stack), r)  # early error for a malformed schedule
    state = ToMeState(model, fam, stack, r=r, prop_attn=prop_attn, protect=protect, mode=mode, unmerge=unmerge,
                      importance_iters=importance_iters)
    for index, (layer, (key, heads)) in enumerate(zip(stack, checked)):
        layer._tome_state, layer._tome_index = state, index
        layer._tome_key, layer._tome_heads = key, heads
        layer.__class__ = _tome_class(type(layer))
    model.tome = state
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the layers get their original classes back and ``model.tome`` goes."""
    state = getattr(model, "tome", None)
    if not isinstance(state, ToMeState):
        raise ValueError("token merging is not applied to this model")
    state._use_attention(eager=False)
    for layer in state._layers:
        layer.__class__ = layer._tome_original_class
        for attr in ("_tome_state", "_tome_index", "_tome_key", "_tome_heads"):
            delattr(layer, attr)
    del model.tome
    return model


def is_applied(model: nn.Module) -> bool:
    return isinstance(getattr(model, "tome", None), ToMeState)


__all__ = ["MODES", "SUPPORTED_MODELS", "ToMeState", "apply", "is_applied", "remove"]
