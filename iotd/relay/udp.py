"""One UDP device link: a client-facing port and a connected socket to the device.

Choices made:

- Two sockets per link.  The client-facing one listens on the link's port;
  the device-facing one binds an ephemeral port on any address (the route to
  the device may leave through another interface) and is ``connect()``-ed to
  the device, so the kernel drops datagrams from anybody else.
- Datagram boundaries are kept up to 65,507 bytes: both ports are opened with
  ``maxPacketSize=65535`` (Twisted reads 8,192 by default and would truncate).
- The client: with ``source`` only that address is accepted, and datagrams
  from the device go to it at once, before it sent anything.  Without, the
  first sender inherits the link; datagrams from others are dropped (counted
  in ``Link.refused``).  Device datagrams that arrive while no client is known
  are dropped (``Link.dropped``).  The counters are the ``Link``'s; the
  protocols report each datagram (``datagram_up``, ``datagram_refused``...).
- UDP has no back-pressure: a datagram the kernel will not take (send buffer
  full, ICMP unreachable) is dropped and counted in ``Link.dropped`` instead
  of being queued, so memory stays flat.  ``OSError`` is caught right at the
  ``write`` -- Twisted would otherwise log a traceback per dropped datagram.
- Rate limit (``Link.rate_limit`` > 0): a token bucket per direction
  (:class:`~iotd.relay.bucket.Bucket`, a burst of one second's worth); a
  datagram the bucket cannot pay for whole is dropped and counted
  (``Link.rate_dropped``), before it is counted as relayed.
- Encryption, when asked for, restarts the keystream at the IV for every
  datagram (see ``ctr``).
- Hot path: ``datagramReceived`` -> ``Link.datagram_up``/``datagram_down``
  (counters, ``last_activity``) -> (transform) -> ``write``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.error import MessageLengthError
from twisted.internet.protocol import DatagramProtocol

from iotd.relay.bucket import Bucket
from iotd.relay.ctr import Transform, datagram_transform
from iotd.relay.relay import Relay

if TYPE_CHECKING:
    from iotd.relay.link import Link

MAX_PACKET = 65535  # what we ask recvfrom for; the largest UDP/IPv4 payload is 65,507

_SEND_ERRORS = (OSError, MessageLengthError)


class _Datagrams(DatagramProtocol):
    """One of the link's two UDP sockets; ``_send`` is the other socket's bound write."""

    noisy = False

    def __init__(self, relay: UDPRelay) -> None:
        self.relay = relay
        self.link = relay.link
        self._transform = relay.transform
        self._send: Any = None
        rate = relay.link.rate_limit
        self._bucket = Bucket(rate, relay.link.clock) if rate > 0 else None

    def _relay(self, data: bytes, *to: Any) -> None:
        t = self._transform
        try:
            self._send(t(data) if t is not None else data, *to)
        except _SEND_ERRORS:
            self.link.datagram_dropped()


class _ClientDatagrams(_Datagrams):
    def datagramReceived(self, data: bytes, addr: Any) -> None:
        relay = self.relay
        if addr != relay.client:
            if relay.client is not None:
                self.link.datagram_refused()
                return
            relay.client = addr  # first sender inherits the link
        if self._bucket is not None and not self._bucket.allow(len(data)):
            self.link.datagram_rate_dropped()
            return
        self.link.datagram_up(len(data))
        self._relay(data)


class _DeviceDatagrams(_Datagrams):
    def datagramReceived(self, data: bytes, addr: Any) -> None:
        client = self.relay.client
        if client is None:
            self.link.datagram_dropped()
            return
        if self._bucket is not None and not self._bucket.allow(len(data)):
            self.link.datagram_rate_dropped()
            return
        self.link.datagram_down(len(data))
        self._relay(data, client)

    def connectionRefused(self) -> None:
        # ICMP port unreachable from the device: UDP is lossy, keep the link.
        self.link.datagram_dropped()


class UDPRelay(Relay):
    """The sockets of one UDP link; ``Link`` owns the timers and the bookkeeping."""

    def __init__(self, link: Link, reactor: Any, interface: str, key: bytes | None, iv: bytes | None) -> None:
        if not (isIPAddress(link.device_host) or isIPv6Address(link.device_host)):
            raise ValueError(f"UDP device host must be an IP address, got {link.device_host!r}")
        super().__init__(link, reactor, interface)
        self.transform: Transform | None = (
            datagram_transform(key, iv) if key is not None and iv is not None else None
        )
        self.client: tuple[str, int] | None = link.source
        self._client_proto = _ClientDatagrams(self)
        self._device_proto = _DeviceDatagrams(self)
        self._client_port: Any = None
        self._device_port: Any = None
        self._closed: defer.Deferred[Any] | None = None

    def listen(self, port: int) -> None:
        """Bind the client-facing port; raises ``CannotListenError`` if it is taken."""
        self._client_port = self.reactor.listenUDP(
            port, self._client_proto, interface=self.interface, maxPacketSize=MAX_PACKET
        )

    def start(self) -> None:
        """Open the device-facing socket, connected to the device."""
        host = self.link.device_host
        any_addr = "::" if isIPv6Address(host) else ""
        try:
            self._device_port = self.reactor.listenUDP(
                0, self._device_proto, interface=any_addr, maxPacketSize=MAX_PACKET
            )
            self._device_port.connect(host, self.link.device_port)
        except BaseException:
            self.shutdown()
            raise
        self._client_proto._send = self._device_port.write
        self._device_proto._send = self._client_port.write

    def shutdown(self, abort: bool = True) -> defer.Deferred[Any]:
        """Close both sockets; fires when both are closed (``abort`` is moot for UDP)."""
        if self._closed is None:
            ports = [p for p in (self._client_port, self._device_port) if p is not None]
            self._closed = defer.gatherResults(
                [defer.maybeDeferred(p.stopListening) for p in ports], consumeErrors=True
            )
            self._closed.addCallback(lambda _: None)
        return self._closed
