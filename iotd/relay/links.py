"""The link manager: opens, tracks and closes device links.

Choices made:

- ``open`` is synchronous: ``listenTCP``/``listenUDP`` bind at once, so the
  REST layer gets the port (or ``NoFreePort``) in the same call.
- Ports are picked at random within ``port_range`` (inclusive) with
  ``random.SystemRandom``, so nobody can guess the port of the next link and
  race its client to an unpinned link.  Ports the manager already uses
  (including those of links still closing) are skipped, ports other programs
  hold fail to bind and are skipped.  After ``RANDOM_TRIES`` misses in a row
  (a nearly full range) the free ports are listed once and tried in random
  order, so the last free port is still found.
- Device addresses: ``open`` refuses an address literal the
  :class:`~iotd.relay.addresses.DevicePolicy` does not allow
  (``AddressNotAllowed``); a host name is checked by the TCP relay when the
  client connects (see ``addresses``).  The default policy (no networks)
  excludes loopback, unspecified and link-local addresses.
- ``max_links`` caps all links, ``max_links_per_tenant`` (0 = no cap) one
  tenant's; both are counted in O(1).
- Time comes only from the injected clock (``clock``, by default the
  reactor): ``created_at``, ``last_activity``, the idle timeout, the
  ``unused_ttl`` timer, the TCP connect timeout and the metrics flush.
- The idle timer is lazy: the relays stamp ``Link.last_activity`` on every
  chunk or datagram and nothing else; one ``callLater`` per link wakes up when
  the link could have gone idle, and re-arms itself for the remainder if
  there was activity since.  It is armed at first use (a TCP client
  connecting, a UDP datagram relayed either way); before that ``unused_ttl``
  applies.  ``timeout_ms == 0`` means never; ``unused_ttl <= 0`` too.
- Metrics: ``links_open``/``links_total`` at open/close; byte and datagram
  counts live in plain ints on the ``Link`` and are added to the Prometheus
  counters every ``flush_interval`` seconds and at close.
- Every open and close is logged with device, token prefix (6 characters,
  never the whole token), protocol, port and reason.
"""

from __future__ import annotations

import ipaddress
import random
import secrets
from datetime import datetime, timezone
from typing import Any, ClassVar

import attrs
from twisted.internet import defer, task
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from iotd import metrics
from iotd.relay.addresses import DevicePolicy, Network, literal
from iotd.relay.ctr import IV_SIZE, KEY_SIZE
from iotd.relay.tcp import TCPRelay
from iotd.relay.udp import UDPRelay

PROTOCOLS = ("tcp", "udp")
_TIMER_SLACK = 1e-6  # tolerate float rounding when the idle timer fires
RANDOM_TRIES = 16  # random port picks before the free ports are listed
_random = random.SystemRandom()


class NoFreePort(Exception):
    """No port in ``port_range`` could be bound, or ``max_links`` links are open."""


class TooManyLinks(NoFreePort):
    """``max_links`` links are open (a ``NoFreePort``, so callers may treat both alike)."""


class TenantLinkLimit(TooManyLinks):
    """The tenant holds ``max_links_per_tenant`` links already."""


class AddressNotAllowed(Exception):
    """The device address is outside the policy (``allowed_device_networks``)."""


