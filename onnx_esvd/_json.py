"""Strict JSON: NaN and infinities become null (bare NaN is not JSON and breaks jq and friends)."""

from __future__ import annotations

import json
import math
from typing import Any


def jsonable(obj: Any) -> Any:
    """A copy of `obj` with non-finite floats replaced by None and tuples by lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return jsonable(obj.item())
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """json.dumps of `jsonable(obj)` that refuses anything still non-finite."""
    return json.dumps(jsonable(obj), allow_nan=False, **kwargs)
