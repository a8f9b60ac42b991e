"""GPTQ: checkpoint format helpers (packing), pure-PyTorch references, and the one-layer solver
(:mod:`slimformer.gptq.solver`); model-level quantization, save and load come next."""
from .packing import (
    CHECKPOINT_FORMATS,
    SUPPORTED_BITS,
    pack_cols,
    pack_rows,
    quantize_to_grid,
    unpack_cols,
    unpack_rows,
    zero_offset,
)
from .reference import (
    dequantize_reference,
    gptq_linear_a8_reference,
    gptq_linear_reference,
    quantize_activations_a8,
)

__all__ = [
    "CHECKPOINT_FORMATS",
    "SUPPORTED_BITS",
    "dequantize_reference",
    "gptq_linear_a8_reference",
    "gptq_linear_reference",
    "pack_cols",
    "pack_rows",
    "quantize_activations_a8",
    "quantize_to_grid",
    "unpack_cols",
    "unpack_rows",
    "zero_offset",
]
