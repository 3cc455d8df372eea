"""What both websocket kinds (event sockets, subscriptions) share.

* :class:`SocketFactory` — one per kind.  It subscribes to the event bus once
  (the kinds do that in their own factories), keeps every open
  :class:`SocketProtocol`, closes a revoked key's sockets with 4401 and every
  socket with 1001 on shutdown, and counts connections in ``/metrics``.
* :meth:`SocketFactory.upgrade` — the last step of a Klein route that has
  already checked the key and the URL: it refuses with 503 when the
  ``[websocket]`` connection caps are reached, then returns the Autobahn
  :class:`WebSocketResource` that takes the connection over.
* :meth:`SocketFactory.prepared` / :meth:`SocketFactory.broadcast` — an event
  is serialized and framed once (``Event.encoded`` + ``prepareMessage``) and
  the same bytes are written to every socket that wants it.
* Slow clients: the protocol registers itself as the transport's streaming
  producer, so it learns when the kernel buffer is full (``pauseProducing``).
  Bytes written while paused are counted; past ``max_buffer_bytes`` a 1008
  close frame is queued and the connection aborted.

* Origins: any ``Origin`` is accepted (``null`` and ``file://`` included: pages
  opened from disk, sandboxed iframes, WebViews); the key authenticates and
  there are no cookies to ride on.  The route has checked the request, so the
  ``Origin`` header is taken out before Autobahn re-reads the handshake (its
  origin check refuses ``null`` and host-less origins).
* A handshake Autobahn still refuses (no ``Sec-WebSocket-Version``, a bad
  ``Sec-WebSocket-Key``...) is answered with a JSON body
  ``{"error": {"code": "bad_handshake", "message": ...}}``, never a bare status line.

Timers (idle, heartbeat) use ``factory.clock`` (the reactor unless a test sets
a :class:`twisted.internet.task.Clock`).
"""

from __future__ import annotations

import itertools
import json
from http import HTTPStatus
from typing import Any, Callable, Iterable

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.application import service
from twisted.internet import defer

from iotd import errors, metrics
from iotd.logs import Logger
from iotd.context import Context
from iotd.request import header

STATE_OPEN = WebSocketProtocol.STATE_OPEN
STATE_CLOSED = WebSocketProtocol.STATE_CLOSED
STATE_CONNECTING = WebSocketProtocol.STATE_CONNECTING

MAX_MESSAGE = 64 * 1024  # client messages are capped at 64 KiB
FLUSH_FANOUT = 8  # an event for at most this many sockets is sent at once (see SocketProtocol.flush)
SHUTDOWN_GRACE = 2.0  # seconds stopService waits for close handshakes
_connection_ids = itertools.count(1)  # unique per daemon, shared by both kinds


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class Limits:
    """``[websocket] max_connections`` and ``max_connections_per_address``, for all kinds."""

    def __init__(self, total: int, per_address: int):
        self.total = total
        self.per_address = per_address
        self.open = 0
        self._by_address: dict[str, int] = {}

    def check(self, host: str) -> None:
        if self.open >= self.total:
            raise errors.Unavailable("too many websocket connections; try again later")
        if self.per_address and self._by_address.get(host, 0) >= self.per_address:
            raise errors.Unavailable("too many websocket connections from this address")

    def add(self, host: str) -> None:
        self.open += 1
        self._by_address[host] = self._by_address.get(host, 0) + 1

    def remove(self, host: str) -> None:
        self.open -= 1
        left = self._by_address.get(host, 1) - 1
        if left > 0:
            self._by_address[host] = left
        else:
            self._by_address.pop(host, None)


def limits_of(ctx: Context) -> Limits:
    limits = ctx.jobs.get("websocket.limits")
    if limits is None:
        ws = ctx.config.websocket
        limits = ctx.jobs["websocket.limits"] = Limits(ws.max_connections, ws.max_connections_per_address)
    return limits


def peer_host(request: Any) -> str:
    peer = request.getClientAddress()
    return str(getattr(peer, "host", peer))


