"""Sparse attention: patterns, kernels patched into Hugging Face attention.

Patterns (:mod:`.patterns`): :class:`SlidingWindow`, :class:`BigBird`, :class:`BlockLayout`; each
gives its dense boolean mask (:meth:`Pattern.dense_mask`) and the block-CSR :class:`BlockPlan` the
kernels (:func:`slimformer.ops.sparse_attention`) walk.

Patching (:mod:`.patching`): :func:`sparsify` runs a transformers model's self-attention through the
kernels with a pattern (in place), :func:`restore` undoes it.
"""
from .hf_modules import HFBigBirdLayout
from .patching import SUPPORTED_MODELS, SparseMaskInfo, attention_modules, is_sparsified, restore, sparsify
from .patterns import WINDOW_TILE, BigBird, BlockLayout, BlockPlan, LayoutPattern, Pattern, SlidingWindow

__all__ = ["BigBird", "BlockLayout", "BlockPlan", "HFBigBirdLayout", "LayoutPattern", "Pattern", "SUPPORTED_MODELS",
           "SlidingWindow", "SparseMaskInfo", "WINDOW_TILE", "attention_modules", "is_sparsified", "restore", "sparsify"]
