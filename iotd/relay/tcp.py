"""One TCP device link: a listening port, one client connection, one device connection.

Choices made:

- **One client per link.**  The listening factory hands out a protocol to the
  first acceptable client only; everybody else gets ``None`` from
  ``buildProtocol``, which makes Twisted close the accepted socket at once.
  With ``source`` only that ``host:port`` is acceptable.  The port stays bound
  while the link lives so that the link keeps its port.
- **Dial on connect.**  The device is dialled when the client connects, not
  before; the client transport is paused (``pauseProducing``) until then, so
  nothing it sends is read, let alone buffered.  The dial has its own
  ``connect_timeout`` timer on the injected clock (so tests drive it with
  ``Clock``); a failure or timeout closes the client and the link.
- **Resolve, check, then dial.**  A device ``host`` that is a name is resolved
  first (every address, see ``addresses.resolve``; the resolution counts
  toward ``connect_timeout``); addresses the link's ``DevicePolicy`` does not
  allow are skipped and the first allowed one is dialled as a literal.  When
  none is allowed the client is closed, the link closes with reason
  ``refused_address``, and that is logged and counted.
- **Back-pressure both ways** like magic-wormhole's transit relay: each
  transport is registered as the streaming producer of the other, so when one
  side's write queue passes ``bufferSize`` the other side stops reading, its
  kernel buffers fill and the sender blocks.  Userspace memory per link stays
  below one queue plus one read chunk per direction.
- **Half-close.**  Both protocols are ``IHalfCloseableProtocol``: a FIN from
  one side unregisters that side as producer (so it is never resumed into a
  second EOF) and half-closes the other side with ``loseWriteConnection``
  after its pending bytes.  When both directions have been passed on
  (``writeConnectionLost`` on both) the link closes with reason ``done``; a
  reset of either side closes it with ``client_reset``/``device_reset``.
- **Hot path.**  ``dataReceived`` adds to plain integer counters on the
  ``Link``, stamps ``last_activity`` and writes to the peer (after the CTR
  ``update`` when encrypted).  Idle timeouts re-arm lazily from
  ``last_activity`` (see ``links``); Prometheus is fed from the integers
  elsewhere.
- **Eager writes, 128 KiB chunks.**  ``transport.write`` only queues: the
  bytes leave on the next writable event, which costs a reactor turn, an
  event dispatch and two ``epoll_ctl`` calls per chunk.  When the peer has
  nothing queued, the relay hands the chunk to the transport's own
  non-blocking ``writeSomeData`` at once and queues only what the kernel did
  not take (``write``), so ordering, producer pausing and error handling stay
  Twisted's.  Both transports read and queue up to ``BUFFER_SIZE`` (128 KiB,
  Twisted's ``SEND_LIMIT``) instead of 64 KiB.  Together these took loopback
  throughput from ~1.1 to ~1.6-1.8 GB/s (bench/relay.py).  Worst-case
  userspace memory per link: 2 x (queue + one chunk) = 512 KiB.
- ``shutdown`` (DELETE, timeouts, resets, service stop) aborts both
  connections -- "closes both sockets at once" -- and stops listening; its
  Deferred fires when every socket, the listening one included, is closed.
  Only the orderly end (both directions done) closes without a reset.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.abstract import isIPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from iotd import metrics
from iotd.relay.addresses import DevicePolicy, resolve
from iotd.relay.ctr import Transform, stream_transform

if TYPE_CHECKING:
    from iotd.relay.links import Link


# Read size and queue limit of both transports (Twisted's default is 64 KiB;
# 128 KiB is its SEND_LIMIT, the most one writeSomeData call sends).
BUFFER_SIZE = 128 * 1024


def _eager_writer(transport: Any) -> Any:
    """``transport.write`` that first tries to send at once when nothing is queued.

    Relies on ``FileDescriptor.writeSomeData`` and the queue attributes
    ``dataBuffer``/``_tempDataLen``; on a transport without them it is plain
    ``write``.
    """
    write = transport.write
    send = getattr(transport, "writeSomeData", None)
    if send is None or not hasattr(transport, "_tempDataLen") or not hasattr(transport, "dataBuffer"):
        return write

    def eager_write(data: bytes) -> None:
        if transport._tempDataLen or transport.dataBuffer:
            write(data)  # keep the order behind what is queued
            return
        sent = send(data)
        if sent.__class__ is not int:
            write(data)  # an error: let Twisted's own write path find it and close
        elif sent < len(data):
            write(data[sent:])

    return eager_write


class State(enum.Enum):
    LISTENING = "listening"  # waiting for the one client
    CONNECTING = "connecting"  # client accepted and paused, dialling the device
    RELAYING = "relaying"
    CLOSED = "closed"


_TRANSITIONS = {
    State.LISTENING: {State.CONNECTING, State.CLOSED},
    State.CONNECTING: {State.RELAYING, State.CLOSED},
    State.RELAYING: {State.CLOSED},
    State.CLOSED: set(),
}


@implementer(IHalfCloseableProtocol)
class _Side(Protocol):
    """One end of the relay.  Subclasses differ only in which counter they feed."""

    def __init__(self, relay: TCPRelay, transform: Transform | None) -> None:
        self.relay = relay
        self.link = relay.link
        self._seconds = relay.seconds
        self._transform = transform
        self._write: Any = None  # the peer transport's bound write, set when paired
        self.read_done = False
        self.lost: defer.Deferred[None] = defer.Deferred()

    def readConnectionLost(self) -> None:
        self.relay.read_ended(self)

    def writeConnectionLost(self) -> None:
        self.relay.write_ended(self)

    def connectionLost(self, reason: Any = None) -> None:
        self.relay.side_lost(self)
        self.lost.callback(None)

    def buffered(self) -> int:
        """Bytes waiting in this side's userspace write buffer."""
        t = self.transport
        if t is None:
            return 0
        return len(t.dataBuffer) - t.offset + t._tempDataLen  # type: ignore[attr-defined]


