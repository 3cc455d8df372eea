"""Auto-registration of unknown devices that poll ``/push`` (``[push] auto_register``), bounded.

Anybody who reaches ``/push`` can make up deviceIds, so:

- ``auto_register_per_minute`` (daemon-wide): at most that many devices are
  registered in any sliding minute, counted in one-second buckets on the
  reactor clock (at most 60 buckets, whatever the rate);
- ``max_devices`` (per tenant, ``Registry.count`` plus registrations in
  flight): no auto-registration once the tenant has that many devices
  (devices created over REST count too).

A poll refused by either gets the empty ``200`` (the device sees "nothing to
do"), is counted as ``iotd_push_polls_total{outcome="unknown"}``, and is
logged at most once a minute (one line with the number refused since the
previous line), never once per poll or per deviceId.  ``0`` for either key
means no device is auto-registered.

Concurrent first polls of one deviceId register it once (they share one
registration); ``host`` is set only here, from the first poll's address.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from twisted.internet import defer

from iotd import errors
from iotd.logs import Logger


class SlidingMinute:
    """At most ``limit`` takes in any 60 seconds, counted in one-second buckets on ``clock``.

    A bucket leaves the window once all of it is more than 60 s old (so the
    window is 60 to 61 seconds long: never more than ``limit`` in a minute).
    """

    WINDOW = 60

    def __init__(self, clock: Any, limit: int):
        self._clock = clock
        self.limit = limit
        self._buckets: deque[list[int]] = deque()  # [second, takes], oldest first; at most WINDOW
        self._total = 0

    def take(self) -> bool:
        """Count one take now, if the window has room; False (nothing counted) if not."""
        now = int(self._clock.seconds())
        buckets = self._buckets
        while buckets and buckets[0][0] + 1 + self.WINDOW <= now:
            self._total -= buckets.popleft()[1]
        if self._total >= self.limit:
            return False
        if buckets and buckets[-1][0] == now:
            buckets[-1][1] += 1
        else:
            buckets.append([now, 1])
        self._total += 1
        return True


class Registrar:
    """Registers unknown pushIds in ``[push] tenant``, within the limits above."""

    log = Logger()

    def __init__(self, registry: Any, clock: Any, cfg: Any, unknown: Callable[[int, str | None, str], None]):
        self._registry = registry
        self._clock = clock
        self.tenant = cfg.tenant
        self.max_devices = cfg.max_devices
        self._rate = SlidingMinute(clock, cfg.auto_register_per_minute)
        self._unknown = unknown  # logs an unknown deviceId once
        self._registering: dict[int, defer.Deferred] = {}
        self._creating = 0  # auto-registrations written but not yet committed
        self._refused = 0  # refused since the last log line
        self._refused_logged_at: float | None = None

    def admits(self, device_id: int, host: str | None) -> bool:
        """Whether a poll of the unknown ``device_id`` may register it (or joins one under way)."""
        return device_id in self._registering or self._may_register(device_id, host)

    async def register(self, device_id: int, host: str | None) -> Any:
        """The device registered for ``device_id`` (shared by concurrent polls), or None."""
        pending = self._registering.get(device_id)
        if pending is None:
            pending = self._registering[device_id] = defer.Deferred.fromCoroutine(
                self._put_device(device_id, host))
            pending.addBoth(lambda r: (self._registering.pop(device_id, None), r)[1])
        waiter: defer.Deferred = defer.Deferred()
        pending.addCallback(lambda device: (waiter.callback(device), device)[1])
        return await waiter

    async def _put_device(self, device_id: int, host: str | None) -> Any:
        registry = self._registry
        device = registry.by_push_id(device_id)
        if device is not None:
            return device
        identifier = str(device_id)
        if registry.get(self.tenant, identifier) is not None:
            self._unknown(device_id, host, "poll (a device named like it has another pushId)")
            return None
        self._creating += 1
        try:
            device, _ = await registry.put(self.tenant, identifier, {"pushId": device_id, "host": host})
        except errors.Conflict:
            return registry.by_push_id(device_id)
        except Exception:
            self.log.failure("auto-registering pushId {push_id} failed", push_id=device_id)
            return None
        finally:
            self._creating -= 1
        self.log.info("device {device} auto-registered (pushId {push_id}, host {host})",
                      device=device.identifier, push_id=device_id, host=host)
        return device

    def _may_register(self, device_id: int, host: str | None) -> bool:
        """``max_devices``, then ``auto_register_per_minute`` (a refused poll takes no slot)."""
        held = self._registry.count(self.tenant) + self._creating
        if held >= self.max_devices:
            why = f"the tenant {self.tenant} has {held} devices, [push] max_devices is {self.max_devices}"
        elif not self._rate.take():
            why = f"[push] auto_register_per_minute ({self._rate.limit}) reached"
        else:
            return True
        self._refused += 1
        now = self._clock.seconds()
        if self._refused_logged_at is None or now - self._refused_logged_at >= SlidingMinute.WINDOW:
            self.log.warn("auto-registration refused for {refused} poll(s) since the last such line "
                          "(the latest: deviceId {device_id} at {host}): {why}",
                          refused=self._refused, device_id=device_id, host=host, why=why)
            self._refused_logged_at = now
            self._refused = 0
        return False
