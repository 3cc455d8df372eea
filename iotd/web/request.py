"""What every REST handler shares: reading a request, checking its key, answering it.

Query values, headers, JSON bodies and keys are read here, once, with every
check a hostile client needs (undecodable bytes are 400 JSON, never 500).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from iotd import errors, metrics
from iotd.auth import ApiKey, presented_key
from iotd.context import Context

JSON = b"application/json"
MAX_LIMIT = 1000


def arg(request: Any, name: str) -> str | None:
    values = request.args.get(name.encode())
    if not values:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise errors.BadRequest(f"query parameter {name} is not UTF-8") from None


def header(request: Any, name: str) -> str | None:
    value = request.getHeader(name)
    return value if value is None or isinstance(value, str) else value.decode("latin-1")


def key_of(request: Any) -> str | None:
    return presented_key(lambda n: header(request, n), lambda n: arg(request, n))


def authenticate(ctx: Context, request: Any) -> ApiKey:
    key = ctx.keys.authenticate(key_of(request))
    if key is None:
        metrics.auth_failures.inc()
        raise errors.Unauthorized("a valid API key is required")
    return key


def require(ctx: Context, request: Any, resource: str, action: str) -> ApiKey:
    """The request's key, if it may do ``action`` on ``resource``; else 401/403."""
    key = authenticate(ctx, request)
    if not key.allows(resource, action):
        raise errors.Forbidden(f"this key lacks {resource}:{action}")
    return key


def visible_device(ctx: Context, key: ApiKey, identifier: str) -> Any:
    """The key's tenant's device, or 404 (also for one outside a group key's groups)."""
    device = ctx.registry.get(key.tenant, identifier)
    if device is None or not key.sees(device):
        raise errors.NotFound(f"no device {identifier!r}")
    return device


def read_json(request: Any, required: bool = True) -> Any:
    ctype = header(request, "content-type")
    if ctype and ctype.split(";", 1)[0].strip().lower() not in ("application/json", "text/json", ""):
        if not ctype.split(";", 1)[0].strip().lower().endswith("+json"):
            raise errors.UnsupportedMediaType("body must be application/json")
    raw = request.content.read() if request.content is not None else b""
    if not raw.strip():
        if required:
            raise errors.BadRequest("a JSON body is required", code="invalid_json")
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise errors.BadRequest(f"malformed JSON: {str(e)[:200]}", code="invalid_json") from None


def query_int(request: Any, name: str, default: int, low: int, high: int) -> int:
    text = arg(request, name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise errors.BadRequest(f"query parameter {name} must be a whole number") from None
    if not low <= value <= high:
        raise errors.BadRequest(f"query parameter {name} must be {low}-{high}")
    return value


def page(request: Any, items: list, key: Callable[[Any], Any]) -> dict[str, Any]:
    """``?limit=&after=`` paging over ``items`` sorted by ``key`` (str ids)."""
    limit = query_int(request, "limit", 100, 1, MAX_LIMIT)
    after = arg(request, "after")
    if after is not None:
        items = [i for i in items if str(key(i)) > after]
    chunk = items[:limit]
    out: dict[str, Any] = {"items": chunk}
    if len(items) > limit:
        out["next"] = str(key(chunk[-1]))
    return out


def respond(request: Any, status: int, body: Any = None) -> bytes:
    request.setResponseCode(status)
    if body is None:
        return b""
    request.setHeader(b"content-type", JSON)
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
