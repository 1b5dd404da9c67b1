"""Argument checks shared by several layers (the lowest layer that needs them is ``data``)."""

from __future__ import annotations

import numpy as np


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def check_range(name: str, value, lo: int, hi: int | None = None, *, single: bool = False) -> tuple[int, int]:
    """An inclusive ``(first, last)`` pair of ints with ``lo <= first <= last`` (``<= hi`` when ``hi`` is given),
    returned as plain ints; ``single=True`` also takes one int ``v`` as ``(v, v)``. ``None`` is the whole range
    ``(lo, hi)`` when ``hi`` is given. Anything else is a ``ValueError`` naming ``name`` and the allowed range."""
    if value is None and hi is not None:
        return int(lo), int(hi)
    pair = (value, value) if single and _is_int(value) else value
    ok = (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(_is_int(v) for v in pair)
          and lo <= pair[0] <= pair[1] and (hi is None or pair[1] <= hi))
    if not ok:
        upper = f" <= {hi}" if hi is not None else ""
        raise ValueError(f"{name}={value!r} is not allowed: {name} must be a (first, last) pair of ints"
                         f"{' or one int' if single else ''} with {lo} <= first <= last{upper}")
    return int(pair[0]), int(pair[1])
