"""DeviceLink REST (``deviceLink:*``) and the job that wires it to its link manager.

``POST /api/v1/devicelink/{device}`` opens a TCP or UDP port relaying to the
device's registry ``host``; ``DELETE /api/v1/devicelink/{token}`` closes it;
``GET /api/v1/devicelink`` lists the tenant's open links of every node
(``GET /api/v1/devicelink/{token}`` one of them), each with its ``node``.
``GET /api/v1/devicelink/{token}/socket`` uses a TCP link over a websocket
(:mod:`iotd.web.devicelink_socket`).  The relay itself is :mod:`iotd.relay` (its service:
:mod:`iotd.relay.service`; every node's links: :mod:`iotd.relay.directory`).

Several nodes (spec 50): a link's sockets are on the node that created it
(the create answer's ``node``).  The create answer waits for the link's row
in the store to commit, so any node lists the link once it is answered.  A
``DELETE`` on another node is forwarded over the bus
(:mod:`iotd.relay.forward`): ``204`` once the owner confirmed the close,
``504`` (``node_timeout``) when it did not answer within 5 s, ``503``
(``node_failed``) when its close failed.

Device addresses follow :mod:`iotd.relay.addresses`: an address literal
outside the rule is 403 at creation (with an empty
``[devicelink] allowed_device_networks``: loopback, unspecified, link-local
and their IPv4-mapped forms); a host *name* is accepted for TCP and resolved
and checked when the link's client connects (a client whose device resolves
only to refused addresses is closed); a UDP link needs an address (422).

Limits: ``[devicelink] require_source`` (a request without ``source`` is
422), ``max_links`` and ``max_links_per_tenant`` (503 naming the cap).  A
group key creates, lists and deletes links only of devices in its groups; a
link of any other device is a 404 to it, as one it cannot see.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from klein import Klein
from twisted.application import service

from iotd import errors
from iotd.relay.directory import LinkDirectory
from iotd.relay.forward import CloseTimeout
from iotd.relay.links import AddressNotAllowed, LinkManager, NoFreePort, TenantLinkLimit
from iotd.relay.service import start_links
from iotd.relay.ws_side import LinkSockets
from iotd.web import devicelink_socket
from iotd.context import Context
from iotd.request import read_json, require, respond, visible_device

_HEX = re.compile(r"^[0-9a-fA-F]*$")


def _port(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise errors.Invalid(f"{name} must be a port number 1-65535")
    return value


def _hex(value: Any, name: str, chars: int) -> bytes:
    if not isinstance(value, str) or len(value) != chars or not _HEX.match(value):
        raise errors.Invalid(f"{name} must be {chars} hex characters")
    return bytes.fromhex(value)


def _count(body: Any, name: str, default: int, unit: str) -> int:
    value = body.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 2**31:
        raise errors.Invalid(f"{name} must be {unit} >= 0")
    return value


def parse_link_request(body: Any, device: Any, default_timeout_ms: int,
                       require_source: bool = False, max_duration_ms: int = 0,
                       rate_limit: int = 0) -> dict[str, Any]:
    """The checked request with defaults filled in; raises Invalid (422)."""
    errors.require_object(body, {"protocol", "devicePort", "timeout", "source", "encrypt",
                                 "maxDuration", "rateLimit"})
    protocol = body.get("protocol")
    if protocol not in ("tcp", "udp"):
        raise errors.Invalid("protocol must be 'tcp' or 'udp'")
    port = body.get("devicePort")
    if port is None:
        port = device.ports.get("default")
        if port is None:
            raise errors.Invalid("devicePort is required: the device has no ports.default")
    port = _port(port, "devicePort")
    timeout = _count(body, "timeout", default_timeout_ms, "milliseconds")
    duration = _count(body, "maxDuration", max_duration_ms, "milliseconds")
    rate = _count(body, "rateLimit", rate_limit, "bytes per second")
    source = body.get("source")
    if source is None and require_source:
        raise errors.Invalid("source is required: [devicelink] require_source is set")
    if source is not None:
        if not isinstance(source, dict) or set(source) - {"host", "port"}:
            raise errors.Invalid("source must be {\"host\", \"port\"}")
        host = source.get("host")
        try:
            ipaddress.ip_address(host)
        except (ValueError, TypeError):
            raise errors.Invalid("source.host must be an IP address") from None
        source = {"host": host, "port": _port(source.get("port"), "source.port")}
    encrypt = body.get("encrypt")
    key = iv = None
    if encrypt is not None:
        if not isinstance(encrypt, dict) or set(encrypt) != {"key", "initializationVector"}:
            raise errors.Invalid("encrypt must be {\"key\", \"initializationVector\"}")
        key = _hex(encrypt["key"], "encrypt.key", 64)
        iv = _hex(encrypt["initializationVector"], "encrypt.initializationVector", 32)
    return {"protocol": protocol, "devicePort": port, "timeout": timeout, "source": source,
            "encrypt": encrypt, "maxDuration": duration or None, "rateLimit": rate or None,
            "_key": key, "_iv": iv}


def check_device_host(host: str | None, manager: LinkManager) -> str:
    """The device's host, if a link may be opened to it: 422 without one, 403 outside the rule."""
    if not host:
        raise errors.Invalid("the device has no host in the registry")
    try:
        manager.check_device_host(host)
    except AddressNotAllowed as e:
        raise errors.Forbidden(str(e), code="device_host_not_allowed") from None
    return host


