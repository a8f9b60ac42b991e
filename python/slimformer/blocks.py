"""Where the work happens in a Hugging Face transformer: its list of repeated blocks, and swapping
one submodule for another. Shared by every capability that patches models (GPTQ, binary, ...)."""
from __future__ import annotations

import sys

from torch import nn


def conv1d_type():
    """transformers' Conv1D class (GPT-2 family, weight stored [in, out]) if transformers is
    imported, else None (a Conv1D instance implies it is: ``import slimformer`` stays light)."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def linear_types() -> tuple[type, ...]:
    """nn.Linear and (when transformers is imported) its Conv1D."""
    conv1d = conv1d_type()
    return (nn.Linear, conv1d) if conv1d is not None else (nn.Linear,)


def weight_layer_types() -> tuple[type, ...]:
    """:func:`linear_types` and slimformer's replacements for them (quantized or binarized)."""
    from .binary.train_linear import BinaryTrainLinear
    from .nn import BinaryLinear, QuantLinear

    return linear_types() + (QuantLinear, BinaryLinear, BinaryTrainLinear)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, blocks): the ModuleList of same-class modules holding the most weight layers
    (``model.layers`` for Llama/Qwen2, ``transformer.h`` for GPT-2, ``decoder.layers`` for OPT,
    ``encoder.layer`` for BERT), whether or not they have been quantized or binarized already."""
    kinds = weight_layer_types()
    best, best_count = None, 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or len({type(m) for m in mod}) != 1:
            continue
        count = sum(isinstance(m, kinds) for m in mod.modules())
        if count > best_count:
            best, best_count = (name, mod), count
    if best is None:
        raise ValueError(f"{type(model).__name__}: no list of transformer blocks with linear layers found")
    return best


def set_submodule(root: nn.Module, fqn: str, module: nn.Module) -> None:
    """Replace ``root.get_submodule(fqn)`` by ``module``."""
    parent, _, child = fqn.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
