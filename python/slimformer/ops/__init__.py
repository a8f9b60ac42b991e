"""Typed wrappers over ``torch.ops.slimformer.*`` and their fake (meta) implementations."""
from .attention import sparse_attention, sparse_attention_with_lse
from .binary import binary_gemm, binary_gemm_a1
from .gptq import gptq_dequantize, gptq_gemm, gptq_gemm_a8
from .tome import tome_match, tome_merge

__all__ = ["binary_gemm", "binary_gemm_a1", "gptq_dequantize", "gptq_gemm", "gptq_gemm_a8", "sparse_attention",
           "sparse_attention_with_lse", "tome_match", "tome_merge"]
