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
- **Rate limit** (``Link.rate_limit`` > 0): each reading side gets a
  :class:`~iotd.relay.bucket.Gate` with its own bucket, registered as the
  peer's producer in place of the bare transport, and reads in chunks of a
  tenth of a second's worth; a side that spent its tokens stops reading until
  they are back (back-pressure: nothing dropped, nothing queued).
- **Over a websocket** (:mod:`iotd.relay.ws_side`): the client may instead be
  a websocket on the HTTP port (:meth:`TCPRelay.accept_websocket`).  It is the
  link's one client like a port client, and the relay drives it through the
  same calls: every side shows the relay a transport-like ``pipe``.
- **Hot path and eager writes**: see :mod:`iotd.relay.tcp_sides`.
- **In the kernel** (:mod:`iotd.relay.splice`): a plain link without a rate
  limit, between two TCP sockets, is relayed with ``splice(2)`` through a pipe
  per direction instead of the protocols' ``dataReceived``; readiness,
  pausing, half-close and close stay the transports' own.  Anything else (or
  a platform without ``os.splice``) takes the path above.
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
from twisted.logger import Logger

from iotd import metrics
from iotd.relay.addresses import DevicePolicy, resolve
from iotd.relay.bucket import Bucket, Gate, chunk_size
from iotd.relay.ctr import Transform, stream_transform
from iotd.relay.relay import Relay
from iotd.relay.splice import Splice
from iotd.relay.tcp_sides import BUFFER_SIZE, ClientSide, DeviceSide, ListeningFactory, Side, eager_writer

if TYPE_CHECKING:
    from iotd.relay.link import Link


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


