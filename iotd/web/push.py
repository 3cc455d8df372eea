"""Push, the operator side: the commands REST (``commands:*``), and the push job's wiring.

- ``POST /api/v1/devices/{identifier}/commands`` queues (``?wait=S`` holds the
  answer until the command finishes: ``200``, or ``202`` when time is up);
- ``GET /api/v1/commands/{id}``, ``GET /api/v1/devices/{identifier}/commands``;
- ``DELETE /api/v1/commands/{id}`` cancels a queued command (``409`` once sent);
- ``POST /api/v1/commands`` (bulk) and ``GET /api/v1/command-batches/{id}``:
  :mod:`iotd.web.push_bulk`.

Every handler calls the command service (:class:`iotd.push.CommandService`);
none touches SQL.  The device side is :mod:`iotd.web.push_device`.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from klein import Klein
from twisted.application import service, strports
from twisted.internet import defer

from iotd import errors
from iotd.context import Context
from iotd.push import Command, CommandService, STATES
from iotd.timefmt import parse_iso
from iotd.request import arg, query_int, read_json, require, respond, visible_device
from iotd.web.app import make_app
from iotd.web.push_bulk import bulk_routes
from iotd.web.push_device import device_routes
from iotd.web.site import make_site

MAX_WAIT = 60.0
MAX_ID = 2**63 - 1
_ENDPOINT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_FIELDS = {"verb", "endpoint", "body", "contentType", "queryString", "ttl", "expiresAt"}
MAX_TTL = 2_592_000  # seconds (30 days)


# -- validation -----------------------------------------------------------------


def validate_command(body: Any) -> dict[str, Any]:
    """The checked command spec of a queue request; raises Invalid (422)."""
    if not isinstance(body, dict):
        raise errors.Invalid("body must be a JSON object")
    unknown = set(body) - _FIELDS
    if unknown:
        raise errors.Invalid(f"unknown field {errors.short(sorted(unknown)[0])}")
    out: dict[str, Any] = {}
    endpoint = body.get("endpoint")
    if not isinstance(endpoint, str) or not _ENDPOINT.match(endpoint):
        raise errors.Invalid("endpoint must be a path segment like load_objects or set_configuration.fcgi")
    out["endpoint"] = endpoint
    verb = body.get("verb")
    if verb is not None:
        if not isinstance(verb, str) or verb.upper() not in ("GET", "POST"):
            raise errors.Invalid("verb must be GET or POST")
        out["verb"] = verb.upper()
    ctype = body.get("contentType")
    if ctype is not None:
        if not isinstance(ctype, str) or not ctype.strip() or len(ctype) > 200 or _CONTROL.search(ctype):
            raise errors.Invalid("contentType must be a media type such as application/json")
        out["contentType"] = ctype
    qs = body.get("queryString")
    if qs is not None:
        if not isinstance(qs, str) or len(qs) > 8192 or _CONTROL.search(qs):
            raise errors.Invalid("queryString must be a string without control characters")
        out["queryString"] = qs
    payload = body.get("body")
    if payload is not None:
        if not isinstance(payload, (dict, list, str)):
            raise errors.Invalid("body must be an object, an array or a string")
        out["body"] = payload
    if ctype is not None and ctype.split(";", 1)[0].strip().lower() == "application/octet-stream":
        if payload is not None:
            if not isinstance(payload, str):
                raise errors.Invalid("body must be a base64 string for application/octet-stream")
            try:
                base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise errors.Invalid("body must be a base64 string for application/octet-stream") from None
    ttl, expires = body.get("ttl"), body.get("expiresAt")
    if ttl is not None and expires is not None:
        raise errors.Invalid("give ttl or expiresAt, not both")
    if ttl is not None:
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 1 <= ttl <= MAX_TTL:
            raise errors.Invalid(f"ttl must be seconds (1-{MAX_TTL})")
        out["ttl"] = float(ttl)
    if expires is not None:
        try:
            out["expiresAt"] = parse_iso(expires)  # micros
        except (TypeError, ValueError, OverflowError):
            raise errors.Invalid("expiresAt must be an ISO 8601 date-time such as 2030-01-01T00:00:00Z") from None
    return out


def _wait_seconds(request: Any) -> float | None:
    text = arg(request, "wait")
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise errors.BadRequest("query parameter wait must be seconds (0-60)") from None
    if not 0 <= value <= MAX_WAIT:  # also rejects nan
        raise errors.BadRequest("query parameter wait must be seconds (0-60)")
    return value


# -- the operator side ----------------------------------------------------------


def operator_routes(svc: CommandService):
    """The ``routes(app, ctx)`` of the commands REST (``commands:*``)."""

    bulk = bulk_routes(svc, validate_command)

    def routes(app: Klein, ctx: Context) -> None:
        bulk(app, ctx)

        def visible(key: Any, cmd: Command | None) -> bool:
            if cmd is None or cmd.tenant != key.tenant:
                return False
            if not key.limited:
                return True
            device = ctx.registry.get(cmd.tenant, cmd.device)
            return device is not None and key.sees(device)

        async def stored(key: Any, command_id: int) -> Command:
            cmd = await svc.get(command_id)
            if not visible(key, cmd):
                raise errors.NotFound(f"no command {command_id}")
            return cmd

        @app.route("/api/v1/devices/<identifier>/commands", methods=["POST"])
        async def commands_create(request, identifier):
            key = require(ctx, request, "commands", "create")
            device = visible_device(ctx, key, identifier)
            wait = _wait_seconds(request)
            spec = validate_command(read_json(request))
            cmd = await svc.create(key.tenant, device.identifier, spec)
            if wait is None:
                return respond(request, 201, cmd.to_json())
            cmd = await svc.wait(cmd, wait)
            return respond(request, 200 if cmd.finished else 202, cmd.to_json())

        @app.route("/api/v1/devices/<identifier>/commands", methods=["GET"])
        async def commands_list(request, identifier):
            key = require(ctx, request, "commands", "read")
            device = visible_device(ctx, key, identifier)
            status = arg(request, "status")
            if status is not None and status not in STATES:
                raise errors.BadRequest(f"query parameter status must be one of {', '.join(STATES)}")
            limit = query_int(request, "limit", 100, 1, 1000)
            after = query_int(request, "after", 0, 0, MAX_ID)
            found = await svc.list_for_device(key.tenant, device.identifier, status, after, limit + 1)
            items = [c.to_json() for c in found[:limit]]
            out: dict[str, Any] = {"items": items}
            if len(found) > limit:
                out["next"] = items[-1]["id"]
            return respond(request, 200, out)

        @app.route("/api/v1/commands/<int:command_id>", methods=["GET"])
        async def commands_get(request, command_id):
            key = require(ctx, request, "commands", "read")
            cmd = await stored(key, command_id)
            return respond(request, 200, cmd.to_json())

        @app.route("/api/v1/commands/<int:command_id>", methods=["DELETE"])
        async def commands_cancel(request, command_id):
            key = require(ctx, request, "commands", "delete")
            await stored(key, command_id)
            try:
                await svc.cancel(command_id)
            except errors.NotFound:  # (gone meanwhile)
                raise errors.NotFound(f"no command {command_id}") from None
            return respond(request, 204)

    return routes


# -- the job --------------------------------------------------------------------


def job(ctx: Context, parent: service.MultiService):
    """Add the command service when ``[push] enabled``; returns the routes for the main app.

    With ``[push] listen`` set, ``/push`` and ``/result`` are served only on
    those endpoints (the devices' network) by a site of their own, and the
    main app gets only the operator REST.  The routes close over the service
    built here (it is also the tree's child named ``push``).
    """
    cfg = ctx.config.push
    if not cfg.enabled:
        return None
    svc = CommandService(ctx.store, ctx.registry, ctx.events, ctx.reactor, cfg, cluster=ctx.cluster)
    svc.setServiceParent(parent)
    ctx.registry.add_delete_listener(svc.device_deleted)
    # Load the queue once the core (store, registry) is up; whoever awaits
    # core.started (tests, the start-up) then finds the queue loaded too.
    core = parent.getServiceNamed("core")
    core.started.addCallback(lambda result: defer.Deferred.fromCoroutine(svc.load()).addCallback(lambda _: result))
    device, operator = device_routes(svc), operator_routes(svc)
    if not cfg.listen:
        def routes(app: Klein, ctx: Context) -> None:
            device(app, ctx)
            operator(app, ctx)

        return routes
    site = make_site(ctx, make_app(ctx, [device]), ready=lambda: svc.ready)
    for index, endpoint in enumerate(cfg.listen):
        listener = strports.service(endpoint, site, reactor=ctx.reactor)
        listener.setName(f"push-{index}")
        listener.setServiceParent(parent)
    return operator
