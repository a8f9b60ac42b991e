"""GPTQ for Hugging Face models: :func:`quantize` (GPTQ or round-to-nearest, in place),
:func:`save` and :func:`load` (standard GPTQ checkpoints: ours, AutoGPTQ, GPTQModel, optimum), the
checkpoint format helpers (packing), pure-PyTorch references and the one-layer solver
(:mod:`slimformer.gptq.solver`)."""
from .._lazy import lazy_getattr as _lazy_getattr
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
from .config import GPTQConfig
from .reference import (
    dequantize_reference,
    gptq_linear_a8_reference,
    gptq_linear_reference,
    quantize_activations_a8,
)

# quantize/save/load import transformers (slow) and QuantLinear (whose module imports this package):
# loaded on first use (PEP 562).
_LAZY = {"quantize": "quantizer", "find_blocks": "quantizer", "save": "checkpoint", "load": "checkpoint"}
__getattr__ = _lazy_getattr(globals(), _LAZY)


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
