"""REST for API keys (``apiKeys:*``).

A key may mint only keys within its own rights and lifetime: the new key's
rights are a subset of the creator's, and a creator with an ``expiresAt``
mints only keys that expire no later than it does (403 otherwise, like any
other "beyond its own rights" refusal).  Revoking needs rights covering the
target key's.  The listing shows ``lastUsedAt`` (recorded at most once a
minute) once a key was used.  ``GET /api/v1/api-keys/self`` shows the
presented key itself, to any key (the web console offers only what it may do).
"""

from __future__ import annotations

from typing import Any

from klein import Klein

from iotd import errors
from iotd.apikeys import ApiKey, validate_key_request
from iotd.context import Context
from iotd.timefmt import iso, parse_iso
from iotd.request import page, read_json, require, respond


def _expiry(body: dict[str, Any]) -> int | None:
    expires = body.get("expiresAt")
    if expires is None:
        return None
    try:
        return parse_iso(expires)
    except (ValueError, TypeError):
        raise errors.Invalid("expiresAt must be an ISO 8601 date-time") from None


def _check_lifetime(creator: ApiKey, expires_us: int | None) -> None:
    """403 unless a key expiring at ``expires_us`` dies no later than ``creator``."""
    if not creator.outlived_by(expires_us):
        return
    limit = iso(creator.expires_at)
    if expires_us is None:
        raise errors.Forbidden(f"expiresAt is required: this key expires at {limit}, "
                               "and a key may only create keys that expire no later than it does")
    raise errors.Forbidden(f"expiresAt must not be later than this key's own expiry ({limit})")


def routes(app: Klein, ctx: Context) -> None:
    @app.route("/api/v1/api-keys", methods=["POST"])
    async def create_key(request):
        key = require(ctx, request, "apiKeys", "create")
        body = errors.require_object(read_json(request), {"name", "role", "groups", "permissions", "expiresAt"})
        role = body.get("role")
        groups = body.get("groups", [])
        permissions = body.get("permissions", [])
        validate_key_request(role, groups, permissions, body.get("name"))
        expires_us = _expiry(body)
        if not key.covers(role, groups, permissions):
            raise errors.Forbidden("a key may only create keys within its own rights")
        _check_lifetime(key, expires_us)
        new, secret = await ctx.keys.create(key.tenant, body["name"], role, groups, permissions, expires_us)
        return respond(request, 201, {**new.to_json(), "key": secret})

    @app.route("/api/v1/api-keys", methods=["GET"])
    def list_keys(request):
        key = require(ctx, request, "apiKeys", "read")
        if key.role == "group":
            raise errors.Forbidden("group keys cannot list keys")
        result = page(request, ctx.keys.list(key.tenant), lambda k: k.id)
        result["items"] = [k.to_json(ctx.keys.last_used(k.id)) for k in result["items"]]
        return respond(request, 200, result)

    @app.route("/api/v1/api-keys/self", methods=["GET"])
    def own_key(request):
        """The presented key itself (role, groups, grants): what a client may offer its user."""
        key = require(ctx, request, "apiKeys", "read")
        return respond(request, 200, key.to_json(ctx.keys.last_used(key.id)))

    @app.route("/api/v1/api-keys/<key_id>", methods=["DELETE"])
    async def revoke_key(request, key_id):
        key = require(ctx, request, "apiKeys", "delete")
        target = await ctx.keys.find(key_id, key.tenant)
        if target is None:
            raise errors.NotFound(f"no key {key_id!r}")
        if not key.covers_key(target):
            raise errors.Forbidden("a key may only revoke keys within its own rights")
        if not await ctx.keys.revoke(key_id, key.tenant):
            raise errors.NotFound(f"no key {key_id!r}")
        return respond(request, 204)
