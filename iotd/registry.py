"""The device registry and streams, shared by every job.

The whole registry lives in memory (loaded at start, written through to the
store), so per-event membership checks and push polls never touch SQLite.
Runtime state (``online``, ``lastSeen``, ``lastAddress``) changes in memory
and is flushed to the store every few seconds.

Identifiers are case-insensitive and kept upper-case; ``(tenant,
identifier)`` is unique and ``pushId`` is unique across tenants.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable

import attrs
from twisted.internet.task import LoopingCall

from iotd import errors
from iotd.logs import Logger
from iotd.store import devices as devsql
from iotd.timefmt import iso

FLUSH_EVERY = 5.0
PUSH_ID_MIN, PUSH_ID_MAX = -(2**63), 2**63 - 1

# field -> (check, message) for the client-writable fields of a device
_STR = (lambda v: v is None or (isinstance(v, str) and len(v) <= 1000), "a string")


def _is_port(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65535


_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": _STR,
    "host": _STR,
    "productID": _STR,
    "deviceName": _STR,
    "projectID": (lambda v: v is None or isinstance(v, (str, int)) and not isinstance(v, bool), "a string"),
    "areaID": (lambda v: v is None or isinstance(v, (str, int)) and not isinstance(v, bool), "a string"),
    "pushId": (
        lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and PUSH_ID_MIN <= v <= PUSH_ID_MAX),
        "a signed 64-bit integer",
    ),
    "ports": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_port(p) for k, p in v.items()),
              "an object of name: port (1-65535)"),
    "tags": (lambda v: isinstance(v, list) and all(isinstance(t, str) and t for t in v), "a list of strings"),
    "fields": (lambda v: isinstance(v, dict), "an object"),
    "interfaces": (lambda v: isinstance(v, list) and all(isinstance(i, dict) for i in v), "a list of objects"),
}


def normalize_identifier(identifier: str) -> str:
    if not isinstance(identifier, str) or not identifier.strip() or len(identifier) > 200:
        raise errors.Invalid("identifier must be 1-200 characters")
    if "/" in identifier:
        raise errors.Invalid("identifier must not contain '/'")
    return identifier.strip().upper()


@attrs.define(eq=False)
class Device:
    tenant: str
    identifier: str
    name: str | None = None
    pushId: int | None = None
    host: str | None = None
    ports: dict[str, int] = attrs.Factory(dict)
    tags: list[str] = attrs.Factory(list)
    productID: str | None = None
    deviceName: str | None = None
    projectID: str | None = None
    areaID: str | None = None
    fields: dict[str, Any] = attrs.Factory(dict)
    interfaces: list[dict] = attrs.Factory(list)
    online: bool = False
    lastSeen: int | None = None  # micros
    lastAddress: str | None = None

    @property
    def product_id(self) -> str:
        """``productID`` for the subscription protocol (the identifier if unset)."""
        return self.productID if self.productID else self.identifier

    @property
    def device_name(self) -> str:
        return self.deviceName if self.deviceName else self.identifier

    def doc(self) -> dict[str, Any]:
        """What the store keeps."""
        out = {f: getattr(self, f) for f in _FIELDS}
        out.update(online=self.online, lastSeen=self.lastSeen, lastAddress=self.lastAddress)
        return out

    def to_json(self) -> dict[str, Any]:
        out = {"identifier": self.identifier}
        for f in _FIELDS:
            out[f] = getattr(self, f)
        out["online"] = self.online
        out["lastSeen"] = iso(self.lastSeen) if self.lastSeen is not None else None
        out["lastAddress"] = self.lastAddress
        return out


def validate_device_body(body: Any) -> dict[str, Any]:
    """The client-writable fields of a PUT body, checked; raises Invalid."""
    if not isinstance(body, dict):
        raise errors.Invalid("body must be a JSON object")
    out: dict[str, Any] = {}
    for key, value in body.items():
        if key in ("identifier", "online", "lastSeen", "lastAddress"):
            continue  # read-only fields echoed back by a client are ignored
        if key not in _FIELDS:
            raise errors.Invalid(f"unknown field {key!r}")
        check, what = _FIELDS[key]
        if not check(value):
            raise errors.Invalid(f"{key} must be {what}")
        if key in ("projectID", "areaID") and value is not None:
            value = str(value)
        out[key] = copy.deepcopy(value)
    if "tags" in out:
        out["tags"] = list(dict.fromkeys(out["tags"]))
    return out


@attrs.define
class Stream:
    tenant: str
    id: str
    devices: list[str] = attrs.Factory(list)
    tags: list[str] = attrs.Factory(list)

    def contains(self, device: Device) -> bool:
        return device.identifier in self.devices or not set(self.tags).isdisjoint(device.tags)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "devices": list(self.devices), "tags": list(self.tags)}


class Registry:
    log = Logger()

    def __init__(self, store: Any, clock: Any):
        self._store = store
        self._clock = clock
        self._devices: dict[tuple[str, str], Device] = {}
        self._by_push: dict[int, Device] = {}
        self._counts: dict[str, int] = {}
        self._streams: dict[tuple[str, str], Stream] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._delete_listeners: list[Callable[[Device], None]] = []
        self._flush_loop = LoopingCall(self.flush)
        self._flush_loop.clock = clock

    async def start(self) -> None:
        for tenant, ident, doc in await self._store.read(devsql.load_all):
            device = Device(tenant=tenant, identifier=ident, **doc)
            device.online = False  # nobody has polled this run yet
            self._index(device)
        for tenant, sid, doc in await self._store.read(devsql.load_streams):
            self._streams[(tenant, sid)] = Stream(tenant=tenant, id=sid, **doc)
        self._flush_loop.start(FLUSH_EVERY, now=False).addErrback(
            lambda f: self.log.failure("registry flush stopped", f)
        )

    async def stop(self) -> None:
        if self._flush_loop.running:
            self._flush_loop.stop()
        await self.flush()

    def _index(self, device: Device) -> None:
        if (device.tenant, device.identifier) not in self._devices:
            self._counts[device.tenant] = self._counts.get(device.tenant, 0) + 1
        self._devices[(device.tenant, device.identifier)] = device
        if device.pushId is not None:
            self._by_push[device.pushId] = device

    # -- lookups ------------------------------------------------------------

    def get(self, tenant: str, identifier: str) -> Device | None:
        try:
            return self._devices.get((tenant, normalize_identifier(identifier)))
        except errors.ApiError:
            return None

    def by_push_id(self, push_id: int) -> Device | None:
        return self._by_push.get(push_id)

    def devices(self, tenant: str) -> list[Device]:
        return sorted((d for (t, _), d in self._devices.items() if t == tenant), key=lambda d: d.identifier)

    def count(self, tenant: str) -> int:
        """How many devices ``tenant`` has (O(1))."""
        return self._counts.get(tenant, 0)

    def all_devices(self) -> Iterable[Device]:
        return self._devices.values()

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
        device = Device(tenant=tenant, identifier=ident, **fields)
        if old is not None:  # runtime state survives a replace
            device.online, device.lastSeen, device.lastAddress = old.online, old.lastSeen, old.lastAddress
        try:
            await self._store.write(devsql.upsert, tenant, ident, push_id, device.doc())
        except devsql.PushIdTaken:
            raise errors.Conflict(f"pushId {push_id} belongs to another device") from None
        current = self._devices.get((tenant, ident))
        if current is not None and current.pushId is not None:
            self._by_push.pop(current.pushId, None)
        self._index(device)
        self._dirty.discard((tenant, ident))
        return device, old is None

    async def delete(self, tenant: str, identifier: str) -> bool:
        ident = normalize_identifier(identifier)
        removed = await self._store.write(devsql.delete, tenant, ident)
        device = self._devices.pop((tenant, ident), None)
        if device is None:
            return removed
        self._counts[tenant] -= 1
        if device.pushId is not None and self._by_push.get(device.pushId) is device:
            del self._by_push[device.pushId]
        self._dirty.discard((tenant, ident))
        for fn in list(self._delete_listeners):
            try:
                fn(device)
            except Exception:
                self.log.failure("device delete listener failed")
        return True

    def add_delete_listener(self, fn: Callable[[Device], None]) -> None:
        """``fn(device)`` runs after a device is deleted (close links, cancel commands)."""
        self._delete_listeners.append(fn)

    def touch(self, device: Device, address: str | None, now_us: int) -> None:
        """Record activity in memory; the store gets it at the next flush."""
        device.lastSeen = now_us
        if address is not None:
            device.lastAddress = address
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
                rows.append((device.tenant, device.identifier, device.doc()))
        self._dirty = set()
        if rows:
            await self._store.write(devsql.update_docs, rows)

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
        await self._store.write(devsql.upsert_stream, tenant, stream_id,
                                {"devices": stream.devices, "tags": stream.tags})
        created = (tenant, stream_id) not in self._streams
        self._streams[(tenant, stream_id)] = stream
        return stream, created

    async def delete_stream(self, tenant: str, stream_id: str) -> bool:
        removed = await self._store.write(devsql.delete_stream, tenant, stream_id)
        return self._streams.pop((tenant, stream_id), None) is not None or removed
