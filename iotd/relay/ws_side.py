"""A TCP link's client over a websocket on the HTTP port: the side and its transport-like pipe.

The relay (:mod:`iotd.relay.tcp`) drives both of a link's sides through their
``pipe``: for a port client that is its TCP transport, for a websocket it is
a :class:`MessagePipe`, which turns writes into binary messages and hands
pausing, producers and closing to the websocket's own TCP transport.

- **Hot path**: ``onMessage`` -> ``Link.relayed_up`` -> (CTR ``update``) ->
  the device transport's write; bytes from the device go out as one binary
  message per chunk read (at most ``BUFFER_SIZE``).  Text messages are refused
  (close 1003).
- **Back-pressure both ways.**  The device transport is the registered
  producer of the websocket's TCP transport (a stalled websocket reader
  fills it and the device side stops reading), and the websocket's TCP
  transport is the device transport's producer (a slow device stops the
  websocket being read).  Memory per link stays one queue plus one message
  per direction; client messages are capped at ``MAX_MESSAGE``.
- **Dialling**: the device is dialled once the handshake is done (the link's
  client "connected"); the websocket is paused until the device answers.
  Frames that came in the same read as the handshake wait in a buffer of at
  most ``MAX_MESSAGE`` bytes.
- **Ends.**  A websocket has no half-close: a clean close from the client is
  its FIN (passed on to the device after the pending bytes); the device's FIN
  closes the websocket with 1000 after the bytes before it.  An unclean end
  is a reset (``client_reset``).
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import defer

from iotd.relay.ctr import Transform
from iotd.relay.tcp_sides import BUFFER_SIZE

MAX_MESSAGE = BUFFER_SIZE  # a client message, and the largest chunk sent to it
_OPEN = WebSocketProtocol.STATE_OPEN


class LinkSockets:
    """What the websocket route (:mod:`iotd.web.devicelink_socket`) needs: take a link, upgrade."""

    def __init__(self, reactor: Any) -> None:
        self.factory = socket_factory(reactor)

    def take(self, link: Any, addr: Any) -> Any:
        """``link``'s client is a websocket from ``addr``: its side, or the refusal's reason."""
        return link.relay.accept_websocket(addr, WebSocketSide)

    def resource(self, side: WebSocketSide) -> WebSocketResource:
        return upgrade(self.factory, side)


def socket_factory(reactor: Any) -> WebSocketServerFactory:
    """The Autobahn factory (its options) every link websocket uses."""
    factory = WebSocketServerFactory(reactor=reactor)
    factory.setProtocolOptions(
        maxMessagePayloadSize=MAX_MESSAGE,
        maxFramePayloadSize=MAX_MESSAGE,
        failByDrop=False,
        openHandshakeTimeout=10,
        closeHandshakeTimeout=1,
        autoPingInterval=0,
        webStatus=False,
        perMessageCompressionAccept=lambda offers: None,
    )
    return factory


def upgrade(factory: WebSocketServerFactory, side: WebSocketSide) -> WebSocketResource:
    """The resource that hands the request's connection to ``side`` (built before the upgrade)."""
    side.factory = factory
    return WebSocketResource(_One(side))


class _One:
    """What :class:`WebSocketResource` needs of a factory: the one protocol."""

    def __init__(self, side: WebSocketSide) -> None:
        self._side = side

    def buildProtocol(self, addr: Any) -> WebSocketSide:
        return self._side


class MessagePipe:
    """The websocket as the relay sees a transport."""

    def __init__(self, side: WebSocketSide) -> None:
        self._side = side

    def write(self, data: bytes) -> None:
        side = self._side
        if side.state == _OPEN:
            side.sendMessage(data, isBinary=True)

    @property
    def bufferSize(self) -> int:
        return int(self._side.transport.bufferSize)

    @bufferSize.setter
    def bufferSize(self, size: int) -> None:
        self._side.transport.bufferSize = size

    def setTcpNoDelay(self, enabled: bool) -> None:
        set_no_delay = getattr(self._side.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(enabled)

    def pauseProducing(self) -> None:
        self._side.transport.pauseProducing()

    def resumeProducing(self) -> None:
        side = self._side
        side.flush_early()
        if side.transport.connected:
            side.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.abortConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._side.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._side.transport.unregisterProducer()

    def loseWriteConnection(self) -> None:
        if self._side.state == _OPEN:
            self._side.sendClose(1000, "the device closed its end")

    def loseConnection(self) -> None:
        side = self._side
        if side.state == _OPEN:
            side.sendClose(1000, "link closed")
        else:
            side.transport.loseConnection()

    def abortConnection(self) -> None:
        self._side.transport.abortConnection()


class WebSocketSide(WebSocketServerProtocol):
    """The client side of a TCP link, over a websocket."""

    def __init__(self, relay: Any, transform: Transform | None) -> None:
        super().__init__()
        self.relay = relay
        self._count = relay.link.relayed_up
        self._transform = transform
        self._write: Any = None  # the device transport's write, set when paired
        self.read_done = False
        self._write_done = False
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.pipe = MessagePipe(self)
        self._early: list[bytes] | None = []
        self._early_bytes = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        try:  # twisted.web's HTTPChannel is still the transport's producer
            self.transport.unregisterProducer()
        except Exception:
            pass

    def onConnect(self, request: Any) -> None:
        return None  # the route checked the link, the token and the source before the upgrade

    def onOpen(self) -> None:
        self.relay.client_connected(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary:
            self.sendClose(1003, "binary messages only")
            return
        write = self._write
        if write is None:
            self._hold(payload)
            return
        self._count(len(payload))
        t = self._transform
        write(t(payload) if t is not None else payload)

    def _hold(self, payload: bytes) -> None:
        """A message before the device answered (same read as the handshake): keep, bounded."""
        if self._early is None or self._early_bytes + len(payload) > MAX_MESSAGE:
            self.sendClose(1009, "too much data before the device answered")
            return
        self._early.append(payload)
        self._early_bytes += len(payload)

    def flush_early(self) -> None:
        """Relay what :meth:`_hold` kept (once the device is there)."""
        early, self._early = self._early, None
        if self._write is None:
            self._early = early
            return
        for payload in early or ():
            self.onMessage(payload, True)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        relay = self.relay
        if wasClean and relay.device is not None:
            relay.read_ended(self)  # the client's end: a FIN to the device
            if not self._write_done:
                self._write_done = True
                relay.write_ended(self)
        else:
            relay.side_lost(self)

    def connectionLost(self, reason: Any = None) -> None:
        try:
            super().connectionLost(reason)
        finally:
            if not self.lost.called:
                self.lost.callback(None)

    def buffered(self) -> int:
        """Bytes waiting in the websocket's userspace write buffer."""
        t = self.transport
        if t is None or not hasattr(t, "dataBuffer"):
            return 0
        return len(t.dataBuffer) - t.offset + t._tempDataLen
