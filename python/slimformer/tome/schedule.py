"""How many tokens each layer merges."""
from __future__ import annotations

import numbers
from typing import Sequence


def parse_r(num_layers: int, r: int | Sequence[int] | tuple[int, float]) -> list[int]:
    """Per-layer merge counts from ``r``:

    * an int: every layer merges r tokens;
    * a list: one count per layer (a shorter list is padded with zeros, a longer one is an error);
    * a tuple ``(r, inflect)``: a linear schedule with mean r, from r * (1 - inflect) at the first
      layer to r * (1 + inflect) at the last (inflect -0.5: decreasing, 0: constant, 0.5: increasing),
      as in ToMe.
    """
    if isinstance(r, bool) or not isinstance(r, (numbers.Integral, tuple, list, Sequence)):
        raise TypeError(f"r must be an int, a list of ints or an (r, inflect) tuple; got {type(r).__name__}")
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"a tuple r must be (r, inflect); got {r!r}")
        mean, inflect = r
        if not -1.0 <= float(inflect) <= 1.0:
            raise ValueError(f"inflect must be in [-1, 1], got {inflect}")
        first = int(mean * (1.0 - inflect))
        last = 2 * mean - first
        step = (last - first) / max(num_layers - 1, 1)
        counts = [int(first + step * i) for i in range(num_layers)]
    elif isinstance(r, numbers.Integral):
        counts = [int(r)] * num_layers
    else:
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in r):
            raise TypeError(f"a per-layer r must hold ints; got {list(r)!r}")
        counts = [int(v) for v in r]
        if len(counts) > num_layers:
            raise ValueError(f"r has {len(counts)} entries but the model has {num_layers} layers")
        counts += [0] * (num_layers - len(counts))
    if any(v < 0 for v in counts):
        raise ValueError(f"r must be >= 0 at every layer; got {counts}")
    return counts


def token_counts(n: int, counts: Sequence[int]) -> list[int]:
    """Tokens entering each layer (and, last, leaving the stack) when layer i merges counts[i]."""
    out = [n]
    for c in counts:
        out.append(out[-1] - c)
    return out
