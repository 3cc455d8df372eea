"""Request helpers shared by the web layer and the websocket jobs (a neutral module: it imports no job).

Query values, headers, JSON bodies and keys are read here, once, with every
check a hostile client needs: undecodable query or header bytes are 400 JSON,
never 500; a body is parsed by :func:`iotd.jsonsafe.loads`, so a lone
surrogate, NaN, Infinity, an overflowing number or nesting deeper than 64 is a
422 naming the field before any handler sees it (malformed JSON stays 400).
:func:`respond` never emits invalid JSON: should an unsafe value reach an
answer anyway, it is logged and sent with that value replaced.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from iotd import errors, jsonsafe, metrics
from iotd.apikeys import ApiKey, presented_key
from iotd.context import Context
from iotd.logs import Logger

JSON = b"application/json"
MAX_LIMIT = 1000
_ITEM = re.compile(r"^\[(\d+)\]\.?")
log = Logger()


def check_headers(request: Any) -> None:
    """400 ``invalid_header`` when a header's value is not UTF-8 (before a websocket upgrade:
    Autobahn parses the headers again)."""
    for name, values in request.requestHeaders.getAllRawHeaders():
        for value in values:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                shown = name.decode("ascii", "replace")
                raise errors.BadRequest(f"header {shown} is not UTF-8", code="invalid_header") from None


def arg(request: Any, name: str) -> str | None:
    values = request.args.get(name.encode())
    if not values:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise errors.BadRequest(f"query parameter {name} is not UTF-8") from None


def header(request: Any, name: str) -> str | None:
    """The header's value as text, or None; 400 when its bytes are not UTF-8.

    Asked for by a ``str`` name, Twisted would decode the value as UTF-8
    itself and raise (a 500); ask for bytes and decode here instead.
    """
    value = request.getHeader(name.encode("ascii"))
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.BadRequest(f"header {name} is not UTF-8", code="invalid_header") from None


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


def body_size(request: Any) -> int:
    """How many body bytes the request carried (what its parsed body holds, about)."""
    try:
        return int(request.content.tell()) if request.content is not None else 0
    except (OSError, ValueError, AttributeError):
        return 0


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
        return jsonsafe.loads(raw)
    except jsonsafe.UnsafeJSON as e:
        raise errors.Invalid(unsafe_message(e)) from None
    except (ValueError, RecursionError) as e:
        raise errors.BadRequest(f"malformed JSON: {str(e)[:200]}", code="invalid_json") from None


def unsafe_message(e: jsonsafe.UnsafeJSON) -> str:
    """``data.t: ...``; in an array body (a batch) ``item 3: data.t: ...``, as the handlers say it."""
    match = _ITEM.match(e.where)
    if match is None:
        return f"{e.where or 'body'}: {e.why}"
    rest = e.where[match.end():]
    return f"item {match.group(1)}: {rest}: {e.why}" if rest else f"item {match.group(1)}: {e.why}"


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
    try:
        return _dumps(body)
    except (ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        # no path in the line: a link token (a credential) can be part of it
        log.error("a {status} answer to a {method} request held a value that is not JSON (a lone "
                  "surrogate, NaN, Infinity or deep nesting): sent with it replaced",
                  status=status, method=request.method.decode("latin-1"))
        return _dumps(jsonsafe.scrub(body))


def _dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
