"""The HTTP site: request size limits, the site root, fast paths, the access log.

The connection limits and the header deadline are
:mod:`iotd.web.connections` (its :class:`~iotd.web.connections.Site` builds
a :class:`~iotd.web.connections.Channel` per connection); :class:`LimitedRequest`
answers 413 before a body is buffered; :class:`Root` answers 503 while
starting, handles CORS and hands hot paths (``/push``) their resource before
Klein's routing; the access log (:func:`access_log`) has keys redacted.
Every HTTP listener (the main one and ``[push] listen``) is a site from
:func:`make_site`, so every limit here applies to each.

Chosen where the spec is silent:

- A 413 is written straight to the connection (the request never reaches a
  handler) and logged in the access log like any answer.  The connection is
  then closed; the rest of the body is read and dropped for up to
  :data:`LINGER` seconds first, so that a client still sending reads the 413
  instead of a reset.
- The access log replaces the value of every query parameter that may carry
  a key (``auth``, ``token``, ``ithings-token``, in any case) with
  ``REDACTED``, in the request URL and in the ``Referer`` header, and drops a
  URL's fragment.  The token of a link websocket's path
  (``/api/v1/devicelink/{token}/socket``) is replaced the same way, and so is
  the token of ``GET``/``DELETE /api/v1/devicelink/{token}``: the token alone
  opens the link's websocket.
"""

from __future__ import annotations

import re
from typing import Any, Callable
from urllib.parse import parse_qsl, unquote_to_bytes, urlencode

from klein import Klein
from twisted.web import server
from twisted.web.resource import Resource

from iotd import errors, metrics
from iotd.context import Context
from iotd.request import header, respond
from iotd.web import answers
from iotd.web.connections import Site, write_error

_LINK_SOCKET = re.compile(rb"^(/api/v1/devicelink/)[^/?#]+(/socket)")  # the token is a credential
_LINK_TOKEN = re.compile(rb"^(/api/v1/devicelink/)[^/?#]+(?=$|[?#])")  # GET/DELETE name a link by its token
_REDACT = frozenset({"auth", "token", "ithings-token"})  # compared lower-cased
LINGER = 2.0  # seconds a 413's connection reads and drops the rest of the body before closing


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
        channel = self.channel
        length = write_error(channel.transport, b"413 Request Entity Too Large",
                             errors.TooLarge(f"body over {self.max_body} bytes"))
        self._log_answer(413, length)
        close_after = getattr(channel, "close_after", None)
        if close_after is not None:
            close_after(LINGER)
        else:
            channel.transport.loseConnection()

    def _log_answer(self, code: int, length: int) -> None:
        """Count and access-log an answer written before the request reached the site root."""
        channel = self.channel
        # The request line is known to the channel before the request itself sees it.
        self.method = getattr(channel, "_command", self.method)
        self.uri = getattr(channel, "_path", self.uri)
        self.clientproto = getattr(channel, "_version", self.clientproto)
        self.code, self.sentLength = code, length
        site = getattr(channel, "site", None)
        if site is not None:
            site.log(self)
        else:
            metrics.http_request_status(code).inc()

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
    """``uri`` with every key-carrying query value (``auth``, ``token``, ``ithings-token``, any case) redacted.

    A fragment (never sent by a browser, but a client may) is dropped: it is not parsed here.
    """
    uri, hashmark, _fragment = uri.partition(b"#")
    uri = _LINK_SOCKET.sub(rb"\1REDACTED\2", uri)
    if b"?" in uri:
        path, query = uri.split(b"?", 1)
        pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
        clean = [(k, "REDACTED" if k.lower() in _REDACT else v) for k, v in pairs]
        uri = path + b"?" + urlencode(clean).encode("latin-1")
    return uri + (b"#" if hashmark else b"")


def _link_token_redacted(request: Any) -> bytes:
    """The request URI with a link token replaced (``GET``/``DELETE /api/v1/devicelink/{token}``;
    a ``POST`` there names a device, which stays)."""
    if request.method in (b"GET", b"DELETE"):
        return _LINK_TOKEN.sub(rb"\1REDACTED", request.uri)
    return request.uri


