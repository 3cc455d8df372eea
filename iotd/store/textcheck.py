"""One rule for text on both backends: no NUL character (U+0000) in a stored string.

PostgreSQL's ``text`` cannot hold U+0000 at all; SQLite could.  So that both
backends behave alike, every statement's string parameters are checked on
both, and such a value fails its write with :class:`iotd.errors.Invalid` (a
422) instead of an internal error.  JSON columns never meet the rule: JSON
text writes U+0000 as ``\\u0000``.
"""

from __future__ import annotations

from typing import Any, Iterable

from iotd import errors

MESSAGE = "text holds a NUL character (U+0000), which cannot be stored"


def refuse_nul(params: Iterable[Any] | None) -> None:
    if params is None or isinstance(params, dict):
        return
    for value in params:
        if isinstance(value, str) and "\x00" in value:
            raise errors.Invalid(MESSAGE)


def refuse_nul_many(rows: Iterable[Iterable[Any]]) -> list:
    rows = [tuple(row) for row in rows]
    for row in rows:
        refuse_nul(row)
    return rows
