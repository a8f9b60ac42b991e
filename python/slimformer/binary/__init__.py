"""Binary transformers (BiT / BiPFT): 1-bit weights, optionally 1-bit activations.

- :func:`binarize` (model in place -> trainable binarized model; :class:`BinarizeConfig`),
  :func:`freeze` (-> packed inference model with :class:`slimformer.nn.BinaryLinear`),
  ``distill`` (knowledge distillation, :mod:`slimformer.binary.distillation`).
- Training modules and quantizers: :class:`BinaryTrainLinear`, :mod:`slimformer.binary.quantizers`
  (:class:`ElasticBinarizer`, :class:`WeightBinarizer`, :func:`surrogate`), binarized attention
  :mod:`slimformer.binary.attention`.
- Bit layout and packing: :mod:`slimformer.binary.packing`; op semantics:
  :mod:`slimformer.binary.reference`.
"""
from .._lazy import lazy_getattr as _lazy_getattr
from .config import BinarizeConfig
from .packing import LAYOUT_VERSION, binarize_weight, pack_signs, packed_shape, unpack_signs
from .quantizers import ElasticBinarizer, WeightBinarizer, surrogate
from .train_linear import BinaryTrainLinear

# binarize/freeze import slimformer.nn (whose BinaryLinear imports this package) and distill imports
# transformers: loaded on first use (PEP 562).
_LAZY = {"binarize": "patching", "freeze": "patching", "BinaryAttention": "attention", "distill": "distillation"}
__getattr__ = _lazy_getattr(globals(), _LAZY)


__all__ = [
    "LAYOUT_VERSION",
    "BinarizeConfig",
    "BinaryAttention",
    "BinaryTrainLinear",
    "ElasticBinarizer",
    "WeightBinarizer",
    "binarize",
    "binarize_weight",
    "distill",
    "freeze",
    "pack_signs",
    "packed_shape",
    "surrogate",
    "unpack_signs",
]
