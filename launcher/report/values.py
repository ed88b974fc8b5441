"""Values in a report: how they compare across runs and how they print. No matplotlib."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

IGNORED_KEYS = ("run.dir", "run.name")  # differ between any two runs; the runs table names them

ABSENT = object()

def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

def config_differences(runs: Sequence[Any]) -> list[tuple[str, list[Any]]]:
    """``(key, [each run's value])`` for the flattened keys whose values differ (``run.dir`` and
    ``run.name`` aside); a key a run lacks has the value ``ABSENT`` there."""
    if len(runs) < 2:
        return []
    keys = sorted(set().union(*(r.config for r in runs)) - set(IGNORED_KEYS))
    out = []
    for key in keys:
        values = [r.config.get(key, ABSENT) for r in runs]
        if len({json.dumps(v, sort_keys=True, default=repr) if v is not ABSENT else "\0absent" for v in values}) > 1:
            out.append((key, values))
    return out

def fmt(value: Any) -> str:
    if value is ABSENT:
        return "(absent)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)
