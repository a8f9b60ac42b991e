"""GPTQ for Hugging Face models: :func:`quantize` (GPTQ or round-to-nearest, in place),
:func:`save` and :func:`load` (standard GPTQ checkpoints: ours, AutoGPTQ, GPTQModel, optimum), the
checkpoint format helpers (packing), pure-PyTorch references and the one-layer solver
(:mod:`slimformer.gptq.solver`)."""
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
from .checkpoint import load, save
from .config import GPTQConfig
from .quantizer import find_blocks, quantize
from .reference import (
    dequantize_reference,
    gptq_linear_a8_reference,
    gptq_linear_reference,
    quantize_activations_a8,
)

__all__ = [
    "CHECKPOINT_FORMATS",
    "GPTQConfig",
    "SUPPORTED_BITS",
    "dequantize_reference",
    "find_blocks",
    "load",
    "gptq_linear_a8_reference",
    "gptq_linear_reference",
    "pack_cols",
    "pack_rows",
    "quantize",
    "quantize_activations_a8",
    "save",
    "quantize_to_grid",
    "unpack_cols",
    "unpack_rows",
    "zero_offset",
]
