"""What one websocket of either kind (event sockets, subscriptions) does.

* Slow clients: the protocol registers itself as the transport's streaming
  producer, so it learns when the kernel buffer is full (``pauseProducing``).
  Bytes written while paused are counted; past ``max_buffer_bytes`` a 1008
  close frame is queued and the connection aborted.
* A handshake Autobahn still refuses (no ``Sec-WebSocket-Version``, a bad
  ``Sec-WebSocket-Key``...) is answered with a JSON body
  ``{"error": {"code": "bad_handshake", "message": ...}}``, never a bare status line.
* Everything sent goes as a prepared message (:meth:`SocketProtocol.send_text`).
* Eager writes (the fan-out hot path): ``transport.write`` only queues, and the
  bytes leave on the next writable event -- per frame an ``epoll_ctl`` to
  watch for writable, the reactor's dispatch of ``doWrite`` and another
  ``epoll_ctl`` to stop watching.  With 1,000 sockets on one device that was
  about half of the daemon's CPU per event, and every ingest waited behind
  those queued writes (py-spy, bench/fanout.py).  So when nothing is queued
  and the client is not paused, :meth:`SocketProtocol.sendData` hands the
  frame to the plain TCP transport's non-blocking ``writeSomeData`` at once
  and queues only what the kernel did not take; order, the producer pause
  and the slow-client cut stay Twisted's (as in :mod:`iotd.relay.tcp_sides`).
  A TLS transport (or anything without ``writeSomeData``) keeps ``write``;
  so does a frame while something is queued.  :meth:`SocketProtocol.flush`
  then only matters for what was queued.
* Broadcast batching: a broadcast to many sockets (more than
  :data:`FLUSH_FANOUT`) only appends the frame to each socket's outbox
  (``_outbox``, when ``_batching`` and not paused); once per reactor turn the factory
  writes every outbox in one eager write (:meth:`SocketProtocol.flush_outbox`),
  so the events of one group commit leave in one ``send`` per socket, after
  the ingest acknowledgements of that turn.  Anything else sent on a socket
  flushes its outbox first, so order is kept.

Timers (idle, heartbeat) use ``factory.clock`` (the reactor unless a test sets
a :class:`twisted.internet.task.Clock`).  The factory is
:class:`iotd.ws.factory.SocketFactory`.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import defer, tcp

from iotd.logs import Logger

STATE_OPEN = WebSocketProtocol.STATE_OPEN
STATE_CLOSED = WebSocketProtocol.STATE_CLOSED
STATE_CONNECTING = WebSocketProtocol.STATE_CONNECTING

MAX_MESSAGE = 64 * 1024  # client messages are capped at 64 KiB
FLUSH_FANOUT = 8  # an event for at most this many sockets is sent at once (see SocketProtocol.flush)


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _can_send_now(transport: Any) -> bool:
    """A plain (no TLS) Twisted TCP transport whose queue :meth:`SocketProtocol.sendData` can
    bypass with ``writeSomeData``."""
    return (isinstance(transport, tcp.Connection) and not getattr(transport, "TLS", False)
            and hasattr(transport, "_tempDataLen") and hasattr(transport, "dataBuffer"))


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
    _eager: bool | None = None  # may sendData write to the socket at once? (None: not looked yet)
    _outbox: list | None = None  # broadcast frames waiting for this reactor turn's flush
    _batching = False  # plain TCP, no compression: set when the socket opens (onOpen)

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
        # May broadcasts queue frames in the outbox (plain TCP, no compression)?  Read in
        # SocketFactory.broadcast's inner loop, with _paused.
        self._eager = _can_send_now(self.transport)
        self._batching = self._eager and self._perMessageCompress is None
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
        """Every frame Autobahn or we send passes here: write (at once when nothing is
        queued, see the module docstring), count if paused."""
        if self._outbox:
            self.flush_outbox()  # broadcast frames queued earlier go first
        if sync or chopsize or self.send_queue:
            super().sendData(data, sync, chopsize)
            return
        if self.state == STATE_CLOSED:
            return
        self._write(data)

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if not self._paused and self._eager is not False:
            if self._eager is None:
                self._eager = _can_send_now(transport)
            if self._eager and not transport.dataBuffer and not transport._tempDataLen \
                    and transport.connected and not transport.disconnecting:
                # transport.writeSomeData without its wrappers (this is the fan-out's inner loop)
                try:
                    sent = transport.socket.send(data)
                except OSError:  # would block, interrupted, or an error Twisted's write path finds
                    sent = 0
                if sent == len(data):
                    return
                data = data[sent:]  # the kernel took a part: queue the rest (Twisted's path)
        transport.write(data)
        if self._paused:
            self._pending += len(data)
            if self._pending > self.max_buffer and not self._cut:
                self.too_slow()

    def flush_outbox(self) -> None:
        """Write the frames broadcasts queued, in one write."""
        box = self._outbox
        if box is None:
            return
        self._outbox = None
        if self.state == STATE_CLOSED:
            return
        data = box[0] if len(box) == 1 else b"".join(box)
        if self.send_queue:  # Autobahn queued something of its own: keep the order
            super().sendData(data)
        else:
            self._write(data)

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
