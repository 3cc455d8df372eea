"""JSON that is safe to store and to send again: valid Unicode, finite numbers, bounded depth.

A lone surrogate (``"\\ud800"``) cannot be encoded as UTF-8, and NaN,
Infinity or a number beyond a double (``1e400``, an integer of 2**1024 or
more) are not JSON at all; once stored, either would break every later
answer that includes it.  Every JSON value that comes from a client passes
:func:`loads` (or :func:`check`) before anything is committed.

Chosen where the spec is silent:

* Values nest at most :data:`MAX_DEPTH` (64) arrays/objects deep, counting
  the body itself.  Deeper JSON parses, but serialising it again in a deeper
  call stack (a replay, a frame) could hit Python's recursion limit and make
  the stored event unsendable.
* Error messages name the field (``data.temperature``, ``[3].meta.x``,
  ``name.<key>`` for a bad key) and say what is wrong, never echo the bad
  value; each key in the path is cut at 40 characters, the path at 200.
* The walk is cheap: one pass over the parsed value with ``type() is``
  checks and no path bookkeeping; only when it sees a problem (or a type
  JSON never produces) does a second, path-tracking pass find and name it.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 64
_DOUBLE_MAX_INT = 2**1024  # integers at or beyond this overflow a double
_LONG_INT = 4000  # digits: longer integers are beyond a double anyway (and beyond int()'s limit)
_PART, _PATH = 40, 200
_SURROGATE = re.compile("[\ud800-\udfff]")

NOT_UNICODE = "the text is not valid Unicode (it holds a lone surrogate)"
NOT_FINITE = "the number is NaN, Infinity or beyond the range of a double"
TOO_DEEP = f"the value nests deeper than {MAX_DEPTH} arrays/objects"


class UnsafeJSON(ValueError):
    """A value that parsed but cannot be stored; ``where`` names the field ("" for the whole value)."""

    def __init__(self, where: str, why: str):
        super().__init__(f"{where}: {why}" if where else why)
        self.where, self.why = where, why


def loads(raw: bytes | str) -> Any:
    """``json.loads``, then :func:`check`.

    Raises ``ValueError`` for malformed JSON (``json.JSONDecodeError``, or
    ``UnicodeDecodeError`` for bytes that are no Unicode text) and
    :class:`UnsafeJSON` (a ``ValueError`` too) for well-formed JSON that
    may not be stored.
    """
    try:
        value = json.loads(raw, parse_constant=float)  # NaN/Infinity become floats: check() names them
    except RecursionError:
        raise UnsafeJSON("", TOO_DEEP) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise
    except ValueError:  # an integer beyond int()'s digit limit; parse again to find where
        value = _loads_long_ints(raw)
    check(value)
    return value


def _loads_long_ints(raw: bytes | str) -> Any:
    def parse_int(text: str) -> Any:
        return math.inf if len(text) > _LONG_INT else int(text)

    try:
        return json.loads(raw, parse_constant=float, parse_int=parse_int)
    except RecursionError:
        raise UnsafeJSON("", TOO_DEEP) from None


def check(value: Any, path: str = "") -> None:
    """Raise :class:`UnsafeJSON` naming the first unsafe string, number or nesting in ``value``."""
    if not _clean(value):
        _locate(value, path)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _clean(value: Any) -> bool:
    """True when ``value`` is certainly safe; False when :func:`_locate` must look closer."""
    level, depth = [value], 0
    while level:
        depth += 1
        below: list[Any] = []
        for item in level:
            kind = type(item)
            if kind is str:
                if not item.isascii() and not _utf8(item):
                    return False
            elif kind is dict:
                if depth > MAX_DEPTH:
                    return False
                try:
                    keys = "".join(item)
                except TypeError:  # keys that are not text: let the careful pass decide
                    return False
                if not keys.isascii() and not _utf8(keys):
                    return False
                below.extend(item.values())
            elif kind is list:
                if depth > MAX_DEPTH:
                    return False
                below.extend(item)
            elif kind is float:
                if item - item:  # NaN for NaN and ±inf, 0.0 otherwise
                    return False
            elif kind is int:
                if not -_DOUBLE_MAX_INT < item < _DOUBLE_MAX_INT:
                    return False
            elif item is not None and kind is not bool:
                return False
        level = below
    return True


def _locate(value: Any, path: str) -> None:
    """The careful pass: raise :class:`UnsafeJSON` for the first problem in document order."""
    stack: list[tuple[Any, tuple, int]] = [(value, (path,) if path else (), 1)]
    while stack:
        item, parts, depth = stack.pop()
        if isinstance(item, str):
            if not _utf8(item):
                raise UnsafeJSON(render_path(parts), NOT_UNICODE)
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int):
            if abs(item) >= _DOUBLE_MAX_INT:
                raise UnsafeJSON(render_path(parts), NOT_FINITE)
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise UnsafeJSON(render_path(parts), NOT_FINITE)
        elif isinstance(item, (dict, list, tuple)):
            if depth > MAX_DEPTH:
                raise UnsafeJSON(render_path(parts), TOO_DEEP)
            pairs = list(item.items()) if isinstance(item, dict) else list(enumerate(item))
            if isinstance(item, dict):
                for key, _ in pairs:
                    if isinstance(key, str) and not _utf8(key):
                        raise UnsafeJSON(render_path(parts + ("<key>",)), NOT_UNICODE)
            for key, child in reversed(pairs):
                stack.append((child, parts + (key,), depth + 1))


def render_path(parts: tuple) -> str:
    """``("data", "list", 2)`` -> ``data.list[2]``; keys cut at 40 characters, the whole at 200."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = str(part)
            text = text if len(text) <= _PART else text[:_PART] + "…"
            out = f"{out}.{text}" if out else text
        if len(out) > _PATH:
            return out[:_PATH] + "…"
    return out


def scrub(value: Any, depth: int = 1) -> Any:
    """A copy of ``value`` that always serialises: lone surrogates -> U+FFFD, NaN/Infinity -> null,
    containers deeper than :data:`MAX_DEPTH` -> null.  A backstop for answers, not a validator."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (dict, list, tuple)):
        if depth > MAX_DEPTH:
            return None
        if isinstance(value, dict):
            return {scrub(k) if isinstance(k, str) else k: scrub(v, depth + 1) for k, v in value.items()}
        return [scrub(v, depth + 1) for v in value]
    return value
