"""The event log and the live bus.

Everything that happens to a device is one :class:`Event` in one log.
:meth:`EventLog.append` commits events (group commit), then publishes them
on the :class:`Bus` in id order, then answers the caller: an acknowledged
event is stored, and every live subscriber saw it before the ack.

Subscribers that need history use the *no-gap* recipe, which
:meth:`EventLog.follow` packages: subscribe first (buffering live events),
read stored events, then drain the buffer skipping ids already sent.
Publication happens in the reactor thread in commit order, so this has no
gap and no duplicate.

The follower's buffer is bounded in bytes (:meth:`Event.size`): past its
budget it is dropped — everything in it is stored, so the pages read after
it bring those events back — and buffering starts afresh.  A page that comes
back empty while a drop happened during its read is read again, so the
switch to live never skips an event committed during that read.

With several nodes (``[cluster] bus``), :mod:`iotd.cluster.sequencer` sits
between the commits and the bus: every node's events reach every node's
bus in id order, and an acknowledged event is stored but may reach the
sockets a moment after the acknowledgement (the follower's wait for
``published_id`` keeps the replay→live seam exact).
"""

from __future__ import annotations

import heapq
import json
from typing import Any, Callable, Iterable

import attrs
from twisted.internet import defer

from iotd import metrics
from iotd.logs import Logger
from iotd.store import events as evsql
from iotd.timefmt import iso

KINDS = ("packet", "reading", "ota", "action", "conn")
EVENT_OVERHEAD = 256  # bytes an event costs besides its data (objects, dict slots)


def approx_size(data: dict[str, Any]) -> int:
    """A fair estimate of ``data``'s serialized size: strings by length (they dominate),
    other values serialized (small, or as large as they are)."""
    size = 2
    for name, value in data.items():
        size += len(name) + 4
        if isinstance(value, str):
            size += len(value)
        elif value is None or isinstance(value, (bool, int, float)):
            size += 8
        else:
            try:
                size += len(json.dumps(value, separators=(",", ":"), ensure_ascii=False))
            except (ValueError, TypeError, RecursionError):
                size += 1 << 20
    return size


@attrs.define(eq=False, slots=True)
class Event:
    id: int
    tenant: str
    kind: str
    device: str
    inserted_us: int
    data: dict[str, Any]
    _body: dict[str, Any] | None = None
    cache: dict[str, Any] = attrs.Factory(dict)  # per-event serializations shared by all sockets
    _size: int = attrs.field(default=-1, init=False, repr=False)

    @property
    def inserted_at(self) -> str:
        return iso(self.inserted_us)

    def body(self) -> dict[str, Any]:
        """The event as the REST API and the event sockets show it."""
        if self._body is None:
            body = {"id": self.id, "device_id": self.device, "inserted_at": self.inserted_at}
            body.update(self.data)
            self._body = body
        return self._body

    def size(self) -> int:
        """About how many bytes this event's data holds (computed once; see :func:`approx_size`)."""
        if self._size < 0:
            self._size = EVENT_OVERHEAD + approx_size(self.data)
        return self._size

    def lean(self) -> "Event":
        """The same event without its per-socket serializations (to keep it for long)."""
        copy = Event(id=self.id, tenant=self.tenant, kind=self.kind, device=self.device,
                     inserted_us=self.inserted_us, data=self.data)
        copy._size = self._size
        return copy

    def encoded(self, key: str, make: Callable[["Event"], bytes]) -> bytes:
        """``make(self)`` computed once per event for all sockets that share ``key``."""
        value = self.cache.get(key)
        if value is None:
            value = self.cache[key] = make(self)
        return value

    @classmethod
    def from_row(cls, row: evsql.Row) -> "Event":
        return cls(id=row[0], tenant=row[1], kind=row[2], device=row[3], inserted_us=row[4], data=row[5])


Listener = Callable[[Event], None]


class Subscription:
    def __init__(self, bus: "Bus", tenant: str | None, kinds: frozenset[str] | None, deliver: Listener):
        self.bus, self.tenant, self.kinds, self.deliver = bus, tenant, kinds, deliver

    def cancel(self) -> None:
        self.bus._remove(self)


