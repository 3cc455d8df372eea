"""What devices publish, into the event log: acknowledged to the broker only once committed.

Each message is one store write through :meth:`iotd.events.EventLog.transact`
(the store's group commit batches them): its events and a mark of the
message (``mqtt_seen``, :mod:`iotd.store.mqtt`) commit together.  Only then
is its PUBACK sent, in the order the messages came (MQTT 3.1.1 asks for
that), and only on the connection it came on.  So:

- kill -9 of iotd loses nothing: what was not acknowledged, the broker
  redelivers to the persistent session;
- a redelivery is not stored twice: it comes flagged ``dup`` with the same
  message id, and a message id whose mark holds the same digest (of topic and
  payload) was committed already -- it is acknowledged and dropped.  A
  device's own ``"id"`` in a payload is marked too: the same id from the same
  device is stored once, whatever the broker does.  Marks older than
  :data:`MARK_DAYS` are pruned (:class:`iotd.mqtt.service.MqttService`);
- a malformed payload (not JSON where JSON is needed, a reading without
  ``data``, a ``packet_id`` naming no packet of the device) is acknowledged
  and dropped with one log line and ``iotd_mqtt_messages_total{outcome="malformed"}``;
- a message for a device the registry does not know is dropped and counted,
  logged once per device (up to :data:`LOGGED_UNKNOWN` devices), or
  registered with ``"transport": "mqtt"`` when ``[mqtt] auto_register``
  (within ``[push] max_devices`` per tenant);
- a store write that fails (store unavailable, write queue full) is not
  acknowledged: the connection is dropped, so the broker redelivers once
  iotd connects again (after the backoff).

Flow control: the payloads waiting for their commit are counted in bytes;
past :data:`HIGH_WATER` bytes (or :data:`HIGH_COUNT` messages) the socket is
not read until they fall under half of it.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Any

from twisted.internet import defer

from iotd import errors, metrics
from iotd.device import normalize_identifier
from iotd.logs import Logger
from iotd.mqtt import payloads
from iotd.mqtt.topics import Topics
from iotd.store import mqtt as mqttsql
from iotd.timefmt import iso, micros_of

HIGH_WATER = 8 * 1024 * 1024  # bytes of payloads awaiting their commit before reading stops
HIGH_COUNT = 5000  # messages awaiting their commit before reading stops
LOGGED_UNKNOWN = 10000  # unknown devices logged once each (then counted only)
MARK_DAYS = 1.0


class _Waiting:
    __slots__ = ("mid", "qos", "generation", "size", "done")

    def __init__(self, mid: int, qos: int, generation: int, size: int):
        self.mid, self.qos, self.generation, self.size = mid, qos, generation, size
        self.done = False


def store_message(conn: Any, mid_key: str | None, dup: bool, id_key: str | None, digest: str,
                  items: list, now_us: int) -> tuple[str, list]:
    """(store writer) Mark the message and return its events, or ``"duplicate"`` and none."""
    if id_key is not None and mqttsql.seen_before(conn, id_key, ""):
        return "duplicate", []
    if mid_key is not None and dup and mqttsql.seen_before(conn, mid_key, digest):
        return "duplicate", []
    if mid_key is not None:
        mqttsql.mark(conn, mid_key, digest, now_us)
    if id_key is not None:
        mqttsql.mark(conn, id_key, "", now_us)
    return "stored", items


class Ingest:
    log = Logger()

    def __init__(self, reactor: Any, registry: Any, events: Any, topics: Topics, client_id: str,
                 auto_register: bool = False, max_devices: int = 100000):
        self._reactor = reactor
        self._registry = registry
        self._events = events
        self._topics = topics
        self._client_id = client_id
        self.auto_register = auto_register
        self.max_devices = max_devices
        self.connection: Any = None  # iotd.mqtt.connection.Connection, set by the service
        self.commands: Any = None  # iotd.mqtt.commands.Commands, or None (push off)
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._bytes = 0
        self._paused = False
        self._logged: set[tuple[str, str]] = set()
        self._pending: set[defer.Deferred] = set()

    # -- one message --------------------------------------------------------------------

    def message(self, message: Any, generation: int) -> None:
        payload = message.payload
        entry = _Waiting(message.mid, message.qos, generation, len(payload) + len(message.topic))
        self._waiting.append(entry)
        self._bytes += entry.size
        self._throttle()
        try:
            d = self._handle(message)
        except errors.Invalid as e:
            self._malformed(message, e.message)
            d = None
        if d is None:
            self._done(entry)
            return
        self._pending.add(d)
        d.addCallbacks(self._handled, self._failed, callbackArgs=(entry,), errbackArgs=(entry, message))
        d.addBoth(lambda _: self._pending.discard(d))

    def _handle(self, message: Any) -> defer.Deferred | None:
        route = self._topics.route(message.topic)
        if route is None:
            metrics.mqtt_messages.labels("unknown_topic").inc()
            return None
        try:
            identifier = normalize_identifier(route.device)
        except errors.Invalid:
            metrics.mqtt_messages.labels("unknown_device").inc()
            return None
        device = self._registry.get(route.tenant, identifier)
        if device is None:
            if not self.auto_register:
                self._unknown(route.tenant, identifier)
                return None
            d = defer.Deferred.fromCoroutine(self._register(route.tenant, identifier))
            return d.addCallback(lambda dev: self._for_device(dev, route.what, message) if dev else "unknown_device")
        return self._for_device(device, route.what, message)

    def _for_device(self, device: Any, what: str, message: Any) -> defer.Deferred | str:
        now = self._reactor.seconds()
        self._registry.touch(device, None, micros_of(now))
        payload = message.payload
        if what == "commands/result":
            if self.commands is None:  # ([push] enabled = false: no command queue)
                return defer.succeed("result_ignored")
            return self.commands.result(device, payloads.result_id(payload), payload)
        mid_key = f"m/{self._client_id}/{message.mid}" if message.qos > 0 else None
        digest = hashlib.sha256(message.topic.encode() + b"\0" + payload).hexdigest()[:32]
        if what == "status":
            online = payloads.status(payload)
            if device.online == online:
                return defer.succeed("status")
            items = [(device.tenant, "conn", device.identifier, {"status": 1 if online else 2})]
            d = self._events.transact(store_message, mid_key, bool(message.dup), None, digest, items,
                                      micros_of(now), size=len(payload))
            return d.addCallback(self._status_stored, device, online)
        parsed = payloads.EVENTS[what](payload, iso(micros_of(now)))
        id_key = (f"i/{device.tenant}/{device.identifier}/{parsed.message_id}"
                  if parsed.message_id is not None else None)
        items = [(device.tenant, kind, device.identifier, data) for kind, data in parsed.items]
        d = self._events.transact(store_message, mid_key, bool(message.dup), id_key, digest, items,
                                  micros_of(now), size=len(payload))
        return d.addCallback(lambda value: value[0])

    def _status_stored(self, value: tuple[str, list], device: Any, online: bool) -> str:
        if value[0] == "stored" and device.online != online:
            device.online = online
            self._registry.mark(device)
            self.log.info("device {device} {state} (mqtt status)", device=device.identifier,
                          state="online" if online else "offline")
        return "status"

    def _handled(self, outcome: Any, entry: _Waiting) -> None:
        metrics.mqtt_messages.labels(outcome).inc()
        self._done(entry)

    def _failed(self, failure: Any, entry: _Waiting, message: Any) -> None:
        if failure.check(errors.Invalid, errors.ItemInvalid):
            self._malformed(message, failure.value.message)
            self._done(entry)
            return
        metrics.mqtt_messages.labels("store_failed").inc()
        self.log.warn("mqtt: storing a message failed ({error}); not acknowledged, the broker sends it again",
                      error=failure.getErrorMessage())
        entry.qos = 0  # never acknowledged: the connection it came on is dropped
        if self.connection is not None:
            self.connection.drop("a store write failed")
        self._done(entry)

    def _malformed(self, message: Any, why: str) -> None:
        metrics.mqtt_messages.labels("malformed").inc()
        self.log.warn("mqtt: dropped a malformed message on {topic}: {why}", topic=message.topic[:200],
                      why=why[:300])

    def _unknown(self, tenant: str, identifier: str, count: bool = True) -> None:
        if count:
            metrics.mqtt_messages.labels("unknown_device").inc()
        if (tenant, identifier) not in self._logged and len(self._logged) < LOGGED_UNKNOWN:
            self._logged.add((tenant, identifier))
            self.log.warn("mqtt: dropping messages of unknown device {device} (tenant {tenant}); "
                          "register it, or set [mqtt] auto_register", device=identifier, tenant=tenant)

    async def _register(self, tenant: str, identifier: str) -> Any:
        if self._registry.count(tenant) >= self.max_devices:
            self._unknown(tenant, identifier, count=False)  # (counted once the message is answered)
            return None
        device = self._registry.get(tenant, identifier)
        if device is None:
            device, _ = await self._registry.put(tenant, identifier, {"transport": "mqtt"})
            self.log.info("device {device} auto-registered (mqtt)", device=identifier)
        return device

    # -- acknowledgements and flow control --------------------------------------------------

    def _done(self, entry: _Waiting) -> None:
        entry.done = True
        waiting = self._waiting
        while waiting and waiting[0].done:
            first = waiting.popleft()
            self._bytes -= first.size
            if self.connection is not None:
                self.connection.ack(first.mid, first.qos, first.generation)
        if self._paused and self._bytes < HIGH_WATER // 2 and len(waiting) < HIGH_COUNT // 2:
            self._paused = False
            if self.connection is not None:
                self.connection.resume()

    def _throttle(self) -> None:
        if not self._paused and (self._bytes > HIGH_WATER or len(self._waiting) > HIGH_COUNT):
            self._paused = True
            self.log.info("mqtt: {n} messages ({size} bytes) wait for the store; reading paused",
                          n=len(self._waiting), size=self._bytes)
            if self.connection is not None:
                self.connection.pause()

    def settle(self) -> defer.Deferred:
        """Fires once every message handed to the store so far has been answered."""
        return defer.DeferredList(list(self._pending), consumeErrors=True)