@attrs.define(eq=False)
class Link:
    """One device link: what the REST layer shows, plus ``close``.

    ``bytes_up``/``datagrams_up`` count client -> device, ``*_down`` device ->
    client.  ``refused`` counts UDP datagrams from other senders than the
    link's client; ``dropped`` UDP datagrams that could not be delivered.
    """

    _log: ClassVar[Logger] = Logger()

    token: str = attrs.field(repr=lambda t: t[:6] + "...")  # logs show a prefix only
    tenant: str
    device: str
    protocol: str
    device_host: str
    device_port: int
    timeout_ms: int
    source: tuple[str, int] | None
    encrypted: bool
    created_at: float
    last_activity: float
    port: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    datagrams_up: int = 0
    datagrams_down: int = 0
    refused: int = 0
    dropped: int = 0
    used: bool = False
    closed: bool = False
    close_reason: str | None = None
    _manager: LinkManager | None = attrs.field(default=None, init=False, repr=False)
    _relay: Any = attrs.field(default=None, init=False, repr=False)
    _clock: Any = attrs.field(default=None, init=False, repr=False)
    _idle_call: Any = attrs.field(default=None, init=False, repr=False)
    _unused_call: Any = attrs.field(default=None, init=False, repr=False)
    _flushed: list[int] = attrs.field(factory=lambda: [0] * 6, init=False, repr=False)
    _shutdown: defer.Deferred[None] | None = attrs.field(default=None, init=False, repr=False)
    _waiters: list[defer.Deferred[None]] = attrs.field(factory=list, init=False, repr=False)

    # -- called by the relays ----------------------------------------------

    def mark_used(self) -> None:
        """A client connected, or the first datagram was relayed."""
        if self.used or self.closed:
            return
        self.used = True
        self.last_activity = self._clock.seconds()
        if self._unused_call is not None and self._unused_call.active():
            self._unused_call.cancel()
        self._unused_call = None
        if self.timeout_ms > 0:
            self._idle_call = self._clock.callLater(self.timeout_ms / 1000.0, self._idle_check)

    def close(self, reason: str = "closed", *, abort: bool = True) -> None:
        """Close both sockets at once and free the port.  Idempotent.

        ``abort=False`` is the TCP relay's orderly end: connections are closed
        without a reset once their queues are flushed.
        """
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        for call in (self._idle_call, self._unused_call):
            if call is not None and call.active():
                call.cancel()
        self._idle_call = self._unused_call = None
        shutdown = self._relay.shutdown(abort) if self._relay is not None else defer.succeed(None)
        shutdown.addErrback(self._shutdown_failed)
        self._shutdown = shutdown
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            _fire_after(shutdown, d)
        if self._manager is not None:
            self._manager._link_closed(self, reason)

    def _shutdown_failed(self, failure: Any) -> None:
        Link._log.failure(
            "link {token}: error while closing its sockets", failure, token=self.token[:6]
        )

    # -- queries ---------------------------------------------------------------

    def when_closed(self) -> defer.Deferred[None]:
        """A Deferred that fires once the link has closed and its sockets (listening one
        included) are closed; the port can be bound again then."""
        d: defer.Deferred[None] = defer.Deferred()
        if self._shutdown is None:
            self._waiters.append(d)
        else:
            _fire_after(self._shutdown, d)
        return d

    def buffered(self) -> int:
        """Bytes the relay holds in userspace write buffers (0 for UDP)."""
        return int(self._relay.buffered()) if self._relay is not None else 0

    def to_json(self) -> dict[str, Any]:
        """What ``GET /api/v1/devicelink`` shows: counters and times, no key material."""
        out: dict[str, Any] = {
            "token": self.token,
            "device": self.device,
            "protocol": self.protocol,
            "port": self.port,
            "devicePort": self.device_port,
            "timeout": self.timeout_ms,
            "source": (
                {"host": self.source[0], "port": self.source[1]} if self.source is not None else None
            ),
            "encrypted": self.encrypted,
            "createdAt": _iso(self.created_at),
            "lastActivity": _iso(self.last_activity),
            "bytesUp": self.bytes_up,
            "bytesDown": self.bytes_down,
        }
        if self.protocol == "udp":
            out.update(
                datagramsUp=self.datagrams_up,
                datagramsDown=self.datagrams_down,
                datagramsRefused=self.refused,
                datagramsDropped=self.dropped,
            )
        return out

    # -- timers and metrics ----------------------------------------------------

    def _idle_check(self) -> None:
        self._idle_call = None
        if self.closed:
            return
        timeout = self.timeout_ms / 1000.0
        idle = self._clock.seconds() - self.last_activity
        if idle >= timeout - _TIMER_SLACK:
            self.close("idle_timeout")
        else:
            self._idle_call = self._clock.callLater(timeout - idle, self._idle_check)

    def _unused_expired(self) -> None:
        self._unused_call = None
        if not self.used:
            self.close("unused")

    def _flush_metrics(self) -> None:
        now = (
            self.bytes_up,
            self.bytes_down,
            self.datagrams_up,
            self.datagrams_down,
            self.refused,
            self.dropped,
        )
        flushed = self._flushed
        if list(now) == flushed:
            return
        up, down, dgu, dgd, refused, dropped = (n - f for n, f in zip(now, flushed))
        proto = self.protocol
        if up:
            _BYTES[proto, "up"].inc(up)
        if down:
            _BYTES[proto, "down"].inc(down)
        if dgu:
            _DATAGRAMS["up"].inc(dgu)
        if dgd:
            _DATAGRAMS["down"].inc(dgd)
        if refused:
            metrics.link_failures.labels("refused_source").inc(refused)
        if dropped:
            metrics.link_failures.labels("udp_dropped").inc(dropped)
        self._flushed = list(now)


_BYTES = {(p, d): metrics.relayed_bytes.labels(p, d) for p in PROTOCOLS for d in ("up", "down")}
_DATAGRAMS = {d: metrics.relayed_datagrams.labels(d) for d in ("up", "down")}


def _fire_after(source: defer.Deferred[Any], d: defer.Deferred[None]) -> None:
    """Fire ``d`` (with None) when ``source`` fires, leaving ``source``'s result alone."""

    def fire(result: object) -> object:
        d.callback(None)
        return result

    source.addBoth(fire)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


