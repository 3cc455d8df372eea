"""ELEMENT-style event sockets: packets and readings of a device, tag, stream or tenant.

One :class:`ElementFactory` serves all eight URLs.  It subscribes to the
event bus once and keeps its sockets in an index by ``(tenant, kind)`` and
scope (mandate / device / tag / stream), so an event costs a few dict
lookups plus one write per interested socket.  Sockets with the common shape
(no preload, a key that sees every device of its tenant) sit in each bucket's
``plain`` set and get one shared frame; the others (preloads, group keys) are
handled one by one.

A socket with ``after`` first replays stored events through
:meth:`iotd.events.EventLog.follow` (subscribe-then-read, so no gap and no
duplicate), a page of up to 100 events per frame, waiting for the client to
drain each frame when its socket buffer is full; then it joins the index in
the same reactor turn as the last buffered live event is sent.

Memory, chosen where the spec is silent: the recent packets kept for the
``packet`` preload (:class:`PacketCache`) are bounded by ``[websocket]
packet_cache_bytes`` (an event counts its data's size, see
:meth:`iotd.events.Event.size`) and by :data:`PACKET_CACHE` entries, and keep
a copy of each packet without the frames built for its sockets.  Packets are
cached only while some socket with that preload is open (the cache is emptied
when the last one closes); a reading whose packet is not cached reads it from
the store.  A replay's buffer of live events is bounded by
``max_buffer_bytes`` (past it, it is dropped and the replay reads those events
from the store).  Live events that wait behind a packet read from the store
count toward the socket's ``max_buffer_bytes``; past it the socket is cut as
too slow (1008).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any, Iterable

from twisted.internet import defer

from iotd import errors
from iotd.events import Event
from iotd.store import events as evsql
from iotd.timefmt import parse_iso
from iotd.ws.base import FLUSH_FANOUT, STATE_OPEN, SocketFactory, SocketProtocol, SocketService, dumps

KINDS = ("packet", "reading")
EVENT_NAMES = {"packet": "packet_added", "reading": "reading_added"}
SCOPES = ("mandate", "device", "tag", "stream")
REPLAY_FRAME = 100  # events per replay frame
PACKET_CACHE = 20000  # at most this many recent packets are kept for the `packet` preload

_PRELOADS = {
    "packet": ("device", "device.fields", "device.interfaces"),
    "reading": ("device", "device.fields", "device.interfaces", "packet", "packet.interface"),
}
_IMPLIES = {"device.fields": "device", "device.interfaces": "device", "packet.interface": "packet"}


def parse_preload(text: str | None, kind: str) -> tuple[str, ...]:
    """The canonical preload list (implied names added, sorted); 400 for unknown names."""
    if not text:
        return ()
    names: set[str] = set()
    for raw in text.split(","):
        name = raw.strip()
        if not name:
            continue
        if name not in _PRELOADS[kind]:
            allowed = ", ".join(_PRELOADS[kind])
            raise errors.BadRequest(f"unknown preload {name!r}; {kind} sockets know {allowed}",
                                    code="invalid_preload")
        names.add(name)
        if name in _IMPLIES:
            names.add(_IMPLIES[name])
    return tuple(sorted(names))


def parse_after(text: str) -> int:
    """``after`` as micros; 400 unless ISO 8601 (a ``+`` decoded to a space is forgiven)."""
    value = text.strip().replace(" ", "+")
    try:
        return parse_iso(value)
    except (ValueError, TypeError, OverflowError):
        raise errors.BadRequest("after must be an ISO 8601 date-time, e.g. 2026-11-23T18:30:00.123456Z",
                                code="invalid_after") from None


def device_doc(device: Any, preload: tuple[str, ...]) -> dict[str, Any] | None:
    """The registry device as ELEMENT shapes it for the ``device`` preload."""
    if device is None:
        return None
    out: dict[str, Any] = {
        "id": device.identifier,
        "name": device.name if device.name is not None else device.identifier,
        "slug": device.identifier.lower(),
        "tags": list(device.tags),
    }
    if "device.fields" in preload:
        out["fields"] = device.fields
    if "device.interfaces" in preload:
        out["interfaces"] = device.interfaces
    return out


def packet_doc(packet: Event | None, device: Any, preload: tuple[str, ...]) -> dict[str, Any] | None:
    if packet is None:
        return None
    out = dict(packet.body())
    if "packet.interface" in preload:
        interface = None
        wanted = out.get("interface_id")
        if wanted is not None and device is not None:
            interface = next((i for i in device.interfaces if i.get("id") == wanted), None)
        out["interface"] = interface
    return out


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


class Bucket:
    """The sockets of one scope target: ``plain`` ones share a frame, ``special`` ones don't."""

    __slots__ = ("plain", "special")

    def __init__(self) -> None:
        self.plain: set[ElementSocket] = set()
        self.special: set[ElementSocket] = set()

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


