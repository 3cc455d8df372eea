"""The device registry and streams, shared by every job.

What a device and a stream are is :mod:`iotd.device` (re-exported here); the
per-tenant indexes are :mod:`iotd.registry_index`.

The whole registry lives in memory (loaded at start, written through to the
store), so per-event membership checks and push polls never touch SQLite.
Runtime state (``online``, ``lastSeen``, ``lastAddress``) changes in memory
and is flushed to the store every :data:`FLUSH_EVERY` seconds: a change of
``online`` or ``lastAddress`` at the next flush, a ``lastSeen`` that only moved
on once it is :data:`SEEN_REFRESH` seconds newer than the stored one (and at
stop).  A device polling every second costs one row write a minute, not one
every flush; the API answers from memory, which is exact.

Identifiers are case-insensitive and kept upper-case; ``(tenant,
identifier)`` is unique and ``pushId`` is unique across tenants.

No request scans every device: each tenant keeps its identifiers in a sorted
list (``bisect``), the identifiers of each tag in a sorted list, and for each
subscription selector (``("pd", productID, deviceName)``, ``("p", projectID)``,
``("pa", projectID, areaID)``) how many of its devices carry each tag, so "may
a group key read some device of this project" is a few dict lookups.  The
indexes change on writes (put, delete, load), never per event.  A page of
``GET /api/v1/devices`` costs ``O(limit · log N)``; only a group key asking for
a tag outside its groups walks the shorter of the two tag lists.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Callable, Iterable, Iterator, Mapping

from twisted.internet.task import LoopingCall

from iotd import errors
from iotd.device import PUSH_ID_MAX, PUSH_ID_MIN, Device, Stream, id_text, normalize_identifier, validate_device_body
from iotd.logs import Logger
from iotd.registry_index import TenantIndex, idents_after
from iotd.store import StoreUnavailable
from iotd.store import devices as devsql

__all__ = ["FLUSH_EVERY", "PUSH_ID_MAX", "PUSH_ID_MIN", "Device", "Registry", "Stream", "id_text",
           "normalize_identifier", "validate_device_body"]

FLUSH_EVERY = 5.0
SEEN_REFRESH = 60.0  # seconds the stored lastSeen may lag behind memory's (while online)
_SEEN_REFRESH_US = int(SEEN_REFRESH * 1_000_000)


_NO_SELECTION: Mapping[str, int] = {}


def _carry(device: Device, old: Device | None) -> Device:
    """``device`` (as written, or as read from the store) with the runtime state this process has
    of it: online, lastSeen, lastAddress (a device this process has not seen is offline here)."""
    if old is not None:
        device.online, device.lastSeen, device.lastAddress = old.online, old.lastSeen, old.lastAddress
    else:
        device.online = False
    return device


class Registry:
    log = Logger()

    def __init__(self, store: Any, clock: Any):
        self._store = store
        self._clock = clock
        self._devices: dict[tuple[str, str], Device] = {}
        self._by_push: dict[int, Device] = {}
        self._tenants: dict[str, TenantIndex] = {}
        self._streams: dict[tuple[str, str], Stream] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._delete_listeners: list[Callable[[Device], None]] = []
        self._change_listeners: list[Callable[[str, str, str, int], None]] = []
        self.revision = 0  # every registry change up to this revision is in memory
        self._ahead: set[int] = set()  # revisions applied beyond it (a message came before another)
        self._behind: int | None = None
        self._flush_loop = LoopingCall(self.flush)
        self._flush_loop.clock = clock

    async def start(self) -> None:
        self.revision = await self._store.read(devsql.revision)
        for tenant, ident, doc in await self._store.read(devsql.load_all):
            device = Device(tenant=tenant, identifier=ident, **doc)
            device.online = False  # nobody has polled this run yet
            device.stored_seen = device.lastSeen
            self._index(device, ordered=False)
        for index in self._tenants.values():
            index.sort()
        for tenant, sid, doc in await self._store.read(devsql.load_streams):
            self._streams[(tenant, sid)] = Stream(tenant=tenant, id=sid, **doc)
        self._flush_loop.start(FLUSH_EVERY, now=False).addErrback(
            lambda f: self.log.failure("registry flush stopped", f)
        )

    async def stop(self) -> None:
        if self._flush_loop.running:
            self._flush_loop.stop()
        # lastSeen values that moved on less than SEEN_REFRESH since their last flush (once, at stop)
        self._dirty.update(key for key, device in self._devices.items() if device.lastSeen != device.stored_seen)
        await self.flush()

    def _index(self, device: Device, ordered: bool = True) -> None:
        """Make ``device`` the one of its ``(tenant, identifier)``, in every index."""
        key = (device.tenant, device.identifier)
        old = self._devices.get(key)
        if old is not None:
            self._unindex(old)
        self._devices[key] = device
        if device.pushId is not None:
            self._by_push[device.pushId] = device
        index = self._tenants.get(device.tenant)
        if index is None:
            index = self._tenants[device.tenant] = TenantIndex()
        index.add(device, ordered)

    def _unindex(self, device: Device) -> None:
        key = (device.tenant, device.identifier)
        if self._devices.get(key) is device:
            del self._devices[key]
        if device.pushId is not None and self._by_push.get(device.pushId) is device:
            del self._by_push[device.pushId]
        index = self._tenants.get(device.tenant)
        if index is not None:
            index.remove(device)
            if not index.ids:
                del self._tenants[device.tenant]

    # -- lookups ------------------------------------------------------------

    def get(self, tenant: str, identifier: str) -> Device | None:
        try:
            return self._devices.get((tenant, normalize_identifier(identifier)))
        except errors.ApiError:
            return None

    def by_push_id(self, push_id: int) -> Device | None:
        return self._by_push.get(push_id)

    def devices(self, tenant: str) -> list[Device]:
        """Every device of ``tenant`` by identifier: O(N), not for request paths (use :meth:`page`)."""
        index = self._tenants.get(tenant)
        if index is None:
            return []
        return [self._devices[(tenant, ident)] for ident in index.ids]

    def count(self, tenant: str) -> int:
        """How many devices ``tenant`` has (O(1))."""
        index = self._tenants.get(tenant)
        return len(index.ids) if index is not None else 0

    def all_devices(self) -> Iterable[Device]:
        """Every device of every tenant: O(N), not for request paths."""
        return self._devices.values()

    def page(self, tenant: str, limit: int, after: str | None = None,
             tags: Iterable[str] | None = None,
             where: Callable[[Device], bool] | None = None) -> tuple[list[Device], bool]:
        """Up to ``limit`` devices of ``tenant`` with identifiers above ``after``, in order,
        and whether more follow.

        ``tags``: only devices with at least one of them (None: all); ``where``: a
        further filter, applied as the sorted index is walked (it costs one call per
        candidate it rejects).
        """
        index = self._tenants.get(tenant)
        if index is None or limit < 1:
            return [], False
        if tags is None:
            candidates: Iterator[str] = idents_after(index.ids, after)
        else:
            lists = [index.tags[t] for t in set(tags) if t in index.tags]
            if len(lists) == 1:
                candidates = idents_after(lists[0], after)
            else:
                candidates = (ident for ident, _ in itertools.groupby(
                    heapq.merge(*(idents_after(idents, after) for idents in lists))))
        out: list[Device] = []
        for ident in candidates:
            device = self._devices[(tenant, ident)]
            if where is not None and not where(device):
                continue
            if len(out) == limit:
                return out, True
            out.append(device)
        return out, False

    def has_tag(self, tenant: str, tag: str) -> bool:
        """Does some device of ``tenant`` carry ``tag``?"""
        index = self._tenants.get(tenant)
        return index is not None and tag in index.tags

    def tag_size(self, tenant: str, tag: str) -> int:
        """How many devices of ``tenant`` carry ``tag``."""
        index = self._tenants.get(tenant)
        return len(index.tags.get(tag, ())) if index is not None else 0

    def tagged(self, tenant: str, tag: str) -> list[Device]:
        """The devices of ``tenant`` that carry ``tag``, by identifier (O(those devices))."""
        index = self._tenants.get(tenant)
        if index is None:
            return []
        return [self._devices[(tenant, ident)] for ident in index.tags.get(tag, ())]

    def selection_tags(self, tenant: str, selector: tuple[str, ...]) -> Mapping[str, int]:
        """``{tag: devices}`` over the tagged devices of ``tenant`` that match a subscription
        selector (see :attr:`Device.selectors`): a group key may read some device of the
        selection when one of its groups is a key here."""
        index = self._tenants.get(tenant)
        if index is None:
            return _NO_SELECTION
        return index.selections.get(selector, _NO_SELECTION)

    # -- writes -------------------------------------------------------------

    async def put(self, tenant: str, identifier: str, fields: dict[str, Any]) -> tuple[Device, bool]:
        """Create or replace a device; returns it and whether it was created."""
        ident = normalize_identifier(identifier)
        old = self._devices.get((tenant, ident))
        push_id = fields.get("pushId")
        if push_id is not None:
            holder = self._by_push.get(push_id)
            if holder is not None and holder is not old:
                raise errors.Conflict(f"pushId {push_id} belongs to another device")
        device = _carry(Device(tenant=tenant, identifier=ident, **fields), old)  # runtime state survives
        try:
            _, revision = await self._store.write(devsql.upsert_bumped, tenant, ident, push_id, device.doc())
        except devsql.PushIdTaken:
            raise errors.Conflict(f"pushId {push_id} belongs to another device") from None
        self._index(device)  # replaces whatever is there now (another put may have won meanwhile)
        self._dirty.discard((tenant, ident))
        self._changed("device", tenant, ident, revision)
        return device, old is None

    async def delete(self, tenant: str, identifier: str) -> bool:
        ident = normalize_identifier(identifier)
        removed, revision = await self._store.write(devsql.delete_bumped, tenant, ident)
        self._changed("device", tenant, ident, revision)
        device = self._devices.get((tenant, ident))
        if device is None:
            return removed
        self._drop(device)
        return True

    def _drop(self, device: Device) -> None:
        tenant, ident = device.tenant, device.identifier
        self._unindex(device)
        self._dirty.discard((tenant, ident))
        for fn in list(self._delete_listeners):
            try:
                fn(device)
            except Exception:
                self.log.failure("device delete listener failed")

    def add_change_listener(self, fn: Callable[[str, str, str, int], None]) -> None:
        """``fn(what, tenant, id, revision)`` after this process changed a device or a stream
        (``what``: "device" | "stream"), to tell the other nodes."""
        self._change_listeners.append(fn)

    def _changed(self, what: str, tenant: str, ident: str, revision: int) -> None:
        self.applied(revision)
        for fn in list(self._change_listeners):
            try:
                fn(what, tenant, ident, revision)
            except Exception:
                self.log.failure("registry change listener failed")

    # -- the revision backstop ------------------------------------------------

    def applied(self, revision: int) -> None:
        """The change that made ``revision`` is in memory (written here, or reloaded after a message)."""
        if revision <= self.revision:
            return
        self._ahead.add(revision)
        while self.revision + 1 in self._ahead:
            self.revision += 1
            self._ahead.discard(self.revision)

    async def check_revision(self) -> bool:
        """The backstop for lost bus messages: if the store's revision stays ahead of every
        change applied here for two checks in a row, reload everything.  True if it did."""
        stored = await self._store.read(devsql.revision)
        if stored <= self.revision:
            self._behind = None
            return False
        if self._behind != self.revision:
            self._behind = self.revision  # maybe a message is on its way: look again next time
            return False
        self.log.info("registry: changes {first}..{last} came without a message; reloading",
                      first=self.revision + 1, last=stored)
        await self.reload_all(stored)
        return True

    async def reload_all(self, revision: int) -> None:
        """Take every device and stream from the store (runtime state kept), as of ``revision``."""
        rows = await self._store.read(devsql.load_all)
        streams = await self._store.read(devsql.load_streams)
        fresh = set()
        for tenant, ident, doc in rows:
            fresh.add((tenant, ident))
            self._index(_carry(Device(tenant=tenant, identifier=ident, **doc), self._devices.get((tenant, ident))))
        for key in set(self._devices) - fresh:
            self._drop(self._devices[key])
        self._streams = {(tenant, sid): Stream(tenant=tenant, id=sid, **doc) for tenant, sid, doc in streams}
        self.revision = max(self.revision, revision)
        self._ahead = {r for r in self._ahead if r > self.revision}
        self._behind = None

    async def reload_device(self, tenant: str, identifier: str) -> None:
        """Another node changed this device: take the stored one (or drop it, if deleted)."""
        row = await self._store.read(devsql.get, tenant, identifier)
        old = self._devices.get((tenant, identifier))
        if row is None:
            if old is not None:
                self._drop(old)
            return
        self._index(_carry(Device(tenant=tenant, identifier=identifier, **row), old))

    async def reload_stream(self, tenant: str, stream_id: str) -> None:
        """Another node changed this stream: take the stored one (or drop it)."""
        doc = await self._store.read(devsql.get_stream, tenant, stream_id)
        if doc is None:
            self._streams.pop((tenant, stream_id), None)
        else:
            self._streams[(tenant, stream_id)] = Stream(tenant=tenant, id=stream_id, **doc)

    def add_delete_listener(self, fn: Callable[[Device], None]) -> None:
        """``fn(device)`` runs after a device is deleted (close links, cancel commands)."""
        self._delete_listeners.append(fn)

    def touch(self, device: Device, address: str | None, now_us: int) -> None:
        """Record activity in memory; the store gets it at the next flush (``lastSeen`` alone only
        once it moved :data:`SEEN_REFRESH` on: see the module's docstring)."""
        device.lastSeen = now_us
        stored = device.stored_seen
        if address is not None and address != device.lastAddress:
            device.lastAddress = address
        elif stored is not None and now_us - stored < _SEEN_REFRESH_US:
            return
        self._dirty.add((device.tenant, device.identifier))

    def mark(self, device: Device) -> None:
        """Runtime state of ``device`` changed; flush it with the next batch."""
        self._dirty.add((device.tenant, device.identifier))

    async def flush(self) -> None:
        if not self._dirty:
            return
        rows = []
        for key in self._dirty:
            device = self._devices.get(key)
            if device is not None:
                device.stored_seen = device.lastSeen
                rows.append((device.tenant, device.identifier, device.doc()))
        self._dirty = set()
        if rows:
            try:
                await self._store.write(devsql.update_docs, rows)
            except StoreUnavailable:  # disk full, file gone: keep them for the next flush
                self._dirty.update((tenant, ident) for tenant, ident, _ in rows)

    # -- streams ------------------------------------------------------------

    def stream(self, tenant: str, stream_id: str) -> Stream | None:
        return self._streams.get((tenant, stream_id))

    async def put_stream(self, tenant: str, stream_id: str, body: Any) -> tuple[Stream, bool]:
        errors.require_object(body, {"devices", "tags", "id"})
        devices = body.get("devices", [])
        tags = body.get("tags", [])
        if not isinstance(devices, list) or not all(isinstance(d, str) and d for d in devices):
            raise errors.Invalid("devices must be a list of device identifiers")
        if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
            raise errors.Invalid("tags must be a list of strings")
        if not stream_id or len(stream_id) > 200:
            raise errors.Invalid("stream id must be 1-200 characters")
        stream = Stream(tenant=tenant, id=stream_id,
                        devices=[normalize_identifier(d) for d in devices], tags=list(tags))
        _, revision = await self._store.write(devsql.upsert_stream_bumped, tenant, stream_id,
                                {"devices": stream.devices, "tags": stream.tags})
        created = (tenant, stream_id) not in self._streams
        self._streams[(tenant, stream_id)] = stream
        self._changed("stream", tenant, stream_id, revision)
        return stream, created

    async def delete_stream(self, tenant: str, stream_id: str) -> bool:
        removed, revision = await self._store.write(devsql.delete_stream_bumped, tenant, stream_id)
        self._changed("stream", tenant, stream_id, revision)
        return self._streams.pop((tenant, stream_id), None) is not None or removed
