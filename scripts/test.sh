#!/usr/bin/env bash
# The README's test command: set up a CPU environment (torch 2.13.0) and run the test suite.
# CUDA tests are marked and skip without a GPU; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${SLIMFORMER_VENV:-.venv}/bin/python" -m pytest tests -q "$@"
