"""Model level: :func:`binarize` (fp model -> trainable binarized model, in place) and
:func:`freeze` (trained binarized model -> packed 1-bit inference model, in place).

Where the quantizers sit::

    transformer block
      every nn.Linear / Conv1D (filter_fn)  -> BinaryTrainLinear   (weight: BWN + STE;
                                               activations="binary": input b + a*sign(x - b))
      attention module                      -> child `binary_attention` (Q, K, V signed, softmax
                                               probabilities unsigned; BiPFT maps), applied by the
                                               "slimformer_binary" attention function
    embeddings, lm_head, pooler, classifier heads, norms: untouched (full precision)

Saving and loading a frozen model: its ``state_dict`` holds the packed tensors (``qweight``,
``alpha``, ``act_scale``, ``act_shift``, quantizer ``scale``/``shift``/``initialized``). To load it,
rebuild the structure first, then load (safetensors: no pickle)::

    from safetensors.torch import load_model, save_model
    save_model(frozen, "binary.safetensors")
    model = AutoModelForCausalLM.from_config(hf_config)
    binarize(model, same_binarize_config)
    freeze(model, allow_uninitialized=True)          # structure only; values come from the file
    load_model(model, "binary.safetensors")
"""
from __future__ import annotations

import dataclasses

from torch import nn

from ..blocks import find_blocks as _find_block_list, linear_types, set_submodule
from .attention import ATTN_IMPLEMENTATION, MODULE_ATTR, BinaryAttention, capture_hidden_pre_hook, register
from .config import BinarizeConfig
from .train_linear import BinaryTrainLinear

# model_type -> class name of its self-attention module (which calls transformers' attention interface)
SUPPORTED = {
    "bert": "BertSelfAttention",
    "llama": "LlamaAttention",
    "gpt2": "GPT2Attention",
}
CONFIG_ATTR = "slimformer_binary_config"
FROZEN_ATTR = "slimformer_binary_frozen"


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        names = ", ".join(f"{k} ({v})" for k, v in SUPPORTED.items())
        raise ValueError(f"slimformer.binary.binarize supports these architectures: {names}; got "
                         f"{type(model).__name__} with model_type={model_type!r}")
    return model_type


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(fqn, block) of the repeated transformer blocks (:func:`slimformer.blocks.find_blocks`)."""
    prefix, blocks = _find_block_list(model)
    return [(f"{prefix}.{i}" if prefix else str(i), block) for i, block in enumerate(blocks)]


def _is_self_attention(module: nn.Module, class_name: str) -> bool:
    return type(module).__name__ == class_name and not getattr(module, "is_cross_attention", False)


def _attention_shape(config) -> tuple[int, int, int, int]:
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return hidden, heads, kv_heads, head_dim


def binarize(model: nn.Module, config: BinarizeConfig | None = None, **overrides) -> nn.Module:
    """Binarize a transformers model in place for training (BiT; BiPFT with ``bipft=True``).

    Every nn.Linear / Conv1D inside the transformer blocks that ``filter_fn`` accepts becomes a
    :class:`BinaryTrainLinear`; with ``binarize_attention`` each self-attention module gets
    quantizers and the model switches to the ``"slimformer_binary"`` attention implementation.
    ``config`` fields can be overridden by keyword (``binarize(model, activations="binary")``).
    Works in train and eval mode; quantizer scales initialise from the first batch. The config is
    kept as ``model.slimformer_binary_config``. Supported: :data:`SUPPORTED` (BERT family incl.
    MiniLM, Llama family, GPT-2); anything else raises ValueError.
    """
    if config is None:
        config = BinarizeConfig(**overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    if not isinstance(config, BinarizeConfig):
        raise TypeError(f"config must be a BinarizeConfig, got {type(config).__name__}")
    model_type = _model_type(model)
    if getattr(model, CONFIG_ATTR, None) is not None:
        raise ValueError("this model is already binarized (model.slimformer_binary_config is set)")
    blocks = find_blocks(model)

    kinds = linear_types()
    replace = []
    for prefix, block in blocks:
        for name, mod in block.named_modules():
            fqn = f"{prefix}.{name}" if name else prefix
            if isinstance(mod, kinds) and (config.filter_fn is None or config.filter_fn(mod, fqn)):
                replace.append((fqn, mod))
    for fqn, mod in replace:
        new = BinaryTrainLinear.from_linear(mod, activations=config.activations, weight_clip=config.weight_clip)
        new.train(mod.training)
        set_submodule(model, fqn, new)

    if config.binarize_attention:
        register()
        hidden, heads, kv_heads, head_dim = _attention_shape(model.config)
        class_name = SUPPORTED[model_type]
        attentions = [m for _, block in blocks for m in block.modules() if _is_self_attention(m, class_name)]
        if not attentions:
            raise ValueError(f"no {class_name} module found in the transformer blocks of {type(model).__name__}")
        for attn in attentions:
            ref = next(attn.parameters())
            dtype = ref.dtype if ref.dtype.is_floating_point else None
            quant = BinaryAttention(hidden, heads, kv_heads, head_dim, bipft=config.bipft,
                                    probs_output=config.attention_probs_output, device=ref.device, dtype=dtype)
            quant.train(attn.training)
            setattr(attn, MODULE_ATTR, quant)
            if config.bipft:
                attn.register_forward_pre_hook(capture_hidden_pre_hook, with_kwargs=True)
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
            raise RuntimeError(f"{type(model).__name__} did not accept attn_implementation="
                               f"{ATTN_IMPLEMENTATION!r}; attention would not be binarized")
    setattr(model, CONFIG_ATTR, config)
    return model


def freeze(model: nn.Module, allow_uninitialized: bool = False) -> nn.Module:
    """Turn a binarized (and trained) model into its inference form, in place.

    Every :class:`BinaryTrainLinear` becomes a packed :class:`slimformer.nn.BinaryLinear` (1-bit
    weights + fp32 alpha; for W1A1 the learned input scale/shift) running the slimformer kernels.
    Attention quantizers become fixed eval-mode quantizers (parameters -> buffers) and keep running
    in PyTorch (they act on activation x activation products). The frozen model computes what the
    binarized model computes in eval mode, up to float rounding. Quantizers that never saw data
    raise, unless ``allow_uninitialized`` (to build a structure for ``load_state_dict``, see the
    module docstring).
    """
    if getattr(model, CONFIG_ATTR, None) is None:
        raise ValueError("freeze() expects a model prepared with slimformer.binary.binarize()")
    for fqn, mod in list(model.named_modules()):
        if isinstance(mod, BinaryTrainLinear):
            new = mod.to_binary_linear(allow_uninitialized=allow_uninitialized)
            new.train(mod.training)
            set_submodule(model, fqn, new)
    for fqn, mod in model.named_modules():
        if isinstance(mod, BinaryAttention):
            if not allow_uninitialized:
                for qname in ("query", "key", "value", "probs"):
                    if not bool(getattr(mod, qname).initialized):
                        raise RuntimeError(f"{fqn}.{qname} was never initialised: run at least one forward pass on "
                                           "data before freeze() (scales come from the first batch)")
            mod.freeze()
    setattr(model, FROZEN_ATTR, True)
    return model
