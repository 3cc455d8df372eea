"""One MQTT client connection to the broker: paho-mqtt 2, driven by the Twisted reactor.

Why paho: it is the MQTT client most deployments already run (Eclipse,
maintained, MQTT 3.1.1 and 5, TLS, manual acknowledgements), and its
documented external-loop mode fits a reactor: its socket is registered with
``addReader``/``addWriter`` (``loop_read`` / ``loop_write``; paho asks for
write readiness through ``on_socket_register_write``), ``loop_misc`` runs on
a :class:`~twisted.internet.task.LoopingCall` (keepalive pings).  The
Twisted-native clients on PyPI (twisted-mqtt, mqtt-client-twisted) have
had no release for years.  The one thing paho does blocking is opening the
socket (DNS, TCP connect, TLS handshake): that runs in a reactor thread, the
reactor keeps serving; once the socket is open every read and write happens
in the reactor thread only.

The session (spec 60): MQTT 3.1.1 with ``clean_session = false`` under a
stable client id, so the broker keeps iotd's subscriptions and queues QoS 1
messages while iotd is down or restarting; ``manual_ack`` so a PUBACK goes
out only when :mod:`iotd.mqtt.ingest` says the message is committed.  Acks
are tagged with the connection they belong to: a message id of a lost
connection is never acknowledged on the next one (the broker redelivers it
there, flagged ``dup``).

Reconnect: 1 s doubling to 30 s, each wait between 75 % and 100 % of it
(jitter), reset by a connection that was accepted.  Every connect
subscribes again (the session may be new).  :attr:`state` is ``ok``,
``connecting`` or ``down`` (``/healthz``).

Back-pressure: :meth:`pause` stops reading the socket (the broker then
holds what it has not sent: at most its in-flight window of unacknowledged
QoS 1 messages is ours); :meth:`resume` reads again.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from paho.mqtt import client as paho
from twisted.internet import threads
from twisted.internet.task import LoopingCall
from zope.interface import implementer
from twisted.internet.interfaces import IReadWriteDescriptor

from iotd import metrics
from iotd.logs import Logger
from iotd.mqtt.broker import Broker

FIRST_DELAY = 1.0
MAX_DELAY = 30.0
MISC_EVERY = 1.0  # seconds between two loop_misc calls (keepalive)
OUT_QUEUE = 1000  # messages paho may queue for sending (commands); past it publish fails


@implementer(IReadWriteDescriptor)
class _Socket:
    """The reactor's view of paho's socket."""

    def __init__(self, connection: "Connection", sock: Any):
        self._connection = connection
        self._sock = sock
        self._fd = sock.fileno()

    def fileno(self) -> int:
        return self._fd

    def doRead(self) -> None:
        self._connection._read(self)

    def doWrite(self) -> None:
        self._connection._write(self)

    def connectionLost(self, reason: Any) -> None:
        self._connection._socket_lost(self)

    def logPrefix(self) -> str:
        return "mqtt"


class Connection:
    """The broker connection; ``on_message(message, generation)`` for each message received."""

    log = Logger()

    def __init__(self, reactor: Any, broker: Broker, client_id: str, filters: list[str], qos: int,
                 keepalive: int, on_message: Callable[[Any, int], None],
                 on_up: Callable[[], None] = lambda: None, username: str = "", password: str | None = None):
        self._reactor = reactor
        self.broker = broker
        self.client_id = client_id
        self._filters = filters
        self._qos = qos
        self._keepalive = keepalive
        self._on_message = on_message
        self._on_up = on_up
        self._state = "down"
        self.generation = 0  # bumped by every socket opened: acks carry the one they belong to
        self._socket: _Socket | None = None
        self._reading = False
        self._writing = False
        self._paused = False
        self._stopping = True
        self._delay = FIRST_DELAY
        self._retry: Any = None
        self._why_down = ""
        self._refusal = ""
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False,
                             protocol=paho.MQTTv311, manual_ack=True,
                             transport="unix" if broker.kind == "unix" else "tcp", reconnect_on_failure=False)
        client.max_queued_messages_set(OUT_QUEUE)
        client.max_inflight_messages_set(100)
        client.connect_timeout = broker.timeout
        if username:
            client.username_pw_set(username, password)
        if broker.kind == "tls":
            client.tls_set_context(broker.ssl_context())
        client.on_connect = self._connected
        client.on_disconnect = self._disconnected
        client.on_message = self._message
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._done_writing
        client.on_socket_close = self._paho_closed
        client.suppress_exceptions = True
        self._client = client
        self._misc = LoopingCall(self._loop_misc)
        self._misc.clock = reactor

    @property
    def state(self) -> str:
        """``ok``, ``connecting`` or ``down``."""
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        self._state = value
        metrics.mqtt_up.set(1 if value == "ok" else 0)

    # -- life cycle -----------------------------------------------------------------

    def start(self) -> None:
        self._stopping = False
        self._connect()

    def stop(self) -> None:
        self._stopping = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._misc.running:
            self._misc.stop()
        if self._socket is not None:
            try:
                self._client.disconnect()  # (paho writes DISCONNECT and closes its socket)
                self._client.loop_write()
            except Exception:
                pass
        self._unregister()
        if self._client.socket() is not None:
            self._client._sock_close()
        self.generation += 1
        self.state = "down"

    def _connect(self) -> None:
        if self._stopping:
            return
        self.state = "connecting"
        host = self.broker.host
        port = self.broker.port if self.broker.kind != "unix" else 1
        self._client.connect_async(host, port, keepalive=self._keepalive)
        d = threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._client.reconnect)
        d.addCallbacks(self._opened, self._open_failed)

    def _opened(self, rc: Any) -> None:
        sock = self._client.socket()
        if self._stopping or sock is None:
            if sock is not None:
                self._client._sock_close()  # (paho's own close; the reactor never saw this socket)
            return
        self.generation += 1
        self._socket = _Socket(self, sock)
        self._reading = False
        self._writing = False
        if not self._paused:
            self._start_reading()
        if self._client.want_write():
            self._want_write()
        if not self._misc.running:
            self._misc.start(MISC_EVERY, now=False)

    def _open_failed(self, failure: Any) -> None:
        self._down(f"cannot connect to {self.broker}: {failure.getErrorMessage()}")

    def _down(self, why: str) -> None:
        """The connection is gone (or never came): log it (once while the reason stays the same),
        try again after the backoff."""
        if why != self._why_down:
            self.log.warn("mqtt: {why}; connecting again in {delay:.1f} s", why=why,
                          delay=self._delay)
        self._why_down = why
        self.state = "down"
        if self._stopping:
            return
        delay = self._delay * random.uniform(0.75, 1.0)
        self._delay = min(self._delay * 2, MAX_DELAY)
        if self._retry is None or not self._retry.active():
            self._retry = self._reactor.callLater(delay, self._connect)

    # -- paho's callbacks (reactor thread, but for the blocking open) -------------------------

    def _connected(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:  # (paho closes the socket next; the outage is logged with this reason)
            self._refusal = f"the broker refused the connection: {reason}"
            self.drop(self._refusal)
            return
        self.state = "ok"
        self._delay = FIRST_DELAY
        self._why_down = ""
        self.log.info("mqtt: connected to {broker} as {client_id} (session {session})", broker=str(self.broker),
                      client_id=self.client_id, session="resumed" if flags.session_present else "new")
        client.subscribe([(f, self._qos) for f in self._filters])
        self._on_up()

    # paho holds a lock while it runs a callback, and closing its socket takes that lock again:
    # what a callback must do to the client waits for the next reactor turn.

    def _disconnected(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._reactor.callLater(0, self._close_open, self._socket, f"connection to {self.broker} lost ({reason})")

    def _close_open(self, sock: "_Socket | None", why: str) -> None:
        if sock is not None and sock is self._socket:
            self._close(why)

    def _message(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            self._on_message(message, self.generation)
        except Exception:
            self.log.failure("mqtt: handling a message on {topic} failed", topic=message.topic[:200])

    def _want_write(self, *args: Any) -> None:
        if self._socket is not None and not self._writing and self._in_reactor():
            self._writing = True
            self._reactor.addWriter(self._socket)

    def _done_writing(self, *args: Any) -> None:
        if self._socket is not None and self._writing and self._in_reactor():
            self._writing = False
            self._reactor.removeWriter(self._socket)

    def _paho_closed(self, client: Any, userdata: Any, sock: Any) -> None:
        """paho closes its socket (lost, or no ping answer): forget it while its fd is still open."""
        if self._socket is not None and self._socket._sock is sock:
            self._unregister()
            self._reactor.callLater(0, self._closed, f"connection to {self.broker} lost")

    def _in_reactor(self) -> bool:
        from twisted.python import threadable

        return threadable.isInIOThread()

    # -- the socket ---------------------------------------------------------------------

    def _read(self, sock: _Socket) -> None:
        if sock is not self._socket:
            return
        rc = self._client.loop_read()
        if rc != paho.MQTT_ERR_SUCCESS and self._socket is sock:
            self._close(f"connection to {self.broker} lost ({paho.error_string(rc)})")

    def _write(self, sock: _Socket) -> None:
        if sock is not self._socket:
            return
        rc = self._client.loop_write()
        if rc != paho.MQTT_ERR_SUCCESS and self._socket is sock:
            self._close(f"connection to {self.broker} lost ({paho.error_string(rc)})")

    def _socket_lost(self, sock: _Socket) -> None:
        if sock is self._socket:
            self._close("connection lost")

    def _loop_misc(self) -> None:
        if self._socket is None:
            return
        self._client.loop_misc()
        if self._client.socket() is None and self._socket is not None:
            self._close(f"no answer from {self.broker} within keepalive")

    def _start_reading(self) -> None:
        if self._socket is not None and not self._reading:
            self._reading = True
            self._reactor.addReader(self._socket)

    def _unregister(self) -> None:
        sock, self._socket = self._socket, None
        if sock is None:
            return
        if self._reading:
            self._reactor.removeReader(sock)
        if self._writing:
            self._reactor.removeWriter(sock)
        self._reading = self._writing = False

    def _close(self, why: str) -> None:
        """Forget the socket (paho closes it) and, unless stopping, connect again later."""
        self._unregister()
        if self._client.socket() is not None:
            self._client._sock_close()
        self._closed(why)

    def _closed(self, why: str) -> None:
        if self._refusal:
            why, self._refusal = self._refusal, ""
        if self._misc.running:
            self._misc.stop()
        self.generation += 1
        if self._stopping:
            self.state = "down"
            return
        self._down(why)

    def drop(self, why: str) -> None:
        """Close the connection on purpose (the broker then redelivers what is not acknowledged)."""
        self._reactor.callLater(0, self._close_open, self._socket, why)

    # -- what the other modules call ----------------------------------------------------------

    def pause(self) -> None:
        self._paused = True
        if self._socket is not None and self._reading:
            self._reading = False
            self._reactor.removeReader(self._socket)

    def resume(self) -> None:
        self._paused = False
        self._start_reading()

    def ack(self, mid: int, qos: int, generation: int) -> None:
        """Acknowledge message ``mid`` if it came on the connection that is still open."""
        if qos > 0 and generation == self.generation and self._socket is not None:
            self._client.ack(mid, qos)

    def publish(self, topic: str, payload: bytes, qos: int) -> bool:
        """Queue a message to the broker; False when not connected or paho's queue is full."""
        if self.state != "ok":
            return False
        info = self._client.publish(topic, payload, qos=qos, retain=False)
        return info.rc == paho.MQTT_ERR_SUCCESS

    @property
    def connected(self) -> bool:
        return self.state == "ok"