class Bus:
    """In-process live bus: ``deliver(event)`` for each matching subscriber.

    Subscriptions are indexed by tenant so an event costs only the
    subscribers of its tenant; per-socket filtering is the job's (a job
    should subscribe once and index its own sockets).
    """

    log = Logger()

    def __init__(self) -> None:
        self._by_tenant: dict[str | None, list[Subscription]] = {}
        # The highest event id published so far.  Events are published in id order, so every
        # event up to it has been delivered.  A reader thread can see a commit before the
        # reactor has published it; a replay uses this to wait for the bus to catch up.
        self.published_id = 0
        self._waiting: list[tuple[int, int, defer.Deferred]] = []  # heap of (id, seq, waiter)
        self._seq = 0

    def published(self, event_id: int) -> defer.Deferred:
        """Fires once every event up to ``event_id`` has been published."""
        if event_id <= self.published_id:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._seq += 1
        heapq.heappush(self._waiting, (event_id, self._seq, d))
        return d

    def subscribe(self, deliver: Listener, tenant: str | None = None,
                  kinds: Iterable[str] | None = None) -> Subscription:
        sub = Subscription(self, tenant, frozenset(kinds) if kinds is not None else None, deliver)
        self._by_tenant.setdefault(tenant, []).append(sub)
        return sub

    def _remove(self, sub: Subscription) -> None:
        subs = self._by_tenant.get(sub.tenant)
        if subs and sub in subs:
            subs.remove(sub)

    def publish(self, events: list[Event]) -> None:
        for event in events:
            metrics.events_published_kind(event.kind).inc()
            for tenant in (event.tenant, None):
                for sub in tuple(self._by_tenant.get(tenant, ())):
                    if sub.kinds is None or event.kind in sub.kinds:
                        try:
                            sub.deliver(event)
                        except Exception:
                            self.log.failure("event subscriber failed on event {id}", id=event.id)
        if events and events[-1].id > self.published_id:
            self.published_id = events[-1].id
            waiting = self._waiting
            while waiting and waiting[0][0] <= self.published_id:
                heapq.heappop(waiting)[2].callback(None)


class Follower:
    """Replay-then-live for one consumer: see :meth:`EventLog.follow`."""

    def __init__(self, log: "EventLog", tenant: str, kinds: Iterable[str], after_id: int,
                 deliver: Listener, devices: Callable[[], Iterable[str] | None] | None = None,
                 page: int = 500, max_bytes: int = 1 << 20):
        self._log = log
        self.tenant = tenant
        self.kinds = tuple(kinds)
        self.last_id = after_id
        self._deliver = deliver
        self._devices = devices
        self._page = page
        self.max_bytes = max_bytes
        self._buffer: list[Event] | None = []
        self.buffered_bytes = 0
        self.drops = 0  # how often the buffer passed max_bytes and was dropped
        self._sub = log.bus.subscribe(self._live, tenant=tenant, kinds=self.kinds)

    def _live(self, event: Event) -> None:
        buffer = self._buffer
        if buffer is not None:
            if event.id <= self.last_id:
                return  # a page already brought it
            buffer.append(event)
            self.buffered_bytes += event.size()
            if self.buffered_bytes > self.max_bytes:
                # all of it is stored: the coming pages read it again
                buffer.clear()
                self.buffered_bytes = 0
                self.drops += 1
        elif event.id > self.last_id:
            self.last_id = event.id
            self._deliver(event)

    async def replay_page(self) -> list[Event]:
        """The next page of stored events after ``last_id`` (empty when caught up).

        The caller sends them (at its own pace) and calls again; when it gets
        an empty page it calls :meth:`go_live` (in the same reactor turn).
        """
        while True:
            drops = self.drops
            devices = self._devices() if self._devices is not None else None
            events = await self._log.read(self.tenant, self.kinds, self.last_id, self._page, devices)
            if events:
                self.last_id = events[-1].id
                self._trim()
                return events
            if self._log.bus.published_id < self.last_id:
                # The store showed events the bus has not published yet (the reader saw the
                # commit first): going live now would deliver them twice.  Wait for the bus.
                await self._log.bus.published(self.last_id)
                continue
            if self.drops == drops or self._buffer is None:
                return events
            # the buffer was dropped while we read: what it held may be newer than the read

    def _trim(self) -> None:
        """Forget buffered events that a page has brought."""
        buffer = self._buffer
        if buffer and buffer[0].id <= self.last_id:
            keep = [e for e in buffer if e.id > self.last_id]
            self._buffer = keep
            self.buffered_bytes = sum(e.size() for e in keep)

    def go_live(self) -> None:
        """Send what arrived during the replay (skipping what replay sent), then live."""
        buffered, self._buffer = self._buffer or [], None
        self.buffered_bytes = 0
        for event in buffered:
            if event.id > self.last_id:
                self.last_id = event.id
                self._deliver(event)

    def cancel(self) -> None:
        self._sub.cancel()
        self._buffer = None
        self.buffered_bytes = 0


