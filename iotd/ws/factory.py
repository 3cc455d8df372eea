"""What both websocket kinds (event sockets, subscriptions) share: the factory and its service.

* :class:`SocketFactory` — one per kind.  It subscribes to the event bus once
  (:meth:`SocketFactory.start`, the kinds' :meth:`~SocketFactory.on_event`
  routes each event), keeps every open socket, closes a revoked key's sockets
  with 4401 and every socket with 1001 on shutdown, and counts connections in
  ``/metrics``.
* :meth:`SocketFactory.upgrade` — the last step of a Klein route that has
  already checked the key and the URL (:mod:`iotd.ws.upgrade`): it refuses
  with 503 when the ``[websocket]`` connection caps (:class:`~iotd.ws.limits.Limits`,
  shared by both kinds) are reached, then returns the Autobahn
  :class:`WebSocketResource` that takes the connection over.
* :meth:`SocketFactory.prepared` / :meth:`SocketFactory.broadcast` — an event
  is serialized and framed once (``Event.encoded`` + ``prepareMessage``) and
  the same bytes are written to every socket that wants it; to many sockets
  once per reactor turn, every socket's frames of that turn in one write.
  Those flushes are paced: the next starts no sooner than the last one
  lasted (at most :data:`MAX_PACE`) after it ended.  A flush to 1,000 sockets
  costs the reactor ~10 ms (one ``send`` each); at 100 events/s back-to-back
  flushes left nothing for the ingest, whose requests then queued behind
  them (bench/fanout.py: p99 ~60 ms).  Paced, the reactor spends at most
  about half its time flushing, and the events that came meanwhile leave
  together, one ``send`` per socket for several frames.  A lone event (the
  last flush long ago) leaves in the next turn, as before.  A flush writes
  :data:`FLUSH_CHUNK` sockets per reactor turn, so what waits meanwhile (an
  ingest, a poll) is not held for the whole of it.
* Origins: any ``Origin`` is accepted (``null`` and ``file://`` included: pages
  opened from disk, sandboxed iframes, WebViews); the key authenticates and
  there are no cookies to ride on.  The route has checked the request, so the
  ``Origin`` header is taken out before Autobahn re-reads the handshake (its
  origin check refuses ``null`` and host-less origins).
* :class:`SocketService` — the kind's child service (start: subscribe; stop:
  1001 to every socket, then unsubscribe).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.application import service
from twisted.internet import defer

from iotd import errors, metrics
from iotd.context import Context
from iotd.logs import Logger
from iotd.request import header
from iotd.ws.limits import Limits, peer_host
from iotd.ws.protocol import FLUSH_FANOUT, MAX_MESSAGE, STATE_OPEN, SocketProtocol

MAX_PACE = 0.05  # seconds: the longest pause between two flushes of the outboxes
FLUSH_CHUNK = 250  # sockets written per reactor turn in a flush

SHUTDOWN_GRACE = 2.0  # seconds stopService waits for close handshakes
_connection_ids = itertools.count(1)  # unique per daemon, shared by both kinds


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

    bus_kinds: tuple[str, ...] = ()  # the event kinds :meth:`on_event` gets

    def __init__(self, ctx: Context, limits: Limits, clock: Any = None):
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
        self.events = ctx.events
        self.registry = ctx.registry
        self.limits = limits
        self.sockets: set[SocketProtocol] = set()
        self._by_key: dict[str, set[SocketProtocol]] = {}
        self.stopping = False
        self._drained: list[defer.Deferred] = []
        self.gauge = metrics.ws_connections.labels(self.kind)
        self.slow_dropped = metrics.ws_slow_dropped.labels(self.kind)
        self._sub: Any = None
        self._dirty: list[SocketProtocol] = []  # sockets with frames in their outbox
        self._flush_call: Any = None
        self._flushing: list[SocketProtocol] = []  # the sockets of the round being written
        self._round_took = 0.0  # the reactor's time in the round's writes so far
        self._next_flush = 0.0  # no round starts before this (reactor seconds): the last one's end + its time
        ctx.keys.add_revoke_listener(self.key_revoked)

    # -- the event bus ----------------------------------------------------------

    def start(self) -> None:
        """Subscribe :meth:`on_event` to the bus (once, for every socket of the kind)."""
        if self._sub is None:
            self._sub = self.events.bus.subscribe(self.on_event, kinds=self.bus_kinds)

    def stop(self) -> None:
        if self._sub is not None:
            self._sub.cancel()
            self._sub = None

    def on_event(self, event: Any) -> None:
        """One published event of :attr:`bus_kinds` (the kinds route it to their sockets)."""

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
        """Write one prepared frame to each open socket; returns how many got it.

        A few sockets (up to ``FLUSH_FANOUT``) are written at once; for more, the
        frame is queued in each socket's outbox and every outbox is written once,
        in the next reactor turn (:meth:`_flush_outboxes`; see :mod:`iotd.ws.protocol`).
        """
        sent = 0
        sockets = tuple(sockets)  # a socket may leave its set while we write
        if len(sockets) <= FLUSH_FANOUT:
            for proto in sockets:
                if proto.state == STATE_OPEN:
                    proto.sendPreparedMessage(prepared)
                    sent += 1
            if sent:
                self.delivered(event_kind, sent)
                for proto in sockets:
                    proto.flush()
            return sent
        frame = prepared.payloadHybi
        dirty = self._dirty
        for proto in sockets:  # the fan-out's inner loop: keep it lean
            if proto.state == STATE_OPEN:
                if proto._batching and not proto._paused:
                    box = proto._outbox
                    if box is None:
                        proto._outbox = [frame]
                        dirty.append(proto)
                    else:
                        box.append(frame)
                else:
                    proto.sendPreparedMessage(prepared)
                sent += 1
        if sent:
            self.delivered(event_kind, sent)
        if dirty and self._flush_call is None:
            reactor = self.ctx.reactor
            delay = self._next_flush - reactor.seconds()  # paced: see the module's docstring
            self._flush_call = reactor.callLater(delay if delay > 0 else 0, self._flush_outboxes)
        return sent

    def _flush_outboxes(self) -> None:
        """One round: every outbox written, :data:`FLUSH_CHUNK` sockets per reactor turn."""
        self._flush_call = None
        reactor = self.ctx.reactor
        if not self._flushing:  # a new round: the sockets with frames now
            self._flushing, self._dirty = self._dirty, []
            self._round_took = 0.0
        todo = self._flushing
        began = reactor.seconds()
        for proto in todo[:FLUSH_CHUNK]:
            proto.flush_outbox()
        ended = reactor.seconds()
        self._round_took += ended - began
        if len(todo) > FLUSH_CHUNK:  # the rest in the next turn: what waits (an ingest) runs between
            self._flushing = todo[FLUSH_CHUNK:]
            self._flush_call = reactor.callLater(0, self._flush_outboxes)
            return
        self._flushing = []
        pause = min(self._round_took, MAX_PACE)
        self._next_flush = ended + pause
        if self._dirty:  # frames queued during the round
            self._flush_call = reactor.callLater(pause, self._flush_outboxes)

    def delivered(self, event_kind: str, count: int = 1) -> None:
        metrics.events_delivered_kind(event_kind).inc(count)

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
    """A kind's child service: it starts the factory's bus subscription; stopping it
    closes the kind's websockets with 1001 and ends the subscription."""

    def __init__(self, name: str, factory: SocketFactory):
        self.name = name
        self.factory = factory

    def startService(self) -> None:
        super().startService()
        self.factory.stopping = False
        self.factory.start()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        d = self.factory.shutdown()
        d.addBoth(lambda r: (self.factory.stop(), r)[1])
        return d

