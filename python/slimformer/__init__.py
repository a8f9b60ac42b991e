"""slimformer: make pre-trained transformers smaller and faster in place.

Compiled kernels are registered in ``torch.ops.slimformer``; this package holds their typed Python
wrappers (:mod:`slimformer.ops`), pure-PyTorch references, and the ``nn`` modules that swap into
Hugging Face models.
"""
from __future__ import annotations

import torch


def _check_torch_matches_build() -> None:
    try:
        from . import _build_info
    except ImportError as e:  # source tree without a build
        raise ImportError(
            "slimformer's compiled extension is missing; build it with "
            "`pip install --no-build-isolation .` (torch must be installed first)"
        ) from e
    built = _build_info.TORCH_VERSION.split(".")[:2]
    running = torch.__version__.split("+")[0].split(".")[:2]
    if built != running:
        raise ImportError(
            f"slimformer was built against torch {_build_info.TORCH_VERSION} but torch "
            f"{torch.__version__} is installed; the C++ ABI differs between minor versions. Rebuild "
            "with `pip install --no-build-isolation --force-reinstall --no-deps .` (or install the "
            f"slimformer wheel built for torch {'.'.join(running)})."
        )


_check_torch_matches_build()

from . import _C  # noqa: E402  (registers torch.ops.slimformer.*)
from . import ops  # noqa: E402  (fake impls for torch.compile / FakeTensor)
from .nn import BinaryLinear, QuantLinear  # noqa: E402

__version__ = _C.__version__

__all__ = ["BinaryLinear", "QuantLinear", "ops", "__version__"]
