"""Binary transformers (BiT / BiPFT): 1-bit weights, optionally 1-bit activations.

Bit layout and packing: :mod:`slimformer.binary.packing`; op semantics:
:mod:`slimformer.binary.reference`.
"""
from .packing import LAYOUT_VERSION, binarize_weight, pack_signs, packed_shape, unpack_signs

__all__ = ["LAYOUT_VERSION", "binarize_weight", "pack_signs", "packed_shape", "unpack_signs"]
