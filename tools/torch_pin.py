"""Build-time metadata provider: pin the wheel to the torch minor version it is compiled against.

The extension links libtorch's C++ ABI, which changes between minor releases, so a wheel built
against torch 2.13 must not be installed next to torch 2.14. Source builds use whatever torch is
installed (no build isolation), so the pin is computed here rather than written in pyproject.toml.
"""
from __future__ import annotations


def dynamic_metadata(field, settings=None, project=None):
    if field != "dependencies":
        raise RuntimeError(f"torch_pin only provides 'dependencies', not {field!r}")
    try:
        import torch
    except ImportError as e:  # pragma: no cover - build misconfiguration
        raise RuntimeError(
            "slimformer builds against the installed torch: install torch first and build with "
            "`pip install --no-build-isolation .`"
        ) from e
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    base = list((settings or {}).get("base", []))
    return [f"torch=={major}.{minor}.*", *base]
