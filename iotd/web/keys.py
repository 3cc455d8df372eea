"""REST for API keys (``apiKeys:*``).  A key may mint only keys within its own rights."""

from __future__ import annotations

from klein import Klein

from iotd import errors
from iotd.auth import validate_key_request
from iotd.timefmt import parse_iso
from iotd.context import Context
from iotd.web.request import page, read_json, require, respond


def routes(app: Klein, ctx: Context) -> None:
    @app.route("/api/v1/api-keys", methods=["POST"])
    async def create_key(request):
        key = require(ctx, request, "apiKeys", "create")
        body = errors.require_object(read_json(request), {"name", "role", "groups", "permissions", "expiresAt"})
        role = body.get("role")
        groups = body.get("groups", [])
        permissions = body.get("permissions", [])
        validate_key_request(role, groups, permissions, body.get("name"))
        expires = body.get("expiresAt")
        expires_us = None
        if expires is not None:
            try:
                expires_us = parse_iso(expires)
            except (ValueError, TypeError):
                raise errors.Invalid("expiresAt must be an ISO 8601 date-time") from None
        if not key.covers(role, groups, permissions):
            raise errors.Forbidden("a key may only create keys within its own rights")
        new, secret = await ctx.keys.create(key.tenant, body["name"], role, groups, permissions, expires_us)
        return respond(request, 201, {**new.to_json(), "key": secret})

    @app.route("/api/v1/api-keys", methods=["GET"])
    def list_keys(request):
        key = require(ctx, request, "apiKeys", "read")
        if key.role == "group":
            raise errors.Forbidden("group keys cannot list keys")
        result = page(request, ctx.keys.list(key.tenant), lambda k: k.id)
        result["items"] = [k.to_json() for k in result["items"]]
        return respond(request, 200, result)

    @app.route("/api/v1/api-keys/<key_id>", methods=["DELETE"])
    async def revoke_key(request, key_id):
        key = require(ctx, request, "apiKeys", "delete")
        if not await ctx.keys.revoke(key_id, key.tenant):
            raise errors.NotFound(f"no key {key_id!r}")
        return respond(request, 204)
