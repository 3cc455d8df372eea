"""The topic map (spec 60): ``P/T/D/<what>``, ``P`` = ``[mqtt] topic_prefix``, ``T`` tenant, ``D`` device.

| topic                   | direction     | becomes                        |
| ----------------------- | ------------- | ------------------------------ |
| ``P/T/D/packets``       | device → iotd | a ``packet`` event             |
| ``P/T/D/readings``      | device → iotd | ``reading`` event(s)           |
| ``P/T/D/ota``           | device → iotd | an ``ota`` event               |
| ``P/T/D/status``        | device → iotd | ``conn`` events (online/offline) |
| ``P/T/D/commands/result`` | device → iotd | its command done or failed   |
| ``P/T/D/commands``      | iotd → device | a command sent                 |

iotd subscribes to the five device → iotd filters (``P/+/+/packets`` ...),
not to ``P/#``, so it never reads back its own commands.  With several
nodes each filter is a shared subscription, ``$share/iotd/<filter>``: the
broker gives each message to one node.
"""

from __future__ import annotations

from typing import NamedTuple

INBOUND = ("packets", "readings", "ota", "status", "commands/result")
SHARE_GROUP = "iotd"


class Route(NamedTuple):
    tenant: str
    device: str  # as in the topic (the registry's lookup normalizes it)
    what: str  # one of INBOUND


class Topics:
    def __init__(self, prefix: str, shared: bool = False):
        self.prefix = prefix
        self._levels = prefix.count("/") + 1
        self.shared = shared

    def filters(self) -> list[str]:
        """What iotd subscribes to."""
        share = f"$share/{SHARE_GROUP}/" if self.shared else ""
        return [f"{share}{self.prefix}/+/+/{what}" for what in INBOUND]

    def route(self, topic: str) -> Route | None:
        """Where a message came from, or None for a topic outside the map."""
        parts = topic.split("/")
        if parts[:self._levels] != self.prefix.split("/"):
            return None
        rest = parts[self._levels:]
        if len(rest) < 3 or not rest[0] or not rest[1]:
            return None
        what = "/".join(rest[2:])
        if what not in INBOUND:
            return None
        return Route(rest[0], rest[1], what)

    def commands(self, tenant: str, device: str) -> str:
        return f"{self.prefix}/{tenant}/{device}/commands"
