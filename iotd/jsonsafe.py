"""JSON that is safe to store and to send again: valid Unicode, finite numbers.

A lone surrogate (``"\\ud800"``) cannot be encoded as UTF-8, and NaN,
Infinity or a number beyond a double (``1e400``) are not JSON at all; once
stored, either would break every later answer that includes it.  Every JSON
value that comes from a client passes :func:`loads` (or :func:`check`) before
anything is committed.
"""

from __future__ import annotations

import json
import math
from typing import Any

_DOUBLE_MAX_INT = 2**1024  # integers at or beyond this overflow a double


class UnsafeJSON(ValueError):
    """A value that parsed but cannot be stored; ``where`` names the field."""

    def __init__(self, where: str, why: str):
        super().__init__(f"{where}: {why}" if where else why)
        self.where, self.why = where, why


def _reject_constant(name: str) -> Any:
    raise UnsafeJSON("", f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise UnsafeJSON("", f"the number {text[:40]} overflows a double")
    return value


def loads(raw: bytes | str) -> Any:
    """``json.loads`` without NaN/Infinity/overflowing numbers, then :func:`check`.

    Raises ``ValueError`` for malformed JSON and :class:`UnsafeJSON` (a
    ``ValueError`` too) for well-formed JSON that may not be stored.
    """
    value = json.loads(raw, parse_constant=_reject_constant, parse_float=_float)
    check(value)
    return value


def _where(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def check(value: Any, path: str = "") -> None:
    """Raise :class:`UnsafeJSON` naming the first unsafe string or number in ``value``."""
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            _check_text(item, where)
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int):
            if abs(item) >= _DOUBLE_MAX_INT:
                raise UnsafeJSON(where, "the number overflows a double")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise UnsafeJSON(where, "the number is not finite")
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_text(key, _where(where, "<key>"))
                stack.append((child, _where(where, key)))
        elif isinstance(item, (list, tuple)):
            for index, child in enumerate(item):
                stack.append((child, f"{where}[{index}]"))


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafeJSON(where, "the text is not valid Unicode (a lone surrogate)") from None
