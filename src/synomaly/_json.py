"""JSON in and out: plain values for ``json.dumps`` and files read with one clear error."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from synomaly.errors import InputError


def json_safe(obj: Any) -> Any:
    """``obj`` with tuples as lists, NumPy/Torch scalars as Python numbers and NaN/Inf as ``None``.

    ``json.dumps(..., allow_nan=False)`` accepts the result.
    """
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def json_plain(data: Any) -> Any:
    """``data`` as it reads back from JSON (tuples become lists), so settings compare equal after a round trip."""
    return json.loads(json.dumps(data))


def read_json(path: Path) -> Any:
    """Parse a JSON file as plain data; any problem is an ``InputError`` naming the file."""
    if not path.is_file():
        raise InputError(path, "missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: decoding, syntax, integers of more than 4300 digits
        raise InputError(path, f"not valid JSON ({error})") from None
    except RecursionError:
        raise InputError(path, "not valid JSON (nested too deeply)") from None
