"""Build this node's :class:`~iotd.cluster.node.Cluster` from ``[cluster]``."""

from __future__ import annotations

from typing import Any

from iotd.cluster.channel import Channel
from iotd.cluster.node import Cluster


def make_cluster(config: Any, store: Any, reactor: Any) -> Cluster:
    node = config.cluster.node_name
    if not config.cluster.bus:
        return Cluster(node=node, channel=Channel(node))
    from iotd.cluster.redis import RedisChannel

    cluster = Cluster(node=node, channel=RedisChannel(node, config.cluster.bus, reactor), clustered=True)
    if config.store_backend == "postgresql":  # (SQLite: one machine; every node sweeps, checked in the store)
        from iotd.cluster.leader import PgLeader

        cluster.leader = PgLeader(config.store.url, reactor, node=node)
    return cluster
