"""Drop-in ``nn.Module`` replacements backed by slimformer kernels."""
from .binary_linear import BinaryLinear
from .quant_linear import QuantLinear

__all__ = ["BinaryLinear", "QuantLinear"]
