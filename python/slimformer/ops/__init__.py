"""Typed wrappers over ``torch.ops.slimformer.*`` and their fake (meta) implementations."""
from .gptq import gptq_dequantize, gptq_gemm, gptq_gemm_a8

__all__ = ["gptq_dequantize", "gptq_gemm", "gptq_gemm_a8"]
