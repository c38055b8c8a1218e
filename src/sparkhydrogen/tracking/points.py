"""Metric points as ranks send them and the driver logs them: names, values, the wire form. Pure.

A rank's metric goes to the driver's MLflow run under a key decided on the rank:
rank 0's under the key as given, another rank's only when asked (``all_ranks=True``)
under ``rank_<r>/<key>``, and system metrics under ``system/rank_<r>/<name>``.

Example:
    >>> metric_key("loss", rank=0, all_ranks=False), metric_key("loss", rank=2, all_ranks=True)
    ('loss', 'rank_2/loss')
    >>> metric_key("loss", rank=2, all_ranks=False) is None
    True
    >>> points = [MetricPoint("loss", 0.5, 3, 1700000000000)]
    >>> decode_points(encode_points(points)) == points
    True
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["MetricPoint", "MAX_KEY_CHARS", "MAX_POINTS_PER_FRAME", "metric_key", "system_key", "make_point",
           "points_from_mapping", "encode_points", "decode_points"]

#: MLflow's limit on a metric name.
MAX_KEY_CHARS = 250
#: Points one ``metrics`` frame may carry (MLflow's own batch limit is 1000 metrics).
MAX_POINTS_PER_FRAME = 1000
# MLflow accepts alphanumerics, underscores, dashes, periods, spaces, colons and slashes
_KEY = re.compile(r"^[\w\-. :/]+$")
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


@dataclass(frozen=True)
class MetricPoint:
    """One metric value: the key it is logged under, the value, its step and when (ms since the epoch)."""

    key: str
    value: float
    step: int
    timestamp_ms: int

    def __eq__(self, other: object) -> bool:  # NaN == NaN here: a point is a record, not a number
        if not isinstance(other, MetricPoint):
            return NotImplemented
        same = self.value == other.value or (math.isnan(self.value) and math.isnan(other.value))
        return same and (self.key, self.step, self.timestamp_ms) == (other.key, other.step, other.timestamp_ms)

    def __hash__(self) -> int:
        return hash((self.key, self.step, self.timestamp_ms))


def check_key(key: Any) -> str:
    """``key`` if MLflow can log it; else a ``TypeError``/``ValueError`` naming the key and the rule."""
    if not isinstance(key, str):
        raise TypeError(f"a metric key must be a str, got {type(key).__name__}")
    if not key or len(key) > MAX_KEY_CHARS or not _KEY.match(key) or key.startswith("/"):
        raise ValueError(f"metric key {key[:300]!r} is not a valid MLflow metric name: use 1..{MAX_KEY_CHARS} "
                         "letters, digits, '_', '-', '.', ' ', ':' or '/', not starting with '/'")
    return key


def metric_key(key: str, *, rank: int, all_ranks: bool) -> str | None:
    """The key a rank's metric is logged under, or ``None`` if it is not logged (another rank, not asked)."""
    check_key(key)
    if rank == 0:
        return key
    return check_key(f"rank_{rank}/{key}") if all_ranks else None


def system_key(rank: int, name: str) -> str:
    """``system/rank_<r>/<name>``.

    >>> system_key(1, "cpu_percent")
    'system/rank_1/cpu_percent'
    """
    return check_key(f"system/rank_{rank}/{name}")


def _value(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # numpy and torch scalars
        except (TypeError, ValueError):
            raise TypeError(f"metric {key!r}: the value must be a number, got {type(value).__name__}") from None
    return float(value)


def _step(step: Any) -> int:
    if step is None:
        return 0
    if isinstance(step, bool) or not isinstance(step, int):
        try:
            index = step.__index__()  # numpy integers
        except AttributeError:
            raise TypeError(f"step must be an int or None, got {type(step).__name__}") from None
        step = int(index)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return int(step)


def make_point(key: str, value: Any, step: Any = None, timestamp_ms: int | None = None) -> MetricPoint:
    """A checked point (``step=None`` is step 0, as in MLflow; the time is now unless given)."""
    check_key(key)
    return MetricPoint(key, _value(key, value), _step(step),
                       int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms))


def points_from_mapping(metrics: Mapping[str, Any], step: Any = None, *, rank: int = 0,
                        all_ranks: bool = False) -> list[MetricPoint]:
    """Checked points for ``metrics`` as ``rank`` logs them (see :func:`metric_key`); ``[]`` if none are logged.

    >>> [p.key for p in points_from_mapping({"a": 1, "b": 2.5}, 1, rank=1, all_ranks=True)]
    ['rank_1/a', 'rank_1/b']
    """
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of names to numbers, got {type(metrics).__name__}")
    now = int(time.time() * 1000)
    points = []
    for key, value in metrics.items():
        final = metric_key(key, rank=rank, all_ranks=all_ranks)
        point = make_point(key, value, step, now)  # checked on every rank, logged or not
        if final is not None:
            points.append(MetricPoint(final, point.value, point.step, now))
    return points


def _wire_value(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def encode_points(points: Sequence[MetricPoint]) -> bytes:
    """The payload of a ``metrics`` frame: JSON ``[[key, value, step, timestamp_ms], ...]`` (non-finite as strings)."""
    return json.dumps([[p.key, _wire_value(p.value), p.step, p.timestamp_ms] for p in points],
                      separators=(",", ":"), allow_nan=False).encode("utf-8")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_points(payload: bytes | bytearray | memoryview) -> list[MetricPoint]:
    """The points of a ``metrics`` payload; ``ValueError`` naming what is wrong with it."""
    try:
        raw = json.loads(bytes(payload).decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"metrics payload is not UTF-8 JSON: {exc}") from None
    if not isinstance(raw, list):
        raise ValueError(f"metrics payload must be a JSON list, got {type(raw).__name__}")
    if len(raw) > MAX_POINTS_PER_FRAME:
        raise ValueError(f"a metrics frame carries at most {MAX_POINTS_PER_FRAME} points, got {len(raw)}")
    points = []
    for item in raw:
        if not isinstance(item, list) or len(item) != 4:
            raise ValueError(f"a metric point must be [key, value, step, timestamp_ms], got {str(item)[:100]}")
        key, value, step, stamp = item
        if isinstance(value, str):
            if value not in _NON_FINITE:
                raise ValueError(f"metric {str(key)[:100]!r}: value {value[:20]!r} is not a number")
            value = _NON_FINITE[value]
        if isinstance(stamp, bool) or not isinstance(stamp, int) or stamp < 0:
            raise ValueError(f"metric {str(key)[:100]!r}: timestamp must be a non-negative int, got {stamp!r}")
        try:
            points.append(make_point(key, value, step, stamp))
        except (TypeError, ValueError) as exc:
            raise ValueError(str(exc)) from None
    return points
