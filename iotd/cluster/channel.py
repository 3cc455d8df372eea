"""Topics between nodes: ``publish(topic, message)`` on one node, ``handler(node, message)`` on the others.

A message is a JSON object; delivery is at most once and in order per
publishing node (Redis pub/sub).  Nothing that must not be lost rides on a
channel alone: the store holds it, and a channel only says "look now"
(each user has a store read as its backstop).

:class:`Channel` is the one-node channel: there is nobody to tell, so
``publish`` only counts.  :class:`iotd.cluster.redis.RedisChannel` carries
the same calls between nodes.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from iotd import metrics
from iotd.logs import Logger

Handler = Callable[[str, dict[str, Any]], None]  # (node that published, message)
UpListener = Callable[[], None]


class Channel:
    """The in-process channel of a single node (``[cluster] bus`` empty)."""

    log = Logger()
    kind = "in-process"

    def __init__(self, node: str) -> None:
        self.node = node
        self._handlers: dict[str, list[Handler]] = {}
        self._up: list[UpListener] = []
        self.state = "ok"  # "ok" | "down" | "connecting"

    @property
    def up(self) -> bool:
        return self.state == "ok"

    def subscribe(self, topic: str, handler: Handler) -> None:
        """``handler(node, message)`` for each message another node publishes on ``topic``."""
        self._handlers.setdefault(topic, []).append(handler)

    def on_up(self, listener: UpListener) -> None:
        """``listener()`` each time the channel (re)connects: messages may have been lost before."""
        self._up.append(listener)

    def publish(self, topic: str, message: dict[str, Any]) -> None:
        """Tell the other nodes (none here: nothing is even encoded)."""

    def send(self, topic: str, text: str) -> None:
        """Publish an envelope already made by :meth:`encode` (none here)."""

    def encode(self, message: dict[str, Any]) -> str:
        """The envelope of ``message``: it names this node, so a node ignores its own messages."""
        return json.dumps({"n": self.node, "m": message}, separators=(",", ":"), ensure_ascii=False)

    def received(self, topic: str, text: str) -> None:
        """A message arrived on ``topic``: hand it to the handlers unless this node sent it."""
        try:
            envelope = json.loads(text)
            node, message = envelope["n"], envelope["m"]
        except (ValueError, TypeError, KeyError):
            self.log.warn("bus: dropped a malformed message on {topic}", topic=topic)
            return
        if node == self.node:
            return
        metrics.bus_messages.labels("in", topic).inc()
        for handler in self._handlers.get(topic, ()):
            try:
                handler(node, message)
            except Exception:
                self.log.failure("bus: handler for {topic} failed", topic=topic)

    def _came_up(self) -> None:
        for listener in tuple(self._up):
            try:
                listener()
            except Exception:
                self.log.failure("bus: an up listener failed")

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass
