"""REST history: stored packets, readings and (for a device) events of every kind.

``GET /api/v1/devices/{identifier}/packets|readings|events``,
``/api/v1/tags/{tag}/packets|readings``, ``/api/v1/streams/{stream_id}/packets|readings``
and ``/api/v1/packets|readings`` (the whole tenant) answer
``{"items": [...], "next"?: cursor, "pruned"?: true}``.

Permissions and scopes are the event sockets' own (:mod:`iotd.scopes`): the
same checks, the same devices.  Items of ``packets`` and ``readings`` are
exactly the bodies the sockets send (PACKET, READING).  Chosen where the spec
is silent: an item of ``.../events`` is ``{"kind", "body"}`` (the kind is not
part of a body), and it holds only the kinds the key may read
(:data:`iotd.scopes.RESOURCES`; none of them: 403).  ``pruned`` is present
(``true``) only when retention removed events after the page's lower bound.
The window and the cursor are :mod:`iotd.web.history_query`; the SQL is
:mod:`iotd.store.history` (indexed: a page's cost does not grow with the log).
"""

from __future__ import annotations

from typing import Any

from klein import Klein

from iotd import errors, scopes
from iotd.context import Context
from iotd.events import KINDS, Event
from iotd.request import authenticate, respond
from iotd.store import history as histsql
from iotd.web import history_query

# URL part -> the event kinds it reads (None: every kind the key may read)
PARTS = {"packets": ("packet",), "readings": ("reading",), "events": None}
PREFIXES = {
    "device": "/api/v1/devices/<identifier>",
    "tag": "/api/v1/tags/<tag>",
    "stream": "/api/v1/streams/<stream_id>",
    "mandate": "/api/v1",
}


def scope_parts(scope: str) -> tuple[str, ...]:
    """The URL parts a scope serves (``events`` only for a device)."""
    return ("packets", "readings", "events") if scope == "device" else ("packets", "readings")


def _kinds(key: Any, part: str) -> tuple[str, ...]:
    wanted = PARTS[part]
    if wanted is not None:
        for kind in wanted:
            scopes.check_read(key, kind)
        return wanted
    allowed = tuple(k for k in KINDS if key.allows(scopes.RESOURCES[k], "read"))
    if not allowed:
        raise errors.Forbidden("this key may read no kind of event")
    return allowed


def _read(conn: Any, tenant: str, kinds: tuple[str, ...], devices: Any,
          window: history_query.Window) -> tuple[history_query.Resolved, list]:
    resolved = history_query.resolve(conn, window)
    rows = histsql.page(conn, tenant, kinds, devices, resolved.low, resolved.high,
                        window.limit + 1, window.desc)
    return resolved, rows


def routes(app: Klein, ctx: Context) -> None:
    async def history(request: Any, scope: str, part: str, target: str | None) -> bytes:
        key = authenticate(ctx, request)
        kinds = _kinds(key, part)
        target = scopes.open_scope(ctx.registry, key, scope, target)
        window = history_query.parse(request)
        devices = scopes.devices_of(ctx.registry, key, scope, target)
        if devices is not None:
            devices = list(devices)
        if devices == []:
            resolved, rows = history_query.Resolved(window.low, window.high, False), []
        else:
            resolved, rows = await ctx.store.read(_read, key.tenant, kinds, devices, window)
        events = [Event.from_row(r) for r in rows]
        more = len(events) > window.limit
        events = events[:window.limit]
        if part == "events":
            items: list[Any] = [{"kind": e.kind, "body": e.body()} for e in events]
        else:
            items = [e.body() for e in events]
        out: dict[str, Any] = {"items": items}
        if more:
            out["next"] = history_query.next_cursor(window, resolved, events[-1].id)
        if resolved.pruned:
            out["pruned"] = True
        return respond(request, 200, out)

    for scope, prefix in PREFIXES.items():
        for part in scope_parts(scope):
            endpoint = f"history_{scope}_{part}"
            if scope == "mandate":
                handler = (lambda request, _s=scope, _p=part: history(request, _s, _p, None))
            else:
                handler = (lambda request, _s=scope, _p=part, **kw: history(request, _s, _p, *kw.values()))
            app.route(f"{prefix}/{part}", methods=["GET"], endpoint=endpoint)(handler)