def routes(app: Klein, ctx: Context, directory: LinkDirectory) -> None:
    cfg = ctx.config.devicelink
    manager = directory.manager
    devicelink_socket.routes(app, manager, LinkSockets(ctx.reactor))

    @app.route("/api/v1/devicelink/<identifier>", methods=["POST"])
    async def create_link(request, identifier):
        key = require(ctx, request, "deviceLink", "create")
        device = visible_device(ctx, key, identifier)
        req = parse_link_request(read_json(request), device, cfg.default_timeout_ms, cfg.require_source,
                                 cfg.max_duration_ms, cfg.rate_limit)
        host = check_device_host(device.host, manager)
        source = (req["source"]["host"], req["source"]["port"]) if req["source"] else None
        try:
            link = manager.open(tenant=key.tenant, device=device.identifier, protocol=req["protocol"],
                                device_host=host, device_port=req["devicePort"], timeout_ms=req["timeout"],
                                source=source, key=req["_key"], iv=req["_iv"],
                                max_duration_ms=req["maxDuration"] or 0, rate_limit=req["rateLimit"] or 0)
        except TenantLinkLimit as e:
            raise errors.Unavailable(str(e), code="too_many_links") from None
        except NoFreePort as e:
            raise errors.Unavailable(str(e) or "no free link port", code="no_free_port") from None
        except AddressNotAllowed as e:
            raise errors.Forbidden(str(e), code="device_host_not_allowed") from None
        except ValueError as e:  # e.g. a UDP link to a device whose host is a name
            raise errors.Invalid(str(e)) from None
        out = {k: v for k, v in req.items() if not k.startswith("_") and v is not None}
        out.update(device=device.identifier, port=link.port, token=link.token, node=ctx.cluster.node)
        if link.expires_at is not None:
            out["expiresAt"] = link.to_json()["expiresAt"]
        if cfg.public_host:
            out["host"] = cfg.public_host
        await directory.rows.written(link.token)  # every node lists it once we answer
        return respond(request, 201, out)

    @app.route("/api/v1/devicelink/<token>", methods=["DELETE"])
    async def delete_link(request, token):
        key = require(ctx, request, "deviceLink", "delete")
        try:
            result = await directory.close(token, key.tenant, _visibility(ctx, key))
        except CloseTimeout:
            raise errors.ApiError("the node that holds this link did not confirm its close in time",
                                  code="node_timeout", status=504) from None
        if result == "unknown":
            raise errors.NotFound("no such link")
        if result != "closed":
            raise errors.Unavailable("the node that holds this link could not close it", code="node_failed")
        return respond(request, 204)

    @app.route("/api/v1/devicelink/<token>", methods=["GET"])
    async def get_link(request, token):
        key = require(ctx, request, "deviceLink", "read")
        doc = await directory.find(token, key.tenant, _visibility(ctx, key))
        if doc is None:
            raise errors.NotFound("no such link")
        return respond(request, 200, doc)

    @app.route("/api/v1/devicelink", methods=["GET"])
    async def list_links(request):
        key = require(ctx, request, "deviceLink", "read")
        return respond(request, 200, {"items": await directory.list(key.tenant, _visibility(ctx, key))})


def _visibility(ctx: Context, key: Any):
    """``visible(device)`` for ``key``: every device of its tenant, or those its groups allow."""
    if not key.limited:
        return lambda identifier: True
    return lambda identifier: _visible(ctx, key, identifier)


def _visible(ctx: Context, key: Any, identifier: str) -> bool:
    device = ctx.registry.get(key.tenant, identifier)
    return device is not None and key.sees(device)


def job(ctx: Context, parent: service.MultiService):
    """The link manager's service when ``[devicelink] enabled``, and the routes that use it."""
    if not ctx.config.devicelink.enabled:
        return None
    directory = start_links(ctx, parent)
    return lambda app, ctx: routes(app, ctx, directory)
