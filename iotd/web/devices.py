"""REST for the device registry and streams (``devices:*``)."""

from __future__ import annotations

from klein import Klein

from iotd import errors
from iotd.registry import validate_device_body
from iotd.context import Context
from iotd.web.request import arg, page, read_json, require, respond, visible_device


def routes(app: Klein, ctx: Context) -> None:
    @app.route("/api/v1/devices", methods=["GET"])
    def list_devices(request):
        key = require(ctx, request, "devices", "read")
        tag = arg(request, "tag")
        devices = [d for d in ctx.registry.devices(key.tenant) if key.sees(d)]
        if tag is not None:
            devices = [d for d in devices if tag in d.tags]
        result = page(request, devices, lambda d: d.identifier)
        result["items"] = [d.to_json() for d in result["items"]]
        return respond(request, 200, result)

    @app.route("/api/v1/devices/<identifier>", methods=["GET"])
    def get_device(request, identifier):
        key = require(ctx, request, "devices", "read")
        return respond(request, 200, visible_device(ctx, key, identifier).to_json())

    @app.route("/api/v1/devices/<identifier>", methods=["PUT"])
    async def put_device(request, identifier):
        key = require(ctx, request, "devices", "read")
        body = validate_device_body(read_json(request))
        existing = ctx.registry.get(key.tenant, identifier)
        action = "update" if existing is not None else "create"
        if not key.allows("devices", action):
            raise errors.Forbidden(f"this key lacks devices:{action}")
        if existing is not None and not key.sees(existing):
            raise errors.NotFound(f"no device {identifier!r}")
        if key.limited and key.groups.isdisjoint(body.get("tags", [])):
            raise errors.Forbidden("a group key may only write devices in its groups")
        device, created = await ctx.registry.put(key.tenant, identifier, body)
        return respond(request, 201 if created else 200, device.to_json())

    @app.route("/api/v1/devices/<identifier>", methods=["DELETE"])
    async def delete_device(request, identifier):
        key = require(ctx, request, "devices", "delete")
        device = visible_device(ctx, key, identifier)
        await ctx.registry.delete(key.tenant, device.identifier)
        return respond(request, 204)

    @app.route("/api/v1/streams/<stream_id>", methods=["PUT"])
    async def put_stream(request, stream_id):
        key = require(ctx, request, "devices", "read")
        action = "update" if ctx.registry.stream(key.tenant, stream_id) else "create"
        if not key.allows("devices", action):
            raise errors.Forbidden(f"this key lacks devices:{action}")
        stream, created = await ctx.registry.put_stream(key.tenant, stream_id, read_json(request))
        return respond(request, 201 if created else 200, stream.to_json())

    @app.route("/api/v1/streams/<stream_id>", methods=["GET"])
    def get_stream(request, stream_id):
        key = require(ctx, request, "devices", "read")
        stream = ctx.registry.stream(key.tenant, stream_id)
        if stream is None:
            raise errors.NotFound(f"no stream {stream_id!r}")
        return respond(request, 200, stream.to_json())

    @app.route("/api/v1/streams/<stream_id>", methods=["DELETE"])
    async def delete_stream(request, stream_id):
        key = require(ctx, request, "devices", "delete")
        if not await ctx.registry.delete_stream(key.tenant, stream_id):
            raise errors.NotFound(f"no stream {stream_id!r}")
        return respond(request, 204)
