"""PEP 562 lazy attributes for a package's ``__init__``: names whose defining submodule is imported on
first use (to break an import cycle or to keep a slow import off ``import slimformer.<package>``)."""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_getattr(namespace: dict[str, Any], table: dict[str, str]) -> Callable[[str], Any]:
    """The module ``__getattr__`` for the package whose globals are ``namespace``: ``name`` in ``table``
    is looked up in the submodule ``.{table[name]}`` on first access and then kept in ``namespace``
    (later lookups never reach ``__getattr__``); any other name raises :class:`AttributeError`.

    Use: ``__getattr__ = lazy_getattr(globals(), {"apply": "patching"})``."""
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        if name in table:
            value = getattr(importlib.import_module(f".{table[name]}", package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
