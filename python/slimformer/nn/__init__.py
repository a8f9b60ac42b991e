"""Drop-in ``nn.Module`` replacements backed by slimformer kernels."""
from .quant_linear import QuantLinear

__all__ = ["QuantLinear"]
