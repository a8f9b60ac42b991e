"""BinarizeConfig: what :func:`slimformer.binary.binarize` does to a model (kept on the model as
``model.slimformer_binary_config``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

from torch import nn

ACTIVATIONS = ("fp", "binary")


@dataclass
class BinarizeConfig:
    """Settings of :func:`slimformer.binary.binarize`.

    - ``activations``: ``"fp"`` (W1A-fp: 1-bit weights, full-precision inputs) or ``"binary"``
      (W1A1: every binarized linear layer also binarizes its input, ``b + a * sign(x - b)`` with a
      learnable scale a and shift b).
    - ``binarize_attention``: Q, K, V binarized (signed, learnable scale) and the softmax
      probabilities binarized (unsigned, {0, a}); default True iff ``activations == "binary"``.
    - ``bipft``: BiPFT's five full-precision rank-1 maps from the un-binarized hidden state
      (needs ``binarize_attention``); zero contribution at initialisation.
    - ``filter_fn(module, fqn) -> bool``: which of the candidate linear layers (nn.Linear /
      Conv1D inside the transformer blocks; embeddings, lm_head, pooler and classifier heads are
      never candidates) are binarized; None = all.
    - ``weight_clip``: clip of the weight STE (gradient 1{|W| <= clip}); None = identity.
    - ``attention_probs_output``: what the attention returns as its weights (``output_attentions``):
      ``"soft"`` the softmax probabilities before binarization (a distribution, for attention
      distillation) or ``"binary"`` the binarized ones actually multiplied with V.
    """

    activations: str = "fp"
    binarize_attention: bool | None = None
    bipft: bool = False
    filter_fn: Callable[[nn.Module, str], bool] | None = field(default=None, compare=False)
    weight_clip: float | None = None
    attention_probs_output: str = "soft"

    def __post_init__(self) -> None:
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, got {self.activations!r}")
        if self.binarize_attention is None:
            self.binarize_attention = self.activations == "binary"
        self.binarize_attention = bool(self.binarize_attention)
        if self.bipft and not self.binarize_attention:
            raise ValueError("bipft=True adds low-rank corrections to binarized attention: it needs "
                             "binarize_attention=True")
        if self.weight_clip is not None and not self.weight_clip > 0:
            raise ValueError(f"weight_clip must be positive or None, got {self.weight_clip}")
        if self.attention_probs_output not in ("soft", "binary"):
            raise ValueError(f"attention_probs_output must be 'soft' or 'binary', got {self.attention_probs_output!r}")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError("filter_fn must be callable as filter_fn(module, fqn) -> bool")

    def to_dict(self) -> dict:
        """JSON-able settings (filter_fn is not serialisable and is left out)."""
        return {k: v for k, v in asdict(self).items() if k != "filter_fn"}