class ElementSocket(SocketProtocol):
    kind = "element"
    tenant = ""
    event_kind = "packet"
    scope = "mandate"
    target = ""
    preload: tuple[str, ...] = ()
    variant = ""
    after_id: int | None = None
    _idle_call: Any = None
    _last = 0.0
    _follower: Any = None
    _queue: deque | None = None
    _queued_bytes = 0  # size of the events in _queue
    _live = False
    _packet_user = False  # counted in factory.packet_users

    def configure(self, tenant: str, event_kind: str, scope: str, target: str,
                  preload: tuple[str, ...], after_id: int | None) -> None:
        self.tenant, self.event_kind, self.scope, self.target = tenant, event_kind, scope, target
        self.preload, self.variant, self.after_id = preload, ",".join(preload), after_id

    @property
    def plain(self) -> bool:
        return not self.preload and not self.key.limited

    # -- life -----------------------------------------------------------------

    def opened(self) -> None:
        self._last = self.clock.seconds()
        self._idle_call = self.clock.callLater(self.factory.idle_timeout, self._idle_check)
        if "packet" in self.preload:
            self._packet_user = True
            self.factory.packet_users += 1
        if self.after_id is None:
            self._go_live()
        else:
            d = defer.Deferred.fromCoroutine(self._replay())
            d.addErrback(self._replay_failed)

    def closed(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        if self._follower is not None:
            self._follower.cancel()
            self._follower = None
        if self._live:
            self._live = False
            self.factory.detach(self)
        self._queue = None
        self._queued_bytes = 0
        if self._packet_user:
            self._packet_user = False
            self.factory.packet_users -= 1
            if not self.factory.packet_users:
                self.factory._packets.clear()

    def activity(self) -> None:
        self._last = self.clock.seconds()

    def _idle_check(self) -> None:
        self._idle_call = None
        if self.state != STATE_OPEN:
            return
        left = self._last + self.factory.idle_timeout - self.clock.seconds()
        if left > 0:
            self._idle_call = self.clock.callLater(left, self._idle_check)
        else:
            self.close(1000, "idle")

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary and payload.strip() == b"ping":
            self.send_text(b"pong")
        # anything else is ignored: the API is server -> client only

    # -- which events -----------------------------------------------------------

    def wants(self, event: Event, device: Any) -> bool:
        """Does this socket's scope (and key) take ``event``?  Checked per event."""
        if self.key.limited and (device is None or not self.key.sees(device)):
            return False
        scope = self.scope
        if scope == "mandate":
            return True
        if scope == "device":
            return event.device == self.target
        if scope == "tag":
            return device is not None and self.target in device.tags
        stream = self.factory.registry.stream(self.tenant, self.target)
        if stream is None:
            return False
        return stream.names(event.device) or (device is not None and stream.contains(device))

    def replay_devices(self) -> Iterable[str] | None:
        """The identifiers whose stored events the replay reads (None: all of the tenant)."""
        scope, registry, key = self.scope, self.factory.registry, self.key
        if scope == "mandate":
            return None
        if scope == "device":
            return [self.target]
        if scope == "tag":
            return [d.identifier for d in registry.tagged(self.tenant, self.target) if key.sees(d)]
        stream = registry.stream(self.tenant, self.target)
        if stream is None:
            return []
        chosen = {d.identifier for tag in stream.tags for d in registry.tagged(self.tenant, tag) if key.sees(d)}
        for ident in stream.devices:
            device = registry.get(self.tenant, ident)
            if not key.limited or (device is not None and key.sees(device)):
                chosen.add(ident)
        return sorted(chosen)

    # -- replay -------------------------------------------------------------------

    async def _replay(self) -> None:
        factory = self.factory
        follower = self._follower = factory.events.follow(
            self.tenant, (self.event_kind,), self.after_id, self._followed,
            devices=self.replay_devices, page=REPLAY_FRAME, max_bytes=self.max_buffer)
        sent, limit = 0, factory.replay_limit
        while True:
            page = await follower.replay_page()
            if self.state != STATE_OPEN or self._follower is not follower:
                return
            if not page:
                break
            chosen = [e for e in page if self.wants(e, factory.registry.get(e.tenant, e.device))]
            if sent + len(chosen) > limit:
                chosen = chosen[: limit - sent]
                if chosen:
                    await self._send_batch(chosen)
                if self.state == STATE_OPEN:
                    self.log.info("websocket {conn}: replay limit {limit} reached", conn=self.conn_id, limit=limit)
                    self.close(4000, "replay limit")
                return
            if chosen:
                await self._send_batch(chosen)
                sent += len(chosen)
            if self.state != STATE_OPEN:
                return
            await self.writable()  # flow control: a slow client slows its replay
            if self.state != STATE_OPEN:
                return
        # Caught up: send what arrived meanwhile, then hand over to the index, all in
        # this reactor turn (nothing can be published in between).
        self._follower = None
        follower.go_live()
        follower.cancel()
        if self.state == STATE_OPEN:
            self._go_live()

    def _replay_failed(self, failure: Any) -> None:
        self.log.failure("websocket {conn}: replay failed", failure, conn=self.conn_id)
        self.close(1011, "replay failed")

    async def _send_batch(self, events: list[Event]) -> None:
        factory = self.factory
        items = []
        for event in events:
            device = factory.registry.get(event.tenant, event.device)
            packet = None
            if self._needs_packet(event):
                packet = await factory.packet_of(event.tenant, event.data.get("packet_id"))
            items.append(factory.item(event, self.preload, self.variant, device, packet))
        if self.state == STATE_OPEN:
            self.send_text(b"[" + b",".join(items) + b"]", flush=False)
            factory.delivered(self.event_kind, len(items))

    def _followed(self, event: Event) -> None:
        """Live events the follower buffered during the replay (drained by go_live)."""
        device = self.factory.registry.get(event.tenant, event.device)
        if self.wants(event, device):
            self.live(event, device)

    def _go_live(self) -> None:
        self._live = True
        self.factory.attach(self)

    # -- live -----------------------------------------------------------------------

    def _needs_packet(self, event: Event) -> bool:
        return "packet" in self.preload and event.kind == "reading" and event.data.get("packet_id") is not None

    def live(self, event: Event, device: Any) -> None:
        """Send one live event (one per frame), keeping order when a packet must be fetched."""
        if self.state != STATE_OPEN:
            return
        if self._needs_packet(event) or self._queue:
            self._queued_bytes += event.size()
            if self._queued_bytes > self.max_buffer:
                self.too_slow()  # events waiting for their packets: unsent data like any other
                return
            entry = [event, device, None, False]
            if self._queue is None:
                self._queue = deque()
            self._queue.append(entry)
            if self._needs_packet(event):
                d = self.factory.packet_deferred(event.tenant, event.data.get("packet_id"))
            else:
                d = defer.succeed(None)

            def got(packet, entry=entry):
                entry[2], entry[3] = packet, True
                self._drain()

            d.addCallback(got)
            d.addErrback(lambda f: (self.log.failure("packet preload failed", f), got(None)))
            return
        self._send_live(event, device, None)

    def _drain(self) -> None:
        queue = self._queue
        while queue and queue[0][3]:
            event, device, packet, _ = queue.popleft()
            self._queued_bytes -= event.size()
            self._send_live(event, device, packet)

    def _send_live(self, event: Event, device: Any, packet: Event | None) -> None:
        if self.state != STATE_OPEN:
            return
        factory = self.factory
        key = "el:" + self.variant
        if packet is not None:
            key += f":p{packet.id}"
        frame = event.cache.get(key)
        if frame is None:
            item = factory.item(event, self.preload, self.variant, device, packet)
            frame = event.cache[key] = factory.prepareMessage(b"[" + item + b"]")
        self.sendPreparedMessage(frame)
        factory.delivered(event.kind)


class ElementFactory(SocketFactory):
    kind = "element"
    protocol = ElementSocket

    def __init__(self, ctx: Any, clock: Any = None):
        super().__init__(ctx, clock)
        self.events = ctx.events
        self.registry = ctx.registry
        self.store = ctx.store
        self.idle_timeout = ctx.config.websocket.idle_timeout
        self.replay_limit = ctx.config.websocket.replay_limit
        self._index: dict[tuple[str, str], Scopes] = {}
        self._packets = PacketCache(ctx.config.websocket.packet_cache_bytes)
        self.packet_users = 0  # open sockets with the `packet` preload (the cache serves only them)
        self._sub: Any = None

    def start(self) -> None:
        if self._sub is None:
            self._sub = self.events.bus.subscribe(self.on_event, kinds=KINDS)

    def stop(self) -> None:
        if self._sub is not None:
            self._sub.cancel()
            self._sub = None

    # -- the index ----------------------------------------------------------------

    def attach(self, sock: ElementSocket) -> None:
        scopes = self._index.get((sock.tenant, sock.event_kind))
        if scopes is None:
            scopes = self._index[(sock.tenant, sock.event_kind)] = Scopes()
        bucket = scopes.bucket(sock.scope, sock.target, create=True)
        (bucket.plain if sock.plain else bucket.special).add(sock)

    def detach(self, sock: ElementSocket) -> None:
        scopes = self._index.get((sock.tenant, sock.event_kind))
        if scopes is None:
            return
        bucket = scopes.bucket(sock.scope, sock.target, create=False)
        if bucket is not None:
            bucket.plain.discard(sock)
            bucket.special.discard(sock)
            scopes.drop(sock.scope, sock.target)
        if scopes.empty():
            del self._index[(sock.tenant, sock.event_kind)]

    # -- per event --------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        if event.kind == "packet" and self.packet_users:
            self._packets.add(event)
        scopes = self._index.get((event.tenant, event.kind))
        if scopes is None:
            return
        device = self.registry.get(event.tenant, event.device)
        buckets = []
        if scopes.mandate:
            buckets.append(scopes.mandate)
        bucket = scopes.device.get(event.device)
        if bucket is not None:
            buckets.append(bucket)
        if scopes.tag and device is not None:
            for tag in device.tags:
                bucket = scopes.tag.get(tag)
                if bucket is not None:
                    buckets.append(bucket)
        if scopes.stream:
            for stream_id, bucket in scopes.stream.items():
                stream = self.registry.stream(event.tenant, stream_id)
                if stream is not None and (stream.names(event.device)
                                           or (device is not None and stream.contains(device))):
                    buckets.append(bucket)
        for bucket in buckets:
            if bucket.plain:
                self.broadcast(event.kind, self.prepared(event, "el:", self._plain_frame), bucket.plain)
            if bucket.special:
                flush = len(bucket.special) <= FLUSH_FANOUT
                for sock in tuple(bucket.special):
                    if not sock.key.limited or (device is not None and sock.key.sees(device)):
                        sock.live(event, device)
                        if flush:
                            sock.flush()

    def _plain_frame(self, event: Event) -> bytes:
        return b"[" + self.item(event, (), "", None, None) + b"]"

    def item(self, event: Event, preload: tuple[str, ...], variant: str, device: Any,
             packet: Event | None) -> bytes:
        """One ``{"event", "body"}`` element, serialized once per event and preload set."""
        key = "el-item:" + variant
        if packet is not None:
            key += f":p{packet.id}"
        cached = event.cache.get(key)
        if cached is not None:
            return cached
        body = event.body()
        if preload:
            body = dict(body)
            if "device" in preload:
                body["device"] = device_doc(device, preload)
            if "packet" in preload:
                body["packet"] = packet_doc(packet, device, preload)
        out = event.cache[key] = dumps({"event": EVENT_NAMES[event.kind], "body": body})
        return out

    # -- packets for the `packet` preload -------------------------------------------------

    def packet_deferred(self, tenant: str, packet_id: Any) -> defer.Deferred:
        cached = self._packets.get(packet_id) if isinstance(packet_id, int) else None
        if cached is not None:
            return defer.succeed(cached if cached.tenant == tenant else None)
        return defer.Deferred.fromCoroutine(self.packet_of(tenant, packet_id))

    async def packet_of(self, tenant: str, packet_id: Any) -> Event | None:
        if not isinstance(packet_id, int) or isinstance(packet_id, bool):
            return None
        event = self._packets.get(packet_id)
        if event is None:
            row = await self.store.read(evsql.get, packet_id)
            if row is None:
                return None
            event = Event.from_row(row)
        if event.tenant != tenant or event.kind != "packet":
            return None
        return event


def job(ctx: Any, parent: Any) -> Any:
    """The event sockets job: its service (1001 on stop) and its Klein routes."""
    from iotd.web import sockets

    factory = ElementFactory(ctx)
    SocketService("element-ws", factory, on_start=factory.start, on_stop=factory.stop).setServiceParent(parent)
    ctx.jobs["element"] = factory
    return lambda app, ctx: sockets.element_routes(app, ctx, factory)
