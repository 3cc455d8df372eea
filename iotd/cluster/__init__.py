"""Several nodes on one store (spec 50): the bus between them, event order, leadership.

- :mod:`iotd.cluster.channel` -- topics between nodes: :class:`Channel` (one node: in-process);
- :mod:`iotd.cluster.redis` -- the same over Redis pub/sub (txredisapi);
- :mod:`iotd.cluster.sequencer` -- every node delivers every event in id order, holes filled from the store;
- :mod:`iotd.cluster.nodes` -- this node's heartbeat in the store, which nodes live;
- :mod:`iotd.cluster.leader` -- one node runs the sweeps (a PostgreSQL session advisory lock);
- :mod:`iotd.cluster.node` -- :class:`Cluster`, what the jobs reach as ``ctx.cluster``.
"""
