"""Push, bulk: one command to many devices (``commands:create``), and the batch view (``commands:read``).

- ``POST /api/v1/commands`` ``{"devices": [identifiers]?, "tag": T?, "command": {...}}``
  queues one command per matching device in one transaction -> ``201
  {"batch", "commands": [{"device", "id"}]}``.  Every device must be one the
  key may command (``403`` naming the first that is not; nothing is queued);
  at most :data:`MAX_DEVICES` devices (``422`` beyond).  A tag is looked up in
  the registry's tag index (its size first), never by walking every device.
- ``GET /api/v1/command-batches/{id}`` -> ``{"batch", "createdAt", "total",
  "byStatus", "commands": [{"device", "id", "status"}], "next"?}`` (paged
  with ``after`` and ``limit`` like every list).

The command's own checks are :func:`iotd.web.push.validate_command`; the
queueing is :meth:`iotd.push.CommandService.create_batch`.
"""

from __future__ import annotations

from typing import Any

from klein import Klein

from iotd import errors
from iotd.context import Context
from iotd.push import CommandService, STATES
from iotd.request import query_int, read_json, require, respond
from iotd.timefmt import iso

MAX_DEVICES = 10_000
MAX_ID = 2**63 - 1


def _targets(ctx: Context, key: Any, body: dict[str, Any]) -> list[str]:
    """The identifiers the bulk request names (the list, then the tag's), each once, all commandable."""
    names = body.get("devices")
    tag = body.get("tag")
    if names is None and tag is None:
        raise errors.Invalid("give devices or tag")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise errors.Invalid("devices must be a list of device identifiers")
        if len(names) > MAX_DEVICES:
            raise errors.Invalid(f"devices: at most {MAX_DEVICES} devices a batch")
    if tag is not None and (not isinstance(tag, str) or not tag):
        raise errors.Invalid("tag must be a non-empty string")
    found: dict[str, None] = {}
    for name in names or ():
        device = ctx.registry.get(key.tenant, name)
        if device is None or not key.sees(device):
            raise errors.Forbidden(f"this key may not command device {errors.short(name)}")
        found[device.identifier] = None
    if tag is not None:
        if len(found) + ctx.registry.tag_size(key.tenant, tag) > MAX_DEVICES:
            raise errors.Invalid(f"tag: at most {MAX_DEVICES} devices a batch")
        for device in ctx.registry.tagged(key.tenant, tag):
            if not key.sees(device):
                raise errors.Forbidden(f"this key may not command device {errors.short(device.identifier)}")
            found[device.identifier] = None
    if len(found) > MAX_DEVICES:
        raise errors.Invalid(f"devices: at most {MAX_DEVICES} devices a batch")
    if not found:
        raise errors.Invalid("tag: no device carries this tag" if tag is not None else "devices must not be empty")
    return list(found)


def bulk_routes(svc: CommandService, validate_command: Any):
    """The ``routes(app, ctx)`` of bulk commands and the batch view."""

    def routes(app: Klein, ctx: Context) -> None:
        @app.route("/api/v1/commands", methods=["POST"])
        async def commands_bulk(request):
            key = require(ctx, request, "commands", "create")
            body = errors.require_object(read_json(request), {"devices", "tag", "command"})
            if "command" not in body:
                raise errors.Invalid("command is required")
            spec = validate_command(body["command"])
            devices = _targets(ctx, key, body)
            cmds = await svc.create_batch(key.tenant, devices, spec)
            return respond(request, 201, {"batch": cmds[0].batch,
                                          "commands": [{"device": c.device, "id": c.id} for c in cmds]})

        @app.route("/api/v1/command-batches/<int:batch_id>", methods=["GET"])
        async def command_batch(request, batch_id):
            key = require(ctx, request, "commands", "read")
            limit = query_int(request, "limit", 100, 1, 1000)
            after = query_int(request, "after", 0, 0, MAX_ID)
            found = await svc.batch(batch_id, after, MAX_DEVICES if key.limited else limit + 1)
            if found is None or found["tenant"] != key.tenant:
                raise errors.NotFound(f"no command batch {batch_id}")
            rows = found["commands"]
            if key.limited:  # a group key sees a batch only when it may see every device in it
                everything = rows if after == 0 else (await svc.batch(batch_id, 0, MAX_DEVICES))["commands"]
                for _, ident, _ in everything:
                    device = ctx.registry.get(key.tenant, ident)
                    if device is None or not key.sees(device):
                        raise errors.NotFound(f"no command batch {batch_id}")
                rows = rows[:limit + 1]
            items = [{"device": d, "id": i, "status": s} for i, d, s in rows[:limit]]
            counts = found["counts"]
            out: dict[str, Any] = {
                "batch": batch_id, "createdAt": iso(found["created_us"]), "total": found["total"],
                "byStatus": {s: counts.get(s, 0) for s in STATES}, "commands": items}
            if len(rows) > limit:
                out["next"] = items[-1]["id"]
            return respond(request, 200, out)

    return routes
