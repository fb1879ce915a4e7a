"""Value checks shared by argument and config validation."""
from __future__ import annotations

import math
import numbers
from typing import Any


def is_int(value: Any) -> bool:
    """An integer, numpy's included; not a bool (True is an Integral, but `steps=True` is a mistake, not 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A real number that is neither NaN nor infinite; not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
