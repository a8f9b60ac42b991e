"""Kernel benchmarks that ship with the package (``slimformer bench ...``).

Each benchmark module exposes ``add_arguments(parser)`` and ``run(args, command=...) -> dict``; the
shared timing, machine-facts and report helpers live in :mod:`slimformer.bench.common`.

Run them with ``slimformer bench gptq``, ``python -m slimformer.bench gptq`` or, from a checkout,
``python benchmarks/bench_gptq.py``. No benchmark asserts a timing; they do abort when a kernel's
output disagrees with its reference (a benchmark of a wrong kernel is worthless).
"""
from __future__ import annotations

__all__ = ["binary", "common", "gptq"]
