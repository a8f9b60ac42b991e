"""Sparse attention: patterns, kernels patched into Hugging Face attention.

Patterns (:mod:`.patterns`): :class:`SlidingWindow`, :class:`BigBird`, :class:`BlockLayout`; each
gives its dense boolean mask (:meth:`Pattern.dense_mask`) and the block-CSR :class:`BlockPlan` the
kernels (:func:`slimformer.ops.sparse_attention`) walk.
"""
from .patterns import WINDOW_TILE, BigBird, BlockLayout, BlockPlan, Pattern, SlidingWindow

__all__ = ["BigBird", "BlockLayout", "BlockPlan", "Pattern", "SlidingWindow", "WINDOW_TILE"]
