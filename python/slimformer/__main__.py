"""``python -m slimformer ...``: the same as the ``slimformer`` command."""
from __future__ import annotations

import sys

from slimformer.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m slimformer"))
