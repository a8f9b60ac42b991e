#!/usr/bin/env python
"""Binary kernel benchmark from a checkout: ``python benchmarks/bench_binary.py [--quick] [options]``.

A thin wrapper: the benchmark lives in the package (:mod:`slimformer.bench.binary`) so that an
installed wheel runs it too, as ``slimformer bench binary``. See benchmarks/README.md.
"""
import sys

from slimformer.bench.binary import main

if __name__ == "__main__":
    sys.exit(main(prog="python benchmarks/bench_binary.py"))
