"""One device link: what the REST layer shows, its counters, its timers and its close.

The relays (:mod:`iotd.relay.tcp`, :mod:`iotd.relay.udp`) report traffic
through :meth:`Link.relayed_up` / :meth:`Link.relayed_down` (TCP chunks) and
:meth:`Link.datagram_up` / :meth:`Link.datagram_down` /
:meth:`Link.datagram_refused` / :meth:`Link.datagram_dropped` (UDP); the
counters themselves are read-only.  Whoever keeps track of links (the
:class:`~iotd.relay.links.LinkManager`) subscribes with
:meth:`Link.on_closed`; the link calls nobody else.

- The idle timer is lazy: the relays stamp ``last_activity`` on every chunk
  or datagram and nothing else; one ``callLater`` per link wakes up when the
  link could have gone idle, and re-arms itself for the remainder if there
  was activity since.  It is armed at first use (a TCP client connecting, a
  UDP datagram relayed either way); before that ``unused_ttl`` applies
  (:meth:`Link.start`).  ``timeout_ms == 0`` means never; ``unused_ttl <= 0``
  too.
- Metrics: byte and datagram counts live in plain ints on the ``Link`` and
  are added to the Prometheus counters by :meth:`Link.flush_metrics` (the
  manager calls it every ``flush_interval`` seconds and at close).
- Lifetime: ``max_duration_ms > 0`` closes the link (reason ``max_duration``)
  that long after its creation, in use or not; ``expires_at`` is then set.
- Rate limit: ``rate_limit`` (bytes/s per direction, 0 = none) is applied by
  the relays (:mod:`iotd.relay.bucket`); UDP datagrams over it are dropped and
  counted (:meth:`Link.datagram_rate_dropped`, ``rate_limited`` in
  ``iotd_link_failures_total``).
"""

from __future__ import annotations

from datetime import datetime, timezone
from operator import attrgetter
from typing import Any, Callable, ClassVar

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from iotd import metrics

PROTOCOLS = ("tcp", "udp")
_TIMER_SLACK = 1e-6  # tolerate float rounding when the idle timer fires


