#!/usr/bin/env python
"""Sparse attention kernel benchmark from a checkout: ``python benchmarks/bench_sparse.py [--quick] [options]``.

A thin wrapper: the benchmark lives in the package (:mod:`slimformer.bench.sparse`) so that an
installed wheel runs it too, as ``slimformer bench sparse``. See benchmarks/README.md.
"""
import sys

from slimformer.bench.sparse import main

if __name__ == "__main__":
    sys.exit(main(prog="python benchmarks/bench_sparse.py"))
