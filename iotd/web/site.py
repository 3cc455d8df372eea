"""The HTTP site: request size limits, the site root, fast paths, the access log.

:class:`LimitedRequest` answers 413 before a body is buffered; :class:`Root`
answers 503 while starting, handles CORS and hands hot paths (``/push``)
their resource before Klein's routing; :class:`Site` counts and logs every
request with keys redacted.
"""

from __future__ import annotations

import json
from typing import Any, Callable
from urllib.parse import parse_qsl, unquote_to_bytes, urlencode

from klein import Klein
from twisted.web import server
from twisted.web.resource import Resource

from iotd import errors, metrics
from iotd.context import Context
from iotd.web.request import header, respond

_REDACT = {b"auth", b"token", b"ithings-token"}


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
        problem = undecodable_url(request)
        if problem is not None:  # Klein would answer this with a text/html 400
            return respond(request, 400, errors.BadRequest(problem, code="invalid_url").to_json())
        return self._app.render(request)


def undecodable_url(request: Any) -> str | None:
    """What of the request's URL is not UTF-8 once unescaped (Klein needs it to be), or None."""
    try:
        unquote_to_bytes(request.path).decode("utf-8")
    except UnicodeDecodeError:
        return "the URL path is not UTF-8 once %-escapes are decoded"
    try:
        request.getRequestHostname().decode("utf-8")
    except UnicodeDecodeError:
        return "the Host header is not UTF-8"
    return None


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
