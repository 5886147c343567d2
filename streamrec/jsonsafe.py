"""Values made JSON-safe: NaN and infinities as null, numpy scalars as Python ones."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def json_safe(v: Any) -> Any:
    """``v`` with non-finite floats as None and numpy scalars as Python values, recursively."""
    if isinstance(v, float | np.floating):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [json_safe(x) for x in v]
    return v
