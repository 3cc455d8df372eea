"""The packets the ``packet`` preload needs: recent ones from memory, the others from the store.

Memory, chosen where the spec is silent: the recent packets kept for the
``packet`` preload (:class:`PacketCache`) are bounded by ``[websocket]
packet_cache_bytes`` (an event counts its data's size, see
:meth:`iotd.events.Event.size`) and by :data:`PACKET_CACHE` entries, and keep
a copy of each packet without the frames built for its sockets.  Packets are
cached only while some socket with that preload is open (the cache is emptied
when the last one closes); a reading whose packet is not cached reads it from
the store.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from twisted.internet import defer

from iotd.events import Event
from iotd.store import events as evsql

PACKET_CACHE = 20000  # at most this many recent packets are kept for the `packet` preload


class PacketCache:
    """Recent packets for the ``packet`` preload, oldest dropped first, bounded in bytes and entries."""

    def __init__(self, max_bytes: int, max_entries: int = PACKET_CACHE):
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.bytes = 0
        self._items: OrderedDict[int, Event] = OrderedDict()

    def add(self, event: Event) -> None:
        size = event.size()
        if size > self.max_bytes:
            return  # larger than the whole cache: read from the store when needed
        items = self._items
        old = items.pop(event.id, None)
        if old is not None:
            self.bytes -= old.size()
        items[event.id] = event.lean()
        self.bytes += size
        while self.bytes > self.max_bytes or len(items) > self.max_entries:
            _, gone = items.popitem(last=False)
            self.bytes -= gone.size()

    def get(self, packet_id: int) -> Event | None:
        return self._items.get(packet_id)

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)


class Packets:
    """The packet of a reading, for the sockets with the ``packet`` preload (their ``users``)."""

    def __init__(self, store: Any, max_bytes: int):
        self.store = store
        self.cache = PacketCache(max_bytes)
        self.users = 0  # open sockets with the `packet` preload (the cache serves only them)

    def joined(self) -> None:
        self.users += 1

    def left(self) -> None:
        self.users -= 1
        if not self.users:
            self.cache.clear()

    def published(self, event: Event) -> None:
        """A live packet: cached while somebody may want it."""
        if self.users:
            self.cache.add(event)

    def deferred(self, tenant: str, packet_id: Any) -> defer.Deferred:
        """The packet (or None) as a Deferred; already fired when it is cached."""
        cached = self.cache.get(packet_id) if isinstance(packet_id, int) else None
        if cached is not None:
            return defer.succeed(cached if cached.tenant == tenant else None)
        return defer.Deferred.fromCoroutine(self.read(tenant, packet_id))

    async def read(self, tenant: str, packet_id: Any) -> Event | None:
        """The tenant's packet with this id, from the cache or the store (None: none such)."""
        if not isinstance(packet_id, int) or isinstance(packet_id, bool):
            return None
        event = self.cache.get(packet_id)
        if event is None:
            row = await self.store.read(evsql.get, packet_id)
            if row is None:
                return None
            event = Event.from_row(row)
        if event.tenant != tenant or event.kind != "packet":
            return None
        return event
