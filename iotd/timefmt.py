"""Timestamps on the wire: ISO 8601 UTC with microseconds and ``Z``.

Inside iotd a moment is an int of microseconds since the epoch; these two
functions are the only conversions.
"""

from __future__ import annotations

from datetime import datetime, timezone

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def iso(micros: int) -> str:
    """``1700000000123456`` -> ``'2023-11-14T22:13:20.123456Z'``."""
    seconds, us = divmod(micros, 1_000_000)
    dt = datetime.fromtimestamp(seconds, timezone.utc).replace(microsecond=us)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(text: str) -> int:
    """Parse an ISO 8601 date-time (``Z`` or an offset; naive = UTC) into micros.

    Raises ``ValueError`` for anything else.
    """
    if not isinstance(text, str) or not text or len(text) > 64:
        raise ValueError("not an ISO 8601 date-time")
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    dt = datetime.fromisoformat(value)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    delta = dt - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def micros_of(seconds: float) -> int:
    """Seconds (``time.time()`` / ``reactor.seconds()``) -> micros."""
    return int(round(seconds * 1_000_000))
