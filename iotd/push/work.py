"""Which devices have unfinished commands: all push keeps in memory, so an idle poll is a set lookup.

The store holds every command; this set only says "ask the store" for a
device.  It is

- built from the store at start (every queued or sent command);
- kept current by this node's own transactions: a command queued adds its
  device, a transaction that found the device without unfinished commands
  (it holds the device's row lock while it looks) removes it;
- told by the other nodes (``push`` topic on the bus) of work they queued;
- refreshed from the store every :data:`REFRESH_EVERY` seconds by
  :class:`Refresher` -- the backstop for a lost bus message, and for
  processes sharing a database without a bus.  A refresh only adds, and it
  reads only what is new: the unfinished commands with an id above a mark
  taken :data:`LAG` seconds earlier (ids may commit out of order, so the mark
  trails), so its cost is the commands queued lately, not every unfinished
  one.  (Commands are born queued and never become unfinished again, so work
  older than the mark is known already.)  A device it shows stale costs one
  poll that goes to the store and finds nothing (and removes it).
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterable

from twisted.internet import defer
from twisted.internet.task import LoopingCall

from iotd.logs import Logger
from iotd.push.pending import Pending
from iotd.store import commands as cmdsql

REFRESH_EVERY = 1.0  # seconds between two reads of which devices have work
LAG = 10.0  # seconds a refresh mark trails (a transaction that took an id commits within it)

Key = tuple[str, str]  # (tenant, device identifier)


class Work:
    """The set of ``(tenant, device)`` with at least one queued or sent command."""

    def __init__(self) -> None:
        self.devices: set[Key] = set()
        # Each add is stamped: a transaction that began before the last add of its device
        # (another node queued meanwhile, the bus told us) must not remove it.
        self.stamp = 0
        self._added: dict[Key, int] = {}
        # fn(key) after each add: the MQTT transport sends the device's command (iotd.mqtt.commands)
        self.listeners: list[Callable[[Key], None]] = []

    def __contains__(self, key: Key) -> bool:
        return key in self.devices

    def __len__(self) -> int:
        return len(self.devices)

    def add(self, key: Key) -> None:
        self.stamp += 1
        self.devices.add(key)
        self._added[key] = self.stamp
        for listener in self.listeners:
            listener(key)

    def settled(self, key: Key, remaining: bool, since: int | None = None) -> None:
        """A transaction saw (under the device's lock) whether ``key`` has unfinished work.

        ``since``: :attr:`stamp` when the transaction began; work added after it
        (queued on another node, after the transaction looked) is kept."""
        if remaining:
            self.devices.add(key)
        elif since is None or self._added.get(key, 0) <= since:
            self.devices.discard(key)
            self._added.pop(key, None)

    def merge(self, keys: Iterable[Key]) -> None:
        for key in keys:
            self.add(key)


class Refresher:
    """Every ``every`` seconds on ``clock``: read the unfinished commands, merge, tell ``on_rows``."""

    log = Logger()

    def __init__(self, store: Any, clock: Any, work: Work, pending: Pending,
                 on_rows: Callable[[list[tuple[int, str, str, str]]], None], every: float = REFRESH_EVERY):
        self._store = store
        self._work = work
        self._pending = pending
        self._on_rows = on_rows
        self.every = every
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = clock
        self._clock = clock
        self._after = 0  # the refresh reads unfinished commands with id above this
        self._marks: collections.deque[tuple[float, int]] = collections.deque()  # (when, highest id)

    def start(self) -> None:
        if self.every > 0 and not self._loop.running:
            self._loop.start(self.every, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def refresh(self) -> defer.Deferred:
        """One read now; fires when merged (never fails: a failed read is logged, the next one comes)."""
        d = self._store.read(cmdsql.unfinished_since, self._after)
        d.addCallbacks(self._merge, self._failed)
        return self._pending.track(d)

    def _merge(self, value: tuple[list[tuple[int, str, str, str]], int]) -> None:
        rows, top = value
        self._work.merge((tenant, device) for _, tenant, device, _ in rows)
        now = self._clock.seconds()
        marks = self._marks
        marks.append((now, top))
        while len(marks) > 1 and marks[1][0] <= now - LAG:
            marks.popleft()
        if marks[0][0] <= now - LAG:
            self._after = max(self._after, marks[0][1])
        self._on_rows(rows)

    def _failed(self, failure: Any) -> None:
        self.log.warn("push: reading which devices have work failed: {error}", error=failure.getErrorMessage())