class SocketProtocol(WebSocketServerProtocol):
    """One websocket of either kind: slow-client accounting, closing, activity.

    Subclasses implement :meth:`opened`, :meth:`closed` and :meth:`activity`;
    they send with :meth:`send_json` / ``sendPreparedMessage`` and close with
    :meth:`close`.
    """

    log = Logger()
    kind = "websocket"
    key: Any = None
    host = "?"
    conn_id = 0
    _paused = False
    _pending = 0  # bytes written while the transport was paused
    _cut = False
    _resume_waiters: list | None = None
    _registered = False

    # -- connection life ------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self.clock = self.factory.clock
        self.max_buffer = self.factory.max_buffer
        transport = self.transport
        # twisted.web's HTTPChannel is still the transport's producer: take its place
        # so a full socket buffer pauses *us* (that is how slow clients are seen).
        try:
            transport.unregisterProducer()
        except Exception:
            pass
        try:
            transport.registerProducer(self, True)
        except Exception:
            self.log.failure("websocket {conn}: could not watch the transport", conn=self.conn_id)
        self.factory._register(self)
        self._registered = True

    def onConnect(self, request: Any) -> None:
        return None  # the Klein route has checked everything before the upgrade

    def sendHttpErrorResponse(self, code: int, reason: str, responseHeaders: Any = None) -> None:
        """A refused handshake (Autobahn's own checks): a JSON error body, not a bare status line."""
        body = dumps({"error": {"code": "bad_handshake", "message": reason[:500]}})
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "Error"
        head = [f"HTTP/1.1 {code} {phrase}"]
        head.extend(f"{name}: {value}" for name, value in responseHeaders or ())
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}", "Connection: close"]
        self.sendData(("\r\n".join(head) + "\r\n\r\n").encode("latin-1", "replace") + body)

    def onOpen(self) -> None:
        self.log.info("websocket {conn} ({kind}) opened by {host} key {key_id}",
                      conn=self.conn_id, kind=self.kind, host=self.host, key_id=self.key.id)
        self.factory._opened(self)
        self.opened()

    def dataReceived(self, data: bytes) -> None:
        # Any bytes from the client (a ping, a message, a pong) are activity.
        self.activity()
        self._dataReceived(data)

    def connectionLost(self, reason: Any = None) -> None:
        try:
            super().connectionLost(reason)
        finally:
            if self._registered:
                self._registered = False
                self.factory._unregister(self)
                self._wake_writers()
                try:
                    self.closed()
                except Exception:
                    self.log.failure("websocket {conn}: cleanup failed", conn=self.conn_id)

    # -- hooks ----------------------------------------------------------------

    def opened(self) -> None:
        """The handshake is done (state OPEN)."""

    def closed(self) -> None:
        """The TCP connection is gone (also when the handshake never finished)."""

    def activity(self) -> None:
        """The client sent something."""

    # -- producer interface (the transport tells us when its buffer is full) ----

    def pauseProducing(self) -> None:
        if not self._paused:
            self._paused = True
            self._pending = 0

    def resumeProducing(self) -> None:
        self._paused = False
        self._pending = 0
        self._wake_writers()

    def stopProducing(self) -> None:
        pass

    def writable(self) -> defer.Deferred:
        """Fires when the transport has room again (or the connection is gone)."""
        d: defer.Deferred = defer.Deferred()
        if not self._paused or self.state == STATE_CLOSED:
            d.callback(None)
            return d
        if self._resume_waiters is None:
            self._resume_waiters = []
        self._resume_waiters.append(d)
        return d

    def _wake_writers(self) -> None:
        waiters, self._resume_waiters = self._resume_waiters, None
        for d in waiters or ():
            d.callback(None)

    # -- sending --------------------------------------------------------------

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """Every frame Autobahn or we send passes here: write, count if paused."""
        if sync or chopsize or self.send_queue:
            super().sendData(data, sync, chopsize)
            return
        if self.state == STATE_CLOSED:
            return
        self.transport.write(data)
        if self._paused:
            self._pending += len(data)
            if self._pending > self.max_buffer and not self._cut:
                self.too_slow()

    def flush(self) -> None:
        """Send what is buffered now instead of when the reactor gets round to it.

        Twisted writes a transport's buffer in the reactor's next poll, after it has
        handled every other ready socket (ingest requests included), which adds
        milliseconds to a live event's delivery.  For a few sockets an immediate
        write is cheaper than that wait; broadcasts to many sockets keep the
        batching.  Only plain TCP transports (those with ``doWrite``) take part.
        """
        transport = self.transport
        if self._paused or self.state == STATE_CLOSED or transport is None:
            return
        do_write = getattr(transport, "doWrite", None)
        if do_write is not None and transport.connected and not transport.disconnecting:
            do_write()

    def send_text(self, payload: bytes, flush: bool = True) -> None:
        """One text message of any size.

        Autobahn's ``sendMessage`` applies ``maxMessagePayloadSize`` (our 64 KiB
        cap on *client* messages) to outgoing messages too; a prepared message
        is not checked, so everything we send goes that way.
        """
        if self.state == STATE_OPEN:
            self.sendPreparedMessage(self.factory.prepareMessage(payload))
            if flush:
                self.flush()

    def send_json(self, value: Any) -> None:
        self.send_text(dumps(value))

    def too_slow(self) -> None:
        """Unsent data passed ``max_buffer_bytes``: queue 1008, abort, count."""
        self._cut = True
        self.log.warn("websocket {conn} ({kind}) from {host}: client too slow, dropped",
                      conn=self.conn_id, kind=self.kind, host=self.host)
        self.factory.slow_dropped.inc()
        self.close(1008, "too slow", abort=True)

    def close(self, code: int, reason: str, abort: bool = False) -> None:
        """Send a close frame with any code (1001 and 1008 included); maybe abort."""
        if self.state == STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)
            self.log.info("websocket {conn} ({kind}) closing: {code} {reason}",
                          conn=self.conn_id, kind=self.kind, code=code, reason=reason)
        elif self.state == STATE_CONNECTING:
            abort = True
        if abort and self.state != STATE_CLOSED:
            self.wasClean = False
            self.wasNotCleanReason = reason
            self.dropConnection(abort=True)


