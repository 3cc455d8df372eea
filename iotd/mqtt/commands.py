"""Commands to MQTT devices: the push lifecycle, with the broker instead of ``GET /push``.

A device whose record says ``"transport": "mqtt"`` never polls; iotd polls
for it.  When work is queued for it (:attr:`iotd.push.work.Work.listeners`),
this module asks the command service for the device's next command exactly as
a poll would (:meth:`iotd.push.polls.Polls.hand_out_then`: one checked
transaction, one command in flight per device, the ``action`` event of the
send) and publishes it to ``P/T/D/commands`` (QoS ``[mqtt] qos``, not
retained) as ``{"id", "verb"?, "endpoint", "body"?, "contentType"?,
"queryString"?}``.  A timer at the send's ``command_timeout`` asks again:
the same transaction then resends it (attempts counted) or, after
``max_attempts``, fails it and sends the next.  A ``commands/result``
message finishes it through the ``/result`` path
(:meth:`~iotd.push.polls.Polls.complete_then`) -- only if it names the
command in flight -- so ``?wait=``, the ``action`` events and the counters
are the push ones, and the next command goes out at once.

Memory: one timer per MQTT device with a command in flight.  While the
broker is down nothing is handed out (a command handed out then would only
wait for its timeout); on every connect the devices with work are asked
again (the work set holds only devices with unfinished commands).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer

from iotd import metrics
from iotd.logs import Logger
from iotd.mqtt.topics import Topics

EPSILON = 0.001  # seconds after a send's timeout before asking again (the transaction's own check)
RETRY_AFTER_FAILURE = 5.0  # seconds before asking again after a failed hand-out transaction


class Commands:
    log = Logger()

    def __init__(self, push: Any, registry: Any, clock: Any, topics: Topics, qos: int):
        self._push = push
        self._registry = registry
        self._clock = clock
        self._topics = topics
        self._qos = qos
        self.connection: Any = None  # iotd.mqtt.connection.Connection, set by the service
        self._asking: set[tuple[str, str]] = set()  # a hand-out transaction is under way
        self._timers: dict[tuple[str, str], Any] = {}  # the next ask of a device with a command in flight

    def start(self) -> None:
        self._push.work.listeners.append(self.work_added)

    def stop(self) -> None:
        if self.work_added in self._push.work.listeners:
            self._push.work.listeners.remove(self.work_added)
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()

    def connected(self) -> None:
        """(Re)connected: ask for every device with work (commands queued while the broker was away)."""
        for key in list(self._push.work.devices):
            self.work_added(key)

    def work_added(self, key: tuple[str, str]) -> None:
        device = self._registry.get(key[0], key[1])
        if device is None or device.transport != "mqtt" or key in self._timers:
            return  # not ours, or a command is in flight: its timer (or result) asks next
        self._ask(device)

    def _ask(self, device: Any) -> None:
        key = (device.tenant, device.identifier)
        if key in self._asking or self.connection is None or not self.connection.connected:
            return
        self._asking.add(key)
        self._cancel_timer(key)
        self._push.hand_out_then(device, self._handed_out, device)

    def _handed_out(self, failure: Any, cmd: Any, device: Any) -> None:
        key = (device.tenant, device.identifier)
        self._asking.discard(key)
        if failure is not None:
            self.log.warn("mqtt: handing out a command to {device} failed: {error}", device=device.identifier,
                          error=failure.getErrorMessage())
            self._later(key, RETRY_AFTER_FAILURE)
            return
        if cmd is None:
            if self._push.has_work(*key):  # one in flight (handed out before a restart): wait for it
                self._later(key, self._push.command_timeout)
            return
        topic = self._topics.commands(device.tenant, device.identifier)
        body = {"id": cmd.id, **cmd.spec()}
        if self.connection is not None and self.connection.publish(topic, _dumps(body), self._qos):
            metrics.mqtt_commands.labels("sent" if cmd.attempts == 1 else "resent").inc()
        else:
            metrics.mqtt_commands.labels("not_sent").inc()  # counted as an attempt: the timer resends it
        self._later(key, max(0.0, cmd.sent_at + self._push.command_timeout - self._clock.seconds()) + EPSILON)

    def _later(self, key: tuple[str, str], seconds: float) -> None:
        self._cancel_timer(key)
        self._timers[key] = self._clock.callLater(seconds, self._again, key)

    def _cancel_timer(self, key: tuple[str, str]) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _again(self, key: tuple[str, str]) -> None:
        self._timers.pop(key, None)
        device = self._registry.get(key[0], key[1])
        if device is not None and device.transport == "mqtt" and self._push.has_work(*key):
            self._ask(device)

    # -- results ---------------------------------------------------------------------------

    def result(self, device: Any, command_id: int, payload: bytes) -> defer.Deferred:
        """A ``commands/result`` message: finish that command if it is in flight, then send the next."""
        d: defer.Deferred = defer.Deferred()
        self._push.complete_then(device, payload, None, self._completed, device, d, command_id=command_id)
        return d

    def _completed(self, failure: Any, cmd: Any, device: Any, d: defer.Deferred) -> None:
        if failure is not None:
            d.errback(failure)
            return
        key = (device.tenant, device.identifier)
        if cmd is not None:
            self._cancel_timer(key)
            if self._push.has_work(*key):
                self._ask(device)
        d.callback("result" if cmd is not None else "result_orphan")


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
