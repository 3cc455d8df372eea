"""Presence shared by several nodes (``[cluster] bus``): one ``conn`` event per transition cluster-wide.

A device may poll any node, so no node's memory knows when it last polled.
The store's ``presence`` table does (:mod:`iotd.store.presence`):

- **online**: a poll of a device this node believes offline runs one checked
  transaction (``come_online``) that changes the row only if it was
  offline, with its ``conn`` event (status 1) -- two nodes racing for the
  same device make one event;
- **seen**: every :data:`SEEN_FLUSH` seconds a node writes (one batched
  write) the latest poll time of the devices it saw -- but a device's time
  only when the one it wrote last is older than ``refresh`` =
  ``offline_after / REFRESH_FRACTION`` (at least ``SEEN_FLUSH``): a device
  polling every second costs one row write every 9 s by default, not every
  second (the bench's 10,000 devices were 10,000 row writes a second);
- **offline**: the leader (only) runs ``go_offline`` every
  :data:`OFFLINE_CHECK` seconds: devices online and not seen for
  ``offline_after + refresh + SEEN_FLUSH`` (the stored time may be that much
  older than the last poll) become offline, each with its ``conn`` event
  (status 2), in the same transaction.  So a device goes offline between
  ``offline_after`` and about ``1.1 * offline_after + 2`` seconds after its
  last poll on any node -- never early.

Every node learns the transitions from the ``conn`` events the bus brings (it
sets ``device.online`` in its registry), so it does not claim again what
another node already did.  One node keeps using
:class:`iotd.push.presence.Presence` (memory only, exact timers).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import LoopingCall

from iotd.logs import Logger
from iotd.push.pending import Pending
from iotd.store import presence as presql
from iotd.timefmt import micros_of

SEEN_FLUSH = 1.0
OFFLINE_CHECK = 1.0
REFRESH_FRACTION = 10
BATCH = 1000


def _online(conn: Any, tenant: str, device: str, now_us: int) -> tuple[bool, list]:
    changed = presql.come_online(conn, tenant, device, now_us)
    return changed, ([(tenant, "conn", device, {"status": 1})] if changed else [])


def _offline(conn: Any, cutoff_us: int, limit: int) -> tuple[list[tuple[str, str]], list]:
    gone = presql.go_offline(conn, cutoff_us, limit)
    return gone, [(tenant, "conn", device, {"status": 2}) for tenant, device in gone]


class SharedPresence:
    log = Logger()

    def __init__(self, registry: Any, events: Any, clock: Any, offline_after: float, pending: Pending,
                 store: Any):
        self._registry = registry
        self._events = events
        self._clock = clock
        self.offline_after = offline_after
        self._pending = pending
        self._store = store
        self._claiming: set[tuple[str, str]] = set()
        self._unflushed: dict[tuple[str, str], int] = {}
        self._written: dict[tuple[str, str], int] = {}  # the seen time last written, per device
        self.refresh = max(SEEN_FLUSH, offline_after / REFRESH_FRACTION)
        self._refresh_us = int(self.refresh * 1_000_000)
        self._flush = LoopingCall(self.flush)
        self._flush.clock = clock
        self._check = LoopingCall(self.sweep)
        self._check.clock = clock
        self.wake = lambda when: None  # (the sweeps' offline timer: not used here)
        events.bus.subscribe(self._conn_event, kinds=["conn"])

    # -- life cycle ----------------------------------------------------------------

    async def load(self) -> None:
        """Take over which devices are online (other nodes saw them)."""
        for tenant, ident in await self._store.read(presql.online_devices):
            device = self._registry.get(tenant, ident)
            if device is not None:
                device.online = True

    def start(self) -> None:
        if not self._flush.running:
            self._flush.start(SEEN_FLUSH, now=False).addErrback(lambda f: self.log.failure("seen flush stopped", f))

    def stop(self) -> None:
        if self._flush.running:
            self._flush.stop()
        self.lead(False)

    def lead(self, leader: bool) -> None:
        """Run the offline sweep while this node is the leader."""
        if leader and not self._check.running:
            self._check.start(OFFLINE_CHECK, now=False).addErrback(
                lambda f: self.log.failure("offline sweep stopped", f))
        elif not leader and self._check.running:
            self._check.stop()

    # -- polls ---------------------------------------------------------------------

    def seen(self, device: Any, address: str | None) -> None:
        now_us = micros_of(self._clock.seconds())
        self._registry.touch(device, address, now_us)
        key = (device.tenant, device.identifier)
        if now_us - self._written.get(key, 0) >= self._refresh_us:
            self._unflushed[key] = now_us
        if not device.online and key not in self._claiming:
            self._claiming.add(key)
            d = self._events.transact(_online, key[0], key[1], now_us)
            d.addCallbacks(self._came_online, self._claim_failed, callbackArgs=(device, key, address),
                           errbackArgs=(key,))
            self._pending.track(d)

    def _came_online(self, value: tuple[bool, list], device: Any, key: tuple[str, str], address: Any) -> None:
        self._claiming.discard(key)
        self._unflushed.pop(key, None)  # the transaction wrote seen_us
        self._written[key] = micros_of(self._clock.seconds())
        if not device.online:
            device.online = True
            self._registry.mark(device)
        if value[0]:
            self.log.info("device {device} online from {address}", device=key[1], address=address)

    def _claim_failed(self, failure: Any, key: tuple[str, str]) -> None:
        self._claiming.discard(key)  # the next poll tries again
        self.log.warn("push: marking {device} online failed: {error}", device=key[1],
                      error=failure.getErrorMessage())

    def forget(self, device: Any) -> None:
        key = (device.tenant, device.identifier)
        self._unflushed.pop(key, None)
        self._written.pop(key, None)
        d = self._store.write(presql.forget, key[0], key[1])
        d.addErrback(lambda f: None)
        self._pending.track(d)

    def next_check(self) -> float | None:
        return None

    def check(self) -> None:
        """(The in-memory offline check of one node: the leader's :meth:`sweep` does it here.)"""

    # -- the store ---------------------------------------------------------------

    async def flush(self) -> None:
        if not self._unflushed:
            return
        rows = [(tenant, device, us) for (tenant, device), us in self._unflushed.items()]
        written, self._unflushed = self._unflushed, {}
        self._written.update(written)
        try:
            await self._pending.track(self._store.write(presql.seen, rows))
        except Exception as e:
            self.log.warn("push: writing when devices were seen failed: {error}", error=e)
            for tenant, device, us in rows:  # the next flush tries again (newer stamps win)
                self._written.pop((tenant, device), None)
                self._unflushed.setdefault((tenant, device), us)

    async def sweep(self) -> None:
        """(Leader.)  Mark offline every device not seen anywhere for ``offline_after``."""
        cutoff = micros_of(self._clock.seconds() - self.offline_after - self.refresh - SEEN_FLUSH)
        try:
            while True:
                gone, _events = await self._pending.track(self._events.transact(_offline, cutoff, BATCH))
                for tenant, ident in gone:
                    device = self._registry.get(tenant, ident)
                    if device is not None and device.online:
                        device.online = False
                        self._registry.mark(device)
                    self.log.info("device {device} offline: no poll for {seconds} s", device=ident,
                                  seconds=self.offline_after)
                if len(gone) < BATCH:
                    break
        except Exception as e:
            self.log.warn("push: the offline sweep failed: {error}", error=e)

    def _conn_event(self, event: Any) -> None:
        """A transition (made by any node): this node's registry follows it."""
        device = self._registry.get(event.tenant, event.device)
        status = event.data.get("status")
        if device is not None and status in (1, 2):
            online = status == 1
            if device.online != online:
                device.online = online
                self._registry.mark(device)
