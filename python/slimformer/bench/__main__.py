"""``python -m slimformer.bench gptq [options]``: the same as ``slimformer bench gptq``."""
from __future__ import annotations

import sys

from slimformer.cli import bench_main

if __name__ == "__main__":
    sys.exit(bench_main(prog="python -m slimformer.bench"))
