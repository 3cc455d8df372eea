"""The one Klein app, the HTTP site around it, and what every REST area shares.

Each REST area is a module with ``routes(app, ctx)`` that adds its routes to
the one :class:`klein.Klein` instance; a job's service adds its module's
routes when the tree is built (see :mod:`iotd.tap`).  Every error leaves as
``{"error": {"code", "message"}}`` JSON, never HTML or a traceback.
"""

from __future__ import annotations

import json
from typing import Any, Callable
from urllib.parse import parse_qsl, urlencode

import attrs
from klein import Klein
from twisted.web import server
from twisted.web.resource import Resource
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from iotd import errors, metrics
from iotd.auth import ApiKey, presented_key
from iotd.logs import Logger

JSON = b"application/json"
MAX_LIMIT = 1000
_REDACT = {b"auth", b"token", b"ithings-token"}


@attrs.define
class Context:
    """What handlers reach: config, clock, store, keys, registry, events, job services."""

    config: Any
    reactor: Any
    store: Any
    keys: Any
    registry: Any
    events: Any
    jobs: dict[str, Any] = attrs.Factory(dict)


# -- request helpers ----------------------------------------------------------


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


# -- the app ------------------------------------------------------------------


def make_app(ctx: Context, areas: list[Callable[[Klein, Context], None]]) -> Klein:
    app = Klein()
    log = Logger(namespace="iotd.web")

    @app.handle_errors(errors.ApiError)
    def api_error(request, failure):
        return respond(request, failure.value.status, failure.value.to_json())

    @app.handle_errors(HTTPException)
    def http_error(request, failure):
        exc = failure.value
        if isinstance(exc, NotFound):
            err = errors.NotFound(f"no such path {request.path.decode('latin-1')[:200]}")
        elif isinstance(exc, MethodNotAllowed):
            err = errors.MethodNotAllowed(f"method {request.method.decode('latin-1')[:20]} not allowed here")
        else:
            err = errors.ApiError(exc.description or exc.name, code="http_error", status=exc.code or 400)
        return respond(request, err.status, err.to_json())

    @app.handle_errors(Exception)
    def internal(request, failure):
        from iotd.store import StoreUnavailable

        if failure.check(StoreUnavailable):
            err = errors.Unavailable("the store is unavailable")
        else:
            log.failure("request {method} {path} failed", failure,
                        method=request.method, path=request.path)
            err = errors.ApiError("internal error", code="internal", status=500)
        return respond(request, err.status, err.to_json())

    for area in areas:
        area(app, ctx)
    return app


class LimitedRequest(server.Request):
    """Answers 413 as soon as a body passes ``max_body_bytes``, before buffering it."""

    max_body = 1048576
    _too_large = False

    def gotLength(self, length):
        if length is not None and length > self.max_body:
            self._too_large = True
            self.requestHeaders.removeHeader(b"expect")
            self._reject()
            self.content = _Discard()
            return
        super().gotLength(length)
        self._seen = 0

    def handleContentChunk(self, data):
        if self._too_large:
            return
        self._seen += len(data)
        if self._seen > self.max_body:
            self._too_large = True
            self.content = _Discard()
            self._reject()
            return
        super().handleContentChunk(data)

    def _reject(self):
        body = json.dumps(errors.TooLarge(f"body over {self.max_body} bytes").to_json()).encode()
        transport = self.channel.transport
        transport.write(
            b"HTTP/1.1 413 Request Entity Too Large\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        metrics.http_requests.labels("413").inc()
        transport.loseConnection()

    def requestReceived(self, command, path, version):
        if self._too_large:
            return
        super().requestReceived(command, path, version)


class _Discard:
    def write(self, data):
        pass

    def tell(self):
        return 0

    def seek(self, *a):
        pass

    def read(self, *a):
        return b""

    def close(self):
        pass


def redact_uri(uri: bytes) -> bytes:
    if b"?" not in uri:
        return uri
    path, query = uri.split(b"?", 1)
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    clean = [(k, "REDACTED" if k.encode() in _REDACT else v) for k, v in pairs]
    return path + b"?" + urlencode(clean).encode("latin-1")


def access_log(timestamp: str, request: Any) -> str:
    """Combined log format with ``auth``/``token`` query values removed."""
    ip = request.getClientAddress()
    host = getattr(ip, "host", "-")
    line = '"%s" - - %s "%s %s %s" %d %s "%s" "%s"' % (
        host,
        timestamp,
        request.method.decode("latin-1", "replace"),
        redact_uri(request.uri).decode("latin-1", "replace"),
        request.clientproto.decode("latin-1", "replace"),
        request.code,
        request.sentLength or "-",
        (request.getHeader(b"referer") or b"-").decode("latin-1", "replace"),
        (request.getHeader(b"user-agent") or b"-").decode("latin-1", "replace"),
    )
    return line.replace("\n", " ")


def add_fast_path(app: Klein, method: bytes, path: bytes, resource: Resource) -> None:
    """Serve ``method path`` with ``resource`` before Klein's routing (a hot path).

    Klein's per-request work (URL matching, a Deferred chain) costs more than
    an idle push poll itself; such a path is answered directly by the site
    root.  Keep the Klein route too (for 405s and error handling).
    """
    app.__dict__.setdefault("iotd_fast_paths", {})[(method, path)] = resource


class Root(Resource):
    """The site root: readiness, CORS, fast paths, then the Klein resource."""

    isLeaf = True

    def __init__(self, app_resource: Resource, cors_origins: tuple[str, ...],
                 ready: Callable[[], bool] = lambda: True,
                 fast_paths: dict[tuple[bytes, bytes], Resource] | None = None):
        super().__init__()
        self._app = app_resource
        self._cors = set(cors_origins)
        self._ready = ready
        self._fast = fast_paths or {}

    def render(self, request):
        if not self._ready():
            return respond(request, 503, errors.Unavailable("iotd is starting").to_json())
        origin = header(request, "origin")
        if origin and origin in self._cors:
            request.setHeader(b"access-control-allow-origin", origin.encode())
            request.setHeader(b"vary", b"Origin")
            if request.method == b"OPTIONS":
                request.setHeader(b"access-control-allow-methods", b"GET, POST, PUT, DELETE, OPTIONS")
                request.setHeader(b"access-control-allow-headers", b"authorization, content-type")
                request.setHeader(b"access-control-max-age", b"600")
                request.setResponseCode(204)
                return b""
        fast = self._fast.get((request.method, request.path))
        if fast is not None:
            return fast.render(request)
        return self._app.render(request)


class Site(server.Site):
    """Counts every answered request by status; skips the access log for ``request.quiet``.

    A hot path (an idle push poll) sets ``request.quiet = True`` so thousands
    of identical lines a second do not cost the reactor; it is still counted.
    """

    def log(self, request):
        metrics.http_requests.labels(str(request.code)).inc()
        if not getattr(request, "quiet", False):
            super().log(request)


def make_site(ctx: Context, app: Klein, ready: Callable[[], bool] = lambda: True) -> server.Site:
    request_class = type("Request", (LimitedRequest,), {"max_body": ctx.config.http.max_body_bytes})
    site = Site(Root(app.resource(), ctx.config.http.cors_origins, ready,
                     app.__dict__.get("iotd_fast_paths")),
                       requestFactory=request_class, logFormatter=access_log)
    site.displayTracebacks = False
    return site