class EventLog:
    log = Logger()

    def __init__(self, store: Any, bus: Bus | None = None):
        self.store = store
        self.bus = bus if bus is not None else Bus()
        # With a bus between nodes (iotd.cluster.sequencer): commits go through it, in id order
        # with the other nodes' events; None on one node (published at once).
        self.sequencer: Any = None

    async def append(self, items: list[tuple[str, str, str, dict[str, Any]]], size: int = 0) -> list[Event]:
        """Commit ``(tenant, kind, device, data)`` items as one transaction, publish, return.

        ``size``: about how many bytes the items hold (the request body), for the
        store's bound on queued writes."""
        d = self.store.write(evsql.insert, items, size=size)
        d.addCallback(self.committed)
        return await d

    def transact(self, fn: Callable[..., tuple[Any, list]], *args: Any, size: int = 0) -> defer.Deferred:
        """One store write that changes a job's own tables and appends the events of that change.

        ``fn(conn, *args)`` returns ``(result, items)``; ``items`` (``(tenant, kind,
        device, data)``, possibly none) are inserted in the same transaction, so the
        change and its events commit together or not at all.  After the commit the
        events are published on the bus (in commit order, as :meth:`append`
        does); the Deferred fires with ``(result, events)``.  For jobs whose
        changes are events too (push: a command's send and finish)."""
        d = self.store.write(_transact, fn, args, size=size)
        d.addCallback(self._transacted)
        return d

    def _transacted(self, value: tuple[Any, list[evsql.Row]]) -> tuple[Any, list[Event]]:
        result, rows = value
        if not rows:
            return result, []
        return result, self.committed(rows)

    def committed(self, rows: list[evsql.Row]) -> list[Event]:
        """Publish rows that ``evsql.insert`` wrote inside a transaction that has now committed."""
        events = [Event.from_row(r) for r in rows]
        if self.sequencer is not None:
            self.sequencer.local(rows, events)
        else:
            self.bus.publish(events)
        return events

    async def read(self, tenant: str, kinds: Iterable[str], after_id: int, limit: int,
                   devices: Iterable[str] | None = None) -> list[Event]:
        rows = await self.store.read(evsql.read, tenant, list(kinds), after_id, limit,
                                     list(devices) if devices is not None else None)
        return [Event.from_row(r) for r in rows]

    async def start(self) -> None:
        """Know the highest stored id: everything stored before this start counts as published."""
        last = await self.store.read(evsql.last_id)
        self.bus.published_id = max(self.bus.published_id, last)

    async def id_at(self, micros: int) -> int:
        """The id to resume after for "events strictly later than ``micros``"."""
        return await self.store.read(evsql.last_id_at_or_before, micros)

    def follow(self, tenant: str, kinds: Iterable[str], after_id: int, deliver: Listener,
               devices: Callable[[], Iterable[str] | None] | None = None, page: int = 500,
               max_bytes: int = 1 << 20) -> Follower:
        """Start following: live events buffer (up to ``max_bytes``) while the caller pages
        through history."""
        return Follower(self, tenant, kinds, after_id, deliver, devices, page, max_bytes)

    async def prune(self, before_us: int) -> int:
        return await self.store.write(evsql.prune, before_us)


def _transact(conn: Any, fn: Callable[..., tuple[Any, list]], args: tuple) -> tuple[Any, list[evsql.Row]]:
    """(store writer) ``fn``'s change and the insert of its events, in one transaction."""
    result, items = fn(conn, *args)
    return result, (evsql.insert(conn, items) if items else [])


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
