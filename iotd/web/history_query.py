"""A history request's window: ``after``/``after_id``/``before``/``order``/``limit`` and the ``cursor``.

Chosen where the spec is silent:

- ``after`` (ISO 8601, exclusive) and ``after_id`` (an event id, exclusive)
  are alternatives: both at once is 400.  ``before`` (ISO 8601) is exclusive
  too.  ``order`` is ``asc`` by default when ``after`` or ``after_id`` is
  given, else ``desc`` (newest first).
- ``cursor`` carries the window and the order, so with it ``after``,
  ``after_id``, ``before`` and ``order`` are ignored (``limit`` still applies);
  it is base64url of a small JSON object ``{"o", "p", "b"}`` — the order, the
  position (the last id sent) and the far bound — opaque to clients and
  checked like any other input (400 ``invalid_cursor``).  It holds ids only,
  so the key and the scope are checked afresh on every page.

Times become id bounds once (stamps strictly increase with ids, through
``events_by_time``); a page is then an id window, see
:mod:`iotd.store.history`.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import attrs

from iotd import errors
from iotd.request import MAX_LIMIT, arg, query_int
from iotd.store import events as evsql
from iotd.store import history as histsql
from iotd.timefmt import parse_iso

MAX_ID = 2**63 - 1


@attrs.frozen
class Window:
    """What one page asks for: ids in ``(low, high)`` (None: open), the order, the size."""

    low: int | None
    high: int | None
    desc: bool
    limit: int
    after_us: int | None = None  # ``after`` as given (to resolve in the store), else None
    before_us: int | None = None


@attrs.frozen
class Resolved:
    low: int | None
    high: int | None
    pruned: bool


def parse(request: Any) -> Window:
    """The request's window, or 400 naming the parameter that is wrong."""
    limit = query_int(request, "limit", 100, 1, MAX_LIMIT)
    cursor = arg(request, "cursor")
    if cursor is not None:
        return _decode(cursor, limit)
    after, before = arg(request, "after"), arg(request, "before")
    after_id = None if arg(request, "after_id") is None else query_int(request, "after_id", 0, 0, MAX_ID)
    if after is not None and after_id is not None:
        raise errors.BadRequest("give after or after_id, not both", code="invalid_query")
    order = arg(request, "order")
    if order is None:
        order = "asc" if after is not None or after_id is not None else "desc"
    elif order not in ("asc", "desc"):
        raise errors.BadRequest("query parameter order must be asc or desc", code="invalid_query")
    return Window(low=after_id, high=None, desc=order == "desc", limit=limit,
                  after_us=None if after is None else _time(after, "after"),
                  before_us=None if before is None else _time(before, "before"))


def _time(text: str, name: str) -> int:
    try:
        return parse_iso(text.strip().replace(" ", "+"))  # a `+` decoded to a space is forgiven
    except (ValueError, TypeError, OverflowError):
        raise errors.BadRequest(f"{name} must be an ISO 8601 date-time, e.g. 2026-11-23T18:30:00.123456Z",
                                code=f"invalid_{name}") from None


def resolve(conn: Any, window: Window) -> Resolved:
    """The window as ids (in the store's thread), and whether retention removed part of it."""
    pruned_id, pruned_us = histsql.pruned_through(conn)
    low, high = window.low, window.high
    if window.after_us is not None:
        low = evsql.last_id_at_or_before(conn, window.after_us)
        if window.after_us >= pruned_us:
            low = max(low, pruned_id)  # nothing after `after` was removed: say so by the ids too
    if window.before_us is not None:
        first = histsql.first_id_at_or_after(conn, window.before_us)
        high = first if first is not None else evsql.last_id(conn) + 1
    return Resolved(low=low, high=high, pruned=low is not None and low < pruned_id)


def next_cursor(window: Window, resolved: Resolved, last_id: int) -> str:
    far = resolved.low if window.desc else resolved.high
    doc = {"o": "d" if window.desc else "a", "p": last_id, "b": far}
    raw = json.dumps(doc, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _decode(text: str, limit: int) -> Window:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        doc = json.loads(raw)
        order, position, far = doc["o"], doc["p"], doc["b"]
    except (binascii.Error, ValueError, TypeError, KeyError):
        raise errors.BadRequest("cursor is not one this server gave", code="invalid_cursor") from None
    ok_id = lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_ID  # noqa: E731
    if order not in ("a", "d") or not ok_id(position) or not (far is None or ok_id(far)):
        raise errors.BadRequest("cursor is not one this server gave", code="invalid_cursor")
    if order == "a":
        return Window(low=position, high=far, desc=False, limit=limit)
    return Window(low=far, high=position, desc=True, limit=limit)
