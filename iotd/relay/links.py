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
- ``max_duration_ms`` and ``rate_limit`` are the link's (:class:`~iotd.relay.link.Link`
  arms the lifetime timer; the relays apply the rate).
- ``max_links`` caps all links, ``max_links_per_tenant`` (0 = no cap) one
  tenant's; both are counted in O(1).
- Time comes only from the injected clock (``clock``, by default the
  reactor): ``created_at``, ``last_activity``, the idle timeout, the
  ``unused_ttl`` timer, the TCP connect timeout and the metrics flush.  The
  timers and counters themselves are the :class:`~iotd.relay.link.Link`'s.
- The manager learns of a close through :meth:`Link.on_closed
  <iotd.relay.link.Link.on_closed>` (it frees the port, the tenant's slot and
  flushes the link's metrics).  Others learn of an open through
  :meth:`LinkManager.on_opened` (and subscribe to the link's close there):
  :mod:`iotd.relay.rows` writes the link's row in the store that way.
- Metrics: ``links_open``/``links_total`` at open/close; the links' byte and
  datagram counts are flushed to Prometheus every ``flush_interval`` seconds
  and at close.
- Every open and close is logged with device, token prefix (6 characters,
  never the whole token), protocol, port and reason.
"""

from __future__ import annotations

import ipaddress
import random
import secrets
from typing import Any, Callable

from twisted.internet import defer, task
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from iotd import metrics
from iotd.relay.addresses import DevicePolicy, Network, literal
from iotd.relay.ctr import IV_SIZE, KEY_SIZE
from iotd.relay.link import PROTOCOLS, Link
from iotd.relay.tcp import TCPRelay
from iotd.relay.udp import UDPRelay

__all__ = ["AddressNotAllowed", "Link", "LinkManager", "NoFreePort", "TenantLinkLimit", "TooManyLinks"]
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
        splice: bool = True,
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
        self.splice = splice  # [devicelink] splice: plain TCP links relayed in the kernel where possible
        self.unused_ttl = unused_ttl
        self.flush_interval = flush_interval
        self._links: dict[str, Link] = {}
        self._per_tenant: dict[str, int] = {}
        self._closing: set[Link] = set()
        self._ports: dict[str, set[int]] = {p: set() for p in PROTOCOLS}
        self._flusher: task.LoopingCall | None = None
        self._opened: list[Callable[[Link], None]] = []

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
        max_duration_ms: int = 0,
        rate_limit: int = 0,
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
        if max_duration_ms < 0:
            raise ValueError(f"maxDuration must be >= 0 ms, got {max_duration_ms!r}")
        if rate_limit < 0:
            raise ValueError(f"rateLimit must be >= 0 bytes/s, got {rate_limit!r}")
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
            clock=self.clock,
            max_duration_ms=max_duration_ms,
            rate_limit=rate_limit,
        )
        relay: TCPRelay | UDPRelay
        if protocol == "tcp":
            relay = TCPRelay(link, self.reactor, self.interface, key, iv,
                             connect_timeout=self.connect_timeout, policy=self.policy, splice=self.splice)
        else:
            relay = UDPRelay(link, self.reactor, self.interface, key, iv)
        link.attach(relay, self._bind(relay, protocol))
        relay.start()

        self._links[link.token] = link
        self._per_tenant[tenant] = held + 1
        self._ports[protocol].add(link.port)
        link.on_closed(self._link_closed)
        link.start(self.unused_ttl)
        metrics.links_open.labels(protocol).inc()
        metrics.links_total.labels(protocol).inc()
        self._start_flusher()
        self.log.info(
            "link {token} opened: {protocol} port {port} -> device {device} "
            "at {device_host}:{device_port} (tenant {tenant}, source {source}, "
            "encrypted {encrypted}, timeout {timeout_ms} ms, max duration {max_duration_ms} ms, "
            "rate limit {rate_limit} B/s)",
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
            max_duration_ms=max_duration_ms,
            rate_limit=rate_limit,
        )
        for callback in tuple(self._opened):
            try:
                callback(link)
            except Exception:
                self.log.failure("link {token}: an open listener failed", token=link.token[:6])
        return link

    def on_opened(self, callback: Callable[[Link], None]) -> None:
        """``callback(link)`` after each link opened (its port bound, before ``open`` returns)."""
        self._opened.append(callback)

    def all_links(self) -> list[Link]:
        """Every open link, oldest first."""
        return list(self._links.values())

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
        link.flush_metrics()
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
            link.flush_metrics()

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
