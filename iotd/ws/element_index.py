"""The open event sockets by ``(tenant, kind)`` and scope, so an event finds its sockets in a few lookups.

Sockets with the common shape (no preload, a key that sees every device of
its tenant) sit in each bucket's ``plain`` set and get one shared frame; the
others (preloads, group keys) are handled one by one.
"""

from __future__ import annotations

from typing import Any

from iotd.events import Event

SCOPES = ("mandate", "device", "tag", "stream")


class Bucket:
    """The sockets of one scope target: ``plain`` ones share a frame, ``special`` ones don't."""

    __slots__ = ("plain", "special")

    def __init__(self) -> None:
        self.plain: set[Any] = set()
        self.special: set[Any] = set()

    def __bool__(self) -> bool:
        return bool(self.plain or self.special)


class Scopes:
    """Every socket of one ``(tenant, kind)``, by scope."""

    __slots__ = ("mandate", "device", "tag", "stream")

    def __init__(self) -> None:
        self.mandate = Bucket()
        self.device: dict[str, Bucket] = {}
        self.tag: dict[str, Bucket] = {}
        self.stream: dict[str, Bucket] = {}

    def bucket(self, scope: str, target: str, create: bool) -> Bucket | None:
        if scope == "mandate":
            return self.mandate
        table = getattr(self, scope)
        bucket = table.get(target)
        if bucket is None and create:
            bucket = table[target] = Bucket()
        return bucket

    def drop(self, scope: str, target: str) -> None:
        if scope != "mandate":
            table = getattr(self, scope)
            if target in table and not table[target]:
                del table[target]

    def empty(self) -> bool:
        return not (self.mandate or self.device or self.tag or self.stream)


class ElementIndex:
    """Live sockets (each with ``tenant``, ``event_kind``, ``scope``, ``target``, ``plain``)."""

    def __init__(self, registry: Any):
        self.registry = registry
        self._by_kind: dict[tuple[str, str], Scopes] = {}

    def __len__(self) -> int:
        """How many ``(tenant, kind)`` have a live socket."""
        return len(self._by_kind)

    def attach(self, sock: Any) -> None:
        scopes = self._by_kind.get((sock.tenant, sock.event_kind))
        if scopes is None:
            scopes = self._by_kind[(sock.tenant, sock.event_kind)] = Scopes()
        bucket = scopes.bucket(sock.scope, sock.target, create=True)
        (bucket.plain if sock.plain else bucket.special).add(sock)

    def detach(self, sock: Any) -> None:
        scopes = self._by_kind.get((sock.tenant, sock.event_kind))
        if scopes is None:
            return
        bucket = scopes.bucket(sock.scope, sock.target, create=False)
        if bucket is not None:
            bucket.plain.discard(sock)
            bucket.special.discard(sock)
            scopes.drop(sock.scope, sock.target)
        if scopes.empty():
            del self._by_kind[(sock.tenant, sock.event_kind)]

    def buckets(self, event: Event) -> tuple[Any, list[Bucket]]:
        """The event's device (None if unknown) and the buckets whose scope takes ``event``."""
        scopes = self._by_kind.get((event.tenant, event.kind))
        if scopes is None:
            return None, []
        device = self.registry.get(event.tenant, event.device)
        found = []
        if scopes.mandate:
            found.append(scopes.mandate)
        bucket = scopes.device.get(event.device)
        if bucket is not None:
            found.append(bucket)
        if scopes.tag and device is not None:
            for tag in device.tags:
                bucket = scopes.tag.get(tag)
                if bucket is not None:
                    found.append(bucket)
        if scopes.stream:
            for stream_id, bucket in scopes.stream.items():
                stream = self.registry.stream(event.tenant, stream_id)
                if stream is not None and (stream.names(event.device)
                                           or (device is not None and stream.contains(device))):
                    found.append(bucket)
        return device, found