@attrs.define(eq=False)
class Link:
    """One device link.

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
    clock: Any = attrs.field(repr=False)
    created_at: float = attrs.field(init=False)
    _last_activity: float = attrs.field(init=False)
    port: int = 0
    max_duration_ms: int = 0
    rate_limit: int = 0
    _bytes_up: int = attrs.field(default=0, init=False)
    _bytes_down: int = attrs.field(default=0, init=False)
    _datagrams_up: int = attrs.field(default=0, init=False)
    _datagrams_down: int = attrs.field(default=0, init=False)
    _refused: int = attrs.field(default=0, init=False)
    _dropped: int = attrs.field(default=0, init=False)
    _rate_dropped: int = attrs.field(default=0, init=False)
    used: bool = attrs.field(default=False, init=False)
    closed: bool = attrs.field(default=False, init=False)
    close_reason: str | None = attrs.field(default=None, init=False)
    _relay: Any = attrs.field(default=None, init=False, repr=False)
    _idle_call: Any = attrs.field(default=None, init=False, repr=False)
    _unused_call: Any = attrs.field(default=None, init=False, repr=False)
    _expiry_call: Any = attrs.field(default=None, init=False, repr=False)
    _flushed: list[int] = attrs.field(factory=lambda: [0] * 7, init=False, repr=False)
    _shutdown: defer.Deferred[None] | None = attrs.field(default=None, init=False, repr=False)
    _waiters: list[defer.Deferred[None]] = attrs.field(factory=list, init=False, repr=False)
    _closed_callbacks: list[Callable[[Link, str], None]] = attrs.field(factory=list, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self.created_at = self._last_activity = self.clock.seconds()

    # -- read-only counters ------------------------------------------------

    bytes_up = property(attrgetter("_bytes_up"))
    bytes_down = property(attrgetter("_bytes_down"))
    datagrams_up = property(attrgetter("_datagrams_up"))
    datagrams_down = property(attrgetter("_datagrams_down"))
    refused = property(attrgetter("_refused"))
    dropped = property(attrgetter("_dropped"))
    rate_dropped = property(attrgetter("_rate_dropped"))
    last_activity = property(attrgetter("_last_activity"))

    # -- set up by the manager ---------------------------------------------

    def attach(self, relay: Any, port: int) -> None:
        """The relay that owns this link's sockets, bound to ``port``."""
        self._relay, self.port = relay, port

    @property
    def relay(self) -> Any:
        """The relay that owns this link's sockets (a TCP link's takes a websocket client)."""
        return self._relay

    def start(self, unused_ttl: float) -> None:
        """Arm the ``unused_ttl`` timer (closes the link unless it is used by then)."""
        if unused_ttl > 0:
            self._unused_call = self.clock.callLater(unused_ttl, self._unused_expired)
        if self.max_duration_ms > 0:
            self._expiry_call = self.clock.callLater(self.max_duration_ms / 1000.0, self.close, "max_duration")

    @property
    def expires_at(self) -> float | None:
        """When ``max_duration_ms`` closes the link (clock seconds), or None."""
        return self.created_at + self.max_duration_ms / 1000.0 if self.max_duration_ms > 0 else None

    def on_closed(self, callback: Callable[[Link, str], None]) -> None:
        """``callback(link, reason)`` runs once, when the link closes."""
        self._closed_callbacks.append(callback)

    # -- called by the relays (the hot path) -------------------------------

    def relayed_up(self, n: int) -> None:
        """``n`` bytes went client -> device."""
        self._bytes_up += n
        self._last_activity = self.clock.seconds()

    def relayed_down(self, n: int) -> None:
        """``n`` bytes went device -> client."""
        self._bytes_down += n
        self._last_activity = self.clock.seconds()

    def datagram_up(self, n: int) -> None:
        """A datagram of ``n`` bytes went client -> device."""
        self._datagrams_up += 1
        self.relayed_up(n)
        if not self.used:
            self.mark_used()

    def datagram_down(self, n: int) -> None:
        """A datagram of ``n`` bytes went device -> client."""
        self._datagrams_down += 1
        self.relayed_down(n)
        if not self.used:
            self.mark_used()

    def datagram_refused(self) -> None:
        """A datagram from another sender than the link's client was dropped."""
        self._refused += 1

    def datagram_dropped(self) -> None:
        """A datagram could not be delivered (no client yet, kernel refused, ICMP)."""
        self._dropped += 1

    def datagram_rate_dropped(self) -> None:
        """A datagram over the link's ``rate_limit`` was dropped."""
        self._rate_dropped += 1

    def touch(self) -> None:
        """Activity without bytes (the device connection is up)."""
        self._last_activity = self.clock.seconds()

    def mark_used(self) -> None:
        """A client connected, or the first datagram was relayed."""
        if self.used or self.closed:
            return
        self.used = True
        self._last_activity = self.clock.seconds()
        if self._unused_call is not None and self._unused_call.active():
            self._unused_call.cancel()
        self._unused_call = None
        if self.timeout_ms > 0:
            self._idle_call = self.clock.callLater(self.timeout_ms / 1000.0, self._idle_check)

    def close(self, reason: str = "closed", *, abort: bool = True) -> None:
        """Close both sockets at once and free the port.  Idempotent.

        ``abort=False`` is the TCP relay's orderly end: connections are closed
        without a reset once their queues are flushed.
        """
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        for call in (self._idle_call, self._unused_call, self._expiry_call):
            if call is not None and call.active():
                call.cancel()
        self._idle_call = self._unused_call = self._expiry_call = None
        shutdown = self._relay.shutdown(abort) if self._relay is not None else defer.succeed(None)
        shutdown.addErrback(self._shutdown_failed)
        self._shutdown = shutdown
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            _fire_after(shutdown, d)
        callbacks, self._closed_callbacks = self._closed_callbacks, []
        for callback in callbacks:
            callback(self, reason)

    def _shutdown_failed(self, failure: Any) -> None:
        Link._log.failure("link {token}: error while closing its sockets", failure, token=self.token[:6])

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
            "source": {"host": self.source[0], "port": self.source[1]} if self.source is not None else None,
            "encrypted": self.encrypted,
            "createdAt": _iso(self.created_at),
            "lastActivity": _iso(self._last_activity),
            "bytesUp": self._bytes_up,
            "bytesDown": self._bytes_down,
        }
        if self.max_duration_ms > 0:
            out.update(maxDuration=self.max_duration_ms, expiresAt=_iso(self.expires_at or 0.0))
        if self.rate_limit > 0:
            out["rateLimit"] = self.rate_limit
        if self.protocol == "udp":
            out.update(datagramsUp=self._datagrams_up, datagramsDown=self._datagrams_down,
                       datagramsRefused=self._refused, datagramsDropped=self._dropped,
                       datagramsRateDropped=self._rate_dropped)
        return out

    # -- timers and metrics ----------------------------------------------------

    def _idle_check(self) -> None:
        self._idle_call = None
        if self.closed:
            return
        timeout = self.timeout_ms / 1000.0
        idle = self.clock.seconds() - self._last_activity
        if idle >= timeout - _TIMER_SLACK:
            self.close("idle_timeout")
        else:
            self._idle_call = self.clock.callLater(timeout - idle, self._idle_check)

    def _unused_expired(self) -> None:
        self._unused_call = None
        if not self.used:
            self.close("unused")

    def flush_metrics(self) -> None:
        """Add what was counted since the last flush to the Prometheus counters."""
        now = [self._bytes_up, self._bytes_down, self._datagrams_up, self._datagrams_down,
               self._refused, self._dropped, self._rate_dropped]
        flushed = self._flushed
        if now == flushed:
            return
        up, down, dgu, dgd, refused, dropped, rate_dropped = (n - f for n, f in zip(now, flushed))
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
        if rate_dropped:
            metrics.link_failures.labels("rate_limited").inc(rate_dropped)
        self._flushed = now


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
        "+00:00", "Z")
