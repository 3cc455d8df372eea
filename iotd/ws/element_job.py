"""The event sockets job: its service and its eight Klein routes.

Each route checks the key and the URL first and answers any error as JSON
(before the upgrade, :mod:`iotd.ws.upgrade`); only then does it return the
Autobahn ``WebSocketResource`` (through
:meth:`iotd.ws.factory.SocketFactory.upgrade`), which takes the connection
over.
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.application import service

from iotd import errors, metrics, scopes
from iotd.context import Context
from iotd.request import arg
from iotd.ws.element import ElementFactory
from iotd.store import history as histsql
from iotd.ws.element_format import parse_after, parse_preload
from iotd.ws.factory import SocketService
from iotd.ws.limits import Limits
from iotd.ws.upgrade import still_valid, upgrade_key

URLS = {
    # scope -> URL prefix (the target, if any, is the <target> part)
    "device": "/api/v1/devices/<target>",
    "tag": "/api/v1/tags/<target>",
    "stream": "/api/v1/streams/<target>",
    "mandate": "/api/v1",
}
PARTS = {"packets": "packet", "readings": "reading"}


def routes(app: Klein, ctx: Context, factory: ElementFactory) -> None:
    async def element_socket(request: Any, scope: str, part: str, target: str | None) -> Any:
        kind = PARTS[part]
        key = upgrade_key(ctx, request)
        if key is None:
            raise errors.Unauthorized("a valid API key is required")
        scopes.check_read(key, kind)
        tenant = key.tenant
        target = scopes.open_scope(ctx.registry, key, scope, target)
        preload = parse_preload(arg(request, "preload"), kind)
        after = arg(request, "after")
        after_id = None
        if after is not None:
            after_us = parse_after(after)
            after_id = await ctx.events.id_at(after_us)
            _, pruned_us = await ctx.store.read(histsql.pruned_through)
            if after_us < pruned_us:  # retention removed some of what lay after `after`: replay the rest
                metrics.replays_pruned.labels(kind).inc()
            still_valid(ctx, request)  # revoked or expired while we looked

        def setup(sock: Any) -> None:
            sock.configure(tenant, kind, scope, target, preload, after_id)

        return factory.upgrade(request, key, setup)

    for scope, prefix in URLS.items():
        for part in PARTS:
            path = f"{prefix}/{part}/socket"
            endpoint = f"ws_{scope}_{part}"
            if scope == "mandate":
                handler = (lambda request, _s=scope, _p=part: element_socket(request, _s, _p, None))
            else:
                handler = (lambda request, target, _s=scope, _p=part: element_socket(request, _s, _p, target))
            app.route(path, methods=["GET"], endpoint=endpoint)(handler)


def job(ctx: Context, parent: service.MultiService, limits: Limits) -> Any:
    """The event sockets' service (1001 on stop) and the routes that upgrade to them."""
    factory = ElementFactory(ctx, limits)
    SocketService("element-ws", factory).setServiceParent(parent)
    return lambda app, ctx: routes(app, ctx, factory)