class _ClientSide(_Side):
    def connectionMade(self) -> None:
        self.relay.client_connected(self)

    def dataReceived(self, data: bytes) -> None:
        link = self.link
        link.bytes_up += len(data)
        link.last_activity = self._seconds()
        t = self._transform
        self._write(t(data) if t is not None else data)


class _DeviceSide(_Side):
    def connectionMade(self) -> None:
        self.relay.device_connected(self)

    def dataReceived(self, data: bytes) -> None:
        link = self.link
        link.bytes_down += len(data)
        link.last_activity = self._seconds()
        t = self._transform
        self._write(t(data) if t is not None else data)


class _ListeningFactory(Factory):
    noisy = False

    def __init__(self, relay: TCPRelay) -> None:
        self.relay = relay

    def buildProtocol(self, addr: Any) -> _ClientSide | None:
        return self.relay.accept(addr)


class TCPRelay:
    """The sockets of one TCP link; ``Link`` owns the timers and the bookkeeping."""

    log = Logger()

    def __init__(
        self,
        link: Link,
        reactor: Any,
        clock: Any,
        interface: str,
        connect_timeout: float,
        key: bytes | None,
        iv: bytes | None,
        policy: DevicePolicy | None = None,
    ) -> None:
        self.link = link
        self.reactor = reactor
        self.clock = clock
        self.seconds = clock.seconds
        self.interface = interface
        self.connect_timeout = connect_timeout
        self.policy = policy if policy is not None else DevicePolicy()
        if key is not None and iv is not None:
            # client->device data is decrypted, device->client data encrypted:
            # in CTR both are the same keystream XOR, one stream per direction.
            self._t_up: Transform | None = stream_transform(key, iv)
            self._t_down: Transform | None = stream_transform(key, iv)
        else:
            self._t_up = self._t_down = None
        self.state = State.LISTENING
        self.client: _ClientSide | None = None
        self.device: _DeviceSide | None = None
        self._port: Any = None
        self._dialing: defer.Deferred[Any] | None = None
        self._dial_timer: Any = None
        self._dial_timed_out = False
        self._writes_shut = 0
        self._closed: defer.Deferred[Any] | None = None

    # -- life cycle driven by Link / LinkManager --------------------------

    def listen(self, port: int) -> None:
        """Bind the link's port; raises ``CannotListenError`` if it is taken."""
        self._port = self.reactor.listenTCP(port, _ListeningFactory(self), interface=self.interface)

    def start(self) -> None:
        """Nothing to do until a client connects."""

    def shutdown(self, abort: bool = True) -> defer.Deferred[Any]:
        """Close both connections, stop listening; fires when all sockets are closed.

        ``abort`` (DELETE, timeouts, resets) drops queued bytes and resets the
        connections.  The orderly end (both FINs passed on, queues flushed)
        closes without a reset: a reset would make the client's kernel discard
        reply bytes it has received but not yet read.
        """
        if self._closed is not None:
            return self._closed
        self._to(State.CLOSED)
        if self._dial_timer is not None and self._dial_timer.active():
            self._dial_timer.cancel()
        if self._dialing is not None:
            self._dialing.cancel()  # errback lands in _dial_failed, which sees CLOSED
        waits: list[defer.Deferred[Any]] = []
        if self._port is not None:
            waits.append(defer.maybeDeferred(self._port.stopListening))
        for side in (self.client, self.device):
            if side is not None and side.transport is not None:
                if abort:
                    side.transport.abortConnection()
                else:
                    side.transport.loseConnection()
                waits.append(side.lost)
        self._closed = defer.gatherResults(waits, consumeErrors=True)
        self._closed.addCallback(lambda _: None)
        return self._closed

    def buffered(self) -> int:
        """Bytes held in userspace write buffers for this link (both directions)."""
        return sum(side.buffered() for side in (self.client, self.device) if side is not None)

    # -- events from the protocols -----------------------------------------

    def _to(self, state: State) -> None:
        if state not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"TCP relay: {self.state.value} -> {state.value} is not allowed")
        self.state = state

    def accept(self, addr: Any) -> _ClientSide | None:
        link = self.link
        if link.source is not None and (addr.host, addr.port) != link.source:
            return self._refuse(addr, "refused_source")
        if self.state is not State.LISTENING:
            return self._refuse(addr, "refused_taken")
        self._to(State.CONNECTING)
        self.client = _ClientSide(self, self._t_up)
        link.mark_used()
        return self.client

    def _refuse(self, addr: Any, reason: str) -> None:
        metrics.link_failures.labels(reason).inc()
        self.log.info(
            "link {token} ({protocol} port {port}, device {device}) refused client {client}: {reason}",
            token=self.link.token[:6],
            protocol="tcp",
            port=self.link.port,
            device=self.link.device,
            client=f"{addr.host}:{addr.port}",
            reason=reason,
        )
        return None

    def client_connected(self, client: _ClientSide) -> None:
        transport = client.transport
        transport.pauseProducing()  # type: ignore[union-attr]
        transport.bufferSize = BUFFER_SIZE  # type: ignore[union-attr]
        transport.setTcpNoDelay(True)  # type: ignore[union-attr]
        self._dial_timer = self.clock.callLater(self.connect_timeout, self._dial_timeout)
        host, port = self.link.device_host, self.link.device_port
        resolving = resolve(self.reactor, host, port)
        if not resolving.called:
            self._dialing = resolving  # so that a timeout or a shutdown cancels the wait
        resolving.addCallback(self._resolved)
        resolving.addErrback(self._dial_failed)

    def _resolved(self, addresses: list[str]) -> None:
        if self.state is not State.CONNECTING:
            return  # closed (timed out, deleted) while resolving
        self._dialing = None
        link = self.link
        if not addresses:
            raise ConnectionError(f"{link.device_host} does not resolve")
        allowed = [a for a in addresses if self.policy.allows(a)]
        if not allowed:
            self._refuse_address(addresses)
            return
        if len(allowed) < len(addresses):
            self.log.info("link {token}: device host {device_host} also resolves to {skipped}, skipped: {rule}",
                          token=link.token[:6], device_host=link.device_host,
                          skipped=", ".join(a for a in addresses if a not in allowed), rule=self.policy.rule())
        address = allowed[0]
        endpoint_type = TCP6ClientEndpoint if isIPv6Address(address) else TCP4ClientEndpoint
        endpoint = endpoint_type(self.reactor, address, link.device_port)
        self._dialing = connectProtocol(endpoint, _DeviceSide(self, self._t_down))
        self._dialing.addErrback(self._dial_failed)

    def _refuse_address(self, addresses: list[str]) -> None:
        if self._dial_timer is not None and self._dial_timer.active():
            self._dial_timer.cancel()
        metrics.link_failures.labels("refused_address").inc()
        self.log.warn(
            "link {token} ({protocol} port {port}, device {device}) refused to connect to "
            "{device_host} ({addresses}): {rule}",
            token=self.link.token[:6],
            protocol="tcp",
            port=self.link.port,
            device=self.link.device,
            device_host=self.link.device_host,
            addresses=", ".join(addresses),
            rule=self.policy.rule(),
        )
        self.link.close("refused_address")

    def _dial_timeout(self) -> None:
        self._dial_timed_out = True
        if self._dialing is not None:
            self._dialing.cancel()

    def _dial_failed(self, failure: Any) -> None:
        self._dialing = None
        if self.state is State.CLOSED:
            return None  # we cancelled it ourselves while shutting down
        if self._dial_timer is not None and self._dial_timer.active():
            self._dial_timer.cancel()
        reason = "connect_timeout" if self._dial_timed_out else "connect_failed"
        metrics.link_failures.labels(reason).inc()
        self.log.warn(
            "link {token} ({protocol} port {port}, device {device}) cannot reach "
            "{device_host}:{device_port}: {reason} ({error})",
            token=self.link.token[:6],
            protocol="tcp",
            port=self.link.port,
            device=self.link.device,
            device_host=self.link.device_host,
            device_port=self.link.device_port,
            reason=reason,
            error=failure.getErrorMessage(),
        )
        self.link.close(reason)
        return None

    def device_connected(self, device: _DeviceSide) -> None:
        if self.state is not State.CONNECTING:
            device.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._dialing = None
        if self._dial_timer is not None and self._dial_timer.active():
            self._dial_timer.cancel()
        self._to(State.RELAYING)
        client = self.client
        assert client is not None
        self.device = device
        ct, dt = client.transport, device.transport
        dt.setTcpNoDelay(True)  # type: ignore[union-attr]
        dt.bufferSize = BUFFER_SIZE  # type: ignore[union-attr]
        client._write = _eager_writer(dt)
        device._write = _eager_writer(ct)
        # A full write buffer on one side pauses reading on the other.
        ct.registerProducer(dt, True)  # type: ignore[union-attr]
        dt.registerProducer(ct, True)  # type: ignore[union-attr]
        self.link.last_activity = self.seconds()
        ct.resumeProducing()  # type: ignore[union-attr]

    def _peer(self, side: _Side) -> _Side | None:
        return self.device if side is self.client else self.client

    def read_ended(self, side: _Side) -> None:
        """``side`` sent FIN: pass it on after the peer's pending bytes."""
        if side.read_done:
            return
        side.read_done = True
        peer = self._peer(side)
        if self.state is not State.RELAYING or peer is None:
            return
        pt = peer.transport
        pt.unregisterProducer()  # type: ignore[union-attr]
        pt.loseWriteConnection()  # type: ignore[union-attr]

    def write_ended(self, side: _Side) -> None:
        """Our FIN went out on ``side``: one direction is done."""
        self._writes_shut += 1
        if self._writes_shut == 2 and self.state is State.RELAYING:
            self.link.close("done", abort=False)

    def side_lost(self, side: _Side) -> None:
        if self.state is State.CLOSED:
            return  # our own shutdown
        self.link.close("client_reset" if side is self.client else "device_reset")
