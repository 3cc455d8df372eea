"""Klein routes of the two websocket kinds.

Each route checks the key and the URL first and answers any error as JSON
(before the upgrade); only then does it return the Autobahn
``WebSocketResource`` (through :meth:`iotd.ws.base.SocketFactory.upgrade`),
which takes the connection over.

Every header of an upgrade request must be UTF-8 (Autobahn parses them all
again after us): one that is not is a ``400`` ``invalid_header`` naming it,
before anything else is looked at.  The subscription connect reads each
parameter from the ``ithings-`` header, the plain header, the ``ithings-``
query name, then the plain query name (``ithings-token`` before ``token``, as
the iThings server does); ``Authorization: Bearer`` and ``?auth=`` work too.
A key the ring does not know yet is looked up in the store before the 401.
"""

from __future__ import annotations

from typing import Any

from klein import Klein

from iotd import errors, metrics
from iotd.context import Context
from iotd.request import arg, authenticate, header, key_of, respond


def check_headers(request: Any) -> None:
    """400 ``invalid_header`` when a header's value is not UTF-8."""
    for name, values in request.requestHeaders.getAllRawHeaders():
        for value in values:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                shown = name.decode("ascii", "replace")
                raise errors.BadRequest(f"header {shown} is not UTF-8", code="invalid_header") from None


# -- event sockets (ELEMENT) ---------------------------------------------------

_ELEMENT_URLS = {
    # scope -> URL prefix (the target, if any, is the <target> part)
    "device": "/api/v1/devices/<target>",
    "tag": "/api/v1/tags/<target>",
    "stream": "/api/v1/streams/<target>",
    "mandate": "/api/v1",
}
_PARTS = {"packets": ("packet", "packets"), "readings": ("reading", "readings")}


def element_routes(app: Klein, ctx: Context, factory: Any) -> None:
    from iotd.ws.element import parse_after, parse_preload

    async def element_socket(request: Any, scope: str, part: str, target: str | None) -> Any:
        kind, resource = _PARTS[part]
        check_headers(request)
        key = authenticate(ctx, request)
        if not key.allows(resource, "read"):
            raise errors.Forbidden(f"this key lacks {resource}:read")
        tenant = key.tenant
        if scope == "mandate":
            if key.role not in ("admin", "read_only"):
                raise errors.Forbidden("tenant-wide sockets need an admin or read_only key")
            target = ""
        elif scope == "device":
            device = ctx.registry.get(tenant, target)
            if device is None:
                raise errors.NotFound(f"no device {target!r}")
            if not key.sees(device):
                raise errors.Forbidden(f"this key may not read device {device.identifier}")
            target = device.identifier
        elif scope == "tag":
            if key.limited and target not in key.groups:
                raise errors.Forbidden(f"tag {target!r} is not one of this key's groups")
            if not ctx.registry.has_tag(tenant, target):
                raise errors.NotFound(f"no tag {target!r}")
        elif ctx.registry.stream(tenant, target) is None:
            raise errors.NotFound(f"no stream {target!r}")
        preload = parse_preload(arg(request, "preload"), kind)
        after = arg(request, "after")
        after_id = None
        if after is not None:
            after_id = await ctx.events.id_at(parse_after(after))
            if ctx.keys.authenticate(key_of(request)) is None:  # revoked or expired while we looked
                raise errors.Unauthorized("a valid API key is required")

        def setup(sock: Any) -> None:
            sock.configure(tenant, kind, scope, target, preload, after_id)

        return factory.upgrade(request, key, setup)

    for scope, prefix in _ELEMENT_URLS.items():
        for part in _PARTS:
            path = f"{prefix}/{part}/socket"
            endpoint = f"ws_{scope}_{part}"
            if scope == "mandate":
                handler = (lambda request, _s=scope, _p=part: element_socket(request, _s, _p, None))
            else:
                handler = (lambda request, target, _s=scope, _p=part: element_socket(request, _s, _p, target))
            app.route(path, methods=["GET"], endpoint=endpoint)(handler)


# -- subscriptions (iThings) -----------------------------------------------------

AUTH_FAILED = {"code": 100002, "msg": "认证失败"}
CONNECT_PATH = "/api/v1/system/common/websocket/connect"


def connect_param(request: Any, name: str) -> str | None:
    """A connect parameter: ``ithings-`` header, header, ``ithings-`` query name, query name."""
    for read in (header, arg):
        for candidate in ("ithings-" + name, name):
            value = read(request, candidate)
            if value and value.strip():
                return value.strip()
    return None


def subscribe_routes(app: Klein, ctx: Context, factory: Any) -> None:
    @app.route(CONNECT_PATH, methods=["GET"], endpoint="ws_subscribe_connect")
    async def connect(request: Any) -> Any:
        check_headers(request)
        # (a key the ring did not know yet was looked up by the site root before this)
        key = ctx.keys.authenticate(key_of(request))
        tenant_code = connect_param(request, "tenant-code")
        if key is None or (tenant_code is not None and tenant_code != key.tenant):
            metrics.auth_failures.inc()
            return respond(request, 401, AUTH_FAILED)
        app_code = connect_param(request, "app-code")
        project_id = connect_param(request, "project-id")

        def setup(sock: Any) -> None:
            sock.configure(app_code, project_id)

        return factory.upgrade(request, key, setup)
