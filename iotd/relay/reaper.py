"""Rows of dead nodes leave the ``links`` table.

A node that dies (``kill -9``, a lost machine) cannot delete its rows.  The
listing hides them as soon as the node drops out of ``cluster.live`` (its
heartbeat is old, :mod:`iotd.cluster.nodes`); this removes them for good.

Every node runs it, idempotently (two nodes deleting the same rows is
harmless): every :data:`EVERY` seconds one read of the nodes that have rows
(the ``links_by_node`` index); a node that is not alive, here, continuously
for :data:`DEAD_AFTER` seconds (by this node's clock) loses its rows in one
delete.  A node seen alive again in between starts over.  This node's own
rows are never touched here (:mod:`iotd.relay.rows` owns them).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task

from iotd.logs import Logger
from iotd.store import links as linksql

EVERY = 10.0
DEAD_AFTER = 30.0


class DeadNodeReaper:
    log = Logger()

    def __init__(self, store: Any, clock: Any, cluster: Any, every: float = EVERY,
                 dead_after: float = DEAD_AFTER) -> None:
        self.store = store
        self.clock = clock
        self.cluster = cluster
        self.every = every
        self.dead_after = dead_after
        self._dead_since: dict[str, float] = {}
        self._loop: task.LoopingCall | None = None

    def start(self) -> None:
        if self._loop is None and self.every > 0:
            self._loop = task.LoopingCall(self._tick)
            self._loop.clock = self.clock
            self._loop.start(self.every, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _tick(self) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self.sweep()).addErrback(
            lambda f: self.log.warn("link rows of dead nodes: sweep failed ({error})",
                                    error=f.getErrorMessage()))

    async def sweep(self) -> int:
        """One pass; returns the rows deleted."""
        names = await self.store.read(linksql.nodes)
        now = self.clock.seconds()
        me = self.cluster.node
        seen = set(names)
        for name in list(self._dead_since):
            if name not in seen:
                del self._dead_since[name]
        removed = 0
        for name in names:
            if name == me or self.cluster.alive(name):
                self._dead_since.pop(name, None)
                continue
            since = self._dead_since.setdefault(name, now)
            if now - since < self.dead_after:
                continue
            count = await self.store.write(linksql.delete_node, name)
            self._dead_since.pop(name, None)
            removed += count
            if count:
                self.log.info("deleted {count} link rows of node {node}, dead for {secs:.0f} s",
                              count=count, node=name, secs=now - since)
        return removed
