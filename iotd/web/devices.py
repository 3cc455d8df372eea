"""REST for the device registry and streams (``devices:*``).

The device list pages through the registry's sorted indexes
(:meth:`iotd.registry.Registry.page`): a page costs the same with 100,000
devices as with 10.  A group key's list is the union of its groups' tag
lists; a group key's ``?tag=`` outside its groups walks the shorter of that
tag's list and its groups' lists.  A stream read by a group key lists only
the devices of ``devices`` the key may read (its ``tags`` are shown as they are).
"""

from __future__ import annotations

from typing import Any

from klein import Klein

from iotd import errors
from iotd.apikeys import ApiKey
from iotd.registry import validate_device_body
from iotd.context import Context
from iotd.request import MAX_LIMIT, arg, query_int, read_json, require, respond, visible_device


def device_page(ctx: Context, key: ApiKey, tag: str | None, limit: int,
                after: str | None) -> tuple[list[Any], bool]:
    """One page of the devices ``key`` may read (with ``tag``, if given), through the indexes."""
    registry, tenant = ctx.registry, key.tenant
    if not key.limited:
        return registry.page(tenant, limit, after, tags=None if tag is None else (tag,))
    if tag is None:
        return registry.page(tenant, limit, after, tags=key.groups)
    if tag in key.groups:
        return registry.page(tenant, limit, after, tags=(tag,))
    # a tag outside the key's groups: walk the shorter side, filter by the other
    groups_size = sum(registry.tag_size(tenant, g) for g in key.groups)
    if registry.tag_size(tenant, tag) <= groups_size:
        return registry.page(tenant, limit, after, tags=(tag,), where=key.sees)
    return registry.page(tenant, limit, after, tags=key.groups, where=lambda d: tag in d.tags)


def routes(app: Klein, ctx: Context) -> None:
    @app.route("/api/v1/devices", methods=["GET"])
    def list_devices(request):
        key = require(ctx, request, "devices", "read")
        limit = query_int(request, "limit", 100, 1, MAX_LIMIT)
        devices, more = device_page(ctx, key, arg(request, "tag"), limit, arg(request, "after"))
        result: dict[str, Any] = {"items": [d.to_json() for d in devices]}
        if more:
            result["next"] = devices[-1].identifier
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
        body = stream.to_json()
        if key.limited:
            body["devices"] = [ident for ident in stream.devices
                               if (device := ctx.registry.get(key.tenant, ident)) is not None and key.sees(device)]
        return respond(request, 200, body)

    @app.route("/api/v1/streams/<stream_id>", methods=["DELETE"])
    async def delete_stream(request, stream_id):
        key = require(ctx, request, "devices", "delete")
        if not await ctx.registry.delete_stream(key.tenant, stream_id):
            raise errors.NotFound(f"no stream {stream_id!r}")
        return respond(request, 204)
