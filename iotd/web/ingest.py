"""Ingest REST: packets, readings and OTA progress into the event log.

Each endpoint takes one object or an array of up to 1,000 (one transaction,
all or nothing: one bad item rejects the whole request with 422 naming its
index).  The answer (201, the stored event or the array) is sent only after
the commit.  A 201 has no access-log line (devices send thousands a second:
the events are in the event log, the answers counted in
``iotd_http_requests_total``); every error answer has one.

The body has passed :func:`iotd.jsonsafe.loads` (through ``read_json``):
no lone surrogate, NaN, Infinity or overflowing number reaches the store.
A reading's ``data`` holds at most 1,000 keys (each key becomes a frame on
a subscription socket).  Its ``packet_id`` must name a packet of the same
device; that is checked inside the write transaction
(:func:`iotd.store.events.insert` raises :class:`iotd.errors.ItemInvalid`),
so check and insert are atomic.
"""

from __future__ import annotations

from typing import Any, Callable

from klein import Klein

from iotd import errors
from iotd.ingest_items import MAX_BATCH, ota, packet, reading
from iotd.timefmt import iso, micros_of
from iotd.context import Context
from iotd.request import body_size, read_json, require, respond, visible_device
from iotd.web.site import add_fast_route

_KINDS: dict[str, tuple[str, str, str, Callable[[Any, str], dict]]] = {
    # path part -> (event kind, resource, action, validator)
    "packets": ("packet", "packets", "create", packet),
    "readings": ("reading", "readings", "create", reading),
    "ota": ("ota", "devices", "update", ota),
}


def routes(app: Klein, ctx: Context) -> None:
    async def ingest(request, identifier: str, part: str):
        kind, resource, action, validate = _KINDS[part]
        key = require(ctx, request, resource, action)
        device = visible_device(ctx, key, identifier)
        body = read_json(request)
        many = isinstance(body, list)
        items = body if many else [body]
        if many and not 1 <= len(items) <= MAX_BATCH:
            raise errors.Invalid(f"an array must hold 1-{MAX_BATCH} items")
        now = iso(micros_of(ctx.reactor.seconds()))
        rows = []
        for index, item in enumerate(items):
            try:
                data = validate(item, now)
            except errors.Invalid as e:
                if many:
                    raise errors.Invalid(f"item {index}: {e.message}") from None
                raise
            rows.append((device.tenant, kind, device.identifier, data))
        try:
            events = await ctx.events.append(rows, size=body_size(request))
        except errors.ItemInvalid as e:
            raise errors.Invalid(f"item {e.index}: {e.message}" if many else e.message) from None
        bodies = [e.body() for e in events]
        request.quiet = True  # a device's hot path: counted, kept in the event log, not access-logged
        return respond(request, 201, bodies if many else bodies[0])

    # The hot path: the site root serves these POSTs before Klein's routing (same handler).
    add_fast_route(app, b"POST", rb"/api/v1/devices/([^/]+)/(packets|readings|ota)", ingest)
    for part in _KINDS:
        app.route(f"/api/v1/devices/<identifier>/{part}", methods=["POST"], endpoint=f"ingest_{part}")(
            lambda request, identifier, _part=part: ingest(request, identifier, _part)
        )
