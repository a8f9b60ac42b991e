#!/usr/bin/env python
"""GPTQ kernel benchmark from a checkout: ``python benchmarks/bench_gptq.py [--quick] [options]``.

A thin wrapper: the benchmark lives in the package (:mod:`slimformer.bench.gptq`) so that an
installed wheel runs it too, as ``slimformer bench gptq``. See benchmarks/README.md.
"""
import sys

from slimformer.bench.gptq import main

if __name__ == "__main__":
    sys.exit(main(prog="python benchmarks/bench_gptq.py"))
