""":class:`Cluster`: what the jobs reach as ``ctx.cluster`` -- this node's name, the channel, the leader.

One node (``[cluster] bus`` empty) has an in-process :class:`Channel` and is
always the leader; with a bus the channel is Redis and the leader is elected
(:mod:`iotd.cluster.leader`).
"""

from __future__ import annotations

from typing import Any, Callable

import attrs

from iotd import metrics
from iotd.cluster.channel import Channel, Handler


@attrs.define(eq=False)
class AlwaysLeader:
    """The leader of a cluster of one."""

    is_leader: bool = True

    def on_change(self, fn: Callable[[bool], None]) -> None:
        """``fn(is_leader)`` on each change (never, here)."""

    async def start(self) -> None:
        metrics.leader.set(1)

    async def stop(self) -> None:
        pass


@attrs.define(eq=False)
class Cluster:
    node: str
    channel: Channel
    leader: Any = attrs.Factory(AlwaysLeader)
    clustered: bool = False  # a bus joins this node to others
    # Names of the nodes whose heartbeat in the store is fresh, this one included
    # (kept by iotd.cluster.nodes; a node silent for DEAD_AFTER seconds is dead).
    live: set[str] = attrs.Factory(set)

    def __attrs_post_init__(self) -> None:
        self.live.add(self.node)

    def alive(self, node: str) -> bool:
        return node in self.live

    def publish(self, topic: str, message: dict[str, Any]) -> None:
        """Tell the other nodes (at most once; the store is the backstop)."""
        self.channel.publish(topic, message)

    def subscribe(self, topic: str, handler: Handler) -> None:
        """``handler(node, message)`` for each message another node publishes on ``topic``."""
        self.channel.subscribe(topic, handler)


def single(node: str = "local") -> Cluster:
    """A cluster of one node (tests and ``[cluster] bus`` empty)."""
    return Cluster(node=node, channel=Channel(node))
