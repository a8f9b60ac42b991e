"""Token merging (ToMe) and Zero-TPrune-guided merging for Hugging Face encoders.

- :func:`apply` (model in place; knobs are plain attributes of ``model.tome``), :func:`remove`.
- Kernels: :func:`slimformer.ops.tome_match` (fused bipartite matching) and
  :func:`slimformer.ops.tome_merge` (size-weighted merge); their meaning:
  :mod:`slimformer.tome.reference`.
"""
from .._lazy import lazy_getattr as _lazy_getattr
from .reference import (NORM_EPS, ROLE_DESTINATION, ROLE_KEEP, ROLE_SOURCE, SCORE_NO_DESTINATION, SCORE_PADDING,
                        Match, alternate_roles, match_reference, merge_reference, merge_weights, unmerge)

# apply/remove import slimformer.ops (whose tome wrappers import .reference): loaded on first use (PEP 562).
_LAZY = {"apply": "patching", "remove": "patching", "ToMeState": "patching", "SUPPORTED_MODELS": "patching", "is_applied": "patching", "MODES": "patching",
         "parse_r": "schedule", "token_importance": "importance"}
__getattr__ = _lazy_getattr(globals(), _LAZY)


__all__ = ["MODES", "Match", "NORM_EPS", "ROLE_DESTINATION", "ROLE_KEEP", "ROLE_SOURCE", "SCORE_NO_DESTINATION",
           "SCORE_PADDING", "SUPPORTED_MODELS", "ToMeState", "alternate_roles", "apply", "is_applied", "match_reference",
           "merge_reference", "merge_weights", "parse_r", "remove", "token_importance", "unmerge"]