class _Bound:
    """What :class:`WebSocketResource` needs of a factory, with one request's state."""

    def __init__(self, factory: "SocketFactory", key: Any, host: str, setup: Callable[[Any], None]):
        self._factory, self._key, self._host, self._setup = factory, key, host, setup

    def buildProtocol(self, addr: Any) -> SocketProtocol:
        proto = self._factory.buildProtocol(addr)
        proto.key = self._key
        proto.host = self._host
        self._setup(proto)
        return proto


class SocketFactory(WebSocketServerFactory):
    """One per socket kind: options, open sockets, caps, revocation, shutdown."""

    log = Logger()
    kind = "websocket"

    def __init__(self, ctx: Context, clock: Any = None):
        super().__init__(reactor=ctx.reactor)
        self.setProtocolOptions(
            maxMessagePayloadSize=MAX_MESSAGE,
            maxFramePayloadSize=MAX_MESSAGE,
            failByDrop=False,  # an oversized message gets a 1009 close frame
            openHandshakeTimeout=10,
            closeHandshakeTimeout=1,
            autoPingInterval=0,
            webStatus=False,
            perMessageCompressionAccept=lambda offers: None,
        )
        self.ctx = ctx
        self.clock = clock if clock is not None else ctx.reactor
        self.max_buffer = ctx.config.websocket.max_buffer_bytes
        self.limits = limits_of(ctx)
        self.sockets: set[SocketProtocol] = set()
        self._by_key: dict[str, set[SocketProtocol]] = {}
        self.stopping = False
        self._drained: list[defer.Deferred] = []
        self.gauge = metrics.ws_connections.labels(self.kind)
        self.slow_dropped = metrics.ws_slow_dropped.labels(self.kind)
        self._delivered: dict[str, Any] = {}
        ctx.keys.add_revoke_listener(self.key_revoked)

    # -- the upgrade ------------------------------------------------------------

    def upgrade(self, request: Any, key: Any, setup: Callable[[Any], None]) -> WebSocketResource:
        """The resource that upgrades ``request`` (checked by the caller) to a socket.

        Raises 503 when the daemon stops or a connection cap is reached, 426
        when the request is no websocket upgrade at all.
        """
        upgrade = (header(request, "upgrade") or "").lower()
        if "websocket" not in upgrade:
            raise errors.ApiError("this URL is a websocket: send an Upgrade: websocket request",
                                  code="upgrade_required", status=426)
        if self.stopping:
            raise errors.Unavailable("iotd is shutting down")
        host = peer_host(request)
        self.limits.check(host)
        for name in (b"origin", b"sec-websocket-origin"):  # any Origin is fine (module docstring)
            request.requestHeaders.removeHeader(name)
        return WebSocketResource(_Bound(self, key, host, setup))

    def buildProtocol(self, addr: Any) -> SocketProtocol:
        proto = super().buildProtocol(addr)
        proto.conn_id = next(_connection_ids)
        return proto

    # -- bookkeeping ------------------------------------------------------------

    def _register(self, proto: SocketProtocol) -> None:
        self.sockets.add(proto)
        self.limits.add(proto.host)
        self.gauge.inc()

    def _opened(self, proto: SocketProtocol) -> None:
        self._by_key.setdefault(proto.key.id, set()).add(proto)

    def _unregister(self, proto: SocketProtocol) -> None:
        self.sockets.discard(proto)
        self.limits.remove(proto.host)
        self.gauge.dec()
        mine = self._by_key.get(proto.key.id)
        if mine is not None:
            mine.discard(proto)
            if not mine:
                del self._by_key[proto.key.id]
        self.log.info("websocket {conn} ({kind}) closed", conn=proto.conn_id, kind=self.kind)
        if not self.sockets and self._drained:
            waiters, self._drained = self._drained, []
            for d in waiters:
                d.callback(None)

    def key_revoked(self, key_id: str) -> None:
        for proto in list(self._by_key.get(key_id, ())):
            proto.close(4401, "key revoked")

    # -- one serialization and one frame per event ------------------------------

    def prepared(self, event: Any, key: str, make: Callable[[Any], bytes]) -> Any:
        """``make(event)`` serialized and framed once per event for every socket."""
        frame = event.cache.get(key)
        if frame is None:
            frame = event.cache[key] = self.prepareMessage(event.encoded("json:" + key, make))
        return frame

    def broadcast(self, event_kind: str, prepared: Any, sockets: Iterable[SocketProtocol]) -> int:
        """Write one prepared frame to each open socket; returns how many got it."""
        sent = 0
        sockets = tuple(sockets)  # a socket may leave its set while we write
        for proto in sockets:
            if proto.state == STATE_OPEN:
                proto.sendPreparedMessage(prepared)
                sent += 1
        if sent:
            self.delivered(event_kind, sent)
            if sent <= FLUSH_FANOUT:
                for proto in sockets:
                    proto.flush()
        return sent

    def delivered(self, event_kind: str, count: int = 1) -> None:
        counter = self._delivered.get(event_kind)
        if counter is None:
            counter = self._delivered[event_kind] = metrics.events_delivered.labels(event_kind)
        counter.inc(count)

    # -- shutdown ---------------------------------------------------------------

    def shutdown(self) -> defer.Deferred:
        """Close every socket with 1001; fires when all are gone (at most a grace period)."""
        self.stopping = True
        if not self.sockets:
            return defer.succeed(None)
        done: defer.Deferred = defer.Deferred()
        self._drained.append(done)
        self.log.info("closing {count} {kind} websockets: shutting down", count=len(self.sockets), kind=self.kind)
        for proto in list(self.sockets):
            proto.close(1001, "going away")

        def overdue():
            for proto in list(self.sockets):
                proto.close(1001, "going away", abort=True)
            if not done.called:
                done.callback(None)

        call = self.ctx.reactor.callLater(SHUTDOWN_GRACE, overdue)
        done.addBoth(lambda r: (call.cancel() if call.active() else None, r)[1])
        return done


class SocketService(service.Service):
    """The job's child service: stopping it closes the kind's websockets with 1001."""

    def __init__(self, name: str, factory: SocketFactory, on_start: Callable[[], None] | None = None,
                 on_stop: Callable[[], None] | None = None):
        self.name = name
        self.factory = factory
        self._on_start = on_start
        self._on_stop = on_stop

    def startService(self) -> None:
        super().startService()
        self.factory.stopping = False
        if self._on_start is not None:
            self._on_start()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        d = self.factory.shutdown()
        if self._on_stop is not None:
            d.addBoth(lambda r: (self._on_stop(), r)[1])
        return d
