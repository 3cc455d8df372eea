"""Which devices have unfinished commands: all push keeps in memory, so an idle poll is a set lookup.

The store holds every command; this set only says "ask the store" for a
device.  It is

- built from the store at start (every queued or sent command);
- kept current by this node's own transactions: a command queued adds its
  device, a transaction that found the device without unfinished commands
  (it holds the device's row lock while it looks) removes it;
- refreshed from the store every :data:`REFRESH_EVERY` seconds by
  :class:`Refresher`, so work that another process queued on the same
  database reaches this node's idle polls without a bus.  A refresh only
  adds: a device it shows stale costs one poll that goes to the store and
  finds nothing (and removes it).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from twisted.internet import defer
from twisted.internet.task import LoopingCall

from iotd.logs import Logger
from iotd.push.pending import Pending
from iotd.store import commands as cmdsql

REFRESH_EVERY = 1.0  # seconds between two reads of which devices have work

Key = tuple[str, str]  # (tenant, device identifier)


class Work:
    """The set of ``(tenant, device)`` with at least one queued or sent command."""

    def __init__(self) -> None:
        self.devices: set[Key] = set()

    def __contains__(self, key: Key) -> bool:
        return key in self.devices

    def __len__(self) -> int:
        return len(self.devices)

    def add(self, key: Key) -> None:
        self.devices.add(key)

    def settled(self, key: Key, remaining: bool) -> None:
        """A transaction saw (under the device's lock) whether ``key`` has unfinished work."""
        if remaining:
            self.devices.add(key)
        else:
            self.devices.discard(key)

    def merge(self, keys: Iterable[Key]) -> None:
        self.devices.update(keys)


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

    def start(self) -> None:
        if self.every > 0 and not self._loop.running:
            self._loop.start(self.every, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def refresh(self) -> defer.Deferred:
        """One read now; fires when merged (never fails: a failed read is logged, the next one comes)."""
        d = self._store.read(cmdsql.unfinished)
        d.addCallbacks(self._merge, self._failed)
        return self._pending.track(d)

    def _merge(self, rows: list[tuple[int, str, str, str]]) -> None:
        self._work.merge((tenant, device) for _, tenant, device, _ in rows)
        self._on_rows(rows)

    def _failed(self, failure: Any) -> None:
        self.log.warn("push: reading which devices have work failed: {error}", error=failure.getErrorMessage())
