#!/usr/bin/env python
"""Token merging benchmark from a checkout: ``python benchmarks/bench_tome.py [--quick] [options]``.

A thin wrapper: the benchmark lives in the package (:mod:`slimformer.bench.tome`) so that an
installed wheel runs it too, as ``slimformer bench tome``. The quality benchmark is
``slimformer bench tome-quality``. See benchmarks/README.md.
"""
import sys

from slimformer.bench.tome import main

if __name__ == "__main__":
    sys.exit(main(prog="python benchmarks/bench_tome.py"))
