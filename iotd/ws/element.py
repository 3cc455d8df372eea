"""ELEMENT-style event sockets: packets and readings of a device, tag, stream or tenant.

One :class:`ElementFactory` serves all eight URLs (:mod:`iotd.ws.element_job`).
It subscribes to the event bus once and keeps its live sockets in an
:class:`~iotd.ws.element_index.ElementIndex`, so an event costs a few dict
lookups plus one write per interested socket; what a frame holds is
:mod:`iotd.ws.element_format`, the packets of the ``packet`` preload come
from :mod:`iotd.ws.element_packets`.

A socket with ``after`` first replays stored events through
:meth:`iotd.events.EventLog.follow` (subscribe-then-read, so no gap and no
duplicate), a page of up to 100 events per frame, waiting for the client to
drain each frame when its socket buffer is full; then it joins the index in
the same reactor turn as the last buffered live event is sent.

Memory, chosen where the spec is silent: a replay's buffer of live events is
bounded by ``max_buffer_bytes`` (past it, it is dropped and the replay reads
those events from the store).  Live events that wait behind a packet read
from the store count toward the socket's ``max_buffer_bytes``; past it the
socket is cut as too slow (1008).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterable

from twisted.internet import defer

from iotd import scopes
from iotd.events import Event
from iotd.ws.element_format import KINDS, item, plain_frame
from iotd.ws.element_index import ElementIndex
from iotd.ws.element_packets import Packets
from iotd.ws.factory import SocketFactory
from iotd.ws.limits import Limits
from iotd.ws.protocol import FLUSH_FANOUT, STATE_OPEN, SocketProtocol

REPLAY_FRAME = 100  # events per replay frame


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
    _packet_user = False  # counted in factory.packets.users

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
            self.factory.packets.joined()
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
            self.factory.index.detach(self)
        self._queue = None
        self._queued_bytes = 0
        if self._packet_user:
            self._packet_user = False
            self.factory.packets.left()

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
        return scopes.wants(self.factory.registry, self.key, self.scope, self.target, event, device)

    def replay_devices(self) -> Iterable[str] | None:
        """The identifiers whose stored events the replay reads (None: all of the tenant)."""
        return scopes.devices_of(self.factory.registry, self.key, self.scope, self.target)

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
                packet = await factory.packets.read(event.tenant, event.data.get("packet_id"))
            items.append(item(event, self.preload, self.variant, device, packet))
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
        self.factory.index.attach(self)

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
                d = self.factory.packets.deferred(event.tenant, event.data.get("packet_id"))
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
            element = item(event, self.preload, self.variant, device, packet)
            frame = event.cache[key] = factory.prepareMessage(b"[" + element + b"]")
        self.sendPreparedMessage(frame)
        factory.delivered(event.kind)


class ElementFactory(SocketFactory):
    kind = "element"
    protocol = ElementSocket
    bus_kinds = KINDS

    def __init__(self, ctx: Any, limits: Limits, clock: Any = None):
        super().__init__(ctx, limits, clock)
        self.idle_timeout = ctx.config.websocket.idle_timeout
        self.replay_limit = ctx.config.websocket.replay_limit
        self.index = ElementIndex(ctx.registry)
        self.packets = Packets(ctx.store, ctx.config.websocket.packet_cache_bytes)

    def on_event(self, event: Event) -> None:
        if event.kind == "packet":
            self.packets.published(event)
        device, buckets = self.index.buckets(event)
        for bucket in buckets:
            if bucket.plain:
                self.broadcast(event.kind, self.prepared(event, "el:", plain_frame), bucket.plain)
            if bucket.special:
                flush = len(bucket.special) <= FLUSH_FANOUT
                for sock in tuple(bucket.special):
                    if not sock.key.limited or (device is not None and sock.key.sees(device)):
                        sock.live(event, device)
                        if flush:
                            sock.flush()