class TCPRelay(Relay):
    """The sockets of one TCP link; ``Link`` owns the timers and the bookkeeping."""

    log = Logger()

    def __init__(self, link: Link, reactor: Any, interface: str, key: bytes | None, iv: bytes | None, *,
                 connect_timeout: float, policy: DevicePolicy | None = None, splice: bool = True) -> None:
        super().__init__(link, reactor, interface)
        self.clock = link.clock
        self.connect_timeout = connect_timeout
        self.use_splice = splice
        self.policy = policy if policy is not None else DevicePolicy()
        if key is not None and iv is not None:
            # client->device data is decrypted, device->client data encrypted:
            # in CTR both are the same keystream XOR, one stream per direction.
            self._t_up: Transform | None = stream_transform(key, iv)
            self._t_down: Transform | None = stream_transform(key, iv)
        else:
            self._t_up = self._t_down = None
        self.state = State.LISTENING
        self.client: ClientSide | None = None
        self.device: DeviceSide | None = None
        self._port: Any = None
        self._dialing: defer.Deferred[Any] | None = None
        self._dial_timer: Any = None
        self._dial_timed_out = False
        self._writes_shut = 0
        self._closed: defer.Deferred[Any] | None = None
        self._gates: dict[Any, Gate] = {}
        self.splice: Splice | None = None  # set when the link relays in the kernel

    # -- life cycle driven by Link / LinkManager --------------------------

    def listen(self, port: int) -> None:
        """Bind the link's port; raises ``CannotListenError`` if it is taken."""
        self._port = self.reactor.listenTCP(port, ListeningFactory(self), interface=self.interface)

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
        for gate in self._gates.values():
            gate.stop()
        waits: list[defer.Deferred[Any]] = []
        if self._port is not None:
            waits.append(defer.maybeDeferred(self._port.stopListening))
        for side in (self.client, self.device):
            if side is not None and side.transport is not None:
                if abort:
                    side.pipe.abortConnection()
                else:
                    side.pipe.loseConnection()
                waits.append(side.lost)
        self._closed = defer.gatherResults(waits, consumeErrors=True)
        self._closed.addCallback(lambda _: None)
        return self._closed

    def buffered(self) -> int:
        """Bytes held in userspace write buffers for this link (both directions); a spliced
        link holds none (its pipes are kernel memory, see :meth:`Splice.buffered`)."""
        return sum(side.buffered() for side in (self.client, self.device) if side is not None)

    # -- events from the protocols -----------------------------------------

    def _to(self, state: State) -> None:
        if state not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"TCP relay: {self.state.value} -> {state.value} is not allowed")
        self.state = state

    def accept(self, addr: Any) -> ClientSide | None:
        refused = self._claim(addr)
        if refused is not None:
            return self._refuse(addr, refused)
        self.client = ClientSide(self, self._t_up)
        self.link.mark_used()
        return self.client

    def accept_websocket(self, addr: Any, make: Any) -> Any:
        """The link's client is a websocket from ``addr``: ``make(relay, transform)``
        builds its side.  Returns the side, or the refusal's reason
        (``refused_source``, ``refused_taken``) as a string."""
        refused = self._claim(addr)
        if refused is not None:
            self._refuse(addr, refused)
            return refused
        self.client = make(self, self._t_up)
        self.link.mark_used()
        return self.client

    def _claim(self, addr: Any) -> str | None:
        """Take the link for the client at ``addr``; the refusal's reason, if not."""
        link = self.link
        if link.source is not None and (addr.host, addr.port) != link.source:
            return "refused_source"
        if self.state is not State.LISTENING:
            return "refused_taken"
        self._to(State.CONNECTING)
        return None

    def _refuse(self, addr: Any, reason: str) -> None:
        metrics.link_failures.labels(reason).inc()
        self._log_link(self.log.info, "refused client {client}: {reason}",
                       client=f"{addr.host}:{addr.port}", reason=reason)
        return None

    def _log_link(self, level: Any, text: str, **fields: Any) -> None:
        """One log line about this link: its token prefix, port and device first."""
        link = self.link
        level("link {token} ({protocol} port {port}, device {device}) " + text,
              token=link.token[:6], protocol="tcp", port=link.port, device=link.device, **fields)

    def client_connected(self, client: Any) -> None:
        transport = client.pipe
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
        self._dialing = connectProtocol(endpoint, DeviceSide(self, self._t_down))
        self._dialing.addErrback(self._dial_failed)

    def _refuse_address(self, addresses: list[str]) -> None:
        if self._dial_timer is not None and self._dial_timer.active():
            self._dial_timer.cancel()
        metrics.link_failures.labels("refused_address").inc()
        self._log_link(self.log.warn, "refused to connect to {device_host} ({addresses}): {rule}",
                       device_host=self.link.device_host, addresses=", ".join(addresses),
                       rule=self.policy.rule())
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
        self._log_link(self.log.warn, "cannot reach {device_host}:{device_port}: {reason} ({error})",
                       device_host=self.link.device_host, device_port=self.link.device_port,
                       reason=reason, error=failure.getErrorMessage())
        self.link.close(reason)
        return None

    def device_connected(self, device: DeviceSide) -> None:
        if self.state is not State.CONNECTING:
            device.pipe.abortConnection()  # type: ignore[union-attr]
            return
        self._dialing = None
        if self._dial_timer is not None and self._dial_timer.active():
            self._dial_timer.cancel()
        self._to(State.RELAYING)
        client = self.client
        assert client is not None
        self.device = device
        ct, dt = client.pipe, device.pipe
        dt.setTcpNoDelay(True)  # type: ignore[union-attr]
        dt.bufferSize = BUFFER_SIZE  # type: ignore[union-attr]
        self.link.touch()
        if self.use_splice and self._t_up is None and self.link.rate_limit <= 0:
            self.splice = Splice.start(ct, dt, client._count, device._count)
            if self.splice is not None:
                ct.resumeProducing()  # type: ignore[union-attr]
                return
        client._write = eager_writer(dt)
        device._write = eager_writer(ct)
        up, down = self._throttle(client, ct), self._throttle(device, dt)
        # A full write buffer on one side pauses reading on the other.
        ct.registerProducer(down, True)  # type: ignore[union-attr]
        dt.registerProducer(up, True)  # type: ignore[union-attr]
        ct.resumeProducing()  # type: ignore[union-attr]

    def _throttle(self, side: Any, pipe: Any) -> Any:
        """The producer that pauses ``side``'s reading: its pipe, or a rate-limiting gate."""
        rate = self.link.rate_limit
        if rate <= 0:
            return pipe
        chunk = chunk_size(rate, BUFFER_SIZE)
        gate = Gate(pipe, Bucket(rate, self.clock), chunk)
        pipe.bufferSize = chunk  # reads (and the write queue) of a tenth of a second's worth
        side._count = gate.counter(side._count)
        self._gates[side] = gate
        return gate

    def _peer(self, side: Side) -> Side | None:
        return self.device if side is self.client else self.client

    def read_ended(self, side: Side) -> None:
        """``side`` sent FIN: pass it on after the peer's pending bytes."""
        if side.read_done:
            return
        side.read_done = True
        gate = self._gates.get(side)
        if gate is not None:
            gate.stop()
        peer = self._peer(side)
        if self.state is not State.RELAYING or peer is None:
            return
        pt = peer.pipe
        pt.unregisterProducer()  # type: ignore[union-attr]
        pt.loseWriteConnection()  # type: ignore[union-attr]

    def write_ended(self, side: Side) -> None:
        """Our FIN went out on ``side``: one direction is done."""
        self._writes_shut += 1
        if self._writes_shut == 2 and self.state is State.RELAYING:
            self.link.close("done", abort=False)

    def side_lost(self, side: Side) -> None:
        if self.splice is not None:
            self.splice.close()  # the other side is aborted or already closing: no more splicing
        if self.state is State.CLOSED:
            return  # our own shutdown
        self.link.close("client_reset" if side is self.client else "device_reset")
