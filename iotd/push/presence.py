"""Presence: which devices are online, from their polls and results.

Every poll and result updates the device's ``lastSeen`` and ``lastAddress``
in the registry's memory (flushed to the store every few seconds).  A
device becomes online on its first poll (after being unknown or offline)
and offline when no poll came for ``offline_after`` seconds; each
transition is one ``conn`` event (status 1 / status 2), appended through the
event log.

Devices sit in an ordered dict by last activity, oldest first, so the
offline check (run by :class:`iotd.push.sweeps.Sweeps` on the reactor
clock) only looks at the ones that expired.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

from twisted.internet import defer

from iotd.logs import Logger
from iotd.push.pending import Pending
from iotd.push.transactions import EPSILON
from iotd.timefmt import micros_of


class Presence:
    log = Logger()

    def __init__(self, registry: Any, events: Any, clock: Any, offline_after: float, pending: Pending):
        self._registry = registry
        self._events = events
        self._clock = clock
        self.offline_after = offline_after
        self._pending = pending
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()  # last activity, oldest first
        self.wake: Callable[[float], None] = lambda when: None  # the sweeps' offline timer

    # The life cycle of :class:`iotd.push.shared_presence.SharedPresence`: one node has nothing to
    # load, flush or lead (its offline check runs on the sweeps' timer).
    async def load(self) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def lead(self, leader: bool) -> None:
        pass

    def seen(self, device: Any, address: str | None) -> None:
        """A poll or result from ``device``: lastSeen/lastAddress, online, conn event."""
        now = self._clock.seconds()
        self._registry.touch(device, address, micros_of(now))
        key = (device.tenant, device.identifier)
        seen = self._seen
        if key in seen:
            seen.move_to_end(key)
        seen[key] = now
        if not device.online:
            device.online = True
            self._registry.mark(device)
            self.log.info("device {device} online from {address}", device=device.identifier, address=address)
            self._emit([(device.tenant, "conn", device.identifier, {"status": 1})], device)
        self.wake(now + self.offline_after)

    def forget(self, device: Any) -> None:
        self._seen.pop((device.tenant, device.identifier), None)

    def next_check(self) -> float | None:
        """When the device seen longest ago goes offline (None: nobody is online)."""
        if not self._seen:
            return None
        return next(iter(self._seen.values())) + self.offline_after

    def check(self) -> None:
        """Mark offline (one conn event each) every device silent for ``offline_after``."""
        now = self._clock.seconds()
        seen = self._seen
        gone: list[tuple[str, str, str, dict[str, Any]]] = []
        while seen:
            key, last = next(iter(seen.items()))
            if last + self.offline_after > now + EPSILON:
                break
            del seen[key]
            device = self._registry.get(key[0], key[1])
            if device is not None and device.online:
                device.online = False
                self._registry.mark(device)
                gone.append((device.tenant, "conn", device.identifier, {"status": 2}))
                self.log.info("device {device} offline: no poll for {seconds} s",
                              device=device.identifier, seconds=self.offline_after)
        if gone:
            self._emit(gone)

    def _emit(self, items: list[tuple[str, str, str, dict[str, Any]]], came_online: Any = None) -> None:
        d = self._pending.track(defer.Deferred.fromCoroutine(self._events.append(items)))
        d.addErrback(self._emit_failed, came_online)

    def _emit_failed(self, failure: Any, came_online: Any) -> None:
        self.log.warn("push: writing conn events failed: {error}", error=failure.getErrorMessage())
        if came_online is not None and came_online.online:
            came_online.online = False  # not stored: the device's next poll makes the event again