def _normalise_source(source: tuple[str, int] | None) -> tuple[str, int] | None:
    if source is None:
        return None
    host, port = source
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(f"source host must be an IP address, got {host!r}") from None
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"source port out of range: {port!r}")
    return (host, int(port))


class LinkManager:
    """Opens and tracks the device links of all tenants.

    ``reactor`` provides the sockets (``IReactorTCP``, ``IReactorUDP``);
    ``clock`` (default: ``reactor``) provides time.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        interface: str = "127.0.0.1",
        port_range: tuple[int, int] = (40000, 40099),
        max_links: int = 100,
        connect_timeout: float = 10.0,
        unused_ttl: float = 60.0,
        *,
        device_networks: tuple[Network, ...] = (),
        max_links_per_tenant: int = 0,
        clock: Any = None,
        flush_interval: float = 10.0,
    ) -> None:
        lo, hi = port_range
        if not 1 <= lo <= hi <= 65535:
            raise ValueError(f"bad port_range {port_range!r}")
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.interface = interface
        self.port_range = (lo, hi)
        self.max_links = max_links
        self.max_links_per_tenant = max_links_per_tenant
        self.policy = DevicePolicy(device_networks)
        self.connect_timeout = connect_timeout
        self.unused_ttl = unused_ttl
        self.flush_interval = flush_interval
        self._links: dict[str, Link] = {}
        self._per_tenant: dict[str, int] = {}
        self._closing: set[Link] = set()
        self._ports: dict[str, set[int]] = {p: set() for p in PROTOCOLS}
        self._flusher: task.LoopingCall | None = None

    # -- the API the REST layer uses ---------------------------------------

    def open(
        self,
        *,
        tenant: str,
        device: str,
        protocol: str,
        device_host: str,
        device_port: int,
        timeout_ms: int = 0,
        source: tuple[str, int] | None = None,
        key: bytes | None = None,
        iv: bytes | None = None,
    ) -> Link:
        """Open a link and bind its port.

        Raises ``ValueError`` for bad arguments, ``AddressNotAllowed`` for a
        device address outside the policy, ``TooManyLinks`` (a ``NoFreePort``)
        when ``max_links`` links are open, ``TenantLinkLimit`` (a
        ``TooManyLinks``) when the tenant has ``max_links_per_tenant``, and
        ``NoFreePort`` when no port in ``port_range`` can be bound.
        """
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be 'tcp' or 'udp', got {protocol!r}")
        if not 1 <= device_port <= 65535:
            raise ValueError(f"device port out of range: {device_port!r}")
        if timeout_ms < 0:
            raise ValueError(f"timeout must be >= 0 ms, got {timeout_ms!r}")
        if (key is None) != (iv is None):
            raise ValueError("encryption needs both key and iv")
        if key is not None and (len(key) != KEY_SIZE or len(iv or b"") != IV_SIZE):
            raise ValueError(f"key must be {KEY_SIZE} bytes and iv {IV_SIZE} bytes")
        source = _normalise_source(source)
        self.check_device_host(device_host)
        if len(self._links) >= self.max_links:
            metrics.link_failures.labels("max_links").inc()
            raise TooManyLinks(f"{self.max_links} links are open, the most [devicelink] max_links allows")
        held = self._per_tenant.get(tenant, 0)
        if self.max_links_per_tenant and held >= self.max_links_per_tenant:
            metrics.link_failures.labels("max_links_per_tenant").inc()
            raise TenantLinkLimit(f"this tenant has {held} links open, the most "
                                  f"[devicelink] max_links_per_tenant ({self.max_links_per_tenant}) allows")

        now = self.clock.seconds()
        link = Link(
            token=secrets.token_urlsafe(24),
            tenant=tenant,
            device=device,
            protocol=protocol,
            device_host=device_host,
            device_port=device_port,
            timeout_ms=timeout_ms,
            source=source,
            encrypted=key is not None,
            created_at=now,
            last_activity=now,
        )
        relay: TCPRelay | UDPRelay
        if protocol == "tcp":
            relay = TCPRelay(
                link, self.reactor, self.clock, self.interface, self.connect_timeout, key, iv,
                self.policy,
            )
        else:
            relay = UDPRelay(link, self.reactor, self.clock, self.interface, key, iv)
        link.port = self._bind(relay, protocol)
        link._relay = relay
        link._clock = self.clock
        link._manager = self
        relay.start()

        self._links[link.token] = link
        self._per_tenant[tenant] = held + 1
        self._ports[protocol].add(link.port)
        if self.unused_ttl > 0:
            link._unused_call = self.clock.callLater(self.unused_ttl, link._unused_expired)
        metrics.links_open.labels(protocol).inc()
        metrics.links_total.labels(protocol).inc()
        self._start_flusher()
        self.log.info(
            "link {token} opened: {protocol} port {port} -> device {device} "
            "at {device_host}:{device_port} (tenant {tenant}, source {source}, "
            "encrypted {encrypted}, timeout {timeout_ms} ms)",
            token=link.token[:6],
            protocol=protocol,
            port=link.port,
            device=device,
            device_host=device_host,
            device_port=device_port,
            tenant=tenant,
            source=f"{source[0]}:{source[1]}" if source else "first client",
            encrypted=link.encrypted,
            timeout_ms=timeout_ms,
        )
        return link

    def check_device_host(self, host: str) -> None:
        """Raise ``AddressNotAllowed`` for an address literal outside the policy (names pass)."""
        address = literal(host)
        if address is not None and not self.policy.allows(address):
            metrics.link_failures.labels("refused_address").inc()
            raise AddressNotAllowed(f"device host {host} is {self.policy.rule()}")

    def get(self, token: str) -> Link | None:
        return self._links.get(token)

    def close(self, token: str, *, tenant: str | None = None, reason: str = "deleted") -> bool:
        """Close the link with ``token`` (only if it belongs to ``tenant``, when given)."""
        link = self._links.get(token)
        if link is None or (tenant is not None and link.tenant != tenant):
            return False
        link.close(reason)
        return True

    def links(self, tenant: str) -> list[Link]:
        """The open links of ``tenant``, oldest first."""
        return [link for link in self._links.values() if link.tenant == tenant]

    def close_device(self, tenant: str, device: str, *, reason: str = "device_removed") -> int:
        """Close every link of a device (identifiers compare case-insensitively)."""
        wanted = device.upper()
        doomed = [
            link
            for link in self._links.values()
            if link.tenant == tenant and link.device.upper() == wanted
        ]
        for link in doomed:
            link.close(reason)
        return len(doomed)

    def close_all(self, *, reason: str = "shutdown") -> defer.Deferred[None]:
        """Close every link; fires when all their ports are closed (service stop)."""
        for link in list(self._links.values()):
            link.close(reason)
        waits = [link.when_closed() for link in list(self._closing)]
        d = defer.gatherResults(waits, consumeErrors=True)
        d.addCallback(lambda _: None)
        return d

    def __len__(self) -> int:
        return len(self._links)

    # -- internals -------------------------------------------------------------

    def _bind(self, relay: TCPRelay | UDPRelay, protocol: str) -> int:
        """Bind a random free port of ``port_range``; see the module docstring."""
        lo, hi = self.port_range
        in_use = self._ports[protocol]
        tried: set[int] = set()
        for _ in range(RANDOM_TRIES):
            port = _random.randint(lo, hi)
            if port in in_use or port in tried:
                continue
            tried.add(port)
            if self._listen(relay, port):
                return port
        # Nearly full (or many ports held by other programs): draw from the rest.
        rest = [p for p in range(lo, hi + 1) if p not in in_use and p not in tried]
        while rest:
            index = _random.randrange(len(rest))
            rest[index], rest[-1] = rest[-1], rest[index]
            port = rest.pop()
            if self._listen(relay, port):
                return port
        metrics.link_failures.labels("no_free_port").inc()
        raise NoFreePort(f"no free {protocol} port in {lo}-{hi} on {self.interface}")

    @staticmethod
    def _listen(relay: TCPRelay | UDPRelay, port: int) -> bool:
        try:
            relay.listen(port)
        except CannotListenError:
            return False
        return True

    def _link_closed(self, link: Link, reason: str) -> None:
        if self._links.pop(link.token, None) is None:
            return
        held = self._per_tenant.pop(link.tenant, 1) - 1
        if held > 0:
            self._per_tenant[link.tenant] = held
        self._closing.add(link)
        link._flush_metrics()
        metrics.links_open.labels(link.protocol).dec()
        self.log.info(
            "link {token} closed: {protocol} port {port}, device {device}, reason {reason} "
            "(up {bytes_up} B, down {bytes_down} B)",
            token=link.token[:6],
            protocol=link.protocol,
            port=link.port,
            device=link.device,
            reason=reason,
            bytes_up=link.bytes_up,
            bytes_down=link.bytes_down,
        )

        def freed(_: object) -> None:
            self._closing.discard(link)
            self._ports[link.protocol].discard(link.port)

        link.when_closed().addCallback(freed)
        if not self._links:
            self._stop_flusher()

    def _flush_all(self) -> None:
        for link in self._links.values():
            link._flush_metrics()

    def _start_flusher(self) -> None:
        if self._flusher is None and self.flush_interval > 0:
            self._flusher = task.LoopingCall(self._flush_all)
            self._flusher.clock = self.clock
            self._flusher.start(self.flush_interval, now=False)

    def _stop_flusher(self) -> None:
        if self._flusher is not None:
            if self._flusher.running:
                self._flusher.stop()
            self._flusher = None
