"""Token merging (ToMe) and Zero-TPrune-guided merging for Hugging Face encoders.

- :func:`apply` (model in place; knobs are plain attributes of ``model.tome``), :func:`remove`.
- Kernels: :func:`slimformer.ops.tome_match` (fused bipartite matching) and
  :func:`slimformer.ops.tome_merge` (size-weighted merge); their meaning:
  :mod:`slimformer.tome.reference`.
"""
from .reference import (NORM_EPS, ROLE_DESTINATION, ROLE_KEEP, ROLE_SOURCE, SCORE_NO_DESTINATION, SCORE_PADDING,
                        Match, alternate_roles, match_reference, merge_reference, merge_weights, unmerge)

# apply/remove import slimformer.ops (whose tome wrappers import .reference): loaded on first use (PEP 562).
_LAZY = {"apply": "patching", "remove": "patching", "ToMeState": "patching", "SUPPORTED_MODELS": "patching", "is_applied": "patching", "MODES": "patching",
         "parse_r": "schedule", "token_importance": "importance"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MODES", "Match", "NORM_EPS", "ROLE_DESTINATION", "ROLE_KEEP", "ROLE_SOURCE", "SCORE_NO_DESTINATION",
           "SCORE_PADDING", "SUPPORTED_MODELS", "ToMeState", "alternate_roles", "apply", "is_applied", "match_reference",
           "merge_reference", "merge_weights", "parse_r", "remove", "token_importance", "unmerge"]