def access_log(timestamp: str, request: Any) -> str:
    """Combined log format with the key-carrying query values of the URL and the Referer redacted."""
    ip = request.getClientAddress()
    host = getattr(ip, "host", "-")
    referer = request.getHeader(b"referer")
    line = '"%s" - - %s "%s %s %s" %d %s "%s" "%s"' % (
        host,
        timestamp,
        request.method.decode("latin-1", "replace"),
        redact_uri(_link_token_redacted(request)).decode("latin-1", "replace"),
        request.clientproto.decode("latin-1", "replace"),
        request.code,
        request.sentLength or "-",
        redact_uri(referer).decode("latin-1", "replace") if referer else "-",
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


def add_fast_route(app: Klein, method: bytes, pattern: bytes, handler: Callable[..., Any]) -> None:
    """Serve ``method`` on paths matching ``pattern`` with ``handler(request, *groups)``, bypassing
    Klein's routing (a hot path with variable parts, such as the ingest POSTs).

    The groups are the raw path's (bytes decoded as UTF-8); a path with a ``%``
    escape or bytes that are not UTF-8 is left to Klein, which unescapes it.
    The handler answers as :func:`iotd.web.answers.render` says (bytes, a
    Deferred or a coroutine) and runs after the site root's key lookup, as a
    Klein handler would.  Keep the Klein route too (other methods, odd paths).
    """
    routes = app.__dict__.setdefault("iotd_fast_routes", [])
    routes.append((method, re.compile(pattern + rb"\Z"), handler))


class Root(Resource):
    """The site root: readiness, CORS, fast paths, then the Klein resource."""

    isLeaf = True

    def __init__(self, app_resource: Resource, cors_origins: tuple[str, ...],
                 ready: Callable[[], bool] = lambda: True,
                 fast_paths: dict[tuple[bytes, bytes], Resource] | None = None,
                 fast_routes: list[tuple[bytes, Any, Callable[..., Any]]] | None = None):
        super().__init__()
        self._app = app_resource
        self._routes = fast_routes or []
        self._dispatcher = _Dispatcher(self)
        self._cors = set(cors_origins)
        self._ready = ready
        self._fast = fast_paths or {}

    def render(self, request):
        fast = self._fast.get((request.method, request.path))
        if fast is not None and self._ready() and not request.requestHeaders.hasHeader(b"origin"):
            return fast.render(request)  # a device's hot path (a browser's request takes the long way: CORS)
        console = getattr(self, "_console", None)  # the web console's static files (iotd.web.console)
        if console is not None and console.claims(request.path):
            return console.render(request)
        if not self._ready():
            return respond(request, 503, errors.Unavailable("iotd is starting").to_json())
        try:
            origin = header(request, "origin")
        except errors.ApiError as e:  # raised outside Klein: answer it here, as JSON
            return respond(request, e.status, e.to_json())
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
        keys = getattr(self, "_keys", None)
        if keys is None:
            return self._dispatch(request)
        from iotd.request import key_of

        try:
            secret = key_of(request)
        except errors.ApiError:
            secret = None  # the handler answers the undecodable parameter
        if not keys.unknown(secret):
            return self._dispatch(request)
        # A well-formed key the ring does not know (created by the CLI or another node):
        # look it up in the store first, so the handler's check sees it.
        finished: list = []
        request.notifyFinish().addBoth(finished.append)

        def render_app(_key):
            if not finished:
                request.render(self._dispatcher)  # bytes or NOT_DONE_YET; a websocket upgrade too

        def unavailable(failure):
            if finished:
                return
            err = failure.value if isinstance(failure.value, errors.ApiError) else \
                errors.Unavailable("the store is unavailable")
            request.write(respond(request, err.status, err.to_json()))
            request.finish()

        keys.lookup(secret).addCallbacks(render_app, unavailable)
        return server.NOT_DONE_YET

    def _dispatch(self, request: Any) -> Any:
        """A fast route's handler, else the Klein app."""
        method, path = request.method, request.path
        for want, pattern, handler in self._routes:
            if method == want and b"%" not in path:
                match = pattern.match(path)
                if match is not None:
                    try:
                        args = [g.decode("utf-8") for g in match.groups()]
                    except UnicodeDecodeError:
                        break
                    return answers.render(request, handler, *args)
        return self._app.render(request)


class _Dispatcher(Resource):
    """The site root's :meth:`Root._dispatch` as a resource (rendered once a key is looked up)."""

    isLeaf = True

    def __init__(self, root: Root):
        super().__init__()
        self._root = root

    def render(self, request):
        return self._root._dispatch(request)


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


def make_site(ctx: Context, app: Klein, ready: Callable[[], bool] = lambda: True,
              console: bool = False) -> server.Site:
    """The site for one set of listeners, with every ``[http]`` limit (and the web console at
    ``/console/`` when ``console``: the main listeners with ``[http] console``)."""
    cfg = ctx.config.http
    request_class = type("Request", (LimitedRequest,), {"max_body": cfg.max_body_bytes})
    root = Root(app.resource(), cfg.cors_origins, ready, app.__dict__.get("iotd_fast_paths"),
                app.__dict__.get("iotd_fast_routes"))
    root._keys = ctx.keys  # Root.render looks a key the ring does not know up in the store first
    if console:
        from iotd.web.console import Console

        root._console = Console()
    site = Site(root, requestFactory=request_class, logFormatter=access_log, reactor=ctx.reactor,
                max_per_address=cfg.max_connections_per_address, header_timeout=cfg.header_timeout)
    site.displayTracebacks = False
    # Bodies are JSON (or a push result's raw bytes): never parse a form body into
    # request.args (Twisted would run every POST's Content-Type through the email
    # package, a fifth of an ingest's CPU); query arguments are parsed as always.
    site._parsePOSTFormSubmission = False
    return site
