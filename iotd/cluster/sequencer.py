"""Every node delivers every event of the cluster, once, in id order; holes are filled from the store.

Event ids are allocated in commit order cluster-wide with no holes (the
``event_seq`` counter row, :mod:`iotd.store.events`).  So a node knows it has
everything up to ``bus.published_id`` and that the next event is exactly
``published_id + 1``.  Events reach a node two ways:

- its own commits (:meth:`Sequencer.local`), which it also publishes on the
  channel (topic ``events``) for the other nodes -- the rows themselves, or
  only ``{"upto": id}`` when a batch is larger than :data:`MAX_MESSAGE_BYTES`;
- the other nodes' messages (:meth:`Sequencer.remote`).

An event whose predecessor has not arrived waits in a buffer (bounded by
:data:`MAX_PENDING_BYTES`; past it the buffer is dropped, its events are all
stored).  If the hole is still open after :data:`HOLE_GRACE` seconds (a
message lost, Redis restarted, a partition), the node reads ``WHERE id >
published_id`` from the store, page by page, and delivers what it reads --
the holes filled count ``iotd_event_holes_filled_total``.  An event whose id
was delivered already is dropped, so nothing is sent twice.

The last events of a burst have no successor to show a hole, so every
:data:`TAIL_CHECK` seconds the node reads the store's last id (one row) and
fills up to it; it does so at once whenever the channel (re)connects.  With
the bus down a node still delivers its own events in order, and the other
nodes' within about :data:`TAIL_CHECK` seconds, from the store.

Without a bus (one node) none of this runs: :class:`iotd.events.EventLog`
publishes its commits directly, as before.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import LoopingCall

from iotd import metrics
from iotd.events import Event
from iotd.logs import Logger
from iotd.store import events as evsql

TOPIC = "events"
HOLE_GRACE = 0.05  # seconds a hole may stay open before the store is read
TAIL_CHECK = 1.0  # seconds between two reads of the store's last event id
FILL_PAGE = 1000
MAX_MESSAGE_BYTES = 256 << 10  # a larger batch is announced by its last id only
MAX_PENDING_BYTES = 32 << 20


class Sequencer:
    log = Logger()

    def __init__(self, events: Any, channel: Any, clock: Any) -> None:
        self._events = events
        self._bus = events.bus
        self._store = events.store
        self._channel = channel
        self._clock = clock
        self._pending: dict[int, Event] = {}
        self._pending_bytes = 0
        self._known = 0  # the highest id known to exist (from messages, commits, the store)
        self._filling = False
        self._grace: Any = None
        self._tail = LoopingCall(self.check_tail)
        self._tail.clock = clock
        self.filled = 0
        channel.subscribe(TOPIC, self.remote)
        channel.on_up(self.check_tail)

    def start(self) -> None:
        if not self._tail.running:
            self._tail.start(TAIL_CHECK, now=True).addErrback(
                lambda f: self.log.failure("event tail check stopped", f))

    def stop(self) -> None:
        if self._tail.running:
            self._tail.stop()
        if self._grace is not None and self._grace.active():
            self._grace.cancel()

    # -- arrivals ----------------------------------------------------------------

    def local(self, rows: list[evsql.Row], events: list[Event]) -> None:
        """This node committed ``events`` (``rows`` as stored): tell the others, deliver in order."""
        channel = self._channel
        if channel.up:  # (while the bus is down the message would be dropped: not even encoded)
            text = channel.encode({"e": [list(r) for r in rows]})
            if len(text) > MAX_MESSAGE_BYTES:
                text = channel.encode({"upto": rows[-1][0]})
            channel.send(TOPIC, text)
        self.offer(events)

    def remote(self, node: str, message: dict[str, Any]) -> None:
        """Another node's commit: its events, or only the last id of a large batch."""
        rows = message.get("e")
        if isinstance(rows, list):
            try:
                events = [Event.from_row(tuple(r)) for r in rows if r[0] > self._bus.published_id]
            except (TypeError, IndexError, KeyError):
                self.log.warn("bus: dropped a malformed events message from {node}", node=node)
                return
            if events:
                self.offer(events)
            return
        upto = message.get("upto")
        if isinstance(upto, int) and upto > self._bus.published_id:
            self._known = max(self._known, upto)
            self._fill_soon(now=True)

    def offer(self, events: list[Event]) -> None:
        """Deliver what continues the sequence; keep the rest until its predecessors come."""
        bus = self._bus
        if not self._pending and events and events[0].id == bus.published_id + 1 and _contiguous(events):
            bus.publish(events)  # the common case: nothing missing
            self._known = max(self._known, events[-1].id)
            return
        pending = self._pending
        for event in events:
            if event.id > bus.published_id and event.id not in pending:
                pending[event.id] = event
                self._pending_bytes += event.size()
                self._known = max(self._known, event.id)
        self._drain()
        if pending:
            if self._pending_bytes > MAX_PENDING_BYTES:
                self.log.warn("event sequence: {n} events wait for a hole; dropped (the store has them)",
                              n=len(pending))
                pending.clear()
                self._pending_bytes = 0
            self._fill_soon()

    def _drain(self) -> None:
        pending, bus = self._pending, self._bus
        run: list[Event] = []
        next_id = bus.published_id + 1
        while next_id in pending:
            event = pending.pop(next_id)
            self._pending_bytes -= event.size()
            run.append(event)
            next_id += 1
        if run:
            bus.publish(run)
        if not pending:
            self._pending_bytes = 0

    # -- holes -------------------------------------------------------------------

    def _fill_soon(self, now: bool = False) -> None:
        if self._filling:
            return
        if now:
            if self._grace is not None and self._grace.active():
                self._grace.cancel()
            self._start_fill()
        elif self._grace is None or not self._grace.active():
            self._grace = self._clock.callLater(HOLE_GRACE, self._start_fill)

    def _start_fill(self) -> None:
        if self._filling:
            return
        if not self._pending and self._known <= self._bus.published_id:
            return
        self._filling = True
        d = defer.Deferred.fromCoroutine(self._fill())
        d.addErrback(self._fill_failed)

    def _fill_failed(self, failure: Any) -> None:
        self._filling = False
        self.log.warn("event sequence: reading a hole from the store failed: {error}",
                      error=failure.getErrorMessage())
        self._grace = self._clock.callLater(TAIL_CHECK, self._start_fill)

    async def _fill(self) -> None:
        bus = self._bus
        while self._pending or self._known > bus.published_id:
            rows = await self._store.read(evsql.read_all, bus.published_id, FILL_PAGE)
            fresh = [Event.from_row(r) for r in rows if r[0] > bus.published_id]
            if not fresh:
                # Nothing stored after published_id: what is pending lies beyond pruned ids, or the
                # announcement ran ahead of what this reader sees; deliver what continues.
                if self._pending:
                    first = min(self._pending)
                    if first > bus.published_id + 1:
                        bus.published_id = first - 1  # the ids between were pruned
                    self._drain()
                    continue
                break
            taken = 0
            for event in fresh:
                waiting = self._pending.pop(event.id, None)
                if waiting is not None:
                    self._pending_bytes -= waiting.size()
                else:
                    taken += 1
            if taken:
                self.filled += taken
                metrics.holes_filled.inc(taken)
            bus.publish(fresh)
            self._known = max(self._known, fresh[-1].id)
            self._drain()
        if not self._pending:
            self._pending_bytes = 0
        self._filling = False

    def check_tail(self) -> defer.Deferred:
        """Read the store's last event id; fill up to it if this node has not delivered it."""
        d = self._store.read(evsql.last_id)

        def seen(last: int) -> None:
            if last > self._bus.published_id:
                self._known = max(self._known, last)
                self._fill_soon(now=True)

        d.addCallbacks(seen, lambda f: self.log.debug("event tail check failed: {error}",
                                                      error=f.getErrorMessage()))
        return d


def _contiguous(events: list[Event]) -> bool:
    first = events[0].id
    return events[-1].id == first + len(events) - 1

